"""Argv builders, spec validation and the batch script: pure, no Slurm needed."""

from __future__ import annotations

import dataclasses
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.slurm import commands
from adapters.slurm.states import PHASES, is_ended, is_waiting, slurm_code
from adapters.slurm.types import JobSpec

NASTY = (
    "$(touch /tmp/x); `id` 'single' \"double\" \\ back\nnew line, comma; semicolon | pipe & $HOME"
)


def make_spec(**changes: Any) -> JobSpec:
    base = JobSpec(
        script="#!/bin/bash\nset -e\nnvidia-smi\n",
        account="dev",
        partition="gpu",
        gpus=8,
        time_limit_minutes=90,
        tag="brk-0f8e",
        name="train",
        gpu_type="h100",
    )
    return dataclasses.replace(base, **changes)


def test_sbatch_argv_carries_every_option_of_the_spec() -> None:
    spec = make_spec(nodes=2, cpus_per_gpu=4, mem_per_gpu_gb=40, comment="user=alice")
    argv = commands.sbatch("/opt/slurm/bin", spec)
    assert argv == [
        "/opt/slurm/bin/sbatch",
        "--parsable",
        "--ignore-pbs",
        "--account=dev",
        "--partition=gpu",
        "--job-name=train",
        "--comment=brk-0f8e user=alice",
        "--nodes=2",
        "--time=90",
        "--gres=gpu:h100:4",
        "--cpus-per-gpu=4",
        "--mem-per-gpu=40G",
    ]


def test_an_array_is_one_sbatch_with_its_indices_and_limit() -> None:
    argv = commands.sbatch("/usr/bin", make_spec(gpus=1, array_size=200, array_max_parallel=16))
    assert argv[-1] == "--array=0-199%16"
    assert commands.sbatch("/usr/bin", make_spec(array_size=3))[-1] == "--array=0-2"
    assert not any(a.startswith("--array") for a in commands.sbatch("/usr/bin", make_spec()))


