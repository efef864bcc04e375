"""One fault campaign: clients with retries, a fault schedule, then the invariants against sacct.

The broker runs as its own process (``broker serve`` with its poller) on a throwaway PostgreSQL
database; faults hit one dev cluster (``alpha`` by default) and the one slurmdbd, which other users
of the dev cluster share: every fault is short and every daemon is started again in ``finally``.

Invariants checked once every job is final (``Report.violations`` lists each breach with figures):
- every logical job a client was answered for is one broker job, holding its key, in Slurm (a
  202, sbatch's answer lost, may end ``submit_failed`` when the reconciler finds no Slurm job);
- no key is held by two broker jobs;
- each broker job maps to at most one Slurm job carrying its tag, and it is the one the broker
  recorded; every Slurm job in the project's account carries the tag of a broker job;
- each job's charge is sacct's allocated GPUs x elapsed seconds x weight, to the second, and the
  project's used GPU-seconds are the sum over sacct; nothing stays reserved; used <= budget.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
from sqlalchemy import select

from adapters.slurm.types import AccountingRecord
from broker.db.engine import make_engine, make_session_factory
from broker.db.migrate import upgrade
from broker.db.models import JobRecord, ProjectRecord
from broker.runtime import build_runtime
from broker.service.ledger import LIVE_STATES
from tests import devcluster
from tests.e2e.live import (
    BrokerProcess,
    Client,
    dev_settings,
    job_body,
    new_project,
    seed_users,
)
from tests.pgdb import throwaway_database

log = logging.getLogger(__name__)

FAULTS = ("kill-broker", "sshd", "slurmctld", "slurmdbd")
CHAOS_OVERRIDES: dict[str, Any] = {
    "poller": {"submit_unknown_grace_seconds": 20, "stale_submitting_seconds": 12},
}
"""On top of the e2e overrides (1 s poll cycle, 5 s lease): lost answers resolved within seconds."""
RETRYABLE = {500, 502, 503, 504}


@dataclass(frozen=True)
class Plan:
    duration_s: float = 60.0
    """How long clients submit new logical jobs and faults are injected."""
    clients: int = 8
    cluster: str = "alpha"
    budget_gpu_hours: float = 50.0
    outage_s: tuple[float, float] = (3.0, 6.0)
    """How long each fault lasts (uniform between)."""
    gap_s: tuple[float, float] = (2.0, 6.0)
    """Quiet time between faults."""
    settle_timeout_s: float = 180.0
    """How long to wait, after the last fault, for every job to be final."""
    pause_s: tuple[float, float] = (0.5, 1.5)
    """Each client's pause between logical jobs (the dev cluster is shared)."""
    seed: int | None = None
    faults: tuple[str, ...] = FAULTS
    """The kinds of fault to inject, in a shuffled cycle; empty: a run without faults."""


@dataclass
class LogicalJob:
    key: str
    attempts: int = 0
    job_id: str | None = None
    status: int | None = None
    """The HTTP status of the answer kept (201, 200, 409, ...); ``None``: never answered."""
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class Report:
    plan: Plan
    project: str = ""
    logical: list[LogicalJob] = field(default_factory=list)
    faults: list[tuple[float, str, float]] = field(default_factory=list)
    """(seconds since start, fault, seconds down)."""
    broker_jobs: int = 0
    slurm_jobs: int = 0
    states: Counter[str] = field(default_factory=Counter)
    used_gpu_seconds: int = 0
    sacct_gpu_seconds: int = 0
    reserved_gpu_seconds: int = 0
    budget_gpu_seconds: int = 0
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        answered = Counter(str(job.status) for job in self.logical)
        retried = sum(1 for job in self.logical if job.attempts > 1)
        faults = ", ".join(f"{name}@{at:.0f}s/{down:.1f}s" for at, name, down in self.faults)
        lines = [
            f"project {self.project}: {len(self.logical)} logical jobs from "
            f"{self.plan.clients} clients over {self.plan.duration_s:g} s; "
            f"answers {dict(answered)}, {retried} needed retries",
            f"faults: {faults}",
            f"broker jobs {self.broker_jobs} {dict(self.states)}; Slurm jobs {self.slurm_jobs}",
            f"used {self.used_gpu_seconds} GPU-s, sacct {self.sacct_gpu_seconds} GPU-s, "
            f"reserved {self.reserved_gpu_seconds}, budget {self.budget_gpu_seconds}",
        ]
        if self.violations:
            lines.append(f"{len(self.violations)} VIOLATIONS:")
            lines += [f"  - {v}" for v in self.violations]
        else:
            lines.append("all invariants hold")
        return "\n".join(lines)


