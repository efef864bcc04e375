"""Run commands on this machine with ``subprocess`` (the broker runs on the login node itself)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from adapters.environment import local_environment
from adapters.errors import CommandTimedOut
from adapters.runner import CommandResult

logger = logging.getLogger(__name__)


class LocalRunner:
    """A ``CommandRunner`` that runs argv lists as child processes, never through a shell.

    The child gets only a few variables of this process's environment (``PATH``, ``HOME``,
    locale, ``SLURM_CONF``; see ``adapters.environment``), ``SLURM_TIME_FORMAT=standard``, and
    ``extra_env`` (e.g. ``{"SLURM_CONF": ...}``).
    A missing or non-executable binary yields exit code 127 or 126, as a remote shell would report.
    """

    def __init__(
        self,
        *,
        name: str = "local",
        extra_env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        default_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self._extra_env = dict(extra_env or {})
        local_environment({}, self._extra_env)  # validates names now rather than at first use
        self._cwd = None if cwd is None else str(cwd)
        self._default_timeout = default_timeout

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        if not argv:
            raise ValueError("empty argv")
        limit = self._default_timeout if timeout is None else timeout
        environment = local_environment(os.environ, self._extra_env, env)
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=environment,
                cwd=self._cwd,
                start_new_session=True,  # so a timeout can kill the whole process group
            )
        except FileNotFoundError as exc:
            return self._spawn_failure(argv, 127, exc, started)
        except PermissionError as exc:
            return self._spawn_failure(argv, 126, exc, started)
        with process:
            try:
                stdout, stderr = process.communicate(stdin or b"", timeout=limit)
            except subprocess.TimeoutExpired as exc:
                self._kill_group(process)
                logger.debug("%s: %s timed out after %.3fs", self.name, list(argv), limit)
                raise CommandTimedOut(argv, limit) from exc
        duration = time.monotonic() - started
        logger.debug(
            "%s: %s exited %d in %.3fs", self.name, list(argv), process.returncode, duration
        )
        return CommandResult(
            argv=tuple(argv),
            exit_code=process.returncode,
            stdout=stdout,
            stderr=stderr,
            duration_s=duration,
        )

    def close(self) -> None:
        """Nothing to release: every command is its own process."""

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        # A grandchild that left the group may hold the pipes open: do not wait for it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=1.0)

    def _spawn_failure(
        self, argv: Sequence[str], code: int, exc: OSError, started: float
    ) -> CommandResult:
        message = f"{argv[0]}: {exc.strerror or exc}\n".encode()
        logger.debug("%s: %s could not start: %s", self.name, list(argv), exc)
        return CommandResult(
            argv=tuple(argv),
            exit_code=code,
            stdout=b"",
            stderr=message,
            duration_s=time.monotonic() - started,
        )
