"""Placement and moves on the real dev clusters (alpha: 4 nodes x 8 h100; beta: 2 nodes x 4 a100).

Other users' jobs are staged with sbatch as root in the ``dev`` account, outside the broker.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from adapters.local import LocalRunner
from adapters.slurm.client import SlurmClient
from tests import devcluster
from tests.e2e.live import Client, LiveBroker, dev_settings, new_project, wait_for
from tests.pgdb import throwaway_database

pytestmark = pytest.mark.cluster

POLL_SECONDS = 4


def slurm(cluster: str) -> SlurmClient:
    dev = devcluster.cluster(cluster)
    runner = LocalRunner(name=cluster, extra_env={"SLURM_CONF": str(dev.slurm_conf)})
    return SlurmClient(runner, cluster=cluster, bin_dir=dev.bin_dir)


class Fillers:
    """Jobs of another user that hold GPUs (sleeping), cancelled at the end."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []

    def fill(self, cluster: str, nodes: int, gpus_per_node: int) -> None:
        client = slurm(cluster)
        gpu_type = "h100" if cluster == "alpha" else "a100"
        result = client.runner.run(
            [
                "sbatch",
                "--parsable",
                "--account=dev",
                f"--nodes={nodes}",
                f"--gres=gpu:{gpu_type}:{gpus_per_node}",
                "--time=10",
                "--job-name=filler",
                "--output=/dev/null",
                "--wrap=sleep 600",
            ],
            timeout=30,
        )
        assert result.exit_code == 0, result.stderr_text
        job_id = result.stdout_text.strip().split(";")[0]
        self.started.append((cluster, job_id))
        wait_for(
            lambda: (s := client.statuses([job_id]).found.get(job_id)) and s.state == "RUNNING",
            timeout=30,
            what=f"filler {job_id} running on {cluster}",
        )

    def cancel_all(self) -> None:
        for cluster, job_id in self.started:
            slurm(cluster).cancel(job_id)
        self.started.clear()


@pytest.fixture
def fillers() -> Iterator[Fillers]:
    staged = Fillers()
    yield staged
    staged.cancel_all()


@pytest.fixture(scope="module")
def placing_broker() -> Iterator[LiveBroker]:
    with throwaway_database("broker_place") as url:
        settings = dev_settings(
            url,
            {
                "poller": {"interval_seconds": POLL_SECONDS, "lease_seconds": 3 * POLL_SECONDS},
                "placement": {"move_after_seconds": 3},
            },
        )
        live = LiveBroker(settings).start()
        yield live
        live.cancel_everything()
        live.stop()


def idle_seen(client: Client, alpha: int, beta: int) -> bool:
    clusters = client.http.get("/v1/clusters").json()["data"]
    idle = {c["name"]: {p["name"]: p["gpus_idle"] for p in c["partitions"]} for c in clusters}
    return idle.get("alpha", {}).get("gpu") == alpha and idle.get("beta", {}).get("gpu") == beta


def events(client: Client, job_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = client.http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    return data


def at(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp)


def body(project: str, gpus: int, seconds: int, **fields: Any) -> dict[str, Any]:
    return {
        "project": project,
        "gpus": gpus,
        "time_limit_minutes": 5,
        "script": f"#!/bin/sh\nsleep {seconds}\n",
        **fields,
    }


def test_with_alpha_busy_a_job_without_cluster_lands_on_beta(
    placing_broker: LiveBroker, fillers: Fillers
) -> None:
    admin, alice = placing_broker.client("root"), placing_broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=100)
    fillers.fill("alpha", nodes=4, gpus_per_node=8)
    wait_for(lambda: idle_seen(alice, 0, 8), timeout=30, what="the poller to see alpha full")
    created = alice.http.post("/v1/jobs", json=body(project, 4, 2))
    assert created.status_code == 201, created.text
    job = created.json()
    assert (job["cluster"], job["gpu_type"]) == ("beta", "a100")
    assert (
        "placed on beta/gpu: 8 idle a100; alpha/gpu: 0 idle h100"
        in events(alice, job["id"])[0]["reason"]
    )
    done = alice.wait_state(job["id"], {"completed"}, timeout=60)
    assert done["cluster"] == "beta"


