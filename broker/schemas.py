"""Shapes of the REST contract (API.md): ``*Create``/``*Put`` in, ``*Public`` out.

The service layer returns these, so ORM rows never reach the API. Unknown input fields are refused.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    field_validator,
    model_validator,
)

from adapters.slurm.commands import batch_script, describe_directives, script_directives
from adapters.slurm.types import JobSpec
from broker.waiting import WaitCategory

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
JOB_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Variables that would change how the job's shell, the loader or Slurm itself behaves.
RESERVED_ENV_NAMES = frozenset(
    {
        "LD_PRELOAD",
        "LD_AUDIT",
        "LD_LIBRARY_PATH",
        "BASH_ENV",
        "ENV",
        "IFS",
        "PS4",
        "SHELLOPTS",
        "BASHOPTS",
        "PROMPT_COMMAND",
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
    }
)
RESERVED_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SPANK_", "LD_", "BASH_FUNC_")


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps need a timezone (e.g. 2027-01-01T00:00:00Z)")
    return value.astimezone(UTC)


Timestamp = Annotated[datetime, PlainSerializer(rfc3339, return_type=str)]
AwareTimestamp = Annotated[
    datetime, AfterValidator(_aware), PlainSerializer(rfc3339, return_type=str)
]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
# Numbers in requests are strict: JSON ``true`` is no ``1`` and ``"8"`` or ``8.0`` no ``8``.
# (A float field still takes a JSON integer: ``"gpu_hours": 50000`` is a number.)
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict()]
Role = Literal["researcher", "engineer", "admin"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- jobs ---------------------------------------------------------------------------------


class ArrayRequest(StrictModel):
    """A job array: ``size`` tasks, indices 0..size-1, each with the job's GPUs and time limit;
    at most ``max_parallel`` of them run at once (no limit of its own when omitted)."""

    size: Int = Field(ge=1, le=1_000_000)
    """The configured ``[limits] max_array_size`` caps it further."""
    max_parallel: Int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _parallel_within_size(self) -> ArrayRequest:
        if self.max_parallel is not None and self.max_parallel > self.size:
            raise ValueError(
                f"max_parallel ({self.max_parallel}) must not exceed size ({self.size})"
            )
        return self


class JobCreate(StrictModel):
    project: Name
    script: str = Field(min_length=1)
    gpus: Int = Field(ge=1, le=4096)
    time_limit_minutes: Int = Field(ge=1, le=525_600)
    name: str = Field(default="job", pattern=JOB_NAME_PATTERN)
    cluster: Name | None = None
    partition: Name | None = None
    gpu_type: Name | None = None
    nodes: Int = Field(default=1, ge=1, le=1024)
    cpus_per_gpu: Int | None = Field(default=None, ge=1, le=1024)
    mem_per_gpu_gb: Int | None = Field(default=None, ge=1, le=65_536)
    environment: dict[str, str] = Field(default_factory=dict)
    array: ArrayRequest | None = None

    @field_validator("script")
    @classmethod
    def _script_is_a_batch_script(cls, value: str) -> str:
        if not value.startswith("#!"):
            raise ValueError("the script must start with an interpreter line such as #!/bin/bash")
        if "\x00" in value:
            raise ValueError("the script must not contain NUL bytes")
        # Every prefix sbatch honours (#SBATCH, #SLURM in the header; #PBS, #BSUB anywhere):
        # the job Slurm runs must have exactly the options of the request.
        directives = script_directives(value)
        if directives:
            raise ValueError(describe_directives(directives))
        return value

    @field_validator("environment")
    @classmethod
    def _environment_is_safe(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not ENV_NAME_RE.match(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if key in RESERVED_ENV_NAMES or key.startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(f"{key} is reserved and cannot be set")
            if "\x00" in val:
                raise ValueError(f"the value of {key} must not contain NUL bytes")
            if len(val) > 4096:
                raise ValueError(f"the value of {key} is longer than 4096 characters")
        return value

    @model_validator(mode="after")
    def _script_is_what_sbatch_will_take(self) -> JobCreate:
        # The adapter's own rules (shebang, no directive lines, a POSIX shell when an
        # environment is given), applied before admission so a bad script reserves nothing.
        probe = JobSpec(
            script=self.script,
            account="x",
            partition="x",
            gpus=1,
            time_limit_minutes=1,
            tag="validation",
            environment=self.environment,
        )
        batch_script(probe)
        return self

    @model_validator(mode="after")
    def _gpus_cover_nodes(self) -> JobCreate:
        if self.gpus < self.nodes:
            raise ValueError("gpus must be at least nodes (every node gets at least one GPU)")
        if self.gpus % self.nodes:
            raise ValueError("gpus must be a multiple of nodes (the same GPUs on every node)")
        return self


class TaskSummaryPublic(BaseModel):
    """How many of an array's tasks are in each state (tasks not started yet count as pending)."""

    total: int
    pending: int
    running: int
    completed: int
    failed: int
    cancelled: int
    timeout: int
    other: int


