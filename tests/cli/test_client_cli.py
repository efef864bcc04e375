"""The client CLI against a fake broker: an ``httpx.MockTransport`` that checks each request
(method, path, query, body, headers) and answers with API.md-shaped documents.

The lead's end-to-end tests drive the same commands against the real broker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner, Result

from broker.cli import app as broker_app
from broker.cli import client, http, jobs
from broker.cli.output import fields, table

URL = "http://broker.test"
TOKEN = "s3cret-token"

JOB: dict[str, Any] = {
    "id": "0b9c6a52-5a1e-4a5e-9a53-7d1f3c2a9e01",
    "project": "climate-llm",
    "user": "alice",
    "name": "train-7b",
    "cluster": "alpha",
    "partition": "gpu",
    "gpu_type": "h100",
    "gpus": 8,
    "nodes": 1,
    "time_limit_minutes": 120,
    "state": "pending",
    "state_reason": "Resources",
    "slurm_job_id": "1234",
    "exit_code": None,
    "submitted_at": "2027-03-01T10:00:00Z",
    "started_at": None,
    "ended_at": None,
    "reserved_gpu_hours": 16.0,
    "charged_gpu_hours": None,
}


def job_with(**changes: Any) -> dict[str, Any]:
    return {**JOB, **changes}


Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class FakeBroker:
    """Routes ``(method, path)`` to canned answers and records every request it sees."""

    routes: dict[tuple[str, str], Handler] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)

    def on(
        self,
        method: str,
        path: str,
        status: int = 200,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        def answer(request: httpx.Request) -> httpx.Response:
            if body is None:
                return httpx.Response(status, headers=headers)
            return httpx.Response(status, json=body, headers=headers)

        self.routes[(method, path)] = answer

    def problem(
        self,
        method: str,
        path: str,
        status: int,
        type_: str,
        title: str,
        detail: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        doc = {"type": type_, "title": title, "status": status, "detail": detail, **extra}

        def answer(request: httpx.Request) -> httpx.Response:
            return httpx.Response(
                status,
                content=json.dumps(doc).encode(),
                headers={"Content-Type": "application/problem+json", **(headers or {})},
            )

        self.routes[(method, path)] = answer

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        route = self.routes.get((request.method, request.url.raw_path.decode().split("?")[0]))
        assert route is not None, f"unexpected {request.method} {request.url}"
        return route(request)

    @property
    def last(self) -> httpx.Request:
        assert self.requests, "the CLI sent no request"
        return self.requests[-1]


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    fake = FakeBroker()
    monkeypatch.setattr(http, "_transport", httpx.MockTransport(fake))
    monkeypatch.delenv("BROKER_TOKEN", raising=False)
    monkeypatch.delenv("BROKER_URL", raising=False)
    return fake


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    client.register(app)
    return app


def run(
    app: typer.Typer, *args: str, token: str | None = TOKEN, stdin: str | None = None
) -> Result:
    env = {"BROKER_URL": URL, "BROKER_TOKEN": token}
    return CliRunner().invoke(app, list(args), env=env, input=stdin)


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content)


SCRIPT = "#!/bin/bash\nsrun python train.py\n"


# --- submit ---------------------------------------------------------------------------------


def test_submit_sends_the_body_built_from_flags_env_pairs_and_the_script_file(
    broker: FakeBroker, cli: typer.Typer, tmp_path: Path
) -> None:
    script = tmp_path / "train.sh"
    script.write_text(SCRIPT)
    broker.on("POST", "/v1/jobs", 201, JOB)

    result = run(
        cli,
        "submit",
        str(script),
        "--project",
        "climate-llm",
        "--gpus",
        "8",
        "--time",
        "120",
        "--cluster",
        "alpha",
        "--partition",
        "gpu",
        "--gpu-type",
        "h100",
        "--name",
        "train-7b",
        "--nodes",
        "1",
        "--cpus-per-gpu",
        "8",
        "--mem-per-gpu-gb",
        "64",
        "--env",
        "HF_HOME=/scratch/hf",
        "--env",
        "OPTS=a=b",
        "--idempotency-key",
        "key-1",
    )

    assert result.exit_code == 0, result.output
    request = broker.last
    assert (request.method, request.url.path) == ("POST", "/v1/jobs")
    assert str(request.url).startswith(URL)
    assert request.headers["Idempotency-Key"] == "key-1"
    assert body_of(request) == {
        "project": "climate-llm",
        "name": "train-7b",
        "script": SCRIPT,
        "cluster": "alpha",
        "partition": "gpu",
        "gpu_type": "h100",
        "gpus": 8,
        "nodes": 1,
        "time_limit_minutes": 120,
        "cpus_per_gpu": 8,
        "mem_per_gpu_gb": 64,
        "environment": {"HF_HOME": "/scratch/hf", "OPTS": "a=b"},
    }
    assert request.extensions["timeout"]["read"] == jobs.SUBMIT_TIMEOUT


def test_submit_from_stdin_sends_only_what_was_given_and_a_generated_idempotency_key(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    broker.on("POST", "/v1/jobs", 201, JOB)

    result = run(cli, "submit", "-", "--project", "p", "--gpus", "1", "--time", "5", stdin=SCRIPT)

    assert result.exit_code == 0, result.output
    assert body_of(broker.last) == {
        "project": "p",
        "script": SCRIPT,
        "gpus": 1,
        "time_limit_minutes": 5,
    }
    assert len(broker.last.headers["Idempotency-Key"]) == 36


def test_submit_json_prints_exactly_the_api_body(broker: FakeBroker, cli: typer.Typer) -> None:
    broker.on("POST", "/v1/jobs", 201, JOB)

    result = run(
        cli, "submit", "-", "--project", "p", "--gpus", "8", "--time", "120", "--json", stdin=SCRIPT
    )

    assert result.exit_code == 0
    assert json.loads(result.stdout) == JOB


def test_submit_table_shows_id_slurm_id_state_and_reserved_hours(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    broker.on("POST", "/v1/jobs", 201, JOB)

    result = run(cli, "submit", "-", "--project", "p", "--gpus", "8", "--time", "120", stdin=SCRIPT)

    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["id", JOB["id"]]
    assert ["slurm_job_id", "1234"] in [line.split() for line in lines]
    assert ["state", "pending"] in [line.split() for line in lines]
    assert ["reserved_gpu_hours", "16.00"] in [line.split() for line in lines]


def test_submit_whose_sbatch_answer_was_lost_succeeds_and_says_so(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    lost = job_with(state="submit_unknown", slurm_job_id=None)
    broker.on("POST", "/v1/jobs", 202, lost, headers={"Idempotent-Replayed": "true"})

    result = run(cli, "submit", "-", "--project", "p", "--gpus", "8", "--time", "5", stdin=SCRIPT)

    assert result.exit_code == 0
    assert ["state", "submit_unknown"] in [line.split() for line in result.stdout.splitlines()]
    assert "sbatch's answer was lost" in result.stderr
    assert "no new job" in result.stderr


@pytest.mark.parametrize("bad", ["NOEQUALS", "=value"])
def test_submit_refuses_a_malformed_env_pair_without_calling_the_broker(
    broker: FakeBroker, cli: typer.Typer, bad: str
) -> None:
    result = run(
        cli,
        "submit",
        "-",
        "--project",
        "p",
        "--gpus",
        "1",
        "--time",
        "5",
        "--env",
        bad,
        stdin=SCRIPT,
    )

    assert result.exit_code == 2
    assert "KEY=VALUE" in result.stderr
    assert broker.requests == []


def test_submit_of_a_missing_script_file_is_a_usage_error(
    broker: FakeBroker, cli: typer.Typer, tmp_path: Path
) -> None:
    result = run(
        cli, "submit", str(tmp_path / "nope.sh"), "--project", "p", "--gpus", "1", "--time", "5"
    )

    assert result.exit_code == 2
    assert "cannot read" in result.stderr
    assert broker.requests == []


def test_submit_timeout_exits_7_and_names_the_key_to_retry_with(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    broker.routes[("POST", "/v1/jobs")] = timeout

    result = run(
        cli,
        "submit",
        "-",
        "--project",
        "p",
        "--gpus",
        "1",
        "--time",
        "5",
        "--idempotency-key",
        "retry-me",
        stdin=SCRIPT,
    )

    assert result.exit_code == 7
    assert "--idempotency-key retry-me" in result.stderr


# --- listing and reading jobs ---------------------------------------------------------------


def test_jobs_table_shows_id_and_state_and_forwards_filters(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    running = job_with(id="11111111-2222-3333-4444-555555555555", state="running")
    broker.on("GET", "/v1/jobs", 200, {"data": [JOB, running], "next_cursor": None})

    result = run(cli, "jobs", "--project", "climate-llm", "--state", "running", "--limit", "5")

    assert result.exit_code == 0, result.output
    assert dict(broker.last.url.params) == {
        "project": "climate-llm",
        "state": "running",
        "limit": "5",
    }
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [(row[0], row[7]) for row in rows] == [
        (JOB["id"], "pending"),
        (running["id"], "running"),
    ]


def test_jobs_all_follows_next_cursor_to_the_last_page(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    pages = {
        None: {"data": [job_with(id="a")], "next_cursor": "c1"},
        "c1": {"data": [job_with(id="b")], "next_cursor": "c2"},
        "c2": {"data": [job_with(id="c")], "next_cursor": None},
    }
    broker.routes[("GET", "/v1/jobs")] = lambda request: httpx.Response(
        200, json=pages[request.url.params.get("cursor")]
    )

    result = run(cli, "jobs", "--all", "--user", "alice", "--json")

    assert result.exit_code == 0, result.output
    assert [r.url.params.get("cursor") for r in broker.requests] == [None, "c1", "c2"]
    assert all(r.url.params["user"] == "alice" for r in broker.requests)
    assert json.loads(result.stdout) == {
        "data": [job_with(id="a"), job_with(id="b"), job_with(id="c")],
        "next_cursor": None,
    }


def test_jobs_without_all_shows_one_page_and_says_how_to_get_more(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    broker.on("GET", "/v1/jobs", 200, {"data": [JOB], "next_cursor": "c1"})

    result = run(cli, "jobs")

    assert result.exit_code == 0
    assert len(broker.requests) == 1
    assert "--cursor c1" in result.stderr


def test_job_json_and_fields(broker: FakeBroker, cli: typer.Typer) -> None:
    broker.on("GET", f"/v1/jobs/{JOB['id']}", 200, JOB)

    as_json = run(cli, "job", JOB["id"], "--json")
    human = run(cli, "job", JOB["id"])

    assert json.loads(as_json.stdout) == JOB
    assert ["state_reason", "Resources"] in [line.split() for line in human.stdout.splitlines()]


def test_names_from_the_command_line_stay_one_path_segment(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    broker.on("GET", "/v1/jobs/..%2Fusers", 200, JOB)

    result = run(cli, "job", "../users")

    assert result.exit_code == 0, result.output
    assert broker.last.url.raw_path == b"/v1/jobs/..%2Fusers"


def test_job_events_table(broker: FakeBroker, cli: typer.Typer) -> None:
    events = {
        "data": [
            {
                "at": "2027-03-01T10:00:00Z",
                "from_state": None,
                "to_state": "submitting",
                "reason": None,
            },
            {
                "at": "2027-03-01T10:00:01Z",
                "from_state": "submitting",
                "to_state": "pending",
                "reason": "sbatch",
            },
        ]
    }
    broker.on("GET", f"/v1/jobs/{JOB['id']}/events", 200, events)

    result = run(cli, "job-events", JOB["id"])

    assert result.exit_code == 0
    assert [line.split()[1:3] for line in result.stdout.splitlines()[1:]] == [
        ["-", "submitting"],
        ["submitting", "pending"],
    ]


@pytest.mark.parametrize(
    ("status", "state", "message"),
    [(202, "running", "Cancellation requested"), (200, "completed", "already ended")],
)
def test_cancel_says_whether_it_was_requested_or_the_job_had_ended(
    broker: FakeBroker, cli: typer.Typer, status: int, state: str, message: str
) -> None:
    broker.on("DELETE", f"/v1/jobs/{JOB['id']}", status, job_with(state=state))

    result = run(cli, "cancel", JOB["id"])

    assert result.exit_code == 0
    assert message in result.stdout
    assert state in result.stdout


# --- errors and exit codes ------------------------------------------------------------------

QUOTA: dict[str, Any] = {
    "limit": "gpu_hours",
    "requested": 16.0,
    "used": 40.0,
    "reserved": 2.0,
    "remaining": 2.0,
}


@pytest.mark.parametrize(
    ("status", "type_", "extra", "code"),
    [
        (404, "not-found", {}, 3),
        (409, "quota-exceeded", QUOTA, 4),
        (409, "conflict", {}, 4),
        (422, "limit-exceeded", {"limit": "gpus_per_job", "requested": 8, "allowed": 4}, 4),
        (422, "idempotency-conflict", {}, 4),
        (422, "submit-rejected", {}, 4),
        (422, "validation-error", {"errors": [{"field": "body.gpus", "message": "too big"}]}, 5),
        (413, "payload-too-large", {}, 5),
        (401, "unauthenticated", {}, 6),
        (403, "forbidden", {}, 6),
        (503, "cluster-unavailable", {}, 7),
        (429, "rate-limited", {}, 7),
        (500, "internal", {}, 1),
    ],
)
def test_each_problem_maps_to_its_exit_code_and_prints_title_and_detail(
    broker: FakeBroker, cli: typer.Typer, status: int, type_: str, extra: dict[str, Any], code: int
) -> None:
    broker.problem(
        "POST", "/v1/jobs", status, type_, f"Title of {type_}", "what went wrong", **extra
    )

    result = run(
        cli, "submit", "-", "--project", "p", "--gpus", "8", "--time", "5", "--json", stdin=SCRIPT
    )

    assert result.exit_code == code
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == f"Title of {type_}: what went wrong"


def test_a_quota_refusal_prints_its_numbers(broker: FakeBroker, cli: typer.Typer) -> None:
    broker.problem(
        "POST", "/v1/jobs", 409, "quota-exceeded", "Quota exceeded", "no budget", **QUOTA
    )

    result = run(cli, "submit", "-", "--project", "p", "--gpus", "8", "--time", "120", stdin=SCRIPT)

    assert result.exit_code == 4
    assert "limit: gpu_hours" in result.stderr
    assert "requested: 16.00" in result.stderr
    assert "remaining: 2.00" in result.stderr


def test_validation_errors_list_their_fields(broker: FakeBroker, cli: typer.Typer) -> None:
    broker.problem(
        "POST",
        "/v1/users",
        422,
        "validation-error",
        "Invalid request",
        "body.role: Input should be 'admin'",
        errors=[
            {"field": "body.role", "message": "Input should be 'admin'"},
            {"field": "body.email", "message": "not an address"},
        ],
    )

    result = run(cli, "user", "create", "bob", "--role", "king")

    assert result.exit_code == 5
    assert result.stderr.splitlines() == [
        "Invalid request: body.role: Input should be 'admin'",
        "  body.email: not an address",
    ]


def test_unavailable_cluster_says_when_to_retry(broker: FakeBroker, cli: typer.Typer) -> None:
    broker.problem(
        "POST",
        "/v1/jobs",
        503,
        "cluster-unavailable",
        "Cluster unavailable",
        "alpha does not answer",
        headers={"Retry-After": "30"},
    )

    result = run(cli, "submit", "-", "--project", "p", "--gpus", "1", "--time", "5", stdin=SCRIPT)

    assert result.exit_code == 7
    assert "retry after 30 s" in result.stderr


def test_connection_refused_exits_7(broker: FakeBroker, cli: typer.Typer) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    broker.routes[("GET", "/v1/me")] = refuse

    result = run(cli, "whoami")

    assert result.exit_code == 7
    assert "cannot reach the broker at http://broker.test" in result.stderr


def test_a_non_json_gateway_error_exits_7_with_an_excerpt(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    broker.routes[("GET", "/v1/clusters")] = lambda request: httpx.Response(
        502, text="<html><body>Bad   Gateway</body></html>"
    )

    result = run(cli, "clusters")

    assert result.exit_code == 7
    assert result.stderr.startswith("HTTP 502 Bad Gateway: <html><body>Bad Gateway")


def test_a_success_that_is_not_json_exits_1(broker: FakeBroker, cli: typer.Typer) -> None:
    broker.routes[("GET", "/v1/me")] = lambda request: httpx.Response(200, text="<html>")

    result = run(cli, "whoami")

    assert result.exit_code == 1
    assert "not JSON" in result.stderr


def test_missing_token_is_a_clear_error_before_any_request(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    result = run(cli, "jobs", token=None)

    assert result.exit_code == 6
    assert "no API token: pass --token or set BROKER_TOKEN" in result.stderr
    assert broker.requests == []


def test_token_and_url_flags_override_the_environment(broker: FakeBroker, cli: typer.Typer) -> None:
    broker.on("GET", "/v1/me", 200, {"name": "alice", "role": "researcher", "projects": ["p"]})

    result = CliRunner().invoke(
        cli,
        ["whoami", "--url", "http://other.test/", "--token", TOKEN],
        env={"BROKER_TOKEN": "wrong", "BROKER_URL": URL},
    )

    assert result.exit_code == 0, result.output
    assert str(broker.last.url) == "http://other.test/v1/me"
    assert ["projects", "p"] in [line.split() for line in result.stdout.splitlines()]


def test_global_options_before_the_command_are_used(broker: FakeBroker, cli: typer.Typer) -> None:
    broker.on("GET", "/v1/jobs", 200, {"data": [JOB], "next_cursor": None})

    result = CliRunner().invoke(
        cli,
        ["--url", "http://other.test", "--token", TOKEN, "--json", "jobs"],
        env={"BROKER_TOKEN": "wrong", "BROKER_URL": URL},
    )

    assert result.exit_code == 0, result.output
    assert str(broker.last.url) == "http://other.test/v1/jobs"
    assert json.loads(result.stdout) == {"data": [JOB], "next_cursor": None}


def test_global_options_after_the_command_win_over_those_before_it(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    broker.on("GET", "/v1/projects/p", 200, PROJECT)

    before = ["--url", "http://before.test", "--token", "wrong"]
    after = ["--url", "http://after.test", "--token", TOKEN]
    result = CliRunner().invoke(cli, [*before, "project", "show", "p", *after])

    assert result.exit_code == 0, result.output
    assert str(broker.last.url) == "http://after.test/v1/projects/p"
    assert ["name", "climate-llm"] in [line.split() for line in result.stdout.splitlines()]


def test_report_usage_refuses_csv_with_a_global_json(broker: FakeBroker, cli: typer.Typer) -> None:
    result = run(cli, "--json", "report", "usage", "--csv")

    assert result.exit_code == 2
    assert "choose one of --csv and --json" in result.stderr
    assert broker.requests == []


# --- projects, users, reports ---------------------------------------------------------------

PROJECT = {
    "name": "climate-llm",
    "description": "LLMs for climate",
    "slurm_accounts": {"alpha": "climate"},
    "members": {"alice": "member"},
    "quota": None,
    "created_at": "2027-01-01T00:00:00Z",
}


def test_project_create_sends_accounts_and_description(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    broker.on("POST", "/v1/projects", 201, PROJECT)

    result = run(
        cli,
        "project",
        "create",
        "climate-llm",
        "--account",
        "alpha=climate",
        "--account",
        "beta=clim",
        "--description",
        "LLMs for climate",
    )

    assert result.exit_code == 0, result.output
    assert body_of(broker.last) == {
        "name": "climate-llm",
        "description": "LLMs for climate",
        "slurm_accounts": {"alpha": "climate", "beta": "clim"},
    }
    assert "alice" in result.stdout


def test_project_set_quota_builds_the_whole_quota(broker: FakeBroker, cli: typer.Typer) -> None:
    quota = {"period_start": "2027-01-01T00:00:00Z", "gpu_hours": 50000.0}
    broker.on("PUT", "/v1/projects/climate-llm/quota", 200, quota)

    result = run(
        cli,
        "project",
        "set-quota",
        "climate-llm",
        "--gpu-hours",
        "50000",
        "--start",
        "2027-01-01",
        "--end",
        "2028-01-01T00:00:00Z",
        "--weight",
        "h100=1.0",
        "--weight",
        "a100=0.5",
        "--max-concurrent-gpus",
        "64",
        "--max-concurrent-gpus-on",
        "alpha=32",
        "--max-gpus-per-job",
        "32",
        "--max-time-limit",
        "2880",
        "--max-pending-jobs",
        "100",
        "--allow-cluster",
        "alpha",
        "--allow-cluster",
        "beta",
        "--allow-partition",
        "gpu",
        "--allow-gpu-type",
        "h100",
        "--allow-gpu-type",
        "a100",
    )

    assert result.exit_code == 0, result.output
    assert body_of(broker.last) == {
        "period_start": "2027-01-01T00:00:00Z",
        "period_end": "2028-01-01T00:00:00Z",
        "gpu_hours": 50000.0,
        "gpu_type_weights": {"h100": 1.0, "a100": 0.5},
        "max_concurrent_gpus": 64,
        "max_concurrent_gpus_per_cluster": {"alpha": 32},
        "max_gpus_per_job": 32,
        "max_time_limit_minutes": 2880,
        "max_pending_jobs": 100,
        "allowed_clusters": ["alpha", "beta"],
        "allowed_partitions": ["gpu"],
        "allowed_gpu_types": ["h100", "a100"],
    }


def test_project_set_quota_omits_limits_not_given(broker: FakeBroker, cli: typer.Typer) -> None:
    broker.on("PUT", "/v1/projects/p/quota", 200, {"gpu_hours": 10.0})

    result = run(
        cli,
        "project",
        "set-quota",
        "p",
        "--gpu-hours",
        "10",
        "--start",
        "2027-01-01T00:00:00Z",
        "--end",
        "2027-02-01T00:00:00Z",
    )

    assert result.exit_code == 0, result.output
    assert body_of(broker.last) == {
        "period_start": "2027-01-01T00:00:00Z",
        "period_end": "2027-02-01T00:00:00Z",
        "gpu_hours": 10.0,
        "gpu_type_weights": {},
        "max_concurrent_gpus_per_cluster": {},
    }


def test_project_set_quota_refuses_a_non_numeric_weight(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    result = run(
        cli,
        "project",
        "set-quota",
        "p",
        "--gpu-hours",
        "10",
        "--start",
        "2027-01-01",
        "--end",
        "2028-01-01",
        "--weight",
        "h100=heavy",
    )

    assert result.exit_code == 2
    assert broker.requests == []


def test_member_add_and_remove(broker: FakeBroker, cli: typer.Typer) -> None:
    broker.on(
        "PUT", "/v1/projects/p/members/bob", 200, {"project": "p", "user": "bob", "role": "manager"}
    )
    broker.on("DELETE", "/v1/projects/p/members/bob", 204)

    added = run(cli, "project", "add-member", "p", "bob", "--role", "manager")
    removed = run(cli, "project", "remove-member", "p", "bob", "--json")

    assert added.exit_code == 0
    assert body_of(broker.requests[0]) == {"role": "manager"}
    assert "bob is manager of p" in added.stdout
    assert removed.exit_code == 0
    assert removed.stdout == ""


def test_user_token_prints_the_token_once_issued(broker: FakeBroker, cli: typer.Typer) -> None:
    issued = {
        "id": "t1",
        "token": "brk_abcdef",
        "description": "laptop",
        "created_at": "2027-01-01T00:00:00Z",
    }
    broker.on("POST", "/v1/users/alice/tokens", 201, issued)

    result = run(cli, "user", "token", "alice", "--description", "laptop")

    assert result.exit_code == 0
    assert body_of(broker.last) == {"description": "laptop"}
    assert ["token", "brk_abcdef"] in [line.split() for line in result.stdout.splitlines()]


def test_user_token_with_an_expiry_sends_it_and_prints_it(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    issued = {
        "id": "t2",
        "token": "brk_short",
        "description": "",
        "created_at": "2027-01-01T00:00:00Z",
        "expires_at": "2027-02-01T00:00:00Z",
    }
    broker.on("POST", "/v1/users/alice/tokens", 201, issued)

    result = run(cli, "user", "token", "alice", "--expires-at", "2027-02-01T00:00:00Z")

    assert result.exit_code == 0
    assert body_of(broker.last) == {"expires_at": "2027-02-01T00:00:00Z"}
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["expires_at", "2027-02-01T00:00:00Z"] in lines
    assert ["token", "brk_short"] in lines


def test_user_revoke(broker: FakeBroker, cli: typer.Typer) -> None:
    broker.on("DELETE", "/v1/users/alice/tokens/t1", 204)

    result = run(cli, "user", "revoke", "alice", "t1")

    assert result.exit_code == 0
    assert "Revoked token t1 of alice" in result.stdout


def test_report_usage_csv_asks_for_csv_and_prints_it_unchanged(
    broker: FakeBroker, cli: typer.Typer
) -> None:
    csv = "key,gpu_hours,jobs,jobs_completed\nalice,12.5,3,2\n"
    broker.routes[("GET", "/v1/usage")] = lambda request: httpx.Response(
        200, text=csv, headers={"Content-Type": "text/csv"}
    )

    result = run(cli, "report", "usage", "--group-by", "user", "--from", "2027-01-01", "--csv")

    assert result.exit_code == 0, result.output
    assert broker.last.headers["Accept"] == "text/csv"
    assert dict(broker.last.url.params) == {"from": "2027-01-01T00:00:00Z", "group_by": "user"}
    assert result.stdout == csv


def test_report_usage_table(broker: FakeBroker, cli: typer.Typer) -> None:
    report = {
        "group_by": "gpu_type",
        "from": None,
        "to": None,
        "data": [{"key": "h100", "gpu_hours": 120.5, "jobs": 10, "jobs_completed": 8}],
    }
    broker.on("GET", "/v1/usage", 200, report)

    result = run(cli, "report", "usage", "--group-by", "gpu_type")

    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "GPU TYPE  GPU-HOURS  JOBS  COMPLETED",
        "h100         120.50    10          8",
    ]


def test_usage_shows_the_budget_and_its_breakdowns(broker: FakeBroker, cli: typer.Typer) -> None:
    usage = {
        "project": "p",
        "period_start": "2027-01-01T00:00:00Z",
        "period_end": "2028-01-01T00:00:00Z",
        "budget_gpu_hours": 100.0,
        "used_gpu_hours": 40.0,
        "reserved_gpu_hours": 16.0,
        "remaining_gpu_hours": 44.0,
        "concurrent_gpus": 8,
        "by_cluster": {"alpha": 40.0},
        "by_gpu_type": {},
        "by_user": {"alice": 40.0},
    }
    broker.on("GET", "/v1/projects/p/usage", 200, usage)

    result = run(cli, "usage", "p")

    assert result.exit_code == 0
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["remaining_gpu_hours", "44.00"] in rows
    assert ["alice", "40.00"] in rows


def test_clusters_one_row_per_partition(broker: FakeBroker, cli: typer.Typer) -> None:
    partition = {
        "name": "gpu",
        "gpu_type": "h100",
        "gpus_total": 16,
        "gpus_allocated": 8,
        "gpus_idle": 8,
        "nodes_total": 2,
        "nodes_down": 0,
    }
    broker.on(
        "GET",
        "/v1/clusters",
        200,
        {
            "data": [
                {
                    "name": "alpha",
                    "up": True,
                    "last_poll_at": "2027-03-01T10:00:00Z",
                    "partitions": [partition],
                },
                {"name": "beta", "up": False, "last_poll_at": None, "partitions": []},
            ]
        },
    )

    result = run(cli, "clusters")

    assert result.exit_code == 0
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert rows[0][:4] == ["alpha", "yes", "2027-03-01T10:00:00Z", "gpu"]
    assert rows[1][:2] == ["beta", "no"]


# --- wiring and rendering -------------------------------------------------------------------


def test_register_adds_every_command_and_group(cli: typer.Typer) -> None:
    result = CliRunner().invoke(cli, ["--help"])

    for name in (
        "submit",
        "jobs",
        "job",
        "job-events",
        "cancel",
        "usage",
        "clusters",
        "whoami",
        "audit",
        "project",
        "user",
        "report",
    ):
        assert f" {name} " in result.stdout


def test_the_broker_command_has_the_server_and_the_client_commands() -> None:
    result = CliRunner().invoke(broker_app, ["--help"])

    assert result.exit_code == 0
    for name in ("serve", "worker", "db", "admin", "submit", "project", "report"):
        assert f" {name} " in result.stdout
    assert "BROKER_TOKEN" in result.stdout


def test_table_pads_columns_and_right_aligns_numbers() -> None:
    assert table(["NAME", "GPUS"], [["a", 8], ["long-name", 16]]).splitlines() == [
        "NAME       GPUS",
        "a             8",
        "long-name    16",
    ]
    assert fields([("id", "x"), ("exit_code", None)]).splitlines() == [
        "id         x",
        "exit_code  -",
    ]
