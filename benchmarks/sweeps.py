"""Sweeps and the admission queue, measured against the dev cluster (issue 10's benchmark).

    python -m benchmarks.sweeps                 # 1,000 tasks; queue at 10 and 1,000 jobs
    python -m benchmarks.sweeps --quick         # 20 tasks; queue at 5 jobs (smoke test)
    python -m benchmarks.sweeps --only queue    # one section (sweeps, queue)

``BENCH_BROKER_LOG_LEVEL=info`` keeps the broker's log of the queue section (in the work dir).

1. **1,000 tasks into Slurm three ways**: one broker job with ``"array": {"size": 1000}``
   (one ``sbatch --array``), 1,000 separate ``POST /v1/jobs`` from 16 clients, and 1,000 direct
   ``sbatch`` calls from 16 loops on the login node. Wall time from the first request to the
   moment ``squeue -r`` shows every task in Slurm, and the broker's CPU seconds over that time.
   All jobs go to the ``bench`` account, where ``GrpJobs=0`` keeps them pending.
2. **Release latency of the queue**: a project limited to one pending job has it in Slurm and
   N jobs queued behind it (N = 10, then 1,000). The Slurm job is cancelled; the poller (1 s
   cycle) settles it and the queue pass after that cycle submits the next one. Reported: from
   the broker settling the job (the limit frees) to the next job's sbatch, and from the
   ``scancel`` to that sbatch; medians over several releases.

Writes ``benchmarks/results/sweeps.json`` and the markdown section
``benchmarks/results/sweeps.md`` that ``docs/performance.md`` includes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from benchmarks.broker_process import (
    RESEARCHER,
    BrokerServer,
    add_project,
    add_researcher,
    bench_overrides,
    free_port,
    fresh_database,
    open_database,
    seed_bench_project,
)
from benchmarks.procstat import process_cpu_s
from benchmarks.slurm import (
    BENCH_ACCOUNT,
    BROKER_TOML,
    PARENT_ACCOUNT,
    REPO,
    RESEARCHER_UNIX_USER,
    Cluster,
    LocalSbatch,
    bench_request,
    bench_spec,
    cancel_all,
    prepare_account,
)
from broker.config import environment_for

RESULTS = REPO / "benchmarks" / "results"
CLIENTS = 16
QUEUE_ACCOUNT = "benchq"
"""The queue section's Slurm account and project, kept pending like ``bench``."""


def prepare_queue_account(cluster: Cluster) -> None:
    """``benchq`` below the broker's parent account, for the researcher, with ``GrpJobs=0``."""
    for argv in (
        ("add", "account", QUEUE_ACCOUNT, f"cluster={cluster.name}", f"parent={PARENT_ACCOUNT}"),
        ("add", "user", RESEARCHER_UNIX_USER, f"account={QUEUE_ACCOUNT}",
         f"cluster={cluster.name}"),
        ("modify", "account", "where", f"name={QUEUE_ACCOUNT}", f"cluster={cluster.name}", "set",
         "GrpJobs=0"),
    ):  # fmt: skip
        cluster.admin("sacctmgr", "-i", *argv)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def tasks_in_slurm(cluster: Cluster) -> int:
    """Tasks of the ``bench`` account slurmctld holds live, an array's counted one by one."""
    out = cluster.admin_ok(
        "squeue", "-h", "-r", f"--account={BENCH_ACCOUNT}", "-t", "PD,R", "-o", "%i"
    )
    return len(out.split())


