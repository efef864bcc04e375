"""Pure builders of Slurm command lines (argv lists) and of the batch script sent to sbatch.

Nothing here runs anything. Every builder validates what it puts on a command line and raises
``ValueError`` before a command exists, so a bad name never reaches a shell or Slurm. Output
formats are explicit, with the ASCII unit separator (0x1f) between fields: it cannot occur in any
name, account, comment or state the broker submits, and Slurm passes it through unchanged.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo

from adapters.slurm.types import JobSpec

FIELD_SEPARATOR = "\x1f"

SQUEUE_FIELDS: tuple[str, ...] = (
    "JobID", "State", "Reason", "tres-alloc", "SubmitTime", "StartTime", "TimeUsed",
    "Partition", "Account", "Name", "Comment", "UserName", "ArrayJobID", "ArrayTaskID",
)  # fmt: skip
"""squeue ``--Format`` fields. ``JobID`` is the job's own id (an array task's too), the id sbatch
printed. ``tres-alloc`` is the allocation of a started job and the request of a pending one, however
the GPUs were asked for (``%b`` misses ``--gpus``). ``ArrayJobID``/``ArrayTaskID``: for a task of a
job array, the array's id and the task's index; for the tasks not started yet, which Slurm keeps
in one line under the array's id, the indices (``4-19%4``); ``N/A`` for a job that is no array."""

SACCT_FIELDS: tuple[str, ...] = (
    "JobIDRaw", "JobID", "State", "ExitCode", "AllocTRES", "ElapsedRaw", "Submit", "Start",
    "End", "Account", "Partition", "Reason", "JobName", "Comment", "User",
)  # fmt: skip
"""sacct ``--format`` fields. ``JobIDRaw`` is the id sbatch printed; ``JobID`` shows ``123_4``
for array tasks. ``Comment`` needs ``AccountingStoreFlags=job_comment`` in slurm.conf."""

SINFO_FIELDS: tuple[str, ...] = ("NodeList", "Partition", "StateLong", "Gres", "GresUsed")
"""sinfo ``--Format`` fields, with ``-N``: one line per node and partition."""

MAX_IDS_PER_ARGUMENT = 10_000
"""Linux caps one argv element at 128 KiB; 10,000 ids of up to 12 characters stay well below."""

SQUEUE_MAX_IDS = 500
"""Above this many ids the client reads all of its own jobs (``squeue --me``) and keeps the ones it
asked for: squeue matches each job against the ``--jobs`` list one id at a time (jobs x ids), which
took 200 ms for 2,000 ids and 0.5-0.8 s for 5,000 on the dev cluster, against 50-100 ms for the
whole list (docs/performance.md, polling)."""

STATUS_LOOKBACK = "now-30days"
"""sacct start time for status look-ups by id: a job that ended within 30 days is found. Without
``-S`` sacct starts at midnight today; it is always given explicitly here."""

_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_JOB_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_JOB_ID = re.compile(r"[0-9]{1,10}(_[0-9]{1,10})?")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_SHELLS = frozenset({"sh", "bash", "dash", "ksh", "mksh", "zsh", "ash", "busybox"})
_MAX_COMMENT = 1000

HEADER_DIRECTIVES = ("#SBATCH", "#SLURM")
"""Prefixes sbatch reads as options in the script's header: from the first line to the first one
that is neither blank nor starts with ``#``, at column 0, case as written (``#sbatch`` and
``  #SBATCH`` are comments; tried on the dev cluster, sbatch 22.05)."""

WRAPPER_DIRECTIVES = ("#PBS", "#BSUB")
"""Prefixes sbatch translates from PBS/LSF ANYWHERE in the first 100 non-comment lines, unless
``--ignore-pbs`` is given (which ``sbatch()`` always does)."""

_C_SPACE = " \t\n\v\f\r"  # isspace() in C: what sbatch counts as a blank line


# -- validation ----------------------------------------------------------------------------------


def check_word(kind: str, value: str) -> str:
    """Accounts, partitions, GPU types, cluster names: letters, digits, ``_.-``, max 64."""
    if not _WORD.fullmatch(value):
        raise ValueError(
            f"{kind} {value!r} is not allowed: use letters, digits, '_', '.', '-' (at most 64)"
        )
    return value


def check_user(value: str) -> str:
    if not _USER.fullmatch(value):
        raise ValueError(f"user name {value!r} is not a valid Unix user name")
    return value


