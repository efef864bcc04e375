"""CPU time of processes and of the whole machine, from /proc (Linux)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live process below it (a ``broker serve --workers N`` supervisor and
    its workers), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        queue += sorted(children.get(current, []))
    return tree


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of the process and its live descendants (workers that exited are lost)."""
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += process_cpu_s(member)
    return total


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of one process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


_ROLES = (
    ("multiprocessing.spawn", "worker (multiprocessing spawn)"),
    ("multiprocessing.resource_tracker", "multiprocessing resource tracker"),
    ("broker serve", "broker serve"),
)


def command_name(pid: int) -> str:
    """A short description of the process: its role where known, else its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [
        Path(a.decode(errors="replace")).name if i == 0 else a.decode(errors="replace")
        for i, a in enumerate(argv)
        if a
    ]
    line = " ".join(words)
    for marker, role in _ROLES:
        if marker in line:
            return role
    return line[:60]


@dataclass(frozen=True, slots=True)
class MachineCpu:
    """Cumulative CPU seconds of all cores: total, idle (idle plus iowait), and stolen (time
    this virtual machine was ready to run but the host ran something else)."""

    total_s: float
    idle_s: float
    steal_s: float

    @classmethod
    def now(cls) -> MachineCpu:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice; guest time is
        # already counted in user and nice.
        return cls(
            total_s=sum(values[:8]) / _TICKS,
            idle_s=(values[3] + values[4]) / _TICKS,
            steal_s=values[7] / _TICKS,
        )

    def busy_since(self, earlier: MachineCpu) -> float:
        """Fraction of all cores' time not idle (stolen time included) since ``earlier``."""
        total = self.total_s - earlier.total_s
        return 0.0 if total <= 0 else 1 - (self.idle_s - earlier.idle_s) / total

    def steal_since(self, earlier: MachineCpu) -> float:
        """Fraction of all cores' time stolen by the host since ``earlier``."""
        total = self.total_s - earlier.total_s
        return 0.0 if total <= 0 else (self.steal_s - earlier.steal_s) / total


def background_busy(seconds: float = 3.0) -> dict[str, float]:
    """Shares of the machine's CPU time busy and stolen over ``seconds`` while the benchmark
    itself waits: what others (tests sharing the dev cluster, daemons, the host) took."""
    before = MachineCpu.now()
    time.sleep(seconds)
    after = MachineCpu.now()
    return {"busy": after.busy_since(before), "steal": after.steal_since(before)}
