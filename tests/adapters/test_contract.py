"""One contract suite, run over every runner (local subprocess and SSH), against the real dev
cluster (deploy/dev-cluster/up.sh): what the broker relies on from ``SlurmClient``.

Jobs run on ``alpha`` (4 nodes x 8 h100, partition ``gpu``); outages are staged on ``beta``
(2 nodes x 4 a100) so that job tests on alpha are not disturbed. Every job a test starts is
cancelled at its end, so the next test sees an empty cluster. States are awaited by polling with
a deadline, never by fixed sleeps.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import paramiko
import pytest

from adapters.errors import (
    CommandTimedOut,
    ConnectionLost,
    HostKeyRejected,
    HostUnreachable,
    SlurmUnavailable,
)
from adapters.local import LocalRunner
from adapters.runner import CommandRunner
from adapters.slurm.client import SlurmClient
from adapters.slurm.types import JobSpec, JobStatus
from adapters.ssh import SSHRunner
from tests import devcluster

pytestmark = pytest.mark.cluster

T = TypeVar("T")
ACCOUNT = "dev"
PARENT = "broker"
NASTY = '$(touch {marker}); `touch {marker}`; it\'s "quoted" \\ a,b;c | & > <\nsecond line $HOME'


def wait_for(
    what: str, probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 60
) -> T:
    """Poll ``probe`` until ``done`` holds; fail with the last value after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last: {value!r}")
        time.sleep(0.25)


# -- runners and clients -------------------------------------------------------------------------


def make_runner(kind: str, dev: devcluster.DevCluster, workdir: Path) -> CommandRunner:
    extra_env = {"SLURM_CONF": str(dev.slurm_conf)}
    if kind == "local":
        return LocalRunner(name=dev.name, extra_env=extra_env, cwd=workdir)
    return ssh_runner(dev)


def runner_user(kind: str, dev: devcluster.DevCluster) -> str:
    return "root" if kind == "local" else dev.user


@dataclass
class Cluster:
    """A client on one cluster plus the jobs a test started there (cancelled at teardown)."""

    dev: devcluster.DevCluster
    kind: str
    runner: CommandRunner
    client: SlurmClient
    started: list[str] = field(default_factory=list)

    def submit(self, **changes: object) -> str:
        fields: dict[str, object] = {
            "script": "#!/bin/sh\nsleep 300\n",
            "account": ACCOUNT,
            "partition": self.dev.default_partition,
            "gpus": 1,
            "time_limit_minutes": 10,
            "tag": f"brk-contract-{uuid.uuid4().hex[:12]}",
            "name": "contract",
            "gpu_type": self.dev.partitions[self.dev.default_partition],
        }
        fields.update(changes)
        job_id = self.client.submit(JobSpec(**fields))  # type: ignore[arg-type]
        self.started.append(job_id)
        return job_id

    def status(self, job_id: str) -> JobStatus | None:
        return self.client.statuses([job_id]).found.get(job_id)

    def wait_state(self, job_id: str, *states: str, timeout: float = 60) -> JobStatus:
        found = wait_for(
            f"job {job_id} in {list(states)}",
            lambda: self.status(job_id),
            lambda s: s is not None and s.state in states,
            timeout,
        )
        assert found is not None
        return found


