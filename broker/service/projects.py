"""Projects, their members and quotas, and per-project usage."""

from __future__ import annotations

from sqlalchemy import bindparam, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.clock import utcnow
from broker.db.models import JobRecord, MembershipRecord, ProjectRecord, QuotaRecord, UserRecord
from broker.errors import Conflict, NotFound, ValidationFailed
from broker.lifecycle import JobState
from broker.schemas import (
    MemberPublic,
    MemberPut,
    ProjectCreate,
    ProjectPublic,
    ProjectQueuePublic,
    ProjectsPublic,
    QueuePut,
    QuotaPublic,
    QuotaPut,
    UsagePublic,
)
from broker.service import audit, ledger
from broker.service.identity import Actor, get_user_record, identity_changed
from quotas import budget_gpu_seconds, gpu_hours


def visible_project(session: Session, actor: Actor, name: str) -> ProjectRecord:
    """The project if the caller may see it; otherwise ``NotFound``, as if it did not exist."""
    project = session.scalar(_BY_NAME, {"name": name})
    if project is None or not (actor.reads_everything or project.id in actor.project_ids):
        raise NotFound(f"project {name} does not exist")
    return project


_BY_NAME = select(ProjectRecord).where(ProjectRecord.name == bindparam("name"))
"""Built once: a project by name."""


def locked_for_admission(
    connection: Connection, actor: Actor, name: str
) -> tuple[ProjectRecord, QuotaRecord | None]:
    """Take the project's ledger lock by its name if the caller may see it
    (``ledger.lock_project_named``), then read the project and its quota as they are under the
    lock: two statements, no ORM load. The records returned are plain transient objects to read
    from, not in any session. ``NotFound`` as ``visible_project``; a project the caller cannot
    see is never locked."""
    ledger.lock_project_named(
        connection, name, None if actor.reads_everything else actor.project_ids
    )
    row = connection.execute(_WITH_QUOTA, {"project": name}).first()
    if row is None or not (actor.reads_everything or row.id in actor.project_ids):
        raise NotFound(f"project {name} does not exist")
    values = row._mapping  # read by column, not by name: the two tables may share a name
    project = ProjectRecord(**{column.key: values[column] for column in _PROJECTS.columns})
    if values[_QUOTAS.c.project_id] is None:
        return project, None
    return project, QuotaRecord(**{column.key: values[column] for column in _QUOTAS.columns})


_PROJECTS, _QUOTAS = ProjectRecord.__table__, QuotaRecord.__table__
_WITH_QUOTA = (
    select(_PROJECTS, _QUOTAS)
    .outerjoin(_QUOTAS, _QUOTAS.c.project_id == _PROJECTS.c.id)
    .where(_PROJECTS.c.name == bindparam("project"))
)
"""Built once: every submission reads its project and quota so."""


def _quota_public(quota: QuotaRecord | None) -> QuotaPublic | None:
    if quota is None:
        return None
    return QuotaPublic(
        period_start=quota.period_start,
        period_end=quota.period_end,
        gpu_hours=gpu_hours(quota.budget_gpu_seconds),
        gpu_type_weights=dict(quota.gpu_type_weights),
        max_concurrent_gpus=quota.max_concurrent_gpus,
        max_concurrent_gpus_per_cluster=dict(quota.max_concurrent_gpus_per_cluster),
        max_gpus_per_job=quota.max_gpus_per_job,
        max_time_limit_minutes=quota.max_time_limit_minutes,
        max_pending_jobs=quota.max_pending_jobs,
        allowed_clusters=quota.allowed_clusters,
        allowed_partitions=quota.allowed_partitions,
        allowed_gpu_types=quota.allowed_gpu_types,
        updated_at=quota.updated_at,
    )


def _project_public(session: Session, project: ProjectRecord) -> ProjectPublic:
    members = dict(
        session.execute(
            select(UserRecord.name, MembershipRecord.role)
            .join(MembershipRecord, MembershipRecord.user_id == UserRecord.id)
            .where(MembershipRecord.project_id == project.id)
        ).all()
    )
    return ProjectPublic(
        name=project.name,
        description=project.description,
        slurm_accounts=dict(project.slurm_accounts),
        members=members,
        quota=_quota_public(session.get(QuotaRecord, project.id)),
        created_at=project.created_at,
    )


