"""Databases for metrics tests, filled by direct inserts (no service layer, no Slurm)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from broker.config import Settings
from broker.db.engine import make_engine, make_session_factory, transaction
from broker.db.migrate import upgrade
from broker.db.models import (
    ClusterStatusRecord,
    JobRecord,
    ProjectRecord,
    QuotaRecord,
    UserRecord,
)
from broker.service import ledger
from tests.pgdb import throwaway_database

NOW = datetime.now(UTC).replace(microsecond=0)
PERIOD_START = NOW - timedelta(days=30)
PERIOD_END = NOW + timedelta(days=335)


def metrics_settings(database_url: str) -> Settings:
    """Two clusters shaped like the dev cluster, run through the local transport (no keys)."""
    return Settings.model_validate(
        {
            "database": {"url": database_url},
            "clusters": {
                "alpha": {
                    "transport": "local",
                    "default_partition": "gpu",
                    "partitions": {"gpu": {"gpu_type": "h100"}, "debug": {"gpu_type": "h100"}},
                },
                "beta": {
                    "transport": "local",
                    "default_partition": "gpu",
                    "partitions": {"gpu": {"gpu_type": "a100"}},
                },
            },
        }
    )


@dataclass
class Database:
    engine: Engine
    sessions: sessionmaker[Session]
    settings: Settings
    user_id: int = 0
    project_ids: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        self.engine.dispose()


def make_database(url: str) -> Database:
    settings = metrics_settings(url)
    engine = make_engine(url)
    upgrade(engine)
    db = Database(engine, make_session_factory(engine), settings)
    with transaction(db.sessions) as session:
        session.execute(
            insert(UserRecord).values(id=1, name="alice", role="researcher", created_at=NOW)
        )
    db.user_id = 1
    return db


def add_project(
    db: Database,
    name: str,
    *,
    accounts: Sequence[str] = ("alpha", "beta"),
    budget: int | None = None,
    period: tuple[datetime, datetime] = (PERIOD_START, PERIOD_END),
) -> int:
    project_id = len(db.project_ids) + 1
    with transaction(db.sessions) as session:
        session.execute(
            insert(ProjectRecord).values(
                id=project_id,
                name=name,
                description="",
                slurm_accounts=dict.fromkeys(accounts, name),
                created_at=NOW,
                ledger_version=0,
            )
        )
        if budget is not None:
            session.execute(
                insert(QuotaRecord).values(
                    project_id=project_id,
                    period_start=period[0],
                    period_end=period[1],
                    budget_gpu_seconds=budget,
                    gpu_type_weights={"h100": 1.0, "a100": 0.5},
                    max_concurrent_gpus_per_cluster={},
                    updated_at=NOW,
                )
            )
    db.project_ids[name] = project_id
    return project_id


def job_row(
    db: Database,
    project: str,
    *,
    cluster: str = "alpha",
    gpu_type: str = "h100",
    state: str = "completed",
    gpus: int = 1,
    reserved: int = 0,
    charged: int | None = None,
    elapsed: int | None = None,
    submitted_at: datetime | None = None,
) -> dict[str, Any]:
    job_id = str(uuid.uuid4())
    submitted = submitted_at or NOW - timedelta(hours=1)
    return {
        "id": job_id,
        "tag": f"brk-{job_id}",
        "project_id": db.project_ids[project],
        "user_id": db.user_id,
        "name": "job",
        "cluster": cluster,
        "partition": "gpu",
        "gpu_type": gpu_type,
        "account": project,
        "gpus": gpus,
        "nodes": 1,
        "time_limit_minutes": 60,
        "cpus_per_gpu": None,
        "mem_per_gpu_gb": None,
        "script_sha256": "0" * 64,
        "state": state,
        "state_reason": None,
        "slurm_job_id": None,
        "exit_code": None,
        "submitted_at": submitted,
        # A settled job ran from its submission for its elapsed time (the ledger reads the run).
        "started_at": submitted if elapsed is not None else None,
        "ended_at": submitted + timedelta(seconds=elapsed or 0) if charged is not None else None,
        "updated_at": submitted,
        "weight": 1.0,
        "reservation_gpu_seconds": reserved,
        "reserved_gpu_seconds": reserved,
        "charged_gpu_seconds": charged,
        "alloc_gpus": gpus if elapsed is not None else None,
        "elapsed_s": elapsed,
        "missing_polls": 0,
        "cancel_requested_at": None,
        "idempotency_key": None,
        "request_sha256": "0" * 64,
    }


def add_jobs(db: Database, rows: Sequence[Mapping[str, Any]], *, batch: int = 10_000) -> None:
    with transaction(db.sessions) as session:
        for offset in range(0, len(rows), batch):
            session.execute(insert(JobRecord), list(rows[offset : offset + batch]))
        # Rows inserted past the service layer: the ledger's totals are derived from them here.
        ledger.rebuild(session)


def set_cluster_status(
    db: Database,
    name: str,
    *,
    up: bool = True,
    partitions: Sequence[Mapping[str, Any]] = (),
    last_success_at: datetime | None = NOW,
) -> None:
    with transaction(db.sessions) as session:
        session.merge(
            ClusterStatusRecord(
                name=name,
                up=up,
                last_poll_at=NOW,
                last_success_at=last_success_at,
                last_poll_duration_s=0.25,
                last_error=None,
                partitions=[dict(p) for p in partitions],
            )
        )


def partition(
    name: str,
    gpu_type: str,
    total: int,
    allocated: int = 0,
    idle: int | None = None,
    unavailable: int = 0,
    nodes: int = 4,
    nodes_down: int = 0,
) -> dict[str, Any]:
    return {
        "name": name,
        "gpu_type": gpu_type,
        "gpus_total": total,
        "gpus_allocated": allocated,
        "gpus_idle": total - allocated - unavailable if idle is None else idle,
        "gpus_unavailable": unavailable,
        "nodes_total": nodes,
        "nodes_down": nodes_down,
    }


class Scrape:
    """One exposition of a registry, parsed, with look-ups by name and labels."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.text = generate_latest(registry).decode()
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(self.text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))

    def series(self, name: str) -> Iterator[tuple[dict[str, str], float]]:
        yield from self.samples.get(name, [])

    def value(self, name: str, **labels: str) -> float:
        """The one sample of ``name`` whose labels include ``labels``; KeyError if none or many."""
        found = [v for ls, v in self.series(name) if all(ls.get(k) == x for k, x in labels.items())]
        if len(found) != 1:
            raise KeyError(f"{name}{labels}: {len(found)} samples")
        return found[0]

    def total(self, name: str, **labels: str) -> float:
        return sum(
            v for ls, v in self.series(name) if all(ls.get(k) == x for k, x in labels.items())
        )


@contextmanager
def temporary_postgres() -> Iterator[str]:
    """A new, empty PostgreSQL database (``tests.pgdb``), dropped afterwards."""
    with throwaway_database("broker_metrics") as url:
        yield url
