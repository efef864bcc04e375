"""SlurmClient over a scripted runner: batching, error classification, idempotency."""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from adapters.errors import (
    CommandFailed,
    HostUnreachable,
    RunAsRefused,
    SlurmOutputError,
    SlurmUnavailable,
    SubmitMisrouted,
)
from adapters.runner import CommandResult, CommandRunner
from adapters.slurm import client as client_module
from adapters.slurm.client import SACCTMGR_ADD_ATTEMPTS, SlurmClient
from adapters.slurm.commands import SACCT_FIELDS, SQUEUE_FIELDS, SQUEUE_MAX_IDS
from adapters.slurm.types import JobSpec

US = "\x1f"

Reply = tuple[int, str, str]  # exit code, stdout, stderr


@dataclass
class ScriptedRunner:
    """Answers each command by program name (``squeue``) from a table of replies."""

    replies: dict[str, Reply | Callable[[Sequence[str]], Reply]] = field(default_factory=dict)
    calls: list[tuple[list[str], bytes | None]] = field(default_factory=list)
    name: str = "scripted"

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        self.calls.append((list(argv), stdin))
        reply = self.replies[posixpath.basename(argv[0])]
        code, out, err = reply(argv) if callable(reply) else reply
        return CommandResult(tuple(argv), code, out.encode(), err.encode(), 0.001)

    def close(self) -> None:
        pass

    def programs(self) -> list[str]:
        return [posixpath.basename(argv[0]) for argv, _ in self.calls]


def squeue_line(job_id: str, state: str, comment: str = "", reason: str = "None") -> str:
    values = {"JobID": job_id, "State": state, "Reason": reason, "Comment": comment}
    values["tres-alloc"] = "cpu=1,gres/gpu=8,gres/gpu:h100=8"
    return "".join(values.get(name, "") + US for name in SQUEUE_FIELDS) + "\n"


def sacct_line(job_id: str, state: str, comment: str = "", submit: str = "") -> str:
    values = {
        "JobIDRaw": job_id,
        "JobID": job_id,
        "State": state,
        "ExitCode": "0:0",
        "AllocTRES": "cpu=1,gres/gpu=8,gres/gpu:h100=8",
        "ElapsedRaw": "42",
        "Comment": comment,
        "Submit": submit,
    }
    return US.join(values.get(name, "") for name in SACCT_FIELDS) + "\n"


def jobs_arg(argv: Sequence[str]) -> list[str]:
    for arg in argv:
        if arg.startswith("--jobs="):
            return arg.removeprefix("--jobs=").split(",")
    return []


def client_for(runner: CommandRunner, **kwargs: object) -> SlurmClient:
    return SlurmClient(runner, cluster="alpha", **kwargs)  # type: ignore[arg-type]


SPEC = JobSpec(
    script="#!/bin/sh\nsleep 1\n",
    account="dev",
    partition="gpu",
    gpus=8,
    time_limit_minutes=5,
    tag="brk-1",
    gpu_type="h100",
)

# -- statuses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [10, 1000])
def test_statuses_take_two_commands_whatever_the_number_of_jobs(count: int) -> None:
    runner = ScriptedRunner(
        {
            "squeue": (0, squeue_line("1", "RUNNING") + squeue_line("2", "COMPLETED"), ""),
            "sacct": (0, sacct_line("2", "COMPLETED") + sacct_line("3", "FAILED"), ""),
        }
    )
    ids = ["1", "2", "3"] + [str(100_000 + n) for n in range(count - 3)]
    report = client_for(runner).statuses(ids)

    assert report.commands == 2
    assert runner.programs() == ["squeue", "sacct"]
    assert report.found["1"].state == "RUNNING"
    assert report.found["1"].source == "squeue"
    assert report.found["2"].source == "sacct"  # final in squeue: accounting from sacct
    assert report.found["2"].elapsed_s == 42
    assert report.found["3"].state == "FAILED"
    assert report.missing == frozenset(ids[3:])
    assert "1" not in jobs_arg(runner.calls[1][0])  # a live job is not looked up in sacct
    assert "2" in jobs_arg(runner.calls[1][0])


