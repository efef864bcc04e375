"""Job arrays: one broker job, one ``sbatch --array``, many Slurm tasks.

The poller follows an array by the id sbatch printed. Slurm reports each task on its own (a task
that started has its own job id; the tasks not started yet share one line), and the adapter hands
them over by index (``StatusReport.tasks``). Here each task's last state is kept in ``job_tasks``,
each task is charged from its own sacct record once it ended (capped at a task's reservation),
and the broker job follows its tasks:

- ``running`` as soon as one task runs (``started_at`` is the first task's start);
- final when every task is, charged the sum of its tasks' charges, in the state of its tasks
  (``completed`` when all completed; else the first of ``failed``, ``out_of_memory``,
  ``node_fail``, ``timeout``, ``preempted``, ``cancelled``, ``unknown`` that one of them ended in).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adapters.slurm.types import JobStatus
from broker.db.models import JobRecord, JobTaskRecord
from broker.lifecycle import JobState, from_slurm, is_final
from broker.schemas import TaskPublic, TaskSummaryPublic
from broker.service.accounting import accounted_elapsed, charged_gpus
from quotas import charge_gpu_seconds, gpu_hours

# Which state an array ends in when its tasks did not all complete: the first one present.
_ENDING_ORDER = (
    JobState.FAILED,
    JobState.OUT_OF_MEMORY,
    JobState.NODE_FAIL,
    JobState.TIMEOUT,
    JobState.PREEMPTED,
    JobState.CANCELLED,
    JobState.UNKNOWN,
)

SUMMARY_BUCKET: dict[str, str] = {
    JobState.PENDING.value: "pending",
    JobState.RUNNING.value: "running",
    JobState.COMPLETED.value: "completed",
    JobState.FAILED.value: "failed",
    JobState.OUT_OF_MEMORY.value: "failed",
    JobState.CANCELLED.value: "cancelled",
    JobState.TIMEOUT.value: "timeout",
}


def task_summary(size: int, job_state: str, states: Mapping[str, int]) -> TaskSummaryPublic:
    """Counts by state of the ``size`` tasks of an array in ``job_state`` from ``states`` (task
    rows by state); tasks without a row have not started: pending while the job lives
    (cancelled once it ended)."""
    buckets: Counter[str] = Counter()
    for state, count in states.items():
        buckets[SUMMARY_BUCKET.get(state, "other")] += count
    total = size
    unseen = max(0, total - sum(states.values()))
    buckets["cancelled" if is_final(job_state) else "pending"] += unseen
    return TaskSummaryPublic(
        total=total,
        pending=buckets["pending"],
        running=buckets["running"],
        completed=buckets["completed"],
        failed=buckets["failed"],
        cancelled=buckets["cancelled"],
        timeout=buckets["timeout"],
        other=buckets["other"],
    )


def summaries(session: Session, jobs: Iterable[JobRecord]) -> dict[str, TaskSummaryPublic]:
    """Task summaries of the arrays among ``jobs``, in one query."""
    arrays = {job.id: job for job in jobs if job.array_size}
    if not arrays:
        return {}
    counts: dict[str, dict[str, int]] = {job_id: {} for job_id in arrays}
    rows = session.execute(
        select(JobTaskRecord.job_id, JobTaskRecord.state, func.count())
        .where(JobTaskRecord.job_id.in_(arrays))
        .group_by(JobTaskRecord.job_id, JobTaskRecord.state)
    )
    for job_id, state, count in rows:
        counts[job_id][state] = int(count)
    return {
        job_id: task_summary(job.array_size or 0, job.state, counts[job_id])
        for job_id, job in arrays.items()
    }


def task_public(task: JobTaskRecord) -> TaskPublic:
    return TaskPublic(
        index=task.index,
        state=task.state,
        slurm_job_id=task.slurm_job_id,
        started_at=task.started_at,
        ended_at=task.ended_at,
        exit_code=task.exit_code,
        charged_gpu_hours=(
            None if task.charged_gpu_seconds is None else gpu_hours(task.charged_gpu_seconds)
        ),
    )


def unstarted_task(index: int, *, cancelled: bool) -> TaskPublic:
    """A task Slurm has not reported (not started; cancelled if its array ended first)."""
    state = JobState.CANCELLED if cancelled else JobState.PENDING
    return TaskPublic(
        index=index,
        state=state.value,
        slurm_job_id=None,
        started_at=None,
        ended_at=None,
        exit_code=None,
        charged_gpu_hours=0.0 if cancelled else None,
    )


def own_tasks(job: JobRecord, tasks: Mapping[int, JobStatus]) -> dict[int, JobStatus]:
    """The tasks that are this job's: in its index range, carrying its tag where Slurm shows a
    comment (sacct stores it only once a task ended; the tasks not started yet have none)."""
    size = job.array_size or 0
    return {
        index: status
        for index, status in tasks.items()
        if 0 <= index < size and (status.comment is None or status.tag == job.tag)
    }


@dataclass
class ArrayProgress:
    """What following an array's tasks for one cycle found."""

    started_at: datetime | None = None
    """The first task's start, once one has started."""
    final: JobState | None = None
    """The array's final state once every task is final and charged."""
    charge_gpu_seconds: int = 0
    elapsed_s: int = 0
    exit_code: int | None = None
    reason: str | None = None
    changed: bool = False


