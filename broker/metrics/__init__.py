"""Prometheus metrics of the broker; docs/metrics.md documents every series.

Three sources feed ``/metrics``, one module each:

* ``events``: what this process counts as it happens (submissions, queue waits, poll cycles,
  Slurm commands), reported through ``BrokerObserver`` and the Slurm client's command observer;
  ``BrokerMetrics`` there owns the registry;
* ``collector``: state read from the database at scrape time (budgets, jobs by state, lifetime
  GPU-seconds, cluster capacity) through ``state.read_state``; the same in every replica;
* ``ssh``: SSH connections and sessions, from the runners already built (a scrape never opens
  an SSH connection).

``labels`` holds the bounded label values; ``capacity`` counts GPUs in partition snapshots.
"""

from __future__ import annotations

from broker.metrics.events import BrokerMetrics

__all__ = ["BrokerMetrics"]
