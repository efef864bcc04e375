"""The per-process cache of authenticated callers, and how every process learns to drop it.

A bearer token is resolved once (``identity.authenticate``: one statement) and its ``Actor`` kept
here for ``ttl`` seconds under the token's hash, so most requests cost no query for the caller.
What may make a cached actor wrong (a token revoked, a membership added or removed, a Unix account
changed) calls ``identity.identity_changed`` in the transaction that changes it:

* this process drops its whole cache when that transaction commits;
* on PostgreSQL the same transaction sends ``NOTIFY broker_identity``, delivered to the other
  processes when, and only when, the change commits. Each process keeps one connection that
  ``LISTEN``s (``IdentityListener``); a notification drops that process's cache.

Fail safe: the cache is used on PostgreSQL only while the listener is known to be connected (it
proves that with a query every ``HEARTBEAT`` seconds); when that connection is down or late, every
request resolves its token from the database until the listener is back (and has dropped what it
may have missed). An entry loaded by a look-up that raced a change is not stored (the generation
check in ``put``). A cached token's ``expires_at`` is checked on every use.

``last_used_at``: the look-up that fills the cache writes it when it is stale; later uses are kept
in memory and written in one batch every ``FLUSH_SECONDS`` (so the column is at most a minute or
so behind, as it was), never once per request.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, event, func, literal, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from broker.clock import utcnow
from broker.db.engine import transaction
from broker.db.models import TokenRecord

if TYPE_CHECKING:
    from broker.service.identity import Actor

log = logging.getLogger(__name__)

CHANNEL = "broker_identity"
HEARTBEAT = 1.0
"""The listener proves its connection alive this often; the cache is off after 3 missed beats."""
LISTENER_NAME = "broker-identity-listener"
"""The listener connection's ``application_name`` (``pg_stat_activity``)."""
FLUSH_SECONDS = 20.0
LAST_USED_RESOLUTION = timedelta(minutes=1)
MAX_ENTRIES = 50_000

_caches: weakref.WeakSet[IdentityCache] = weakref.WeakSet()
"""Every cache of this process, dropped together when a change commits here."""


def changed_in(session: Session) -> None:
    """Arrange for every cache to be dropped when ``session``'s transaction commits (see the
    module docstring); on PostgreSQL also notify the other processes in that transaction."""
    if not session.info.get("identity_changed"):
        session.info["identity_changed"] = True
        _on_commit(session)
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(select(func.pg_notify(literal(CHANNEL), literal(""))))


def _on_commit(session: Session) -> None:
    def dropped(_: Session) -> None:
        session.info.pop("identity_changed", None)
        invalidate_all()

    def forgotten(_: Session, _previous: object = None) -> None:
        session.info.pop("identity_changed", None)

    event.listen(session, "after_commit", dropped, once=True)
    event.listen(session, "after_soft_rollback", forgotten, once=True)


def invalidate_all() -> None:
    for cache in list(_caches):
        cache.invalidate()


