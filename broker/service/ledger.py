"""A project's quota ledger: running totals kept with the job rows, and the lock that serialises
admission.

Reserved = what the project's live jobs still hold, whenever they were submitted (a job admitted in
the last period and still running holds its reservation in this one). Used in a period = the part of
each finished job's charge that it ran inside the period (``quotas.periods``): a job that straddles
the period's start charges only what it ran after it, the rest stays with the period before; plus
the whole charge of each foreign job that ended inside it.

The job rows (``reserved_gpu_seconds``, ``charged_gpu_seconds``, ``started_at``, ``ended_at``) and
foreign job rows define the ledger. Reading it from them costs a pass over every job that ended in
the period, so it is also kept as totals (``ledger_used`` for the quota's current period by
cluster, GPU type and user; ``ledger_live`` for reservations and GPUs held, by cluster;
``job_totals`` for jobs by project, cluster, GPU type and state, which /metrics reads). Every
change to those columns calls one of the functions here in the same transaction, under
``lock_project``: ``admitted``, ``settled``, ``charge_corrected``, ``foreign_charged``, and
``period_changed`` when a quota gets a new period (which rebuilds that period's totals from the
rows). A live job's move from one state, cluster or GPU type to another calls ``regrouped``, which
needs no lock: it touches its two ``job_totals`` rows in a fixed order, and the poller's
transaction of one cluster touches no other cluster's rows. ``recompute`` derives the totals from
the rows again, the same exact arithmetic everywhere; ``check`` compares the two.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias, cast

from sqlalchemy import (
    ColumnElement,
    Select,
    SQLColumnExpression,
    Table,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    insert,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from broker import lifecycle
from broker.db.models import (
    ForeignJobRecord,
    JobRecord,
    JobTotalRecord,
    LedgerLiveRecord,
    LedgerUsedRecord,
    ProjectRecord,
    QuotaRecord,
)
from quotas import LedgerSnapshot, QuotaPolicy, charged_within

LIVE_STATES = lifecycle.values(lifecycle.LIVE)
FINAL_STATES = lifecycle.values(lifecycle.FINAL)
NOT_STARTED_STATES = lifecycle.values(lifecycle.NOT_STARTED)


def lock_project(session: Executor, project_id: int) -> None:
    """Take the project's ledger lock for the rest of the transaction.

    An UPDATE as the transaction's first write takes a row lock on PostgreSQL (like SELECT ... FOR
    UPDATE) and the database write lock on SQLite, so concurrent admissions queue here instead of
    each reading a ledger the other is about to change.
    """
    session.execute(_LOCK, {"project_id": project_id})


def lock_project_named(executor: Executor, name: str, visible: Collection[int] | None) -> None:
    """``lock_project`` by the project's name, before its id is known; only if its id is in
    ``visible`` (None: any project), so that a caller never takes, nor waits for, the lock of a
    project it cannot see. Locks nothing when no such project exists."""
    if visible is None:
        executor.execute(_LOCK_NAMED, {"project": name})
    else:
        executor.execute(_LOCK_NAMED_VISIBLE, {"project": name, "visible": sorted(visible)})


_BUMP = (
    update(ProjectRecord)
    .values(ledger_version=ProjectRecord.ledger_version + 1)
    # Nothing in the session reads the counter: no evaluation of it on loaded projects.
    .execution_options(synchronize_session=False)
)
_LOCK = _BUMP.where(ProjectRecord.id == bindparam("project_id"))
_LOCK_NAMED = _BUMP.where(ProjectRecord.name == bindparam("project"))
_LOCK_NAMED_VISIBLE = _LOCK_NAMED.where(ProjectRecord.id.in_(bindparam("visible", expanding=True)))
"""Built once: one of them runs in every admission."""


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


Executor: TypeAlias = Session | Connection
"""Where a statement runs: a session, or its connection where nothing in the session is unflushed
(the admission path: a statement through the session costs about twice its CPU)."""

FOREIGN_USER = 0
"""``ledger_used.user_id`` of foreign jobs' charges (user ids start at 1)."""


# --- reading the totals ------------------------------------------------------------------------


