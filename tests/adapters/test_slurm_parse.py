"""Parsers on real output captured from the dev cluster (Slurm 22.05.8) and on odd cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from adapters.slurm.commands import SACCT_FIELDS, SQUEUE_FIELDS
from adapters.slurm.parse import (
    GpuTres,
    ParseError,
    SqueueMemo,
    decode,
    newest_first,
    node_unavailable,
    parse_array_indices,
    parse_duration,
    parse_exit_code,
    parse_gres_gpus,
    parse_sacct,
    parse_sbatch,
    parse_sinfo,
    parse_squeue,
    parse_time,
    parse_tres_gpus,
    records,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "slurm"
US = "\x1f"


def fixture(name: str) -> str:
    return decode((FIXTURES / name).read_bytes())


def squeue_line(**fields: str) -> str:
    return "".join(fields.get(name.replace("-", "_"), "") + US for name in SQUEUE_FIELDS) + "\n"


def sacct_line(**fields: str) -> str:
    return US.join(fields.get(name, "") for name in SACCT_FIELDS) + "\n"


def sinfo_line(node: str, partition: str, state: str, gres: str, used: str) -> str:
    return US.join([node, partition, state, gres, used]) + US + "\n"


# -- captured output -----------------------------------------------------------------------------


def test_squeue_capture_gives_each_job_its_state_reason_and_gpus() -> None:
    jobs = {s.job_id: s for s in parse_squeue(fixture("client-squeue.txt"))}

    assert {j: s.state for j, s in jobs.items()} == {
        "1": "COMPLETED",
        "2": "FAILED",
        "3": "RUNNING",
        "4": "CANCELLED",
        "5": "PENDING",  # the array's tasks 4-5, not started yet
        "6": "PENDING",
        "7": "PENDING",
        "8": "COMPLETED",  # array task 0
        "9": "COMPLETED",
        "10": "RUNNING",
        "11": "RUNNING",
    }
    assert jobs["3"].alloc_gpus == 8
    assert jobs["3"].elapsed_s == 10
    assert jobs["3"].start_time == datetime(2026, 11, 26, 17, 32, 1, tzinfo=UTC)
    assert jobs["6"].reason == "Resources"
    assert jobs["6"].alloc_gpus == 32  # a pending job's tres-alloc is its request
    assert jobs["6"].start_time is None  # squeue's StartTime of a pending job is a guess
    assert jobs["7"].reason == "Priority"
    assert jobs["1"].reason is None  # "None"
    assert jobs["1"].comment == "brk-capture-ok user=capture"
    assert jobs["1"].name == "ok"
    assert (jobs["1"].account, jobs["1"].user, jobs["1"].partition) == (
        "dev",
        "slurmsvc",
        "gpu",
    )
    assert all(s.source == "squeue" for s in jobs.values())


def test_squeue_capture_places_each_array_task() -> None:
    jobs = {s.job_id: s for s in parse_squeue(fixture("client-squeue.txt"))}

    tasks = {s.array_task: s.job_id for s in jobs.values() if s.array_task is not None}
    assert tasks == {0: "8", 1: "9", 2: "10", 3: "11"}
    assert {jobs[j].array_job_id for j in tasks.values()} == {"5"}
    rest = jobs["5"]  # the tasks not started yet stay in one line under the array's id
    assert (rest.array_job_id, rest.array_task, rest.array_pending) == ("5", None, (4, 5))
    assert rest.reason == "JobArrayTaskLimit"
    assert jobs["3"].array_job_id is None and jobs["3"].array_pending == ()  # no array


def test_sacct_capture_gives_exit_codes_gpus_elapsed_and_times() -> None:
    jobs = {r.job_id: r for r in parse_sacct(fixture("client-sacct.txt"))}

    ok = jobs["1"]
    assert (ok.state, ok.exit_code, ok.alloc_gpus, ok.gpu_type) == (
        "COMPLETED",
        0,
        2,
        "h100",
    )
    assert ok.elapsed_s == 2
    assert ok.end_time is not None
    assert ok.start_time is not None
    assert ok.end_time - ok.start_time == timedelta(seconds=2)
    assert ok.comment == "brk-capture-ok user=capture"
    assert (ok.account, ok.partition, ok.name, ok.user) == ("dev", "gpu", "ok", "slurmsvc")
    assert jobs["2"].state == "FAILED"
    assert jobs["2"].exit_code == 3
    assert jobs["3"].state == "RUNNING"
    assert jobs["3"].end_time is None  # "Unknown"
    assert jobs["3"].comment is None  # 22.05 stores the comment when the job ends
    cancelled = jobs["4"]
    assert cancelled.state == "CANCELLED"  # from "CANCELLED by 999"
    assert cancelled.alloc_gpus == 1 and cancelled.elapsed_s == 2  # it had started
    assert jobs["6"].start_time is None
    assert jobs["6"].state == "PENDING"


def test_sacct_capture_gives_each_array_task_its_own_record() -> None:
    records = parse_sacct(fixture("client-sacct.txt"))
    tasks = {r.array_task: r for r in records if r.array_job_id == "5" and r.array_task is not None}

    assert sorted(tasks) == [0, 1, 2, 3]
    assert [tasks[i].job_id for i in range(4)] == ["8", "9", "10", "11"]  # each task's own id
    assert (tasks[0].state, tasks[0].elapsed_s, tasks[0].alloc_gpus) == ("COMPLETED", 5, 1)
    assert tasks[2].state == "RUNNING" and tasks[2].end_time is None
    (rest,) = [r for r in records if r.array_pending]
    assert (rest.job_id, rest.array_job_id, rest.array_pending) == ("5", "5", (4, 5))
    assert all(r.array_job_id is None for r in records if r.name != "sweep")


def test_sinfo_capture_sums_gpus_per_partition() -> None:
    capacity = {(c.partition, c.gpu_type): c for c in parse_sinfo(fixture("client-sinfo.txt"))}

    assert set(capacity) == {("gpu", "h100"), ("debug", "h100")}
    gpu = capacity[("gpu", "h100")]
    # 8 for "runs", 1 each for the two array tasks running
    assert (gpu.gpus_total, gpu.gpus_allocated, gpu.gpus_idle, gpu.gpus_unavailable) == (
        32,
        10,
        22,
        0,
    )
    assert (gpu.nodes_total, gpu.nodes_down) == (4, 0)


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("client-sinfo*.txt")))
def test_every_captured_sinfo_adds_up(name: str) -> None:
    for row in parse_sinfo(fixture(name)):
        assert row.gpus_allocated + row.gpus_idle + row.gpus_unavailable == row.gpus_total


# -- odd cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "indices"),
    [
        ("4-5%2", (4, 5)),
        ("[4-5%2]", (4, 5)),
        ("7", (7,)),
        ("0,3,7-9", (0, 3, 7, 8, 9)),
        ("0-10:5", (0, 5, 10)),
    ],
)
def test_array_index_expressions(expression: str, indices: tuple[int, ...]) -> None:
    assert parse_array_indices(expression) == indices


@pytest.mark.parametrize("expression", ["", "a-b", "3-", "-3"])
def test_bad_array_index_expressions_are_parse_errors(expression: str) -> None:
    with pytest.raises(ParseError):
        parse_array_indices(expression)


def test_empty_output_gives_no_records() -> None:
    assert parse_squeue("") == []
    assert parse_sacct("") == []
    assert parse_sinfo("") == []
    assert parse_sacct("\n") == []


def test_array_task_ids_and_cancelled_by_a_user() -> None:
    text = sacct_line(
        JobIDRaw="130",
        JobID="123_4",
        State="CANCELLED by 1234",
        ExitCode="0:15",
        AllocTRES="billing=8,cpu=8,gres/gpu:a100=2,gres/gpu=2,mem=64G,node=1",
        ElapsedRaw="61",
        Submit="2024-05-01T10:00:00",
        Start="2024-05-01T10:00:05",
        End="2024-05-01T10:01:06",
        JobName="train",
        Comment="(null)",
    )
    (record,) = parse_sacct(text)
    assert record.job_id == "130"
    assert record.state == "CANCELLED"
    assert record.state == "CANCELLED"
    assert record.exit_code == 128 + 15
    assert (record.alloc_gpus, record.gpu_type) == (2, "a100")
    assert record.comment is None
    assert record.reason is None


def test_a_job_cancelled_while_pending_has_no_start_whatever_sacct_prints() -> None:
    # As slurmdbd shows such a job a moment after the cancel (captured on the dev cluster):
    # Start equals End, ElapsedRaw 0, and no AllocTRES, because it never had an allocation.
    never_ran = sacct_line(
        JobIDRaw="18",
        JobID="18",
        State="CANCELLED by 0",
        ExitCode="0:0",
        AllocTRES="",
        ElapsedRaw="0",
        Submit="2026-11-27T06:58:42",
        Start="2026-11-27T06:58:45",
        End="2026-11-27T06:58:45",
    )
    # Cancelled in the second it started: the same Start and End, but an allocation.
    ran = never_ran.replace("18", "19").replace(
        US + US + "0" + US, US + "cpu=1,gres/gpu=4,node=1" + US + "0" + US
    )
    first, second = parse_sacct(never_ran + ran)
    assert (first.job_id, first.start_time, first.alloc_gpus) == ("18", None, 0)
    assert first.end_time is not None
    assert second.job_id == "19" and second.alloc_gpus == 4
    assert second.start_time is not None and second.start_time == second.end_time


def test_squeue_array_task_id_is_kept_as_printed() -> None:
    text = squeue_line(JobID="123_4", State="RUNNING", tres_alloc="gres/gpu=1", TimeUsed="1:00")
    (status,) = parse_squeue(text)
    assert status.job_id == "123_4"
    assert status.alloc_gpus == 1
    assert status.elapsed_s == 60


def test_non_utf8_names_do_not_break_parsing() -> None:
    raw = (
        b"7" + US.encode() + b"RUNNING" + US.encode() + b"None" + US.encode() * 7
        + b"r\xe9sum\xe9" + US.encode() + b"brk-1" + US.encode() + b"alice" + US.encode()
        + b"7" + US.encode() + b"N/A" + US.encode() + b"\n"
    )  # fmt: skip
    (status,) = parse_squeue(decode(raw))
    assert status.name == "r\ufffdsum\ufffd"
    assert status.comment == "brk-1"


def test_a_memo_gives_the_answers_of_a_fresh_parse_and_reparses_only_changed_lines() -> None:
    capture = fixture("client-squeue.txt")
    memo = SqueueMemo()
    assert parse_squeue(capture, memo=memo) == parse_squeue(capture)
    first = {s.job_id: s for s in parse_squeue(capture, memo=memo)}

    waiting = squeue_line(JobID="50", State="PENDING", Reason="Resources", Comment="brk-50")
    running = squeue_line(JobID="51", State="RUNNING", TimeUsed="0:05", tres_alloc="gres/gpu=2")
    named = squeue_line(JobID="52", State="PENDING", Name="two\nlines", Comment="brk-52")
    parse_squeue(capture + waiting + running + named, memo=memo)
    again = parse_squeue(capture + waiting + running.replace("0:05", "0:06") + named, memo=memo)
    jobs = {s.job_id: s for s in again}

    assert jobs["1"] is first["1"]  # an unchanged line: the earlier answer, not a new parse
    assert jobs["50"].reason == "Resources"
    assert jobs["51"].elapsed_s == 6  # the changed line was parsed again
    assert jobs["52"].name == "two\nlines"  # a record over two lines is parsed every time
    assert again == parse_squeue(capture + waiting + running.replace("0:05", "0:06") + named)
    # Only the last output's lines are remembered: ended jobs do not pile up.
    parse_squeue(waiting, memo=memo)
    assert list(memo.statuses) == [waiting.rstrip("\n")]


def test_a_memo_line_does_not_end_a_record_that_spans_lines() -> None:
    """A line that matches a remembered one is still read as the continuation of an open
    record, as without the memo."""
    memo = SqueueMemo()
    tail = squeue_line(JobID="61", State="PENDING")
    parse_squeue(tail, memo=memo)
    text = "60\n" + tail  # a first field with a newline in it, then job 61's line word for word

    (status,) = parse_squeue(text, memo=memo)

    assert status == parse_squeue(text)[0]
    assert status.job_id == "60\n61"


def test_a_newline_inside_a_name_joins_the_next_line() -> None:
    text = sacct_line(JobIDRaw="9", JobID="9", State="COMPLETED", JobName="two\nlines")
    text += sacct_line(JobIDRaw="10", JobID="10", State="FAILED", ExitCode="2:0")
    records_ = {r.job_id: r for r in parse_sacct(text)}
    assert records_["9"].name == "two\nlines"
    assert records_["10"].exit_code == 2


def test_too_many_fields_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        list(records("a" + US + "b" + US + "c" + US + "\n", ("x", "y"), trailing=True))


def test_truncated_output_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        parse_sacct("5" + US + "5" + US + "RUNNING")


def test_reused_job_id_keeps_every_record_newest_first_on_request() -> None:
    old = sacct_line(
        JobIDRaw="3", JobID="3", State="COMPLETED", Submit="2024-01-01T00:00:00", Comment="brk-a"
    )
    new = sacct_line(
        JobIDRaw="3", JobID="3", State="RUNNING", Submit="2024-06-01T00:00:00", Comment="brk-b x"
    )
    records = parse_sacct(old + new)
    assert [r.comment for r in records] == ["brk-a", "brk-b x"]  # both jobs, as sacct printed
    assert [r.state for r in newest_first(records)] == ["RUNNING", "COMPLETED"]


def test_completed_with_end_unknown_after_a_slurmdbd_restart() -> None:
    """sacct can show a finished job COMPLETED with End=Unknown and an ElapsedRaw that keeps
    counting until slurmctld resends the end: the end time must come out as None."""
    line = sacct_line(
        JobIDRaw="41",
        JobID="41",
        JobName="train",
        State="COMPLETED",
        ExitCode="0:0",
        AllocTRES="billing=8,cpu=8,gres/gpu:h100=8,gres/gpu=8,node=1",
        ElapsedRaw="86400",
        Submit="2026-11-21T18:00:00",
        Start="2026-11-21T18:00:01",
        End="Unknown",
    )
    (record,) = parse_sacct(line)
    assert (record.state, record.ended, record.end_time) == ("COMPLETED", True, None)
    assert record.start_time is not None and record.elapsed_s == 86400
    assert record.comment is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu:h100:8", {"h100": 8}),
        ("gpu:h100:8(S:0-1)", {"h100": 8}),
        ("gpu:a100:2(IDX:0,3)", {"a100": 2}),
        ("gpu:a100:2(IDX:0,3),gpu:h100:0(IDX:N/A)", {"a100": 2, "h100": 0}),
        ("gpu:4", {"": 4}),
        ("gpu:h100:4,shard:h100:16", {"h100": 4}),
        ("(null)", {}),
        ("", {}),
        ("N/A", {}),
    ],
)
def test_gres_strings(text: str, expected: dict[str, int]) -> None:
    assert parse_gres_gpus(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("billing=64,cpu=64,gres/gpu:h100=8,gres/gpu=8,mem=250G,node=1", GpuTres(8, "h100")),
        ("cpu=4,mem=8G,node=1,billing=4,gres/gpu=2,gres/gpu:h100=2", GpuTres(2, "h100")),
        ("cpu=4,gres/gpu=3", GpuTres(3, None)),
        ("cpu=4,mem=8G", GpuTres(0, None)),
        (None, GpuTres(0, None)),
        ("gres/gpu:a100=2,gres/gpu:h100=6", GpuTres(8, "h100")),
    ],
)
def test_tres_gpus(text: str | None, expected: GpuTres) -> None:
    assert parse_tres_gpus(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0:0", 0), ("3:0", 3), ("0:9", 137), ("", None), ("N/A", None)],
)
def test_exit_codes(text: str, expected: int | None) -> None:
    assert parse_exit_code(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0:00", 0), ("1:05", 65), ("2:03:04", 7384), ("1-00:00:01", 86401), ("INVALID", None)],
)
def test_durations(text: str, expected: int | None) -> None:
    assert parse_duration(text) == expected


def test_times_are_read_in_the_cluster_zone_and_returned_in_utc() -> None:
    cet = timezone(timedelta(hours=1))
    assert parse_time("2024-05-01T13:45:00", cet) == datetime(2024, 5, 1, 12, 45, tzinfo=UTC)
    assert parse_time("2024-05-01T13:45:00") == datetime(2024, 5, 1, 13, 45, tzinfo=UTC)
    for placeholder in ("Unknown", "None", "N/A", "(null)", ""):
        assert parse_time(placeholder) is None
    with pytest.raises(ParseError):
        parse_time("yesterday")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1234\n", ("1234", None)), ("1234;alpha\n", ("1234", "alpha"))],
)
def test_sbatch_parsable(text: str, expected: tuple[str, str | None]) -> None:
    assert parse_sbatch(text) == expected


@pytest.mark.parametrize("text", ["", "\n", "Submitted batch job 12\n"])
def test_sbatch_without_a_job_id_is_a_parse_error(text: str) -> None:
    with pytest.raises(ParseError):
        parse_sbatch(text)


@pytest.mark.parametrize(
    ("state", "unavailable"),
    [
        ("idle", False),
        ("mixed", False),
        ("allocated", False),
        ("idle~", False),  # powered down, started on demand
        ("completing", False),
        ("planned", False),
        ("down", True),
        ("down*", True),
        ("idle*", True),  # not responding
        ("drained", True),
        ("draining", True),
        ("idle+drain", True),
        ("fail", True),
        ("failing", True),
        ("inval", True),
        ("maint", True),
        ("unknown", True),
    ],
)
def test_node_states(state: str, unavailable: bool) -> None:
    assert node_unavailable(state) is unavailable


def test_sinfo_counts_down_and_draining_nodes_as_unavailable() -> None:
    text = (
        sinfo_line("b1", "gpu*", "mixed", "gpu:a100:4", "gpu:a100:2(IDX:0,3)")
        + sinfo_line("b2", "gpu*", "draining", "gpu:a100:4", "gpu:a100:1(IDX:2)")
        + sinfo_line("b3", "gpu*", "down*", "gpu:a100:4", "gpu:a100:0(IDX:N/A)")
        + sinfo_line("c1", "cpu", "idle", "(null)", "gpu:0")
    )
    (row,) = parse_sinfo(text)
    assert (row.partition, row.gpu_type) == ("gpu", "a100")
    assert (row.gpus_total, row.gpus_allocated, row.gpus_idle, row.gpus_unavailable) == (
        12,
        3,
        2,
        7,
    )
    assert (row.nodes_total, row.nodes_down) == (3, 2)


# -- captures with other field orders ('|' where it is safe), rewritten to the client's ----------


def shared(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def reorder(raw: bytes, given: list[str], separator: bytes, *, trailing: bool) -> str:
    """Rewrite a capture made with other fields into the client's format; lines that split into
    the wrong number of fields (a '|' inside a comment) are dropped."""
    target = SQUEUE_FIELDS if trailing else SACCT_FIELDS
    aliases = {"StateCompact": "State"}
    lines = []
    for line in raw.split(b"\n"):
        parts = line.split(separator)
        if trailing:
            parts = parts[:-1]
        if len(parts) != len(given):
            continue
        row = {aliases.get(k, k): decode(v) for k, v in zip(given, parts, strict=True)}
        row.setdefault("JobIDRaw", row["JobID"])
        cells = [row.get(field, "") for field in target]
        lines.append("".join(c + US for c in cells) if trailing else US.join(cells))
    return "\n".join(lines) + "\n"


def test_shared_sacct_capture() -> None:
    given = "JobID JobName Account Partition State ExitCode AllocTRES ElapsedRaw Submit Start End"
    text = reorder(shared("sacct.txt"), [*given.split(), "Comment"], US.encode(), trailing=False)
    jobs = {r.job_id: r for r in parse_sacct(text)}
    assert jobs["19"].state == "TIMEOUT"
    assert jobs["19"].elapsed_s == 86
    assert jobs["21"].state == "FAILED"
    assert jobs["21"].exit_code == 3
    assert jobs["22"].state == "CANCELLED"  # "CANCELLED by 999"
    assert (
        jobs["22"].comment
        == "broker:job=6f1c2a8e-1234-4cde-9abc-0123456789ab user=alice@example.org"
    )
    assert {"26_0", "26_1", "26_2"} <= jobs.keys()
    assert jobs["35"].start_time is None  # "None": never started
    assert jobs["35"].alloc_gpus == 0
    assert jobs["24"].alloc_gpus == 2  # -N 2 --gpus-per-node=h100:1


def test_shared_squeue_capture_with_compact_states_and_raw_bytes() -> None:
    given = ["JobID", "StateCompact", "Reason", "Name", "Comment", "tres-alloc", "SubmitTime"]
    given.append("StartTime")
    text = reorder(shared("squeue-after-timeout.txt"), given, b"|", trailing=True)
    jobs = {s.job_id: s for s in parse_squeue(text)}
    assert jobs["19"].state == "TIMEOUT"
    assert jobs["19"].reason == "TimeLimit"
    assert jobs["31"].reason == "JobHeldUser"
    assert jobs["31"].state == "PENDING"
    assert jobs["29"].reason == "JobArrayTaskLimit"
    assert jobs["35"].alloc_gpus == 32
    assert jobs["30"].name == "caf\ufffd-\ufffd-name"
    assert "3" not in jobs  # its comment holds a '|': why the client uses 0x1f instead


@pytest.mark.parametrize("name", ["sinfo.txt", "sinfo-drained.txt", "sinfo-beta.txt"])
def test_shared_sinfo_captures(name: str) -> None:
    text = decode(shared(name)).replace("|", US)
    rows = {(r.partition, r.gpu_type): r for r in parse_sinfo(text)}
    for row in rows.values():
        assert row.gpus_allocated + row.gpus_idle + row.gpus_unavailable == row.gpus_total
    if name == "sinfo-beta.txt":
        assert rows[("gpu", "a100")].gpus_total == 8
        assert rows[("gpu", "a100")].gpus_allocated == 3
        return
    gpu = rows[("gpu", "h100")]
    assert gpu.gpus_total == 32
    if name == "sinfo-drained.txt":  # a4 draining with 8 GPUs in use: allocated, not idle
        assert (gpu.nodes_down, gpu.gpus_allocated, gpu.gpus_idle) == (1, 24, 8)
    else:  # a3 "planned" (held for a pending job) is still available
        assert (gpu.nodes_down, gpu.gpus_idle) == (0, 8)


SQUEUE_SHARED = ["JobID", "StateCompact", "Reason", "Name", "Comment", "tres-alloc", "SubmitTime"]
SQUEUE_SHARED.append("StartTime")


def test_shared_squeue_capture_while_jobs_run() -> None:
    text = reorder(shared("squeue.txt"), SQUEUE_SHARED, b"|", trailing=True)
    jobs = {s.job_id: s for s in parse_squeue(text)}
    assert jobs["19"].state == "RUNNING"
    assert jobs["35"].state == "PENDING" and jobs["35"].reason == "Resources"
    assert jobs["31"].reason == "JobHeldUser"
    assert jobs["20"].state == "COMPLETED"
    assert jobs["34"].state == "CANCELLED"
    assert jobs["21"].state == "FAILED" and jobs["21"].reason == "NonZeroExitCode"
    assert jobs["22"].alloc_gpus == 2


def test_shared_squeue_capture_after_cancel_holds_only_final_states() -> None:
    text = reorder(shared("squeue-after-cancel.txt"), SQUEUE_SHARED, b"|", trailing=True)
    jobs = {s.job_id: s for s in parse_squeue(text)}
    assert len(jobs) > 30
    assert all(s.ended for s in jobs.values())
    assert jobs["19"].state == "TIMEOUT"
    assert jobs["37"].state == "COMPLETED"


def test_shared_sacct_capture_while_jobs_run() -> None:
    given = "JobID JobName Account Partition State ExitCode AllocTRES ElapsedRaw Submit Start End"
    raw = shared("sacct-running.txt")
    text = reorder(raw, [*given.split(), "Comment"], US.encode(), trailing=False)
    jobs = {r.job_id: r for r in parse_sacct(text)}
    running = jobs["19"]
    assert running.state == "RUNNING"
    assert running.end_time is None  # "Unknown" while it runs
    assert running.start_time is not None
    assert running.alloc_gpus == 1
    assert jobs["7"].state == "CANCELLED"  # "CANCELLED by 0"
    assert jobs["20"].comment == "broker:case=completed"


def test_shared_sbatch_capture() -> None:
    assert parse_sbatch(decode(shared("sbatch.txt"))) == ("37", None)
