"""Profiles behind the findings of docs/performance.md, one workload at a time.

    python -m benchmarks.profile submit  --backend postgres --jobs 300 --clients 16
    python -m benchmarks.profile reads   --backend sqlite --jobs 100000 --endpoint list
    python -m benchmarks.profile metrics --backend sqlite --jobs 100000
    python -m benchmarks.profile poll    --jobs 5000
    python -m benchmarks.profile squeue  --jobs 2000

``submit`` and ``reads`` drive a ``broker serve`` process as the benchmarks do and sample it with
py-spy (``--gil``: only the thread holding the GIL, i.e. where the CPU goes; ``--idle``: wall time
of every thread, waits included). ``metrics`` and ``poll`` run the code in this process under
pyinstrument. Each writes its profile to ``benchmarks/out/profiles/`` (collapsed stacks for a
flame graph, or an HTML call tree) and prints the heaviest frames. Needs what the benchmarks need
(root, dev cluster, PostgreSQL, wrk); jobs go to the ``bench`` account and are cancelled at the
end.
"""

from __future__ import annotations

import argparse
import collections
import html
import inspect
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from benchmarks.broker_process import (
    BACKENDS,
    BrokerServer,
    bench_settings,
    fresh_database,
    open_database,
    seed_bench_project,
)
from benchmarks.load import Operation, closed_loop, run_wrk
from benchmarks.slurm import (
    REPO,
    Cluster,
    cancel_all,
    prepare_account,
    wait_for_quiet,
    wait_for_room,
)
from benchmarks.submission import BrokerSubmit, BrokerTarget

OUT = REPO / "benchmarks" / "out" / "profiles"


@contextmanager
def py_spy(pid: int, output: Path, options: Sequence[str]) -> Iterator[None]:
    """Sample process ``pid`` with py-spy while the block runs, into ``output`` with ``.txt``:
    collapsed stacks, which flamegraph.pl and https://www.speedscope.app draw."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    raw = output.with_suffix(".txt")
    argv = [spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", *options]
    recorder = subprocess.Popen([*argv, "--format", "raw", "--output", str(raw)])
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=60)


def _read_stacks(raw: Path) -> dict[tuple[str, ...], int]:
    stacks: dict[tuple[str, ...], int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            key = tuple(stack.split(";"))
            stacks[key] = stacks.get(key, 0) + int(count)
    return stacks


def top_frames(
    stacks: dict[tuple[str, ...], int], *, inclusive: bool, limit: int
) -> list[tuple[str, int]]:
    counts: collections.Counter[str] = collections.Counter()
    for stack, count in stacks.items():
        for frame in set(stack) if inclusive else {stack[-1]}:
            counts[frame] += count
    return counts.most_common(limit)


def flame_svg(stacks: dict[tuple[str, ...], int], title: str, *, width: int = 1200) -> str:
    """A flame graph (root at the bottom, one box per frame, width proportional to samples) of
    collapsed stacks, as a standalone SVG; frames under 0.2 % of the samples are left out."""
    total = sum(stacks.values()) or 1
    tree: dict[str, Any] = {"n": 0, "kids": {}}
    for stack, count in stacks.items():
        node = tree
        node["n"] += count
        for frame in stack:
            node = node["kids"].setdefault(frame, {"n": 0, "kids": {}})
            node["n"] += count
    row, boxes, depth_max = 16, [], 0

    def walk(node: dict[str, Any], x: float, depth: int) -> None:
        nonlocal depth_max
        for frame, kid in sorted(node["kids"].items()):
            span = kid["n"] / total * width
            if span >= width * 0.002:
                depth_max = max(depth_max, depth)
                boxes.append((x, depth, span, frame, kid["n"]))
                walk(kid, x, depth + 1)
            x += span

    walk(tree, 0.0, 0)
    height = (depth_max + 1) * row + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="10">',
        f'<text x="4" y="14">{html.escape(title)} ({total} samples)</text>',
    ]
    for x, depth, span, frame, count in boxes:
        y = height - (depth + 1) * row
        hue = 20 + (zlib.crc32(frame.split(" (")[0].encode()) % 40)
        label = html.escape(frame)
        share = f"{count / total * 100:.1f} %"
        text = label[: max(int(span / 6.2) - 1, 0)]
        parts.append(
            f"<g><title>{label}: {count} samples, {share}</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{max(span - 0.5, 0.1):.1f}" height="{row - 1}" '
            f'fill="hsl({hue},90%,60%)"/>'
            + (f'<text x="{x + 2:.1f}" y="{y + 11}">{text}</text>' if text else "")
            + "</g>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _print_top(raw: Path, limit: int = 30) -> None:
    stacks = _read_stacks(raw)
    total = sum(stacks.values()) or 1
    print(f"{total} samples; heaviest frames, self then inclusive:")
    for inclusive in (False, True):
        for frame, count in top_frames(stacks, inclusive=inclusive, limit=limit):
            print(f"  {count / total * 100:5.1f}%  {frame}")
        print()


def _spy_options(args: argparse.Namespace, server: BrokerServer) -> list[str]:
    """py-spy's options for a ``broker serve``: its workers too, when it has several."""
    return [f"--{args.mode}"] + (["--subprocesses"] if server.workers > 1 else [])


