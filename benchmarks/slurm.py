"""The dev cluster as the benchmarks use it.

Every benchmark job is submitted to one dedicated Slurm account, ``bench``, whose association
carries ``GrpJobs=0``: Slurm accepts the jobs and keeps them pending (reason
``AssocGrpJobsLimit``) without ever starting one, so thousands of live jobs take no GPU from the
tests that share the cluster, and ``scancel --account=bench`` removes all of them. The same
``sbatch`` command line (built by ``adapters.slurm.commands.sbatch``, as the broker builds it) is
run three ways: on the login node itself, over a fresh OpenSSH connection, and by the broker.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import statistics
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.slurm import commands
from adapters.slurm.types import JobSpec

REPO = Path(__file__).resolve().parents[1]
DEV_DIR = REPO / ".dev-cluster"
BROKER_TOML = DEV_DIR / "broker.toml"

BENCH_ACCOUNT = "bench"
PARENT_ACCOUNT = "broker"
"""The account the service account coordinates (deploy/dev-cluster/up.sh)."""
RESEARCHER_UNIX_USER = "alice"
"""The dev cluster's researcher the broker submits the benchmark's jobs as."""
"""Slurm account (and broker project) of every benchmark job."""
JOB_SCRIPT = "#!/bin/bash\ntrue\n"
JOB_NAME = "bench"
JOB_COMMENT = "user=bench"
TIME_LIMIT_MINUTES = 10

_LIVE_STATES = "PD,R,CG,CF,S"
_RPC_LINE = re.compile(r"^\s+(\S+)\s+\(\s*\d+\)\s+count:(\d+)\s+ave_time:\d+\s+total_time:(\d+)")


class ClusterError(RuntimeError):
    """A Slurm command the benchmark relies on failed."""


@dataclass(frozen=True, slots=True)
class Cluster:
    """One dev cluster as ``.dev-cluster/broker.toml`` describes it."""

    name: str
    host: str
    port: int
    user: str
    private_key: Path
    known_hosts: Path
    slurm_conf: Path
    bin_dir: str
    partition: str
    gpu_type: str

    @classmethod
    def from_broker_toml(cls, name: str = "alpha", path: Path = BROKER_TOML) -> Cluster:
        if not path.is_file():
            raise ClusterError(f"{path} not found: run deploy/dev-cluster/up.sh (as root) first")
        with path.open("rb") as handle:
            raw = tomllib.load(handle)["clusters"][name]
        partition = str(raw["default_partition"])
        return cls(
            name=name,
            host=str(raw["host"]),
            port=int(raw["port"]),
            user=str(raw["user"]),
            private_key=Path(raw["private_key"]),
            known_hosts=Path(raw["known_hosts"]),
            slurm_conf=Path(raw["slurm_conf"]),
            bin_dir=str(raw.get("slurm_bin_dir", "/usr/bin")),
            partition=partition,
            gpu_type=str(raw["partitions"][partition]["gpu_type"]),
        )

    @property
    def slurmctld_pid_file(self) -> Path:
        return DEV_DIR / "pids" / f"{self.name}-slurmctld.pid"

    def admin(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command as this process's user (root) against this cluster."""
        env = {"SLURM_CONF": str(self.slurm_conf), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
        return subprocess.run(
            [commands_path(self.bin_dir, argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )

    def admin_ok(self, *argv: str, timeout: float = 120) -> str:
        done = self.admin(*argv, timeout=timeout)
        if done.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout


def commands_path(bin_dir: str, program: str) -> str:
    return program if "/" in program else os.path.join(bin_dir, program)


def bench_spec(cluster: Cluster, tag: str | None = None) -> JobSpec:
    """The one job every benchmark submits: 1 GPU, 10 minutes, in the ``bench`` account."""
    return JobSpec(
        script=JOB_SCRIPT,
        account=BENCH_ACCOUNT,
        partition=cluster.partition,
        gpus=1,
        gpu_type=cluster.gpu_type,
        time_limit_minutes=TIME_LIMIT_MINUTES,
        tag=tag or f"brk-{uuid.uuid4()}",
        name=JOB_NAME,
        comment=JOB_COMMENT,
    )


def bench_request(cluster: Cluster) -> dict[str, object]:
    """The same job as a ``POST /v1/jobs`` body."""
    return {
        "project": BENCH_ACCOUNT,
        "name": JOB_NAME,
        "script": JOB_SCRIPT,
        "cluster": cluster.name,
        "partition": cluster.partition,
        "gpus": 1,
        "time_limit_minutes": TIME_LIMIT_MINUTES,
    }


def parse_job_id(stdout: str) -> str:
    """``sbatch --parsable`` prints ``id`` or ``id;cluster``."""
    text = stdout.strip().split(";", 1)[0]
    if not text.isdigit():
        raise ClusterError(f"sbatch printed {stdout!r}, not a job id")
    return text


class LocalSbatch:
    """(a) sbatch on the login node itself, as the service account: ``setpriv`` drops from root
    to it and execs sbatch (spawned without copying this process; about 1.2 ms more than a bare
    exec, as much as ``bash -c`` costs, see docs/performance.md)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        account = pwd.getpwnam(cluster.user)
        self._home = account.pw_dir
        self._as_user = [
            "/usr/bin/setpriv",
            f"--reuid={account.pw_uid}",
            f"--regid={account.pw_gid}",
            "--init-groups",
        ]
        self._env = {
            "SLURM_CONF": str(cluster.slurm_conf),
            "PATH": "/usr/bin:/bin",
            "HOME": account.pw_dir,
            "USER": cluster.user,
            "LANG": "C.UTF-8",
        }

    def submit(self, spec: JobSpec, *, timeout: float | None = None) -> str:
        argv = [*self._as_user, *commands.sbatch(self.cluster.bin_dir, spec)]
        done = subprocess.run(
            argv,
            input=commands.batch_script(spec),
            capture_output=True,
            env=self._env,
            cwd=self._home,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterError(f"sbatch exited {done.returncode}: {done.stderr.decode().strip()}")
        return parse_job_id(done.stdout.decode())


def spawn_overheads(cluster: Cluster, count: int = 100) -> dict[str, float]:
    """Median milliseconds to spawn and reap ``true`` directly, through the ``setpriv`` that
    (a) uses, and through ``bash -c`` (what a shell costs): the share of (a) that is not sbatch."""
    account = pwd.getpwnam(cluster.user)
    setpriv = ["/usr/bin/setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}"]
    variants = {
        "true": ["/usr/bin/true"],
        "setpriv true": [*setpriv, "--init-groups", "/usr/bin/true"],
        "bash -c true": ["/bin/bash", "-c", "/usr/bin/true"],
    }
    medians = {}
    for name, argv in variants.items():
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True)
            samples.append(time.perf_counter() - started)
        medians[name] = statistics.median(samples) * 1000
    return medians


class SshSbatch:
    """(b) ``ssh login sbatch`` with a fresh OpenSSH connection each time, as a researcher types
    it: no connection sharing, host key checked against the dev cluster's known_hosts."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._ssh = [
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            "ControlMaster=no",
            "-o",
            "ControlPath=none",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={cluster.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-i",
            str(cluster.private_key),
            "-p",
            str(cluster.port),
            f"{cluster.user}@{cluster.host}",
        ]

    def submit(self, spec: JobSpec, *, timeout: float | None = None) -> str:
        remote = shlex.join(commands.sbatch(self.cluster.bin_dir, spec))
        done = subprocess.run(
            [*self._ssh, remote],
            input=commands.batch_script(spec),
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterError(
                f"ssh sbatch exited {done.returncode}: {done.stderr.decode().strip()}"
            )
        return parse_job_id(done.stdout.decode())


def prepare_account(cluster: Cluster) -> None:
    """Create the ``bench`` account below the broker's parent account, for the service account
    (direct sbatch) and the researcher the broker submits as, with ``GrpJobs=0`` (idempotent)."""
    for argv in (
        (
            "sacctmgr",
            "-i",
            "add",
            "account",
            BENCH_ACCOUNT,
            f"cluster={cluster.name}",
            f"parent={PARENT_ACCOUNT}",
        ),
        # An account made by an earlier version of this script sits below root: move it (root may).
        ("sacctmgr", "-i", "modify", "account", BENCH_ACCOUNT, "set", f"parent={PARENT_ACCOUNT}"),
        (
            "sacctmgr",
            "-i",
            "add",
            "coordinator",
            f"account={BENCH_ACCOUNT}",
            f"names={cluster.user}",
        ),
        *(
            (
                "sacctmgr",
                "-i",
                "add",
                "user",
                user,
                f"account={BENCH_ACCOUNT}",
                f"cluster={cluster.name}",
            )
            for user in (cluster.user, RESEARCHER_UNIX_USER)
        ),
    ):
        done = cluster.admin(*argv)
        text = (done.stdout + done.stderr).lower()
        already = "nothing new added" in text or "nothing modified" in text
        if done.returncode != 0 and not already:
            raise ClusterError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    cluster.admin(
        "sacctmgr",
        "-i",
        "modify",
        "account",
        "where",
        f"name={BENCH_ACCOUNT}",
        f"cluster={cluster.name}",
        "set",
        "GrpJobs=0",
    )
    rows = cluster.admin_ok(
        "sacctmgr",
        "-n",
        "-P",
        "show",
        "assoc",
        "where",
        f"account={BENCH_ACCOUNT}",
        f"cluster={cluster.name}",
        "format=user,grpjobs",
    ).split()
    if "|0" not in rows or f"{cluster.user}|" not in rows:
        raise ClusterError(f"account {BENCH_ACCOUNT} is not set up as expected: {rows}")


def live_jobs(cluster: Cluster) -> int:
    """Jobs of the ``bench`` account that Slurm still holds live."""
    out = cluster.admin_ok(
        "squeue", "-h", f"--account={BENCH_ACCOUNT}", f"--states={_LIVE_STATES}", "-o", "%i"
    )
    return len(out.split())


def cancel_all(cluster: Cluster, timeout: float = 120) -> None:
    """Cancel every ``bench`` job and wait until none is live."""
    deadline = time.monotonic() + timeout
    while True:
        if live_jobs(cluster) == 0:
            return
        cluster.admin("scancel", f"--account={BENCH_ACCOUNT}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{BENCH_ACCOUNT} jobs still live {timeout:.0f}s after scancel")
        time.sleep(0.5)


def controller_job_records(
    cluster: Cluster, user: str | None = None, account: str | None = None
) -> int:
    """Jobs slurmctld holds in memory, of all users or of ``user`` (and of ``account``), finished
    ones included (until ``MinJobAge``)."""
    who = (["--user", user] if user else []) + (["--account", account] if account else [])
    out = cluster.admin_ok("squeue", "-h", "--all", "--states=all", *who, "-o", "%i")
    return len(out.split())


def max_job_count(cluster: Cluster) -> int:
    for line in cluster.admin_ok("scontrol", "show", "config").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxJobCount":
            return int(value.strip())
    raise ClusterError("scontrol show config has no MaxJobCount")


def wait_for_room(
    cluster: Cluster,
    needed: int,
    *,
    keep_free: int,
    timeout: float,
    say: Callable[[str], None] = print,
) -> int:
    """Wait until slurmctld can take ``needed`` more jobs and still leave ``keep_free`` job slots
    to whoever shares the cluster (cancelled jobs stay counted for ``MinJobAge``, 300 s here).
    Returns the records held when there was room; raises ``ClusterError`` after ``timeout``."""
    limit = max_job_count(cluster)
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        held = controller_job_records(cluster)
        if held + needed <= limit - keep_free:
            return held
        if time.monotonic() > deadline:
            raise ClusterError(
                f"slurmctld holds {held} jobs; {needed} more would leave fewer than {keep_free} "
                f"of MaxJobCount={limit} free"
            )
        if not announced:
            say(
                f"  waiting for slurmctld to purge old jobs: {held} held, room for {needed} "
                f"needed (MaxJobCount={limit}, keeping {keep_free} free)"
            )
            announced = True
        time.sleep(5)


def wait_for_quiet(
    cluster: Cluster,
    at_most: int,
    *,
    timeout: float,
    user: str | None = None,
    account: str | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Wait (at most ``timeout`` s) until slurmctld holds at most ``at_most`` jobs (of ``user``
    and ``account``, if given), so that a step starts on a controller not still carrying the jobs
    of the step before (it keeps them for ``MinJobAge``; submitting gets slower the more it holds,
    and ``squeue --me`` lists them). Returns the jobs held when the wait ended; never fails:
    others on the cluster may keep it busier than that."""
    deadline = time.monotonic() + timeout
    held = controller_job_records(cluster, user, account)
    if held > at_most:
        whose = f" of {user}" if user else ""
        whose += f" in account {account}" if account else ""
        say(f"  waiting for slurmctld to purge ended jobs{whose}: {held} held, for {at_most}")
    while held > at_most and time.monotonic() < deadline:
        time.sleep(5)
        held = controller_job_records(cluster, user, account)
    return held


def rpc_stats(cluster: Cluster) -> dict[str, tuple[int, int]]:
    """slurmctld's RPC counters by message type (``sdiag``): name -> (count, total microseconds
    the controller spent serving them)."""
    stats: dict[str, tuple[int, int]] = {}
    in_section = False
    for line in cluster.admin_ok("sdiag").splitlines():
        if line.startswith("Remote Procedure Call statistics by message type"):
            in_section = True
            continue
        if in_section and not line.strip():
            break
        match = _RPC_LINE.match(line) if in_section else None
        if match:
            stats[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    return stats


def rpc_delta(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """RPCs served between two ``rpc_stats`` readings, without sdiag's own."""
    delta = {}
    for name, (count, total) in after.items():
        was_count, was_total = before.get(name, (0, 0))
        if name != "REQUEST_STATS_INFO" and count > was_count:
            delta[name] = (count - was_count, total - was_total)
    return delta
