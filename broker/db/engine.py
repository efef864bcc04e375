"""Engines and sessions for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> Engine:
    """Create an engine with the settings each backend needs to be safe under concurrency."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=pool_size * 2,
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    engine = create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size * 2,
        pool_recycle=RECYCLE_SECONDS,
        connect_args={"keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3},
    )
    event.listen(engine, "checkout", _check_idle_connection)
    return engine


RECYCLE_SECONDS = 1800
"""A pooled connection older than this is closed and opened anew at its next checkout."""


def _check_idle_connection(
    dbapi_connection: Any, connection_record: Any, connection_proxy: Any
) -> None:
    """Refuse a pooled connection the server has closed, without a round trip.

    A connection resting in the pool has nothing to read: if its socket is readable (or closed),
    the server went away or said goodbye (a restart, ``pg_terminate_backend``, an idle timeout
    sends a FATAL message and closes). Then ``DisconnectionError`` makes the pool drop it and
    check out, or open, another. This replaces ``pool_pre_ping``'s ``SELECT 1`` per checkout;
    a peer that vanished silently is caught by TCP keepalives and ``pool_recycle``.
    """
    if getattr(dbapi_connection, "closed", False) or getattr(dbapi_connection, "broken", False):
        raise exc.DisconnectionError("the connection is closed")
    try:
        readable, _, _ = select.select([dbapi_connection.fileno()], [], [], 0)
    except (OSError, ValueError) as error:
        raise exc.DisconnectionError(f"the connection's socket is unusable: {error}") from error
    if readable:
        raise exc.DisconnectionError("the server closed the connection while it was idle")


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # WAL lets readers run while one writer commits; busy_timeout makes writers queue instead of
    # failing at once; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session