def profile_submit(args: argparse.Namespace, workdir: Path) -> Path:
    cluster = Cluster.from_broker_toml()
    prepare_account(cluster)
    output = OUT / f"submit-{args.backend}-{args.clients}c-{args.mode}"
    with ExitStack() as stack:
        url = stack.enter_context(fresh_database(args.backend, workdir))
        token = seed_bench_project(url, cluster.name)
        server = stack.enter_context(BrokerServer(url, workdir, "profile", workers=args.workers))
        target = BrokerTarget(args.backend, args.backend, server, token)
        BrokerSubmit(target, cluster).submit()  # connection and account check outside the profile

        def make() -> Operation:
            broker = BrokerSubmit(target, cluster)

            def operation(_: int) -> None:
                broker.submit()

            return operation

        try:
            cpu_before = server.cpu_s()
            with py_spy(server.pid, output, _spy_options(args, server)):
                result = closed_loop(args.jobs, args.clients, make)
            cpu = server.cpu_s() - cpu_before
        finally:
            cancel_all(cluster)
    print(
        f"{result.ok} jobs at {result.per_second:.1f}/s, {len(result.errors)} errors; broker "
        f"CPU {cpu / max(result.ok, 1) * 1000:.1f} ms per job (py-spy's sampling included)"
    )
    return output.with_suffix(".txt")


def profile_reads(args: argparse.Namespace, workdir: Path) -> Path:
    from benchmarks.seed import seed_history

    output = OUT / f"reads-{args.backend}-{args.endpoint}-{args.mode}"
    with ExitStack() as stack:
        url = stack.enter_context(fresh_database(args.backend, workdir))
        db = open_database(url)
        history = seed_history(db, jobs=args.jobs)
        db.close()
        server = stack.enter_context(BrokerServer(url, workdir, "profile", workers=args.workers))
        if args.endpoint == "get":
            paths = [f"/v1/jobs/{job_id}" for job_id in history.visible_job_ids]
        else:
            paths = [f"/v1/jobs?project={p}&state=completed" for p in history.own_projects]
        run_wrk(server.url, paths, history.token, connections=args.clients, duration_s=2)
        with py_spy(server.pid, output, _spy_options(args, server)):
            result = run_wrk(
                server.url, paths, history.token, connections=args.clients, duration_s=10
            )
    print(f"{result.per_second:.0f} req/s, p99 {result.p99_ms:.0f} ms")
    return output.with_suffix(".txt")


def profile_metrics(args: argparse.Namespace, workdir: Path) -> Path:
    from prometheus_client import generate_latest

    from benchmarks.seed import seed_history
    from broker.metrics import BrokerMetrics

    output = OUT / f"metrics-{args.backend}-{args.jobs}-{args.mode}"
    with fresh_database(args.backend, workdir) as url:
        db = open_database(url)
        try:
            seed_history(db, jobs=args.jobs)
            metrics = BrokerMetrics()
            attach = metrics.attach
            if "max_age" in inspect.signature(attach).parameters:
                attach(db.sessions, bench_settings(url), max_age=0)
            else:
                attach(db.sessions, bench_settings(url))
            generate_latest(metrics.registry)  # warm the connection pool and statement caches
            timings = []
            with _sampler(args, output) as profiler:
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    generate_latest(metrics.registry)
                    timings.append(time.perf_counter() - started)
        finally:
            db.close()
    print("scrapes (ms):", ", ".join(f"{t * 1000:.0f}" for t in timings))
    return _written(profiler, output)


@contextmanager
def _sampler(args: argparse.Namespace, output: Path) -> Iterator[Any]:
    """py-spy on this very process (CPU: ``--gil``), or pyinstrument (``--sampler
    pyinstrument``), around the block."""
    if args.sampler == "py-spy":
        with py_spy(os.getpid(), output, [f"--{args.mode}"]):
            yield None
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    with profiler:
        yield profiler


def _written(profiler: Any, output: Path) -> Path:
    if profiler is None:
        return output.with_suffix(".txt")
    print(profiler.output_text(unicode=False, show_all=False))
    output.with_suffix(".html").write_text(profiler.output_html())
    return output.with_suffix(".html")


