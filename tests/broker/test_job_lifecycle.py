"""How the broker reacts to each thing Slurm can say, with a scripted cluster (fast, both DBs).

The same behaviours are exercised against the real dev cluster in tests/e2e.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select

from adapters.errors import SlurmUnavailable
from adapters.slurm.types import JobSpec
from broker.clock import utcnow
from broker.db.engine import transaction
from broker.db.models import JobRecord
from broker.errors import (
    ClusterUnavailable,
    Forbidden,
    IdempotencyConflict,
    LimitExceeded,
    NotFound,
    QuotaExceeded,
    SubmitRejected,
)
from broker.lifecycle import JobState
from broker.schemas import JobCreate
from broker.service import ledger, projects, transitions
from broker.service.job_reads import JobFilter
from tests.broker.harness import Env, build_env

SCRIPT = "#!/bin/bash\nsrun python train.py\n"


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url, gpu_hours=100.0)
    yield environment
    environment.runtime.close()


def job(**fields: object) -> JobCreate:
    body: dict[str, object] = {
        "project": "climate",
        "script": SCRIPT,
        "gpus": 8,
        "time_limit_minutes": 60,
        "cluster": "alpha",
    }
    body.update(fields)
    return JobCreate.model_validate(body)


def usage(env: Env) -> tuple[float, float]:
    with env.runtime.sessions() as session:
        u = projects.usage(session, env.admin, "climate")
    return u.used_gpu_hours, u.reserved_gpu_hours


def test_submit_reserves_and_completion_charges_what_sacct_says(env: Env) -> None:
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    assert submitted.state == "pending" and submitted.slurm_job_id is not None
    assert submitted.reserved_gpu_hours == pytest.approx(8.0)
    assert usage(env) == pytest.approx((0.0, 8.0))
    # The job runs as alice: her association with the project's account, not the service account's.
    assert ("climate", "alice") in env.slurm["alpha"].accounts
    assert ("climate", "svc") not in env.slurm["alpha"].accounts

    env.slurm["alpha"].start(submitted.slurm_job_id)
    env.runtime.poller.poll("alpha")
    assert env.runtime.jobs.get(env.alice, submitted.id).state == "running"

    env.slurm["alpha"].finish(submitted.slurm_job_id, "COMPLETED", elapsed_s=900)
    env.runtime.poller.poll("alpha")
    done = env.runtime.jobs.get(env.alice, submitted.id)
    assert done.state == "completed"
    assert done.charged_gpu_hours == pytest.approx(8 * 900 / 3600)
    assert done.reserved_gpu_hours == 0.0
    assert usage(env) == pytest.approx((2.0, 0.0))
    events = [e.to_state for e in env.runtime.jobs.events(env.alice, submitted.id).data]
    assert events == ["submitting", "pending", "running", "completed"]


def test_the_answer_to_a_submission_is_the_job_as_read_back_with_its_events(env: Env) -> None:
    """Recording sbatch's answer (two statements, no ORM) leaves the row, the event and the
    ledger as the general path would, and answers what a later read shows."""
    before = utcnow()
    answer = env.runtime.jobs.submit(env.alice, job(name="rec"), None).job
    assert answer == env.runtime.jobs.get(env.alice, answer.id)
    assert answer.state == "pending" and answer.slurm_job_id in env.slurm["alpha"].jobs
    events = env.runtime.jobs.events(env.alice, answer.id).data
    assert [(e.from_state, e.to_state) for e in events] == [
        (None, "submitting"),
        ("submitting", "pending"),
    ]
    assert events[1].reason == f"sbatch accepted as {answer.slurm_job_id}"
    with env.runtime.sessions() as session:
        row = session.get_one(JobRecord, answer.id)
        assert row.in_slurm_since is not None and row.in_slurm_since >= before
        assert ledger.check(session) == []


def test_a_job_the_reconciler_attached_first_is_answered_not_recorded_twice(env: Env) -> None:
    """sbatch answered after the reconciler found the job by its tag: the submitter answers the
    job as it is (one pending event, the same Slurm id), and cancels nothing."""
    slurm = env.slurm["alpha"]
    sbatch = slurm.submit
    attached: list[str] = []

    def reconciled_meanwhile(spec: JobSpec, *, timeout: float | None = None) -> str:
        slurm_job_id = sbatch(spec, timeout=timeout)
        with transaction(env.runtime.sessions) as session:
            row = session.scalars(select(JobRecord).where(JobRecord.tag == spec.tag)).one()
            transitions.move(
                session, row, JobState.PENDING, "found by tag", slurm_job_id=slurm_job_id
            )
        attached.append(slurm_job_id)
        return slurm_job_id

    slurm.submit = reconciled_meanwhile  # type: ignore[method-assign]
    answer = env.runtime.jobs.submit(env.alice, job(), None).job
    assert attached == [answer.slurm_job_id] and answer.state == "pending"
    events = env.runtime.jobs.events(env.alice, answer.id).data
    assert [e.to_state for e in events] == ["submitting", "pending"]
    assert events[1].reason == "found by tag"
    assert slurm.cancels == []


def test_weight_of_the_gpu_type_applies_to_reservation_and_charge(env: Env) -> None:
    submitted = env.runtime.jobs.submit(env.alice, job(cluster="beta", gpus=4), None).job
    assert submitted.gpu_type == "a100"
    assert submitted.reserved_gpu_hours == pytest.approx(4 * 1.0 * 0.5)
    env.slurm["beta"].finish(submitted.slurm_job_id or "", "COMPLETED", elapsed_s=3600)
    env.runtime.poller.poll("beta")
    assert env.runtime.jobs.get(env.alice, submitted.id).charged_gpu_hours == pytest.approx(2.0)


def test_budget_too_small_is_409_with_numbers_and_nothing_reaches_slurm(env: Env) -> None:
    with pytest.raises(QuotaExceeded) as refused:
        env.runtime.jobs.submit(env.alice, job(gpus=8, time_limit_minutes=60 * 13), None)
    assert refused.value.extra["limit"] == "gpu_hours"
    assert refused.value.extra["requested"] == pytest.approx(104.0)
    assert refused.value.extra["remaining"] == pytest.approx(100.0)
    assert env.slurm["alpha"].submits == 0
    assert usage(env) == (0.0, 0.0)


def test_static_limit_is_422_naming_the_limit(env: Env) -> None:
    with transaction(env.runtime.sessions) as session:
        from datetime import UTC, datetime, timedelta

        from broker.schemas import QuotaPut

        now = datetime.now(UTC)
        projects.put_quota(
            session,
            env.admin,
            "climate",
            QuotaPut(
                period_start=now - timedelta(days=1),
                period_end=now + timedelta(days=1),
                gpu_hours=100,
                max_gpus_per_job=4,
            ),
        )
    with pytest.raises(LimitExceeded) as refused:
        env.runtime.jobs.submit(env.alice, job(gpus=8), None)
    assert refused.value.extra == {"limit": "gpus_per_job", "requested": 8, "allowed": 4}
    assert env.slurm["alpha"].submits == 0


def test_unreachable_cluster_is_503_and_nothing_stays_reserved(env: Env) -> None:
    env.slurm["alpha"].unreachable()
    with pytest.raises(ClusterUnavailable) as refused:
        env.runtime.jobs.submit(env.alice, job(), "key-1")
    assert refused.value.retry_after > 0
    assert usage(env) == (0.0, 0.0)
    # The key is free again: a retry once the cluster is back submits for real.
    env.slurm["alpha"].down = None
    retried = env.runtime.jobs.submit(env.alice, job(), "key-1")
    assert retried.created and retried.job.state == "pending"


def test_sbatch_refusal_is_reported_and_released(env: Env) -> None:
    env.slurm["alpha"].refuse_next_submit = "Requested node configuration is not available"
    with pytest.raises(SubmitRejected) as refused:
        env.runtime.jobs.submit(env.alice, job(), None)
    assert "node configuration" in refused.value.detail
    assert usage(env) == (0.0, 0.0)


def test_lost_sbatch_answer_is_attached_by_tag_never_resubmitted(env: Env) -> None:
    env.slurm["alpha"].lose_next_submit_answer = True
    outcome = env.runtime.jobs.submit(env.alice, job(), None)
    assert outcome.job.state == "submit_unknown"
    assert usage(env)[1] == pytest.approx(8.0)  # still held while unknown
    env.runtime.poller.poll("alpha")
    attached = env.runtime.jobs.get(env.alice, outcome.job.id)
    assert attached.state == "pending"
    assert attached.slurm_job_id in env.slurm["alpha"].jobs
    assert env.slurm["alpha"].submits == 1


def test_submitting_row_left_by_a_crash_is_attached_after_the_grace(database_url: str) -> None:
    env = build_env(database_url, stale_submitting_seconds=5)
    try:
        outcome = env.runtime.jobs.submit(env.alice, job(), None)
        # Simulate the crash: the row never learned its Slurm id, and it was long ago.
        with transaction(env.runtime.sessions) as session:
            row = session.get_one(JobRecord, outcome.job.id)
            row.state, row.slurm_job_id = "submitting", None
            row.submitted_at -= timedelta(seconds=6)
        env.runtime.poller.poll("alpha")
        attached = env.runtime.jobs.get(env.alice, outcome.job.id)
        assert attached.state == "pending" and attached.slurm_job_id == outcome.job.slurm_job_id
        assert env.slurm["alpha"].submits == 1
    finally:
        env.runtime.close()


def test_job_slurm_forgot_becomes_unknown_only_after_several_misses(env: Env) -> None:
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    env.slurm["alpha"].jobs.clear()
    for _ in range(2):
        env.runtime.poller.poll("alpha")
        assert env.runtime.jobs.get(env.alice, submitted.id).state == "pending"
    env.runtime.poller.poll("alpha")
    gone = env.runtime.jobs.get(env.alice, submitted.id)
    assert gone.state == "unknown" and gone.charged_gpu_hours == 0.0
    assert usage(env) == (0.0, 0.0)


def test_cluster_down_during_poll_changes_nothing(env: Env) -> None:
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    env.slurm["alpha"].down = SlurmUnavailable(["squeue"], 1, "Unable to contact slurm controller")
    for _ in range(5):
        report = env.runtime.poller.poll("alpha")
        assert not report.ok
    assert env.runtime.jobs.get(env.alice, submitted.id).state == "pending"
    env.slurm["alpha"].down = None
    env.slurm["alpha"].finish(submitted.slurm_job_id or "", "COMPLETED", elapsed_s=60)
    env.runtime.poller.poll("alpha")
    assert env.runtime.jobs.get(env.alice, submitted.id).state == "completed"


def test_states_never_move_backwards(env: Env) -> None:
    """Stale answers from Slurm reach the poller; none of them moves a job back."""
    fake = env.slurm["alpha"]
    running = env.runtime.jobs.submit(env.alice, job(), None).job
    fake.start(running.slurm_job_id or "")
    env.runtime.poller.poll("alpha")
    assert env.runtime.jobs.get(env.alice, running.id).state == "running"
    # A stale squeue answer (a lagging controller): pending again. Not applied, no event.
    fake.jobs[running.slurm_job_id or ""].state = "PENDING"
    env.runtime.poller.poll("alpha")
    assert env.runtime.jobs.get(env.alice, running.id).state == "running"
    events = [e.to_state for e in env.runtime.jobs.events(env.alice, running.id).data]
    assert events == ["submitting", "pending", "running"]

    # A job settled while the cycle asked Slurm (the API cancelled it, another cycle settled it):
    # the cycle's answer, "running", arrives for a job that is already final.
    fake.jobs[running.slurm_job_id or ""].state = "RUNNING"

    def settled_meanwhile() -> None:
        with transaction(env.runtime.sessions) as session:
            row = session.get_one(JobRecord, running.id)
            transitions.settle(session, row, JobState.COMPLETED, charge_gpu_seconds=60)

    fake.on_statuses = settled_meanwhile
    env.runtime.poller.poll("alpha")
    fake.on_statuses = None
    final = env.runtime.jobs.get(env.alice, running.id)
    assert final.state == "completed" and final.charged_gpu_hours == pytest.approx(60 / 3600)
    events = [e.to_state for e in env.runtime.jobs.events(env.alice, running.id).data]
    assert events == ["submitting", "pending", "running", "completed"]


def test_idempotency_key_returns_the_same_job_and_conflicts_on_a_new_body(env: Env) -> None:
    first = env.runtime.jobs.submit(env.alice, job(), "abc")
    again = env.runtime.jobs.submit(env.alice, job(), "abc")
    assert again.job.id == first.job.id and not again.created
    assert env.slurm["alpha"].submits == 1
    with pytest.raises(IdempotencyConflict):
        env.runtime.jobs.submit(env.alice, job(gpus=4), "abc")


def test_visibility_and_roles(env: Env) -> None:
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    with pytest.raises(NotFound):
        env.runtime.jobs.get(env.bob, submitted.id)
    with pytest.raises(NotFound):
        env.runtime.jobs.cancel(env.bob, submitted.id)
    with pytest.raises(NotFound):
        env.runtime.jobs.submit(env.bob, job(), None)  # bob is not in climate
    assert env.runtime.jobs.get(env.engineer, submitted.id).id == submitted.id
    with pytest.raises(Forbidden):
        env.runtime.jobs.cancel(env.engineer, submitted.id)
    with pytest.raises(Forbidden):
        env.runtime.jobs.submit(env.engineer, job(), None)
    listed = env.runtime.jobs.list(env.bob, JobFilter(), 50, None)
    assert listed.data == []


def test_cancel_is_idempotent_and_settles_through_the_poller(env: Env) -> None:
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    _, accepted = env.runtime.jobs.cancel(env.alice, submitted.id)
    assert accepted and env.slurm["alpha"].cancels == [submitted.slurm_job_id]
    env.runtime.poller.poll("alpha")
    final = env.runtime.jobs.get(env.alice, submitted.id)
    assert final.state == "cancelled" and final.charged_gpu_hours == 0.0
    again, accepted_again = env.runtime.jobs.cancel(env.alice, submitted.id)
    assert not accepted_again and again.state == "cancelled"


def test_list_is_newest_first_and_paginates(env: Env) -> None:
    ids = [env.runtime.jobs.submit(env.alice, job(gpus=1), None).job.id for _ in range(5)]
    first = env.runtime.jobs.list(env.alice, JobFilter(project="climate"), 2, None)
    assert [j.id for j in first.data] == ids[::-1][:2]
    assert first.next_cursor is not None
    rest = env.runtime.jobs.list(env.alice, JobFilter(project="climate"), 10, first.next_cursor)
    assert [j.id for j in rest.data] == ids[::-1][2:]
    assert rest.next_cursor is None


def test_a_charge_sacct_later_accounts_differently_is_corrected(env: Env) -> None:
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    slurm_id = submitted.slurm_job_id or ""
    env.slurm["alpha"].finish(slurm_id, "COMPLETED", elapsed_s=900)
    env.runtime.poller.poll("alpha")
    labels = {"cluster": "alpha", "project": "climate"}
    registry = env.runtime.metrics.registry
    assert registry.get_sample_value("broker_ledger_drift_gpu_seconds", labels) == 0.0
    # Accounting is corrected afterwards (e.g. slurmdbd caught up): the next check corrects the
    # charge, under the ledger lock, with an event; nothing is left as drift.
    env.slurm["alpha"].jobs[slurm_id].elapsed_s = 1000
    env.runtime.poller._drift_checked.clear()
    report = env.runtime.poller.poll("alpha")
    assert report.corrected == 1
    corrected = env.runtime.jobs.get(env.alice, submitted.id)
    assert corrected.state == "completed"
    assert corrected.charged_gpu_hours == pytest.approx(8 * 1000 / 3600)
    assert usage(env)[0] == pytest.approx(8 * 1000 / 3600)
    last = env.runtime.jobs.events(env.alice, submitted.id).data[-1]
    assert "corrected from 7200 to 8000" in (last.reason or "")
    assert registry.get_sample_value("broker_ledger_drift_gpu_seconds", labels) == 0.0


def test_drift_sacct_can_no_longer_explain_is_reported(env: Env) -> None:
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    slurm_id = submitted.slurm_job_id or ""
    env.slurm["alpha"].finish(slurm_id, "COMPLETED", elapsed_s=900)
    env.runtime.poller.poll("alpha")
    env.slurm["alpha"].jobs[slurm_id].in_sacct = False  # purged from accounting
    env.slurm["alpha"].jobs[slurm_id].in_squeue = False
    env.runtime.poller._drift_checked.clear()
    env.runtime.poller.poll("alpha")
    labels = {"cluster": "alpha", "project": "climate"}
    registry = env.runtime.metrics.registry
    assert registry.get_sample_value("broker_ledger_drift_gpu_seconds", labels) == 8 * 900
    assert env.runtime.jobs.get(env.alice, submitted.id).charged_gpu_hours == pytest.approx(2.0)


def test_ended_job_waits_for_its_accounting_and_is_never_charged_zero(env: Env) -> None:
    """squeue says it ended, sacct has no record yet: wait, then charge wall time, never 0."""
    from broker.service.poller import ACCOUNTING_PATIENCE_POLLS

    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    fake = env.slurm["alpha"]
    slurm_id = submitted.slurm_job_id or ""
    from datetime import UTC, datetime, timedelta

    fake.start(slurm_id, at=datetime.now(UTC) - timedelta(minutes=30))
    env.runtime.poller.poll("alpha")
    fake.jobs[slurm_id].state = "COMPLETED"  # End=Unknown, as sacct after a slurmdbd restart
    for _ in range(ACCOUNTING_PATIENCE_POLLS - 1):
        env.runtime.poller.poll("alpha")
    assert env.runtime.jobs.get(env.alice, submitted.id).state == "running"
    env.runtime.poller.poll("alpha")
    settled = env.runtime.jobs.get(env.alice, submitted.id)
    assert settled.state == "completed"
    assert settled.charged_gpu_hours == pytest.approx(8 * 0.5, abs=0.01)  # 8 GPUs, 30 minutes
    events = env.runtime.jobs.events(env.alice, submitted.id).data
    assert "sacct had no final record" in (events[-1].reason or "")


def test_an_end_recorded_before_its_allocation_is_not_charged_zero(env: Env) -> None:
    """After a slurmdbd outage sacct may hold a job's end before its allocation (no GPUs in the
    record): that is not its account; the job waits for the full record and is charged from it."""
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    slurm_id = submitted.slurm_job_id or ""
    fake = env.slurm["alpha"]
    fake.start(slurm_id)
    env.runtime.poller.poll("alpha")
    fake.finish(slurm_id, "COMPLETED", elapsed_s=1, alloc_gpus=0)
    env.runtime.poller.poll("alpha")
    assert env.runtime.jobs.get(env.alice, submitted.id).state == "running"
    fake.jobs[slurm_id].alloc_gpus = 8  # slurmctld resent the allocation
    env.runtime.poller.poll("alpha")
    settled = env.runtime.jobs.get(env.alice, submitted.id)
    assert settled.state == "completed"
    assert settled.charged_gpu_hours == pytest.approx(8 / 3600)


def test_transitions_refuse_to_move_a_job_back(env: Env) -> None:
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    with transaction(env.runtime.sessions) as session:
        row = session.get_one(JobRecord, submitted.id)
        assert transitions.move(session, row, JobState.RUNNING, "started")
        assert not transitions.move(session, row, JobState.PENDING, "stale")
        assert row.state == "running"
        assert transitions.settle(session, row, JobState.COMPLETED, charge_gpu_seconds=100)
        assert not transitions.move(session, row, JobState.RUNNING, "stale")
        assert not transitions.settle(session, row, JobState.FAILED, charge_gpu_seconds=5)
        assert (row.state, row.charged_gpu_seconds) == ("completed", 100)
    events = [e.to_state for e in env.runtime.jobs.events(env.alice, submitted.id).data]
    assert events == ["submitting", "pending", "running", "completed"]


def test_a_pending_job_explains_its_wait_and_a_running_one_does_not(env: Env) -> None:
    submitted = env.runtime.jobs.submit(env.alice, job(), None).job
    slurm_job = env.slurm["alpha"].jobs[str(submitted.slurm_job_id)]
    slurm_job.reason = "AssocGrpGRES"
    env.runtime.poller.poll("alpha")
    pending = env.runtime.jobs.get(env.alice, submitted.id)
    assert pending.state_reason == "AssocGrpGRES"
    assert pending.wait is not None
    assert pending.wait.category == "quota"
    assert "AssocGrpGRES" in pending.wait.message

    env.slurm["alpha"].start(str(submitted.slurm_job_id))
    env.runtime.poller.poll("alpha")
    assert env.runtime.jobs.get(env.alice, submitted.id).wait is None
