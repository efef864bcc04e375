"""Scrape-time series of the admission queue and of job arrays, from the database.

Both read only live rows through indexed columns (the queued jobs; the tasks of arrays not yet
final), so their cost follows what waits and runs, not the history.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker.db.models import JobRecord, JobTaskRecord, ProjectRecord
from broker.lifecycle import LIVE, JobState, values
from broker.service.arrays import SUMMARY_BUCKET
from broker.service.ledger import HELD_GPUS

QUEUE_REASONS = ("concurrent_gpus", "concurrent_gpus_per_cluster", "pending_jobs", "project_held")
TASK_STATES = ("pending", "running", "completed", "failed", "cancelled", "timeout", "other")


@dataclass
class QueueState:
    queued: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    """(project, reason) -> (jobs, GPUs) waiting in the broker's queue."""
    tasks: dict[tuple[str, str], int] = field(default_factory=dict)
    """(cluster, task state) -> tasks of live arrays (tasks not started yet are pending)."""


def read_queue_state(session: Session) -> QueueState:
    state = QueueState()
    for project, reason, jobs, gpus in session.execute(
        select(ProjectRecord.name, JobRecord.queue_reason, func.count(), func.sum(HELD_GPUS))
        .join(ProjectRecord, ProjectRecord.id == JobRecord.project_id)
        .where(JobRecord.state == JobState.QUEUED.value)
        .group_by(ProjectRecord.name, JobRecord.queue_reason)
    ):
        key = (project, reason if reason in QUEUE_REASONS else "concurrent_gpus")
        before = state.queued.get(key, (0, 0))
        state.queued[key] = (before[0] + int(jobs), before[1] + int(gpus or 0))
    live_arrays = select(JobRecord.id).where(
        JobRecord.state.in_(values(LIVE)), JobRecord.array_size.is_not(None)
    )
    sizes: dict[str, tuple[str, int]] = {
        job_id: (cluster, int(size or 0))
        for job_id, cluster, size in session.execute(
            select(JobRecord.id, JobRecord.cluster, JobRecord.array_size).where(
                JobRecord.id.in_(live_arrays)
            )
        )
    }
    seen: dict[str, int] = {}
    for job_id, task_state, count in session.execute(
        select(JobTaskRecord.job_id, JobTaskRecord.state, func.count())
        .where(JobTaskRecord.job_id.in_(live_arrays))
        .group_by(JobTaskRecord.job_id, JobTaskRecord.state)
    ):
        cluster = sizes[job_id][0]
        bucket = SUMMARY_BUCKET.get(task_state, "other")
        state.tasks[(cluster, bucket)] = state.tasks.get((cluster, bucket), 0) + int(count)
        seen[job_id] = seen.get(job_id, 0) + int(count)
    for job_id, (cluster, size) in sizes.items():
        unstarted = max(0, size - seen.get(job_id, 0))
        state.tasks[(cluster, "pending")] = state.tasks.get((cluster, "pending"), 0) + unstarted
    return state


def queue_families(state: QueueState, projects: list[str], clusters: list[str]) -> Iterator[Metric]:
    jobs = GaugeMetricFamily(
        "broker_queued_jobs",
        "Jobs waiting in the broker's admission queue, by the limit they wait for",
        labels=["project", "limit"],
    )
    gpus = GaugeMetricFamily(
        "broker_queued_gpus",
        "GPUs of the jobs waiting in the broker's admission queue, by the limit they wait for",
        labels=["project", "limit"],
    )
    for project in projects:
        for reason in QUEUE_REASONS:
            count, held = state.queued.get((project, reason), (0, 0))
            jobs.add_metric([project, reason], count)
            gpus.add_metric([project, reason], held)
    tasks = GaugeMetricFamily(
        "broker_array_tasks",
        "Tasks of the job arrays not yet final, by task state",
        labels=["cluster", "state"],
    )
    for cluster in clusters:
        for task_state in TASK_STATES:
            tasks.add_metric([cluster, task_state], state.tasks.get((cluster, task_state), 0))
    yield from (jobs, gpus, tasks)
