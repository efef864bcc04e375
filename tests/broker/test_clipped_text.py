"""Free text longer than its column (a Slurm reason, an sbatch refusal) is clipped, never fatal.

PostgreSQL refuses a value longer than its VARCHAR, so these run on both databases: before the
clipping type, one long ``ReqNodeNotAvail`` reason failed every poll of its cluster, and one long
sbatch refusal made a submission answer 500 with its reservation held.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from broker.api.app import create_app
from broker.db.engine import transaction
from broker.db.models import (
    AuditRecord,
    ClippedString,
    ClusterStatusRecord,
    JobEventRecord,
    JobRecord,
    clip,
)
from broker.errors import SubmitRejected
from broker.schemas import JobCreate
from broker.service import projects
from tests.broker.harness import Env, build_env
from tests.broker.http_api import token

LONG_REASON = "ReqNodeNotAvail, UnavailableNodes:" + ",".join(
    f"gpu-node-{i:04d}" for i in range(70)
)
ELLIPSIS = ClippedString.ELLIPSIS


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url, gpu_hours=100.0)
    yield environment
    environment.runtime.close()


def job() -> JobCreate:
    return JobCreate.model_validate(
        {
            "project": "climate",
            "script": "#!/bin/bash\nsrun hostname\n",
            "gpus": 2,
            "time_limit_minutes": 60,
            "cluster": "alpha",
        }
    )


def test_clip_keeps_short_text_and_marks_the_cut() -> None:
    assert clip("Resources", 200) == "Resources"
    assert clip("x" * 200, 200) == "x" * 200
    assert clip("x" * 201, 200) == "x" * 199 + ELLIPSIS
    assert clip("bad\x00byte", 200) == "bad\ufffdbyte"


def test_a_long_text_stored_through_the_orm_is_clipped_not_refused(env: Env) -> None:
    assert len(LONG_REASON) > 1000
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    with transaction(env.runtime.sessions) as session:
        row = session.get_one(JobRecord, submitted.id)
        row.state_reason = LONG_REASON
        session.add(
            JobEventRecord(
                job_id=row.id,
                at=datetime.now(UTC),
                from_state="pending",
                to_state="pending",
                reason=LONG_REASON,
            )
        )
        session.add(ClusterStatusRecord(name="gamma", up=False, last_error=LONG_REASON))
    with env.runtime.sessions() as session:
        row = session.get_one(JobRecord, submitted.id)
        event = session.scalars(
            select(JobEventRecord).where(JobEventRecord.reason.startswith("ReqNodeNotAvail"))
        ).one()
        error = session.get_one(ClusterStatusRecord, "gamma").last_error
    assert row.state_reason == LONG_REASON[:199] + ELLIPSIS
    assert event.reason == LONG_REASON[:299] + ELLIPSIS
    assert error == LONG_REASON[:499] + ELLIPSIS


def test_a_poll_that_sees_a_long_slurm_reason_succeeds(env: Env) -> None:
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    fake = env.slurm["alpha"].jobs[submitted.slurm_job_id or ""]
    fake.reason = LONG_REASON

    report = env.runtime.poller.poll("alpha")

    assert report.ok, report.error
    seen = env.runtime.jobs.get(env.alice, submitted.id)
    assert seen.state == "pending"
    assert seen.state_reason == LONG_REASON[:199] + ELLIPSIS
    with env.runtime.sessions() as session:
        assert session.get_one(ClusterStatusRecord, "alpha").up


def test_a_long_sbatch_refusal_is_a_422_with_the_reservation_released(env: Env) -> None:
    env.slurm["alpha"].refuse_next_submit = "Invalid feature specification: " + "x" * 1000

    with pytest.raises(SubmitRejected):
        env.runtime.jobs.submit(env.alice, job(), None)

    with env.runtime.sessions() as session:
        refused = session.scalars(select(JobRecord)).one()
        usage = projects.usage(session, env.admin, "climate")
    assert refused.state == "submit_failed"
    assert refused.reserved_gpu_seconds == 0
    assert refused.state_reason is not None and refused.state_reason.endswith(ELLIPSIS)
    assert usage.reserved_gpu_hours == 0.0

    # The same through HTTP: a problem document, not a 500.
    env.slurm["alpha"].refuse_next_submit = "Invalid feature specification: " + "y" * 1000
    alice = token(env, "alice")
    with TestClient(create_app(env.runtime)) as api:
        response = api.post(
            "/v1/jobs", json=job().model_dump(mode="json", exclude_none=True), headers=alice
        )
        climate = api.get("/v1/projects/climate/usage", headers=alice).json()
    assert response.status_code == 422, response.text
    assert response.json()["type"] == "submit-rejected"
    assert climate["reserved_gpu_hours"] == 0.0


def test_a_long_audit_target_is_clipped(env: Env) -> None:
    with transaction(env.runtime.sessions) as session:
        session.add(
            AuditRecord(
                at=datetime.now(UTC),
                actor="root",
                action="test",
                target_type="project",
                target="t" * 1000,
                details={},
            )
        )
    with env.runtime.sessions() as session:
        target = session.scalars(select(AuditRecord.target).where(AuditRecord.action == "test"))
        assert target.one() == "t" * 199 + ELLIPSIS