def test_a_placed_job_moves_once_when_its_cluster_fills_and_a_pinned_one_never(
    placing_broker: LiveBroker, fillers: Fillers
) -> None:
    admin, alice = placing_broker.client("root"), placing_broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=100)
    # alpha: one node with 4 idle h100; beta: 8 idle a100, as the poller sees it.
    fillers.fill("alpha", nodes=3, gpus_per_node=8)
    fillers.fill("alpha", nodes=1, gpus_per_node=4)
    wait_for(lambda: idle_seen(alice, 4, 8), timeout=30, what="the poller to see 4 and 8 idle")
    # Beta fills up after that poll: the broker places by what it saw, the job waits on beta.
    fillers.fill("beta", nodes=2, gpus_per_node=4)
    placed = alice.http.post("/v1/jobs", json=body(project, 4, 2)).json()
    pinned = alice.http.post("/v1/jobs", json=body(project, 4, 2, cluster="beta")).json()
    assert placed["cluster"] == "beta" and pinned["cluster"] == "beta", placed
    assert placed["reserved_gpu_hours"] == pytest.approx(4 * 5 / 60 * 0.5, abs=1e-3)
    first_slurm_id = placed["slurm_job_id"]

    done = alice.wait_state(placed["id"], {"completed", "failed", "cancelled"}, timeout=120)
    history = events(alice, placed["id"])
    assert done["state"] == "completed" and done["cluster"] == "alpha", (done, history)
    assert done["gpu_type"] == "h100"  # a new Slurm job; its id may equal the first's
    moved = [e for e in history if (e["reason"] or "").startswith("moved from beta/gpu")]
    assert len(moved) == 1 and "Resources" in moved[0]["reason"], history

    # The first Slurm job, cancelled on beta before it ran, is the broker's, not a foreign job,
    # in the beta cycles after the move.
    def beta_polled_since_the_move() -> bool:
        (beta,) = [c for c in alice.http.get("/v1/clusters").json()["data"] if c["name"] == "beta"]
        polled = beta["last_poll_at"]
        return polled is not None and at(polled) > at(moved[0]["at"])

    wait_for(beta_polled_since_the_move, timeout=30, what="a poll of beta after the move")
    audit = admin.http.get("/v1/audit", params={"limit": 100}).json()["data"]
    assert f"beta/{first_slurm_id}" not in {e["target"] for e in audit}, audit

    since = datetime.now(UTC) - timedelta(hours=1)

    def on_beta_record() -> list[Any]:  # slurmdbd may record the cancel a moment later
        records = slurm("beta").accounting(since, accounts=[project])
        return [r for r in records if r.job_id == first_slurm_id and r.end_time is not None]

    def on_alpha_records() -> list[Any]:  # the broker may settle from squeue's view first
        records = slurm("alpha").accounting(since, accounts=[project])
        return records if records and all(r.end_time is not None for r in records) else []

    (on_beta,) = wait_for(on_beta_record, timeout=30, what="the first job's sacct record")
    (on_alpha,) = wait_for(on_alpha_records, timeout=30, what="the second job's sacct record")
    assert on_beta.state == "CANCELLED" and on_beta.start_time is None  # never ran
    assert on_beta.end_time is not None and on_alpha.submit_time is not None
    assert on_beta.end_time <= on_alpha.submit_time  # gone before the second sbatch
    assert on_alpha.state == "COMPLETED" and on_alpha.job_id == done["slurm_job_id"]
    assert done["charged_gpu_hours"] == pytest.approx(
        on_alpha.alloc_gpus * on_alpha.elapsed_s / 3600, abs=1e-3
    )  # charged at h100's weight, where it ran

    # The pinned job waited as long and never moved.
    still = alice.http.get(f"/v1/jobs/{pinned['id']}").json()
    assert still["cluster"] == "beta" and still["state"] == "pending"
    assert still["slurm_job_id"] == pinned["slurm_job_id"]
    assert still["wait"]["category"] == "resources"
    assert alice.http.delete(f"/v1/jobs/{pinned['id']}").status_code == 202
