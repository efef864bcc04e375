"""Jobs: ``broker submit``, ``jobs``, ``job``, ``job-events``, ``cancel``."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Annotated, Any

import typer

from broker.cli import logs
from broker.cli.arguments import AllOption, CursorOption, LimitOption, parse_pairs, read_script
from broker.cli.context import ClientTyper, connect, options
from broker.cli.errors import BrokerUnreachable
from broker.cli.http import decode, segment
from broker.cli.output import fields, more_hint, print_json, print_record, print_table

SUBMIT_TIMEOUT = 60.0  # sbatch runs over SSH before the broker answers

app = ClientTyper()

_JOB_SUMMARY = (
    "id",
    "slurm_job_id",
    "state",
    "reserved_gpu_hours",
    "project",
    "cluster",
    "partition",
    "gpu_type",
    "gpus",
    "time_limit_minutes",
)
_JOB_COLUMNS = {
    "ID": "id",
    "PROJECT": "project",
    "USER": "user",
    "NAME": "name",
    "CLUSTER": "cluster",
    "GPU TYPE": "gpu_type",
    "GPUS": "gpus",
    "STATE": "state",
    "SLURM ID": "slurm_job_id",
    "SUBMITTED": "submitted_at",
}


def _job_row(job: Mapping[str, Any]) -> list[Any]:
    return [job.get(key) for key in _JOB_COLUMNS.values()]


@app.command("submit")
def submit(
    ctx: typer.Context,
    script: Annotated[
        str, typer.Argument(metavar="SCRIPT", help="Batch script file, or - for stdin.")
    ],
    project: Annotated[str, typer.Option("--project", help="Project to charge.")],
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs in total.")],
    time_limit: Annotated[int, typer.Option("--time", help="Time limit in minutes.")],
    cluster: Annotated[str | None, typer.Option("--cluster")] = None,
    partition: Annotated[str | None, typer.Option("--partition")] = None,
    gpu_type: Annotated[str | None, typer.Option("--gpu-type")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Job name.")] = None,
    nodes: Annotated[int | None, typer.Option("--nodes")] = None,
    cpus_per_gpu: Annotated[int | None, typer.Option("--cpus-per-gpu")] = None,
    mem_per_gpu_gb: Annotated[int | None, typer.Option("--mem-per-gpu-gb")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="K=V for the job's environment; repeatable.")
    ] = None,
    array: Annotated[
        str | None,
        typer.Option(
            "--array",
            metavar="N[%K]",
            help="A job array of N tasks (indices 0..N-1), at most K running at once.",
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Retry-safe key; one is generated if omitted."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Wait for the job to end; exit 0 if it completed, its own exit code if it "
            "failed with one, 1 otherwise.",
        ),
    ] = False,
    follow: Annotated[
        bool,
        typer.Option("--follow", help="Print the job's output as it runs; implies --wait."),
    ] = False,
) -> None:
    """Submit a batch script as a GPU job; the broker admits it against the project's quota."""
    body: dict[str, Any] = {
        "project": project,
        "script": read_script(script),
        "gpus": gpus,
        "time_limit_minutes": time_limit,
    }
    optional = {
        "name": name,
        "cluster": cluster,
        "partition": partition,
        "gpu_type": gpu_type,
        "nodes": nodes,
        "cpus_per_gpu": cpus_per_gpu,
        "mem_per_gpu_gb": mem_per_gpu_gb,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    environment = parse_pairs(env, "--env", str)
    if environment:
        body["environment"] = environment
    if array is not None:
        body["array"] = parse_array(array)
        if follow:
            raise typer.BadParameter(
                "an array's output is per task: use broker logs ID --task N --follow",
                param_hint="--follow",
            )
    # Always send a key, so a submit whose answer was lost can be retried without a second job.
    key = idempotency_key or str(uuid.uuid4())
    with connect(ctx) as api:
        try:
            response = api.call(
                "POST",
                "/v1/jobs",
                body=body,
                headers={"Idempotency-Key": key},
                timeout=SUBMIT_TIMEOUT,
            )
        except BrokerUnreachable as exc:
            raise BrokerUnreachable(
                f"{exc.message}\n  the job may have been submitted: retry with"
                f" --idempotency-key {key} to avoid a duplicate"
            ) from exc
        job = decode(response)
        if options(ctx).json and not (wait or follow):
            print_json(job)
            return
        if not options(ctx).json:
            summary = fields((label, job.get(label)) for label in _JOB_SUMMARY)
            typer.echo(summary, err=follow)  # with --follow, stdout is the job's output
        if response.headers.get("Idempotent-Replayed") == "true":
            typer.echo("(an earlier submission with this idempotency key; no new job)", err=True)
        if job.get("state") == "submit_unknown":
            typer.echo("sbatch's answer was lost; the broker is finding the job in Slurm", err=True)
        if not (wait or follow):
            return
        if follow:
            logs.stream_output(api, job["id"], follow=True)
        final = logs.wait_for_end(api, job["id"])
    if options(ctx).json:
        print_json(final)
    else:
        typer.echo(f"job {final['id']} {final['state']}", err=True)
    raise typer.Exit(logs.outcome_exit_code(final))


def parse_array(text: str) -> dict[str, int]:
    """``200%16`` -> size 200, at most 16 at once; ``200`` -> no limit of its own."""
    size_text, percent, parallel_text = text.partition("%")
    if not size_text.isdigit() or (percent and not parallel_text.isdigit()):
        raise typer.BadParameter("write N or N%K, e.g. 200%16", param_hint="--array")
    spec = {"size": int(size_text)}
    if percent:
        spec["max_parallel"] = int(parallel_text)
    return spec


@app.command("tasks")
def tasks(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    limit: LimitOption = None,
    cursor: CursorOption = None,
    follow: AllOption = False,
) -> None:
    """Show an array job's tasks, in index order."""
    with connect(ctx) as api:
        page = api.pages(
            f"/v1/jobs/{segment(job_id)}/tasks", {"limit": limit, "cursor": cursor}, follow
        )
    if options(ctx).json:
        print_json(page)
        return
    rows = [
        [
            t.get("index"),
            t.get("state"),
            t.get("slurm_job_id"),
            t.get("started_at"),
            t.get("ended_at"),
            t.get("exit_code"),
            t.get("charged_gpu_hours"),
        ]
        for t in page["data"]
    ]
    print_table(
        ["TASK", "STATE", "SLURM ID", "STARTED", "ENDED", "EXIT", "GPU-H"], rows, "No tasks."
    )
    more_hint(page)


@app.command("jobs")
def jobs(
    ctx: typer.Context,
    project: Annotated[str | None, typer.Option("--project")] = None,
    state: Annotated[str | None, typer.Option("--state")] = None,
    cluster: Annotated[str | None, typer.Option("--cluster")] = None,
    user: Annotated[str | None, typer.Option("--user")] = None,
    limit: LimitOption = None,
    cursor: CursorOption = None,
    follow: AllOption = False,
) -> None:
    """List jobs, newest first."""
    params = {
        "project": project,
        "state": state,
        "cluster": cluster,
        "user": user,
        "limit": limit,
        "cursor": cursor,
    }
    with connect(ctx) as api:
        page = api.pages("/v1/jobs", params, follow)
    if options(ctx).json:
        print_json(page)
        return
    print_table(list(_JOB_COLUMNS), [_job_row(job) for job in page["data"]], "No jobs.")
    more_hint(page)


@app.command("job")
def job(ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Show one job."""
    with connect(ctx) as api:
        data = api.json("GET", f"/v1/jobs/{segment(job_id)}")
    print_record(data, options(ctx).json)


@app.command("job-events")
def job_events(ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Show a job's state transitions."""
    with connect(ctx) as api:
        data = api.json("GET", f"/v1/jobs/{segment(job_id)}/events")
    if options(ctx).json:
        print_json(data)
        return
    rows = [
        [e.get("at"), e.get("from_state"), e.get("to_state"), e.get("reason")] for e in data["data"]
    ]
    print_table(["AT", "FROM", "TO", "REASON"], rows, "No events.")


@app.command("cancel")
def cancel(ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Cancel a job; cancelling a job that already ended is success."""
    with connect(ctx) as api:
        response = api.call("DELETE", f"/v1/jobs/{segment(job_id)}")
        data = decode(response)
    if options(ctx).json:
        print_json(data)
    elif response.status_code == 202:
        typer.echo(f"Cancellation requested for job {data['id']} (state: {data['state']}).")
    else:
        typer.echo(f"Job {data['id']} had already ended (state: {data['state']}).")