class TaskPublic(BaseModel):
    index: int
    state: str
    slurm_job_id: str | None
    started_at: Timestamp | None
    ended_at: Timestamp | None
    exit_code: int | None
    charged_gpu_hours: float | None


class TasksPublic(BaseModel):
    data: list[TaskPublic]
    next_cursor: str | None


class QueuePublic(BaseModel):
    """Where a ``queued`` job stands in its project's queue, and what it waits for."""

    position: int
    reason: Literal[
        "concurrent_gpus", "concurrent_gpus_per_cluster", "pending_jobs", "project_held"
    ]
    message: str


class WaitPublic(BaseModel):
    """Why a pending job has not started: a category and a one-line message (broker.waiting)."""

    category: WaitCategory
    message: str


class JobPublic(BaseModel):
    id: str
    project: str
    user: str
    name: str
    cluster: str
    partition: str
    gpu_type: str
    gpus: int
    nodes: int
    time_limit_minutes: int
    state: str
    state_reason: str | None
    slurm_job_id: str | None
    exit_code: int | None
    submitted_at: Timestamp
    started_at: Timestamp | None
    ended_at: Timestamp | None
    reserved_gpu_hours: float
    charged_gpu_hours: float | None
    unix_user: str | None = None
    """The Unix account the job runs as on its cluster."""
    queue: QueuePublic | None = None
    """While the job is ``queued``: its position, reason and a message with the numbers."""
    wait: WaitPublic | None = None
    """While the job is pending in Slurm: why it waits, from ``state_reason``."""
    array: ArrayRequest | None = None
    """The array as requested; ``None`` for a single job."""
    tasks: TaskSummaryPublic | None = None
    """For an array: its tasks by state."""


class JobOutputPublic(BaseModel):
    """A piece of a job's stdout or stderr, from byte ``offset``; poll ``next_offset`` to follow."""

    stream: Literal["stdout", "stderr"]
    offset: int
    next_offset: int
    size: int
    eof: bool
    """True when the job is final and everything up to ``size`` was returned."""
    data: str
    """The bytes read, decoded as UTF-8 with replacement characters."""


class JobsPublic(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None


class JobEventPublic(BaseModel):
    at: Timestamp
    from_state: str | None
    to_state: str
    reason: str | None


class JobEventsPublic(BaseModel):
    data: list[JobEventPublic]


# --- projects, members, quotas -------------------------------------------------------------


class ProjectCreate(StrictModel):
    name: Name
    description: str = Field(default="", max_length=2000)
    slurm_accounts: dict[str, Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(
        default_factory=dict
    )


class ProjectPublic(BaseModel):
    name: str
    description: str
    slurm_accounts: dict[str, str]
    members: dict[str, str]
    quota: QuotaPublic | None
    created_at: Timestamp


class QueuePut(StrictModel):
    held: bool


class ProjectQueuePublic(BaseModel):
    """A project's admission queue: whether it is held and what waits in it."""

    project: str
    held: bool
    queued_jobs: int
    queued_gpus: int


class ProjectsPublic(BaseModel):
    data: list[ProjectPublic]


class MemberPut(StrictModel):
    role: Literal["member", "manager"] = "member"


class MemberPublic(BaseModel):
    project: str
    user: str
    role: str


class QuotaPut(StrictModel):
    period_start: AwareTimestamp
    period_end: AwareTimestamp
    gpu_hours: Number = Field(ge=0, le=1e9)
    gpu_type_weights: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Number] = Field(
        default_factory=dict
    )
    max_concurrent_gpus: Int | None = Field(default=None, ge=0)
    max_concurrent_gpus_per_cluster: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Int] = Field(
        default_factory=dict
    )
    max_gpus_per_job: Int | None = Field(default=None, ge=0)
    max_time_limit_minutes: Int | None = Field(default=None, ge=0)
    max_pending_jobs: Int | None = Field(default=None, ge=0)
    allowed_clusters: list[Name] | None = None
    allowed_partitions: list[Name] | None = None
    allowed_gpu_types: list[Name] | None = None

    @field_validator("gpu_type_weights")
    @classmethod
    def _weights_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for key, weight in value.items():
            if not 0 <= weight <= 1000:
                raise ValueError(f"weight of {key} must be between 0 and 1000")
        return value

    @field_validator("max_concurrent_gpus_per_cluster")
    @classmethod
    def _per_cluster_non_negative(cls, value: dict[str, int]) -> dict[str, int]:
        for key, limit in value.items():
            if limit < 0:
                raise ValueError(f"limit of {key} must not be negative")
        return value

    @model_validator(mode="after")
    def _period_ordered(self) -> QuotaPut:
        if self.period_end <= self.period_start:
            raise ValueError("period_end must be after period_start")
        return self


