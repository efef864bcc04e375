"""Migration ``ledger_totals`` fills the ledger's totals from the job rows already there."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, update
from typer.testing import CliRunner

from broker.cli import app
from broker.db.engine import make_engine, make_session_factory, transaction
from broker.db.migrate import upgrade
from broker.db.models import (
    ForeignJobRecord,
    JobRecord,
    ProjectRecord,
    QuotaRecord,
    UserRecord,
)
from broker.schemas import JobCreate
from broker.service import ledger
from quotas import charged_within
from tests.broker.harness import build_env

NOW = datetime.now(UTC).replace(microsecond=0)
PERIOD_START = NOW - timedelta(days=1)
HOUR = timedelta(hours=1)


def _job(state: str, **values: Any) -> dict[str, Any]:
    job_id = str(uuid.uuid4())
    row: dict[str, Any] = {
        "id": job_id,
        "tag": f"brk-{job_id}",
        "project_id": 1,
        "user_id": 1,
        "name": "job",
        "cluster": "alpha",
        "partition": "gpu",
        "gpu_type": "h100",
        "account": "climate",
        "gpus": 2,
        "nodes": 1,
        "time_limit_minutes": 600,
        "script_sha256": "0" * 64,
        "state": state,
        "submitted_at": NOW - 30 * HOUR,
        "updated_at": NOW,
        "weight": 1.0,
        "reservation_gpu_seconds": 2 * 600 * 60,
        "reserved_gpu_seconds": 0,
        "missing_polls": 0,
        "request_sha256": "0" * 64,
    }
    row.update(values)
    return row


def test_the_backfill_gives_what_the_rows_give(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade(engine, "perfapi_token_expiry")
    sessions = make_session_factory(engine)
    straddler = (7200, PERIOD_START - 2 * HOUR, PERIOD_START + 2 * HOUR)
    with transaction(sessions) as session:
        session.execute(
            insert(UserRecord).values(id=1, name="alice", role="researcher", created_at=NOW)
        )
        session.execute(
            insert(ProjectRecord).values(
                id=1,
                name="climate",
                description="",
                slurm_accounts={"alpha": "climate"},
                created_at=NOW,
                ledger_version=0,
            )
        )
        session.execute(
            insert(QuotaRecord).values(
                project_id=1,
                period_start=PERIOD_START,
                period_end=NOW + 100 * HOUR,
                budget_gpu_seconds=10**9,
                gpu_type_weights={},
                max_concurrent_gpus_per_cluster={},
                updated_at=NOW,
            )
        )
        charge, started, ended = straddler
        session.execute(
            insert(JobRecord),
            [
                # Ran inside the period, across its start, and wholly before it.
                _job(
                    "completed",
                    charged_gpu_seconds=3600,
                    started_at=NOW - 3 * HOUR,
                    ended_at=NOW - 2 * HOUR,
                    alloc_gpus=1,
                    elapsed_s=3600,
                ),
                _job(
                    "failed",
                    charged_gpu_seconds=charge,
                    started_at=started,
                    ended_at=ended,
                    alloc_gpus=1,
                    elapsed_s=7200,
                ),
                _job(
                    "completed",
                    charged_gpu_seconds=500,
                    started_at=PERIOD_START - 5 * HOUR,
                    ended_at=PERIOD_START - 4 * HOUR,
                    alloc_gpus=1,
                    elapsed_s=500,
                ),
                # Live: holds its reservation; one on another cluster.
                _job("running", reserved_gpu_seconds=72000, started_at=NOW - HOUR),
                _job("pending", reserved_gpu_seconds=36000, cluster="beta", gpu_type="a100"),
                # Queued: holds its reservation, no GPUs against the limits yet.
                _job("queued", reserved_gpu_seconds=9000),
                # An array of 2-GPU tasks, 3 at a time: 6 GPUs against the limits.
                _job("running", reserved_gpu_seconds=8 * 7200, array_size=8, array_max_parallel=3),
            ],
        )
        session.execute(
            insert(ForeignJobRecord),
            [
                {
                    "cluster": "alpha",
                    "slurm_job_id": str(n),
                    "project_id": 1,
                    "account": "climate",
                    "action": "charge",
                    "slurm_state": "COMPLETED",
                    "seen_at": NOW,
                    "ended_at": at,
                    "missing_polls": 0,
                    "charged_gpu_seconds": 100,
                }
                for n, at in ((1, NOW - HOUR), (2, PERIOD_START - HOUR))
            ],
        )
    upgrade(engine)
    with sessions() as session:
        assert ledger.check(session) == []
        kept = ledger.stored(session)
        quota = session.get_one(QuotaRecord, 1)
        snap = ledger.snapshot(session, 1, quota)
    engine.dispose()
    part = charged_within(charge, started, ended, PERIOD_START, None)
    assert 0 < part < charge
    assert kept.used == {(1, "alpha", "h100", 1): 3600 + part, (1, "alpha", "", 0): 100}
    # alpha: the running job (2 GPUs), the array (2 x 3 at once), the queued job (none yet)
    assert kept.live == {(1, "alpha"): (72000 + 9000 + 57600, 2 + 6), (1, "beta"): (36000, 2)}
    assert kept.groups[(1, "alpha", "h100", "completed")] == (2, 4, 4100, 4100)
    # Live jobs are counted by group too (jobs and GPUs; their charges are read from the rows).
    assert kept.groups[(1, "alpha", "h100", "running")] == (2, 4, 0, 0)
    assert kept.groups[(1, "beta", "a100", "pending")] == (1, 2, 0, 0)
    assert kept.groups[(1, "alpha", "h100", "queued")] == (1, 2, 0, 0)
    assert snap.used_gpu_seconds == 3600 + part + 100
    assert snap.reserved_gpu_seconds == 108000 + 9000 + 57600
    assert snap.live_gpus_by_cluster == {"alpha": 8, "beta": 2}
    assert snap.pending_jobs == 1  # the queued job waits for this limit: not counted


CONFIG = """
[database]
url = "{url}"

