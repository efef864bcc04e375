"""Job rows inserted in bulk with SQLAlchemy Core: a database that looks like months of use.

Rows are shaped exactly like ``broker.db.models.JobRecord`` rows the service layer writes (tag
``brk-<id>``, reservation released and charge set once final). Job events are not generated: no
read measured here touches them.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session

from benchmarks.broker_process import Database, add_project, add_researcher
from broker.clock import utcnow
from broker.db.engine import transaction
from broker.db.models import JobRecord, ProjectRecord, UserRecord
from broker.schemas import UserCreate
from broker.service import identity, ledger

PLACEMENTS = (("alpha", "gpu", "h100", 1.0), ("alpha", "debug", "h100", 1.0))
PLACEMENTS_BETA = (("beta", "gpu", "a100", 0.5),)
STATE_WEIGHTS = {
    "completed": 80,
    "failed": 8,
    "cancelled": 6,
    "running": 4,
    "pending": 2,
}
"""Most jobs of a real database have ended; a few percent are live."""


def job_row(
    *,
    project_id: int,
    user_id: int,
    account: str,
    state: str,
    submitted_at: datetime,
    cluster: str = "alpha",
    partition: str = "gpu",
    gpu_type: str = "h100",
    weight: float = 1.0,
    gpus: int = 1,
    time_limit_minutes: int = 60,
    slurm_job_id: str | None = None,
    elapsed_s: int | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    """One ``jobs`` row. Final states carry their charge and no reservation; live ones hold
    their reservation (``gpus x time limit x weight``)."""
    job_id = str(uuid.uuid4())
    reservation = int(gpus * time_limit_minutes * 60 * weight)
    final = state not in ("pending", "running", "submitting", "submit_unknown")
    started_at = submitted_at + timedelta(minutes=5) if state != "pending" else None
    ended_at = None
    charged = None
    if final:
        elapsed_s = time_limit_minutes * 30 if elapsed_s is None else elapsed_s
        ended_at = (started_at or submitted_at) + timedelta(seconds=elapsed_s)
        charged = int(gpus * elapsed_s * weight)
    return {
        "id": job_id,
        "tag": tag or f"brk-{job_id}",
        "project_id": project_id,
        "user_id": user_id,
        "name": "train",
        "cluster": cluster,
        "partition": partition,
        "gpu_type": gpu_type,
        "account": account,
        "gpus": gpus,
        "nodes": 1,
        "time_limit_minutes": time_limit_minutes,
        "cpus_per_gpu": None,
        "mem_per_gpu_gb": None,
        "script_sha256": "0" * 64,
        "state": state,
        "state_reason": "None" if state == "running" else None,
        "slurm_job_id": slurm_job_id,
        "exit_code": 0 if state == "completed" else (1 if state == "failed" else None),
        "submitted_at": submitted_at,
        "started_at": started_at,
        "ended_at": ended_at,
        "updated_at": ended_at or started_at or submitted_at,
        "weight": weight,
        "reservation_gpu_seconds": reservation,
        "reserved_gpu_seconds": 0 if final else reservation,
        "charged_gpu_seconds": charged,
        "alloc_gpus": gpus if final else None,
        "elapsed_s": elapsed_s if final else None,
        "missing_polls": 0,
        "cancel_requested_at": None,
        "idempotency_key": None,
        "request_sha256": "0" * 64,
    }


def insert_jobs(
    db: Database, rows: Sequence[Mapping[str, Any]], *, batch: int = 5_000, totals: bool = True
) -> None:
    """Insert job rows in bulk. Where the broker keeps ledger totals of its own
    (``broker.service.ledger.rebuild``), they are rebuilt from the rows in the same
    transaction, as they would have been kept had the jobs gone through the service;
    ``totals=False`` leaves that to a later ``rebuild_totals``."""
    with transaction(db.sessions) as session:
        for offset in range(0, len(rows), batch):
            session.execute(insert(JobRecord), list(rows[offset : offset + batch]))
        if totals:
            _rebuild(session)


def _rebuild(session: Session) -> None:
    rebuild = getattr(ledger, "rebuild", None)
    if callable(rebuild):
        rebuild(session)


def rebuild_totals(db: Database) -> None:
    """The ledger totals from the job rows (where the broker keeps totals)."""
    with transaction(db.sessions) as session:
        _rebuild(session)


def analyze(db: Database) -> None:
    """Refresh the planner's statistics, as autovacuum does on PostgreSQL soon after a bulk load.
    (SQLite is left as a deployment leaves it: the broker never runs ANALYZE there.)"""
    if db.engine.dialect.name == "postgresql":
        with db.engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()


@dataclass(frozen=True, slots=True)
class History:
    """What ``seed_history`` created, for choosing requests."""

    token: str
    """Token of the researcher who reads (member of ``own_projects``)."""
    own_projects: tuple[str, ...]
    visible_job_ids: tuple[str, ...]
    """A sample of ids of jobs the researcher may read."""
    jobs: int


def _weighted_states(rng: random.Random, count: int) -> Iterator[str]:
    names = list(STATE_WEIGHTS)
    weights = list(STATE_WEIGHTS.values())
    return iter(rng.choices(names, weights, k=count))


@dataclass
class People:
    """The projects and researchers of a seeded history."""

    token: str
    project_names: list[str]
    members: dict[str, list[str]]
    project_ids: dict[str, int]
    user_ids: dict[str, int]


def seed_people(
    db: Database, *, projects: int = 50, researchers: int = 200, rng: random.Random
) -> People:
    """``projects`` projects and ``researchers`` users, each user in two projects; the reading
    researcher ``bench`` is a member of the first two projects."""
    token = add_researcher(db, "bench")
    with transaction(db.sessions) as session:
        for index in range(researchers):
            identity.create_user(
                session, "bench", UserCreate(name=f"user{index:03d}", role="researcher")
            )
    project_names = [f"project-{index:02d}" for index in range(projects)]
    members: dict[str, list[str]] = {name: [] for name in project_names}
    for index in range(researchers):
        for name in rng.sample(project_names, 2):
            members[name].append(f"user{index:03d}")
    for name in project_names[:2]:
        members[name].append("bench")
    for name in project_names:
        add_project(db, name, {"alpha": name, "beta": name}, members[name])
    with db.sessions() as session:
        project_ids = dict(session.execute(select(ProjectRecord.name, ProjectRecord.id)).all())
        user_ids = dict(session.execute(select(UserRecord.name, UserRecord.id)).all())
    return People(token, project_names, members, project_ids, user_ids)


def add_history(
    db: Database,
    people: People,
    jobs: int,
    *,
    rng: random.Random,
    days: int = 180,
    chunk: int = 50_000,
    keep_ids_of: Sequence[str] = (),
) -> list[str]:
    """``jobs`` job rows over the people's projects, submitted over the last ``days`` days,
    inserted ``chunk`` at a time (so a million rows never sit in memory at once); ledger totals
    are rebuilt once at the end. Returns the ids of the jobs of the projects ``keep_ids_of``."""
    now = utcnow()
    kept_projects = {people.project_ids[p] for p in keep_ids_of}
    kept: list[str] = []
    done = 0
    while done < jobs:
        size = min(chunk, jobs - done)
        states = _weighted_states(rng, size)
        rows = []
        for _ in range(size):
            project = rng.choice(people.project_names)
            cluster, partition, gpu_type, weight = rng.choice(PLACEMENTS + PLACEMENTS_BETA)
            state = next(states)
            submitted = now - timedelta(seconds=rng.uniform(60, days * 86_400))
            rows.append(
                job_row(
                    project_id=people.project_ids[project],
                    user_id=people.user_ids[rng.choice(people.members[project])],
                    account=project,
                    state=state,
                    submitted_at=submitted,
                    cluster=cluster,
                    partition=partition,
                    gpu_type=gpu_type,
                    weight=weight,
                    gpus=rng.choice((1, 2, 4, 8)),
                    time_limit_minutes=rng.choice((30, 60, 240, 1440)),
                    slurm_job_id=str(rng.randint(1, 9_999_999)),
                    elapsed_s=rng.randint(10, 86_400)
                    if state not in ("pending", "running")
                    else None,
                )
            )
        insert_jobs(db, rows, totals=False)
        kept += [r["id"] for r in rows if r["project_id"] in kept_projects]
        done += size
    rebuild_totals(db)
    analyze(db)
    return kept


def copy_history(db: Database, jobs: int) -> None:
    """``jobs`` more job rows on PostgreSQL, copied server-side from those already there (each
    copy with a new id and tag): the same mix of projects, users, states and times, at a
    fraction of the cost of building rows in Python (a million rows in seconds). Ledger totals
    are rebuilt and the planner's statistics refreshed at the end."""
    if db.engine.dialect.name != "postgresql":
        raise ValueError("copy_history needs PostgreSQL")
    columns = [c.name for c in JobRecord.__table__.columns if c.name not in ("id", "tag")]
    listed = ", ".join(f'"{name}"' for name in columns)
    copied = ", ".join(f'src."{name}"' for name in columns)
    statement = text(
        f"INSERT INTO jobs (id, tag, {listed}) "
        f"SELECT src.new_id, 'brk-' || src.new_id, {copied} "
        "FROM (SELECT gen_random_uuid()::text AS new_id, j.* FROM jobs AS j LIMIT :n) AS src"
    )
    done = 0
    while done < jobs:
        with transaction(db.sessions) as session:
            have = int(session.scalar(select(func.count()).select_from(JobRecord)) or 0)
            if have == 0:
                raise ValueError("no job rows to copy")
            step = min(have, jobs - done)
            session.execute(statement, {"n": step})
        done += step
    rebuild_totals(db)
    analyze(db)


def seed_history(
    db: Database,
    *,
    jobs: int,
    projects: int = 50,
    researchers: int = 200,
    days: int = 180,
    sample: int = 2000,
    seed: int = 7,
) -> History:
    """``jobs`` job rows over ``projects`` projects and ``researchers`` users, submitted over the
    last ``days`` days. The reading researcher, ``bench``, is a member of the first two projects,
    each user of two projects."""
    rng = random.Random(seed)
    people = seed_people(db, projects=projects, researchers=researchers, rng=rng)
    own = tuple(people.project_names[:2])
    own_ids = add_history(db, people, jobs, rng=rng, days=days, keep_ids_of=own)
    visible = tuple(rng.sample(own_ids, min(sample, len(own_ids))))
    return History(token=people.token, own_projects=own, visible_job_ids=visible, jobs=jobs)
