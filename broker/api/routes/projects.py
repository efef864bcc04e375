"""/v1/projects: projects, members, quotas and usage."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Response

from broker.api.deps import CurrentActor, RuntimeDep, SessionDep, TransactionDep
from broker.api.problems import COMMON, responses
from broker.schemas import (
    MemberPublic,
    MemberPut,
    ProjectCreate,
    ProjectPublic,
    ProjectQueuePublic,
    ProjectsPublic,
    QueuePut,
    QuotaPublic,
    QuotaPut,
    UsagePublic,
)
from broker.service import projects

router = APIRouter(prefix="/v1/projects", tags=["projects"], responses=responses(*COMMON, 409))


@router.post("", status_code=201, response_model=ProjectPublic)
def create_project(body: ProjectCreate, actor: CurrentActor, runtime: RuntimeDep) -> ProjectPublic:
    """The project, then its Slurm accounts where the broker manages them (over SSH, after the
    commit: see ``JobService.create_project``)."""
    return runtime.jobs.create_project(actor, body)


@router.get("", response_model=ProjectsPublic)
def list_projects(actor: CurrentActor, session: SessionDep) -> ProjectsPublic:
    return projects.list_projects(session, actor)


@router.get("/{name}", response_model=ProjectPublic)
def get_project(name: str, actor: CurrentActor, session: SessionDep) -> ProjectPublic:
    return projects.get_project(session, actor, name)


@router.put("/{name}/members/{user}", response_model=MemberPublic)
def put_member(
    name: str,
    user: str,
    body: MemberPut,
    actor: CurrentActor,
    session: TransactionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
) -> MemberPublic:
    """Add or update a member; once committed, their Unix account gets the project's Slurm
    associations on every cluster (a cluster that is down gets it at their first submission)."""
    member = projects.put_member(session, actor, name, user, body)
    background.add_task(runtime.identities.grant, *projects.member_identity(session, name, user))
    return member


@router.delete("/{name}/members/{user}", status_code=204)
def remove_member(
    name: str,
    user: str,
    actor: CurrentActor,
    session: TransactionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
) -> Response:
    """Remove a member; once committed, their associations with the project's accounts go."""
    projects.remove_member(session, actor, name, user)
    background.add_task(runtime.identities.revoke, *projects.member_identity(session, name, user))
    return Response(status_code=204)


@router.put("/{name}/quota", response_model=QuotaPublic)
def put_quota(
    name: str, body: QuotaPut, actor: CurrentActor, session: TransactionDep
) -> QuotaPublic:
    """Replace the quota. Lowering it below use blocks new jobs and touches no running one."""
    return projects.put_quota(session, actor, name, body)


@router.put("/{name}/queue", response_model=ProjectQueuePublic)
def put_queue(
    name: str, body: QueuePut, actor: CurrentActor, session: TransactionDep
) -> ProjectQueuePublic:
    """Hold (``{"held": true}``) or release the project's admission queue (admin)."""
    return projects.put_queue(session, actor, name, body)


@router.get("/{name}/queue", response_model=ProjectQueuePublic)
def get_queue(name: str, actor: CurrentActor, session: SessionDep) -> ProjectQueuePublic:
    return projects.queue_public(session, actor, name)


@router.get("/{name}/usage", response_model=UsagePublic)
def project_usage(name: str, actor: CurrentActor, session: SessionDep) -> UsagePublic:
    return projects.usage(session, actor, name)