class QuotaPublic(BaseModel):
    period_start: Timestamp
    period_end: Timestamp
    gpu_hours: float
    gpu_type_weights: dict[str, float]
    max_concurrent_gpus: int | None
    max_concurrent_gpus_per_cluster: dict[str, int]
    max_gpus_per_job: int | None
    max_time_limit_minutes: int | None
    max_pending_jobs: int | None
    allowed_clusters: list[str] | None
    allowed_partitions: list[str] | None
    allowed_gpu_types: list[str] | None
    updated_at: Timestamp


class UsagePublic(BaseModel):
    project: str
    period_start: Timestamp | None
    period_end: Timestamp | None
    budget_gpu_hours: float
    used_gpu_hours: float
    reserved_gpu_hours: float
    remaining_gpu_hours: float
    concurrent_gpus: int
    by_cluster: dict[str, float]
    by_gpu_type: dict[str, float]
    by_user: dict[str, float]
    foreign_gpu_hours: float = 0.0
    """Part of ``used_gpu_hours``: jobs in the project's Slurm accounts that the broker did not
    submit (sbatch from inside a job), charged from their accounting records."""


# --- users and tokens ----------------------------------------------------------------------


UNIX_USER_PATTERN = r"^[a-z_][a-z0-9_-]{0,31}$"
UnixUser = Annotated[str, Field(pattern=UNIX_USER_PATTERN)]


class UserCreate(StrictModel):
    name: Name
    role: Role
    email: str | None = Field(default=None, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")
    unix_user: UnixUser | None = None
    """The Unix account the user's jobs run as on every cluster."""


class UserPatch(StrictModel):
    unix_user: UnixUser | None


class UserPublic(BaseModel):
    name: str
    role: str
    email: str | None
    unix_user: str | None
    projects: list[str]
    created_at: Timestamp


class UsersPublic(BaseModel):
    data: list[UserPublic]


class TokenCreate(StrictModel):
    description: str = Field(default="", max_length=200)
    expires_at: AwareTimestamp | None = None
    """When the token stops working (RFC 3339 with an offset); omitted: it does not expire."""


class TokenIssued(BaseModel):
    id: str
    token: str
    description: str
    created_at: Timestamp
    expires_at: Timestamp | None = None


class TokenPublic(BaseModel):
    id: str
    description: str
    created_at: Timestamp
    last_used_at: Timestamp | None
    revoked: bool
    expires_at: Timestamp | None = None


class TokensPublic(BaseModel):
    data: list[TokenPublic]


class MePublic(BaseModel):
    name: str
    role: str
    projects: list[str]


# --- errors ---------------------------------------------------------------------------------


class Problem(BaseModel):
    """An RFC 9457 problem document (``application/problem+json``). Extra members carry numbers:
    ``errors`` (validation-error), ``limit``/``requested``/``allowed``/``used``/``reserved``/
    ``remaining`` (limit-exceeded, quota-exceeded), ``cluster`` (cluster-unavailable)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str


# --- clusters, reports, audit --------------------------------------------------------------


class PartitionPublic(BaseModel):
    name: str
    gpu_type: str
    gpus_total: int
    gpus_allocated: int
    gpus_idle: int
    nodes_total: int
    nodes_down: int


class ClusterPublic(BaseModel):
    name: str
    up: bool
    last_poll_at: Timestamp | None
    partitions: list[PartitionPublic]


class ClustersPublic(BaseModel):
    data: list[ClusterPublic]


class UsageRow(BaseModel):
    key: str
    gpu_hours: float
    jobs: int
    jobs_completed: int


class UsageReport(BaseModel):
    group_by: str
    from_: Timestamp | None = Field(serialization_alias="from")
    to: Timestamp | None
    data: list[UsageRow]


class AuditEntry(BaseModel):
    id: int
    at: Timestamp
    actor: str
    action: str
    target_type: str
    target: str
    details: dict[str, Any]


class AuditPage(BaseModel):
    data: list[AuditEntry]
    next_cursor: str | None


class ReadyCluster(BaseModel):
    name: str
    up: bool
    last_poll_at: Timestamp | None


class Ready(BaseModel):
    status: str
    database: str
    clusters: list[ReadyCluster]


ProjectPublic.model_rebuild()
