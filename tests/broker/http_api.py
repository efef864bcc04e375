"""Helpers for tests of the REST API through HTTP: a token header, and problem documents."""

from __future__ import annotations

from typing import Any

from broker.db.engine import transaction
from broker.service import identity
from tests.broker.harness import Env


def token(env: Env, user: str) -> dict[str, str]:
    """An ``Authorization`` header with a new token of ``user``."""
    with transaction(env.runtime.sessions) as session:
        issued = identity.issue_token(session, "test", user, "test")
    return {"Authorization": f"Bearer {issued.token}"}


def problem(response: Any, status: int, type_: str) -> dict[str, Any]:
    """The RFC 9457 problem document of ``response``, checked for ``status`` and ``type_``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"] == type_ and body["status"] == status
    assert body["title"] and "detail" in body
    return body
