"""One live broker per test module, on a fresh PostgreSQL database, against the dev cluster."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import POSTGRES_ADMIN_URL
from tests.e2e.live import LiveBroker, dev_settings


@pytest.fixture(scope="module")
def e2e_database(postgres_url: str) -> Iterator[str]:
    base, _ = postgres_url.rsplit("/", 1)
    name = f"broker_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{base}/{name}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def broker(e2e_database: str) -> Iterator[LiveBroker]:
    live = LiveBroker(dev_settings(e2e_database)).start()
    yield live
    live.stop()


@pytest.fixture(autouse=True)
def _empty_cluster_afterwards(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "broker" in request.fixturenames:
        live: LiveBroker = request.getfixturevalue("broker")
        live.cancel_everything()
