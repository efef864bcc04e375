"""The poller and money: what it charges when Slurm's answer is incomplete, wrong or someone
else's, and that one bad job cannot stop a cycle. Scripted clusters, both databases."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from broker.schemas import JobCreate, JobPublic
from broker.service.poller import ACCOUNTING_PATIENCE_POLLS
from tests.broker.harness import Env, build_env

SCRIPT = "#!/bin/bash\nsrun python train.py\n"
RESERVATION_H = 8.0  # 8 GPUs x 60 minutes x weight 1 (h100 on alpha)


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url, gpu_hours=100.0)
    yield environment
    environment.runtime.close()


def submit(env: Env, **fields: object) -> JobPublic:
    body: dict[str, object] = {
        "project": "climate",
        "script": SCRIPT,
        "gpus": 8,
        "time_limit_minutes": 60,
        "cluster": "alpha",
    }
    body.update(fields)
    return env.runtime.jobs.submit(env.alice, JobCreate.model_validate(body), None).job


def get(env: Env, job: JobPublic) -> JobPublic:
    return env.runtime.jobs.get(env.alice, job.id)


def last_reason(env: Env, job: JobPublic) -> str:
    return env.runtime.jobs.events(env.alice, job.id).data[-1].reason or ""


def used_hours(env: Env) -> float:
    from broker.service import projects

    with env.runtime.sessions() as session:
        return projects.usage(session, env.admin, "climate").used_gpu_hours


# --- sacct after a slurmdbd restart: COMPLETED with End=Unknown ------------------------------


def test_a_final_record_without_an_end_time_is_not_settled(env: Env) -> None:
    job = submit(env)
    fake = env.slurm["alpha"]
    fake.start(job.slurm_job_id or "", at=datetime.now(UTC) - timedelta(minutes=15))
    env.runtime.poller.poll("alpha")
    # ElapsedRaw keeps counting while End is Unknown: charging from it would overcharge.
    fake.finish(job.slurm_job_id or "", "COMPLETED", elapsed_s=50_000, end_known=False)
    for _ in range(3):
        env.runtime.poller.poll("alpha")
        assert get(env, job).state == "running"
    # slurmctld resent the end: the record is final now and gives the real run time.
    fake.finish(job.slurm_job_id or "", "COMPLETED", elapsed_s=900)
    env.runtime.poller.poll("alpha")
    done = get(env, job)
    assert done.state == "completed"
    assert done.charged_gpu_hours == pytest.approx(8 * 900 / 3600)


def test_a_record_without_its_end_or_comment_is_still_this_job(env: Env) -> None:
    """sacct stores the comment with the job's end: across a slurmdbd restart the record has
    neither. Matched by name and submit time, it waits instead of becoming a lost job."""
    job = submit(env)
    fake = env.slurm["alpha"]
    fake.start(job.slurm_job_id or "", at=datetime.now(UTC) - timedelta(minutes=15))
    env.runtime.poller.poll("alpha")
    fake.finish(job.slurm_job_id or "", "COMPLETED", elapsed_s=50_000, end_known=False)
    fake.jobs[job.slurm_job_id or ""].comment = None
    for _ in range(5):  # more than missing_polls_before_unknown
        env.runtime.poller.poll("alpha")
        assert get(env, job).state == "running"
    fake.finish(job.slurm_job_id or "", "COMPLETED", elapsed_s=900)
    record = fake.jobs[job.slurm_job_id or ""]
    record.comment = f"{record.spec.tag} user=alice"
    env.runtime.poller.poll("alpha")
    assert get(env, job).charged_gpu_hours == pytest.approx(8 * 900 / 3600)


def test_a_record_that_never_gets_its_end_is_settled_capped_at_the_reservation(env: Env) -> None:
    job = submit(env)
    fake = env.slurm["alpha"]
    fake.start(job.slurm_job_id or "", at=datetime.now(UTC) - timedelta(hours=5))
    env.runtime.poller.poll("alpha")
    fake.finish(job.slurm_job_id or "", "COMPLETED", elapsed_s=5 * 3600, end_known=False)
    for _ in range(ACCOUNTING_PATIENCE_POLLS):
        env.runtime.poller.poll("alpha")
    done = get(env, job)
    assert done.state == "completed"
    assert done.charged_gpu_hours == pytest.approx(RESERVATION_H)  # not 8 x 5 hours
    assert "capped at its reservation" in last_reason(env, job)


def test_no_charge_exceeds_the_reservation(env: Env) -> None:
    job = submit(env)
    # Slurm reports more GPUs and more time than were reserved (a misconfigured node, OverTime).
    env.slurm["alpha"].finish(job.slurm_job_id or "", "TIMEOUT", elapsed_s=7200, alloc_gpus=16)
    env.runtime.poller.poll("alpha")
    done = get(env, job)
    assert done.state == "timeout"
    assert done.charged_gpu_hours == pytest.approx(RESERVATION_H)
    assert "capped at its reservation (28800 of 115200 GPU-s)" in last_reason(env, job)
    assert used_hours(env) == pytest.approx(RESERVATION_H)


# --- jobs Slurm loses --------------------------------------------------------------------------


def test_a_lost_job_that_ran_is_charged_its_run_time_and_counted(env: Env) -> None:
    job = submit(env)
    fake = env.slurm["alpha"]
    fake.start(job.slurm_job_id or "", at=datetime.now(UTC) - timedelta(minutes=30))
    env.runtime.poller.poll("alpha")
    fake.jobs.clear()  # neither squeue nor sacct knows it any more
    for _ in range(3):
        env.runtime.poller.poll("alpha")
    lost = get(env, job)
    assert lost.state == "unknown"
    assert lost.charged_gpu_hours == pytest.approx(8 * 0.5, abs=0.01)
    assert lost.reserved_gpu_hours == 0.0
    registry = env.runtime.metrics.registry
    assert registry.get_sample_value("broker_jobs_lost_total", {"cluster": "alpha"}) == 1.0


def test_a_lost_job_that_ran_longer_than_its_limit_is_charged_its_reservation(env: Env) -> None:
    job = submit(env)
    fake = env.slurm["alpha"]
    fake.start(job.slurm_job_id or "", at=datetime.now(UTC) - timedelta(hours=3))
    env.runtime.poller.poll("alpha")
    fake.jobs.clear()
    for _ in range(3):
        env.runtime.poller.poll("alpha")
    assert get(env, job).charged_gpu_hours == pytest.approx(RESERVATION_H)


def test_a_lost_job_that_never_started_is_charged_nothing(env: Env) -> None:
    job = submit(env)
    env.slurm["alpha"].jobs.clear()
    for _ in range(3):
        env.runtime.poller.poll("alpha")
    lost = get(env, job)
    assert lost.state == "unknown" and lost.charged_gpu_hours == 0.0
    registry = env.runtime.metrics.registry
    assert registry.get_sample_value("broker_jobs_lost_total", {"cluster": "alpha"}) == 1.0


# --- one Slurm id, several jobs: followed by broker job, told apart by tag -------------------


def test_two_broker_jobs_with_one_slurm_id_are_followed_apart(env: Env) -> None:
    fake = env.slurm["alpha"]
    first = submit(env)
    fake.start(first.slurm_job_id or "", at=datetime.now(UTC) - timedelta(minutes=30))
    env.runtime.poller.poll("alpha")
    fake.reuse_ids()  # the controller lost its state: the next job gets the same id
    second = submit(env, gpus=2)
    assert second.slurm_job_id == first.slurm_job_id
    # squeue now shows the second job under that id; the first is not there as itself.
    for _ in range(2):
        env.runtime.poller.poll("alpha")
        assert (get(env, first).state, get(env, second).state) == ("running", "pending")
    env.runtime.poller.poll("alpha")
    assert get(env, first).state == "unknown"  # lost: charged its 30 minutes
    assert get(env, first).charged_gpu_hours == pytest.approx(8 * 0.5, abs=0.01)
    assert get(env, second).state == "pending"
    fake.finish(second.slurm_job_id or "", "COMPLETED", elapsed_s=600)
    env.runtime.poller.poll("alpha")
    assert get(env, second).state == "completed"
    assert get(env, second).charged_gpu_hours == pytest.approx(2 * 600 / 3600)
    assert get(env, first).charged_gpu_hours == pytest.approx(8 * 0.5, abs=0.01)


def test_sacct_records_under_one_id_are_matched_by_tag(env: Env) -> None:
    fake = env.slurm["alpha"]
    first = submit(env)
    fake.reuse_ids()
    second = submit(env, gpus=2)
    assert second.slurm_job_id == first.slurm_job_id
    # Both ended; sacct holds both records under the one id, the newest first.
    fake.earlier[first.slurm_job_id or ""][0].state = "COMPLETED"
    old = fake.earlier[first.slurm_job_id or ""][0]
    old.elapsed_s, old.alloc_gpus, old.started = 900, 8, datetime.now(UTC) - timedelta(hours=1)
    old.ended = old.started + timedelta(seconds=900)
    fake.finish(second.slurm_job_id or "", "FAILED", elapsed_s=60, exit_code=1)
    env.runtime.poller.poll("alpha")
    one, two = get(env, first), get(env, second)
    assert one.state == "completed"
    assert one.charged_gpu_hours == pytest.approx(8 * 900 / 3600)
    assert two.state == "failed"
    assert two.charged_gpu_hours == pytest.approx(2 * 60 / 3600)


def test_a_record_with_a_foreign_tag_is_never_applied(env: Env) -> None:
    job = submit(env)
    fake = env.slurm["alpha"]
    # The id now answers for another job (another broker's, a researcher's own sbatch).
    fake.finish(job.slurm_job_id or "", "COMPLETED", elapsed_s=900)
    fake.jobs[job.slurm_job_id or ""].comment = "brk-00000000-someone-else user=mallory"
    for _ in range(2):
        env.runtime.poller.poll("alpha")
        assert get(env, job).state == "pending"
    env.runtime.poller.poll("alpha")
    lost = get(env, job)
    assert lost.state == "unknown" and lost.charged_gpu_hours == 0.0  # never seen running


def test_a_job_whose_owner_overwrote_its_tag_is_still_followed_and_charged(env: Env) -> None:
    """``scontrol update comment=...`` is the job owner's right: a researcher who wipes the tag of
    their running job must not make it look lost, which would release it unpaid while it runs."""
    job = submit(env)
    fake = env.slurm["alpha"]
    slurm_job = fake.jobs[job.slurm_job_id or ""]
    slurm_job.submitted = datetime.now(UTC)
    fake.start(job.slurm_job_id or "", at=datetime.now(UTC) - timedelta(minutes=10))
    slurm_job.comment = "mine now"
    for _ in range(5):
        env.runtime.poller.poll("alpha")
        assert get(env, job).state == "running"
    fake.finish(job.slurm_job_id or "", "COMPLETED", elapsed_s=1800)
    env.runtime.poller.poll("alpha")
    done = get(env, job)
    assert done.state == "completed"
    assert done.charged_gpu_hours == pytest.approx(8 * 1800 / 3600)


# --- one bad job does not stop the cycle ------------------------------------------------------


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_one_job_whose_update_fails_does_not_stop_the_others(env: Env) -> None:
    fake = env.slurm["alpha"]
    jobs = [submit(env, gpus=1) for _ in range(3)]
    # The middle job's exit code does not fit its column: PostgreSQL refuses that row's update.
    for number, job in enumerate(jobs):
        exit_code = 2**31 if number == 1 else 0
        fake.finish(job.slurm_job_id or "", "COMPLETED", elapsed_s=360, exit_code=exit_code)
    report = env.runtime.poller.poll("alpha")
    assert report.ok and report.failed_jobs == 1
    assert report.settled == {"completed": 2}
    states = [get(env, job).state for job in jobs]
    assert states == ["completed", "pending", "completed"]
    assert used_hours(env) == pytest.approx(2 * 360 / 3600)
    # Fixed on Slurm's side, it settles at the next cycle.
    fake.jobs[jobs[1].slurm_job_id or ""].exit_code = 0
    env.runtime.poller.poll("alpha")
    assert get(env, jobs[1]).state == "completed"
