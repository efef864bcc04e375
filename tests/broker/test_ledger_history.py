"""The real ledger through random histories: submissions, refusals, starts, ends, cancels and new
quota periods, driven through the service against scripted clusters, on both databases.

After every step the project's ledger (what admission reads) must equal a recomputation from its
job rows and a model of the history, admission must refuse exactly what the budget cannot take, and
use plus reservations never exceed the budget.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from broker.db.engine import transaction
from broker.db.models import JobRecord, ProjectRecord, QuotaRecord
from broker.errors import QuotaExceeded, SubmitRejected
from broker.schemas import JobCreate, ProjectCreate, QuotaPut
from broker.service import ledger, projects, reports
from broker.service.ledger import LIVE_STATES
from quotas import charge_gpu_seconds, charged_within, reservation_gpu_seconds
from tests.broker.harness import Env, build_env

WEIGHTS = {"h100": 1.0, "a100": 0.5}
GPU_TYPE = {"alpha": "h100", "beta": "a100"}
MINUTE = timedelta(minutes=1)


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    environment = build_env(database_url)
    yield environment
    environment.runtime.close()


@dataclass(frozen=True)
class Submit:
    cluster: str
    gpus: int
    minutes: int
    refused_by_slurm: bool = False
    starts: bool = True
    """Slurm starts it at once (at the history's clock)."""


@dataclass(frozen=True)
class Start:
    pick: int


@dataclass(frozen=True)
class End:
    pick: int
    share: int
    """Thousandths of the time limit it ran."""
    new_period_at: int | None = None
    """Thousandths of its run after which a new period opened (None: none did)."""


@dataclass(frozen=True)
class Cancel:
    pick: int


@dataclass(frozen=True)
class NewPeriod:
    pass


@dataclass(frozen=True)
class Wait:
    minutes: int


Step = Submit | Start | End | Cancel | NewPeriod | Wait

picks = st.integers(min_value=0, max_value=2**16)
submits = st.builds(
    Submit,
    st.sampled_from(["alpha", "beta"]),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=15, max_value=240),
    st.integers(min_value=0, max_value=5).map(lambda i: i == 0),  # sbatch refuses 1 in 6
    st.booleans(),
)
# Repeats weigh the draw towards what makes histories interesting: jobs that start, and periods
# that open while they run.
steps = st.one_of(
    submits,
    submits,
    st.builds(Start, picks),
    st.builds(End, picks, st.integers(min_value=0, max_value=1000)),
    st.builds(
        End,
        picks,
        st.integers(min_value=1, max_value=1000),
        st.integers(min_value=1, max_value=999),
    ),
    st.builds(Cancel, picks),
    st.just(NewPeriod()),
    st.builds(Wait, st.integers(min_value=1, max_value=300)),
)


@dataclass
class ModelJob:
    id: str
    slurm_id: str
    cluster: str
    reservation: int
    started: datetime | None = None


@dataclass
class Model:
    budget: int
    period_start: datetime
    clock: datetime
    live: list[ModelJob] = field(default_factory=list)
    ended: list[tuple[int, datetime | None, datetime]] = field(default_factory=list)
    """(charge, started, ended) of every finished job."""

    def used(self) -> int:
        return sum(
            charged_within(charge, started, ended, self.period_start, None)
            for charge, started, ended in self.ended
        )


def new_project(env: Env, budget_hours: int, period_start: datetime) -> str:
    name = f"h-{uuid.uuid4().hex[:10]}"
    with transaction(env.runtime.sessions) as session:
        projects.create_project(
            session,
            env.admin,
            ProjectCreate(name=name, slurm_accounts={"alpha": name, "beta": name}),
            {"alpha", "beta"},
        )
    put_quota(env, name, budget_hours, period_start)
    return name


def put_quota(env: Env, name: str, budget_hours: int, period_start: datetime) -> None:
    with transaction(env.runtime.sessions) as session:
        projects.put_quota(
            session,
            env.admin,
            name,
            QuotaPut(
                period_start=period_start,
                period_end=datetime.now(UTC) + timedelta(days=365),
                gpu_hours=budget_hours,
                gpu_type_weights=WEIGHTS,
            ),
        )


