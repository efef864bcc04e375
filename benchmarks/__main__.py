"""Run the benchmarks against the dev cluster and write the performance report.

    python -m benchmarks                  # everything, ~15 min; writes docs/performance.md
    python -m benchmarks --quick          # smoke run, < 1 min; writes benchmarks/out/quick/
    python -m benchmarks --only polling   # some sections (latency, throughput, reads, polling)
    python -m benchmarks --from-json benchmarks/results/performance.json   # report only

Needs root (sbatch as the service account, sacctmgr, scancel, sdiag), the dev cluster up
(``deploy/dev-cluster/up.sh``), PostgreSQL on 127.0.0.1:5432 (``$BROKER_TEST_POSTGRES``) and wrk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.broker_process import (
    BACKENDS,
    BrokerServer,
    fresh_database,
    seed_bench_project,
)
from benchmarks.load import wrk_available
from benchmarks.plan import FULL, QUICK, Plan
from benchmarks.polling import run_polling
from benchmarks.procstat import MachineCpu, background_busy
from benchmarks.reads import run_reads
from benchmarks.report import BACKEND_LABELS, write_report
from benchmarks.slurm import REPO, Cluster, cancel_all, prepare_account, wait_for_quiet
from benchmarks.submission import BrokerTarget, run_latency, run_throughput

SECTIONS = ("polling", "reads", "latency", "throughput")
"""In the order they run. Polling comes first, so that its squeue reads a queue without the
thousands of jobs the other sections cancel (slurmctld keeps them for MinJobAge, 300 s); the
reads need no Slurm job, which gives slurmctld time to purge the polling jobs before the
submissions start."""
RESULTS = REPO / "benchmarks" / "results"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _preflight(sections: Sequence[str]) -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root: sbatch runs as the service account; sacctmgr, sdiag")
    if "reads" in sections and not wrk_available():
        problems.append("wrk is missing: apt-get install wrk (benchmarks/run.sh does)")
    if problems:
        raise SystemExit("benchmarks cannot run:\n  " + "\n  ".join(problems))


class _SectionCpu:
    """Busy and stolen shares of the machine's CPU over each section."""

    def __init__(self, results: dict[str, Any]) -> None:
        self._store: dict[str, dict[str, float]] = results.setdefault("section_cpu", {})
        self._started = MachineCpu.now()

    def start(self) -> None:
        self._started = MachineCpu.now()

    def end(self, name: str) -> None:
        now = MachineCpu.now()
        self._store[name] = {
            "busy": now.busy_since(self._started),
            "steal": now.steal_since(self._started),
        }


def _save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")


def run(plan: Plan, sections: Sequence[str], json_path: Path, workdir: Path) -> dict[str, Any]:
    cluster = Cluster.from_broker_toml("alpha")
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": "quick" if plan.quick else "full",
        "machine": machine.describe(cluster),
        "plan": asdict(plan),
        "sections": {},
        "background_busy": {},
    }
    cpu = _SectionCpu(results)
    say(f"preparing Slurm account bench on {cluster.name}")
    prepare_account(cluster)
    cancel_all(cluster)
    try:
        if "polling" in sections:
            say(f"3. polling at {', '.join(map(str, plan.poll_sizes))} live jobs")
            results["background_busy"]["polling"] = background_busy(plan.background_sample_s)
            cpu.start()
            results["sections"]["polling"] = run_polling(plan, cluster, workdir, say)
            cpu.end("polling")
            _save(results, json_path)
        if "reads" in sections:
            say(f"4. API reads with {plan.read_jobs} jobs")
            results["background_busy"]["reads"] = background_busy(plan.background_sample_s)
            cpu.start()
            results["sections"]["reads"] = run_reads(plan, workdir, say)
            cpu.end("reads")
            _save(results, json_path)
        if "latency" in sections or "throughput" in sections:
            with ExitStack() as stack:
                targets = []
                for backend in BACKENDS:
                    url = stack.enter_context(fresh_database(backend, workdir))
                    token = seed_bench_project(url, cluster.name)
                    server = stack.enter_context(BrokerServer(url, workdir, f"submit-{backend}"))
                    targets.append(BrokerTarget(backend, BACKEND_LABELS[backend], server, token))
                if "latency" in sections:
                    say(f"1. submission latency: {plan.latency_rounds} rounds")
                    held = wait_for_quiet(
                        cluster, plan.quiet_jobs, timeout=plan.room_wait_s, say=say
                    )
                    results["background_busy"]["latency"] = background_busy(
                        plan.background_sample_s
                    )
                    cpu.start()
                    latency = run_latency(plan, cluster, targets, say)
                    cpu.end("latency")
                    results["sections"]["latency"] = {**latency, "controller_jobs_at_start": held}
                    _save(results, json_path)
                if "throughput" in sections:
                    say(f"2. throughput: {plan.throughput_jobs} jobs per variant")
                    held = wait_for_quiet(
                        cluster, plan.quiet_jobs, timeout=plan.room_wait_s, say=say
                    )
                    results["background_busy"]["throughput"] = background_busy(
                        plan.background_sample_s
                    )
                    cpu.start()
                    throughput = run_throughput(plan, cluster, targets, say)
                    cpu.end("throughput")
                    results["sections"]["throughput"] = {
                        **throughput,
                        "controller_jobs_at_start": held,
                    }
                    _save(results, json_path)
    finally:
        cancel_all(cluster)
        results["elapsed_s"] = time.monotonic() - started
        _save(results, json_path)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke run with small counts")
    parser.add_argument("--out", type=Path, help="where performance.md and the plots go")
    parser.add_argument("--json", type=Path, help="where the raw results go")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}",
    )
    parser.add_argument("--from-json", type=Path, help="only write the report from these results")
    args = parser.parse_args(argv)

    out = args.out or (REPO / "benchmarks" / "out" / "quick" if args.quick else REPO / "docs")
    if args.from_json:
        document = write_report(json.loads(args.from_json.read_text()), out)
        say(f"wrote {document}")
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}")
    _preflight(sections)
    json_path = args.json or (
        out / "performance.json" if args.quick else RESULTS / "performance.json"
    )
    workdir = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    results = run(QUICK if args.quick else FULL, sections, json_path, workdir)
    shutil.rmtree(workdir, ignore_errors=True)  # kept, with the brokers' logs, if the run failed
    document = write_report(results, out)
    say(f"wrote {document} and {json_path} in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
