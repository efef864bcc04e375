"""Hostile input through HTTP: loose numbers, forged cursors, floods of bad tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from tests.broker.harness import Env, build_env
from tests.broker.test_api import problem, token

SCRIPT = "#!/bin/bash\nsleep 1\n"
JOB = {"project": "climate", "script": SCRIPT, "gpus": 1, "time_limit_minutes": 10}


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    environment = build_env(f"sqlite:///{tmp_path}/api.db", gpu_hours=100.0)
    yield environment
    environment.runtime.close()


@pytest.fixture
def api(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.runtime)) as client:
        yield client


# --- strict numbers --------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["gpus", "time_limit_minutes", "nodes", "cpus_per_gpu"])
@pytest.mark.parametrize("value", [True, "1", 1.0, False])
def test_integer_fields_take_json_integers_only(
    api: TestClient, env: Env, field: str, value: Any
) -> None:
    alice = token(env, "alice")
    body = problem(
        api.post("/v1/jobs", json={**JOB, field: value}, headers=alice), 422, "validation-error"
    )
    assert any(e["field"].endswith(field) for e in body["errors"]), body
    assert env.slurm["alpha"].submits == 0 and env.slurm["beta"].submits == 0


def test_plain_json_integers_still_work(api: TestClient, env: Env) -> None:
    alice = token(env, "alice")
    body = {**JOB, "gpus": 2, "nodes": 1, "cpus_per_gpu": 4, "cluster": "alpha"}
    created = api.post("/v1/jobs", json=body, headers=alice)
    assert created.status_code == 201, created.text
    assert created.json()["gpus"] == 2


@pytest.mark.parametrize(
    "change",
    [
        {"gpu_hours": True},
        {"gpu_hours": "100"},
        {"max_gpus_per_job": True},
        {"max_gpus_per_job": 4.0},
        {"max_concurrent_gpus_per_cluster": {"alpha": True}},
        {"gpu_type_weights": {"h100": True}},
    ],
)
def test_quota_numbers_are_strict(api: TestClient, env: Env, change: dict[str, Any]) -> None:
    quota = {
        "period_start": "2027-01-01T00:00:00Z",
        "period_end": "2028-01-01T00:00:00Z",
        "gpu_hours": 100,
        "gpu_type_weights": {"h100": 1, "a100": 0.5},
    }
    admin = token(env, "root")
    assert api.put("/v1/projects/climate/quota", json=quota, headers=admin).status_code == 200
    response = api.put("/v1/projects/climate/quota", json={**quota, **change}, headers=admin)
    problem(response, 422, "validation-error")


# --- script directives -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "line", "text"),
    [
        ("#!/bin/bash\n#SBATCH --array=0-999\nsrun x\n", 2, "#SBATCH --array=0-999"),
        ("#!/bin/bash\n# comment\n#SLURM --exclusive\nsrun x\n", 3, "#SLURM --exclusive"),
        ("#!/bin/bash\n:\necho hi\n#PBS -l walltime=99:00:00\n", 4, "#PBS -l walltime=99:00:00"),
        ("#!/bin/bash\nsrun x\n#BSUB -W 9\n", 3, "#BSUB -W 9"),
    ],
)
def test_directive_lines_are_refused_naming_the_line(
    api: TestClient, env: Env, script: str, line: int, text: str
) -> None:
    alice = token(env, "alice")
    response = api.post("/v1/jobs", json={**JOB, "script": script}, headers=alice)
    body = problem(response, 422, "validation-error")
    assert f"line {line} {text!r}" in body["detail"]
    (error,) = body["errors"]
    assert error["field"] == "body.script" and f"line {line} {text!r}" in error["message"]
    assert env.slurm["alpha"].submits == 0
    usage = api.get("/v1/projects/climate/usage", headers=alice).json()
    assert usage["reserved_gpu_hours"] == 0.0


def test_lines_sbatch_does_not_read_are_plain_comments(api: TestClient, env: Env) -> None:
    script = "#!/bin/bash\n#sbatch --time=3\n  #SBATCH -N 9\nsrun x\n#SBATCH --array=1-9\n"
    body = {**JOB, "script": script, "cluster": "alpha"}
    created = api.post("/v1/jobs", json=body, headers=token(env, "alice"))
    assert created.status_code == 201, created.text
