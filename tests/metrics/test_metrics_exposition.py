"""What /metrics says about a database filled by hand, and about the events it is told of."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import sessionmaker

from adapters.errors import CommandFailed, HostUnreachable, SlurmUnavailable
from broker.db.engine import make_engine, make_session_factory
from broker.metrics import BrokerMetrics
from broker.metrics.capacity import partition_gpus
from broker.metrics.events import QUEUE_WAIT_BUCKETS
from broker.metrics.labels import COMMANDS, FINAL_STATE_NAMES, LIVE_STATES, SUBMIT_OUTCOMES
from broker.service import ledger
from tests.metrics.seed import (
    NOW,
    PERIOD_START,
    Database,
    Scrape,
    add_jobs,
    add_project,
    job_row,
    make_database,
    metrics_settings,
    partition,
    set_cluster_status,
    temporary_postgres,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ALLOWED_LABELS = {
    "cluster", "project", "partition", "gpu_type", "state", "outcome", "limit", "command",
    "kind", "result", "le", "version", "python_version",
    # process and platform collectors of prometheus-client
    "implementation", "major", "minor", "patchlevel",
}  # fmt: skip


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database on each backend (the scrape-time queries must run on both)."""
    if request.param == "sqlite":
        database = make_database(f"sqlite:///{tmp_path}/broker.db")
        yield database
        database.close()
        return
    with temporary_postgres() as url:
        database = make_database(url)
        yield database
        database.close()


class FakeRunner:
    def __init__(self, opened: int = 0, in_use: int = 0) -> None:
        self.connections_opened = opened
        self.sessions_in_use = in_use


class FakeRegistry:
    def __init__(self) -> None:
        self.current: dict[str, object] = {}

    def runners(self) -> dict[str, object]:
        return dict(self.current)


def attached(db: Database, runners: FakeRegistry | None = None) -> BrokerMetrics:
    metrics = BrokerMetrics()
    metrics.attach(db.sessions, db.settings, runners, max_age=0)
    return metrics


def test_an_empty_broker_exports_every_known_series_as_zero(db: Database) -> None:
    scrape = Scrape(attached(db).registry)

    assert scrape.value("broker_database_up") == 1
    for cluster in ("alpha", "beta"):
        assert scrape.value("broker_cluster_up", cluster=cluster) == 0
        assert scrape.value("broker_cluster_last_success_timestamp_seconds", cluster=cluster) == 0
        for outcome in SUBMIT_OUTCOMES:
            assert scrape.value("broker_submissions_total", cluster=cluster, outcome=outcome) == 0
        for command in COMMANDS:
            assert (
                scrape.value(
                    "broker_adapter_errors_total",
                    cluster=cluster,
                    command=command,
                    kind="HostUnreachable",
                )
                == 0
            )
        assert scrape.value("broker_ssh_connections_opened_total", cluster=cluster) == 0
    assert scrape.value("broker_cluster_gpus", cluster="alpha", gpu_type="h100", state="idle") == 0
    assert scrape.value("broker_cluster_gpus", cluster="beta", gpu_type="a100", state="idle") == 0
    assert scrape.value("broker_job_queue_wait_seconds_count", cluster="beta", gpu_type="a100") == 0
    assert scrape.value("broker_build_info") == 1


def test_a_project_without_jobs_has_every_series_at_zero(db: Database) -> None:
    add_project(db, "climate", accounts=["alpha"], budget=3600)
    scrape = Scrape(attached(db).registry)

    assert scrape.value("broker_project_budget_gpu_seconds", project="climate") == 3600
    assert scrape.value("broker_project_remaining_gpu_seconds", project="climate") == 3600
    assert scrape.value("broker_project_used_gpu_seconds", project="climate") == 0
    for state in LIVE_STATES:
        assert scrape.value("broker_jobs", cluster="alpha", project="climate", state=state) == 0
    for state in FINAL_STATE_NAMES:
        assert (
            scrape.value(
                "broker_jobs_finished_total", cluster="alpha", project="climate", state=state
            )
            == 0
        )
    assert (
        scrape.value(
            "broker_project_gpus_in_use", project="climate", cluster="alpha", gpu_type="h100"
        )
        == 0
    )
    # Only the clusters the project has an account on: beta series would be noise.
    assert not [ls for ls, _ in scrape.series("broker_jobs") if ls["cluster"] == "beta"]


