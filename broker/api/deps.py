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

from broker.api.guards import RateLimiter
from broker.db.engine import transaction
from broker.errors import Unauthenticated
from broker.runtime import Runtime
from broker.service.identity import Actor, authenticate, hash_token
from broker.service.oidc import looks_like_jwt


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


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


def get_actor(request: Request, runtime: RuntimeDep) -> Actor:
    """The caller, rate-limited BEFORE authentication so floods of bad tokens cost nothing.

    Each presented token has a bucket keyed by its hash. Requests that fail authentication (no
    token, an unknown or revoked one) also draw on a bucket of the client's address; while that
    one is empty, tokens never seen to authenticate are refused (429) without a database look-up.
    A token that has authenticated keeps working from its own bucket. Where ``[auth.oidc]`` is
    enabled, a JWT goes to the provider's verifier (``broker.service.oidc``), under the same
    limits.
    """
    limiter: RateLimiter = request.app.state.rate_limiter
    failures = f"failed-auth:{request.client.host if request.client else '-'}"
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        limiter.check(failures)
        raise Unauthenticated("send Authorization: Bearer <token>")
    token_hash = hash_token(token)
    limiter.check(f"token:{token_hash}")
    if not limiter.known(token_hash):
        limiter.require_room(failures)
    try:
        if runtime.oidc is not None and looks_like_jwt(token):
            actor = runtime.oidc.authenticate(runtime.sessions, token)
        else:
            with transaction(runtime.sessions) as session:
                actor = authenticate(session, token)
    except Unauthenticated:
        limiter.check(failures)
        raise
    limiter.remember(token_hash)
    return actor


CurrentActor = Annotated[Actor, Depends(get_actor)]
