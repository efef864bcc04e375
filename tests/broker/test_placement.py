"""Placement of jobs that name no cluster, with scripted clusters (both databases)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from broker.db.models import JobRecord
from broker.schemas import JobCreate, JobPublic
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
