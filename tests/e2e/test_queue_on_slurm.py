"""The admission queue on the real dev cluster: jobs at a full limit wait in the broker, go to Slurm
one cycle after room frees, once each, across broker restarts.

Real Slurm through real sshd, real PostgreSQL, real HTTP; the broker as a child process where it
is killed and restarted.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from broker.db.engine import make_engine, make_session_factory
from broker.db.migrate import upgrade
from tests import devcluster
from tests.e2e.live import (
    BrokerProcess,
    Client,
    LiveBroker,
    job_body,
    new_project,
    seed_users,
    squeue_ids,
    wait_for,
)
from tests.pgdb import throwaway_database

pytestmark = pytest.mark.cluster


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _event(client: Client, job_id: str, to_state: str) -> datetime:
    events = client.http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    (event,) = [e for e in events if e["to_state"] == to_state]
    return _at(event["at"])


def test_five_jobs_at_a_limit_of_one_run_one_after_the_other(broker: LiveBroker) -> None:
    admin, alice = broker.client("root"), broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=100, max_concurrent_gpus=8)
    body = job_body(project, "alpha", seconds=3, gpus=8, minutes=10)
    answers = [alice.http.post("/v1/jobs", json=body) for _ in range(5)]
    assert [a.status_code for a in answers] == [201, 202, 202, 202, 202]
    jobs = [a.json() for a in answers]
    assert jobs[0]["slurm_job_id"] and all(j["slurm_job_id"] is None for j in jobs[1:])
    shown = [alice.http.get(f"/v1/jobs/{j['id']}").json() for j in jobs[1:]]
    assert [j["queue"]["position"] for j in shown] == [1, 2, 3, 4]
    assert all(j["queue"]["reason"] == "concurrent_gpus" for j in shown)
    assert len(squeue_ids(broker.runtime, "alpha", project)) == 1  # the others wait in the broker

    reservation = 8 * 10 / 60
    for index, job in enumerate(jobs):
        done = alice.wait_state(job["id"], {"completed"}, timeout=120)
        usage = alice.http.get(f"/v1/projects/{project}/usage").json()
        live = alice.http.get("/v1/jobs", params={"project": project}).json()["data"]
        # The ledger is exact at every step: what is charged plus what every live job holds.
        charged = sum(j["charged_gpu_hours"] or 0 for j in live)
        held = sum(j["reserved_gpu_hours"] for j in live)
        assert usage["used_gpu_hours"] == pytest.approx(charged, abs=1e-3)
        assert usage["reserved_gpu_hours"] == pytest.approx(held, abs=1e-3)
        assert held <= (4 - index) * reservation + 1e-6
        assert done["charged_gpu_hours"] > 0

    ends = [_event(alice, j["id"], "completed") for j in jobs]
    releases = [_event(alice, j["id"], "pending") for j in jobs[1:]]
    for ended, released in zip(ends, releases, strict=False):
        # Released by the queue pass that follows the poll cycle that settled the one before
        # (interval 1 s here): never before it ended, and within about one cycle of it.
        assert timedelta(0) <= released - ended < timedelta(seconds=2.5)
    since = datetime.now(UTC) - timedelta(hours=1)

    def all_accounted() -> list[Any] | None:  # slurmdbd records the last end a moment later
        client = broker.runtime.clusters.client("alpha")
        records = [r for r in client.accounting(since, accounts=[project]) if r.end_time]
        return records if len(records) == 5 else None

    records = wait_for(all_accounted, timeout=30, what="five sacct records with their ends")
    spans = sorted((r.start_time, r.end_time) for r in records)
    assert len(spans) == 5
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end is not None and start is not None and start >= end  # one after the other


@pytest.fixture
def restart_database() -> Iterator[str]:
    with throwaway_database("broker_queue") as url:
        yield url


def test_fifty_submits_at_a_limit_with_restarts_each_run_once(restart_database: str) -> None:
    devcluster.cluster_names()
    engine = make_engine(restart_database)
    upgrade(engine)

    class _Holder:  # seed_users needs only .sessions
        pass

    holder = _Holder()
    holder.sessions = make_session_factory(engine)  # type: ignore[attr-defined]
    tokens = seed_users(holder)  # type: ignore[arg-type]
    broker = BrokerProcess(restart_database).start()
    admin = Client(broker.url, tokens["root"])
    project = new_project(admin, "alice", gpu_hours=100, max_concurrent_gpus=4)
    body = job_body(project, "beta", seconds=1, gpus=1, minutes=5)
    most_running = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal most_running
        while not stop.is_set():
            running = squeue_state_count(project, "R")
            most_running = max(most_running, running)
            stop.wait(0.3)

    def submit(_: int) -> dict[str, Any]:
        key = str(uuid.uuid4())
        deadline = time.monotonic() + 120
        while True:  # a client retries with its key while the broker restarts
            try:
                answer = httpx.post(
                    f"{broker.url}/v1/jobs",
                    json=body,
                    headers={"Authorization": f"Bearer {tokens['alice']}", "Idempotency-Key": key},
                    timeout=30,
                )
                if answer.status_code in (201, 202):
                    job: dict[str, Any] = answer.json()
                    return job
                assert answer.status_code >= 500 or answer.status_code == 503, answer.text
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "no answer within 120 s"
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=50) as pool:
            futures = [pool.submit(submit, i) for i in range(50)]
            for _ in range(2):  # two hard crashes while jobs are queued, submitted and running
                time.sleep(2)
                broker.kill()
                broker.start()
            jobs = [f.result() for f in futures]
        assert len({j["id"] for j in jobs}) == 50
        alice = Client(broker.url, tokens["alice"])

        def all_done() -> list[dict[str, Any]] | None:
            listed = alice.http.get("/v1/jobs", params={"project": project, "limit": 100}).json()[
                "data"
            ]
            done = [j for j in listed if j["state"] == "completed"]
            return listed if len(done) == 50 else None

        listed = wait_for(all_done, timeout=240, what="50 jobs completed")
    finally:
        stop.set()
        watcher.join(timeout=5)
        broker.stop()
        engine.dispose()
    assert len(listed) == 50  # no job was created twice
    since = datetime.now(UTC) - timedelta(hours=1)
    expected = {j["slurm_job_id"] for j in listed}

    def all_accounted() -> list[Any] | None:
        # The broker may settle a job from squeue's view before slurmdbd has its record.
        records = accounting(project, since)
        return records if expected <= {r.job_id for r in records} else None

    records = wait_for(all_accounted, timeout=60, interval=2, what="sacct to hold the 50 jobs")
    assert len(records) == 50  # Slurm saw exactly 50 jobs
    assert sorted(r.job_id for r in records) == sorted(j["slurm_job_id"] for j in listed)
    assert 1 <= most_running <= 4  # the limit held in Slurm's own view


def _client() -> Any:
    from adapters.local import LocalRunner
    from adapters.slurm.client import SlurmClient

    dev = devcluster.cluster("beta")
    runner = LocalRunner(name="beta", extra_env={"SLURM_CONF": str(dev.slurm_conf)})
    return SlurmClient(runner, cluster="beta", bin_dir=dev.bin_dir)


def squeue_state_count(account: str, state: str) -> int:
    client = _client()
    result = client.runner.run(["squeue", "-h", "-A", account, "-t", state, "-o", "%i"], timeout=30)
    return len(result.stdout_text.split())


def accounting(account: str, since: datetime) -> list[Any]:
    records: list[Any] = _client().accounting(since, accounts=[account])
    return records
