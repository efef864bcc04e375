"""One poll cycle of one cluster: follow live jobs, settle finished ones, reconcile lost submits,
retry pending cancels, and snapshot capacity.

A cycle runs one batched ``statuses`` (one squeue, plus one sacct for jobs that left the queue),
whatever the number of jobs. When the cluster cannot be reached nothing is changed: a job is never
finalised because its cluster is down.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from adapters.errors import AdapterError
from adapters.slurm.types import JobState, JobStatus, PartitionCapacity
from broker.clock import utcnow
from broker.config import Settings
from broker.db.engine import transaction
from broker.db.models import ClusterStatusRecord, JobRecord, ProjectRecord
from broker.service import ledger, transitions
from broker.service.clusters import ClusterRegistry
from broker.service.observer import BrokerObserver, NullObserver
from quotas import charge_gpu_seconds

log = logging.getLogger(__name__)

FOLLOWED_STATES = (JobState.PENDING.value, JobState.RUNNING.value)
TAG_LOOKBACK = timedelta(minutes=10)
ACCOUNTING_PATIENCE_POLLS = 30
"""Cycles a job squeue shows as ended may wait for its sacct record before it is settled without
one (slurmdbd normally records a job within a second; sacct failing outright changes nothing)."""


@dataclass
class CycleReport:
    """What one cycle did; returned for tests, logs and metrics."""

    cluster: str
    ok: bool = True
    error: str | None = None
    followed: int = 0
    settled: dict[str, int] = field(default_factory=dict)
    attached: int = 0
    submit_failed: int = 0
    status_commands: int = 0
    duration_s: float = 0.0
    started: list[tuple[str, float]] = field(default_factory=list)
    """(gpu_type, seconds waited in the queue) of jobs first seen running."""
    finished: list[tuple[int, str, str, int]] = field(default_factory=list)
    """(project id, gpu_type, final state, charged GPU-seconds) of jobs settled."""


def charge_of(
    status: JobStatus, job_gpus: int, weight: float, elapsed: int | None = None
) -> tuple[int, int, int]:
    """(allocated GPUs, elapsed seconds, charge) of a finished job as Slurm accounted it."""
    alloc = status.alloc_gpus if status.alloc_gpus is not None else job_gpus
    if elapsed is None:
        elapsed = _elapsed(status) or 0
    return alloc, elapsed, charge_gpu_seconds(alloc, elapsed, weight)


def _elapsed(status: JobStatus) -> int | None:
    if status.elapsed_s is not None:
        return status.elapsed_s
    if status.start_time is not None and status.end_time is not None:
        return max(0, int((status.end_time - status.start_time).total_seconds()))
    if status.start_time is None and status.state.is_final:
        return 0  # never started: nothing to charge
    return None


class Poller:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        clusters: ClusterRegistry,
        settings: Settings,
        *,
        observer: BrokerObserver | None = None,
    ) -> None:
        self._sessions = sessions
        self._clusters = clusters
        self._settings = settings
        self._observer: BrokerObserver = observer or NullObserver()
        self._drift_checked: dict[str, float] = {}

    def poll(self, cluster: str) -> CycleReport:
        report = CycleReport(cluster=cluster)
        started = time.monotonic()
        try:
            client = self._clusters.client(cluster)
            self._follow(cluster, report)
            self._reconcile(cluster, report)
            self._retry_cancels(cluster)
            capacity = client.capacity()
            self._check_drift(cluster)
        except AdapterError as exc:
            report.ok = False
            report.error = str(exc)[:500]
            log.warning("poll of %s failed: %s", cluster, exc)
            capacity = None
        report.duration_s = time.monotonic() - started
        self._record_cluster(report, capacity)
        self._report(report)
        return report

    def _report(self, report: CycleReport) -> None:
        observer = self._observer
        observer.poll(report.cluster, report.ok, report.duration_s, report.status_commands)
        for gpu_type, waited in report.started:
            observer.job_started(report.cluster, gpu_type, waited)

    # --- following live jobs ---------------------------------------------------------------

    def _follow(self, cluster: str, report: CycleReport) -> None:
        with self._sessions() as session:
            ids = dict(
                session.execute(
                    select(JobRecord.slurm_job_id, JobRecord.id).where(
                        JobRecord.cluster == cluster,
                        JobRecord.state.in_(FOLLOWED_STATES),
                        JobRecord.slurm_job_id.is_not(None),
                    )
                ).all()
            )
        report.followed = len(ids)
        if not ids:
            return
        status = self._clusters.client(cluster).statuses(list(ids))  # type: ignore[arg-type]
        report.status_commands = status.commands
        threshold = self._settings.poller.missing_polls_before_unknown
        with transaction(self._sessions) as session:
            jobs = {
                j.slurm_job_id: j
                for j in session.scalars(select(JobRecord).where(JobRecord.id.in_(ids.values())))
            }
            settling = sorted(
                {
                    j.project_id
                    for sid, j in jobs.items()
                    if (sid in status.found and status.found[sid].state.is_final)
                    or (sid in status.missing and j.missing_polls + 1 >= threshold)
                }
            )
            for project_id in settling:  # a fixed order, so concurrent lockers cannot deadlock
                ledger.lock_project(session, project_id)
            for sid, job in jobs.items():
                if transitions.is_final(job.state):
                    continue
                if sid in status.found:
                    self._apply(session, job, status.found[sid], report, threshold)
                elif sid in status.missing:
                    job.missing_polls += 1
                    if job.missing_polls >= threshold:
                        transitions.settle(
                            session,
                            job,
                            JobState.UNKNOWN,
                            charge_gpu_seconds=0,
                            lock=False,
                            reason=f"neither squeue nor sacct knows job {sid} after "
                            f"{job.missing_polls} polls",
                        )
                        self._count_settled(report, job, JobState.UNKNOWN, 0)

    @staticmethod
    def _count_settled(report: CycleReport, job: JobRecord, state: JobState, charge: int) -> None:
        report.settled[state.value] = report.settled.get(state.value, 0) + 1
        report.finished.append((job.project_id, job.gpu_type, state.value, charge))

    def _apply(
        self,
        session: Session,
        job: JobRecord,
        status: JobStatus,
        report: CycleReport,
        threshold: int,
    ) -> None:
        if status.state.is_final:
            elapsed = _elapsed(status)
            reason = status.reason or f"Slurm state {status.slurm_state}"
            if elapsed is None:
                if job.missing_polls + 1 < ACCOUNTING_PATIENCE_POLLS:
                    job.missing_polls += 1  # sacct has not written the job yet: wait for it
                    return
                # No record after all that time: charge the wall time since it started (never
                # less than it can have used) and say so in the event.
                started = status.start_time or job.started_at
                elapsed = max(0, int((utcnow() - started).total_seconds())) if started else 0
                reason = f"{reason}; sacct had no record, charged wall time since start"
                log.warning("job %s: no accounting record; charging %d s", job.id, elapsed)
            alloc, elapsed, charge = charge_of(status, job.gpus, job.weight, elapsed)
            transitions.settle(
                session,
                job,
                status.state,
                charge_gpu_seconds=charge,
                lock=False,
                reason=reason,
                exit_code=status.exit_code,
                alloc_gpus=alloc,
                elapsed_s=elapsed,
                started_at=job.started_at or status.start_time,
                ended_at=status.end_time,
            )
            self._count_settled(report, job, status.state, charge)
            return
        job.missing_polls = 0
        if status.state == JobState.RUNNING:
            started_at = status.start_time or utcnow()
            if transitions.move(
                session, job, JobState.RUNNING, status.reason, started_at=started_at
            ):
                waited = max(0.0, (started_at - job.submitted_at).total_seconds())
                report.started.append((job.gpu_type, waited))
        if job.state_reason != status.reason:
            job.state_reason = status.reason

    # --- reconciling submits whose outcome is unknown --------------------------------------

    def _reconcile(self, cluster: str, report: CycleReport) -> None:
        now = utcnow()
        poller = self._settings.poller
        stale_submitting = now - timedelta(seconds=poller.stale_submitting_seconds)
        with self._sessions() as session:
            candidates = list(
                session.execute(
                    select(JobRecord.id, JobRecord.tag, JobRecord.submitted_at).where(
                        JobRecord.cluster == cluster,
                        (JobRecord.state == JobState.SUBMIT_UNKNOWN.value)
                        | (
                            (JobRecord.state == JobState.SUBMITTING.value)
                            & (JobRecord.submitted_at < stale_submitting)
                        ),
                    )
                ).all()
            )
        client = self._clusters.client(cluster)
        for job_id, tag, submitted_at in candidates:
            found = client.find_by_tag(tag, since=submitted_at - TAG_LOOKBACK)
            with transaction(self._sessions) as session:
                job = session.get_one(JobRecord, job_id)
                if job.state not in (JobState.SUBMITTING.value, JobState.SUBMIT_UNKNOWN.value):
                    continue
                if found:
                    self._attach(session, job, found)
                    report.attached += 1
                elif self._given_up(submitted_at, now):
                    transitions.settle(
                        session,
                        job,
                        JobState.SUBMIT_FAILED,
                        charge_gpu_seconds=0,
                        reason="no Slurm job carries its tag",
                    )
                    job.idempotency_key = None
                    report.submit_failed += 1

    def _given_up(self, submitted_at: datetime, now: datetime) -> bool:
        grace = timedelta(seconds=self._settings.poller.submit_unknown_grace_seconds)
        return now - submitted_at > grace

    @staticmethod
    def _attach(session: Session, job: JobRecord, found: list[JobStatus]) -> None:
        first, *others = sorted(found, key=lambda s: int(s.job_id.split("_")[0]))
        if others:
            log.error(
                "job %s: several Slurm jobs carry tag %s (%s); following %s",
                job.id,
                job.tag,
                ", ".join(s.job_id for s in found),
                first.job_id,
            )
        log.info("job %s attached by its tag to Slurm job %s", job.id, first.job_id)
        transitions.move(
            session,
            job,
            JobState.PENDING,
            f"found by tag as Slurm job {first.job_id}",
            slurm_job_id=first.job_id,
        )

    # --- cancels the API could not deliver -------------------------------------------------

    def _retry_cancels(self, cluster: str) -> None:
        with self._sessions() as session:
            pending_cancels = list(
                session.scalars(
                    select(JobRecord.slurm_job_id).where(
                        JobRecord.cluster == cluster,
                        JobRecord.state.in_(FOLLOWED_STATES),
                        JobRecord.cancel_requested_at.is_not(None),
                        JobRecord.slurm_job_id.is_not(None),
                    )
                )
            )
        client = self._clusters.client(cluster)
        for slurm_job_id in pending_cancels:
            if slurm_job_id is not None:
                client.cancel(slurm_job_id)

    # --- the ledger against sacct -----------------------------------------------------------

    def _check_drift(self, cluster: str) -> None:
        """Recompute recent charges from sacct and report broker minus Slurm per project.

        At most once per ``poller.drift_check_seconds`` per cluster, one batched ``statuses``.
        A job sacct no longer knows counts as 0 on Slurm's side, so it shows up as drift.
        """
        poller = self._settings.poller
        now = time.monotonic()
        last = self._drift_checked.get(cluster)
        if last is not None and now - last < poller.drift_check_seconds:
            return
        self._drift_checked[cluster] = now
        since = utcnow() - timedelta(hours=poller.accounting_lookback_hours)
        with self._sessions() as session:
            rows = session.execute(
                select(
                    JobRecord.slurm_job_id,
                    JobRecord.gpus,
                    JobRecord.weight,
                    JobRecord.charged_gpu_seconds,
                    ProjectRecord.name,
                )
                .join(ProjectRecord, ProjectRecord.id == JobRecord.project_id)
                .where(
                    JobRecord.cluster == cluster,
                    JobRecord.charged_gpu_seconds.is_not(None),
                    JobRecord.slurm_job_id.is_not(None),
                    JobRecord.ended_at >= since,
                )
            ).all()
        if not rows:
            return
        status = self._clusters.client(cluster).statuses([r[0] for r in rows if r[0]])
        drift: dict[str, int] = {}
        for slurm_job_id, gpus, weight, charged, project in rows:
            found = status.found.get(slurm_job_id or "")
            slurm_side = charge_of(found, gpus, weight)[2] if found is not None else 0
            drift[project] = drift.get(project, 0) + (charged or 0) - slurm_side
        for project, seconds in sorted(drift.items()):
            self._observer.ledger_drift(cluster, project, seconds)

    # --- the cluster's own state -----------------------------------------------------------

    def _record_cluster(
        self, report: CycleReport, capacity: list[PartitionCapacity] | None
    ) -> None:
        now = utcnow()
        with transaction(self._sessions) as session:
            row = session.get(ClusterStatusRecord, report.cluster)
            if row is None:
                row = ClusterStatusRecord(name=report.cluster, partitions=[])
                session.add(row)
            row.up = report.ok
            row.last_poll_at = now
            row.last_poll_duration_s = report.duration_s
            row.last_error = report.error
            if report.ok:
                row.last_success_at = now
            if capacity is not None:
                row.partitions = [
                    {
                        "name": c.partition,
                        "gpu_type": c.gpu_type,
                        "gpus_total": c.gpus_total,
                        "gpus_allocated": c.gpus_allocated,
                        "gpus_idle": c.gpus_idle,
                        "gpus_unavailable": c.gpus_unavailable,
                        "nodes_total": c.nodes_total,
                        "nodes_down": c.nodes_down,
                    }
                    for c in capacity
                ]
