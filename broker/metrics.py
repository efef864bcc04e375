"""Prometheus metrics of the broker; docs/metrics.md documents every series.

Two sources feed ``/metrics``:

* events counted by this process as they happen: submissions, queue waits, poll cycles and Slurm
  commands, reported through ``BrokerObserver`` and the Slurm client's command observer;
* state read from the database at scrape time by ``DatabaseCollector``: budgets, jobs by state,
  lifetime GPU-seconds, cluster capacity. These series are the same in every replica, survive
  restarts and cost a handful of GROUP BY queries (cached for ``max_age`` seconds).

A scrape never opens an SSH connection: SSH counters are read from the runners already built.
Labels are bounded: cluster, partition and GPU type come from the configuration, project from the
projects table, state, outcome, limit, command and kind from fixed lists in this module.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from sqlalchemy import func, literal_column, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from adapters.errors import AdapterError
from adapters.slurm.types import FINAL_STATES, JobState
from broker.config import Settings
from broker.db.models import (
    ClusterStatusRecord,
    JobRecord,
    LeaseRecord,
    ProjectRecord,
    QuotaRecord,
)
from broker.service import ledger
from quotas import LimitName

log = logging.getLogger(__name__)

DAY = 86_400.0

SUBMIT_OUTCOMES = (
    "accepted",
    "replayed",
    "rejected_quota",
    "rejected_policy",
    "invalid",
    "cluster_unavailable",
    "slurm_rejected",
    "unknown",
)
"""What ``BrokerObserver.submission`` reports; anything else is counted as ``other``."""

LIVE_STATES = tuple(s.value for s in JobState if s not in FINAL_STATES)
FINAL_STATE_NAMES = tuple(s.value for s in JobState if s in FINAL_STATES)
LIMITS = tuple(limit.value for limit in LimitName)
COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "sinfo", "sacctmgr", "scontrol")
"""Slurm commands the adapter runs; any other name is labelled ``other``."""
GPU_STATES = ("allocated", "idle", "unavailable")
POLLER_LEASE = "poller"

SUBMIT_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
QUEUE_WAIT_BUCKETS = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 2 * 3600.0, 4 * 3600.0,
    8 * 3600.0, 12 * 3600.0, DAY, 2 * DAY, 4 * DAY, 7 * DAY, 14 * DAY,
)  # fmt: skip
"""From a second to two weeks: a big job on a busy pool can wait days."""
POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COMMAND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _error_kinds() -> tuple[str, ...]:
    """Every class in the adapter error hierarchy: the bounded values of the ``kind`` label."""
    seen: list[str] = []
    pending: list[type[AdapterError]] = [AdapterError]
    while pending:
        cls = pending.pop(0)
        if cls.__name__ not in seen:
            seen.append(cls.__name__)
        pending.extend(cls.__subclasses__())
    return tuple(sorted(seen))


def _version() -> str:
    try:
        return metadata.version("aifactory-broker")
    except metadata.PackageNotFoundError:
        return "unknown"


def _timestamp(value: datetime | None) -> float:
    return 0.0 if value is None else value.timestamp()


class RunnerSource(Protocol):
    """What the collector needs from ``ClusterRegistry``: the runners built so far (no new ones)."""

    def runners(self) -> Mapping[str, object]: ...


# --- the state read from the database ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProjectLedger:
    """A project's current allocation period, in weighted GPU-seconds (as ``ledger.snapshot``)."""

    budget: int = 0
    used: int = 0
    reserved: int = 0
    period_start: datetime | None = None
    period_end: datetime | None = None

    @property
    def remaining(self) -> int:
        """As ``GET /v1/projects/{name}/usage`` shows it: negative when a quota was lowered."""
        return self.budget - self.used - self.reserved


@dataclass(frozen=True, slots=True)
class JobGroup:
    """Jobs sharing project, cluster, GPU type and state."""

    jobs: int
    gpus: int
    charged_gpu_seconds: int
    gpu_seconds: int


@dataclass(frozen=True, slots=True)
class ClusterState:
    up: bool
    last_poll_at: datetime | None
    last_success_at: datetime | None
    last_poll_duration_s: float | None
    partitions: tuple[dict[str, object], ...]


