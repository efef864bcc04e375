"""A new quota period: live reservations carry over, and a straddling job is charged by the hour
to each period. Driven through the service and the REST API with scripted clusters, on both
databases.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from broker.api.app import create_app
from broker.db.engine import transaction
from broker.db.models import JobRecord, ProjectRecord, QuotaRecord
from broker.errors import QuotaExceeded
from broker.metrics.state import read_state
from broker.schemas import JobCreate, QuotaPut
from broker.service import ledger, projects, reports
from tests.broker.harness import Env, build_env
from tests.broker.http_api import token

HOUR = timedelta(hours=1)


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url, gpu_hours=100.0)
    yield environment
    environment.runtime.close()


def job(**fields: object) -> JobCreate:
    body: dict[str, object] = {
        "project": "climate",
        "script": "#!/bin/bash\nsrun python train.py\n",
        "gpus": 8,
        "time_limit_minutes": 240,
        "cluster": "alpha",
    }
    body.update(fields)
    return JobCreate.model_validate(body)


def open_period(env: Env, start: datetime, gpu_hours: float) -> None:
    """The admin opens a new period for ``climate`` starting at ``start``."""
    with transaction(env.runtime.sessions) as session:
        projects.put_quota(
            session,
            env.admin,
            "climate",
            QuotaPut(
                period_start=start,
                period_end=start + 365 * 24 * HOUR,
                gpu_hours=gpu_hours,
                gpu_type_weights={"h100": 1.0, "a100": 0.5},
            ),
        )


def ledger_of(env: Env, project: str = "climate") -> tuple[int, int]:
    with env.runtime.sessions() as session:
        project_id = session.query(ProjectRecord.id).filter_by(name=project).scalar()
        snap = ledger.snapshot(session, project_id, session.get(QuotaRecord, project_id))
    return snap.used_gpu_seconds, snap.reserved_gpu_seconds


def usage_report(env: Env, start: datetime | None, end: datetime | None) -> dict[str, float]:
    with env.runtime.sessions() as session:
        report = reports.usage(session, env.admin, "project", start, end)
    return {row.key: row.gpu_hours for row in report.data}


def test_a_job_straddling_the_period_start_charges_each_period_for_what_ran_in_it(
    env: Env,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    started, ended = now - 3 * HOUR, now - 1 * HOUR
    boundary = started + 30 * timedelta(minutes=1)  # a quarter of the run is before it
    old_start = now - 24 * HOUR
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    slurm_id = submitted.slurm_job_id or ""
    env.slurm["alpha"].start(slurm_id, at=started)
    env.runtime.poller.poll("alpha")

    open_period(env, boundary, gpu_hours=100.0)
    # Still running: the job keeps its whole reservation in the new period.
    assert ledger_of(env) == (0, 8 * 240 * 60)

    env.slurm["alpha"].finish(slurm_id, "COMPLETED", elapsed_s=7200, at=ended)
    env.runtime.poller.poll("alpha")

    charge = 8 * 7200
    assert env.runtime.jobs.get(env.alice, submitted.id).charged_gpu_hours == charge / 3600
    # The new period is charged the three quarters run after its start, exactly; nothing held.
    assert ledger_of(env) == (charge * 3 // 4, 0)
    # The old period keeps the quarter before; together they are the whole charge.
    assert usage_report(env, old_start, boundary) == {"climate": charge / 4 / 3600}
    assert usage_report(env, boundary, None) == {"climate": charge * 3 / 4 / 3600}
    assert usage_report(env, None, None) == {"climate": charge / 3600}
    # A window inside the run takes its proportional share.
    assert usage_report(env, started + HOUR, ended) == {"climate": charge / 2 / 3600}

    with env.runtime.sessions() as session:
        usage = projects.usage(session, env.admin, "climate")
        metrics = read_state(session).ledgers["climate"]
    assert usage.used_gpu_hours == charge * 3 / 4 / 3600
    assert usage.by_cluster == {"alpha": charge * 3 / 4 / 3600}
    assert usage.by_user == {"alice": charge * 3 / 4 / 3600}
    assert usage.remaining_gpu_hours == 100.0 - charge * 3 / 4 / 3600
    assert (metrics.used, metrics.reserved) == (charge * 3 // 4, 0)


def test_a_job_live_across_the_period_start_keeps_its_reservation_and_admission_counts_it(
    env: Env,
) -> None:
    now = datetime.now(UTC)
    first = env.runtime.jobs.submit(env.alice, job(time_limit_minutes=60), None).job
    with transaction(env.runtime.sessions) as session:
        session.execute(
            update(JobRecord)
            .where(JobRecord.id == first.id)
            .values(submitted_at=now - 48 * HOUR)  # admitted in an earlier period
        )
    open_period(env, now - HOUR, gpu_hours=10.0)

    assert ledger_of(env) == (0, 8 * 3600)
    with pytest.raises(QuotaExceeded) as refused:
        env.runtime.jobs.submit(env.alice, job(time_limit_minutes=60), None)
    assert refused.value.extra["reserved"] == 8.0
    assert refused.value.extra["remaining"] == 2.0
    assert env.slurm["alpha"].submits == 1
    # What does fit is admitted.
    env.runtime.jobs.submit(env.alice, job(gpus=2, time_limit_minutes=60), None)
    assert ledger_of(env) == (0, 10 * 3600)


def test_usage_endpoints_agree_with_the_ledger(env: Env) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    boundary = now - 2 * HOUR
    straddler = env.runtime.jobs.submit(env.alice, job(), None).job
    inside = env.runtime.jobs.submit(env.alice, job(cluster="beta", gpus=4), None).job
    env.runtime.jobs.submit(env.alice, job(gpus=2), None)  # still pending: reserved only
    fake = env.slurm
    fake["alpha"].start(straddler.slurm_job_id or "", at=now - 4 * HOUR)
    fake["beta"].start(inside.slurm_job_id or "", at=now - HOUR)
    env.runtime.poller.poll("alpha")
    env.runtime.poller.poll("beta")
    open_period(env, boundary, gpu_hours=100.0)
    fake["alpha"].finish(straddler.slurm_job_id or "", "COMPLETED", 3 * 3600, at=now - HOUR)
    fake["beta"].finish(inside.slurm_job_id or "", "FAILED", 1800, at=now - HOUR / 2)
    env.runtime.poller.poll("alpha")
    env.runtime.poller.poll("beta")

    used, reserved = ledger_of(env)
    # 8 GPUs for 3 h, the last third after the boundary; 4 A100 (weight 0.5) for half an hour.
    assert used == 8 * 3 * 3600 // 3 + 4 * 1800 // 2
    assert reserved == 2 * 240 * 60

    with TestClient(create_app(env.runtime)) as api:
        eve = token(env, "eve")
        body: dict[str, Any] = api.get("/v1/projects/climate/usage", headers=eve).json()
        report = api.get(
            "/v1/usage",
            params={"from": boundary.isoformat(), "group_by": "cluster"},
            headers=eve,
        ).json()
    assert body["used_gpu_hours"] == used / 3600
    assert body["reserved_gpu_hours"] == reserved / 3600
    assert body["remaining_gpu_hours"] == 100.0 - (used + reserved) / 3600
    assert body["by_gpu_type"] == {"h100": 8.0, "a100": 1.0}
    assert sum(row["gpu_hours"] for row in report["data"]) == used / 3600
    assert {row["key"]: row["gpu_hours"] for row in report["data"]} == {"alpha": 8.0, "beta": 1.0}
