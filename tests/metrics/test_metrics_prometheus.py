"""A real Prometheus scrapes a broker that ran real jobs on the dev cluster.

The broker runs in-process (uvicorn in a thread, its own SQLite file, the poller on); Debian's
Prometheus server runs on loopback with a 1 s scrape interval and the repository's alert rules.
The test submits jobs through the REST API, waits for them to end, then checks through
Prometheus's HTTP API that the metrics say what happened, and that every PromQL expression of the
dashboard and of the rules evaluates without error.

Needs the dev cluster (deploy/dev-cluster/up.sh) and /usr/bin/prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEV_CONFIG = REPO / ".dev-cluster" / "broker.toml"
RULES = REPO / "deploy" / "prometheus" / "rules" / "broker-alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "broker.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
JOB_DEADLINE = 180.0

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not DEV_CONFIG.is_file(), reason="dev cluster not set up (up.sh)"),
    pytest.mark.skipif(not Path(PROMETHEUS).is_file(), reason="no prometheus binary"),
]

# Grafana's variables, replaced by values any Prometheus accepts.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$cluster": ".*",
    "$project": ".*",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


# --- the broker ---------------------------------------------------------------------------------


@dataclass
class Broker:
    url: str
    runtime: Any
    admin_token: str

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    import uvicorn

    from broker.api.app import create_app
    from broker.config import load_settings
    from broker.db.engine import transaction
    from broker.db.migrate import upgrade
    from broker.runtime import build_runtime
    from broker.schemas import UserCreate
    from broker.service import identity

    database = tmp_path_factory.mktemp("broker") / "broker.db"
    settings = load_settings(DEV_CONFIG, overrides={"database": {"url": f"sqlite:///{database}"}})
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    with transaction(runtime.sessions) as session:
        identity.create_user(session, "test", UserCreate(name="ops", role="admin"))
        admin_token = identity.issue_token(session, "test", "ops", "metrics test").token

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runtime, run_poller=True), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, name="broker-under-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for("the broker to serve", lambda: httpx.get(f"{url}/healthz").status_code == 200, 30)
    try:
        yield Broker(url, runtime, admin_token)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- Prometheus ---------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result

    def scalar(self, expr: str) -> float | None:
        """The single value of an instant vector expression; None when it is empty."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {result}"
        return float(result[0]["value"][1]) if result else None

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}


@pytest.fixture(scope="module")
def prometheus(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    home = tmp_path_factory.mktemp("prometheus")
    broker_port = broker.url.rsplit(":", 1)[1]
    config = home / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n"
        "  - job_name: broker\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{broker_port}']\n"
    )
    port = free_port()
    log = (home / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            "Prometheus to be ready",
            lambda: process.poll() is None and httpx.get(f"{url}/-/ready").status_code == 200,
            30,
        )
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# --- what happened ------------------------------------------------------------------------------


@dataclass
class Scenario:
    project: str
    jobs: dict[str, dict[str, Any]]
    """Final job objects by purpose: completed_alpha, completed_beta, failed."""
    used_gpu_seconds: int
    """The ledger's used GPU-seconds for the project, read from the database."""


SLEEP_SCRIPT = "#!/bin/bash\nsleep 6\n"
FAIL_SCRIPT = "#!/bin/bash\nsleep 4\nexit 3\n"


