"""Identity on the clusters through HTTP (API.md, "Identity on the clusters", "Job output").

Scripted clusters behind the broker: what the broker asks of them (run as whom, which paths, which
associations) and what it answers. The same paths run on the real dev cluster in
tests/e2e/test_identity_on_slurm.py and tests/adapters/test_run_as.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from tests.broker.harness import Env, build_env
from tests.broker.http_api import problem, token

SCRIPT = "#!/bin/bash\nid -un\n"


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    environment = build_env(f"sqlite:///{tmp_path}/identity.db", gpu_hours=100.0)
    yield environment
    environment.runtime.close()


@pytest.fixture
def api(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.runtime)) as client:
        yield client


def submit(api: TestClient, headers: dict[str, str], **fields: Any) -> Any:
    body = {
        "project": "climate",
        "script": SCRIPT,
        "gpus": 1,
        "time_limit_minutes": 10,
        "cluster": "alpha",
        **fields,
    }
    return api.post("/v1/jobs", json=body, headers=headers)


def reserved(api: TestClient, env: Env) -> float:
    usage = api.get("/v1/projects/climate/usage", headers=token(env, "root")).json()
    return float(usage["reserved_gpu_hours"])


@pytest.mark.parametrize(
    ("unix_user", "why"),
    [
        ("root", "root"),
        ("svc", "the clusters' login account"),
        ("Alice", "upper case"),
        ("1alice", "starts with a digit"),
        ("a" * 33, "too long"),
        ("al ice", "a space"),
        ("../etc", "a path"),
    ],
)
def test_unix_user_must_be_a_posix_name_and_never_root_or_a_service_account(
    api: TestClient, env: Env, unix_user: str, why: str
) -> None:
    admin = token(env, "root")
    created = api.post(
        "/v1/users",
        json={"name": "dora", "role": "researcher", "unix_user": unix_user},
        headers=admin,
    )
    problem(created, 422, "validation-error")
    api.post("/v1/users", json={"name": "dora", "role": "researcher"}, headers=admin)
    patched = api.patch("/v1/users/dora", json={"unix_user": unix_user}, headers=admin)
    problem(patched, 422, "validation-error")


def test_a_job_runs_as_its_researcher_with_its_output_in_their_directory(
    api: TestClient, env: Env
) -> None:
    created = submit(api, token(env, "alice"))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["unix_user"] == "alice"
    spec = env.slurm["alpha"].jobs[job["slurm_job_id"]].spec
    assert spec.run_as == "alice"
    assert spec.workdir == "/home/alice/.broker/jobs"
    assert spec.stdout_path == f"/home/alice/.broker/jobs/{job['id']}.out"
    assert spec.stderr_path == f"/home/alice/.broker/jobs/{job['id']}.err"
    assert ("alice", "/home/alice/.broker/jobs") in env.slurm["alpha"].directories
    assert ("climate", "alice") in env.slurm["alpha"].accounts

    api.delete(f"/v1/jobs/{job['id']}", headers=token(env, "alice"))
    assert env.slurm["alpha"].cancelled_as == ["alice"]


def test_no_unix_user_means_no_cluster_identity_and_nothing_reserved(
    api: TestClient, env: Env
) -> None:
    admin = token(env, "root")
    api.post("/v1/users", json={"name": "dora", "role": "researcher"}, headers=admin)
    api.put("/v1/projects/climate/members/dora", json={"role": "member"}, headers=admin)
    refused = submit(api, token(env, "dora"))
    body = problem(refused, 422, "no-cluster-identity")
    assert body["cluster"] == "alpha"
    assert reserved(api, env) == 0.0
    assert env.slurm["alpha"].submits == 0


def test_a_unix_user_the_cluster_refuses_is_no_cluster_identity(api: TestClient, env: Env) -> None:
    admin = token(env, "root")
    api.post(
        "/v1/users",
        json={"name": "carol", "role": "researcher", "unix_user": "carol"},
        headers=admin,
    )
    api.put("/v1/projects/climate/members/carol", json={"role": "member"}, headers=admin)
    refused = submit(api, token(env, "carol"))
    problem(refused, 422, "no-cluster-identity")
    assert reserved(api, env) == 0.0
    assert env.slurm["alpha"].submits == 0


def test_membership_drives_associations(api: TestClient, env: Env) -> None:
    admin = token(env, "root")
    api.post(
        "/v1/users", json={"name": "dora", "role": "researcher", "unix_user": "dora"}, headers=admin
    )
    api.put("/v1/projects/climate/members/dora", json={"role": "member"}, headers=admin)
    for cluster in ("alpha", "beta"):
        assert ("climate", "dora") in env.slurm[cluster].accounts
    moved = api.patch("/v1/users/dora", json={"unix_user": "dora2"}, headers=admin)
    assert moved.status_code == 200, moved.text
    assert moved.json()["unix_user"] == "dora2"
    for cluster in ("alpha", "beta"):
        assert ("climate", "dora") not in env.slurm[cluster].accounts
        assert ("climate", "dora2") in env.slurm[cluster].accounts
    removed = api.delete("/v1/projects/climate/members/dora", headers=admin)
    assert removed.status_code == 204
    for cluster in ("alpha", "beta"):
        assert ("climate", "dora2") not in env.slurm[cluster].accounts


def test_output_by_offset_follows_until_eof(api: TestClient, env: Env) -> None:
    alice = token(env, "alice")
    job = submit(api, alice).json()
    url = f"/v1/jobs/{job['id']}/output"
    pending = api.get(url, headers=alice).json()
    assert pending == {
        "stream": "stdout",
        "offset": 0,
        "next_offset": 0,
        "size": 0,
        "eof": False,
        "data": "",
    }
    slurm = env.slurm["alpha"]
    path = f"/home/alice/.broker/jobs/{job['id']}.out"
    slurm.files[path] = ("alice", "héllo\nwörld\n".encode())
    first = api.get(url, params={"limit": 4}, headers=alice).json()
    assert (first["data"], first["next_offset"], first["size"], first["eof"]) == (
        "hél",
        4,
        14,
        False,
    )
    rest = api.get(url, params={"offset": first["next_offset"]}, headers=alice).json()
    assert rest["next_offset"] == 14 and not rest["eof"]  # running: more may come
    slurm.finish(job["slurm_job_id"], "COMPLETED", elapsed_s=5)
    env.runtime.poller.poll("alpha")
    done = api.get(url, params={"offset": 14}, headers=alice).json()
    assert (done["data"], done["eof"]) == ("", True)
    whole = api.get(url, headers=alice).json()
    assert whole["data"] == "héllo\nwörld\n" and whole["eof"]
    errors = api.get(url, params={"stream": "stderr"}, headers=alice).json()
    assert errors["stream"] == "stderr" and errors["data"] == "" and errors["eof"]


def test_output_is_capped_and_bad_parameters_are_422(api: TestClient, env: Env) -> None:
    alice = token(env, "alice")
    job = submit(api, alice).json()
    path = f"/home/alice/.broker/jobs/{job['id']}.out"
    env.slurm["alpha"].files[path] = ("alice", b"x" * 3_000_000)
    url = f"/v1/jobs/{job['id']}/output"
    big = api.get(url, params={"limit": 10_000_000}, headers=alice).json()
    assert len(big["data"]) == env.runtime.settings.limits.max_output_bytes
    for params in ({"offset": -1}, {"limit": 0}, {"stream": "../etc/passwd"}, {"task": 1}):
        problem(api.get(url, params=params, headers=alice), 422, "validation-error")


def test_output_is_for_the_submitter_and_admins_only(api: TestClient, env: Env) -> None:
    admin = token(env, "root")
    job = submit(api, token(env, "alice")).json()
    path = f"/home/alice/.broker/jobs/{job['id']}.out"
    env.slurm["alpha"].files[path] = ("alice", b"alice's secret\n")
    url = f"/v1/jobs/{job['id']}/output"
    # Another member of the same project, a researcher of another project, an engineer: 404.
    api.put("/v1/projects/climate/members/bob", json={"role": "member"}, headers=admin)
    for user in ("bob", "eve"):
        problem(api.get(url, headers=token(env, user)), 404, "not-found")
    assert api.get(url, headers=admin).json()["data"] == "alice's secret\n"


def test_unix_user_defaults_to_the_name_where_the_site_says_so(tmp_path: Any) -> None:
    environment = build_env(
        f"sqlite:///{tmp_path}/named.db", identity_settings={"unix_user_defaults_to_name": True}
    )
    try:
        with TestClient(create_app(environment.runtime)) as client:
            admin = token(environment, "root")
            created = client.post(
                "/v1/users", json={"name": "dora", "role": "researcher"}, headers=admin
            )
            assert created.status_code == 201 and created.json()["unix_user"] == "dora"
            # An explicit one wins; a name that cannot be a Unix account (upper case, a service
            # account's) leaves it unset for an admin to choose.
            other = client.post(
                "/v1/users",
                json={"name": "emil", "role": "researcher", "unix_user": "emil2"},
                headers=admin,
            )
            assert other.json()["unix_user"] == "emil2"
            root_named = client.post(
                "/v1/users", json={"name": "root", "role": "admin"}, headers=admin
            )
            problem(root_named, 409, "conflict")  # exists already; never becomes a Unix user
    finally:
        environment.runtime.close()
