"""Shared fixtures: databases (SQLite file and a fresh PostgreSQL database per run)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pgdb import throwaway_database


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test run, dropped at the end."""
    with throwaway_database("broker_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An empty database on each backend, one per test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db')}/broker.db"
        return
    with throwaway_database("broker_t") as url:
        yield url