@pytest.mark.parametrize(("count", "filtered_by_squeue"), [(3, True), (SQUEUE_MAX_IDS + 1, False)])
def test_many_ids_read_all_own_jobs_and_keep_the_asked_ones(
    count: int, filtered_by_squeue: bool
) -> None:
    others = squeue_line("7", "PENDING") + squeue_line("8", "RUNNING")  # not asked for
    runner = ScriptedRunner({"squeue": (0, squeue_line("1", "RUNNING") + others, "")})
    ids = ["1"] + [str(100_000 + n) for n in range(count - 1)]
    runner.replies["sacct"] = (0, "", "")
    report = client_for(runner).statuses(ids)

    assert (jobs_arg(runner.calls[0][0]) == ids) is filtered_by_squeue
    assert ("--me" in runner.calls[0][0]) is not filtered_by_squeue
    assert set(report.found) == {"1"}
    assert report.missing == frozenset(ids[1:])


def test_by_account_one_squeue_reads_the_accounts_and_reports_the_others() -> None:
    others = squeue_line("7", "PENDING") + squeue_line("8", "RUNNING")  # not submitted by us
    runner = ScriptedRunner({"squeue": (0, squeue_line("1", "RUNNING") + others, "")})
    report = client_for(runner).statuses(["1"], accounts=["p1", "p2"])
    argv = runner.calls[0][0]
    assert "--accounts=p1,p2" in argv and jobs_arg(argv) == [] and "--me" not in argv
    assert report.commands == 1 and set(report.found) == {"1"}
    assert [s.job_id for s in report.others] == ["7", "8"]
    # Nothing followed yet: the accounts are still read, for jobs the broker did not submit.
    assert [s.job_id for s in client_for(runner).statuses([], accounts=["p1"]).others] == [
        "1",
        "7",
        "8",
    ]


def test_only_live_jobs_take_one_command() -> None:
    runner = ScriptedRunner({"squeue": (0, squeue_line("1", "PENDING", reason="Resources"), "")})
    report = client_for(runner).statuses(["1"])
    assert report.commands == 1
    assert report.found["1"].reason == "Resources"
    assert report.missing == frozenset()


def test_no_ids_no_commands() -> None:
    runner = ScriptedRunner()
    assert client_for(runner).statuses([]).commands == 0
    assert runner.calls == []


def test_one_unknown_id_is_missing_not_an_error() -> None:
    runner = ScriptedRunner(
        {
            "squeue": (1, "", "slurm_load_jobs error: Invalid job id specified\n"),
            "sacct": (0, "", ""),
        }
    )
    report = client_for(runner).statuses(["99"])
    assert report.missing == frozenset({"99"})
    assert report.commands == 2


def test_final_in_squeue_but_not_yet_in_sacct_keeps_squeue_view() -> None:
    runner = ScriptedRunner(
        {
            "squeue": (0, squeue_line("5", "CANCELLED"), ""),
            "sacct": (0, sacct_line("5", "RUNNING"), ""),
        }
    )
    report = client_for(runner).statuses(["5"])
    assert report.found["5"].state == "CANCELLED"
    assert report.found["5"].source == "squeue"


@pytest.mark.parametrize(
    ("code", "stderr"),
    [
        (1, "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"),
        (0, "squeue: error: Socket timed out on send/recv operation\n"),
        (1, "slurm_load_jobs error: Zero Bytes were transmitted or received\n"),
    ],
)
def test_controller_down_is_unavailable_not_missing(code: int, stderr: str) -> None:
    runner = ScriptedRunner({"squeue": (code, "", stderr)})
    with pytest.raises(SlurmUnavailable) as caught:
        client_for(runner).statuses(["1", "2"])
    assert caught.value.transient
    assert runner.programs() == ["squeue"]  # sacct not asked: nothing concluded


