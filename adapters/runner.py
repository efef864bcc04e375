"""The transport contract: something that runs an argv list on a cluster's login node."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command printed and how it ended."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_s: float

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")


class CommandRunner(Protocol):
    """Runs one command and returns its result; never raises for a non-zero exit.

    Implementations raise ``adapters.errors.TransportError`` subclasses when the command could not
    be run to completion (unreachable host, rejected key, deadline passed).
    """

    name: str
    """Short label for logs and metrics (the cluster name)."""

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Run ``argv`` with ``env`` added to a controlled environment, within ``timeout`` s."""
        ...

    def close(self) -> None:
        """Release connections; the runner may be used again afterwards (it reconnects)."""
        ...
