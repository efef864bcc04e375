"""Opaque keyset-pagination cursors: what the client sends back is what we gave it, or a 422."""

from __future__ import annotations

import base64
import binascii

from broker.errors import ValidationFailed


def encode(*parts: str) -> str:
    return base64.urlsafe_b64encode("|".join(parts).encode()).decode()


def decode(cursor: str, parts: int) -> list[str]:
    """The ``parts`` strings a cursor of ours holds; ``ValidationFailed`` for anything else."""
    try:
        values = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", parts - 1)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        values = []
    if len(values) != parts:
        raise invalid()
    return values


def invalid() -> ValidationFailed:
    return ValidationFailed(
        "invalid cursor", [{"field": "cursor", "message": "not a cursor this API issued"}]
    )