def snapshot(session: Executor, project_id: int, quota: QuotaRecord | None) -> LedgerSnapshot:
    """The project's ledger now. Call under ``lock_project`` when the result decides a change.

    A handful of total rows, plus a count of the project's jobs not started yet (an index range
    over its live jobs, which ``max_pending_jobs`` bounds). Through a connection, that count sees
    only what the session has flushed.
    """
    used, pending, queued = session.execute(_USED_AND_PENDING, {"project_id": project_id}).one()
    if quota is None:
        used = 0
    by_cluster: dict[str, int] = {}
    reserved = 0
    for cluster, held, gpus in session.execute(_LIVE_ROWS, {"project_id": project_id}):
        reserved += int(held)
        if gpus:
            by_cluster[cluster] = int(gpus)
    return LedgerSnapshot(
        used_gpu_seconds=int(used or 0),
        reserved_gpu_seconds=reserved,
        live_gpus=sum(by_cluster.values()),
        live_gpus_by_cluster=by_cluster,
        pending_jobs=int(pending or 0),
        queued_jobs=int(queued or 0),
    )


_USED_AND_PENDING = select(
    select(func.coalesce(func.sum(LedgerUsedRecord.used_gpu_seconds), 0))
    .where(LedgerUsedRecord.project_id == bindparam("project_id"))
    .scalar_subquery(),
    select(func.count())
    .select_from(JobRecord)
    .where(
        JobRecord.project_id == bindparam("project_id"),
        JobRecord.state.in_(NOT_STARTED_STATES),
    )
    .scalar_subquery(),
    select(func.count())
    .select_from(JobRecord)
    .where(
        JobRecord.project_id == bindparam("project_id"),
        JobRecord.state == lifecycle.JobState.QUEUED.value,
    )
    .scalar_subquery(),
)
"""The period's use, the count of jobs not started yet and of those in the broker's queue, in one
round trip (two index ranges over the project's live jobs)."""

_LIVE_ROWS = select(
    LedgerLiveRecord.cluster, LedgerLiveRecord.reserved_gpu_seconds, LedgerLiveRecord.live_gpus
).where(LedgerLiveRecord.project_id == bindparam("project_id"))


def used_breakdown(
    session: Session, project_id: int, quota: QuotaRecord
) -> tuple[dict[str, int], dict[str, int], dict[int, int]]:
    """Charged GPU-seconds of the current period by cluster, by GPU type and by user id (the
    broker's own jobs; foreign jobs are ``foreign_used``)."""
    by_cluster: dict[str, int] = defaultdict(int)
    by_type: dict[str, int] = defaultdict(int)
    by_user: dict[int, int] = defaultdict(int)
    for cluster, gpu_type, user_id, seconds in session.execute(
        select(
            LedgerUsedRecord.cluster,
            LedgerUsedRecord.gpu_type,
            LedgerUsedRecord.user_id,
            LedgerUsedRecord.used_gpu_seconds,
        ).where(
            LedgerUsedRecord.project_id == project_id,
            LedgerUsedRecord.user_id != FOREIGN_USER,
            LedgerUsedRecord.used_gpu_seconds != 0,
        )
    ):
        by_cluster[cluster] += int(seconds)
        by_type[gpu_type] += int(seconds)
        by_user[user_id] += int(seconds)
    return dict(by_cluster), dict(by_type), dict(by_user)


def foreign_used(session: Session, project_id: int) -> int:
    """What the project's foreign jobs were charged in its quota's current period."""
    total = session.scalar(
        select(func.coalesce(func.sum(LedgerUsedRecord.used_gpu_seconds), 0)).where(
            LedgerUsedRecord.project_id == project_id,
            LedgerUsedRecord.user_id == FOREIGN_USER,
        )
    )
    return int(total or 0)


def current_periods(session: Session) -> dict[int, tuple[int, int]]:
    """(used, reserved) of every project with a quota, in its own quota's period, by project id:
    two small aggregates over the totals, whatever the number of jobs."""
    totals: dict[int, tuple[int, int]] = {}
    for (project_id,) in session.execute(select(QuotaRecord.project_id)):
        totals[int(project_id)] = (0, 0)
    for project_id, used in session.execute(
        select(LedgerUsedRecord.project_id, func.sum(LedgerUsedRecord.used_gpu_seconds)).group_by(
            LedgerUsedRecord.project_id
        )
    ):
        if int(project_id) in totals:
            totals[int(project_id)] = (int(used or 0), 0)
    for project_id, reserved in session.execute(
        select(
            LedgerLiveRecord.project_id, func.sum(LedgerLiveRecord.reserved_gpu_seconds)
        ).group_by(LedgerLiveRecord.project_id)
    ):
        if int(project_id) in totals:
            used, _ = totals[int(project_id)]
            totals[int(project_id)] = (used, int(reserved or 0))
    return totals


