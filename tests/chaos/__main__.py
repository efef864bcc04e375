"""``python -m tests.chaos``: a fault campaign on the dev cluster; exit 1 if an invariant broke.

Run as root from the repository, with the dev cluster up (deploy/dev-cluster/up.sh) and
PostgreSQL answering ($BROKER_TEST_POSTGRES). docs/operations.md describes the long mode.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tests.chaos.campaign import FAULTS, Plan, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--cluster", default="alpha", help="the cluster whose daemons to stop")
    parser.add_argument("--budget", type=float, default=50.0, help="project GPU-hours")
    parser.add_argument("--seed", type=int, default=None, help="fault schedule seed")
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated kinds of fault (default {','.join(FAULTS)}; empty: none)",
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    for chatty in ("httpx", "paramiko"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    plan = Plan(
        duration_s=args.duration,
        clients=args.clients,
        cluster=args.cluster,
        budget_gpu_hours=args.budget,
        seed=args.seed,
        faults=tuple(f for f in args.faults.split(",") if f),
    )
    unknown = set(plan.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}: choose from {', '.join(FAULTS)}")
    report = run(plan)
    print(report.summary())
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