def test_database_down_is_unavailable() -> None:
    runner = ScriptedRunner(
        {
            "squeue": (0, "", ""),
            "sacct": (
                1,
                "",
                "sacct: error: slurm_persist_conn_open_without_init: failed to open persistent "
                "connection to host:localhost:16819: Connection refused\n"
                "sacct: error: Problem talking to the database: Connection refused\n",
            ),
        }
    )
    with pytest.raises(SlurmUnavailable):
        client_for(runner).statuses(["1"])


def test_unparsable_output_is_an_output_error() -> None:
    runner = ScriptedRunner({"squeue": (0, "garbage" + US + "\n", "")})
    with pytest.raises(SlurmOutputError):
        client_for(runner).statuses(["1"])


# -- find_by_tag ---------------------------------------------------------------------------------


def test_find_by_tag_merges_queue_and_accounting() -> None:
    runner = ScriptedRunner(
        {
            "squeue": (
                0,
                squeue_line("7", "RUNNING", "brk-1 user=a") + squeue_line("8", "RUNNING", "brk-10"),
                "",
            ),
            "sacct": (
                0,
                sacct_line("6", "COMPLETED", "brk-1 user=a") + sacct_line("7", "RUNNING"),
                "",
            ),
        }
    )
    found = client_for(runner).find_by_tag("brk-1", datetime(2024, 1, 1, tzinfo=UTC))
    assert [(s.job_id, s.source) for s in found] == [("6", "sacct"), ("7", "squeue")]
    sacct_argv = runner.calls[1][0]
    assert "--starttime=2024-01-01T00:00:00" in sacct_argv


# -- submit --------------------------------------------------------------------------------------


def test_submit_sends_the_script_on_stdin_and_returns_the_id() -> None:
    runner = ScriptedRunner({"sbatch": (0, "4242;alpha\n", "")})
    assert client_for(runner).submit(SPEC) == "4242"
    argv, stdin = runner.calls[0]
    assert stdin == SPEC.script.encode()
    assert "--comment=brk-1" in argv


@pytest.mark.parametrize(
    ("stderr", "may_have_run"),
    [
        ("sbatch: error: Batch job submission failed: Socket timed out on send/recv", True),
        ("sbatch: error: Batch job submission failed: Unable to contact slurm controller", False),
    ],
)
def test_submit_unavailable_says_whether_the_job_may_exist(stderr: str, may_have_run: bool) -> None:
    runner = ScriptedRunner({"sbatch": (1, "", stderr)})
    with pytest.raises(SlurmUnavailable) as caught:
        client_for(runner).submit(SPEC)
    assert caught.value.transient
    assert caught.value.may_have_run is may_have_run


def test_submit_refused_by_slurm_is_permanent() -> None:
    runner = ScriptedRunner(
        {
            "sbatch": (
                1,
                "",
                "sbatch: error: Batch job submission failed: Invalid account or "
                "account/partition combination specified\n",
            )
        }
    )
    with pytest.raises(CommandFailed) as caught:
        client_for(runner).submit(SPEC)
    assert not isinstance(caught.value, SlurmUnavailable)
    assert not caught.value.transient


def test_submit_that_retried_by_itself_and_succeeded_is_a_success() -> None:
    stderr = "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying\n"
    runner = ScriptedRunner({"sbatch": (0, "77\n", stderr)})
    assert client_for(runner).submit(SPEC) == "77"


def test_invalid_spec_runs_nothing() -> None:
    runner = ScriptedRunner()
    with pytest.raises(ValueError):
        client_for(runner).submit(dataclasses.replace(SPEC, name="$(touch /tmp/x)"))
    assert runner.calls == []


# -- cancel, accounts, ping ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "stderr",
    [
        "",
        "scancel: error: Kill job error on job id 5: Invalid job id specified\n",
        "scancel: error: Kill job error on job id 5: Job/step already completing or completed\n",
    ],
)
def test_cancel_of_an_ended_or_unknown_job_succeeds(stderr: str) -> None:
    runner = ScriptedRunner({"scancel": (1 if stderr else 0, "", stderr)})
    client_for(runner).cancel("5")


