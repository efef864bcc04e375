"""A script cannot set its own Slurm options: directive lines are refused by the API, and the
sbatch command line the broker builds ignores the #PBS/#BSUB lines sbatch would read anywhere.

Real Slurm (sbatch 22.05 on the dev cluster), the broker's own SSH client, real HTTP.
"""

from __future__ import annotations

import dataclasses
import re
import uuid

import pytest

from adapters.slurm import commands
from adapters.slurm.client import SlurmClient
from adapters.slurm.types import JobSpec
from tests.e2e.live import LiveBroker, job_body, new_project, squeue_ids

pytestmark = pytest.mark.cluster

# The SLURM-NOTES trap: sbatch reads these although they come after the first command.
LATE_DIRECTIVES = [
    ("#!/bin/bash\n:\n#BSUB -W 9\nsleep 1\n", 3),
    ("#!/bin/bash\necho hi\n#PBS -l walltime=00:07:00\nsleep 1\n", 3),
    ("#!/bin/bash\necho hi\n\n#PBS -t 0-3\nsleep 1\n", 4),  # an array: 4 jobs for 1
]


@pytest.mark.parametrize(("script", "line"), LATE_DIRECTIVES)
def test_the_api_refuses_late_pbs_and_bsub_lines(
    broker: LiveBroker, script: str, line: int
) -> None:
    alice = broker.client("alice")
    project = new_project(broker.client("root"), "alice", gpu_hours=100)
    body = {**job_body(project, "alpha", seconds=1), "script": script}
    response = alice.http.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"] == "validation-error"
    assert f"line {line} {script.split(chr(10))[line - 1]!r}" in problem["detail"]
    assert squeue_ids(broker.runtime, "alpha", project) == []
    usage = alice.http.get(f"/v1/projects/{project}/usage").json()
    assert usage["reserved_gpu_hours"] == 0.0


def _job_fields(client: SlurmClient, job_id: str) -> dict[str, str]:
    shown = client.runner.run([f"{client.bin_dir}/scontrol", "show", "job", "-o", job_id])
    assert shown.exit_code == 0, shown.stderr_text
    return dict(re.findall(r"\b(\w+)=(\S*)", shown.stdout_text.splitlines()[0]))


def _sbatch_held(client: SlurmClient, argv: list[str], script: str) -> str:
    result = client.runner.run([*argv, "--hold"], stdin=script.encode(), timeout=30)
    assert result.exit_code == 0, result.stderr_text
    return result.stdout_text.strip().split(";")[0]


@pytest.mark.parametrize(
    ("script", "field", "their_value"),
    [
        (LATE_DIRECTIVES[0][0], "TimeLimit", None),  # --time on the command line wins anyway
        (LATE_DIRECTIVES[1][0], "TimeLimit", None),
        (LATE_DIRECTIVES[2][0], "ArrayTaskId", "0-3"),
        ("#!/bin/bash\n:\n#BSUB -n 4\nsleep 1\n", "NumTasks", "4"),
    ],
)
def test_the_broker_sbatch_line_keeps_the_options_of_the_spec(
    broker: LiveBroker, script: str, field: str, their_value: str | None
) -> None:
    """Defence in depth: were such a line to get past the check, the broker's argv (always with
    ``--ignore-pbs``) gives Slurm exactly the spec's options; without it the line would act."""
    project = new_project(broker.client("root"), "alice", gpu_hours=100)
    client = broker.runtime.clusters.client("alpha")
    assert isinstance(client, SlurmClient)
    spec = JobSpec(
        script=script,
        account=project,
        partition="gpu",
        gpus=1,
        gpu_type="h100",
        time_limit_minutes=10,
        tag=f"brk-directives-{uuid.uuid4().hex[:8]}",
        name="directives",
        run_as="alice",  # as the broker submits: as the researcher, through sudo
    )
    # The membership's association is added after the response; make sure it is there now.
    broker.runtime.identities.ensure_association("alpha", project, "alice")
    with pytest.raises(ValueError, match="sbatch directives"):
        client.submit(spec)  # the adapter itself refuses the script

    # The exact argv the adapter builds for this spec, fed the script as it is.
    argv = commands.sbatch(client.bin_dir, dataclasses.replace(spec, script="#!/bin/sh\n"))
    assert "--ignore-pbs" in argv
    started: list[str] = []
    try:
        ours = _job_fields(client, _remember(started, _sbatch_held(client, argv, script)))
        assert ours["TimeLimit"] == "00:10:00"
        assert "ArrayTaskId" not in ours and ours["NumTasks"] == "1"
        if their_value is not None:
            # The control: the same command without --ignore-pbs obeys the script's line.
            unguarded = [a for a in argv if a != "--ignore-pbs"]
            theirs = _job_fields(
                client, _remember(started, _sbatch_held(client, unguarded, script))
            )
            assert theirs.get(field) == their_value
    finally:
        for job_id in started:
            client.cancel(job_id, as_user="alice")


def _remember(started: list[str], job_id: str) -> str:
    started.append(job_id)
    return job_id
