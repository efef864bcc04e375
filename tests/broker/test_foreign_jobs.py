"""Jobs in a project's account that the broker did not submit (API.md, "Identity on the clusters").

A job's script may call sbatch into its own project's account (Slurm allows it: the researcher
has that association). The poller finds such a job in its one squeue of the projects' accounts,
cancels it within the cycle (or only charges it, as configured), audits it, counts it, and charges
what it used to the project once sacct has its end. The same runs on the real dev cluster in
tests/e2e/test_identity_on_slurm.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from broker.db.models import AuditRecord, ForeignJobRecord
from broker.schemas import JobCreate
from broker.service import projects
from tests.broker.harness import Env, build_env


@pytest.fixture(params=["cancel", "charge"])
def env(request: pytest.FixtureRequest, database_url: str) -> Iterator[Env]:
    environment = build_env(
        database_url, gpu_hours=100.0, identity_settings={"foreign_jobs": request.param}
    )
    yield environment
    environment.runtime.close()


def used(env: Env, project: str = "climate") -> tuple[float, float]:
    with env.runtime.sessions() as session:
        usage = projects.usage(session, env.admin, project)
    return usage.used_gpu_hours, usage.foreign_gpu_hours


def test_a_foreign_job_is_handled_within_one_cycle_audited_and_charged(env: Env) -> None:
    slurm = env.slurm["alpha"]
    action = env.runtime.settings.identity.foreign_jobs
    ours = env.runtime.jobs.submit(
        env.alice,
        JobCreate.model_validate(
            {"project": "climate", "script": "#!/bin/sh\n", "gpus": 1, "time_limit_minutes": 5}
            | {"cluster": "alpha"}
        ),
        None,
    ).job
    foreign = slurm.sbatch_from_a_job("climate", "alice", gpus=4)
    slurm.start(foreign)
    report = env.runtime.poller.poll("alpha")
    assert report.ok and report.foreign == [action]
    # The broker's own job is not foreign; the other one was cancelled at once, or left running.
    assert slurm.jobs[ours.slurm_job_id or ""].state == "PENDING"
    assert (slurm.jobs[foreign].state == "CANCELLED") is (action == "cancel")
    with env.runtime.sessions() as session:
        audit = session.scalars(
            select(AuditRecord).where(AuditRecord.action == f"foreign_job.{action}")
        ).all()
        assert [(a.actor, a.target) for a in audit] == [("poller", f"alpha/{foreign}")]
        assert audit[0].details["project"] == "climate" and audit[0].details["unix_user"] == "alice"
    if action == "charge":
        slurm.finish(foreign, "COMPLETED", elapsed_s=900, alloc_gpus=4)
    else:
        slurm.finish(foreign, "CANCELLED", elapsed_s=30, alloc_gpus=4)
    second = env.runtime.poller.poll("alpha")
    assert second.foreign == []  # seen once, counted once
    seconds = 900 if action == "charge" else 30
    with env.runtime.sessions() as session:
        row = session.scalars(select(ForeignJobRecord)).one()
        assert row.charged_gpu_seconds == 4 * seconds  # h100 weight 1.0
    used_hours, foreign_hours = used(env)
    assert foreign_hours == pytest.approx(4 * seconds / 3600)
    assert used_hours == pytest.approx(4 * seconds / 3600)  # the project pays for it
    assert used(env, "other") == (0.0, 0.0)


def test_jobs_of_other_accounts_and_the_brokers_own_are_never_foreign(env: Env) -> None:
    slurm = env.slurm["alpha"]
    outside = slurm.sbatch_from_a_job("dev", "alice", gpus=1)  # not a project's account
    slurm.start(outside)
    body = {"project": "other", "script": "#!/bin/sh\n", "gpus": 1, "time_limit_minutes": 5}
    mine = env.runtime.jobs.submit(
        env.bob, JobCreate.model_validate(body | {"cluster": "alpha"}), None
    )
    report = env.runtime.poller.poll("alpha")
    assert report.foreign == []
    assert slurm.jobs[outside].state == "RUNNING"
    assert slurm.jobs[mine.job.slurm_job_id or ""].state == "PENDING"
