"""Jobs run as their researcher on the real dev cluster, and what a job's script can reach.

Real Slurm through the real login node's sshd and the sudoers rule of deploy/dev-cluster/up.sh, real
PostgreSQL, real HTTP. alice and bob are real Unix users in ``broker-users``; the broker's service
account ``slurmsvc`` acts as them only through ``sudo -n -u``.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from tests import devcluster
from tests.e2e.live import Client, LiveBroker, job_body, new_project, wait_for

pytestmark = pytest.mark.cluster


def run(client: Client, project: str, script: str, *, cluster: str = "alpha") -> dict[str, Any]:
    body = {**job_body(project, cluster, seconds=1), "script": script}
    created = client.http.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job: dict[str, Any] = created.json()
    return job


def output(client: Client, job_id: str, **params: Any) -> dict[str, Any]:
    response = client.http.get(f"/v1/jobs/{job_id}/output", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def whole_output(client: Client, job_id: str) -> str:
    """Follow the job's stdout by offset until ``eof``, as ``broker logs -f`` does."""
    text, offset = "", 0

    def more() -> bool | None:
        nonlocal text, offset
        chunk = output(client, job_id, offset=offset)
        text += chunk["data"]
        offset = chunk["next_offset"]
        return True if chunk["eof"] else None

    wait_for(more, timeout=90, what=f"the output of job {job_id} to end")
    return text


def test_a_job_runs_as_its_researcher_and_shows_its_output(broker: LiveBroker) -> None:
    admin, alice = broker.client("root"), broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=10)
    job = run(alice, project, "#!/bin/bash\nid -un\necho to-stderr >&2\n")
    assert job["unix_user"] == "alice"
    assert whole_output(alice, job["id"]) == "alice\n"
    errors = output(alice, job["id"], stream="stderr")
    assert errors["data"] == "to-stderr\n" and errors["eof"]
    done = alice.http.get(f"/v1/jobs/{job['id']}").json()
    assert done["state"] == "completed"


def test_output_pages_by_offset_while_the_job_runs(broker: LiveBroker) -> None:
    admin, alice = broker.client("root"), broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=10)
    script = "#!/bin/bash\nfor i in 1 2 3 4 5; do echo line-$i; sleep 1; done\n"
    job = run(alice, project, script)

    def started() -> dict[str, Any] | None:
        chunk = output(alice, job["id"], limit=5)
        return chunk if chunk["data"] else None

    first = wait_for(started, timeout=60, what="the first bytes of output")
    assert first["data"] == "line-" and first["next_offset"] == 5
    assert not first["eof"]
    rest = whole_output(alice, job["id"])
    assert rest == "line-1\nline-2\nline-3\nline-4\nline-5\n"
    tail = output(alice, job["id"], offset=5)
    assert tail["data"] == "1\nline-2\nline-3\nline-4\nline-5\n" and tail["eof"]


def test_output_is_invisible_to_other_researchers_and_engineers(broker: LiveBroker) -> None:
    admin, alice = broker.client("root"), broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=10)
    # bob shares the project: he sees the job, but not what alice's job printed.
    assert admin.http.put(f"/v1/projects/{project}/members/bob", json={}).status_code == 200
    job = run(alice, project, "#!/bin/bash\necho alice-secret\n")
    whole_output(alice, job["id"])
    for user in ("bob", "eve"):
        client = broker.client(user)
        for params in ({}, {"stream": "stderr"}, {"offset": 0, "limit": 1}):
            refused = client.http.get(f"/v1/jobs/{job['id']}/output", params=params)
            assert refused.status_code == 404, refused.text
            assert "alice-secret" not in refused.text


def test_a_job_cannot_submit_into_another_projects_account(broker: LiveBroker) -> None:
    admin, alice = broker.client("root"), broker.client("alice")
    own = new_project(admin, "alice", gpu_hours=10)
    other = new_project(admin, "bob", gpu_hours=10)
    # bob's project account exists with bob's association once bob is a member (new_project).
    script = (
        "#!/bin/bash\n"
        f"sbatch --parsable -A {other} --gres=gpu:h100:8 --wrap 'sleep 60' 2>&1\n"
        "echo rc=$?\n"
    )
    job = run(alice, own, script)
    text = whole_output(alice, job["id"])
    assert "Invalid account" in text and "rc=1" in text, text
    usage = admin.http.get(f"/v1/projects/{other}/usage").json()
    assert usage["used_gpu_hours"] == 0.0 and usage["reserved_gpu_hours"] == 0.0


