"""Ledger moves: reserve on admission, start, settle the charge, release a job that never ran."""

from __future__ import annotations

import pytest

from quotas import (
    Decision,
    JobRequest,
    LedgerSnapshot,
    LimitName,
    Violation,
    release,
    reserve,
    settle,
    start,
)

EMPTY = LedgerSnapshot(used_gpu_seconds=0, reserved_gpu_seconds=0)
JOB = JobRequest(cluster="alpha", partition="gpu", gpu_type="h100", gpus=4, time_limit_minutes=60)


def test_reserve_seconds_adds_to_reserved_only() -> None:
    ledger = reserve(LedgerSnapshot(used_gpu_seconds=7, reserved_gpu_seconds=3), 100)

    assert ledger == LedgerSnapshot(used_gpu_seconds=7, reserved_gpu_seconds=103)


def test_reserve_an_admitted_decision_with_its_job_counts_gpus_and_queue_place() -> None:
    decision = Decision(admitted=True, reserve_gpu_seconds=14400)

    ledger = reserve(EMPTY, decision, JOB)

    assert ledger == LedgerSnapshot(
        used_gpu_seconds=0,
        reserved_gpu_seconds=14400,
        live_gpus=4,
        live_gpus_by_cluster={"alpha": 4},
        pending_jobs=1,
    )


def test_reserve_refuses_a_refused_decision() -> None:
    refused = Decision(
        admitted=False,
        reserve_gpu_seconds=0,
        violations=(Violation(LimitName.GPUS_PER_JOB, requested=9, allowed=8),),
    )

    with pytest.raises(ValueError, match="refused"):
        reserve(EMPTY, refused)


def test_reserve_refuses_negative_seconds() -> None:
    with pytest.raises(ValueError, match="negative"):
        reserve(EMPTY, -1)


def test_a_job_that_runs_and_ends_moves_its_reservation_to_its_charge() -> None:
    ledger = start(reserve(EMPTY, 14400, JOB))
    assert ledger.pending_jobs == 0
    assert ledger.live_gpus == 4

    ledger = settle(ledger, 14400, 9000, JOB)

    assert ledger == LedgerSnapshot(used_gpu_seconds=9000, reserved_gpu_seconds=0)


def test_settle_adds_a_charge_above_the_reservation_in_full() -> None:
    ledger = settle(LedgerSnapshot(used_gpu_seconds=0, reserved_gpu_seconds=100), 100, 130)

    assert ledger == LedgerSnapshot(used_gpu_seconds=130, reserved_gpu_seconds=0)


def test_settle_more_than_is_reserved_is_an_error() -> None:
    ledger = LedgerSnapshot(used_gpu_seconds=0, reserved_gpu_seconds=100)

    with pytest.raises(ValueError, match="only 100 are reserved"):
        settle(ledger, 101, 0)


@pytest.mark.parametrize(("reserved", "charge"), [(-1, 0), (0, -1)])
def test_settle_refuses_negative_amounts(reserved: int, charge: int) -> None:
    ledger = LedgerSnapshot(used_gpu_seconds=50, reserved_gpu_seconds=50)

    with pytest.raises(ValueError, match="negative"):
        settle(ledger, reserved, charge)


def test_settle_cannot_free_gpus_that_are_not_live() -> None:
    ledger = LedgerSnapshot(
        used_gpu_seconds=0,
        reserved_gpu_seconds=100,
        live_gpus=4,
        live_gpus_by_cluster={"beta": 4},
    )

    with pytest.raises(ValueError, match="GPUs"):
        settle(ledger, 100, 0, JOB)


def test_release_frees_a_job_that_never_ran_without_charge() -> None:
    before = LedgerSnapshot(used_gpu_seconds=500, reserved_gpu_seconds=0)

    after = release(reserve(before, 14400, JOB), 14400, JOB)

    assert after == before


def test_start_without_a_pending_job_is_an_error() -> None:
    with pytest.raises(ValueError, match="pending"):
        start(EMPTY)


def test_other_clusters_keep_their_live_gpus() -> None:
    beta = JobRequest(
        cluster="beta", partition="gpu", gpu_type="a100", gpus=2, time_limit_minutes=5
    )
    ledger = reserve(reserve(EMPTY, 10, JOB), 20, beta)

    ledger = release(ledger, 10, JOB)

    assert ledger.live_gpus == 2
    assert ledger.live_gpus_by_cluster == {"beta": 2}
    assert ledger.pending_jobs == 1
    assert ledger.reserved_gpu_seconds == 20
