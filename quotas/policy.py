"""Admission and accounting rules of a project's GPU quota.

Admission reserves the most a job can cost (``gpus x time limit x weight``, rounded up); the
charge at the end is what it really used (rounded half-up); the rest of the reservation is released.
A job that stays within its time limit on the GPUs it asked for is therefore never charged more than
it reserved, and a project whose reservations all fit its budget never overspends it.

Arithmetic is exact: a float weight or duration is read as the decimal it prints as (``0.1`` is one
tenth, not the nearest binary fraction), so ``0.1 x 3600`` reserves 360 seconds, not 361.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

from quotas.types import Decision, JobRequest, LedgerSnapshot, LimitName, QuotaPolicy, Violation

SECONDS_PER_HOUR = 3600
DEFAULT_WEIGHT = 1.0
HOURS_DECIMALS = 4
"""GPU-hours in violations are rounded to this many decimals (a third of a second)."""


def weight_for(policy: QuotaPolicy, gpu_type: str) -> float:
    """The budget weight of one GPU-second on ``gpu_type``; an unlisted type weighs 1.0."""
    return policy.gpu_type_weights.get(gpu_type, DEFAULT_WEIGHT)


def reservation_gpu_seconds(gpus: int, time_limit_minutes: int, weight: float) -> int:
    """Weighted GPU-seconds to hold for a job: ``gpus x minutes x 60 x weight``, rounded up.

    Rounding up means admission never holds less than the job may use.
    """
    exact = (
        _exact(gpus, "gpus")
        * _exact(time_limit_minutes, "time_limit_minutes")
        * 60
        * _exact(weight, "weight")
    )
    return math.ceil(exact)


def charge_gpu_seconds(alloc_gpus: int, elapsed_s: float, weight: float) -> int:
    """Weighted GPU-seconds a finished job used: ``allocated GPUs x elapsed x weight``, half-up."""
    exact = (
        _exact(alloc_gpus, "alloc_gpus") * _exact(elapsed_s, "elapsed_s") * _exact(weight, "weight")
    )
    return _round_half_up(exact)


def gpu_hours(seconds: int) -> float:
    """Weighted GPU-seconds shown as GPU-hours, the unit of the API."""
    return seconds / SECONDS_PER_HOUR


def budget_gpu_seconds(gpu_hours: float) -> int:
    """A budget given in GPU-hours as whole weighted GPU-seconds (nearest second, halves up)."""
    return _round_half_up(_exact(gpu_hours, "gpu_hours") * SECONDS_PER_HOUR)


def remaining_gpu_seconds(policy: QuotaPolicy, ledger: LedgerSnapshot) -> int:
    """What is left of the budget after use and reservations; never below zero."""
    return max(0, policy.budget_gpu_seconds - ledger.used_gpu_seconds - ledger.reserved_gpu_seconds)


def decide(request: JobRequest, policy: QuotaPolicy, ledger: LedgerSnapshot) -> Decision:
    """Admit or refuse ``request`` against ``policy`` given the project's current ``ledger``.

    Every broken limit is reported, static ones (the request itself is not allowed) before dynamic
    ones (the project has no room for it now), so a user can fix everything in one go.
    """
    weight = weight_for(policy, request.gpu_type)
    reservation = request.tasks * reservation_gpu_seconds(
        request.gpus, request.time_limit_minutes, weight
    )
    violations = (
        *_static_violations(request, policy),
        *_dynamic_violations(request, policy, ledger, reservation),
    )
    admitted = not violations
    return Decision(
        admitted=admitted,
        reserve_gpu_seconds=reservation if admitted else 0,
        violations=violations,
    )


QUEUEABLE = frozenset({LimitName.CONCURRENT_GPUS, LimitName.PENDING_JOBS})
"""Limits a job can wait for in the broker's queue: they free up as other jobs end. The budget
does not (waiting does not make money), and a static limit never will."""


def waits_in_queue(decision: Decision) -> bool:
    """The request was refused only by limits it may wait for."""
    return bool(decision.violations) and all(v.limit in QUEUEABLE for v in decision.violations)


def room_now(
    request: JobRequest, policy: QuotaPolicy, ledger: LedgerSnapshot
) -> tuple[Violation, ...]:
    """The concurrency and pending-job limits ``request`` would break if it went to Slurm now
    (a queued job's budget was settled when it was admitted)."""
    return tuple(
        v
        for v in _dynamic_violations(request, policy, ledger, reservation=0)
        if v.limit in QUEUEABLE
    )


def _static_violations(request: JobRequest, policy: QuotaPolicy) -> Iterator[Violation]:
    allowed_sets: tuple[tuple[LimitName, str, frozenset[str] | None], ...] = (
        (LimitName.CLUSTER, request.cluster, policy.allowed_clusters),
        (LimitName.PARTITION, request.partition, policy.allowed_partitions),
        (LimitName.GPU_TYPE, request.gpu_type, policy.allowed_gpu_types),
    )
    for limit, value, allowed in allowed_sets:
        if allowed is not None and value not in allowed:
            yield Violation(limit, requested=value, allowed=sorted(allowed))
    if policy.max_gpus_per_job is not None and request.gpus > policy.max_gpus_per_job:
        yield Violation(
            LimitName.GPUS_PER_JOB, requested=request.gpus, allowed=policy.max_gpus_per_job
        )
    max_minutes = policy.max_time_limit_minutes
    if max_minutes is not None and request.time_limit_minutes > max_minutes:
        yield Violation(
            LimitName.TIME_LIMIT, requested=request.time_limit_minutes, allowed=max_minutes
        )


def _dynamic_violations(
    request: JobRequest, policy: QuotaPolicy, ledger: LedgerSnapshot, reservation: int
) -> Iterator[Violation]:
    max_pending = policy.max_pending_jobs
    if max_pending is not None and ledger.pending_jobs + 1 > max_pending:
        yield Violation(
            LimitName.PENDING_JOBS, requested=1, used=ledger.pending_jobs, allowed=max_pending
        )
    max_gpus = policy.max_concurrent_gpus
    if max_gpus is not None and ledger.live_gpus + request.concurrent_gpus > max_gpus:
        yield Violation(
            LimitName.CONCURRENT_GPUS,
            requested=request.concurrent_gpus,
            used=ledger.live_gpus,
            allowed=max_gpus,
        )
    max_on_cluster = policy.max_concurrent_gpus_per_cluster.get(request.cluster)
    live_on_cluster = ledger.live_gpus_by_cluster.get(request.cluster, 0)
    if max_on_cluster is not None and live_on_cluster + request.concurrent_gpus > max_on_cluster:
        yield Violation(
            LimitName.CONCURRENT_GPUS,
            requested=request.concurrent_gpus,
            used=live_on_cluster,
            allowed=max_on_cluster,
            cluster=request.cluster,
        )
    held = ledger.used_gpu_seconds + ledger.reserved_gpu_seconds
    if held + reservation > policy.budget_gpu_seconds:
        yield Violation(
            LimitName.GPU_HOURS,
            requested=_display_hours(reservation),
            used=_display_hours(ledger.used_gpu_seconds),
            reserved=_display_hours(ledger.reserved_gpu_seconds),
            remaining=_display_hours(remaining_gpu_seconds(policy, ledger)),
        )


def _display_hours(seconds: int) -> float:
    return round(gpu_hours(seconds), HOURS_DECIMALS)


def _exact(value: float, name: str) -> Fraction:
    """``value`` as an exact fraction, floats read as the decimal they print as."""
    if isinstance(value, int):
        exact = Fraction(value)
    elif math.isfinite(value):
        exact = Fraction(repr(value))
    else:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if exact < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return exact


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))