def create_project(
    session: Session, actor: Actor, body: ProjectCreate, known_clusters: set[str]
) -> ProjectPublic:
    actor.require_admin()
    unknown = sorted(set(body.slurm_accounts) - known_clusters)
    if unknown:
        raise ValidationFailed(
            f"unknown cluster(s) in slurm_accounts: {', '.join(unknown)}",
            [{"field": "slurm_accounts", "message": f"no cluster named {c}"} for c in unknown],
        )
    if session.scalar(select(ProjectRecord.id).where(ProjectRecord.name == body.name)):
        raise Conflict(f"project {body.name} already exists")
    project = ProjectRecord(
        name=body.name,
        description=body.description,
        slurm_accounts=dict(body.slurm_accounts),
        created_at=utcnow(),
        ledger_version=0,
    )
    session.add(project)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict(f"project {body.name} already exists") from exc
    audit.record(
        session,
        actor.name,
        "project.create",
        "project",
        body.name,
        {"slurm_accounts": dict(body.slurm_accounts)},
    )
    return _project_public(session, project)


def list_projects(session: Session, actor: Actor) -> ProjectsPublic:
    query = select(ProjectRecord).order_by(ProjectRecord.name)
    if not actor.reads_everything:
        query = query.where(ProjectRecord.id.in_(actor.project_ids))
    return ProjectsPublic(data=[_project_public(session, p) for p in session.scalars(query)])


def get_project(session: Session, actor: Actor, name: str) -> ProjectPublic:
    return _project_public(session, visible_project(session, actor, name))


def put_member(
    session: Session, actor: Actor, project_name: str, user_name: str, body: MemberPut
) -> MemberPublic:
    actor.require_admin()
    project = visible_project(session, actor, project_name)
    user = get_user_record(session, user_name)
    membership = session.get(MembershipRecord, (project.id, user.id))
    if membership is None:
        session.add(
            MembershipRecord(
                project_id=project.id, user_id=user.id, role=body.role, created_at=utcnow()
            )
        )
        identity_changed(session)
    else:
        membership.role = body.role
    audit.record(
        session,
        actor.name,
        "member.put",
        "project",
        project.name,
        {"user": user.name, "role": body.role},
    )
    return MemberPublic(project=project.name, user=user.name, role=body.role)


def remove_member(session: Session, actor: Actor, project_name: str, user_name: str) -> None:
    actor.require_admin()
    project = visible_project(session, actor, project_name)
    user = get_user_record(session, user_name)
    membership = session.get(MembershipRecord, (project.id, user.id))
    if membership is None:
        raise NotFound(f"{user_name} is not a member of {project_name}")
    session.delete(membership)
    identity_changed(session)
    audit.record(session, actor.name, "member.remove", "project", project.name, {"user": user.name})


def member_identity(
    session: Session, project_name: str, user_name: str
) -> tuple[dict[str, str], str | None]:
    """The project's Slurm accounts and the user's Unix account: what a membership change grants
    or revokes on the clusters."""
    project = session.scalar(select(ProjectRecord).where(ProjectRecord.name == project_name))
    user = get_user_record(session, user_name)
    accounts = {} if project is None else {k: str(v) for k, v in project.slurm_accounts.items()}
    return accounts, user.unix_user


