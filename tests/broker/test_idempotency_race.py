"""One Idempotency-Key sent at once for two projects: one job, one 422, under any interleaving.

Admission locks the project, but the key is unique per user, so two projects mean two locks and
the requests meet at the unique constraint. PostgreSQL only: SQLite serialises all writers.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from adapters.errors import HostUnreachable
from adapters.slurm.types import JobSpec
from broker.db.engine import transaction
from broker.db.models import JobRecord
from broker.errors import ClusterUnavailable, IdempotencyConflict
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


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_retry_waiting_on_a_submit_that_fails_submits_anew_under_its_key(env: Env) -> None:
    """A client retries while its first request is still in sbatch; the first then fails before
    reaching Slurm (the cluster is down) and gives the key back. The retry must not answer with
    that failed job: it is a new submission under the same key, and it reaches Slurm."""
    fake = env.slurm["alpha"]
    in_sbatch, go_on = threading.Event(), threading.Event()
    real_submit = fake.submit

    def first_sbatch_fails(spec: JobSpec, *, timeout: float | None = None) -> str:
        fake.submit = real_submit  # type: ignore[method-assign]
        in_sbatch.set()
        go_on.wait(10)
        raise HostUnreachable("fake-login", "connection refused")

    fake.submit = first_sbatch_fails  # type: ignore[method-assign]
    body = JobCreate(
        project="climate", script="#!/bin/sh\n", gpus=1, time_limit_minutes=5, cluster="alpha"
    )
    key = f"retry-{uuid.uuid4().hex[:8]}"
    first: list[BaseException] = []

    def submit_first() -> None:
        try:
            env.runtime.jobs.submit(env.alice, body, key)
        except BaseException as exc:
            first.append(exc)

    thread = threading.Thread(target=submit_first)
    thread.start()
    assert in_sbatch.wait(10)
    retried: list[SubmitOutcome] = []
    retry = threading.Thread(
        target=lambda: retried.append(env.runtime.jobs.submit(env.alice, body, key))
    )
    retry.start()
    go_on.set()
    thread.join(20)
    retry.join(20)
    assert first and isinstance(first[0], ClusterUnavailable)
    (outcome,) = retried
    assert outcome.job.state == "pending" and outcome.job.slurm_job_id is not None
    with env.runtime.sessions() as session:
        holder = session.scalars(select(JobRecord).where(JobRecord.idempotency_key == key)).one()
    assert holder.id == outcome.job.id
    assert fake.submits == 1  # one sbatch reached Slurm