def check(env: Env, name: str, model: Model) -> None:
    with env.runtime.sessions() as session:
        project_id = session.scalars(select(ProjectRecord.id).where(ProjectRecord.name == name))
        pid = project_id.one()
        quota = session.get_one(QuotaRecord, pid)
        snap = ledger.snapshot(session, pid, quota)
        rows = list(session.scalars(select(JobRecord).where(JobRecord.project_id == pid)))
        report = reports.usage(session, env.admin, "project", quota.period_start, quota.period_end)
        everything = reports.usage(session, env.admin, "project", None, None)
        # The running totals admission, usage and /metrics read are exactly the rows' sums.
        assert ledger.check(session) == []
    # Recomputed from the job rows, one by one.
    used_rows = sum(
        charged_within(r.charged_gpu_seconds, r.started_at, r.ended_at, quota.period_start, None)
        for r in rows
        if r.charged_gpu_seconds is not None and r.ended_at is not None
    )
    reserved_rows = sum(r.reserved_gpu_seconds for r in rows if r.state in LIVE_STATES)
    assert (snap.used_gpu_seconds, snap.reserved_gpu_seconds) == (used_rows, reserved_rows)
    # ... and from the model of the history.
    assert snap.used_gpu_seconds == model.used()
    assert snap.reserved_gpu_seconds == sum(job.reservation for job in model.live)
    assert snap.used_gpu_seconds + snap.reserved_gpu_seconds <= model.budget
    # The report over the period says the same; over all time, every charge once.
    mine = {row.key: row.gpu_hours for row in report.data}.get(name, 0.0)
    assert mine == pytest.approx(snap.used_gpu_seconds / 3600, abs=1e-9)
    total = {row.key: row.gpu_hours for row in everything.data}.get(name, 0.0)
    assert total == pytest.approx(sum(c for c, _, _ in model.ended) / 3600, abs=1e-9)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    budget_hours=st.integers(min_value=10, max_value=80),
    history=st.lists(steps, min_size=8, max_size=20),
)
def test_the_ledger_follows_any_history_exactly_and_never_overspends(
    env: Env, budget_hours: int, history: list[Step]
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=10)
    name = new_project(env, budget_hours, start)
    model = Model(budget=budget_hours * 3600, period_start=start, clock=start + MINUTE)
    jobs = env.runtime.jobs

    for step in history:
        pending = [j for j in model.live if j.started is None]
        running = [j for j in model.live if j.started is not None]
        if isinstance(step, Submit):
            fake = env.slurm[step.cluster]
            body = JobCreate.model_validate(
                {
                    "project": name,
                    "script": "#!/bin/bash\nsrun true\n",
                    "cluster": step.cluster,
                    "gpus": step.gpus,
                    "time_limit_minutes": step.minutes,
                }
            )
            reservation = reservation_gpu_seconds(
                step.gpus, step.minutes, WEIGHTS[GPU_TYPE[step.cluster]]
            )
            with env.runtime.sessions() as session:
                pid = session.scalars(
                    select(ProjectRecord.id).where(ProjectRecord.name == name)
                ).one()
                snap = ledger.snapshot(session, pid, session.get(QuotaRecord, pid))
            fits = snap.used_gpu_seconds + snap.reserved_gpu_seconds + reservation <= model.budget
            if step.refused_by_slurm:
                fake.refuse_next_submit = "Requested node configuration is not available"
            try:
                submitted = jobs.submit(env.admin, body, None).job
            except QuotaExceeded:
                assert not fits
            except SubmitRejected:
                assert fits and step.refused_by_slurm
            else:
                assert fits and not step.refused_by_slurm
                admitted = ModelJob(
                    submitted.id, submitted.slurm_job_id or "", step.cluster, reservation
                )
                model.live.append(admitted)
                if step.starts:
                    fake.start(admitted.slurm_id, at=model.clock)
                    env.runtime.poller.poll(step.cluster)
                    admitted.started = model.clock
            fake.refuse_next_submit = None
        elif isinstance(step, Start) and pending:
            job = pending[step.pick % len(pending)]
            env.slurm[job.cluster].start(job.slurm_id, at=model.clock)
            env.runtime.poller.poll(job.cluster)
            job.started = model.clock
        elif isinstance(step, End) and running:
            job = running[step.pick % len(running)]
            fake_job = env.slurm[job.cluster].jobs[job.slurm_id]
            elapsed = fake_job.spec.time_limit_minutes * 60 * step.share // 1000
            assert job.started is not None
            ended = job.started + timedelta(seconds=elapsed)
            if step.new_period_at is not None:
                boundary = job.started + timedelta(seconds=elapsed * step.new_period_at / 1000)
                if boundary > model.period_start:
                    put_quota(env, name, budget_hours, boundary)
                    model.period_start = boundary
            env.slurm[job.cluster].finish(job.slurm_id, "COMPLETED", elapsed, at=ended)
            env.runtime.poller.poll(job.cluster)
            weight = WEIGHTS[GPU_TYPE[job.cluster]]
            model.live.remove(job)
            model.ended.append(
                (charge_gpu_seconds(fake_job.spec.gpus, elapsed, weight), job.started, ended)
            )
            model.clock = max(model.clock, ended)
        elif isinstance(step, Cancel) and pending:
            job = pending[step.pick % len(pending)]
            jobs.cancel(env.admin, job.id)
            env.runtime.poller.poll(job.cluster)
            model.live.remove(job)
        elif isinstance(step, NewPeriod):
            model.clock += MINUTE
            put_quota(env, name, budget_hours, model.clock)
            model.period_start = model.clock
        elif isinstance(step, Wait):
            model.clock += step.minutes * MINUTE
        check(env, name, model)
