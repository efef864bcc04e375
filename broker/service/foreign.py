"""Foreign jobs: jobs in a project's Slurm account that the broker did not submit.

A researcher's job runs as the researcher, whose association lets Slurm accept any job they submit
into their project's account, so a script can call ``sbatch`` itself and get GPUs the broker never
admitted. The poller sees every job of the projects' accounts in its one squeue per cycle
(``statuses(..., accounts=)``); a job there that carries no tag of a broker job is foreign. Per
``[identity] foreign_jobs`` it is cancelled within that cycle (the default) or only charged; either
way it is audited, counted (``broker_foreign_jobs_total``) and, once it ended, charged to the
project from its sacct record (``foreign_gpu_hours`` in the project's usage).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.slurm.types import JobStatus, StatusReport
from broker.clock import utcnow
from broker.config import ClusterSettings
from broker.db.models import ForeignJobRecord, JobRecord, ProjectRecord, QuotaRecord
from broker.service import audit, ledger
from quotas import charge_gpu_seconds, weight_for

log = logging.getLogger(__name__)

MISSING_POLLS_BEFORE_CLOSED = 30
"""Cycles a foreign job may be unknown to both squeue and sacct before it is closed uncharged."""


@dataclass
class ForeignWork:
    """What a cycle found and must still do on the cluster once its transaction committed."""

    detected: list[tuple[str, str]] = field(default_factory=list)
    """(Slurm job id, action) of foreign jobs seen for the first time."""
    cancel: list[tuple[str, str | None]] = field(default_factory=list)
    """(Slurm job id, Unix user) to scancel: new ones, and earlier ones that still run."""


def managed_accounts(session: Session, cluster: str) -> dict[str, int]:
    """Every project's Slurm account on ``cluster``, to the project's id."""
    accounts: dict[str, int] = {}
    for project_id, slurm_accounts in session.execute(
        select(ProjectRecord.id, ProjectRecord.slurm_accounts)
    ):
        account = (slurm_accounts or {}).get(cluster)
        if account:
            accounts[str(account)] = int(project_id)
    return accounts


def open_ids(session: Session, cluster: str) -> set[str]:
    """Slurm ids of foreign jobs not charged yet: the cycle asks about them too."""
    return set(
        session.scalars(
            select(ForeignJobRecord.slurm_job_id).where(
                ForeignJobRecord.cluster == cluster,
                ForeignJobRecord.charged_gpu_seconds.is_(None),
            )
        )
    )


def apply(
    session: Session,
    cluster: ClusterSettings,
    action: str,
    status: StatusReport,
    accounts: dict[str, int],
) -> ForeignWork:
    """Record new foreign jobs, follow and charge the open ones; in the caller's transaction."""
    work = ForeignWork()
    name = cluster.name
    # A job carrying the tag of one of the broker's own jobs is that job (still being submitted,
    # or ended and not followed any more), unless the broker job already has another Slurm id:
    # then the tag was copied onto a job of the researcher's own.
    tags = {job.tag for job in status.others if job.tag}
    ours: dict[str, str | None] = dict(
        session.execute(
            select(JobRecord.tag, JobRecord.slurm_job_id).where(
                JobRecord.cluster == name, JobRecord.tag.in_(tags)
            )
        ).all()
    )
    # A moved job leaves its first Slurm job here, cancelled before it ran
    # (``broker.service.moves``), in squeue for a while: that one, by its exact id, is the
    # broker's too, whether the job went elsewhere or came back here.
    left_here: dict[str, str | None] = dict(
        session.execute(
            select(JobRecord.tag, JobRecord.moved_from_slurm_job_id).where(
                JobRecord.moved_from_cluster == name, JobRecord.tag.in_(tags)
            )
        ).all()
    )

    def is_ours(job: JobStatus) -> bool:
        if job.tag in ours and ours[job.tag] in (None, job.job_id):
            return True
        # Ended without running, as the mover saw it: one that ran is foreign, whatever its id.
        return left_here.get(job.tag or "") == job.job_id and job.ended and not job.elapsed_s

    known = {
        row.slurm_job_id: row
        for row in session.scalars(
            select(ForeignJobRecord).where(
                ForeignJobRecord.cluster == name,
                ForeignJobRecord.charged_gpu_seconds.is_(None),
            )
        )
    }
    unknown = [
        job.job_id
        for job in status.others
        if job.account in accounts and not is_ours(job) and job.job_id not in known
    ]
    closed = _closed(session, name, unknown)
    for job in status.others:
        if job.account not in accounts:
            continue
        if is_ours(job):
            continue
        row = known.get(job.job_id)
        if row is None:
            if job.job_id in closed:
                continue
            row = _record(session, cluster, action, job, accounts[job.account])
            known[job.job_id] = row
            work.detected.append((job.job_id, action))
        if action == "cancel" and not job.ended:
            work.cancel.append((job.job_id, row.unix_user))
        row.slurm_state = job.state
    new = {job_id for job_id, _ in work.detected}
    for slurm_job_id, row in sorted(known.items()):
        found = status.found.get(slurm_job_id)
        if slurm_job_id in new:
            continue
        if found is None:
            row.missing_polls += 1
            if row.missing_polls >= MISSING_POLLS_BEFORE_CLOSED:
                log.warning("foreign job %s on %s vanished; closed uncharged", slurm_job_id, name)
                row.charged_gpu_seconds = 0
            continue
        row.missing_polls = 0
        row.slurm_state = found.state
        if found.ended and found.source == "sacct" and found.end_time is not None:
            _charge(session, row, found)
        elif not found.ended and row.action == "cancel":
            work.cancel.append((slurm_job_id, row.unix_user))  # the earlier scancel failed
    if work.detected:
        log.warning(
            "foreign jobs on %s: %s",
            name,
            ", ".join(f"{job_id} ({what})" for job_id, what in work.detected),
        )
    return work


