"""Run commands on a cluster's login node over SSH (paramiko), on kept-open connections.

One ``SSHRunner`` per cluster holds one authenticated SSH connection and runs each command on a
channel of its own, at most ``max_sessions`` at a time (OpenSSH's ``MaxSessions`` defaults to 10).
The connection is opened on first use, kept alive, and reopened when it is found dead.

What the runner guarantees, whatever paramiko does underneath:

* host keys are checked against the configured known_hosts file only; an unknown or changed key is
  refused with ``HostKeyRejected`` (there is no policy that adds keys);
* authentication is by the configured private key only (no agent, no ``~/.ssh`` keys, no password);
* every call ends by its deadline: connecting, waiting for a channel, sending stdin and reading the
  output are all bounded by one monotonic deadline, after which the channel is closed and
  ``CommandTimedOut`` raised (paramiko's own timeouts cover only some of these waits);
* a command is retried once on a fresh connection only if it was certainly not sent (the channel
  could not be opened); once the exec request has gone out, a broken link is ``ConnectionLost``;
* argv is joined with ``shlex.join`` exactly once, here, behind an ``env -u ... K=V`` prefix that
  pins the environment (sshd's ``AcceptEnv`` is not relied on). The service account's login shell
  must therefore be a POSIX shell (sh, bash, dash, zsh).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import os
import select
import shlex
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Protocol

import paramiko

from adapters.environment import (
    CLEARED_VARIABLES,
    check_variables,
    controlled_variables,
    env_command_prefix,
)
from adapters.errors import (
    AdapterError,
    AuthenticationFailed,
    CommandTimedOut,
    ConnectionLost,
    HostKeyRejected,
    HostUnreachable,
)
from adapters.runner import CommandResult

logger = logging.getLogger(__name__)

Stage = Literal["connect", "open", "exec"]
"""Where a failure happened: opening the connection, opening a channel (nothing sent yet), or
after the exec request was sent (the command may have run)."""

_READ_CHUNK = 65536


class RejectUnknownHostKey(paramiko.MissingHostKeyPolicy):
    """Refuse any host whose key is not in known_hosts. Keys are added by an admin, never by us."""

    def __init__(self, host: str, known_hosts: Path) -> None:
        self._host = host
        self._known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise HostKeyRejected(
            self._host,
            key.get_name(),
            key.fingerprint,
            f"{hostname} has no key in {self._known_hosts}",
        )


def load_known_hosts(path: Path, into: paramiko.HostKeys) -> int:
    """Add the keys of an OpenSSH known_hosts file (re-read at every connect, so an admin's edit
    takes effect without a restart); returns how many were read.

    Like OpenSSH, a line that does not parse is skipped with a warning instead of making the whole
    file unusable (paramiko raises on it). ``@cert-authority`` and ``@revoked`` lines are not
    supported and are skipped with a warning. A missing file is an empty one: every host is then
    unknown, and refused.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        logger.warning("known_hosts %s unreadable (%s): every host key will be refused", path, exc)
        return 0
    count = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            logger.warning("%s:%d: marker lines are not supported; line ignored", path, lineno)
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
        except Exception as exc:  # InvalidHostKey, binascii and key-format errors alike
            logger.warning("%s:%d: unreadable host key ignored: %s", path, lineno, exc)
            continue
        if entry is None or entry.key is None:
            logger.warning("%s:%d: unreadable host key line ignored", path, lineno)
            continue
        for hostname in entry.hostnames:
            into.add(hostname, entry.key.get_name(), entry.key)
            count += 1
    return count


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def map_ssh_errors(host: str, *, user: str, stage: Stage) -> Iterator[None]:
    """Translate paramiko and socket errors into the adapter hierarchy (the one place that does).

    ``stage`` decides what a broken link means: while connecting it is ``HostUnreachable``; while
    opening a channel it is ``ConnectionLost`` with ``may_have_run=False`` (safe to retry); after
    the exec request went out it is ``ConnectionLost`` that may have run.
    """
    try:
        yield
    except AdapterError:
        raise
    except paramiko.BadHostKeyException as exc:
        raise HostKeyRejected(
            host,
            exc.key.get_name(),
            exc.key.fingerprint,
            f"key changed; known_hosts has {exc.expected_key.get_name()} "
            f"{exc.expected_key.fingerprint}",
        ) from exc
    except paramiko.AuthenticationException as exc:
        raise AuthenticationFailed(host, user, _describe(exc)) from exc
    except (paramiko.SSHException, OSError, EOFError) as exc:
        # OSError covers refused, unreachable, DNS failures (gaierror), socket timeouts, resets
        # and paramiko's NoValidConnectionsError.
        if stage == "connect":
            raise HostUnreachable(host, _describe(exc)) from exc
        raise ConnectionLost(host, _describe(exc), may_have_run=stage == "exec") from exc


