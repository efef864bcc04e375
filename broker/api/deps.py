"""FastAPI dependencies: the process runtime, a unit of work, and the authenticated caller.

The unit-of-work convention: a route takes ``SessionDep`` to read or ``TransactionDep`` to write
(committed when the route returns, rolled back when it raises, before the response is sent), and
passes it with the ``CurrentActor`` to a service function, which checks what the actor may do.
Routes open no sessions and check no roles themselves. ``JobService`` is the one exception: it
runs sbatch between two short transactions of its own (see ``broker.service.jobs``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from broker.api.guards import RateLimiter
from broker.api.threads import ReadThreads
from broker.db.engine import transaction
from broker.errors import Unauthenticated
from broker.runtime import Runtime
from broker.service.identity import Actor, authenticate, hash_token
from broker.service.oidc import looks_like_jwt


# Dependencies that only look something up are ``async``: FastAPI runs a plain ``def`` dependency
# in a worker thread, a hop per request for nothing.
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_read_threads(request: Request) -> ReadThreads:
    threads: ReadThreads = request.app.state.read_threads
    return threads


ReadThreadsDep = Annotated[ReadThreads, Depends(get_read_threads)]
"""Where a route's hot database read runs (``broker.api.threads``)."""


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.sessions() as session:
        yield session


def get_transaction(runtime: RuntimeDep) -> Iterator[Session]:
    with transaction(runtime.sessions) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
"""A session for reads."""
TransactionDep = Annotated[Session, Depends(get_transaction, scope="function")]
"""A session in a transaction, committed before the response is sent (rolled back on error)."""


async def get_actor(request: Request, runtime: RuntimeDep, reads: ReadThreadsDep) -> Actor:
    """The caller, rate-limited BEFORE authentication so floods of bad tokens cost nothing.

    A token this process resolved recently comes from the token cache (``broker.service.tokens``:
    no query and no worker thread; a revocation drops it everywhere at once). Others are looked
    up once; requests that fail authentication (no token, an unknown, revoked or expired one)
    draw on a bucket of the client's address, and while that one is empty, tokens never seen to
    authenticate are refused (429) without a database look-up. An authenticated caller draws on
    their own user's bucket and, on PostgreSQL, on the user's budget shared by every process
    (``broker.service.ratelimit``: a query once per slice of requests, not per request). Where
    ``[auth.oidc]`` is enabled, a JWT goes to the provider's verifier (``broker.service.oidc``,
    which caches the provider's keys, not the callers: a JWT's own expiry always applies), under
    the same limits.
    """
    limiter: RateLimiter = request.app.state.rate_limiter
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        limiter.check(_failures(request))
        raise Unauthenticated("send Authorization: Bearer <token>")
    token_hash = hash_token(token)
    jwt = runtime.oidc is not None and looks_like_jwt(token)
    cache = runtime.tokens
    actor = None if jwt else cache.get(token_hash)
    if actor is None:
        if not limiter.known(token_hash):
            limiter.require_room(_failures(request))
        generation = cache.generation
        try:
            if jwt:  # may fetch the provider's keys over the network: not on the read threads
                actor = await run_in_threadpool(_look_up, runtime, token)
            else:
                actor = await reads.run(_look_up, runtime, token)
        except Unauthenticated:
            limiter.forget(token_hash)
            limiter.check(_failures(request))
            raise
        limiter.remember(token_hash)
        if not jwt:
            cache.put(token_hash, actor, generation)
    key = f"user:{actor.user_id}"
    if not limiter.check_user(key):
        await run_in_threadpool(limiter.check_shared, key)
    return actor


def _look_up(runtime: Runtime, token: str) -> Actor:
    if runtime.oidc is not None and looks_like_jwt(token):
        return runtime.oidc.authenticate(runtime.sessions, token)
    with transaction(runtime.sessions) as session:
        return authenticate(session, token)


def _failures(request: Request) -> str:
    return f"failed-auth:{request.client.host if request.client else '-'}"


CurrentActor = Annotated[Actor, Depends(get_actor)]
