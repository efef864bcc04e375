"""Measure command latency over a reused SSH connection versus a fresh connection per command,
and the number of commands ``statuses()`` runs for 10 and for 1,000 jobs.

    .venv/bin/python -m tests.adapters.measure_ssh [--cluster beta] [-n 200]

Needs the dev cluster (deploy/dev-cluster/up.sh). The two ways are interleaved, one command of
each in turn, so that load on the machine affects both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

from adapters.slurm.client import SlurmClient
from adapters.ssh import SSHRunner
from tests import devcluster


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cluster", default="beta")
    parser.add_argument("-n", type=int, default=200)
    args = parser.parse_args()
    dev = devcluster.cluster(args.cluster)

    def new_runner() -> SSHRunner:
        return SSHRunner(
            name=dev.name,
            host=dev.host,
            port=dev.port,
            user=dev.user,
            private_key=dev.private_key,
            known_hosts=dev.known_hosts,
            extra_env={"SLURM_CONF": str(dev.slurm_conf)},
        )

    commands = {"true": ["/bin/true"], "sinfo": [f"{dev.bin_dir}/sinfo", "-h", "-o", "%P"]}
    reused = new_runner()
    reused.run(["/bin/true"])  # connect once, outside the measurement

    def fresh(argv: list[str]) -> None:
        with new_runner() as runner:
            runner.run(argv)

    print(f"cluster {dev.name}, n={args.n} per series, interleaved (milliseconds)")
    print(f"{'command':8} {'connection':10} {'p50':>8} {'p95':>8} {'mean':>8}")
    for label, argv in commands.items():
        kept: list[float] = []
        new: list[float] = []
        for _ in range(args.n):
            kept.append(timed(lambda argv=argv: reused.run(argv)))  # type: ignore[misc]
            new.append(timed(lambda argv=argv: fresh(argv)))  # type: ignore[misc]
        for way, samples in (("reused", kept), ("fresh", new)):
            print(
                f"{label:8} {way:10} {percentile(samples, 0.5) * 1e3:8.1f} "
                f"{percentile(samples, 0.95) * 1e3:8.1f} {statistics.fmean(samples) * 1e3:8.1f}"
            )
    print(f"connections opened by the reused runner: {reused.connections_opened}")

    client = SlurmClient(reused, cluster=dev.name, bin_dir=dev.bin_dir)
    for count in (10, 1000):
        ids = [str(90_000_000 + n) for n in range(count)]
        started = time.perf_counter()
        report = client.statuses(ids)
        elapsed = time.perf_counter() - started
        print(
            f"statuses({count:>4} ids): {report.commands} commands, {elapsed * 1e3:.1f} ms, "
            f"{len(report.missing)} missing"
        )
    reused.close()


if __name__ == "__main__":
    main()
