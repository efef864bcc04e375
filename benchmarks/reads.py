"""Section 4: the read side with 100,000 jobs in the database, on SQLite and on PostgreSQL.

For each database: seed the history (``benchmarks.seed``), start ``broker serve`` on it, then
drive ``GET /v1/jobs/{id}`` and a filtered ``GET /v1/jobs`` with wrk (32 keep-alive connections,
a warm-up run first), time ``/metrics`` scrapes, and read the server's resident memory.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks.broker_process import (
    BACKENDS,
    BrokerServer,
    fresh_database,
    open_database,
)
from benchmarks.load import run_wrk
from benchmarks.plan import Plan
from benchmarks.seed import seed_history
from benchmarks.slurm import REPO
from broker.metrics import BrokerMetrics

Say = Callable[[str], None]

_MAX_AGE = inspect.signature(BrokerMetrics.attach).parameters.get("max_age")
METRICS_CACHE_S = float(_MAX_AGE.default) if _MAX_AGE is not None else 2.0
"""The broker caches the database-derived series this long; a scrape after it reads the database
again (a "cold" scrape, what Prometheus sees at a scrape interval of 15 s or more)."""


def _check(server: BrokerServer, token: str, path: str) -> int:
    """One request by hand: the endpoint answers 200 with what the benchmark expects."""
    response = httpx.get(
        f"{server.url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    if response.status_code != 200:
        raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
    body = response.json()
    return len(body["data"]) if "data" in body else 1


def _one_at_a_time(
    server: BrokerServer, token: str, paths: dict[str, str], count: int
) -> dict[str, float]:
    """Median milliseconds of ``count`` sequential requests per path, one client, no load: the
    cost of one request, from ``/healthz`` (no database, no token) up."""
    medians = {}
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        for name, path in paths.items():
            samples = []
            for _ in range(count):
                started = time.perf_counter()
                http.get(path).raise_for_status()
                samples.append(time.perf_counter() - started)
            medians[name] = statistics.median(samples) * 1000
    return medians


def scrape_timings(server: BrokerServer, count: int) -> dict[str, Any]:
    """``count`` cold scrapes, each after the cache expired, and a warm one right after each."""
    cold: list[float] = []
    warm: list[float] = []
    size = 0
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for _ in range(count):
            time.sleep(METRICS_CACHE_S + 0.25)
            started = time.perf_counter()
            response = http.get("/metrics")
            cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            http.get("/metrics")
            warm.append(time.perf_counter() - started)
            response.raise_for_status()
            size = len(response.content)
    return {
        "scrapes": count,
        "cold_ms_median": statistics.median(cold) * 1000,
        "cold_ms_max": max(cold) * 1000,
        "warm_ms_median": statistics.median(warm) * 1000,
        "bytes": size,
        "series": sum(
            1 for line in response.text.splitlines() if line and not line.startswith("#")
        ),
    }


def run_reads(plan: Plan, workdir: Path, say: Say, root: Path = REPO) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for backend in BACKENDS:
        with fresh_database(backend, workdir) as url:
            db = open_database(url)
            started = time.perf_counter()
            try:
                history = seed_history(
                    db,
                    jobs=plan.read_jobs,
                    projects=plan.read_projects,
                    researchers=plan.read_researchers,
                )
            finally:
                db.close()
            seeded_s = time.perf_counter() - started
            say(f"  {backend}: {history.jobs} jobs seeded in {seeded_s:.0f} s")
            workers = plan.api_workers if backend == "postgres" else 1
            with BrokerServer(
                url, workdir, f"reads-{backend}", workers=workers, root=root
            ) as server:
                memory_idle = server.memory_kib()
                paths = {
                    "get": [f"/v1/jobs/{job_id}" for job_id in history.visible_job_ids],
                    "list": [
                        f"/v1/jobs?project={project}&state=completed"
                        for project in history.own_projects
                    ],
                }
                endpoints = {}
                for key, key_paths in paths.items():
                    page = _check(server, history.token, key_paths[0])
                    if plan.read_warmup_seconds > 0:
                        run_wrk(
                            server.url,
                            key_paths,
                            history.token,
                            connections=plan.read_clients,
                            duration_s=plan.read_warmup_seconds,
                        )
                    result = run_wrk(
                        server.url,
                        key_paths,
                        history.token,
                        connections=plan.read_clients,
                        duration_s=plan.read_seconds,
                    )
                    endpoints[key] = {**asdict(result), "items_per_response": page}
                    say(
                        f"  {backend} {key}: {result.per_second:.0f} req/s, "
                        f"p99 {result.p99_ms:.0f} ms"
                        + (f", {result.non_2xx} non-2xx" if result.non_2xx else "")
                    )
                single = _one_at_a_time(
                    server,
                    history.token,
                    {
                        "/healthz": "/healthz",
                        "/v1/me": "/v1/me",
                        "get": paths["get"][0],
                        "list": paths["list"][0],
                    },
                    plan.single_requests,
                )
                metrics = scrape_timings(server, plan.metrics_scrapes)
                say(f"  {backend} /metrics: {metrics['cold_ms_median']:.0f} ms cold")
                memory_after = server.memory_kib()
                processes = server.processes()
                served_by = server.workers
        results[backend] = {
            "jobs": history.jobs,
            "seed_s": seeded_s,
            "endpoints": endpoints,
            "one_client_ms": single,
            "metrics": metrics,
            "rss_idle_kib": memory_idle.get("VmRSS", 0),
            "rss_after_kib": memory_after.get("VmRSS", 0),
            "rss_peak_kib": memory_after.get("VmHWM", 0),
            "workers": served_by,
            "processes": processes,
        }
    return {
        "clients": plan.read_clients,
        "seconds": plan.read_seconds,
        "projects": plan.read_projects,
        "researchers": plan.read_researchers,
        "metrics_cache_s": METRICS_CACHE_S,
        "by_backend": results,
    }
