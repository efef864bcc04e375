"""``docs/performance.md`` and its plots, from the results of one run (``performance.json``).

Everything with a number in it is generated from the results; the discussion of profiles and
causes is kept by hand in ``benchmarks/analysis.md`` and included as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ANALYSIS = Path(__file__).with_name("analysis.md")
BACKEND_LABELS = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
PLOTS = {
    "latency": "performance-latency.png",
    "throughput": "performance-throughput.png",
    "polling": "performance-polling.png",
    "reads": "performance-reads.png",
}
TABLE_TITLES = (
    "Targets",
    "Machine",
    "1. Submission latency",
    "2. Sustained submission throughput",
    "3. Polling cost vs queue size",
    "4. API reads with",
    "5. `/metrics` as the job history grows",
    "6. Mixed load",
)
"""Headings every report has (the smoke test checks them)."""


def ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) < 10:
        return f"{value:.2f}"
    if abs(value) < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def kib(value: float) -> str:
    return f"{value / 1024:.1f} KiB" if value < 1024 * 1024 else f"{value / 1024 / 1024:.1f} MiB"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- derived figures and targets -----------------------------------------------------------------


def latency_derived(latency: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per database: c - a (p50, p95) in ms, b / c and c / a (p50)."""
    variants = latency["variants"]
    a, b = variants["a"]["summary"], variants["b"]["summary"]
    derived = {}
    for key, variant in variants.items():
        if not key.startswith("c_"):
            continue
        c = variant["summary"]
        derived[key.removeprefix("c_")] = {
            "c_minus_a_p50": c["p50"] - a["p50"],
            "c_minus_a_p95": c["p95"] - a["p95"],
            "b_over_c": b["p50"] / c["p50"],
            "c_over_a": c["p50"] / a["p50"],
        }
    return derived


def throughput_ratios(throughput: dict[str, Any]) -> dict[str, float]:
    runs = throughput["runs"]
    direct = next(r for r in runs if r["kind"] == "direct")
    return {
        r["backend"]: r["per_second"] / direct["per_second"]
        for r in runs
        if r["kind"] == "broker" and direct["per_second"]
    }


def _yes(met: bool) -> str:
    return "**met**" if met else "**not met**"


ISSUE_NOW = {
    "get": "169-232 req/s",
    "list": "67-70 req/s",
    "me": "6.9-7.7 ms",
    "cpu": "17 ms",
    "c_minus_a": "14-26 ms",
    "sustained": "14-15 %",
    "metrics": "173-386 ms at 100k",
    "poll": "~490 ms",
    "rss": "129-173 MiB",
    "mixed": "not measured",
}
"""The issue's "now" column, shown when the run has no baseline of its own."""


def _per_backend(values: dict[str, str]) -> str:
    return "; ".join(f"{BACKEND_LABELS.get(k, k)}: {v}" for k, v in values.items()) or "n/a"


def _verdict(checks: dict[str, bool]) -> str:
    """Met or not, per backend where there are several."""
    if not checks:
        return "not measured"
    if len(checks) == 1:
        return _yes(next(iter(checks.values())))
    return "; ".join(f"{BACKEND_LABELS.get(k, k)} {_yes(v)}" for k, v in checks.items())


Measure = tuple[str, dict[str, bool]]
"""What was measured (text) and, per backend, whether the target is met."""


def _reads_measures(reads: dict[str, Any], key: str, rps: float, p99: float | None) -> Measure:
    values, checks = {}, {}
    for backend, r in reads["by_backend"].items():
        e = r["endpoints"][key]
        values[backend] = (
            f"{e['per_second']:.0f} req/s, p50 {ms(e['p50_ms'])}, p99 {ms(e['p99_ms'])} ms"
        )
        checks[backend] = e["per_second"] >= rps and (p99 is None or e["p99_ms"] < p99)
    return _per_backend(values), checks


def _me_measure(reads: dict[str, Any]) -> Measure:
    values, checks = {}, {}
    for backend, r in reads["by_backend"].items():
        single = r.get("one_client_ms") or {}
        if "/v1/me" in single:
            values[backend] = f"{ms(single['/v1/me'])} ms"
            checks[backend] = single["/v1/me"] <= 1.5
    return _per_backend(values), checks


def _rss_measure(reads: dict[str, Any]) -> Measure:
    values, checks = {}, {}
    for backend, r in reads["by_backend"].items():
        processes = r.get("processes") or [{"rss_kib": r["rss_after_kib"]}]
        largest = max(p["rss_kib"] for p in processes) / 1024
        count = len(processes)
        values[backend] = f"{largest:.0f} MiB largest of {count} process{'es' * (count > 1)}"
        checks[backend] = largest <= 150
    return _per_backend(values), checks


