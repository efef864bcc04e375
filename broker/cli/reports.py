"""Reports for admins and engineers: ``broker audit`` and ``broker report usage``."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from broker.cli.arguments import AllOption, CursorOption, LimitOption, timestamp
from broker.cli.context import ClientTyper, connect, options
from broker.cli.output import more_hint, print_json, print_table

app = ClientTyper()
group = ClientTyper(help="Usage reports (admins and engineers).", no_args_is_help=True)


class GroupBy(StrEnum):
    project = "project"
    user = "user"
    cluster = "cluster"
    gpu_type = "gpu_type"


@app.command("audit")
def audit(
    ctx: typer.Context,
    limit: LimitOption = None,
    cursor: CursorOption = None,
    follow: AllOption = False,
) -> None:
    """Show who changed which project, quota, member, user or token, and when."""
    with connect(ctx) as api:
        page = api.pages("/v1/audit", {"limit": limit, "cursor": cursor}, follow)
    if options(ctx).json:
        print_json(page)
        return
    rows = [
        [
            e.get("at"),
            e.get("actor"),
            e.get("action"),
            f"{e.get('target_type')}:{e.get('target')}",
            e.get("details"),
        ]
        for e in page["data"]
    ]
    print_table(["AT", "ACTOR", "ACTION", "TARGET", "DETAILS"], rows, "No audit entries.")
    more_hint(page)


@group.command("usage")
def report_usage(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option("--from", help="Start, RFC 3339 or a date (midnight UTC).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--to", help="End, RFC 3339 or a date (midnight UTC).")
    ] = None,
    group_by: Annotated[GroupBy, typer.Option("--group-by")] = GroupBy.project,
    csv: Annotated[bool, typer.Option("--csv", help="Print the broker's CSV.")] = False,
) -> None:
    """GPU-hours and job counts per project, user, cluster or GPU type."""
    as_json = options(ctx).json
    if csv and as_json:
        raise typer.BadParameter("choose one of --csv and --json", param_hint="--csv")
    params = {"from": timestamp(since), "to": timestamp(until), "group_by": group_by.value}
    with connect(ctx) as api:
        if csv:
            response = api.call("GET", "/v1/usage", params=params, headers={"Accept": "text/csv"})
            typer.echo(response.text, nl=not response.text.endswith("\n"))
            return
        data = api.json("GET", "/v1/usage", params=params)
    if as_json:
        print_json(data)
        return
    rows = [
        [r.get("key"), r.get("gpu_hours"), r.get("jobs"), r.get("jobs_completed")]
        for r in data["data"]
    ]
    headers = [group_by.value.replace("_", " ").upper(), "GPU-HOURS", "JOBS", "COMPLETED"]
    print_table(headers, rows, "No usage in this period.")
