"""Seed the dev broker with a demo admin, a researcher and a project with a quota.

Idempotent: existing users and the project are kept; a new token is issued for each user on every
run (tokens are shown once), and printed as shell assignments for quickstart.sh to use.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

from broker.config import load_settings
from broker.db.engine import make_engine, make_session_factory, transaction
from broker.db.migrate import upgrade
from broker.errors import Conflict
from broker.schemas import MemberPut, ProjectCreate, QuotaPut, UserCreate, UserPatch
from broker.service import identity, projects

PROJECT = "demo"


def main(config_path: str) -> None:
    settings = load_settings(config_path)
    engine = make_engine(settings.database.url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    tokens: dict[str, str] = {}
    with transaction(sessions) as session:
        # alice's jobs run as the dev cluster's Unix user alice (deploy/dev-cluster/up.sh).
        for name, role, unix_user in (("admin", "admin", None), ("alice", "researcher", "alice")):
            try:
                body = UserCreate.model_validate(
                    {"name": name, "role": role, "unix_user": unix_user}
                )
                identity.create_user(session, "quickstart", body, settings)
            except Conflict:
                identity.patch_user(
                    session, "quickstart", name, UserPatch(unix_user=unix_user), settings
                )
            issued = identity.issue_token(session, "quickstart", name, "quickstart demo")
            tokens[name] = issued.token
        admin = identity.authenticate(session, tokens["admin"])
        try:
            accounts = dict.fromkeys(settings.clusters, PROJECT)
            projects.create_project(
                session,
                admin,
                ProjectCreate(name=PROJECT, slurm_accounts=accounts),
                set(settings.clusters),
            )
        except Conflict:
            pass
        projects.put_member(session, admin, PROJECT, "alice", MemberPut())
        now = datetime.now(UTC).replace(microsecond=0)
        projects.put_quota(
            session,
            admin,
            PROJECT,
            QuotaPut(
                period_start=now - timedelta(days=1),
                period_end=now + timedelta(days=365),
                gpu_hours=1000,
                gpu_type_weights={"h100": 1.0, "a100": 0.5},
                max_gpus_per_job=16,
            ),
        )
    engine.dispose()
    print(f"ADMIN_TOKEN={tokens['admin']}")
    print(f"RESEARCHER_TOKEN={tokens['alice']}")


if __name__ == "__main__":
    main(sys.argv[1])