[clusters.alpha]
host = "login.alpha.example.org"
user = "svc-broker"
private_key = "/etc/broker/ssh/id_ed25519"
known_hosts = "/etc/broker/ssh/known_hosts"
default_partition = "gpu"

[clusters.alpha.partitions.gpu]
gpu_type = "h100"
"""


def test_broker_ledger_check_finds_a_row_changed_behind_its_back_and_rebuild_mends_it(
    database_url: str, tmp_path: Path
) -> None:
    env = build_env(database_url)
    try:
        job = env.runtime.jobs.submit(
            env.alice,
            JobCreate.model_validate(
                {"project": "climate", "script": "#!/bin/sh\n", "cluster": "alpha"}
                | {"gpus": 2, "time_limit_minutes": 60}
            ),
            None,
        ).job
        env.slurm["alpha"].finish(job.slurm_job_id or "", "COMPLETED", elapsed_s=600)
        env.runtime.poller.poll("alpha")
        config = tmp_path / "config.toml"
        config.write_text(CONFIG.format(url=database_url))
        cli = CliRunner()
        ok = cli.invoke(app, ["ledger", "check", "--config", str(config)])
        assert ok.exit_code == 0, ok.output
        with transaction(env.runtime.sessions) as session:  # an edit by hand, in SQL
            session.execute(
                update(JobRecord).where(JobRecord.id == job.id).values(charged_gpu_seconds=1)
            )
        found = cli.invoke(app, ["ledger", "check", "--config", str(config)])
        assert found.exit_code == 1
        assert "used (" in found.output and "kept 1200, rows give 1" in found.output
        mended = cli.invoke(app, ["ledger", "rebuild", "--config", str(config)])
        assert mended.exit_code == 0, mended.output
        assert cli.invoke(app, ["ledger", "check", "--config", str(config)]).exit_code == 0
        with env.runtime.sessions() as session:
            quota = session.get_one(QuotaRecord, 1)
            assert ledger.snapshot(session, 1, quota).used_gpu_seconds == 1
    finally:
        env.runtime.close()