def check_job_id(value: str) -> str:
    """A Slurm job id as sbatch prints it (``123``), or an array task (``123_4``)."""
    if not _JOB_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a Slurm job id")
    return value


def check_tag(value: str) -> str:
    if not _TAG.fullmatch(value):
        raise ValueError(
            f"tag {value!r} is not allowed: use letters, digits, '_', '.', ':', '-' (at most 128)"
        )
    return value


def check_spec(spec: JobSpec) -> None:
    """Everything about a spec that can be checked without asking Slurm; raises ``ValueError``."""
    check_word("account", spec.account)
    check_word("partition", spec.partition)
    check_tag(spec.tag)
    if not _JOB_NAME.fullmatch(spec.name):
        raise ValueError(
            f"job name {spec.name!r} is not allowed: use letters, digits, '_', '.', '+', '-' "
            "(at most 128), no spaces or shell characters"
        )
    if spec.gpu_type is not None:
        check_word("GPU type", spec.gpu_type)
    if spec.comment is not None:
        if len(spec.comment) > _MAX_COMMENT:
            raise ValueError(f"comment longer than {_MAX_COMMENT} characters")
        if any(not ch.isprintable() for ch in spec.comment):
            raise ValueError("comment must be printable text without newlines or control chars")
    if spec.nodes < 1:
        raise ValueError("nodes must be at least 1")
    if spec.gpus < 0:
        raise ValueError("gpus must not be negative")
    if spec.gpus % spec.nodes:
        raise ValueError(
            f"{spec.gpus} GPUs cannot be spread evenly over {spec.nodes} nodes: "
            "ask for a multiple of the node count"
        )
    if spec.gpus == 0 and (spec.cpus_per_gpu is not None or spec.mem_per_gpu_gb is not None):
        raise ValueError("cpus_per_gpu and mem_per_gpu_gb need at least one GPU")
    if spec.time_limit_minutes < 1:
        raise ValueError("time_limit_minutes must be at least 1")
    if spec.cpus_per_gpu is not None and spec.cpus_per_gpu < 1:
        raise ValueError("cpus_per_gpu must be at least 1")
    if spec.mem_per_gpu_gb is not None and spec.mem_per_gpu_gb < 1:
        raise ValueError("mem_per_gpu_gb must be at least 1")
    if spec.array_size is not None and spec.array_size < 1:
        raise ValueError("an array needs at least one task")
    if spec.array_max_parallel is not None:
        if spec.array_size is None:
            raise ValueError("array_max_parallel needs array_size")
        if not 1 <= spec.array_max_parallel <= spec.array_size:
            raise ValueError("array_max_parallel must be between 1 and array_size")
    batch_script(spec)  # the script checks raise ValueError too


# -- the batch script ----------------------------------------------------------------------------


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _interpreter(shebang: str) -> str:
    words = shebang[2:].split()
    if not words:
        return ""
    program = posixpath.basename(words[0])
    if program == "env":
        rest = [word for word in words[1:] if not word.startswith("-")]
        program = posixpath.basename(rest[0]) if rest else ""
    return program


def batch_script(spec: JobSpec) -> bytes:
    """The script as sbatch will read it on stdin.

    * It must start with ``#!`` (sbatch refuses anything else).
    * Directive lines (``script_directives``: ``#SBATCH``/``#SLURM`` in the header,
      ``#PBS``/``#BSUB`` anywhere) are refused: options come from the spec only, so the job is
      exactly what the broker admitted (a header ``--array`` or a late ``#PBS -t 0-999`` would
      escape the quota). sbatch also gets ``--ignore-pbs``, so a ``#PBS``/``#BSUB`` line could
      not act even if one passed.
    * ``spec.environment`` becomes ``export NAME='value'`` lines right after the ``#!`` line,
      quoted with ``shlex.quote``: any value, with commas, quotes, newlines or ``$(...)``, arrives
      literally and nothing in it is executed. (``--export=K=V`` cannot carry commas, and values
      put into sbatch's own environment would reach the login node's dynamic loader.) This needs
      a POSIX shell script; other interpreters get a ``ValueError`` when environment is given.
    """
    script = spec.script
    if not script.startswith("#!"):
        raise ValueError("the job script must start with a '#!' line, e.g. '#!/bin/bash'")
    if "\0" in script:
        raise ValueError("the job script contains a NUL byte")
    if not _encodable(script):
        raise ValueError("the job script is not valid Unicode text (lone surrogates)")
    if "\r\n" in script:
        raise ValueError("the job script has DOS line breaks (\\r\\n); sbatch refuses them")
    directives = script_directives(script)
    if directives:
        raise ValueError(describe_directives(directives))
    lines = script.split("\n")
    if not spec.environment:
        return script.encode()
    program = _interpreter(lines[0])
    if program not in _SHELLS:
        raise ValueError(
            f"environment variables need a POSIX shell script; this one runs {program or '?'!r}"
        )
    exports = []
    for key, value in spec.environment.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"environment variable name {key!r} is not a valid identifier")
        if "\0" in value:
            raise ValueError(f"environment variable {key} contains a NUL byte")
        if not _encodable(value):
            raise ValueError(f"environment variable {key} is not valid Unicode text")
        exports.append(f"export {key}={shlex.quote(value)}")
    return "\n".join([lines[0], *exports, *lines[1:]]).encode()


