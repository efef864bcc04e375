"""The ledger's running totals (``ledger_used``, ``ledger_live``, ``job_totals``) through random
histories on PostgreSQL: every kind of change the service makes to a charge or a reservation
(admission, sbatch refused, sbatch answer lost and found by tag, starts, ends in several states,
cancels, jobs Slurm lost, charges corrected from sacct, foreign jobs charged, new quota periods
that cut through finished runs), driven through the real service and poller against scripted
clusters. After every step the totals admission, usage and /metrics read must equal what the job
rows give when recomputed from scratch (``ledger.check``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from broker.db.engine import transaction
from broker.db.models import JobRecord, ProjectRecord, QuotaRecord
from broker.errors import QuotaExceeded, SubmitRejected
from broker.metrics.state import read_state
from broker.schemas import JobCreate, QuotaPut
from broker.service import ledger, projects
from broker.service.identity import Actor
from tests.broker.harness import Env, build_env
from tests.pgdb import throwaway_database

CLUSTERS = ("alpha", "beta")
PROJECTS = ("climate", "other")


@pytest.fixture
def env() -> Iterator[Env]:
    with throwaway_database("broker_totals") as url:
        environment = build_env(url, gpu_hours=60.0, identity_settings={"foreign_jobs": "charge"})
        yield environment
        environment.runtime.close()


@dataclass(frozen=True)
class Submit:
    project: int
    cluster: int
    gpus: int
    minutes: int
    outcome: str
    """``ok``, ``refused`` (sbatch says no) or ``lost`` (sbatch ran, its answer was lost)."""


@dataclass(frozen=True)
class Start:
    pick: int
    minutes_ago: int


@dataclass(frozen=True)
class End:
    pick: int
    share: int
    """Thousandths of the time limit it ran (over 1000: sacct reports more than the limit)."""
    state: str


@dataclass(frozen=True)
class Cancel:
    pick: int


@dataclass(frozen=True)
class Lose:
    pick: int


@dataclass(frozen=True)
class Correct:
    pick: int
    share: int


@dataclass(frozen=True)
class Foreign:
    project: int
    cluster: int
    gpus: int
    minutes: int


@dataclass(frozen=True)
class NewPeriod:
    project: int
    minutes_ago: int


Step = Submit | Start | End | Cancel | Lose | Correct | Foreign | NewPeriod

picks = st.integers(min_value=0, max_value=2**16)
which = st.integers(min_value=0, max_value=1)
submits = st.builds(
    Submit,
    which,
    which,
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=10, max_value=240),
    st.sampled_from(["ok", "ok", "ok", "ok", "refused", "lost"]),
)
steps = st.one_of(
    submits,
    submits,
    st.builds(Start, picks, st.integers(min_value=0, max_value=600)),
    st.builds(
        End,
        picks,
        st.integers(min_value=0, max_value=1200),
        st.sampled_from(["COMPLETED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY"]),
    ),
    st.builds(Cancel, picks),
    st.builds(Lose, picks),
    st.builds(Correct, picks, st.integers(min_value=0, max_value=1000)),
    st.builds(
        Foreign,
        which,
        which,
        st.integers(min_value=1, max_value=4),
        st.integers(min_value=0, max_value=120),
    ),
    st.builds(NewPeriod, which, st.integers(min_value=0, max_value=900)),
)


def _body(project: str, cluster: str, gpus: int, minutes: int) -> JobCreate:
    return JobCreate.model_validate(
        {
            "project": project,
            "script": "#!/bin/bash\nsrun true\n",
            "cluster": cluster,
            "gpus": gpus,
            "time_limit_minutes": minutes,
        }
    )


def _jobs(env: Env, *states: str) -> list[tuple[str, str, str]]:
    """(job id, cluster, Slurm id) of the jobs in ``states``, in a stable order."""
    with env.runtime.sessions() as session:
        return [
            (job_id, cluster, slurm_id or "")
            for job_id, cluster, slurm_id in session.execute(
                select(JobRecord.id, JobRecord.cluster, JobRecord.slurm_job_id)
                .where(JobRecord.state.in_(states))
                .order_by(JobRecord.submitted_at, JobRecord.id)
            )
        ]


def _check(env: Env) -> None:
    with env.runtime.sessions() as session:
        assert ledger.check(session) == []
        # What the readers show is what the rows give.
        truth = ledger.recompute(session)
        metrics = read_state(session)
        names = dict(session.execute(select(ProjectRecord.id, ProjectRecord.name)).all())
        # /metrics's job counts and GPUs by group, live ones included, are the rows'.
        counted = {(names[p], c, g, st): jobs[:2] for (p, c, g, st), jobs in truth.groups.items()}
        shown = {key: (group.jobs, group.gpus) for key, group in metrics.groups.items()}
        assert shown == counted
        for name in PROJECTS:
            pid = session.scalars(select(ProjectRecord.id).where(ProjectRecord.name == name)).one()
            quota = session.get_one(QuotaRecord, pid)
            snap = ledger.snapshot(session, pid, quota)
            used = sum(s for (p, _, _, _), s in truth.used.items() if p == pid)
            reserved = sum(r for (p, _), (r, _) in truth.live.items() if p == pid)
            assert (snap.used_gpu_seconds, snap.reserved_gpu_seconds) == (used, reserved)
            assert (metrics.ledgers[name].used, metrics.ledgers[name].reserved) == (used, reserved)
            usage = projects.usage(session, env.admin, name)
            assert usage.used_gpu_hours == pytest.approx(used / 3600, abs=1e-9)


def _put_period(env: Env, project: str, start: datetime) -> None:
    with transaction(env.runtime.sessions) as session:
        projects.put_quota(
            session,
            env.admin,
            project,
            QuotaPut(
                period_start=start,
                period_end=datetime.now(UTC) + timedelta(days=365),
                gpu_hours=60.0,
                gpu_type_weights={"h100": 1.0, "a100": 0.5},
            ),
        )


def _poll_all(env: Env) -> None:
    for cluster in CLUSTERS:
        report = env.runtime.poller.poll(cluster)
        assert report.ok and report.failed_jobs == 0


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=st.lists(steps, min_size=10, max_size=25))
def test_the_totals_equal_the_rows_after_any_history(env: Env, history: list[Step]) -> None:
    actors: dict[str, Actor] = {"climate": env.alice, "other": env.bob}
    users = {"climate": "alice", "other": "bob"}
    poller = env.runtime.poller
    for step in history:
        now = datetime.now(UTC)
        if isinstance(step, Submit):
            project, cluster = PROJECTS[step.project], CLUSTERS[step.cluster]
            fake = env.slurm[cluster]
            if step.outcome == "refused":
                fake.refuse_next_submit = "Requested node configuration is not available"
            fake.lose_next_submit_answer = step.outcome == "lost"
            with contextlib.suppress(QuotaExceeded, SubmitRejected):
                env.runtime.jobs.submit(
                    actors[project], _body(project, cluster, step.gpus, step.minutes), None
                )
            fake.refuse_next_submit, fake.lose_next_submit_answer = None, False
            if step.outcome == "lost":
                _poll_all(env)  # the reconciler finds it by its tag
        elif isinstance(step, Start) and (pending := _jobs(env, "pending")):
            _, cluster, slurm_id = pending[step.pick % len(pending)]
            env.slurm[cluster].start(slurm_id, at=now - timedelta(minutes=step.minutes_ago))
            _poll_all(env)
        elif isinstance(step, End) and (running := _jobs(env, "running")):
            _, cluster, slurm_id = running[step.pick % len(running)]
            fake_job = env.slurm[cluster].jobs[slurm_id]
            elapsed = fake_job.spec.time_limit_minutes * 60 * step.share // 1000
            assert fake_job.started is not None
            env.slurm[cluster].finish(
                slurm_id, step.state, elapsed, at=fake_job.started + timedelta(seconds=elapsed)
            )
            _poll_all(env)
        elif isinstance(step, Cancel) and (live := _jobs(env, "pending", "running")):
            job_id, _, _ = live[step.pick % len(live)]
            env.runtime.jobs.cancel(env.admin, job_id)
            _poll_all(env)
        elif isinstance(step, Lose) and (live := _jobs(env, "pending", "running")):
            _, cluster, slurm_id = live[step.pick % len(live)]
            fake_job = env.slurm[cluster].jobs[slurm_id]
            fake_job.in_squeue = fake_job.in_sacct = False
            for _ in range(env.runtime.settings.poller.missing_polls_before_unknown):
                _poll_all(env)
        elif isinstance(step, Correct) and (
            ended := _jobs(env, "completed", "failed", "timeout", "out_of_memory")
        ):
            _, cluster, slurm_id = ended[step.pick % len(ended)]
            fake_job = env.slurm[cluster].jobs[slurm_id]
            fake_job.elapsed_s = fake_job.spec.time_limit_minutes * 60 * step.share // 1000
            poller._drift_checked.clear()
            _poll_all(env)
        elif isinstance(step, Foreign):
            project, cluster = PROJECTS[step.project], CLUSTERS[step.cluster]
            fake = env.slurm[cluster]
            slurm_id = fake.sbatch_from_a_job(project, users[project], gpus=step.gpus)
            fake.start(slurm_id, at=now - timedelta(minutes=step.minutes))
            _poll_all(env)
            fake.finish(slurm_id, "COMPLETED", step.minutes * 60, at=now)
            _poll_all(env)
        elif isinstance(step, NewPeriod):
            _put_period(env, PROJECTS[step.project], now - timedelta(minutes=step.minutes_ago))
        _check(env)
