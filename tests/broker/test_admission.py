"""Admission reads the project and its quota under the project's ledger lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from broker.db.engine import transaction
from broker.db.models import ProjectRecord, QuotaRecord
from broker.errors import NotFound, QuotaExceeded
from broker.schemas import JobCreate, QuotaPut
from broker.service import ledger, projects
from tests.broker.harness import Env, build_env


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url, gpu_hours=100.0)
    yield environment
    environment.runtime.close()


def eight_gpu_hours(project: str = "climate") -> JobCreate:
    return JobCreate.model_validate(
        {
            "project": project,
            "script": "#!/bin/bash\nsrun python train.py\n",
            "gpus": 8,
            "time_limit_minutes": 60,
            "cluster": "alpha",
        }
    )


def test_a_quota_lowered_while_a_submission_waits_for_the_lock_refuses_it(env: Env) -> None:
    """An admin's quota change holds the project's ledger lock until it commits; a submission
    arriving meanwhile waits for the lock and is decided on the new quota, not the one it would
    have read before the lock (100 GPU-hours, which would admit it)."""
    with env.runtime.sessions() as session:
        quota = session.get_one(
            QuotaRecord,
            session.scalar(select(ProjectRecord.id).where(ProjectRecord.name == "climate")),
        )
        period = (quota.period_start, quota.period_end)
    # A first job makes alice's directory on alpha: the next admission goes through in one go.
    small = eight_gpu_hours().model_copy(update={"gpus": 1, "time_limit_minutes": 1})
    env.runtime.jobs.submit(env.alice, small, None)
    locked, release = threading.Event(), threading.Event()

    def lower_quota() -> None:
        with transaction(env.runtime.sessions) as session:
            body = QuotaPut(period_start=period[0], period_end=period[1], gpu_hours=1)
            projects.put_quota(session, env.admin, "climate", body)  # takes the ledger lock
            locked.set()
            release.wait(10)

    admin = threading.Thread(target=lower_quota)
    admin.start()
    assert locked.wait(10)
    outcome: list[BaseException | str] = []

    def submit() -> None:
        try:
            outcome.append(env.runtime.jobs.submit(env.alice, eight_gpu_hours(), None).job.state)
        except BaseException as exc:
            outcome.append(exc)

    researcher = threading.Thread(target=submit)
    researcher.start()
    researcher.join(0.5)
    assert researcher.is_alive()  # waiting for the lock
    release.set()
    admin.join(10)
    researcher.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], QuotaExceeded), outcome


def test_a_project_the_caller_cannot_see_is_404_and_is_never_locked(
    env: Env, database_url: str
) -> None:
    def version() -> int:
        with env.runtime.sessions() as session:
            return int(
                session.scalar(
                    select(ProjectRecord.ledger_version).where(ProjectRecord.name == "other")
                )
                or 0
            )

    before = version()
    with pytest.raises(NotFound, match="project other does not exist"):
        env.runtime.jobs.submit(env.alice, eight_gpu_hours("other"), None)
    with pytest.raises(NotFound, match="project nowhere does not exist"):
        env.runtime.jobs.submit(env.alice, eight_gpu_hours("nowhere"), None)
    assert version() == before
    # and bob, whose project it is, submits at once (nothing holds its lock)
    assert env.runtime.jobs.submit(env.bob, eight_gpu_hours("other"), None).job.state == "pending"

    if not database_url.startswith("postgresql"):
        return  # SQLite has one write lock for the whole database: every admission queues on it
    # While bob's admission holds the project's lock, alice's request for it is refused at once:
    # it does not queue behind (nor ever hold) the lock of a project she cannot see.
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with transaction(env.runtime.sessions) as session:
            project = session.scalars(select(ProjectRecord).where(ProjectRecord.name == "other"))
            ledger.lock_project(session, project.one().id)
            locked.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10)
        started = time.monotonic()
        with pytest.raises(NotFound):
            env.runtime.jobs.submit(env.alice, eight_gpu_hours("other"), None)
        assert time.monotonic() - started < 5
    finally:
        release.set()
        holder.join(10)
