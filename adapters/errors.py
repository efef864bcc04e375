"""Errors raised by the Slurm adapters.

    AdapterError                      base; every error carries ``transient`` and ``may_have_run``
    +-- TransportError                the command never ran to completion on the cluster
    |   +-- HostUnreachable       TCP connect refused / no route / DNS        (transient)
    |   +-- AuthenticationFailed  key refused by sshd                         (permanent)
    |   +-- HostKeyRejected       unknown or changed host key                 (permanent)
    |   +-- CommandTimedOut       the runner's own deadline passed       (transient, may have run)
    |   +-- ConnectionLost        the link died after the command was sent (transient, may have run)
    +-- CommandFailed             the command ran and exited non-zero         (permanent)
    |   +-- SlurmUnavailable      the controller could not be reached         (transient)
    +-- SlurmOutputError          output did not parse                        (permanent)

Callers decide retry versus give up from ``transient``; ``may_have_run`` says whether a command
with side effects (sbatch) may have taken effect although no answer came back, so the caller
must look before it tries again. ``CommandTimedOut`` and ``ConnectionLost`` take
``may_have_run=False`` when the runner knows the command was never sent (the deadline passed while
waiting for a session slot or for a channel to open).
"""

from __future__ import annotations

from collections.abc import Sequence


def _excerpt(text: str, limit: int = 500) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "..."


class AdapterError(Exception):
    """Base of every adapter error."""

    transient: bool = False
    may_have_run: bool = False

    def __init__(self, message: str, *, host: str | None = None) -> None:
        self.host = host
        super().__init__(message)


class TransportError(AdapterError):
    """The command could not be run to completion on the cluster."""


class HostUnreachable(TransportError):
    transient = True

    def __init__(self, host: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"cannot reach {host}: {reason}", host=host)


class AuthenticationFailed(TransportError):
    transient = False

    def __init__(self, host: str, user: str, reason: str) -> None:
        self.user = user
        super().__init__(f"authentication as {user}@{host} failed: {reason}", host=host)


class HostKeyRejected(TransportError):
    transient = False

    def __init__(self, host: str, key_type: str, fingerprint: str, reason: str) -> None:
        self.key_type = key_type
        self.fingerprint = fingerprint
        super().__init__(
            f"host key of {host} rejected ({reason}): {key_type} {fingerprint}", host=host
        )


class CommandTimedOut(TransportError):
    transient = True
    may_have_run = True

    def __init__(
        self,
        argv: Sequence[str],
        timeout: float,
        *,
        host: str | None = None,
        may_have_run: bool = True,
    ) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.may_have_run = may_have_run
        where = f" on {host}" if host else ""
        super().__init__(
            f"{argv[0] if argv else '?'}{where} timed out after {timeout:.1f}s", host=host
        )


class ConnectionLost(TransportError):
    """The connection broke after the command was sent: it may or may not have run."""

    transient = True
    may_have_run = True

    def __init__(self, host: str, reason: str, *, may_have_run: bool = True) -> None:
        self.reason = reason
        self.may_have_run = may_have_run
        super().__init__(f"connection to {host} lost: {reason}", host=host)


class CommandFailed(AdapterError):
    """The command ran and failed; ``stderr`` is for logs, never for API clients.

    ``reason`` is the command's own one-line explanation when the adapter could read one from
    stderr (for Slurm: ``adapters.slurm.stderr``), short and fit to show a user; else ``None``.
    """

    transient = False

    def __init__(
        self,
        argv: Sequence[str],
        exit_code: int,
        stderr: str,
        *,
        host: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stderr = stderr
        self.reason = reason
        super().__init__(
            f"{argv[0] if argv else '?'} exited {exit_code}: {_excerpt(stderr)}", host=host
        )


class SlurmUnavailable(CommandFailed):
    """slurmctld/slurmdbd did not answer; try again later, assume nothing about jobs.

    ``may_have_run`` is set by the caller from the message: "Socket timed out on send/recv"
    during sbatch can mean the controller took the job; "Unable to contact slurm controller"
    means it did not.
    """

    transient = True

    def __init__(
        self,
        argv: Sequence[str],
        exit_code: int,
        stderr: str,
        *,
        host: str | None = None,
        reason: str | None = None,
        may_have_run: bool = False,
    ) -> None:
        super().__init__(argv, exit_code, stderr, host=host, reason=reason)
        self.may_have_run = may_have_run


class SlurmOutputError(AdapterError):
    transient = False

    def __init__(self, argv: Sequence[str], detail: str) -> None:
        self.argv = list(argv)
        super().__init__(f"cannot parse output of {argv[0] if argv else '?'}: {detail}")


class RunAsRefused(CommandFailed):
    """sudo would not run the command as ``user``: no such user on the login node, a user outside
    the group the sudoers rule allows, or no rule at all. Nothing ran."""

    transient = False

    def __init__(
        self,
        argv: Sequence[str],
        exit_code: int,
        stderr: str,
        *,
        user: str,
        host: str | None = None,
    ) -> None:
        super().__init__(
            argv,
            exit_code,
            stderr,
            host=host,
            reason=f"the cluster would not run the job as {user}",
        )
        self.user = user


class SubmitMisrouted(CommandFailed):
    """sbatch reported the job on another cluster (``id;cluster``); that job was cancelled."""

    transient = False

    def __init__(self, argv: Sequence[str], job_id: str, cluster: str) -> None:
        super().__init__(
            argv,
            0,
            f"sbatch placed job {job_id} on cluster {cluster}",
            reason=f"sbatch placed the job on cluster {cluster}; it was cancelled there",
        )
        self.job_id = job_id
        self.cluster = cluster
