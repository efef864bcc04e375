"""Properties of the pure quota arithmetic: reservations, charges and admission decisions.

Admission is checked against arbitrary ledgers: ``decide`` must refuse exactly when a request does
not fit. That the broker's real ledger (job rows on a database) stays within the budget through
random histories of submissions and endings is tested in tests/broker/test_ledger_history.py.
"""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from quotas import (
    JobRequest,
    LedgerSnapshot,
    LimitName,
    QuotaPolicy,
    charge_gpu_seconds,
    decide,
    reservation_gpu_seconds,
    weight_for,
)

HOUR = 3600
CLUSTERS = ("alpha", "beta")
GPU_TYPES = ("h100", "a100", "t4", "l40s")  # l40s is unlisted in every policy: weight 1.0

weights = st.floats(min_value=0.0, max_value=4.0, allow_nan=False, allow_infinity=False)
requests = st.builds(
    JobRequest,
    cluster=st.sampled_from(CLUSTERS),
    partition=st.just("gpu"),
    gpu_type=st.sampled_from(GPU_TYPES),
    gpus=st.integers(min_value=1, max_value=16),
    time_limit_minutes=st.integers(min_value=1, max_value=24 * 60),
)
type_weights = st.fixed_dictionaries(
    {"h100": weights, "a100": weights, "t4": st.sampled_from([0.0, 0.1, 0.5])}
)


@given(
    gpus=st.integers(min_value=0, max_value=1024),
    minutes=st.integers(min_value=0, max_value=30 * 24 * 60),
    weight=weights,
)
def test_reservation_is_the_exact_cost_rounded_up(gpus: int, minutes: int, weight: float) -> None:
    exact = gpus * minutes * 60 * Fraction(repr(weight))

    reservation = reservation_gpu_seconds(gpus, minutes, weight)

    assert exact <= reservation < exact + 1


@given(request=requests, weight=weights, data=st.data())
def test_a_job_within_its_request_is_never_charged_more_than_it_reserved(
    request: JobRequest, weight: float, data: st.DataObject
) -> None:
    alloc_gpus = data.draw(st.integers(min_value=0, max_value=request.gpus), label="alloc_gpus")
    elapsed = data.draw(
        st.integers(min_value=0, max_value=request.time_limit_minutes * 60), label="elapsed_s"
    )

    charge = charge_gpu_seconds(alloc_gpus, elapsed, weight)

    assert 0 <= charge <= reservation_gpu_seconds(request.gpus, request.time_limit_minutes, weight)
    assert abs(charge - alloc_gpus * elapsed * Fraction(repr(weight))) <= Fraction(1, 2)


ledgers = st.builds(
    LedgerSnapshot,
    used_gpu_seconds=st.integers(min_value=0, max_value=300 * HOUR),
    reserved_gpu_seconds=st.integers(min_value=0, max_value=300 * HOUR),
    live_gpus=st.integers(min_value=0, max_value=16),
    live_gpus_by_cluster=st.fixed_dictionaries({"alpha": st.integers(min_value=0, max_value=8)}),
    pending_jobs=st.integers(min_value=0, max_value=6),
)


@given(
    budget_hours=st.integers(min_value=0, max_value=200),
    weights_by_type=type_weights,
    ledger=ledgers,
    request=requests,
)
def test_admission_refuses_exactly_what_the_budget_cannot_take(
    budget_hours: int,
    weights_by_type: dict[str, float],
    ledger: LedgerSnapshot,
    request: JobRequest,
) -> None:
    policy = QuotaPolicy(budget_gpu_seconds=budget_hours * HOUR, gpu_type_weights=weights_by_type)
    reservation = reservation_gpu_seconds(
        request.gpus, request.time_limit_minutes, weight_for(policy, request.gpu_type)
    )
    fits = ledger.used_gpu_seconds + ledger.reserved_gpu_seconds + reservation
    fits_budget = fits <= policy.budget_gpu_seconds

    decision = decide(request, policy, ledger)

    # Neither loose nor too strict, and an admitted request reserves exactly its cost.
    assert decision.admitted == fits_budget
    assert decision.admitted == (not decision.violations)
    assert decision.reserve_gpu_seconds == (reservation if fits_budget else 0)
    if not fits_budget:
        assert [v.limit for v in decision.violations] == [LimitName.GPU_HOURS]
        (violation,) = decision.violations
        assert violation.remaining == round(
            max(
                0, policy.budget_gpu_seconds - ledger.used_gpu_seconds - ledger.reserved_gpu_seconds
            )
            / HOUR,
            4,
        )


@given(
    # Small limits (None, "no limit", is covered by the unit tests) so examples hit them often.
    max_gpus=st.integers(min_value=0, max_value=12),
    alpha_max=st.integers(min_value=0, max_value=6),
    max_pending=st.integers(min_value=0, max_value=4),
    ledger=ledgers,
    request=requests,
)
def test_admission_refuses_exactly_what_breaks_a_concurrency_or_pending_limit(
    max_gpus: int, alpha_max: int, max_pending: int, ledger: LedgerSnapshot, request: JobRequest
) -> None:
    policy = QuotaPolicy(
        budget_gpu_seconds=10**12,
        max_concurrent_gpus=max_gpus,
        max_concurrent_gpus_per_cluster={"alpha": alpha_max},
        max_pending_jobs=max_pending,
    )
    gpus = request.gpus % 4 + 1
    request = JobRequest(
        request.cluster, request.partition, request.gpu_type, gpus, request.time_limit_minutes
    )
    fits = (
        ledger.pending_jobs + 1 <= max_pending
        and ledger.live_gpus + gpus <= max_gpus
        and (
            request.cluster != "alpha"
            or ledger.live_gpus_by_cluster.get("alpha", 0) + gpus <= alpha_max
        )
    )

    decision = decide(request, policy, ledger)

    assert decision.admitted == fits
    assert {v.limit for v in decision.violations} <= {
        LimitName.CONCURRENT_GPUS,
        LimitName.PENDING_JOBS,
    }
