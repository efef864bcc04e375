"""What happens when a login node, a controller or the broker itself fails, on the real cluster."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from broker.db.engine import make_engine, make_session_factory
from broker.db.migrate import upgrade
from broker.db.models import JobRecord, ProjectRecord
from tests import devcluster
from tests.e2e.live import (
    BrokerProcess,
    Client,
    LiveBroker,
    job_body,
    new_project,
    running,
    seed_users,
    squeue_ids,
    wait_for,
)
from tests.pgdb import throwaway_database

pytestmark = pytest.mark.cluster


def test_stopped_sshd_gives_503_with_retry_after_and_reserves_nothing(broker: LiveBroker) -> None:
    alice = broker.client("alice")
    project = new_project(broker.client("root"), "alice", gpu_hours=10)
    devcluster.ctl("stop-sshd", "beta")
    try:
        refused = alice.http.post("/v1/jobs", json=job_body(project, "beta", seconds=1))
        assert refused.status_code == 503, refused.text
        assert refused.json()["type"] == "cluster-unavailable"
        assert int(refused.headers["Retry-After"]) > 0
        usage = alice.http.get(f"/v1/projects/{project}/usage").json()
        assert usage["reserved_gpu_hours"] == 0.0 and usage["used_gpu_hours"] == 0.0
    finally:
        devcluster.ctl("start-sshd", "beta")
    assert squeue_ids(broker.runtime, "beta", project) == []
    # Back up: the runner reconnects by itself.
    accepted = alice.http.post("/v1/jobs", json=job_body(project, "beta", seconds=1))
    assert accepted.status_code == 201, accepted.text


def _poll_times(client: Client, cluster: str) -> tuple[bool, str | None]:
    data = {c["name"]: c for c in client.http.get("/v1/clusters").json()["data"]}
    return data[cluster]["up"], data[cluster]["last_poll_at"]


def test_stopped_slurmctld_finalises_nothing_and_states_converge(broker: LiveBroker) -> None:
    alice = broker.client("alice")
    project = new_project(broker.client("root"), "alice", gpu_hours=10)
    job = alice.http.post("/v1/jobs", json=job_body(project, "alpha", seconds=15, gpus=2)).json()
    alice.wait_state(job["id"], {"running"}, timeout=60)
    devcluster.ctl("stop-slurmctld", "alpha")
    try:
        wait_for(lambda: not _poll_times(alice, "alpha")[0], timeout=30, what="alpha marked down")
        seen: set[str | None] = set()

        def several_failed_polls() -> bool:
            up, at = _poll_times(alice, "alpha")
            assert not up
            seen.add(at)
            return len(seen) >= 5  # more cycles than missing_polls_before_unknown

        wait_for(several_failed_polls, timeout=60, what="five failed poll cycles")
        during = alice.http.get(f"/v1/jobs/{job['id']}").json()
        assert during["state"] == "running"
        assert during["charged_gpu_hours"] is None
    finally:
        devcluster.ctl("start-slurmctld", "alpha")
    done = alice.wait_state(job["id"], {"completed"}, timeout=120)
    assert done["charged_gpu_hours"] is not None and done["charged_gpu_hours"] > 0
    assert done["reserved_gpu_hours"] == 0.0


@pytest.fixture
def crash_database() -> Iterator[str]:
    with throwaway_database("broker_crash") as url:
        yield url


def test_crash_between_sbatch_and_recording_is_attached_by_tag(crash_database: str) -> None:
    devcluster.cluster_names()
    engine = make_engine(crash_database)
    upgrade(engine)
    sessions = make_session_factory(engine)

    class _Runtime:  # seed_users needs only .sessions
        pass

    holder = _Runtime()
    holder.sessions = sessions  # type: ignore[attr-defined]
    tokens = seed_users(holder)  # type: ignore[arg-type]

    doomed = BrokerProcess(
        crash_database,
        overrides={"poller": {"enabled": False}},
        extra_env={"BROKER_FAILPOINTS": "after_sbatch"},
    ).start()
    admin, alice = Client(doomed.url, tokens["root"]), Client(doomed.url, tokens["alice"])
    project = new_project(admin, "alice", gpu_hours=10)
    with pytest.raises(httpx.HTTPError):
        alice.http.post("/v1/jobs", json=job_body(project, "alpha", seconds=3, gpus=2))
    assert doomed.proc is not None and doomed.proc.wait(timeout=30) == 86

    with sessions() as session:
        (orphan,) = session.scalars(
            select(JobRecord)
            .join(ProjectRecord, ProjectRecord.id == JobRecord.project_id)
            .where(ProjectRecord.name == project)
        ).all()
    assert orphan.state == "submitting" and orphan.slurm_job_id is None
    in_slurm = squeue_ids_direct("alpha", project)
    assert len(in_slurm) == 1  # sbatch did run, once

    with running(BrokerProcess(crash_database)) as restarted:
        alice = Client(restarted.url, tokens["alice"])
        attached = alice.wait_state(orphan.id, {"pending", "running", "completed"}, timeout=60)
        assert attached["slurm_job_id"] == in_slurm[0]
        done = alice.wait_state(orphan.id, {"completed"}, timeout=120)
        usage = alice.http.get(f"/v1/projects/{project}/usage").json()
    assert usage["used_gpu_hours"] == pytest.approx(done["charged_gpu_hours"])
    assert usage["reserved_gpu_hours"] == 0.0
    assert done["charged_gpu_hours"] > 0
    since = datetime.now(UTC) - timedelta(hours=1)
    assert len(accounting_ids("alpha", project, since)) == 1  # exactly one Slurm job, ever
    engine.dispose()


def _client(cluster: str) -> Any:
    from adapters.local import LocalRunner
    from adapters.slurm.client import SlurmClient

    dev = devcluster.cluster(cluster)
    return SlurmClient(LocalRunner(extra_env={"SLURM_CONF": str(dev.slurm_conf)}), cluster=cluster)


def squeue_ids_direct(cluster: str, account: str) -> list[str]:
    result = _client(cluster).runner.run(["squeue", "-h", "-A", account, "-o", "%i"], timeout=30)
    return sorted(result.stdout_text.split())


def accounting_ids(cluster: str, account: str, since: datetime) -> list[str]:
    return [r.job_id for r in _client(cluster).accounting(since, accounts=[account])]
