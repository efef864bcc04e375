"""The REST contract (API.md) through HTTP, with scripted clusters behind the broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from tests.broker.harness import Env, build_env
from tests.broker.http_api import problem, token

SCRIPT = "#!/bin/bash\nsleep 1\n"


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    environment = build_env(f"sqlite:///{tmp_path}/api.db", gpu_hours=100.0)
    yield environment
    environment.runtime.close()


@pytest.fixture
def api(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.runtime)) as client:
        yield client


def test_health_and_openapi_describe_the_contract(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert {c["name"] for c in ready.json()["clusters"]} == {"alpha", "beta"}
    paths = set(api.get("/openapi.json").json()["paths"])
    assert {
        "/v1/me",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events",
        "/v1/projects",
        "/v1/projects/{name}",
        "/v1/projects/{name}/members/{user}",
        "/v1/projects/{name}/quota",
        "/v1/projects/{name}/usage",
        "/v1/users",
        "/v1/users/{name}",
        "/v1/users/{name}/tokens",
        "/v1/users/{name}/tokens/{token_id}",
        "/v1/clusters",
        "/v1/usage",
        "/v1/audit",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= paths


def test_liveness_answers_while_every_worker_thread_is_busy(api: TestClient) -> None:
    """/healthz is what a supervisor restarts the broker on: a burst of submissions holding all
    of the worker threads (each waiting for its sbatch) is a busy broker, not a dead one."""
    portal = api.portal
    assert portal is not None
    limiter = portal.call(anyio.to_thread.current_default_thread_limiter)
    size = limiter.total_tokens
    release = threading.Event()
    answers: list[int] = []

    async def resize(tokens: float) -> None:
        limiter.total_tokens = tokens

    async def borrowed() -> float:
        return limiter.borrowed_tokens

    async def occupy_a_thread() -> None:
        await anyio.to_thread.run_sync(release.wait)

    portal.call(resize, 2)
    held = [portal.start_task_soon(occupy_a_thread) for _ in range(2)]
    try:
        deadline = time.monotonic() + 10
        while portal.call(borrowed) < 2:  # every worker thread is now taken
            assert time.monotonic() < deadline
            time.sleep(0.01)
        prober = threading.Thread(target=lambda: answers.append(api.get("/healthz").status_code))
        prober.start()
        prober.join(timeout=10)
        assert answers == [200]
    finally:
        release.set()
        for future in held:
            future.result(timeout=10)
        portal.call(resize, size)


def test_missing_or_bad_token_is_401(api: TestClient) -> None:
    problem(api.get("/v1/me"), 401, "unauthenticated")
    problem(api.get("/v1/me", headers={"Authorization": "Bearer brk_nope"}), 401, "unauthenticated")
    problem(api.get("/v1/me", headers={"Authorization": "Basic x"}), 401, "unauthenticated")


def test_me(api: TestClient, env: Env) -> None:
    assert api.get("/v1/me", headers=token(env, "alice")).json() == {
        "name": "alice",
        "role": "researcher",
        "projects": ["climate"],
    }


def test_submit_through_http(api: TestClient, env: Env) -> None:
    alice = token(env, "alice")
    body = {
        "project": "climate",
        "script": SCRIPT,
        "gpus": 8,
        "time_limit_minutes": 120,
        "cluster": "alpha",
        "environment": {"HF_HOME": "/scratch/hf"},
    }
    created = api.post("/v1/jobs", json=body, headers=alice)
    assert created.status_code == 201, created.text
    job = created.json()
    assert set(job) == {
        "id",
        "project",
        "user",
        "name",
        "cluster",
        "partition",
        "gpu_type",
        "gpus",
        "nodes",
        "time_limit_minutes",
        "state",
        "state_reason",
        "slurm_job_id",
        "exit_code",
        "submitted_at",
        "started_at",
        "ended_at",
        "reserved_gpu_hours",
        "charged_gpu_hours",
        "unix_user",
        "queue",
        "wait",
        "array",
        "tasks",
    }
    assert job["array"] is None and job["tasks"] is None  # a single job
    assert job["queue"] is None  # not queued: in Slurm
    assert job["state"] == "pending" and job["slurm_job_id"]
    assert job["user"] == "alice" and job["name"] == "job" and job["partition"] == "gpu"
    assert job["reserved_gpu_hours"] == 16.0 and job["submitted_at"].endswith("Z")
    assert api.get(f"/v1/jobs/{job['id']}", headers=alice).json() == job
    listed = api.get("/v1/jobs", params={"project": "climate"}, headers=alice).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]] and listed["next_cursor"] is None
    events = api.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()["data"]
    assert [e["to_state"] for e in events] == ["submitting", "pending"]
    cancel = api.delete(f"/v1/jobs/{job['id']}", headers=alice)
    assert cancel.status_code == 202


def test_unknown_fields_and_bad_values_are_422(api: TestClient, env: Env) -> None:
    alice = token(env, "alice")
    base = {"project": "climate", "script": SCRIPT, "gpus": 1, "time_limit_minutes": 10}
    for extra in (
        {"state": "completed"},
        {"user": "root"},
        {"slurm_job_id": "1"},
        {"account": "x"},
    ):
        body = problem(
            api.post("/v1/jobs", json={**base, **extra}, headers=alice), 422, "validation-error"
        )
        assert body["errors"]
    for bad in (
        {"gpus": 0},
        {"time_limit_minutes": -1},
        {"script": "no shebang"},
        {"environment": {"LD_PRELOAD": "/x.so"}},
        {"environment": {"SLURM_FOO": "1"}},
        {"environment": {"1BAD": "x"}},
        {"name": "a;b"},
        {"cluster": "nowhere"},
        {"cluster": "alpha", "partition": "nope"},
        {"cluster": "alpha", "gpu_type": "a100"},
    ):
        problem(api.post("/v1/jobs", json={**base, **bad}, headers=alice), 422, "validation-error")
    assert env.slurm["alpha"].submits == 0


def test_quota_and_limit_errors_carry_their_numbers(api: TestClient, env: Env) -> None:
    alice = token(env, "alice")
    big = {
        "project": "climate",
        "script": SCRIPT,
        "gpus": 8,
        "time_limit_minutes": 60 * 24,
        "cluster": "alpha",
    }
    body = problem(api.post("/v1/jobs", json=big, headers=alice), 409, "quota-exceeded")
    assert body["limit"] == "gpu_hours" and body["requested"] == 192.0
    assert body["remaining"] == 100.0 and body["used"] == 0.0 and body["reserved"] == 0.0
    admin = token(env, "root")
    quota = {
        "period_start": "2020-01-01T00:00:00Z",
        "period_end": "2099-01-01T00:00:00Z",
        "gpu_hours": 100,
        "allowed_clusters": ["beta"],
    }
    assert api.put("/v1/projects/climate/quota", json=quota, headers=admin).status_code == 200
    small = {**big, "time_limit_minutes": 10}
    body = problem(api.post("/v1/jobs", json=small, headers=alice), 422, "limit-exceeded")
    assert body["limit"] == "cluster" and body["requested"] == "alpha"
    assert body["allowed"] == ["beta"]


def test_payload_too_large(api: TestClient, env: Env) -> None:
    alice = token(env, "alice")
    huge = {
        "project": "climate",
        "script": "#!/bin/bash\n" + "#" * 300_000,
        "gpus": 1,
        "time_limit_minutes": 10,
    }
    problem(api.post("/v1/jobs", json=huge, headers=alice), 413, "payload-too-large")
    body = b"{" + b" " * 2_000_000 + b"}"
    problem(
        api.post("/v1/jobs", content=body, headers={**alice, "content-type": "application/json"}),
        413,
        "payload-too-large",
    )


def test_cluster_unavailable_sets_retry_after(api: TestClient, env: Env) -> None:
    env.slurm["alpha"].unreachable()
    response = api.post(
        "/v1/jobs",
        headers=token(env, "alice"),
        json={
            "project": "climate",
            "script": SCRIPT,
            "gpus": 1,
            "time_limit_minutes": 10,
            "cluster": "alpha",
        },
    )
    problem(response, 503, "cluster-unavailable")
    assert int(response.headers["retry-after"]) > 0
    usage = api.get("/v1/projects/climate/usage", headers=token(env, "alice")).json()
    assert usage["reserved_gpu_hours"] == 0.0


def test_roles_admin_writes_engineer_reads_researcher_sees_own(api: TestClient, env: Env) -> None:
    eve, alice, admin = token(env, "eve"), token(env, "alice"), token(env, "root")
    problem(api.post("/v1/projects", json={"name": "x"}, headers=eve), 403, "forbidden")
    problem(
        api.post("/v1/users", json={"name": "x", "role": "admin"}, headers=alice), 403, "forbidden"
    )
    assert api.get("/v1/projects/other", headers=eve).status_code == 200
    problem(api.get("/v1/projects/other", headers=alice), 404, "not-found")
    problem(api.get("/v1/projects/other/usage", headers=alice), 404, "not-found")
    assert [p["name"] for p in api.get("/v1/projects", headers=alice).json()["data"]] == ["climate"]
    problem(api.get("/v1/usage", headers=alice), 403, "forbidden")
    assert api.get("/v1/usage", headers=eve).status_code == 200
    created = api.post(
        "/v1/projects", json={"name": "new", "slurm_accounts": {"alpha": "new"}}, headers=admin
    )
    assert created.status_code == 201
    problem(api.post("/v1/projects", json={"name": "new"}, headers=admin), 409, "conflict")
    problem(
        api.post(
            "/v1/projects", json={"name": "bad", "slurm_accounts": {"zeta": "a"}}, headers=admin
        ),
        422,
        "validation-error",
    )


def test_members_and_quota(api: TestClient, env: Env) -> None:
    admin = token(env, "root")
    put = api.put("/v1/projects/climate/members/bob", json={"role": "member"}, headers=admin)
    assert put.status_code == 200
    assert api.get("/v1/me", headers=token(env, "bob")).json()["projects"] == ["climate", "other"]
    assert api.delete("/v1/projects/climate/members/bob", headers=admin).status_code == 204
    problem(api.delete("/v1/projects/climate/members/bob", headers=admin), 404, "not-found")
    problem(
        api.put(
            "/v1/projects/climate/quota",
            headers=admin,
            json={
                "period_start": "2027-01-01T00:00:00Z",
                "period_end": "2026-01-01T00:00:00Z",
                "gpu_hours": 1,
            },
        ),
        422,
        "validation-error",
    )
    problem(
        api.put(
            "/v1/projects/climate/quota",
            headers=admin,
            json={"period_start": "2027-01-01T00:00:00Z", "period_end": "2028-01-01T00:00:00Z"},
        ),
        422,
        "validation-error",
    )


def test_tokens_are_shown_once_and_revocation_is_immediate(api: TestClient, env: Env) -> None:
    admin = token(env, "root")
    issued = api.post("/v1/users/alice/tokens", json={"description": "laptop"}, headers=admin)
    assert issued.status_code == 201
    secret = issued.json()["token"]
    bearer = {"Authorization": f"Bearer {secret}"}
    assert api.get("/v1/me", headers=bearer).status_code == 200
    listed = api.get("/v1/users/alice/tokens", headers=admin).json()["data"]
    assert secret not in str(listed)
    assert any(t["id"] == issued.json()["id"] and t["last_used_at"] for t in listed)
    assert (
        api.delete(f"/v1/users/alice/tokens/{issued.json()['id']}", headers=admin).status_code
        == 204
    )
    problem(api.get("/v1/me", headers=bearer), 401, "unauthenticated")


def test_usage_report_json_and_csv_and_audit(api: TestClient, env: Env) -> None:
    eve = token(env, "eve")
    rows = api.get("/v1/usage", params={"group_by": "project"}, headers=eve).json()
    assert rows["group_by"] == "project" and rows["data"] == []
    csv = api.get("/v1/usage", headers={**eve, "Accept": "text/csv"})
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines()[0] == "project,gpu_hours,jobs,jobs_completed"
    audit = api.get("/v1/audit", params={"limit": 3}, headers=eve).json()
    assert len(audit["data"]) == 3 and audit["next_cursor"]
    actions = {e["action"] for e in audit["data"]}
    assert actions <= {"quota.put", "member.put", "project.create", "token.issue", "user.create"}


def test_clusters_come_from_the_last_poll(api: TestClient, env: Env) -> None:
    alice = token(env, "alice")
    before = api.get("/v1/clusters", headers=alice).json()["data"]
    assert [c["up"] for c in before] == [False, False]
    env.runtime.poller.poll("alpha")
    after = {c["name"]: c for c in api.get("/v1/clusters", headers=alice).json()["data"]}
    assert after["alpha"]["up"] and after["alpha"]["last_poll_at"]
    assert after["alpha"]["partitions"][0]["gpus_total"] == 32


def test_scripts_slurm_would_misread_are_refused_before_anything_is_reserved(
    api: TestClient, env: Env
) -> None:
    alice = token(env, "alice")
    base = {"project": "climate", "gpus": 1, "time_limit_minutes": 10, "cluster": "alpha"}
    for script, environment in (
        ("#!/bin/bash\n#SBATCH --array=0-999\nsrun x\n", {}),  # would escape the quota
        ("#!/bin/bash\r\nsrun x\r\n", {}),
        ("#!/usr/bin/env python3\nprint(1)\n", {"A": "1"}),  # env needs a POSIX shell
    ):
        body = {**base, "script": script, "environment": environment}
        problem(api.post("/v1/jobs", json=body, headers=alice), 422, "validation-error")
    assert env.slurm["alpha"].submits == 0
    usage = api.get("/v1/projects/climate/usage", headers=alice).json()
    assert usage["reserved_gpu_hours"] == 0.0
    python = {**base, "script": "#!/usr/bin/env python3\nprint(1)\n"}
    assert api.post("/v1/jobs", json=python, headers=alice).status_code == 201


def test_foreign_cursors_are_422(api: TestClient, env: Env) -> None:
    eve = token(env, "eve")
    for path in ("/v1/jobs", "/v1/audit"):
        for cursor in ("garbage!", "bm9wZQ==", "MTIzfHh8eQ=="):
            response = api.get(path, params={"cursor": cursor}, headers=eve)
            problem(response, 422, "validation-error")
