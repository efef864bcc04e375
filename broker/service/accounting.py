"""When a Slurm record is a job's final account, and how long that account says it ran.

One rule for a whole job (the poller) and for an array's task (``arrays.follow``) alike: only a
sacct record that knows the end, and, for a job that ran, knows its GPUs, is charged from; and one
rule for the GPU count that account is charged at, for settling and for the drift check alike.
"""

from __future__ import annotations

from adapters.slurm.types import JobStatus
from broker.lifecycle import JobState, from_slurm


def accounted_elapsed(status: JobStatus) -> int | None:
    """Seconds an ended job ran by a sacct record that knows its end; None until there is one.

    squeue's view of an ended job and a sacct record with ``End=Unknown`` (slurmdbd restarted and
    not yet told the end; its ``ElapsedRaw`` keeps counting) are not final accounts. Nor is a
    record of a job that ran (it took time, or ended other than cancelled) with no GPUs in it:
    slurmdbd has the end and not yet the allocation, which slurmctld resends after an outage.
    Every broker job asks for at least one GPU, so such a record is never the last word.
    """
    if status.source != "sacct" or status.end_time is None:
        return None
    if status.alloc_gpus == 0 and (
        status.elapsed_s or from_slurm(status.state) != JobState.CANCELLED
    ):
        return None
    if status.start_time is None:
        return 0  # never started: nothing to charge
    if status.elapsed_s is not None:
        return status.elapsed_s
    return max(0, int((status.end_time - status.start_time).total_seconds()))


def charged_gpus(alloc_gpus: int | None, asked: int, elapsed_s: int) -> int:
    """The GPU count an ended job (or task) is charged at, for ``elapsed_s`` seconds of run.

    The record's allocation when it has one. A record without it (squeue's view, or an old
    sacct) stands for what the job asked for, and so does an allocation of 0 for a job that ran:
    that is a record whose allocation never arrived, charged only once the broker gave up
    waiting for it (``accounted_elapsed`` does not accept it as final). A job that never ran
    held no GPUs.
    """
    if alloc_gpus is None or (alloc_gpus == 0 and elapsed_s > 0):
        return asked
    return alloc_gpus
