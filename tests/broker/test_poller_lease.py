"""Exactly one poller is active across processes sharing a database (the lease row)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from broker.scheduler import PollerSchedule
from broker.service import lease
from tests.broker.harness import Env, build_env


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url)
    yield environment
    environment.runtime.close()


def test_one_holder_at_a_time_and_takeover_after_expiry(env: Env) -> None:
    sessions = env.runtime.sessions
    assert lease.acquire(sessions, "poller", "a", ttl_seconds=0.5)
    assert not lease.acquire(sessions, "poller", "b", ttl_seconds=0.5)
    assert lease.acquire(sessions, "poller", "a", ttl_seconds=0.5)  # renewal
    time.sleep(0.6)  # the lease's own clock: let it expire
    assert lease.acquire(sessions, "poller", "b", ttl_seconds=30)
    assert not lease.acquire(sessions, "poller", "a", ttl_seconds=30)
    lease.release(sessions, "poller", "b")
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