def test_untyped_and_cpu_only_requests() -> None:
    assert "--gres=gpu:2" in commands.sbatch("/usr/bin", make_spec(gpus=2, gpu_type=None))
    argv = commands.sbatch("/usr/bin", make_spec(gpus=0))
    assert not any(arg.startswith("--gres") for arg in argv)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "a b"}, "job name"),
        ({"name": "$(touch /tmp/x)"}, "job name"),
        ({"name": "x;rm -rf /"}, "job name"),
        ({"name": "two\nlines"}, "job name"),
        ({"name": ""}, "job name"),
        ({"account": "dev;id"}, "account"),
        ({"partition": "gpu\n"}, "partition"),
        ({"gpu_type": "h100:8"}, "GPU type"),
        ({"tag": "brk 1"}, "tag"),
        ({"comment": "line\nbreak"}, "comment"),
        ({"comment": "unit\x1fsep"}, "comment"),
        ({"gpus": 3, "nodes": 2}, "evenly"),
        ({"gpus": -1}, "gpus"),
        ({"nodes": 0}, "nodes"),
        ({"time_limit_minutes": 0}, "time_limit"),
        ({"gpus": 0, "cpus_per_gpu": 2}, "need at least one GPU"),
        ({"mem_per_gpu_gb": 0}, "mem_per_gpu"),
        ({"array_size": 0}, "at least one task"),
        ({"array_max_parallel": 2}, "needs array_size"),
        ({"array_size": 4, "array_max_parallel": 5}, "between 1 and array_size"),
        ({"array_size": 4, "array_max_parallel": 0}, "between 1 and array_size"),
        ({"script": "echo no shebang\n"}, "#!"),
        ({"script": "#!/bin/sh\r\necho dos\r\n"}, "DOS"),
        ({"script": "#!/bin/sh\n#SBATCH --array=0-999\nsleep 1\n"}, "#SBATCH"),
        ({"script": "#!/bin/sh\n\n# about\n#SLURM --exclusive\ntrue\n"}, "line 4 '#SLURM"),
        ({"script": "#!/bin/sh\ntrue\n#PBS -l walltime=9:00:00\n"}, "line 3 '#PBS"),
        ({"script": "#!/bin/sh\n:\n#BSUB -W 9\n"}, "line 3 '#BSUB -W 9'"),
        ({"environment": {"BAD-NAME": "x"}}, "identifier"),
        ({"environment": {"NUL": "a\0b"}}, "NUL"),
        ({"environment": {"S": "lone \ud800"}}, "Unicode"),
        (
            {"script": "#!/usr/bin/env python3\nprint(1)\n", "environment": {"A": "1"}},
            "POSIX shell",
        ),
    ],
)
def test_unsafe_specs_are_refused_before_any_command(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        commands.sbatch("/usr/bin", make_spec(**changes))


def test_sbatch_lines_after_the_first_command_are_plain_comments() -> None:
    spec = make_spec(script="#!/bin/sh\necho hi\n#SBATCH --array=1-3\n")
    assert commands.batch_script(spec) == spec.script.encode()


@pytest.mark.parametrize(
    ("script", "lines"),
    [
        ("#!/bin/sh\n#SBATCH --array=0-9\nsrun x\n", [2]),
        ("#!/bin/sh\n#SBATCH--time=3\n", [2]),  # no space needed: sbatch reads it
        ("#!/bin/sh\n#SLURM --exclusive\n", [2]),
        ("#!/bin/sh\n\n \t\n# note\n#SBATCH -N 4\n#SLURM -n 9\ntrue\n", [5, 6]),
        ("#!/bin/sh\ntrue\n#PBS -l walltime=00:07:00\n", [3]),  # PBS/BSUB count anywhere
        ("#!/bin/sh\n:\necho\n" + "x\n" * 150 + "#BSUB -W 9\n", [154]),
        ("#!/bin/sh\n#PBS -N a\n#BSUB -n 2\n#SBATCH -N 2\n", [2, 3, 4]),
        # Not directives for sbatch (tried on the dev cluster): lower or mixed case, indented,
        # and #SBATCH/#SLURM after the first command (an indented comment is one).
        ("#!/bin/sh\n#sbatch --time=3\n#Sbatch -N 2\n#pbs -l x\n#bsub -W 9\n", []),
        ("#!/bin/sh\n  #SBATCH --time=3\n\t#PBS -l walltime=1:00:00\n", []),
        ("#!/bin/sh\n  # indented comment ends the header\n#SBATCH -N 2\n", []),
        ("#!/bin/sh\n: \n#SLURM -N 2\n", []),
    ],
)
def test_script_directives_are_the_lines_sbatch_reads(script: str, lines: list[int]) -> None:
    found = commands.script_directives(script)
    assert [number for number, _ in found] == lines
    assert all(script.split("\n")[number - 1] == text for number, text in found)
    spec = make_spec(script=script)
    if lines:
        with pytest.raises(ValueError, match=f"line {lines[0]} "):
            commands.batch_script(spec)
    else:
        assert commands.batch_script(spec) == script.encode()


def test_sbatch_is_always_told_to_ignore_pbs_and_bsub_lines() -> None:
    for spec in (make_spec(), make_spec(gpus=0, gpu_type=None), make_spec(nodes=2, gpus=2)):
        assert "--ignore-pbs" in commands.sbatch("/usr/bin", spec)


def test_environment_goes_into_the_script_quoted() -> None:
    spec = make_spec(
        script='#!/usr/bin/env bash\nset -eu\necho "$A"\n', environment={"A": "1", "B": NASTY}
    )
    script = commands.batch_script(spec).decode()
    first, second, third, *rest = script.split("\n")
    assert first == "#!/usr/bin/env bash"
    assert second == "export A=1"
    assert third.startswith("export B='$(touch /tmp/x)")
    assert "\n".join(rest).endswith('set -eu\necho "$A"\n')


def _run_script_header(script: bytes, names: list[str], tmp_path: Path) -> list[str]:
    probe = script + b"".join(b'printf "%s\\0" "$' + n.encode() + b'"\n' for n in names)
    done = subprocess.run(
        ["/bin/sh", "-s"], input=probe, capture_output=True, cwd=tmp_path, check=True, timeout=10
    )
    return done.stdout.decode("utf-8", errors="surrogateescape").split("\0")[:-1]


def test_shell_metacharacters_arrive_literally_and_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "x"
    value = NASTY.replace("/tmp/x", str(marker))
    spec = make_spec(script="#!/bin/sh\n", environment={"V": value})
    assert _run_script_header(commands.batch_script(spec), ["V"], tmp_path) == [value]
    assert not marker.exists()


@settings(max_examples=60, deadline=None)
@given(
    value=st.text(
        alphabet=st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]),
        max_size=40,
    )
)
def test_any_environment_value_round_trips_through_sh(value: str) -> None:
    spec = make_spec(script="#!/bin/sh\n", environment={"V": value})
    here = Path("/tmp")
    out = _run_script_header(commands.batch_script(spec), ["V"], here)
    assert out == [value]


