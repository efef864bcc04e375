"""What can go wrong in a client command, and the exit code each failure leaves for scripts.

    CliError                 1  unexpected (a 5xx other than 502/503/504, a bug)
    ├── UnexpectedResponse   1  a success whose body is not the JSON the contract promises
    ├── BadUrl               2  malformed --url
    ├── MissingToken         6  no --token and no BROKER_TOKEN
    ├── BrokerUnreachable    7  connection refused, DNS failure, timeout
    └── ProblemError         by problem ``type``, then by HTTP status (``exit_code_for``)

Usage errors from flags and arguments (exit 2) are ``typer.BadParameter``, raised by typer.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Any

import httpx

from broker.cli.output import render_value


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    NOT_FOUND = 3
    REFUSED = 4
    INVALID = 5
    AUTH = 6
    UNAVAILABLE = 7


_REFUSED_TYPES = frozenset(
    {"quota-exceeded", "limit-exceeded", "idempotency-conflict", "submit-rejected", "conflict"}
)
# Members of a problem document that are not "numbers" worth echoing on their own line.
_PROBLEM_CORE = frozenset({"type", "title", "status", "detail", "instance", "errors"})


def exit_code_for(status: int, problem_type: str | None) -> ExitCode:
    """The exit code for an HTTP error answer, by problem ``type`` first, then by status."""
    if problem_type in _REFUSED_TYPES:
        return ExitCode.REFUSED
    if status == 404:
        return ExitCode.NOT_FOUND
    if status in (401, 403):
        return ExitCode.AUTH
    if status in (400, 413, 422):
        return ExitCode.INVALID
    if status == 409:
        return ExitCode.REFUSED
    if status in (429, 502, 503, 504):
        return ExitCode.UNAVAILABLE
    return ExitCode.UNEXPECTED


class CliError(Exception):
    """A failure to report on stderr and exit with ``exit_code``."""

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def lines(self) -> list[str]:
        return [self.message]


class BrokerUnreachable(CliError):
    """No HTTP answer at all: connection refused, DNS failure, timeout."""

    exit_code = ExitCode.UNAVAILABLE


class BadUrl(CliError):
    exit_code = ExitCode.USAGE


class UnexpectedResponse(CliError):
    """A success status whose body is not the JSON the contract promises."""


class MissingToken(CliError):
    exit_code = ExitCode.AUTH


class ProblemError(CliError):
    """An HTTP error answer, normally an RFC 9457 problem document."""

    def __init__(self, status: int, problem: Mapping[str, Any], retry_after: str | None) -> None:
        self.status = status
        self.problem = dict(problem)
        self.retry_after = retry_after
        problem_type = problem.get("type")
        self.exit_code = exit_code_for(
            status, problem_type if isinstance(problem_type, str) else None
        )
        title = str(problem.get("title") or f"HTTP {status}")
        detail = str(problem.get("detail") or "")
        super().__init__(f"{title}: {detail}" if detail else title)

    @classmethod
    def from_response(cls, response: httpx.Response) -> ProblemError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # Not the broker speaking (a proxy, a load balancer): show a short excerpt.
            excerpt = " ".join(response.text.split())[:200]
            body = {
                "title": f"HTTP {response.status_code} {response.reason_phrase}".strip(),
                "detail": excerpt,
            }
        return cls(response.status_code, body, response.headers.get("Retry-After"))

    def lines(self) -> list[str]:
        out = [self.message]
        numbers = [(k, v) for k, v in self.problem.items() if k not in _PROBLEM_CORE]
        if numbers:
            out.append("  " + "  ".join(f"{k}: {render_value(v)}" for k, v in numbers))
        errors = self.problem.get("errors")
        if isinstance(errors, list):
            # The broker's detail already names the first few; list only what it left out.
            for error in (e for e in errors if isinstance(e, Mapping)):
                line = f"{error.get('field', '?')}: {error.get('message', '')}"
                if line not in self.message:
                    out.append(f"  {line}")
        if self.retry_after:
            out.append(f"  retry after {self.retry_after} s")
        if self.status == 401:
            out.append("  check --token or BROKER_TOKEN")
        return out
