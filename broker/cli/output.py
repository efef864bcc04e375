"""What the client commands print: plain text for people (aligned columns, no colour), or the
broker's JSON as is with ``--json``. Scripts use ``--json``; the text is not meant to be parsed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import typer

COLUMN_GAP = "  "
MISSING = "-"


def render_value(value: Any) -> str:
    """One cell: ``None`` as ``-``, floats to two decimals, lists and maps on one line."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={render_value(val)}" for key, val in value.items()) or MISSING
    if isinstance(value, list | tuple):
        return ", ".join(render_value(item) for item in value) or MISSING
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numeric columns are right-aligned."""
    raw_rows = [list(row) for row in rows]
    cells = [[render_value(value) for value in row] for row in raw_rows]
    widths = [len(header) for header in headers]
    for row in cells:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    numeric = [
        bool(raw_rows) and all(_is_number(row[i]) or row[i] is None for row in raw_rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        padded = (
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        )
        return COLUMN_GAP.join(padded).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])


def fields(pairs: Iterable[tuple[str, Any]]) -> str:
    """A ``label  value`` list, labels padded to the longest one."""
    items = [(label, render_value(value)) for label, value in pairs]
    width = max((len(label) for label, _ in items), default=0)
    return "\n".join(f"{label.ljust(width)}{COLUMN_GAP}{value}".rstrip() for label, value in items)


def json_text(data: Any) -> str:
    """The API's JSON, indented; parses back to exactly what the broker sent."""
    return json.dumps(data, indent=2, ensure_ascii=False)


def print_json(data: Any) -> None:
    """The broker's JSON on stdout; nothing for an empty (204) answer."""
    if data is not None:
        typer.echo(json_text(data))


def print_record(data: Mapping[str, Any], as_json: bool) -> None:
    """One object: as JSON, or as aligned ``key: value`` lines."""
    if as_json:
        print_json(data)
    else:
        typer.echo(fields(data.items()))


def print_table(headers: list[str], rows: list[list[Any]], empty: str) -> None:
    typer.echo(table(headers, rows) if rows else empty)


def more_hint(page: Mapping[str, Any]) -> None:
    """On stderr, how to get the page after this one."""
    if page.get("next_cursor"):
        typer.echo(f"more: --cursor {page['next_cursor']} or --all", err=True)
