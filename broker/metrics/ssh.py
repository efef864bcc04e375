"""SSH connection and session metrics of this process, read from the runners already built.

A scrape never opens an SSH connection: clusters whose runner was not built yet show zeros.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from broker.config import Settings

log = logging.getLogger(__name__)


class RunnerSource(Protocol):
    """What the collector needs from ``ClusterRegistry``: the runners built so far (no new ones)."""

    def runners(self) -> Mapping[str, object]: ...


class SshCollector:
    """The SSH series of every configured cluster, at scrape time (a ``Collector``).

    It answers even when the database does not.
    """

    def __init__(self, settings: Settings, runners: RunnerSource | None = None) -> None:
        self._settings = settings
        self._runners = runners
        self._lock = threading.Lock()
        self._base: dict[str, int] = defaultdict(int)
        self._last: dict[str, tuple[int, int]] = {}

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only; the registry must not call collect() early

    def collect(self) -> Iterator[Metric]:
        opened = CounterMetricFamily(
            "broker_ssh_connections_opened",
            "SSH connections this process opened to the cluster's login node, reconnects included",
            labels=["cluster"],
        )
        in_use = GaugeMetricFamily(
            "broker_ssh_sessions_in_use",
            "SSH sessions (channels) this process has open or opening on the cluster now",
            labels=["cluster"],
        )
        limit = GaugeMetricFamily(
            "broker_ssh_sessions_max",
            "Sessions this process may open at once on the cluster (clusters.NAME.max_sessions)",
            labels=["cluster"],
        )
        runners: dict[str, object] = {}
        if self._runners is not None:
            try:
                runners = dict(self._runners.runners())
            except Exception:  # a scrape must not fail over a registry in an odd state
                log.warning("metrics: cannot list the SSH runners", exc_info=True)
        for cluster in sorted(set(self._settings.clusters) | set(runners)):
            runner = runners.get(cluster)
            with self._lock:  # concurrent scrapes must not carry a count over twice
                count = self._connections_opened(cluster, runner)
            opened.add_metric([cluster], count)
            in_use.add_metric([cluster], _int_attribute(runner, "sessions_in_use"))
            configured = self._settings.clusters.get(cluster)
            if configured is not None and configured.transport == "ssh":
                limit.add_metric([cluster], configured.max_sessions)
        yield from (opened, in_use, limit)

    def _connections_opened(self, cluster: str, runner: object | None) -> int:
        """A counter that survives the registry replacing a runner: older runners' counts are
        carried over, so the series only decreases when the process restarts."""
        if runner is None:
            return self._base[cluster] + self._last.get(cluster, (0, 0))[1]
        count = _int_attribute(runner, "connections_opened")
        last = self._last.get(cluster)
        if last is not None and last[0] != id(runner):
            self._base[cluster] += last[1]
        self._last[cluster] = (id(runner), count)
        return self._base[cluster] + count


def _int_attribute(runner: object | None, name: str) -> int:
    value = getattr(runner, name, 0)
    return value if isinstance(value, int) else 0


class SshMirror:
    """With several API workers (prometheus_client multiprocess mode) a custom collector would
    show only the scraping worker's SSH state, so each worker copies its own into multiprocess
    metrics every ``interval`` seconds instead: connections opened (a counter, summed over the
    workers), sessions in use (summed; a worker that stops sets its share to 0) and the
    per-process session limit (the largest). Same names, labels and meaning per host."""

    def __init__(
        self,
        settings: Settings,
        runners: RunnerSource | None,
        registry: CollectorRegistry,
        interval: float = 2.0,
    ) -> None:
        self._source = SshCollector(settings, runners)
        self._opened = Counter(
            "broker_ssh_connections_opened",
            "SSH connections this process opened to the cluster's login node, reconnects included",
            ["cluster"],
            registry=registry,
        )
        self._in_use = Gauge(
            "broker_ssh_sessions_in_use",
            "SSH sessions (channels) this process has open or opening on the cluster now",
            ["cluster"],
            registry=registry,
            multiprocess_mode="sum",
        )
        self._max = Gauge(
            "broker_ssh_sessions_max",
            "Sessions this process may open at once on the cluster (clusters.NAME.max_sessions)",
            ["cluster"],
            registry=registry,
            multiprocess_mode="max",
        )
        self._copied: dict[str, float] = {}
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ssh-metrics", daemon=True)
        self.copy()
        self._thread.start()

    def copy(self) -> None:
        for family in self._source.collect():
            for sample in family.samples:
                cluster = sample.labels["cluster"]
                if family.name == "broker_ssh_connections_opened":
                    before = self._copied.get(cluster, 0.0)
                    if sample.value > before:
                        self._opened.labels(cluster).inc(sample.value - before)
                    else:
                        self._opened.labels(cluster)
                    self._copied[cluster] = max(before, sample.value)
                elif family.name == "broker_ssh_sessions_in_use":
                    self._in_use.labels(cluster).set(sample.value)
                elif family.name == "broker_ssh_sessions_max":
                    self._max.labels(cluster).set(sample.value)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.copy()
            except Exception:
                log.warning("metrics: cannot copy the SSH series", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self._interval)
        for family in self._source.collect():
            if family.name == "broker_ssh_sessions_in_use":
                for sample in family.samples:
                    self._in_use.labels(sample.labels["cluster"]).set(0)
