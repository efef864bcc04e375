"""Fresh databases and ``broker serve`` processes for the benchmarks.

The broker under load always runs as its own process (``broker serve``, one uvicorn process as
deployed), so that its throughput, latency and resident memory are the server's alone; the load
generators run in other processes or threads. The database is new for every run: a SQLite file or
a PostgreSQL database (``tests.pgdb``, shared with the tests), dropped afterwards.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.procstat import command_name, memory_kib, process_tree, tree_cpu_s
from benchmarks.slurm import BENCH_ACCOUNT, BROKER_TOML, REPO, RESEARCHER_UNIX_USER
from broker.clock import utcnow
from broker.config import Settings, environment_for, load_settings
from broker.db.engine import make_engine, make_session_factory, transaction
from broker.db.migrate import upgrade
from broker.schemas import MemberPut, ProjectCreate, QuotaPut, UserCreate
from broker.service import identity, projects
from broker.service.identity import Actor
from tests.pgdb import throwaway_database

Backend = Literal["sqlite", "postgres"]
BACKENDS: tuple[Backend, ...] = ("sqlite", "postgres")

BENCH_OVERRIDES: dict[str, Any] = {
    "poller": {"enabled": False},
    "limits": {"requests_per_minute": 0},
}
"""No poller in the server under load (polling is measured on its own) and no rate limit."""

ADMIN = "bench-admin"
RESEARCHER = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def fresh_database(backend: Backend, workdir: Path) -> Iterator[str]:
    """A new, empty database; yields its SQLAlchemy URL and deletes it afterwards."""
    name = f"broker_bench_{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        path = workdir / f"{name}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    with throwaway_database("broker_bench") as url:
        yield url


def bench_overrides(database_url: str) -> dict[str, Any]:
    """``BENCH_OVERRIDES`` with the database: what ``load_settings`` and the server are given."""
    return {**BENCH_OVERRIDES, "database": {"url": database_url}}


def bench_settings(database_url: str) -> Settings:
    """The dev cluster's broker.toml with the benchmark overrides, read as the server reads it."""
    return load_settings(BROKER_TOML, bench_overrides(database_url))


@dataclass
class Database:
    """An open, migrated database with the benchmark's admin."""

    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    admin: Actor

    def close(self) -> None:
        self.engine.dispose()


def open_database(url: str) -> Database:
    """Migrate the database and create the admin user through the service layer."""
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        identity.create_user(session, "bench", UserCreate(name=ADMIN, role="admin"))
        user_id = identity.get_user_record(session, ADMIN).id
    return Database(url, engine, sessions, Actor(user_id, ADMIN, "admin", frozenset()))


def add_researcher(db: Database, name: str) -> str:
    """A researcher and a token for them; returns the token."""
    with transaction(db.sessions) as session:
        # Jobs run as the dev cluster's researcher alice, through sudo, as in production.
        body = UserCreate(name=name, role="researcher", unix_user=RESEARCHER_UNIX_USER)
        identity.create_user(session, ADMIN, body)
        return identity.issue_token(session, ADMIN, name, "benchmark").token


def add_project(
    db: Database,
    name: str,
    accounts: Mapping[str, str],
    members: list[str],
    *,
    gpu_hours: float = 1e9,
) -> None:
    """A project with a quota open now and large enough never to refuse a benchmark job."""
    now = utcnow()
    with transaction(db.sessions) as session:
        projects.create_project(
            session,
            db.admin,
            ProjectCreate(name=name, slurm_accounts=dict(accounts)),
            known_clusters=set(accounts),
        )
        for member in members:
            projects.put_member(session, db.admin, name, member, MemberPut())
        projects.put_quota(
            session,
            db.admin,
            name,
            QuotaPut(
                period_start=now - timedelta(days=365),
                period_end=now + timedelta(days=365),
                gpu_hours=gpu_hours,
                gpu_type_weights={"h100": 1.0, "a100": 0.5},
            ),
        )


def seed_bench_project(url: str, cluster: str) -> str:
    """Project ``bench`` (Slurm account ``bench`` on ``cluster``) with one researcher, whose
    token is returned; the quota is one billion GPU-hours."""
    db = open_database(url)
    try:
        token = add_researcher(db, RESEARCHER)
        add_project(db, BENCH_ACCOUNT, {cluster: BENCH_ACCOUNT}, [RESEARCHER])
    finally:
        db.close()
    return token


_WORKERS_OPTION: dict[Path, bool] = {}


def code_environment(root: Path) -> dict[str, str]:
    """The environment that makes a Python process import the broker from ``root`` (this tree,
    or a baseline's worktree) rather than from wherever the virtualenv's editable install
    points."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else str(root)}


def serve_has_workers(root: Path = REPO) -> bool:
    """Whether ``broker serve`` of the code in ``root`` takes ``--workers N``."""
    if root not in _WORKERS_OPTION:
        cli = str(Path(sys.executable).with_name("broker"))
        done = subprocess.run(
            [cli, "serve", "--help"],
            env={**code_environment(root), "COLUMNS": "200"},
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        _WORKERS_OPTION[root] = "--workers" in done.stdout
    return _WORKERS_OPTION[root]


class BrokerServer:
    """``broker serve --no-poller`` on a free loopback port, in its own process (with
    ``workers`` > 1 and a ``serve`` that has ``--workers``: a supervisor and its workers)."""

    def __init__(
        self,
        database_url: str,
        workdir: Path,
        label: str,
        *,
        workers: int = 1,
        root: Path = REPO,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.label = label
        self.root = root
        self.workers = workers if workers > 1 and serve_has_workers(root) else 1
        self.log = workdir / f"broker-{label}-{self.port}.log"
        self._env = {
            **code_environment(root),
            **environment_for(bench_overrides(database_url)),
            "BROKER_CONFIG": str(BROKER_TOML),
        }
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the broker is not running")
        return self._proc.pid

    def start(self, timeout: float = 60) -> BrokerServer:
        cli = str(Path(sys.executable).with_name("broker"))
        argv = [cli, "serve", "--port", str(self.port), "--no-poller", "--log-level", "warning"]
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, env=self._env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"broker serve did not come up; see {self.log}")
            time.sleep(0.2)

    def memory_kib(self) -> dict[str, int]:
        """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of the server's largest
        process, in KiB (the only one without workers)."""
        processes = self.processes()
        return {
            "VmRSS": max(p["rss_kib"] for p in processes),
            "VmHWM": max(p["hwm_kib"] for p in processes),
        }

    def processes(self) -> list[dict[str, Any]]:
        """Every process of the server (supervisor first, then workers): pid, command, resident
        and peak resident memory in KiB."""
        rows = []
        for pid in process_tree(self.pid):
            try:
                memory = memory_kib(pid)
            except OSError:
                continue
            rows.append(
                {
                    "pid": pid,
                    "command": command_name(pid),
                    "rss_kib": memory.get("VmRSS", 0),
                    "hwm_kib": memory.get("VmHWM", 0),
                }
            )
        return rows

    def cpu_s(self) -> float:
        """CPU seconds used so far by the server's processes together."""
        return tree_cpu_s(self.pid)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)

    def __enter__(self) -> BrokerServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One ``/metrics`` scrape, parsed: (sample name, sorted labels) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples
