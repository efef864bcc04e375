"""Sections 1 and 2: what the broker adds to one ``sbatch``, and how many jobs a second it submits.

Every variant submits the same job with the same ``sbatch`` command line (the one
``adapters.slurm.commands.sbatch`` builds, as the broker does) to the ``bench`` account, whose jobs
Slurm keeps pending, so the controller does the same work for each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from adapters.slurm.types import JobSpec
from benchmarks.broker_process import BrokerServer, scrape
from benchmarks.load import LoadResult, Operation, closed_loop
from benchmarks.plan import Plan
from benchmarks.procstat import MachineCpu, process_cpu_s, tree_cpu_s
from benchmarks.slurm import (
    Cluster,
    ClusterError,
    LocalSbatch,
    SshSbatch,
    bench_request,
    bench_spec,
    cancel_all,
    live_jobs,
    spawn_overheads,
    wait_for_room,
)
from benchmarks.stats import Summary

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BrokerTarget:
    """A running broker with the ``bench`` project and a researcher's token."""

    backend: str
    label: str
    server: BrokerServer
    token: str


class BrokerSubmit:
    """(c) ``POST /v1/jobs`` on a kept-open HTTP connection; returns the Slurm job id."""

    def __init__(self, target: BrokerTarget, cluster: Cluster) -> None:
        self._http = httpx.Client(
            base_url=target.server.url,
            headers={"Authorization": f"Bearer {target.token}"},
            timeout=120,
        )
        self._body = bench_request(cluster)

    def submit(self, spec: JobSpec | None = None) -> str:
        response = self._http.post("/v1/jobs", json=self._body)
        if response.status_code != 201:
            raise ClusterError(f"POST /v1/jobs: {response.status_code} {response.text[:300]}")
        job_id = response.json().get("slurm_job_id")
        if not job_id:
            raise ClusterError(f"POST /v1/jobs returned no slurm_job_id: {response.text[:300]}")
        return str(job_id)

    def close(self) -> None:
        self._http.close()


def _server_side(url: str) -> dict[str, float]:
    """Sums and counts of the broker's own submit-latency and sbatch-duration histograms."""
    samples = scrape(url)
    alpha = (("cluster", "alpha"),)
    sbatch = (("cluster", "alpha"), ("command", "sbatch"))
    return {
        "submit_sum": samples.get(("broker_submit_latency_seconds_sum", alpha), 0.0),
        "submit_count": samples.get(("broker_submit_latency_seconds_count", alpha), 0.0),
        "sbatch_sum": samples.get(("broker_adapter_command_duration_seconds_sum", sbatch), 0.0),
        "sbatch_count": samples.get(("broker_adapter_command_duration_seconds_count", sbatch), 0.0),
    }


def _mean_ms(before: dict[str, float], after: dict[str, float], key: str) -> float | None:
    count = after[f"{key}_count"] - before[f"{key}_count"]
    if count <= 0:
        return None
    return (after[f"{key}_sum"] - before[f"{key}_sum"]) / count * 1000


def run_latency(
    plan: Plan, cluster: Cluster, targets: Sequence[BrokerTarget], say: Say
) -> dict[str, Any]:
    """Section 1: rounds of (a), (b) and (c) per database, in an order rotated every round."""
    local, ssh = LocalSbatch(cluster), SshSbatch(cluster)
    brokers = {t.backend: BrokerSubmit(t, cluster) for t in targets}
    variants: dict[str, tuple[str, Callable[[JobSpec], str]]] = {
        "a": ("(a) sbatch on the login node", local.submit),
        "b": ("(b) ssh login sbatch, new connection each time", ssh.submit),
    }
    for target in targets:
        variants[f"c_{target.backend}"] = (
            f"(c) POST /v1/jobs, broker on {target.label}",
            brokers[target.backend].submit,
        )
    needed = (plan.latency_rounds + plan.latency_warmup) * len(variants)
    wait_for_room(cluster, needed, keep_free=plan.keep_free_jobs, timeout=plan.room_wait_s, say=say)
    try:
        for _ in range(plan.latency_warmup):  # connections, the broker's account check, caches
            for _, submit in variants.values():
                submit(bench_spec(cluster))
        before = {t.backend: _server_side(t.server.url) for t in targets}
        samples: dict[str, list[float]] = {key: [] for key in variants}
        keys = list(variants)
        for round_index in range(plan.latency_rounds):
            shift = round_index % len(keys)
            for key in keys[shift:] + keys[:shift]:
                spec = bench_spec(cluster)
                submit = variants[key][1]
                started = time.perf_counter()
                submit(spec)
                samples[key].append(time.perf_counter() - started)
                time.sleep(plan.latency_pause_s)
            if (round_index + 1) % 50 == 0:
                say(f"  {round_index + 1}/{plan.latency_rounds} rounds")
        after = {t.backend: _server_side(t.server.url) for t in targets}
        in_slurm = live_jobs(cluster)
    finally:
        for broker in brokers.values():
            broker.close()
        cancel_all(cluster)
    return {
        "spawn_ms": spawn_overheads(cluster),
        "rounds": plan.latency_rounds,
        "warmup_rounds": plan.latency_warmup,
        "jobs_live_in_slurm_at_end": in_slurm,
        "variants": {
            key: {
                "label": label,
                "summary": asdict(Summary.of_seconds(samples[key])),
                "samples_ms": [round(s * 1000, 3) for s in samples[key]],
            }
            for key, (label, _) in variants.items()
        },
        "server_side": {
            t.backend: {
                "submit_mean_ms": _mean_ms(before[t.backend], after[t.backend], "submit"),
                "sbatch_mean_ms": _mean_ms(before[t.backend], after[t.backend], "sbatch"),
            }
            for t in targets
        },
    }


