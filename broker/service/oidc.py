"""Federated sign-in: the site's OpenID Connect provider's JWTs as the API's bearer tokens.

A token is accepted when its signature verifies with a key of the provider's JWKS (found through
the discovery document), it was signed with one of the pinned algorithms, and ``iss``, ``aud``,
``exp`` (and ``nbf``, ``iat`` where present) hold. Its ``auth.oidc.user_claim`` names the broker
user; a user the broker does not know is refused or created, as configured.

The JOSE library is PyJWT (with ``cryptography``): the most used JWT library in Python, kept up
for a decade by the same maintainers, typed, small, and strict where it matters here: ``decode``
needs the algorithms spelt out, and an algorithm's key type is checked (an RSA public key is
never taken as an HMAC secret). Key management (discovery, caching, refresh) is the broker's own,
below: PyJWT's ``PyJWKClient`` refetches on every unknown key id and drops its keys when the
provider cannot be reached, which is neither throttled nor what a broker under an IdP outage wants.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from broker.config import OidcSettings, Settings
from broker.db.engine import transaction
from broker.db.models import MembershipRecord, UserRecord
from broker.errors import Conflict, Unauthenticated
from broker.schemas import UserCreate
from broker.service.identity import TOKEN_PREFIX, Actor, create_user

log = logging.getLogger(__name__)

MAX_TOKEN_LENGTH = 16_384
"""Longer bearer values are refused before any parsing."""


def looks_like_jwt(token: str) -> bool:
    """A compact JWS (``header.payload.signature``), as opposed to a broker token (``brk_...``)."""
    return not token.startswith(TOKEN_PREFIX) and token.count(".") == 2


class ProviderUnreachable(Exception):
    """The provider's discovery document or keys could not be fetched."""


@dataclass(frozen=True, slots=True)
class _KeySet:
    by_kid: Mapping[str, jwt.PyJWK]
    """By key id; a key without ``kid`` is stored under ``""``."""
    fetched_at: float


