"""Pure parsers of Slurm command output into typed values.

Rules (STYLE.md): explicit fields and separator, values zipped to field names, empty and
Slurm's placeholders (``(null)``, ``N/A``, ``None``, ``Unknown``) become ``None``, a state is its
first token. Times are wall-clock times of the cluster's zone (``SLURM_TIME_FORMAT=standard``,
no zone printed); they are returned as aware UTC datetimes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from functools import lru_cache

from adapters.slurm.commands import FIELD_SEPARATOR, SACCT_FIELDS, SINFO_FIELDS, SQUEUE_FIELDS
from adapters.slurm.states import is_waiting, slurm_code
from adapters.slurm.types import AccountingRecord, JobStatus, PartitionCapacity

logger = logging.getLogger(__name__)

_PLACEHOLDERS = frozenset({"", "(null)", "N/A", "None", "Unknown", "n/a"})


class ParseError(ValueError):
    """Output that does not have the expected shape; the client wraps it in SlurmOutputError."""


def decode(raw: bytes) -> str:
    """Slurm output as text; names from other users may not be UTF-8, so bad bytes are replaced."""
    return raw.decode("utf-8", errors="replace")


def value(text: str) -> str | None:
    """A field, with Slurm's placeholders for "nothing" as ``None``."""
    text = text.strip()
    return None if text in _PLACEHOLDERS else text


def records(text: str, fields: Sequence[str], *, trailing: bool) -> Iterator[dict[str, str]]:
    """Split separator-delimited output into one dict per record.

    ``trailing``: every field is followed by the separator (squeue/sinfo ``Field:<sep>``), as
    opposed to sacct's ``--parsable2``, which only puts it between fields. A record with fewer
    fields than expected is joined with the next line: a job name or comment may hold a newline.
    """
    for _, rec in _records(text, fields, trailing=trailing, known=_NOTHING_KNOWN):
        if rec is not None:
            yield rec


_NOTHING_KNOWN: Container[str] = frozenset()


def _records(
    text: str, fields: Sequence[str], *, trailing: bool, known: Container[str]
) -> Iterator[tuple[str, dict[str, str] | None]]:
    """``records``, with each record's text; a one-line record whose text is in ``known`` is
    yielded as ``(line, None)``, unsplit (the caller already has its answer)."""
    expected = len(fields) + (1 if trailing else 0)
    pending: list[str] = []
    for line in text.split("\n"):
        if pending:
            pending.append(line)
            joined = "\n".join(pending)
        elif line in known:
            yield line, None
            continue
        else:  # the common case: a record on one line
            joined = line
        parts = joined.split(FIELD_SEPARATOR)
        if len(parts) < expected:
            if not pending:
                pending.append(line)
            continue
        pending = []
        if len(parts) > expected or (trailing and parts[-1].strip()):
            raise ParseError(f"expected {len(fields)} fields, got {len(parts)}: {joined[:200]!r}")
        yield joined, dict(zip(fields, parts, strict=False))
    leftover = "\n".join(pending).strip()
    if leftover:
        raise ParseError(f"incomplete record at end of output: {leftover[:200]!r}")


# -- scalar fields -------------------------------------------------------------------------------