@pytest.fixture(params=["local", "ssh"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _cluster(kind: str, name: str, tmp_path: Path) -> Iterator[Cluster]:
    dev = devcluster.cluster(name)
    runner = make_runner(kind, dev, tmp_path)
    cluster = Cluster(dev, kind, runner, SlurmClient(runner, cluster=dev.name, bin_dir=dev.bin_dir))
    try:
        yield cluster
    finally:
        for job_id in cluster.started:
            try:
                cluster.client.cancel(job_id)
            except Exception as exc:  # the test's own failure matters more
                print(f"cleanup: cancel {job_id} on {name} failed: {exc}")
        runner.close()


@pytest.fixture
def alpha(kind: str, tmp_path: Path) -> Iterator[Cluster]:
    yield from _cluster(kind, "alpha", tmp_path)


@pytest.fixture
def beta(kind: str, tmp_path: Path) -> Iterator[Cluster]:
    yield from _cluster(kind, "beta", tmp_path)


# -- jobs ----------------------------------------------------------------------------------------


def test_gpu_job_runs_to_completion_and_is_accounted(alpha: Cluster) -> None:
    since = datetime.now(UTC) - timedelta(seconds=5)
    tag = f"brk-contract-{uuid.uuid4().hex[:12]}"
    job_id = alpha.submit(script="#!/bin/sh\nsleep 3\n", gpus=8, tag=tag)

    seen: list[str] = []

    def observe() -> JobStatus | None:
        status = alpha.status(job_id)
        if status is not None and (not seen or seen[-1] is not status.state):
            seen.append(status.state)
        return status

    final = wait_for(
        "completion in sacct",
        observe,
        lambda s: s is not None and s.state == "COMPLETED" and s.source == "sacct",
    )
    assert final is not None
    order = ["PENDING", "RUNNING", "COMPLETED"]
    assert seen == sorted(seen, key=order.index), seen  # never backwards
    assert "RUNNING" in seen  # polled at 4 Hz, a 3 s job is seen running
    assert final.alloc_gpus == 8
    assert final.exit_code == 0
    assert final.elapsed_s is not None
    assert 3 <= final.elapsed_s <= 10

    (record,) = alpha.client.accounting(since, job_ids=[job_id])
    assert (record.alloc_gpus, record.gpu_type, record.state) == (8, "h100", "COMPLETED")
    assert record.elapsed_s == final.elapsed_s
    assert record.account == ACCOUNT
    assert record.comment is not None
    assert record.comment.split()[0] == tag
    assert record.start_time is not None
    assert record.end_time is not None
    assert record.start_time <= record.end_time <= datetime.now(UTC) + timedelta(seconds=2)

    by_tag = alpha.client.find_by_tag(tag, since)
    assert [s.job_id for s in by_tag] == [job_id]


def test_full_cluster_holds_a_job_for_resources_and_cancel_is_idempotent(alpha: Cluster) -> None:
    filler = alpha.submit(gpus=32, nodes=4, name="filler")
    alpha.wait_state(filler, "RUNNING")
    waiting = alpha.submit(gpus=1, name="waiting")
    held = wait_for(
        "reason Resources",
        lambda: alpha.status(waiting),
        lambda s: s is not None and s.reason == "Resources",
        timeout=30,
    )
    assert held is not None
    assert held.state == "PENDING"
    caps = {c.partition: c for c in alpha.client.capacity()}
    assert caps["gpu"].gpus_allocated == 32
    assert caps["gpu"].gpus_idle == 0

    alpha.client.cancel(waiting)  # pending
    assert alpha.wait_state(waiting, "CANCELLED").state == "CANCELLED"
    alpha.client.cancel(filler)  # running
    alpha.wait_state(filler, "CANCELLED")
    alpha.client.cancel(waiting)  # already cancelled
    alpha.client.cancel("99999999")  # never existed


def test_an_array_runs_its_tasks_within_its_limit_and_each_task_is_accounted(
    alpha: Cluster,
) -> None:
    array_id = alpha.submit(
        script="#!/bin/sh\nsleep 2\n", array_size=5, array_max_parallel=2, name="sweep"
    )
    most_running = 0

    def observe() -> dict[int, JobStatus]:
        nonlocal most_running
        report = alpha.client.statuses([array_id])
        tasks = report.tasks.get(array_id, {})
        most_running = max(most_running, sum(t.state == "RUNNING" for t in tasks.values()))
        return tasks

    tasks = wait_for(
        "every task accounted as completed",
        observe,
        lambda t: (
            len(t) == 5 and all(s.state == "COMPLETED" and s.source == "sacct" for s in t.values())
        ),
        timeout=90,
    )
    assert 1 <= most_running <= 2  # --array=0-4%2: never more than two at once
    assert sorted(tasks) == [0, 1, 2, 3, 4]
    assert len({t.job_id for t in tasks.values()}) == 5  # each task has its own Slurm id
    assert all(t.array_job_id == array_id for t in tasks.values())
    for task in tasks.values():
        assert task.alloc_gpus == 1 and task.exit_code == 0
        assert task.elapsed_s is not None and 2 <= task.elapsed_s <= 8


def test_cancelling_an_array_ends_every_task(alpha: Cluster) -> None:
    array_id = alpha.submit(array_size=4, array_max_parallel=2, name="sweep")
    wait_for(
        "two tasks running",
        lambda: alpha.client.statuses([array_id]).tasks.get(array_id, {}),
        lambda t: sum(s.state == "RUNNING" for s in t.values()) == 2,
    )
    alpha.client.cancel(array_id)
    tasks = wait_for(
        "every task cancelled",
        lambda: alpha.client.statuses([array_id]).tasks.get(array_id, {}),
        lambda t: len(t) == 4 and all(s.state == "CANCELLED" for s in t.values()),
    )
    assert sorted(tasks) == [0, 1, 2, 3]


def test_cancel_of_a_finished_job_is_success(alpha: Cluster) -> None:
    job_id = alpha.submit(script="#!/bin/sh\ntrue\n")
    alpha.wait_state(job_id, "COMPLETED")
    alpha.client.cancel(job_id)
    assert alpha.wait_state(job_id, "COMPLETED").state == "COMPLETED"


def test_capacity_of_both_clusters(alpha: Cluster, beta: Cluster) -> None:
    caps_a = {(c.partition, c.gpu_type): c for c in alpha.client.capacity()}
    caps_b = {(c.partition, c.gpu_type): c for c in beta.client.capacity()}
    assert caps_a[("gpu", "h100")].gpus_total == 32
    assert caps_a[("gpu", "h100")].nodes_total == 4
    assert caps_b[("gpu", "a100")].gpus_total == 8
    for cap in [*caps_a.values(), *caps_b.values()]:
        assert cap.gpus_allocated + cap.gpus_idle + cap.gpus_unavailable == cap.gpus_total


def test_shell_metacharacters_are_refused_or_arrive_literally(alpha: Cluster) -> None:
    marker = Path(f"/tmp/brk-contract-marker-{uuid.uuid4().hex}")
    out = Path(f"/tmp/brk-contract-env-{uuid.uuid4().hex}")
    value = NASTY.format(marker=marker)
    before = alpha.client.commands_run

    for name in (f"$(touch {marker})", "a;touch x", "it's", "a\nb", 'say "x"'):
        with pytest.raises(ValueError, match="job name"):
            alpha.submit(name=name)
    assert alpha.client.commands_run == before  # refused before anything ran

    comment = f'user=o\'brien $(touch {marker}) `touch {marker}`; "q"'
    job_id = alpha.submit(
        script=f"#!/bin/sh\nprintf '%s' \"$NASTY\" > {out}\n",
        environment={"NASTY": value, "PLAIN": "ok"},
        comment=comment,
    )
    try:
        done = alpha.wait_state(job_id, "COMPLETED", "FAILED")
        assert done.state == "COMPLETED"
        wait_for(f"{out}", out.exists, bool, timeout=10)
        assert out.read_text() == value
        assert done.comment is not None
        assert done.comment.endswith(comment)
        assert not marker.exists()
    finally:
        out.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)


def test_statuses_cost_the_same_for_10_and_1000_jobs(alpha: Cluster) -> None:
    running = alpha.submit(name="alive")
    finished = alpha.submit(script="#!/bin/sh\ntrue\n", name="done")
    alpha.wait_state(running, "RUNNING")
    alpha.wait_state(finished, "COMPLETED")
    reports = {}
    for count in (10, 1000):
        unknown = [str(90_000_000 + n) for n in range(count - 2)]
        started = time.monotonic()
        report = alpha.client.statuses([running, finished, *unknown])
        print(f"statuses({count}) over {alpha.kind}: {time.monotonic() - started:.3f}s")
        assert report.found[running].state == "RUNNING"
        assert report.found[finished].state == "COMPLETED"
        assert report.missing == frozenset(unknown)
        reports[count] = report.commands
    assert reports[10] == reports[1000] == 2


def test_ping_and_ensure_account(beta: Cluster) -> None:
    """Over SSH the login user is the service account, a coordinator of the parent account
    ``broker`` and no Slurm administrator: it creates accounts below ``broker`` only."""
    beta.client.ping()
    user = runner_user(beta.kind, beta.dev)
    beta.client.ensure_account(ACCOUNT, user)  # exists: idempotent
    account = f"ct{uuid.uuid4().hex[:8]}"
    try:
        beta.client.ensure_account(account, user, parent=PARENT, coordinator=beta.dev.user)
        beta.client.ensure_account(account, user, parent=PARENT, coordinator=beta.dev.user)
        job_id = beta.submit(account=account, script="#!/bin/sh\ntrue\n")
        beta.wait_state(job_id, "COMPLETED")
    finally:
        conf = {"SLURM_CONF": str(beta.dev.slurm_conf)}
        # Associations are per cluster, accounts are global: the account itself goes last.
        for what in (["user", user, f"account={account}", "cluster=beta"], ["account", account]):
            subprocess.run(
                ["sacctmgr", "-i", "delete", *what],
                capture_output=True,
                env=conf,
                timeout=30,
                check=False,
            )


# -- outages -------------------------------------------------------------------------------------


def test_stopped_slurmctld_is_unavailable_and_no_job_is_lost(beta: Cluster) -> None:
    job_id = beta.submit(name="survivor")
    beta.wait_state(job_id, "RUNNING")
    devcluster.ctl("stop-slurmctld", "beta")
    try:
        with pytest.raises(SlurmUnavailable) as caught:
            beta.client.statuses([job_id, "99999999"])
        assert caught.value.transient
        with pytest.raises(SlurmUnavailable) as refused:
            beta.submit(name="during-outage")
        assert refused.value.transient
        assert not refused.value.may_have_run
        with pytest.raises(SlurmUnavailable):
            beta.client.ping()
    finally:
        devcluster.ctl("start-slurmctld", "beta")
    report = beta.client.statuses([job_id])
    assert report.found[job_id].state == "RUNNING"
    assert not report.missing


# -- SSH only ------------------------------------------------------------------------------------


def ssh_runner(dev: devcluster.DevCluster, **options: object) -> SSHRunner:
    fields: dict[str, object] = {
        "name": dev.name,
        "host": dev.host,
        "port": dev.port,
        "user": dev.user,
        "private_key": dev.private_key,
        "known_hosts": dev.known_hosts,
        "extra_env": {"SLURM_CONF": str(dev.slurm_conf)},
    }
    fields.update(options)
    return SSHRunner(**fields)  # type: ignore[arg-type]


def test_ssh_refuses_a_changed_host_key(tmp_path: Path) -> None:
    dev = devcluster.cluster("beta")
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    public = (tmp_path / "other.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[{dev.host}]:{dev.port} {public[0]} {public[1]}\n")
    with ssh_runner(dev, known_hosts=known) as runner, pytest.raises(HostKeyRejected) as caught:
        runner.run(["/bin/true"], timeout=10)
    assert "changed" in str(caught.value)
    assert not caught.value.transient


@pytest.mark.parametrize("content", ["empty", "other-port", "garbage"])
def test_ssh_refuses_an_unknown_host_key(tmp_path: Path, content: str) -> None:
    dev = devcluster.cluster("beta")
    ours = f"[{dev.host}]:{dev.port} "
    line = next(ln for ln in dev.known_hosts.read_text().splitlines() if ln.startswith(ours))
    known = tmp_path / "known_hosts"
    known.write_text(
        {
            "empty": "",
            "other-port": line.replace(ours, f"[{dev.host}]:1 ") + "\n",  # right key, other host
            "garbage": ours + "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB\n",  # truncated key
        }[content]
    )
    with ssh_runner(dev, known_hosts=known) as runner, pytest.raises(HostKeyRejected) as caught:
        runner.run(["/bin/true"], timeout=10)
    assert caught.value.fingerprint.startswith("SHA256:")
    assert "no key in" in str(caught.value)
    assert runner.connections_opened == 0


def test_ssh_reuses_one_connection_and_bounds_sessions() -> None:
    dev = devcluster.cluster("beta")
    peak = 0
    with ssh_runner(dev, max_sessions=3) as runner:
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, runner.sessions_in_use)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        results: list[int] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                results.append(runner.run(["/bin/sleep", "0.3"], timeout=20).exit_code)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        sampler.join()
        assert errors == []
        assert results == [0] * 12
        assert runner.connections_opened == 1
        assert 1 <= peak <= 3
        assert runner.sessions_in_use == 0


