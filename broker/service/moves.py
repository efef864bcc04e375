"""Moving a job the broker placed to a cluster where it can start (API.md, "Placement").

A job that named no cluster, and that waits in Slurm for *resources* (never for a quota,
association, hold or dependency: those follow a job anywhere) longer than
``[placement] move_after_seconds``, moves once to another cluster its project may use with
enough idle GPUs of an allowed type, at that type's price. Each step is recorded on the job, so a
crash or a lease handover resumes it where it stopped, and never two live Slurm jobs exist for
one broker job:

1. **decide** (under the project's ledger lock): a target with idle GPUs, and a budget that holds
   the job re-priced at the target's GPU-type weight; the reservation is re-priced now and the
   target recorded (``move_target``). No target, or no money: the job stays where it is.
2. **cancel** the first Slurm job with ``scancel --state=PENDING`` (slurmctld leaves a job that
   has just started alone), then read its state: gone without ever having had an allocation, by
   its sacct record, go on; started, the move is given up (price restored); still pending, or
   ended with no sacct record yet, try again next cycle.
3. **switch** (one transaction): the job now belongs to the target cluster, with no Slurm job,
   claimed for submission; an event says from where, to where and why.
4. **submit** on the target through ``JobService.submit_moved`` (same tag). A lost answer is
   found by tag by the poller's reconciler; an unreachable target is retried next cycle.

A cancel requested meanwhile ends the job as ``cancelled`` once its Slurm job is gone.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from adapters.errors import AdapterError
from broker.clock import utcnow
from broker.config import Settings
from broker.db.models import JobEventRecord, JobRecord, ProjectRecord, QuotaRecord
from broker.lifecycle import JobState, from_slurm
from broker.service import ledger, placement, transitions
from broker.service.cluster_identity import ClusterIdentities, output_dir
from broker.service.clusters import ClusterRegistry
from broker.service.lease import Fence, fenced
from broker.waiting import moves_elsewhere_may_help
from quotas import reservation_gpu_seconds, weight_for

if TYPE_CHECKING:
    from broker.service.jobs import JobService

log = logging.getLogger(__name__)


class Mover:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        clusters: ClusterRegistry,
        settings: Settings,
        identities: ClusterIdentities,
    ) -> None:
        self._sessions = sessions
        self._clusters = clusters
        self._settings = settings
        self._identities = identities
        self._jobs: JobService | None = None

    def attach(self, jobs: JobService) -> None:
        self._jobs = jobs

    def _write(self, fence: Fence | None) -> AbstractContextManager[Session]:
        """A write transaction of this work: under a fence, the lease check comes first."""
        return fenced(self._sessions, fence)

    def consider(self, cluster: str, fence: Fence | None = None) -> int:
        """One pass for the jobs on ``cluster``; returns how many moved (submitted elsewhere)."""
        if not self._settings.placement.moves:
            return 0
        for job_id in self._waiting_too_long(cluster):
            self._decide(job_id, fence)
        moved = 0
        for job_id in self._moving_from(cluster):
            target = self._cancel_first(job_id, fence)
            if target is not None and self._switch(job_id, target, fence):
                moved += self._submit(job_id)
        for job_id in self._awaiting_sbatch(cluster):
            moved += self._submit(job_id, fence=fence)
        return moved

    # --- 1. decide ---------------------------------------------------------------------------

    def _waiting_too_long(self, cluster: str) -> list[str]:
        since = utcnow() - timedelta(seconds=self._settings.placement.move_after_seconds)
        with self._sessions() as session:
            rows = session.execute(
                select(JobRecord.id, JobRecord.state_reason).where(
                    JobRecord.cluster == cluster,
                    JobRecord.state == JobState.PENDING.value,
                    JobRecord.placed.is_(True),
                    JobRecord.moves == 0,
                    JobRecord.move_target.is_(None),
                    JobRecord.cancel_requested_at.is_(None),
                    JobRecord.array_size.is_(None),
                    JobRecord.slurm_job_id.is_not(None),
                    JobRecord.queued_script.is_not(None),
                    JobRecord.in_slurm_since < since,
                )
            ).all()
        return [job_id for job_id, reason in rows if moves_elsewhere_may_help(reason)]

    def _decide(self, job_id: str, fence: Fence | None) -> None:
        with self._write(fence) as session:
            job = session.get_one(JobRecord, job_id)
            ledger.lock_project(session, job.project_id)
            session.refresh(job)
            if job.state != JobState.PENDING.value or job.move_target is not None:
                return
            project = session.get_one(ProjectRecord, job.project_id)
            quota = session.get(QuotaRecord, job.project_id)
            if quota is None:
                return
            policy = ledger.policy_of(quota)
            snapshot = ledger.snapshot(session, job.project_id, quota)
            for option in placement.options(
                session, self._settings, project, quota, exclude=job.cluster
            ):
                if option.idle < job.gpus:
                    break  # best first: no other option has room either
                weight = weight_for(policy, option.gpu_type)
                price = reservation_gpu_seconds(job.gpus, job.time_limit_minutes, weight)
                held = snapshot.used_gpu_seconds + snapshot.reserved_gpu_seconds
                if held - job.reserved_gpu_seconds + price > policy.budget_gpu_seconds:
                    continue  # this price does not fit: it stays where it is
                job.move_target = f"{option.cluster}/{option.partition}"
                was = job.reserved_gpu_seconds
                job.weight = weight
                job.reservation_gpu_seconds = price
                job.reserved_gpu_seconds = price
                ledger.held_changed(
                    session, job, cluster=job.cluster, reserved=was, gpus=ledger.held_gpus(job)
                )
                log.info(
                    "job %s waited on %s for %s: moving it to %s",
                    job.id,
                    job.cluster,
                    job.state_reason,
                    job.move_target,
                )
                return

    # --- 2. cancel the first Slurm job and see it gone -----------------------------------------

    def _moving_from(self, cluster: str) -> list[str]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(JobRecord.id).where(
                        JobRecord.cluster == cluster,
                        JobRecord.move_target.is_not(None),
                        JobRecord.slurm_job_id.is_not(None),
                    )
                )
            )

    def _cancel_first(self, job_id: str, fence: Fence | None) -> str | None:
        """The target once the first Slurm job is gone without having run; None otherwise."""
        from broker.service.poller import own_status  # the poller's rule for "this job"

        with self._sessions() as session:
            job = session.get_one(JobRecord, job_id)
            slurm_job_id, cluster, target = job.slurm_job_id, job.cluster, job.move_target
            tag, name, submitted_at = job.tag, job.name, job.submitted_at
            account, unix_user = job.account, job.unix_user
        if slurm_job_id is None or target is None:
            return None
        client = self._clusters.client(cluster)
        try:
            client.cancel(slurm_job_id, as_user=unix_user, only_pending=True)
            report = client.statuses([slurm_job_id])
        except AdapterError as exc:
            log.warning("job %s: moving it off %s waits: %s", job_id, cluster, exc)
            return None
        status = own_status(
            job_id,
            tag,
            name,
            submitted_at,
            slurm_job_id,
            report,
            account=account,
            unix_user=unix_user,
        )
        if status is None:
            return None  # not visible this instant: look again next cycle
        state = from_slurm(status.state)
        if state == JobState.PENDING:
            return None  # the cancel has not landed yet
        if state.is_final and status.source != "sacct":
            # squeue gives a job cancelled while pending a start (its end): only its sacct
            # record says whether it ever had an allocation. Look again next cycle.
            return None
        if state == JobState.CANCELLED and status.start_time is None:
            return target  # gone without an allocation (``parse_sacct``)
        self._give_up(job_id, f"it started on {cluster} before it could move", fence)
        return None

    def _give_up(self, job_id: str, why: str, fence: Fence | None) -> None:
        with self._write(fence) as session:
            job = session.get_one(JobRecord, job_id)
            ledger.lock_project(session, job.project_id)
            session.refresh(job)
            if job.move_target is None:
                return
            quota = session.get(QuotaRecord, job.project_id)
            if quota is not None and job.state == JobState.PENDING.value:
                weight = weight_for(ledger.policy_of(quota), job.gpu_type)
                price = reservation_gpu_seconds(job.gpus, job.time_limit_minutes, weight)
                was = job.reserved_gpu_seconds
                job.weight, job.reservation_gpu_seconds = weight, price
                job.reserved_gpu_seconds = price
                ledger.held_changed(
                    session, job, cluster=job.cluster, reserved=was, gpus=ledger.held_gpus(job)
                )
            job.move_target = None
            job.moves = 1  # once: it is not tried again
            log.info("job %s: move to another cluster given up: %s", job_id, why)

    # --- 3. switch to the target ---------------------------------------------------------------

    def _switch(self, job_id: str, target: str, fence: Fence | None) -> bool:
        cluster_name, _, partition = target.partition("/")
        with self._sessions() as session:
            unix_user = session.get_one(JobRecord, job_id).unix_user
        directory: str | None = None
        try:
            directory = self._identities.prepare(cluster_name, unix_user)
        except Exception as exc:
            log.warning("job %s cannot move to %s: %s", job_id, cluster_name, exc)
        with self._write(fence) as session:
            job = session.get_one(JobRecord, job_id)
            ledger.lock_project(session, job.project_id)
            session.refresh(job)
            if job.move_target != target or job.slurm_job_id is None:
                return False
            now = utcnow()
            old_cluster, old_id = job.cluster, job.slurm_job_id
            if job.cancel_requested_at is not None:
                transitions.settle(
                    session,
                    job,
                    JobState.CANCELLED,
                    charge_gpu_seconds=0,
                    lock=False,
                    reason=f"cancelled while moving; Slurm job {old_id} on {old_cluster} gone",
                )
                return False
            before = (job.cluster, job.reserved_gpu_seconds, ledger.held_gpus(job))
            was = ledger.Group.of(job)
            project = session.get_one(ProjectRecord, job.project_id)
            account = project.slurm_accounts.get(cluster_name)
            if directory is None or account is None:
                # The first Slurm job is gone: it goes back where it came from, at its old price.
                cluster_name, partition = old_cluster, job.partition
                account = job.account
                directory = output_dir(self._clusters.config(old_cluster), job.unix_user or "")
                quota = session.get(QuotaRecord, job.project_id)
                if quota is not None:
                    weight = weight_for(ledger.policy_of(quota), job.gpu_type)
                    price = reservation_gpu_seconds(job.gpus, job.time_limit_minutes, weight)
                    job.weight, job.reservation_gpu_seconds = weight, price
                    job.reserved_gpu_seconds = price
            config = self._clusters.config(cluster_name)
            waited = int((now - (job.in_slurm_since or job.submitted_at)).total_seconds())
            session.add(
                JobEventRecord(
                    job_id=job.id,
                    at=now,
                    from_state=job.state,
                    to_state=job.state,
                    reason=(
                        f"moved from {old_cluster}/{job.partition} (Slurm job {old_id} cancelled "
                        f"after {waited} s waiting for {job.state_reason}) to "
                        f"{cluster_name}/{partition}"
                    ),
                )
            )
            job.cluster, job.partition = cluster_name, partition
            job.gpu_type = config.gpu_type_of(partition)
            job.account = account
            job.stdout_path = f"{directory}/{job.id}.out"
            job.stderr_path = f"{directory}/{job.id}.err"
            job.moved_from_cluster, job.moved_from_slurm_job_id = old_cluster, old_id
            job.slurm_job_id = None
            job.state_reason = None
            job.move_target = None
            job.moves = 1
            job.missing_polls = 0
            job.release_claimed_at = now  # sbatch under way
            job.updated_at = now
            ledger.held_changed(session, job, cluster=before[0], reserved=before[1], gpus=before[2])
            ledger.regrouped(session, job.gpus, was, ledger.Group.of(job))
            return True

    # --- 4. submit on the target -----------------------------------------------------------------

    def _awaiting_sbatch(self, cluster: str) -> list[str]:
        """Moved jobs whose sbatch could not reach their new cluster: tried again."""
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(JobRecord.id).where(
                        JobRecord.cluster == cluster,
                        JobRecord.state == JobState.PENDING.value,
                        JobRecord.slurm_job_id.is_(None),
                        JobRecord.release_claimed_at.is_(None),
                        JobRecord.moves > 0,
                    )
                )
            )

    def _submit(self, job_id: str, fence: Fence | None = None) -> int:
        if fence is not None:  # a retry: claim it again first
            with self._write(fence) as session:
                job = session.get_one(JobRecord, job_id)
                if job.slurm_job_id is not None or job.release_claimed_at is not None:
                    return 0
                job.release_claimed_at = utcnow()
        assert self._jobs is not None, "Mover.attach(JobService) first"
        return 1 if self._jobs.submit_moved(job_id) is not None else 0
