"""The API's hottest reads, ``GET /v1/jobs/{id}`` and ``GET /v1/jobs``, in lean form.

The one way jobs are read for the API and the pages (``JobService.get`` and ``list`` call it):
a job of a project the caller is not in is 404, exactly as if it did not exist; lists show only
the caller's projects. Read with SQLAlchemy Core in one statement on a connection in autocommit:

* one round trip per request (no ``BEGIN`` and ``ROLLBACK`` around a single ``SELECT``, which
  psycopg sends as their own round trips), and only the columns the answer needs;
* names given as filters (``project``, ``user``) are resolved inside the statement by scalar
  subqueries, so PostgreSQL plans the page as a backward scan of
  ``ix_jobs_project_state_submitted`` that stops after ``limit + 1`` rows, instead of joining
  every matching row and sorting them (``benchmarks/analysis.md``, "Read path").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BindParameter, Row, Select, bindparam, func, select
from sqlalchemy.engine import Connection, Engine

from broker.db.models import JobRecord, JobTaskRecord, ProjectRecord, UserRecord
from broker.errors import NotFound, ValidationFailed
from broker.lifecycle import JobState
from broker.schemas import (
    ArrayRequest,
    JobPublic,
    JobsPublic,
    QueuePublic,
    TaskSummaryPublic,
    WaitPublic,
)
from broker.service import cursors
from broker.service.arrays import task_summary
from broker.service.cursors import CursorSigner
from broker.service.identity import Actor
from broker.service.queue import positions_query
from broker.waiting import explain
from quotas import gpu_hours

CURSOR_KIND = "jobs"


@dataclass(frozen=True, slots=True)
class JobFilter:
    project: str | None = None
    state: str | None = None
    cluster: str | None = None
    user: str | None = None


_STATES = frozenset(state.value for state in JobState)
_PENDING = JobState.PENDING.value
_QUEUED = JobState.QUEUED.value

JOB_VIEW_COLUMNS = (
    JobRecord.id,
    JobRecord.project_id,
    JobRecord.name,
    JobRecord.cluster,
    JobRecord.partition,
    JobRecord.gpu_type,
    JobRecord.gpus,
    JobRecord.nodes,
    JobRecord.time_limit_minutes,
    JobRecord.state,
    JobRecord.state_reason,
    JobRecord.slurm_job_id,
    JobRecord.exit_code,
    JobRecord.submitted_at,
    JobRecord.started_at,
    JobRecord.ended_at,
    JobRecord.reserved_gpu_seconds,
    JobRecord.charged_gpu_seconds,
    JobRecord.unix_user,
    JobRecord.queue_reason,
    JobRecord.queue_message,
    JobRecord.array_size,
    JobRecord.array_max_parallel,
)
"""The job's columns ``job_view`` reads."""

_COLUMNS = (
    *JOB_VIEW_COLUMNS,
    ProjectRecord.name.label("project"),
    UserRecord.name.label("user"),
)


def _query() -> Select[*tuple[Any, ...]]:
    return (
        select(*_COLUMNS)
        .join(ProjectRecord, ProjectRecord.id == JobRecord.project_id)
        .join(UserRecord, UserRecord.id == JobRecord.user_id)
    )


def _public(
    row: Row[Any], tasks: TaskSummaryPublic | None = None, position: int | None = None
) -> JobPublic:
    return job_view(row, row.project, row.user, tasks, position)


def job_view(
    row: Any,
    project: str,
    user: str,
    tasks: TaskSummaryPublic | None = None,
    position: int | None = None,
) -> JobPublic:
    """The API's view of a job, from a row of the jobs table or a ``JobRecord`` (the same
    attributes): ``tasks``, an array's task summary (else none started yet); ``position``, a
    queued job's place in its project's queue. The one place a job's public fields are built."""
    # Built without validation (``model_construct``): every value comes typed from the job row,
    # and validating fifty of them was a quarter of a list page's CPU.
    charged = row.charged_gpu_seconds
    state = row.state
    array = None
    if row.array_size:
        array = ArrayRequest.model_construct(
            size=row.array_size, max_parallel=row.array_max_parallel
        )
        tasks = tasks or task_summary(row.array_size, state, {})
    waiting = None
    if state == _PENDING:
        why = explain(row.state_reason)
        waiting = WaitPublic.model_construct(category=why.category, message=why.message)
    queued = None
    if state == _QUEUED:
        queued = QueuePublic.model_construct(
            position=position or 1,
            reason=row.queue_reason or "concurrent_gpus",
            message=row.queue_message or "waiting in the project's queue",
        )
    return JobPublic.model_construct(
        id=row.id,
        project=project,
        user=user,
        name=row.name,
        cluster=row.cluster,
        partition=row.partition,
        gpu_type=row.gpu_type,
        gpus=row.gpus,
        nodes=row.nodes,
        time_limit_minutes=row.time_limit_minutes,
        state=state,
        state_reason=row.state_reason,
        slurm_job_id=row.slurm_job_id,
        exit_code=row.exit_code,
        submitted_at=row.submitted_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        reserved_gpu_hours=gpu_hours(row.reserved_gpu_seconds),
        charged_gpu_hours=None if charged is None else gpu_hours(charged),
        unix_user=row.unix_user,
        queue=queued,
        wait=waiting,
        array=array,
        tasks=tasks,
    )


