"""The queue-pass benchmark runs end to end (``python -m benchmarks.queue_pass``, tiny sizes).

Checks that both kinds of pass are measured and printed, not what the figures are (the figures of
record are in benchmarks/analysis.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_tiny_run_prints_a_full_and_an_unchanged_pass_per_size() -> None:
    argv = ["-m", "benchmarks.queue_pass", "--backend", "sqlite", "--jobs", "3,6", "--passes", "2"]
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("sqlite")]
    assert [row[1] for row in rows] == ["3", "6"]
    for row in rows:
        full, unchanged = (float(cell.removesuffix("ms")) for cell in row[2:4])
        assert full > 0 and unchanged > 0
