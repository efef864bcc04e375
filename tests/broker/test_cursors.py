"""Signed cursors: one key for every replica on a database, and nothing unsigned gets through."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from broker.db.engine import make_engine, make_session_factory
from broker.db.migrate import upgrade
from broker.errors import ValidationFailed
from broker.service import cursors
from broker.service.cursors import CursorSigner


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def test_replicas_on_one_database_accept_each_others_cursors(
    sessions: sessionmaker[Session],
) -> None:
    # Several processes start at once: each creates or reads the key on first use.
    replicas = [CursorSigner(sessions, None) for _ in range(6)]
    issued: list[str] = [""] * len(replicas)
    barrier = threading.Barrier(len(replicas))

    def first_use(index: int) -> None:
        barrier.wait()
        issued[index] = replicas[index].encode("jobs", "2027-01-01T00:00:00+00:00", f"id-{index}")

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    later = CursorSigner(sessions, None)  # a replica started afterwards
    for index, cursor in enumerate(issued):
        for reader in [*replicas, later]:
            assert reader.decode("jobs", cursor, 2) == ["2027-01-01T00:00:00+00:00", f"id-{index}"]


def test_a_configured_secret_is_used_and_a_foreign_key_refused(
    sessions: sessionmaker[Session],
) -> None:
    configured = CursorSigner(sessions, "s" * 32)
    same_config = CursorSigner(sessions, "s" * 32)
    from_database = CursorSigner(sessions, None)
    cursor = configured.encode("audit", "42")
    assert same_config.decode("audit", cursor, 1) == ["42"]
    with pytest.raises(ValidationFailed):
        from_database.decode("audit", cursor, 1)
    with pytest.raises(ValidationFailed):
        configured.decode("jobs", cursor, 1)  # the kind is signed too


def test_values_inside_a_signed_cursor_are_still_checked() -> None:
    for bad in ("2024-01-01T00:00:00", "yesterday", ""):
        with pytest.raises(ValidationFailed):
            cursors.parse_time(bad)
    for bad in ("\u00b2", "-1", "9" * 19, "", "1.0"):
        with pytest.raises(ValidationFailed):
            cursors.parse_int(bad)
    assert cursors.parse_int("0042") == 42
    assert (
        cursors.parse_time("2027-01-01T01:00:00+01:00").isoformat() == "2027-01-01T00:00:00+00:00"
    )