def _publics(connection: Connection, rows: Sequence[Row[Any]]) -> list[JobPublic]:
    """Jobs as the API shows them; arrays and queued jobs among them cost one query each kind
    (task counts; queue positions), the others nothing more."""
    arrays = {row.id: row for row in rows if row.array_size}
    counts: dict[str, dict[str, int]] = {job_id: {} for job_id in arrays}
    if arrays:
        for job_id, task_state, count in connection.execute(
            select(JobTaskRecord.job_id, JobTaskRecord.state, func.count())
            .where(JobTaskRecord.job_id.in_(arrays))
            .group_by(JobTaskRecord.job_id, JobTaskRecord.state)
        ):
            counts[job_id][task_state] = int(count)
    queued = {row.id for row in rows if row.state == _QUEUED}
    positions: dict[str, int] = {}
    if queued:
        projects = {row.project_id for row in rows if row.id in queued}
        positions = {
            job_id: int(place)
            for job_id, place in connection.execute(positions_query(projects))
            if job_id in queued
        }
    return [
        _public(
            row,
            task_summary(row.array_size, row.state, counts[row.id]) if row.id in arrays else None,
            positions.get(row.id),
        )
        for row in rows
    ]


class JobReader:
    """Reads jobs for the API on ``engine`` in autocommit (one statement, one round trip).

    Statements are built once per shape, with bound parameters for every value, so a request
    only binds its values: SQLAlchemy's compiled cache and the result metadata are reused
    (building the expression and adapting the result to it were a third of the CPU of a read).
    """

    def __init__(self, engine: Engine, signer: CursorSigner) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._cursors = signer
        self._get = _query().where(JobRecord.id == bindparam("job_id"))
        self._lists: dict[tuple[bool, ...], Select[*tuple[Any, ...]]] = {}

    def get(self, actor: Actor, job_id: str) -> JobPublic:
        with self._engine.connect() as connection:
            row = connection.execute(self._get, {"job_id": job_id}).first()
            if row is None or not (actor.reads_everything or row.project_id in actor.project_ids):
                raise NotFound(f"job {job_id} does not exist")
            if row.array_size or row.state == _QUEUED:
                return _publics(connection, [row])[0]
        return _public(row)

    def list(self, actor: Actor, where: JobFilter, limit: int, cursor: str | None) -> JobsPublic:
        if where.state is not None and where.state not in _STATES:
            raise ValidationFailed(
                f"unknown state {where.state}",
                [{"field": "state", "message": "one of " + ", ".join(s.value for s in JobState)}],
            )
        values: dict[str, Any] = {"limit": limit + 1}
        if not actor.reads_everything:
            values["project_ids"] = sorted(actor.project_ids)
        if where.project is not None:
            values["project"] = where.project
        if where.state is not None:
            values["state"] = where.state
        if where.cluster is not None:
            values["cluster"] = where.cluster
        if where.user is not None:
            values["user"] = where.user
        if cursor:
            encoded_at, job_id = self._cursors.decode(CURSOR_KIND, cursor, 2)
            values["after_at"] = cursors.parse_time(encoded_at)
            values["after_id"] = job_id
        with self._engine.connect() as connection:
            rows = connection.execute(self._list_statement(frozenset(values)), values).all()
            if any(row.array_size or row.state == _QUEUED for row in rows[:limit]):
                page = _publics(connection, rows[:limit])
            else:
                page = [_public(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = self._cursors.encode(CURSOR_KIND, last.submitted_at.isoformat(), last.id)
        return JobsPublic(data=page, next_cursor=next_cursor)

    def _list_statement(self, given: frozenset[str]) -> Select[*tuple[Any, ...]]:
        shape = tuple(name in given for name in _LIST_PARAMETERS)
        statement = self._lists.get(shape)
        if statement is None:
            statement = _list_query(given)
            self._lists[shape] = statement
        return statement


_LIST_PARAMETERS = ("project_ids", "project", "state", "cluster", "user", "after_at")


def _list_query(given: frozenset[str]) -> Select[*tuple[Any, ...]]:
    query = _query()
    if "project_ids" in given:
        query = query.where(JobRecord.project_id.in_(bindparam("project_ids", expanding=True)))
    if "project" in given:
        project_id = (
            select(ProjectRecord.id).where(ProjectRecord.name == bindparam("project"))
        ).scalar_subquery()
        query = query.where(JobRecord.project_id == project_id)
    if "state" in given:
        query = query.where(JobRecord.state == bindparam("state"))
    if "cluster" in given:
        query = query.where(JobRecord.cluster == bindparam("cluster"))
    if "user" in given:
        user_id = (
            select(UserRecord.id).where(UserRecord.name == bindparam("user"))
        ).scalar_subquery()
        query = query.where(JobRecord.user_id == user_id)
    if "after_at" in given:
        at: BindParameter[datetime] = bindparam("after_at")
        after: BindParameter[str] = bindparam("after_id")
        earlier = (JobRecord.submitted_at == at) & (JobRecord.id < after)
        query = query.where((JobRecord.submitted_at < at) | earlier)
    return query.order_by(JobRecord.submitted_at.desc(), JobRecord.id.desc()).limit(
        bindparam("limit")
    )
