"""A named lease row: at most one holder at a time across every process sharing the database.

A holder whose work outlives its lease must not write after another process took over, so a
``Fence`` renews the lease as the work goes on and proves, inside each of the work's write
transactions, that its holder still has it (the row lock that proof takes on PostgreSQL also keeps
a takeover from slipping in before that transaction commits).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from broker.clock import utcnow
from broker.db.engine import transaction
from broker.db.models import LeaseRecord

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """The lease expired or another holder has it: stop writing."""

    def __init__(self, name: str, holder: str) -> None:
        super().__init__(f"{holder} no longer holds lease {name!r}")
        self.name = name
        self.holder = holder


def acquire(sessions: sessionmaker[Session], name: str, holder: str, ttl_seconds: float) -> bool:
    """Take or renew the lease; False while another holder's lease has not expired.

    One conditional UPDATE decides atomically on every backend; the INSERT for a lease nobody
    has held yet loses cleanly to a concurrent one through the primary key.
    """
    now = utcnow()
    expires = now + timedelta(seconds=ttl_seconds)
    with transaction(sessions) as session:
        result = session.execute(
            update(LeaseRecord)
            .where(
                LeaseRecord.name == name,
                or_(LeaseRecord.holder == holder, LeaseRecord.expires_at < now),
            )
            .values(holder=holder, expires_at=expires)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return True
        if session.get(LeaseRecord, name) is not None:
            return False
    try:
        with transaction(sessions) as session:
            session.add(LeaseRecord(name=name, holder=holder, expires_at=expires))
    except IntegrityError:
        return False
    return True


def release(sessions: sessionmaker[Session], name: str, holder: str) -> None:
    with transaction(sessions) as session:
        session.execute(
            update(LeaseRecord)
            .where(LeaseRecord.name == name, LeaseRecord.holder == holder)
            .values(expires_at=utcnow())
        )


def extend(session: Session, name: str, holder: str, ttl_seconds: float) -> bool:
    """In ``session``'s transaction: push the expiry of a lease ``holder`` holds and that has not
    expired; False (nothing changed) if it is no longer theirs."""
    now = utcnow()
    result = session.execute(
        update(LeaseRecord)
        .where(LeaseRecord.name == name, LeaseRecord.holder == holder, LeaseRecord.expires_at > now)
        .values(expires_at=now + timedelta(seconds=ttl_seconds))
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Fence:
    """The lease a unit of work runs under. ``check`` goes first in each of the work's write
    transactions; ``renew`` between them (before a slow command)."""

    sessions: sessionmaker[Session]
    name: str
    holder: str
    ttl_seconds: float

    def check(self, session: Session) -> None:
        """Raise ``LeaseLost`` unless the holder still has the lease; renews it if so."""
        if not extend(session, self.name, self.holder, self.ttl_seconds):
            log.warning("%s lost lease %s; stopping its writes", self.holder, self.name)
            raise LeaseLost(self.name, self.holder)

    def renew(self) -> None:
        """Extend the lease in a transaction of its own; ``LeaseLost`` if it is gone."""
        with transaction(self.sessions) as session:
            self.check(session)


@contextmanager
def fenced(sessions: sessionmaker[Session], fence: Fence | None) -> Iterator[Session]:
    """A write transaction of work under ``fence`` (if any): the lease check comes first."""
    with transaction(sessions) as session:
        if fence is not None:
            fence.check(session)
        yield session