# A poll reads thousands of lines whose times and TRES strings repeat (jobs submitted in bursts,
# a handful of job shapes): the two parsers below remember recent answers, which are immutable.
# They were 45 % of parsing squeue's output of 5,000 jobs.
@lru_cache(maxsize=16384)
def parse_time(text: str, cluster_tz: tzinfo = UTC) -> datetime | None:
    """``2024-05-01T13:45:00`` in the cluster's zone -> aware UTC; placeholders -> ``None``."""
    text_or_none = value(text)
    if text_or_none is None:
        return None
    try:
        moment = datetime.fromisoformat(text_or_none)
    except ValueError as exc:
        raise ParseError(f"not a Slurm time: {text!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=cluster_tz)
    return moment.astimezone(UTC)


def parse_exit_code(text: str) -> int | None:
    """sacct ``ExitCode`` ``code:signal``; a signal gives ``128 + signal`` as a shell reports it."""
    text_or_none = value(text)
    if text_or_none is None:
        return None
    code, _, signal = text_or_none.partition(":")
    try:
        sig = int(signal) if signal else 0
        return 128 + sig if sig else int(code)
    except ValueError as exc:
        raise ParseError(f"not an exit code: {text!r}") from exc


def parse_duration(text: str) -> int | None:
    """squeue ``TimeUsed`` (``[days-][hours:]minutes:seconds``) in seconds."""
    text_or_none = value(text)
    if text_or_none is None or text_or_none == "INVALID":
        return None
    days, _, clock = text_or_none.rpartition("-")
    try:
        parts = [int(part) for part in clock.split(":")]
        seconds = 0
        for part in parts:
            seconds = seconds * 60 + part
        return seconds + (int(days) * 86400 if days else 0)
    except ValueError as exc:
        raise ParseError(f"not a duration: {text!r}") from exc


def parse_int(text: str) -> int | None:
    text_or_none = value(text)
    if text_or_none is None:
        return None
    try:
        return int(text_or_none)
    except ValueError as exc:
        raise ParseError(f"not an integer: {text!r}") from exc


@dataclass(frozen=True, slots=True)
class GpuTres:
    """GPUs in a TRES string such as ``cpu=4,gres/gpu=2,gres/gpu:h100=2``."""

    count: int
    gpu_type: str | None


@lru_cache(maxsize=1024)
def parse_tres_gpus(text: str | None) -> GpuTres:
    """Total GPUs and their type. The untyped ``gres/gpu`` total wins; a single typed entry names
    the type; with several types (a job spanning GPU kinds), the one with most GPUs does."""
    total: int | None = None
    typed: dict[str, int] = {}
    for item in (text or "").split(","):
        name, _, count = item.strip().partition("=")
        if name == "gres/gpu":
            total = _tres_count(count)
        elif name.startswith("gres/gpu:"):
            typed[name.removeprefix("gres/gpu:")] = _tres_count(count)
    if total is None:
        total = sum(typed.values())
    gpu_type = max(typed, key=lambda key: typed[key]) if typed else None
    return GpuTres(total, gpu_type)


def _tres_count(text: str) -> int:
    # TRES counts are plain integers for GRES; be lenient with a K/M suffix just in case.
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip())
    if not match:
        raise ParseError(f"not a TRES count: {text!r}")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2)]
    return int(match.group(1)) * scale


def parse_gres_gpus(text: str | None) -> dict[str, int]:
    """GPUs per type in a node's ``Gres``/``GresUsed``: ``gpu:h100:8(S:0-1)``,
    ``gpu:a100:2(IDX:0,3),gpu:h100:0(IDX:N/A)``, ``gpu:4``, ``(null)``. Untyped GPUs are
    under ``""``; other GRES (``shard``, ``mps``) are left out."""
    gpus: dict[str, int] = {}
    for item in _split_outside_parens(value(text or "") or ""):
        item = re.sub(r"\(.*\)$", "", item.strip())
        parts = item.split(":")
        if not parts or parts[0] != "gpu" or len(parts) < 2:
            continue
        if len(parts) == 2:
            gpu_type, count = "", parts[1]
        else:
            gpu_type, count = parts[1], parts[2]
        # "gpu:h100:no_consume:8" is not valid Slurm, but a count may carry a K suffix.
        gpus[gpu_type] = gpus.get(gpu_type, 0) + _tres_count(count)
    return gpus


def _split_outside_parens(text: str) -> list[str]:
    items: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(depth - 1, 0)
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if current:
        items.append("".join(current))
    return [item for item in items if item.strip()]


def parse_array_indices(text: str) -> tuple[int, ...]:
    """Slurm's array index expression (``4-19%4``, ``0,3,7-9``, ``0-10:2``) as indices."""
    expression = text.strip().strip("[]").partition("%")[0]
    indices: list[int] = []
    for part in expression.split(","):
        span, _, step_text = part.partition(":")
        first_text, dash, last_text = span.partition("-")
        if not first_text.isdigit() or (dash and not last_text.isdigit()):
            raise ParseError(f"array index expression {text!r}")
        first = int(first_text)
        last = int(last_text) if dash else first
        step = int(step_text) if step_text.isdigit() else 1
        indices.extend(range(first, last + 1, step))
    return tuple(indices)


@dataclass(frozen=True, slots=True)
class ArrayPart:
    """Where one line of squeue or sacct lies in a job array, if it does."""

    array_job_id: str | None = None
    task: int | None = None
    pending: tuple[int, ...] = ()


_NOT_ARRAY = ArrayPart()


