"""Section 5: a cold ``/metrics`` scrape as the job history grows (PostgreSQL).

One database grows through ``plan.metrics_sizes`` jobs (rows built like section 4's up to
``plan.metrics_copy_from`` jobs, then copies of those made by PostgreSQL; ``ANALYZE`` after each
step); one
``broker serve`` answers throughout, and at each size the run times scrapes that follow a pause
longer than the broker's cache of the database-derived series, as a Prometheus scrape at its
usual interval does. Flat means the scrape costs the same at a thousand jobs as at a million.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.broker_process import BrokerServer, fresh_database, open_database
from benchmarks.plan import Plan
from benchmarks.reads import scrape_timings
from benchmarks.seed import add_history, copy_history, seed_people
from benchmarks.slurm import REPO

Say = Callable[[str], None]


def run_metrics_scale(plan: Plan, workdir: Path, say: Say, root: Path = REPO) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    rng = random.Random(11)
    with fresh_database("postgres", workdir) as url:
        db = open_database(url)
        try:
            people = seed_people(
                db, projects=plan.read_projects, rng=rng, researchers=plan.read_researchers
            )
            have = 0
            server: BrokerServer | None = None
            try:
                for size in sorted(plan.metrics_sizes):
                    started = time.perf_counter()
                    if have >= plan.metrics_copy_from:
                        copy_history(db, size - have)  # server-side: a million rows in seconds
                    else:
                        add_history(db, people, size - have, rng=rng)
                    seeded_s = time.perf_counter() - started
                    have = size
                    if server is None:
                        server = BrokerServer(
                            url, workdir, "metrics", workers=plan.api_workers, root=root
                        ).start()
                        # Connections, statement caches, first-use imports: not what is measured.
                        httpx.get(f"{server.url}/metrics", timeout=120).raise_for_status()
                    timings = scrape_timings(server, plan.metrics_scrapes)
                    rows.append({"jobs": size, "seed_s": seeded_s, **timings})
                    say(
                        f"  {size:,} jobs: /metrics cold {timings['cold_ms_median']:.0f} ms "
                        f"(seeded in {seeded_s:.0f} s)"
                    )
            finally:
                if server is not None:
                    server.stop()
        finally:
            db.close()
    return {"backend": "postgres", "by_size": rows}
