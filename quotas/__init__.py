"""Quota policy and GPU-hour accounting: pure, typed, framework-free.

``decide`` admits or refuses a job request against a project's policy and ledger, and the rounding
rules of reservations and charges live in ``quotas.policy``; ``quotas.periods`` says which part of a
finished job's charge belongs to which allocation period. The ledger itself is the broker's
(``broker.service.ledger``): defined by its job rows, kept as running totals beside them.
"""

from quotas.periods import charged_before, charged_within, split_charge
from quotas.policy import (
    QUEUEABLE,
    budget_gpu_seconds,
    charge_gpu_seconds,
    decide,
    gpu_hours,
    remaining_gpu_seconds,
    reservation_gpu_seconds,
    room_now,
    waits_in_queue,
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
    "QUEUEABLE",
    "STATIC_LIMITS",
    "Decision",
    "JobRequest",
    "LedgerSnapshot",
    "LimitName",
    "QuotaPolicy",
    "Violation",
    "budget_gpu_seconds",
    "charge_gpu_seconds",
    "charged_before",
    "charged_within",
    "decide",
    "gpu_hours",
    "remaining_gpu_seconds",
    "reservation_gpu_seconds",
    "room_now",
    "split_charge",
    "waits_in_queue",
    "weight_for",
]
