"""Request guards that run before a route: body size and per-token rate limits."""

from __future__ import annotations

import threading
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.api.problems import problem
from broker.errors import RateLimited
from broker.service.ratelimit import SharedBudget


class BodySizeLimit:
    """Refuse a request body above ``max_bytes`` with 413 before the route parses it.

    A declared Content-Length is checked up front. Otherwise (a chunked body) the body is read
    here, at most ``max_bytes + 1`` bytes of it, and handed to the route only if it fits: an
    error raised from inside the route's own body read would reach the client as FastAPI's 400
    "error parsing the body" rather than 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if value.isdigit() and int(value) > self.max_bytes:
                    await self._refuse(scope, receive, send)
                    return
                # The server delivers no more than the declared length (and refuses a bad one).
                await self.app(scope, receive, send)
                return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away before sending its body: let the app see that.
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(
            413,
            "payload-too-large",
            "Payload too large",
            f"the request body is larger than {self.max_bytes} bytes",
            limit=self.max_bytes,
        )
        await response(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that first returns ``messages``, then defers to the server's own."""
    pending = list(messages)

    async def replaying_receive() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replaying_receive


class RateLimiter:
    """Token buckets keyed by caller: ``per_minute`` requests a minute, bursts up to ``burst``.

    The API keys them (see ``broker.api.deps``) by user once a caller authenticated, and by
    client address for requests that fail authentication. ``known`` remembers the hashes of
    tokens that authenticated, so a flood of unknown tokens can be refused without a database
    look-up while the address's failure bucket is empty. These buckets are this process's own;
    ``shared``, when given (PostgreSQL), also holds each user to one budget across every process
    and replica (``broker.service.ratelimit``).
    """

    MAX_ENTRIES = 100_000

    def __init__(self, per_minute: int, burst: int, shared: SharedBudget | None = None) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.shared = shared
        self._buckets: dict[str, tuple[float, float]] = {}
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        """Take one request from ``key``'s bucket, or raise ``RateLimited``."""
        self._take(key, consume=True)

    def check_user(self, key: str) -> bool:
        """Take one request of an authenticated user from their bucket here and, when this
        process can decide alone, from the shared budget; raise ``RateLimited`` if refused.
        False: the shared budget must be asked (``check_shared``, which may query)."""
        self._take(key, consume=True)
        if self.shared is None:
            return True
        decided, wait = self.shared.local(key)
        if wait is not None:
            _refuse(wait)
        return decided

    def check_shared(self, key: str) -> None:
        """Reserve from the shared budget (a database round trip); raise ``RateLimited``."""
        if self.shared is not None:
            wait = self.shared.reserve(key)
            if wait is not None:
                _refuse(wait)

    def require_room(self, key: str) -> None:
        """Raise ``RateLimited`` if ``key``'s bucket is empty; take nothing."""
        self._take(key, consume=False)

    def known(self, token_hash: str) -> bool:
        with self._lock:
            return token_hash in self._known

    def forget(self, token_hash: str) -> None:
        """The token no longer authenticates (revoked, expired): treat it as unknown again."""
        with self._lock:
            self._known.discard(token_hash)

    def remember(self, token_hash: str) -> None:
        with self._lock:
            if len(self._known) > self.MAX_ENTRIES:
                self._known.clear()
            self._known.add(token_hash)

    def _take(self, key: str, *, consume: bool) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                retry = max(1, int((1.0 - tokens) / self.rate + 0.999))
                raise RateLimited(f"more than the allowed request rate; retry in {retry}s", retry)
            if consume:
                self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.MAX_ENTRIES:
                self._buckets.clear()


def _refuse(wait: float) -> None:
    retry = max(1, int(wait + 0.999))
    raise RateLimited(f"more than the allowed request rate; retry in {retry}s", retry)
