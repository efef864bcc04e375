"""Where a job that names no cluster goes (API.md, "Placement").

Among the clusters the project may use (it has a Slurm account there and its quota allows the
cluster) and their partitions that offer the requested GPU type (or any type the quota allows),
the broker takes the one with the most idle GPUs in the poller's last snapshot, less the GPUs of
the broker's own jobs that wait there (queued, on their way, or pending in Slurm): those will
take the idle GPUs first. Ties go to the cluster's default partition, then to the cluster named
first. The reasoning goes into the job's first event: ``placed on beta/gpu: 8 idle a100;
alpha/gpu: 0 idle h100``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker.config import Settings
from broker.db.models import ClusterStatusRecord, JobRecord, ProjectRecord, QuotaRecord
from broker.lifecycle import JobState
from broker.service.ledger import HELD_GPUS

WAITING_STATES = (
    JobState.QUEUED.value,
    JobState.SUBMITTING.value,
    JobState.SUBMIT_UNKNOWN.value,
    JobState.PENDING.value,
)


def _count(entry: dict[str, object], key: str) -> int:
    value = entry.get(key, 0)
    return value if isinstance(value, int) and value > 0 else 0


@dataclass(frozen=True, slots=True)
class Option:
    cluster: str
    partition: str
    gpu_type: str
    idle: int
    """Idle GPUs in the last poll, less what the broker's waiting jobs there will take."""


@dataclass(frozen=True, slots=True)
class Placement:
    cluster: str
    partition: str
    gpu_type: str
    why: str


def options(
    session: Session,
    settings: Settings,
    project: ProjectRecord,
    quota: QuotaRecord | None,
    *,
    partition: str | None = None,
    gpu_type: str | None = None,
    exclude: str | None = None,
) -> list[Option]:
    """Every (cluster, partition) the job could go to, best first."""
    allowed_clusters = None if quota is None else quota.allowed_clusters
    allowed_partitions = None if quota is None else quota.allowed_partitions
    allowed_types = None if quota is None else quota.allowed_gpu_types
    clusters = [
        name
        for name in sorted(project.slurm_accounts)
        if name in settings.clusters
        and name != exclude
        and (allowed_clusters is None or name in allowed_clusters)
    ]
    if not clusters:
        return []
    snapshots = {
        row.name: row
        for row in session.scalars(
            select(ClusterStatusRecord).where(ClusterStatusRecord.name.in_(clusters))
        )
    }
    waiting = {
        (cluster, gpu): int(gpus or 0)
        for cluster, gpu, gpus in session.execute(
            select(JobRecord.cluster, JobRecord.gpu_type, func.sum(HELD_GPUS))
            .where(JobRecord.cluster.in_(clusters), JobRecord.state.in_(WAITING_STATES))
            .group_by(JobRecord.cluster, JobRecord.gpu_type)
        )
    }
    found: list[tuple[tuple[int, int, int], Option]] = []
    for rank, name in enumerate(clusters):
        config = settings.clusters[name]
        snapshot = snapshots.get(name)
        idle_by_partition = {
            str(entry.get("name")): _count(entry, "gpus_idle")
            for entry in (snapshot.partitions if snapshot is not None and snapshot.up else [])
        }
        for part, part_config in config.partitions.items():
            if partition is not None and part != partition:
                continue
            if gpu_type is not None and part_config.gpu_type != gpu_type:
                continue
            if allowed_partitions is not None and part not in allowed_partitions:
                continue
            if allowed_types is not None and part_config.gpu_type not in allowed_types:
                continue
            idle = idle_by_partition.get(part, 0) - waiting.get((name, part_config.gpu_type), 0)
            option = Option(name, part, part_config.gpu_type, max(0, idle))
            preference = (-option.idle, 0 if part == config.default_partition else 1, rank)
            found.append((preference, option))
    return [option for _, option in sorted(found, key=lambda item: item[0])]


def describe(chosen: Option, others: list[Option], verb: str = "placed on") -> str:
    parts = [f"{verb} {chosen.cluster}/{chosen.partition}: {chosen.idle} idle {chosen.gpu_type}"]
    parts += [f"{o.cluster}/{o.partition}: {o.idle} idle {o.gpu_type}" for o in others[:4]]
    return "; ".join(parts)


def choose(
    session: Session,
    settings: Settings,
    project: ProjectRecord,
    quota: QuotaRecord | None,
    *,
    partition: str | None,
    gpu_type: str | None,
) -> Placement | None:
    """The best place for a job that names no cluster, under ``quota`` (the project's, as read
    under its ledger lock); None when no cluster offers it."""
    ranked = options(session, settings, project, quota, partition=partition, gpu_type=gpu_type)
    if not ranked:
        return None
    best, *others = ranked
    return Placement(best.cluster, best.partition, best.gpu_type, describe(best, others))
