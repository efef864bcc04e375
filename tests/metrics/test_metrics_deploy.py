"""The monitoring and deployment files are valid: promtool checks and unit-tests the rules, the
dashboard is well-formed, the compose file and the provisioning files parse, systemd accepts the
units. (Evaluating every expression against a real Prometheus is test_metrics_prometheus.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "broker-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "broker-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "provisioning" / "dashboards" / "broker.json"
COMPOSE = DEPLOY / "container" / "compose.yaml"
UNITS = DEPLOY / "systemd"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool")


def run(argv: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = run(["promtool", "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    written = sum(len(group["rules"]) for group in load_yaml(RULES)["groups"])
    assert f"SUCCESS: {written} rules found" in result.stdout


@needs_promtool
def test_the_alert_unit_tests_pass() -> None:
    result = run(["promtool", "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_every_alert_has_a_unit_test() -> None:
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
    tested = set(re.findall(r"alertname: (\w+)$", RULE_TESTS.read_text(), re.MULTILINE))
    assert alerts == tested
    fired = re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", RULE_TESTS.read_text())
    assert set(fired) == alerts, "each alert is shown firing at least once"


@needs_promtool
def test_promtool_accepts_the_prometheus_config() -> None:
    result = run(["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "aifactory-broker"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in (
        "GPU pool by state", "GPUs in use by project", "Budget used", "Time to exhaustion",
        "Queue wait (submit to start)", "Submit latency (request to Slurm id)",
        "Adapter errors by kind", "Clusters",
    ):  # fmt: skip
        assert wanted in titles
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "cluster", "project"}


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    provider = load_yaml(DASHBOARD.with_name("broker.yaml"))["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/provisioning/dashboards"
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    assert datasource["datasources"][0]["type"] == "prometheus"


def test_the_compose_file_parses_and_mounts_files_that_exist() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"broker-api", "broker-worker", "postgres", "prometheus", "grafana"} <= set(services)
    assert services["broker-api"]["command"][0] == "serve"
    assert "--no-poller" in services["broker-api"]["command"]
    assert services["broker-worker"]["command"][0] == "worker"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            # Repository files must exist; ./broker.toml and ./ssh are the site's own.
            if source.startswith("../"):
                assert (COMPOSE.parent / source).exists(), (name, volume)
    build = services["broker-api"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()


def test_the_compose_example_config_is_a_valid_broker_config() -> None:
    from broker.config import load_settings

    # The compose file gives the database URL through BROKER_DATABASE__URL.
    database = {"url": "postgresql+psycopg://broker:x@postgres/broker"}
    settings = load_settings(COMPOSE.with_name("broker.example.toml"), {"database": database})
    assert settings.clusters["alpha"].transport == "ssh"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    broker = shutil.which("broker") or str(REPO / ".venv" / "bin" / "broker")
    if not Path(broker).is_file():
        pytest.skip("the broker command is not installed")
    # verify wants ExecStart's binary to exist: point the units at this checkout's.
    for unit in UNITS.glob("*.service"):
        text = unit.read_text().replace("/opt/broker/venv/bin/broker", broker)
        name = unit.name.replace("@.service", "@8080.service")
        (tmp_path / name).write_text(text)
        if "@" in name:
            (tmp_path / unit.name).write_text(text)
    units = sorted(p.name for p in tmp_path.glob("*.service") if not p.name.endswith("@.service"))
    assert units == ["broker-api@8080.service", "broker-worker.service"]
    result = run(["systemd-analyze", "verify", *units], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    api = (UNITS / "broker-api@.service").read_text()
    assert re.search(r"^ExecStart=\S+ serve --no-poller ", api, re.MULTILINE)
    worker = (UNITS / "broker-worker.service").read_text()
    assert re.search(r"^ExecStart=\S+ worker ", worker, re.MULTILINE)
