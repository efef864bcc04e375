"""A few worker threads for the API's hot database reads.

A read route awaits its query in a thread (the database driver blocks). Starlette's default pool
lets 40 threads at once per process; under a burst of reads they all wait for the one GIL, and the
event loop that reads and writes every connection waits behind them: at 32 clients a few requests
took seconds while the median was a few milliseconds (docs/performance.md). Reads of a job, a
page of jobs, ``/v1/me`` and an API token's look-up therefore go through their own small limiter
(``[server] read_threads``, a thread or two per core), where a request waits its turn in order
instead. Whatever may wait on something slower than the database keeps the default pool: writes
(submit and cancel wait for sbatch or scancel over SSH) and a JWT's check (it may fetch the
provider's keys), so that a slow cluster or provider never holds up the reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")


class ReadThreads:
    """``await reads.run(fn, *args)``: ``fn(*args)`` in a thread, at most ``size`` at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limiter: anyio.CapacityLimiter | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._loop is not loop:
            # A limiter belongs to one event loop (a test client may start several in turn).
            self._limiter, self._loop = anyio.CapacityLimiter(self.size), loop
        return await anyio.to_thread.run_sync(partial(fn, *args), limiter=self._limiter)
