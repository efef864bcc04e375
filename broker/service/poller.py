"""One poll cycle of one cluster: follow live jobs, settle finished ones, reconcile lost submits,
retry pending cancels, check charges against sacct, and snapshot capacity.

A cycle runs one batched ``statuses`` (one squeue, plus one sacct for jobs that left the queue),
whatever the number of jobs. When the cluster cannot be reached nothing is changed: a job is never
finalised because its cluster is down. Only the jobs whose status changed since it was last applied
(or that Slurm no longer shows, or that ended) are loaded and written: the poller remembers what it
applied, per cluster, and forgets it when its lease was lost or may have lapsed, so the first cycle
after that (or after a start) reads and applies every followed job again.

Money rules: a job is settled from a sacct record that knows when the job ended (after a slurmdbd
restart sacct may say ``COMPLETED`` with ``End=Unknown`` for a while); no charge exceeds the job's
reservation (allocated GPUs x time limit x weight); a job that Slurm lost after it was seen running
is charged its run time since then; and charges are re-checked against sacct after settlement.

Jobs are followed by broker job, not by Slurm id: a status only applies to a job if it carries the
job's tag (``brk-<uuid>``, first word of the comment); anything else is a different Slurm job.
Each job's update runs in its own savepoint, so one bad job cannot stop the others. Under a lease
``Fence``, each write transaction first proves that this process still holds the poller lease.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeAlias

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from adapters.errors import AdapterError
from adapters.slurm.types import JobStatus, PartitionCapacity, StatusReport
from broker.clock import utcnow
from broker.config import Settings
from broker.db.models import ClusterStatusRecord, JobEventRecord, JobRecord, ProjectRecord
from broker.lifecycle import FOLLOWED, JobState, from_slurm, is_final, values
from broker.service import arrays, foreign, ledger, queue, transitions
from broker.service.accounting import accounted_elapsed, charged_gpus
from broker.service.clusters import ClusterRegistry
from broker.service.lease import Fence, LeaseLost, fenced
from broker.service.observer import BrokerObserver, NullObserver
from quotas import charge_gpu_seconds

log = logging.getLogger(__name__)

FOLLOWED_STATES = values(FOLLOWED)
TAG_LOOKBACK = timedelta(minutes=10)
ACCOUNTING_PATIENCE_POLLS = 30
"""Cycles an ended job may wait for a sacct record with its end time before it is settled without
one (slurmdbd normally records a job within a second, but after a restart it may show
``End=Unknown`` until slurmctld resends the end; sacct failing outright changes nothing)."""


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
    lost: int = 0
    """Jobs settled ``unknown`` because neither squeue nor sacct knows them any more."""
    failed_jobs: int = 0
    """Jobs whose update raised; rolled back alone and tried again next cycle."""
    corrected: int = 0
    """Charges corrected after settlement from a later sacct record."""
    lease_lost: bool = False
    foreign: list[str] = field(default_factory=list)
    """The action (``cancel`` or ``charge``) taken on each foreign job first seen this cycle."""
    status_commands: int = 0
    duration_s: float = 0.0
    started: list[tuple[str, float]] = field(default_factory=list)
    """(gpu_type, seconds waited in the queue) of jobs first seen running."""

    def add(self, other: CycleReport) -> None:
        """Count what ``other`` (one job's part of this cycle) did."""
        for state, count in other.settled.items():
            self.settled[state] = self.settled.get(state, 0) + count
        self.lost += other.lost
        self.started += other.started


def charge_of(alloc_gpus: int, elapsed_s: int, weight: float, cap: int) -> tuple[int, int]:
    """(charge, what Slurm's numbers alone give) in weighted GPU-seconds; the charge never exceeds
    ``cap``, the job's reservation (allocated GPUs x time limit x weight)."""
    raw = charge_gpu_seconds(alloc_gpus, elapsed_s, weight)
    return min(raw, cap), raw


def _seconds_since(moment: datetime | None) -> int:
    return max(0, int((utcnow() - moment).total_seconds())) if moment is not None else 0


TAG_CLOCK_SKEW = timedelta(minutes=10)
"""How far the cluster's clock may be behind the broker's when a submit time is compared."""


def own_status(
    job_id: str,
    tag: str,
    name: str,
    submitted_at: datetime,
    slurm_job_id: str,
    status: StatusReport,
    *,
    account: str | None = None,
    unix_user: str | None = None,
) -> JobStatus | None:
    """What Slurm said about this broker job: the record under its Slurm id carrying its tag.

    A record with another tag is another job that got the same id (a controller that lost its
    state, an id answered for another cluster); it tells nothing about this one. A record with no
    comment at all (sacct stores the comment only once it has the job's end, so a record written
    across a slurmdbd restart may have none) is this job's if its name matches and it was not
    submitted before this job was.
    """
    candidates = status.candidates(slurm_job_id)
    for candidate in candidates:
        if candidate.tag == tag:
            return candidate
    for candidate in candidates:
        if (
            candidate.comment is None
            and candidate.name == name
            and (
                candidate.submit_time is None
                or candidate.submit_time >= submitted_at - TAG_CLOCK_SKEW
            )
        ):
            return candidate
    for candidate in candidates:
        # The comment is the job owner's to change (scontrol update comment=...). A record under
        # this job's id, in its account, run by its Unix user and submitted no earlier than it, is
        # this job with its tag overwritten: it is still followed and charged, never let go as
        # lost while it runs.
        if (
            unix_user is not None
            and not (candidate.tag or "").startswith("brk-")  # not another broker job's
            and candidate.user == unix_user
            and candidate.account == account
            and candidate.submit_time is not None
            and candidate.submit_time >= submitted_at - TAG_CLOCK_SKEW
        ):
            log.warning(
                "job %s: Slurm job %s had its comment changed to %r; still followed as this job",
                job_id,
                slurm_job_id,
                candidate.comment,
            )
            return candidate
    if candidates:
        log.debug(
            "job %s: Slurm job %s carries tag(s) %s, not %s; not this job",
            job_id,
            slurm_job_id,
            ", ".join(str(c.tag) for c in candidates),
            tag,
        )
    return None


def _array_drift(row: Any, status: StatusReport) -> int:
    """Broker minus sacct for a settled array: 0 until every task has a final record."""
    tasks = status.tasks.get(row.slurm_job_id, {})
    size = row.array_size
    per_task_cap = row.reservation_gpu_seconds // max(1, size)
    own = {
        i: t for i, t in tasks.items() if 0 <= i < size and (t.comment is None or t.tag == row.tag)
    }
    if not own:
        return int(row.charged_gpu_seconds or 0)  # sacct no longer knows it
    slurm_side = 0
    for task in own.values():
        elapsed = accounted_elapsed(task)
        if elapsed is None:
            return 0  # not comparable yet
        alloc = charged_gpus(task.alloc_gpus, row.gpus, elapsed)
        slurm_side += charge_of(alloc, elapsed, row.weight, per_task_cap)[0]
    return int(row.charged_gpu_seconds or 0) - slurm_side


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """A broker job's columns that tell its Slurm record from another job's."""

    job_id: str
    tag: str
    name: str
    submitted_at: datetime
    account: str
    unix_user: str | None

    def status(self, slurm_job_id: str, report: StatusReport) -> JobStatus | None:
        current = report.found.get(slurm_job_id)
        if current is not None and current.tag == self.tag:
            return current  # what own_status finds first, without its other checks
        return own_status(
            self.job_id,
            self.tag,
            self.name,
            self.submitted_at,
            slurm_job_id,
            report,
            account=self.account,
            unix_user=self.unix_user,
        )


Applied: TypeAlias = tuple[JobState, str | None, datetime | None]
"""What ``Poller._apply`` reads of a live job's status: its state, reason and (once running)
start time. Elapsed time and the scheduler's estimated start change every cycle and change
nothing in the job's row while it is live."""


def _applied(status: JobStatus) -> Applied:
    state = from_slurm(status.state)
    return state, status.reason, status.start_time if state == JobState.RUNNING else None


@dataclass(frozen=True, slots=True)
class _Applied:
    """What was last applied to a job and committed, and the status it came from."""

    applied: Applied
    status: JobStatus | None
    """The status object itself where it is the one under the job's Slurm id and carries its tag:
    squeue printing the same line again gives the same object back (``SqueueMemo``), and
    ``JobIdentity.status`` would pick it at once, so the job is unchanged without a comparison
    (never for an array, whose tasks change under one status)."""

    @classmethod
    def of(cls, found: JobStatus, identity: JobIdentity) -> _Applied:
        return cls(_applied(found), found if found.tag == identity.tag else None)


def _may_settle(job: JobRecord, status: JobStatus | None, threshold: int) -> bool:
    if status is None:
        return job.missing_polls + 1 >= threshold
    return from_slurm(status.state).is_final


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
        self._applied: dict[str, dict[str, _Applied]] = {}
        """Per cluster: job id -> what of Slurm's status was last applied to it and committed."""
        self._identities: dict[str, dict[str, JobIdentity]] = {}
        """Per cluster: job id -> the columns ``own_status`` matches on (fixed once the job has a
        Slurm id)."""
        self._held_until: dict[str, float] = {}
        """Per cluster: until when (monotonic) the lease was surely held since the last cycle."""

    def poll(self, cluster: str, fence: Fence | None = None) -> CycleReport:
        """One cycle of ``cluster``. With a ``fence``, every write proves the lease is still held
        and the cycle ends at the first write that finds it gone (``report.lease_lost``)."""
        report = CycleReport(cluster=cluster)
        started = time.monotonic()
        capacity: list[PartitionCapacity] | None = None
        try:
            if fence is not None:
                fence.renew()
                if started > self._held_until.get(cluster, 0.0):
                    # The lease may have lapsed since this process last polled: another one may
                    # have changed the jobs, so what was applied is read again from the rows.
                    self.forget(cluster)
            client = self._clusters.client(cluster)
            self._follow(cluster, report, fence)
            self._reconcile(cluster, report, fence)
            if fence is not None:
                fence.renew()
            self._retry_cancels(cluster)
            capacity = client.capacity()
            self._check_drift(cluster, report, fence)
        except AdapterError as exc:
            report.ok = False
            report.error = str(exc)[:500]
            log.warning("poll of %s failed: %s", cluster, exc)
        except LeaseLost:
            report.ok, report.lease_lost, report.error = False, True, "poller lease lost"
        report.duration_s = time.monotonic() - started
        if fence is not None:
            if report.lease_lost:
                self.forget(cluster)
                self._held_until.pop(cluster, None)
            else:
                # Renewed at the start of the cycle: held until then + its TTL, at least.
                self._held_until[cluster] = started + fence.ttl_seconds
        if not report.lease_lost:
            try:
                self._record_cluster(report, capacity, fence)
            except LeaseLost:
                report.ok, report.lease_lost, report.error = False, True, "poller lease lost"
        self._report(report)
        return report

    def forget(self, cluster: str) -> None:
        """Drop what this process remembers of ``cluster``'s jobs: the next cycle loads and
        applies every followed job again, as the first cycle after a start does."""
        self._applied.pop(cluster, None)

    def _write(self, fence: Fence | None) -> AbstractContextManager[Session]:
        """A write transaction of this work: under a fence, the lease check comes first."""
        return fenced(self._sessions, fence)

    def _report(self, report: CycleReport) -> None:
        observer = self._observer
        observer.poll(report.cluster, report.ok, report.duration_s, report.status_commands)
        for gpu_type, waited in report.started:
            observer.job_started(report.cluster, gpu_type, waited)
        for _ in range(report.lost):
            observer.job_lost(report.cluster)
        for action in report.foreign:
            observer.foreign_job(report.cluster, action)

    # --- following live jobs ---------------------------------------------------------------

    def _follow(self, cluster: str, report: CycleReport, fence: Fence | None) -> None:
        with self._sessions() as session:
            rows = session.execute(
                select(JobRecord.id, JobRecord.slurm_job_id, JobRecord.array_size).where(
                    JobRecord.cluster == cluster,
                    JobRecord.state.in_(FOLLOWED_STATES),
                    JobRecord.slurm_job_id.is_not(None),
                )
            ).all()
            followed: dict[str, str] = {
                job_id: slurm_job_id for job_id, slurm_job_id, _ in rows if slurm_job_id is not None
            }
            # An array's tasks change under one Slurm id: arrays are looked at every cycle.
            array_ids = {job_id for job_id, _, size in rows if size}
            accounts = foreign.managed_accounts(session, cluster)
            foreign_ids = foreign.open_ids(session, cluster)
        report.followed = len(followed)
        if not followed and not accounts and not foreign_ids:
            return
        if fence is not None:
            fence.renew()
        # One squeue for every job of the projects' accounts: the broker's own and foreign ones.
        status = self._clusters.client(cluster).statuses(
            sorted(set(followed.values()) | foreign_ids), accounts=sorted(accounts) or None
        )
        report.status_commands = status.commands
        if followed:
            self._apply_all(cluster, followed, status, report, fence, array_ids)
        if foreign_ids or any(job.account in accounts for job in status.others):
            self._foreign_jobs(cluster, status, accounts, report, fence)

    def _foreign_jobs(
        self,
        cluster: str,
        status: StatusReport,
        accounts: dict[str, int],
        report: CycleReport,
        fence: Fence | None,
    ) -> None:
        action = self._settings.identity.foreign_jobs
        with self._write(fence) as session:
            work = foreign.apply(session, self._clusters.config(cluster), action, status, accounts)
        report.foreign.extend(what for _, what in work.detected)
        client = self._clusters.client(cluster)
        for slurm_job_id, unix_user in work.cancel:
            try:
                client.cancel(slurm_job_id, as_user=unix_user if unix_user else None)
            except AdapterError as exc:
                log.warning(
                    "foreign job %s on %s not cancelled yet: %s", slurm_job_id, cluster, exc
                )

    def _apply_all(
        self,
        cluster: str,
        followed: dict[str, str],
        status: StatusReport,
        report: CycleReport,
        fence: Fence | None,
        array_ids: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        """Apply Slurm's statuses to the followed jobs whose status changed since it was last
        applied (and to every job with no status or a final one, which counts or settles, and
        to every job array, whose tasks change under one Slurm id).

        Which status is a job's (``own_status``) is decided from columns that do not change once
        the job has a Slurm id, kept per job id, so an unchanged queue costs no job rows at all:
        only the changed jobs are loaded, locked and written.
        """
        threshold = self._settings.poller.missing_polls_before_unknown
        identities = self._identities_of(cluster, followed)
        applied = self._applied.setdefault(cluster, {})
        for job_id in [j for j in applied if j not in followed]:
            del applied[job_id]
        seen: dict[str, JobStatus | None] = {}
        for job_id, slurm_job_id in followed.items():
            last = applied.get(job_id)
            current = status.found.get(slurm_job_id)
            if (
                last is not None
                and current is not None
                and current is last.status
                and job_id not in array_ids
            ):
                continue  # the very status applied (squeue printed the job's line unchanged)
            identity = identities[job_id]
            found = identity.status(slurm_job_id, status)
            if (
                found is not None
                and last is not None
                and job_id not in array_ids
                and not from_slurm(found.state).is_final
                and last.applied == _applied(found)
            ):
                applied[job_id] = _Applied.of(found, identity)
            else:
                seen[job_id] = found
        if not seen:
            return
        for job_id in seen:
            # Whatever happens to it now (a missing poll counted, a rollback), the row may no
            # longer show what was last applied: it is compared again only once re-applied.
            applied.pop(job_id, None)
        done: dict[str, _Applied] = {}
        with self._write(fence) as session:
            jobs = list(
                session.scalars(
                    select(JobRecord).where(JobRecord.id.in_(seen)).order_by(JobRecord.id)
                )
            )
            array_tasks = {
                job.id: arrays.own_tasks(job, status.tasks.get(followed[job.id], {}))
                for job in jobs
                if job.array_size
            }
            settling = sorted(
                {
                    job.project_id
                    for job in jobs
                    if job.id in array_tasks or _may_settle(job, seen[job.id], threshold)
                }
            )
            for project_id in settling:  # a fixed order, so concurrent lockers cannot deadlock
                ledger.lock_project(session, project_id)
            for job in jobs:
                if is_final(job.state) or job.slurm_job_id != followed[job.id]:
                    continue  # changed since it was read (a cancel settled it, a resubmit)
                if job.move_target is not None:
                    continue  # being moved: broker.service.moves follows its Slurm job
                part = CycleReport(cluster=cluster)
                found = seen[job.id]
                try:
                    with session.begin_nested():
                        if job.id in array_tasks:
                            self._apply_array(session, job, array_tasks[job.id], part, threshold)
                        else:
                            self._apply(session, job, found, part, threshold)
                except Exception:
                    # One job's bad data (a value its column refuses, a bug) must not stop the
                    # cycle for the others: its savepoint is rolled back, it is tried again next
                    # cycle.
                    report.failed_jobs += 1
                    log.exception("job %s: applying Slurm's status failed; skipped", job.id)
                    continue
                report.add(part)
                if found is not None and not is_final(job.state):
                    done[job.id] = _Applied.of(found, identities[job.id])
        # Committed: these jobs now show what was applied (a rollback leaves them to be re-read).
        applied.update(done)

    def _identities_of(self, cluster: str, followed: dict[str, str]) -> dict[str, JobIdentity]:
        """The matching columns of the followed jobs, read once per job (in one query)."""
        known = self._identities.setdefault(cluster, {})
        for job_id in [j for j in known if j not in followed]:
            del known[job_id]
        new = [job_id for job_id in followed if job_id not in known]
        if new:
            with self._sessions() as session:
                for offset in range(0, len(new), 1000):
                    for row in session.execute(
                        select(
                            JobRecord.id,
                            JobRecord.tag,
                            JobRecord.name,
                            JobRecord.submitted_at,
                            JobRecord.account,
                            JobRecord.unix_user,
                        ).where(JobRecord.id.in_(new[offset : offset + 1000]))
                    ):
                        known[row.id] = JobIdentity(
                            row.id, row.tag, row.name, row.submitted_at, row.account, row.unix_user
                        )
        return {job_id: known[job_id] for job_id in followed if job_id in known}

    def _apply(
        self,
        session: Session,
        job: JobRecord,
        status: JobStatus | None,
        report: CycleReport,
        threshold: int,
    ) -> None:
        if status is None:
            job.missing_polls += 1
            if job.missing_polls >= threshold:
                self._settle_lost(session, job, report)
            return
        state = from_slurm(status.state)
        if state.is_final:
            self._settle_ended(session, job, status, state, report)
            return
        job.missing_polls = 0
        if state == JobState.RUNNING:
            started_at = status.start_time or utcnow()
            if transitions.move(
                session, job, JobState.RUNNING, status.reason, started_at=started_at
            ):
                waited = max(0.0, (started_at - job.submitted_at).total_seconds())
                report.started.append((job.gpu_type, waited))
        if job.state_reason != status.reason:
            job.state_reason = status.reason

    def _apply_array(
        self,
        session: Session,
        job: JobRecord,
        tasks: dict[int, JobStatus],
        report: CycleReport,
        threshold: int,
    ) -> None:
        """Follow an array through its tasks (``broker.service.arrays``)."""
        if not tasks:
            job.missing_polls += 1
            if job.missing_polls >= threshold:
                self._settle_lost(session, job, report)
            return
        give_up = job.missing_polls + 1 >= ACCOUNTING_PATIENCE_POLLS
        progress = arrays.follow(session, job, tasks, give_up_waiting=give_up)
        if progress.final is not None:
            ended = [t.end_time for t in tasks.values() if t.end_time is not None]
            transitions.settle(
                session,
                job,
                progress.final,
                charge_gpu_seconds=progress.charge_gpu_seconds,
                lock=False,
                reason=progress.reason,
                exit_code=progress.exit_code,
                alloc_gpus=job.gpus,
                elapsed_s=progress.elapsed_s,
                started_at=job.started_at or progress.started_at,
                ended_at=max(ended) if ended else None,
            )
            report.settled[progress.final.value] = report.settled.get(progress.final.value, 0) + 1
            return
        every_task_ended = len(tasks) == job.array_size and all(
            from_slurm(t.state).is_final for t in tasks.values()
        )
        # Ended in Slurm, some task without its final sacct record yet: wait, with patience.
        job.missing_polls = job.missing_polls + 1 if every_task_ended else 0
        if progress.started_at is not None and transitions.move(
            session, job, JobState.RUNNING, None, started_at=progress.started_at
        ):
            waited = max(0.0, (progress.started_at - job.submitted_at).total_seconds())
            report.started.append((job.gpu_type, waited))
        waiting = [t.reason for t in tasks.values() if t.state == "PENDING"]
        reason = waiting[0] if waiting and job.state == JobState.PENDING.value else None
        if job.state_reason != reason:
            job.state_reason = reason

    def _settle_ended(
        self,
        session: Session,
        job: JobRecord,
        status: JobStatus,
        state: JobState,
        report: CycleReport,
    ) -> None:
        reason = status.reason or f"Slurm state {status.state}"
        elapsed = accounted_elapsed(status)
        if elapsed is None:
            if job.missing_polls + 1 < ACCOUNTING_PATIENCE_POLLS:
                job.missing_polls += 1  # no final sacct record yet: wait for it
                return
            # Still none after all that time: charge what it is known to have run (never less
            # than it can have used, never more than its reservation) and say so in the event.
            if status.source == "squeue" and status.elapsed_s is not None:
                elapsed = status.elapsed_s
            else:
                elapsed = _seconds_since(status.start_time or job.started_at)
            reason = f"{reason}; sacct had no final record, charged the run time known"
            log.warning("job %s: no final accounting record; charging %d s", job.id, elapsed)
        alloc = charged_gpus(status.alloc_gpus, job.gpus, elapsed)
        charge, reason = self._capped(job, alloc, elapsed, reason)
        transitions.settle(
            session,
            job,
            state,
            charge_gpu_seconds=charge,
            lock=False,
            reason=reason,
            exit_code=status.exit_code,
            alloc_gpus=alloc,
            elapsed_s=elapsed,
            started_at=job.started_at or status.start_time,
            ended_at=status.end_time,
        )
        report.settled[state.value] = report.settled.get(state.value, 0) + 1

    def _settle_lost(self, session: Session, job: JobRecord, report: CycleReport) -> None:
        """Neither squeue nor sacct knows the job (as this job) any more. One that was seen
        running is charged from then until now, capped at its reservation; one that never
        started is charged nothing."""
        reason = (
            f"neither squeue nor sacct knows Slurm job {job.slurm_job_id} as this job after "
            f"{job.missing_polls} polls"
        )
        charge, elapsed = 0, None
        if job.array_size:
            charge = arrays.settle_lost(session, job, utcnow())
            reason = f"{reason}; each task seen running charged its run time since then"
        elif job.started_at is not None:
            elapsed = _seconds_since(job.started_at)
            charge, reason = self._capped(
                job, job.gpus, elapsed, f"{reason}; charged its run time since it was seen running"
            )
        log.warning(
            "job %s lost by Slurm (job %s on %s); charged %d GPU-s",
            job.id,
            job.slurm_job_id,
            job.cluster,
            charge,
        )
        transitions.settle(
            session,
            job,
            JobState.UNKNOWN,
            charge_gpu_seconds=charge,
            lock=False,
            reason=reason,
            elapsed_s=elapsed,
        )
        report.settled[JobState.UNKNOWN.value] = report.settled.get(JobState.UNKNOWN.value, 0) + 1
        report.lost += 1

    @staticmethod
    def _capped(job: JobRecord, alloc: int, elapsed: int, reason: str) -> tuple[int, str]:
        """The charge for ``alloc`` GPUs over ``elapsed`` s, capped at the reservation."""
        charge, raw = charge_of(alloc, elapsed, job.weight, job.reservation_gpu_seconds)
        if charge < raw:
            log.warning(
                "job %s: Slurm's numbers give %d GPU-s, more than its reservation; charging %d",
                job.id,
                raw,
                charge,
            )
            reason = f"{reason}; capped at its reservation ({charge} of {raw} GPU-s)"
        return charge, reason

    # --- reconciling submits whose outcome is unknown --------------------------------------

    def _reconcile(self, cluster: str, report: CycleReport, fence: Fence | None) -> None:
        now = utcnow()
        poller = self._settings.poller
        stale_submitting = now - timedelta(seconds=poller.stale_submitting_seconds)
        with self._sessions() as session:
            candidates = list(
                session.execute(
                    select(
                        JobRecord.id, JobRecord.tag, JobRecord.submitted_at, JobRecord.updated_at
                    ).where(
                        JobRecord.cluster == cluster,
                        (JobRecord.state == JobState.SUBMIT_UNKNOWN.value)
                        | (
                            (JobRecord.state == JobState.SUBMITTING.value)
                            & (JobRecord.submitted_at < stale_submitting)
                        )
                        | (  # released by the queue or moved, and its submitter is gone
                            JobRecord.state.in_((JobState.QUEUED.value, JobState.PENDING.value))
                            & JobRecord.slurm_job_id.is_(None)
                            & (JobRecord.release_claimed_at < stale_submitting)
                        ),
                    )
                ).all()
            )
            accounts = sorted(foreign.managed_accounts(session, cluster)) if candidates else []
        client = self._clusters.client(cluster)
        for job_id, tag, submitted_at, updated_at in candidates:
            # The job runs as its researcher: look in the projects' accounts, for every user.
            found = client.find_by_tag(
                tag, since=submitted_at - TAG_LOOKBACK, accounts=accounts or None
            )
            with self._write(fence) as session:
                job = session.get_one(JobRecord, job_id)
                if job.state == JobState.PENDING.value:  # moved; its sbatch's answer was lost
                    if job.slurm_job_id is not None or job.release_claimed_at is None:
                        continue
                    if found:
                        first = sorted(found, key=lambda s: int(s.job_id.split("_")[0]))[0]
                        session.add(
                            JobEventRecord(
                                job_id=job.id,
                                at=now,
                                from_state=job.state,
                                to_state=job.state,
                                reason=f"found by tag as Slurm job {first.job_id}",
                            )
                        )
                        job.slurm_job_id = first.job_id
                        job.in_slurm_since = now
                        report.attached += 1
                    elif not self._given_up(job.release_claimed_at, now):
                        continue  # an sbatch left on the login node may still make it
                    job.release_claimed_at = None  # not found: submitted again (moves)
                    continue
                if job.state == JobState.QUEUED.value:
                    if job.release_claimed_at is None or job.release_claimed_at >= stale_submitting:
                        continue  # released again meanwhile
                    if found:
                        self._attach(session, job, found)
                        queue.clear(job)
                        report.attached += 1
                    elif not self._given_up(job.release_claimed_at, now):
                        continue  # an sbatch left on the login node may still make it
                    else:  # its sbatch never reached Slurm: back in the queue
                        log.warning(
                            "queued job %s: its release did not reach Slurm; queued again", job.id
                        )
                        job.release_claimed_at = None
                    continue
                if job.state not in (JobState.SUBMITTING.value, JobState.SUBMIT_UNKNOWN.value):
                    continue
                if found:
                    self._attach(session, job, found)
                    report.attached += 1
                elif self._given_up(max(submitted_at, updated_at), now):
                    # Counted from its last change: a job that became submit_unknown when its
                    # submitter stopped waiting may still be in an sbatch on the login node.
                    transitions.settle(
                        session,
                        job,
                        JobState.SUBMIT_FAILED,
                        charge_gpu_seconds=0,
                        reason="no Slurm job carries its tag",
                    )
                    job.idempotency_key = None
                    report.submit_failed += 1

    def _given_up(self, since: datetime, now: datetime) -> bool:
        grace = timedelta(seconds=self._settings.poller.submit_unknown_grace_seconds)
        return now - since > grace

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
                session.execute(
                    select(JobRecord.slurm_job_id, JobRecord.unix_user).where(
                        JobRecord.cluster == cluster,
                        JobRecord.state.in_(FOLLOWED_STATES),
                        JobRecord.cancel_requested_at.is_not(None),
                        JobRecord.slurm_job_id.is_not(None),
                    )
                )
            )
        client = self._clusters.client(cluster)
        for slurm_job_id, unix_user in pending_cancels:
            if slurm_job_id is not None:
                client.cancel(slurm_job_id, as_user=unix_user)

    # --- the ledger against sacct -----------------------------------------------------------

    def _check_drift(self, cluster: str, report: CycleReport, fence: Fence | None) -> None:
        """Re-read recent charges from sacct, correct those sacct now accounts differently, and
        report what is left of broker minus Slurm per project.

        At most once per ``poller.drift_check_seconds`` per cluster, one batched ``statuses``.
        A job whose final sacct record (with its end time) gives another charge than the one made
        is corrected (still capped at its reservation) under its project's ledger lock, with an
        event. A job sacct no longer knows cannot be corrected: it counts as 0 on Slurm's side and
        shows as drift (an alert rule watches it). One whose record has no end yet waits.
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
                    JobRecord.id,
                    JobRecord.tag,
                    JobRecord.name,
                    JobRecord.submitted_at,
                    JobRecord.slurm_job_id,
                    JobRecord.gpus,
                    JobRecord.weight,
                    JobRecord.reservation_gpu_seconds,
                    JobRecord.charged_gpu_seconds,
                    JobRecord.project_id,
                    JobRecord.array_size,
                    ProjectRecord.name.label("project"),
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
        if fence is not None:
            fence.renew()
        status = self._clusters.client(cluster).statuses(sorted({r.slurm_job_id for r in rows}))
        drift: dict[str, int] = {}
        corrections: dict[str, tuple[int, int, int]] = {}
        for row in rows:
            charged = row.charged_gpu_seconds or 0
            drift.setdefault(row.project, 0)
            if row.array_size:
                # An array is compared task by task; what differs is reported, not corrected
                # (its tasks' charges are its record, see broker.service.arrays).
                drift[row.project] += _array_drift(row, status)
                continue
            found = own_status(
                row.id, row.tag, row.name, row.submitted_at, row.slurm_job_id, status
            )
            if found is None:
                drift[row.project] += charged  # sacct no longer knows it: cannot be corrected
                continue
            elapsed = accounted_elapsed(found)
            if elapsed is None:
                continue  # no final record yet: not comparable, checked again next time
            alloc = charged_gpus(found.alloc_gpus, row.gpus, elapsed)
            slurm_side = charge_of(alloc, elapsed, row.weight, row.reservation_gpu_seconds)[0]
            if slurm_side != charged:
                corrections[row.id] = (row.project_id, charged, slurm_side)
        if corrections:
            report.corrected = self._correct(corrections, fence)
        for project, seconds in sorted(drift.items()):
            self._observer.ledger_drift(cluster, project, seconds)

    def _correct(self, corrections: dict[str, tuple[int, int, int]], fence: Fence | None) -> int:
        """Set the charges sacct now gives ({job id: (project, charged, sacct's)}); a job whose
        charge changed since it was read is left for the next check. Returns how many changed."""
        done = 0
        with self._write(fence) as session:
            for project_id in sorted({p for p, _, _ in corrections.values()}):
                ledger.lock_project(session, project_id)
            for job_id, (_, charged, corrected) in sorted(corrections.items()):
                job = session.get_one(JobRecord, job_id)
                if job.charged_gpu_seconds != charged:
                    continue
                now = utcnow()
                log.warning(
                    "job %s (slurm %s): charge corrected from %d to %d GPU-s after sacct",
                    job.id,
                    job.slurm_job_id,
                    charged,
                    corrected,
                )
                session.add(
                    JobEventRecord(
                        job_id=job.id,
                        at=now,
                        from_state=job.state,
                        to_state=job.state,
                        reason=f"charge corrected from {charged} to {corrected} GPU-s by sacct",
                    )
                )
                before = ledger.Charge.of(job)
                job.charged_gpu_seconds = corrected
                job.updated_at = now
                ledger.charge_corrected(session, job, before)
                done += 1
        return done

    # --- the cluster's own state -----------------------------------------------------------

    def _record_cluster(
        self, report: CycleReport, capacity: list[PartitionCapacity] | None, fence: Fence | None
    ) -> None:
        now = utcnow()
        with self._write(fence) as session:
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
