"""A researcher gets GPUs through the API on the real dev clusters, within quota, charged exactly.

Real Slurm (slurmctld, slurmd, slurmdbd on MariaDB) through real sshd, real PostgreSQL, real HTTP.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from broker.service import ledger
from tests.e2e.live import LiveBroker, job_body, new_project, squeue_ids

pytestmark = pytest.mark.cluster


def submit(
    broker: LiveBroker, user: str, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return broker.client(user).http.post("/v1/jobs", json=body, headers=headers)


@pytest.mark.parametrize(
    ("cluster", "gpu_type", "gpus", "weight"), [("alpha", "h100", 8, 1.0), ("beta", "a100", 4, 0.5)]
)
def test_job_runs_completes_and_is_charged_what_sacct_accounted(
    broker: LiveBroker, cluster: str, gpu_type: str, gpus: int, weight: float
) -> None:
    admin, alice = broker.client("root"), broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=100)
    body = {**job_body(project, cluster, seconds=3, gpus=gpus, minutes=10), "name": "e2e"}
    created = submit(broker, "alice", body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["slurm_job_id"] and job["gpu_type"] == gpu_type
    assert job["reserved_gpu_hours"] == pytest.approx(gpus * 10 / 60 * weight, abs=1e-3)

    alice.wait_state(job["id"], {"running", "completed"}, timeout=60)
    done = alice.wait_state(job["id"], {"completed"}, timeout=90)
    events = [e["to_state"] for e in alice.http.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
    assert events[:2] == ["submitting", "pending"] and events[-1] == "completed"

    since = datetime.now(UTC) - timedelta(hours=1)
    (record,) = broker.runtime.clusters.client(cluster).accounting(
        since, job_ids=[job["slurm_job_id"]]
    )
    assert record.alloc_gpus == gpus and record.gpu_type == gpu_type
    assert record.elapsed_s >= 3
    expected_hours = round(record.alloc_gpus * record.elapsed_s * weight) / 3600
    assert done["charged_gpu_hours"] == pytest.approx(expected_hours)
    assert done["reserved_gpu_hours"] == 0.0
    assert done["exit_code"] == 0 and done["started_at"] and done["ended_at"]

    usage = alice.http.get(f"/v1/projects/{project}/usage").json()
    assert usage["used_gpu_hours"] == pytest.approx(expected_hours)
    assert usage["reserved_gpu_hours"] == 0.0
    assert usage["by_cluster"] == {cluster: pytest.approx(expected_hours)}
    assert usage["by_gpu_type"] == {gpu_type: pytest.approx(expected_hours)}
    assert usage["by_user"] == {"alice": pytest.approx(expected_hours)}
    assert usage["remaining_gpu_hours"] == pytest.approx(100 - expected_hours)


def test_budget_too_small_is_409_and_no_slurm_job_exists(broker: LiveBroker) -> None:
    project = new_project(broker.client("root"), "alice", gpu_hours=1)
    body = job_body(project, "alpha", seconds=1, gpus=8, minutes=60)
    refused = submit(broker, "alice", body)
    assert refused.status_code == 409
    problem = refused.json()
    assert problem["type"] == "quota-exceeded" and problem["limit"] == "gpu_hours"
    assert problem["requested"] == 8.0 and problem["remaining"] == 1.0
    assert squeue_ids(broker.runtime, "alpha", project) == []


def test_parallel_submits_admit_exactly_what_the_budget_holds(broker: LiveBroker) -> None:
    """30 concurrent requests, budget for exactly 5: 5 Slurm jobs, and the ledger is exact."""
    project = new_project(broker.client("root"), "alice", gpu_hours=5)
    body = job_body(project, "alpha", seconds=300, gpus=1, minutes=60)
    with ThreadPoolExecutor(max_workers=30) as pool:
        statuses = list(pool.map(lambda _: submit(broker, "alice", body).status_code, range(30)))
    assert sorted(statuses) == [201] * 5 + [409] * 25
    assert len(squeue_ids(broker.runtime, "alpha", project)) == 5
    usage = broker.client("alice").http.get(f"/v1/projects/{project}/usage").json()
    assert usage["reserved_gpu_hours"] == 5.0 and usage["remaining_gpu_hours"] == 0.0
    with broker.runtime.sessions() as session:
        from sqlalchemy import select

        from broker.db.models import ProjectRecord, QuotaRecord

        project_row = session.scalars(
            select(ProjectRecord).where(ProjectRecord.name == project)
        ).one()
        snap = ledger.snapshot(session, project_row.id, session.get(QuotaRecord, project_row.id))
    assert snap.reserved_gpu_seconds == 5 * 3600 and snap.live_gpus == 5


def test_parallel_submits_with_one_idempotency_key_make_one_slurm_job(broker: LiveBroker) -> None:
    project = new_project(broker.client("root"), "alice", gpu_hours=100)
    body = job_body(project, "alpha", seconds=300, gpus=1, minutes=10)
    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(
            pool.map(lambda _: submit(broker, "alice", body, key="same-key"), range(10))
        )
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert len({r.json()["slurm_job_id"] for r in responses}) == 1
    assert len(squeue_ids(broker.runtime, "alpha", project)) == 1
    changed = submit(broker, "alice", {**body, "gpus": 2}, key="same-key")
    assert changed.status_code == 422 and changed.json()["type"] == "idempotency-conflict"


def test_others_jobs_are_invisible_and_engineers_cannot_write(broker: LiveBroker) -> None:
    project = new_project(broker.client("root"), "alice", gpu_hours=10)
    body = job_body(project, "beta", seconds=120, gpus=1, minutes=5)
    job = submit(broker, "alice", body).json()
    bob, eve = broker.client("bob"), broker.client("eve")
    assert bob.http.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert bob.http.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert eve.http.get(f"/v1/jobs/{job['id']}").status_code == 200
    assert eve.http.delete(f"/v1/jobs/{job['id']}").status_code == 403
    assert eve.http.post("/v1/jobs", json=body).status_code == 403
    assert squeue_ids(broker.runtime, "beta", project) == [job["slurm_job_id"]]


def test_cancel_pending_then_again_after_it_ended(broker: LiveBroker) -> None:
    alice = broker.client("alice")
    project = new_project(broker.client("root"), "alice", gpu_hours=100)
    body = job_body(project, "alpha", seconds=300, gpus=1, minutes=10)
    job = submit(broker, "alice", body).json()
    assert alice.http.delete(f"/v1/jobs/{job['id']}").status_code == 202
    cancelled = alice.wait_state(job["id"], {"cancelled"}, timeout=60)
    assert cancelled["reserved_gpu_hours"] == 0.0
    assert alice.http.delete(f"/v1/jobs/{job['id']}").status_code == 200
    usage = alice.http.get(f"/v1/projects/{project}/usage").json()
    assert usage["reserved_gpu_hours"] == 0.0
    assert usage["used_gpu_hours"] == pytest.approx(cancelled["charged_gpu_hours"])


def test_clusters_report_the_dev_capacity(broker: LiveBroker) -> None:
    alice = broker.client("alice")

    def polled() -> dict[str, Any] | None:
        data = {c["name"]: c for c in alice.http.get("/v1/clusters").json()["data"]}
        return data if all(c["up"] for c in data.values()) else None

    from tests.e2e.live import wait_for

    clusters = wait_for(polled, timeout=30, what="both clusters polled")
    totals = {name: {p["gpu_type"]: 0 for p in c["partitions"]} for name, c in clusters.items()}
    for name, c in clusters.items():
        for p in c["partitions"]:
            if p["name"] == "gpu":
                totals[name][p["gpu_type"]] += p["gpus_total"]
    assert totals == {"alpha": {"h100": 32}, "beta": {"a100": 8}}
