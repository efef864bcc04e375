"""Throwaway PostgreSQL databases for tests and benchmarks: created empty, dropped afterwards.

``$BROKER_TEST_POSTGRES`` names the server as a libpq URL with a role allowed to create
databases (``deploy/postgres-for-tests.sh`` prints one); the default is the local trust setup.
This module imports only psycopg, so the benchmarks (``benchmarks/``) use it too without
pulling in pytest or the test fixtures.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

SERVER_URL = os.environ.get("BROKER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
"""The server's maintenance database, as a libpq URL: where databases are created from."""


def sqlalchemy_url(name: str) -> str:
    """The SQLAlchemy URL (psycopg 3 driver) of database ``name`` on the test server."""
    base = SERVER_URL.rsplit("/", 1)[0]
    return base.replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"


@contextmanager
def throwaway_database(prefix: str = "broker_test") -> Iterator[str]:
    """A new, empty database named ``<prefix>_<random>``; yields its SQLAlchemy URL and drops
    it afterwards, closing any connection still open to it."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(SERVER_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sqlalchemy_url(name)
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_version() -> str:
    """The server's version string (``SHOW server_version``), for reports."""
    import psycopg

    with psycopg.connect(SERVER_URL, connect_timeout=5) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"