def test_the_period_ledger_equals_the_admission_ledger(db: Database) -> None:
    project_id = add_project(db, "climate", budget=100_000)
    add_project(db, "other", budget=5_000)
    before_period = PERIOD_START - timedelta(days=1)
    add_jobs(
        db,
        [
            job_row(db, "climate", charged=7200, elapsed=7200),
            job_row(db, "climate", cluster="beta", gpu_type="a100", gpus=4, charged=1800,
                    elapsed=900),
            job_row(db, "climate", state="running", gpus=8, reserved=28_800),
            job_row(db, "climate", state="pending", gpus=2, reserved=7_200),
            job_row(db, "climate", charged=50_000, elapsed=50_000, submitted_at=before_period),
            job_row(db, "other", charged=100, elapsed=100),
        ],
    )  # fmt: skip
    scrape = Scrape(attached(db).registry)

    with db.sessions() as session:
        from broker.db.models import QuotaRecord

        quota = session.get(QuotaRecord, project_id)
        snap = ledger.snapshot(session, project_id, quota)
    assert scrape.value("broker_project_used_gpu_seconds", project="climate") == (
        snap.used_gpu_seconds
    )
    assert scrape.value("broker_project_reserved_gpu_seconds", project="climate") == (
        snap.reserved_gpu_seconds
    )
    assert snap.used_gpu_seconds == 9000
    assert scrape.value("broker_project_remaining_gpu_seconds", project="climate") == (
        100_000 - 9000 - 36_000
    )
    assert scrape.value("broker_project_period_start_timestamp_seconds", project="climate") == (
        PERIOD_START.timestamp()
    )
    # Lifetime counters include the earlier period; the physical one is unweighted.
    assert scrape.value(
        "broker_project_charged_gpu_seconds_total",
        project="climate", cluster="alpha", gpu_type="h100",
    ) == 57_200  # fmt: skip
    assert (
        scrape.value(
            "broker_project_gpu_seconds_total", project="climate", cluster="beta", gpu_type="a100"
        )
        == 4 * 900
    )
    assert (
        scrape.value(
            "broker_project_gpus_in_use", project="climate", cluster="alpha", gpu_type="h100"
        )
        == 8
    )
    assert scrape.value("broker_jobs", cluster="alpha", project="climate", state="pending") == 1
    assert (
        scrape.value(
            "broker_jobs_finished_total", cluster="alpha", project="climate", state="completed"
        )
        == 2
    )


def test_a_lowered_quota_shows_negative_remaining(db: Database) -> None:
    add_project(db, "climate", budget=1000)
    add_jobs(db, [job_row(db, "climate", charged=3000, elapsed=3000)])
    scrape = Scrape(attached(db).registry)
    assert scrape.value("broker_project_remaining_gpu_seconds", project="climate") == -2000


def test_a_project_without_quota_has_a_zero_budget_and_no_period(db: Database) -> None:
    add_project(db, "new")
    scrape = Scrape(attached(db).registry)
    assert scrape.value("broker_project_budget_gpu_seconds", project="new") == 0
    with pytest.raises(KeyError):
        scrape.value("broker_project_period_end_timestamp_seconds", project="new")


def test_cluster_capacity_states_sum_to_the_total(db: Database) -> None:
    set_cluster_status(
        db,
        "alpha",
        partitions=[
            partition("gpu", "h100", 32, allocated=8, unavailable=8, nodes=4, nodes_down=1),
            partition("debug", "h100", 32, allocated=8, unavailable=8, nodes=4, nodes_down=1),
        ],
    )
    set_cluster_status(db, "beta", up=False, partitions=[partition("gpu", "a100", 8, allocated=2)])
    scrape = Scrape(attached(db).registry)

    assert scrape.value("broker_cluster_up", cluster="alpha") == 1
    assert scrape.value("broker_cluster_up", cluster="beta") == 0
    assert scrape.value("broker_cluster_last_poll_timestamp_seconds", cluster="alpha") == (
        NOW.timestamp()
    )
    by_state = {
        ls["state"]: v
        for ls, v in scrape.series("broker_cluster_partition_gpus")
        if ls["cluster"] == "alpha" and ls["partition"] == "gpu"
    }
    assert by_state == {"allocated": 8, "idle": 16, "unavailable": 8}
    assert scrape.total("broker_cluster_partition_gpus", cluster="beta") == 8
    # The debug partition overlays the gpu nodes: the pool counts each GPU once.
    assert scrape.total("broker_cluster_gpus", cluster="alpha", gpu_type="h100") == 32
    assert scrape.value("broker_cluster_gpus", cluster="beta", gpu_type="a100", state="idle") == 6
    assert scrape.value("broker_cluster_partition_nodes", cluster="alpha", partition="gpu",
                        state="down") == 1  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"gpus_total": 8, "gpus_allocated": 3, "gpus_idle": 5}, (3, 5, 0)),
        # A snapshot that does not add up: the states are made to.
        ({"gpus_total": 8, "gpus_allocated": 6, "gpus_idle": 6}, (6, 2, 0)),
        ({"gpus_total": 8, "gpus_allocated": 2, "gpus_idle": 1, "gpus_unavailable": 1}, (2, 1, 5)),
        ({"gpus_total": 4, "gpus_allocated": 9}, (4, 0, 0)),
        ({"gpus_total": -1, "gpus_allocated": "x"}, (0, 0, 0)),
    ],
)
def test_partition_states_always_sum_to_the_total(
    entry: dict[str, object], expected: tuple[int, int, int]
) -> None:
    total, states = partition_gpus(entry)
    assert (states["allocated"], states["idle"], states["unavailable"]) == expected
    assert sum(states.values()) == total


