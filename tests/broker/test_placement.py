"""Placement of jobs that name no cluster, with scripted clusters (both databases)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from broker.db.engine import transaction
from broker.db.models import ForeignJobRecord, JobRecord
from broker.schemas import JobCreate, JobPublic
from broker.service import ledger
from tests.broker.harness import Env, build_env

SCRIPT = "#!/bin/bash\nsrun python train.py\n"


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url, gpu_hours=1000.0)
    yield environment
    environment.runtime.close()


def submit(env: Env, gpus: int = 8, **fields: Any) -> JobPublic:
    body = {"project": "climate", "script": SCRIPT, "gpus": gpus, "time_limit_minutes": 60}
    body.update(fields)
    return env.runtime.jobs.submit(env.alice, JobCreate.model_validate(body), None).job


def snapshot(env: Env, alpha_idle: int, beta_idle: int) -> None:
    """What the poller last saw: alpha's h100 and beta's a100 idle GPUs."""
    env.slurm["alpha"].idle(alpha_idle, "h100")
    env.slurm["beta"].idle(beta_idle, "a100")
    env.runtime.poller.poll("alpha")
    env.runtime.poller.poll("beta")


def first_reason(env: Env, job: JobPublic) -> str:
    events = env.runtime.jobs.events(env.alice, job.id).data
    return events[0].reason or ""


def placed(env: Env, job: JobPublic) -> bool:
    with env.runtime.sessions() as session:
        return session.get_one(JobRecord, job.id).placed


def test_a_job_without_cluster_goes_where_gpus_are_idle_and_says_why(env: Env) -> None:
    snapshot(env, alpha_idle=0, beta_idle=8)
    job = submit(env)
    assert (job.cluster, job.partition, job.gpu_type) == ("beta", "gpu", "a100")
    assert job.reserved_gpu_hours == pytest.approx(8 * 0.5)  # priced at a100's weight
    assert "placed on beta/gpu: 8 idle a100" in first_reason(env, job)
    assert "alpha/gpu: 0 idle h100" in first_reason(env, job)
    assert placed(env, job)
    assert list(env.slurm["beta"].jobs) == [job.slurm_job_id]


def test_the_brokers_own_waiting_jobs_count_against_the_idle_gpus(env: Env) -> None:
    snapshot(env, alpha_idle=4, beta_idle=8)
    first = submit(env)  # beta: 8 idle
    assert first.cluster == "beta"
    second = submit(env)  # beta: 8 idle less the 8 of the first, still pending; alpha: 4
    assert second.cluster == "alpha"


def test_a_gpu_type_narrows_the_choice_and_a_named_cluster_is_never_placed(env: Env) -> None:
    snapshot(env, alpha_idle=0, beta_idle=8)
    h100 = submit(env, gpu_type="h100")
    assert h100.cluster == "alpha"  # the only h100s, busy or not
    pinned = submit(env, cluster="alpha")
    assert pinned.cluster == "alpha" and not placed(env, pinned)
    assert "placed" not in first_reason(env, pinned)


def test_a_type_no_allowed_cluster_offers_is_a_clear_422(env: Env) -> None:
    from broker.errors import ValidationFailed

    with pytest.raises(ValidationFailed) as refused:
        submit(env, gpu_type="mi300")
    assert "mi300" in str(refused.value)


# --- moves ----------------------------------------------------------------------------------


def wait_long(env: Env, job: JobPublic, reason: str = "Resources") -> None:
    """Slurm keeps the job pending for ``reason``, past [placement] move_after_seconds."""
    cluster = env.slurm[job.cluster]
    cluster.jobs[str(job.slurm_job_id)].reason = reason
    env.runtime.poller.poll(job.cluster)
    with transaction(env.runtime.sessions) as session:
        session.execute(
            update(JobRecord)
            .where(JobRecord.id == job.id)
            .values(in_slurm_since=datetime.now(UTC) - timedelta(seconds=121))
        )


def test_a_placed_job_waiting_for_resources_moves_once_at_the_new_price(env: Env) -> None:
    snapshot(env, alpha_idle=4, beta_idle=8)
    job = submit(env)
    assert job.cluster == "beta" and job.reserved_gpu_hours == pytest.approx(4.0)
    first_id = str(job.slurm_job_id)
    wait_long(env, job)
    snapshot(env, alpha_idle=8, beta_idle=0)  # beta filled up, alpha freed
    assert env.runtime.mover.consider("beta") == 1
    moved = env.runtime.jobs.get(env.alice, job.id)
    assert (moved.cluster, moved.gpu_type, moved.state) == ("alpha", "h100", "pending")
    assert moved.slurm_job_id is not None and moved.id == job.id
    assert moved.reserved_gpu_hours == pytest.approx(8.0)  # re-priced at h100's weight
    assert env.slurm["beta"].jobs[first_id].state == "CANCELLED"  # gone first
    assert list(env.slurm["alpha"].jobs) == [moved.slurm_job_id]
    reasons = [e.reason or "" for e in env.runtime.jobs.events(env.alice, job.id).data]
    assert any(r.startswith("moved from beta/gpu (Slurm job") for r in reasons)
    with env.runtime.sessions() as session:
        assert session.get_one(JobRecord, job.id).queued_script is not None  # until it runs

    # It moves once: waiting again on alpha changes nothing.
    wait_long(env, moved)
    snapshot(env, alpha_idle=0, beta_idle=8)
    assert env.runtime.mover.consider("alpha") == 0
    env.slurm["alpha"].start(str(moved.slurm_job_id))
    env.slurm["alpha"].finish(str(moved.slurm_job_id), "COMPLETED", elapsed_s=600)
    env.runtime.poller.poll("alpha")
    done = env.runtime.jobs.get(env.alice, job.id)
    assert done.state == "completed" and done.charged_gpu_hours == pytest.approx(8 * 600 / 3600)
    with env.runtime.sessions() as session:
        assert ledger.check(session) == []  # the move re-priced and re-homed its totals
    env.runtime.poller.poll("beta")  # the cancelled first job changes nothing
    assert env.runtime.jobs.get(env.alice, job.id).state == "completed"
    with env.runtime.sessions() as session:  # nor is it taken for a job of the researcher's
        assert session.scalars(select(ForeignJobRecord)).all() == []


def test_only_the_slurm_job_a_move_left_behind_is_exempt_from_the_foreign_rule(env: Env) -> None:
    """The job records which Slurm job it left on the old cluster. That one, cancelled before it
    ran, is the broker's; a researcher's own job carrying a copy of the tag is foreign even when
    it too ended without running, and one that runs is cancelled as any foreign job."""
    snapshot(env, alpha_idle=4, beta_idle=8)
    job = submit(env)
    first_id = str(job.slurm_job_id)
    wait_long(env, job)
    snapshot(env, alpha_idle=8, beta_idle=0)
    assert env.runtime.mover.consider("beta") == 1
    with env.runtime.sessions() as session:
        row = session.get_one(JobRecord, job.id)
        assert (row.moved_from_cluster, row.moved_from_slurm_job_id) == ("beta", first_id)
        tag = row.tag
    beta = env.slurm["beta"]
    copied = beta.sbatch_from_a_job("climate", "alice", gpus=8, comment=tag)
    beta.finish(copied, "CANCELLED", elapsed_s=0, alloc_gpus=0)
    running = beta.sbatch_from_a_job("climate", "alice", gpus=8, comment=tag)
    beta.start(running)
    env.runtime.poller.poll("beta")
    with env.runtime.sessions() as session:
        foreign = {r.slurm_job_id for r in session.scalars(select(ForeignJobRecord))}
    assert foreign == {copied, running}  # not first_id
    action = env.runtime.settings.identity.foreign_jobs
    assert (beta.jobs[running].state == "CANCELLED") is (action == "cancel")


def test_a_move_that_falls_back_to_its_own_cluster_raises_no_foreign_alarm(env: Env) -> None:
    """When the target cannot take the job after all (here: the researcher's directory cannot be
    made there), the job is submitted again where it was. The Slurm job it left there is still
    the broker's, not a job of the researcher's own."""
    snapshot(env, alpha_idle=4, beta_idle=8)
    job = submit(env)
    first_id = str(job.slurm_job_id)
    wait_long(env, job)
    snapshot(env, alpha_idle=8, beta_idle=0)
    env.slurm["alpha"].unreachable()
    env.runtime.mover.consider("beta")
    back = env.runtime.jobs.get(env.alice, job.id)
    assert back.cluster == "beta" and back.slurm_job_id not in (None, first_id)
    env.runtime.poller.poll("beta")
    with env.runtime.sessions() as session:
        assert session.scalars(select(ForeignJobRecord)).all() == []
        assert ledger.check(session) == []


def test_a_move_waits_for_sacct_to_say_the_first_job_never_ran(env: Env) -> None:
    """squeue shows a job cancelled while pending with its cancel as its start: that is not a
    start. Until sacct has the record the move waits; the job is never given up or cancelled."""
    snapshot(env, alpha_idle=4, beta_idle=8)
    job = submit(env)
    first_id = str(job.slurm_job_id)
    wait_long(env, job)
    snapshot(env, alpha_idle=8, beta_idle=0)
    beta = env.slurm["beta"]
    beta.sacct_behind.add(first_id)
    assert env.runtime.mover.consider("beta") == 0
    assert beta.jobs[first_id].state == "CANCELLED"  # the cancel landed
    env.runtime.poller.poll("beta")  # the poller leaves a job being moved to the mover
    waiting = env.runtime.jobs.get(env.alice, job.id)
    assert (waiting.cluster, waiting.state) == ("beta", "pending")
    assert list(env.slurm["alpha"].jobs) == []

    beta.sacct_behind.clear()  # slurmdbd caught up: no allocation, so it never ran
    assert env.runtime.mover.consider("beta") == 1
    moved = env.runtime.jobs.get(env.alice, job.id)
    assert (moved.cluster, moved.state) == ("alpha", "pending")
    assert list(env.slurm["alpha"].jobs) == [moved.slurm_job_id]
    with env.runtime.sessions() as session:
        assert ledger.check(session) == []


def test_pinned_jobs_and_jobs_waiting_on_limits_never_move(env: Env) -> None:
    snapshot(env, alpha_idle=4, beta_idle=16)
    pinned = submit(env, cluster="beta")
    on_quota = submit(env, gpus=4)  # beta: 16 idle less the pinned job's 8
    assert on_quota.cluster == "beta"
    wait_long(env, pinned)
    wait_long(env, on_quota, reason="AssocGrpGRES")
    snapshot(env, alpha_idle=32, beta_idle=0)
    assert env.runtime.mover.consider("beta") == 0
    assert env.slurm["beta"].cancels == []
    assert {env.runtime.jobs.get(env.alice, j.id).cluster for j in (pinned, on_quota)} == {"beta"}


def test_a_job_that_starts_before_its_move_keeps_running_at_its_old_price(env: Env) -> None:
    snapshot(env, alpha_idle=4, beta_idle=8)
    job = submit(env)
    wait_long(env, job)
    snapshot(env, alpha_idle=8, beta_idle=0)
    env.slurm["beta"].start(str(job.slurm_job_id))  # starts in the instant before the cancel
    assert env.runtime.mover.consider("beta") == 0
    kept = env.runtime.jobs.get(env.alice, job.id)
    assert kept.cluster == "beta" and kept.reserved_gpu_hours == pytest.approx(4.0)
    with env.runtime.sessions() as session:
        assert ledger.check(session) == []
    assert env.slurm["beta"].jobs[str(job.slurm_job_id)].state == "RUNNING"
    assert list(env.slurm["alpha"].jobs) == []


def test_a_move_the_budget_cannot_pay_for_does_not_happen(database_url: str) -> None:
    env = build_env(database_url, gpu_hours=6.0)  # 4 at a100's price; 8 at h100's
    try:
        snapshot(env, alpha_idle=4, beta_idle=8)
        job = submit(env)
        wait_long(env, job)
        snapshot(env, alpha_idle=8, beta_idle=0)
        assert env.runtime.mover.consider("beta") == 0
        assert env.runtime.jobs.get(env.alice, job.id).cluster == "beta"
        assert env.slurm["beta"].cancels == []
    finally:
        env.runtime.close()


def test_a_cancel_in_the_middle_of_a_move_leaves_no_slurm_job(env: Env) -> None:
    snapshot(env, alpha_idle=4, beta_idle=8)
    job = submit(env)
    wait_long(env, job)
    snapshot(env, alpha_idle=8, beta_idle=0)
    mover = env.runtime.mover
    (job_id,) = mover._waiting_too_long("beta")
    mover._decide(job_id, None)
    env.runtime.jobs.cancel(env.alice, job.id)  # the user cancels now
    assert mover.consider("beta") == 0
    done = env.runtime.jobs.get(env.alice, job.id)
    assert done.state == "cancelled" and done.reserved_gpu_hours == 0.0
    assert all(j.state == "CANCELLED" for j in env.slurm["beta"].jobs.values())
    assert list(env.slurm["alpha"].jobs) == []
