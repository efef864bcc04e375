"""The sweeps and queue benchmark runs end to end (``python -m benchmarks.sweeps --quick``).

Checks that every measurement is made and reported, not what the figures are (the quick run is
far too small for that; the figures of record are in docs/performance.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import devcluster

pytestmark = pytest.mark.cluster


def test_quick_run_measures_every_variant_and_the_release_latency(tmp_path: Path) -> None:
    devcluster.cluster("alpha")  # fails with the set-up command when the dev cluster is absent
    if os.geteuid() != 0:
        pytest.fail("the benchmarks run as root (sbatch as slurmsvc, sacctmgr)")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sweeps", "--quick", "--out", str(tmp_path)],
        cwd=devcluster.REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "sweeps.json").read_text())
    variants = [row["variant"] for row in result["sweeps"]]
    assert len(variants) == 3 and "array" in variants[0]
    assert all(row["wall_s"] > 0 and row["tasks"] == 20 for row in result["sweeps"])
    assert result["sweeps"][0]["broker_cpu_s"] is not None
    (queue,) = result["queue"]
    assert queue["queued"] == 5 and queue["releases"] == 2
    assert 0 < queue["settle_to_sbatch_ms_p50"] <= queue["scancel_to_sbatch_ms_p50"]
    text = (tmp_path / "sweeps.md").read_text()
    assert "## 7. Sweeps and the admission queue" in text and "| 5 | 2 |" in text
