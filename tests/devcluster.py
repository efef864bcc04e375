"""Facts about the local Slurm dev cluster, and its outage switches, for tests.

``deploy/dev-cluster/up.sh`` brings the clusters up and writes ``.dev-cluster/broker.toml``;
``deploy/dev-cluster/ctl.sh`` stops and starts their daemons. Tests that need the cluster call
``cluster(name)``: when the cluster was never brought up they FAIL with the command to run,
they are not skipped (a skipped suite looks green).
"""

from __future__ import annotations

import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

REPO = Path(__file__).resolve().parents[1]
BROKER_TOML = REPO / ".dev-cluster" / "broker.toml"
CTL = REPO / "deploy" / "dev-cluster" / "ctl.sh"

Action = Literal[
    "stop-sshd",
    "start-sshd",
    "stop-slurmctld",
    "start-slurmctld",
    "stop-slurmdbd",
    "start-slurmdbd",
    "status",
]
GLOBAL_ACTIONS = ("stop-slurmdbd", "start-slurmdbd", "status")
"""Actions on the one slurmdbd (or on everything) that take no cluster."""


@dataclass(frozen=True, slots=True)
class DevCluster:
    """How to reach one dev cluster, as broker.toml describes it."""

    name: str
    host: str
    port: int
    user: str
    private_key: Path
    known_hosts: Path
    slurm_conf: Path
    bin_dir: str
    partitions: dict[str, str]
    """Partition name -> GPU type."""
    default_partition: str


def _missing(what: str) -> None:
    pytest.fail(
        f"{what} not found: the Slurm dev cluster is not set up. Run deploy/dev-cluster/up.sh "
        "(as root) first.",
        pytrace=False,
    )


def _load() -> dict[str, Any]:
    if not BROKER_TOML.is_file():
        _missing(str(BROKER_TOML))
    with BROKER_TOML.open("rb") as handle:
        return tomllib.load(handle)


def cluster_names() -> list[str]:
    return sorted(_load().get("clusters", {}))


def cluster(name: str) -> DevCluster:
    """The connection facts of cluster ``name`` (``alpha`` or ``beta``)."""
    clusters = _load().get("clusters", {})
    if name not in clusters:
        pytest.fail(f"cluster {name!r} is not in {BROKER_TOML}", pytrace=False)
    raw = clusters[name]
    partitions = {part: str(conf["gpu_type"]) for part, conf in raw.get("partitions", {}).items()}
    return DevCluster(
        name=name,
        host=str(raw["host"]),
        port=int(raw.get("port", 22)),
        user=str(raw["user"]),
        private_key=Path(raw["private_key"]),
        known_hosts=Path(raw["known_hosts"]),
        slurm_conf=Path(raw["slurm_conf"]),
        bin_dir=str(raw.get("slurm_bin_dir", "/usr/bin")),
        partitions=partitions,
        default_partition=str(raw.get("default_partition", next(iter(partitions), ""))),
    )


def ctl(action: Action, cluster_name: str = "", *, timeout: float = 90.0) -> None:
    """Run ``ctl.sh ACTION [CLUSTER]``; it returns once the daemon is stopped or answers again.
    ``status`` raises unless every daemon runs."""
    if not CTL.is_file():
        _missing(str(CTL))
    if (action in GLOBAL_ACTIONS) == bool(cluster_name):
        raise ValueError(f"ctl.sh {action} takes {'no' if cluster_name else 'a'} cluster name")
    done = subprocess.run(
        [str(CTL), action, *([cluster_name] if cluster_name else [])],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{CTL.name} {action} {cluster_name} exited {done.returncode}:\n"
            f"{done.stdout}\n{done.stderr}"
        )
