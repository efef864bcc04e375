"""Admission rules: each limit, its boundary, and the numbers a refused user is shown."""

from __future__ import annotations

from dataclasses import replace

import pytest

from quotas import Decision, JobRequest, LedgerSnapshot, LimitName, QuotaPolicy, Violation, decide

HOUR = 3600
EMPTY = LedgerSnapshot(used_gpu_seconds=0, reserved_gpu_seconds=0)
PLENTY = QuotaPolicy(budget_gpu_seconds=1_000_000 * HOUR)


def job(**changes: object) -> JobRequest:
    """One H100 for an hour on alpha/gpu unless told otherwise."""
    base = JobRequest(
        cluster="alpha", partition="gpu", gpu_type="h100", gpus=1, time_limit_minutes=60
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def only_violation(decision: Decision) -> Violation:
    assert not decision.admitted
    assert decision.reserve_gpu_seconds == 0
    assert len(decision.violations) == 1, decision.violations
    return decision.violations[0]


def test_a_request_within_every_limit_is_admitted_with_its_reservation() -> None:
    decision = decide(job(gpus=8, time_limit_minutes=120), PLENTY, EMPTY)

    assert decision == Decision(admitted=True, reserve_gpu_seconds=8 * 2 * HOUR, violations=())


# --- budget -------------------------------------------------------------------------------------


def test_a_job_that_exactly_fills_the_budget_is_admitted() -> None:
    ledger = LedgerSnapshot(used_gpu_seconds=10 * HOUR, reserved_gpu_seconds=5 * HOUR)
    policy = QuotaPolicy(budget_gpu_seconds=23 * HOUR)

    decision = decide(job(gpus=8), policy, ledger)

    assert decision.admitted
    assert decision.reserve_gpu_seconds == 8 * HOUR


def test_a_job_one_second_over_the_budget_is_refused_with_the_numbers() -> None:
    ledger = LedgerSnapshot(used_gpu_seconds=10 * HOUR, reserved_gpu_seconds=5 * HOUR)
    policy = QuotaPolicy(budget_gpu_seconds=23 * HOUR - 1)

    violation = only_violation(decide(job(gpus=8), policy, ledger))

    assert violation == Violation(
        LimitName.GPU_HOURS,
        requested=8.0,
        used=10.0,
        reserved=5.0,
        remaining=round((8 * HOUR - 1) / HOUR, 4),
    )
    assert not violation.is_static


def test_the_budget_check_uses_the_weighted_reservation() -> None:
    policy = QuotaPolicy(budget_gpu_seconds=10 * HOUR, gpu_type_weights={"h100": 2.0, "a100": 0.5})

    # 8 H100-hours weigh 16 > 10: refused. 8 A100-hours weigh 4: admitted.
    refused = only_violation(decide(job(gpus=8, gpu_type="h100"), policy, EMPTY))
    admitted = decide(job(gpus=8, gpu_type="a100"), policy, EMPTY)

    assert refused.requested == 16.0
    assert refused.remaining == 10.0
    assert admitted.admitted
    assert admitted.reserve_gpu_seconds == 4 * HOUR


def test_gpu_hours_in_a_violation_are_rounded_to_four_decimals() -> None:
    policy = QuotaPolicy(budget_gpu_seconds=HOUR + 1)
    ledger = LedgerSnapshot(used_gpu_seconds=1, reserved_gpu_seconds=HOUR - 1)

    violation = only_violation(decide(job(gpus=1, time_limit_minutes=1), policy, ledger))

    # 1 s left = 0.000277... h; 1 s used = same; 3599 s reserved = 0.99972... h
    assert violation.remaining == 0.0003
    assert violation.used == 0.0003
    assert violation.reserved == 0.9997
    assert violation.requested == round(60 / HOUR, 4)


def test_a_zero_weight_gpu_type_is_admitted_on_a_spent_budget() -> None:
    policy = QuotaPolicy(budget_gpu_seconds=10 * HOUR, gpu_type_weights={"t4": 0.0})
    spent = LedgerSnapshot(used_gpu_seconds=6 * HOUR, reserved_gpu_seconds=4 * HOUR)

    decision = decide(job(gpu_type="t4", gpus=4, time_limit_minutes=600), policy, spent)

    assert decision.admitted
    assert decision.reserve_gpu_seconds == 0


def test_a_budget_lowered_below_use_refuses_every_new_job() -> None:
    policy = QuotaPolicy(budget_gpu_seconds=5 * HOUR, gpu_type_weights={"t4": 0.0})
    ledger = LedgerSnapshot(used_gpu_seconds=8 * HOUR, reserved_gpu_seconds=HOUR)

    paid = only_violation(decide(job(time_limit_minutes=1), policy, ledger))
    free = only_violation(decide(job(gpu_type="t4"), policy, ledger))

    assert paid.limit is LimitName.GPU_HOURS
    assert paid.remaining == 0.0
    assert paid.used == 8.0
    assert paid.reserved == 1.0
    assert free.limit is LimitName.GPU_HOURS
    assert free.requested == 0.0


# --- static limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "request_", "limit", "requested", "allowed"),
    [
        (
            replace(PLENTY, allowed_clusters=frozenset({"beta", "alpha2"})),
            job(cluster="alpha"),
            LimitName.CLUSTER,
            "alpha",
            ["alpha2", "beta"],
        ),
        (
            replace(PLENTY, allowed_partitions=frozenset({"gpu-long", "debug"})),
            job(partition="gpu"),
            LimitName.PARTITION,
            "gpu",
            ["debug", "gpu-long"],
        ),
        (
            replace(PLENTY, allowed_gpu_types=frozenset({"a100", "l40s"})),
            job(gpu_type="h100"),
            LimitName.GPU_TYPE,
            "h100",
            ["a100", "l40s"],
        ),
        (replace(PLENTY, max_gpus_per_job=8), job(gpus=9), LimitName.GPUS_PER_JOB, 9, 8),
        (
            replace(PLENTY, max_time_limit_minutes=2880),
            job(time_limit_minutes=2881),
            LimitName.TIME_LIMIT,
            2881,
            2880,
        ),
    ],
    ids=["cluster", "partition", "gpu_type", "gpus_per_job", "time_limit"],
)
def test_a_static_limit_refuses_naming_what_was_asked_and_allowed(
    policy: QuotaPolicy,
    request_: JobRequest,
    limit: LimitName,
    requested: object,
    allowed: object,
) -> None:
    violation = only_violation(decide(request_, policy, EMPTY))

    assert violation == Violation(limit, requested=requested, allowed=allowed)  # type: ignore[arg-type]
    assert violation.is_static


