"""GPUs by state from the poller's partition snapshots, each GPU counted once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def snapshot_int(entry: Mapping[str, object], key: str) -> int:
    """A count from a snapshot entry; missing, negative or not an integer counts as 0."""
    value = entry.get(key, 0)
    return value if isinstance(value, int) and value > 0 else 0


def partition_gpus(entry: Mapping[str, object]) -> tuple[int, dict[str, int]]:
    """Total and GPUs by state of one partition snapshot; the states always sum to the total.

    Allocated and idle are taken as the poller saw them (capped by the total); unavailable is
    the rest, so GPUs on drained or down nodes, and any the snapshot did not classify, are
    counted once and only once.
    """
    total = snapshot_int(entry, "gpus_total")
    allocated = min(snapshot_int(entry, "gpus_allocated"), total)
    idle = min(snapshot_int(entry, "gpus_idle"), total - allocated)
    return total, {"allocated": allocated, "idle": idle, "unavailable": total - allocated - idle}


def pool_gpus(
    partitions: Iterable[Mapping[str, object]],
) -> dict[str, tuple[int, dict[str, int]]]:
    """GPUs of a cluster by GPU type, each physical GPU counted once.

    Slurm partitions may share nodes (a ``debug`` partition over the ``gpu`` nodes), so the sum
    over partitions can count a GPU twice. Without node lists in the snapshot, the pool of a GPU
    type is its largest partition: exact when a type's partitions are nested in one another (the
    usual layout), an undercount when they are disjoint.
    """
    pools: dict[str, tuple[int, dict[str, int]]] = {}
    for entry in partitions:
        gpu_type = str(entry.get("gpu_type") or "unknown")
        total, states = partition_gpus(entry)
        if gpu_type not in pools or total > pools[gpu_type][0]:
            pools[gpu_type] = (total, states)
    return pools
