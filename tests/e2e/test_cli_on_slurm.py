"""The ``broker`` command as a researcher uses it, against a live broker and the dev cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.live import LiveBroker, new_project

pytestmark = pytest.mark.cluster
BROKER = str(Path(sys.executable).with_name("broker"))
REPO = Path(__file__).resolve().parents[2]


def cli(broker: LiveBroker, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "BROKER_URL": broker.url,
        "BROKER_TOKEN": broker.tokens[user],
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),  # this checkout's code, whichever one the venv was made from
    }
    return subprocess.run(
        [BROKER, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_submit_follow_and_account_from_the_command_line(broker: LiveBroker, tmp_path: Any) -> None:
    project = new_project(broker.client("root"), "alice", gpu_hours=2)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsleep 2\n")
    done = cli(
        broker,
        "alice",
        "submit",
        str(script),
        "--project",
        project,
        "--cluster",
        "beta",
        "--gpus",
        "2",
        "--time",
        "10",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["slurm_job_id"] and job["state"] in {"pending", "running"}

    broker.client("alice").wait_state(job["id"], {"completed"}, timeout=90)
    shown = cli(broker, "alice", "job", job["id"])
    assert shown.returncode == 0 and "completed" in shown.stdout
    usage = json.loads(cli(broker, "alice", "usage", project, "--json").stdout)
    assert usage["used_gpu_hours"] > 0 and usage["reserved_gpu_hours"] == 0.0

    too_big = cli(
        broker,
        "alice",
        "submit",
        str(script),
        "--project",
        project,
        "--cluster",
        "alpha",
        "--gpus",
        "8",
        "--time",
        "60",
    )
    assert too_big.returncode == 4  # refused by quota
    assert "gpu_hours" in too_big.stderr
    assert cli(broker, "bob", "job", job["id"]).returncode == 3  # invisible: not found
    assert cli(broker, "eve", "cancel", job["id"]).returncode == 6  # engineers cannot write


def test_submit_wait_follow_and_logs(broker: LiveBroker, tmp_path: Any) -> None:
    project = new_project(broker.client("root"), "alice", gpu_hours=2)
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\nfor i in 1 2 3; do echo step-$i; sleep 1; done\necho oops >&2\n"
    )
    base = ("--project", project, "--cluster", "alpha", "--gpus", "1", "--time", "5")
    followed = cli(broker, "alice", "submit", str(script), *base, "--follow")
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == "step-1\nstep-2\nstep-3\n"  # the job's own output, as it ran
    assert "completed" in followed.stderr

    failing = tmp_path / "fails.sh"
    failing.write_text("#!/bin/bash\necho about to fail\nexit 3\n")
    waited = cli(broker, "alice", "submit", str(failing), *base, "--wait", "--json")
    assert waited.returncode == 3, waited.stderr  # the job's own exit code
    job = json.loads(waited.stdout)
    assert job["state"] == "failed" and job["exit_code"] == 3

    logs = cli(broker, "alice", "logs", job["id"], "-f")
    assert logs.returncode == 0 and logs.stdout == "about to fail\n"
    first = json.loads(cli(broker, "alice", "logs", job["id"], "--json").stdout)
    assert first["eof"] and first["data"] == "about to fail\n"
    assert cli(broker, "alice", "logs", job["id"], "--stderr").stdout == ""
    assert cli(broker, "bob", "logs", job["id"]).returncode == 3  # not his: not found


def test_a_sweep_from_the_command_line_and_one_tasks_output(
    broker: LiveBroker, tmp_path: Any
) -> None:
    project = new_project(broker.client("root"), "alice", gpu_hours=2)
    script = tmp_path / "sweep.sh"
    script.write_text('#!/bin/sh\necho "lr index $SLURM_ARRAY_TASK_ID"\n')
    base = ["submit", str(script), "--project", project, "--cluster", "beta", "--gpus", "1"]
    done = cli(broker, "alice", *base, "--time", "5", "--array", "4%2", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["state"] == "completed" and job["array"] == {"size": 4, "max_parallel": 2}
    assert job["tasks"]["completed"] == 4

    listed = cli(broker, "alice", "tasks", job["id"])
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("completed") == 4
    output = cli(broker, "alice", "logs", job["id"], "--task", "3")
    assert output.returncode == 0, output.stderr
    assert output.stdout == "lr index 3\n"

    bad = cli(broker, "alice", *base, "--time", "5", "--array", "4%x")
    assert bad.returncode == 2 and "N%K" in bad.stderr  # a usage error, nothing sent


def test_an_admin_holds_and_releases_a_projects_queue_from_the_command_line(
    broker: LiveBroker, tmp_path: Any
) -> None:
    project = new_project(broker.client("root"), "alice", gpu_hours=2)
    held = cli(broker, "root", "project", "hold", project)
    assert held.returncode == 0, held.stderr
    assert "held; 0 jobs" in held.stdout
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    base = ["submit", str(script), "--project", project, "--cluster", "beta", "--gpus", "1"]
    submitted = cli(broker, "alice", *base, "--time", "5", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["state"] == "queued" and job["queue"]["reason"] == "project_held"
    assert (
        "held; 1 jobs (1 GPUs) queued" in cli(broker, "alice", "project", "queue", project).stdout
    )
    assert cli(broker, "alice", "project", "release", project).returncode == 6  # admins only
    released = cli(broker, "root", "project", "release", project)
    assert released.returncode == 0 and "open" in released.stdout
    done = broker.client("alice").wait_state(job["id"], {"completed"}, timeout=90)
    assert done["slurm_job_id"]
