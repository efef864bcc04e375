"""The broker's admission queue with a scripted cluster (both databases): order, passing,
starvation, holds, cancels, outages, and the ledger throughout.

The same queue runs against the real dev cluster in tests/e2e/test_queue_on_slurm.py.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

import broker.service.queue
from adapters.errors import HostUnreachable
from adapters.slurm.types import JobSpec
from broker.db.engine import transaction
from broker.db.models import JobRecord
from broker.errors import QuotaExceeded
from broker.schemas import JobCreate, JobPublic, QueuePut
from broker.service import ledger, projects
from tests.broker.harness import Env, build_env, set_quota
from tests.metrics.seed import Scrape

SCRIPT = "#!/bin/bash\nsrun python train.py\n"


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url, gpu_hours=1000.0, queue={"starvation_seconds": 600})
    yield environment
    environment.runtime.close()


def submit(env: Env, gpus: int = 8, **fields: Any) -> JobPublic:
    body = {"project": "climate", "script": SCRIPT, "gpus": gpus, "time_limit_minutes": 60}
    body.setdefault("cluster", "alpha")
    body.update(fields)
    return env.runtime.jobs.submit(env.alice, JobCreate.model_validate(body), None).job


def get(env: Env, job: JobPublic) -> JobPublic:
    return env.runtime.jobs.get(env.alice, job.id)


def cycle(env: Env) -> None:
    """What the scheduler does each tick: a poll cycle, then a queue pass."""
    env.runtime.poller.poll("alpha")
    env.runtime.queue.release()


def usage(env: Env) -> tuple[float, float]:
    with env.runtime.sessions() as session:
        u = projects.usage(session, env.admin, "climate")
    return u.used_gpu_hours, u.reserved_gpu_hours


def backdate(env: Env, job: JobPublic, seconds: float) -> None:
    with transaction(env.runtime.sessions) as session:
        session.execute(
            update(JobRecord)
            .where(JobRecord.id == job.id)
            .values(submitted_at=datetime.now(UTC) - timedelta(seconds=seconds))
        )


def test_five_jobs_at_a_limit_of_one_run_one_after_the_other_in_order(env: Env) -> None:
    set_quota(env, max_concurrent_gpus=8)
    jobs = [submit(env) for _ in range(5)]
    assert jobs[0].state == "pending" and jobs[0].slurm_job_id
    assert [j.state for j in jobs[1:]] == ["queued"] * 4
    assert all(j.slurm_job_id is None for j in jobs[1:])
    shown = [get(env, j) for j in jobs[1:]]
    assert [j.queue.position for j in shown if j.queue] == [1, 2, 3, 4]
    assert {j.queue.reason for j in shown if j.queue} == {"concurrent_gpus"}
    assert shown[2].queue is not None
    assert shown[2].queue.message == "project at 8 of 8 concurrent GPUs; 2 jobs ahead"
    assert usage(env) == pytest.approx((0.0, 5 * 8.0))  # every queued job holds its reservation
    assert len(env.slurm["alpha"].jobs) == 1
    scrape = Scrape(env.runtime.metrics.registry)
    assert scrape.value("broker_queued_jobs", project="climate", limit="concurrent_gpus") == 4
    assert scrape.value("broker_queued_gpus", project="climate", limit="concurrent_gpus") == 32
    assert scrape.value("broker_queued_jobs", project="climate", limit="pending_jobs") == 0

    used = 0.0
    for previous, following in itertools.pairwise(jobs):
        cycle(env)
        assert get(env, following).state == "queued"  # nothing freed yet
        slurm_id = get(env, previous).slurm_job_id
        assert slurm_id is not None
        env.slurm["alpha"].start(slurm_id)
        env.slurm["alpha"].finish(slurm_id, "COMPLETED", elapsed_s=600)
        cycle(env)  # the cycle that settles it releases the next one
        used += 8 * 600 / 3600
        released = get(env, following)
        assert released.state == "pending" and released.slurm_job_id
        assert released.queue is None
        assert usage(env) == pytest.approx((used, 8.0 * (len(jobs) - jobs.index(following))))
        with env.runtime.sessions() as session:
            assert ledger.check(session) == []  # running totals = recomputation from the rows
    events = [e.to_state for e in env.runtime.jobs.events(env.alice, jobs[4].id).data]
    assert events == ["queued", "pending"]
    time.sleep(2.1)  # the scrape-time read is shared for 2 s
    scrape = Scrape(env.runtime.metrics.registry)
    assert scrape.total("broker_queued_jobs", project="climate") == 0
    assert scrape.total("broker_queued_seconds_count", cluster="alpha") == 4
    assert len(env.slurm["alpha"].jobs) == 5  # every job reached Slurm exactly once


def test_a_smaller_job_passes_a_blocked_larger_one_until_that_one_starves(env: Env) -> None:
    set_quota(env, max_concurrent_gpus=16)
    running = submit(env, gpus=8)
    big = submit(env, gpus=16)  # needs 16 free
    small = submit(env, gpus=8)
    assert (running.state, big.state, small.state) == ("pending", "queued", "queued")
    cycle(env)
    assert get(env, small).state == "pending"  # fits beside the running 8: it passes
    assert get(env, big).state == "queued"

    # Once the big job has waited past the starvation time, nothing passes it.
    backdate(env, big, 601)
    later = submit(env, gpus=8)
    slurm_id = get(env, running).slurm_job_id
    assert slurm_id is not None
    env.slurm["alpha"].finish(slurm_id, "COMPLETED", elapsed_s=60)
    cycle(env)
    assert get(env, later).state == "queued"  # 8 are free, but it may not pass the big one
    waiting = get(env, later).queue
    assert waiting is not None and "behind job" in waiting.message

    small_id = get(env, small).slurm_job_id
    assert small_id is not None
    env.slurm["alpha"].finish(small_id, "COMPLETED", elapsed_s=60)
    cycle(env)
    assert get(env, big).state == "pending"  # 16 free: the starving job goes first
    assert get(env, later).state == "queued"


def test_a_held_project_keeps_its_jobs_queued_until_released(env: Env) -> None:
    with transaction(env.runtime.sessions) as session:
        held = projects.put_queue(session, env.admin, "climate", QueuePut(held=True))
    assert held.held and held.queued_jobs == 0
    job = submit(env, gpus=1)
    assert job.state == "queued"
    assert job.queue is not None and job.queue.reason == "project_held"
    cycle(env)
    assert get(env, job).state == "queued"
    with transaction(env.runtime.sessions) as session:
        released = projects.put_queue(session, env.admin, "climate", QueuePut(held=False))
    assert released.queued_jobs == 1 and not released.held
    cycle(env)
    assert get(env, job).state == "pending"


def test_cancelling_a_queued_job_gives_its_reservation_back_and_reaches_no_slurm(
    env: Env,
) -> None:
    set_quota(env, max_pending_jobs=1)
    first = submit(env)
    queued = submit(env)
    assert queued.state == "queued"
    assert queued.queue is not None and queued.queue.reason == "pending_jobs"
    assert usage(env) == pytest.approx((0.0, 16.0))
    cancelled, accepted = env.runtime.jobs.cancel(env.alice, queued.id)
    assert accepted and cancelled.state == "cancelled"
    assert cancelled.charged_gpu_hours == 0.0 and cancelled.queue is None
    assert usage(env) == pytest.approx((0.0, 8.0))
    with env.runtime.sessions() as session:
        assert ledger.check(session) == []
    cycle(env)
    assert list(env.slurm["alpha"].jobs) == [first.slurm_job_id]
    assert env.slurm["alpha"].cancels == []


def test_the_budget_is_still_refused_at_once(env: Env) -> None:
    set_quota(env, gpu_hours=20, max_concurrent_gpus=8)
    submit(env)  # 8 GPU-hours reserved
    assert submit(env).state == "queued"  # 16 of 20 reserved
    with pytest.raises(QuotaExceeded) as refused:
        submit(env)  # 24 > 20: waiting does not make money
    assert refused.value.extra["limit"] == "gpu_hours"
    assert usage(env) == pytest.approx((0.0, 16.0))


def test_without_the_queue_a_full_limit_is_refused(database_url: str) -> None:
    env = build_env(database_url, queue={"enabled": False})
    try:
        set_quota(env, max_concurrent_gpus=8)
        submit(env)
        with pytest.raises(QuotaExceeded) as refused:
            submit(env)
        assert refused.value.extra["limit"] == "concurrent_gpus"
    finally:
        env.runtime.close()


def test_a_cluster_that_cannot_be_reached_keeps_released_jobs_queued(env: Env) -> None:
    set_quota(env, max_concurrent_gpus=8)
    first = submit(env)
    second = submit(env)
    slurm_id = first.slurm_job_id
    assert slurm_id is not None
    env.slurm["alpha"].finish(slurm_id, "COMPLETED", elapsed_s=60)
    env.runtime.poller.poll("alpha")  # settles the first: room for the second
    env.slurm["alpha"].down = HostUnreachable("fake-login", "connection refused")
    env.runtime.queue.release()  # sbatch cannot reach the cluster
    again = get(env, second)
    assert again.state == "queued" and again.slurm_job_id is None
    assert usage(env)[1] == pytest.approx(8.0)
    env.slurm["alpha"].down = None
    cycle(env)
    assert get(env, second).state == "pending"
    assert len(env.slurm["alpha"].jobs) == 2


def test_a_release_whose_process_died_is_found_by_its_tag_or_queued_again(env: Env) -> None:
    set_quota(env, max_concurrent_gpus=8)
    first = submit(env)
    lost_answer, never_sent = submit(env), submit(env)
    stale = datetime.now(UTC) - timedelta(minutes=10)
    with transaction(env.runtime.sessions) as session:
        session.execute(
            update(JobRecord)
            .where(JobRecord.id.in_([lost_answer.id, never_sent.id]))
            .values(release_claimed_at=stale)
        )
    # The dead releaser's sbatch reached Slurm for one of them (tagged), not for the other.
    with env.runtime.sessions() as session:
        tag = session.get_one(JobRecord, lost_answer.id).tag
    env.slurm["alpha"].submit(
        JobSpec(
            script=SCRIPT,
            account="climate",
            partition="gpu",
            gpus=8,
            time_limit_minutes=60,
            tag=tag,
            run_as="alice",
        )
    )
    env.runtime.poller.poll("alpha")
    attached = get(env, lost_answer)
    assert attached.state == "pending" and attached.slurm_job_id
    back = get(env, never_sent)
    assert back.state == "queued"
    with env.runtime.sessions() as session:
        assert session.get_one(JobRecord, never_sent.id).release_claimed_at is None
    assert first.state == "pending"


def test_a_job_claimed_by_an_earlier_pass_counts_against_the_limit(env: Env) -> None:
    set_quota(env, max_pending_jobs=1)
    first = submit(env)
    waiting = [submit(env), submit(env)]
    slurm_id = first.slurm_job_id
    assert slurm_id is not None
    env.slurm["alpha"].finish(slurm_id, "CANCELLED", elapsed_s=0)
    env.runtime.poller.poll("alpha")
    # One pass claims the next job; before its sbatch, another pass (the other cluster's tick)
    # runs: the claimed job holds the only pending slot.
    with env.runtime.sessions() as session:
        project_id = session.get_one(JobRecord, first.id).project_id
    claimed = env.runtime.queue._claim(project_id, set(), None)
    assert list(claimed) == [waiting[0].id]
    env.runtime.queue.release()  # a second pass, before the first one's sbatch
    assert get(env, waiting[1]).state == "queued"
    assert get(env, waiting[0]).state == "queued"  # claimed: the first pass submits it
    assert len(env.slurm["alpha"].jobs) == 1


def _mark_message(env: Env, job: JobPublic, text: str) -> None:
    with transaction(env.runtime.sessions) as session:
        session.execute(update(JobRecord).where(JobRecord.id == job.id).values(queue_message=text))


def test_a_pass_skips_an_unchanged_queue_and_sees_every_change_after_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that released nothing is not repeated over the same inputs (a sweep of thousands
    of queued jobs would be read and checked every cycle), but a raised quota, a freed GPU, a
    job that starts starving or a new job each bring the full pass back."""
    set_quota(env, max_concurrent_gpus=8)
    running = submit(env)
    waiting = submit(env)
    cycle(env)
    assert get(env, waiting).state == "queued"
    _mark_message(env, waiting, "left by the test")
    cycle(env)  # nothing changed: the queued jobs are not read, nor their messages rewritten
    assert (get(env, waiting).queue or pytest.fail("not queued")).message == "left by the test"

    later = submit(env)  # a new job changes the queue's shape: the pass runs in full
    cycle(env)
    assert (get(env, waiting).queue or pytest.fail("not queued")).message != "left by the test"
    assert get(env, later).state == "queued"

    _mark_message(env, later, "left by the test")
    cycle(env)
    assert (get(env, later).queue or pytest.fail("not queued")).message == "left by the test"
    # Time alone passes: the first job now waited past the starvation time. Nothing in the
    # database changed, and yet that changes the order: the pass runs in full.
    future = datetime.now(UTC) + timedelta(seconds=601)
    monkeypatch.setattr(broker.service.queue, "utcnow", lambda: future)
    cycle(env)
    assert (get(env, later).queue or pytest.fail("not queued")).message != "left by the test"

    set_quota(env, max_concurrent_gpus=16)  # the admin raises the limit
    cycle(env)
    assert get(env, waiting).state == "pending"
    assert get(env, later).state == "queued"

    slurm_id = get(env, running).slurm_job_id
    assert slurm_id is not None
    env.slurm["alpha"].finish(slurm_id, "COMPLETED", elapsed_s=60)  # 8 GPUs free up
    cycle(env)
    assert get(env, later).state == "pending"
