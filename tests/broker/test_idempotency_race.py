"""One Idempotency-Key sent at once for two projects: one job, one 422, under any interleaving.

Admission locks the project, but the key is unique per user, so two projects mean two locks and
the requests meet at the unique constraint. PostgreSQL only: SQLite serialises all writers.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from broker.db.engine import transaction
from broker.errors import IdempotencyConflict
from broker.schemas import JobCreate, MemberPut
from broker.service import projects
from broker.service.jobs import SubmitOutcome
from tests.broker.harness import Env, build_env

ROUNDS = 40


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url)
    yield environment
    environment.runtime.close()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_one_key_for_two_projects_at_once_makes_one_job_and_one_conflict(env: Env) -> None:
    with transaction(env.runtime.sessions) as session:
        projects.put_member(session, env.admin, "other", "alice", MemberPut())
    alice = env.actor("alice")  # now in climate and other
    bodies = [
        JobCreate(
            project=project,
            script="#!/bin/sh\ntrue\n",
            gpus=1,
            time_limit_minutes=1,
            cluster="alpha",
        )
        for project in ("climate", "other")
    ]
    for _ in range(ROUNDS):
        key = f"k-{uuid.uuid4()}"
        barrier = threading.Barrier(2)
        outcomes: list[SubmitOutcome | BaseException] = []

        def submit(
            body: JobCreate,
            key: str = key,
            barrier: threading.Barrier = barrier,
            outcomes: list[SubmitOutcome | BaseException] = outcomes,
        ) -> None:
            barrier.wait()
            try:
                outcomes.append(env.runtime.jobs.submit(alice, body, key))
            except BaseException as exc:  # the test reports whatever came out
                outcomes.append(exc)

        threads = [threading.Thread(target=submit, args=(body,)) for body in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        created = [o for o in outcomes if isinstance(o, SubmitOutcome)]
        refused = [o for o in outcomes if isinstance(o, IdempotencyConflict)]
        assert len(created) == 1 and len(refused) == 1, outcomes
        assert created[0].created and created[0].job.state == "pending"
        assert refused[0].extra["job_id"] == created[0].job.id
    assert env.slurm["alpha"].submits == ROUNDS
