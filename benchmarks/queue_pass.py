"""What one pass of the admission queue costs as a project's queue grows (no cluster needed).

    python -m benchmarks.queue_pass                       # PostgreSQL and SQLite, 100 to 5,000
    python -m benchmarks.queue_pass --backend postgres --jobs 10000

A project at its concurrency limit has N jobs queued (admitted through ``JobService.submit``, the
real path, against the tests' scripted cluster: nothing here reaches Slurm). Then, side by side
in one run, the same pass twice over:

- **full**: the pass reads and checks every queued job (what every pass did before the pass
  remembered its inputs), forced by forgetting them before each pass;
- **unchanged**: the pass finds the project's quota, ledger and queue shape as the last pass left
  them and stops there (what a cycle costs while nothing frees up).

Each figure is the median of ``--passes`` passes, wall time in this process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.broker_process import BACKENDS, Backend, fresh_database
from broker.schemas import JobCreate
from tests.broker.harness import build_env, set_quota

SCRIPT = "#!/bin/bash\nsrun python train.py\n"


def _median_ms(passes: int, before_each: Callable[[], None], run: Callable[[], object]) -> float:
    samples = []
    for _ in range(passes):
        before_each()
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def measure(backend: Backend, queued: int, passes: int, workdir: Path) -> tuple[float, float]:
    """(full, unchanged) median ms of a pass over ``queued`` queued jobs of one project."""
    with fresh_database(backend, workdir) as url:
        env = build_env(url, gpu_hours=10_000_000.0, queue={"starvation_seconds": 86_400})
        try:
            set_quota(env, max_concurrent_gpus=8, gpu_hours=10_000_000.0)
            body = JobCreate.model_validate(
                {
                    "project": "climate",
                    "script": SCRIPT,
                    "gpus": 8,
                    "time_limit_minutes": 60,
                    "cluster": "alpha",
                }
            )
            for _ in range(queued + 1):  # the first one runs; the rest wait for its 8 GPUs
                env.runtime.jobs.submit(env.alice, body, None)
            queue = env.runtime.queue
            queue.release()
            full = _median_ms(passes, queue.forget, queue.release)
            unchanged = _median_ms(passes, lambda: None, queue.release)
            if queue.release().released:
                raise RuntimeError("a pass released a job: the project was not at its limit")
            return full, unchanged
        finally:
            env.runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, action="append")
    parser.add_argument("--jobs", default="100,1000,5000", help="queued jobs, comma-separated")
    parser.add_argument("--passes", type=int, default=9)
    args = parser.parse_args()
    sizes = [int(n) for n in args.jobs.split(",")]
    print(f"{'database':<10} {'queued':>7} {'full pass':>10} {'unchanged':>10} {'ratio':>7}")
    with tempfile.TemporaryDirectory(prefix="queue-pass-") as tmp:
        for backend in args.backend or BACKENDS:
            for queued in sizes:
                full, unchanged = measure(backend, queued, args.passes, Path(tmp))
                print(
                    f"{backend:<10} {queued:>7} {full:>8.1f}ms {unchanged:>8.1f}ms "
                    f"{full / unchanged:>6.1f}x"
                )


if __name__ == "__main__":
    main()
