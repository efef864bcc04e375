"""The job lifecycle's one home: states, order, sets, allowed moves, Slurm's codes (pure)."""

from __future__ import annotations

import logging

import pytest

from adapters.slurm import states as slurm_states
from broker import lifecycle
from broker.lifecycle import FINAL, FOLLOWED, LIVE, NOT_STARTED, JobState


def test_sets_partition_the_states() -> None:
    assert set(JobState) == FINAL | LIVE and not FINAL & LIVE
    assert NOT_STARTED < LIVE and FOLLOWED < LIVE
    assert JobState.RUNNING not in NOT_STARTED
    assert {JobState.PENDING, JobState.RUNNING} == FOLLOWED
    assert {JobState.UNKNOWN, JobState.SUBMIT_FAILED, JobState.COMPLETED} <= FINAL
    assert all(state.is_final for state in FINAL) and not any(s.is_final for s in LIVE)


def test_values_follow_the_lifecycle_order() -> None:
    assert lifecycle.values(LIVE) == (
        "queued",
        "submitting",
        "submit_unknown",
        "pending",
        "running",
    )
    assert JobState.QUEUED not in NOT_STARTED  # it waits for the pending-jobs limit


@pytest.mark.parametrize(
    ("current", "target", "allowed"),
    [
        ("submitting", "pending", True),
        ("queued", "pending", True),
        ("queued", "submit_unknown", True),
        ("queued", "cancelled", True),
        ("pending", "queued", False),
        ("submit_unknown", "pending", True),
        ("pending", "running", True),
        ("pending", "completed", True),
        ("running", "cancelled", True),
        ("running", "pending", False),  # a stale squeue answer
        ("running", "running", False),
        ("pending", "submitting", False),
        ("completed", "running", False),  # final never changes ...
        ("completed", "failed", False),  # ... not even to another final state
        ("unknown", "completed", False),
    ],
)
def test_moves_only_go_forward_and_final_is_final(current: str, target: str, allowed: bool) -> None:
    assert lifecycle.can_move(current, target) is allowed


def test_every_slurm_code_maps_to_a_state_that_agrees_with_slurm() -> None:
    """A code the adapter says is over is final here; one still waiting or active is not."""
    assert set(slurm_states.PHASES) == lifecycle.SLURM_CODES
    for code, phase in slurm_states.PHASES.items():
        state = lifecycle.from_slurm(code)
        assert state.is_final is (phase is slurm_states.Phase.ENDED), code
        if phase is slurm_states.Phase.WAITING:
            assert state is JobState.PENDING, code


@pytest.mark.parametrize(
    ("code", "state"),
    [
        ("COMPLETING", JobState.RUNNING),
        ("PENDING", JobState.PENDING),
        ("REQUEUED", JobState.PENDING),
        ("CANCELLED", JobState.CANCELLED),
        ("OUT_OF_MEMORY", JobState.OUT_OF_MEMORY),
        ("BOOT_FAIL", JobState.NODE_FAIL),
        ("DEADLINE", JobState.TIMEOUT),
        ("PREEMPTED", JobState.PREEMPTED),
    ],
)
def test_slurm_codes_map_to_broker_states(code: str, state: JobState) -> None:
    assert lifecycle.from_slurm(code) is state


def test_an_unknown_slurm_code_is_unknown_and_warned_never_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="broker.lifecycle"):
        assert lifecycle.from_slurm("LAUNCH_FAILED") is JobState.UNKNOWN
    assert "LAUNCH_FAILED" in caplog.text
