"""Projects: ``broker usage PROJECT`` and the ``broker project ...`` group (members, quota)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer

from broker.cli.arguments import parse_pairs, timestamp
from broker.cli.context import ClientTyper, connect, options
from broker.cli.http import segment
from broker.cli.output import fields, print_json, print_record, print_table, table

app = ClientTyper()
group = ClientTyper(help="Projects, their members and quotas.", no_args_is_help=True)

NameArgument = Annotated[str, typer.Argument(metavar="NAME")]
UserArgument = Annotated[str, typer.Argument(metavar="USER")]


@app.command("usage")
def usage(ctx: typer.Context, project: Annotated[str, typer.Argument(metavar="PROJECT")]) -> None:
    """Show a project's GPU-hour budget, use and reservations in the current period."""
    with connect(ctx) as api:
        data = api.json("GET", f"/v1/projects/{segment(project)}/usage")
    if options(ctx).json:
        print_json(data)
        return
    typer.echo(fields((k, v) for k, v in data.items() if not isinstance(v, Mapping)))
    for key, breakdown in data.items():
        if isinstance(breakdown, Mapping) and breakdown:
            label = key.removeprefix("by_").replace("_", " ").upper()
            typer.echo("")
            typer.echo(table([label, "GPU-HOURS"], [[k, v] for k, v in breakdown.items()]))


def _show_project(data: Mapping[str, Any]) -> None:
    typer.echo(
        fields((k, data.get(k)) for k in ("name", "description", "slurm_accounts", "created_at"))
    )
    members = data.get("members") or {}
    typer.echo("")
    print_table(["MEMBER", "ROLE"], [[u, r] for u, r in members.items()], "No members.")
    typer.echo("")
    quota = data.get("quota")
    typer.echo("Quota:\n" + fields(quota.items()) if quota else "No quota.")


@group.command("create")
def project_create(
    ctx: typer.Context,
    name: NameArgument,
    account: Annotated[
        list[str] | None,
        typer.Option(
            "--account", help="CLUSTER=ACCOUNT: the Slurm account per cluster; repeatable."
        ),
    ] = None,
    description: Annotated[str | None, typer.Option("--description")] = None,
) -> None:
    """Create a project."""
    body: dict[str, Any] = {"name": name, "slurm_accounts": parse_pairs(account, "--account", str)}
    if description is not None:
        body["description"] = description
    with connect(ctx) as api:
        data = api.json("POST", "/v1/projects", body=body)
    if options(ctx).json:
        print_json(data)
    else:
        _show_project(data)


@group.command("list")
def project_list(ctx: typer.Context) -> None:
    """List the projects you may see."""
    with connect(ctx) as api:
        data = api.json("GET", "/v1/projects")
    if options(ctx).json:
        print_json(data)
        return
    rows = []
    for p in data["data"]:
        quota = p.get("quota") or {}
        rows.append(
            [
                p.get("name"),
                p.get("slurm_accounts"),
                len(p.get("members") or {}),
                quota.get("gpu_hours"),
                quota.get("period_start"),
                quota.get("period_end"),
            ]
        )
    headers = ["NAME", "ACCOUNTS", "MEMBERS", "GPU-HOURS", "PERIOD START", "PERIOD END"]
    print_table(headers, rows, "No projects.")


@group.command("show")
def project_show(ctx: typer.Context, name: NameArgument) -> None:
    """Show a project with its members and quota."""
    with connect(ctx) as api:
        data = api.json("GET", f"/v1/projects/{segment(name)}")
    if options(ctx).json:
        print_json(data)
    else:
        _show_project(data)


@group.command("add-member")
def project_add_member(
    ctx: typer.Context,
    name: NameArgument,
    user: UserArgument,
    role: Annotated[str, typer.Option("--role")] = "member",
) -> None:
    """Add a user to a project, or change their role in it."""
    with connect(ctx) as api:
        data = api.json(
            "PUT", f"/v1/projects/{segment(name)}/members/{segment(user)}", body={"role": role}
        )
    if options(ctx).json:
        print_json(data)
    else:
        typer.echo(f"{data['user']} is {data['role']} of {data['project']}.")


