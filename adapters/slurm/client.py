"""``SlurmClient``: Slurm commands run through any ``CommandRunner``, with typed results.

The client builds argv lists (``commands``), runs them through the runner it was given (local
subprocess or SSH: the client does not know which), classifies stderr (``stderr``: the controller
or the database unreachable, even when the exit code is 0; a job unknown; a refusal and its
reason) and parses the output (``parse``).
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import TypeVar

from adapters.errors import (
    CommandFailed,
    RunAsRefused,
    SlurmOutputError,
    SlurmUnavailable,
    SubmitMisrouted,
)
from adapters.runner import CommandResult, CommandRunner
from adapters.slurm import commands
from adapters.slurm.parse import (
    ParseError,
    SqueueMemo,
    decode,
    newest_first,
    parse_sacct,
    parse_sbatch,
    parse_sinfo,
    parse_squeue,
)
from adapters.slurm.stderr import StderrKind, StderrVerdict, classify
from adapters.slurm.types import (
    AccountingRecord,
    JobSpec,
    JobStatus,
    PartitionCapacity,
    StatusReport,
    tag_of,
)

logger = logging.getLogger(__name__)

_SACCTMGR_UNSPECIFIED = "unspecified error"
"""sacctmgr's "Problem adding users: Unspecified error": slurmdbd did not do it, said not why."""
SACCTMGR_ADD_ATTEMPTS = 4
"""How often an add slurmdbd could not do now is tried (``SlurmClient._sacctmgr_add``)."""
SACCTMGR_ADD_BACKOFF_SECONDS = 0.25
"""Wait before the next try: this times the number of tries so far (0.25, 0.5, 0.75 s)."""


class _AddNotDoneNow(SlurmUnavailable):
    """``sacctmgr add`` answered "Unspecified error": nothing was refused, and the add is safe
    to repeat; callers see a ``SlurmUnavailable`` once the tries are spent."""


T = TypeVar("T")

CommandObserver = Callable[[str, float, BaseException | None], None]
"""Called after every command with (command name such as ``sbatch``, seconds, error or None)."""


def _status_from_record(record: AccountingRecord) -> JobStatus:
    return JobStatus(
        job_id=record.job_id,
        state=record.state,
        reason=record.reason,
        name=record.name,
        comment=record.comment,
        alloc_gpus=record.alloc_gpus,
        exit_code=record.exit_code,
        elapsed_s=record.elapsed_s,
        submit_time=record.submit_time,
        start_time=record.start_time,
        end_time=record.end_time,
        source="sacct",
        account=record.account,
        user=record.user,
        partition=record.partition,
        array_job_id=record.array_job_id,
        array_task=record.array_task,
        array_pending=record.array_pending,
    )


def _array_tasks(
    in_queue: Sequence[JobStatus], in_accounting: Sequence[AccountingRecord]
) -> dict[str, dict[int, JobStatus]]:
    """Every task of each array, by index: squeue's view of a live task, else the task's newest
    sacct record (which is what it is charged from); tasks not started yet from the one line
    that holds them all."""
    tasks: dict[str, dict[int, JobStatus]] = {}

    def put(status: JobStatus, replace: bool) -> None:
        assert status.array_job_id is not None
        of_array = tasks.setdefault(status.array_job_id, {})
        for index in _indices(status):
            if replace or index not in of_array:
                of_array[index] = dataclasses.replace(status, array_task=index, array_pending=())

    # Ids restart when a controller's state is wiped while accounting keeps the old jobs: of
    # the arrays sacct holds under one id, only the newest is this one (an array's tasks all
    # carry its submit time). Of its records, a task's own comes first: the line of the tasks
    # not started yet may be older news.
    newest: dict[str, datetime] = {}
    submitted: list[tuple[str | None, datetime | None]] = [
        (item.array_job_id, item.submit_time) for item in in_queue
    ] + [(item.array_job_id, item.submit_time) for item in in_accounting]
    for array_id, at in submitted:
        if (
            array_id is not None
            and at is not None
            and (array_id not in newest or at > newest[array_id])
        ):
            newest[array_id] = at
    current = [
        r
        for r in in_accounting
        if r.submit_time is None
        or r.array_job_id is None
        or r.submit_time >= newest.get(r.array_job_id, r.submit_time)
    ]
    for record in sorted(newest_first(current), key=lambda r: r.array_task is None):
        put(_status_from_record(record), replace=False)
    for status in in_queue:
        held = tasks.get(status.array_job_id or "", {})
        accounted = [held[i] for i in _indices(status) if i in held]
        # sacct lags slurmctld a little: trust squeue's final state until sacct has one.
        if not status.ended or not all(a.ended for a in accounted) or not accounted:
            put(status, replace=True)
    return tasks


