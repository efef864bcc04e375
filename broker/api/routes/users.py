"""/v1/users and their tokens (admin only), and /v1/me."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Response

from broker.api.deps import (
    CurrentActor,
    ReadThreadsDep,
    RuntimeDep,
    SessionDep,
    TransactionDep,
)
from broker.api.problems import COMMON, responses
from broker.runtime import Runtime
from broker.schemas import (
    MePublic,
    TokenCreate,
    TokenIssued,
    TokensPublic,
    UserCreate,
    UserPatch,
    UserPublic,
    UsersPublic,
)
from broker.service import identity
from broker.service.identity import Actor

router = APIRouter(tags=["users"], responses=responses(*COMMON, 409))


@router.get("/v1/me", response_model=MePublic)
async def whoami(actor: CurrentActor, runtime: RuntimeDep, reads: ReadThreadsDep) -> MePublic:
    if actor.project_names is not None:  # resolved with the token: nothing to read
        return MePublic(name=actor.name, role=actor.role, projects=sorted(actor.project_names))
    return await reads.run(_me, runtime, actor)


def _me(runtime: Runtime, actor: Actor) -> MePublic:
    with runtime.sessions() as session:
        return identity.me(session, actor)


@router.post("/v1/users", status_code=201, response_model=UserPublic)
def create_user(
    body: UserCreate, actor: CurrentActor, session: TransactionDep, runtime: RuntimeDep
) -> UserPublic:
    return identity.create_user(session, actor, body, runtime.settings)


@router.patch("/v1/users/{name}", response_model=UserPublic)
def patch_user(
    name: str,
    body: UserPatch,
    actor: CurrentActor,
    session: TransactionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
) -> UserPublic:
    """Set the Unix account the user's jobs run as; once committed, their projects'
    associations move from the old account to the new one."""
    change = identity.patch_user(session, actor, name, body, runtime.settings)
    if change.old_unix_user != change.new_unix_user:
        for accounts in change.project_accounts:
            background.add_task(runtime.identities.revoke, accounts, change.old_unix_user)
            background.add_task(runtime.identities.grant, accounts, change.new_unix_user)
    return change.user


@router.get("/v1/users", response_model=UsersPublic)
def list_users(actor: CurrentActor, session: SessionDep) -> UsersPublic:
    return identity.list_users(session, actor)


@router.get("/v1/users/{name}", response_model=UserPublic)
def get_user(name: str, actor: CurrentActor, session: SessionDep) -> UserPublic:
    return identity.get_user(session, actor, name)


@router.post("/v1/users/{name}/tokens", status_code=201, response_model=TokenIssued)
def issue_token(
    name: str,
    body: TokenCreate,
    actor: CurrentActor,
    session: TransactionDep,
    runtime: RuntimeDep,
) -> TokenIssued:
    """The token is in this response and never again; with ``expires_at`` it stops working then."""
    return identity.issue_token(
        session,
        actor,
        name,
        body.description,
        runtime.settings.auth.token_bytes,
        expires_at=body.expires_at,
    )


@router.get("/v1/users/{name}/tokens", response_model=TokensPublic)
def list_tokens(name: str, actor: CurrentActor, session: SessionDep) -> TokensPublic:
    return identity.list_tokens(session, actor, name)


@router.delete("/v1/users/{name}/tokens/{token_id}", status_code=204)
def revoke_token(
    name: str, token_id: str, actor: CurrentActor, session: TransactionDep
) -> Response:
    identity.revoke_token(session, actor, name, token_id)
    return Response(status_code=204)
