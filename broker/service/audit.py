"""The audit log: who changed which project, quota, member, user or token, and when."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.clock import utcnow
from broker.db.models import AuditRecord
from broker.schemas import AuditEntry, AuditPage
from broker.service import cursors
from broker.service.cursors import CursorSigner

if TYPE_CHECKING:
    from broker.service.identity import Actor


def record(
    session: Session,
    actor: str,
    action: str,
    target_type: str,
    target: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Add an audit entry in the caller's transaction, so it commits with the change itself."""
    session.add(
        AuditRecord(
            at=utcnow(),
            actor=actor,
            action=action,
            target_type=target_type,
            target=target,
            details=details or {},
        )
    )


CURSOR_KIND = "audit"


def page(
    session: Session, actor: Actor, signer: CursorSigner, limit: int, cursor: str | None
) -> AuditPage:
    """Newest first, keyset-paginated on the entry id (admins and engineers)."""
    actor.require_reader()
    query = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit + 1)
    if cursor:
        (after,) = signer.decode(CURSOR_KIND, cursor, 1)
        query = query.where(AuditRecord.id < cursors.parse_int(after))
    rows = list(session.scalars(query))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = signer.encode(CURSOR_KIND, str(rows[-1].id))
    return AuditPage(
        data=[
            AuditEntry(
                id=r.id,
                at=r.at,
                actor=r.actor,
                action=r.action,
                target_type=r.target_type,
                target=r.target,
                details=r.details,
            )
            for r in rows
        ],
        next_cursor=next_cursor,
    )
