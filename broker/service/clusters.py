"""The configured clusters: a Slurm client per cluster, and what the poller last saw of each."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.local import LocalRunner
from adapters.runner import CommandRunner
from adapters.slurm.client import CommandObserver, FileChunk, SlurmClient
from adapters.slurm.types import (
    AccountingRecord,
    JobSpec,
    JobStatus,
    PartitionCapacity,
    StatusReport,
)
from adapters.ssh import SSHRunner
from broker.config import ClusterSettings, Settings
from broker.db.models import ClusterStatusRecord
from broker.errors import ValidationFailed
from broker.schemas import ClusterPublic, ClustersPublic, PartitionPublic

log = logging.getLogger(__name__)


class ClusterClient(Protocol):
    """What the broker uses of ``adapters.slurm.client.SlurmClient`` (tests script a fake)."""

    @property
    def runner(self) -> CommandRunner: ...

    def submit(self, spec: JobSpec, *, timeout: float | None = None) -> str: ...

    def statuses(
        self, job_ids: Iterable[str], *, accounts: Sequence[str] | None = None
    ) -> StatusReport: ...

    def find_by_tag(
        self, tag: str, since: datetime, *, accounts: Sequence[str] | None = None
    ) -> list[JobStatus]: ...

    def cancel(
        self, job_id: str, *, as_user: str | None = None, only_pending: bool = False
    ) -> None: ...

    def capacity(self) -> list[PartitionCapacity]: ...

    def accounting(
        self,
        since: datetime,
        until: datetime | None = None,
        *,
        accounts: Sequence[str] | None = None,
        job_ids: Sequence[str] | None = None,
    ) -> list[AccountingRecord]: ...

    def ensure_account(
        self,
        account: str,
        user: str | None = None,
        *,
        parent: str | None = None,
        coordinator: str | None = None,
    ) -> None: ...

    def ensure_association(self, account: str, user: str) -> None: ...

    def remove_association(self, account: str, user: str) -> None: ...

    def prepare_directory(self, user: str, path: str) -> None: ...

    def read_file(self, user: str, path: str, offset: int, limit: int) -> FileChunk | None: ...


def build_runner(name: str, cluster: ClusterSettings) -> CommandRunner:
    """The transport a cluster's configuration asks for."""
    extra_env = {"SLURM_CONF": cluster.slurm_conf} if cluster.slurm_conf else {}
    if cluster.transport == "local":
        return LocalRunner(
            name=name, extra_env=extra_env, default_timeout=cluster.command_timeout_seconds
        )
    if cluster.private_key is None or cluster.known_hosts is None:
        raise ValueError(f"cluster {name}: ssh transport needs private_key and known_hosts")
    return SSHRunner(
        name=name,
        host=cluster.host,
        port=cluster.port,
        user=cluster.user,
        private_key=str(cluster.private_key),
        known_hosts=str(cluster.known_hosts),
        connect_timeout=cluster.connect_timeout_seconds,
        default_timeout=cluster.command_timeout_seconds,
        max_sessions=cluster.max_sessions,
        extra_env=extra_env,
    )


ClusterCommandObserver = Callable[[str, str, float, BaseException | None], None]
"""Called with (cluster, command, seconds, error or None) after every Slurm command."""


def build_client(
    name: str, cluster: ClusterSettings, observer: ClusterCommandObserver | None
) -> ClusterClient:
    per_command: CommandObserver | None = None
    if observer is not None:
        report = observer

        def per_command(command: str, seconds: float, error: BaseException | None) -> None:
            report(name, command, seconds, error)

    return SlurmClient(
        build_runner(name, cluster),
        cluster=cluster.slurm_name,
        bin_dir=cluster.slurm_bin_dir,
        timeout=cluster.command_timeout_seconds,
        observer=per_command,
    )


ClientFactory = Callable[[str, ClusterSettings, ClusterCommandObserver | None], ClusterClient]


class ClusterRegistry:
    """Builds each cluster's client on first use and keeps it (its connections are reused)."""

    def __init__(
        self,
        settings: Settings,
        *,
        client_factory: ClientFactory = build_client,
        observer: ClusterCommandObserver | None = None,
    ) -> None:
        self._settings = settings
        self._client_factory = client_factory
        self._observer = observer
        self._clients: dict[str, ClusterClient] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(self._settings.clusters)

    def config(self, name: str) -> ClusterSettings:
        try:
            return self._settings.clusters[name]
        except KeyError:
            raise ValidationFailed(
                f"unknown cluster {name}",
                [{"field": "cluster", "message": f"configured clusters: {', '.join(self.names)}"}],
            ) from None

    def client(self, name: str) -> ClusterClient:
        with self._lock:
            client = self._clients.get(name)
            if client is None:
                client = self._client_factory(name, self.config(name), self._observer)
                self._clients[name] = client
            return client

    def runners(self) -> dict[str, CommandRunner]:
        with self._lock:
            return {name: client.runner for name, client in self._clients.items()}

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.runner.close()
            self._clients.clear()


def cluster_views(session: Session, names: list[str]) -> ClustersPublic:
    """``/v1/clusters`` from the poller's last snapshot: no SSH on the request path."""
    rows = {r.name: r for r in session.scalars(select(ClusterStatusRecord))}
    data = []
    for name in names:
        row = rows.get(name)
        data.append(
            ClusterPublic(
                name=name,
                up=bool(row and row.up),
                last_poll_at=row.last_poll_at if row else None,
                partitions=[PartitionPublic(**p) for p in (row.partitions if row else [])],
            )
        )
    return ClustersPublic(data=data)
