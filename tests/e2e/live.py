"""A real broker for end-to-end tests: real dev cluster over SSH, real PostgreSQL, real HTTP.

``LiveBroker`` serves in this process (uvicorn in a thread); ``BrokerProcess`` runs
``broker serve`` as a child process, for tests that kill it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn

from broker.api.app import create_app
from broker.config import Settings, environment_for, load_settings
from broker.db.engine import transaction
from broker.db.migrate import upgrade
from broker.runtime import Runtime, build_runtime
from broker.schemas import UserCreate
from broker.service import identity
from tests import devcluster

T = TypeVar("T")
SLEEP_SCRIPT = "#!/bin/bash\nsleep {seconds}\n"
# Fast cycles so tests see state changes within seconds.
TEST_OVERRIDES: dict[str, Any] = {
    "poller": {
        "interval_seconds": 1,
        "lease_seconds": 5,
        "missing_polls_before_unknown": 3,
        # A submitter gets sbatch this long less 2 s (broker.service.jobs._sbatch_budget):
        # enough for a loaded CI machine, short enough for the crash tests.
        "stale_submitting_seconds": 12,
        # Also how long a dead releaser's claim waits before its job is queued again.
        "submit_unknown_grace_seconds": 30,
    },
    "limits": {"requests_per_minute": 0},
}


def merged(*tables: Mapping[str, Any] | None) -> dict[str, Any]:
    """Nested configuration tables laid over each other left to right, key by key."""
    out: dict[str, Any] = {}
    for table in tables:
        for key, value in (table or {}).items():
            current = out.get(key)
            if isinstance(value, Mapping) and isinstance(current, Mapping):
                out[key] = merged(current, value)
            else:
                out[key] = value
    return out


def broker_overrides(
    database_url: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``TEST_OVERRIDES`` with the database and the caller's ``overrides`` laid over them."""
    return merged(TEST_OVERRIDES, {"database": {"url": database_url}}, overrides)


def job_body(
    project: str, cluster: str, *, seconds: int, gpus: int = 1, minutes: int = 10
) -> dict[str, Any]:
    """A POST /v1/jobs body for a job that sleeps ``seconds``."""
    return {
        "project": project,
        "cluster": cluster,
        "gpus": gpus,
        "time_limit_minutes": minutes,
        "script": SLEEP_SCRIPT.format(seconds=seconds),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    probe: Callable[[], T | None], *, timeout: float, interval: float = 0.25, what: str = "it"
) -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def dev_settings(database_url: str, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The dev cluster's broker.toml with ``TEST_OVERRIDES``, the database and ``overrides``."""
    devcluster.cluster_names()  # fails the test with the set-up command if the cluster is absent
    return load_settings(devcluster.BROKER_TOML, broker_overrides(database_url, overrides))


@dataclass
class Client:
    """An HTTP client for one user of the live broker."""

    base_url: str
    token: str
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
        )

    def wait_state(self, job_id: str, states: set[str], timeout: float = 60) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            job: dict[str, Any] = self.http.get(f"/v1/jobs/{job_id}").json()
            return job if job["state"] in states else None

        return wait_for(probe, timeout=timeout, what=f"job {job_id} to reach {states}")


def seed_users(runtime: Runtime) -> dict[str, str]:
    """Users root (admin), alice and bob (researchers, whose jobs run as the dev cluster's Unix
    users alice and bob), eve (engineer); returns their tokens."""
    tokens = {}
    with transaction(runtime.sessions) as session:
        for name, role, unix_user in (
            ("root", "admin", None),
            ("alice", "researcher", "alice"),
            ("bob", "researcher", "bob"),
            ("eve", "engineer", None),
        ):
            body = UserCreate.model_validate({"name": name, "role": role, "unix_user": unix_user})
            identity.create_user(session, "test", body)
            tokens[name] = identity.issue_token(session, "test", name, "e2e").token
    return tokens


def new_project(
    admin: Client,
    member: str,
    *,
    gpu_hours: float,
    weights: dict[str, float] | None = None,
    **limits: Any,
) -> str:
    """A project with a fresh Slurm account on both clusters and a quota open now."""
    name = f"p{uuid.uuid4().hex[:10]}"
    created = admin.http.post(
        "/v1/projects",
        json={"name": name, "slurm_accounts": {"alpha": name, "beta": name}},
    )
    assert created.status_code == 201, created.text
    assert admin.http.put(f"/v1/projects/{name}/members/{member}", json={}).status_code == 200
    now = datetime.now(UTC)
    quota = {
        "period_start": (now - timedelta(days=1)).isoformat(),
        "period_end": (now + timedelta(days=30)).isoformat(),
        "gpu_hours": gpu_hours,
        "gpu_type_weights": weights or {"h100": 1.0, "a100": 0.5},
        **limits,
    }
    put = admin.http.put(f"/v1/projects/{name}/quota", json=quota)
    assert put.status_code == 200, put.text
    return name


class LiveBroker:
    """The broker app with its poller, served by uvicorn on a free loopback port."""

    def __init__(self, settings: Settings, port: int | None = None) -> None:
        self.runtime = build_runtime(settings)
        upgrade(self.runtime.engine)
        self.tokens = seed_users(self.runtime)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.runtime, run_poller=True)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> LiveBroker:
        self._thread.start()
        wait_for(lambda: self._server.started, timeout=20, what="uvicorn to start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def client(self, user: str) -> Client:
        return Client(self.url, self.tokens[user])

    def cancel_everything(self) -> None:
        """Leave the dev cluster empty for the next test."""
        from sqlalchemy import select

        from broker.db.models import JobRecord
        from broker.lifecycle import LIVE, values

        with self.runtime.sessions() as session:
            live = session.execute(
                select(JobRecord.cluster, JobRecord.slurm_job_id).where(
                    JobRecord.state.in_(values(LIVE)), JobRecord.slurm_job_id.is_not(None)
                )
            ).all()
        for cluster, slurm_job_id in live:
            if slurm_job_id is not None:
                self.runtime.clusters.client(cluster).cancel(slurm_job_id)


def squeue_ids(runtime: Runtime, cluster: str, account: str) -> list[str]:
    """Job ids Slurm has queued or running for ``account``: asked of Slurm directly."""
    client = runtime.clusters.client(cluster)
    result = client.runner.run(
        ["squeue", "-h", "-A", account, "-t", "PD,R,CF,CG", "-o", "%i"], timeout=30
    )
    assert result.exit_code == 0, result.stderr_text
    return sorted(result.stdout_text.split())


class BrokerProcess:
    """``broker serve`` as a child process on a free port (killable)."""

    def __init__(
        self,
        database_url: str,
        overrides: Mapping[str, Any] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A separate process is configured the way an operator configures one: BROKER_* variables.
        self.env = {
            **os.environ,
            **environment_for(broker_overrides(database_url, overrides)),
            "BROKER_CONFIG": str(devcluster.BROKER_TOML),
            # This checkout's code, also when the venv's package points at another one.
            "PYTHONPATH": str(devcluster.REPO),
            **(extra_env or {}),
        }
        self.log = Path(f"/tmp/broker-e2e-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BrokerProcess:
        cli = str(Path(sys.executable).with_name("broker"))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [cli, "serve", "--port", str(self.port), "--log-level", "warning"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
                return False

        # A bound, not a sleep: a restart under a burst of 50 clients once missed 30 s in CI.
        wait_for(healthy, timeout=60, what="broker serve to answer")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind (``start`` brings it back on the same port)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@contextmanager
def running(broker: BrokerProcess) -> Iterator[BrokerProcess]:
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