@dataclass(frozen=True, slots=True)
class DatabaseState:
    """One consistent-enough read of everything the scrape-time series need."""

    projects: dict[int, str]
    project_clusters: dict[str, frozenset[str]]
    """Clusters a project has a Slurm account on: the clusters its series are zero-filled for."""
    ledgers: dict[str, ProjectLedger]
    groups: dict[tuple[str, str, str, str], JobGroup]
    """(project, cluster, gpu_type, state) -> totals."""
    clusters: dict[str, ClusterState]
    lease_expires_at: datetime | None
    read_seconds: float = 0.0


def read_state(session: Session) -> DatabaseState:
    """Everything the scrape-time series need, in a few queries whatever the number of jobs."""
    started = time.perf_counter()
    projects: dict[int, str] = {}
    project_clusters: dict[str, frozenset[str]] = {}
    for project_id, name, accounts in session.execute(
        select(ProjectRecord.id, ProjectRecord.name, ProjectRecord.slurm_accounts)
    ):
        projects[project_id] = name
        project_clusters[name] = frozenset(accounts or {})

    # Both job queries read every row once. On SQLite a bare project_id lets the planner walk an
    # ix_jobs_project_* index and fetch each row by rowid, which takes twice as long as reading
    # the table; the no-op "+ 0" keeps it on a table scan. PostgreSQL plans it the same either way.
    project_key = JobRecord.project_id + literal_column("0")

    # The ledger of the current period, as broker.service.ledger.snapshot counts it, for every
    # project at once: the part of each charge run inside the quota's period, and what live jobs
    # still hold whenever they were submitted.
    period_sums = ledger.current_periods(session)
    ledgers = {name: ProjectLedger() for name in projects.values()}
    for project_id, start, end, budget in session.execute(
        select(
            QuotaRecord.project_id,
            QuotaRecord.period_start,
            QuotaRecord.period_end,
            QuotaRecord.budget_gpu_seconds,
        )
    ):
        name = projects.get(project_id)
        if name is None:
            continue
        used, reserved = period_sums.get(project_id, (0, 0))
        ledgers[name] = ProjectLedger(budget, used, reserved, start, end)

    groups: dict[tuple[str, str, str, str], JobGroup] = {}
    for project_id, cluster, gpu_type, state, jobs, gpus, charged, gpu_seconds in session.execute(
        select(
            project_key,
            JobRecord.cluster,
            JobRecord.gpu_type,
            JobRecord.state,
            func.count(),
            func.coalesce(func.sum(JobRecord.gpus), 0),
            func.coalesce(func.sum(JobRecord.charged_gpu_seconds), 0),
            func.coalesce(func.sum(JobRecord.alloc_gpus * JobRecord.elapsed_s), 0),
        ).group_by(project_key, JobRecord.cluster, JobRecord.gpu_type, JobRecord.state)
    ):
        name = projects.get(project_id)
        if name is not None:
            groups[(name, cluster, gpu_type, state)] = JobGroup(
                int(jobs), int(gpus or 0), int(charged or 0), int(gpu_seconds or 0)
            )

    clusters = {
        row.name: ClusterState(
            up=row.up,
            last_poll_at=row.last_poll_at,
            last_success_at=row.last_success_at,
            last_poll_duration_s=row.last_poll_duration_s,
            partitions=tuple(row.partitions or ()),
        )
        for row in session.scalars(select(ClusterStatusRecord))
    }
    lease_expires_at = session.scalar(
        select(LeaseRecord.expires_at).where(LeaseRecord.name == POLLER_LEASE)
    )
    return DatabaseState(
        projects=projects,
        project_clusters=project_clusters,
        ledgers=ledgers,
        groups=groups,
        clusters=clusters,
        lease_expires_at=lease_expires_at,
        read_seconds=time.perf_counter() - started,
    )


def _count(entry: Mapping[str, object], key: str) -> int:
    value = entry.get(key, 0)
    return value if isinstance(value, int) and value > 0 else 0