def array_part_of_squeue(array_job_id: str, array_task_id: str) -> ArrayPart:
    """From squeue's ``ArrayJobID`` and ``ArrayTaskID`` (``N/A`` for a job that is no array)."""
    task = array_task_id.strip()
    if not task or task == "N/A":
        return _NOT_ARRAY
    array_id = array_job_id.strip()
    if task.isdigit():
        return ArrayPart(array_id, int(task))
    return ArrayPart(array_id, None, parse_array_indices(task))


def array_part_of_sacct(job_id: str) -> ArrayPart:
    """From sacct's ``JobID``: ``123_4`` is task 4 of array 123, ``123_[5-19%4]`` its tasks not
    started yet, ``123`` (or ``123+0``, a heterogeneous job) no array."""
    array_id, underscore, task = job_id.strip().partition("_")
    if not underscore:
        return _NOT_ARRAY
    if task.isdigit():
        return ArrayPart(array_id, int(task))
    return ArrayPart(array_id, None, parse_array_indices(task))


# -- whole outputs -------------------------------------------------------------------------------


def parse_sbatch(text: str) -> tuple[str, str | None]:
    """``sbatch --parsable`` prints ``jobid`` or ``jobid;cluster``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ParseError("sbatch printed no job id")
    job_id, _, cluster = lines[-1].partition(";")
    if not job_id.isdigit():
        raise ParseError(f"sbatch printed {lines[-1]!r}, not a job id")
    return job_id, cluster or None


def parse_squeue(
    text: str, cluster_tz: tzinfo = UTC, memo: SqueueMemo | None = None
) -> list[JobStatus]:
    """One status per job squeue printed.

    ``memo``: the statuses of an earlier output by line (``SqueueMemo``). A line printed the same
    as then is not parsed again: a poll of a queue where little changed costs a dictionary look-up
    per job, not a parse. Which lines change: a running job's ``TimeUsed`` every second, a state or
    a reason when they change; a waiting job's line stays the same.
    """
    known: Mapping[str, JobStatus] = memo.statuses if memo is not None else {}
    statuses = []
    lines: dict[str, JobStatus] = {}
    for line, rec in _records(text, SQUEUE_FIELDS, trailing=True, known=known):
        status = known[line] if rec is None else _squeue_status(rec, cluster_tz)
        statuses.append(status)
        if "\n" not in line:
            lines[line] = status
    if memo is not None:
        memo.statuses = lines  # this output's lines only: the memo never outgrows one output
    return statuses


class SqueueMemo:
    """The statuses of the last squeue output parsed with it, by line (see ``parse_squeue``).

    A status is a pure function of its line and the cluster's time zone, and is immutable, so
    reusing one is exact. The mapping is replaced whole by each parse, never changed in place:
    threads parsing at once each read one complete mapping (the last one written wins).
    """

    __slots__ = ("statuses",)

    def __init__(self) -> None:
        self.statuses: Mapping[str, JobStatus] = {}


def _squeue_status(rec: dict[str, str], cluster_tz: tzinfo) -> JobStatus:
    state = slurm_code(rec["State"])
    # A waiting job's StartTime is slurmctld's estimate (or a year ahead): not a start.
    started = None if is_waiting(state) else parse_time(rec["StartTime"], cluster_tz)
    array = array_part_of_squeue(rec["ArrayJobID"], rec["ArrayTaskID"])
    return JobStatus(
        job_id=rec["JobID"].strip(),
        state=state,
        reason=value(rec["Reason"]),
        name=value(rec["Name"]),
        comment=value(rec["Comment"]),
        account=value(rec["Account"]),
        user=value(rec["UserName"]),
        partition=value(rec["Partition"]),
        alloc_gpus=parse_tres_gpus(value(rec["tres-alloc"])).count,
        elapsed_s=parse_duration(rec["TimeUsed"]),
        submit_time=parse_time(rec["SubmitTime"], cluster_tz),
        start_time=started,
        source="squeue",
        array_job_id=array.array_job_id,
        array_task=array.task,
        array_pending=array.pending,
    )


def parse_sacct(text: str, cluster_tz: tzinfo = UTC) -> list[AccountingRecord]:
    """One record per allocation, in sacct's order. A job id may appear more than once (ids
    restart when a cluster's state is wiped, while its accounting database stays): every record
    is kept, and the caller tells the jobs apart (by submit time, by tag). An ``End`` of
    ``Unknown`` (a job whose end slurmdbd has not been told yet) is ``None``.

    A job that never had an allocation (no ``AllocTRES``, no time run) has no ``start_time``:
    slurmctld sets the start of a job cancelled while pending to its end, and slurmdbd shows that
    ``Start`` a moment after the cancel (``None`` before), so ``Start`` alone cannot tell whether
    it ran."""
    out: list[AccountingRecord] = []
    for rec in records(text, SACCT_FIELDS, trailing=False):
        alloc_tres = value(rec["AllocTRES"])
        elapsed = parse_int(rec["ElapsedRaw"]) or 0
        gpus = parse_tres_gpus(alloc_tres)
        array = array_part_of_sacct(rec["JobID"])
        record = AccountingRecord(
            job_id=rec["JobIDRaw"].strip(),
            name=value(rec["JobName"]),
            account=value(rec["Account"]),
            partition=value(rec["Partition"]),
            state=slurm_code(rec["State"]),
            exit_code=parse_exit_code(rec["ExitCode"]),
            alloc_gpus=gpus.count,
            gpu_type=gpus.gpu_type,
            alloc_tres=alloc_tres,
            elapsed_s=elapsed,
            submit_time=parse_time(rec["Submit"], cluster_tz),
            start_time=parse_time(rec["Start"], cluster_tz) if alloc_tres or elapsed else None,
            end_time=parse_time(rec["End"], cluster_tz),
            comment=value(rec["Comment"]),
            reason=value(rec["Reason"]),
            user=value(rec["User"]),
            array_job_id=array.array_job_id,
            array_task=array.task,
            array_pending=array.pending,
        )
        out.append(record)
    return out


def newest_first(records: Sequence[AccountingRecord]) -> list[AccountingRecord]:
    """Records (of one job id) ordered from the most recently submitted to the oldest."""
    return sorted(records, key=_submitted, reverse=True)


def _submitted(record: AccountingRecord) -> datetime:
    return record.submit_time or datetime.min.replace(tzinfo=UTC)


# Node states (sinfo StateLong, lower case) in which a node's GPUs cannot take new jobs.
# https://slurm.schedmd.com/sinfo.html#SECTION_NODE-STATE-CODES
_UNAVAILABLE_NODE_STATES = frozenset(
    {
        "down", "drain", "drained", "draining", "fail", "failing", "future", "inval",
        "maint", "reboot_issued", "unknown", "unk", "not_responding", "perfctrs", "npc",
    }
)  # fmt: skip
_NODE_STATE_FLAGS = "*~#!%$@^-+"


def node_unavailable(state: str) -> bool:
    """``down*``, ``drained``, ``idle+drain``, ``mixed*`` (not responding) -> True."""
    state = state.strip().lower()
    if state.endswith("*"):  # not responding
        return True
    words = set(re.split(r"[+\s]", state.rstrip(_NODE_STATE_FLAGS)))
    return bool(words & _UNAVAILABLE_NODE_STATES)


def parse_sinfo(text: str) -> list[PartitionCapacity]:
    """GPUs per partition and GPU type. A node that is down, drained or not responding counts
    what its jobs still use as allocated and the rest as unavailable, never as idle."""
    totals: dict[tuple[str, str], list[int]] = {}
    for rec in records(text, SINFO_FIELDS, trailing=True):
        partition = rec["Partition"].strip().rstrip("*")  # '*' marks the default partition
        unavailable = node_unavailable(rec["StateLong"])
        configured = parse_gres_gpus(rec["Gres"])
        used = parse_gres_gpus(rec["GresUsed"])
        for gpu_type, total in configured.items():
            in_use = min(used.get(gpu_type, 0), total)
            row = totals.setdefault((partition, gpu_type), [0, 0, 0, 0, 0, 0])
            row[0] += total
            row[1] += in_use
            row[2] += 0 if unavailable else total - in_use
            row[3] += total - in_use if unavailable else 0
            row[4] += 1
            row[5] += 1 if unavailable else 0
    return [
        PartitionCapacity(
            partition=partition,
            gpu_type=gpu_type,
            gpus_total=row[0],
            gpus_allocated=row[1],
            gpus_idle=row[2],
            gpus_unavailable=row[3],
            nodes_total=row[4],
            nodes_down=row[5],
        )
        for (partition, gpu_type), row in sorted(totals.items())
    ]
