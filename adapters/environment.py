"""The environment every Slurm command runs in, the same for every runner.

Slurm's client commands read dozens of environment variables that change their output format
(``SQUEUE_FORMAT``, ``SACCT_FORMAT``, ``SLURM_TIME_FORMAT``), narrow what they show
(``SQUEUE_USERS``, ``SINFO_PARTITION``) or add options to a submission (``SBATCH_EXCLUSIVE``,
``SBATCH_QOS``). A login shell on a cluster may set any of them. The runners therefore remove every
variable listed here, pin the few whose value the parsers depend on, and only then add what the
caller asked for. The lists come from the ENVIRONMENT VARIABLES sections of the Slurm 22.05 man
pages of squeue, sbatch, sacct, sinfo, scancel and scontrol.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

CLEARED_VARIABLES: tuple[str, ...] = (
    # output formats and default filters
    "SQUEUE_ACCOUNT", "SQUEUE_ALL", "SQUEUE_ARRAY", "SQUEUE_ARRAY_UNIQUE", "SQUEUE_FEDERATION",
    "SQUEUE_FORMAT", "SQUEUE_FORMAT2", "SQUEUE_LICENSES", "SQUEUE_LOCAL", "SQUEUE_NAMES",
    "SQUEUE_PARTITION", "SQUEUE_PRIORITY", "SQUEUE_QOS", "SQUEUE_SIBLING", "SQUEUE_SORT",
    "SQUEUE_STATES", "SQUEUE_USERS",
    "SACCT_FORMAT", "SACCT_FEDERATION", "SACCT_LOCAL",
    "SINFO_ALL", "SINFO_FEDERATION", "SINFO_FORMAT", "SINFO_LOCAL", "SINFO_PARTITION", "SINFO_SORT",
    "SCONTROL_ALL", "SCONTROL_FEDERATION", "SCONTROL_FUTURE", "SCONTROL_LOCAL", "SCONTROL_SIBLING",
    "SCANCEL_ACCOUNT", "SCANCEL_BATCH", "SCANCEL_CTLD", "SCANCEL_FULL", "SCANCEL_HURRY",
    "SCANCEL_INTERACTIVE", "SCANCEL_NAME", "SCANCEL_PARTITION", "SCANCEL_QOS", "SCANCEL_STATE",
    "SCANCEL_USER", "SCANCEL_VERBOSE", "SCANCEL_WCKEY",
    "SLURM_BITSTR_LEN", "SLURM_CLUSTERS", "SLURM_DEBUG_FLAGS", "SLURM_TOPO_LEN",
    # sbatch input variables: defaults for options the client may not pass explicitly
    "SBATCH_ACCOUNT", "SBATCH_ACCTG_FREQ", "SBATCH_ARRAY_INX", "SBATCH_BATCH", "SBATCH_CLUSTERS",
    "SBATCH_CONSTRAINT", "SBATCH_CONTAINER", "SBATCH_CORE_SPEC", "SBATCH_CPUS_PER_GPU",
    "SBATCH_DEBUG", "SBATCH_DELAY_BOOT", "SBATCH_DISTRIBUTION", "SBATCH_ERROR", "SBATCH_EXCLUSIVE",
    "SBATCH_EXPORT", "SBATCH_GET_USER_ENV", "SBATCH_GPUS", "SBATCH_GPUS_PER_NODE",
    "SBATCH_GPUS_PER_TASK", "SBATCH_GPU_BIND", "SBATCH_GPU_FREQ", "SBATCH_GRES",
    "SBATCH_GRES_FLAGS", "SBATCH_HINT", "SBATCH_IGNORE_PBS", "SBATCH_INPUT", "SBATCH_JOB_NAME",
    "SBATCH_MEM_BIND", "SBATCH_MEM_PER_CPU", "SBATCH_MEM_PER_GPU", "SBATCH_MEM_PER_NODE",
    "SBATCH_NETWORK", "SBATCH_NO_KILL", "SBATCH_NO_REQUEUE", "SBATCH_OPEN_MODE", "SBATCH_OUTPUT",
    "SBATCH_OVERCOMMIT", "SBATCH_PARTITION", "SBATCH_POWER", "SBATCH_PROFILE", "SBATCH_QOS",
    "SBATCH_REQUEUE", "SBATCH_REQ_SWITCH", "SBATCH_RESERVATION", "SBATCH_SIGNAL",
    "SBATCH_SPREAD_JOB", "SBATCH_THREADS_PER_CORE", "SBATCH_THREAD_SPEC", "SBATCH_TIMELIMIT",
    "SBATCH_USE_MIN_NODES", "SBATCH_WAIT", "SBATCH_WAIT4SWITCH", "SBATCH_WAIT_ALL_NODES",
    "SBATCH_WCKEY", "SLURM_EXIT_ERROR", "SLURM_UMASK",
)  # fmt: skip
"""Removed before every command. ``SLURM_CONF`` is not here: it says which cluster to talk to."""

PINNED_VARIABLES: Mapping[str, str] = {"SLURM_TIME_FORMAT": "standard"}
"""Set for every command: ``standard`` is ISO 8601 without zone, ``2024-05-01T13:45:00``."""

LOCAL_INHERITED: tuple[str, ...] = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "SLURM_CONF",
)  # fmt: skip
"""What a local child inherits from the broker's own environment (plus ``LC_*``). Nothing else:
sbatch exports its environment into the job by default, and the broker's environment may hold
secrets (database URLs, tokens) that must not reach users' jobs. It also drops ``SLURM_JOB_ID``
and friends when the broker itself runs inside an allocation."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_variables(env: Mapping[str, str]) -> None:
    """Refuse names that are not shell identifiers and values a process environment cannot hold."""
    for key, value in env.items():
        if not _NAME.fullmatch(key):
            raise ValueError(f"environment variable name {key!r} is not a valid identifier")
        if "\0" in value:
            raise ValueError(f"environment variable {key} contains a NUL byte")


def controlled_variables(
    extra: Mapping[str, str] | None = None, call: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Variables to set, in order: pinned, then the runner's ``extra``, then the call's ``env``."""
    merged: dict[str, str] = dict(PINNED_VARIABLES)
    for layer in (extra, call):
        if layer:
            check_variables(layer)
            merged.update(layer)
    return merged


def local_environment(
    inherited: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
    call: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The full environment of a local child: the allowed part of ``inherited``, then controlled."""
    env = {
        key: value
        for key, value in inherited.items()
        if (key in LOCAL_INHERITED or key.startswith("LC_")) and key not in CLEARED_VARIABLES
    }
    env.update(controlled_variables(extra, call))
    return env


def env_command_prefix(
    extra: Mapping[str, str] | None = None,
    call: Mapping[str, str] | None = None,
    *,
    env_binary: str = "/usr/bin/env",
) -> list[str]:
    """argv elements running the rest of an argv in the controlled environment (``env -u .. K=V``).

    Used over SSH, where the remote login shell's environment is unknown and sshd's ``AcceptEnv``
    cannot be relied on.
    """
    prefix = [env_binary]
    for name in CLEARED_VARIABLES:
        prefix += ["-u", name]
    prefix += [f"{key}={value}" for key, value in controlled_variables(extra, call).items()]
    return prefix
