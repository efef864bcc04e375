"""A per-user request budget shared by every API process and replica (PostgreSQL).

Each user may send ``per_minute`` requests in each minute-long window (aligned to the clock),
counted in one row per user and window (``rate_budgets``). A process does not count every
request there: it reserves a slice of the window's budget at once (``UPDATE ... RETURNING`` the new
total) and spends it locally, so a round trip is paid once per ``slice`` requests of a user, and
not at all while a user's window is known to be spent.

The approximation, stated: the sum over all processes of what they let through in one window
never exceeds ``per_minute`` (each process spends only what it reserved), but it may fall short
of it by what other processes reserved and did not spend (at most ``slice - 1`` each), and two
windows' worth can pass across a window boundary (a fixed window, not a sliding one). Each
process's own token bucket (``broker.api.guards.RateLimiter``) still smooths bursts. If the
database cannot be asked, the request passes (the local bucket still applies): a database
outage must not turn into refusing everyone.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from broker.db.engine import transaction
from broker.db.models import RateBudgetRecord

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
KEEP_WINDOWS = 2
"""Rows of windows older than this many are deleted (once a window, by whoever reserves first)."""
MAX_KEYS = 100_000


@dataclass(slots=True)
class _Slice:
    window: int
    left: int
    spent: bool
    """The window's shared budget is used up: refuse without asking again."""


class SharedBudget:
    """``take(key)`` is None when ``key`` may send one more request, else seconds to wait."""

    def __init__(self, sessions: sessionmaker[Session], per_minute: int, slice_size: int) -> None:
        self._sessions = sessions
        self.per_minute = per_minute
        self.slice = max(1, min(slice_size, per_minute))
        self._slices: dict[str, _Slice] = {}
        self._lock = threading.Lock()
        self._cleaned_window = 0
        self._failing = False
        self.reservations = 0
        """Round trips made so far (for tests and profiling)."""

    def take(self, key: str) -> float | None:
        """Spend one request of ``key``; may ask the database (see ``local`` for the cheap part)."""
        decided, wait = self.local(key)
        if decided:
            return wait
        return self.reserve(key)

    def local(self, key: str) -> tuple[bool, float | None]:
        """(True, None or seconds to wait) when this process can decide without the database,
        spending from its slice; (False, None) when ``reserve`` must ask."""
        if self.per_minute <= 0:
            return True, None
        now = time.time()
        window = int(now) // WINDOW_SECONDS * WINDOW_SECONDS
        with self._lock:
            current = self._slices.get(key)
            if current is not None and current.window == window:
                if current.left > 0:
                    current.left -= 1
                    return True, None
                if current.spent:
                    return True, window + WINDOW_SECONDS - now
        return False, None

    def reserve(self, key: str) -> float | None:
        """Reserve a slice from the shared budget and spend one request of it."""
        now = time.time()
        window = int(now) // WINDOW_SECONDS * WINDOW_SECONDS
        granted = self._reserve(key, window)
        if granted is None:
            return None  # the database did not answer: let it through
        with self._lock:
            if len(self._slices) >= MAX_KEYS:
                self._slices.clear()
            current = self._slices.get(key)
            if current is None or current.window != window:
                current = _Slice(window, 0, False)
                self._slices[key] = current
            if granted == 0:
                current.spent = True
                return window + WINDOW_SECONDS - now
            current.left += granted - 1
            return None

    def _reserve(self, key: str, window: int) -> int | None:
        statement = (
            insert(RateBudgetRecord)
            .values(key=key, window_start=window, used=self.slice)
            .on_conflict_do_update(
                index_elements=[RateBudgetRecord.key, RateBudgetRecord.window_start],
                set_={"used": RateBudgetRecord.used + self.slice},
            )
            .returning(RateBudgetRecord.used)
        )
        try:
            with transaction(self._sessions) as session:
                used = int(session.execute(statement).scalar_one())
                if self._cleaned_window != window:
                    self._cleaned_window = window
                    session.execute(
                        delete(RateBudgetRecord).where(
                            RateBudgetRecord.window_start < window - KEEP_WINDOWS * WINDOW_SECONDS
                        )
                    )
        except SQLAlchemyError as exc:
            if not self._failing:
                log.warning("rate limit: shared budget unavailable, not limiting: %s", exc)
            self._failing = True
            return None
        if self._failing:
            log.info("rate limit: shared budget answers again")
            self._failing = False
        self.reservations += 1
        before = used - self.slice
        return max(0, min(self.slice, self.per_minute - before))