def put_quota(session: Session, actor: Actor, project_name: str, body: QuotaPut) -> QuotaPublic:
    """Replace the project's quota. Running jobs are untouched; new jobs see the new limits."""
    actor.require_admin()
    project = visible_project(session, actor, project_name)
    ledger.lock_project(session, project.id)
    quota = session.get(QuotaRecord, project.id)
    period = None if quota is None else (quota.period_start, quota.period_end)
    values = {
        "period_start": body.period_start,
        "period_end": body.period_end,
        "budget_gpu_seconds": budget_gpu_seconds(body.gpu_hours),
        "gpu_type_weights": dict(body.gpu_type_weights),
        "max_concurrent_gpus": body.max_concurrent_gpus,
        "max_concurrent_gpus_per_cluster": dict(body.max_concurrent_gpus_per_cluster),
        "max_gpus_per_job": body.max_gpus_per_job,
        "max_time_limit_minutes": body.max_time_limit_minutes,
        "max_pending_jobs": body.max_pending_jobs,
        "allowed_clusters": body.allowed_clusters,
        "allowed_partitions": body.allowed_partitions,
        "allowed_gpu_types": body.allowed_gpu_types,
        "updated_at": utcnow(),
    }
    if quota is None:
        quota = QuotaRecord(project_id=project.id, **values)
        session.add(quota)
    else:
        for key, value in values.items():
            setattr(quota, key, value)
    session.flush()
    if period != (quota.period_start, quota.period_end):
        ledger.period_changed(session, project.id, quota)
    audit.record(
        session, actor.name, "quota.put", "project", project.name, body.model_dump(mode="json")
    )
    result = _quota_public(quota)
    assert result is not None
    return result


def put_queue(
    session: Session, actor: Actor, project_name: str, body: QueuePut
) -> ProjectQueuePublic:
    """Hold or release the project's admission queue (admin). A held queue keeps its jobs queued
    (new ones join it); released, they go to Slurm at the next poll cycle, in order."""
    actor.require_admin()
    project = visible_project(session, actor, project_name)
    ledger.lock_project(session, project.id)
    if project.queue_held != body.held:
        project.queue_held = body.held
        audit.record(
            session, actor.name, "queue.hold" if body.held else "queue.release", "project",
            project.name, {"held": body.held},
        )  # fmt: skip
    return queue_public(session, actor, project_name)


def queue_public(session: Session, actor: Actor, project_name: str) -> ProjectQueuePublic:
    project = visible_project(session, actor, project_name)
    jobs, gpus = session.execute(
        select(func.count(), func.coalesce(func.sum(ledger.HELD_GPUS), 0)).where(
            JobRecord.project_id == project.id, JobRecord.state == JobState.QUEUED.value
        )
    ).one()
    return ProjectQueuePublic(
        project=project.name, held=project.queue_held, queued_jobs=int(jobs), queued_gpus=int(gpus)
    )


def usage(session: Session, actor: Actor, project_name: str) -> UsagePublic:
    project = visible_project(session, actor, project_name)
    quota = session.get(QuotaRecord, project.id)
    snap = ledger.snapshot(session, project.id, quota)
    by_cluster: dict[str, int] = {}
    by_type: dict[str, int] = {}
    by_user_id: dict[int, int] = {}
    if quota is not None:
        by_cluster, by_type, by_user_id = ledger.used_breakdown(session, project.id, quota)
    names = dict(
        session.execute(
            select(UserRecord.id, UserRecord.name).where(UserRecord.id.in_(by_user_id))
        ).all()
    )
    budget = quota.budget_gpu_seconds if quota is not None else 0
    remaining = budget - snap.used_gpu_seconds - snap.reserved_gpu_seconds
    foreign = ledger.foreign_used(session, project.id) if quota is not None else 0
    return UsagePublic(
        project=project.name,
        period_start=quota.period_start if quota else None,
        period_end=quota.period_end if quota else None,
        budget_gpu_hours=gpu_hours(budget),
        used_gpu_hours=gpu_hours(snap.used_gpu_seconds),
        reserved_gpu_hours=gpu_hours(snap.reserved_gpu_seconds),
        remaining_gpu_hours=gpu_hours(remaining),
        concurrent_gpus=snap.live_gpus,
        by_cluster={k: gpu_hours(v) for k, v in by_cluster.items()},
        by_gpu_type={k: gpu_hours(v) for k, v in by_type.items()},
        by_user={names.get(k, str(k)): gpu_hours(v) for k, v in by_user_id.items()},
        foreign_gpu_hours=gpu_hours(foreign),
    )
