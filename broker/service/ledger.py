"""A project's quota ledger, derived from its job rows, and the lock that serialises admission.

Used = charges of jobs submitted in the current period; reserved = what live jobs still hold.
Both are sums over job rows, so the ledger cannot drift from the jobs. Every change to those
columns happens in a transaction that first takes ``lock_project``.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from sqlalchemy import ColumnElement, and_, func, select, update
from sqlalchemy.orm import Session

from broker import lifecycle
from broker.db.models import JobRecord, ProjectRecord, QuotaRecord
from quotas import LedgerSnapshot, QuotaPolicy

LIVE_STATES = lifecycle.values(lifecycle.LIVE)
NOT_STARTED_STATES = lifecycle.values(lifecycle.NOT_STARTED)


def lock_project(session: Session, project_id: int) -> None:
    """Take the project's ledger lock for the rest of the transaction.

    An UPDATE as the transaction's first write takes a row lock on PostgreSQL (like SELECT ... FOR
    UPDATE) and the database write lock on SQLite, so concurrent admissions queue here instead of
    each reading a ledger the other is about to change.
    """
    session.execute(
        update(ProjectRecord)
        .where(ProjectRecord.id == project_id)
        .values(ledger_version=ProjectRecord.ledger_version + 1)
    )


def policy_of(quota: QuotaRecord) -> QuotaPolicy:
    return QuotaPolicy(
        budget_gpu_seconds=quota.budget_gpu_seconds,
        gpu_type_weights=dict(quota.gpu_type_weights),
        max_concurrent_gpus=quota.max_concurrent_gpus,
        max_concurrent_gpus_per_cluster={
            k: int(v) for k, v in quota.max_concurrent_gpus_per_cluster.items()
        },
        max_gpus_per_job=quota.max_gpus_per_job,
        max_time_limit_minutes=quota.max_time_limit_minutes,
        max_pending_jobs=quota.max_pending_jobs,
        allowed_clusters=_frozen(quota.allowed_clusters),
        allowed_partitions=_frozen(quota.allowed_partitions),
        allowed_gpu_types=_frozen(quota.allowed_gpu_types),
    )


def _frozen(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


def _in_period(start: datetime, end: datetime) -> ColumnElement[bool]:
    return and_(JobRecord.submitted_at >= start, JobRecord.submitted_at < end)


def snapshot(session: Session, project_id: int, quota: QuotaRecord | None) -> LedgerSnapshot:
    """The project's ledger now. Call under ``lock_project`` when the result decides a change."""
    used: int | None = 0
    reserved: int | None = 0
    if quota is not None:
        used, reserved = session.execute(
            select(
                func.coalesce(func.sum(JobRecord.charged_gpu_seconds), 0),
                func.coalesce(func.sum(JobRecord.reserved_gpu_seconds), 0),
            ).where(
                JobRecord.project_id == project_id,
                _in_period(quota.period_start, quota.period_end),
            )
        ).one()
    by_cluster: dict[str, int] = defaultdict(int)
    pending = 0
    for cluster, state, gpus, count in session.execute(
        select(JobRecord.cluster, JobRecord.state, func.sum(JobRecord.gpus), func.count())
        .where(JobRecord.project_id == project_id, JobRecord.state.in_(LIVE_STATES))
        .group_by(JobRecord.cluster, JobRecord.state)
    ):
        by_cluster[cluster] += int(gpus)
        if state in NOT_STARTED_STATES:
            pending += int(count)
    return LedgerSnapshot(
        used_gpu_seconds=int(used or 0),
        reserved_gpu_seconds=int(reserved or 0),
        live_gpus=sum(by_cluster.values()),
        live_gpus_by_cluster=dict(by_cluster),
        pending_jobs=pending,
    )


def used_breakdown(
    session: Session, project_id: int, quota: QuotaRecord
) -> tuple[dict[str, int], dict[str, int], dict[int, int]]:
    """Charged GPU-seconds of the current period by cluster, by GPU type and by user id."""
    rows = session.execute(
        select(
            JobRecord.cluster,
            JobRecord.gpu_type,
            JobRecord.user_id,
            func.sum(JobRecord.charged_gpu_seconds),
        )
        .where(
            JobRecord.project_id == project_id,
            JobRecord.charged_gpu_seconds.is_not(None),
            _in_period(quota.period_start, quota.period_end),
        )
        .group_by(JobRecord.cluster, JobRecord.gpu_type, JobRecord.user_id)
    )
    by_cluster: dict[str, int] = defaultdict(int)
    by_type: dict[str, int] = defaultdict(int)
    by_user: dict[int, int] = defaultdict(int)
    for cluster, gpu_type, user_id, total in rows:
        seconds = int(total or 0)
        by_cluster[cluster] += seconds
        by_type[gpu_type] += seconds
        by_user[user_id] += seconds
    return dict(by_cluster), dict(by_type), dict(by_user)