@pytest.fixture(scope="module")
def scenario(broker: Broker, prometheus: Prometheus) -> Scenario:
    from broker.db.models import ProjectRecord, QuotaRecord
    from broker.service import ledger

    suffix = uuid.uuid4().hex[:6]
    project, researcher = f"metrics-{suffix}", f"metrics-{suffix}-r"
    account = f"metrics{suffix}"
    now = datetime.now(UTC)
    with broker.client(broker.admin_token) as admin:
        for method, path, body in (
            ("POST", "/v1/users", {"name": researcher, "role": "researcher", "unix_user": "alice"}),
            (
                "POST",
                "/v1/projects",
                {"name": project, "slurm_accounts": {"alpha": account, "beta": account}},
            ),
            ("PUT", f"/v1/projects/{project}/members/{researcher}", {"role": "member"}),
            (
                "PUT",
                f"/v1/projects/{project}/quota",
                {
                    "period_start": (now - timedelta(days=1)).isoformat(),
                    "period_end": (now + timedelta(days=30)).isoformat(),
                    "gpu_hours": 100,
                    "gpu_type_weights": {"h100": 1.0, "a100": 0.5},
                },
            ),
        ):
            response = admin.request(method, path, json=body)
            assert response.status_code in (200, 201), (path, response.text)
        token = admin.post(f"/v1/users/{researcher}/tokens", json={"description": "t"}).json()[
            "token"
        ]

    requests = {
        "completed_alpha": {"cluster": "alpha", "gpus": 2, "script": SLEEP_SCRIPT},
        "completed_beta": {"cluster": "beta", "gpus": 1, "script": SLEEP_SCRIPT},
        "failed": {"cluster": "alpha", "gpus": 1, "script": FAIL_SCRIPT},
    }
    with broker.client(token) as client:
        ids = {}
        for purpose, fields in requests.items():
            response = client.post(
                "/v1/jobs",
                json={"project": project, "name": purpose, "time_limit_minutes": 5, **fields},
            )
            assert response.status_code == 201, response.text
            ids[purpose] = response.json()["id"]
        # 8 GPUs for two days is 384 GPU-hours: more than the budget.
        refused = client.post(
            "/v1/jobs",
            json={"project": project, "script": SLEEP_SCRIPT, "cluster": "alpha", "gpus": 8,
                  "time_limit_minutes": 2880},
        )  # fmt: skip
        assert refused.status_code == 409, refused.text
        assert refused.json()["limit"] == "gpu_hours"

        final = {"completed", "failed", "cancelled", "timeout", "out_of_memory", "node_fail",
                 "preempted", "submit_failed", "unknown"}  # fmt: skip

        def all_final() -> dict[str, dict[str, Any]] | None:
            jobs = {p: client.get(f"/v1/jobs/{i}").json() for p, i in ids.items()}
            return jobs if all(j["state"] in final for j in jobs.values()) else None

        jobs = wait_for("the jobs to end", all_final, JOB_DEADLINE, every=1.0)
    assert jobs["completed_alpha"]["state"] == "completed", jobs
    assert jobs["completed_beta"]["state"] == "completed", jobs
    assert jobs["failed"]["state"] == "failed", jobs

    with broker.runtime.sessions() as session:
        record = session.query(ProjectRecord).filter_by(name=project).one()
        snap = ledger.snapshot(session, record.id, session.get(QuotaRecord, record.id))
    assert snap.used_gpu_seconds > 0
    assert snap.reserved_gpu_seconds == 0
    # Prometheus has scraped since the last job was charged.
    wait_for(
        "Prometheus to see the charges",
        lambda: (
            prometheus.scalar(f'broker_project_used_gpu_seconds{{project="{project}"}}')
            == snap.used_gpu_seconds
        ),
        30,
    )
    return Scenario(project, jobs, snap.used_gpu_seconds)


# --- the checks ---------------------------------------------------------------------------------


def test_prometheus_scrapes_the_broker(prometheus: Prometheus, scenario: Scenario) -> None:
    assert prometheus.scalar('up{job="broker"}') == 1
    assert prometheus.scalar('count(broker_build_info{job="broker"})') == 1


def test_gpu_seconds_used_equal_the_ledger(prometheus: Prometheus, scenario: Scenario) -> None:
    project = f'project="{scenario.project}"'
    charged_hours = sum(j["charged_gpu_hours"] for j in scenario.jobs.values())
    assert scenario.used_gpu_seconds == pytest.approx(charged_hours * 3600, abs=1)
    assert prometheus.scalar(f"broker_project_used_gpu_seconds{{{project}}}") == (
        scenario.used_gpu_seconds
    )
    assert prometheus.scalar(f"sum(broker_project_charged_gpu_seconds_total{{{project}}})") == (
        scenario.used_gpu_seconds
    )
    assert prometheus.scalar(f"broker_project_reserved_gpu_seconds{{{project}}}") == 0
    assert prometheus.scalar(f"broker_project_budget_gpu_seconds{{{project}}}") == 100 * 3600
    assert prometheus.scalar(f"broker_project_remaining_gpu_seconds{{{project}}}") == (
        100 * 3600 - scenario.used_gpu_seconds
    )
    # Unweighted GPU-seconds: the beta job's a100 seconds count in full there.
    physical = prometheus.by(
        f"sum by (cluster) (broker_project_gpu_seconds_total{{{project}}})", "cluster"
    )
    assert physical["alpha"] >= 2 * 6 and physical["beta"] >= 6


