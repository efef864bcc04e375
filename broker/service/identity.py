"""Users, bearer tokens and the authenticated caller (``Actor``).

Tokens are 256-bit random strings shown once; only their SHA-256 is stored. A hash of a
high-entropy secret needs no salt or slow KDF: nobody can brute-force 2^256.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.clock import utcnow
from broker.config import Settings
from broker.db.models import MembershipRecord, ProjectRecord, TokenRecord, UserRecord
from broker.errors import Conflict, Forbidden, NotFound, Unauthenticated
from broker.schemas import (
    MePublic,
    TokenIssued,
    TokenPublic,
    TokensPublic,
    UserCreate,
    UserPatch,
    UserPublic,
    UsersPublic,
)
from broker.service import audit
from broker.service.cluster_identity import check_unix_user, default_unix_user

TOKEN_PREFIX = "brk_"  # noqa: S105 - a public prefix, not a secret
LAST_USED_RESOLUTION = timedelta(minutes=1)
"""``last_used_at`` is written at most this often per token, so reads do not all become writes."""


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is calling: resolved once per request from the bearer token."""

    user_id: int
    name: str
    role: str
    project_ids: frozenset[int]
    unix_user: str | None = None
    """The Unix account the caller's jobs run as (None: the caller cannot submit)."""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def reads_everything(self) -> bool:
        return self.role in ("admin", "engineer")

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden(f"{self.role}s cannot change this; an admin can")

    def require_reader(self) -> None:
        if not self.reads_everything:
            raise Forbidden("only admins and engineers can read this")


def admin_name(actor: Actor | str) -> str:
    """The name to record for an admin operation, after checking the caller may do it.

    An ``Actor`` (an API caller) must be an admin. A plain name is a trusted local operator
    (the CLI's bootstrap, seeding scripts), recorded in the audit log under that name.
    """
    if isinstance(actor, Actor):
        actor.require_admin()
        return actor.name
    return actor


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(session: Session, token: str) -> Actor:
    """Resolve a bearer token to its user, or raise ``Unauthenticated``."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise Unauthenticated("invalid token")
    row = session.execute(
        select(TokenRecord, UserRecord)
        .join(UserRecord, UserRecord.id == TokenRecord.user_id)
        .where(TokenRecord.token_hash == hash_token(token), TokenRecord.revoked_at.is_(None))
    ).first()
    if row is None:
        raise Unauthenticated("invalid token")
    token_row, user = row
    now = utcnow()
    if token_row.last_used_at is None or now - token_row.last_used_at > LAST_USED_RESOLUTION:
        token_row.last_used_at = now
    project_ids = frozenset(
        session.scalars(
            select(MembershipRecord.project_id).where(MembershipRecord.user_id == user.id)
        )
    )
    return Actor(
        user_id=user.id,
        name=user.name,
        role=user.role,
        project_ids=project_ids,
        unix_user=user.unix_user,
    )


def me(session: Session, actor: Actor) -> MePublic:
    return MePublic(
        name=actor.name, role=actor.role, projects=_project_names(session, actor.user_id)
    )


def _project_names(session: Session, user_id: int) -> list[str]:
    return sorted(
        session.scalars(
            select(ProjectRecord.name)
            .join(MembershipRecord, MembershipRecord.project_id == ProjectRecord.id)
            .where(MembershipRecord.user_id == user_id)
        )
    )


def _user_public(session: Session, user: UserRecord) -> UserPublic:
    return UserPublic(
        name=user.name,
        role=user.role,
        email=user.email,
        unix_user=user.unix_user,
        projects=_project_names(session, user.id),
        created_at=user.created_at,
    )


def get_user_record(session: Session, name: str) -> UserRecord:
    user = session.scalar(select(UserRecord).where(UserRecord.name == name))
    if user is None:
        raise NotFound(f"user {name} does not exist")
    return user


def create_user(
    session: Session, actor: Actor | str, body: UserCreate, settings: Settings | None = None
) -> UserPublic:
    """Create a user (admins; see ``admin_name`` for a local operator such as ``cli``).

    ``settings`` decide which Unix accounts are refused (root and the service accounts) and whether
    ``unix_user`` defaults to the user's name.
    """
    actor_name = admin_name(actor)
    if session.scalar(select(UserRecord.id).where(UserRecord.name == body.name)) is not None:
        raise Conflict(f"user {body.name} already exists")
    unix_user = body.unix_user
    if unix_user is not None:
        check_unix_user(settings, unix_user)
    elif settings is not None and settings.identity.unix_user_defaults_to_name:
        unix_user = default_unix_user(settings, body.name)
    user = UserRecord(
        name=body.name,
        role=body.role,
        email=body.email,
        unix_user=unix_user,
        created_at=utcnow(),
    )
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict(f"user {body.name} already exists") from exc
    audit.record(
        session,
        actor_name,
        "user.create",
        "user",
        body.name,
        {"role": body.role, "unix_user": unix_user},
    )
    return _user_public(session, user)


@dataclass(frozen=True, slots=True)
class IdentityChange:
    """A user's Unix account changed: their projects' associations move from old to new."""

    user: UserPublic
    old_unix_user: str | None
    new_unix_user: str | None
    project_accounts: list[dict[str, str]]


def patch_user(
    session: Session, actor: Actor | str, name: str, body: UserPatch, settings: Settings | None
) -> IdentityChange:
    """Set (or clear) the Unix account a user's jobs run as; jobs already submitted keep theirs."""
    actor_name = admin_name(actor)
    user = get_user_record(session, name)
    if body.unix_user is not None:
        check_unix_user(settings, body.unix_user)
    old = user.unix_user
    user.unix_user = body.unix_user
    audit.record(
        session, actor_name, "user.patch", "user", name, {"unix_user": [old, body.unix_user]}
    )
    accounts = [
        dict(a)
        for a in session.scalars(
            select(ProjectRecord.slurm_accounts)
            .join(MembershipRecord, MembershipRecord.project_id == ProjectRecord.id)
            .where(MembershipRecord.user_id == user.id)
        )
    ]
    return IdentityChange(_user_public(session, user), old, body.unix_user, accounts)


