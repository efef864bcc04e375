"""The short fault campaign (about two minutes): see ``tests/chaos/campaign.py`` for what it
breaks and which invariants it checks; ``python -m tests.chaos`` runs the long one."""

from __future__ import annotations

import pytest

from tests.chaos.campaign import FAULTS, Plan, run

pytestmark = pytest.mark.cluster


@pytest.mark.timeout(480)
def test_short_fault_campaign_loses_duplicates_and_overcharges_nothing() -> None:
    report = run(Plan(duration_s=50, clients=6, seed=8, settle_timeout_s=150))
    print(report.summary())
    # The campaign did what it is for: every kind of fault, and clients that had to retry.
    assert {name for _, name, _ in report.faults} == set(FAULTS), report.summary()
    assert any(job.attempts > 1 for job in report.logical), report.summary()
    assert report.slurm_jobs > 0, report.summary()
    assert not report.violations, report.summary()
