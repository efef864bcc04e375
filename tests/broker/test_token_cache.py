"""The token cache on PostgreSQL: used only while its listener is connected, dropped by a change
committed anywhere; and pooled connections the server closed are replaced without a ping."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text

from broker.db.engine import make_engine, make_session_factory, transaction
from broker.db.migrate import upgrade
from broker.schemas import UserCreate
from broker.service import identity
from broker.service.identity import hash_token
from broker.service.tokens import LISTENER_NAME, IdentityCache
from tests.pgdb import throwaway_database

pytestmark = pytest.mark.postgres


@pytest.fixture
def url() -> Iterator[str]:
    with throwaway_database("broker_tokens") as database:
        engine = make_engine(database)
        upgrade(engine)
        engine.dispose()
        yield database


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _terminate(url: str, where: str) -> int:
    """pg_terminate_backend every other connection to the database matching ``where``."""
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = current_database() AND pid <> pg_backend_pid() AND {where}"
        ).fetchall()
    return len(rows)


def test_the_cache_serves_only_while_its_listener_is_connected_and_drops_on_changes(
    url: str,
) -> None:
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        identity.create_user(session, "test", UserCreate(name="alice", role="researcher"))
        issued = identity.issue_token(session, "test", "alice", "t")
    cache = IdentityCache(sessions, 30.0, shared=True)
    assert not cache.usable  # no listener yet: every request goes to the database
    cache.start(engine)
    try:
        assert cache.listener is not None and cache.listener.wait_healthy(10)
        key = hash_token(issued.token)
        with transaction(sessions) as session:
            actor = identity.authenticate(session, issued.token)
        cache.put(key, actor, cache.generation)
        assert cache.get(key) == actor

        # The listener's connection is killed: the cache is dropped and bypassed at once...
        assert _terminate(url, f"application_name = '{LISTENER_NAME}'") == 1
        deadline = time.monotonic() + 5
        while cache.get(key) is not None:
            assert time.monotonic() < deadline, "the cache kept serving without its listener"
            time.sleep(0.01)
        # ... until it is back.
        assert cache.listener.wait_healthy(15)
        cache.put(key, actor, cache.generation)
        assert cache.get(key) == actor

        # A change committed through another engine (another process) reaches this cache.
        other = make_engine(url)
        try:
            with transaction(make_session_factory(other)) as session:
                identity.revoke_token(session, "test", "alice", issued.id)
        finally:
            other.dispose()
        deadline = time.monotonic() + 2
        while cache.get(key) is not None:
            assert time.monotonic() < deadline, "the notification did not drop the cache"
            time.sleep(0.005)

        # A look-up that raced a change is not stored.
        stale = cache.generation
        cache.invalidate()
        cache.put(key, actor, stale)
        assert cache.get(key) is None
    finally:
        cache.close()
        engine.dispose()


def test_pooled_connections_closed_by_the_server_are_replaced_without_an_error(url: str) -> None:
    engine = make_engine(url, pool_size=3)
    try:
        connections = [engine.connect() for _ in range(3)]
        for connection in connections:
            connection.execute(text("SELECT 1"))
            connection.close()  # back to the pool, idle
        assert _terminate(url, "application_name <> 'x' AND state = 'idle'") >= 3
        time.sleep(0.2)  # the server's goodbye reaches the sockets
        for _ in range(5):
            with engine.connect() as connection:
                assert connection.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
