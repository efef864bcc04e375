"""A live submitter and the reconciler never race for one job (scripted cluster, both databases).

The reconciler takes a job over ``poller.stale_submitting_seconds`` after it was admitted (or a
queue pass claimed it): it looks for the job by its tag, and gives it up (key free) or queues it
again when nothing carries the tag. If the submitter's sbatch were still under way then, its
Slurm job would follow a job already given up: run uncharged, and the client's retry would make
a second one. The chaos campaign and the fifty-submits e2e test found exactly that on a loaded
machine. So a submitter gives sbatch only what is left of that window, and one that still finds
its job taken over cancels the Slurm job it made.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from adapters.errors import CommandTimedOut
from broker.db.engine import transaction
from broker.db.models import JobRecord
from broker.errors import ClusterUnavailable
from broker.schemas import JobCreate, JobPublic
from broker.service import ledger
from broker.service.jobs import SBATCH_MARGIN_SECONDS
from tests.broker.harness import Env, build_env, set_quota

SCRIPT = "#!/bin/bash\nsrun python train.py\n"
STALE_S = 30.0


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(
        database_url,
        gpu_hours=1000.0,
        stale_submitting_seconds=STALE_S,
        submit_unknown_grace_seconds=20,
    )
    yield environment
    environment.runtime.close()


def body(**fields: Any) -> JobCreate:
    values = {
        "project": "climate",
        "script": SCRIPT,
        "gpus": 8,
        "time_limit_minutes": 60,
        "cluster": "alpha",
    }
    values.update(fields)
    return JobCreate.model_validate(values)


def record(env: Env, job_id: str) -> JobRecord:
    with env.runtime.sessions() as session:
        job = session.get_one(JobRecord, job_id)
        session.expunge(job)
        return job


def backdate(env: Env, job_id: str, seconds: float, *columns: str) -> None:
    then = datetime.now(UTC) - timedelta(seconds=seconds)
    with transaction(env.runtime.sessions) as session:
        session.execute(
            update(JobRecord).where(JobRecord.id == job_id).values(dict.fromkeys(columns, then))
        )


def the_only_job(env: Env) -> str:
    with env.runtime.sessions() as session:
        (job_id,) = session.scalars(
            JobRecord.__table__.select().with_only_columns(JobRecord.id)
        ).all()
        return job_id


def test_sbatch_gets_only_the_time_left_before_the_reconciler_may_look(env: Env) -> None:
    job = env.runtime.jobs.submit(env.alice, body(), None).job
    assert job.state == "pending"
    (given,) = env.slurm["alpha"].submit_timeouts
    assert given is not None
    assert STALE_S - SBATCH_MARGIN_SECONDS - 5 < given <= STALE_S - SBATCH_MARGIN_SECONDS


def test_a_submitter_overtaken_by_the_reconciler_cancels_its_slurm_job(env: Env) -> None:
    fake = env.slurm["alpha"]

    def reconciler_runs_during_sbatch() -> None:
        # As if sbatch had hung past the window: the reconciler finds nothing by the tag yet.
        fake.on_submit = None
        job_id = the_only_job(env)
        backdate(env, job_id, 600, "submitted_at", "updated_at")
        env.runtime.poller.poll("alpha")
        assert record(env, job_id).state == "submit_failed"

    fake.on_submit = reconciler_runs_during_sbatch
    with pytest.raises(ClusterUnavailable):
        env.runtime.jobs.submit(env.alice, body(), "key-1")
    job_id = the_only_job(env)
    gone = record(env, job_id)
    assert gone.state == "submit_failed" and gone.slurm_job_id is None
    assert gone.idempotency_key is None
    (orphan,) = fake.jobs.values()
    assert fake.cancels == [orphan.job_id] and orphan.state == "CANCELLED"
    assert fake.cancelled_as == ["alice"]  # the job runs as the researcher, so does its cancel

    # The client's retry with its key is a new job, the only live one in Slurm.
    retried = env.runtime.jobs.submit(env.alice, body(), "key-1").job
    assert retried.id != job_id and retried.state == "pending"
    live = [j for j in fake.jobs.values() if j.state != "CANCELLED"]
    assert [j.job_id for j in live] == [retried.slurm_job_id]
    with env.runtime.sessions() as session:
        assert ledger.check(session) == []


def queue_one(env: Env) -> tuple[JobPublic, JobPublic]:
    """A running job at the project's limit and one queued behind it; the first then ends."""
    set_quota(env, max_concurrent_gpus=8)  # room for one 8-GPU job
    first = env.runtime.jobs.submit(env.alice, body(), None).job
    second = env.runtime.jobs.submit(env.alice, body(), None).job
    assert second.state == "queued"
    assert first.slurm_job_id is not None
    env.slurm["alpha"].finish(first.slurm_job_id, "COMPLETED", elapsed_s=60)
    env.runtime.poller.poll("alpha")
    return first, second


