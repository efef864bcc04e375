"""Slurm's job state codes: their long and compact forms and where each is in Slurm's own life of
a job (waiting for an allocation, holding one, ended).

Codes and meanings: "JOB STATE CODES" in https://slurm.schedmd.com/squeue.html#lbAG
(Slurm 22.05). squeue ``State`` and sacct ``State`` print the long form, squeue ``StateCompact``
the compact one; the adapter always reports the long form. What a code means to the broker is the
broker's business (``broker/lifecycle.py``). A code missing here (a newer Slurm) is reported as it
is and counts as not ended, so no job is taken for finished on a code nobody knows.
"""

from __future__ import annotations

from enum import Enum


class Phase(Enum):
    WAITING = "waiting"
    """No allocation yet (or requeued and waiting again)."""
    ACTIVE = "active"
    """Holds an allocation, or may still have processes on it."""
    ENDED = "ended"
    """Over: Slurm will not run it (again)."""


_TABLE: tuple[tuple[str, str, Phase], ...] = (
    # long form          compact  phase
    ("PENDING",          "PD",    Phase.WAITING),
    ("REQUEUED",         "RQ",    Phase.WAITING),   # completing job being requeued
    ("REQUEUE_FED",      "RF",    Phase.WAITING),   # requeued by a federation
    ("REQUEUE_HOLD",     "RH",    Phase.WAITING),   # held job being requeued
    ("RESV_DEL_HOLD",    "RD",    Phase.WAITING),   # held after its reservation was deleted
    ("SPECIAL_EXIT",     "SE",    Phase.WAITING),   # requeued and held by an epilog
    ("CONFIGURING",      "CF",    Phase.ACTIVE),    # allocated, nodes booting
    ("RUNNING",          "R",     Phase.ACTIVE),
    ("COMPLETING",       "CG",    Phase.ACTIVE),    # processes may still run
    ("SUSPENDED",        "S",     Phase.ACTIVE),    # keeps its allocation
    ("STOPPED",          "ST",    Phase.ACTIVE),    # SIGSTOP, keeps its CPUs
    ("SIGNALING",        "SI",    Phase.ACTIVE),
    ("RESIZING",         "RS",    Phase.ACTIVE),
    ("STAGE_OUT",        "SO",    Phase.ACTIVE),    # burst buffer stage-out, not done yet
    ("COMPLETED",        "CD",    Phase.ENDED),
    ("CANCELLED",        "CA",    Phase.ENDED),
    ("REVOKED",          "RV",    Phase.ENDED),     # federation: sibling started elsewhere
    ("FAILED",           "F",     Phase.ENDED),
    ("TIMEOUT",          "TO",    Phase.ENDED),
    ("DEADLINE",         "DL",    Phase.ENDED),     # ended by its --deadline
    ("OUT_OF_MEMORY",    "OOM",   Phase.ENDED),
    ("NODE_FAIL",        "NF",    Phase.ENDED),
    ("BOOT_FAIL",        "BF",    Phase.ENDED),     # launch failed, typically hardware
    ("PREEMPTED",        "PR",    Phase.ENDED),
)  # fmt: skip

PHASES: dict[str, Phase] = {long: phase for long, _, phase in _TABLE}
"""Every known code (long form) to its phase."""

LONG_FORM: dict[str, str] = {compact: long for long, compact, _ in _TABLE}
"""Compact code to long form (``CD`` -> ``COMPLETED``)."""


def slurm_code(raw: str) -> str:
    """The state code of a raw state field, in long form: first token, upper case, no ``+``.

    sacct prints ``CANCELLED by 1234``; some views append ``+`` to a truncated state.
    """
    token = raw.strip().split(" ", 1)[0].rstrip("+").upper()
    return LONG_FORM.get(token, token)


def is_ended(code: str) -> bool:
    """Slurm considers the job over (an unknown code does not count as over)."""
    return PHASES.get(code) is Phase.ENDED


def is_waiting(code: str) -> bool:
    """The job has no allocation yet (its StartTime is at most an estimate)."""
    return PHASES.get(code) is Phase.WAITING