@group.command("remove-member")
def project_remove_member(ctx: typer.Context, name: NameArgument, user: UserArgument) -> None:
    """Remove a user from a project."""
    with connect(ctx) as api:
        data = api.json("DELETE", f"/v1/projects/{segment(name)}/members/{segment(user)}")
    if options(ctx).json:
        print_json(data)
    else:
        typer.echo(f"Removed {user} from {name}.")


def _queue(ctx: typer.Context, name: str, held: bool | None) -> None:
    with connect(ctx) as api:
        path = f"/v1/projects/{segment(name)}/queue"
        data = api.json("GET", path) if held is None else api.json("PUT", path, body={"held": held})
    if options(ctx).json:
        print_json(data)
        return
    state = "held" if data["held"] else "open"
    typer.echo(
        f"Queue of {data['project']}: {state}; {data['queued_jobs']} jobs "
        f"({data['queued_gpus']} GPUs) queued."
    )


@group.command("queue")
def project_queue(ctx: typer.Context, name: NameArgument) -> None:
    """Show the project's admission queue: held or open, and what waits in it."""
    _queue(ctx, name, None)


@group.command("hold")
def project_hold(ctx: typer.Context, name: NameArgument) -> None:
    """Hold the project's queue: its queued jobs stay queued (admin)."""
    _queue(ctx, name, True)


@group.command("release")
def project_release(ctx: typer.Context, name: NameArgument) -> None:
    """Release the project's queue: queued jobs go to Slurm as its limits allow (admin)."""
    _queue(ctx, name, False)


@group.command("set-quota")
def project_set_quota(
    ctx: typer.Context,
    name: NameArgument,
    gpu_hours: Annotated[float, typer.Option("--gpu-hours", help="GPU-hour budget.")],
    start: Annotated[
        str, typer.Option("--start", help="Period start, RFC 3339 or a date (midnight UTC).")
    ],
    end: Annotated[
        str, typer.Option("--end", help="Period end, RFC 3339 or a date (midnight UTC).")
    ],
    weight: Annotated[
        list[str] | None, typer.Option("--weight", help="TYPE=W GPU-hour weight; repeatable.")
    ] = None,
    max_concurrent_gpus: Annotated[int | None, typer.Option("--max-concurrent-gpus")] = None,
    max_gpus_per_job: Annotated[int | None, typer.Option("--max-gpus-per-job")] = None,
    max_time_limit: Annotated[int | None, typer.Option("--max-time-limit", help="Minutes.")] = None,
    max_pending_jobs: Annotated[int | None, typer.Option("--max-pending-jobs")] = None,
    allow_cluster: Annotated[list[str] | None, typer.Option("--allow-cluster")] = None,
    allow_partition: Annotated[list[str] | None, typer.Option("--allow-partition")] = None,
    allow_gpu_type: Annotated[list[str] | None, typer.Option("--allow-gpu-type")] = None,
    max_concurrent_gpus_on: Annotated[
        list[str] | None,
        typer.Option("--max-concurrent-gpus-on", help="CLUSTER=N; repeatable."),
    ] = None,
) -> None:
    """Replace a project's quota. Every limit not given here becomes "no limit"."""
    body: dict[str, Any] = {
        "period_start": timestamp(start),
        "period_end": timestamp(end),
        "gpu_hours": gpu_hours,
        "gpu_type_weights": parse_pairs(weight, "--weight", float),
        "max_concurrent_gpus_per_cluster": parse_pairs(
            max_concurrent_gpus_on, "--max-concurrent-gpus-on", int
        ),
    }
    optional = {
        "max_concurrent_gpus": max_concurrent_gpus,
        "max_gpus_per_job": max_gpus_per_job,
        "max_time_limit_minutes": max_time_limit,
        "max_pending_jobs": max_pending_jobs,
        "allowed_clusters": allow_cluster or None,
        "allowed_partitions": allow_partition or None,
        "allowed_gpu_types": allow_gpu_type or None,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    with connect(ctx) as api:
        data = api.json("PUT", f"/v1/projects/{segment(name)}/quota", body=body)
    print_record(data, options(ctx).json)
