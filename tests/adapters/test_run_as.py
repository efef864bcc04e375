"""Jobs run as the researcher, on the real dev cluster over the real login node's sshd.

The service account submits, cancels and reads output through ``sudo -n -u <researcher>``, under
the sudoers rule deploy/dev-cluster/up.sh installs (members of ``broker-users`` only). These tests
check what a researcher's script can and cannot reach from inside its job, as the Unix and Slurm
identities involved see it: alice's job runs as alice, its files are hers alone, and Slurm itself
refuses her a project account she has no association with and another user's job.
"""

from __future__ import annotations

import os
import pwd
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from adapters.errors import RunAsRefused
from adapters.slurm import commands
from adapters.slurm.client import SlurmClient
from adapters.slurm.types import JobSpec
from adapters.ssh import SSHRunner
from tests import devcluster

pytestmark = pytest.mark.cluster

T = TypeVar("T")
PARENT = "broker"


def wait_for(what: str, probe: Callable[[], T], done: Callable[[T], bool], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last: {value!r}")
        time.sleep(0.25)


@dataclass
class Site:
    dev: devcluster.DevCluster
    client: SlurmClient
    account: str
    other_account: str
    started: list[tuple[str, str]] = field(default_factory=list)

    def jobdir(self, user: str) -> str:
        return f"/home/{user}/.broker/test-run-as"

    def submit(self, user: str, script: str, *, account: str | None = None, **extra: str) -> str:
        directory = self.jobdir(user)
        self.client.prepare_directory(user, directory)
        name = uuid.uuid4().hex[:12]
        job_id = self.client.submit(
            JobSpec(
                script=script,
                account=account or self.account,
                partition=self.dev.default_partition,
                gpus=1,
                gpu_type=self.dev.partitions[self.dev.default_partition],
                time_limit_minutes=5,
                tag=f"brk-runas-{name}",
                name="runas",
                run_as=user,
                workdir=directory,
                stdout_path=extra.get("stdout", f"{directory}/{name}.out"),
                stderr_path=f"{directory}/{name}.err",
            )
        )
        self.started.append((job_id, user))
        return job_id

    def ended(self, job_id: str, timeout: float = 60) -> str:
        def state() -> str:
            found = self.client.statuses([job_id]).found.get(job_id)
            return "" if found is None else found.state

        return wait_for(
            f"job {job_id} to end",
            state,
            lambda s: s in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"},
            timeout,
        )

    def output(self, user: str, path: str) -> str:
        chunk = self.client.read_file(user, path, 0, 1 << 20)
        assert chunk is not None, f"{path} does not exist"
        return chunk.data.decode()


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    dev = devcluster.cluster("alpha")
    runner = SSHRunner(
        name=dev.name,
        host=dev.host,
        port=dev.port,
        user=dev.user,
        private_key=dev.private_key,
        known_hosts=dev.known_hosts,
        extra_env={"SLURM_CONF": str(dev.slurm_conf)},
    )
    client = SlurmClient(runner, cluster=dev.name, bin_dir=dev.bin_dir)
    suffix = uuid.uuid4().hex[:6]
    account, other = f"runas{suffix}", f"runasx{suffix}"
    for name, user in ((account, "alice"), (other, "bob")):
        client.ensure_account(name, parent=PARENT, coordinator=dev.user)
        client.ensure_association(name, user)
    found = Site(dev=dev, client=client, account=account, other_account=other)
    try:
        yield found
    finally:
        for job_id, user in found.started:
            client.cancel(job_id, as_user=user)
        runner.close()


def test_a_job_runs_as_its_researcher_and_its_files_are_private(site: Site) -> None:
    path = f"{site.jobdir('alice')}/whoami-{uuid.uuid4().hex[:8]}.out"
    job_id = site.submit("alice", "#!/bin/sh\nid -un\npwd\n", stdout=path)
    assert site.ended(job_id) == "COMPLETED"
    user, cwd = site.output("alice", path).split()
    assert user == "alice"
    assert cwd == site.jobdir("alice")
    info = os.stat(path)  # the login node is this host
    assert info.st_uid == pwd.getpwnam("alice").pw_uid
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(site.jobdir("alice")).st_mode) == 0o700


def test_output_is_read_by_offset_and_missing_files_are_none(site: Site) -> None:
    path = f"{site.jobdir('alice')}/count-{uuid.uuid4().hex[:8]}.out"
    job_id = site.submit("alice", "#!/bin/sh\nprintf 0123456789\n", stdout=path)
    site.ended(job_id)
    chunk = site.client.read_file("alice", path, 3, 4)
    assert chunk is not None
    assert (chunk.offset, chunk.size, chunk.data) == (3, 10, b"3456")
    past = site.client.read_file("alice", path, 10, 4)
    assert past is not None
    assert past.data == b""
    assert site.client.read_file("alice", f"{site.jobdir('alice')}/nothing-here", 0, 10) is None


def test_researchers_cannot_read_each_other_through_the_reader(site: Site) -> None:
    path = f"{site.jobdir('alice')}/secret-{uuid.uuid4().hex[:8]}.out"
    job_id = site.submit("alice", "#!/bin/sh\necho alice-secret\n", stdout=path)
    site.ended(job_id)
    with pytest.raises(Exception) as refused:
        site.client.read_file("bob", path, 0, 100)
    assert "alice-secret" not in str(refused.value)


def test_sudo_refuses_users_outside_the_group_root_and_the_service_account(site: Site) -> None:
    for user in ("carol", site.dev.user, "nosuchuser"):
        with pytest.raises(RunAsRefused) as refused:
            site.client.prepare_directory(user, f"/tmp/broker-{user}")
        assert refused.value.user == user
    with pytest.raises(ValueError, match="root"):
        commands.as_user("root", ["/usr/bin/sbatch"])


def test_a_job_cannot_charge_another_projects_account(site: Site) -> None:
    """From inside alice's job, sbatch into bob's project account is refused by Slurm itself."""
    path = f"{site.jobdir('alice')}/escape-{uuid.uuid4().hex[:8]}.out"
    script = (
        "#!/bin/sh\n"
        f"sbatch --parsable -A {site.other_account} --gres=gpu:h100:8 --wrap 'sleep 60' 2>&1\n"
        "echo rc=$?\n"
    )
    job_id = site.submit("alice", script, stdout=path)
    site.ended(job_id)
    text = site.output("alice", path)
    assert "Invalid account" in text, text
    assert "rc=1" in text


def test_a_job_cannot_cancel_another_users_job(site: Site) -> None:
    victim = site.submit("bob", "#!/bin/sh\nsleep 30\n", account=site.other_account)
    path = f"{site.jobdir('alice')}/cancel-{uuid.uuid4().hex[:8]}.out"
    attacker = site.submit("alice", f"#!/bin/sh\nscancel {victim} 2>&1\necho rc=$?\n", stdout=path)
    site.ended(attacker)
    assert "rc=0" not in site.output("alice", path)
    status = site.client.statuses([victim]).found[victim]
    assert status.state in {"PENDING", "RUNNING"}
