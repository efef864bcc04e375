"""The report's targets table: each row of issue 12 with before, after and a verdict.

Pure unit test over hand-made results (no cluster): the verdicts follow the issue's thresholds,
a baseline measured in the run replaces the issue's "now" figures, and rows missing from a run
say so instead of failing.
"""

from __future__ import annotations

from typing import Any

from benchmarks.report import TARGET_ROWS, render, targets


def _reads(rps: float, p99: float, me_ms: float, rss_mib: float) -> dict[str, Any]:
    endpoint = {
        "per_second": rps,
        "p50_ms": p99 / 3,
        "p90_ms": p99 / 2,
        "p99_ms": p99,
        "max_ms": p99,
        "requests": 1000,
        "non_2xx": 0,
        "socket_errors": 0,
        "items_per_response": 1,
    }
    backend = {
        "jobs": 100_000,
        "seed_s": 1.0,
        "endpoints": {"get": endpoint, "list": endpoint},
        "one_client_ms": {"/healthz": 0.5, "/v1/me": me_ms, "get": 1.0, "list": 2.0},
        "metrics": {
            "scrapes": 1,
            "cold_ms_median": 10.0,
            "cold_ms_max": 10.0,
            "warm_ms_median": 1.0,
            "bytes": 1000,
            "series": 10,
        },
        "rss_idle_kib": 100 * 1024,
        "rss_after_kib": int(rss_mib * 1024),
        "rss_peak_kib": int(rss_mib * 1024),
        "workers": 2,
        "processes": [
            {"pid": 1, "command": "broker serve", "rss_kib": 40 * 1024, "hwm_kib": 40 * 1024},
            {"pid": 2, "command": "worker", "rss_kib": int(rss_mib * 1024), "hwm_kib": 0},
        ],
    }
    return {
        "clients": 32,
        "seconds": 1.0,
        "metrics_cache_s": 2.0,
        "by_backend": {"postgres": backend},
    }


def _metrics(*cold: float) -> dict[str, Any]:
    sizes = (1_000, 100_000, 1_000_000)
    return {
        "backend": "postgres",
        "by_size": [
            {
                "jobs": jobs,
                "seed_s": 1.0,
                "scrapes": 1,
                "cold_ms_median": ms,
                "cold_ms_max": ms,
                "warm_ms_median": 1.0,
                "bytes": 1000,
                "series": 10,
            }
            for jobs, ms in zip(sizes, cold, strict=True)
        ],
    }


def _results(sections: dict[str, Any], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"mode": "quick", "machine": {"cpu": "test"}, "sections": sections}
    if baseline is not None:
        results["baseline"] = {"revision": "4e14e26", "commit": "4e14e26", "sections": baseline}
    return results


def _row(rows: list[tuple[str, str, str, str, str]], start: str) -> tuple[str, ...]:
    return next(row for row in rows if row[0].startswith(start))


def test_every_issue_row_is_in_the_table_even_when_not_measured() -> None:
    rows = targets(_results({}))
    assert len(rows) == len(TARGET_ROWS) == 10
    assert all(row[4] == "not measured" for row in rows)
    assert all(row[2].endswith("(issue)") for row in rows)


def test_verdicts_follow_the_thresholds_and_the_baseline_is_before() -> None:
    after = {"reads": _reads(2500, 40, 1.2, 120), "metrics": _metrics(20, 25, 30)}
    before = {"reads": _reads(200, 400, 7.0, 170), "metrics": _metrics(30, 300, 3000)}
    rows = targets(_results(after, before))

    get = _row(rows, "`GET /v1/jobs/{id}`")
    assert "200 req/s" in get[2] and "2500 req/s" in get[3]
    assert get[4] == "**met**"
    assert _row(rows, "`/v1/me`")[4] == "**met**"
    assert _row(rows, "broker resident")[4] == "**met**"
    assert "120 MiB largest of 2 processes" in _row(rows, "broker resident")[3]
    assert _row(rows, "`/metrics`")[4] == "**met**"
    assert "(not flat)" in _row(rows, "`/metrics`")[2]


def test_a_slow_row_is_not_met() -> None:
    rows = targets(_results({"reads": _reads(2500, 80, 2.0, 160), "metrics": _metrics(5, 60, 70)}))
    assert _row(rows, "`GET /v1/jobs/{id}`")[4] == "**not met**"  # p99 80 ms
    assert _row(rows, "`/v1/me`")[4] == "**not met**"
    assert _row(rows, "broker resident")[4] == "**not met**"
    assert _row(rows, "`/metrics`")[4] == "**not met**"


def test_the_document_shows_the_baseline_tables_after_this_trees() -> None:
    document = render(
        _results({"reads": _reads(2500, 40, 1.2, 120)}, {"reads": _reads(200, 400, 7.0, 170)}),
        {"reads": "performance-reads.png"},
    )
    lines = document.splitlines()
    assert sum(line.startswith("## 4. API reads with") for line in lines) == 1
    assert "### 4. API reads with" in document.split("## Before: revision 4e14e26", 1)[1]
    assert document.count("![API reads]") == 1
