"""How much each section runs: the full run (minutes, figures for docs/performance.md) and the
quick run (seconds, a smoke test that every part works end to end)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    quick: bool
    latency_rounds: int = 200
    """Section 1: each round submits once per variant (a, b, c on each database)."""
    latency_warmup: int = 5
    latency_pause_s: float = 0.05
    """Between two submissions, so that each meets a controller done with the one before."""
    throughput_jobs: int = 1000
    throughput_clients: int = 16
    throughput_batches: int = 4
    """Each variant's jobs go in this many batches, the variants taking turns, so that all of
    them meet the controller in the same states (it slows down as it holds more jobs)."""
    quiet_jobs: int = 1500
    """Before the latency and throughput sections: wait until slurmctld holds at most this many."""
    quiet_own_jobs: int = 100
    """Before polling: wait until slurmctld holds at most this many jobs of the service account."""
    poll_sizes: tuple[int, ...] = (10, 100, 1000, 5000)
    poll_cycles: int = 5
    """Measured cycles per queue size, after one first cycle that sees the new jobs."""
    submit_workers: int = 8
    """Parallel sbatch processes that fill the queue for section 3."""
    read_jobs: int = 100_000
    read_projects: int = 50
    read_researchers: int = 200
    read_clients: int = 32
    read_seconds: float = 20.0
    read_warmup_seconds: float = 3.0
    metrics_scrapes: int = 5
    single_requests: int = 100
    """Sequential requests per endpoint, one client, for the cost of one request."""
    api_workers: int = 2
    """``broker serve --workers`` for the servers on PostgreSQL, where ``serve`` has the option
    (one process otherwise, and always on SQLite)."""
    metrics_sizes: tuple[int, ...] = (1_000, 100_000, 1_000_000)
    """Jobs in the database for the cold ``/metrics`` scrapes (PostgreSQL), grown in steps."""
    metrics_copy_from: int = 100_000
    """From this many jobs on, the history grows by server-side copies of its rows."""
    mixed_researchers: int = 200
    mixed_seconds: float = 60.0
    mixed_think_s: float = 1.0
    """Mean pause of a simulated researcher between two requests (exponential)."""
    mixed_history_jobs: int = 20_000
    """Jobs already in the database before the mixed load (the researchers' history)."""
    mixed_scrape_every_s: float = 5.0
    background_sample_s: float = 3.0
    """Before each section: how long to watch what the machine does without the benchmark."""
    keep_free_jobs: int = 2000
    """slurmctld job slots (of MaxJobCount) left free for whoever shares the dev cluster."""
    room_wait_s: float = 420.0
    """How long to wait for slurmctld to purge ended jobs (MinJobAge is 300 s) before a step."""


FULL = Plan(quick=False)
QUICK = Plan(
    quick=True,
    latency_rounds=6,
    latency_warmup=1,
    throughput_jobs=32,
    throughput_batches=1,
    quiet_jobs=1_000_000,
    quiet_own_jobs=1_000_000,
    poll_sizes=(10, 40),
    poll_cycles=2,
    read_jobs=2000,
    read_projects=5,
    read_researchers=10,
    read_seconds=1.0,
    read_warmup_seconds=0.0,
    metrics_scrapes=1,
    single_requests=5,
    api_workers=2,
    metrics_sizes=(100, 1000, 3000),
    metrics_copy_from=1000,
    mixed_researchers=8,
    mixed_seconds=4.0,
    mixed_think_s=0.3,
    mixed_history_jobs=500,
    mixed_scrape_every_s=1.0,
    background_sample_s=0.2,
    room_wait_s=30.0,
)
