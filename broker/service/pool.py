"""The pool at a glance for admins and engineers: live jobs per project and cluster."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker.db.models import JobRecord, ProjectRecord
from broker.lifecycle import LIVE, JobState, values
from broker.service.identity import Actor


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """A project's live jobs on one cluster: waiting (not yet running) and running, with GPUs."""

    project: str
    cluster: str
    waiting_jobs: int
    waiting_gpus: int
    running_jobs: int
    running_gpus: int


def queue_depth(session: Session, actor: Actor) -> list[QueueDepth]:
    """Live jobs per project and cluster, most waiting GPUs first (admins and engineers)."""
    actor.require_reader()
    rows = session.execute(
        select(
            ProjectRecord.name,
            JobRecord.cluster,
            JobRecord.state,
            func.count(JobRecord.id),
            func.sum(JobRecord.gpus),
        )
        .join(ProjectRecord, ProjectRecord.id == JobRecord.project_id)
        .where(JobRecord.state.in_(values(LIVE)))
        .group_by(ProjectRecord.name, JobRecord.cluster, JobRecord.state)
    ).all()
    table: dict[tuple[str, str], list[int]] = {}
    for project, cluster, state, jobs, gpus in rows:
        cell = table.setdefault((project, cluster), [0, 0, 0, 0])
        offset = 2 if state == JobState.RUNNING.value else 0
        cell[offset] += int(jobs)
        cell[offset + 1] += int(gpus or 0)
    depths = [QueueDepth(p, c, *cell) for (p, c), cell in table.items()]
    return sorted(depths, key=lambda d: (-d.waiting_gpus, -d.running_gpus, d.project, d.cluster))
