"""The one table from Slurm job state codes to the broker's ``JobState``.

Codes and meanings: "JOB STATE CODES" in https://slurm.schedmd.com/squeue.html#lbAG
(Slurm 22.05). Both the long form (squeue ``State``, sacct ``State``) and the compact form
(squeue ``StateCompact``) are keys. A job that still holds or may still get an allocation is never
final here: COMPLETING is ``running`` (processes may still be active), the requeue and hold states
are ``pending``. A code missing from the table maps to ``unknown`` with a warning, never to
``running``, so a new Slurm version cannot make the broker believe a job runs for ever.
"""

from __future__ import annotations

import logging

from adapters.slurm.types import JobState

logger = logging.getLogger(__name__)

_TABLE: tuple[tuple[str, str, JobState], ...] = (
    # long form          compact  broker state
    ("PENDING",          "PD",    JobState.PENDING),
    ("REQUEUED",         "RQ",    JobState.PENDING),    # completing job being requeued
    ("REQUEUE_FED",      "RF",    JobState.PENDING),    # requeued by a federation
    ("REQUEUE_HOLD",     "RH",    JobState.PENDING),    # held job being requeued
    ("RESV_DEL_HOLD",    "RD",    JobState.PENDING),    # held after its reservation was deleted
    ("SPECIAL_EXIT",     "SE",    JobState.PENDING),    # requeued and held by an epilog
    ("CONFIGURING",      "CF",    JobState.RUNNING),    # allocated, nodes booting
    ("RUNNING",          "R",     JobState.RUNNING),
    ("COMPLETING",       "CG",    JobState.RUNNING),    # not final: processes may still run
    ("SUSPENDED",        "S",     JobState.RUNNING),    # keeps its allocation
    ("STOPPED",          "ST",    JobState.RUNNING),    # SIGSTOP, keeps its CPUs
    ("SIGNALING",        "SI",    JobState.RUNNING),
    ("RESIZING",         "RS",    JobState.RUNNING),
    ("STAGE_OUT",        "SO",    JobState.RUNNING),    # burst buffer stage-out, not done yet
    ("COMPLETED",        "CD",    JobState.COMPLETED),
    ("CANCELLED",        "CA",    JobState.CANCELLED),
    ("REVOKED",          "RV",    JobState.CANCELLED),  # federation: sibling started elsewhere
    ("FAILED",           "F",     JobState.FAILED),
    ("TIMEOUT",          "TO",    JobState.TIMEOUT),
    ("DEADLINE",         "DL",    JobState.TIMEOUT),    # ended by its --deadline
    ("OUT_OF_MEMORY",    "OOM",   JobState.OUT_OF_MEMORY),
    ("NODE_FAIL",        "NF",    JobState.NODE_FAIL),
    ("BOOT_FAIL",        "BF",    JobState.NODE_FAIL),  # launch failed, typically hardware
    ("PREEMPTED",        "PR",    JobState.PREEMPTED),
)  # fmt: skip

SLURM_STATES: dict[str, JobState] = {
    code: state for long, compact, state in _TABLE for code in (long, compact)
}
"""Every known code, long and compact, to the broker's state."""

LONG_FORM: dict[str, str] = {compact: long for long, compact, _ in _TABLE}
"""Compact code to long form (``CD`` -> ``COMPLETED``)."""


def slurm_code(raw: str) -> str:
    """The state code of a raw state field: first token, upper case, no ``+`` decoration.

    sacct prints ``CANCELLED by 1234``; some views append ``+`` to a truncated state.
    """
    token = raw.strip().split(" ", 1)[0].rstrip("+").upper()
    return LONG_FORM.get(token, token)


def job_state(raw: str) -> JobState:
    """The broker state of a raw Slurm state field; an unknown code gives ``UNKNOWN``, logged."""
    code = slurm_code(raw)
    state = SLURM_STATES.get(code)
    if state is None:
        logger.warning("unknown Slurm job state %r; reporting it as unknown", raw)
        return JobState.UNKNOWN
    return state