def test_squeue_and_sacct_argv() -> None:
    argv = commands.squeue("/usr/bin", ["1", "2_3"])
    assert argv[:4] == ["/usr/bin/squeue", "--noheader", "--all", "--states=all"]
    assert "--jobs=1,2_3" in argv
    assert "--me" not in argv  # the broker's jobs run as researchers
    assert argv[-1].startswith("--Format=JobID:\x1f,State:\x1f,")
    own = commands.squeue("/usr/bin")
    assert "--jobs" not in " ".join(own) and own[1] == "--me"
    by_account = commands.squeue("/usr/bin", accounts=["p1", "p2"])
    assert "--accounts=p1,p2" in by_account and "--me" not in by_account
    with pytest.raises(ValueError, match="account"):
        commands.squeue("/usr/bin", accounts=["p1;rm -rf"])

    argv = commands.sacct(
        "/usr/bin", cluster="alpha", start="now-30days", job_ids=["5"], accounts=["a", "b"]
    )
    assert "--delimiter=\x1f" in argv
    assert "--allusers" in argv  # without it sacct shows only the service account's own jobs
    assert "--starttime=now-30days" in argv
    assert "--clusters=alpha" in argv
    assert "--jobs=5" in argv
    assert "--accounts=a,b" in argv
    assert argv[-1] == "--format=" + ",".join(commands.SACCT_FIELDS)
    with pytest.raises(ValueError):
        commands.sacct("/usr/bin", cluster="alpha", start="now", job_ids=["5;id"])
    with pytest.raises(ValueError):
        commands.scancel("/usr/bin", "12 13")


def test_times_for_sacct_are_cluster_wall_clock() -> None:
    moment = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert commands.format_time(moment, UTC) == "2024-05-01T12:00:00"
    assert commands.format_time(moment, timezone(timedelta(hours=2))) == "2024-05-01T14:00:00"
    assert commands.format_time(datetime(2024, 5, 1, 12, 0), UTC) == "2024-05-01T12:00:00"


def test_sacctmgr_argv_is_validated() -> None:
    assert commands.sacctmgr_add_user("/usr/bin", cluster="alpha", account="p1", user="svc") == [
        "/usr/bin/sacctmgr",
        "--immediate",
        "add",
        "user",
        "svc",
        "account=p1",
        "cluster=alpha",
    ]
    with pytest.raises(ValueError):
        commands.sacctmgr_add_account("/usr/bin", cluster="alpha", account="p1 where")


# -- the state table -----------------------------------------------------------------------------

ALL_CODES = {
    "PENDING": "PD", "RUNNING": "R", "SUSPENDED": "S", "COMPLETING": "CG", "COMPLETED": "CD",
    "CONFIGURING": "CF", "CANCELLED": "CA", "FAILED": "F", "TIMEOUT": "TO", "PREEMPTED": "PR",
    "NODE_FAIL": "NF", "BOOT_FAIL": "BF", "DEADLINE": "DL", "OUT_OF_MEMORY": "OOM",
    "REQUEUED": "RQ", "REQUEUE_FED": "RF", "REQUEUE_HOLD": "RH", "RESIZING": "RS", "REVOKED": "RV",
    "SIGNALING": "SI", "SPECIAL_EXIT": "SE", "STAGE_OUT": "SO", "STOPPED": "ST",
    "RESV_DEL_HOLD": "RD",
}  # fmt: skip


@pytest.mark.parametrize(("long", "compact"), sorted(ALL_CODES.items()))
def test_every_slurm_code_is_in_the_table_in_both_forms(long: str, compact: str) -> None:
    assert long in PHASES
    assert slurm_code(compact) == long


@pytest.mark.parametrize(
    ("raw", "code", "ended"),
    [
        ("COMPLETING", "COMPLETING", False),
        ("CG", "COMPLETING", False),
        ("PD", "PENDING", False),
        ("CANCELLED by 1234", "CANCELLED", True),
        ("OUT_OF_MEMORY", "OUT_OF_MEMORY", True),
        ("NF", "NODE_FAIL", True),
        ("TIMEOUT", "TIMEOUT", True),
        ("PREEMPTED", "PREEMPTED", True),
        ("REQUEUED", "REQUEUED", False),
        ("completed", "COMPLETED", True),
        ("RUNNING+", "RUNNING", False),
    ],
)
def test_state_codes_are_normalised_and_classified(raw: str, code: str, ended: bool) -> None:
    assert slurm_code(raw) == code
    assert is_ended(code) is ended


def test_unknown_codes_are_reported_as_they_are_and_not_ended() -> None:
    assert slurm_code("LAUNCH_FAILED") == "LAUNCH_FAILED"
    assert not is_ended("LAUNCH_FAILED") and not is_waiting("LAUNCH_FAILED")
    assert slurm_code("") == ""
