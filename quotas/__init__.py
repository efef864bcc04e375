"""Quota policy and GPU-hour accounting: pure, typed, framework-free.

``decide`` admits or refuses a job request against a project's policy and ledger; the ledger moves
(``reserve``, ``start``, ``settle``, ``release``) and the rounding rules live in ``quotas.policy``.
"""

from quotas.policy import (
    budget_gpu_seconds,
    charge_gpu_seconds,
    decide,
    gpu_hours,
    release,
    remaining_gpu_seconds,
    reservation_gpu_seconds,
    reserve,
    settle,
    start,
    weight_for,
)
from quotas.types import (
    STATIC_LIMITS,
    Decision,
    JobRequest,
    LedgerSnapshot,
    LimitName,
    QuotaPolicy,
    Violation,
)

__all__ = [
    "STATIC_LIMITS",
    "Decision",
    "JobRequest",
    "LedgerSnapshot",
    "LimitName",
    "QuotaPolicy",
    "Violation",
    "budget_gpu_seconds",
    "charge_gpu_seconds",
    "decide",
    "gpu_hours",
    "release",
    "remaining_gpu_seconds",
    "reservation_gpu_seconds",
    "reserve",
    "settle",
    "start",
    "weight_for",
]