def test_cancel_when_the_controller_is_down_is_unavailable() -> None:
    stderr = "scancel: error: Kill job error on job id 5: Unable to contact slurm controller\n"
    runner = ScriptedRunner({"scancel": (1, "", stderr)})
    with pytest.raises(SlurmUnavailable):
        client_for(runner).cancel("5")


def test_cancel_of_someone_elses_job_fails() -> None:
    stderr = "scancel: error: Kill job error on job id 5: Access/permission denied\n"
    runner = ScriptedRunner({"scancel": (1, "", stderr)})
    with pytest.raises(CommandFailed):
        client_for(runner).cancel("5")


def test_ensure_account_is_idempotent() -> None:
    runner = ScriptedRunner({"sacctmgr": (1, " Nothing new added.\n", "")})
    client_for(runner).ensure_account("proj1", "svc")
    assert len(runner.calls) == 2


def test_ensure_account_reports_real_errors() -> None:
    stderr = " This cluster 'alpha' doesn't exist.\n        Contact your admin to add it.\n"
    runner = ScriptedRunner({"sacctmgr": (1, " Nothing new added.\n", stderr)})
    with pytest.raises(CommandFailed):
        client_for(runner).ensure_account("proj1", "svc")


def test_an_unspecified_sacctmgr_error_is_a_reason_to_try_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """slurmdbd answered an association add under load with this; tried again and still so, a
    submission that needs the association is then 503 (try again), not 422 (the job is wrong)."""
    monkeypatch.setattr(client_module, "SACCTMGR_ADD_BACKOFF_SECONDS", 0.0)
    stderr = " Problem adding users: Unspecified error\n"
    runner = ScriptedRunner({"sacctmgr": (1, "", stderr)})
    with pytest.raises(SlurmUnavailable):
        client_for(runner).ensure_association("proj1", "alice")
    assert runner.programs() == ["sacctmgr"] * SACCTMGR_ADD_ATTEMPTS