# --- keeping the totals ------------------------------------------------------------------------


def _add(executor: Executor, table: Table, key: dict[str, Any], **deltas: int) -> None:
    """Add ``deltas`` to the total row at ``key``, creating it (from zero) if it is missing."""
    if not any(deltas.values()):
        return
    if isinstance(executor, Connection):
        dialect = executor.dialect.name
    else:
        dialect = executor.get_bind().dialect.name
    shape = (dialect, table.name, tuple(key), tuple(deltas))
    statement = _UPSERTS.get(shape)
    if statement is None:
        statement = _upsert(dialect, table, tuple(key), tuple(deltas))
        _UPSERTS[shape] = statement
    executor.execute(statement, {**key, **deltas})


_UPSERTS: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], Any] = {}
"""The upserts of ``_add`` by dialect, table and the names they set, built once each."""


def _upsert(dialect: str, table: Table, key: tuple[str, ...], deltas: tuple[str, ...]) -> Any:
    """INSERT the row at ``key`` with ``deltas``, or add them to the row already there."""
    dialect_insert = _DIALECT_INSERTS.get(dialect)
    if dialect_insert is None:  # pragma: no cover - the broker supports the two below
        raise NotImplementedError(dialect)
    statement = dialect_insert(table).values({name: bindparam(name) for name in (*key, *deltas)})
    update_set = {name: table.c[name] + statement.excluded[name] for name in deltas}
    return statement.on_conflict_do_update(index_elements=list(key), set_=update_set)


_DIALECT_INSERTS: dict[str, Any] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
"""The INSERT with ON CONFLICT of each database the broker supports."""


_USED = cast(Table, LedgerUsedRecord.__table__)
_LIVE = cast(Table, LedgerLiveRecord.__table__)
_GROUPS = cast(Table, JobTotalRecord.__table__)


@dataclass(frozen=True, slots=True, order=True)
class Group:
    """Where a job is counted in ``job_totals``."""

    project_id: int
    cluster: str
    gpu_type: str
    state: str

    @classmethod
    def of(cls, job: JobRecord) -> Group:
        return cls(job.project_id, job.cluster, job.gpu_type, job.state)

    def key(self) -> dict[str, Any]:
        return {
            "project_id": self.project_id,
            "cluster": self.cluster,
            "gpu_type": self.gpu_type,
            "state": self.state,
        }


def regrouped(executor: Executor, gpus: int, before: Group | None, after: Group | None) -> None:
    """A job of ``gpus`` GPUs left the live group ``before`` for ``after`` (``None``: it was not
    counted, or is not any more: a new job, a settled one; a final group's count is ``settled``'s).
    The two rows are touched in one fixed order (``Group``'s), so that two such changes in
    concurrent transactions cannot each hold the row the other waits for."""
    if before == after:
        return
    changes = [(group, 1 if group is after else -1) for group in (before, after) if group]
    # Not a reason to flush the job's row: the caller may change it further, in one UPDATE.
    with executor.no_autoflush if isinstance(executor, Session) else nullcontext():
        for group, sign in sorted(changes):
            if group.state in LIVE_STATES:
                _add(executor, _GROUPS, group.key(), jobs=sign, gpus=sign * gpus)


@dataclass(frozen=True, slots=True)
class Charge:
    """The columns of a job (or foreign job) that decide its part of a period's use."""

    charged: int | None
    started: datetime | None
    ended: datetime | None

    @classmethod
    def of(cls, row: JobRecord | ForeignJobRecord) -> Charge:
        return cls(row.charged_gpu_seconds, row.started_at, row.ended_at)

    def within(self, quota: QuotaRecord) -> int:
        """The job's part of ``quota``'s period."""
        if self.charged is None or self.ended is None:
            return 0
        return charged_within(
            self.charged, self.started, self.ended, quota.period_start, quota.period_end
        )

    def foreign_within(self, quota: QuotaRecord) -> int:
        """A foreign job's: its whole charge, in the period it ended in."""
        if self.charged is None or self.ended is None:
            return 0
        return self.charged if quota.period_start <= self.ended < quota.period_end else 0


