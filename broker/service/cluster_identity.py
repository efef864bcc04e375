"""Who a job runs as on a cluster, and what Slurm lets that Unix account charge.

Every job runs as its researcher's ``unix_user`` (API.md, "Identity on the clusters"). The service
account reaches that account only through ``sudo -n -u`` under the site's sudoers rule; the first
time a user submits to a cluster (per process) the broker creates their job directory as them, which
is also the proof that the account exists there and the rule allows it. Slurm associations follow
project membership: a member's ``unix_user`` may charge the project's account, and nothing else the
broker manages.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable

from adapters.errors import AdapterError, RunAsRefused, TransportError
from broker.config import ClusterSettings, Settings
from broker.errors import ClusterUnavailable, NoClusterIdentity, ValidationFailed
from broker.schemas import UNIX_USER_PATTERN
from broker.service.clusters import ClusterRegistry

log = logging.getLogger(__name__)

_UNIX_USER = re.compile(UNIX_USER_PATTERN)
ALWAYS_REFUSED = frozenset({"root"})


def refused_unix_users(settings: Settings | None) -> frozenset[str]:
    """Accounts no job may run as: root, every cluster's login user, configured service accounts."""
    if settings is None:
        return ALWAYS_REFUSED
    logins = {cluster.user for cluster in settings.clusters.values() if cluster.user}
    return ALWAYS_REFUSED | logins | frozenset(settings.identity.service_accounts)


def check_unix_user(settings: Settings | None, value: str) -> str:
    """``value`` if jobs may run as it; ``ValidationFailed`` (422) otherwise."""
    if not _UNIX_USER.fullmatch(value):
        raise ValidationFailed(
            f"unix_user {value!r} is not a POSIX user name",
            [{"field": "unix_user", "message": f"must match {UNIX_USER_PATTERN}"}],
        )
    if value in refused_unix_users(settings):
        raise ValidationFailed(
            f"jobs never run as {value}: it is root or one of the broker's service accounts",
            [{"field": "unix_user", "message": "root and service accounts are refused"}],
        )
    return value


def default_unix_user(settings: Settings, name: str) -> str | None:
    """A user's name as their Unix account, where it may be one; else None (an admin sets it)."""
    if _UNIX_USER.fullmatch(name) and name not in refused_unix_users(settings):
        return name
    return None


def output_dir(cluster: ClusterSettings, unix_user: str) -> str:
    """The researcher's job directory on ``cluster`` (``output_dir`` template filled in)."""
    return cluster.output_dir.format(unix_user=unix_user, cluster=cluster.name)


