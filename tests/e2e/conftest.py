"""One live broker per test module, on a fresh PostgreSQL database, against the dev cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.live import LiveBroker, dev_settings
from tests.pgdb import throwaway_database


@pytest.fixture(scope="module")
def e2e_database() -> Iterator[str]:
    with throwaway_database("broker_e2e") as url:
        yield url


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
