"""A scripted stand-in for one cluster's SlurmClient, for fast service-layer tests.

It keeps jobs in memory and lets a test decide what Slurm says next: a job's state, whether the
cluster answers, whether sbatch's answer is lost. The real client is proven against the real dev
cluster in tests/adapters; these tests prove the broker's reaction to each answer.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from adapters.errors import AdapterError, CommandFailed, HostUnreachable, RunAsRefused
from adapters.runner import CommandResult
from adapters.slurm.client import FileChunk
from adapters.slurm.commands import job_comment
from adapters.slurm.states import is_ended
from adapters.slurm.types import (
    AccountingRecord,
    JobSpec,
    JobStatus,
    PartitionCapacity,
    StatusReport,
)


class _NullRunner:
    name = "fake"

    def run(self, argv: Sequence[str], **_: object) -> CommandResult:
        raise NotImplementedError

    def close(self) -> None:
        return None


@dataclass
class FakeJob:
    job_id: str
    spec: JobSpec
    state: str = "PENDING"
    """Slurm's state code, as the real client reports it."""
    reason: str | None = "Priority"
    elapsed_s: int | None = None
    alloc_gpus: int | None = None
    exit_code: int | None = None
    in_squeue: bool = True
    in_sacct: bool = True
    started: datetime | None = None
    ended: datetime | None = None
    """sacct's End; ``None`` is ``End=Unknown``."""
    comment: str | None = None
    """What Slurm shows as the comment (the tag first, as sbatch set it); ``None``: no comment."""
    submitted: datetime | None = None
    """Slurm's SubmitTime; ``None``: not shown."""