def partition_gpus(entry: Mapping[str, object]) -> tuple[int, dict[str, int]]:
    """Total and GPUs by state of one partition snapshot; the states always sum to the total.

    Allocated and idle are taken as the poller saw them (capped by the total); unavailable is
    the rest, so GPUs on drained or down nodes, and any the snapshot did not classify, are
    counted once and only once.
    """
    total = _count(entry, "gpus_total")
    allocated = min(_count(entry, "gpus_allocated"), total)
    idle = min(_count(entry, "gpus_idle"), total - allocated)
    return total, {"allocated": allocated, "idle": idle, "unavailable": total - allocated - idle}


def pool_gpus(
    partitions: Iterable[Mapping[str, object]],
) -> dict[str, tuple[int, dict[str, int]]]:
    """GPUs of a cluster by GPU type, each physical GPU counted once.

    Slurm partitions may share nodes (a ``debug`` partition over the ``gpu`` nodes), so the sum
    over partitions can count a GPU twice. Without node lists in the snapshot, the pool of a GPU
    type is its largest partition: exact when a type's partitions are nested in one another (the
    usual layout), an undercount when they are disjoint.
    """
    pools: dict[str, tuple[int, dict[str, int]]] = {}
    for entry in partitions:
        gpu_type = str(entry.get("gpu_type") or "unknown")
        total, states = partition_gpus(entry)
        if gpu_type not in pools or total > pools[gpu_type][0]:
            pools[gpu_type] = (total, states)
    return pools


# --- the scrape-time collector -------------------------------------------------------------------