def remote_command(
    argv: Sequence[str],
    extra_env: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    env_binary: str = "/usr/bin/env",
) -> str:
    """The one string sent to sshd: ``env -u ... K=V argv...``, joined with ``shlex.join`` here
    and nowhere else. The remote login shell splits it back into exactly these words."""
    if not argv:
        raise ValueError("empty argv")
    if argv[0].startswith("-") or "=" in argv[0]:
        raise ValueError(f"argv[0] {argv[0]!r} would be read as an option or variable by env")
    # The same words as shlex.join(env_command_prefix(...) + argv); the long constant part (env
    # and its hundred-odd -u options) is quoted once per process.
    variables = [f"{key}={value}" for key, value in controlled_variables(extra_env, env).items()]
    return f"{_clearing(env_binary)} {shlex.join([*variables, *argv])}"


@functools.lru_cache(maxsize=8)
def _clearing(env_binary: str) -> str:
    """``env -u NAME ...`` for every cleared variable, quoted for the remote shell."""
    return shlex.join(env_command_prefix(env_binary=env_binary)[: 1 + 2 * len(CLEARED_VARIABLES)])


class _Closable(Protocol):
    def close(self) -> None: ...


class _Alarm:
    """Closes something when a deadline passes, so that any blocking paramiko call returns."""

    def __init__(self, seconds: float, target: _Closable) -> None:
        self.fired = threading.Event()
        self.cancelled = False
        self.deadline = time.monotonic() + max(seconds, 0.0)
        self._target = target
        _WATCHDOG.add(self)

    def fire(self) -> None:
        self.fired.set()
        try:
            self._target.close()
        except Exception:  # closing a half-dead socket may fail; the deadline still counts
            logger.debug("closing after the deadline failed", exc_info=True)

    def cancel(self) -> None:
        """The guarded call returned in time. (If the deadline passed meanwhile, the alarm may
        have fired already: callers look at ``fired``.)"""
        self.cancelled = True


class _Watchdog:
    """One thread for every ``_Alarm`` of the process, instead of a timer thread per command:
    it sleeps until the earliest deadline and fires the alarms not cancelled by then."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Empty, with no thread yet (also in a forked child)."""
        self._ready = threading.Condition()
        self._alarms: list[tuple[float, int, _Alarm]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, alarm: _Alarm) -> None:
        with self._ready:
            if len(self._alarms) > 1024:  # most are cancelled: commands end long before deadlines
                self._alarms = [entry for entry in self._alarms if not entry[2].cancelled]
                heapq.heapify(self._alarms)
            heapq.heappush(self._alarms, (alarm.deadline, next(self._order), alarm))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ssh-deadlines", daemon=True)
                self._thread.start()
            if self._alarms[0][2] is alarm:  # earlier than what the thread sleeps towards
                self._ready.notify()

    def _next_due(self) -> _Alarm:
        with self._ready:
            while True:
                while self._alarms and self._alarms[0][2].cancelled:
                    heapq.heappop(self._alarms)
                if not self._alarms:
                    self._ready.wait()
                    continue
                wait = self._alarms[0][0] - time.monotonic()
                if wait <= 0:
                    return heapq.heappop(self._alarms)[2]
                self._ready.wait(wait)

    def _run(self) -> None:
        while True:
            self._next_due().fire()  # outside the lock: closing may take a moment


