"""Typed values the Slurm client takes and returns. Field names follow Slurm's own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from adapters.slurm.states import is_ended


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
    array_size: int | None = None
    """A job array of this many tasks, indices ``0 .. array_size - 1`` (``--array``); the GPUs,
    nodes and time limit are each task's. Output paths may then hold ``%a`` (the task index)."""
    array_max_parallel: int | None = None
    """At most this many tasks of the array run at once (``--array=...%k``)."""


@dataclass(frozen=True, slots=True)
class JobStatus:
    """One job as squeue or sacct sees it."""

    job_id: str
    state: str
    """Slurm's state code in long form (``PENDING``, ``CANCELLED``), first token only."""
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
    account: str | None = None
    user: str | None = None
    """The Unix user the job runs as."""
    partition: str | None = None
    array_job_id: str | None = None
    """For a task of a job array: the array's id (the id sbatch printed); else ``None``."""
    array_task: int | None = None
    """For a task of a job array: its index. ``job_id`` is then the task's own id once it has
    started (or ended); a task still pending has no id of its own and shows the array's."""
    array_pending: tuple[int, ...] = ()
    """For the record of an array's tasks that have not started yet (Slurm keeps them in one
    record, ``123_[4-19%4]``): their indices. ``array_task`` is then ``None``."""

    @property
    def ended(self) -> bool:
        """Slurm considers the job over (its state code says so)."""
        return is_ended(self.state)

    @property
    def tag(self) -> str | None:
        """The first word of the comment: the broker's tag on the jobs it submitted."""
        return tag_of(self.comment)


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Answer of ``SlurmClient.statuses``: every asked id is in exactly one of the two."""

    found: dict[str, JobStatus]
    """The job holding each id now: squeue's, else the newest sacct record."""
    missing: frozenset[str]
    """Ids neither squeue nor sacct knows. Never to be read as 'completed'."""
    earlier: dict[str, tuple[JobStatus, ...]] = field(default_factory=dict)
    """Older sacct records of an id found in sacct, newest first: Slurm restarts ids when a
    controller loses its state, so one id may name several jobs. The caller tells them apart by
    tag (``JobStatus.tag``)."""
    others: tuple[JobStatus, ...] = ()
    """Live jobs of the accounts asked about whose ids were not asked about (``accounts=``)."""
    commands: int = 0
    """How many commands were run to produce this report (for metrics and benchmarks)."""
    tasks: dict[str, dict[int, JobStatus]] = field(default_factory=dict)
    """For each asked id that is a job array: every task Slurm knows, by index (a task not
    started yet included, as ``PENDING``). Each one is squeue's view while the task is live, else
    its own sacct record: what the task is charged from."""

    def candidates(self, job_id: str) -> tuple[JobStatus, ...]:
        """Every job Slurm reported under ``job_id``, the current holder first."""
        current = self.found.get(job_id)
        return (() if current is None else (current,)) + self.earlier.get(job_id, ())


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
    state: str
    """Slurm's state code, long form, first token (``CANCELLED by 1234`` -> ``CANCELLED``)."""
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
    user: str | None = None
    """The Unix user the job ran as."""
    array_job_id: str | None = None
    """As in ``JobStatus``: the array's id, for a task of an array."""
    array_task: int | None = None
    array_pending: tuple[int, ...] = ()

    @property
    def ended(self) -> bool:
        """Slurm considers the job over (its state code says so)."""
        return is_ended(self.state)


def tag_of(comment: str | None) -> str | None:
    """The broker's tag is the first word of a job's comment (``brk-<uuid> user=alice``)."""
    words = (comment or "").split(maxsplit=1)
    return words[0] if words else None
