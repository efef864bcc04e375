"""Values the quota policy reasons about. Plain, typed, framework-free.

Amounts are integer *weighted GPU-seconds* so that a ledger adds up exactly: one H100 hour at weight
1.0 is 3600, one A100 hour at weight 0.5 is 1800. The API shows GPU-hours (seconds / 3600).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    """A project's quota for one allocation period. ``None`` means no limit."""

    budget_gpu_seconds: int
    gpu_type_weights: Mapping[str, float] = field(default_factory=dict)
    """Weight per GPU type; a type not listed weighs 1.0."""
    max_concurrent_gpus: int | None = None
    max_concurrent_gpus_per_cluster: Mapping[str, int] = field(default_factory=dict)
    max_gpus_per_job: int | None = None
    max_time_limit_minutes: int | None = None
    max_pending_jobs: int | None = None
    allowed_clusters: frozenset[str] | None = None
    allowed_partitions: frozenset[str] | None = None
    allowed_gpu_types: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """A project's position in the current period, read under the ledger lock."""

    used_gpu_seconds: int
    """Charged for finished jobs: what each ran inside the period (see ``quotas.periods``)."""
    reserved_gpu_seconds: int
    """Held for jobs not yet finished, whenever they were submitted."""
    live_gpus: int = 0
    """GPUs of every job not yet final (submitting, pending, running): they may all run at once."""
    live_gpus_by_cluster: Mapping[str, int] = field(default_factory=dict)
    pending_jobs: int = 0
    """Jobs not yet running (submitting, submit_unknown, pending)."""
    queued_jobs: int = 0
    """Jobs waiting in the broker's own queue (``queued``); not counted in ``pending_jobs``."""


@dataclass(frozen=True, slots=True)
class JobRequest:
    cluster: str
    partition: str
    gpu_type: str
    gpus: int
    """GPUs of the job, or of each task of an array."""
    time_limit_minutes: int
    tasks: int = 1
    """Tasks of a job array (1 for a single job): the reservation is ``tasks`` times a task's."""
    parallel_tasks: int = 1
    """Tasks of the array that may run at once: what counts against the concurrent-GPU limits."""

    @property
    def concurrent_gpus(self) -> int:
        return self.gpus * self.parallel_tasks


class LimitName(StrEnum):
    """Names used in API errors (API.md)."""

    GPUS_PER_JOB = "gpus_per_job"
    TIME_LIMIT = "time_limit"
    CLUSTER = "cluster"
    PARTITION = "partition"
    GPU_TYPE = "gpu_type"
    GPU_HOURS = "gpu_hours"
    CONCURRENT_GPUS = "concurrent_gpus"
    PENDING_JOBS = "pending_jobs"


STATIC_LIMITS = frozenset(
    {
        LimitName.GPUS_PER_JOB,
        LimitName.TIME_LIMIT,
        LimitName.CLUSTER,
        LimitName.PARTITION,
        LimitName.GPU_TYPE,
    }
)


@dataclass(frozen=True, slots=True)
class Violation:
    """Why a request was refused, with the numbers a user needs to act on it."""

    limit: LimitName
    requested: float | int | str
    allowed: float | int | str | list[str] | None = None
    used: float | None = None
    reserved: float | None = None
    remaining: float | None = None
    """For gpu_hours: GPU-hours (not seconds), as API.md shows them."""
    cluster: str | None = None
    """For a per-cluster concurrent_gpus limit: the cluster whose limit is broken (None = all)."""

    @property
    def is_static(self) -> bool:
        """A static limit (422 limit-exceeded) as opposed to budget or concurrency (409)."""
        return self.limit in STATIC_LIMITS


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    reserve_gpu_seconds: int
    """What to reserve when admitted (0 when refused)."""
    violations: tuple[Violation, ...] = ()
    """Every limit the request breaks, static ones first; empty when admitted."""