def test_submissions_are_counted_by_outcome_and_limit(db: Database) -> None:
    metrics = attached(db)
    metrics.submission("alpha", "accepted", None, 0.3)
    metrics.submission("alpha", "accepted", None, 1.5)
    metrics.submission("alpha", "rejected_quota", "gpu_hours", 0.01)
    metrics.submission("beta", "rejected_policy", "gpus_per_job", 0.01)
    metrics.submission("none", "invalid", None, 0.0)
    metrics.submission("alpha", "something-new", None, 0.0)
    scrape = Scrape(metrics.registry)

    assert scrape.value("broker_submissions_total", cluster="alpha", outcome="accepted") == 2
    assert scrape.value("broker_submissions_total", cluster="none", outcome="invalid") == 1
    assert scrape.value("broker_submissions_total", cluster="alpha", outcome="other") == 1
    assert scrape.value("broker_quota_rejections_total", cluster="alpha", limit="gpu_hours") == 1
    assert scrape.value("broker_quota_rejections_total", cluster="beta", limit="gpus_per_job") == 1
    # Latency is measured for accepted submissions only (a refusal takes no sbatch).
    assert scrape.value("broker_submit_latency_seconds_count", cluster="alpha") == 2
    assert scrape.value("broker_submit_latency_seconds_sum", cluster="alpha") == pytest.approx(1.8)
    assert scrape.value("broker_submit_latency_seconds_bucket", cluster="alpha", le="0.5") == 1


def test_queue_wait_buckets_reach_days(db: Database) -> None:
    metrics = attached(db)
    metrics.job_started("alpha", "h100", 3 * 86_400.0)
    metrics.job_started("alpha", "h100", 12.0)
    scrape = Scrape(metrics.registry)

    assert max(QUEUE_WAIT_BUCKETS) >= 7 * 86_400
    assert (
        scrape.value(
            "broker_job_queue_wait_seconds_bucket", cluster="alpha", gpu_type="h100", le="15.0"
        )
        == 1
    )
    assert (
        scrape.value(
            "broker_job_queue_wait_seconds_bucket", cluster="alpha", gpu_type="h100", le="345600.0"
        )
        == 2
    )


def test_polls_and_commands(db: Database) -> None:
    metrics = attached(db)
    metrics.poll("alpha", True, 0.4, 2)
    metrics.poll("alpha", False, 10.0, 0)
    metrics.command("alpha", "squeue", 0.05, None)
    metrics.command("alpha", "sbatch", 0.2, HostUnreachable("login", "refused"))
    metrics.command("alpha", "sacct", 0.2, SlurmUnavailable(["sacct"], 1, "Socket timed out"))
    metrics.command("alpha", "sbatch", 0.2, CommandFailed(["sbatch"], 1, "bad"))
    metrics.command("alpha", "mystery", 0.1, RuntimeError("not an adapter error"))
    scrape = Scrape(metrics.registry)

    assert scrape.value("broker_polls_total", cluster="alpha", result="ok") == 1
    assert scrape.value("broker_polls_total", cluster="alpha", result="failed") == 1
    assert scrape.value("broker_poll_status_commands_total", cluster="alpha") == 2
    assert scrape.value("broker_poll_duration_seconds_count", cluster="alpha") == 2
    assert (
        scrape.value(
            "broker_adapter_command_duration_seconds_count", cluster="alpha", command="sbatch"
        )
        == 2
    )
    assert (
        scrape.value(
            "broker_adapter_errors_total", cluster="alpha", command="sbatch", kind="HostUnreachable"
        )
        == 1
    )
    assert (
        scrape.value(
            "broker_adapter_errors_total", cluster="alpha", command="sacct", kind="SlurmUnavailable"
        )
        == 1
    )
    assert (
        scrape.value("broker_adapter_errors_total", cluster="alpha", command="other", kind="other")
        == 1
    )
    assert scrape.total("broker_adapter_errors_total") == 4


