"""What the figures were measured on: hardware, operating system, and the versions that matter."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchmarks.slurm import REPO, Cluster
from tests.pgdb import server_version


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _os_name() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.system()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _git() -> str:
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{commit}{' + uncommitted changes' if dirty else ''}"


def describe(cluster: Cluster) -> dict[str, str]:
    try:
        postgres = server_version()
    except Exception as exc:  # the run fails later with the real error; this is a description
        postgres = f"unavailable ({type(exc).__name__})"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
        "memory": f"{_memory_gib():.0f} GiB",
        "os": f"{_os_name()}, Linux {platform.release()}",
        "slurm": cluster.admin("sbatch", "--version").stdout.strip(),
        "openssh": _first_line(["ssh", "-V"]),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": postgres,
        "packages": ", ".join(
            f"{name} {_version(name)}"
            for name in ("fastapi", "uvicorn", "sqlalchemy", "paramiko", "psycopg")
        ),
        "wrk": _first_line(["wrk", "--version"]).split(" [")[0],
        "commit": _git(),
    }
