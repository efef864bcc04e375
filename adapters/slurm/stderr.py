"""What Slurm's stderr means: unavailable, job unknown, job already ended, refused, or nothing.

Slurm 22.05's commands say why they failed only in English on stderr, and some print a warning
and still exit 0. This module is the one place that reads that text; the client turns its verdict
into errors (``SlurmUnavailable``, ``CommandFailed`` with ``reason``) and the broker uses those,
never the text. Captured stderr of the real commands is in ``tests/fixtures/slurm/*.stderr``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class StderrKind(StrEnum):
    UNAVAILABLE = "unavailable"
    """slurmctld or slurmdbd could not be asked (down, restarting, overloaded): retry later and
    conclude nothing about jobs, even if the command exited 0 with some output."""
    JOB_UNKNOWN = "job_unknown"
    """The controller answered that it does not know the job id (``Invalid job id specified``)."""
    JOB_ENDED = "job_ended"
    """The job already ended (``Job/step already completing or completed``), e.g. for scancel."""
    RUN_AS_REFUSED = "run_as_refused"
    """sudo would not run the command as the user (unknown there, outside the allowed group, no
    rule): nothing ran."""
    REFUSED = "refused"
    """The command ran and Slurm said no, for a reason of its own (``reason``): do not retry."""
    OK = "ok"
    """Exit 0 and nothing on stderr that changes the meaning of the output."""


# Lower-case fragments of stderr lines that mean "Slurm could not be asked", not "the answer is
# no", as Slurm 22.05 prints them when slurmctld or slurmdbd is down, restarting or overloaded.
# A query that prints one of these may have printed partial output: it counts as unavailable
# even when it exits 0.
_UNAVAILABLE = (
    "socket timed out",
    "unable to contact slurm controller",
    "slurm_load_",  # slurm_load_jobs/partitions/node error: ... (except an invalid job id)
    "connection refused",
    "connection timed out",
    "connection reset",
    "problem talking to the database",
    "zero bytes were transmitted",
    "communication connection failure",
    "backup controller in standby",
    "slurmdbd not responding",
    "failed to open persistent connection",
)
# These are also printed while a command retries by itself and then succeeds ("Slurm temporarily
# unable to accept job, sleeping and retrying"): they count only when the command failed.
_UNAVAILABLE_IF_FAILED = (
    "temporarily unable to accept job",
    "resource temporarily unavailable",
    "database is busy",
)
# What sudo 1.9 prints when it will not run a command as the user.
_RUN_AS_REFUSED = (
    "sudo: unknown user",
    "a password is required",
    "is not allowed to execute",
    "a terminal is required",
)
_JOB_UNKNOWN = "invalid job id specified"
_JOB_ENDED = "already completing or completed"
# "Socket timed out" means the request may have reached the controller and been acted on
# (sbatch: the job may exist); "Unable to contact" means it never got there.
_MAY_HAVE_ACTED = "socket timed out"

_ERROR_PREFIX = re.compile(r"^(?:[\w.-]+: )?(?:error: |[\w.]+ error: )", re.IGNORECASE)
_REASON_LIMIT = 200


@dataclass(frozen=True, slots=True)
class StderrVerdict:
    kind: StderrKind
    line: str | None = None
    """The stderr line that decided the kind, stripped (``None`` for ``OK``)."""
    reason: str | None = None
    """Slurm's own one-line explanation, without the program's prefix, safe to show a user
    (``Invalid account or account/partition combination specified``)."""
    may_have_acted: bool = False
    """For ``UNAVAILABLE``: the request may have reached the controller and taken effect."""


def classify(stderr: str, *, exit_code: int) -> StderrVerdict:
    """The meaning of a Slurm command's stderr, given its exit code."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    failed = exit_code != 0
    if failed:
        refused = next(
            (line for line in lines if any(m in line.lower() for m in _RUN_AS_REFUSED)), None
        )
        if refused is not None:
            return StderrVerdict(StderrKind.RUN_AS_REFUSED, refused, reason_of(refused))
    line = unavailable_line(stderr, failed=failed)
    if line is not None:
        # Slurm prints the detail first and its summary last ("Problem talking to the database").
        last = unavailable_line("\n".join(reversed(lines)), failed=failed) or line
        return StderrVerdict(
            StderrKind.UNAVAILABLE,
            line,
            reason_of(last),
            may_have_acted=_MAY_HAVE_ACTED in stderr.lower(),
        )
    for kind, marker in (
        (StderrKind.JOB_UNKNOWN, _JOB_UNKNOWN),
        (StderrKind.JOB_ENDED, _JOB_ENDED),
    ):
        found = next((line for line in lines if marker in line.lower()), None)
        if found is not None:
            return StderrVerdict(kind, found, reason_of(found))
    if failed:
        first = next((line for line in lines if _ERROR_PREFIX.match(line)), None)
        first = first or (lines[0] if lines else None)
        return StderrVerdict(StderrKind.REFUSED, first, reason_of(first) if first else None)
    return StderrVerdict(StderrKind.OK)


def unavailable_line(stderr: str, *, failed: bool = True) -> str | None:
    """The first stderr line saying the controller or database could not be reached, if any."""
    markers = _UNAVAILABLE + (_UNAVAILABLE_IF_FAILED if failed else ())
    for line in stderr.splitlines():
        lowered = line.lower()
        if any(marker in lowered for marker in markers) and _JOB_UNKNOWN not in lowered:
            return line.strip()
    return None


def reason_of(line: str) -> str:
    """Slurm's explanation in one stderr line: ``sbatch: error: Batch job submission failed: X``
    and ``slurm_load_jobs error: X`` give ``X``; ``Kill job error on job id 5: X`` gives ``X``."""
    text = _ERROR_PREFIX.sub("", line.strip(), count=1)
    for lead in ("Batch job submission failed:", "Kill job error on job id"):
        if text.startswith(lead):
            text = text.removeprefix(lead)
            if lead.endswith("job id"):
                text = text.split(":", 1)[-1]
    return text.strip()[:_REASON_LIMIT]