def follow(
    session: Session,
    job: JobRecord,
    tasks: Mapping[int, JobStatus],
    *,
    give_up_waiting: bool = False,
) -> ArrayProgress:
    """Bring ``job_tasks`` up to date with Slurm's view of the tasks and say where the array is.

    A task is final when Slurm says it ended AND its own sacct record is an account
    (``accounting.accounted_elapsed``: it knows the end, and the GPUs of a task that ran); with
    ``give_up_waiting`` (no such record after the poller's patience), an ended task is charged
    the run time Slurm reported. Each task's charge is capped at a task's reservation: the
    array's at the sum.
    """
    rows = {
        row.index: row
        for row in session.scalars(select(JobTaskRecord).where(JobTaskRecord.job_id == job.id))
    }
    per_task_cap = job.reservation_gpu_seconds // max(1, job.array_size or 1)
    progress = ArrayProgress()
    for index, status in sorted(tasks.items()):
        row = rows.get(index)
        if row is not None and row.charged_gpu_seconds is not None:
            continue  # settled already: a later view changes nothing
        state = from_slurm(status.state)
        if row is None:
            row = JobTaskRecord(job_id=job.id, index=index, state=JobState.PENDING.value)
            session.add(row)
            rows[index] = row
        before = (row.state, row.slurm_job_id, row.started_at)
        if status.array_task is not None and status.start_time is not None:
            row.slurm_job_id = status.job_id
        row.started_at = row.started_at or status.start_time
        if not state.is_final:
            row.state = state.value
        else:
            elapsed = accounted_elapsed(status)
            if elapsed is None and give_up_waiting:
                elapsed = status.elapsed_s or 0
            if elapsed is None:
                row.state = JobState.RUNNING.value if row.started_at else row.state
            else:
                alloc = charged_gpus(status.alloc_gpus, job.gpus, elapsed)
                charge = min(charge_gpu_seconds(alloc, elapsed, job.weight), per_task_cap)
                row.state = state.value
                row.ended_at = status.end_time
                row.exit_code = status.exit_code
                row.alloc_gpus = alloc
                row.elapsed_s = elapsed
                row.charged_gpu_seconds = charge
        if (row.state, row.slurm_job_id, row.started_at) != before:
            progress.changed = True
    starts = [row.started_at for row in rows.values() if row.started_at is not None]
    progress.started_at = min(starts) if starts else None
    settled = [row for row in rows.values() if row.charged_gpu_seconds is not None]
    if len(settled) == (job.array_size or 0):
        progress.final = _array_state(row.state for row in settled)
        progress.charge_gpu_seconds = sum(row.charged_gpu_seconds or 0 for row in settled)
        progress.elapsed_s = max((row.elapsed_s or 0 for row in settled), default=0)
        codes = [row.exit_code for row in settled if row.exit_code]
        progress.exit_code = codes[0] if codes else 0
        counts = Counter(row.state for row in settled)
        progress.reason = "tasks: " + ", ".join(
            f"{count} {state}" for state, count in sorted(counts.items())
        )
    return progress


def _array_state(states: Iterable[str]) -> JobState:
    present = set(states)
    for state in _ENDING_ORDER:
        if state.value in present:
            return state
    return JobState.COMPLETED


def settle_lost(session: Session, job: JobRecord, now: datetime) -> int:
    """An array Slurm no longer knows: each task not settled yet ends ``unknown``; one seen
    running is charged from its start until ``now`` (capped at a task's reservation), one never
    seen running nothing. Returns the array's charge: the sum of every task's."""
    per_task_cap = job.reservation_gpu_seconds // max(1, job.array_size or 1)
    rows = {
        row.index: row
        for row in session.scalars(select(JobTaskRecord).where(JobTaskRecord.job_id == job.id))
    }
    for index in range(job.array_size or 0):
        row = rows.get(index)
        if row is None:
            row = JobTaskRecord(job_id=job.id, index=index, state=JobState.PENDING.value)
            session.add(row)
            rows[index] = row
        if row.charged_gpu_seconds is not None:
            continue
        charge = 0
        if row.started_at is not None:
            elapsed = max(0, int((now - row.started_at).total_seconds()))
            charge = min(charge_gpu_seconds(job.gpus, elapsed, job.weight), per_task_cap)
            row.elapsed_s = elapsed
        row.state = JobState.UNKNOWN.value
        row.charged_gpu_seconds = charge
    return sum(row.charged_gpu_seconds or 0 for row in rows.values())
