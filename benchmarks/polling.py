"""Section 3: what one poll cycle costs the login node, the controller and the broker as the queue
grows from tens to thousands of live jobs.

The jobs are real: submitted with sbatch to the ``bench`` account, where Slurm keeps them pending,
and recorded in the broker's database as the submit path records them (state ``pending`` with
their Slurm id and tag). The broker's own ``Poller.poll`` then runs against them, in this
process, through a runner that counts every command sent over SSH and the bytes it read back; the
controller's side comes from ``sdiag`` (RPCs served and the time slurmctld spent on them).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from adapters.runner import CommandResult, CommandRunner
from adapters.slurm.client import SlurmClient
from benchmarks.broker_process import (
    BACKENDS,
    Database,
    add_project,
    add_researcher,
    bench_settings,
    fresh_database,
    open_database,
)
from benchmarks.plan import Plan
from benchmarks.seed import insert_jobs, job_row
from benchmarks.slurm import (
    BENCH_ACCOUNT,
    Cluster,
    ClusterError,
    LocalSbatch,
    bench_spec,
    cancel_all,
    live_jobs,
    rpc_delta,
    rpc_stats,
    wait_for_quiet,
    wait_for_room,
)
from broker.clock import utcnow
from broker.config import ClusterSettings, Settings
from broker.db.models import ProjectRecord, UserRecord
from broker.runtime import Runtime, build_runtime
from broker.service.clusters import (
    ClusterClient,
    ClusterCommandObserver,
    ClusterRegistry,
    build_runner,
)

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class CommandCall:
    command: str
    seconds: float
    bytes_read: int
    """stdout plus stderr of the command, as it came back over the connection."""
    lines: int
    """Lines of stdout: one per job for squeue."""


class MeteredRunner:
    """A ``CommandRunner`` that records every command it runs for the runner it wraps."""

    def __init__(self, inner: CommandRunner) -> None:
        self.name = inner.name
        self._inner = inner
        self._calls: list[CommandCall] = []
        self._lock = threading.Lock()

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        result = self._inner.run(argv, stdin=stdin, env=env, timeout=timeout)
        call = CommandCall(
            command=Path(argv[0]).name,
            seconds=result.duration_s,
            bytes_read=len(result.stdout) + len(result.stderr),
            lines=result.stdout.count(b"\n"),
        )
        with self._lock:
            self._calls.append(call)
        return result

    def close(self) -> None:
        self._inner.close()

    def take(self) -> list[CommandCall]:
        """The commands run since the last ``take``."""
        with self._lock:
            calls, self._calls = self._calls, []
        return calls


def _metered_client(
    name: str, cluster: ClusterSettings, observer: ClusterCommandObserver | None
) -> ClusterClient:
    return SlurmClient(
        MeteredRunner(build_runner(name, cluster)),
        cluster=cluster.slurm_name,
        bin_dir=cluster.slurm_bin_dir,
        timeout=cluster.command_timeout_seconds,
    )


@dataclass
class PollTarget:
    backend: str
    db: Database
    runtime: Runtime
    runner: MeteredRunner


def _poll_target(backend: str, url: str, cluster: Cluster) -> PollTarget:
    db = open_database(url)
    add_researcher(db, "bench")
    add_project(db, BENCH_ACCOUNT, {cluster.name: BENCH_ACCOUNT}, ["bench"])
    settings: Settings = bench_settings(url)
    registry = ClusterRegistry(settings, client_factory=_metered_client)
    runtime = build_runtime(settings, clusters=registry)
    runner = registry.client(cluster.name).runner
    if not isinstance(runner, MeteredRunner):
        raise TypeError("the registry did not build a metered runner")
    return PollTarget(backend, db, runtime, runner)


def _fill(cluster: Cluster, count: int, workers: int) -> list[tuple[str, str]]:
    """Submit ``count`` bench jobs with parallel sbatch; returns (tag, Slurm job id) pairs."""
    local = LocalSbatch(cluster)
    specs = [bench_spec(cluster) for _ in range(count)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ids = list(pool.map(local.submit, specs))
    return [(spec.tag, job_id) for spec, job_id in zip(specs, ids, strict=True)]


def _record(target: PollTarget, jobs: Sequence[tuple[str, str]]) -> None:
    with target.db.sessions() as session:
        project_id = session.scalar(
            select(ProjectRecord.id).where(ProjectRecord.name == BENCH_ACCOUNT)
        )
        user_id = session.scalar(select(UserRecord.id).where(UserRecord.name == "bench"))
    if project_id is None or user_id is None:
        raise RuntimeError("the bench project or user is missing")
    now = utcnow()
    insert_jobs(
        target.db,
        [
            job_row(
                project_id=project_id,
                user_id=user_id,
                account=BENCH_ACCOUNT,
                state="pending",
                submitted_at=now,
                slurm_job_id=slurm_id,
                tag=tag,
                time_limit_minutes=10,
            )
            for tag, slurm_id in jobs
        ],
    )


def _cycle(target: PollTarget, cluster: Cluster) -> dict[str, Any]:
    target.runner.take()
    rpc_before = rpc_stats(cluster)
    report = target.runtime.poller.poll(cluster.name)
    rpc_after = rpc_stats(cluster)
    calls = target.runner.take()
    rpcs = rpc_delta(rpc_before, rpc_after)
    if not report.ok:
        raise ClusterError(f"poll of {cluster.name} failed: {report.error}")
    return {
        "duration_s": report.duration_s,
        "followed": report.followed,
        "settled": sum(report.settled.values()),
        "status_commands": report.status_commands,
        "ssh_commands": len(calls),
        "commands": dict(Counter(c.command for c in calls)),
        "bytes_read": sum(c.bytes_read for c in calls),
        "squeue_s": sum(c.seconds for c in calls if c.command == "squeue"),
        "commands_s": sum(c.seconds for c in calls),
        "squeue_bytes": sum(c.bytes_read for c in calls if c.command == "squeue"),
        "squeue_lines": sum(c.lines for c in calls if c.command == "squeue"),
        "controller_rpcs": sum(count for count, _ in rpcs.values()),
        "controller_ms": sum(total for _, total in rpcs.values()) / 1000,
        "rpcs": {name: count for name, (count, _) in rpcs.items()},
    }


def _summarise(size: int, first: dict[str, Any], cycles: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(float(c[key]) for c in cycles)

    return {
        "jobs": size,
        "cycles": len(cycles),
        "followed": min(c["followed"] for c in cycles),
        "settled": sum(c["settled"] for c in cycles),
        "status_commands": sorted({c["status_commands"] for c in cycles}),
        "ssh_commands": sorted({c["ssh_commands"] for c in cycles}),
        "commands": cycles[-1]["commands"],
        "duration_ms_median": median("duration_s") * 1000,
        "duration_ms_max": max(c["duration_s"] for c in cycles) * 1000,
        "first_cycle_ms": first["duration_s"] * 1000,
        "squeue_ms_median": median("squeue_s") * 1000,
        "without_squeue_ms_median": statistics.median(
            float(c["duration_s"]) - float(c["squeue_s"]) for c in cycles
        )
        * 1000,
        "without_commands_ms_median": statistics.median(
            float(c["duration_s"]) - float(c["commands_s"]) for c in cycles
        )
        * 1000,
        "bytes_read_median": median("bytes_read"),
        "squeue_bytes_median": median("squeue_bytes"),
        "squeue_lines_median": median("squeue_lines"),
        "controller_rpcs_median": median("controller_rpcs"),
        "controller_ms_median": median("controller_ms"),
        "rpcs_last_cycle": cycles[-1]["rpcs"],
    }


def run_polling(plan: Plan, cluster: Cluster, workdir: Path, say: Say) -> dict[str, Any]:
    """Grow the queue through ``plan.poll_sizes`` and measure poll cycles at each size."""
    largest = max(plan.poll_sizes)
    # Above SQUEUE_MAX_IDS ids the broker reads every job of its account that slurmctld still
    # holds (whoever submitted it: another benchmark's researcher too, which the poller then
    # reports as foreign): start once the ended jobs of earlier runs are gone, so that only this
    # step's count.
    own = wait_for_quiet(
        cluster, plan.quiet_own_jobs, timeout=plan.room_wait_s, account=BENCH_ACCOUNT, say=say
    )
    held = wait_for_room(
        cluster, largest, keep_free=plan.keep_free_jobs, timeout=plan.room_wait_s, say=say
    )
    results: dict[str, list[dict[str, Any]]] = {backend: [] for backend in BACKENDS}
    fills = []
    with ExitStack() as stack:
        targets = []
        for backend in BACKENDS:
            url = stack.enter_context(fresh_database(backend, workdir))
            target = _poll_target(backend, url, cluster)
            stack.callback(target.db.close)
            stack.callback(target.runtime.close)
            targets.append(target)
        stack.callback(cancel_all, cluster)
        jobs: list[tuple[str, str]] = []
        for size in sorted(plan.poll_sizes):
            started = time.perf_counter()
            new = _fill(cluster, size - len(jobs), plan.submit_workers)
            fill_s = time.perf_counter() - started
            fills.append({"jobs": len(new), "seconds": fill_s})
            jobs += new
            for target in targets:
                _record(target, new)
            live = live_jobs(cluster)
            if live < size:
                raise ClusterError(f"only {live} of {size} bench jobs are live in Slurm")
            firsts = {t.backend: _cycle(t, cluster) for t in targets}
            cycles: dict[str, list[dict[str, Any]]] = {t.backend: [] for t in targets}
            for _ in range(plan.poll_cycles):
                for target in targets:  # interleaved, so both databases see the same moments
                    cycles[target.backend].append(_cycle(target, cluster))
            for target in targets:
                summary = _summarise(size, firsts[target.backend], cycles[target.backend])
                results[target.backend].append(summary)
            sqlite = results["sqlite"][-1]
            say(
                f"  {size} jobs: poll {sqlite['duration_ms_median']:.0f} ms (SQLite), "
                f"{results['postgres'][-1]['duration_ms_median']:.0f} ms (PostgreSQL); "
                f"SSH commands {sqlite['ssh_commands']}, "
                f"{sqlite['bytes_read_median'] / 1024:.0f} KiB read"
            )
    return {
        "sizes": sorted(plan.poll_sizes),
        "cycles_per_size": plan.poll_cycles,
        "controller_jobs_at_start": held,
        "service_account_jobs_at_start": own,
        "fills": fills,
        "by_backend": results,
    }
