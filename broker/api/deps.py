"""FastAPI dependencies: the process runtime, a unit of work, and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from broker.db.engine import transaction
from broker.errors import Unauthenticated
from broker.runtime import Runtime
from broker.service.identity import Actor, authenticate


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_actor(request: Request, runtime: RuntimeDep) -> Actor:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("send Authorization: Bearer <token>")
    with transaction(runtime.sessions) as session:
        actor = authenticate(session, token.strip())
    request.app.state.rate_limiter.check(actor.name)
    return actor


CurrentActor = Annotated[Actor, Depends(get_actor)]