def script_directives(script: str) -> list[tuple[int, str]]:
    """The lines (1-based number, text) of ``script`` that sbatch could read as job options.

    ``#SBATCH``/``#SLURM`` count in the header only; ``#PBS``/``#BSUB`` anywhere (sbatch reads
    them in the first 100 non-comment lines; refusing them everywhere is simpler and as safe).
    """
    found: list[tuple[int, str]] = []
    in_header = True
    for number, line in enumerate(script.split("\n"), start=1):
        if line.startswith(WRAPPER_DIRECTIVES) or (
            in_header and line.startswith(HEADER_DIRECTIVES)
        ):
            found.append((number, line))
        elif in_header and line.strip(_C_SPACE) and not line.startswith("#"):
            in_header = False
    return found


def describe_directives(directives: Sequence[tuple[int, str]]) -> str:
    """A message naming the directive lines (the first five), for a refusal."""
    named = ", ".join(f"line {number} {text[:80]!r}" for number, text in directives[:5])
    more = f" and {len(directives) - 5} more" if len(directives) > 5 else ""
    return (
        f"the job script has sbatch directives ({named}{more}); job options come from the "
        "request fields only"
    )


def job_comment(spec: JobSpec) -> str:
    """The job's ``--comment``: the tag first (``find_by_tag`` matches it as the first word)."""
    return spec.tag if not spec.comment else f"{spec.tag} {spec.comment}"


# -- commands ------------------------------------------------------------------------------------


def _bin(bin_dir: str, program: str) -> str:
    return posixpath.join(bin_dir, program)


def _format_option(fields: Sequence[str]) -> str:
    # "Field:<suffix>": no width given means no padding and no truncation; the suffix is the
    # separator, so every line ends with one.
    return ",".join(f"{field}:{FIELD_SEPARATOR}" for field in fields)


def sbatch(bin_dir: str, spec: JobSpec) -> list[str]:
    """``sbatch --parsable`` for ``spec``; the script goes on stdin (``batch_script``).

    GPUs are asked per node with ``--gres=gpu[:TYPE]:N/nodes``: a multi-node job gets the same
    GPUs on every node (what distributed training expects), the count Slurm allocates is exactly
    ``spec.gpus``, and ``--gres`` works on every select plugin and Slurm version the broker may
    meet. (``--gpus=TYPE:N`` is per job and may spread 8 GPUs as 7+1 over two nodes.)
    """
    check_spec(spec)
    argv = [
        _bin(bin_dir, "sbatch"),
        "--parsable",
        "--ignore-pbs",
        f"--account={spec.account}",
        f"--partition={spec.partition}",
        f"--job-name={spec.name}",
        f"--comment={job_comment(spec)}",
        f"--nodes={spec.nodes}",
        f"--time={spec.time_limit_minutes}",
    ]
    if spec.gpus:
        per_node = spec.gpus // spec.nodes
        gres = f"gpu:{spec.gpu_type}:{per_node}" if spec.gpu_type else f"gpu:{per_node}"
        argv.append(f"--gres={gres}")
    if spec.cpus_per_gpu is not None:
        argv.append(f"--cpus-per-gpu={spec.cpus_per_gpu}")
    if spec.mem_per_gpu_gb is not None:
        argv.append(f"--mem-per-gpu={spec.mem_per_gpu_gb}G")
    if spec.workdir is not None:
        argv.append(f"--chdir={check_path(spec.workdir)}")
    if spec.stdout_path is not None:
        argv.append(f"--output={check_path(spec.stdout_path)}")
    if spec.stderr_path is not None:
        argv.append(f"--error={check_path(spec.stderr_path)}")
    if spec.array_size is not None:
        throttle = f"%{spec.array_max_parallel}" if spec.array_max_parallel else ""
        argv.append(f"--array=0-{spec.array_size - 1}{throttle}")
    if spec.run_as is not None:
        return as_user(spec.run_as, argv)
    return argv