def _closed(session: Session, cluster: str, slurm_job_ids: list[str]) -> set[str]:
    """Those of ``slurm_job_ids`` already recorded (and closed) as foreign jobs, in one query per
    thousand ids."""
    closed: set[str] = set()
    for offset in range(0, len(slurm_job_ids), 1000):
        closed.update(
            session.scalars(
                select(ForeignJobRecord.slurm_job_id).where(
                    ForeignJobRecord.cluster == cluster,
                    ForeignJobRecord.slurm_job_id.in_(slurm_job_ids[offset : offset + 1000]),
                )
            )
        )
    return closed


def _record(
    session: Session, cluster: ClusterSettings, action: str, job: JobStatus, project_id: int
) -> ForeignJobRecord:
    gpu_type = None
    if job.partition is not None and job.partition in cluster.partitions:
        gpu_type = cluster.gpu_type_of(job.partition)
    row = ForeignJobRecord(
        cluster=cluster.name,
        slurm_job_id=job.job_id,
        project_id=project_id,
        account=job.account or "",
        unix_user=job.user,
        name=(job.name or "")[:128] or None,
        gpu_type=gpu_type,
        action=action,
        slurm_state=job.state,
        seen_at=utcnow(),
        started_at=job.start_time,
        missing_polls=0,
    )
    session.add(row)
    project = session.get_one(ProjectRecord, project_id)
    audit.record(
        session,
        "poller",
        f"foreign_job.{action}",
        "job",
        f"{cluster.name}/{job.job_id}",
        {
            "project": project.name,
            "account": job.account,
            "unix_user": job.user,
            "name": job.name,
            "gpus": job.alloc_gpus,
            "state": job.state,
        },
    )
    return row


def _charge(session: Session, row: ForeignJobRecord, record: JobStatus) -> None:
    """Charge an ended foreign job what sacct says it used, under the project's ledger lock."""
    ledger.lock_project(session, row.project_id)
    quota = session.get(QuotaRecord, row.project_id)
    weight = 1.0
    if quota is not None and row.gpu_type is not None:
        weight = weight_for(ledger.policy_of(quota), row.gpu_type)
    started = record.start_time
    elapsed = 0 if started is None else (record.elapsed_s or 0)
    alloc = record.alloc_gpus or 0
    before = ledger.Charge.of(row)
    row.alloc_gpus, row.elapsed_s = alloc, elapsed
    row.started_at = row.started_at or started
    row.ended_at = record.end_time
    row.charged_gpu_seconds = charge_gpu_seconds(alloc, elapsed, weight)
    ledger.foreign_charged(session, row, before)
    log.info(
        "foreign job %s on %s (%s) charged %d GPU-s",
        row.slurm_job_id,
        row.cluster,
        row.account,
        row.charged_gpu_seconds,
    )
