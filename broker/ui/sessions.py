"""Server-side sessions of the web pages (``/ui/``), and the CSRF token bound to each one.

The browser holds only a random session id in an HttpOnly, SameSite=Lax cookie (Secure over
https or where ``[ui] secure_cookie`` says so); the ``ui_sessions`` row holds its SHA-256, the
user, the CSRF token and the expiry. Every request re-reads the user and their memberships, so
a user an admin removes or demotes is seen at once; deleting the row (sign-out) ends the
session, and so does revoking the broker token a token sign-in presented.

How a sign-in method uses this module (the token form here, the OIDC callback elsewhere)::

    start_session(response, request, runtime, user_name, via="oidc")

sets the cookie on ``response`` (typically a redirect to ``/ui/``); ``current_session(request,
runtime)`` is the signed-in ``PageSession`` or None; ``end_session`` signs out.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Request, Response
from sqlalchemy import delete, func, select

from broker.clock import utcnow
from broker.db.engine import transaction
from broker.db.models import MembershipRecord, TokenRecord, UiSessionRecord, UserRecord
from broker.errors import NotFound
from broker.runtime import Runtime
from broker.service import audit
from broker.service.identity import Actor, get_user_record, hash_token

COOKIE = "broker_session"
LOGIN_CSRF_COOKIE = "broker_login_csrf"
"""Before sign-in there is no session: the sign-in form's CSRF token is double-submitted."""
COOKIE_PATH = "/ui"


@dataclass(frozen=True, slots=True)
class PageSession:
    """A signed-in browser: the caller as the service layer sees it, and the CSRF token."""

    actor: Actor
    csrf_token: str
    via: str


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def cookie_secure(request: Request, runtime: Runtime) -> bool:
    return request.url.scheme == "https" or runtime.settings.ui.secure_cookie


def start_session(
    response: Response,
    request: Request,
    runtime: Runtime,
    user_name: str,
    *,
    via: str = "token",
    token_id: str | None = None,
) -> None:
    """Sign ``user_name`` in: a new session row, and its cookie set on ``response``.

    ``via`` records the method (``token``, ``oidc``); ``token_id`` binds the session to the
    broker token that was presented, so revoking the token signs the browser out. Raises
    ``NotFound`` when the user does not exist. Expired sessions are cleared on the way.
    """
    session_id = secrets.token_urlsafe(32)
    now = utcnow()
    with transaction(runtime.sessions) as session:
        user_id = session.scalar(select(UserRecord.id).where(UserRecord.name == user_name))
        if user_id is None:
            raise NotFound(f"user {user_name} does not exist")
        session.execute(delete(UiSessionRecord).where(UiSessionRecord.expires_at < now))
        session.add(
            UiSessionRecord(
                id_hash=_hash(session_id),
                user_id=user_id,
                token_id=token_id,
                via=via,
                csrf_token=secrets.token_urlsafe(32),
                created_at=now,
                expires_at=now + timedelta(hours=runtime.settings.ui.session_hours),
            )
        )
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=int(runtime.settings.ui.session_hours * 3600),
        path=COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=cookie_secure(request, runtime),
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=COOKIE_PATH)


def token_id_of(runtime: Runtime, token: str) -> str | None:
    """The id of a broker token (to bind a token sign-in's session to it)."""
    with runtime.sessions() as session:
        return session.scalar(
            select(TokenRecord.id).where(TokenRecord.token_hash == hash_token(token))
        )


def current_session(request: Request, runtime: Runtime) -> PageSession | None:
    """The signed-in session of this request, read afresh (user, role, projects), or None."""
    session_id = request.cookies.get(COOKIE)
    if not session_id or len(session_id) > 100:
        return None
    now = utcnow()
    with runtime.sessions() as session:
        row = session.execute(
            select(UiSessionRecord, UserRecord)
            .join(UserRecord, UserRecord.id == UiSessionRecord.user_id)
            .where(UiSessionRecord.id_hash == _hash(session_id), UiSessionRecord.expires_at > now)
        ).first()
        if row is None:
            return None
        page, user = row
        if page.token_id is not None:
            # The token signed in with stops working (revoked, or past its expiry): so does this.
            token = session.execute(
                select(TokenRecord.revoked_at, TokenRecord.expires_at).where(
                    TokenRecord.id == page.token_id
                )
            ).first()
            if token is None or token.revoked_at is not None:
                return None
            if token.expires_at is not None and token.expires_at <= now:
                return None
        project_ids = frozenset(
            session.scalars(
                select(MembershipRecord.project_id).where(MembershipRecord.user_id == user.id)
            )
        )
        actor = Actor(
            user_id=user.id,
            name=user.name,
            role=user.role,
            project_ids=project_ids,
            unix_user=user.unix_user,
        )
        return PageSession(actor=actor, csrf_token=page.csrf_token, via=page.via)


def end_session(request: Request, response: Response, runtime: Runtime) -> None:
    """Sign out: the row goes (the cookie is worthless from now on) and the cookie is cleared."""
    session_id = request.cookies.get(COOKIE)
    if session_id:
        with transaction(runtime.sessions) as session:
            session.execute(
                delete(UiSessionRecord).where(UiSessionRecord.id_hash == _hash(session_id))
            )
    response.delete_cookie(COOKIE, path=COOKIE_PATH)


def active_sessions(runtime: Runtime, actor: Actor, user_name: str) -> int:
    """How many unexpired page sessions a user has (admins)."""
    actor.require_admin()
    with runtime.sessions() as session:
        user = get_user_record(session, user_name)
        return int(
            session.scalar(
                select(func.count())
                .select_from(UiSessionRecord)
                .where(UiSessionRecord.user_id == user.id, UiSessionRecord.expires_at > utcnow())
            )
            or 0
        )


def end_user_sessions(runtime: Runtime, actor: Actor, user_name: str) -> int:
    """Sign a user out of every browser (admins; audited), e.g. after a lost laptop; how many
    sessions ended. Their tokens are untouched: revoke those separately."""
    actor.require_admin()
    with transaction(runtime.sessions) as session:
        user = get_user_record(session, user_name)
        ended = session.execute(delete(UiSessionRecord).where(UiSessionRecord.user_id == user.id))
        count = int(getattr(ended, "rowcount", 0) or 0)
        audit.record(session, actor.name, "ui_sessions.end", "user", user_name, {"ended": count})
    return count


def csrf_ok(expected: str, presented: str | None) -> bool:
    return bool(presented) and secrets.compare_digest(expected.encode(), (presented or "").encode())
