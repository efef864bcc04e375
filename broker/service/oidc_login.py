"""The web pages' sign-in at the site's OpenID provider: authorization code flow with PKCE.

``OidcLogin.begin`` returns the URL to send the browser to and a ``PendingLogin`` (state, nonce,
PKCE verifier) that the caller keeps in the browser's session until the provider redirects back;
``OidcLogin.finish`` takes that redirect's query parameters, exchanges the code at the token
endpoint (with the verifier and the client's secret) and checks the ID token (signature from the
provider's keys, ``iss``, ``aud`` = the client id, ``exp``, ``nonce``) before naming the user.

The pages' routes (``broker/ui``) own the session and the redirect URI; this module owns the
protocol. Keys and the discovery document are shared with the API's token check
(``broker.service.oidc``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlencode, urlsplit

import httpx
from sqlalchemy.orm import Session, sessionmaker

from broker.errors import Unauthenticated
from broker.service.identity import Actor
from broker.service.oidc import OidcAuthenticator, ProviderUnreachable

log = logging.getLogger(__name__)

SCOPE = "openid profile email"
PENDING_LOGIN_SECONDS = 600
"""A sign-in not finished within this long is refused (the person starts over)."""


class LoginFailed(Unauthenticated):
    """The provider's redirect cannot be accepted (state, error, code exchange, ID token)."""


@dataclass(frozen=True)
class PendingLogin:
    """What the browser's session holds between ``begin`` and ``finish``. Secret to that
    browser (the verifier proves the code exchange is by whoever started the sign-in)."""

    state: str
    nonce: str
    code_verifier: str
    redirect_uri: str
    started_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "nonce": self.nonce,
            "code_verifier": self.code_verifier,
            "redirect_uri": self.redirect_uri,
            "started_at": self.started_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PendingLogin:
        return cls(
            state=str(data["state"]),
            nonce=str(data["nonce"]),
            code_verifier=str(data["code_verifier"]),
            redirect_uri=str(data["redirect_uri"]),
            started_at=float(data["started_at"]),
        )


@dataclass(frozen=True)
class SignedIn:
    """A finished sign-in: the broker user and what the provider said about them."""

    user: str
    claims: dict[str, Any]
    """The ID token's verified claims."""
    id_token: str
    expires_at: float
    """When the ID token expires (Unix time): a sensible upper bound for the page session."""


