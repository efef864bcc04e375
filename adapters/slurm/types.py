"""Typed values the Slurm client takes and returns. Field names follow Slurm's own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class JobState(StrEnum):
    """The broker's view of a job's state (API.md). Slurm codes map onto these in states.py."""

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
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
        JobState.OUT_OF_MEMORY,
        JobState.NODE_FAIL,
        JobState.PREEMPTED,
        JobState.SUBMIT_FAILED,
        JobState.UNKNOWN,
    }
)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything ``sbatch`` needs for one broker job. The script is sent on stdin."""

    script: str
    account: str
    partition: str
    gpus: int
    time_limit_minutes: int
    tag: str
    """Broker tag (e.g. ``brk-<uuid>``); put in the job's comment and name to find it again."""
    name: str = "job"
    gpu_type: str | None = None
    nodes: int = 1
    cpus_per_gpu: int | None = None
    mem_per_gpu_gb: int | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    comment: str | None = None
    """Extra text appended after the tag in ``--comment`` (e.g. ``user=alice``)."""
    run_as: str | None = None
    """Unix user the job is submitted as (through ``sudo -n -u``); ``None``: the login user."""
    workdir: str | None = None
    """``--chdir``: the job's working directory (it must exist, or the job runs in /tmp)."""
    stdout_path: str | None = None
    """``--output``; the directory must exist, or the job fails before its script runs."""
    stderr_path: str | None = None
    """``--error``."""


@dataclass(frozen=True, slots=True)
class JobStatus:
    """One job as squeue or sacct sees it."""

    job_id: str
    state: JobState
    slurm_state: str
    """The raw Slurm code (``PENDING``, ``CANCELLED``), first token only."""
    reason: str | None = None
    name: str | None = None
    comment: str | None = None
    alloc_gpus: int | None = None
    exit_code: int | None = None
    elapsed_s: int | None = None
    submit_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    source: str = "squeue"
    """``squeue`` (live) or ``sacct`` (accounting)."""


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Answer of ``SlurmClient.statuses``: every asked id is in exactly one of the two."""

    found: dict[str, JobStatus]
    missing: frozenset[str]
    """Ids neither squeue nor sacct knows. Never to be read as 'completed'."""
    commands: int
    """How many commands were run to produce this report (for metrics and benchmarks)."""


@dataclass(frozen=True, slots=True)
class PartitionCapacity:
    """GPUs of one partition and GPU type, from sinfo."""

    partition: str
    gpu_type: str
    gpus_total: int
    gpus_allocated: int
    gpus_idle: int
    gpus_unavailable: int
    """GPUs on nodes that are down, drained or otherwise not schedulable."""
    nodes_total: int
    nodes_down: int


@dataclass(frozen=True, slots=True)
class AccountingRecord:
    """One job (allocation, not steps) from ``sacct -X``."""

    job_id: str
    name: str | None
    account: str | None
    partition: str | None
    state: JobState
    slurm_state: str
    exit_code: int | None
    alloc_gpus: int
    gpu_type: str | None
    alloc_tres: str | None
    elapsed_s: int
    submit_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    comment: str | None
    reason: str | None = None
    """Why the job waited or ended as it did (sacct ``Reason``; ``None`` when Slurm says None)."""