def test_a_release_claimed_too_long_ago_is_not_submitted_but_queued_again(env: Env) -> None:
    _, second = queue_one(env)
    fake = env.slurm["alpha"]
    submits = fake.submits
    with env.runtime.sessions() as session:
        project_id = session.get_one(JobRecord, second.id).project_id
    assert list(env.runtime.queue._claim(project_id, set(), None)) == [second.id]
    # The pass that claimed it was slow to reach it (sbatch of the jobs claimed before it).
    backdate(env, second.id, STALE_S - SBATCH_MARGIN_SECONDS, "release_claimed_at")
    assert env.runtime.jobs.submit_released(second.id) is not None
    assert fake.submits == submits  # no sbatch started that could outlive the claim
    waiting = record(env, second.id)
    assert waiting.state == "queued" and waiting.release_claimed_at is None
    env.runtime.queue.release()  # the next pass claims it afresh and submits it
    assert record(env, second.id).state == "pending"
    assert fake.submits == submits + 1


def test_a_release_overtaken_by_the_reconciler_leaves_one_live_slurm_job(env: Env) -> None:
    _, second = queue_one(env)
    fake = env.slurm["alpha"]

    def reconciler_runs_during_sbatch() -> None:
        fake.on_submit = None
        backdate(env, second.id, 600, "release_claimed_at")
        env.runtime.poller.poll("alpha")  # finds nothing by the tag: queued again
        assert record(env, second.id).release_claimed_at is None

    fake.on_submit = reconciler_runs_during_sbatch
    env.runtime.queue.release()
    assert record(env, second.id).state == "queued"
    env.runtime.queue.release()  # released again, this time to the end
    job = record(env, second.id)
    assert job.state == "pending" and job.slurm_job_id is not None
    tagged = [j for j in fake.jobs.values() if j.spec.tag == job.tag]
    assert len(tagged) == 2
    live = [j.job_id for j in tagged if j.state != "CANCELLED"]
    assert live == [job.slurm_job_id]
    with env.runtime.sessions() as session:
        assert ledger.check(session) == []


def test_give_up_counts_from_when_the_job_became_submit_unknown(env: Env) -> None:
    fake = env.slurm["alpha"]

    def answer_lost() -> None:  # sbatch timed out; nothing reached Slurm
        fake.on_submit = None
        raise CommandTimedOut(["sbatch"], 2.0)

    fake.on_submit = answer_lost
    job = env.runtime.jobs.submit(env.alice, body(), "key-2").job
    assert job.state == "submit_unknown"
    # Admitted long ago (a slow sbatch), but submit_unknown only now: an sbatch left running on
    # the login node may still make the job, so the reconciler waits its grace from here.
    backdate(env, job.id, 600, "submitted_at")
    env.runtime.poller.poll("alpha")
    assert record(env, job.id).state == "submit_unknown"
    backdate(env, job.id, 60, "updated_at")
    env.runtime.poller.poll("alpha")
    given_up = record(env, job.id)
    assert given_up.state == "submit_failed" and given_up.idempotency_key is None


def test_a_dead_releasers_claim_goes_back_to_the_queue_only_after_the_grace(
    database_url: str,
) -> None:
    env = build_env(
        database_url, gpu_hours=1000.0, stale_submitting_seconds=10, submit_unknown_grace_seconds=60
    )
    try:
        _, second = queue_one(env)
        with env.runtime.sessions() as session:
            project_id = session.get_one(JobRecord, second.id).project_id
        assert list(env.runtime.queue._claim(project_id, set(), None)) == [second.id]
        # Its releaser died before sbatch answered; nothing carries the tag (yet).
        backdate(env, second.id, 30, "release_claimed_at")
        env.runtime.poller.poll("alpha")
        waiting = record(env, second.id)
        assert waiting.state == "queued" and waiting.release_claimed_at is not None
        backdate(env, second.id, 90, "release_claimed_at")
        env.runtime.poller.poll("alpha")
        assert record(env, second.id).release_claimed_at is None  # queued again
    finally:
        env.runtime.close()