def _pkce_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL (a CSP source, and what sign-out compares)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class OidcLogin:
    """The web client's side of the authorization code + PKCE flow."""

    def __init__(
        self,
        authenticator: OidcAuthenticator,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
    ) -> None:
        oidc = authenticator.oidc
        self.authenticator = authenticator
        self.client_id = client_id or oidc.web_client_id
        secret = oidc.web_client_secret
        self.client_secret = client_secret or (secret.get_secret_value() if secret else None)
        if not self.client_id:
            raise ValueError("auth.oidc.web_client_id is not configured")
        self._keys = authenticator.verifier.keys
        self._http = authenticator.http

    def _endpoint(self, name: str) -> str:
        try:
            value = self._keys.metadata().get(name)
        except ProviderUnreachable as exc:
            log.warning("web sign-in: %s", exc)
            raise LoginFailed("the identity provider cannot be reached; try again later") from None
        if not isinstance(value, str):
            raise LoginFailed(f"the identity provider has no {name}")
        return value

    def begin(self, redirect_uri: str) -> tuple[str, PendingLogin]:
        """The provider's authorization URL to redirect the browser to, and what to keep."""
        pending = PendingLogin(
            state=secrets.token_urlsafe(24),
            nonce=secrets.token_urlsafe(24),
            code_verifier=secrets.token_urlsafe(64),
            redirect_uri=redirect_uri,
            started_at=time.time(),
        )
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": redirect_uri,
                "scope": SCOPE,
                "state": pending.state,
                "nonce": pending.nonce,
                "code_challenge": _pkce_challenge(pending.code_verifier),
                "code_challenge_method": "S256",
            }
        )
        endpoint = self._endpoint("authorization_endpoint")
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}", pending

    def sign_out_url(self, after: str) -> str | None:
        """Where to send the browser to end its session at the provider (RP-initiated logout),
        coming back to ``after``; None when the provider offers no ``end_session_endpoint`` or
        cannot be reached (the broker's own session has ended either way)."""
        try:
            endpoint = self._keys.metadata().get("end_session_endpoint")
        except ProviderUnreachable as exc:
            log.warning("web sign-out: the provider's session stays: %s", exc)
            return None
        if not isinstance(endpoint, str):
            return None
        if origin_of(endpoint) != origin_of(self.authenticator.oidc.issuer):
            # The pages' CSP lets a form post end at the issuer's origin only.
            log.warning("web sign-out: end_session_endpoint %s is not at the issuer", endpoint)
            return None
        query = urlencode({"client_id": self.client_id, "post_logout_redirect_uri": after})
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    def finish(self, pending: PendingLogin, params: Mapping[str, str]) -> SignedIn:
        """Check the provider's redirect (its query ``params``), exchange the code, verify the
        ID token; ``LoginFailed`` with a reason a person can act on otherwise."""
        if time.time() - pending.started_at > PENDING_LOGIN_SECONDS:
            raise LoginFailed("the sign-in took too long; start again")
        if not hmac.compare_digest(params.get("state", ""), pending.state):
            raise LoginFailed("the sign-in answer does not belong to this browser (state)")
        issuer = params.get("iss")
        if issuer is not None and issuer != self.authenticator.oidc.issuer:
            raise LoginFailed("the sign-in answer comes from another provider (iss)")
        if "error" in params:
            why = params.get("error_description") or params["error"]
            raise LoginFailed(f"the identity provider refused the sign-in: {why}")
        code = params.get("code")
        if not code:
            raise LoginFailed("the sign-in answer has no code")
        tokens = self._exchange(code, pending)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise LoginFailed("the identity provider returned no ID token")
        verifier = self.authenticator.verifier
        claims = verifier.verify(id_token, audience=self.client_id)
        if not hmac.compare_digest(str(claims.get("nonce", "")), pending.nonce):
            raise LoginFailed("the ID token was not issued for this sign-in (nonce)")
        azp = claims.get("azp")
        if azp is not None and azp != self.client_id:
            raise LoginFailed("the ID token was issued to another client (azp)")
        return SignedIn(
            user=verifier.user_name(claims),
            claims=claims,
            id_token=id_token,
            expires_at=float(claims["exp"]),
        )

    def actor(self, sessions: sessionmaker[Session], signed_in: SignedIn) -> Actor:
        """The broker's ``Actor`` for a finished sign-in (unknown users as configured)."""
        return self.authenticator.actor_for(sessions, signed_in.user, signed_in.claims)

    def _exchange(self, code: str, pending: PendingLogin) -> dict[str, Any]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": pending.redirect_uri,
            "code_verifier": pending.code_verifier,
        }
        headers = {"Accept": "application/json"}
        if self.client_secret:
            # client_secret_basic: each part form-encoded first (RFC 6749, 2.3.1).
            pair = f"{quote_plus(self.client_id)}:{quote_plus(self.client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = self.client_id
        endpoint = self._endpoint("token_endpoint")
        try:
            response = self._http.post(
                endpoint,
                data=form,
                headers=headers,
                timeout=self.authenticator.oidc.http_timeout_seconds,
            )
        except httpx.HTTPError as exc:
            log.warning("web sign-in: token endpoint %s: %s", endpoint, exc)
            raise LoginFailed("the identity provider cannot be reached; try again later") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            error = (
                (body.get("error_description") or body.get("error"))
                if isinstance(body, dict)
                else None
            )
            log.warning("web sign-in: code exchange answered %d: %s", response.status_code, error)
            raise LoginFailed(f"the identity provider refused the code: {error or 'no reason'}")
        return body
