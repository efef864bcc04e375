"""Run the benchmarks against the dev cluster and write the performance report.

    python -m benchmarks                  # everything, ~15 min; writes docs/performance.md
    python -m benchmarks --quick          # smoke run, < 1 min; writes benchmarks/out/quick/
    python -m benchmarks --only polling   # some sections (latency, throughput, reads, polling)
    python -m benchmarks --from-json benchmarks/results/performance.json   # report only
    python -m benchmarks --baseline 4e14e26   # also the older revision, side by side

Needs root (sbatch as the service account, sacctmgr, scancel, sdiag), the dev cluster up
(``deploy/dev-cluster/up.sh``), PostgreSQL on 127.0.0.1:5432 (``$BROKER_TEST_POSTGRES``) and wrk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.broker_process import (
    BACKENDS,
    BrokerServer,
    code_environment,
    fresh_database,
    seed_bench_project,
    serve_has_workers,
)
from benchmarks.load import wrk_available
from benchmarks.metrics_scale import run_metrics_scale
from benchmarks.mixed import run_mixed
from benchmarks.plan import FULL, QUICK, Plan
from benchmarks.polling import run_polling
from benchmarks.procstat import MachineCpu, background_busy
from benchmarks.reads import run_reads
from benchmarks.report import BACKEND_LABELS, write_report
from benchmarks.slurm import REPO, Cluster, cancel_all, prepare_account, wait_for_quiet
from benchmarks.submission import BrokerTarget, run_latency, run_throughput

SECTIONS = ("polling", "reads", "metrics", "latency", "throughput", "mixed")
"""In the order they run. Polling comes first, so that its squeue reads a queue without the
thousands of jobs the other sections cancel (slurmctld keeps them for MinJobAge, 300 s); the
reads and the metrics need no Slurm job, which gives slurmctld time to purge the polling jobs
before the submissions start."""
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


class Baseline:
    """An older revision measured in the same run: checked out into a temporary git worktree
    (with this tree's ``benchmarks/`` copied over it, so both are measured the same way), each
    section run there by ``python -m benchmarks`` with that worktree's code, right before the
    same section runs here."""

    def __init__(self, revision: str, workdir: Path, quick: bool, workers: int) -> None:
        self.revision = revision
        self.root = workdir / "baseline"
        self._quick = quick
        self._workers = workers
        self._workdir = workdir
        self.commit = ""

    def __enter__(self) -> Baseline:
        git = ["git", "-C", str(REPO)]
        subprocess.run(
            [*git, "worktree", "add", "--detach", str(self.root), self.revision],
            check=True,
            capture_output=True,
        )
        self.commit = subprocess.run(
            [*git, "rev-parse", "--short", self.revision],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        shutil.rmtree(self.root / "benchmarks")
        shutil.copytree(
            REPO / "benchmarks",
            self.root / "benchmarks",
            ignore=shutil.ignore_patterns("out", "results", "__pycache__"),
        )
        (self.root / ".dev-cluster").symlink_to((REPO / ".dev-cluster").resolve())
        return self

    def __exit__(self, *exc_info: object) -> None:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(self.root)],
            check=False,
            capture_output=True,
        )

    def run(self, section: str) -> dict[str, Any] | None:
        """The section's results with the baseline's code, or None if it failed there."""
        json_path = self._workdir / f"baseline-{section}.json"
        argv = [sys.executable, "-m", "benchmarks", "--only", section, "--json", str(json_path)]
        argv += ["--no-report", "--workers", str(self._workers)]
        if self._quick:
            argv.append("--quick")
        done = subprocess.run(argv, cwd=self.root, env=code_environment(self.root), check=False)
        if done.returncode != 0 or not json_path.is_file():
            say(f"  baseline {self.revision}: section {section} failed ({done.returncode})")
            return None
        data: dict[str, Any] = json.loads(json_path.read_text())
        section_results: dict[str, Any] | None = data["sections"].get(section)
        return section_results


def run(
    plan: Plan,
    sections: Sequence[str],
    json_path: Path,
    workdir: Path,
    baseline: Baseline | None = None,
) -> dict[str, Any]:
    cluster = Cluster.from_broker_toml("alpha")
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": "quick" if plan.quick else "full",
        "machine": machine.describe(cluster),
        "plan": asdict(plan),
        "api_workers": {
            "asked": plan.api_workers,
            "serve_has_workers": serve_has_workers(REPO),
        },
        "sections": {},
        "background_busy": {},
    }
    if baseline is not None:
        results["baseline"] = {
            "revision": baseline.revision,
            "commit": baseline.commit,
            "serve_has_workers": serve_has_workers(baseline.root),
            "sections": {},
        }
    cpu = _SectionCpu(results)
    say(f"preparing Slurm account bench on {cluster.name}")
    prepare_account(cluster)
    cancel_all(cluster)

    def before(section: str) -> None:
        """The baseline's run of the section, right before this tree's."""
        if baseline is None:
            return
        say(f"  baseline {baseline.revision} ({baseline.commit}): {section}")
        measured = baseline.run(section)
        if measured is not None:
            results["baseline"]["sections"][section] = measured
            _save(results, json_path)
        say(f"  this tree: {section}")

    try:
        if "polling" in sections:
            say(f"3. polling at {', '.join(map(str, plan.poll_sizes))} live jobs")
            before("polling")
            results["background_busy"]["polling"] = background_busy(plan.background_sample_s)
            cpu.start()
            results["sections"]["polling"] = run_polling(plan, cluster, workdir, say)
            cpu.end("polling")
            _save(results, json_path)
        if "reads" in sections:
            say(f"4. API reads with {plan.read_jobs} jobs")
            before("reads")
            results["background_busy"]["reads"] = background_busy(plan.background_sample_s)
            cpu.start()
            results["sections"]["reads"] = run_reads(plan, workdir, say)
            cpu.end("reads")
            _save(results, json_path)
        if "metrics" in sections:
            sizes = ", ".join(f"{n:,}" for n in plan.metrics_sizes)
            say(f"5. /metrics cold scrapes at {sizes} jobs")
            before("metrics")
            cpu.start()
            results["sections"]["metrics"] = run_metrics_scale(plan, workdir, say)
            cpu.end("metrics")
            _save(results, json_path)
        if "latency" in sections or "throughput" in sections:
            for section in ("latency", "throughput"):
                if section in sections:
                    before(section)
            with ExitStack() as stack:
                targets = []
                for backend in BACKENDS:
                    url = stack.enter_context(fresh_database(backend, workdir))
                    token = seed_bench_project(url, cluster.name)
                    workers = plan.api_workers if backend == "postgres" else 1
                    server = stack.enter_context(
                        BrokerServer(url, workdir, f"submit-{backend}", workers=workers)
                    )
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
        if "mixed" in sections:
            say(
                f"6. mixed load: {plan.mixed_researchers} researchers for "
                f"{plan.mixed_seconds:.0f} s on PostgreSQL"
            )
            before("mixed")
            results["background_busy"]["mixed"] = background_busy(plan.background_sample_s)
            cpu.start()
            results["sections"]["mixed"] = run_mixed(plan, cluster, workdir, say)
            cpu.end("mixed")
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
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure git revision REV (in a temporary worktree), section by section, "
        "and report before and after side by side",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="broker serve --workers N for the servers on PostgreSQL, where serve has the "
        "option (default: the plan's, 2)",
    )
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
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
    plan = QUICK if args.quick else FULL
    if args.workers is not None:
        plan = replace(plan, api_workers=max(1, args.workers))
    workdir = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    with ExitStack() as stack:
        baseline = None
        if args.baseline:
            baseline = stack.enter_context(
                Baseline(args.baseline, workdir, plan.quick, plan.api_workers)
            )
        results = run(plan, sections, json_path, workdir, baseline)
    shutil.rmtree(workdir, ignore_errors=True)  # kept, with the brokers' logs, if the run failed
    if args.no_report:
        return 0
    document = write_report(results, out)
    say(f"wrote {document} and {json_path} in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
