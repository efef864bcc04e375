"""Several real ``broker serve`` processes on one PostgreSQL database: what must hold across them.

A token revoked through one process is refused by the next request to another (the token cache
is dropped everywhere through ``NOTIFY``), as is a token past its ``expires_at``; a membership
removed through one is gone from ``/v1/me`` on the other; a user's rate limit holds for the
requests of both together; ``--workers 2`` serves one port with the event metrics of both workers
summed and the database-backed series once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from broker.config import environment_for
from broker.db.engine import make_engine, make_session_factory, transaction
from broker.db.migrate import upgrade
from broker.schemas import MemberPut, ProjectCreate, UserCreate
from broker.service import identity, projects
from broker.service.identity import Actor
from tests.pgdb import throwaway_database

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
CONFIG = """
[server]
host = "127.0.0.1"

[clusters.alpha]
transport = "local"
default_partition = "gpu"

[clusters.alpha.partitions.gpu]
gpu_type = "h100"
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """``broker serve`` of this checkout in its own process (group), on a free port."""

    def __init__(self, config: Path, env: dict[str, str], *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = config.parent / f"serve-{self.port}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-c", "from broker.cli import main; main()", "serve"),
                    *("--config", str(config), "--port", str(self.port)),
                    *("--log-level", "warning", *args),
                ],
                cwd=REPO,
                env={**os.environ, **env, "PYTHONPATH": str(REPO)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "broker serve did not come up"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _seed(url: str) -> dict[str, str]:
    """An admin, researcher alice in projects climate and ocean; returns their tokens."""
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    try:
        with transaction(sessions) as session:
            identity.create_user(session, "test", UserCreate(name="root", role="admin"))
            identity.create_user(session, "test", UserCreate(name="alice", role="researcher"))
            admin = Actor(
                identity.get_user_record(session, "root").id, "root", "admin", frozenset()
            )
            for name in ("climate", "ocean"):
                projects.create_project(
                    session, admin, ProjectCreate(name=name, slurm_accounts={}), {"alpha"}
                )
                projects.put_member(session, admin, name, "alice", MemberPut())
            return {
                "root": identity.issue_token(session, "test", "root", "t").token,
                "alice": identity.issue_token(session, "test", "alice", "t").token,
            }
    finally:
        engine.dispose()


@pytest.fixture
def database() -> Iterator[tuple[str, dict[str, str]]]:
    with throwaway_database("broker_procs") as url:
        yield url, _seed(url)


def _servers(
    tmp_path: Path,
    url: str,
    count: int,
    limits: dict[str, Any],
    *args: str,
    poller: dict[str, Any] | None = None,
) -> list[Server]:
    config = tmp_path / "broker.toml"
    config.write_text(CONFIG)
    overrides = {"database": {"url": url}, "limits": limits, "poller": poller or {}}
    env = environment_for(overrides)
    servers: list[Server] = []
    try:
        for _ in range(count):
            servers.append(Server(config, env, *args))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@pytest.fixture
def two(
    tmp_path: Path, database: tuple[str, dict[str, str]]
) -> Iterator[tuple[list[Server], dict[str, str]]]:
    url, tokens = database
    servers = _servers(tmp_path, url, 2, {"requests_per_minute": 0}, "--no-poller")
    yield servers, tokens
    for server in servers:
        server.stop()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_token_revoked_through_one_process_is_refused_at_once_by_the_other(
    two: tuple[list[Server], dict[str, str]],
) -> None:
    (a, b), tokens = two
    admin = _bearer(tokens["root"])
    issued = httpx.post(
        f"{a.url}/v1/users/alice/tokens", json={"description": "laptop"}, headers=admin
    ).json()
    alice = _bearer(issued["token"])
    for _ in range(3):  # resolved, then served from both processes' caches
        assert httpx.get(f"{a.url}/v1/me", headers=alice).status_code == 200
        assert httpx.get(f"{b.url}/v1/me", headers=alice).status_code == 200
    revoked = httpx.delete(f"{a.url}/v1/users/alice/tokens/{issued['id']}", headers=admin)
    assert revoked.status_code == 204
    refused = httpx.get(f"{b.url}/v1/me", headers=alice)
    assert refused.status_code == 401
    assert refused.json()["type"] == "unauthenticated"
    assert httpx.get(f"{a.url}/v1/me", headers=alice).status_code == 401
    # Another token of the same user is untouched.
    assert httpx.get(f"{b.url}/v1/me", headers=_bearer(tokens["alice"])).status_code == 200


def test_a_membership_removed_through_one_process_is_gone_on_the_other(
    two: tuple[list[Server], dict[str, str]],
) -> None:
    (a, b), tokens = two
    alice = _bearer(tokens["alice"])
    assert httpx.get(f"{b.url}/v1/me", headers=alice).json()["projects"] == ["climate", "ocean"]
    removed = httpx.delete(
        f"{a.url}/v1/projects/ocean/members/alice", headers=_bearer(tokens["root"])
    )
    assert removed.status_code == 204
    assert httpx.get(f"{b.url}/v1/me", headers=alice).json()["projects"] == ["climate"]
    problem = httpx.get(f"{b.url}/v1/projects/ocean", headers=alice)
    assert problem.status_code == 404


def test_an_expired_token_is_refused_by_every_process(
    two: tuple[list[Server], dict[str, str]],
) -> None:
    (a, b), tokens = two
    admin = _bearer(tokens["root"])
    expires = datetime.now(UTC) + timedelta(seconds=3)
    issued = httpx.post(
        f"{a.url}/v1/users/alice/tokens",
        json={"description": "short", "expires_at": expires.isoformat()},
        headers=admin,
    )
    assert issued.status_code == 201
    assert issued.json()["expires_at"] is not None
    alice = _bearer(issued.json()["token"])
    assert httpx.get(f"{a.url}/v1/me", headers=alice).status_code == 200
    assert httpx.get(f"{b.url}/v1/me", headers=alice).status_code == 200
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
    for server in (a, b):
        assert httpx.get(f"{server.url}/v1/me", headers=alice).status_code == 401
    listed = httpx.get(f"{b.url}/v1/users/alice/tokens", headers=admin).json()["data"]
    assert [t["expires_at"] for t in listed if t["id"] == issued.json()["id"]] != [None]
    past = httpx.post(
        f"{a.url}/v1/users/alice/tokens",
        json={"expires_at": "2020-01-01T00:00:00Z"},
        headers=admin,
    )
    assert past.status_code == 422


def test_a_users_rate_limit_holds_across_processes(
    tmp_path: Path, database: tuple[str, dict[str, str]]
) -> None:
    url, tokens = database
    limit = 30
    limits = {"requests_per_minute": limit, "request_burst": limit, "shared_rate_slice": 3}
    servers = _servers(tmp_path, url, 2, limits, "--no-poller")
    try:
        alice = _bearer(tokens["alice"])
        # Start at the beginning of a minute window, so that all requests fall into one.
        time.sleep((60 - time.time() % 60) % 60 if time.time() % 60 > 45 else 0)
        statuses = [
            httpx.get(f"{servers[n % 2].url}/v1/me", headers=alice).status_code
            for n in range(2 * limit)
        ]
        passed = statuses.count(200)
        # Each process spends only what it reserved from the shared budget: together never more
        # than the limit, and at most one unspent slice (of the other process) less.
        assert limit - 3 <= passed <= limit, statuses
        assert set(statuses) == {200, 429}
        refused = httpx.get(f"{servers[0].url}/v1/me", headers=alice)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        # Another user is not affected.
        assert (
            httpx.get(f"{servers[1].url}/v1/me", headers=_bearer(tokens["root"])).status_code == 200
        )
    finally:
        for server in servers:
            server.stop()


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_workers_share_one_port_sum_event_metrics_and_serve_database_series_once(
    tmp_path: Path, database: tuple[str, dict[str, str]]
) -> None:
    url, tokens = database
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left over")  # emptied at start
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    try:
        (server,) = _servers(
            tmp_path, url, 1, {"requests_per_minute": 0}, "--no-poller", "--workers", "2"
        )
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        alice = _bearer(tokens["alice"])
        job = {"project": "nope", "script": "#!/bin/bash\ntrue", "gpus": 1, "time_limit_minutes": 5}

        def submit(_: int) -> int:  # a new connection each: the workers take turns accepting
            return httpx.post(f"{server.url}/v1/jobs", json=job, headers=alice).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(submit, range(40))) == {404}
        scrape = httpx.get(f"{server.url}/metrics").text
        invalid = [
            v
            for labels, v in _samples(scrape, "broker_submissions_total")
            if labels == {"cluster": "none", "outcome": "invalid"}
        ]
        assert invalid == [40.0]
        per_worker = {
            path.name: _invalid_submissions(path) for path in metrics_dir.glob("counter_*.db")
        }
        assert len(per_worker) == 2, per_worker  # one file per worker, the stale one gone
        assert sum(per_worker.values()) == 40.0  # the scrape summed what each worker counted
        assert _samples(scrape, "broker_database_up") == [({}, 1.0)]
        seen = [
            (sample.name, tuple(sorted(sample.labels.items())))
            for family in text_string_to_metric_families(scrape)
            for sample in family.samples
            if sample.name.startswith("broker_")
        ]
        assert len(seen) == len(set(seen)), "every series once"
    finally:
        server.stop()