_WATCHDOG = _Watchdog()
# A child forked from a process whose watchdog ran (uvicorn's workers) starts from an empty one:
# the parent's thread does not exist there, and its lock may have been held at the fork.
os.register_at_fork(after_in_child=_WATCHDOG.reset)


class SSHRunner:
    """A thread-safe ``CommandRunner`` over one kept-open SSH connection to a login node."""

    def __init__(
        self,
        *,
        host: str,
        user: str,
        private_key: str | Path,
        known_hosts: str | Path,
        port: int = 22,
        name: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        connect_timeout: float = 10.0,
        default_timeout: float = 60.0,
        max_sessions: int = 8,
        keepalive_interval: int = 15,
        env_binary: str = "/usr/bin/env",
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.name = name or host
        self._host = host
        self._port = port
        self._label = host if port == 22 else f"{host}:{port}"
        self._user = user
        self._pkey = paramiko.PKey.from_path(Path(private_key))
        self._known_hosts = Path(known_hosts)
        self._extra_env = dict(extra_env or {})
        check_variables(self._extra_env)
        self._connect_timeout = connect_timeout
        self._default_timeout = default_timeout
        self._keepalive_interval = keepalive_interval
        self._env_binary = env_binary
        self._sessions = threading.BoundedSemaphore(max_sessions)
        self._state_lock = threading.Lock()  # guards _client and the counters
        self._connect_lock = threading.Lock()  # one connection attempt at a time
        self._client: paramiko.SSHClient | None = None
        self._last_unreachable: tuple[float, str] = (float("-inf"), "")  # under _connect_lock
        self._connections_opened = 0
        self._sessions_in_use = 0
        # The connection the server last sent something on, and when (one tuple, replaced whole).
        self._last_heard: tuple[paramiko.Transport | None, float] = (None, float("-inf"))

    # -- metrics -------------------------------------------------------------------------------

    @property
    def connections_opened(self) -> int:
        """SSH connections opened since this runner was created (first one plus reconnects)."""
        with self._state_lock:
            return self._connections_opened

    @property
    def sessions_in_use(self) -> int:
        """Commands currently holding a session slot (running, or opening their channel)."""
        with self._state_lock:
            return self._sessions_in_use

    # -- CommandRunner ---------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        limit = self._default_timeout if timeout is None else timeout
        started = time.monotonic()
        deadline = started + limit
        command = remote_command(argv, self._extra_env, env, env_binary=self._env_binary)
        if not self._sessions.acquire(timeout=limit):
            raise CommandTimedOut(argv, limit, host=self._label, may_have_run=False)
        self._count_session(+1)
        try:
            result = self._run_with_one_retry(argv, command, stdin, deadline, limit, started)
        except AdapterError as exc:
            elapsed = time.monotonic() - started
            logger.debug("%s: %s failed after %.3fs: %s", self.name, list(argv), elapsed, exc)
            raise
        finally:
            self._count_session(-1)
            self._sessions.release()
        logger.debug(
            "%s: %s exited %d in %.3fs",
            self.name,
            list(argv),
            result.exit_code,
            result.duration_s,
        )
        return result

    def close(self) -> None:
        with self._state_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> SSHRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _count_session(self, delta: int) -> None:
        with self._state_lock:
            self._sessions_in_use += delta

    def _run_with_one_retry(
        self,
        argv: Sequence[str],
        command: str,
        stdin: bytes | None,
        deadline: float,
        limit: float,
        started: float,
    ) -> CommandResult:
        transport = self._transport(deadline)
        attempt = time.monotonic()
        try:
            return self._exec(transport, argv, command, stdin, deadline, limit, started)
        except ConnectionLost as exc:
            if exc.may_have_run:
                if not transport.is_active():
                    self._discard(transport)
                raise
            # Nothing was sent: the channel did not open. If the server answered anything on
            # this connection meanwhile (another command's output, a refusal), the link is alive
            # and only slow: closing it would cut the other commands in flight on it, so the
            # open is retried on it. If it said nothing, it is presumed dead even if paramiko
            # has not noticed yet (a half-open TCP link): it is replaced and the open retried.
            if self._heard_since(transport, attempt):
                logger.info(
                    "%s: channel could not be opened (%s) on a live connection; retrying",
                    self.name,
                    exc.reason,
                )
            else:
                logger.info(
                    "%s: channel could not be opened (%s); reconnecting", self.name, exc.reason
                )
                self._discard(transport)
        transport = self._transport(deadline)
        return self._exec(transport, argv, command, stdin, deadline, limit, started)

    def _transport(self, deadline: float) -> paramiko.Transport:
        """The live transport, connecting (once, for all waiting threads) if there is none."""
        live = self._live_transport()
        if live is not None:
            return live
        waiting_since = time.monotonic()
        remaining = deadline - waiting_since
        if remaining <= 0 or not self._connect_lock.acquire(timeout=remaining):
            raise HostUnreachable(self._label, "deadline passed while waiting for a connection")
        try:
            live = self._live_transport()  # another thread may have connected meanwhile
            if live is not None:
                return live
            failed_at, reason = self._last_unreachable
            if failed_at >= waiting_since:
                # Another thread's attempt failed while this one waited: share its answer rather
                # than queue up one more connect timeout per waiting thread.
                raise HostUnreachable(self._label, reason)
            self.close()
            try:
                client = self._connect(deadline)
            except HostUnreachable as exc:
                self._last_unreachable = (time.monotonic(), exc.reason)
                raise
            transport = client.get_transport()
            assert transport is not None
            with self._state_lock:
                self._client = client
                self._connections_opened += 1
            return transport
        finally:
            self._connect_lock.release()

    def _live_transport(self) -> paramiko.Transport | None:
        with self._state_lock:
            client = self._client
        if client is None:
            return None
        transport = client.get_transport()
        if transport is not None and transport.is_active():
            return transport
        return None

    def _heard_from(self, transport: paramiko.Transport) -> None:
        """The server sent something on ``transport``: it was alive at this moment."""
        self._last_heard = (transport, time.monotonic())

    def _heard_since(self, transport: paramiko.Transport, since: float) -> bool:
        heard_on, at = self._last_heard
        return heard_on is transport and at >= since

    def _discard(self, transport: paramiko.Transport) -> None:
        """Drop the connection if it is still the one that failed."""
        with self._state_lock:
            client = self._client
            if client is None or client.get_transport() is not transport:
                return
            self._client = None
        client.close()

    def _connect(self, deadline: float) -> paramiko.SSHClient:
        budget = min(deadline - time.monotonic(), self._connect_timeout)
        if budget <= 0:
            raise HostUnreachable(self._label, "deadline passed before connecting")
        started = time.monotonic()
        with map_ssh_errors(self._label, user=self._user, stage="connect"):
            sock = socket.create_connection((self._host, self._port), timeout=budget)
        # Without TCP_NODELAY, Nagle plus delayed ACKs add ~40 ms to every small request.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        client = paramiko.SSHClient()
        load_known_hosts(self._known_hosts, client.get_host_keys())
        client.set_missing_host_key_policy(RejectUnknownHostKey(self._label, self._known_hosts))
        remaining = budget - (time.monotonic() - started)
        alarm = _Alarm(remaining, sock)  # banner, kex and auth waits each have their own timeout
        try:
            with map_ssh_errors(self._label, user=self._user, stage="connect"):
                client.connect(
                    self._host,
                    port=self._port,
                    username=self._user,
                    pkey=self._pkey,
                    sock=sock,
                    timeout=remaining,
                    banner_timeout=remaining,
                    auth_timeout=remaining,
                    channel_timeout=remaining,
                    allow_agent=False,
                    look_for_keys=False,
                )
        except AdapterError as exc:
            client.close()
            sock.close()
            if alarm.fired.is_set() and isinstance(exc, HostUnreachable):
                raise HostUnreachable(
                    self._label, f"connection not established within {budget:.1f}s"
                ) from exc
            raise
        finally:
            alarm.cancel()
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(self._keepalive_interval)
        logger.debug(
            "%s: connected to %s as %s in %.3fs",
            self.name,
            self._label,
            self._user,
            time.monotonic() - started,
        )
        return client

    def _exec(
        self,
        transport: paramiko.Transport,
        argv: Sequence[str],
        command: str,
        stdin: bytes | None,
        deadline: float,
        limit: float,
        started: float,
    ) -> CommandResult:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CommandTimedOut(argv, limit, host=self._label, may_have_run=False)
        # A half-open link (peer gone without a FIN or RST) shows only as a channel that never
        # opens: wait for at most half the time left, so a retry on a new connection still fits.
        open_timeout = min(remaining, max(remaining / 2, 2.0))
        try:
            with map_ssh_errors(self._label, user=self._user, stage="open"):
                try:
                    channel = transport.open_session(timeout=open_timeout)
                except paramiko.ChannelException:
                    self._heard_from(transport)  # a refusal is an answer: the link is alive
                    raise
        except ConnectionLost as exc:
            if time.monotonic() >= deadline:
                raise CommandTimedOut(argv, limit, host=self._label, may_have_run=False) from exc
            raise
        self._heard_from(transport)
        alarm = _Alarm(deadline - time.monotonic(), channel)
        try:
            with map_ssh_errors(self._label, user=self._user, stage="exec"):
                channel.exec_command(command)
                if stdin:
                    channel.sendall(stdin)
                channel.shutdown_write()
                stdout, stderr = self._read_until_eof(channel, transport, deadline)
                exit_code = self._exit_status(channel, transport, deadline)
        except ConnectionLost as exc:
            if alarm.fired.is_set() or time.monotonic() >= deadline:
                raise CommandTimedOut(argv, limit, host=self._label) from exc
            raise
        finally:
            alarm.cancel()
            _close_quietly(channel)
        if alarm.fired.is_set():  # the alarm closed the channel: what we read may be partial
            raise CommandTimedOut(argv, limit, host=self._label)
        return CommandResult(
            argv=tuple(argv),
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr,
            duration_s=time.monotonic() - started,
        )

    def _read_until_eof(
        self, channel: paramiko.Channel, transport: paramiko.Transport, deadline: float
    ) -> tuple[bytes, bytes]:
        out: list[bytes] = []
        err: list[bytes] = []
        while True:
            # Checked before draining: once EOF is in, everything sent before it is buffered.
            finished = bool(channel.eof_received) or channel.closed
            received = len(out) + len(err)
            while channel.recv_ready():
                out.append(channel.recv(_READ_CHUNK))
            while channel.recv_stderr_ready():
                err.append(channel.recv_stderr(_READ_CHUNK))
            if channel.eof_received or len(out) + len(err) > received:
                self._heard_from(transport)
            if finished:
                return b"".join(out), b"".join(err)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("deadline passed while reading output")
            # The channel's fileno is a pipe paramiko sets on new data, EOF or close.
            select.select([channel], [], [], remaining)

    @staticmethod
    def _exit_status(
        channel: paramiko.Channel, transport: paramiko.Transport, deadline: float
    ) -> int:
        channel.status_event.wait(max(deadline - time.monotonic(), 0.0))
        if not channel.status_event.is_set():
            raise TimeoutError("deadline passed while waiting for the exit status")
        if channel.exit_status == -1 and not transport.is_active():
            raise EOFError("connection closed before the exit status arrived")
        # -1 on a live transport: the command was killed by a signal (exit-signal, no status).
        return channel.exit_status


def _close_quietly(channel: paramiko.Channel) -> None:
    """Close a channel whose command is over or failed. On a connection that just died, paramiko
    raises from the close itself (EOFError, OSError): that must not hide the error being raised,
    which says whether the command may have run."""
    try:
        channel.close()
    except (EOFError, OSError, paramiko.SSHException) as exc:
        logger.debug("closing a channel of a dead connection: %r", exc)
