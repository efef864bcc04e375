"""A pending job's wait category and message, from the reason codes a real Slurm printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.waiting import WaitCategory, explain, moves_elsewhere_may_help

FIXTURES = Path(__file__).parent.parent / "fixtures" / "slurm"


def _pending_reasons() -> set[str]:
    """Reasons of the PD lines of squeue output captured from the dev cluster."""
    reasons = set()
    for name in ("squeue.txt", "squeue-after-timeout.txt"):
        for line in (FIXTURES / name).read_text(errors="replace").splitlines():
            fields = line.split("|")
            if len(fields) > 2 and fields[1] == "PD":
                reasons.add(fields[2])
    return reasons


def test_the_captured_pending_reasons_have_their_categories() -> None:
    seen = {reason: explain(reason).category for reason in _pending_reasons()}
    assert seen == {
        "Resources": WaitCategory.RESOURCES,
        "JobHeldUser": WaitCategory.HELD,
        "JobArrayTaskLimit": WaitCategory.OTHER,
        "Priority": WaitCategory.PRIORITY,
    }


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("Priority", WaitCategory.PRIORITY),
        ("Dependency", WaitCategory.DEPENDENCY),
        ("DependencyNeverSatisfied", WaitCategory.DEPENDENCY),
        ("JobHeldAdmin", WaitCategory.HELD),
        ("AssocGrpGRES", WaitCategory.QUOTA),
        ("AssocGrpGRESMinutes", WaitCategory.QUOTA),
        ("AssocMaxJobsLimit", WaitCategory.QUOTA),
        ("QOSMaxGRESPerUser", WaitCategory.QUOTA),
        ("AccountingPolicy", WaitCategory.QUOTA),
        ("ReqNodeNotAvail, UnavailableNodes:a[1-2]", WaitCategory.RESOURCES),
        (
            "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority "
            "partitions",
            WaitCategory.RESOURCES,
        ),
        ("PartitionDown", WaitCategory.OTHER),
        ("SomethingNewInSlurm25", WaitCategory.OTHER),
        (None, WaitCategory.OTHER),
        ("None", WaitCategory.OTHER),
    ],
)
def test_categories(reason: str | None, category: WaitCategory) -> None:
    assert explain(reason).category is category


def test_the_message_is_one_line_and_keeps_slurms_code() -> None:
    wait = explain("AssocGrpGRES")
    assert "\n" not in wait.message
    assert "AssocGrpGRES" in wait.message
    assert "SomethingNew" in explain("SomethingNew").message


def test_only_waiting_for_resources_is_a_reason_to_try_another_cluster() -> None:
    assert moves_elsewhere_may_help("Resources")
    assert not moves_elsewhere_may_help("AssocGrpGRES")
    assert not moves_elsewhere_may_help("Priority")
    assert not moves_elsewhere_may_help("JobHeldAdmin")
    assert not moves_elsewhere_may_help("Dependency")
