"""A scrape of 100,000 jobs reports exact totals, on both backends.

How long it takes is a benchmark figure (benchmarks/, docs/performance.md), not a test assertion: a
timed assertion fails on a loaded machine and proves nothing about the code. The time is printed.
"""

from __future__ import annotations

import random
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from broker.metrics import BrokerMetrics
from tests.metrics.seed import (
    Database,
    Scrape,
    add_jobs,
    add_project,
    job_row,
    make_database,
    partition,
    set_cluster_status,
    temporary_postgres,
)

JOBS = 100_000
PROJECTS = 50


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_cold_scrape_of_100k_jobs_is_exact(backend: str, tmp_path: Path) -> None:
    with ExitStack() as stack:
        url = (
            f"sqlite:///{tmp_path}/big.db"
            if backend == "sqlite"
            else stack.enter_context(temporary_postgres())
        )
        db = make_database(url)
        stack.callback(db.close)
        scrape_many_jobs(db, backend)


def scrape_many_jobs(db: Database, backend: str) -> None:
    names = [f"project-{i:02d}" for i in range(PROJECTS)]
    for name in names:
        add_project(db, name, budget=10**9)
    rng = random.Random(7)
    states = ["completed"] * 80 + ["failed"] * 8 + ["cancelled"] * 6 + ["running"] * 4
    states += ["pending"] * 2
    rows = []
    for _ in range(JOBS):
        state = rng.choice(states)
        cluster, gpu_type = rng.choice([("alpha", "h100"), ("beta", "a100")])
        gpus = rng.choice([1, 2, 4, 8])
        final = state not in ("running", "pending")
        elapsed = rng.randint(1, 86_400) if final else None
        rows.append(
            job_row(
                db,
                rng.choice(names),
                cluster=cluster,
                gpu_type=gpu_type,
                state=state,
                gpus=gpus,
                reserved=0 if final else gpus * 3600,
                charged=gpus * elapsed if elapsed is not None else None,
                elapsed=elapsed,
            )
        )
    add_jobs(db, rows)
    set_cluster_status(db, "alpha", partitions=[partition("gpu", "h100", 32, allocated=8)])
    set_cluster_status(db, "beta", partitions=[partition("gpu", "a100", 8, allocated=2)])
    metrics = BrokerMetrics()
    collector = metrics.attach(db.sessions, db.settings, max_age=0)

    timings = []
    for _ in range(3):
        started = time.perf_counter()
        scrape = Scrape(metrics.registry)
        timings.append(time.perf_counter() - started)
    read = collector.state().read_seconds
    print(
        f"\n{backend}, {JOBS} jobs: scrape {min(timings) * 1000:.0f} ms (best of 3), "
        f"{max(timings) * 1000:.0f} ms (worst); database read {read * 1000:.0f} ms"
    )

    expected = sum(r["charged_gpu_seconds"] or 0 for r in rows)
    assert scrape.total("broker_project_used_gpu_seconds") == expected
    assert scrape.total("broker_jobs_finished_total") + scrape.total("broker_jobs") == JOBS
