"""Capture real Slurm output for the parser tests, with the client's own argv (run as root).

    .venv/bin/python tests/adapters/capture_fixtures.py [CLUSTER]

Starts a few short jobs on the dev cluster (account ``dev``), waits for the states it wants,
writes the raw bytes of each command to ``tests/adapters/fixtures/<name>.out`` and cancels what
it started. The argv of every file is in the README next to them.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from adapters.local import LocalRunner
from adapters.slurm import commands
from adapters.slurm.client import SlurmClient
from adapters.slurm.types import JobSpec
from tests.devcluster import cluster

OUT = Path(__file__).parent / "fixtures"


def main() -> None:
    dev = cluster(sys.argv[1] if len(sys.argv) > 1 else "alpha")
    gpu_type = dev.partitions[dev.default_partition]
    workdir = tempfile.mkdtemp(prefix="capture-")
    runner = LocalRunner(extra_env={"SLURM_CONF": str(dev.slurm_conf)}, cwd=workdir)
    client = SlurmClient(runner, cluster=dev.name, bin_dir=dev.bin_dir)
    since = datetime.now(UTC) - timedelta(minutes=1)

    def spec(name: str, script: str, gpus: int, **extra: object) -> JobSpec:
        return JobSpec(
            script=script,
            account="dev",
            partition=dev.default_partition,
            gpus=gpus,
            time_limit_minutes=5,
            tag=f"brk-capture-{name}",
            name=name,
            gpu_type=gpu_type,
            comment="user=capture",
            **extra,  # type: ignore[arg-type]
        )

    started: list[str] = []
    try:
        for job in (
            spec("ok", "#!/bin/sh\nsleep 2\n", 2, cpus_per_gpu=2, mem_per_gpu_gb=4),
            spec("fails", "#!/bin/sh\nexit 3\n", 1),
            spec("runs", "#!/bin/sh\nsleep 120\n", 8),
            spec("cancelled", "#!/bin/sh\nsleep 120\n", 1),
            spec("big", "#!/bin/sh\nsleep 120\n", 32, nodes=4),  # waits for Resources
            spec("next", "#!/bin/sh\nsleep 120\n", 32, nodes=4),  # waits for Priority
        ):
            started.append(client.submit(job))
        client.cancel(started[3])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            report = client.statuses(started)
            if report.found[started[0]].ended and report.found[started[1]].ended:
                break
            time.sleep(0.5)
        time.sleep(1)
        captures = {
            "squeue": commands.squeue(dev.bin_dir, started),
            "sacct": commands.sacct(
                dev.bin_dir,
                cluster=dev.name,
                start=commands.format_time(since, UTC),
                job_ids=started,
            ),
            "sinfo": commands.sinfo(dev.bin_dir),
        }
        readme = ["# Captured by capture_fixtures.py from the dev cluster (Slurm 22.05.8)", ""]
        for name, argv in captures.items():
            result = runner.run(argv)
            (OUT / f"{dev.name}-{name}.out").write_bytes(result.stdout)
            shown = " ".join(argv).replace("\x1f", "\\x1f")
            readme.append(f"- `{dev.name}-{name}.out`: `{shown}`")
        (OUT / f"README-{dev.name}.md").write_text("\n".join(readme) + "\n")
    finally:
        for job_id in started:
            client.cancel(job_id)


if __name__ == "__main__":
    main()