def test_an_add_that_slurmdbd_could_not_do_now_is_tried_again_and_found_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two adds of one association at once: one fails with "Unspecified error", and tried again
    it finds the association added by the other ("Nothing new added"): no error then."""
    replies = iter(
        [
            (1, " Adding User(s)\n  alice\n", " Problem adding users: Unspecified error\n"),
            (1, " Nothing new added.\n", ""),
        ]
    )
    monkeypatch.setattr(client_module, "SACCTMGR_ADD_BACKOFF_SECONDS", 0.0)
    runner = ScriptedRunner({"sacctmgr": lambda argv: next(replies)})
    client_for(runner).ensure_association("proj1", "alice")
    assert runner.programs() == ["sacctmgr", "sacctmgr"]


def test_ping() -> None:
    up = ScriptedRunner({"scontrol": (0, "Slurmctld(primary) at vm is UP\n", "")})
    client_for(up).ping()
    down = ScriptedRunner({"scontrol": (1, "Slurmctld(primary) at vm is DOWN\n", "")})
    with pytest.raises(SlurmUnavailable):
        client_for(down).ping()


# -- observation ---------------------------------------------------------------------------------


def test_every_command_is_counted_and_observed() -> None:
    seen: list[tuple[str, float, BaseException | None]] = []
    runner = ScriptedRunner(
        {"sbatch": (0, "1\n", ""), "squeue": (1, "", "Unable to contact slurm controller")}
    )
    client = client_for(runner, observer=lambda *event: seen.append(event))
    client.submit(SPEC)
    with pytest.raises(SlurmUnavailable):
        client.statuses(["1", "2"])
    assert client.commands_run == 2
    assert [(name, error is None) for name, _, error in seen] == [
        ("sbatch", True),
        ("squeue", False),
    ]
    assert isinstance(seen[1][2], SlurmUnavailable)


def test_transport_errors_pass_through_and_are_observed() -> None:
    class Down(ScriptedRunner):
        def run(self, argv: Sequence[str], **kwargs: object) -> CommandResult:
            raise HostUnreachable("login", "refused")

    seen: list[BaseException | None] = []
    client = client_for(Down(), observer=lambda _n, _d, error: seen.append(error))
    with pytest.raises(HostUnreachable):
        client.capacity()
    assert isinstance(seen[0], HostUnreachable)


def test_several_sacct_records_under_one_id_are_all_reported_newest_first() -> None:
    """Ids restart when a controller loses its state: sacct then holds two jobs under id 7."""
    old = sacct_line("7", "COMPLETED", comment="brk-old user=a", submit="2024-01-01T00:00:00")
    new = sacct_line("7", "FAILED", comment="brk-new user=b", submit="2024-06-01T00:00:00")
    runner = ScriptedRunner({"squeue": (0, "", ""), "sacct": (0, old + new, "")})
    report = client_for(runner).statuses(["7"])
    assert report.found["7"].tag == "brk-new"
    assert [s.tag for s in report.earlier["7"]] == ["brk-old"]
    assert [s.tag for s in report.candidates("7")] == ["brk-new", "brk-old"]
    assert report.found["7"].ended and report.earlier["7"][0].ended


def test_an_answer_naming_another_cluster_is_a_failed_submit_and_that_job_is_cancelled() -> None:
    """``sbatch --parsable`` printing ``id;other``: the job went where no quota admitted it."""
    runner = ScriptedRunner({"sbatch": (0, "77;beta\n", ""), "scancel": (0, "", "")})
    with pytest.raises(SubmitMisrouted) as caught:
        client_for(runner).submit(SPEC)
    assert (caught.value.job_id, caught.value.cluster) == ("77", "beta")
    assert not caught.value.transient and not caught.value.may_have_run
    assert caught.value.reason is not None and "beta" in caught.value.reason
    assert runner.calls[1][0] == ["/usr/bin/scancel", "--clusters=beta", "77"]


def test_a_job_is_submitted_as_its_researcher_and_a_refused_identity_is_no_slurm_error() -> None:
    runner = ScriptedRunner({"sudo": (0, "4242\n", "")})
    spec = dataclasses.replace(SPEC, run_as="alice", workdir="/home/alice/.broker/jobs")
    assert client_for(runner).submit(spec) == "4242"
    argv, stdin = runner.calls[0]
    assert argv[:5] == ["/usr/bin/sudo", "-n", "-u", "alice", "--"]
    assert argv[5] == "/usr/bin/sbatch" and "--chdir=/home/alice/.broker/jobs" in argv
    assert stdin == SPEC.script.encode()
    refused = ScriptedRunner({"sudo": (1, "", "sudo: a password is required\n")})
    with pytest.raises(RunAsRefused) as caught:
        client_for(refused).submit(spec)
    assert caught.value.user == "alice" and not caught.value.may_have_run
    with pytest.raises(ValueError, match="root"):
        client_for(runner).submit(dataclasses.replace(SPEC, run_as="root"))


def test_an_array_id_reused_after_a_state_wipe_gives_only_the_newest_arrays_tasks() -> None:
    old, new = "2026-11-26T17:33:32", "2026-11-26T19:00:52"
    sacct = (
        sacct_line("20", "COMPLETED", "brk-old", old).replace("\x1f20\x1f", "\x1f17_2\x1f", 1)
        + sacct_line("21", "COMPLETED", "brk-old", old).replace("\x1f21\x1f", "\x1f17_3\x1f", 1)
        + sacct_line("18", "CANCELLED", "brk-new", new).replace("\x1f18\x1f", "\x1f17_0\x1f", 1)
        + sacct_line("19", "CANCELLED", "brk-new", new).replace("\x1f19\x1f", "\x1f17_1\x1f", 1)
        + sacct_line("17", "CANCELLED", "", new).replace("\x1f17\x1f", "\x1f17_[2-3%2]\x1f", 1)
    )
    runner = ScriptedRunner({"squeue": (0, "", ""), "sacct": (0, sacct, "")})
    tasks = client_for(runner).statuses(["17"]).tasks["17"]
    assert {i: t.state for i, t in tasks.items()} == {
        0: "CANCELLED",
        1: "CANCELLED",
        2: "CANCELLED",  # never started in the new array; the old array's task 2 is not it
        3: "CANCELLED",
    }
