"""A project's quota ledger, derived from its job rows, and the lock that serialises admission.

Reserved = what the project's live jobs still hold, whenever they were submitted (a job admitted in
the last period and still running holds its reservation in this one). Used in a period = the part of
each finished job's charge that it ran inside the period (``quotas.periods``): a job that straddles
the period's start charges only what it ran after it, the rest stays with the period before.

Both are read from the job rows (``reserved_gpu_seconds``, ``charged_gpu_seconds``, ``started_at``,
``ended_at``), so the ledger cannot drift from the jobs. Jobs that ran wholly inside a window are
summed by the database; only the few whose run crosses one of its ends (at most the jobs that were
running at that instant) are read and split here, with the same exact arithmetic everywhere. Every
change to those columns happens in a transaction that first takes ``lock_project``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeAlias

from sqlalchemy import (
    ColumnElement,
    SQLColumnExpression,
    and_,
    case,
    false,
    func,
    literal_column,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session

from broker import lifecycle
from broker.db.models import ForeignJobRecord, JobRecord, ProjectRecord, QuotaRecord
from quotas import LedgerSnapshot, QuotaPolicy, charged_within

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


HELD_GPUS = JobRecord.gpus * func.coalesce(JobRecord.array_max_parallel, JobRecord.array_size, 1)
"""GPUs a live job may hold at once: its GPUs, times the tasks of an array that may run together."""

Bound: TypeAlias = datetime | SQLColumnExpression[datetime] | None
"""One end of a window: a time, a column holding one (a quota's period), or None for unbounded."""


def _charged(start: Bound, end: Bound) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """(ends_inside, split) for the window ``[start, end)``, mirroring ``quotas.periods``.

    ``split``: rows whose run reaches or crosses an end of the window; only these need
    ``charged_within``. Every other row (no start time, or a run on one side of each end) has
    its whole charge in the window when it ended inside it (``ends_inside``), else none.
    """
    job = JobRecord
    ends_inside = and_(
        true() if start is None else job.ended_at >= start,
        true() if end is None else job.ended_at < end,
    )
    reaches = [
        and_(job.started_at < bound, job.ended_at >= bound)
        for bound in (start, end)
        if bound is not None
    ]
    split = or_(*reaches) if reaches else false()
    return ends_inside, split


def _charged_rows(start: Bound) -> list[ColumnElement[bool]]:
    """Filters every row with a charge in a window from ``start`` on satisfies (index-friendly)."""
    where = [JobRecord.charged_gpu_seconds > 0]
    if start is not None:
        where.append(JobRecord.ended_at >= start)
    return where


def charges_within(
    session: Session,
    keys: Sequence[SQLColumnExpression[Any]],
    start: datetime | None,
    end: datetime | None,
    *where: ColumnElement[bool],
) -> dict[tuple[Any, ...], int]:
    """Weighted GPU-seconds charged in ``[start, end)`` (None: unbounded), by ``keys``.

    ``keys`` and ``where`` are expressions over ``JobRecord``. Groups with nothing charged in the
    window are absent.
    """
    ends_inside, split = _charged(start, end)
    whole = and_(ends_inside, or_(JobRecord.started_at.is_(None), not_(split)))
    base = [*_charged_rows(start), *where]
    totals: dict[tuple[Any, ...], int] = defaultdict(int)
    for *key, seconds in session.execute(
        select(*keys, func.sum(JobRecord.charged_gpu_seconds)).where(*base, whole).group_by(*keys)
    ):
        totals[tuple(key)] += int(seconds or 0)
    for *key, charge, started, ended in session.execute(
        select(
            *keys, JobRecord.charged_gpu_seconds, JobRecord.started_at, JobRecord.ended_at
        ).where(*base, split)
    ):
        part = (
            0
            if charge is None or ended is None
            else charged_within(charge, started, ended, start, end)
        )
        if part:
            totals[tuple(key)] += part
    return {key: seconds for key, seconds in totals.items() if seconds}


def current_periods(session: Session) -> dict[int, tuple[int, int]]:
    """(used, reserved) of every project with a quota, in its own quota's period, by project id.

    One pass over the jobs for all projects (for metrics): the database sums what lies wholly
    inside each period and what live jobs hold, and returns each job that crosses a period's end
    as a group of its own, to be split here.
    """
    start, end = QuotaRecord.period_start, QuotaRecord.period_end
    ends_inside, split = _charged(start, end)
    # "+ 0": a plain scan of the jobs; on SQLite an index walk with a lookup per row is slower.
    project_key = JobRecord.project_id + literal_column("0")
    charged = JobRecord.charged_gpu_seconds
    crossing = case((split, JobRecord.id), else_=None)
    totals: dict[int, tuple[int, int]] = {}
    crossing_ids: list[str] = []
    for project_id, job_id, used, reserved in session.execute(
        select(
            project_key,
            crossing,
            func.sum(case((ends_inside, charged), else_=0)),
            func.sum(
                case((JobRecord.state.in_(LIVE_STATES), JobRecord.reserved_gpu_seconds), else_=0)
            ),
        )
        .join(QuotaRecord, QuotaRecord.project_id == project_key)
        .group_by(project_key, crossing)
    ):
        if job_id is not None:
            crossing_ids.append(job_id)  # its share of the period is computed below
            used = 0
        was_used, was_reserved = totals.get(int(project_id), (0, 0))
        totals[int(project_id)] = (was_used + int(used or 0), was_reserved + int(reserved or 0))
    for project_id, charge, started, ended, period_start, period_end in session.execute(
        select(JobRecord.project_id, charged, JobRecord.started_at, JobRecord.ended_at, start, end)
        .join(QuotaRecord, QuotaRecord.project_id == JobRecord.project_id)
        .where(JobRecord.id.in_(crossing_ids))
    ):
        if charge is not None and ended is not None:
            part = charged_within(charge, started, ended, period_start, period_end)
            was_used, was_reserved = totals[project_id]
            totals[project_id] = (was_used + part, was_reserved)
    for project_id, foreign in session.execute(
        select(ForeignJobRecord.project_id, func.sum(ForeignJobRecord.charged_gpu_seconds))
        .join(QuotaRecord, QuotaRecord.project_id == ForeignJobRecord.project_id)
        .where(
            ForeignJobRecord.ended_at >= QuotaRecord.period_start,
            ForeignJobRecord.ended_at < QuotaRecord.period_end,
        )
        .group_by(ForeignJobRecord.project_id)
    ):
        was_used, was_reserved = totals.get(int(project_id), (0, 0))
        totals[int(project_id)] = (was_used + int(foreign or 0), was_reserved)
    return totals


def foreign_within(session: Session, project_id: int, start: datetime, end: datetime) -> int:
    """What the project's foreign jobs (``broker.service.foreign``) were charged in [start, end):
    a foreign job's whole charge counts in the period it ended in."""
    total = session.scalar(
        select(func.coalesce(func.sum(ForeignJobRecord.charged_gpu_seconds), 0)).where(
            ForeignJobRecord.project_id == project_id,
            ForeignJobRecord.ended_at >= start,
            ForeignJobRecord.ended_at < end,
        )
    )
    return int(total or 0)


def snapshot(session: Session, project_id: int, quota: QuotaRecord | None) -> LedgerSnapshot:
    """The project's ledger now. Call under ``lock_project`` when the result decides a change."""
    used = 0
    if quota is not None:
        used = sum(
            charges_within(
                session,
                [],
                quota.period_start,
                quota.period_end,
                JobRecord.project_id == project_id,
            ).values()
        )
        used += foreign_within(session, project_id, quota.period_start, quota.period_end)
    by_cluster: dict[str, int] = defaultdict(int)
    pending = 0
    reserved = 0
    for cluster, state, gpus, count, held in session.execute(
        select(
            JobRecord.cluster,
            JobRecord.state,
            func.sum(HELD_GPUS),
            func.count(),
            func.sum(JobRecord.reserved_gpu_seconds),
        )
        .where(JobRecord.project_id == project_id, JobRecord.state.in_(LIVE_STATES))
        .group_by(JobRecord.cluster, JobRecord.state)
    ):
        reserved += int(held or 0)
        if state == lifecycle.JobState.QUEUED.value:
            continue  # it holds its reservation, but waits for the limits below
        by_cluster[cluster] += int(gpus)
        if state in NOT_STARTED_STATES:
            pending += int(count)
    return LedgerSnapshot(
        used_gpu_seconds=used,
        reserved_gpu_seconds=reserved,
        live_gpus=sum(by_cluster.values()),
        live_gpus_by_cluster=dict(by_cluster),
        pending_jobs=pending,
    )


def used_breakdown(
    session: Session, project_id: int, quota: QuotaRecord
) -> tuple[dict[str, int], dict[str, int], dict[int, int]]:
    """Charged GPU-seconds of the current period by cluster, by GPU type and by user id."""
    charges = charges_within(
        session,
        [JobRecord.cluster, JobRecord.gpu_type, JobRecord.user_id],
        quota.period_start,
        quota.period_end,
        JobRecord.project_id == project_id,
    )
    by_cluster: dict[str, int] = defaultdict(int)
    by_type: dict[str, int] = defaultdict(int)
    by_user: dict[int, int] = defaultdict(int)
    for (cluster, gpu_type, user_id), seconds in charges.items():
        by_cluster[cluster] += seconds
        by_type[gpu_type] += seconds
        by_user[user_id] += seconds
    return dict(by_cluster), dict(by_type), dict(by_user)