def wait_in_slurm(cluster: Cluster, count: int, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while True:
        if tasks_in_slurm(cluster) >= count:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {tasks_in_slurm(cluster)} of {count} tasks reached Slurm")
        time.sleep(0.05)


def parallel(count: int, operation: Callable[[int], None]) -> None:
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        for future in [pool.submit(operation, i) for i in range(count)]:
            future.result()


def sweep_section(cluster: Cluster, workdir: Path, tasks: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with fresh_database("postgres", workdir) as url:
        token = seed_bench_project(url, cluster.name)
        with BrokerServer(url, workdir, "sweeps") as server:
            headers = {"Authorization": f"Bearer {token}"}
            client = httpx.Client(base_url=server.url, headers=headers, timeout=120)

            def measured(name: str, run: Callable[[], None], broker: bool) -> None:
                cancel_all(cluster)
                cpu_before = process_cpu_s(server.pid)
                started = time.monotonic()
                run()
                done = wait_in_slurm(cluster, tasks)
                cpu = process_cpu_s(server.pid) - cpu_before
                rows.append(
                    {
                        "variant": name,
                        "tasks": tasks,
                        "wall_s": done - started,
                        "broker_cpu_s": cpu if broker else None,
                    }
                )
                say(f"  {name}: {done - started:.2f} s to {tasks} tasks in Slurm")

            def one_array() -> None:
                body = {**bench_request(cluster), "array": {"size": tasks}}
                answer = client.post("/v1/jobs", json=body)
                answer.raise_for_status()

            def broker_jobs() -> None:
                def one(_: int) -> None:
                    answer = client.post("/v1/jobs", json=bench_request(cluster))
                    answer.raise_for_status()

                parallel(tasks, one)

            sbatch = LocalSbatch(cluster)
            # First submissions pay one-time set-up (the researcher's directory, the Slurm
            # association, connections): not part of any variant.
            client.post("/v1/jobs", json=bench_request(cluster)).raise_for_status()
            sbatch.submit(bench_spec(cluster))

            def direct() -> None:
                def one(_: int) -> None:
                    sbatch.submit(bench_spec(cluster))

                parallel(tasks, one)

            measured(f"one broker job, array of {tasks}", one_array, broker=True)
            measured(f"{tasks} broker jobs, {CLIENTS} clients", broker_jobs, broker=True)
            measured(f"{tasks} sbatch on the login node, {CLIENTS} loops", direct, broker=False)
            client.close()
        cancel_all(cluster)
    return rows


class PollingBroker:
    """``broker serve`` with its poller (1 s cycle), as the queue needs."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        overrides = {
            **bench_overrides(url),
            "poller": {"enabled": True, "interval_seconds": 1, "lease_seconds": 5},
        }
        env = {**os.environ, **environment_for(overrides), "BROKER_CONFIG": str(BROKER_TOML)}
        cli = str(Path(sys.executable).with_name("broker"))
        log = (workdir / f"broker-queue-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                cli,
                "serve",
                "--port",
                str(self.port),
                "--log-level",
                os.environ.get("BENCH_BROKER_LOG_LEVEL", "warning"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("broker serve did not come up")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _event_at(client: httpx.Client, job_id: str, to_state: str) -> float:
    events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    (event,) = [e for e in events if e["to_state"] == to_state]
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def queue_section(cluster: Cluster, workdir: Path, queued: int, releases: int) -> dict[str, Any]:
    from broker.schemas import QuotaPut
    from broker.service import projects

    with fresh_database("postgres", workdir) as url:
        # Its own account: the jobs other sections leave in "bench" (slurmctld keeps them for
        # MinJobAge) would be foreign jobs to this project, and their handling would be timed too.
        database = open_database(url)
        try:
            token = add_researcher(database, RESEARCHER)
            add_project(database, QUEUE_ACCOUNT, {cluster.name: QUEUE_ACCOUNT}, [RESEARCHER])
        finally:
            database.close()
        db = _Db(url)
        try:
            now = datetime.now(UTC)
            with db.transaction() as session:
                projects.put_quota(
                    session,
                    db.admin,
                    QUEUE_ACCOUNT,
                    QuotaPut(
                        period_start=now - timedelta(days=1),
                        period_end=now + timedelta(days=30),
                        gpu_hours=1e9,
                        max_pending_jobs=1,
                    ),
                )
        finally:
            db.close()
        broker = PollingBroker(url, workdir)
        client = httpx.Client(
            base_url=broker.url, headers={"Authorization": f"Bearer {token}"}, timeout=120
        )
        try:
            request = {**bench_request(cluster), "project": QUEUE_ACCOUNT}
            first = client.post("/v1/jobs", json=request).json()

            def one(_: int) -> None:
                client.post("/v1/jobs", json=request).raise_for_status()

            parallel(queued, one)
            assert first["slurm_job_id"], first
            in_slurm = first
            from_settle: list[float] = []
            from_cancel: list[float] = []
            for _ in range(releases):
                cancelled_at = time.time()
                cluster.admin_ok("scancel", str(in_slurm["slurm_job_id"]))
                deadline = time.monotonic() + 120
                while True:
                    listed = client.get(
                        "/v1/jobs", params={"project": QUEUE_ACCOUNT, "state": "pending"}
                    ).json()["data"]
                    nxt = [j for j in listed if j["id"] != in_slurm["id"] and j["slurm_job_id"]]
                    if nxt:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("the queue released nothing within 120 s")
                    time.sleep(0.05)
                following = nxt[0]
                settled = _event_at(client, in_slurm["id"], "cancelled")
                released = _event_at(client, following["id"], "pending")
                from_settle.append(released - settled)
                from_cancel.append(released - cancelled_at)
                in_slurm = following
            return {
                "queued": queued,
                "releases": releases,
                "settle_to_sbatch_ms_p50": 1000 * statistics.median(from_settle),
                "settle_to_sbatch_ms_max": 1000 * max(from_settle),
                "scancel_to_sbatch_ms_p50": 1000 * statistics.median(from_cancel),
                "scancel_to_sbatch_ms_max": 1000 * max(from_cancel),
            }
        finally:
            client.close()
            broker.stop()
            cluster.admin("scancel", f"--account={QUEUE_ACCOUNT}")


class _Db:
    def __init__(self, url: str) -> None:
        from broker.db.engine import make_engine, make_session_factory
        from broker.service.identity import Actor, get_user_record

        self.engine = make_engine(url)
        self.sessions = make_session_factory(self.engine)
        with self.sessions() as session:
            admin = get_user_record(session, "bench-admin")
        self.admin = Actor(admin.id, admin.name, "admin", frozenset())

    def transaction(self) -> Any:
        from broker.db.engine import transaction

        return transaction(self.sessions)

    def close(self) -> None:
        self.engine.dispose()


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "## 7. Sweeps and the admission queue",
        "",
        f"Measured {result['date']} on this machine (the dev cluster, PostgreSQL, the broker and "
        "the load on the same 2 cores), with `python -m benchmarks.sweeps`.",
        "",
        "Tasks into Slurm: wall time from the first request until `squeue -r` shows every task "
        "(all pending in the `bench` account); broker CPU is the server process's user+system "
        "time over that span.",
        "",
        "| variant | tasks | wall s | tasks/s | broker CPU s | broker CPU ms/task |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["sweeps"]:
        cpu = row["broker_cpu_s"]
        lines.append(
            f"| {row['variant']} | {row['tasks']} | {row['wall_s']:.2f} | "
            f"{row['tasks'] / row['wall_s']:.0f} | "
            + ("n/a | n/a |" if cpu is None else f"{cpu:.2f} | {1000 * cpu / row['tasks']:.2f} |")
        )
    lines += [
        "",
        "Queue release latency: a project limited to one pending job, N jobs queued behind it; "
        "the job in Slurm is cancelled and the next one released. Poll cycle 1 s.",
        "",
        "| queued | releases | settle -> sbatch p50 ms | max ms "
        "| scancel -> sbatch p50 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["queue"]:
        lines.append(
            f"| {row['queued']} | {row['releases']} | {row['settle_to_sbatch_ms_p50']:.0f} | "
            f"{row['settle_to_sbatch_ms_max']:.0f} | {row['scancel_to_sbatch_ms_p50']:.0f} | "
            f"{row['scancel_to_sbatch_ms_max']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only", nargs="+", choices=("sweeps", "queue"), default=["sweeps", "queue"]
    )
    args = parser.parse_args(argv)
    tasks = 20 if args.quick else 1000
    sizes = (5,) if args.quick else (10, 1000)
    releases = 2 if args.quick else 5
    cluster = Cluster.from_broker_toml("alpha")
    prepare_account(cluster)
    prepare_queue_account(cluster)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        result["sweeps"] = []
        if "sweeps" in args.only:
            say(f"sweeps: {tasks} tasks three ways")
            result["sweeps"] = sweep_section(cluster, workdir, tasks)
        result["queue"] = []
        for queued in sizes if "queue" in args.only else ():
            say(f"queue: release latency with {queued} queued")
            row = queue_section(cluster, workdir, queued, releases)
            say(f"  settle -> sbatch p50 {row['settle_to_sbatch_ms_p50']:.0f} ms")
            result["queue"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweeps.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "sweeps.md").write_text(markdown(result))
    say(f"wrote {args.out / 'sweeps.json'} and sweeps.md")


if __name__ == "__main__":
    main()