def _invalid_submissions(path: Path) -> float:
    return sum(
        sample.value
        for metric in MultiProcessCollector.merge([str(path)], accumulate=True)  # type: ignore[no-untyped-call]
        for sample in metric.samples
        if sample.name == "broker_submissions_total"
        and sample.labels == {"cluster": "none", "outcome": "invalid"}
    )


def test_with_workers_the_poller_runs_in_one_of_them_at_a_time(
    tmp_path: Path, database: tuple[str, dict[str, str]]
) -> None:
    url, _ = database
    interval = 1.0
    unlimited = {"requests_per_minute": 0}
    started = time.monotonic()
    (server,) = _servers(
        tmp_path, url, 1, unlimited, "--workers", "2", poller={"interval_seconds": interval}
    )
    try:
        time.sleep(6)
        scrape = httpx.get(f"{server.url}/metrics").text
        elapsed = time.monotonic() - started
        cycles = sum(
            value
            for labels, value in _samples(scrape, "broker_polls_total")
            if labels["cluster"] == "alpha"
        )
        # Both workers tick every second; only the lease holder polls (ok or failed: this
        # cluster has no Slurm behind it). Two pollers would count about twice as many.
        assert 2 <= cycles <= elapsed / interval + 1, (cycles, elapsed)
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                holders = connection.execute(text("SELECT holder FROM leases")).scalars().all()
        finally:
            engine.dispose()
        assert len(holders) == 1
    finally:
        server.stop()