class IdentityCache:
    """Token hash -> ``Actor`` for ``ttl`` seconds; see the module docstring.

    ``shared``: the database is shared with other processes (PostgreSQL): entries are served only
    while ``listener`` is healthy. Otherwise (SQLite, one process) commits here are all there is.
    """

    def __init__(self, sessions: sessionmaker[Session], ttl: float, *, shared: bool) -> None:
        self._sessions = sessions
        self.ttl = ttl
        self.shared = shared
        self.listener: IdentityListener | None = None
        self._entries: dict[str, tuple[Actor, float]] = {}
        self._generation = 0
        self._lock = threading.Lock()
        self._used: dict[str, datetime] = {}
        """Token id -> last use not yet written."""
        self._written: dict[str, float] = {}
        """Token id -> when (monotonic) its last use was recorded for writing."""
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        _caches.add(self)

    # --- the cache --------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        if self.ttl <= 0:
            return False
        if not self.shared:
            return True
        return self.listener is not None and self.listener.healthy

    @property
    def generation(self) -> int:
        """Read before a look-up, handed to ``put``: a look-up that raced a change is not kept."""
        return self._generation

    def get(self, token_hash: str) -> Actor | None:
        if not self.usable:
            return None
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(token_hash)
            if entry is None:
                return None
            actor, stored = entry
            if now - stored > self.ttl:
                del self._entries[token_hash]
                return None
        if actor.expires_at is not None and actor.expires_at <= utcnow():
            with self._lock:
                self._entries.pop(token_hash, None)
            return None
        self._record_use(actor, now)
        return actor

    def put(self, token_hash: str, actor: Actor, generation: int) -> None:
        if not self.usable:
            return
        now = time.monotonic()
        with self._lock:
            if generation != self._generation:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[token_hash] = (actor, now)
            if actor.token_id is not None:
                self._written.setdefault(actor.token_id, now)

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    # --- last_used_at in batches ------------------------------------------------------------

    def _record_use(self, actor: Actor, now: float) -> None:
        token_id = actor.token_id
        if token_id is None:
            return
        with self._lock:
            if now - self._written.get(token_id, 0.0) < LAST_USED_RESOLUTION.total_seconds():
                return
            self._written[token_id] = now
            self._used[token_id] = utcnow()

    def flush(self) -> int:
        """Write the recorded uses of tokens in one statement; returns how many."""
        with self._lock:
            used, self._used = self._used, {}
            if len(self._written) > MAX_ENTRIES:
                self._written.clear()
        if not used:
            return 0
        statement = (
            update(TokenRecord)
            .where(TokenRecord.id == bindparam("token_id"))
            .values(last_used_at=bindparam("at"))
            .execution_options(synchronize_session=False)
        )
        with transaction(self._sessions) as session:
            session.connection().execute(
                statement, [{"token_id": k, "at": v} for k, v in used.items()]
            )
        return len(used)

    # --- threads ----------------------------------------------------------------------------

    def start(self, engine: Engine) -> None:
        """Start the flusher and, on PostgreSQL, the listener (idempotent)."""
        if self.ttl <= 0 or self._flusher is not None:
            return
        self._stop.clear()
        if self.shared:
            self.listener = IdentityListener(engine, self)
            self.listener.start()
        self._flusher = threading.Thread(target=self._flush_loop, name="token-uses", daemon=True)
        self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            try:
                self.flush()
            except Exception as exc:
                log.warning("could not record tokens' last use: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        if self._flusher is not None:
            self._flusher.join(timeout=5)
            self._flusher = None
        try:
            self.flush()
        except Exception as exc:
            log.warning("could not record tokens' last use: %s", exc)
        self.invalidate()


class IdentityListener:
    """One connection that ``LISTEN``s on ``CHANNEL`` and drops ``cache`` on each notification.

    ``healthy`` while the connection answered a query less than ``3 * HEARTBEAT`` seconds ago.
    On any error the cache is dropped (and so bypassed) and the connection is made again, with
    the cache dropped once more after ``LISTEN`` (notifications sent meanwhile were missed).
    """

    def __init__(self, engine: Engine, cache: IdentityCache) -> None:
        self._conninfo = engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        self._cache = cache
        self._alive_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="identity-listener", daemon=True)

    @property
    def healthy(self) -> bool:
        return time.monotonic() < self._alive_until

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3 * HEARTBEAT)

    def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.healthy:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _run(self) -> None:
        import psycopg

        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=5,
                    keepalives_idle=10,
                    application_name=LISTENER_NAME,
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._cache.invalidate()
                    self._alive_until = time.monotonic() + 3 * HEARTBEAT
                    if failures:
                        log.info("identity listener reconnected; token cache back on")
                    failures = 0
                    while not self._stop.is_set():
                        # Notifications that came during the SELECT below wait in psycopg's
                        # backlog and come first out of the next notifies().
                        for _ in conn.notifies(timeout=HEARTBEAT):
                            self._cache.invalidate()
                        conn.execute("SELECT 1")
                        self._alive_until = time.monotonic() + 3 * HEARTBEAT
            except Exception as exc:
                self._alive_until = 0.0
                self._cache.invalidate()
                if failures == 0:
                    log.warning("identity listener lost its connection, token cache off: %s", exc)
                failures += 1
                self._stop.wait(min(5.0, 0.2 * 2**failures))
        self._alive_until = 0.0