def profile_poll(args: argparse.Namespace, workdir: Path) -> Path:
    from benchmarks.plan import FULL
    from benchmarks.polling import _cycle, _fill, _poll_target, _record

    cluster = Cluster.from_broker_toml()
    prepare_account(cluster)
    output = OUT / f"poll-{args.backend}-{args.jobs}-{args.mode}"
    with ExitStack() as stack:
        url = stack.enter_context(fresh_database(args.backend, workdir))
        target = _poll_target(args.backend, url, cluster)
        stack.callback(target.db.close)
        stack.callback(target.runtime.close)
        stack.callback(cancel_all, cluster)
        wait_for_room(cluster, args.jobs, keep_free=FULL.keep_free_jobs, timeout=FULL.room_wait_s)
        _record(target, _fill(cluster, args.jobs, FULL.submit_workers))
        _cycle(target, cluster)  # the first cycle records the pending reasons
        with _sampler(args, output) as profiler:
            for _ in range(args.repeat):
                cycle = _cycle(target, cluster)
                print(
                    f"cycle {cycle['duration_s'] * 1000:.0f} ms, squeue "
                    f"{cycle['squeue_s'] * 1000:.0f} ms, {cycle['bytes_read']} bytes"
                )
    return _written(profiler, output)


def squeue_sweep(args: argparse.Namespace, workdir: Path) -> Path:
    """How long squeue takes with ``--jobs`` lists of growing length, and without one, with
    ``--jobs`` (default 2,000) pending jobs of the service account in the queue: the measurement
    behind ``adapters.slurm.commands.SQUEUE_MAX_IDS``."""
    import json
    import statistics

    from adapters.slurm import commands
    from benchmarks.plan import FULL
    from benchmarks.polling import _fill

    cluster = Cluster.from_broker_toml()
    prepare_account(cluster)
    wait_for_quiet(cluster, FULL.quiet_own_jobs, timeout=FULL.room_wait_s, user=cluster.user)
    wait_for_room(cluster, args.jobs, keep_free=FULL.keep_free_jobs, timeout=FULL.room_wait_s)
    env = {"SLURM_CONF": str(cluster.slurm_conf), "PATH": "/usr/bin:/bin"}
    setpriv = ["/usr/bin/setpriv", f"--reuid={cluster.user}", f"--regid={cluster.user}"]

    def timed(job_ids: list[str] | None) -> tuple[float, int]:
        argv = [*setpriv, "--init-groups", *commands.squeue(cluster.bin_dir, job_ids)]
        samples, lines = [], 0
        for _ in range(5):
            started = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, env=env, check=True)
            samples.append(time.perf_counter() - started)
            lines = done.stdout.count(b"\n")
        return statistics.median(samples) * 1000, lines

    rows = {}
    try:
        ids = [job_id for _, job_id in _fill(cluster, args.jobs, FULL.submit_workers)]
        for count in (10, 100, 250, 500, 1000, 2000, 5000):
            if count <= len(ids):
                rows[f"--jobs with {count} ids"] = timed(ids[:count])
        rows["no --jobs (every job of the account)"] = timed(None)
    finally:
        cancel_all(cluster)
    output = OUT / f"squeue-{args.jobs}.json"
    output.write_text(json.dumps(rows, indent=1))
    for name, (millis, lines) in rows.items():
        print(f"  {name:40s} {millis:7.1f} ms  {lines} lines")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("workload", choices=("submit", "reads", "metrics", "poll", "squeue"))
    parser.add_argument("--backend", choices=BACKENDS, default="sqlite")
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--endpoint", choices=("get", "list"), default="get")
    parser.add_argument(
        "--mode", choices=("gil", "idle"), default="gil", help="py-spy: CPU (gil) or wall (idle)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="submit and reads: broker serve --workers N (where serve has the option)",
    )
    parser.add_argument(
        "--sampler",
        choices=("py-spy", "pyinstrument"),
        default="py-spy",
        help="metrics and poll: py-spy on this process, or pyinstrument in it",
    )
    parser.add_argument(
        "--repeat", type=int, default=10, help="metrics and poll: scrapes or cycles profiled"
    )
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    workers = {
        "submit": profile_submit,
        "reads": profile_reads,
        "metrics": profile_metrics,
        "poll": profile_poll,
        "squeue": squeue_sweep,
    }
    with tempfile.TemporaryDirectory(prefix="broker-profile-") as tmp:
        written = workers[args.workload](args, Path(tmp))
    if written.suffix == ".txt":
        _print_top(written)
        written.with_suffix(".svg").write_text(
            flame_svg(_read_stacks(written), f"{args.workload}: {written.stem}")
        )
    print(f"profile written to {written.with_suffix('')}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