def test_ssh_command_deadline_closes_the_channel_and_keeps_the_connection() -> None:
    dev = devcluster.cluster("beta")
    with ssh_runner(dev) as runner:
        assert runner.run(["/bin/true"], timeout=10).exit_code == 0
        started = time.monotonic()
        with pytest.raises(CommandTimedOut) as caught:
            runner.run(["/bin/sleep", "30"], timeout=1.0)
        assert time.monotonic() - started < 2.0
        assert caught.value.may_have_run
        assert runner.run(["/bin/true"], timeout=10).exit_code == 0
        assert runner.connections_opened == 1


def test_ssh_stopped_sshd_is_unreachable_within_the_deadline_then_recovers() -> None:
    dev = devcluster.cluster("beta")
    with ssh_runner(dev, connect_timeout=3.0) as warm, ssh_runner(dev) as cold:
        warm.run(["/bin/true"], timeout=10)  # an open connection, about to die
        devcluster.ctl("stop-sshd", "beta")
        try:
            for runner in (warm, cold):
                started = time.monotonic()
                with pytest.raises(HostUnreachable) as caught:
                    runner.run(["/bin/true"], timeout=5)
                assert time.monotonic() - started < 5
                assert caught.value.transient
                assert not caught.value.may_have_run
        finally:
            devcluster.ctl("start-sshd", "beta")
        assert warm.run(["/bin/true"], timeout=10).exit_code == 0  # reconnected by itself
        assert warm.connections_opened == 2


