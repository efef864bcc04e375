"""The job lifecycle, in one place: the broker's states, their order, which are final, which hold
a reservation, which moves are allowed, and how Slurm's job state codes map onto them.

```
queued -> submitting -> submit_unknown -> pending -> running -> completed | failed | cancelled
                                                               | timeout | out_of_memory
                                                               | node_fail | preempted
                                                               | submit_failed | unknown
```

``queued`` is the broker's own admission queue: the job holds its reservation but waits for a
concurrency or pending-job limit of its project (or a hold) before it goes to Slurm.

States only move forward; a final state never changes. The Slurm adapter reports Slurm's own
code (``COMPLETED``, ``PENDING``); ``from_slurm`` is the one table that turns it into a state here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from enum import StrEnum

log = logging.getLogger(__name__)


class JobState(StrEnum):
    """A broker job's state, as the API shows it (API.md)."""

    QUEUED = "queued"
    SUBMITTING = "submitting"
    SUBMIT_UNKNOWN = "submit_unknown"
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    NODE_FAIL = "node_fail"
    PREEMPTED = "preempted"
    SUBMIT_FAILED = "submit_failed"
    UNKNOWN = "unknown"

    @property
    def is_final(self) -> bool:
        return self in FINAL


_ORDER = {
    JobState.QUEUED: 0,
    JobState.SUBMITTING: 1,
    JobState.SUBMIT_UNKNOWN: 2,
    JobState.PENDING: 3,
    JobState.RUNNING: 4,
}
_FINAL_RANK = 5

FINAL = frozenset(state for state in JobState if state not in _ORDER)
"""Ended for good: the reservation is released and the charge is settled."""
LIVE = frozenset(_ORDER)
"""Not final: the job holds a reservation in its project's ledger."""
NOT_STARTED = frozenset({JobState.SUBMITTING, JobState.SUBMIT_UNKNOWN, JobState.PENDING})
"""Live, on its way to Slurm or in it, and never seen running: what the pending-jobs limit counts
(a ``queued`` job waits for that limit and is not counted)."""
FOLLOWED = frozenset({JobState.PENDING, JobState.RUNNING})
"""Live with a Slurm id: the poller asks Slurm about these."""


def values(states: Iterable[JobState]) -> tuple[str, ...]:
    """The states' names in lifecycle order, e.g. for ``column.in_(...)``."""
    return tuple(state.value for state in sorted(states, key=rank))


def rank(state: str) -> int:
    """Position in the lifecycle; every final state shares the last rank."""
    return _ORDER.get(JobState(state), _FINAL_RANK)


def is_final(state: str) -> bool:
    return JobState(state) in FINAL


def can_move(current: str, target: str) -> bool:
    """A final state never changes; otherwise a state only moves strictly forward."""
    return not is_final(current) and rank(target) > rank(current)


# Slurm's job state codes (long form, as the adapter reports them) to broker states. Codes and
# meanings: "JOB STATE CODES" in https://slurm.schedmd.com/squeue.html#lbAG (Slurm 22.05).
# A job that still holds or may still get an allocation is never final here: COMPLETING is
# running (processes may still be active), the requeue and hold states are pending.
_FROM_SLURM: dict[str, JobState] = {
    "PENDING":       JobState.PENDING,
    "REQUEUED":      JobState.PENDING,    # completing job being requeued
    "REQUEUE_FED":   JobState.PENDING,    # requeued by a federation
    "REQUEUE_HOLD":  JobState.PENDING,    # held job being requeued
    "RESV_DEL_HOLD": JobState.PENDING,    # held after its reservation was deleted
    "SPECIAL_EXIT":  JobState.PENDING,    # requeued and held by an epilog
    "CONFIGURING":   JobState.RUNNING,    # allocated, nodes booting
    "RUNNING":       JobState.RUNNING,
    "COMPLETING":    JobState.RUNNING,    # not final: processes may still run
    "SUSPENDED":     JobState.RUNNING,    # keeps its allocation
    "STOPPED":       JobState.RUNNING,    # SIGSTOP, keeps its CPUs
    "SIGNALING":     JobState.RUNNING,
    "RESIZING":      JobState.RUNNING,
    "STAGE_OUT":     JobState.RUNNING,    # burst buffer stage-out, not done yet
    "COMPLETED":     JobState.COMPLETED,
    "CANCELLED":     JobState.CANCELLED,
    "REVOKED":       JobState.CANCELLED,  # federation: sibling started elsewhere
    "FAILED":        JobState.FAILED,
    "TIMEOUT":       JobState.TIMEOUT,
    "DEADLINE":      JobState.TIMEOUT,    # ended by its --deadline
    "OUT_OF_MEMORY": JobState.OUT_OF_MEMORY,
    "NODE_FAIL":     JobState.NODE_FAIL,
    "BOOT_FAIL":     JobState.NODE_FAIL,  # launch failed, typically hardware
    "PREEMPTED":     JobState.PREEMPTED,
}  # fmt: skip

SLURM_CODES = frozenset(_FROM_SLURM)
"""Every Slurm code with a meaning here."""


def from_slurm(code: str) -> JobState:
    """The broker state of a Slurm state code. A code missing from the table (a newer Slurm)
    gives ``unknown`` with a warning, never ``running``: a job cannot seem to run for ever."""
    state = _FROM_SLURM.get(code)
    if state is None:
        log.warning("unknown Slurm job state %r; taking it as unknown", code)
        return JobState.UNKNOWN
    return state
