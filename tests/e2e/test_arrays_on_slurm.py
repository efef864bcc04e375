"""A sweep is one broker job: one ``sbatch --array``, each task charged from its own sacct record.

Real Slurm (beta: 2 nodes x 4 a100, weight 0.5) through real sshd, real PostgreSQL, real HTTP.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.service import ledger
from quotas import charge_gpu_seconds
from tests.e2e.live import LiveBroker, new_project, squeue_ids, wait_for

pytestmark = pytest.mark.cluster

TASK_SCRIPT = (
    '#!/bin/sh\necho "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID"\nsleep {seconds}\n'
)


def array_body(
    project: str, size: int, parallel: int | None, *, seconds: int, minutes: int = 5
) -> dict[str, Any]:
    array: dict[str, int] = {"size": size}
    if parallel is not None:
        array["max_parallel"] = parallel
    return {
        "project": project,
        "cluster": "beta",
        "gpus": 1,
        "time_limit_minutes": minutes,
        "name": "sweep",
        "script": TASK_SCRIPT.format(seconds=seconds),
        "array": array,
    }


class RunningCount:
    """Counts, in Slurm's own view (squeue on the login node), the project's running tasks."""

    def __init__(self, broker: LiveBroker, account: str) -> None:
        self._client = broker.runtime.clusters.client("beta")
        self._account = account
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            result = self._client.runner.run(
                ["squeue", "-h", "-A", self._account, "-t", "R,CG", "-o", "%i"], timeout=30
            )
            self.most = max(self.most, len(result.stdout_text.split()))
            self._stop.wait(0.2)

    def __enter__(self) -> RunningCount:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_an_array_of_20_runs_4_at_a_time_and_is_charged_the_sum_of_its_tasks(
    broker: LiveBroker,
) -> None:
    admin, alice = broker.client("root"), broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=100)
    with RunningCount(broker, project) as running:
        created = alice.http.post("/v1/jobs", json=array_body(project, 20, 4, seconds=2))
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["array"] == {"size": 20, "max_parallel": 4}
        assert job["tasks"]["total"] == 20 and job["tasks"]["pending"] == 20
        # 20 tasks x 1 GPU x 5 minutes x weight 0.5 for a100
        assert job["reserved_gpu_hours"] == pytest.approx(20 * 5 / 60 * 0.5, abs=1e-3)
        done = alice.wait_state(job["id"], {"completed", "failed", "cancelled"}, timeout=180)
    assert done["state"] == "completed", done
    assert 1 <= running.most <= 4  # Slurm never ran more than max_parallel tasks at once
    assert done["tasks"] == {
        "total": 20,
        "pending": 0,
        "running": 0,
        "completed": 20,
        "failed": 0,
        "cancelled": 0,
        "timeout": 0,
        "other": 0,
    }

    tasks = alice.http.get(f"/v1/jobs/{job['id']}/tasks", params={"limit": 500}).json()
    assert [t["index"] for t in tasks["data"]] == list(range(20))
    assert tasks["next_cursor"] is None
    assert len({t["slurm_job_id"] for t in tasks["data"]}) == 20  # each its own Slurm job

    # Each task's charge is its own sacct record's; the job's is their sum, to the second.
    since = datetime.now(UTC) - timedelta(hours=1)
    records = broker.runtime.clusters.client("beta").accounting(
        since, job_ids=[job["slurm_job_id"]]
    )
    by_index = {r.array_task: r for r in records if r.array_task is not None}
    assert sorted(by_index) == list(range(20))
    expected_seconds = 0
    for task in tasks["data"]:
        record = by_index[task["index"]]
        assert record.job_id == task["slurm_job_id"] and record.state == "COMPLETED"
        seconds = charge_gpu_seconds(record.alloc_gpus, record.elapsed_s, 0.5)
        assert task["charged_gpu_hours"] == pytest.approx(seconds / 3600)
        expected_seconds += seconds
    assert done["charged_gpu_hours"] == pytest.approx(expected_seconds / 3600, abs=1e-9)
    usage = alice.http.get(f"/v1/projects/{project}/usage").json()
    assert usage["used_gpu_hours"] == pytest.approx(expected_seconds / 3600, abs=1e-4)
    assert usage["reserved_gpu_hours"] == 0.0
    with broker.runtime.sessions() as session:
        assert ledger.check(session) == []  # running totals = recomputation from the rows

    # Each task wrote its own output, readable by task.
    seven = alice.http.get(f"/v1/jobs/{job['id']}/output", params={"task": 7}).json()
    assert seven["data"] == f"task 7 of {job['slurm_job_id']}\n" and seven["eof"] is True
    whole = alice.http.get(f"/v1/jobs/{job['id']}/output")
    assert whole.status_code == 422  # an array's output is per task
    beyond = alice.http.get(f"/v1/jobs/{job['id']}/output", params={"task": 20})
    assert beyond.status_code == 422


def test_cancelling_an_array_ends_every_task_and_charges_what_ran(broker: LiveBroker) -> None:
    admin, alice = broker.client("root"), broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=100)
    created = alice.http.post("/v1/jobs", json=array_body(project, 6, 2, seconds=300))
    assert created.status_code == 201, created.text
    job = created.json()

    def two_running() -> dict[str, Any] | None:
        seen: dict[str, Any] = alice.http.get(f"/v1/jobs/{job['id']}").json()
        return seen if seen["tasks"]["running"] == 2 else None

    wait_for(two_running, timeout=60, what="two tasks running")

    def tasks_metric() -> dict[str, float] | None:
        text = httpx.get(f"{broker.url}/metrics").text
        by_state = {
            family_sample.labels["state"]: family_sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "broker_array_tasks"
            for family_sample in family.samples
            if family_sample.labels.get("cluster") == "beta"
        }
        return by_state if by_state.get("running") == 2 else None

    by_state = wait_for(tasks_metric, timeout=30, what="broker_array_tasks to show 2 running")
    assert by_state["pending"] == 4 and by_state["completed"] == 0  # 6 tasks: 2 run, 4 wait
    assert alice.http.delete(f"/v1/jobs/{job['id']}").status_code == 202
    done = alice.wait_state(job["id"], {"cancelled"}, timeout=90)
    assert squeue_ids(broker.runtime, "beta", project) == []
    assert done["tasks"]["cancelled"] == 6 and done["tasks"]["total"] == 6
    tasks = alice.http.get(f"/v1/jobs/{job['id']}/tasks").json()["data"]
    ran = [t for t in tasks if t["slurm_job_id"] is not None]
    assert len(ran) >= 2  # the two that ran are charged; the others never started
    assert done["charged_gpu_hours"] == pytest.approx(
        sum(t["charged_gpu_hours"] for t in tasks), abs=1e-9
    )
    usage = alice.http.get(f"/v1/projects/{project}/usage").json()
    assert usage["reserved_gpu_hours"] == 0.0


@pytest.mark.parametrize(
    ("array", "field"),
    [
        ({"size": 0}, "size"),
        ({"size": 5, "max_parallel": 6}, "array"),
        ({"size": 5, "max_parallel": 0}, "max_parallel"),
        ({"size": 100_000}, "array.size"),  # above [limits] max_array_size (1000)
    ],
)
def test_a_bad_array_is_422_and_nothing_reaches_slurm(
    broker: LiveBroker, array: dict[str, int], field: str
) -> None:
    admin, alice = broker.client("root"), broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=100)
    body = {**array_body(project, 1, None, seconds=1), "array": array}
    refused = alice.http.post("/v1/jobs", json=body)
    assert refused.status_code == 422, refused.text
    assert refused.json()["type"] == "validation-error"
    assert field in refused.text
    assert squeue_ids(broker.runtime, "beta", project) == []


def test_an_array_the_budget_cannot_hold_is_409_with_the_numbers(broker: LiveBroker) -> None:
    admin, alice = broker.client("root"), broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=10)
    # 200 tasks x 1 GPU x 60 minutes x 0.5 = 100 GPU-hours, the budget holds 10
    refused = alice.http.post("/v1/jobs", json=array_body(project, 200, 16, seconds=1, minutes=60))
    assert refused.status_code == 409, refused.text
    problem = refused.json()
    assert problem["limit"] == "gpu_hours"
    assert problem["requested"] == 100.0 and problem["remaining"] == 10.0
    usage = alice.http.get(f"/v1/projects/{project}/usage").json()
    assert usage["reserved_gpu_hours"] == 0.0
    assert squeue_ids(broker.runtime, "beta", project) == []