def held_gpus(job: JobRecord) -> int:
    """GPUs a live job counts against the concurrency limits: its GPUs, times the tasks of an
    array that may run together; none while it waits in the broker's queue (``queued``)."""
    if job.state == lifecycle.JobState.QUEUED.value:
        return 0
    return job.gpus * (job.array_max_parallel or job.array_size or 1)


def admitted(session: Executor, job: JobRecord) -> None:
    """A new live job holds its reservation and GPUs, and is counted in its group. Under
    ``lock_project``."""
    _hold(session, job)
    regrouped(session, job.gpus, None, Group.of(job))


def _hold(session: Executor, job: JobRecord) -> None:
    _add(
        session,
        _LIVE,
        {"project_id": job.project_id, "cluster": job.cluster},
        reserved_gpu_seconds=job.reserved_gpu_seconds,
        live_gpus=held_gpus(job),
    )


def held_changed(
    session: Session, job: JobRecord, *, cluster: str, reserved: int, gpus: int
) -> None:
    """A live job's share of the live totals changed: it held ``reserved`` GPU-seconds and
    ``gpus`` GPUs on ``cluster`` before (it left the queue, was re-priced or moved). Under
    ``lock_project``."""
    if cluster == job.cluster:
        _add(
            session,
            _LIVE,
            {"project_id": job.project_id, "cluster": job.cluster},
            reserved_gpu_seconds=job.reserved_gpu_seconds - reserved,
            live_gpus=held_gpus(job) - gpus,
        )
        return
    _add(
        session,
        _LIVE,
        {"project_id": job.project_id, "cluster": cluster},
        reserved_gpu_seconds=-reserved,
        live_gpus=-gpus,
    )
    _hold(session, job)


def settled(
    session: Session,
    job: JobRecord,
    released: int,
    before: Charge,
    held: int | None = None,
    *,
    was: Group,
) -> None:
    """``job`` has just become final, giving back ``released`` GPU-seconds of reservation and
    the ``held`` GPUs it counted while live (``held_gpus`` before it ended), its charge columns
    changed from ``before``; it leaves its live group ``was``. Under ``lock_project``."""
    regrouped(session, job.gpus, was, None)
    _add(
        session,
        _LIVE,
        {"project_id": job.project_id, "cluster": job.cluster},
        reserved_gpu_seconds=-released,
        live_gpus=-(job.gpus if held is None else held),
    )
    _charge_changed(session, job, before)
    gpu_seconds = (
        job.alloc_gpus * job.elapsed_s
        if job.alloc_gpus is not None and job.elapsed_s is not None
        else 0
    )
    _add(
        session,
        _GROUPS,
        {
            "project_id": job.project_id,
            "cluster": job.cluster,
            "gpu_type": job.gpu_type,
            "state": job.state,
        },
        jobs=1,
        gpus=job.gpus,
        charged_gpu_seconds=job.charged_gpu_seconds or 0,
        gpu_seconds=gpu_seconds,
    )


def charge_corrected(session: Session, job: JobRecord, before: Charge) -> None:
    """A finished job's charge changed from ``before`` (sacct's later record). Under the lock."""
    _charge_changed(session, job, before)
    _add(
        session,
        _GROUPS,
        {
            "project_id": job.project_id,
            "cluster": job.cluster,
            "gpu_type": job.gpu_type,
            "state": job.state,
        },
        charged_gpu_seconds=(job.charged_gpu_seconds or 0) - (before.charged or 0),
    )


def _charge_changed(session: Session, job: JobRecord, before: Charge) -> None:
    quota = session.get(QuotaRecord, job.project_id)
    if quota is None:
        return  # no period, nothing used; a quota's first period is built from the rows
    delta = Charge.of(job).within(quota) - before.within(quota)
    _add(
        session,
        _USED,
        {
            "project_id": job.project_id,
            "cluster": job.cluster,
            "gpu_type": job.gpu_type,
            "user_id": job.user_id,
        },
        used_gpu_seconds=delta,
    )


