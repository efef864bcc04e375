"""Hostile input through HTTP: loose numbers, forged cursors, floods of bad tokens."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.api import deps
from broker.api.app import create_app
from broker.db.engine import transaction
from broker.service import identity
from tests.broker.harness import Env, build_env
from tests.broker.http_api import problem, token

SCRIPT = "#!/bin/bash\nsleep 1\n"
JOB = {"project": "climate", "script": SCRIPT, "gpus": 1, "time_limit_minutes": 10}


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    # No rate limit here: these tests send many requests (the limiter has its own tests).
    environment = build_env(
        f"sqlite:///{tmp_path}/api.db", gpu_hours=100.0, limits={"requests_per_minute": 0}
    )
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


# --- cursors ---------------------------------------------------------------------------------

LISTS = ("/v1/jobs", "/v1/audit")


def _first_page_cursor(api: TestClient, env: Env, path: str) -> str:
    eve = token(env, "eve")
    if path == "/v1/jobs":
        alice = token(env, "alice")
        for _ in range(2):
            body = {**JOB, "cluster": "alpha"}
            assert api.post("/v1/jobs", json=body, headers=alice).status_code == 201
    page = api.get(path, params={"limit": 1}, headers=eve).json()
    assert page["next_cursor"], page
    cursor: str = page["next_cursor"]
    # The cursor works as given: the next page follows.
    follow = api.get(path, params={"limit": 1, "cursor": cursor}, headers=eve)
    assert follow.status_code == 200 and follow.json()["data"] != page["data"]
    return cursor


@pytest.mark.parametrize("path", LISTS)
def test_a_cursor_with_any_one_character_changed_is_422(
    api: TestClient, env: Env, path: str
) -> None:
    cursor = _first_page_cursor(api, env, path)
    eve = token(env, "eve")
    alphabet = "AQgw-_09."
    for position, char in enumerate(cursor):
        other = alphabet[(alphabet.find(char) + 1) % len(alphabet)] if char in alphabet else "A"
        tampered = cursor[:position] + other + cursor[position + 1 :]
        response = api.get(path, params={"cursor": tampered}, headers=eve)
        body = problem(response, 422, "validation-error")
        assert body["errors"][0]["field"] == "cursor"


def test_a_cursor_of_one_list_is_refused_by_the_other(api: TestClient, env: Env) -> None:
    eve = token(env, "eve")
    jobs_cursor = _first_page_cursor(api, env, "/v1/jobs")
    audit_cursor = _first_page_cursor(api, env, "/v1/audit")
    problem(
        api.get("/v1/audit", params={"cursor": jobs_cursor}, headers=eve), 422, "validation-error"
    )
    problem(
        api.get("/v1/jobs", params={"cursor": audit_cursor}, headers=eve), 422, "validation-error"
    )


def _unsigned(payload: str) -> str:
    encoded = base64.urlsafe_b64encode(payload.encode()).decode()
    return encoded.rstrip("=") + "." + base64.urlsafe_b64encode(b"\0" * 32).decode().rstrip("=")


# Payloads that reached the database before cursors were signed, and answered 500.
FORGED_PAYLOADS = [
    "2024-01-01T00:00:00|00000000-0000-0000-0000-000000000000",  # no zone
    "2024-01-01T00:00:00+00:00|x",
    "9" * 40,  # beyond BIGINT
    "\u00b2\u00b3",  # digits to str.isdigit(), not to int()
    "-1",
]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cursor=st.one_of(
        st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=300),
        st.binary(min_size=1, max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        st.text(max_size=100).map(_unsigned),
        st.sampled_from(FORGED_PAYLOADS).map(_unsigned),
        st.sampled_from(FORGED_PAYLOADS).map(
            lambda p: base64.urlsafe_b64encode(p.encode()).decode()
        ),
    ),
    path=st.sampled_from(LISTS),
)
def test_garbage_cursors_are_422_never_500(
    api: TestClient, env: Env, cursor: str, path: str
) -> None:
    response = api.get(path, params={"cursor": cursor}, headers=_eve_header(env))
    problem(response, 422, "validation-error")


_EVE: dict[int, dict[str, str]] = {}


def _eve_header(env: Env) -> dict[str, str]:
    """One token per environment: hypothesis runs many examples on one fixture."""
    return _EVE.setdefault(id(env), token(env, "eve"))


# --- rate limits before authentication -------------------------------------------------------


@pytest.fixture
def limited(tmp_path: Any) -> Iterator[tuple[TestClient, Env]]:
    environment = build_env(
        f"sqlite:///{tmp_path}/limited.db", limits={"requests_per_minute": 6, "request_burst": 5}
    )
    with TestClient(create_app(environment.runtime)) as client:
        yield client, environment
    environment.runtime.close()


def test_a_flood_of_unknown_tokens_is_rate_limited_and_a_known_user_is_not(
    limited: tuple[TestClient, Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, env = limited
    alice = token(env, "alice")
    assert api.get("/v1/me", headers=alice).status_code == 200  # alice's token is known
    lookups = []
    real_authenticate = identity.authenticate

    def counting_authenticate(session: Any, presented: str) -> Any:
        lookups.append(presented)
        return real_authenticate(session, presented)

    monkeypatch.setattr(deps, "authenticate", counting_authenticate)  # what get_actor calls
    statuses = []
    for n in range(30):
        bad = {"Authorization": f"Bearer brk_unknown{n}"}
        response = api.get("/v1/me", headers=bad)
        statuses.append(response.status_code)
        if response.status_code == 429:
            problem(response, 429, "rate-limited")
            assert int(response.headers["retry-after"]) >= 1
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    assert len(lookups) == 5  # once the bucket is empty, no database look-up at all
    problem(api.get("/v1/me"), 429, "rate-limited")  # no token at all: same address bucket
    # alice, from the same address, still works from her own bucket, which runs out in turn.
    mine = [api.get("/v1/me", headers=alice).status_code for _ in range(6)]
    assert mine[:4] == [200] * 4 and mine[-1] == 429


def test_one_bad_token_repeated_is_limited_by_its_own_bucket(
    limited: tuple[TestClient, Env],
) -> None:
    api, _ = limited
    bad = {"Authorization": "Bearer brk_stolen-and-revoked"}
    statuses = [api.get("/v1/me", headers=bad).status_code for _ in range(8)]
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}


def test_a_revoked_token_flooding_is_refused_without_look_ups_once_the_address_bucket_is_empty(
    limited: tuple[TestClient, Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, env = limited
    with transaction(env.runtime.sessions) as session:
        issued = identity.issue_token(session, "test", "alice", "soon revoked")
    bearer = {"Authorization": f"Bearer {issued.token}"}
    assert api.get("/v1/me", headers=bearer).status_code == 200  # known now
    with transaction(env.runtime.sessions) as session:
        identity.revoke_token(session, "test", "alice", issued.id)
    lookups = []
    real_authenticate = identity.authenticate

    def counting_authenticate(session: Any, presented: str) -> Any:
        lookups.append(presented)
        return real_authenticate(session, presented)

    monkeypatch.setattr(deps, "authenticate", counting_authenticate)
    statuses = [api.get("/v1/me", headers=bearer).status_code for _ in range(12)]
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    assert len(lookups) == 5


def test_a_removed_member_loses_the_projects_jobs_at_once_with_the_token_cached(
    api: TestClient, env: Env
) -> None:
    alice, admin = token(env, "alice"), token(env, "root")
    body = {"project": "climate", "script": "#!/bin/bash\ntrue", "gpus": 1, "time_limit_minutes": 5}
    body["cluster"] = "alpha"
    created = api.post("/v1/jobs", json=body, headers=alice)
    assert created.status_code == 201, created.text
    job = created.json()
    for _ in range(3):  # alice's actor is cached
        assert api.get(f"/v1/jobs/{job['id']}", headers=alice).status_code == 200
    assert api.get("/v1/me", headers=alice).json()["projects"] == ["climate"]
    assert api.delete("/v1/projects/climate/members/alice", headers=admin).status_code == 204
    problem(api.get(f"/v1/jobs/{job['id']}", headers=alice), 404, "not-found")
    assert api.get("/v1/jobs", params={"project": "climate"}, headers=alice).json()["data"] == []
    assert api.get("/v1/me", headers=alice).json()["projects"] == []


# --- one unit-of-work convention: roles checked in the services, writes all-or-nothing -------


def test_admin_only_reads_and_writes_are_refused_to_other_roles(api: TestClient, env: Env) -> None:
    for user in ("eve", "alice"):
        who = token(env, user)
        for path in ("/v1/users", "/v1/users/alice", "/v1/users/alice/tokens"):
            problem(api.get(path, headers=who), 403, "forbidden")
        problem(api.post("/v1/users/alice/tokens", json={}, headers=who), 403, "forbidden")
        problem(api.delete("/v1/users/alice/tokens/x", headers=who), 403, "forbidden")
    problem(api.get("/v1/audit", headers=token(env, "alice")), 403, "forbidden")
    problem(api.get("/v1/usage", headers=token(env, "alice")), 403, "forbidden")


def test_a_write_that_fails_leaves_nothing_behind(api: TestClient, env: Env) -> None:
    admin, eve = token(env, "root"), token(env, "eve")
    before = api.get("/v1/audit", params={"limit": 500}, headers=eve).json()["data"]
    created = api.post("/v1/users", json={"name": "zed", "role": "researcher"}, headers=admin)
    assert created.status_code == 201
    problem(
        api.post("/v1/users", json={"name": "zed", "role": "admin"}, headers=admin), 409, "conflict"
    )
    after = api.get("/v1/audit", params={"limit": 500}, headers=eve).json()["data"]
    assert [e["action"] for e in after[: len(after) - len(before)]] == ["user.create"]
    assert api.get("/v1/users/zed", headers=admin).json()["role"] == "researcher"
    problem(api.get("/v1/usage", params={"from": "2027-01-01T00:00:00"}, headers=eve), 422,
            "validation-error")  # fmt: skip