def test_ledger_drift_is_a_gauge_with_its_check_time(db: Database) -> None:
    metrics = attached(db)
    metrics.ledger_drift("alpha", "climate", -120)
    scrape = Scrape(metrics.registry)
    assert scrape.value("broker_ledger_drift_gpu_seconds", cluster="alpha", project="climate") == (
        -120
    )
    assert scrape.value("broker_ledger_drift_check_timestamp_seconds", cluster="alpha") > 0


def test_ssh_counters_come_from_the_runners_and_survive_a_new_runner(db: Database) -> None:
    registry = FakeRegistry()
    metrics = attached(db, registry)
    first = FakeRunner(opened=2, in_use=3)
    registry.current = {"alpha": first}
    scrape = Scrape(metrics.registry)
    assert scrape.value("broker_ssh_connections_opened_total", cluster="alpha") == 2
    assert scrape.value("broker_ssh_sessions_in_use", cluster="alpha") == 3
    assert scrape.value("broker_ssh_sessions_in_use", cluster="beta") == 0

    registry.current = {}  # the registry was closed: no runner, the count stays
    scrape = Scrape(metrics.registry)
    assert scrape.value("broker_ssh_connections_opened_total", cluster="alpha") == 2
    registry.current = {"alpha": FakeRunner(opened=1)}  # a new runner counts from 0 again
    scrape = Scrape(metrics.registry)
    assert scrape.value("broker_ssh_connections_opened_total", cluster="alpha") == 3
    assert scrape.value("broker_ssh_sessions_in_use", cluster="alpha") == 0


def test_a_database_that_does_not_answer_does_not_break_the_scrape(tmp_path: Path) -> None:
    settings = metrics_settings(f"sqlite:///{tmp_path}/x.db")
    engine = make_engine(f"sqlite:///{tmp_path}/no-such-dir/a/b.db")
    (tmp_path / "no-such-dir" / "a").rmdir()  # make_engine created it; the file cannot be opened
    runners = FakeRegistry()
    runners.current["alpha"] = FakeRunner(opened=4, in_use=1)
    metrics = BrokerMetrics()
    metrics.attach(make_session_factory(engine), settings, runners, max_age=0)
    metrics.submission("alpha", "accepted", None, 0.1)
    scrape = Scrape(metrics.registry)
    assert scrape.value("broker_database_up") == 0
    assert scrape.value("broker_submissions_total", cluster="alpha", outcome="accepted") == 1
    assert scrape.value("broker_ssh_connections_opened_total", cluster="alpha") == 4
    assert scrape.value("broker_ssh_sessions_in_use", cluster="alpha") == 1
    assert not list(scrape.series("broker_project_budget_gpu_seconds"))
    engine.dispose()


def test_scrapes_within_max_age_share_one_read(db: Database) -> None:
    calls = 0
    real: sessionmaker = db.sessions  # type: ignore[type-arg]

    def counting() -> object:
        nonlocal calls
        calls += 1
        return real()

    metrics = BrokerMetrics()
    metrics.attach(counting, db.settings, max_age=60)  # type: ignore[arg-type]
    Scrape(metrics.registry)
    Scrape(metrics.registry)
    assert calls == 1


def test_attach_twice_is_refused(db: Database) -> None:
    metrics = attached(db)
    with pytest.raises(RuntimeError):
        metrics.attach(db.sessions, db.settings)


def test_labels_are_bounded_and_every_metric_is_documented(db: Database) -> None:
    add_project(db, "climate", budget=10)
    add_jobs(db, [job_row(db, "climate", charged=1, elapsed=1)])
    set_cluster_status(db, "alpha", partitions=[partition("gpu", "h100", 32)])
    metrics = attached(db)
    metrics.ledger_drift("alpha", "climate", 0)
    scrape = Scrape(metrics.registry)
    documented = set(re.findall(r"`(broker_[a-z0-9_]+)`", DOCS.read_text()))

    for name, samples in scrape.samples.items():
        for labels, _ in samples:
            assert set(labels) <= ALLOWED_LABELS, (name, labels)
    # prometheus-client's "<counter>_created" companions are documented with their counters.
    families = {
        name
        for name in scrape.types
        if name.startswith("broker_") and not name.endswith("_created")
    }
    assert families, "no broker_ metric exported"
    missing = sorted(
        name for name in families if name not in documented and f"{name}_total" not in documented
    )
    assert not missing, f"not in docs/metrics.md: {missing}"
