"""The broker's state as the scrape-time series need it, read from the database in a few queries
whose cost does not grow with the number of jobs: the ledger's totals and the jobs' totals by
group (both kept by ``broker.service.ledger``), the live job arrays' charges so far (by their
partial index), and cluster snapshots."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker.db.models import (
    ClusterStatusRecord,
    JobRecord,
    JobTotalRecord,
    LeaseRecord,
    ProjectRecord,
    QuotaRecord,
)
from broker.scheduler import LEASE_NAME
from broker.service import ledger


@dataclass(frozen=True, slots=True)
class ProjectLedger:
    """A project's current allocation period, in weighted GPU-seconds (as ``ledger.snapshot``)."""

    budget: int = 0
    used: int = 0
    reserved: int = 0
    period_start: datetime | None = None
    period_end: datetime | None = None

    @property
    def remaining(self) -> int:
        """As ``GET /v1/projects/{name}/usage`` shows it: negative when a quota was lowered."""
        return self.budget - self.used - self.reserved


@dataclass(frozen=True, slots=True)
class JobGroup:
    """Jobs sharing project, cluster, GPU type and state."""

    jobs: int
    gpus: int
    charged_gpu_seconds: int
    gpu_seconds: int


@dataclass(frozen=True, slots=True)
class ClusterState:
    up: bool
    last_poll_at: datetime | None
    last_success_at: datetime | None
    last_poll_duration_s: float | None
    partitions: tuple[dict[str, object], ...]


@dataclass(frozen=True, slots=True)
class DatabaseState:
    """One consistent-enough read of everything the scrape-time series need."""

    project_clusters: dict[str, frozenset[str]]
    """Clusters a project has a Slurm account on: the clusters its series are zero-filled for."""
    ledgers: dict[str, ProjectLedger]
    groups: dict[tuple[str, str, str, str], JobGroup]
    """(project, cluster, gpu_type, state) -> totals."""
    clusters: dict[str, ClusterState]
    lease_expires_at: datetime | None
    read_seconds: float = 0.0


def read_state(session: Session) -> DatabaseState:
    """Everything the scrape-time series need, in a few queries whatever the number of jobs."""
    started = time.perf_counter()
    projects: dict[int, str] = {}
    project_clusters: dict[str, frozenset[str]] = {}
    for project_id, name, accounts in session.execute(
        select(ProjectRecord.id, ProjectRecord.name, ProjectRecord.slurm_accounts)
    ):
        projects[project_id] = name
        project_clusters[name] = frozenset(accounts or {})

    # The ledger of the current period, as broker.service.ledger.snapshot counts it, for every
    # project at once, from the ledger's totals.
    period_sums = ledger.current_periods(session)
    ledgers = {name: ProjectLedger() for name in projects.values()}
    for project_id, start, end, budget in session.execute(
        select(
            QuotaRecord.project_id,
            QuotaRecord.period_start,
            QuotaRecord.period_end,
            QuotaRecord.budget_gpu_seconds,
        )
    ):
        name = projects.get(project_id)
        if name is None:
            continue
        used, reserved = period_sums.get(project_id, (0, 0))
        ledgers[name] = ProjectLedger(budget, used, reserved, start, end)

    groups: dict[tuple[str, str, str, str], JobGroup] = {}
    # Every job, live or finished, from the kept totals (``ledger.regrouped``, ``ledger.settled``).
    for row in session.scalars(select(JobTotalRecord).where(JobTotalRecord.jobs != 0)):
        name = projects.get(row.project_id)
        if name is not None:
            groups[(name, row.cluster, row.gpu_type, row.state)] = JobGroup(
                int(row.jobs), int(row.gpus), int(row.charged_gpu_seconds), int(row.gpu_seconds)
            )
    # What live job arrays (a few: ``ix_jobs_arrays_state``) were charged for ended tasks so far.
    for project_id, cluster, gpu_type, job_state, charged, gpu_seconds in session.execute(
        _LIVE_ARRAY_CHARGES
    ):
        name = projects.get(project_id)
        group = groups.get((name or "", cluster, gpu_type, job_state))
        if group is not None and (charged or gpu_seconds):
            groups[(name or "", cluster, gpu_type, job_state)] = JobGroup(
                group.jobs,
                group.gpus,
                group.charged_gpu_seconds + int(charged or 0),
                group.gpu_seconds + int(gpu_seconds or 0),
            )

    clusters = {
        row.name: ClusterState(
            up=row.up,
            last_poll_at=row.last_poll_at,
            last_success_at=row.last_success_at,
            last_poll_duration_s=row.last_poll_duration_s,
            partitions=tuple(row.partitions or ()),
        )
        for row in session.scalars(select(ClusterStatusRecord))
    }
    lease_expires_at = session.scalar(
        select(LeaseRecord.expires_at).where(LeaseRecord.name == LEASE_NAME)
    )
    return DatabaseState(
        project_clusters=project_clusters,
        ledgers=ledgers,
        groups=groups,
        clusters=clusters,
        lease_expires_at=lease_expires_at,
        read_seconds=time.perf_counter() - started,
    )


_LIVE_ARRAY_CHARGES = (
    select(
        JobRecord.project_id,
        JobRecord.cluster,
        JobRecord.gpu_type,
        JobRecord.state,
        func.sum(JobRecord.charged_gpu_seconds),
        func.sum(JobRecord.alloc_gpus * JobRecord.elapsed_s),
    )
    .where(JobRecord.array_size.is_not(None), JobRecord.state.in_(ledger.LIVE_STATES))
    .group_by(JobRecord.project_id, JobRecord.cluster, JobRecord.gpu_type, JobRecord.state)
)
"""Live arrays' charges so far, by group: the part of the live groups ``job_totals`` does not
keep (it counts a live job's jobs and GPUs only)."""
