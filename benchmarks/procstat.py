"""CPU time of processes and of the whole machine, from /proc (Linux)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


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
