"""Properties that must hold for any sequence of admissions and job endings.

Each test drives the pure ledger moves the broker applies to its rows (decide, reserve, start,
settle, release) through a random history and checks the ledger after every step against a simple
model of the open jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from quotas import (
    JobRequest,
    LedgerSnapshot,
    LimitName,
    QuotaPolicy,
    charge_gpu_seconds,
    decide,
    release,
    reservation_gpu_seconds,
    reserve,
    settle,
    start,
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
MAX_STEPS = 30
# Histories are the slowest properties; 50 of them keep this module near a third of a second and
# still break each limit many times over (raise it locally to search harder).
HISTORIES = settings(max_examples=50)

type_weights = st.fixed_dictionaries(
    {"h100": weights, "a100": weights, "t4": st.sampled_from([0.0, 0.1, 0.5])}
)


@dataclass
class OpenJob:
    request: JobRequest
    reservation: int
    running: bool = False


def assert_never_negative(ledger: LedgerSnapshot) -> None:
    assert ledger.used_gpu_seconds >= 0
    assert ledger.reserved_gpu_seconds >= 0
    assert ledger.live_gpus >= 0
    assert ledger.pending_jobs >= 0
    assert all(gpus > 0 for gpus in ledger.live_gpus_by_cluster.values())


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


@given(
    start_used=st.integers(min_value=0, max_value=10**9),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["reserve", "settle", "release", "settle_too_much"]),
            st.integers(min_value=0, max_value=10**7),
            st.integers(min_value=0, max_value=10**3),
        ),
        max_size=40,
    ),
)
def test_the_ledger_is_exact_and_never_negative(
    start_used: int, steps: list[tuple[str, int, int]]
) -> None:
    ledger = LedgerSnapshot(used_gpu_seconds=start_used, reserved_gpu_seconds=0)
    open_reservations: list[int] = []
    charges: list[int] = []

    for action, amount, pick in steps:
        if action == "reserve":
            ledger = reserve(ledger, amount)
            open_reservations.append(amount)
        elif action == "settle_too_much":
            try:
                settle(ledger, ledger.reserved_gpu_seconds + 1 + pick, 0)
            except ValueError:
                pass
            else:
                raise AssertionError("settled more reservation than the ledger holds")
        elif open_reservations:
            reservation = open_reservations.pop(pick % len(open_reservations))
            charge = amount if action == "settle" else 0
            ledger = (
                settle(ledger, reservation, charge)
                if action == "settle"
                else release(ledger, reservation)
            )
            charges.append(charge)

        assert_never_negative(ledger)
        assert ledger.used_gpu_seconds == start_used + sum(charges)
        assert ledger.reserved_gpu_seconds == sum(open_reservations)


# A history is a list of steps drawn up front (cheaper than drawing step by step). A step that picks
# a job takes the pick modulo the number of candidates; shares are thousandths.
@dataclass(frozen=True)
class Submit:
    request: JobRequest


@dataclass(frozen=True)
class Start:
    pick: int


@dataclass(frozen=True)
class End:
    pick: int
    gpus_share: int = 1000
    time_share: int = 1000


picks = st.integers(min_value=0, max_value=2**16)
shares = st.integers(min_value=0, max_value=1000)
submits = st.builds(Submit, requests)
# Few GPUs per job against small limits, so that histories land on every boundary often.
small_submits = st.builds(Submit, requests.map(lambda r: replace(r, gpus=r.gpus % 4 + 1)))
ends = st.builds(End, picks, shares, shares)


@HISTORIES
@given(
    budget_hours=st.integers(min_value=0, max_value=200),
    weights_by_type=type_weights,
    history=st.lists(submits | ends, min_size=1, max_size=MAX_STEPS),
)
def test_admission_never_lets_use_and_reservations_exceed_the_budget(
    budget_hours: int, weights_by_type: dict[str, float], history: list[Submit | End]
) -> None:
    policy = QuotaPolicy(budget_gpu_seconds=budget_hours * HOUR, gpu_type_weights=weights_by_type)
    ledger = LedgerSnapshot(used_gpu_seconds=0, reserved_gpu_seconds=0)
    open_jobs: list[OpenJob] = []

    for step in history:
        if isinstance(step, End) and open_jobs:
            job = open_jobs.pop(step.pick % len(open_jobs))
            # What sacct reports for a job that kept to its request: at most its GPUs and time.
            alloc = job.request.gpus * step.gpus_share // 1000
            elapsed = job.request.time_limit_minutes * 60 * step.time_share // 1000
            weight = weight_for(policy, job.request.gpu_type)
            charge = charge_gpu_seconds(alloc, elapsed, weight)
            ledger = start(ledger)
            ledger = settle(ledger, job.reservation, charge, job.request)
        elif isinstance(step, Submit):
            request = step.request
            decision = decide(request, policy, ledger)
            held = ledger.used_gpu_seconds + ledger.reserved_gpu_seconds
            fits = held + reservation_gpu_seconds(
                request.gpus, request.time_limit_minutes, weight_for(policy, request.gpu_type)
            )
            # Refused exactly when it does not fit: admission is neither loose nor too strict.
            assert decision.admitted == (fits <= policy.budget_gpu_seconds)
            assert decision.admitted == (not decision.violations)
            if decision.admitted:
                ledger = reserve(ledger, decision, request)
                open_jobs.append(OpenJob(request, decision.reserve_gpu_seconds))
            else:
                assert [v.limit for v in decision.violations] == [LimitName.GPU_HOURS]

        assert_never_negative(ledger)
        assert ledger.used_gpu_seconds + ledger.reserved_gpu_seconds <= policy.budget_gpu_seconds
        assert ledger.reserved_gpu_seconds == sum(job.reservation for job in open_jobs)


@HISTORIES
@given(
    # Small limits (None, "no limit", is covered by the unit tests) so histories hit them often.
    max_gpus=st.integers(min_value=0, max_value=12),
    alpha_max=st.integers(min_value=0, max_value=6),
    max_pending=st.integers(min_value=0, max_value=4),
    history=st.lists(
        small_submits | st.builds(Start, picks) | ends, min_size=1, max_size=MAX_STEPS
    ),
)
def test_admission_never_exceeds_concurrency_or_pending_limits(
    max_gpus: int, alpha_max: int, max_pending: int, history: list[Submit | Start | End]
) -> None:
    policy = QuotaPolicy(
        budget_gpu_seconds=10**12,
        max_concurrent_gpus=max_gpus,
        max_concurrent_gpus_per_cluster={"alpha": alpha_max},
        max_pending_jobs=max_pending,
    )
    ledger = LedgerSnapshot(used_gpu_seconds=0, reserved_gpu_seconds=0)
    jobs: list[OpenJob] = []

    for step in history:
        pending = [job for job in jobs if not job.running]
        if isinstance(step, Start) and pending:
            pending[step.pick % len(pending)].running = True
            ledger = start(ledger)
        elif isinstance(step, End) and jobs:
            job = jobs.pop(step.pick % len(jobs))
            if job.running:
                ledger = settle(ledger, job.reservation, job.reservation, job.request)
            else:
                ledger = release(ledger, job.reservation, job.request)
        elif isinstance(step, Submit):
            gpus, cluster = step.request.gpus, step.request.cluster
            fits = (
                ledger.pending_jobs + 1 <= max_pending
                and ledger.live_gpus + gpus <= max_gpus
                and (
                    cluster != "alpha"
                    or ledger.live_gpus_by_cluster.get("alpha", 0) + gpus <= alpha_max
                )
            )
            decision = decide(step.request, policy, ledger)
            # Refused exactly when a limit would be broken: neither loose nor too strict.
            assert decision.admitted == fits
            if decision.admitted:
                ledger = reserve(ledger, decision, step.request)
                jobs.append(OpenJob(step.request, decision.reserve_gpu_seconds))
            else:
                assert {v.limit for v in decision.violations} <= {
                    LimitName.CONCURRENT_GPUS,
                    LimitName.PENDING_JOBS,
                }

        assert_never_negative(ledger)
        assert ledger.live_gpus <= max_gpus
        assert ledger.live_gpus_by_cluster.get("alpha", 0) <= alpha_max
        assert ledger.pending_jobs <= max_pending
        # The ledger counts exactly the open jobs.
        assert ledger.live_gpus == sum(job.request.gpus for job in jobs)
        assert ledger.pending_jobs == sum(not job.running for job in jobs)
        for cluster in CLUSTERS:
            expected = sum(job.request.gpus for job in jobs if job.request.cluster == cluster)
            assert ledger.live_gpus_by_cluster.get(cluster, 0) == expected