def _indices(status: JobStatus) -> tuple[int, ...]:
    return (status.array_task,) if status.array_task is not None else status.array_pending


def _has_tag(comment: str | None, tag: str) -> bool:
    return tag_of(comment) == tag


@dataclass(frozen=True, slots=True)
class FileChunk:
    """Bytes of a file read as its owner: ``data`` from ``offset``, and the file's ``size``."""

    offset: int
    size: int
    data: bytes


def _run_as_of(argv: Sequence[str]) -> str | None:
    """The user a ``sudo -n -u USER -- ...`` argv runs as, or None for a plain command."""
    if len(argv) > 3 and posixpath.basename(argv[0]) == "sudo" and argv[2] == "-u":
        return argv[3]
    return None


def _program(argv: Sequence[str]) -> str:
    """The program's name for logs and metrics: ``sbatch`` for ``sudo ... -- /usr/bin/sbatch``."""
    if _run_as_of(argv) is not None and "--" in argv:
        rest = argv[list(argv).index("--") + 1 :]
        if rest:
            return posixpath.basename(rest[0])
    return posixpath.basename(argv[0])


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class SlurmClient:
    """Submits, follows, cancels and accounts jobs on one Slurm cluster through a runner.

    ``cluster`` is the Slurm ``ClusterName`` (for sacct and sacctmgr). ``cluster_tz`` is the zone
    the cluster's clocks print in: Slurm prints local wall-clock time without a zone, so times are
    read in that zone and returned in UTC (the dev cluster and most HPC centres' machines run UTC,
    the default). Thread-safe if the runner is.
    """

    def __init__(
        self,
        runner: CommandRunner,
        *,
        cluster: str,
        bin_dir: str = "/usr/bin",
        timeout: float = 30.0,
        observer: CommandObserver | None = None,
        cluster_tz: tzinfo = UTC,
    ) -> None:
        self.runner = runner
        self.cluster = commands.check_word("cluster", cluster)
        self.bin_dir = bin_dir
        self.timeout = timeout
        self.cluster_tz = cluster_tz
        self._observer = observer
        self._squeue_memo = SqueueMemo()
        """The last squeue output's statuses by line: an unchanged line is not parsed again."""
        self._count_lock = threading.Lock()
        self.commands_run = 0
        """Commands run by this client so far (for metrics and benchmarks)."""

    # -- jobs ------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec, *, timeout: float | None = None) -> str:
        """Submit ``spec`` with ``sbatch --parsable`` (script on stdin); returns the job id.
        ``timeout``: at most this long instead of the client's command timeout (a submitter
        whose job the reconciler may soon look for gives sbatch only the time left before then).

        Raises ``ValueError`` for a spec that cannot be submitted safely (before running
        anything), ``CommandFailed`` when Slurm refuses the job, and ``SlurmUnavailable`` when
        the controller cannot be reached, with ``may_have_run`` set only when sbatch's socket
        timed out (the controller may have queued the job: find it by its tag before retrying).
        """
        argv = commands.sbatch(self.bin_dir, spec)
        script = commands.batch_script(spec)

        def read(result: CommandResult) -> str:
            self._require_success(result)
            job_id, cluster = parse_sbatch(decode(result.stdout))
            if cluster is not None and cluster != self.cluster:
                # The job went to another cluster than the one admitted: it must not run.
                logger.error(
                    "%s: sbatch placed %s on cluster %s as %s; cancelling it",
                    self.cluster,
                    spec.tag,
                    cluster,
                    job_id,
                )
                self._command(
                    self._maybe_as(spec.run_as, commands.scancel_on(self.bin_dir, job_id, cluster)),
                    self._read_cancel(job_id),
                    side_effects=True,
                )
                raise SubmitMisrouted(argv, job_id, cluster)
            return job_id

        job_id = self._command(argv, read, stdin=script, side_effects=True, timeout=timeout)
        logger.info("%s: submitted %s as job %s", self.cluster, spec.tag, job_id)
        return job_id

    def statuses(
        self, job_ids: Iterable[str], *, accounts: Sequence[str] | None = None
    ) -> StatusReport:
        """Where each job is: one squeue, then one sacct for the jobs squeue does not hold alive.

        Jobs squeue shows in a final state (it keeps them for ``MinJobAge``) are looked up in
        sacct too, for their accounting; if sacct does not have them yet, squeue's view is kept.
        Ids neither command knows are ``missing`` (never "completed"). Where sacct holds several
        jobs under one id, the newest is ``found`` and the others are in ``earlier``: the caller
        tells them apart by tag. Any failure raises: no
        partial report, so an outage never makes jobs look gone. Two commands at most, whatever
        the number of ids (up to ``MAX_IDS_PER_ARGUMENT``, beyond which sacct is chunked).

        With ``accounts``, squeue reads every job charged to them (one command however many ids)
        and the jobs not asked about are in ``others``: jobs in those accounts that the caller did
        not submit, or not yet know it did.
        """
        ids = list(dict.fromkeys(commands.check_job_id(job_id) for job_id in job_ids))
        if not ids and not accounts:
            return StatusReport(found={}, missing=frozenset(), commands=0)
        wanted = set(ids)
        queue = self._squeue(ids, accounts)
        live = {s.job_id: s for s in queue if s.job_id in wanted}
        in_arrays = [s for s in queue if s.array_job_id in wanted]
        arrays = {s.array_job_id for s in in_arrays if s.array_job_id is not None}
        others = tuple(s for s in queue if s.job_id not in wanted and s.array_job_id not in wanted)
        ran = 1
        found = {job_id: status for job_id, status in live.items() if not status.ended}
        earlier: dict[str, tuple[JobStatus, ...]] = {}
        # An array's ended tasks are read from sacct while others still run.
        to_account = [job_id for job_id in ids if job_id not in found or job_id in arrays]
        in_accounting: list[AccountingRecord] = []
        if to_account:
            accounted: dict[str, list[AccountingRecord]] = {}
            for chunk in _chunks(to_account, commands.MAX_IDS_PER_ARGUMENT):
                for record in self._sacct(start=commands.STATUS_LOOKBACK, job_ids=chunk):
                    if record.array_job_id in wanted:
                        in_accounting.append(record)
                    if record.job_id in wanted and record.job_id not in found:
                        accounted.setdefault(record.job_id, []).append(record)
                ran += 1
            for job_id, records in accounted.items():
                newest, *older = (_status_from_record(r) for r in newest_first(records))
                found[job_id] = newest
                if older:
                    earlier[job_id] = tuple(older)
            for job_id in to_account:
                status = found.get(job_id)
                in_queue = live.get(job_id)
                # sacct lags slurmctld a little: trust squeue's final state until sacct has one.
                if in_queue is not None and (status is None or not status.ended):
                    found[job_id] = in_queue
        missing = frozenset(wanted - found.keys())
        return StatusReport(
            found=found,
            missing=missing,
            earlier=earlier,
            others=others,
            commands=ran,
            tasks=_array_tasks(in_arrays, in_accounting),
        )

    def find_by_tag(
        self, tag: str, since: datetime, *, accounts: Sequence[str] | None = None
    ) -> list[JobStatus]:
        """Jobs whose comment starts with ``tag``, live (squeue) or submitted/ended since ``since``
        (sacct; needs ``AccountingStoreFlags=job_comment``), of every user, in ``accounts`` when
        given (else the login user's live jobs). For a submission whose outcome was unknown: the
        reconciler looks here before it ever submits again."""
        commands.check_tag(tag)
        by_id: dict[str, JobStatus] = {
            s.job_id: s for s in self._squeue(None, accounts) if _has_tag(s.comment, tag)
        }
        start = commands.format_time(since, self.cluster_tz)
        for record in self._sacct(start=start, accounts=accounts):
            if not _has_tag(record.comment, tag):
                continue
            in_queue = by_id.get(record.job_id)
            if in_queue is None or (in_queue.ended and record.ended):
                by_id[record.job_id] = _status_from_record(record)
        return sorted(by_id.values(), key=lambda s: (len(s.job_id), s.job_id))

    def cancel(
        self, job_id: str, *, as_user: str | None = None, only_pending: bool = False
    ) -> None:
        """``scancel`` (as ``as_user`` when given); idempotent: a job that already ended or that
        Slurm no longer knows is cancelled as far as the caller is concerned. ``only_pending``:
        a job that is no longer pending is left alone (the caller looks at its state after)."""
        argv = self._maybe_as(
            as_user, commands.scancel(self.bin_dir, job_id, only_pending=only_pending)
        )
        self._command(argv, self._read_cancel(job_id), side_effects=True)

    def _read_cancel(self, job_id: str) -> Callable[[CommandResult], None]:
        def read(result: CommandResult) -> None:
            if result.exit_code == 0:
                return
            verdict = classify(result.stderr_text, exit_code=result.exit_code)
            if verdict.kind in (StderrKind.JOB_UNKNOWN, StderrKind.JOB_ENDED):
                logger.debug("%s: job %s already ended: %s", self.cluster, job_id, verdict.line)
                return
            self._require_success(result)

        return read

    # -- files of the researcher -----------------------------------------------------------------

    def prepare_directory(self, user: str, path: str) -> None:
        """Create ``path`` as ``user``, private to them (idempotent). Raises ``RunAsRefused`` when
        the user cannot be acted as on this login node."""
        argv = commands.as_user(user, commands.mkdir_private(path))
        self._command(argv, self._require_success_read, side_effects=True)

    def read_file(self, user: str, path: str, offset: int, limit: int) -> FileChunk | None:
        """Up to ``limit`` bytes of ``path`` from ``offset``, read as ``user`` (Unix permissions
        apply); ``None`` when the file does not exist (yet). Two commands: its size, its bytes."""
        size_argv = commands.as_user(user, commands.file_size(path))

        def read_size(result: CommandResult) -> int | None:
            if result.exit_code != 0 and "no such file" in result.stderr_text.lower():
                return None
            self._require_success(result)
            text = result.stdout_text.strip()
            if not text.isdigit():
                raise CommandFailed(result.argv, result.exit_code, f"stat printed {text!r}")
            return int(text)

        size = self._command(size_argv, read_size)
        if size is None:
            return None
        if offset >= size:
            return FileChunk(offset=offset, size=size, data=b"")
        data_argv = commands.as_user(user, commands.read_bytes(path, offset, limit))

        def read_data(result: CommandResult) -> bytes:
            self._require_success(result)
            return result.stdout

        return FileChunk(offset=offset, size=size, data=self._command(data_argv, read_data))

    @staticmethod
    def _maybe_as(user: str | None, argv: list[str]) -> list[str]:
        return argv if user is None else commands.as_user(user, argv)

    def _require_success_read(self, result: CommandResult) -> None:
        self._require_success(result)

    # -- cluster ---------------------------------------------------------------------------------

    def capacity(self) -> list[PartitionCapacity]:
        """GPUs per partition and type: total, allocated, idle, unavailable (down/drained)."""
        argv = commands.sinfo(self.bin_dir)

        def read(result: CommandResult) -> list[PartitionCapacity]:
            self._require_success(result)
            return parse_sinfo(decode(result.stdout))

        return self._command(argv, read)

    def accounting(
        self,
        since: datetime,
        until: datetime | None = None,
        *,
        accounts: Sequence[str] | None = None,
        job_ids: Sequence[str] | None = None,
    ) -> list[AccountingRecord]:
        """Allocations (``sacct -X``) that were pending or running at some time in
        [``since``, ``until`` or now]. Naive datetimes are taken as UTC."""
        start = commands.format_time(since, self.cluster_tz)
        end = None if until is None else commands.format_time(until, self.cluster_tz)
        if not job_ids:
            return self._sacct(start=start, end=end, accounts=accounts)
        out: list[AccountingRecord] = []
        for chunk in _chunks(list(job_ids), commands.MAX_IDS_PER_ARGUMENT):
            out += self._sacct(start=start, end=end, accounts=accounts, job_ids=chunk)
        return out

    def ensure_account(
        self,
        account: str,
        user: str | None = None,
        *,
        parent: str | None = None,
        coordinator: str | None = None,
    ) -> None:
        """Make ``account`` exist on this cluster (below ``parent``), let ``user`` submit to it,
        and make ``coordinator`` its coordinator so slurmctld lets it cancel there; idempotent."""
        argvs = [
            commands.sacctmgr_add_account(
                self.bin_dir, cluster=self.cluster, account=account, parent=parent
            )
        ]
        if coordinator is not None:
            argvs.append(
                commands.sacctmgr_add_coordinator(self.bin_dir, account=account, user=coordinator)
            )
        if user is not None:
            argvs.append(
                commands.sacctmgr_add_user(
                    self.bin_dir, cluster=self.cluster, account=account, user=user
                )
            )
        for argv in argvs:
            self._sacctmgr_add(argv)

    def ensure_association(self, account: str, user: str) -> None:
        """Let ``user`` submit to ``account`` on this cluster; idempotent."""
        argv = commands.sacctmgr_add_user(
            self.bin_dir, cluster=self.cluster, account=account, user=user
        )
        self._sacctmgr_add(argv)

    def _sacctmgr_add(self, argv: list[str]) -> None:
        """An idempotent ``sacctmgr add``, tried again a few times when slurmdbd could not do it
        now. Two adds of the same association at once (a membership's background add and a
        submission's) make one of them fail with "Unspecified error"; tried again a moment
        later it finds the association there ("Nothing new added")."""
        for attempt in range(1, SACCTMGR_ADD_ATTEMPTS + 1):
            try:
                self._command(argv, self._read_sacctmgr_add, side_effects=True)
                return
            except _AddNotDoneNow:
                if attempt == SACCTMGR_ADD_ATTEMPTS:
                    raise
                logger.info("%s: slurmdbd could not add now; trying again", self.cluster)
                time.sleep(SACCTMGR_ADD_BACKOFF_SECONDS * attempt)

    def remove_association(self, account: str, user: str) -> None:
        """Take ``account`` away from ``user`` on this cluster; idempotent."""
        argv = commands.sacctmgr_remove_user(
            self.bin_dir, cluster=self.cluster, account=account, user=user
        )

        def read(result: CommandResult) -> None:
            text = (result.stdout_text + result.stderr_text).lower()
            if result.exit_code == 0 or "nothing deleted" in text:
                return
            raise CommandFailed(result.argv, result.exit_code, result.stderr_text)

        self._command(argv, read, side_effects=True)

    def ping(self) -> None:
        """Cheap liveness check of slurmctld (``scontrol ping``); raises ``SlurmUnavailable``."""
        argv = commands.scontrol_ping(self.bin_dir)

        def read(result: CommandResult) -> None:
            text = result.stdout_text
            if result.exit_code != 0 or " is UP" not in text or " is DOWN" in text:
                raise SlurmUnavailable(
                    argv, result.exit_code, (text + result.stderr_text).strip() or "no answer"
                )

        self._command(argv, read)

    # -- internals -------------------------------------------------------------------------------

    def _squeue(
        self, job_ids: Sequence[str] | None, accounts: Sequence[str] | None = None
    ) -> list[JobStatus]:
        if accounts:
            job_ids = None  # every job of the accounts; the caller picks the ones it asked for
        elif job_ids is not None and len(job_ids) > commands.SQUEUE_MAX_IDS:
            job_ids = None  # cheaper to read all of our jobs and filter here (SQUEUE_MAX_IDS)
        argv = commands.squeue(self.bin_dir, job_ids, accounts=accounts)

        def read(result: CommandResult) -> list[JobStatus]:
            if (
                result.exit_code != 0
                and job_ids is not None
                and len(job_ids) == 1
                and classify(result.stderr_text, exit_code=result.exit_code).kind
                is StderrKind.JOB_UNKNOWN
            ):
                return []  # squeue asked slurmctld for that one job, which it does not know
            self._require_success(result)
            return parse_squeue(decode(result.stdout), self.cluster_tz, self._squeue_memo)

        return self._command(argv, read)

    def _sacct(
        self,
        *,
        start: str,
        end: str | None = None,
        accounts: Sequence[str] | None = None,
        job_ids: Sequence[str] | None = None,
    ) -> list[AccountingRecord]:
        argv = commands.sacct(
            self.bin_dir,
            cluster=self.cluster,
            start=start,
            end=end,
            job_ids=job_ids,
            accounts=accounts,
        )

        def read(result: CommandResult) -> list[AccountingRecord]:
            self._require_success(result)
            return parse_sacct(decode(result.stdout), self.cluster_tz)

        return self._command(argv, read)

    @staticmethod
    def _read_sacctmgr_add(result: CommandResult) -> None:
        # "Nothing new added." with exit 1 means it was already there; an error on stderr (an
        # unknown account, cluster or user) means it was not added and is not there.
        if result.exit_code == 0:
            return
        if "nothing new added" in result.stdout_text.lower() and not result.stderr_text.strip():
            return
        text = result.stderr_text or result.stdout_text
        reason = classify(text, exit_code=1).reason
        if _SACCTMGR_UNSPECIFIED in text.lower():
            # slurmdbd's answer to an add it could not do now (seen with several adds at once):
            # nothing was refused, and an add is safe to repeat.
            raise _AddNotDoneNow(result.argv, result.exit_code, text, reason=reason)
        raise CommandFailed(result.argv, result.exit_code, text, reason=reason)

    @staticmethod
    def _require_success(result: CommandResult) -> None:
        if result.exit_code != 0:
            verdict = classify(result.stderr_text, exit_code=result.exit_code)
            raise CommandFailed(
                result.argv, result.exit_code, result.stderr_text, reason=verdict.reason
            )

    def _command(
        self,
        argv: list[str],
        read: Callable[[CommandResult], T],
        *,
        stdin: bytes | None = None,
        side_effects: bool = False,
        timeout: float | None = None,
    ) -> T:
        """Run one command, classify its failure, parse it; count, log and observe it."""
        name = _program(argv)
        started = time.monotonic()
        error: BaseException | None = None
        exit_code: int | None = None
        try:
            limit = self.timeout if timeout is None else min(timeout, self.timeout)
            result = self.runner.run(argv, stdin=stdin, timeout=limit)
            exit_code = result.exit_code
            verdict: StderrVerdict = classify(result.stderr_text, exit_code=result.exit_code)
            run_as = _run_as_of(argv)
            if run_as is not None and verdict.kind is StderrKind.RUN_AS_REFUSED:
                raise RunAsRefused(argv, result.exit_code, result.stderr_text, user=run_as)
            unavailable = verdict.kind is StderrKind.UNAVAILABLE
            if unavailable and side_effects and result.exit_code == 0:
                # sbatch and scancel retry by themselves; exit 0 means the work was done.
                logger.warning("%s: %s succeeded after: %s", self.cluster, name, verdict.line)
            elif unavailable:
                raise SlurmUnavailable(
                    argv,
                    result.exit_code,
                    result.stderr_text,
                    reason=verdict.reason,
                    may_have_run=side_effects and verdict.may_have_acted,
                )
            try:
                return read(result)
            except ParseError as exc:
                raise SlurmOutputError(argv, str(exc)) from exc
        except BaseException as exc:
            error = exc
            raise
        finally:
            duration = time.monotonic() - started
            with self._count_lock:
                self.commands_run += 1
            logger.debug(
                "%s: %s exit=%s in %.3fs%s",
                self.cluster,
                argv,
                exit_code,
                duration,
                f" error={error!r}" if error is not None else "",
            )
            if self._observer is not None:
                try:
                    self._observer(name, duration, error)
                except Exception:
                    logger.exception("command observer failed")