def _cpu_measure(throughput: dict[str, Any]) -> Measure:
    values, checks = {}, {}
    for r in throughput["runs"]:
        if r["kind"] == "broker" and r.get("broker_cpu_ms_per_job") is not None:
            values[r["backend"]] = f"{ms(r['broker_cpu_ms_per_job'])} ms"
            checks[r["backend"]] = r["broker_cpu_ms_per_job"] <= 4
    return _per_backend(values), checks


def _latency_measure(latency: dict[str, Any]) -> Measure:
    derived = latency_derived(latency)
    return (
        _per_backend({k: f"{ms(v['c_minus_a_p50'])} ms" for k, v in derived.items()}),
        {k: v["c_minus_a_p50"] <= 10 for k, v in derived.items()},
    )


def _sustained_measure(throughput: dict[str, Any]) -> Measure:
    ratios = throughput_ratios(throughput)
    return (
        _per_backend({k: f"{v * 100:.0f} %" for k, v in ratios.items()}),
        {k: v >= 0.4 for k, v in ratios.items()},
    )


def _metrics_measure(metrics: dict[str, Any]) -> Measure:
    rows = metrics["by_size"]
    cold = {r["jobs"]: r["cold_ms_median"] for r in rows}
    text = ", ".join(f"{ms(v)} ms at {_count(k)}" for k, v in cold.items())
    at_100k = [v for k, v in cold.items() if k >= min(100_000, max(cold))]
    flat = max(cold.values()) <= 2 * min(cold.values()) + 5
    met = bool(at_100k) and max(at_100k) <= 50 and flat
    return text + ("" if flat else " (not flat)"), {"postgres": met}


def _count(jobs: int) -> str:
    if jobs >= 1_000_000 and jobs % 1_000_000 == 0:
        return f"{jobs // 1_000_000}M"
    if jobs >= 1000 and jobs % 1000 == 0:
        return f"{jobs // 1000}k"
    return f"{jobs:,}"


def _poll_measure(polling: dict[str, Any]) -> Measure:
    values, checks = {}, {}
    for backend, rows in polling["by_backend"].items():
        largest = rows[-1]
        own = largest.get("without_squeue_ms_median")
        if own is None:
            own = largest["duration_ms_median"] - largest["squeue_ms_median"]
        values[backend] = f"{ms(own)} ms at {largest['jobs']:,}"
        checks[backend] = own <= 50
    return _per_backend(values), checks


def _mixed_measure(mixed: dict[str, Any]) -> Measure:
    text = (
        f"{mixed['per_second']:.0f} req/s, {mixed['errors']} errors, "
        f"{mixed['server_errors']} 5xx, up to {mixed['db_connections']['max']} DB connections"
    )
    return text, {"postgres": mixed["errors"] == 0 and mixed["server_errors"] == 0}


TARGET_ROWS: tuple[tuple[str, str, str, str, Any], ...] = (
    (
        "get",
        "`GET /v1/jobs/{id}`, 100k jobs, 32 clients",
        ">= 2,000 req/s, p99 < 50 ms",
        "reads",
        lambda r: _reads_measures(r, "get", 2000, 50),
    ),
    (
        "list",
        "filtered `GET /v1/jobs` (first page of 50)",
        ">= 500 req/s",
        "reads",
        lambda r: _reads_measures(r, "list", 500, None),
    ),
    ("me", "`/v1/me` one request alone", "<= 1.5 ms", "reads", _me_measure),
    ("cpu", "broker CPU per submitted job", "<= 4 ms", "throughput", _cpu_measure),
    (
        "c_minus_a",
        "submission: c - a at p50, sudo to the researcher included",
        "<= 10 ms",
        "latency",
        _latency_measure,
    ),
    (
        "sustained",
        "sustained submission, 16 clients, vs 16 direct sbatch loops",
        ">= 40 %",
        "throughput",
        _sustained_measure,
    ),
    (
        "metrics",
        "`/metrics` cold scrape, 1k to 1M jobs",
        "<= 50 ms at 100k, flat to 1M",
        "metrics",
        _metrics_measure,
    ),
    (
        "poll",
        "poll cycle at 5,000 live jobs, squeue excluded",
        "<= 50 ms",
        "polling",
        _poll_measure,
    ),
    (
        "rss",
        "broker resident memory after the read load",
        "<= 150 MiB per process",
        "reads",
        _rss_measure,
    ),
    (
        "mixed",
        "mixed load, 200 researchers, 60 s (PostgreSQL)",
        "0 errors, no 5xx",
        "mixed",
        _mixed_measure,
    ),
)


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(what, target, before, after, verdict) for each row of the issue's table: "before" is
    the baseline's figure when the run measured one, else the issue's; the verdict is this
    tree's."""
    sections = results["sections"]
    baseline = results.get("baseline") or {}
    before_sections = baseline.get("sections") or {}
    rows = []
    for key, what, goal, section, measure in TARGET_ROWS:
        if section in before_sections:
            try:
                before = measure(before_sections[section])[0]
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                before = "n/a (not measured by the baseline)"
        else:
            before = f"{ISSUE_NOW[key]} (issue)"
        if section in sections:
            after, checks = measure(sections[section])
            verdict = _verdict(checks)
        else:
            after, verdict = "not measured in this run", "not measured"
        rows.append((what, goal, before, after, verdict))
    return rows


