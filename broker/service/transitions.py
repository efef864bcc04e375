"""Moving a job between states: forward only, each move an event, settling under the ledger lock."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from broker.clock import utcnow
from broker.db.models import JobEventRecord, JobRecord
from broker.lifecycle import FINAL, JobState, can_move, is_final
from broker.service import ledger

log = logging.getLogger(__name__)


def move(
    session: Session,
    job: JobRecord,
    target: JobState,
    reason: str | None = None,
    *,
    at: datetime | None = None,
    **fields: Any,
) -> bool:
    """Move ``job`` to a non-final ``target`` and record the event; False if that would go back."""
    if target in FINAL:
        raise ValueError("final states go through settle()")
    if not can_move(job.state, target.value):
        return False
    now = at or utcnow()
    session.add(
        JobEventRecord(
            job_id=job.id, at=now, from_state=job.state, to_state=target.value, reason=reason
        )
    )
    left_queue = job.state == JobState.QUEUED.value
    was = ledger.Group.of(job)
    job.state = target.value
    if left_queue:  # its GPUs count against the concurrency limits from now on
        ledger.held_changed(
            session, job, cluster=job.cluster, reserved=job.reserved_gpu_seconds, gpus=0
        )
    job.updated_at = now
    if target == JobState.RUNNING:
        _forget_script(job)
    for key, value in fields.items():
        setattr(job, key, value)
    ledger.regrouped(session, job.gpus, was, ledger.Group.of(job))
    return True


def _forget_script(job: JobRecord) -> None:
    """A job that runs or ended is never submitted again: its stored script goes."""
    job.queued_script = None
    job.queued_environment = None


def settle(
    session: Session,
    job: JobRecord,
    final: JobState,
    *,
    charge_gpu_seconds: int,
    reason: str | None = None,
    lock: bool = True,
    **fields: Any,
) -> bool:
    """Finish ``job``: release its whole reservation and charge what it used, in one step, with
    the ledger's totals (``ledger.settled``) in the same transaction.

    Takes the project's ledger lock unless the caller already holds it (``lock=False``).
    Returns False (and changes nothing) if the job was already final.
    """
    if final not in FINAL:
        raise ValueError(f"{final} is not a final state")
    if is_final(job.state):
        return False
    if lock:
        ledger.lock_project(session, job.project_id)
        session.refresh(job)
        if is_final(job.state):
            return False
    now = utcnow()
    session.add(
        JobEventRecord(
            job_id=job.id, at=now, from_state=job.state, to_state=final.value, reason=reason
        )
    )
    log.info(
        "job %s (slurm %s) %s -> %s, charged %d GPU-s of %d reserved",
        job.id,
        job.slurm_job_id,
        job.state,
        final.value,
        charge_gpu_seconds,
        job.reserved_gpu_seconds,
    )
    released, before, held = job.reserved_gpu_seconds, ledger.Charge.of(job), ledger.held_gpus(job)
    was = ledger.Group.of(job)
    job.state = final.value
    job.state_reason = reason
    job.reserved_gpu_seconds = 0
    _forget_script(job)
    job.move_target = None
    job.charged_gpu_seconds = charge_gpu_seconds
    job.updated_at = now
    if job.ended_at is None:
        job.ended_at = fields.pop("ended_at", None) or now
    else:
        fields.pop("ended_at", None)
    for key, value in fields.items():
        setattr(job, key, value)
    ledger.settled(session, job, released, before, held, was=was)
    return True