def squeue(
    bin_dir: str,
    job_ids: Sequence[str] | None = None,
    *,
    accounts: Sequence[str] | None = None,
) -> list[str]:
    """Jobs in every state squeue still holds, one line each, whoever submitted them.

    ``accounts``: every job charged to those accounts (the broker's managed accounts: its own jobs,
    which run as researchers, and any a researcher submitted around it). ``job_ids``: those jobs;
    squeue asks slurmctld for a single id directly and fails with "Invalid job id specified" when
    it is unknown, which the client reads as "not in the queue". Neither: the invoking user's own
    jobs (``--me``).
    """
    argv = [_bin(bin_dir, "squeue"), "--noheader", "--all", "--states=all"]
    if accounts:
        for account in accounts:
            check_word("account", account)
        argv.append("--accounts=" + ",".join(accounts))
    if job_ids:
        for job_id in job_ids:
            check_job_id(job_id)
        argv.append("--jobs=" + ",".join(job_ids))
    if not accounts and not job_ids:
        argv.insert(1, "--me")
    argv.append("--Format=" + _format_option(SQUEUE_FIELDS))
    return argv


def sacct(
    bin_dir: str,
    *,
    cluster: str,
    start: str,
    end: str | None = None,
    job_ids: Sequence[str] | None = None,
    accounts: Sequence[str] | None = None,
) -> list[str]:
    """Allocations only (``-X``), parsable, unit-separated, always with an explicit ``-S``, of
    every user (``--allusers``: without it sacct shows only the invoking user's jobs, and the
    broker's jobs run as researchers).

    ``start``/``end`` are Slurm time strings (``format_time`` or ``now-30days``).
    """
    check_word("cluster", cluster)
    argv = [
        _bin(bin_dir, "sacct"),
        "--allocations",
        "--allusers",
        "--noheader",
        "--parsable2",
        f"--delimiter={FIELD_SEPARATOR}",
        f"--clusters={cluster}",
        f"--starttime={start}",
    ]
    if end is not None:
        argv.append(f"--endtime={end}")
    if job_ids:
        for job_id in job_ids:
            check_job_id(job_id)
        argv.append("--jobs=" + ",".join(job_ids))
    if accounts:
        for account in accounts:
            check_word("account", account)
        argv.append("--accounts=" + ",".join(accounts))
    argv.append("--format=" + ",".join(SACCT_FIELDS))
    return argv


