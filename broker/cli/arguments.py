"""Reading what a user typed: ``K=V`` pairs, dates, the batch script, the paging flags."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

T = TypeVar("T")

LimitOption = Annotated[int | None, typer.Option("--limit", help="Page size.")]
CursorOption = Annotated[str | None, typer.Option("--cursor", help="Start at this page cursor.")]
AllOption = Annotated[bool, typer.Option("--all", help="Follow next_cursor to the last page.")]


def parse_pairs(values: list[str] | None, option: str, convert: Callable[[str], T]) -> dict[str, T]:
    """``["K=V", ...]`` from a repeatable option as a dict; a bad item is a usage error."""
    result: dict[str, T] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        try:
            result[key] = convert(raw)
        except ValueError:
            raise typer.BadParameter(
                f"{raw!r} is not a valid value for {key}", param_hint=option
            ) from None
    return result


_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")


def timestamp(value: str | None) -> str | None:
    """A bare date means midnight UTC; anything else goes to the broker as typed."""
    if value is not None and _DATE_ONLY.fullmatch(value):
        return f"{value}T00:00:00Z"
    return value


def read_script(path: str) -> str:
    """The batch script from a file, or from stdin for ``-``; unreadable is a usage error."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}", param_hint="SCRIPT") from None
