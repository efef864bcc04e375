"""Why a pending job waits, in words a researcher understands.

Slurm says why a job has not started in one of about a hundred reason codes (``Resources``,
``AssocGrpGRES``, ``JobHeldAdmin``...). The API keeps the code in ``state_reason`` and adds a
category and a one-line message:

- ``resources``: the cluster has no free GPUs (or nodes) of the kind asked for right now;
- ``priority``: other jobs are ahead of this one in Slurm's queue;
- ``quota``: a Slurm limit of the job's account or QOS is full (the site's, not the broker's);
- ``held``: an administrator or the user held the job;
- ``dependency``: the job waits for another job;
- ``other``: anything else, with Slurm's code in the message.

Codes: "JOB REASON CODES" in https://slurm.schedmd.com/squeue.html (Slurm 22.05).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class WaitCategory(StrEnum):
    RESOURCES = "resources"
    PRIORITY = "priority"
    QUOTA = "quota"
    HELD = "held"
    DEPENDENCY = "dependency"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Wait:
    category: WaitCategory
    message: str


_EXACT: dict[str, tuple[WaitCategory, str]] = {
    "Resources": (WaitCategory.RESOURCES, "waiting for GPUs or nodes to free up"),
    "ReqNodeNotAvail": (
        WaitCategory.RESOURCES,
        "waiting for nodes that are down, drained or reserved",
    ),
    "NodeDown": (WaitCategory.RESOURCES, "a node the job needs is down"),
    "Priority": (WaitCategory.PRIORITY, "jobs with a higher priority are ahead in the queue"),
    "Dependency": (WaitCategory.DEPENDENCY, "waiting for the jobs it depends on to finish"),
    "DependencyNeverSatisfied": (
        WaitCategory.DEPENDENCY,
        "the jobs it depends on ended in a way that will never satisfy it; cancel it",
    ),
    "JobHeldAdmin": (WaitCategory.HELD, "held by a cluster administrator"),
    "JobHeldUser": (WaitCategory.HELD, "held by its user"),
    "BeginTime": (WaitCategory.OTHER, "its earliest start time has not come yet"),
    "JobArrayTaskLimit": (
        WaitCategory.OTHER,
        "the array already runs as many tasks at once as it allows",
    ),
    "AccountingPolicy": (WaitCategory.QUOTA, "a limit of the job's Slurm account or QOS is full"),
    "InvalidAccount": (WaitCategory.OTHER, "Slurm does not accept the job's account"),
    "InvalidQOS": (WaitCategory.OTHER, "Slurm does not accept the job's QOS"),
    "PartitionDown": (WaitCategory.OTHER, "the partition is down"),
    "PartitionInactive": (WaitCategory.OTHER, "the partition is inactive"),
    "PartitionNodeLimit": (
        WaitCategory.OTHER,
        "the job asks for more nodes than the partition allows",
    ),
    "PartitionTimeLimit": (WaitCategory.OTHER, "the job's time limit is above the partition's"),
    "Reservation": (WaitCategory.OTHER, "waiting for its advanced reservation to start"),
    "Licenses": (WaitCategory.RESOURCES, "waiting for licences to free up"),
    "Prolog": (WaitCategory.OTHER, "the node's prolog is running"),
}

# Families of codes, by prefix: the association and QOS limits (AssocGrpGRES, AssocMaxJobsLimit,
# QOSGrpGRESRunMinutes, QOSMaxWallDurationPerJobLimit...). Their spelling varies by version; the
# prefix is stable.
_PREFIXES: tuple[tuple[str, WaitCategory, str], ...] = (
    # Slurm 22.05 prints ReqNodeNotAvail as a sentence, or with the node list appended.
    (
        "Nodes required for job are DOWN",
        WaitCategory.RESOURCES,
        "waiting for nodes that are down, drained or reserved",
    ),
    (
        "ReqNodeNotAvail",
        WaitCategory.RESOURCES,
        "waiting for nodes that are down, drained or reserved",
    ),
    ("AssocGrp", WaitCategory.QUOTA, "a group limit of the job's Slurm account is full"),
    ("AssocMax", WaitCategory.QUOTA, "a per-job or per-user limit of the Slurm account applies"),
    ("Association", WaitCategory.QUOTA, "a limit of the job's Slurm association is full"),
    ("QOSGrp", WaitCategory.QUOTA, "a group limit of the job's QOS is full"),
    ("QOSMax", WaitCategory.QUOTA, "a per-job or per-user limit of the job's QOS applies"),
    ("QOS", WaitCategory.QUOTA, "a limit of the job's QOS is full"),
    ("MaxCpuPer", WaitCategory.QUOTA, "a CPU limit of the job's account applies"),
)


def explain(reason: str | None) -> Wait:
    """The category and message of a pending job waiting for Slurm ``reason``."""
    code = (reason or "").strip()
    if not code or code == "None":
        return Wait(WaitCategory.OTHER, "waiting for Slurm to consider the job")
    known = _EXACT.get(code)
    if known is not None:
        category, text = known
        return Wait(category, f"{text} (Slurm: {code})")
    for prefix, category, text in _PREFIXES:
        if code.startswith(prefix):
            return Wait(category, f"{text} (Slurm: {code})")
    return Wait(WaitCategory.OTHER, f"Slurm gives the reason {code}")


def moves_elsewhere_may_help(reason: str | None) -> bool:
    """True when waiting is about the cluster's resources, so another cluster might start the job
    sooner; never for limits, holds or dependencies, which follow the job wherever it goes."""
    return explain(reason).category is WaitCategory.RESOURCES
