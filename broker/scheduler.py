"""Runs the poller on APScheduler 3: one interval job per cluster, behind one database lease; the
admission queue is released after each cycle, behind the same lease."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from datetime import UTC

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from broker.clock import utcnow
from broker.config import Settings
from broker.service import lease
from broker.service.moves import Mover
from broker.service.poller import Poller
from broker.service.queue import AdmissionQueue

log = logging.getLogger(__name__)

LEASE_NAME = "poller"


class PollerSchedule:
    """Ticks every cluster's poll; only the process holding the lease actually polls."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        poller: Poller,
        settings: Settings,
        queue: AdmissionQueue | None = None,
        mover: Mover | None = None,
    ) -> None:
        self._sessions = sessions
        self._poller = poller
        self._queue = queue
        self._mover = mover
        self._settings = settings
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        interval = settings.poller.interval_seconds
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": interval},
        )

    def tick(self, cluster: str) -> bool:
        """Poll ``cluster`` if this process holds (or can take) the lease; True if it polled."""
        ttl = self._settings.poller.lease_seconds
        if not lease.acquire(self._sessions, LEASE_NAME, self.holder, ttl):
            log.debug("poller lease held elsewhere; %s not polled by %s", cluster, self.holder)
            return False
        fence = lease.Fence(self._sessions, LEASE_NAME, self.holder, ttl)
        if self._poller.poll(cluster, fence).lease_lost:
            return False
        try:
            if self._mover is not None:
                self._mover.consider(cluster, fence)
            if self._queue is not None:
                # Right after the cycle that may have freed a limit: released within one cycle.
                self._queue.release(fence)
        except lease.LeaseLost:
            return False
        except Exception:
            log.exception("moves or admission queue pass of %s failed; tried next cycle", cluster)
        return True

    def start(self) -> None:
        for cluster in sorted(self._settings.clusters):
            self._scheduler.add_job(
                self.tick,
                "interval",
                seconds=self._settings.poller.interval_seconds,
                args=[cluster],
                id=f"poll-{cluster}",
                next_run_time=utcnow(),
            )
        self._scheduler.start()
        log.info("poller started as %s", self.holder)

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        lease.release(self._sessions, LEASE_NAME, self.holder)