class DatabaseCollector:
    """Reads the broker's state from the database when Prometheus scrapes (a ``Collector``).

    Concurrent scrapes within ``max_age`` seconds share one read. If the database does not answer,
    only ``broker_database_up 0`` is reported from here; event metrics are unaffected.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        runners: RunnerSource | None = None,
        *,
        max_age: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._runners = runners
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: DatabaseState | None = None
        self._cached_at = 0.0
        self._ssh_lock = threading.Lock()
        self._ssh_base: dict[str, int] = defaultdict(int)
        self._ssh_last: dict[str, tuple[int, int]] = {}

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only; the registry must not call collect() early

    def state(self) -> DatabaseState:
        """The cached state, read again when older than ``max_age``; raises on database errors."""
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached_at >= self._max_age:
                with self._sessions() as session:
                    self._cached = read_state(session)
                self._cached_at = now
            return self._cached

    def collect(self) -> Iterator[Metric]:
        database_up = GaugeMetricFamily(
            "broker_database_up", "1 if the last scrape-time read of the database succeeded"
        )
        try:
            state = self.state()
        except SQLAlchemyError as exc:
            log.warning("metrics: cannot read the database: %s", exc)
            database_up.add_metric([], 0)
            yield database_up
            yield from self._ssh_families()
            return
        database_up.add_metric([], 1)
        yield database_up
        read = GaugeMetricFamily(
            "broker_metrics_database_read_seconds",
            "How long the last scrape-time read of the database took",
        )
        read.add_metric([], state.read_seconds)
        yield read
        yield from self._project_families(state)
        yield from self._job_families(state)
        yield from self._cluster_families(state)
        yield from self._ssh_families()

    # -- zero-filled label sets -----------------------------------------------------------------

    def _cluster_names(self, state: DatabaseState) -> list[str]:
        names = set(self._settings.clusters) | set(state.clusters)
        names.update(cluster for _, cluster, _, _ in state.groups)
        return sorted(names)

    def _gpu_types(self, state: DatabaseState) -> dict[str, set[str]]:
        """GPU types per cluster: the configured partitions' and any found in job rows."""
        types: dict[str, set[str]] = defaultdict(set)
        for name, config in self._settings.clusters.items():
            types[name].update(p.gpu_type for p in config.partitions.values())
        for _, cluster, gpu_type, _ in state.groups:
            types[cluster].add(gpu_type)
        return types

    def _placements(self, state: DatabaseState) -> list[tuple[str, str, str]]:
        """(project, cluster, gpu_type) for every cluster a project can use or has used."""
        types = self._gpu_types(state)
        seen: set[tuple[str, str, str]] = set()
        for project, clusters in state.project_clusters.items():
            for cluster in clusters:
                seen.update((project, cluster, gpu_type) for gpu_type in types.get(cluster, ()))
        seen.update((project, cluster, gpu_type) for project, cluster, gpu_type, _ in state.groups)
        return sorted(seen)

    # -- families ---------------------------------------------------------------------------------

    def _project_families(self, state: DatabaseState) -> Iterator[Metric]:
        budget = GaugeMetricFamily(
            "broker_project_budget_gpu_seconds",
            "Weighted GPU-second budget of the project's current allocation period",
            labels=["project"],
        )
        used = GaugeMetricFamily(
            "broker_project_used_gpu_seconds",
            "Weighted GPU-seconds charged to jobs submitted in the current period",
            labels=["project"],
        )
        reserved = GaugeMetricFamily(
            "broker_project_reserved_gpu_seconds",
            "Weighted GPU-seconds still reserved by live jobs of the current period",
            labels=["project"],
        )
        remaining = GaugeMetricFamily(
            "broker_project_remaining_gpu_seconds",
            "Budget minus used minus reserved (negative after a quota was lowered below use)",
            labels=["project"],
        )
        start = GaugeMetricFamily(
            "broker_project_period_start_timestamp_seconds",
            "Start of the project's current allocation period (Unix time)",
            labels=["project"],
        )
        end = GaugeMetricFamily(
            "broker_project_period_end_timestamp_seconds",
            "End of the project's current allocation period (Unix time)",
            labels=["project"],
        )
        for project in sorted(state.ledgers):
            ledger = state.ledgers[project]
            budget.add_metric([project], ledger.budget)
            used.add_metric([project], ledger.used)
            reserved.add_metric([project], ledger.reserved)
            remaining.add_metric([project], ledger.remaining)
            if ledger.period_start is not None and ledger.period_end is not None:
                start.add_metric([project], ledger.period_start.timestamp())
                end.add_metric([project], ledger.period_end.timestamp())
        yield from (budget, used, reserved, remaining, start, end)

    def _job_families(self, state: DatabaseState) -> Iterator[Metric]:
        in_use = GaugeMetricFamily(
            "broker_project_gpus_in_use",
            "GPUs held by the project's running jobs",
            labels=["project", "cluster", "gpu_type"],
        )
        charged = CounterMetricFamily(
            "broker_project_charged_gpu_seconds",
            "Weighted GPU-seconds charged to the project's finished jobs, all periods",
            labels=["project", "cluster", "gpu_type"],
        )
        physical = CounterMetricFamily(
            "broker_project_gpu_seconds",
            "GPU-seconds (allocated GPUs x elapsed, unweighted) of the project's finished jobs",
            labels=["project", "cluster", "gpu_type"],
        )
        live = GaugeMetricFamily(
            "broker_jobs",
            "Jobs not yet final, by state",
            labels=["cluster", "project", "state"],
        )
        finished = CounterMetricFamily(
            "broker_jobs_finished",
            "Jobs that reached a final state, all time",
            labels=["cluster", "project", "state"],
        )
        by_placement: dict[tuple[str, str, str], list[JobGroup]] = defaultdict(list)
        by_state: dict[tuple[str, str, str], int] = defaultdict(int)
        running: dict[tuple[str, str, str], int] = defaultdict(int)
        for (project, cluster, gpu_type, job_state), group in state.groups.items():
            by_placement[(project, cluster, gpu_type)].append(group)
            by_state[(cluster, project, job_state)] += group.jobs
            if job_state == JobState.RUNNING.value:
                running[(project, cluster, gpu_type)] += group.gpus
        placements = self._placements(state)
        for key in placements:
            groups = by_placement.get(key, [])
            in_use.add_metric(list(key), running.get(key, 0))
            charged.add_metric(list(key), sum(g.charged_gpu_seconds for g in groups))
            physical.add_metric(list(key), sum(g.gpu_seconds for g in groups))
        pairs = sorted({(cluster, project) for project, cluster, _ in placements})
        for cluster, project in pairs:
            for job_state in LIVE_STATES:
                live.add_metric(
                    [cluster, project, job_state], by_state.get((cluster, project, job_state), 0)
                )
            for job_state in FINAL_STATE_NAMES:
                finished.add_metric(
                    [cluster, project, job_state], by_state.get((cluster, project, job_state), 0)
                )
        yield from (in_use, charged, physical, live, finished)

    def _cluster_families(self, state: DatabaseState) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "broker_cluster_up", "1 if the last poll of the cluster succeeded", labels=["cluster"]
        )
        last_poll = GaugeMetricFamily(
            "broker_cluster_last_poll_timestamp_seconds",
            "When the cluster was last polled, successfully or not (Unix time; 0: never)",
            labels=["cluster"],
        )
        last_success = GaugeMetricFamily(
            "broker_cluster_last_success_timestamp_seconds",
            "When the cluster was last polled successfully (Unix time; 0: never)",
            labels=["cluster"],
        )
        duration = GaugeMetricFamily(
            "broker_cluster_last_poll_duration_seconds",
            "How long the cluster's last poll cycle took",
            labels=["cluster"],
        )
        partition = GaugeMetricFamily(
            "broker_cluster_partition_gpus",
            "GPUs of a partition by state at the last poll; the states sum to the partition's GPUs",
            labels=["cluster", "partition", "gpu_type", "state"],
        )
        nodes = GaugeMetricFamily(
            "broker_cluster_partition_nodes",
            "Nodes of a partition at the last poll, by state (up, down)",
            labels=["cluster", "partition", "state"],
        )
        pool = GaugeMetricFamily(
            "broker_cluster_gpus",
            "GPUs of the cluster by GPU type and state, each GPU counted once across partitions",
            labels=["cluster", "gpu_type", "state"],
        )
        types = self._gpu_types(state)
        for cluster in self._cluster_names(state):
            row = state.clusters.get(cluster)
            up.add_metric([cluster], 1 if row is not None and row.up else 0)
            last_poll.add_metric([cluster], _timestamp(row.last_poll_at if row else None))
            last_success.add_metric([cluster], _timestamp(row.last_success_at if row else None))
            duration.add_metric([cluster], (row.last_poll_duration_s or 0.0) if row else 0.0)
            snapshot = row.partitions if row is not None else ()
            seen: set[str] = set()
            for entry in snapshot:
                name = str(entry.get("name", ""))
                if not name or name in seen:
                    continue
                seen.add(name)
                gpu_type = str(entry.get("gpu_type") or "unknown")
                _, gpus = partition_gpus(entry)
                for gpu_state in GPU_STATES:
                    partition.add_metric([cluster, name, gpu_type, gpu_state], gpus[gpu_state])
                total_nodes = _count(entry, "nodes_total")
                down = min(_count(entry, "nodes_down"), total_nodes)
                nodes.add_metric([cluster, name, "up"], total_nodes - down)
                nodes.add_metric([cluster, name, "down"], down)
            pools = pool_gpus(snapshot)
            for gpu_type in sorted(types.get(cluster, set()) | set(pools)):
                _, gpus = pools.get(gpu_type, (0, dict.fromkeys(GPU_STATES, 0)))
                for gpu_state in GPU_STATES:
                    pool.add_metric([cluster, gpu_type, gpu_state], gpus[gpu_state])
        lease = GaugeMetricFamily(
            "broker_poller_lease_expiry_timestamp_seconds",
            "When the active poller's lease runs out unless renewed (Unix time; 0: never taken)",
        )
        lease.add_metric([], _timestamp(state.lease_expires_at))
        yield from (up, last_poll, last_success, duration, partition, nodes, pool, lease)

    def _ssh_families(self) -> Iterator[Metric]:
        opened = CounterMetricFamily(
            "broker_ssh_connections_opened",
            "SSH connections this process opened to the cluster's login node, reconnects included",
            labels=["cluster"],
        )
        in_use = GaugeMetricFamily(
            "broker_ssh_sessions_in_use",
            "SSH sessions (channels) this process has open or opening on the cluster now",
            labels=["cluster"],
        )
        limit = GaugeMetricFamily(
            "broker_ssh_sessions_max",
            "Sessions this process may open at once on the cluster (clusters.NAME.max_sessions)",
            labels=["cluster"],
        )
        runners: dict[str, object] = {}
        if self._runners is not None:
            try:
                runners = dict(self._runners.runners())
            except Exception:  # a scrape must not fail over a registry in an odd state
                log.warning("metrics: cannot list the SSH runners", exc_info=True)
        for cluster in sorted(set(self._settings.clusters) | set(runners)):
            runner = runners.get(cluster)
            with self._ssh_lock:  # concurrent scrapes must not carry a count over twice
                count = self._connections_opened(cluster, runner)
            opened.add_metric([cluster], count)
            in_use.add_metric([cluster], _int_attribute(runner, "sessions_in_use"))
            configured = self._settings.clusters.get(cluster)
            if configured is not None and configured.transport == "ssh":
                limit.add_metric([cluster], configured.max_sessions)
        yield from (opened, in_use, limit)

    def _connections_opened(self, cluster: str, runner: object | None) -> int:
        """A counter that survives the registry replacing a runner: older runners' counts are
        carried over, so the series only decreases when the process restarts."""
        if runner is None:
            return self._ssh_base[cluster] + self._ssh_last.get(cluster, (0, 0))[1]
        count = _int_attribute(runner, "connections_opened")
        last = self._ssh_last.get(cluster)
        if last is not None and last[0] != id(runner):
            self._ssh_base[cluster] += last[1]
        self._ssh_last[cluster] = (id(runner), count)
        return self._ssh_base[cluster] + count


