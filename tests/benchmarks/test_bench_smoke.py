"""The benchmark suite runs end to end (``python -m benchmarks --quick``) and writes every table.

Checks that the report is complete, not what the figures are: the quick run's counts are far too
small for that, and the figures of record come from the full run (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import PLOTS, TABLE_TITLES
from tests import devcluster

pytestmark = pytest.mark.cluster

SECTIONS = ("latency", "throughput", "reads", "polling", "metrics", "mixed")


def test_quick_run_writes_every_table_and_plot(tmp_path: Path) -> None:
    devcluster.cluster("alpha")  # fails with the set-up command when the dev cluster is absent
    if os.geteuid() != 0:
        pytest.fail("the benchmarks run as root (sbatch as slurmsvc, sacctmgr, sdiag)")
    if shutil.which("wrk") is None:
        pytest.fail("wrk is missing: apt-get install wrk (deploy/install-packages.sh installs it)")

    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=devcluster.REPO,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((tmp_path / "performance.json").read_text())
    assert results["mode"] == "quick"
    assert sorted(results["sections"]) == sorted(SECTIONS)
    document = (tmp_path / "performance.md").read_text()
    for title in TABLE_TITLES:
        heading = next(
            (line for line in document.splitlines() if line.startswith(f"## {title}")), None
        )
        assert heading is not None, f"no section {title!r} in the report"
        body = document.split(heading, 1)[1].split("\n## ", 1)[0]
        assert "\n|---|" in body, f"section {title!r} has no table"
    for plot in PLOTS.values():
        assert (tmp_path / plot).stat().st_size > 1000, plot
        assert f"]({plot})" in document
    targets = document.split("## Targets", 1)[1].split("\n## ", 1)[0]
    assert "n/a" not in targets
    assert "not measured" not in targets.replace("not measured (issue)", "")
    mixed = results["sections"]["mixed"]
    assert mixed["errors"] == 0, mixed["first_errors"]
    assert mixed["db_connections"]["samples"] > 0
    assert all(r["processes"] for r in results["sections"]["reads"]["by_backend"].values())