def test_a_job_cannot_cancel_another_projects_job(broker: LiveBroker) -> None:
    admin, alice, bob = broker.client("root"), broker.client("alice"), broker.client("bob")
    victim_project = new_project(admin, "bob", gpu_hours=10)
    victim = bob.http.post("/v1/jobs", json=job_body(victim_project, "alpha", seconds=8)).json()
    bob.wait_state(victim["id"], {"running"}, timeout=60)
    attacker_project = new_project(admin, "alice", gpu_hours=10)
    script = (
        f"#!/bin/bash\nscancel {victim['slurm_job_id']} 2>&1; echo rc=$?\n"
        f"scontrol update jobid={victim['slurm_job_id']} timelimit=1 2>&1; echo rc=$?\n"
    )
    attack = run(alice, attacker_project, script)
    text = whole_output(alice, attack["id"])
    assert "rc=0" not in text, text
    done = bob.wait_state(victim["id"], {"completed", "cancelled", "failed"}, timeout=90)
    assert done["state"] == "completed", done


def test_a_job_submitted_around_the_broker_is_cancelled_charged_and_audited(
    broker: LiveBroker,
) -> None:
    """sbatch from inside a job into its own project's account: Slurm takes it (alice has that
    association); the broker's next cycle cancels it, audits it and charges what it used."""
    admin, alice = broker.client("root"), broker.client("alice")
    project = new_project(admin, "alice", gpu_hours=10)
    script = (
        "#!/bin/bash\n"
        f"sbatch --parsable -A {project} --gres=gpu:h100:2 --time=5 --wrap 'sleep 120'\n"
    )
    job = run(alice, project, script)
    foreign_id = whole_output(alice, job["id"]).strip()
    assert foreign_id.isdigit(), foreign_id

    def audited() -> dict[str, Any] | None:
        entries = admin.http.get("/v1/audit", params={"limit": 100}).json()["data"]
        return next((e for e in entries if e["target"] == f"alpha/{foreign_id}"), None)

    entry = wait_for(audited, timeout=30, what=f"foreign job {foreign_id} in the audit")
    assert entry["action"] == "foreign_job.cancel"
    assert entry["details"]["project"] == project and entry["details"]["unix_user"] == "alice"

    dev = devcluster.cluster("alpha")

    def accounted() -> tuple[str, int, int] | None:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", foreign_id, "-o", "State,ElapsedRaw,AllocTRES,End"],
            env={**os.environ, "SLURM_CONF": str(dev.slurm_conf)},
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        state, elapsed, tres, end = [*out.split("|"), "", "", "", ""][:4]
        if not state.startswith("CANCELLED") or end in ("", "Unknown"):
            return None
        gpus = sum(int(p.split("=")[1]) for p in tres.split(",") if p.startswith("gres/gpu="))
        return state, int(elapsed), gpus

    _, elapsed, gpus = wait_for(accounted, timeout=60, what="sacct to show it cancelled")
    assert elapsed < 60  # cancelled within a cycle or two, not left to run its 120 s

    def charged() -> dict[str, Any] | None:
        usage: dict[str, Any] = admin.http.get(f"/v1/projects/{project}/usage").json()
        expected = gpus * elapsed / 3600  # h100 weight 1.0
        return usage if abs(usage["foreign_gpu_hours"] - expected) < 1e-6 else None

    usage = wait_for(charged, timeout=60, what="the foreign job's charge in the project's usage")
    assert usage["used_gpu_hours"] >= usage["foreign_gpu_hours"]
    # The broker's own job was never taken for a foreign one.
    entries = admin.http.get("/v1/audit", params={"limit": 100}).json()["data"]
    assert f"alpha/{job['slurm_job_id']}" not in {e["target"] for e in entries}
