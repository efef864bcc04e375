"""Weights, reservations, charges and unit conversions: the numbers a ledger is made of."""

from __future__ import annotations

import math

import pytest

from quotas import (
    QuotaPolicy,
    budget_gpu_seconds,
    charge_gpu_seconds,
    gpu_hours,
    reservation_gpu_seconds,
    weight_for,
)


def test_weight_of_a_listed_gpu_type_comes_from_the_policy() -> None:
    policy = QuotaPolicy(budget_gpu_seconds=0, gpu_type_weights={"h100": 2.0, "a100": 0.5})

    assert weight_for(policy, "h100") == 2.0
    assert weight_for(policy, "a100") == 0.5


def test_an_unlisted_gpu_type_weighs_one() -> None:
    policy = QuotaPolicy(budget_gpu_seconds=0, gpu_type_weights={"h100": 2.0})

    assert weight_for(policy, "l40s") == 1.0


def test_a_zero_weight_is_kept_not_defaulted() -> None:
    policy = QuotaPolicy(budget_gpu_seconds=0, gpu_type_weights={"t4": 0.0})

    assert weight_for(policy, "t4") == 0.0


def test_reservation_is_gpus_times_minutes_times_weight_in_seconds() -> None:
    assert reservation_gpu_seconds(8, 120, 1.0) == 8 * 120 * 60
    assert reservation_gpu_seconds(4, 60, 0.5) == 4 * 3600 // 2
    assert reservation_gpu_seconds(1, 1, 2.5) == 150


def test_reservation_rounds_a_fractional_second_up() -> None:
    # 1 GPU x 1 minute x 0.0001 = 0.006 s: never reserve less than the job may use.
    assert reservation_gpu_seconds(1, 1, 0.0001) == 1
    # 3 GPUs x 1 minute x 0.33333 = 59.9994 s -> 60
    assert reservation_gpu_seconds(3, 1, 0.33333) == 60


def test_reservation_reads_a_decimal_weight_exactly() -> None:
    # In binary floating point 1.1 x 3600 is 3960.0000000000005; a naive ceil would give 3961.
    assert 1 * 60 * 60 * 1.1 > 3960
    assert reservation_gpu_seconds(1, 60, 1.1) == 3960
    assert reservation_gpu_seconds(8, 120, 1.1) == 63360
    assert reservation_gpu_seconds(7, 10, 0.7) == 2940


def test_reservation_with_zero_weight_or_zero_gpus_is_zero() -> None:
    assert reservation_gpu_seconds(8, 600, 0.0) == 0
    assert reservation_gpu_seconds(0, 600, 1.0) == 0


@pytest.mark.parametrize(
    ("gpus", "minutes", "weight"),
    [(-1, 10, 1.0), (1, -10, 1.0), (1, 10, -0.5), (1, 10, math.nan), (1, 10, math.inf)],
)
def test_reservation_refuses_negative_or_non_finite_inputs(
    gpus: int, minutes: int, weight: float
) -> None:
    with pytest.raises(ValueError, match="must"):
        reservation_gpu_seconds(gpus, minutes, weight)


def test_charge_is_allocated_gpus_times_elapsed_times_weight() -> None:
    assert charge_gpu_seconds(8, 3600, 1.0) == 28800
    assert charge_gpu_seconds(2, 100, 0.5) == 100
    assert charge_gpu_seconds(4, 0, 1.0) == 0


@pytest.mark.parametrize(
    ("alloc_gpus", "elapsed_s", "weight", "charge"),
    [
        (1, 1, 0.5, 1),  # exactly half a second rounds up
        (1, 1, 0.49, 0),
        (1, 1, 0.51, 1),
        (1, 3, 0.5, 2),  # 1.5 -> 2
        (1, 5, 0.5, 3),  # 2.5 -> 3 where round() would give 2
        (3, 7, 0.1, 2),  # 2.1 -> 2
        (1, 2.5, 1.0, 3),  # fractional elapsed time is accepted
    ],
)
def test_charge_rounds_half_up(
    alloc_gpus: int, elapsed_s: float, weight: float, charge: int
) -> None:
    assert charge_gpu_seconds(alloc_gpus, elapsed_s, weight) == charge


@pytest.mark.parametrize(
    ("alloc_gpus", "elapsed_s", "weight"),
    [(-1, 10, 1.0), (1, -10, 1.0), (1, 10, -1.0), (1, math.nan, 1.0)],
)
def test_charge_refuses_negative_inputs(alloc_gpus: int, elapsed_s: float, weight: float) -> None:
    with pytest.raises(ValueError, match="must"):
        charge_gpu_seconds(alloc_gpus, elapsed_s, weight)


def test_gpu_hours_divides_seconds_by_3600() -> None:
    assert gpu_hours(3600) == 1.0
    assert gpu_hours(5400) == 1.5
    assert gpu_hours(0) == 0.0


@pytest.mark.parametrize(
    ("hours", "seconds"),
    [(50000, 180_000_000), (1.5, 5400), (0.0001, 0), (0.0002, 1), (1 / 7200, 1), (0, 0)],
)
def test_budget_in_gpu_hours_becomes_whole_seconds(hours: float, seconds: int) -> None:
    # 0.0001 h = 0.36 s -> 0; 0.0002 h = 0.72 s -> 1; 1/7200 h = 0.5 s -> 1 (half-up)
    assert budget_gpu_seconds(hours) == seconds


def test_budget_round_trips_through_gpu_hours() -> None:
    assert budget_gpu_seconds(gpu_hours(123_457)) == 123_457


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="gpu_hours"):
        budget_gpu_seconds(-1.0)