def foreign_charged(session: Session, row: ForeignJobRecord, before: Charge) -> None:
    """A foreign job's charge columns changed from ``before``. Under ``lock_project``."""
    quota = session.get(QuotaRecord, row.project_id)
    if quota is None:
        return
    delta = Charge.of(row).foreign_within(quota) - before.foreign_within(quota)
    _add(
        session,
        _USED,
        {
            "project_id": row.project_id,
            "cluster": row.cluster,
            "gpu_type": "",
            "user_id": FOREIGN_USER,
        },
        used_gpu_seconds=delta,
    )


def period_changed(session: Session, project_id: int, quota: QuotaRecord) -> None:
    """The project's quota has a new period: its use is rebuilt from the rows (the jobs that
    ended since the period's start, by index). Under ``lock_project``, once the quota is flushed.
    """
    session.execute(delete(LedgerUsedRecord).where(LedgerUsedRecord.project_id == project_id))
    rows = [
        {
            "project_id": project_id,
            "cluster": cluster,
            "gpu_type": gpu_type,
            "user_id": user_id,
            "used_gpu_seconds": seconds,
        }
        for (cluster, gpu_type, user_id), seconds in recompute_used(
            session, project_id, quota
        ).items()
    ]
    if rows:
        session.execute(insert(LedgerUsedRecord), rows)


# --- recomputing them from the rows -------------------------------------------------------------


def recompute_used(
    session: Session, project_id: int, quota: QuotaRecord
) -> dict[tuple[str, str, int], int]:
    """``ledger_used`` of the project, from its job and foreign job rows."""
    used: dict[tuple[str, str, int], int] = {
        (str(cluster), str(gpu_type), int(user_id)): seconds
        for (cluster, gpu_type, user_id), seconds in charges_within(
            session,
            [JobRecord.cluster, JobRecord.gpu_type, JobRecord.user_id],
            quota.period_start,
            quota.period_end,
            JobRecord.project_id == project_id,
        ).items()
    }
    for cluster, seconds in session.execute(
        select(ForeignJobRecord.cluster, func.sum(ForeignJobRecord.charged_gpu_seconds))
        .where(
            ForeignJobRecord.project_id == project_id,
            ForeignJobRecord.ended_at >= quota.period_start,
            ForeignJobRecord.ended_at < quota.period_end,
        )
        .group_by(ForeignJobRecord.cluster)
    ):
        if seconds:
            used[(str(cluster), "", FOREIGN_USER)] = int(seconds)
    return used


@dataclass(frozen=True, slots=True)
class Totals:
    """Every total of the ledger, keyed as its table (zero entries left out)."""

    used: dict[tuple[int, str, str, int], int]
    live: dict[tuple[int, str], tuple[int, int]]
    groups: dict[tuple[int, str, str, str], tuple[int, int, int, int]]
    """``job_totals``: jobs, GPUs, charged and allocated GPU-seconds; for a live group the jobs
    and GPUs only (what a live array has been charged so far is read from its row)."""


def job_groups(states: Sequence[str]) -> Select[*tuple[Any, ...]]:
    """Jobs in ``states`` by project, cluster, GPU type and state: count, GPUs, charged
    GPU-seconds and allocated GPU-seconds (what ``job_totals`` keeps for the final ones)."""
    return (
        select(
            JobRecord.project_id,
            JobRecord.cluster,
            JobRecord.gpu_type,
            JobRecord.state,
            func.count(),
            func.coalesce(func.sum(JobRecord.gpus), 0),
            func.coalesce(func.sum(JobRecord.charged_gpu_seconds), 0),
            func.coalesce(func.sum(JobRecord.alloc_gpus * JobRecord.elapsed_s), 0),
        )
        .where(JobRecord.state.in_(states))
        .group_by(JobRecord.project_id, JobRecord.cluster, JobRecord.gpu_type, JobRecord.state)
    )


