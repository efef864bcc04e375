"""A named lease row: at most one holder at a time across every process sharing the database."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from broker.clock import utcnow
from broker.db.engine import transaction
from broker.db.models import LeaseRecord


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
