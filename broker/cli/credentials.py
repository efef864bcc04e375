"""Where ``broker login`` keeps the identity provider's token: one file in the user's config
directory (``$XDG_CONFIG_HOME/aifactory-broker/credentials.json``, else ``~/.config/...``), mode
0600 in a 0700 directory, one entry per broker URL. A client command given no ``--token`` and no
``BROKER_TOKEN`` uses the entry of its ``--url`` while it has not expired.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from broker.cli.errors import MissingToken

APP_DIR = "aifactory-broker"
FILE_NAME = "credentials.json"
EXPIRY_MARGIN_SECONDS = 10
"""A token this close to its expiry counts as expired: the request would race it."""


@dataclass(frozen=True)
class StoredToken:
    access_token: str
    issuer: str
    client_id: str
    expires_at: float | None
    """Unix time the provider said the token expires (``expires_in`` at sign-in); None: unknown."""
    user: str | None = None

    def expired(self, now: float | None = None) -> bool:
        if self.expires_at is None:
            return False
        return (now if now is not None else time.time()) >= self.expires_at - EXPIRY_MARGIN_SECONDS


def path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / APP_DIR / FILE_NAME


def _key(url: str) -> str:
    return url.rstrip("/")


def _read() -> dict[str, Any]:
    try:
        data = json.loads(path().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # unreadable or corrupt: as if nobody had signed in
    return data if isinstance(data, dict) else {}


def _write(data: dict[str, Any]) -> None:
    target = path()
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = target.with_name(f".{FILE_NAME}.{os.getpid()}")
    # Created 0600 from the start: the token is never readable by others, not even for a moment.
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(data, file, indent=2)
    os.replace(partial, target)


def load(url: str) -> StoredToken | None:
    entry = _read().get("brokers", {}).get(_key(url))
    if not isinstance(entry, dict):
        return None
    try:
        return StoredToken(**entry)
    except TypeError:
        return None


def save(url: str, token: StoredToken) -> Path:
    data = _read()
    brokers = data.setdefault("brokers", {})
    brokers[_key(url)] = asdict(token)
    _write(data)
    return path()


def forget(url: str) -> bool:
    """Remove the entry of ``url``; whether there was one."""
    data = _read()
    brokers = data.get("brokers", {})
    if _key(url) not in brokers:
        return False
    del brokers[_key(url)]
    _write(data)
    return True


def token_for(url: str) -> str | None:
    """The stored token for ``url``; ``MissingToken`` if it has expired, None if there is none."""
    stored = load(url)
    if stored is None:
        return None
    if stored.expired():
        raise MissingToken(
            f"your sign-in at {stored.issuer} has expired: run broker login again (or pass --token)"
        )
    return stored.access_token