class ClusterIdentities:
    """Prepares researchers' directories and keeps their Slurm associations, per cluster."""

    def __init__(self, clusters: ClusterRegistry, settings: Settings) -> None:
        self._clusters = clusters
        self._settings = settings
        self._done: set[tuple[str, ...]] = set()
        """What this process already set up on a cluster (directories, accounts, associations)."""
        self._lock = threading.Lock()

    def _once(self, key: tuple[str, ...], action: Callable[[], None]) -> None:
        """Run ``action`` unless ``key`` was set up already by this process; remember success."""
        with self._lock:
            if key in self._done:
                return
        action()
        with self._lock:
            self._done.add(key)

    def _forget(self, key: tuple[str, ...]) -> None:
        with self._lock:
            self._done.discard(key)

    def prepared(self, cluster_name: str, unix_user: str | None) -> str | None:
        """The job directory of ``unix_user`` on the cluster if this process has prepared it
        already (no command run); None if ``prepare`` must run first."""
        if unix_user is None:
            return None
        with self._lock:
            if ("directory", cluster_name, unix_user) not in self._done:
                return None
        return output_dir(self._clusters.config(cluster_name), unix_user)

    def prepare(self, cluster_name: str, unix_user: str | None) -> str:
        """The job directory of ``unix_user`` on the cluster, created as them if need be.

        Raises ``NoClusterIdentity`` when the user has no account there (or sudo refuses it) and
        ``ClusterUnavailable`` when the cluster cannot be asked. Nothing is reserved before this.
        """
        if unix_user is None:
            raise NoClusterIdentity(
                cluster_name,
                "you have no unix_user: an admin must set the Unix account your jobs run as",
            )
        cluster = self._clusters.config(cluster_name)
        directory = output_dir(cluster, unix_user)
        client = self._clusters.client(cluster_name)
        try:
            self._once(
                ("directory", cluster_name, unix_user),
                lambda: client.prepare_directory(unix_user, directory),
            )
        except RunAsRefused as exc:
            log.warning("cluster %s refuses to act as %s: %s", cluster_name, unix_user, exc)
            raise NoClusterIdentity(
                cluster_name,
                f"the Unix account {unix_user} cannot run jobs on cluster {cluster_name} "
                "(it does not exist there, or is not in the broker's group)",
            ) from exc
        except AdapterError as exc:
            if isinstance(exc, TransportError) or exc.transient:
                raise ClusterUnavailable(
                    cluster_name,
                    f"cluster {cluster_name} cannot be reached now; nothing was submitted "
                    "or reserved",
                ) from exc
            raise NoClusterIdentity(
                cluster_name,
                f"the job directory of {unix_user} cannot be created on cluster {cluster_name}",
            ) from exc
        return directory

    def ensure_account(self, cluster_name: str, account: str) -> None:
        """Create a project's account where the broker manages them (once per process): below
        ``parent_account``, with the service account as its coordinator, so slurmctld lets it
        cancel there (SLURM-NOTES: coordinator rights do not reach accounts made later)."""
        cluster = self._clusters.config(cluster_name)
        if not cluster.manage_accounts:
            return
        parent = cluster.parent_account or None
        client = self._clusters.client(cluster_name)
        self._once(
            ("account", cluster_name, account),
            lambda: client.ensure_account(
                account, parent=parent, coordinator=cluster.user if parent else None
            ),
        )

    def ensure_association(self, cluster_name: str, account: str, unix_user: str) -> None:
        """Let ``unix_user`` charge ``account`` on the cluster (once per process)."""
        if not self._clusters.config(cluster_name).manage_accounts:
            return
        client = self._clusters.client(cluster_name)
        self._once(
            ("association", cluster_name, account, unix_user),
            lambda: client.ensure_association(account, unix_user),
        )

    def grant(self, accounts: dict[str, str], unix_user: str | None) -> None:
        """A new member: associations on every cluster of the project (best effort; a cluster
        that is down now gets it at the member's first submission there)."""
        if unix_user is None:
            return
        for cluster_name, account in self._managed(accounts):
            try:
                self.ensure_association(cluster_name, account, unix_user)
                log.info("association %s/%s for %s added", cluster_name, account, unix_user)
            except AdapterError as exc:
                log.warning(
                    "association %s/%s for %s not added yet: %s",
                    cluster_name,
                    account,
                    unix_user,
                    exc,
                )

    def revoke(self, accounts: dict[str, str], unix_user: str | None) -> list[str]:
        """A removed member: their associations go. Returns the clusters where that failed (the
        caller records them; an admin retries by removing again, which is idempotent)."""
        failed: list[str] = []
        if unix_user is None:
            return failed
        for cluster_name, account in self._managed(accounts):
            self._forget(("association", cluster_name, account, unix_user))
            try:
                self._clusters.client(cluster_name).remove_association(account, unix_user)
                log.info("association %s/%s for %s removed", cluster_name, account, unix_user)
            except AdapterError as exc:
                log.error(
                    "association %s/%s for %s NOT removed: %s",
                    cluster_name,
                    account,
                    unix_user,
                    exc,
                )
                failed.append(cluster_name)
        return failed

    def _managed(self, accounts: dict[str, str]) -> Iterable[tuple[str, str]]:
        for cluster_name, account in sorted(accounts.items()):
            if cluster_name in self._clusters.names and (
                self._clusters.config(cluster_name).manage_accounts
            ):
                yield cluster_name, account
