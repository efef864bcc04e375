"""Section 6: a mixed load on PostgreSQL, the way a centre uses the broker at once.

``plan.mixed_researchers`` simulated researchers, each with a token of their own, act for
``plan.mixed_seconds`` seconds: each picks its next request at random (70 % reads of its own jobs:
mostly ``GET /v1/jobs/{id}``, one in seven the first page of its own jobs; 20 % submissions; 10 %
cancellations of one of its jobs still live, a submission when it has none), then pauses for an
exponentially distributed think time (mean ``plan.mixed_think_s``). A scraper reads ``/metrics``
every ``plan.mixed_scrape_every_s`` seconds, and a sampler counts the database's connections
(``pg_stat_activity``) every second. Every submitted job is real (account ``bench``, held pending
by Slurm) and is cancelled at the end.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import make_url, select

from benchmarks.broker_process import (
    BrokerServer,
    add_project,
    add_researcher,
    fresh_database,
    open_database,
)
from benchmarks.plan import Plan
from benchmarks.seed import analyze, insert_jobs, job_row
from benchmarks.slurm import (
    BENCH_ACCOUNT,
    REPO,
    Cluster,
    bench_request,
    cancel_all,
    wait_for_room,
)
from benchmarks.stats import Summary
from broker.clock import utcnow
from broker.db.models import ProjectRecord, UserRecord
from tests.pgdb import SERVER_URL

Say = Callable[[str], None]

GET, LIST, SUBMIT, CANCEL, METRICS = (
    "GET /v1/jobs/{id}",
    "GET /v1/jobs?project&user",
    "POST /v1/jobs",
    "DELETE /v1/jobs/{id}",
    "GET /metrics",
)
ENDPOINTS = (GET, LIST, SUBMIT, CANCEL, METRICS)


class _Tally:
    """Latencies of successful requests and errors, per endpoint."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {name: [] for name in ENDPOINTS}
        self.errors: dict[str, int] = dict.fromkeys(ENDPOINTS, 0)
        self.server_errors: dict[str, int] = dict.fromkeys(ENDPOINTS, 0)
        self.first_errors: list[str] = []

    async def call(
        self,
        endpoint: str,
        expected: int | tuple[int, ...],
        request: Coroutine[Any, Any, httpx.Response],
    ) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = await request
        except httpx.HTTPError as exc:
            self._error(endpoint, f"{endpoint}: {type(exc).__name__}: {exc}")
            return None
        elapsed = time.perf_counter() - started
        if response.status_code not in (expected if isinstance(expected, tuple) else (expected,)):
            if response.status_code >= 500:
                self.server_errors[endpoint] += 1
            self._error(endpoint, f"{endpoint}: {response.status_code} {response.text[:200]}")
            return None
        self.latencies[endpoint].append(elapsed)
        return response

    def _error(self, endpoint: str, text: str) -> None:
        self.errors[endpoint] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(text)


class _ConnectionSampler(threading.Thread):
    """Connections to the broker's database, by state, once a second (``pg_stat_activity``)."""

    def __init__(self, database: str) -> None:
        super().__init__(daemon=True)
        self._database = database
        self._done = threading.Event()
        self.samples: list[dict[str, int]] = []

    def run(self) -> None:
        with psycopg.connect(SERVER_URL, autocommit=True, connect_timeout=5) as conn:
            while not self._done.is_set():
                rows = conn.execute(
                    "SELECT coalesce(state, 'none'), count(*) FROM pg_stat_activity "
                    "WHERE datname = %s GROUP BY 1",
                    (self._database,),
                ).fetchall()
                self.samples.append({str(state): int(count) for state, count in rows})
                self._done.wait(1.0)

    def finish(self) -> dict[str, Any]:
        self._done.set()
        self.join(timeout=10)
        totals = [sum(s.values()) for s in self.samples] or [0]
        active = [s.get("active", 0) for s in self.samples] or [0]
        return {
            "samples": len(self.samples),
            "max": max(totals),
            "mean": statistics.fmean(totals),
            "max_active": max(active),
            "mean_active": statistics.fmean(active),
        }


def _seed(plan: Plan, url: str, cluster: Cluster) -> tuple[list[str], dict[str, list[str]]]:
    """The ``bench`` project with the researchers as members, and a history of their jobs.
    Returns the researchers' tokens and each one's job ids."""
    db = open_database(url)
    try:
        names = [f"researcher{index:03d}" for index in range(plan.mixed_researchers)]
        tokens = [add_researcher(db, name) for name in names]
        add_project(db, BENCH_ACCOUNT, {cluster.name: BENCH_ACCOUNT}, names)
        with db.sessions() as session:
            project_id = session.scalar(
                select(ProjectRecord.id).where(ProjectRecord.name == BENCH_ACCOUNT)
            )
            user_ids = dict(
                session.execute(
                    select(UserRecord.name, UserRecord.id).where(UserRecord.name.in_(names))
                ).all()
            )
        assert project_id is not None
        rng = random.Random(5)
        now = utcnow()
        rows = []
        owned: dict[str, list[str]] = {token: [] for token in tokens}
        for _ in range(plan.mixed_history_jobs):
            index = rng.randrange(len(names))
            row = job_row(
                project_id=project_id,
                user_id=user_ids[names[index]],
                account=BENCH_ACCOUNT,
                state=rng.choice(("completed", "completed", "completed", "failed", "cancelled")),
                submitted_at=now - timedelta(seconds=rng.uniform(600, 90 * 86_400)),
                cluster=cluster.name,
                partition=cluster.partition,
            )
            rows.append(row)
            owned[tokens[index]].append(row["id"])
        insert_jobs(db, rows)
        analyze(db)
        return tokens, owned
    finally:
        db.close()