def test_finished_jobs_are_counted_by_state(prometheus: Prometheus, scenario: Scenario) -> None:
    finished = prometheus.by(
        f'sum by (state) (broker_jobs_finished_total{{project="{scenario.project}"}})', "state"
    )
    assert finished["completed"] == 2
    assert finished["failed"] == 1
    assert sum(finished.values()) == 3
    live = prometheus.scalar(f'sum(broker_jobs{{project="{scenario.project}"}})')
    assert live == 0
    assert (
        prometheus.scalar(f'sum(broker_project_gpus_in_use{{project="{scenario.project}"}})') == 0
    )


def test_submissions_and_latency(prometheus: Prometheus, scenario: Scenario) -> None:
    outcomes = prometheus.by("sum by (outcome) (broker_submissions_total)", "outcome")
    assert outcomes["accepted"] == 3
    assert outcomes["rejected_quota"] == 1
    assert prometheus.scalar('sum(broker_quota_rejections_total{limit="gpu_hours"})') == 1
    assert prometheus.scalar("sum(broker_submit_latency_seconds_count)") == 3
    # Jobs are seen running (6 s of sleep against a 2 s poll), so queue waits were observed.
    assert (prometheus.scalar("sum(broker_job_queue_wait_seconds_count)") or 0) >= 1


def test_capacity_is_the_dev_clusters(prometheus: Prometheus, scenario: Scenario) -> None:
    pool = prometheus.query("sum by (cluster, gpu_type) (broker_cluster_gpus)")
    totals = {(r["metric"]["cluster"], r["metric"]["gpu_type"]): float(r["value"][1]) for r in pool}
    assert totals == {("alpha", "h100"): 32, ("beta", "a100"): 8}
    partitions = prometheus.query("sum by (cluster, partition) (broker_cluster_partition_gpus)")
    by_partition = {
        (r["metric"]["cluster"], r["metric"]["partition"]): float(r["value"][1]) for r in partitions
    }
    assert by_partition[("alpha", "gpu")] == 32
    assert by_partition[("beta", "gpu")] == 8
    assert prometheus.by("broker_cluster_up", "cluster") == {"alpha": 1, "beta": 1}
    age = prometheus.scalar("max(time() - broker_cluster_last_success_timestamp_seconds)")
    assert age is not None and age < 60


def test_adapter_and_ssh_series(prometheus: Prometheus, scenario: Scenario) -> None:
    commands = prometheus.by(
        "sum by (command) (broker_adapter_command_duration_seconds_count)", "command"
    )
    assert commands["sbatch"] == 3
    assert commands["squeue"] >= 1 and commands["sinfo"] >= 1
    opened = prometheus.by("broker_ssh_connections_opened_total", "cluster")
    assert opened["alpha"] >= 1 and opened["beta"] >= 1
    assert (prometheus.scalar("sum(broker_polls_total)") or 0) >= 2


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"{panel['title']} / {target['refId']}", target["expr"]))
    return found


def grafana_to_promql(expr: str) -> str:
    # Longest names first, so $__range is not read as $__rate_interval's prefix.
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    leftover = re.findall(r"\$\w+", expr)
    assert not leftover, f"unknown Grafana variables {leftover} in {expr}"
    return expr


def test_every_dashboard_expression_evaluates(prometheus: Prometheus, scenario: Scenario) -> None:
    empty = []
    for where, expr in dashboard_expressions():
        result = prometheus.query(grafana_to_promql(expr))  # asserts status success
        if not result:
            empty.append(where)
    # These must show something once jobs have run; the others may be empty on a quiet broker.
    must_have_data = {
        "Clusters / A", "GPU pool by state / A", "Pool allocated / A", "Partitions / A",
        "Budget used / A", "Jobs by state / A", "Finished jobs per hour / A",
        "Submit latency (request to Slurm id) / B", "Submissions by outcome / A",
        "Broker processes / A", "Used, reserved and budget (GPU-hours) / A",
    }  # fmt: skip
    assert not must_have_data & set(empty), f"empty panels: {sorted(must_have_data & set(empty))}"
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
            assert match, variable["definition"]
            values = prometheus.api("label/" + match[2] + "/values", **{"match[]": match[1]})
            assert values, variable["name"]


def test_every_rule_evaluates(prometheus: Prometheus, scenario: Scenario) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        ready = rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules)
        return rules if ready else None

    rules = wait_for("every rule to be evaluated", evaluated, 30)
    written = yaml.safe_load(RULES.read_text())
    assert {r["name"] for r in rules} == {
        r["alert"] for g in written["groups"] for r in g["rules"]
    }, "Prometheus loaded other rules than deploy/prometheus/rules/broker-alerts.yml holds"
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        prometheus.query(rule["query"])  # asserts status success
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    # A healthy dev cluster with a fresh project fires nothing.
    assert not firing, firing