def test_static_limits_admit_at_their_boundary() -> None:
    policy = replace(
        PLENTY,
        allowed_clusters=frozenset({"alpha"}),
        allowed_partitions=frozenset({"gpu"}),
        allowed_gpu_types=frozenset({"h100"}),
        max_gpus_per_job=8,
        max_time_limit_minutes=2880,
    )

    assert decide(job(gpus=8, time_limit_minutes=2880), policy, EMPTY).admitted


def test_an_empty_allowed_set_allows_nothing_while_none_allows_everything() -> None:
    nothing = replace(PLENTY, allowed_clusters=frozenset())

    assert only_violation(decide(job(), nothing, EMPTY)).allowed == []
    assert decide(job(cluster="anything"), PLENTY, EMPTY).admitted


# --- pending jobs and concurrency ---------------------------------------------------------------


def test_pending_jobs_limit_admits_the_last_place_and_refuses_the_next() -> None:
    policy = replace(PLENTY, max_pending_jobs=3)

    assert decide(job(), policy, replace(EMPTY, pending_jobs=2)).admitted
    violation = only_violation(decide(job(), policy, replace(EMPTY, pending_jobs=3)))

    assert violation == Violation(LimitName.PENDING_JOBS, requested=1, used=3, allowed=3)
    assert not violation.is_static


def test_concurrent_gpus_counts_every_live_gpu_of_the_project() -> None:
    policy = replace(PLENTY, max_concurrent_gpus=64)
    ledger = replace(EMPTY, live_gpus=56, live_gpus_by_cluster={"alpha": 40, "beta": 16})

    assert decide(job(gpus=8), policy, ledger).admitted
    violation = only_violation(decide(job(gpus=9, cluster="beta"), policy, ledger))

    assert violation == Violation(LimitName.CONCURRENT_GPUS, requested=9, used=56, allowed=64)
    assert violation.cluster is None


