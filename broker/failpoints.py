"""Named places where an operator or a test can make the process fail on purpose.

``BROKER_FAILPOINTS=after_sbatch`` makes the process exit at once right after sbatch answered
and before the answer is recorded: the crash the reconciler exists for. Nothing is armed unless
the variable names it; it is read once at start-up.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_ARMED = frozenset(p.strip() for p in os.environ.get("BROKER_FAILPOINTS", "").split(",") if p)


def hit(name: str) -> None:
    """Exit the process immediately (no cleanup, like a kill -9) if ``name`` is armed."""
    if name in _ARMED:
        log.critical("failpoint %s armed: exiting now", name)
        os._exit(86)