def run(plan: Plan) -> Report:
    """Run the campaign of ``plan``; every daemon it stopped is running again when it returns."""
    devcluster.ctl("status")  # refuses to start on a cluster that is already broken
    report = Report(plan)
    rng = random.Random(plan.seed)
    with throwaway_database("broker_chaos") as url:
        engine = make_engine(url)
        upgrade(engine)
        holder = _Sessions(make_session_factory(engine))
        tokens = seed_users(holder)  # type: ignore[arg-type]
        broker = BrokerProcess(url, overrides=CHAOS_OVERRIDES).start()
        try:
            admin = Client(broker.url, tokens["root"])
            report.project = new_project(admin, "alice", gpu_hours=plan.budget_gpu_hours)
            started = datetime.now(UTC) - timedelta(minutes=1)
            with _faults(plan, broker, rng, report):
                _submit_from_clients(plan, broker.url, tokens["alice"], report, rng)
            _wait_until_final(holder, report, plan.settle_timeout_s)
            _check(url, holder, report, started)
        finally:
            broker.stop()
            engine.dispose()
    return report


# -- clients -------------------------------------------------------------------------------------


def _submit_from_clients(
    plan: Plan, url: str, token: str, report: Report, rng: random.Random
) -> None:
    stop_at = time.monotonic() + plan.duration_s
    give_up_at = stop_at + plan.settle_timeout_s / 2
    lock = threading.Lock()

    def client(number: int) -> None:
        local = random.Random(rng.random())
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as http:
            while time.monotonic() < stop_at:
                job = LogicalJob(key=f"chaos-{number}-{uuid.uuid4().hex[:12]}")
                body = job_body(
                    report.project, plan.cluster, seconds=local.randint(1, 3), minutes=1
                )
                _submit_until_answered(http, body, job, give_up_at)
                with lock:
                    report.logical.append(job)
                time.sleep(local.uniform(*plan.pause_s))

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(plan.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _submit_until_answered(
    http: httpx.Client, body: dict[str, Any], job: LogicalJob, give_up_at: float
) -> None:
    """POST with the job's key until the broker gives an answer that is not "try again"."""
    while time.monotonic() < give_up_at:
        job.attempts += 1
        try:
            response = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": job.key})
        except httpx.TransportError as exc:
            job.errors[type(exc).__name__] += 1
            time.sleep(0.5)
            continue
        if response.status_code in RETRYABLE:
            job.errors[str(response.status_code)] += 1
            time.sleep(0.5)
            continue
        job.status = response.status_code
        if response.status_code in (200, 201, 202):  # 202: sbatch's answer lost, or queued
            job.job_id = response.json()["id"]
        else:
            log.info("key %s answered %s: %s", job.key, response.status_code, response.text[:200])
        return


# -- faults --------------------------------------------------------------------------------------


@contextmanager
def _faults(
    plan: Plan, broker: BrokerProcess, rng: random.Random, report: Report
) -> Iterator[None]:
    """Inject faults in a thread while the block runs; restore everything afterwards."""
    done = threading.Event()
    origin = time.monotonic()

    def inject(fault: str, down: float) -> None:
        if fault == "kill-broker":
            broker.kill()
            time.sleep(down)
            broker.start()
            return
        cluster = "" if fault == "slurmdbd" else plan.cluster  # one slurmdbd serves both
        devcluster.ctl(f"stop-{fault}", cluster)  # type: ignore[arg-type]
        try:
            time.sleep(down)
        finally:
            devcluster.ctl(f"start-{fault}", cluster)  # type: ignore[arg-type]

    def schedule() -> None:
        order: list[str] = []
        while not done.wait(rng.uniform(*plan.gap_s)):
            if not plan.faults:
                continue
            if not order:
                order = list(plan.faults)
                rng.shuffle(order)
            fault = order.pop()
            down = rng.uniform(*plan.outage_s)
            at = time.monotonic() - origin
            log.info("fault %s for %.1f s at %.0f s", fault, down, at)
            report.faults.append((at, fault, down))
            inject(fault, down)

    thread = threading.Thread(target=schedule, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=120)
        _restore(plan, broker)


def _restore(plan: Plan, broker: BrokerProcess) -> None:
    for action in ("start-sshd", "start-slurmctld"):
        devcluster.ctl(action, plan.cluster)
    devcluster.ctl("start-slurmdbd")
    if broker.proc is None or broker.proc.poll() is not None:
        broker.start()
    devcluster.ctl("status")


# -- invariants ----------------------------------------------------------------------------------


class _Sessions:
    """What ``seed_users`` needs of a runtime: its session factory."""

    def __init__(self, sessions: Any) -> None:
        self.sessions = sessions


def _jobs(holder: _Sessions, project: str) -> list[JobRecord]:
    with holder.sessions() as session:
        rows = session.scalars(
            select(JobRecord).join(ProjectRecord).where(ProjectRecord.name == project)
        ).all()
        session.expunge_all()
        return list(rows)


def _wait_until_final(holder: _Sessions, report: Report, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        live = [j for j in _jobs(holder, report.project) if j.state in LIVE_STATES]
        if not live:
            return
        if time.monotonic() > deadline:
            states = Counter(j.state for j in live)
            report.violations.append(
                f"{len(live)} jobs still live {timeout:g} s after the last fault: {dict(states)}"
            )
            return
        time.sleep(2)


def _check(url: str, holder: _Sessions, report: Report, since: datetime) -> None:
    jobs = _jobs(holder, report.project)
    by_id = {job.id: job for job in jobs}
    report.broker_jobs = len(jobs)
    report.states = Counter(job.state for job in jobs)
    _check_logical_jobs(report, by_id)

    records = _sacct(url, report.plan.cluster, report.project, since)
    report.slurm_jobs = len(records)
    by_tag: dict[str, list[AccountingRecord]] = {}
    for record in records:
        words = (record.comment or "").split(maxsplit=1)
        tag = words[0] if words else ""
        by_tag.setdefault(tag, []).append(record)
    tags = {job.tag: job for job in jobs}
    for tag, tagged in sorted(by_tag.items()):
        ids = [r.job_id for r in tagged]
        if tag not in tags:
            report.violations.append(
                f"Slurm jobs {ids} in account {report.project} carry no broker job's tag ({tag!r})"
            )
        elif len(tagged) > 1:
            report.violations.append(f"duplicate Slurm jobs {ids} for broker job {tags[tag].id}")

    sacct_total = 0
    for job in jobs:
        tagged = by_tag.get(job.tag, [])
        recorded = [r for r in tagged if r.job_id == job.slurm_job_id]
        if job.slurm_job_id is not None and not recorded:
            report.violations.append(
                f"broker job {job.id} ({job.state}) records Slurm job {job.slurm_job_id}, which "
                f"sacct does not show with its tag (tagged: {[r.job_id for r in tagged]})"
            )
        if job.slurm_job_id is None and tagged:
            report.violations.append(
                f"broker job {job.id} ({job.state}) has no Slurm job but sacct has "
                f"{[r.job_id for r in tagged]} with its tag"
            )
        expected = sum(_charge(r, job.weight) for r in tagged)
        sacct_total += expected
        charged = job.charged_gpu_seconds or 0
        if charged != expected:
            detail = ", ".join(
                f"{r.job_id} {r.state} {r.alloc_gpus} GPUs x {r.elapsed_s} s" for r in tagged
            )
            report.violations.append(
                f"broker job {job.id} ({job.state}) charged {charged} GPU-s, sacct says "
                f"{expected} ({detail or 'no Slurm job'})"
            )
    report.sacct_gpu_seconds = sacct_total
    report.used_gpu_seconds = sum(job.charged_gpu_seconds or 0 for job in jobs)
    report.reserved_gpu_seconds = sum(job.reserved_gpu_seconds for job in jobs)
    report.budget_gpu_seconds = round(report.plan.budget_gpu_hours * 3600)
    if report.used_gpu_seconds != sacct_total:
        report.violations.append(
            f"project used {report.used_gpu_seconds} GPU-s, sacct sums to {sacct_total}"
        )
    if report.reserved_gpu_seconds != 0:
        report.violations.append(f"{report.reserved_gpu_seconds} GPU-s still reserved")
    if report.used_gpu_seconds > report.budget_gpu_seconds:
        report.violations.append(
            f"overspent: used {report.used_gpu_seconds} > budget {report.budget_gpu_seconds}"
        )


def _check_logical_jobs(report: Report, by_id: dict[str, JobRecord]) -> None:
    holders = Counter(job.idempotency_key for job in by_id.values() if job.idempotency_key)
    for key, count in holders.items():
        if count > 1:
            report.violations.append(f"key {key} is held by {count} broker jobs")
    for logical in report.logical:
        if logical.job_id is None:
            continue
        job = by_id.get(logical.job_id)
        if job is None:
            report.violations.append(f"key {logical.key}: answered job {logical.job_id} is lost")
        elif logical.status == 202 and job.state == "submit_failed":
            continue  # sbatch's outcome was unknown and the reconciler found no job: key released
        elif job.idempotency_key != logical.key:
            report.violations.append(
                f"key {logical.key}: job {job.id} holds key {job.idempotency_key!r}"
            )
        elif job.slurm_job_id is None:
            report.violations.append(
                f"key {logical.key}: job {job.id} was answered {logical.status} but is "
                f"{job.state} with no Slurm job"
            )


def _charge(record: AccountingRecord, weight: float) -> int:
    """Allocated GPUs x elapsed seconds x weight, rounded half up (as the broker promises)."""
    exact = Fraction(record.alloc_gpus * record.elapsed_s) * Fraction(weight)
    return int(exact + Fraction(1, 2))


def _sacct(url: str, cluster: str, account: str, since: datetime) -> list[AccountingRecord]:
    """sacct of the project's account, read through the adapter over the dev cluster's sshd."""
    runtime = build_runtime(dev_settings(url))
    try:
        client = runtime.clusters.client(cluster)
        # After a slurmdbd restart slurmctld replays the job ends it queued: until then sacct
        # shows ended jobs with End=Unknown, no comment and an elapsed time that keeps growing.
        # Compare with what sacct settles on, not with that.
        deadline = time.monotonic() + 120
        while True:
            records = _retry(lambda: client.accounting(since, accounts=[account]))
            unsettled = [r.job_id for r in records if not r.ended or r.end_time is None]
            if not unsettled or time.monotonic() > deadline:
                if unsettled:
                    log.warning("sacct still shows jobs %s without an end", unsettled)
                return records
            log.info("sacct has not settled for jobs %s yet", unsettled)
            time.sleep(5)
    finally:
        runtime.clusters.close()
        runtime.engine.dispose()


def _retry(call: Callable[[], list[AccountingRecord]]) -> list[AccountingRecord]:
    for attempt in range(10):
        try:
            return call()
        except Exception as exc:  # the daemons were just restarted: give them a moment
            if attempt == 9:
                raise
            log.info("sacct failed (%s), again in 3 s", exc)
            time.sleep(3)
    raise AssertionError("unreachable")
