"""A broker runtime around scripted fake clusters, with users, two projects and quotas."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.config import ClusterSettings, Settings
from broker.db.engine import transaction
from broker.db.migrate import upgrade
from broker.runtime import Runtime, build_runtime
from broker.schemas import MemberPut, ProjectCreate, QuotaPut, UserCreate
from broker.service import identity, projects
from broker.service.clusters import ClusterClient, ClusterRegistry
from broker.service.identity import Actor
from tests.broker.fake_slurm import FakeSlurm


def fake_settings(
    database_url: str,
    *,
    limits: dict[str, Any] | None = None,
    identity_settings: dict[str, Any] | None = None,
    auth: dict[str, Any] | None = None,
    queue: dict[str, Any] | None = None,
    **poller: Any,
) -> Settings:
    cluster = {
        "host": "127.0.0.1",
        "user": "svc",
        "private_key": "/nonexistent/key",
        "known_hosts": "/nonexistent/known_hosts",
        "default_partition": "gpu",
        "manage_accounts": True,
        "command_timeout_seconds": 2,
    }
    return Settings.model_validate(
        {
            "database": {"url": database_url},
            "limits": limits or {},
            "auth": auth or {},
            "identity": identity_settings or {},
            "queue": queue or {},
            "poller": {
                "interval_seconds": 1,
                "missing_polls_before_unknown": 3,
                "submit_unknown_grace_seconds": 60,
                **poller,
            },
            "clusters": {
                "alpha": {
                    **cluster,
                    "partitions": {"gpu": {"gpu_type": "h100"}, "debug": {"gpu_type": "h100"}},
                },
                "beta": {**cluster, "partitions": {"gpu": {"gpu_type": "a100"}}},
            },
        }
    )


@dataclass
class Env:
    runtime: Runtime
    slurm: dict[str, FakeSlurm]
    admin: Actor
    alice: Actor
    """A researcher in project ``climate``."""
    bob: Actor
    """A researcher in project ``other``."""
    engineer: Actor

    def actor(self, name: str) -> Actor:
        with transaction(self.runtime.sessions) as session:
            token = identity.issue_token(session, "test", name, "t")
            return identity.authenticate(session, token.token)


def build_env(
    database_url: str,
    *,
    gpu_hours: float = 1000.0,
    limits: dict[str, Any] | None = None,
    identity_settings: dict[str, Any] | None = None,
    auth: dict[str, Any] | None = None,
    queue: dict[str, Any] | None = None,
    **poller: Any,
) -> Env:
    settings = fake_settings(
        database_url,
        limits=limits,
        identity_settings=identity_settings,
        auth=auth,
        queue=queue,
        **poller,
    )
    slurm = {"alpha": FakeSlurm(), "beta": FakeSlurm()}

    def factory(name: str, cluster: ClusterSettings, observer: object) -> ClusterClient:
        return slurm[name]

    runtime = build_runtime(settings, clusters=ClusterRegistry(settings, client_factory=factory))
    upgrade(runtime.engine)
    with transaction(runtime.sessions) as session:
        for name, role, unix_user in (
            ("root", "admin", "ops"),
            ("alice", "researcher", "alice"),
            ("bob", "researcher", "bob"),
            ("eve", "engineer", None),
        ):
            body = UserCreate.model_validate({"name": name, "role": role, "unix_user": unix_user})
            identity.create_user(session, "test", body, settings)
    admin = _actor(runtime, "root")
    now = datetime.now(UTC)
    with transaction(runtime.sessions) as session:
        for project, member in (("climate", "alice"), ("other", "bob")):
            accounts = {"alpha": project, "beta": project}
            projects.create_project(
                session,
                admin,
                ProjectCreate(name=project, slurm_accounts=accounts),
                {"alpha", "beta"},
            )
            projects.put_member(session, admin, project, member, MemberPut())
            quota = QuotaPut(
                period_start=now - timedelta(days=1),
                period_end=now + timedelta(days=365),
                gpu_hours=gpu_hours,
                gpu_type_weights={"h100": 1.0, "a100": 0.5},
            )
            projects.put_quota(session, admin, project, quota)
    return Env(
        runtime,
        slurm,
        admin=admin,
        alice=_actor(runtime, "alice"),
        bob=_actor(runtime, "bob"),
        engineer=_actor(runtime, "eve"),
    )


def _actor(runtime: Runtime, name: str) -> Actor:
    with transaction(runtime.sessions) as session:
        token = identity.issue_token(session, "test", name, "t")
        return identity.authenticate(session, token.token)


def set_quota(env: Env, **limits: Any) -> None:
    """Give project ``climate`` a year's quota of ``gpu_hours`` (default 1,000) with ``limits``
    (``max_concurrent_gpus`` and the like), h100 at weight 1 and a100 at 0.5."""
    now = datetime.now(UTC)
    with transaction(env.runtime.sessions) as session:
        projects.put_quota(
            session,
            env.admin,
            "climate",
            QuotaPut.model_validate(
                {
                    "period_start": now - timedelta(days=1),
                    "period_end": now + timedelta(days=365),
                    "gpu_hours": limits.pop("gpu_hours", 1000.0),
                    "gpu_type_weights": {"h100": 1.0, "a100": 0.5},
                    **limits,
                }
            ),
        )
