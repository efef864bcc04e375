"""The metrics this process counts as things happen, and the one object that owns them all.

``BrokerMetrics`` is the service layer's and poller's ``BrokerObserver`` (submissions, queue
waits, poll cycles, ledger drift) and the Slurm client's command observer (command durations and
adapter errors); ``attach`` adds the scrape-time collectors to its registry.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Iterable
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    multiprocess,
)
from sqlalchemy.orm import Session, sessionmaker

from broker.config import Settings
from broker.metrics.collector import DatabaseCollector
from broker.metrics.labels import COMMANDS, LIMITS, SUBMIT_OUTCOMES, error_kinds
from broker.metrics.ssh import RunnerSource, SshCollector, SshMirror

log = logging.getLogger(__name__)

DAY = 86_400.0

SUBMIT_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
QUEUE_WAIT_BUCKETS = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 2 * 3600.0, 4 * 3600.0,
    8 * 3600.0, 12 * 3600.0, DAY, 2 * DAY, 4 * DAY, 7 * DAY, 14 * DAY,
)  # fmt: skip
"""From a second to two weeks: a big job on a busy pool can wait days."""
POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COMMAND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _version() -> str:
    try:
        return metadata.version("aifactory-broker")
    except metadata.PackageNotFoundError:
        return "unknown"


class BrokerMetrics:
    """All metrics of one broker process, in ``registry``.

    Implements ``BrokerObserver`` (the service layer and poller report events) and the Slurm
    client's command observer (``command``). Call ``attach`` once the database and the cluster
    registry exist, so that the scrape-time series are served too.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        """Several API workers (``broker serve --workers``): the event series are kept in
        prometheus_client's per-process files and summed over every worker at scrape time."""
        self.scrape_registry = self.registry
        """What ``/metrics`` serves: ``registry`` itself in one process; with several, the
        workers' event series summed (``MultiProcessCollector``) plus this worker's
        scrape-time collectors, which read shared state and so are served once, not summed."""
        if self.multiprocess:
            self.scrape_registry = CollectorRegistry(auto_describe=True)
            multiprocess.MultiProcessCollector(self.scrape_registry)  # type: ignore[no-untyped-call]
        self.collector: DatabaseCollector | None = None
        self.ssh_mirror: SshMirror | None = None
        self._kinds = error_kinds()
        registry = self.registry
        ProcessCollector(registry=self.scrape_registry)
        PlatformCollector(registry=self.scrape_registry)
        self.build_info = Gauge(
            "broker_build_info",
            "Always 1; labels name the running broker's version and Python",
            ["version", "python_version"],
            registry=registry,
            multiprocess_mode="max",
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
        self.queued_time = Histogram(
            "broker_queued_seconds",
            "Time jobs spent in the broker's admission queue, from submission to their sbatch",
            ["cluster"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.placements = Counter(
            "broker_placements",
            "Jobs the broker placed on a cluster (outcome placed) or moved to it (outcome moved)",
            ["cluster", "outcome"],
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
        self.jobs_lost = Counter(
            "broker_jobs_lost",
            "Followed jobs settled unknown because neither squeue nor sacct knew them any more",
            ["cluster"],
            registry=registry,
        )
        self.foreign_jobs = Counter(
            "broker_foreign_jobs",
            "Jobs found in a project's Slurm account that the broker did not submit, by what the "
            "broker did (cancel or charge)",
            ["cluster", "outcome"],
            registry=registry,
        )
        self.drift = Gauge(
            "broker_ledger_drift_gpu_seconds",
            "Broker-charged minus sacct-derived weighted GPU-seconds over the drift check window",
            ["cluster", "project"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.drift_checked = Gauge(
            "broker_ledger_drift_check_timestamp_seconds",
            "When the ledger was last compared with sacct for the cluster (Unix time)",
            ["cluster"],
            registry=registry,
            multiprocess_mode="mostrecent",
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
        """Serve the scrape-time series from ``sessions`` and the SSH series from ``clusters``;
        zero-fill event series for the configured clusters. Call once per process."""
        if self.collector is not None:
            raise RuntimeError("BrokerMetrics.attach was already called")
        self.collector = DatabaseCollector(sessions, settings, max_age=max_age)
        self.scrape_registry.register(self.collector)
        if self.multiprocess:
            self.ssh_mirror = SshMirror(settings, clusters, self.registry)
        else:
            self.scrape_registry.register(SshCollector(settings, clusters))
        for name, cluster in sorted(settings.clusters.items()):
            gpu_types = sorted({p.gpu_type for p in cluster.partitions.values()})
            self._zero_fill(name, gpu_types)
        return self.collector

    def close(self) -> None:
        if self.ssh_mirror is not None:
            self.ssh_mirror.close()
            self.ssh_mirror = None

    def _zero_fill(self, cluster: str, gpu_types: Iterable[str]) -> None:
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
        self.jobs_lost.labels(cluster)
        for action in ("cancel", "charge"):
            self.foreign_jobs.labels(cluster, action)
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

    def job_lost(self, cluster: str) -> None:
        self.jobs_lost.labels(cluster).inc()

    def queue_released(self, cluster: str, waited_seconds: float) -> None:
        self.queued_time.labels(cluster).observe(max(0.0, waited_seconds))

    def placement(self, cluster: str, outcome: str) -> None:
        self.placements.labels(
            cluster, outcome if outcome in ("placed", "moved") else "other"
        ).inc()

    def foreign_job(self, cluster: str, action: str) -> None:
        self.foreign_jobs.labels(
            cluster, action if action in ("cancel", "charge") else "other"
        ).inc()

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
