"""Splitting a finished job's charge between allocation periods: exact, proportional, additive."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotas import charged_before, charged_within, split_charge

T0 = datetime(2027, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)

offsets = st.integers(min_value=0, max_value=10 * 86_400 * 10**6).map(
    lambda us: T0 + timedelta(microseconds=us)
)
charges = st.integers(min_value=0, max_value=10**9)


def exact_share(
    charge: int, started: datetime, ended: datetime, a: datetime, b: datetime
) -> Fraction:
    overlap = min(b, ended) - max(a, started)
    if overlap <= timedelta(0):
        return Fraction(0)
    return (
        Fraction(charge)
        * Fraction(overlap / timedelta(microseconds=1))
        / Fraction((ended - started) / timedelta(microseconds=1))
    )


def test_a_job_straddling_a_boundary_is_charged_to_each_side_for_what_ran_there() -> None:
    # 8 GPU-hours run from 22:00 to 02:00 across the new year: half before, half after.
    started, ended = T0 - 2 * HOUR, T0 + 2 * HOUR

    assert split_charge(8 * 3600, started, ended, [T0]) == [4 * 3600, 4 * 3600]
    assert charged_within(8 * 3600, started, ended, T0, T0 + 365 * 24 * HOUR) == 4 * 3600
    assert charged_within(8 * 3600, started, ended, T0 - 365 * 24 * HOUR, T0) == 4 * 3600


def test_rounding_keeps_the_parts_whole_and_their_sum_exact() -> None:
    # 10 GPU-seconds over three equal thirds: 3.33.. each, rounded half-up cumulatively.
    started = T0
    ended = T0 + timedelta(seconds=3)
    cuts = [T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)]

    assert split_charge(10, started, ended, cuts) == [3, 4, 3]


def test_a_job_that_never_ran_is_charged_where_it_ended() -> None:
    ended = T0 + HOUR

    assert split_charge(50, None, ended, [T0, T0 + 2 * HOUR]) == [0, 50, 0]
    assert charged_within(50, ended, ended, T0, ended) == 0  # windows are half-open
    assert charged_within(50, ended, ended, ended, None) == 50


def test_edges_of_the_run_and_open_windows() -> None:
    started, ended = T0, T0 + HOUR

    assert charged_before(7, started, ended, started) == 0
    assert charged_before(7, started, ended, ended) == 7
    assert charged_within(7, started, ended, None, None) == 7
    assert charged_within(7, started, ended, ended, None) == 0
    assert charged_within(7, started, ended, None, started) == 0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        charged_before(-1, T0, T0 + HOUR, T0)
    with pytest.raises(ValueError, match="ascending"):
        split_charge(1, T0, T0 + HOUR, [T0 + HOUR, T0])


@given(
    charge=charges,
    started=offsets,
    length_us=st.integers(min_value=1, max_value=5 * 86_400 * 10**6),
    cuts=st.lists(offsets, max_size=6),
)
def test_parts_are_whole_sum_to_the_charge_and_are_each_within_a_second_of_their_share(
    charge: int, started: datetime, length_us: int, cuts: list[datetime]
) -> None:
    ended = started + timedelta(microseconds=length_us)
    cuts = sorted(cuts)

    parts = split_charge(charge, started, ended, cuts)

    assert len(parts) == len(cuts) + 1
    assert sum(parts) == charge
    assert all(part >= 0 for part in parts)
    edges = [T0 - 365 * 24 * HOUR, *cuts, T0 + 365 * 24 * HOUR]
    for part, a, b in zip(parts, edges[:-1], edges[1:], strict=True):
        assert abs(part - exact_share(charge, started, ended, a, b)) < 1


@given(charge=charges, started=offsets, length_us=st.integers(0, 10**11), a=offsets, b=offsets)
def test_adjacent_windows_add_up(
    charge: int, started: datetime, length_us: int, a: datetime, b: datetime
) -> None:
    # What a period and the next one get is what the two together get: nothing is lost at the
    # boundary, nothing counted twice, whatever the boundary and the job.
    a, b = sorted((a, b))
    ended = started + timedelta(microseconds=length_us)

    before = charged_within(charge, started, ended, None, a)
    between = charged_within(charge, started, ended, a, b)
    after = charged_within(charge, started, ended, b, None)

    assert before + between + after == charge
    assert charged_within(charge, started, ended, None, b) == before + between