def format_time(moment: datetime, cluster_tz: tzinfo) -> str:
    """A datetime as Slurm reads it: wall-clock time of the cluster, ``YYYY-MM-DDTHH:MM:SS``.

    A naive datetime is taken as UTC (the broker keeps UTC everywhere).
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(cluster_tz).replace(tzinfo=None).isoformat(timespec="seconds")


def scancel(bin_dir: str, job_id: str, *, only_pending: bool = False) -> list[str]:
    """``scancel``; ``only_pending``: only if the job is still pending (``--state=PENDING``,
    decided by slurmctld itself, so a job that has just started is left running)."""
    argv = [_bin(bin_dir, "scancel")]
    if only_pending:
        argv.append("--state=PENDING")
    argv.append(check_job_id(job_id))
    return argv


def sinfo(bin_dir: str) -> list[str]:
    """One line per node and partition with its state and GPUs (configured and in use)."""
    return [
        _bin(bin_dir, "sinfo"),
        "--noheader",
        "--Node",
        "--all",
        "--Format=" + _format_option(SINFO_FIELDS),
    ]


def sacctmgr_add_account(
    bin_dir: str, *, cluster: str, account: str, parent: str | None = None
) -> list[str]:
    """Create ``account`` on ``cluster``, below ``parent`` when given (a coordinator of the parent
    may create accounts there and nowhere else)."""
    argv = [
        _bin(bin_dir, "sacctmgr"),
        "--immediate",
        "add",
        "account",
        check_word("account", account),
        f"cluster={check_word('cluster', cluster)}",
    ]
    if parent is not None:
        argv.append(f"parent={check_word('account', parent)}")
    return argv


def sacctmgr_add_user(bin_dir: str, *, cluster: str, account: str, user: str) -> list[str]:
    return [
        _bin(bin_dir, "sacctmgr"),
        "--immediate",
        "add",
        "user",
        check_user(user),
        f"account={check_word('account', account)}",
        f"cluster={check_word('cluster', cluster)}",
    ]


def scontrol_ping(bin_dir: str) -> list[str]:
    return [_bin(bin_dir, "scontrol"), "ping"]


# -- acting as the researcher -------------------------------------------------------------------

SUDO = "/usr/bin/sudo"
COREUTILS_DIR = "/usr/bin"
"""Where ``mkdir``, ``stat`` and ``dd`` live on the login node (the sudoers rule names them)."""

REFUSED_RUN_AS = frozenset({"root"})
"""Never acted as, whatever the configuration says (the sudoers rule refuses them too)."""

_PATH = re.compile(r"/[A-Za-z0-9_.@%+=:,/-]{1,1023}")


def check_path(value: str) -> str:
    """An absolute path the broker built itself: no spaces, quotes, ``..`` or control characters."""
    if not _PATH.fullmatch(value) or "/../" in f"{value}/" or "//" in value:
        raise ValueError(f"path {value!r} is not a plain absolute path")
    return value


def as_user(user: str, argv: Sequence[str], *, sudo: str = SUDO) -> list[str]:
    """``argv`` run as ``user`` through ``sudo -n`` (never a password prompt, never a shell).

    ``--`` ends sudo's options, so nothing in ``argv`` can be read as one.
    """
    check_user(user)
    if user in REFUSED_RUN_AS:
        raise ValueError(f"jobs never run as {user}")
    return [sudo, "-n", "-u", user, "--", *argv]


def mkdir_private(path: str) -> list[str]:
    """Create ``path`` (and parents) readable by its owner only.

    With the service account's ``umask=0077`` from sudoers, parents made by ``-p`` are private too.
    """
    return [posixpath.join(COREUTILS_DIR, "mkdir"), "-p", "-m", "0700", check_path(path)]


def file_size(path: str) -> list[str]:
    return [posixpath.join(COREUTILS_DIR, "stat"), "--format=%s", "--", check_path(path)]


def read_bytes(path: str, offset: int, limit: int) -> list[str]:
    """At most ``limit`` bytes of ``path`` from byte ``offset``, skipping what comes before."""
    if offset < 0 or limit < 1:
        raise ValueError("offset must be >= 0 and limit >= 1")
    return [
        posixpath.join(COREUTILS_DIR, "dd"),
        f"if={check_path(path)}",
        "iflag=skip_bytes,count_bytes",
        f"skip={offset}",
        f"count={limit}",
        "status=none",
    ]


def scancel_on(bin_dir: str, job_id: str, cluster: str) -> list[str]:
    """``scancel`` of a job on a named cluster (one that sbatch reported routing to)."""
    return [
        _bin(bin_dir, "scancel"),
        f"--clusters={check_word('cluster', cluster)}",
        check_job_id(job_id),
    ]


def sacctmgr_add_coordinator(bin_dir: str, *, account: str, user: str) -> list[str]:
    """Make ``user`` coordinator of ``account``: slurmctld learns of coordinator rights on accounts
    created after the parent's ``add coordinator`` only this way (SLURM-NOTES, TRAP)."""
    return [
        _bin(bin_dir, "sacctmgr"),
        "--immediate",
        "add",
        "coordinator",
        f"account={check_word('account', account)}",
        f"names={check_user(user)}",
    ]


def sacctmgr_remove_user(bin_dir: str, *, cluster: str, account: str, user: str) -> list[str]:
    """Remove ``user``'s association with ``account`` on ``cluster`` (not the user itself)."""
    return [
        _bin(bin_dir, "sacctmgr"),
        "--immediate",
        "remove",
        "user",
        check_user(user),
        f"account={check_word('account', account)}",
        f"cluster={check_word('cluster', cluster)}",
    ]