class ProviderKeys:
    """The provider's signing keys, fetched through its discovery document and cached.

    Fetched again when older than ``jwks_max_age_seconds`` (so keys the provider removed stop
    working) and when a token names an unknown key id, at most once every
    ``jwks_refresh_min_seconds``. When a fetch fails, the keys fetched before stay in use.
    """

    def __init__(
        self,
        settings: OidcSettings,
        http: httpx.Client,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._http = http
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: _KeySet | None = None
        self._metadata: dict[str, Any] | None = None
        self._last_attempt = -float("inf")
        self._failing = False
        self.fetches = 0
        """How many times the keys were fetched (or tried): throttling is observable."""

    def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key ``kid`` names (``None``: the only key, if the provider publishes one)."""
        current = self._keys
        now = self._clock()
        stale = current is None or now - current.fetched_at > self.settings.jwks_max_age_seconds
        found = None if current is None else _find(current, kid)
        if found is not None and not stale:
            return found
        current = self._refresh() or current
        return None if current is None else _find(current, kid)

    def _refresh(self) -> _KeySet | None:
        with self._lock:
            now = self._clock()
            if now - self._last_attempt < self.settings.jwks_refresh_min_seconds:
                return self._keys  # fetched (or tried) moments ago, maybe by another thread
            self._last_attempt = now
            self.fetches += 1
            try:
                fetched = self._fetch()
            except ProviderUnreachable as exc:
                if not self._failing:
                    kept = (
                        "no keys yet" if self._keys is None else "keeping the keys fetched before"
                    )
                    log.warning("cannot fetch the OIDC provider's keys: %s; %s", exc, kept)
                self._failing = True
                return self._keys
            before = None if self._keys is None else self._keys.by_kid.keys()
            if self._failing or before != fetched.by_kid.keys():
                log.info(
                    "OIDC signing keys of %s: %s",
                    self.settings.issuer,
                    ", ".join(sorted(k or "(no kid)" for k in fetched.by_kid)) or "none",
                )
            self._failing = False
            self._keys = fetched
            return fetched

    def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (fetched once, then kept), checked to name the
        configured issuer; ``ProviderUnreachable`` if it cannot be had."""
        document = self._metadata
        if document is None:
            document = self._get_json(
                self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            )
            if document.get("issuer") != self.settings.issuer:
                raise ProviderUnreachable(
                    f"the discovery document names issuer {document.get('issuer')!r}, "
                    f"not {self.settings.issuer!r}"
                )
            self._metadata = document
        return document

    def _fetch(self) -> _KeySet:
        uri = self.metadata().get("jwks_uri")
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise ProviderUnreachable("the discovery document has no jwks_uri")
        document = self._get_json(uri)
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise ProviderUnreachable("the JWKS document has no keys list")
        keys: dict[str, jwt.PyJWK] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a key type or algorithm this broker does not use
            keys[str(entry.get("kid", ""))] = key
        return _KeySet(keys, self._clock())

    def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = self._http.get(url, timeout=self.settings.http_timeout_seconds)
        except httpx.HTTPError as exc:
            raise ProviderUnreachable(f"{url}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code != 200:
            raise ProviderUnreachable(f"{url} answered {response.status_code}")
        try:
            document = response.json()
        except json.JSONDecodeError as exc:
            raise ProviderUnreachable(f"{url} did not answer JSON") from exc
        if not isinstance(document, dict):
            raise ProviderUnreachable(f"{url} did not answer a JSON object")
        return document


def _find(keys: _KeySet, kid: str | None) -> jwt.PyJWK | None:
    if kid is not None:
        return keys.by_kid.get(kid)
    return next(iter(keys.by_kid.values())) if len(keys.by_kid) == 1 else None


class OidcVerifier:
    """Checks a provider's JWT and names the broker user it stands for."""

    def __init__(self, settings: OidcSettings, keys: ProviderKeys) -> None:
        self.settings = settings
        self.keys = keys

    def verify(self, token: str, audience: str | None = None) -> dict[str, Any]:
        """The token's claims, or ``Unauthenticated`` saying what is wrong with it.

        ``audience``: what ``aud`` must hold; the broker's (``auth.oidc.audience``) by default,
        a client id for an ID token.
        """
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("invalid token: too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token: not a JWT") from None
        alg = header.get("alg")
        if alg not in self.settings.algorithms:
            raise Unauthenticated(f"invalid token: signature algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthenticated("invalid token: malformed key id")
        key = self.keys.key(kid)
        if key is None:
            raise Unauthenticated(
                f"invalid token: signing key {kid!r} is not one of the identity provider's"
            )
        if key.algorithm_name != alg:
            raise Unauthenticated(f"invalid token: key {kid!r} does not sign with {alg}")
        try:
            return jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=audience or self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("invalid token: expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("invalid token: not meant for this broker (aud)") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("invalid token: issued by another provider (iss)") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("invalid token: not valid yet (nbf/iat)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"invalid token: no {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("invalid token: bad signature") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token") from None

    def user_name(self, claims: Mapping[str, Any]) -> str:
        """The broker user the token names (``auth.oidc.user_claim``)."""
        name = claims.get(self.settings.user_claim)
        if not isinstance(name, str) or not name:
            raise Unauthenticated(
                f"the token names no broker user (no {self.settings.user_claim} claim)"
            )
        return name


class OidcAuthenticator:
    """Turns a provider's JWT into the calling ``Actor`` (see ``broker.api.deps.get_actor``)."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        oidc = settings.auth.oidc
        if not oidc.enabled:
            raise ValueError("auth.oidc is not enabled")
        self.settings = settings
        self.oidc = oidc
        self.http = http or httpx.Client(follow_redirects=False)
        self.verifier = OidcVerifier(oidc, ProviderKeys(oidc, self.http, clock))

    def close(self) -> None:
        self.http.close()

    def authenticate(self, sessions: sessionmaker[Session], token: str) -> Actor:
        """Verify ``token`` (outside any transaction: it may fetch keys) and resolve its user."""
        claims = self.verifier.verify(token)
        return self.actor_for(sessions, self.verifier.user_name(claims), claims)

    def actor_for(
        self, sessions: sessionmaker[Session], name: str, claims: Mapping[str, Any]
    ) -> Actor:
        """The broker user ``name`` that verified ``claims`` stand for, created where configured;
        ``Unauthenticated`` if the broker does not know them and may not create them."""
        actor = _actor_named(sessions, name)
        if actor is None:
            self._create_user(sessions, name, claims)
            actor = _actor_named(sessions, name)
        if actor is None:
            raise Unauthenticated(f"user {name} cannot be created")
        return actor

    def _create_user(
        self, sessions: sessionmaker[Session], name: str, claims: Mapping[str, Any]
    ) -> None:
        if self.oidc.unknown_users == "refuse":
            raise Unauthenticated(f"user {name} is not known to the broker; ask an admin")
        email = claims.get("email")
        try:
            body = UserCreate(
                name=name, role="researcher", email=email if isinstance(email, str) else None
            )
        except ValueError:
            try:
                body = UserCreate(name=name, role="researcher")
            except ValueError:
                raise Unauthenticated(f"{name!r} cannot be a broker user name") from None
        # Its own transaction: concurrent first requests of one person race to create them, and
        # the losers (a unique-key conflict; on SQLite, a write lock lost to the winner) read
        # the winner's row afterwards.
        try:
            with transaction(sessions) as session:
                create_user(session, "oidc", body, self.settings)
        except (Conflict, IntegrityError, OperationalError) as exc:
            log.debug("creating user %s at first sign-in lost a race: %s", name, exc)
            return
        log.info("created user %s (researcher, no projects) at first sign-in through OIDC", name)


def _actor_named(sessions: sessionmaker[Session], name: str) -> Actor | None:
    with sessions() as session:
        user = session.scalar(select(UserRecord).where(UserRecord.name == name))
        if user is None:
            return None
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
