"""The runners without a cluster: environment control, quoting at the SSH boundary, deadlines,
and the translation of paramiko and socket errors."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from adapters.environment import CLEARED_VARIABLES, env_command_prefix
from adapters.errors import (
    AdapterError,
    AuthenticationFailed,
    CommandTimedOut,
    ConnectionLost,
    HostKeyRejected,
    HostUnreachable,
)
from adapters.local import LocalRunner
from adapters.ssh import (
    RejectUnknownHostKey,
    SSHRunner,
    Stage,
    _Alarm,
    load_known_hosts,
    map_ssh_errors,
    remote_command,
)

WORDS = ["$(touch /tmp/x)", "a;b", "it's", 'say "hi"', "two\nlines", "", " spaced ", "\x1f", "*"]


def env_lines(output: bytes) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in output.decode().splitlines() if "=" in line)
    return dict(pairs)


# -- LocalRunner ---------------------------------------------------------------------------------


def test_local_environment_is_cleaned_pinned_and_extended(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQUEUE_FORMAT", "%i")
    monkeypatch.setenv("SLURM_TIME_FORMAT", "relative")
    monkeypatch.setenv("SBATCH_EXCLUSIVE", "1")
    monkeypatch.setenv("DATABASE_URL", "postgresql://secret")
    runner = LocalRunner(extra_env={"SLURM_CONF": "/etc/a.conf"})
    result = runner.run(["/usr/bin/env"], env={"EXTRA": "x y"})
    env = env_lines(result.stdout)
    assert env["SLURM_TIME_FORMAT"] == "standard"
    assert env["SLURM_CONF"] == "/etc/a.conf"
    assert env["EXTRA"] == "x y"
    assert "PATH" in env
    for name in ("SQUEUE_FORMAT", "SBATCH_EXCLUSIVE", "DATABASE_URL"):
        assert name not in env


def test_local_passes_argv_and_stdin_untouched() -> None:
    result = LocalRunner().run(["/usr/bin/printf", "%s\\0", *WORDS])
    assert result.stdout.decode().split("\0")[:-1] == WORDS
    echoed = LocalRunner().run(["/bin/cat"], stdin=b"#!/bin/sh\nsleep 1\n")
    assert echoed.stdout == b"#!/bin/sh\nsleep 1\n"


def test_local_reports_exit_codes_and_missing_programs() -> None:
    assert LocalRunner().run(["/bin/sh", "-c", "echo oops >&2; exit 3"]).exit_code == 3
    missing = LocalRunner().run(["/nonexistent/sbatch"])
    assert missing.exit_code == 127
    assert b"No such file" in missing.stderr


def test_local_deadline_kills_the_whole_process_group() -> None:
    started = time.monotonic()
    with pytest.raises(CommandTimedOut) as caught:
        LocalRunner().run(["/bin/sh", "-c", "sleep 30 & sleep 30; wait"], timeout=0.5)
    assert time.monotonic() - started < 3
    assert caught.value.transient
    assert caught.value.may_have_run


# -- the SSH boundary ----------------------------------------------------------------------------


def test_remote_command_is_split_back_into_the_same_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """What sshd does with the string: hand it to the login shell (``sh -c``)."""
    command = remote_command(["/usr/bin/printf", "%s\\0", *WORDS], {"SLURM_CONF": "/c"})
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, check=True)
    assert done.stdout.decode().split("\0")[:-1] == WORDS


def test_remote_command_pins_the_environment() -> None:
    command = remote_command(["/usr/bin/env"], {"SLURM_CONF": "/c"}, {"K": "v'1"})
    polluted = {**os.environ, "SQUEUE_FORMAT": "%i", "SACCT_FORMAT": "x", "SLURM_TIME_FORMAT": "r"}
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, env=polluted, check=True)
    env = env_lines(done.stdout)
    assert env["SLURM_TIME_FORMAT"] == "standard"
    assert env["SLURM_CONF"] == "/c"
    assert env["K"] == "v'1"
    assert not set(CLEARED_VARIABLES) & env.keys()


@pytest.mark.parametrize(
    ("extra", "call", "binary"),
    [(None, None, "/usr/bin/env"), ({"SLURM_CONF": "/c d"}, {"K": "v'1"}, "/opt/bin/env")],
)
def test_remote_command_is_the_quoted_prefix_and_argv(
    extra: dict[str, str] | None, call: dict[str, str] | None, binary: str
) -> None:
    """The part quoted once per process gives the very string quoting every word would."""
    argv = ["/usr/bin/sbatch", "--comment=a b", *WORDS]
    for _ in range(2):  # the second call uses what the first cached
        assert remote_command(argv, extra, call, env_binary=binary) == shlex.join(
            [*env_command_prefix(extra, call, env_binary=binary), *argv]
        )


@pytest.mark.parametrize(
    ("argv", "env"),
    [([], None), (["-i", "sh"], None), (["A=B"], None), (["/bin/true"], {"BAD NAME": "x"})],
)
def test_remote_command_refuses_what_env_would_misread(
    argv: list[str], env: dict[str, str] | None
) -> None:
    with pytest.raises(ValueError):
        remote_command(argv, None, env)


# -- error translation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_key(tmp_path_factory: pytest.TempPathFactory) -> paramiko.PKey:
    path = tmp_path_factory.mktemp("keys") / "host"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30
    )
    return paramiko.PKey.from_path(path)


@pytest.fixture(scope="module")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "client"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30
    )
    return path


def test_errors_map_by_stage(host_key: paramiko.PKey) -> None:
    cases: list[tuple[BaseException, Stage, type[AdapterError], bool]] = [
        (ConnectionRefusedError(111, "Connection refused"), "connect", HostUnreachable, False),
        (socket.gaierror(-2, "Name or service not known"), "connect", HostUnreachable, False),
        (TimeoutError("timed out"), "connect", HostUnreachable, False),
        (paramiko.SSHException("Error reading SSH banner"), "connect", HostUnreachable, False),
        (EOFError(), "connect", HostUnreachable, False),
        (paramiko.AuthenticationException("denied"), "connect", AuthenticationFailed, False),
        (paramiko.BadHostKeyException("h", host_key, host_key), "connect", HostKeyRejected, False),
        (paramiko.ChannelException(2, "Connect failed"), "open", ConnectionLost, False),
        (paramiko.SSHException("Timeout opening channel."), "open", ConnectionLost, False),
        (paramiko.SSHException("Channel closed."), "exec", ConnectionLost, True),
        (ConnectionResetError(104, "reset"), "exec", ConnectionLost, True),
    ]  # fmt: skip
    for original, stage, expected, may_have_run in cases:
        with pytest.raises(expected) as caught, map_ssh_errors("h:22", user="svc", stage=stage):
            raise original
        assert caught.value.may_have_run is may_have_run, (original, stage)
        assert caught.value.__cause__ is original


def test_adapter_errors_pass_through_unchanged() -> None:
    error = HostKeyRejected("h", "ssh-ed25519", "SHA256:x", "unknown")
    with pytest.raises(HostKeyRejected) as caught, map_ssh_errors("h", user="u", stage="connect"):
        raise error
    assert caught.value is error


def test_unknown_host_key_policy_refuses(host_key: paramiko.PKey) -> None:
    policy = RejectUnknownHostKey("127.0.0.1:2221", Path("/etc/known"))
    with pytest.raises(HostKeyRejected) as caught:
        policy.missing_host_key(paramiko.SSHClient(), "[127.0.0.1]:2221", host_key)
    assert caught.value.fingerprint == host_key.fingerprint
    assert caught.value.key_type == "ssh-ed25519"
    assert not caught.value.transient


# -- deadlines against sockets that misbehave ----------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never says a word (a hung sshd)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_connect_to_a_hung_server_ends_at_the_deadline(
    silent_server: int, client_key: Path, tmp_path: Path
) -> None:
    runner = SSHRunner(
        host="127.0.0.1",
        port=silent_server,
        user="svc",
        private_key=client_key,
        known_hosts=tmp_path / "known_hosts",
        connect_timeout=0.7,
    )
    started = time.monotonic()
    with pytest.raises(HostUnreachable) as caught:
        runner.run(["/bin/true"], timeout=5)
    assert time.monotonic() - started < 2.5
    assert caught.value.transient
    assert not caught.value.may_have_run
    assert runner.connections_opened == 0
    assert runner.sessions_in_use == 0


def test_connect_to_a_closed_port_is_unreachable(client_key: Path, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again when the block ends
    runner = SSHRunner(
        host="127.0.0.1",
        port=port,
        user="svc",
        private_key=client_key,
        known_hosts=tmp_path / "known_hosts",
    )
    with pytest.raises(HostUnreachable, match="refused"):
        runner.run(["/bin/true"], timeout=5)


def test_known_hosts_skips_bad_lines_and_reads_hashed_names(
    host_key: paramiko.PKey, tmp_path: Path
) -> None:
    hashed = paramiko.HostKeys.hash_host("[10.0.0.1]:2221")
    known = tmp_path / "known_hosts"
    known.write_text(
        "# comment\n"
        "\n"
        "[10.0.0.2]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB\n"  # truncated: skipped
        "@revoked * ssh-ed25519 AAAA\n"  # markers unsupported: skipped
        f"{hashed} {host_key.get_name()} {host_key.get_base64()}\n"
        f"plain,[10.0.0.3]:2200 {host_key.get_name()} {host_key.get_base64()}\n"
    )
    keys = paramiko.HostKeys()
    assert load_known_hosts(known, keys) == 3
    for name in ("[10.0.0.1]:2221", "plain", "[10.0.0.3]:2200"):
        found = keys.lookup(name)
        assert found is not None
        assert found[host_key.get_name()] == host_key
    assert keys.lookup("[10.0.0.2]:22") is None
    assert load_known_hosts(tmp_path / "missing", keys) == 0


def test_threads_waiting_for_a_failing_connect_share_its_answer(
    silent_server: int, client_key: Path, tmp_path: Path
) -> None:
    runner = SSHRunner(
        host="127.0.0.1",
        port=silent_server,
        user="svc",
        private_key=client_key,
        known_hosts=tmp_path / "known_hosts",
        connect_timeout=0.8,
    )
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            runner.run(["/bin/true"], timeout=10)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started < 2.5  # one connect timeout, not six in a row
    assert len(errors) == 6
    assert all(isinstance(error, HostUnreachable) for error in errors)


# -- deadlines -----------------------------------------------------------------------------------


class _Closed:
    def __init__(self) -> None:
        self.at: float | None = None

    def close(self) -> None:
        self.at = time.monotonic()


def test_deadlines_close_in_order_on_one_thread_and_cancelled_ones_never() -> None:
    """Every command's deadline shares one watchdog thread: no thread per command."""
    started = time.monotonic()
    late, early, cancelled = _Closed(), _Closed(), _Closed()
    alarms = [_Alarm(0.4, late), _Alarm(0.15, early), _Alarm(0.25, cancelled)]
    alarms[2].cancel()
    threads = threading.active_count()
    for _ in range(200):  # commands that end in time
        _Alarm(60, _Closed()).cancel()
    assert threading.active_count() == threads
    time.sleep(0.6)
    assert early.at is not None and late.at is not None
    assert 0.15 <= early.at - started < late.at - started
    assert late.at - started >= 0.4
    assert cancelled.at is None
    assert [a.fired.is_set() for a in alarms] == [True, True, False]


class _DeadChannel:
    """A channel of a connection that died mid-command: every send fails, closing too."""

    def exec_command(self, command: str) -> None:
        raise EOFError()

    def close(self) -> None:
        raise EOFError()


class _DeadTransport:
    def open_session(self, timeout: float | None = None) -> _DeadChannel:
        return _DeadChannel()


def test_a_connection_dying_mid_command_says_it_may_have_run(
    client_key: Path, tmp_path: Path
) -> None:
    """What the caller must know (the command may have run: sbatch's job may exist) is not
    hidden by paramiko failing again while the dead channel is closed."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    runner = SSHRunner(host="127.0.0.1", user="x", private_key=client_key, known_hosts=known_hosts)
    now = time.monotonic()
    with pytest.raises(ConnectionLost) as lost:
        runner._exec(
            _DeadTransport(),  # type: ignore[arg-type]
            ["sbatch"],
            "sbatch",
            b"#!/bin/sh\n",
            now + 10,
            10.0,
            now,
        )
    assert lost.value.may_have_run