def recompute(session: Session) -> Totals:
    """The totals as the job and foreign job rows define them (a pass over every job)."""
    used: dict[tuple[int, str, str, int], int] = {}
    for quota in session.scalars(select(QuotaRecord)):
        for (cluster, gpu_type, user_id), seconds in recompute_used(
            session, quota.project_id, quota
        ).items():
            if seconds:
                used[(quota.project_id, cluster, gpu_type, user_id)] = seconds
    live: dict[tuple[int, str], tuple[int, int]] = {}
    counted = case((JobRecord.state == lifecycle.JobState.QUEUED.value, 0), else_=HELD_GPUS)
    for project_id, cluster, held, gpus in session.execute(
        select(
            JobRecord.project_id,
            JobRecord.cluster,
            func.sum(JobRecord.reserved_gpu_seconds),
            func.sum(counted),
        )
        .where(JobRecord.state.in_(LIVE_STATES))
        .group_by(JobRecord.project_id, JobRecord.cluster)
    ):
        if held or gpus:
            live[(int(project_id), str(cluster))] = (int(held or 0), int(gpus or 0))
    groups: dict[tuple[int, str, str, str], tuple[int, int, int, int]] = {}
    for project_id, cluster, gpu_type, state, jobs, gpus, charged, gpu_seconds in session.execute(
        job_groups((*FINAL_STATES, *LIVE_STATES))
    ):
        final = state in FINAL_STATES
        groups[(int(project_id), str(cluster), str(gpu_type), str(state))] = (
            int(jobs),
            int(gpus or 0),
            int(charged or 0) if final else 0,
            int(gpu_seconds or 0) if final else 0,
        )
    return Totals(used, live, groups)


def stored(session: Session) -> Totals:
    """The totals as kept (zero entries left out)."""
    used = {
        (r.project_id, r.cluster, r.gpu_type, r.user_id): int(r.used_gpu_seconds)
        for r in session.scalars(select(LedgerUsedRecord))
        if r.used_gpu_seconds
    }
    live = {
        (r.project_id, r.cluster): (int(r.reserved_gpu_seconds), int(r.live_gpus))
        for r in session.scalars(select(LedgerLiveRecord))
        if r.reserved_gpu_seconds or r.live_gpus
    }
    groups = {
        (r.project_id, r.cluster, r.gpu_type, r.state): (
            int(r.jobs),
            int(r.gpus),
            int(r.charged_gpu_seconds),
            int(r.gpu_seconds),
        )
        for r in session.scalars(select(JobTotalRecord))
        if r.jobs
    }
    return Totals(used, live, groups)


def check(session: Session) -> list[str]:
    """Where the kept totals differ from the rows' (empty when they agree), one line each."""
    kept, truth = stored(session), recompute(session)
    problems: list[str] = []
    for name in ("used", "live", "groups"):
        have: dict[Any, Any] = getattr(kept, name)
        want: dict[Any, Any] = getattr(truth, name)
        for key in sorted(set(have) | set(want), key=repr):
            if have.get(key) != want.get(key):
                problems.append(f"{name} {key}: kept {have.get(key)}, rows give {want.get(key)}")
    return problems


def rebuild(session: Session) -> None:
    """Replace every total with what the rows give; takes every project's ledger lock first."""
    for (project_id,) in session.execute(select(ProjectRecord.id).order_by(ProjectRecord.id)):
        lock_project(session, int(project_id))
    truth = recompute(session)
    for model in (LedgerUsedRecord, LedgerLiveRecord, JobTotalRecord):
        session.execute(delete(model))
    if truth.used:
        session.execute(
            insert(LedgerUsedRecord),
            [
                {
                    "project_id": p,
                    "cluster": c,
                    "gpu_type": g,
                    "user_id": u,
                    "used_gpu_seconds": s,
                }
                for (p, c, g, u), s in truth.used.items()
            ],
        )
    if truth.live:
        session.execute(
            insert(LedgerLiveRecord),
            [
                {"project_id": p, "cluster": c, "reserved_gpu_seconds": r, "live_gpus": g}
                for (p, c), (r, g) in truth.live.items()
            ],
        )
    if truth.groups:
        session.execute(
            insert(JobTotalRecord),
            [
                {
                    "project_id": p,
                    "cluster": c,
                    "gpu_type": g,
                    "state": st,
                    "jobs": j,
                    "gpus": n,
                    "charged_gpu_seconds": ch,
                    "gpu_seconds": gs,
                }
                for (p, c, g, st), (j, n, ch, gs) in truth.groups.items()
            ],
        )