@dataclass
class _Variant:
    """One way of submitting in the throughput section, and what its batches added up to."""

    label: str
    kind: str
    target: BrokerTarget | None
    concurrency: int
    make: Callable[[], Operation]
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    in_slurm: int = 0
    busy_s: float = 0.0
    steal_s: float = 0.0
    machine_s: float = 0.0
    slurmctld_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0

    def add(
        self,
        result: LoadResult,
        in_slurm: int,
        before: tuple[MachineCpu, float, float],
        after: tuple[MachineCpu, float, float],
    ) -> None:
        self.latencies_s += result.latencies_s
        self.errors += result.errors
        self.wall_s += result.wall_s
        self.in_slurm += in_slurm
        total = after[0].total_s - before[0].total_s
        self.machine_s += total
        self.busy_s += after[0].busy_since(before[0]) * total
        self.steal_s += after[0].steal_since(before[0]) * total
        self.slurmctld_cpu_s += after[1] - before[1]
        self.broker_cpu_s += after[2] - before[2]

    def entry(self) -> dict[str, Any]:
        ok = len(self.latencies_s)
        per_job_ms = 1000 / max(ok, 1)
        return {
            "label": self.label,
            "kind": self.kind,
            "backend": self.target.backend if self.target else None,
            "concurrency": self.concurrency,
            "jobs_ok": ok,
            "errors": len(self.errors),
            "first_errors": self.errors[:3],
            "jobs_live_in_slurm": self.in_slurm,
            "wall_s": self.wall_s,
            "per_second": ok / self.wall_s if self.wall_s else 0.0,
            "latency": asdict(Summary.of_seconds(self.latencies_s)) if ok else None,
            "machine_busy": self.busy_s / self.machine_s if self.machine_s else 0.0,
            "machine_steal": self.steal_s / self.machine_s if self.machine_s else 0.0,
            "slurmctld_cpu_ms_per_job": self.slurmctld_cpu_s * per_job_ms,
            "broker_cpu_ms_per_job": self.broker_cpu_s * per_job_ms if self.target else None,
        }


def _cpu_now(slurmctld: int, broker: int | None) -> tuple[MachineCpu, float, float]:
    return (
        MachineCpu.now(),
        process_cpu_s(slurmctld),
        tree_cpu_s(broker) if broker else 0.0,
    )


def run_throughput(
    plan: Plan, cluster: Cluster, targets: Sequence[BrokerTarget], say: Say
) -> dict[str, Any]:
    """Section 2: ``plan.throughput_jobs`` jobs from ``plan.throughput_clients`` concurrent
    clients through each broker, against the same number of sbatch loops on the login node.
    Each variant submits in ``plan.throughput_batches`` batches and the variants take turns (in
    an order rotated every batch); Slurm is emptied after every batch."""
    jobs, clients, batches = plan.throughput_jobs, plan.throughput_clients, plan.throughput_batches

    def direct() -> Operation:
        local = LocalSbatch(cluster)

        def operation(_: int) -> None:
            local.submit(bench_spec(cluster))

        return operation

    def through(target: BrokerTarget) -> Callable[[], Operation]:
        def make() -> Operation:
            broker = BrokerSubmit(target, cluster)

            def operation(_: int) -> None:
                broker.submit()

            return operation

        return make

    variants = [
        _Variant(
            f"sbatch on the login node, {clients} parallel loops", "direct", None, clients, direct
        )
    ]
    variants += [
        _Variant(f"broker on {t.label}, {clients} HTTP clients", "broker", t, clients, through(t))
        for t in targets
    ]
    variants.append(
        _Variant("sbatch on the login node, one loop", "direct_serial", None, 1, direct)
    )
    wait_for_room(
        cluster,
        jobs * len(variants),
        keep_free=plan.keep_free_jobs,
        timeout=plan.room_wait_s,
        say=say,
    )
    slurmctld = int(cluster.slurmctld_pid_file.read_text().strip())
    sizes = [jobs // batches + (1 if i < jobs % batches else 0) for i in range(batches)]
    for index, size in enumerate(sizes):
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            broker = variant.target.server.pid if variant.target else None
            before = _cpu_now(slurmctld, broker)
            try:
                result = closed_loop(size, variant.concurrency, variant.make)
                after = _cpu_now(slurmctld, broker)
                in_slurm = live_jobs(cluster)
            finally:
                cancel_all(cluster)
            variant.add(result, in_slurm, before, after)
        say(f"  batch {index + 1}/{batches} done")
    entries = [variant.entry() for variant in variants]
    for entry in entries:
        say(
            f"  {entry['label']}: {entry['jobs_ok']} jobs in {entry['wall_s']:.1f} s = "
            f"{entry['per_second']:.1f}/s"
            + (f", {entry['errors']} errors" if entry["errors"] else "")
        )
    return {"jobs": jobs, "clients": clients, "batches": batches, "runs": entries}