@dataclass
class FakeSlurm:
    """One cluster. ``down`` makes every call raise; ``lose_next_submit_answer`` runs sbatch but
    raises as if the answer had been lost on the way back."""

    down: AdapterError | None = None
    partitions: list[PartitionCapacity] = field(
        default_factory=lambda: [PartitionCapacity("gpu", "h100", 32, 0, 32, 0, 4, 0)]
    )
    """What sinfo shows (``capacity``); set ``idle`` to stage a busy cluster."""

    def idle(self, gpus: int, gpu_type: str = "h100", partition: str = "gpu") -> None:
        """sinfo shows ``gpus`` idle of 32 in ``partition``."""
        self.partitions = [PartitionCapacity(partition, gpu_type, 32, 32 - gpus, gpus, 0, 4, 0)]

    refuse_next_submit: str | None = None
    lose_next_submit_answer: bool = False
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    earlier: dict[str, list[FakeJob]] = field(default_factory=dict)
    """Jobs sacct still holds under an id that was given again (newest first)."""
    _last_status: dict[str, JobStatus] = field(default_factory=dict, init=False, repr=False)
    """The status last answered for each job id (see ``_status``)."""
    on_statuses: Callable[[], None] | None = None
    """Called as ``statuses`` starts (a test's hook into the middle of a poll cycle)."""
    on_submit: Callable[[], None] | None = None
    """Called as ``submit`` starts (a test's hook into an sbatch under way)."""
    submit_timeouts: list[float | None] = field(default_factory=list)
    """The ``timeout`` each submit was given."""
    submits: int = 0
    sacct_behind: set[str] = field(default_factory=set)
    """Ids of ended jobs slurmdbd has not recorded yet: shown as squeue shows them (the real
    client's fallback), where a job cancelled while pending has its cancel as its start."""
    cancels: list[str] = field(default_factory=list)
    accounts: set[tuple[str, str]] = field(default_factory=set)
    """(account, user) associations."""
    created_accounts: set[tuple[str, str | None]] = field(default_factory=set)
    """(account, parent) the broker created."""
    cancelled_as: list[str | None] = field(default_factory=list)
    unix_users: set[str] = field(default_factory=lambda: {"alice", "bob", "ops"})
    """Unix accounts sudo lets the service account act as."""
    directories: set[tuple[str, str]] = field(default_factory=set)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    """Path -> (owner, content): what jobs wrote."""
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def runner(self) -> _NullRunner:
        return _NullRunner()

    def _check_up(self) -> None:
        if self.down is not None:
            raise self.down

    def submit(self, spec: JobSpec, *, timeout: float | None = None) -> str:
        self.submit_timeouts.append(timeout)
        if self.on_submit is not None:
            self.on_submit()
        self._check_up()
        with self._lock:
            if self.refuse_next_submit is not None:
                message, self.refuse_next_submit = self.refuse_next_submit, None
                raise CommandFailed(
                    ["sbatch"],
                    1,
                    f"sbatch: error: Batch job submission failed: {message}",
                    reason=message,  # as the adapter reads it (adapters/slurm/stderr.py)
                )
            self.submits += 1
            job_id = str(next(self._ids))
            if job_id in self.jobs:  # the id was given again (the controller lost its state)
                self.earlier.setdefault(job_id, []).insert(0, self.jobs[job_id])
            self.jobs[job_id] = FakeJob(job_id, spec, comment=job_comment(spec))
            if self.lose_next_submit_answer:
                self.lose_next_submit_answer = False
                from adapters.errors import ConnectionLost

                raise ConnectionLost("fake", "connection reset after the command was sent")
            return job_id

    def statuses(
        self, job_ids: Iterable[str], *, accounts: Sequence[str] | None = None
    ) -> StatusReport:
        """As the real client: the current holder of each id, and when that one came from sacct
        (it ended), the older sacct records under the same id; with ``accounts``, the jobs of
        those accounts in squeue that were not asked about are ``others``."""
        if self.on_statuses is not None:
            self.on_statuses()
        self._check_up()
        job_ids = list(job_ids)
        others = tuple(
            self._status(job)
            for job_id, job in self.jobs.items()
            if accounts and job.spec.account in accounts and job_id not in job_ids and job.in_squeue
        )
        found: dict[str, JobStatus] = {}
        earlier: dict[str, tuple[JobStatus, ...]] = {}
        missing: set[str] = set()
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            older = [self._status(j) for j in self.earlier.get(job_id, []) if j.in_sacct]
            if job is None or not (job.in_squeue or job.in_sacct):
                if older:
                    found[job_id], *rest = older
                    earlier[job_id] = tuple(rest)
                else:
                    missing.add(job_id)
                continue
            found[job_id] = self._status(job)
            if found[job_id].source == "sacct" and older:
                earlier[job_id] = tuple(older)
        return StatusReport(
            found=found, missing=frozenset(missing), earlier=earlier, others=others, commands=2
        )

    def _status(self, job: FakeJob) -> JobStatus:
        """As the real client (``SqueueMemo``): a job squeue shows as it did in the last answer
        is the very same status object again, so the poller's shortcut for that is exercised."""
        status = self._new_status(job)
        last = self._last_status.get(job.job_id)
        if status.source == "squeue" and status == last:
            return last
        self._last_status[job.job_id] = status
        return status

    def _new_status(self, job: FakeJob) -> JobStatus:
        status = self._accounted_status(job)
        if not (is_ended(job.state) and job.job_id in self.sacct_behind):
            return status
        return replace(
            status,
            alloc_gpus=job.alloc_gpus or job.spec.gpus,
            elapsed_s=job.elapsed_s or 0,
            start_time=job.started or job.ended,
            end_time=None,
            exit_code=None,
            source="squeue",
        )

    def _accounted_status(self, job: FakeJob) -> JobStatus:
        ended = is_ended(job.state)
        return JobStatus(
            job_id=job.job_id,
            state=job.state,
            reason=job.reason,
            name=job.spec.name,
            comment=job.comment,
            alloc_gpus=job.alloc_gpus,
            exit_code=job.exit_code,
            elapsed_s=job.elapsed_s,
            start_time=job.started,
            end_time=job.ended if ended else None,
            source="sacct" if ended else "squeue",
            account=job.spec.account,
            user=job.spec.run_as,
            submit_time=job.submitted,
            partition=job.spec.partition,
        )

    def find_by_tag(
        self, tag: str, since: datetime, *, accounts: Sequence[str] | None = None
    ) -> list[JobStatus]:
        self._check_up()
        return [self._status(j) for j in self.jobs.values() if j.spec.tag == tag]

    def cancel(
        self, job_id: str, *, as_user: str | None = None, only_pending: bool = False
    ) -> None:
        self._check_up()
        self.cancels.append(job_id)
        self.cancelled_as.append(as_user)
        job = self.jobs.get(job_id)
        if only_pending and job is not None and job.state != "PENDING":
            return
        if job is not None and not is_ended(job.state):
            job.state = "CANCELLED"
            job.elapsed_s = job.elapsed_s or 0
            job.ended = datetime.now(UTC)

    def capacity(self) -> list[PartitionCapacity]:
        self._check_up()
        return list(self.partitions)

    def accounting(
        self,
        since: datetime,
        until: datetime | None = None,
        *,
        accounts: Sequence[str] | None = None,
        job_ids: Sequence[str] | None = None,
    ) -> list[AccountingRecord]:
        self._check_up()
        return []

    def ensure_account(
        self,
        account: str,
        user: str | None = None,
        *,
        parent: str | None = None,
        coordinator: str | None = None,
    ) -> None:
        self._check_up()
        self.created_accounts.add((account, parent))
        if user is not None:
            self.accounts.add((account, user))

    def ensure_association(self, account: str, user: str) -> None:
        self._check_up()
        self.accounts.add((account, user))

    def remove_association(self, account: str, user: str) -> None:
        self._check_up()
        self.accounts.discard((account, user))

    def prepare_directory(self, user: str, path: str) -> None:
        self._check_up()
        if user not in self.unix_users:
            raise RunAsRefused(
                ["sudo", "-n", "-u", user], 1, f"sudo: unknown user {user}", user=user
            )
        self.directories.add((user, path))

    def read_file(self, user: str, path: str, offset: int, limit: int) -> FileChunk | None:
        self._check_up()
        owner_and_data = self.files.get(path)
        if owner_and_data is None:
            return None
        owner, data = owner_and_data
        if owner != user:
            raise CommandFailed(["dd"], 1, f"dd: failed to open '{path}': Permission denied")
        return FileChunk(offset=offset, size=len(data), data=data[offset : offset + limit])

    # --- what a test says Slurm does next ----------------------------------------------------

    def finish(
        self,
        job_id: str,
        state: str,
        elapsed_s: int,
        alloc_gpus: int | None = None,
        exit_code: int = 0,
        *,
        end_known: bool = True,
        at: datetime | None = None,
    ) -> None:
        """The job ends as ``state`` (a Slurm code) after ``elapsed_s``, at ``at`` (default:
        now); ``end_known=False`` is sacct after a slurmdbd restart: ``End=Unknown``."""
        job = self.jobs[job_id]
        job.state, job.elapsed_s, job.exit_code = state, elapsed_s, exit_code
        end = at or datetime.now(UTC)
        job.started = job.started or end - timedelta(seconds=elapsed_s)
        if not end_known:
            job.ended = None
        else:
            job.ended = at if at is not None else job.started + timedelta(seconds=elapsed_s)
        job.alloc_gpus = alloc_gpus if alloc_gpus is not None else job.spec.gpus
        job.reason = None

    def sbatch_from_a_job(
        self,
        account: str,
        user: str,
        gpus: int,
        *,
        partition: str = "gpu",
        comment: str | None = None,
    ) -> str:
        """A researcher's script runs sbatch itself: a job in ``account`` the broker never
        submitted (no tag of its own, or whatever ``comment`` the script chose)."""
        with self._lock:
            job_id = str(next(self._ids))
            spec = JobSpec(
                script="#!/bin/sh\n",
                account=account,
                partition=partition,
                gpus=gpus,
                time_limit_minutes=60,
                tag="unused",
                name="wrap",
                run_as=user,
            )
            self.jobs[job_id] = FakeJob(job_id, spec, comment=comment)
            return job_id

    def start(self, job_id: str, at: datetime | None = None) -> None:
        job = self.jobs[job_id]
        job.state, job.reason = "RUNNING", None
        job.started = at or datetime.now(UTC)

    def reuse_ids(self) -> None:
        """The controller loses its state: job ids start again from the first one."""
        self._ids = itertools.count(1000)

    def unreachable(self) -> None:
        self.down = HostUnreachable("fake-login", "connection refused")
