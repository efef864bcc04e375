"""Users, bearer tokens and the authenticated caller (``Actor``).

Tokens are 256-bit random strings shown once; only their SHA-256 is stored. A hash of a
high-entropy secret needs no salt or slow KDF: nobody can brute-force 2^256.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.clock import utcnow
from broker.config import Settings
from broker.db.models import MembershipRecord, ProjectRecord, TokenRecord, UserRecord
from broker.errors import Conflict, Forbidden, NotFound, Unauthenticated, ValidationFailed
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
    project_names: frozenset[str] | None = None
    """Names of the projects in ``project_ids``, when resolved with them (None: not loaded)."""
    token_id: str | None = None
    """The API token the caller presented, if any."""
    expires_at: datetime | None = None
    """When the credential the caller presented stops being valid (None: never by itself)."""

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
    """Resolve a bearer token to its user, or raise ``Unauthenticated``.

    One statement: the token, its user and the user's projects (one row per membership). A revoked
    or expired token matches nothing. ``last_used_at`` is written here only when it is older than
    ``LAST_USED_RESOLUTION``; the API's token cache records later uses in batches
    (``broker.service.tokens``).
    """
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise Unauthenticated("invalid token")
    now = utcnow()
    rows = session.execute(
        select(
            TokenRecord.id,
            TokenRecord.last_used_at,
            TokenRecord.expires_at,
            UserRecord.id,
            UserRecord.name,
            UserRecord.role,
            UserRecord.unix_user,
            MembershipRecord.project_id,
            ProjectRecord.name,
        )
        .join(UserRecord, UserRecord.id == TokenRecord.user_id)
        .outerjoin(MembershipRecord, MembershipRecord.user_id == UserRecord.id)
        .outerjoin(ProjectRecord, ProjectRecord.id == MembershipRecord.project_id)
        .where(
            TokenRecord.token_hash == hash_token(token),
            TokenRecord.revoked_at.is_(None),
            or_(TokenRecord.expires_at.is_(None), TokenRecord.expires_at > now),
        )
    ).all()
    if not rows:
        raise Unauthenticated("invalid token")
    token_id, last_used_at, expires_at, user_id, name, role, unix_user = rows[0][:7]
    if last_used_at is None or now - last_used_at > LAST_USED_RESOLUTION:
        session.execute(
            update(TokenRecord).where(TokenRecord.id == token_id).values(last_used_at=now)
        )
    return Actor(
        user_id=user_id,
        name=name,
        role=role,
        project_ids=frozenset(row[7] for row in rows if row[7] is not None),
        unix_user=unix_user,
        project_names=frozenset(row[8] for row in rows if row[8] is not None),
        token_id=token_id,
        expires_at=expires_at,
    )


def identity_changed(session: Session) -> None:
    """Something a cached ``Actor`` holds changed in ``session``'s transaction (a token revoked,
    a membership, a Unix account): once it commits, every process drops its cached actors.

    This process drops them at commit; other processes on PostgreSQL hear of it through a
    ``NOTIFY`` sent in the same transaction, so it reaches them exactly when the change is
    visible (``broker.service.tokens``).
    """
    from broker.service import tokens

    tokens.changed_in(session)


def me(session: Session, actor: Actor) -> MePublic:
    names = actor.project_names
    projects = sorted(names) if names is not None else _project_names(session, actor.user_id)
    return MePublic(name=actor.name, role=actor.role, projects=projects)


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
    if old != body.unix_user:
        identity_changed(session)
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
    expires_at: datetime | None = None,
) -> TokenIssued:
    """A new token for ``user_name`` (admins; see ``admin_name``), shown in this answer only.

    With ``expires_at`` (in the future) the token stops authenticating at that time."""
    actor_name = admin_name(actor)
    if expires_at is not None and expires_at <= utcnow():
        raise ValidationFailed(
            "expires_at is not in the future",
            [{"field": "expires_at", "message": "must be a time in the future"}],
        )
    user = get_user_record(session, user_name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(token_bytes)
    record = TokenRecord(
        id=secrets.token_hex(8),
        user_id=user.id,
        token_hash=hash_token(token),
        description=description,
        created_at=utcnow(),
        expires_at=expires_at,
    )
    session.add(record)
    session.flush()
    details: dict[str, str] = {"description": description}
    if expires_at is not None:
        details["expires_at"] = expires_at.isoformat()
    audit.record(session, actor_name, "token.issue", "token", f"{user_name}/{record.id}", details)
    return TokenIssued(
        id=record.id,
        token=token,
        description=description,
        created_at=record.created_at,
        expires_at=expires_at,
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
                expires_at=t.expires_at,
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
    identity_changed(session)
    audit.record(session, actor_name, "token.revoke", "token", f"{user_name}/{token_id}")