# --- plots ---------------------------------------------------------------------------------------


def plot_latency(latency: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for variant in latency["variants"].values():
        samples = sorted(variant["samples_ms"])
        if not samples:
            continue
        fractions = [(i + 1) / len(samples) for i in range(len(samples))]
        ax.step(samples, fractions, where="post", label=variant["label"])
    ax.set_xscale("log")
    ax.set_xlabel("submission latency (ms, log scale)")
    ax.set_ylabel("fraction of submissions")
    ax.set_title(f"One submission, {latency['rounds']} interleaved rounds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(throughput: dict[str, Any], path: Path) -> None:
    runs = throughput["runs"]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    labels = [r["label"] for r in runs]
    values = [r["per_second"] for r in runs]
    colors = ["#4c72b0" if r["kind"] == "broker" else "#999999" for r in runs]
    bars = ax.barh(labels, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:.1f}/s" for v in values], padding=3, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("jobs submitted per second")
    ax.set_title(f"{throughput['jobs']} jobs")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlim(0, max([*values, 1.0]) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_polling(polling: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for backend, rows in polling["by_backend"].items():
        sizes = [r["jobs"] for r in rows]
        left.plot(
            sizes,
            [r["duration_ms_median"] for r in rows],
            marker="o",
            label=f"poll cycle, broker on {BACKEND_LABELS[backend]}",
        )
    first = next(iter(polling["by_backend"].values()))
    sizes = [r["jobs"] for r in first]
    left.plot(
        sizes, [r["squeue_ms_median"] for r in first], marker="s", ls="--", label="squeue over SSH"
    )
    left.plot(
        sizes,
        [r["controller_ms_median"] for r in first],
        marker="^",
        ls=":",
        label="slurmctld time serving the cycle (sdiag)",
    )
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("live jobs in Slurm and the broker")
    left.set_ylabel("ms per cycle (median)")
    left.set_title("Poll duration vs jobs")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    right.plot(sizes, [max(r["ssh_commands"]) for r in first], marker="o", label="SSH commands")
    right.plot(
        sizes, [max(r["status_commands"]) for r in first], marker="s", label="status commands"
    )
    right.plot(
        sizes,
        [r["controller_rpcs_median"] for r in first],
        marker="^",
        label="slurmctld RPCs (sdiag)",
    )
    right.set_xscale("log")
    right.set_ylim(0, max(4.0, max(r["controller_rpcs_median"] for r in first) + 1))
    right.set_xlabel("live jobs")
    right.set_ylabel("per poll cycle")
    right.set_title("Commands per cycle")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reads(reads: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = {"get": "GET /v1/jobs/{id}", "list": "GET /v1/jobs?project&state"}
    backends = list(reads["by_backend"])
    width = 0.38
    for offset, key in enumerate(names):
        xs = [i + (offset - 0.5) * width for i in range(len(backends))]
        rps = [reads["by_backend"][b]["endpoints"][key]["per_second"] for b in backends]
        p99 = [reads["by_backend"][b]["endpoints"][key]["p99_ms"] for b in backends]
        bars = left.bar(xs, rps, width, label=names[key])
        left.bar_label(bars, labels=[f"{v:.0f}" for v in rps], fontsize=8)
        bars = right.bar(xs, p99, width, label=names[key])
        right.bar_label(bars, labels=[f"{v:.0f}" for v in p99], fontsize=8)
    for ax, title in ((left, "requests/s"), (right, "p99 latency (ms)")):
        ax.set_xticks(range(len(backends)), [BACKEND_LABELS[b] for b in backends])
        ax.set_title(f"{title}, {reads['clients']} clients")
        ax.legend(fontsize=8)
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the document --------------------------------------------------------------------------------


def _latency_section(latency: dict[str, Any], plot: str) -> list[str]:
    variants = latency["variants"]
    rows = [
        [
            v["label"],
            v["summary"]["n"],
            ms(v["summary"]["p50"]),
            ms(v["summary"]["p95"]),
            ms(v["summary"]["mean"]),
            ms(v["summary"]["max"]),
        ]
        for v in variants.values()
    ]
    derived = latency_derived(latency)
    derived_rows = [
        [
            BACKEND_LABELS[k],
            ms(v["c_minus_a_p50"]),
            ms(v["c_minus_a_p95"]),
            ratio(v["b_over_c"]),
            ratio(v["c_over_a"]),
        ]
        for k, v in derived.items()
    ]
    server_rows = [
        [
            BACKEND_LABELS[k],
            ms(variants[f"c_{k}"]["summary"]["mean"]),
            ms(v["submit_mean_ms"]),
            ms(v["sbatch_mean_ms"]),
            ms(variants["a"]["summary"]["mean"]),
        ]
        for k, v in latency["server_side"].items()
    ]
    return [
        "## 1. Submission latency",
        "",
        f"{latency['rounds']} rounds after {latency['warmup_rounds']} warm-up rounds; each round "
        "submits the same job once per variant, in an order rotated every round, so that every "
        "variant sees the same cluster, with a 50 ms pause after each submission. Latency is "
        "wall time seen by the submitter: (a) from spawning `sbatch` to its exit, (b) from "
        "starting `ssh` to its exit, (c) from sending the "
        "HTTP request to the 201 response with the Slurm job id (the job is in Slurm).",
        "",
        table(["variant", "n", "p50 ms", "p95 ms", "mean ms", "max ms"], rows),
        "",
        table(
            ["broker on", "c - a p50 ms", "c - a p95 ms", "b / c (p50)", "c / a (p50)"],
            derived_rows,
        ),
        "",
        "Where (c)'s time goes, from the broker's own histograms over the measured rounds "
        "(`broker_submit_latency_seconds`, "
        "`broker_adapter_command_duration_seconds{command=sbatch}`):",
        "",
        table(
            [
                "broker on",
                "(c) at the client, mean ms",
                "inside the service, mean ms",
                "of which sbatch over SSH, mean ms",
                "(a) sbatch alone, mean ms",
            ],
            server_rows,
        ),
        "",
        _spawn_note(latency),
        "",
        f"![submission latency CDF]({plot})",
        "",
    ]


def _spawn_note(latency: dict[str, Any]) -> str:
    spawn = latency.get("spawn_ms")
    if not spawn:
        return ""
    return (
        "Spawning alone, median of 100 from the benchmark process: `true` "
        f"{ms(spawn['true'])} ms, `setpriv ... true` (how (a) starts sbatch) "
        f"{ms(spawn['setpriv true'])} ms, `bash -c true` (a shell's share) "
        f"{ms(spawn['bash -c true'])} ms. So (a) carries about "
        f"{ms(spawn['setpriv true'] - spawn['true'])} ms of setpriv that a researcher's "
        "shell would mostly not add; c - a is that much smaller than against a bare sbatch."
    )


def _throughput_section(throughput: dict[str, Any], plot: str) -> list[str]:
    rows = []
    for r in throughput["runs"]:
        latency = r["latency"] or {}
        rows.append(
            [
                r["label"],
                r["concurrency"],
                r["jobs_ok"],
                r["errors"],
                r["jobs_live_in_slurm"],
                f"{r['wall_s']:.1f}",
                f"{r['per_second']:.1f}",
                ms(latency.get("p50")),
                ms(latency.get("p95")),
                ms(r.get("broker_cpu_ms_per_job")),
                ms(r.get("slurmctld_cpu_ms_per_job")),
                f"{r['machine_busy'] * 100:.0f} %" if "machine_busy" in r else "n/a",
                f"{r['machine_steal'] * 100:.0f} %" if "machine_steal" in r else "n/a",
            ]
        )
    ratios = throughput_ratios(throughput)
    lines = [
        "## 2. Sustained submission throughput",
        "",
        f"{throughput['jobs']} jobs per variant, closed loop: each of the concurrent clients "
        "sends its next submission when the previous one returned. The broker is compared with "
        f"the same number ({throughput['clients']}) of `sbatch` loops on the login node; one "
        "sequential loop is shown for reference. Each variant submits in "
        f"{throughput.get('batches', 1)} batches and the variants take turns (order rotated "
        "every batch), because slurmctld accepts jobs more slowly the more jobs it holds: so "
        "all variants meet the same controller. Slurm is emptied (`scancel`) after every batch; "
        '"in Slurm" counts the jobs squeue showed live at the end of each batch. Wall time is '
        "the sum of the batches'. CPU per job is user plus system time of the process over its "
        "batches (/proc), divided by the jobs; "
        '"both cores busy" is the share of the machine\'s CPU time not idle during the run, '
        '"stolen" the share the virtual machine\'s host gave to something else.',
        "",
        table(
            [
                "run",
                "clients",
                "jobs ok",
                "errors",
                "in Slurm",
                "wall s",
                "jobs/s",
                "p50 ms",
                "p95 ms",
                "broker CPU ms/job",
                "slurmctld CPU ms/job",
                "both cores busy",
                "stolen",
            ],
            rows,
        ),
        "",
    ]
    lines += [
        f"Broker on {BACKEND_LABELS[k]} / direct sbatch with {throughput['clients']} loops: "
        f"**{v * 100:.0f} %**.  "
        for k, v in ratios.items()
    ]
    errors = [e for r in throughput["runs"] for e in r["first_errors"]]
    if errors:
        lines += ["", "First errors: " + "; ".join(f"`{e}`" for e in errors[:5])]
    lines += ["", f"![throughput]({plot})", ""]
    return lines


def _polling_section(polling: dict[str, Any], plot: str) -> list[str]:
    lines = [
        "## 3. Polling cost vs queue size",
        "",
        "Real pending jobs in Slurm (submitted with sbatch to the `bench` account, which Slurm "
        "keeps pending) and the same jobs in the broker's database as `pending`; the broker's "
        "own `Poller.poll` runs one cycle at a time against them over SSH. Per size: one first "
        f"cycle (it records each job's pending reason), then {polling['cycles_per_size']} "
        "measured cycles, the two databases interleaved; medians. SSH commands and bytes are "
        "counted at the runner (stdout plus stderr of every command); controller RPCs and their "
        "service time come from `sdiag` deltas around each cycle, so RPCs of other users of the "
        'cluster in that window would be counted too. "squeue lines" is the jobs squeue '
        "printed: for up to 500 ids the broker asks squeue for those ids (`--jobs`), above that "
        "it reads every job of its account that slurmctld holds (live, or ended less than "
        "`MinJobAge` ago) and keeps the ones it follows (see Findings).",
        "",
    ]
    for backend, rows in polling["by_backend"].items():
        lines += [
            f"Broker on {BACKEND_LABELS[backend]}:",
            "",
            table(
                [
                    "live jobs",
                    "SSH commands / cycle",
                    "status commands",
                    "poll ms",
                    "poll without squeue ms",
                    "first cycle ms",
                    "squeue ms",
                    "squeue lines",
                    "bytes read",
                    "slurmctld RPCs",
                    "slurmctld ms",
                ],
                [
                    [
                        f"{r['jobs']:,}",
                        "/".join(map(str, r["ssh_commands"]))
                        + " ("
                        + ", ".join(f"{k} {v}" for k, v in sorted(r["commands"].items()))
                        + ")",
                        "/".join(map(str, r["status_commands"])),
                        ms(r["duration_ms_median"]),
                        ms(
                            r.get(
                                "without_squeue_ms_median",
                                r["duration_ms_median"] - r["squeue_ms_median"],
                            )
                        ),
                        ms(r["first_cycle_ms"]),
                        ms(r["squeue_ms_median"]),
                        f"{r.get('squeue_lines_median', float('nan')):.0f}",
                        kib(r["bytes_read_median"]),
                        f"{r['controller_rpcs_median']:.0f}",
                        ms(r["controller_ms_median"]),
                    ]
                    for r in rows
                ],
            ),
            "",
        ]
    fills = polling["fills"]
    total = sum(f["jobs"] for f in fills)
    seconds = sum(f["seconds"] for f in fills)
    lines += [
        f"Filling the queue: {total:,} jobs with parallel sbatch on the login node in "
        f"{seconds:.0f} s ({total / seconds if seconds else 0:.0f} jobs/s).",
        "",
        f"![poll duration vs jobs]({plot})",
        "",
    ]
    return lines


def _reads_section(reads: dict[str, Any], plot: str) -> list[str]:
    by_backend = reads["by_backend"]
    jobs = max(r["jobs"] for r in by_backend.values())
    names = {"get": "`GET /v1/jobs/{id}`", "list": "`GET /v1/jobs?project=P&state=completed`"}
    rows = []
    for backend, r in by_backend.items():
        for key, e in r["endpoints"].items():
            rows.append(
                [
                    BACKEND_LABELS[backend],
                    names[key],
                    f"{e['per_second']:.0f}",
                    ms(e["p50_ms"]),
                    ms(e["p90_ms"]),
                    ms(e["p99_ms"]),
                    f"{e['requests']:,}",
                    e["non_2xx"] + e["socket_errors"],
                ]
            )
    single_rows = [
        [BACKEND_LABELS[b]]
        + [ms(r["one_client_ms"][k]) for k in ("/healthz", "/v1/me", "get", "list")]
        for b, r in by_backend.items()
        if "one_client_ms" in r
    ]
    metric_rows = [
        [
            BACKEND_LABELS[b],
            ms(r["metrics"]["cold_ms_median"]),
            ms(r["metrics"]["cold_ms_max"]),
            ms(r["metrics"]["warm_ms_median"]),
            r["metrics"]["scrapes"],
            kib(r["metrics"]["bytes"]),
            r["metrics"]["series"],
        ]
        for b, r in by_backend.items()
    ]
    memory_rows = [
        [
            BACKEND_LABELS[b],
            f"{r['rss_idle_kib'] / 1024:.0f} MiB",
            f"{r['rss_after_kib'] / 1024:.0f} MiB",
            f"{r['rss_peak_kib'] / 1024:.0f} MiB",
        ]
        for b, r in by_backend.items()
    ]
    return [
        f"## 4. API reads with {jobs:,} jobs in the database",
        "",
        f"{jobs:,} job rows over {reads.get('projects', 50)} projects and "
        f"{reads.get('researchers', 200)} researchers, submitted over 180 days (80 % "
        "completed, 8 % failed, 6 % cancelled, 4 % running, 2 % pending), inserted in bulk into "
        "a fresh database (PostgreSQL then `ANALYZE`d, as autovacuum would). The caller is a "
        "researcher in two of the projects: single jobs are drawn from those projects, and the "
        "list is the first page (50, newest first) of one project's completed jobs. "
        f"[wrk](https://github.com/wg/wrk) with {reads['clients']} keep-alive connections on 2 "
        f"threads, {reads['seconds']:.0f} s per endpoint after a warm-up run.",
        "",
        table(
            [
                "database",
                "endpoint",
                "requests/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "requests",
                "errors",
            ],
            rows,
        ),
        "",
        "One request at a time (one client, no other load; median ms): what each layer costs. "
        "`/healthz` is HTTP and FastAPI alone; `/v1/me` adds the token check (two queries); the "
        "job endpoints add their query and the response.",
        "",
        table(
            ["database", "`/healthz`", "`/v1/me`", "`GET /v1/jobs/{id}`", "`GET /v1/jobs?...`"],
            single_rows,
        )
        if single_rows
        else "(not measured in this run)",
        "",
        f"`/metrics`: a cold scrape reads the database again (the broker caches those series "
        f"for {reads['metrics_cache_s']:g} s; each cold scrape here follows a pause longer than "
        "that, as a Prometheus scrape every 15 s or more does); a warm one right after is "
        "served from the cache.",
        "",
        table(
            ["database", "cold p50 ms", "cold max ms", "warm p50 ms", "scrapes", "size", "samples"],
            metric_rows,
        ),
        "",
        "Resident memory of the broker (`VmRSS`, `VmHWM` from /proc; of its largest process "
        "where it runs several):",
        "",
        table(["database", "after start", "after the read load", "peak"], memory_rows),
        "",
        *_process_rows(by_backend),
        f"![API reads]({plot})",
        "",
    ]


def _process_rows(by_backend: dict[str, Any]) -> list[str]:
    rows = [
        [
            BACKEND_LABELS[b],
            r.get("workers", 1),
            p["pid"],
            f"`{p['command']}`",
            f"{p['rss_kib'] / 1024:.0f} MiB",
            f"{p['hwm_kib'] / 1024:.0f} MiB",
        ]
        for b, r in by_backend.items()
        for p in r.get("processes") or []
    ]
    if not rows:
        return []
    return [
        "Per process, after the read load (with `--workers N`, a supervisor and N workers):",
        "",
        table(["database", "workers", "pid", "process", "resident", "peak"], rows),
        "",
    ]


def _metrics_section(metrics: dict[str, Any]) -> list[str]:
    rows = [
        [
            f"{r['jobs']:,}",
            ms(r["cold_ms_median"]),
            ms(r["cold_ms_max"]),
            ms(r["warm_ms_median"]),
            r["scrapes"],
            kib(r["bytes"]),
            r["series"],
            f"{r['seed_s']:.0f}",
        ]
        for r in metrics["by_size"]
    ]
    return [
        "## 5. `/metrics` as the job history grows",
        "",
        "One PostgreSQL database grown in steps (bulk inserts of jobs shaped like section 4's, "
        "then `ANALYZE`); one broker serves throughout. At each size, scrapes that each follow "
        "a pause longer than the broker's cache of the database-derived series (cold), and one "
        "right after each (warm).",
        "",
        table(
            [
                "jobs",
                "cold p50 ms",
                "cold max ms",
                "warm p50 ms",
                "scrapes",
                "size",
                "samples",
                "seeding s",
            ],
            rows,
        ),
        "",
    ]


def _mixed_section(mixed: dict[str, Any]) -> list[str]:
    rows = []
    for name, e in mixed["endpoints"].items():
        latency = e["latency"] or {}
        rows.append(
            [
                f"`{name}`",
                e["ok"],
                f"{e['per_second']:.1f}",
                ms(latency.get("p50")),
                ms(latency.get("p99")),
                ms(latency.get("max")),
                e["errors"],
                e["server_errors"],
            ]
        )
    connections = mixed["db_connections"]
    lines = [
        "## 6. Mixed load",
        "",
        f"{mixed['researchers']} simulated researchers, each with a token of their own and "
        f"members of project `bench`, for {mixed['seconds']:.0f} s on PostgreSQL "
        f"({mixed.get('workers', 1)} API process(es)), {mixed['history_jobs']:,} jobs of "
        "theirs already in the database. Each researcher draws its next request: 70 % reads of "
        "its own jobs (six in seven `GET /v1/jobs/{id}`, one in seven the first page of its own "
        "jobs), 20 % submissions, 10 % cancellations of one of its live jobs (a submission when "
        "it has none), then pauses for an exponentially distributed think time (mean "
        f"{mixed['think_s']:g} s). `/metrics` is scraped every {mixed['scrape_every_s']:g} s. "
        "Every submitted job is real (held pending by Slurm) and cancelled at the end.",
        "",
        table(
            ["endpoint", "ok", "per s", "p50 ms", "p99 ms", "max ms", "errors", "5xx"],
            rows,
        ),
        "",
        f"In all: **{mixed['per_second']:.0f} requests/s**, **{mixed['errors']} errors**, "
        f"**{mixed['server_errors']} 5xx**; broker CPU {mixed['broker_cpu_s']:.1f} s over "
        f"{mixed['wall_s']:.0f} s. Database connections in use (`pg_stat_activity`, sampled "
        f"each second, {connections['samples']} samples): at most {connections['max']} "
        f"(mean {connections['mean']:.1f}), of which active at most "
        f"{connections['max_active']} (mean {connections['mean_active']:.1f}).",
        "",
    ]
    if mixed["first_errors"]:
        lines += ["First errors: " + "; ".join(f"`{e}`" for e in mixed["first_errors"]), ""]
    return lines


def _targets_intro(results: dict[str, Any]) -> str:
    baseline = results.get("baseline")
    text = (
        "The targets of issue 12, measured in this run. The verdict is this tree's (per "
        "database where both were measured). "
    )
    if baseline:
        text += (
            f"**Before** is revision `{baseline['revision']}` (`{baseline['commit']}`), "
            "measured in the same run, each section right before this tree's, with the same "
            "benchmark code (see the end of this document for its tables)."
        )
    else:
        text += "This run measured no baseline: **before** is the issue's figure."
    workers = results.get("api_workers") or {}
    if workers:
        text += f" API processes on PostgreSQL: {workers['asked']} asked, " + (
            "served with `broker serve --workers`."
            if workers.get("serve_has_workers")
            else "but `broker serve` has no `--workers` in this tree: one process."
        )
    return text


def _sections(sections: dict[str, Any], plots: dict[str, str] | None) -> list[str]:
    """The section tables; without ``plots``, no plot is drawn or linked (the baseline's)."""
    lines: list[str] = []

    def plot(name: str) -> str:
        return plots[name] if plots else ""

    if "latency" in sections:
        lines += _latency_section(sections["latency"], plot("latency"))
    if "throughput" in sections:
        lines += _throughput_section(sections["throughput"], plot("throughput"))
    if "polling" in sections:
        lines += _polling_section(sections["polling"], plot("polling"))
    if "reads" in sections:
        lines += _reads_section(sections["reads"], plot("reads"))
    if "metrics" in sections:
        lines += _metrics_section(sections["metrics"])
    if "mixed" in sections:
        lines += _mixed_section(sections["mixed"])
    if not plots:
        lines = [line for line in lines if not line.startswith("![")]
    return lines


def _baseline_sections(results: dict[str, Any]) -> list[str]:
    baseline = results.get("baseline")
    if not baseline or not baseline.get("sections"):
        return []
    lines = [
        f"## Before: revision {baseline['revision']}",
        "",
        f"The same measurements with the code of `{baseline['revision']}` "
        f"(`{baseline['commit']}`), in the same run.",
        "",
    ]
    for line in _sections(baseline["sections"], None):
        lines.append("#" + line if line.startswith("## ") else line)
    return lines


def _background_note(results: dict[str, Any]) -> str:
    busy = results.get("background_busy") or {}
    if not busy:
        return ""

    def share(value: Any) -> str:
        if isinstance(value, dict):  # busy and stolen
            return f"{value['busy'] * 100:.0f} % busy, {value['steal'] * 100:.0f} % stolen"
        return f"{float(value) * 100:.0f} % busy"

    during = results.get("section_cpu") or {}
    sample = results.get("plan", {}).get("background_sample_s", 3)
    text = (
        f"The machine while the run waited {sample:g} s before each section (others sharing "
        "it, daemons; "
        "stolen: time the virtual machine's host ran something else): "
        + "; ".join(f"{name} {share(value)}" for name, value in busy.items())
        + "."
    )
    if during:
        text += " Over each section, the benchmark included: " + "; ".join(
            f"{name} {share(value)}" for name, value in during.items()
        )
        text += "."
    return text


def render(results: dict[str, Any], plots: dict[str, str], extra: str = "") -> str:
    """The document; ``extra`` is a section of its own (the sweeps') put after the six."""
    machine = results["machine"]
    sections = results["sections"]
    lines = ["# Performance", ""]
    if results.get("mode") == "quick":
        lines += [
            "> **Quick smoke run**: counts far too small for conclusions. The figures of record "
            "come from the full run.",
            "",
        ]
    lines += [
        "Does the broker add next to nothing to Slurm, and does it load the controller no more "
        "as the queue grows? Six measurements (and a seventh, sweeps, measured on its own), "
        "run side by side in one run against the Slurm dev cluster (`deploy/dev-cluster`), "
        "answer it. Rerun them all with "
        "`bash benchmarks/run.sh` (as root, dev cluster up; about "
        f"{results.get('elapsed_s', 0) / 60:.0f} minutes); `benchmarks/README.md` has the options.",
        "",
        "**Everything below was measured on one 2-core virtual machine** that also runs the "
        "whole Slurm cluster (slurmctld, six slurmd, slurmdbd, MariaDB), both login-node sshd, "
        "PostgreSQL, the broker and the load generators. On a real site the controller, the "
        "login node, the database and the broker are separate machines: absolute figures there "
        "will differ, the ratios and the shapes of the curves are the point here.",
        "",
        "## Targets",
        "",
        _targets_intro(results),
        "",
        table(["what", "target", "before", "after (this tree)", "verdict"], targets(results)),
        "",
        "Causes and what was changed are under [Findings](#findings).",
        "",
        "## Machine",
        "",
        table(["", ""], [[k, v] for k, v in machine.items()]),
        "",
        _background_note(results),
        "",
        f"Run took {results.get('elapsed_s', 0):.0f} s.",
        "",
    ]
    lines += _sections(sections, plots)
    if extra:
        lines += [extra.strip(), ""]
    lines += [
        "## Method",
        "",
        "- Every benchmark job is the same: `#!/bin/bash` / `true`, 1 GPU (`--gres=gpu:h100:1`), "
        "10 minutes, partition `gpu` of cluster alpha, Slurm account `bench`, submitted with the "
        "command line the broker builds (`adapters.slurm.commands.sbatch`: `--parsable`, "
        "`--comment` tag, script on stdin). The `bench` association has `GrpJobs=0`: Slurm "
        "accepts each job and keeps it pending (`AssocGrpJobsLimit`), so no benchmark job takes "
        "a GPU from anyone, and `scancel --account=bench` ends them all after each step.",
        "- (a) runs `sbatch` as the service account `slurmsvc` on this host (the login node), "
        "through `setpriv` from root, so that the benchmark's large Python process is not "
        "forked for each sbatch (which slowed (a) down and would have flattered the broker); "
        "what spawning costs is measured in the run (section 1). (b) runs OpenSSH's `ssh` with "
        "a fresh connection "
        "every time (`-F /dev/null -o ControlMaster=no -o ControlPath=none`, host key checked "
        "against the dev cluster's known_hosts, ed25519 key) to `slurmsvc@127.0.0.1:2221`. "
        "(c) is `POST /v1/jobs` by a researcher of project `bench` (quota 10^9 GPU-hours) on a "
        "kept-open HTTP connection: token check, quota decision and reservation under the "
        "project's ledger lock, job row, sbatch over the broker's kept-open paramiko "
        "connection, commit of the Slurm id, response.",
        "- The broker runs as its own process, `broker serve --no-poller`, on PostgreSQL with "
        "`--workers N` where `serve` has the option (a supervisor and N worker processes; "
        "CPU counts them all, memory is per process), on SQLite as one process; with "
        "`BROKER_LIMITS__REQUESTS_PER_MINUTE=0` and a fresh database: a "
        "SQLite file on local disk, or a new PostgreSQL database on the local server.",
        "- Slurm keeps ended jobs for `MinJobAge` (300 s) and holds at most `MaxJobCount` "
        "(10,000): before each step the run waits until the step fits and leaves 2,000 job "
        "slots free for whoever shares the dev cluster.",
        "- Percentiles interpolate linearly between ranks. wrk's percentiles are its own.",
        "- Raw results: `benchmarks/results/performance.json`; plots are regenerated from it "
        "with `python -m benchmarks --from-json benchmarks/results/performance.json`.",
        "",
        "## Findings",
        "",
    ]
    if ANALYSIS.is_file():
        lines += [ANALYSIS.read_text().strip(), ""]
    else:
        lines += ["(no analysis written yet)", ""]
    lines += _baseline_sections(results)
    return "\n".join(lines)


RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where ``python -m benchmarks.sweeps`` leaves its section (``sweeps.md``)."""


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write ``performance.md`` and its plots into ``out``; returns the document's path."""
    out.mkdir(parents=True, exist_ok=True)
    sections = results["sections"]
    plotters = {
        "latency": plot_latency,
        "throughput": plot_throughput,
        "polling": plot_polling,
        "reads": plot_reads,
    }
    for name, plotter in plotters.items():
        if name in sections:
            plotter(sections[name], out / PLOTS[name])
    document = out / "performance.md"
    sweeps = RESULTS_DIR / "sweeps.md"  # issue 10's section, by python -m benchmarks.sweeps
    document.write_text(render(results, PLOTS, sweeps.read_text() if sweeps.is_file() else ""))
    return document