async def _drive(
    plan: Plan,
    server: BrokerServer,
    cluster: Cluster,
    tokens: list[str],
    owned: dict[str, list[str]],
) -> tuple[_Tally, float]:
    tally = _Tally()
    body = bench_request(cluster)
    limits = httpx.Limits(
        max_connections=len(tokens) + 4, max_keepalive_connections=len(tokens) + 4
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
        end = time.monotonic() + plan.mixed_seconds

        async def researcher(index: int, token: str) -> None:
            rng = random.Random(1000 + index)
            headers = {"Authorization": f"Bearer {token}"}
            mine = list(owned[token])
            live: list[str] = []
            await asyncio.sleep(rng.uniform(0, plan.mixed_think_s))
            while time.monotonic() < end:
                draw = rng.random()
                if draw < 0.7 and mine and rng.random() >= 1 / 7:
                    job_id = rng.choice(mine)
                    await tally.call(GET, 200, http.get(f"/v1/jobs/{job_id}", headers=headers))
                elif draw < 0.7:
                    await tally.call(
                        LIST,
                        200,
                        http.get(
                            "/v1/jobs",
                            params={"project": BENCH_ACCOUNT, "user": f"researcher{index:03d}"},
                            headers=headers,
                        ),
                    )
                elif draw < 0.9 or not live:
                    response = await tally.call(
                        # 202: accepted, queued behind a limit or its sbatch answer awaited
                        SUBMIT,
                        (201, 202),
                        http.post("/v1/jobs", json=body, headers=headers),
                    )
                    if response is not None:
                        job_id = response.json()["id"]
                        mine.append(job_id)
                        live.append(job_id)
                else:
                    job_id = live.pop(rng.randrange(len(live)))
                    await tally.call(
                        CANCEL, 202, http.delete(f"/v1/jobs/{job_id}", headers=headers)
                    )
                await asyncio.sleep(rng.expovariate(1 / plan.mixed_think_s))

        async def scraper() -> None:
            while time.monotonic() < end:
                await tally.call(METRICS, 200, http.get("/metrics"))
                await asyncio.sleep(plan.mixed_scrape_every_s)

        started = time.perf_counter()
        await asyncio.gather(
            scraper(), *(researcher(index, token) for index, token in enumerate(tokens))
        )
        wall = time.perf_counter() - started
    return tally, wall


def run_mixed(
    plan: Plan, cluster: Cluster, workdir: Path, say: Say, root: Path = REPO
) -> dict[str, Any]:
    # Writes are 30 % of what the researchers offer, but a broker on this machine accepts at
    # most some tens of jobs a second: room for that many, not for the offer.
    offered = plan.mixed_researchers / plan.mixed_think_s * 0.3
    expected_submits = int(min(offered, 40.0) * plan.mixed_seconds) + plan.mixed_researchers
    wait_for_room(
        cluster,
        expected_submits,
        keep_free=plan.keep_free_jobs,
        timeout=plan.room_wait_s,
        say=say,
    )
    with fresh_database("postgres", workdir) as url:
        tokens, owned = _seed(plan, url, cluster)
        database = make_url(url).database or ""
        with BrokerServer(url, workdir, "mixed", workers=plan.api_workers, root=root) as server:
            sampler = _ConnectionSampler(database)
            sampler.start()
            cpu_before = server.cpu_s()
            try:
                tally, wall = asyncio.run(_drive(plan, server, cluster, tokens, owned))
            finally:
                connections = sampler.finish()
                cancel_all(cluster)
            cpu = server.cpu_s() - cpu_before
            processes = server.processes()
            workers = server.workers
    endpoints: dict[str, dict[str, Any]] = {}
    for name in ENDPOINTS:
        latencies = tally.latencies[name]
        endpoints[name] = {
            "ok": len(latencies),
            "errors": tally.errors[name],
            "server_errors": tally.server_errors[name],
            "per_second": len(latencies) / wall if wall else 0.0,
            "latency": asdict(Summary.of_seconds(latencies)) if latencies else None,
        }
    ok = sum(e["ok"] for e in endpoints.values())
    errors = sum(e["errors"] for e in endpoints.values())
    say(
        f"  {plan.mixed_researchers} researchers, {wall:.0f} s: {ok / wall:.0f} req/s, "
        f"{errors} errors, up to {connections['max']} database connections"
    )
    return {
        "researchers": plan.mixed_researchers,
        "seconds": plan.mixed_seconds,
        "think_s": plan.mixed_think_s,
        "scrape_every_s": plan.mixed_scrape_every_s,
        "history_jobs": plan.mixed_history_jobs,
        "wall_s": wall,
        "per_second": ok / wall if wall else 0.0,
        "errors": errors,
        "server_errors": sum(e["server_errors"] for e in endpoints.values()),
        "first_errors": tally.first_errors,
        "endpoints": endpoints,
        "db_connections": connections,
        "broker_cpu_s": cpu,
        "workers": workers,
        "processes": processes,
    }