def _int_attribute(runner: object | None, name: str) -> int:
    value = getattr(runner, name, 0)
    return value if isinstance(value, int) else 0


# --- the process's metrics -----------------------------------------------------------------------


@dataclass
class _Known:
    """Label values seen or configured, for zero-filling event series."""

    clusters: set[str] = field(default_factory=set)


class BrokerMetrics:
    """All metrics of one broker process, in ``registry``.

    Implements ``BrokerObserver`` (the service layer and poller report events) and the Slurm
    client's command observer (``command``). Call ``attach`` once the database and the cluster
    registry exist, so that the scrape-time series are served too.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.collector: DatabaseCollector | None = None
        self._known = _Known()
        self._kinds = _error_kinds()
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.build_info = Gauge(
            "broker_build_info",
            "Always 1; labels name the running broker's version and Python",
            ["version", "python_version"],
            registry=registry,
        )
        self.build_info.labels(_version(), platform.python_version()).set(1)
        self.submissions = Counter(
            "broker_submissions",
            "POST /v1/jobs requests that ended, by outcome",
            ["cluster", "outcome"],
            registry=registry,
        )
        self.quota_rejections = Counter(
            "broker_quota_rejections",
            "Submissions refused by a quota or policy limit, by the first limit broken",
            ["cluster", "limit"],
            registry=registry,
        )
        self.submit_latency = Histogram(
            "broker_submit_latency_seconds",
            "From receiving POST /v1/jobs to holding the Slurm job id (accepted submissions)",
            ["cluster"],
            buckets=SUBMIT_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "broker_job_queue_wait_seconds",
            "From submission to the job first seen running",
            ["cluster", "gpu_type"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.polls = Counter(
            "broker_polls",
            "Poll cycles this process ran, by result (ok, failed)",
            ["cluster", "result"],
            registry=registry,
        )
        self.poll_duration = Histogram(
            "broker_poll_duration_seconds",
            "Duration of one poll cycle of one cluster",
            ["cluster"],
            buckets=POLL_BUCKETS,
            registry=registry,
        )
        self.poll_status_commands = Counter(
            "broker_poll_status_commands",
            "Slurm status commands (squeue, sacct) poll cycles ran",
            ["cluster"],
            registry=registry,
        )
        self.command_duration = Histogram(
            "broker_adapter_command_duration_seconds",
            "Duration of Slurm commands run by the adapter, failed ones included",
            ["cluster", "command"],
            buckets=COMMAND_BUCKETS,
            registry=registry,
        )
        self.adapter_errors = Counter(
            "broker_adapter_errors",
            "Slurm commands that raised an adapter error, by error class",
            ["cluster", "command", "kind"],
            registry=registry,
        )
        self.drift = Gauge(
            "broker_ledger_drift_gpu_seconds",
            "Broker-charged minus sacct-derived weighted GPU-seconds over the drift check window",
            ["cluster", "project"],
            registry=registry,
        )
        self.drift_checked = Gauge(
            "broker_ledger_drift_check_timestamp_seconds",
            "When the ledger was last compared with sacct for the cluster (Unix time)",
            ["cluster"],
            registry=registry,
        )

    # --- wiring ---------------------------------------------------------------------------------

    def attach(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        clusters: RunnerSource | None = None,
        *,
        max_age: float = 2.0,
    ) -> DatabaseCollector:
        """Serve the scrape-time series from ``sessions``; zero-fill event series for the
        configured clusters. Call once per process, after the runtime is built."""
        if self.collector is not None:
            raise RuntimeError("BrokerMetrics.attach was already called")
        self.collector = DatabaseCollector(sessions, settings, clusters, max_age=max_age)
        self.registry.register(self.collector)
        for name, cluster in sorted(settings.clusters.items()):
            gpu_types = sorted({p.gpu_type for p in cluster.partitions.values()})
            self._zero_fill(name, gpu_types)
        return self.collector

    def _zero_fill(self, cluster: str, gpu_types: Iterable[str] = ()) -> None:
        if cluster in self._known.clusters:
            return
        self._known.clusters.add(cluster)
        for outcome in SUBMIT_OUTCOMES:
            self.submissions.labels(cluster, outcome)
        for limit in LIMITS:
            self.quota_rejections.labels(cluster, limit)
        self.submit_latency.labels(cluster)
        for gpu_type in gpu_types:
            self.queue_wait.labels(cluster, gpu_type)
        for result in ("ok", "failed"):
            self.polls.labels(cluster, result)
        self.poll_duration.labels(cluster)
        self.poll_status_commands.labels(cluster)
        for command in COMMANDS:
            self.command_duration.labels(cluster, command)
            for kind in self._kinds:
                self.adapter_errors.labels(cluster, command, kind)

    # --- BrokerObserver -------------------------------------------------------------------------

    def submission(self, cluster: str, outcome: str, limit: str | None, seconds: float) -> None:
        if outcome not in SUBMIT_OUTCOMES:
            log.warning("metrics: unexpected submission outcome %r counted as other", outcome)
            outcome = "other"
        self.submissions.labels(cluster, outcome).inc()
        if outcome in ("rejected_quota", "rejected_policy"):
            self.quota_rejections.labels(cluster, limit if limit in LIMITS else "other").inc()
        if outcome == "accepted":
            self.submit_latency.labels(cluster).observe(seconds)

    def job_started(self, cluster: str, gpu_type: str, wait_seconds: float) -> None:
        self.queue_wait.labels(cluster, gpu_type).observe(max(0.0, wait_seconds))

    def job_finished(
        self, cluster: str, project: str, gpu_type: str, state: str, charged_gpu_seconds: int
    ) -> None:
        # Finished jobs and their charges are counted from the database at scrape time
        # (broker_jobs_finished_total, broker_project_charged_gpu_seconds_total), which is right
        # across restarts and replicas; nothing to count here.
        return None

    def poll(self, cluster: str, ok: bool, seconds: float, status_commands: int) -> None:
        self.polls.labels(cluster, "ok" if ok else "failed").inc()
        self.poll_duration.labels(cluster).observe(seconds)
        self.poll_status_commands.labels(cluster).inc(status_commands)

    def ledger_drift(self, cluster: str, project: str, seconds: int) -> None:
        """The poller compared the broker's charges with sacct: broker minus Slurm, in weighted
        GPU-seconds, over the finished jobs of the check window (see docs/metrics.md)."""
        self.drift.labels(cluster, project).set(seconds)
        self.drift_checked.labels(cluster).set(time.time())

    # --- the Slurm client's command observer ----------------------------------------------------

    def command(
        self, cluster: str, command: str, seconds: float, error: BaseException | None
    ) -> None:
        name = command if command in COMMANDS else "other"
        self.command_duration.labels(cluster, name).observe(seconds)
        if error is not None:
            kind = type(error).__name__
            self.adapter_errors.labels(
                cluster, name, kind if kind in self._kinds else "other"
            ).inc()
