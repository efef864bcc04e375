"""Opaque, signed keyset-pagination cursors: a client sends back what we gave it, or gets 422.

A cursor is ``base64url(payload) "." base64url(HMAC-SHA256(key, kind NUL payload))``. The MAC
covers the endpoint (``kind``), so a cursor of /v1/audit is no cursor of /v1/jobs, and any change
to the payload is caught before it is parsed: a client cannot make the broker compare a naive
timestamp or an out-of-range integer against a column.

The key is ``[auth] cursor_secret`` when configured, else a random key kept in the database
(table ``broker_keys``, created on first use): every replica sharing one database signs and
checks with the same key, so a cursor from one replica works on the others.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
import threading
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from broker.clock import utcnow
from broker.db.engine import transaction
from broker.db.models import BrokerKeyRecord
from broker.errors import ValidationFailed

log = logging.getLogger(__name__)

KEY_NAME = "cursor-hmac"
MAX_CURSOR_CHARS = 1024
_SEPARATOR = "|"
_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII digits only, and below 2**63


class CursorSigner:
    """Signs and checks the cursors of every list endpoint with one process-wide key."""

    def __init__(self, sessions: sessionmaker[Session], configured_secret: str | None) -> None:
        self._sessions = sessions
        self._key: bytes | None = configured_secret.encode() if configured_secret else None
        self._lock = threading.Lock()

    def encode(self, kind: str, *parts: str) -> str:
        payload = _SEPARATOR.join(parts).encode()
        return f"{_b64(payload)}.{_b64(self._mac(kind, payload))}"

    def decode(self, kind: str, cursor: str, parts: int) -> list[str]:
        """The ``parts`` strings of a cursor this API issued for ``kind``; else ``invalid()``."""
        if len(cursor) > MAX_CURSOR_CHARS or cursor.count(".") != 1:
            raise invalid()
        encoded_payload, encoded_mac = cursor.split(".")
        try:
            payload = _unb64(encoded_payload)
            mac = _unb64(encoded_mac)
        except (ValueError, binascii.Error):
            raise invalid() from None
        if not hmac.compare_digest(mac, self._mac(kind, payload)):
            raise invalid()
        try:
            values = payload.decode().split(_SEPARATOR, parts - 1)
        except UnicodeDecodeError:
            raise invalid() from None
        if len(values) != parts:
            raise invalid()
        return values

    def _mac(self, kind: str, payload: bytes) -> bytes:
        return hmac.new(self._secret(), kind.encode() + b"\0" + payload, hashlib.sha256).digest()

    def _secret(self) -> bytes:
        if self._key is None:
            with self._lock:
                if self._key is None:
                    self._key = shared_key(self._sessions, KEY_NAME)
        return self._key


def shared_key(sessions: sessionmaker[Session], name: str) -> bytes:
    """The database's random key ``name``, created by whichever replica asks first."""
    with transaction(sessions) as session:
        value = session.scalar(select(BrokerKeyRecord.value).where(BrokerKeyRecord.name == name))
    if value is not None:
        return bytes.fromhex(value)
    try:
        with transaction(sessions) as session:
            session.add(
                BrokerKeyRecord(name=name, value=secrets.token_hex(32), created_at=utcnow())
            )
        log.info("created the shared key %s", name)
    except IntegrityError:
        pass  # another replica created it first: use theirs
    with transaction(sessions) as session:
        stored = session.scalars(
            select(BrokerKeyRecord.value).where(BrokerKeyRecord.name == name)
        ).one()
    return bytes.fromhex(stored)


def parse_int(value: str) -> int:
    """A non-negative integer from a cursor, as the database can hold it; else ``invalid()``."""
    if not _DIGITS.fullmatch(value):
        raise invalid()
    return int(value)


def parse_time(value: str) -> datetime:
    """An aware timestamp from a cursor, in UTC; else ``invalid()``."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise invalid() from None
    if moment.tzinfo is None:
        raise invalid()
    return moment.astimezone(UTC)


def invalid() -> ValidationFailed:
    return ValidationFailed(
        "invalid cursor", [{"field": "cursor", "message": "not a cursor this API issued"}]
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    """Strict base64url: only the one spelling ``_b64`` gives (no padding, no spare bits)."""
    if not text or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not the canonical spelling")
    return data
