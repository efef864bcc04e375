"""Exactly one poller is active across processes sharing a database (the lease row)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import update

from broker.clock import utcnow
from broker.db.engine import transaction
from broker.db.models import ClusterStatusRecord, LeaseRecord
from broker.scheduler import PollerSchedule
from broker.schemas import JobCreate
from broker.service import lease
from tests.broker.harness import Env, build_env


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url)
    yield environment
    environment.runtime.close()


def test_one_holder_at_a_time_and_takeover_after_expiry(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = env.runtime.sessions
    clock = [utcnow()]  # the lease's own clock, moved by the test: no race with a slow machine
    monkeypatch.setattr(lease, "utcnow", lambda: clock[0])
    assert lease.acquire(sessions, "poller", "a", ttl_seconds=30)
    assert not lease.acquire(sessions, "poller", "b", ttl_seconds=30)
    clock[0] += timedelta(seconds=20)
    assert lease.acquire(sessions, "poller", "a", ttl_seconds=30)  # renewal, to 50 s
    clock[0] += timedelta(seconds=20)
    assert not lease.acquire(sessions, "poller", "b", ttl_seconds=30)  # renewed: still a's
    clock[0] += timedelta(seconds=11)  # expired
    assert lease.acquire(sessions, "poller", "b", ttl_seconds=30)
    assert not lease.acquire(sessions, "poller", "a", ttl_seconds=30)
    lease.release(sessions, "poller", "b")
    clock[0] += timedelta(seconds=1)
    assert lease.acquire(sessions, "poller", "a", ttl_seconds=30)


def test_racing_processes_elect_exactly_one(env: Env) -> None:
    sessions = env.runtime.sessions
    with ThreadPoolExecutor(max_workers=8) as pool:
        won = list(pool.map(lambda i: lease.acquire(sessions, "race", f"h{i}", 30), range(8)))
    assert won.count(True) == 1


def test_only_the_lease_holder_polls(env: Env) -> None:
    settings, poller = env.runtime.settings, env.runtime.poller
    first = PollerSchedule(env.runtime.sessions, poller, settings)
    second = PollerSchedule(env.runtime.sessions, poller, settings)
    assert first.tick("alpha")
    assert not second.tick("alpha")
    assert not second.tick("beta")
    first.shutdown()  # releases the lease: the other takes over at its next tick
    assert second.tick("alpha")


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_poller_that_lost_its_lease_mid_cycle_writes_nothing(env: Env) -> None:
    settings, poller = env.runtime.settings, env.runtime.poller
    first = PollerSchedule(env.runtime.sessions, poller, settings)
    submitted = env.runtime.jobs.submit(env.alice, _job(), None).job
    fake = env.slurm["alpha"]
    fake.finish(submitted.slurm_job_id or "", "COMPLETED", elapsed_s=900)
    sessions = env.runtime.sessions

    def taken_over() -> None:
        # The cycle stalled past its lease (a slow Slurm, a GC pause): another replica took it.
        with transaction(sessions) as session:
            session.execute(update(LeaseRecord).values(expires_at=utcnow()))
        assert lease.acquire(sessions, "poller", "other-replica", ttl_seconds=30)

    fake.on_statuses = taken_over
    assert not first.tick("alpha")
    job = env.runtime.jobs.get(env.alice, submitted.id)
    assert job.state == "pending" and job.charged_gpu_hours is None
    events = [e.to_state for e in env.runtime.jobs.events(env.alice, submitted.id).data]
    assert events == ["submitting", "pending"]
    with sessions() as session:
        assert session.get(ClusterStatusRecord, "alpha") is None
        assert session.get_one(LeaseRecord, "poller").holder == "other-replica"


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_cycle_longer_than_the_lease_keeps_it_by_renewing(database_url: str) -> None:
    env = build_env(database_url, lease_seconds=1.5)
    try:
        settings, poller = env.runtime.settings, env.runtime.poller
        first = PollerSchedule(env.runtime.sessions, poller, settings)
        submitted = env.runtime.jobs.submit(env.alice, _job(), None).job
        env.slurm["alpha"].finish(submitted.slurm_job_id or "", "COMPLETED", elapsed_s=900)
        others: list[bool] = []

        def slow_slurm() -> None:
            time.sleep(0.9)  # two of these per cycle: longer than the lease
            others.append(lease.acquire(env.runtime.sessions, "poller", "other", 30))

        env.slurm["alpha"].on_statuses = slow_slurm
        started = time.monotonic()
        assert first.tick("alpha")
        assert time.monotonic() - started > 1.5
        assert others == [False, False]
        assert env.runtime.jobs.get(env.alice, submitted.id).state == "completed"
    finally:
        env.runtime.close()


def _job() -> JobCreate:
    return JobCreate.model_validate(
        {
            "project": "climate",
            "script": "#!/bin/bash\ntrue\n",
            "gpus": 8,
            "time_limit_minutes": 60,
            "cluster": "alpha",
        }
    )
