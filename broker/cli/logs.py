"""A job's output and outcome: ``broker logs``, and what ``submit --wait/--follow`` use.

Output comes from ``GET /v1/jobs/{id}/output`` by byte offset: following a job is asking again
from ``next_offset`` until ``eof`` (the job is final and everything was read).
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from broker.cli.context import ClientTyper, connect, options
from broker.cli.http import BrokerClient, segment
from broker.cli.output import print_json

FOLLOW_INTERVAL_SECONDS = 1.0
FINAL_STATES = frozenset(
    {
        "completed",
        "failed",
        "cancelled",
        "timeout",
        "out_of_memory",
        "node_fail",
        "preempted",
        "submit_failed",
        "unknown",
    }
)

app = ClientTyper()


def outcome_exit_code(job: dict[str, Any]) -> int:
    """The exit code of ``--wait``: 0 for a completed job, the job's own exit code when it failed
    with one (1-255), else 1 (cancelled, timed out, out of memory, lost, never submitted)."""
    if job.get("state") == "completed":
        return 0
    code = job.get("exit_code")
    if job.get("state") == "failed" and isinstance(code, int) and 0 < code < 256:
        return code
    return 1


def wait_for_end(api: BrokerClient, job_id: str) -> dict[str, Any]:
    """Poll the job until it is final; returns the final job."""
    while True:
        job: dict[str, Any] = api.json("GET", f"/v1/jobs/{segment(job_id)}")
        if job.get("state") in FINAL_STATES:
            return job
        time.sleep(FOLLOW_INTERVAL_SECONDS)


def stream_output(
    api: BrokerClient,
    job_id: str,
    *,
    stream: str = "stdout",
    task: int | None = None,
    follow: bool,
    offset: int = 0,
) -> int:
    """Write the job's output to stdout from ``offset``; with ``follow``, until ``eof``.

    Returns the offset reached. Bytes are written as the broker decoded them (UTF-8 with
    replacement characters), so a terminal never receives a partial escape from the API."""
    path = f"/v1/jobs/{segment(job_id)}/output"
    while True:
        params = {"stream": stream, "offset": offset, "task": task}
        chunk: dict[str, Any] = api.json("GET", path, params=params)
        if chunk["data"]:
            sys.stdout.write(chunk["data"])
            sys.stdout.flush()
        offset = int(chunk["next_offset"])
        if chunk["eof"] or not follow:
            return offset
        if offset >= int(chunk["size"]):
            time.sleep(FOLLOW_INTERVAL_SECONDS)


@app.command("logs")
def logs(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The broker's job id.")],
    stderr: Annotated[bool, typer.Option("--stderr", help="The job's stderr.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job has ended.")
    ] = False,
    task: Annotated[int | None, typer.Option("--task", help="An array task's output.")] = None,
) -> None:
    """Print what a job wrote to stdout (or --stderr); -f follows it until the job ends."""
    stream = "stderr" if stderr else "stdout"
    with connect(ctx) as api:
        if options(ctx).json:
            params = {"stream": stream, "task": task}
            print_json(api.json("GET", f"/v1/jobs/{segment(job_id)}/output", params=params))
            return
        stream_output(api, job_id, stream=stream, task=task, follow=follow)
