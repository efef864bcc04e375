"""/v1/jobs: submit, list, read, cancel, events, output, an array's tasks."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from starlette.concurrency import run_in_threadpool

from broker.api.deps import CurrentActor, ReadThreadsDep, RuntimeDep
from broker.api.problems import COMMON, responses
from broker.lifecycle import JobState
from broker.schemas import (
    JobCreate,
    JobEventsPublic,
    JobOutputPublic,
    JobPublic,
    JobsPublic,
    TasksPublic,
)
from broker.service.job_reads import JobFilter

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=responses(*COMMON, 409, 413, 503))


@router.post("", status_code=201, response_model=JobPublic)
async def submit_job(
    body: JobCreate,
    actor: CurrentActor,
    runtime: RuntimeDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobPublic:
    """Admit a job against its project's quota and submit it to Slurm.

    201: the job is in Slurm (it has a ``slurm_job_id``). 202: sbatch's answer was lost; the job
    is ``submit_unknown`` and the reconciler attaches it by its tag (never resubmits). 202 too
    for a job ``queued`` in the broker: it fits the budget (reserved) and waits for a concurrency
    or pending-job limit; ``queue`` says where it stands.
    """
    # One worker-thread hop for the service, which waits on sbatch (Starlette's pool, not the
    # read threads); a sync route would take a second one for FastAPI's check of its answer.
    outcome = await run_in_threadpool(runtime.jobs.submit, actor, body, idempotency_key)
    if outcome.job.state in (JobState.SUBMIT_UNKNOWN.value, JobState.QUEUED.value):
        response.status_code = 202
    if not outcome.created:
        response.headers["Idempotent-Replayed"] = "true"
    return outcome.job


@router.get("", response_model=JobsPublic)
async def list_jobs(
    actor: CurrentActor,
    runtime: RuntimeDep,
    reads: ReadThreadsDep,
    project: str | None = None,
    state: str | None = None,
    cluster: str | None = None,
    user: str | None = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
    cursor: str | None = None,
) -> JobsPublic:
    """Newest first; researchers see the jobs of their projects only."""
    limits = runtime.settings.limits
    page = min(limit or limits.default_list_limit, limits.max_list_limit)
    where = JobFilter(project=project, state=state, cluster=cluster, user=user)
    return await reads.run(runtime.job_reads.list, actor, where, page, cursor)


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(
    job_id: str, actor: CurrentActor, runtime: RuntimeDep, reads: ReadThreadsDep
) -> JobPublic:
    # async with one worker-thread hop for the query: a sync route would take two (the route,
    # then FastAPI's check of its answer), each a context switch under load.
    return await reads.run(runtime.job_reads.get, actor, job_id)


@router.delete("/{job_id}", status_code=202, response_model=JobPublic)
def cancel_job(
    job_id: str, actor: CurrentActor, runtime: RuntimeDep, response: Response
) -> JobPublic:
    """202 when cancellation was requested; 200 when the job had already ended (idempotent)."""
    job, accepted = runtime.jobs.cancel(actor, job_id)
    if not accepted:
        response.status_code = 200
    return job


@router.get("/{job_id}/events", response_model=JobEventsPublic)
def job_events(job_id: str, actor: CurrentActor, runtime: RuntimeDep) -> JobEventsPublic:
    return runtime.jobs.events(actor, job_id)


@router.get("/{job_id}/tasks", response_model=TasksPublic)
def job_tasks(
    job_id: str,
    actor: CurrentActor,
    runtime: RuntimeDep,
    limit: Annotated[int | None, Query(ge=1)] = None,
    cursor: str | None = None,
) -> TasksPublic:
    """An array's tasks in index order (a single job has none)."""
    limits = runtime.settings.limits
    page = min(limit or limits.default_list_limit, limits.max_list_limit)
    return runtime.jobs.tasks(actor, job_id, page, cursor)


@router.get("/{job_id}/output", response_model=JobOutputPublic)
def job_output(
    job_id: str,
    actor: CurrentActor,
    runtime: RuntimeDep,
    stream: Literal["stdout", "stderr"] = "stdout",
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1)] = 65536,
    task: Annotated[int | None, Query(ge=0)] = None,
) -> JobOutputPublic:
    """What the job printed, from byte ``offset``, read on the cluster as the job's Unix user.

    Poll with ``offset=next_offset`` to follow a running job; ``eof`` is true once the job is final
    and everything was read. The job's submitter and admins only (404 for everyone else).
    """
    return runtime.output.read(actor, job_id, stream, offset, limit, task)
