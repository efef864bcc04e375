"""The scrape-time series: budgets, jobs by state, lifetime GPU-seconds and cluster capacity,
read from the database when Prometheus scrapes.

These series are the same in every replica and survive restarts; a scrape costs the handful of
GROUP BY queries of ``read_state``, shared by the scrapes of ``max_age`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from broker.config import Settings
from broker.lifecycle import JobState
from broker.metrics.capacity import partition_gpus, pool_gpus, snapshot_int
from broker.metrics.labels import FINAL_STATE_NAMES, GPU_STATES, LIVE_STATES
from broker.metrics.queue_state import QueueState, queue_families, read_queue_state
from broker.metrics.state import DatabaseState, JobGroup, read_state

log = logging.getLogger(__name__)


def _timestamp(value: datetime | None) -> float:
    return 0.0 if value is None else value.timestamp()


class DatabaseCollector:
    """Reads the broker's state from the database when Prometheus scrapes (a ``Collector``).

    Concurrent scrapes within ``max_age`` seconds share one read. If the database does not answer,
    only ``broker_database_up 0`` is reported from here; event and SSH metrics are unaffected.
    """

    def __init__(
        self, sessions: sessionmaker[Session], settings: Settings, *, max_age: float = 2.0
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._max_age = max_age
        self._lock = threading.Lock()
        self._cached: DatabaseState | None = None
        self._cached_at = 0.0
        self._queue_cached: QueueState | None = None

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only; the registry must not call collect() early

    def state(self) -> DatabaseState:
        """The cached state, read again when older than ``max_age``; raises on database errors."""
        return self._read()[0]

    def _read(self) -> tuple[DatabaseState, QueueState]:
        """The state and the queue and array series' state, read together and cached together
        (one read per scrape, even with ``max_age`` 0)."""
        with self._lock:
            now = time.monotonic()
            if (
                self._cached is None
                or self._queue_cached is None
                or now - self._cached_at >= self._max_age
            ):
                with self._sessions() as session:
                    self._cached = read_state(session)
                    self._queue_cached = read_queue_state(session)
                self._cached_at = now
            return self._cached, self._queue_cached

    def collect(self) -> Iterator[Metric]:
        database_up = GaugeMetricFamily(
            "broker_database_up", "1 if the last scrape-time read of the database succeeded"
        )
        try:
            state, queue = self._read()
        except SQLAlchemyError as exc:
            log.warning("metrics: cannot read the database: %s", exc)
            database_up.add_metric([], 0)
            yield database_up
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
        yield from queue_families(queue, sorted(state.ledgers), self._cluster_names(state))

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
            "Weighted GPU-seconds charged in the current period: what jobs ran inside it",
            labels=["project"],
        )
        reserved = GaugeMetricFamily(
            "broker_project_reserved_gpu_seconds",
            "Weighted GPU-seconds still held by the project's live jobs, whenever submitted",
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
                total_nodes = snapshot_int(entry, "nodes_total")
                down = min(snapshot_int(entry, "nodes_down"), total_nodes)
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
