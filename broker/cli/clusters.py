"""``broker clusters``: each cluster's partitions and GPUs as the broker's poller last saw them."""

from __future__ import annotations

from typing import Any

import typer

from broker.cli.context import ClientTyper, connect, options
from broker.cli.output import print_json, print_table

app = ClientTyper()

_PARTITION_KEYS = (
    "name",
    "gpu_type",
    "gpus_total",
    "gpus_allocated",
    "gpus_idle",
    "nodes_total",
    "nodes_down",
)
_HEADERS = [
    "CLUSTER",
    "UP",
    "LAST POLL",
    "PARTITION",
    "GPU TYPE",
    "GPUS",
    "ALLOCATED",
    "IDLE",
    "NODES",
    "DOWN",
]


@app.command("clusters")
def clusters(ctx: typer.Context) -> None:
    """Show each cluster's partitions and free GPUs from the broker's last poll."""
    with connect(ctx) as api:
        data = api.json("GET", "/v1/clusters")
    if options(ctx).json:
        print_json(data)
        return
    rows: list[list[Any]] = []
    for c in data["data"]:
        head = [c.get("name"), c.get("up"), c.get("last_poll_at")]
        for p in c.get("partitions") or [{}]:
            rows.append([*head, *(p.get(key) for key in _PARTITION_KEYS)])
    print_table(_HEADERS, rows, "No clusters.")
