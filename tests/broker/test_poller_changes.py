"""A poll cycle loads and writes only the jobs whose Slurm status changed; after a lapse of its
lease (or a restart) the poller reads and applies every followed job again."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import event

from broker.db.models import JobRecord
from broker.scheduler import LEASE_NAME
from broker.schemas import JobCreate
from broker.service import lease
from broker.service.job_reads import JobFilter
from tests.broker.harness import Env, build_env


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url)
    yield environment
    environment.runtime.close()


class Loads:
    """Job rows the ORM loaded and UPDATE statements on ``jobs``, while listening."""

    def __init__(self, env: Env) -> None:
        self.rows = 0
        self.updates = 0
        event.listen(JobRecord, "load", self._loaded)
        event.listen(env.runtime.engine, "before_cursor_execute", self._statement)
        self._engine = env.runtime.engine

    def _loaded(self, target: JobRecord, context: object) -> None:
        self.rows += 1

    def _statement(self, conn: object, cursor: object, sql: str, *args: object) -> None:
        if sql.lstrip().upper().startswith("UPDATE JOBS"):
            self.updates += 1

    def take(self) -> tuple[int, int]:
        taken = (self.rows, self.updates)
        self.rows = self.updates = 0
        return taken

    def close(self) -> None:
        event.remove(JobRecord, "load", self._loaded)
        event.remove(self._engine, "before_cursor_execute", self._statement)


def _submit(env: Env, count: int) -> list[str]:
    body = JobCreate.model_validate(
        {"project": "climate", "script": "#!/bin/sh\n", "cluster": "alpha"}
        | {"gpus": 1, "time_limit_minutes": 10}
    )
    return [
        env.runtime.jobs.submit(env.alice, body, None).job.slurm_job_id or "" for _ in range(count)
    ]


def test_a_quiet_queue_costs_no_job_rows_and_a_change_costs_one(env: Env) -> None:
    slurm_ids = _submit(env, 5)
    poller, fake = env.runtime.poller, env.slurm["alpha"]
    loads = Loads(env)
    try:
        first = poller.poll("alpha")
        assert first.ok and first.followed == 5
        assert loads.take() == (5, 5)  # the first cycle reads and applies every job (reasons)
        assert poller.poll("alpha").followed == 5
        assert loads.take() == (0, 0)  # nothing changed: no job row loaded or written
        fake.start(slurm_ids[2])
        started = poller.poll("alpha")
        assert len(started.started) == 1
        assert loads.take() == (1, 1)
        fake.jobs[slurm_ids[3]].reason = "Resources"
        poller.poll("alpha")
        assert loads.take() == (1, 1)
        fake.finish(slurm_ids[2], "COMPLETED", elapsed_s=60)
        settled = poller.poll("alpha")
        assert settled.settled == {"completed": 1}
        assert settled.followed == 5
        assert loads.take() == (1, 1)
        assert poller.poll("alpha").followed == 4
        assert loads.take() == (0, 0)
    finally:
        loads.close()


def test_jobs_missing_from_slurm_are_counted_every_cycle(env: Env) -> None:
    (slurm_id,) = _submit(env, 1)
    poller, fake = env.runtime.poller, env.slurm["alpha"]
    poller.poll("alpha")
    fake.jobs[slurm_id].in_squeue = fake.jobs[slurm_id].in_sacct = False
    threshold = env.runtime.settings.poller.missing_polls_before_unknown
    for _ in range(threshold - 1):
        assert poller.poll("alpha").settled == {}
    assert poller.poll("alpha").settled == {"unknown": 1}


def test_after_a_lapsed_lease_every_job_is_read_again(env: Env) -> None:
    _submit(env, 3)
    poller, sessions = env.runtime.poller, env.runtime.sessions
    assert lease.acquire(sessions, LEASE_NAME, "me", 30)
    fence = lease.Fence(sessions, LEASE_NAME, "me", 30)
    loads = Loads(env)
    try:
        assert poller.poll("alpha", fence).ok
        assert loads.take()[0] == 3
        assert poller.poll("alpha", fence).ok
        assert loads.take()[0] == 0
        # A cycle under a short lease, then a pause longer than it: another process may have
        # taken the lease and polled meanwhile, so nothing remembered is trusted any more.
        short = lease.Fence(sessions, LEASE_NAME, "me", 0.5)
        poller.poll("alpha", short)
        time.sleep(0.6)
        assert lease.acquire(sessions, LEASE_NAME, "me", 30)
        loads.take()
        assert poller.poll("alpha", fence).ok
        assert loads.take()[0] == 3
    finally:
        loads.close()


def test_a_job_seen_again_after_a_missing_poll_has_its_count_reset(env: Env) -> None:
    (slurm_id,) = _submit(env, 1)
    poller, fake = env.runtime.poller, env.slurm["alpha"]
    threshold = env.runtime.settings.poller.missing_polls_before_unknown
    poller.poll("alpha")
    for _ in range(3):  # missing for one cycle less than the threshold, then back: not lost
        fake.jobs[slurm_id].in_squeue = fake.jobs[slurm_id].in_sacct = False
        for _ in range(threshold - 1):
            assert poller.poll("alpha").settled == {}
        fake.jobs[slurm_id].in_squeue = fake.jobs[slurm_id].in_sacct = True
        assert poller.poll("alpha").settled == {}
    (job,) = env.runtime.jobs.list(env.alice, JobFilter(project="climate"), 10, None).data
    assert job.state == "pending"
