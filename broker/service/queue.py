"""The broker's admission queue (API.md, "Queueing in the broker").

A job that fits its project's GPU-hour budget but not a concurrency or pending-job limit is
admitted as ``queued``: it holds its reservation, and the queue submits it when the limit allows.

- **Order**: submission order within the project. A later job that fits may pass an earlier one
  that does not fit yet (a smaller one, or one for another cluster), but nothing passes a job that
  has waited longer than ``[queue] starvation_seconds``. A new job of a project that has queued
  jobs joins the queue too, so the queue alone decides the order.
- **Release**: after every poll cycle (so within one cycle of a limit freeing), under the project's
  ledger lock and the poller's lease: a released job is *claimed* (``release_claimed_at``) in that
  transaction, then submitted through ``JobService.submit_released``, the same exactly-once path
  as a direct submission (its tag, ``submit_unknown`` when sbatch's answer is lost). A claim is
  taken once: two pollers never release one job twice. A cluster that cannot be reached leaves
  the job queued; a claim whose process died is settled by the poller's reconciler (found by its
  tag in Slurm, or given back to the queue).
- **Hold**: an admin may hold a project's queue; its queued jobs stay queued until released.
- **Cost**: a pass that finds nothing to release remembers what it decided from (the project's
  quota, ledger, hold, the clusters down, and the shape of its queue: counts, sums and ages, read
  in one aggregate); the next pass compares those few rows and loads the queued jobs only if
  something changed. A sweep of thousands of queued jobs costs a pass a few statements, not a
  read and a check of every job, each cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from broker.clock import utcnow
from broker.config import Settings
from broker.db.models import ClusterStatusRecord, JobRecord, ProjectRecord, QuotaRecord
from broker.lifecycle import JobState
from broker.service import ledger
from broker.service.lease import Fence, fenced
from broker.service.observer import BrokerObserver, NullObserver
from quotas import Decision, JobRequest, LedgerSnapshot, LimitName, Violation, room_now
from quotas.policy import waits_in_queue

if TYPE_CHECKING:
    from broker.service.jobs import JobService

log = logging.getLogger(__name__)

HELD = "project_held"


@dataclass(frozen=True, slots=True)
class Waiting:
    """Why a queued job waits: an API reason and a one-line message with the numbers."""

    reason: str
    message: str


def reason_of(violation: Violation) -> str:
    if violation.limit == LimitName.PENDING_JOBS:
        return "pending_jobs"
    return "concurrent_gpus_per_cluster" if violation.cluster else "concurrent_gpus"


def _ahead(count: int) -> str:
    return f"{count} job{'' if count == 1 else 's'} ahead"


def describe(violation: Violation, ahead: int) -> str:
    used = int(violation.used or 0)
    if violation.limit == LimitName.PENDING_JOBS:
        what = f"project at {used} of {violation.allowed} pending jobs"
    elif violation.cluster:
        what = f"project at {used} of {violation.allowed} concurrent GPUs on {violation.cluster}"
    else:
        what = f"project at {used} of {violation.allowed} concurrent GPUs"
    return f"{what}; {_ahead(ahead)}"


def clear(job: JobRecord) -> None:
    """Forget what only a queued job needs (its script waited here; it is in Slurm now)."""
    job.queued_script = None
    job.queued_environment = None
    job.queue_reason = None
    job.queue_message = None
    job.release_claimed_at = None


def _queued(project_id: int) -> Select[JobRecord]:
    return select(JobRecord).where(
        JobRecord.project_id == project_id, JobRecord.state == JobState.QUEUED.value
    )


def _queue_shape(
    project_id: int, starving_since: datetime
) -> Select[int, int, datetime, datetime, int, int, int]:
    """What of a project's queue decides a pass, in one row: waiting jobs (how many, their GPUs,
    the first and last submitted, how many waited past the starvation limit) and claimed ones
    whose sbatch is under way (how many, their GPUs). A job joining, leaving, being claimed or
    starving changes it."""
    waiting = JobRecord.release_claimed_at.is_(None)
    claimed = JobRecord.release_claimed_at.is_not(None)
    return select(
        func.count().filter(waiting),
        func.sum(JobRecord.gpus).filter(waiting),
        func.min(JobRecord.submitted_at).filter(waiting),
        func.max(JobRecord.submitted_at).filter(waiting),
        func.count().filter(waiting, JobRecord.submitted_at < starving_since),
        func.count().filter(claimed),
        func.sum(JobRecord.gpus * func.coalesce(JobRecord.array_size, 1)).filter(claimed),
    ).where(JobRecord.project_id == project_id, JobRecord.state == JobState.QUEUED.value)


def admission_wait(
    session: Session,
    project: ProjectRecord,
    snapshot: LedgerSnapshot,
    decision: Decision,
) -> Waiting | None:
    """At admission (under the project's ledger lock, ``snapshot`` read under it): whether a job
    that passed the budget and the static limits waits in the queue, and why; None when it goes
    to Slurm now."""
    if decision.violations and not waits_in_queue(decision):
        return None  # the budget or a static limit refuses it: no waiting helps
    waiting = snapshot.queued_jobs
    if project.queue_held:
        return Waiting(HELD, f"the project's queue is held by an admin; {_ahead(waiting)}")
    if decision.violations:
        first = decision.violations[0]
        return Waiting(reason_of(first), describe(first, waiting))
    if waiting:
        head_reason = session.connection().scalar(  # one column, no ORM load of the job
            select(JobRecord.queue_reason)
            .where(JobRecord.project_id == project.id, JobRecord.state == JobState.QUEUED.value)
            .order_by(JobRecord.submitted_at, JobRecord.id)
            .limit(1)
        )
        reason = head_reason or "concurrent_gpus"
        return Waiting(reason, f"the project's queue decides the order; {_ahead(waiting)}")
    return None


@dataclass
class _Room:
    """A project's live GPUs and pending jobs, as releases in this pass add to them."""

    snapshot: LedgerSnapshot

    def take(self, job: JobRecord) -> None:
        gpus = job.gpus * (job.array_max_parallel or job.array_size or 1)
        by_cluster = dict(self.snapshot.live_gpus_by_cluster)
        by_cluster[job.cluster] = by_cluster.get(job.cluster, 0) + gpus
        self.snapshot = replace(
            self.snapshot,
            live_gpus=self.snapshot.live_gpus + gpus,
            live_gpus_by_cluster=by_cluster,
            pending_jobs=self.snapshot.pending_jobs + 1,
        )


def request_of(job: JobRecord) -> JobRequest:
    return JobRequest(
        cluster=job.cluster,
        partition=job.partition,
        gpu_type=job.gpu_type,
        gpus=job.gpus,
        time_limit_minutes=job.time_limit_minutes,
        tasks=job.array_size or 1,
        parallel_tasks=job.array_max_parallel or job.array_size or 1,
    )


@dataclass
class ReleaseReport:
    released: list[str] = field(default_factory=list)
    """Jobs claimed and handed to sbatch in this pass."""
    submitted: int = 0
    """Of those, the ones now in Slurm (or ``submit_unknown``)."""


class AdmissionQueue:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        observer: BrokerObserver | None = None,
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._observer: BrokerObserver = observer or NullObserver()
        self._jobs: JobService | None = None
        # Per project, what its last pass decided from when it released nothing (this process).
        self._unchanged: dict[int, tuple[object, ...]] = {}

    def attach(self, jobs: JobService) -> None:
        self._jobs = jobs

    def forget(self) -> None:
        """Forget what earlier passes decided from: the next pass reads every queued job."""
        self._unchanged.clear()

    def _write(self, fence: Fence | None) -> AbstractContextManager[Session]:
        """A write transaction of this work: under a fence, the lease check comes first."""
        return fenced(self._sessions, fence)

    def release(self, fence: Fence | None = None) -> ReleaseReport:
        """One pass over every project with queued jobs: claim what fits, in order, and submit
        it. Cheap when nothing is queued (one indexed query)."""
        report = ReleaseReport()
        if not self._settings.queue.enabled:
            return report
        with self._sessions() as session:
            project_ids = list(
                session.scalars(
                    select(JobRecord.project_id)
                    .where(
                        JobRecord.state == JobState.QUEUED.value,
                        JobRecord.release_claimed_at.is_(None),
                    )
                    .distinct()
                    .order_by(JobRecord.project_id)
                )
            )
            down = set(
                session.scalars(
                    select(ClusterStatusRecord.name).where(ClusterStatusRecord.up.is_(False))
                )
            )
        for project_id in project_ids:
            claimed = self._claim(project_id, down, fence)
            report.released.extend(claimed)
            for job_id, waited_s in claimed.items():
                assert self._jobs is not None, "AdmissionQueue.attach(JobService) first"
                job = self._jobs.submit_released(job_id)
                if job is not None and job.state != JobState.QUEUED.value:
                    report.submitted += 1
                    self._observer.queue_released(job.cluster, waited_s)
                    log.info(
                        "queued job %s released to %s after %.0f s", job_id, job.cluster, waited_s
                    )
        return report

    def _claim(self, project_id: int, down: set[str], fence: Fence | None) -> dict[str, float]:
        """Claim the project's queued jobs that fit now, in order; refresh the others' reason."""
        now = utcnow()
        starvation = timedelta(seconds=self._settings.queue.starvation_seconds)
        claimed: dict[str, float] = {}
        with self._write(fence) as session:
            ledger.lock_project(session, project_id)
            project = session.get_one(ProjectRecord, project_id)
            quota = session.get(QuotaRecord, project_id)
            if quota is None:
                return claimed  # no quota any more: nothing is released until one is set
            policy = ledger.policy_of(quota)
            snapshot = ledger.snapshot(session, project_id, quota)
            shape = session.execute(_queue_shape(project_id, now - starvation)).one()
            inputs = (policy, snapshot, project.queue_held, frozenset(down), tuple(shape))
            if self._unchanged.get(project_id) == inputs:
                return claimed  # decided from the same inputs last pass: nothing to release
            self._unchanged.pop(project_id, None)
            jobs = list(
                session.scalars(
                    _queued(project_id)
                    .where(JobRecord.release_claimed_at.is_(None))
                    .order_by(JobRecord.submitted_at, JobRecord.id)
                )
            )
            room = _Room(snapshot)
            # Jobs claimed by an earlier pass whose sbatch is under way count as in Slurm.
            for in_flight in session.scalars(
                _queued(project_id).where(JobRecord.release_claimed_at.is_not(None))
            ):
                room.take(in_flight)
            starving: JobRecord | None = None
            for position, job in enumerate(jobs):
                ahead = position - len(claimed)
                if project.queue_held:
                    waiting = Waiting(
                        HELD, f"the project's queue is held by an admin; {_ahead(ahead)}"
                    )
                else:
                    violations = room_now(request_of(job), policy, room.snapshot)
                    if not violations and starving is None and job.cluster not in down:
                        job.release_claimed_at = now
                        claimed[job.id] = (now - job.submitted_at).total_seconds()
                        room.take(job)
                        continue
                    if violations:
                        waiting = Waiting(reason_of(violations[0]), describe(violations[0], ahead))
                    elif starving is not None:
                        waiting = Waiting(
                            starving.queue_reason or "concurrent_gpus",
                            f"behind job {starving.id}, queued since "
                            f"{starving.submitted_at:%Y-%m-%d %H:%M} UTC; {_ahead(ahead)}",
                        )
                    else:
                        waiting = Waiting(
                            job.queue_reason or "concurrent_gpus",
                            f"cluster {job.cluster} cannot be reached; {_ahead(ahead)}",
                        )
                    if starving is None and now - job.submitted_at > starvation:
                        starving = job  # nothing after it may pass it any more
                job.queue_reason, job.queue_message = waiting.reason, waiting.message
        if not claimed:
            self._unchanged[project_id] = inputs  # committed: the same inputs decide the same
        return claimed


def positions_query(project_ids: Iterable[int]) -> Select[str, int]:
    """(job id, 1-based position) of every queued job of ``project_ids``, in one statement."""
    place = (
        func.row_number()
        .over(partition_by=JobRecord.project_id, order_by=(JobRecord.submitted_at, JobRecord.id))
        .label("position")
    )
    return select(JobRecord.id, place).where(
        JobRecord.project_id.in_(sorted(set(project_ids))),
        JobRecord.state == JobState.QUEUED.value,
    )


def positions(session: Session, jobs: list[JobRecord]) -> dict[str, int]:
    """1-based position of each queued job among its project's queued jobs (one query)."""
    queued = {job.id for job in jobs if job.state == JobState.QUEUED.value}
    if not queued:
        return {}
    projects = {job.project_id for job in jobs if job.id in queued}
    return {
        job_id: int(place)
        for job_id, place in session.execute(positions_query(projects))
        if job_id in queued
    }
