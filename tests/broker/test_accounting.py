"""Which Slurm record is a job's final account: one rule for whole jobs and array tasks."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from adapters.slurm.types import JobStatus
from broker.clock import utcnow
from broker.db.engine import transaction
from broker.db.models import JobRecord
from broker.schemas import JobCreate
from broker.service import arrays
from broker.service.accounting import accounted_elapsed, charged_gpus
from tests.broker.harness import Env, build_env

END = utcnow()
START = END - timedelta(seconds=30)


def record(state: str, **fields: object) -> JobStatus:
    values: dict[str, object] = {
        "job_id": "7",
        "state": state,
        "source": "sacct",
        "alloc_gpus": 2,
        "elapsed_s": 30,
        "start_time": START,
        "end_time": END,
    }
    values.update(fields)
    return JobStatus(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (record("COMPLETED"), 30),
        (record("COMPLETED", elapsed_s=None), 30),  # from start and end
        (record("COMPLETED", source="squeue"), None),  # squeue's view is not an account
        (record("COMPLETED", end_time=None), None),  # End=Unknown after a slurmdbd restart
        (record("COMPLETED", alloc_gpus=0), None),  # the end arrived before the allocation
        (record("FAILED", alloc_gpus=0, elapsed_s=0), None),  # it ran, even if for no time
        (record("CANCELLED", alloc_gpus=0, elapsed_s=5), None),  # it ran for 5 s
        (record("CANCELLED", alloc_gpus=0, elapsed_s=0, start_time=None), 0),  # never ran
        (record("CANCELLED", alloc_gpus=0, elapsed_s=0, start_time=END), 0),
    ],
)
def test_a_record_is_an_account_only_when_it_knows_the_end_and_the_gpus(
    status: JobStatus, expected: int | None
) -> None:
    assert accounted_elapsed(status) == expected


@pytest.mark.parametrize(
    ("alloc", "elapsed", "expected"),
    [
        (4, 30, 4),  # the record's allocation, even below the request
        (None, 30, 8),  # a record without an allocation stands for the request
        (0, 30, 8),  # it ran and the allocation never arrived: the broker gave up waiting
        (0, 0, 0),  # it never ran: it held no GPUs
        (None, 0, 8),
    ],
)
def test_the_gpus_charged_are_the_allocation_or_what_was_asked(
    alloc: int | None, elapsed: int, expected: int
) -> None:
    assert charged_gpus(alloc, 8, elapsed) == expected


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url, gpu_hours=100.0)
    yield environment
    environment.runtime.close()


def test_an_array_task_waits_for_the_gpus_in_its_record_too(env: Env) -> None:
    """The same rule holds per task: a task whose record has its end and no GPUs yet is not
    settled (it would be charged nothing); once the allocation is in, it is charged from it."""
    body = {
        "project": "climate",
        "script": "#!/bin/bash\nsrun python train.py\n",
        "gpus": 2,
        "time_limit_minutes": 60,
        "cluster": "alpha",
    }
    submitted = env.runtime.jobs.submit(env.alice, JobCreate.model_validate(body), None).job
    with transaction(env.runtime.sessions) as session:
        row = session.get_one(JobRecord, submitted.id)
        row.array_size = 1  # followed as a one-task array: only arrays.follow is under test here

        def task(**fields: object) -> JobStatus:
            return record("COMPLETED", job_id="8", array_job_id="7", array_task=0, **fields)

        early = arrays.follow(session, row, {0: task(alloc_gpus=0)})
        assert early.final is None  # not settled: nothing charged yet

        full = arrays.follow(session, row, {0: task()})
        assert full.final is not None and full.final.value == "completed"
        assert full.charge_gpu_seconds == 2 * 30 * row.weight


def test_a_job_cancelled_before_it_ran_is_recorded_with_no_gpus(env: Env) -> None:
    """The job's account (what usage and the ledger totals are built from) says what Slurm
    says: a job cancelled while it waited held no GPUs and is charged nothing."""
    body = {
        "project": "climate",
        "script": "#!/bin/bash\nsleep 60\n",
        "gpus": 2,
        "time_limit_minutes": 60,
        "cluster": "alpha",
    }
    submitted = env.runtime.jobs.submit(env.alice, JobCreate.model_validate(body), None).job
    slurm_id = submitted.slurm_job_id or ""
    env.slurm["alpha"].finish(slurm_id, "CANCELLED", elapsed_s=0, alloc_gpus=0)
    env.runtime.poller.poll("alpha")
    assert env.runtime.jobs.get(env.alice, submitted.id).state == "cancelled"
    with transaction(env.runtime.sessions) as session:
        row = session.get_one(JobRecord, submitted.id)
        assert (row.alloc_gpus, row.elapsed_s, row.charged_gpu_seconds) == (0, 0, 0)