def list_users(session: Session, actor: Actor) -> UsersPublic:
    actor.require_admin()
    users = session.scalars(select(UserRecord).order_by(UserRecord.name))
    return UsersPublic(data=[_user_public(session, u) for u in users])


def get_user(session: Session, actor: Actor, name: str) -> UserPublic:
    actor.require_admin()
    return _user_public(session, get_user_record(session, name))


def issue_token(
    session: Session,
    actor: Actor | str,
    user_name: str,
    description: str,
    token_bytes: int = 32,
) -> TokenIssued:
    """A new token for ``user_name`` (admins; see ``admin_name``), shown in this answer only."""
    actor_name = admin_name(actor)
    user = get_user_record(session, user_name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(token_bytes)
    record = TokenRecord(
        id=secrets.token_hex(8),
        user_id=user.id,
        token_hash=hash_token(token),
        description=description,
        created_at=utcnow(),
    )
    session.add(record)
    session.flush()
    audit.record(
        session,
        actor_name,
        "token.issue",
        "token",
        f"{user_name}/{record.id}",
        {"description": description},
    )
    return TokenIssued(
        id=record.id, token=token, description=description, created_at=record.created_at
    )


def list_tokens(session: Session, actor: Actor, user_name: str) -> TokensPublic:
    actor.require_admin()
    user = get_user_record(session, user_name)
    rows = session.scalars(
        select(TokenRecord).where(TokenRecord.user_id == user.id).order_by(TokenRecord.created_at)
    )
    return TokensPublic(
        data=[
            TokenPublic(
                id=t.id,
                description=t.description,
                created_at=t.created_at,
                last_used_at=t.last_used_at,
                revoked=t.revoked_at is not None,
            )
            for t in rows
        ]
    )


def revoke_token(session: Session, actor: Actor | str, user_name: str, token_id: str) -> None:
    actor_name = admin_name(actor)
    user = get_user_record(session, user_name)
    token = session.scalar(
        select(TokenRecord).where(TokenRecord.id == token_id, TokenRecord.user_id == user.id)
    )
    if token is None or token.revoked_at is not None:
        raise NotFound(f"token {token_id} of {user_name} does not exist")
    token.revoked_at = utcnow()
    audit.record(session, actor_name, "token.revoke", "token", f"{user_name}/{token_id}")
