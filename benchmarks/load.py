"""Load generators: a closed loop of worker threads (for submissions, where each operation takes
milliseconds to seconds), and ``wrk`` for HTTP reads, where a Python client on the same two cores
would cost the server more CPU than the requests themselves.

Both are bounded: the closed loop by its operation count, wrk by its duration; both talk to
loopback only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Operation = Callable[[int], None]
"""Runs operation number ``i``; raises on failure."""


@dataclass
class LoadResult:
    """What a closed loop did: one latency per successful operation, and the errors."""

    concurrency: int
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def per_second(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0


def closed_loop(
    total: int,
    concurrency: int,
    make_operation: Callable[[], Operation],
    *,
    timeout: float = 900,
) -> LoadResult:
    """Run ``total`` operations with ``concurrency`` threads, each starting its next operation as
    soon as the previous one ended. ``make_operation`` is called once per thread (so each thread
    can hold its own HTTP client). Wall time runs from the first start to the last end."""
    result = LoadResult(concurrency=concurrency)
    lock = threading.Lock()
    next_index = iter(range(total))
    deadline = time.monotonic() + timeout
    ready = threading.Barrier(concurrency + 1)

    def worker() -> None:
        try:
            operation = make_operation()
        except Exception as exc:
            with lock:
                result.errors.append(f"set-up: {type(exc).__name__}: {exc}"[:300])
            ready.wait()
            return
        ready.wait()
        while time.monotonic() < deadline:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                operation(index)
            except Exception as exc:
                with lock:
                    result.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            elapsed = time.perf_counter() - started
            with lock:
                result.latencies_s.append(elapsed)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + 60))
    result.wall_s = time.perf_counter() - started
    return result


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: throughput and latency percentiles (milliseconds) of completed requests."""

    connections: int
    duration_s: float
    requests: int
    per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int


_WRK_SCRIPT = """
local paths = {%(paths)s}
local counter = 0
local thread_seed = 0
local threads = {}

function setup(thread)
  thread_seed = thread_seed + 1
  thread:set("seed", thread_seed)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(seed * 7919)
  counter = math.random(#paths)
end

request = function()
  counter = (counter %% #paths) + 1
  return wrk.format("GET", paths[counter], {["Authorization"] = "Bearer %(token)s"})
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %%d, "duration_us": %%d, "status": %%d, "connect": %%d, ' ..
    '"read": %%d, "write": %%d, "timeout": %%d, "p50": %%d, "p90": %%d, "p99": %%d, ' ..
    '"max": %%d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    base_url: str,
    paths: Sequence[str],
    token: str,
    *,
    connections: int,
    duration_s: float,
    threads: int = 2,
) -> WrkResult:
    """GET ``paths`` (cycled from a random start per wrk thread) for ``duration_s`` seconds over
    ``connections`` keep-alive connections, with a bearer token."""
    if not paths:
        raise ValueError("no paths to request")
    lua = _WRK_SCRIPT % {
        "paths": ",".join(json.dumps(p) for p in paths),
        "token": token,
    }
    with tempfile.TemporaryDirectory(prefix="broker-bench-wrk-") as tmp:
        script = Path(tmp) / "bench.lua"
        script.write_text(lua)
        done = subprocess.run(
            [
                "wrk",
                f"-t{min(threads, connections)}",
                f"-c{connections}",
                f"-d{max(1, round(duration_s))}s",
                "--timeout",
                "30s",
                "-s",
                str(script),
                base_url,
            ],
            capture_output=True,
            text=True,
            timeout=duration_s + 120,
            check=False,
        )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    duration = data["duration_us"] / 1e6
    return WrkResult(
        connections=connections,
        duration_s=duration,
        requests=data["requests"],
        per_second=data["requests"] / duration if duration else 0.0,
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
        max_ms=data["max"] / 1000,
        non_2xx=data["status"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
    )