def test_concurrent_gpus_per_cluster_limits_only_that_cluster() -> None:
    policy = replace(PLENTY, max_concurrent_gpus_per_cluster={"alpha": 32})
    ledger = replace(EMPTY, live_gpus=60, live_gpus_by_cluster={"alpha": 30, "beta": 30})

    assert decide(job(gpus=2, cluster="alpha"), policy, ledger).admitted
    assert decide(job(gpus=500, cluster="beta"), policy, ledger).admitted
    violation = only_violation(decide(job(gpus=3, cluster="alpha"), policy, ledger))

    assert violation == Violation(
        LimitName.CONCURRENT_GPUS, requested=3, used=30, allowed=32, cluster="alpha"
    )


def test_a_cluster_limit_applies_when_the_project_has_nothing_live_there() -> None:
    policy = replace(PLENTY, max_concurrent_gpus_per_cluster={"alpha": 4})

    violation = only_violation(decide(job(gpus=5), policy, EMPTY))

    assert violation.used == 0
    assert violation.allowed == 4


# --- several limits at once ---------------------------------------------------------------------


def test_every_violation_is_reported_static_ones_first() -> None:
    policy = QuotaPolicy(
        budget_gpu_seconds=HOUR,
        max_concurrent_gpus=8,
        max_concurrent_gpus_per_cluster={"alpha": 4},
        max_gpus_per_job=4,
        max_time_limit_minutes=60,
        max_pending_jobs=1,
        allowed_clusters=frozenset({"beta"}),
        allowed_partitions=frozenset({"debug"}),
        allowed_gpu_types=frozenset({"a100"}),
    )
    ledger = LedgerSnapshot(
        used_gpu_seconds=0,
        reserved_gpu_seconds=0,
        live_gpus=4,
        live_gpus_by_cluster={"alpha": 4},
        pending_jobs=1,
    )

    decision = decide(job(gpus=8, time_limit_minutes=120), policy, ledger)

    assert not decision.admitted
    assert decision.reserve_gpu_seconds == 0
    assert [(v.limit, v.cluster) for v in decision.violations] == [
        (LimitName.CLUSTER, None),
        (LimitName.PARTITION, None),
        (LimitName.GPU_TYPE, None),
        (LimitName.GPUS_PER_JOB, None),
        (LimitName.TIME_LIMIT, None),
        (LimitName.PENDING_JOBS, None),
        (LimitName.CONCURRENT_GPUS, None),
        (LimitName.CONCURRENT_GPUS, "alpha"),
        (LimitName.GPU_HOURS, None),
    ]
    assert [v.is_static for v in decision.violations] == [True] * 5 + [False] * 4


def test_decide_refuses_to_reason_about_a_negative_request() -> None:
    with pytest.raises(ValueError, match="gpus"):
        decide(job(gpus=-1), PLENTY, EMPTY)


# --- arrays -------------------------------------------------------------------------------------


def test_an_array_reserves_every_task_and_counts_its_parallel_tasks_as_concurrent() -> None:
    sweep = job(gpus=2, tasks=200, parallel_tasks=16)

    decision = decide(sweep, PLENTY, EMPTY)
    assert decision.reserve_gpu_seconds == 200 * 2 * HOUR

    limited = QuotaPolicy(budget_gpu_seconds=1_000_000 * HOUR, max_concurrent_gpus=31)
    violation = only_violation(decide(sweep, limited, EMPTY))
    assert (violation.limit, violation.requested, violation.allowed) == (
        LimitName.CONCURRENT_GPUS,
        32,
        31,
    )
    assert decide(sweep, replace(limited, max_concurrent_gpus=32), EMPTY).admitted


def test_an_array_the_budget_cannot_hold_is_refused_whole() -> None:
    policy = QuotaPolicy(budget_gpu_seconds=199 * HOUR)
    violation = only_violation(decide(job(tasks=200, parallel_tasks=4), policy, EMPTY))
    assert violation.limit == LimitName.GPU_HOURS
    assert violation.requested == 200.0 and violation.remaining == 199.0


def test_the_per_job_gpu_limit_applies_to_each_task() -> None:
    policy = QuotaPolicy(budget_gpu_seconds=1_000_000 * HOUR, max_gpus_per_job=2)
    assert decide(job(gpus=2, tasks=50, parallel_tasks=50), policy, EMPTY).admitted
