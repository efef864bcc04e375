"""The bounded values of the metrics' labels.

Cluster, partition and GPU type come from the configuration and project from the projects table;
every other label takes its values from the fixed lists here, so a series cannot multiply.
"""

from __future__ import annotations

from adapters.errors import AdapterError
from broker.lifecycle import FINAL, LIVE, JobState
from quotas import LimitName

SUBMIT_OUTCOMES = (
    "accepted",
    "replayed",
    "rejected_quota",
    "rejected_policy",
    "invalid",
    "cluster_unavailable",
    "slurm_rejected",
    "unknown",
)
"""What ``BrokerObserver.submission`` reports; anything else is counted as ``other``."""

LIVE_STATES = tuple(s.value for s in JobState if s in LIVE)
FINAL_STATE_NAMES = tuple(s.value for s in JobState if s in FINAL)
LIMITS = tuple(limit.value for limit in LimitName)
COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "sinfo", "sacctmgr", "scontrol")
"""Slurm commands the adapter runs; any other name is labelled ``other``."""
GPU_STATES = ("allocated", "idle", "unavailable")


def error_kinds() -> tuple[str, ...]:
    """Every class in the adapter error hierarchy: the bounded values of the ``kind`` label."""
    seen: list[str] = []
    pending: list[type[AdapterError]] = [AdapterError]
    while pending:
        cls = pending.pop(0)
        if cls.__name__ not in seen:
            seen.append(cls.__name__)
        pending.extend(cls.__subclasses__())
    return tuple(sorted(seen))
