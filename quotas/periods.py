"""Which part of a job's charge belongs to which allocation period.

A finished job's charge is spread evenly over its run (``started`` to ``ended``), and the part
that falls before an instant is rounded half-up to whole GPU-seconds. Every split is read off that
one cumulative amount, so the parts of adjacent windows are whole GPU-seconds that add up to the
job's charge exactly, each within one GPU-second of its exact proportional share. A job that
straddles the start of a new period charges the old period for what it ran before the boundary and
the new one for the rest: no hour counts twice, and none disappears.

A job with no run (never started, or started and ended at the same instant) has its whole charge at
the instant it ended.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from fractions import Fraction

_MICROSECOND = timedelta(microseconds=1)


def charged_before(
    charge_gpu_seconds: int, started: datetime | None, ended: datetime, at: datetime
) -> int:
    """The part of a job's charge that falls before ``at``: 0 at the run's start, all at its end."""
    if charge_gpu_seconds < 0:
        raise ValueError(f"a charge must not be negative, got {charge_gpu_seconds}")
    if started is None or ended <= started:
        return charge_gpu_seconds if ended < at else 0
    if at <= started:
        return 0
    if at >= ended:
        return charge_gpu_seconds
    ran = (at - started) // _MICROSECOND
    run = (ended - started) // _MICROSECOND
    return math.floor(Fraction(charge_gpu_seconds * ran, run) + Fraction(1, 2))


def charged_within(
    charge_gpu_seconds: int,
    started: datetime | None,
    ended: datetime,
    window_start: datetime | None,
    window_end: datetime | None,
) -> int:
    """The part of a job's charge in ``[window_start, window_end)``; None leaves that end open."""
    after_start = (
        charge_gpu_seconds
        if window_end is None
        else charged_before(charge_gpu_seconds, started, ended, window_end)
    )
    before_start = (
        0
        if window_start is None
        else charged_before(charge_gpu_seconds, started, ended, window_start)
    )
    return max(0, after_start - before_start)


def split_charge(
    charge_gpu_seconds: int,
    started: datetime | None,
    ended: datetime,
    boundaries: Sequence[datetime],
) -> list[int]:
    """The charge cut at each of the ascending ``boundaries``: ``len(boundaries) + 1`` parts, the
    first before the first boundary, the last from the last boundary on. They sum to the charge."""
    if any(later < earlier for earlier, later in itertools.pairwise(boundaries)):
        raise ValueError("boundaries must be in ascending order")
    cumulative = [
        0,
        *(charged_before(charge_gpu_seconds, started, ended, at) for at in boundaries),
        charge_gpu_seconds,
    ]
    return [later - earlier for earlier, later in itertools.pairwise(cumulative)]
