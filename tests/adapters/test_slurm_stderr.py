"""Slurm's stderr, classified by the adapter: on every captured ``*.stderr`` and on odd lines.

The captures in ``tests/fixtures/slurm`` come from the real commands with slurmctld or slurmdbd
stopped, a bad account and unknown jobs (``capture.sh``). Each has its exit status in ``.rc``.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

from adapters.errors import CommandFailed, SlurmUnavailable
from adapters.slurm.stderr import StderrKind, classify, reason_of
from tests.adapters.test_slurm_client import SPEC, ScriptedRunner, client_for

FIXTURES = Path(__file__).parents[1] / "fixtures" / "slurm"

EXPECTED: dict[str, tuple[StderrKind, str | None]] = {
    "sacct-dbd-down": (
        StderrKind.UNAVAILABLE,
        "Problem talking to the database: Connection refused",
    ),
    "sbatch-controller-down": (
        StderrKind.UNAVAILABLE,
        "Unable to contact slurm controller (connect failure)",
    ),
    "squeue-controller-down": (
        StderrKind.UNAVAILABLE,
        "Unable to contact slurm controller (connect failure)",
    ),
    "sbatch-invalid-account": (
        StderrKind.REFUSED,
        "Invalid account or account/partition combination specified",
    ),
    "squeue-unknown-job": (StderrKind.JOB_UNKNOWN, "Invalid job id specified"),
    "scancel-unknown-job": (StderrKind.OK, None),
    "scancel-finished-job": (StderrKind.OK, None),
}
"""Capture name -> the kind and reason the adapter must read from it."""


def capture(name: str) -> tuple[str, int]:
    stderr = (FIXTURES / f"{name}.stderr").read_text()
    return stderr, int((FIXTURES / f"{name}.rc").read_text())


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.stderr")))
def test_every_captured_stderr_is_classified(name: str) -> None:
    assert name in EXPECTED, f"{name}.stderr has no expected classification: add it to EXPECTED"
    stderr, exit_code = capture(name)
    verdict = classify(stderr, exit_code=exit_code)
    assert (verdict.kind, verdict.reason) == EXPECTED[name]


def test_every_expectation_has_a_capture_and_an_exit_status() -> None:
    assert set(EXPECTED) == {p.stem for p in FIXTURES.glob("*.stderr")}
    assert set(EXPECTED) == {p.stem for p in FIXTURES.glob("*.rc")}


# -- the client turns the verdict into the error the broker acts on ------------------------------


@pytest.mark.parametrize("name", ["sbatch-controller-down", "sbatch-invalid-account"])
def test_sbatch_captures_through_the_client(name: str) -> None:
    stderr, exit_code = capture(name)
    runner = ScriptedRunner({"sbatch": (exit_code, "", stderr)})
    with pytest.raises(CommandFailed) as caught:
        client_for(runner).submit(SPEC)
    error = caught.value
    kind, reason = EXPECTED[name]
    assert isinstance(error, SlurmUnavailable) is (kind is StderrKind.UNAVAILABLE)
    assert error.transient is (kind is StderrKind.UNAVAILABLE)
    assert error.may_have_run is False  # "Unable to contact": the job was never sent
    assert error.reason == reason


def test_squeue_capture_of_a_down_controller_is_unavailable_not_missing() -> None:
    stderr, exit_code = capture("squeue-controller-down")
    runner = ScriptedRunner({"squeue": (exit_code, "", stderr)})
    with pytest.raises(SlurmUnavailable):
        client_for(runner).statuses(["1", "2"])


def test_squeue_capture_of_an_unknown_job_is_missing() -> None:
    stderr, exit_code = capture("squeue-unknown-job")
    runner = ScriptedRunner({"squeue": (exit_code, "", stderr), "sacct": (0, "", "")})
    report = client_for(runner).statuses(["999999"])
    assert report.missing == {"999999"}


def test_sacct_capture_of_a_down_database_is_unavailable() -> None:
    stderr, exit_code = capture("sacct-dbd-down")
    runner = ScriptedRunner({"squeue": (0, "", ""), "sacct": (exit_code, "", stderr)})
    with pytest.raises(SlurmUnavailable) as caught:
        client_for(runner).statuses(["1"])
    assert caught.value.reason == EXPECTED["sacct-dbd-down"][1]


@pytest.mark.parametrize("name", ["scancel-unknown-job", "scancel-finished-job"])
def test_scancel_captures_of_gone_jobs_succeed(name: str) -> None:
    stderr, exit_code = capture(name)
    client_for(ScriptedRunner({"scancel": (exit_code, "", stderr)})).cancel("999999")


# -- lines not captured (yet) but printed by Slurm 22.05 -----------------------------------------


@pytest.mark.parametrize(
    ("stderr", "exit_code", "kind", "may_have_acted"),
    [
        ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", 1,
         StderrKind.UNAVAILABLE, True),
        ("squeue: error: Socket timed out on send/recv operation", 0, StderrKind.UNAVAILABLE, True),
        ("slurm_load_jobs error: Zero Bytes were transmitted or received", 1,
         StderrKind.UNAVAILABLE, False),
        ("sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying", 0,
         StderrKind.OK, False),
        ("sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying", 1,
         StderrKind.UNAVAILABLE, False),
        ("scancel: error: Kill job error on job id 5: Job/step already completing or completed", 1,
         StderrKind.JOB_ENDED, False),
        ("scancel: error: Kill job error on job id 5: Access/permission denied", 1,
         StderrKind.REFUSED, False),
        ("", 1, StderrKind.REFUSED, False),
    ],
)  # fmt: skip
def test_odd_lines(stderr: str, exit_code: int, kind: StderrKind, may_have_acted: bool) -> None:
    verdict = classify(stderr + "\n", exit_code=exit_code)
    assert (verdict.kind, verdict.may_have_acted) == (kind, may_have_acted)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            "sbatch: error: Batch job submission failed: Invalid qos specification",
            "Invalid qos specification",
        ),
        (
            "scancel: error: Kill job error on job id 5: Access/permission denied",
            "Access/permission denied",
        ),
        ("slurm_load_jobs error: Invalid job id specified", "Invalid job id specified"),
        ("sbatch: error: invalid partition specified: x", "invalid partition specified: x"),
        ("sbatch: error: " + "x" * 300, "x" * 200),
    ],
)
def test_reason_is_slurms_own_words_without_prefixes(line: str, reason: str) -> None:
    assert reason_of(line) == reason


# -- every fixture file is read by a test --------------------------------------------------------


def _string_constants(source: str) -> set[str]:
    return {
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_every_fixture_file_is_read_by_a_test() -> None:
    tests = Path(__file__).parents[1]
    names: set[str] = set()
    for path in tests.rglob("test_*.py"):
        names |= _string_constants(path.read_text())
    # Globs of file names such as "*.stderr" (not a bare "*", nor other strings with a star).
    patterns = {n for n in names if "*" in n and "." in n and not set(n) & set(" /\n")}
    unused = [
        path.name
        for path in sorted(FIXTURES.iterdir())
        if path.name not in {"README.md", "capture.sh"}
        and path.name not in names
        and not any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns)
    ]
    assert not unused, f"fixture files no test reads (use them or delete them): {unused}"


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.cmd")))
def test_every_capture_names_the_command_that_made_it(name: str) -> None:
    first = (FIXTURES / name).read_text().splitlines()[0]
    stem = name.removesuffix(".cmd")
    program = stem.removeprefix("client-").split("-")[0]
    words = [word.rsplit("/", 1)[-1] for word in first.split()]
    assert program in words, f"{name} does not show a {program} command: {first}"
    outputs = [FIXTURES / f"{stem}{suffix}" for suffix in (".txt", ".stderr")]
    assert any(path.is_file() for path in outputs), f"{name} has no capture next to it"
