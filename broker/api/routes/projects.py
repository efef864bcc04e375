"""/v1/projects: projects, members, quotas and usage."""

from __future__ import annotations

from fastapi import APIRouter, Response

from broker.api.deps import CurrentActor, RuntimeDep
from broker.api.problems import COMMON, responses
from broker.db.engine import transaction
from broker.schemas import (
    MemberPublic,
    MemberPut,
    ProjectCreate,
    ProjectPublic,
    ProjectsPublic,
    QuotaPublic,
    QuotaPut,
    UsagePublic,
)
from broker.service import projects

router = APIRouter(prefix="/v1/projects", tags=["projects"], responses=responses(*COMMON, 409))


@router.post("", status_code=201, response_model=ProjectPublic)
def create_project(body: ProjectCreate, actor: CurrentActor, runtime: RuntimeDep) -> ProjectPublic:
    with transaction(runtime.sessions) as session:
        created = projects.create_project(session, actor, body, set(runtime.clusters.names))
    runtime.jobs.prepare_accounts(created.slurm_accounts)
    return created


@router.get("", response_model=ProjectsPublic)
def list_projects(actor: CurrentActor, runtime: RuntimeDep) -> ProjectsPublic:
    with runtime.sessions() as session:
        return projects.list_projects(session, actor)


@router.get("/{name}", response_model=ProjectPublic)
def get_project(name: str, actor: CurrentActor, runtime: RuntimeDep) -> ProjectPublic:
    with runtime.sessions() as session:
        return projects.get_project(session, actor, name)


@router.put("/{name}/members/{user}", response_model=MemberPublic)
def put_member(
    name: str, user: str, body: MemberPut, actor: CurrentActor, runtime: RuntimeDep
) -> MemberPublic:
    with transaction(runtime.sessions) as session:
        member = projects.put_member(session, actor, name, user, body)
        accounts, unix_user = projects.member_identity(session, name, user)
    runtime.identities.grant(accounts, unix_user)
    return member


@router.delete("/{name}/members/{user}", status_code=204)
def remove_member(name: str, user: str, actor: CurrentActor, runtime: RuntimeDep) -> Response:
    with transaction(runtime.sessions) as session:
        projects.remove_member(session, actor, name, user)
        accounts, unix_user = projects.member_identity(session, name, user)
    runtime.identities.revoke(accounts, unix_user)
    return Response(status_code=204)


@router.put("/{name}/quota", response_model=QuotaPublic)
def put_quota(name: str, body: QuotaPut, actor: CurrentActor, runtime: RuntimeDep) -> QuotaPublic:
    """Replace the quota. Lowering it below use blocks new jobs and touches no running one."""
    with transaction(runtime.sessions) as session:
        return projects.put_quota(session, actor, name, body)


@router.get("/{name}/usage", response_model=UsagePublic)
def project_usage(name: str, actor: CurrentActor, runtime: RuntimeDep) -> UsagePublic:
    with runtime.sessions() as session:
        return projects.usage(session, actor, name)