def test_ssh_retries_once_when_nothing_was_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    dev = devcluster.cluster("beta")
    with ssh_runner(dev) as runner:
        runner.run(["/bin/true"], timeout=10)
        transport = runner._client.get_transport()  # type: ignore[union-attr]
        assert transport is not None

        def never_opens(*args: object, **kwargs: object) -> None:
            raise paramiko.SSHException("Timeout opening channel.")

        monkeypatch.setattr(transport, "open_session", never_opens)
        assert runner.run(["/bin/echo", "again"], timeout=10).stdout == b"again\n"
        assert runner.connections_opened == 2


def test_ssh_slow_channel_open_beside_a_live_command_keeps_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A channel that does not open in time, on a connection where another command is receiving
    its output, is a slow server and not a dead link: the open is retried on the same connection,
    and the command in flight beside it is not cut off (it may be an sbatch)."""
    dev = devcluster.cluster("beta")
    with ssh_runner(dev) as runner:
        runner.run(["/bin/true"], timeout=10)
        transport = runner._client.get_transport()  # type: ignore[union-attr]
        assert transport is not None
        real_open = transport.open_session
        counting = "for i in 1 2 3 4 5 6 7 8 9 10; do echo $i; sleep 0.2; done"
        results: list[bytes] = []
        errors: list[BaseException] = []

        def chatty() -> None:
            try:
                results.append(runner.run(["/bin/sh", "-c", counting], timeout=30).stdout)
            except BaseException as exc:
                errors.append(exc)

        before = time.monotonic()
        thread = threading.Thread(target=chatty)
        thread.start()
        wait_for("the first command's output", lambda: runner._heard_since(transport, before), bool)
        opens = 0

        def slow_then_normal(*args: object, **kwargs: object) -> paramiko.Channel:
            nonlocal opens
            opens += 1
            if opens == 1:
                time.sleep(0.8)  # the server takes longer than the open's timeout to answer
                raise paramiko.SSHException("Timeout opening channel.")
            return real_open(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(transport, "open_session", slow_then_normal)
        assert runner.run(["/bin/echo", "again"], timeout=10).stdout == b"again\n"
        thread.join()
        assert errors == []
        assert results == [b"".join(f"{i}\n".encode() for i in range(1, 11))]
        assert opens == 2
        assert runner.connections_opened == 1


def test_ssh_does_not_retry_once_the_command_was_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    dev = devcluster.cluster("beta")
    marker = Path(f"/tmp/brk-contract-sent-{uuid.uuid4().hex}")
    with ssh_runner(dev) as runner:
        runner.run(["/bin/true"], timeout=10)
        transport = runner._client.get_transport()  # type: ignore[union-attr]
        assert transport is not None
        real_open = transport.open_session

        def dies_after_exec(*args: object, **kwargs: object) -> paramiko.Channel:
            channel = real_open(*args, **kwargs)  # type: ignore[arg-type]
            real_exec = channel.exec_command

            def exec_then_die(command: str) -> None:
                real_exec(command)
                transport.close()  # the link breaks after the request went out

            monkeypatch.setattr(channel, "exec_command", exec_then_die)
            return channel

        monkeypatch.setattr(transport, "open_session", dies_after_exec)
        try:
            with pytest.raises(ConnectionLost) as caught:
                runner.run(["/bin/sh", "-c", f"sleep 0.5; touch {marker}"], timeout=10)
            assert caught.value.may_have_run
            assert caught.value.transient
            # And it did run: the command outlives the connection that sent it.
            wait_for(f"{marker} to appear", marker.exists, bool, timeout=10)
            monkeypatch.undo()
            assert runner.run(["/bin/true"], timeout=10).exit_code == 0  # a new connection
            assert runner.connections_opened == 2
        finally:
            marker.unlink(missing_ok=True)
