"""Signing in at the site's OpenID provider with the device authorization grant (RFC 8628).

The command line asks the provider for a code, the person opens the link on any device with a
browser and signs in there, and the command polls the token endpoint until the provider answers
with a token (or refuses, or the code expires). No password passes through the broker or the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from broker.cli.errors import BadUrl, BrokerUnreachable, CliError, ExitCode

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_INTERVAL = 5.0
"""RFC 8628: poll every 5 s unless the provider says otherwise."""
TIMEOUT = 15.0


class SignInFailed(CliError):
    """The provider refused the sign-in, or the code expired before it was used."""

    exit_code = ExitCode.AUTH


@dataclass(frozen=True)
class DeviceCode:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float


@dataclass(frozen=True)
class TokenAnswer:
    access_token: str
    expires_in: float | None


class DeviceFlow:
    """One provider (found through its discovery document) and one client id."""

    def __init__(
        self,
        issuer: str,
        client_id: str,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self._sleep = sleep
        self._http = httpx.Client(timeout=TIMEOUT, transport=transport)
        discovery = self._json("GET", self.issuer + "/.well-known/openid-configuration")
        if str(discovery.get("issuer", "")).rstrip("/") != self.issuer:
            raise SignInFailed(
                f"{issuer} is not the issuer its discovery document names "
                f"({discovery.get('issuer')!r})"
            )
        device = discovery.get("device_authorization_endpoint")
        token = discovery.get("token_endpoint")
        if not isinstance(device, str) or not isinstance(token, str):
            raise SignInFailed(f"the provider at {issuer} offers no device sign-in")
        self.device_endpoint = device
        self.token_endpoint = token

    def close(self) -> None:
        self._http.close()

    def start(self, scope: str, audience: str | None) -> DeviceCode:
        """Ask for a user code (``audience``: the broker's resource indicator, if it needs one)."""
        form = {"client_id": self.client_id, "scope": scope}
        if audience:
            form["resource"] = audience
        answer = self._json("POST", self.device_endpoint, data=form)
        try:
            return DeviceCode(
                device_code=str(answer["device_code"]),
                user_code=str(answer["user_code"]),
                verification_uri=str(answer["verification_uri"]),
                verification_uri_complete=answer.get("verification_uri_complete"),
                expires_in=float(answer.get("expires_in", 600)),
                interval=float(answer.get("interval", DEFAULT_INTERVAL)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SignInFailed(f"the provider's device answer lacks {exc}") from None

    def wait_for_token(self, code: DeviceCode) -> TokenAnswer:
        """Poll until the person has signed in; ``SignInFailed`` if refused or expired."""
        deadline = time.monotonic() + code.expires_in
        interval = code.interval
        form = {"grant_type": DEVICE_GRANT, "device_code": code.device_code}
        form["client_id"] = self.client_id
        while True:
            self._sleep(interval)
            answer = self._json("POST", self.token_endpoint, data=form, errors_ok=True)
            error = answer.get("error")
            if error is None and isinstance(answer.get("access_token"), str):
                expires = answer.get("expires_in")
                return TokenAnswer(
                    answer["access_token"],
                    float(expires) if isinstance(expires, int | float) else None,
                )
            if error == "authorization_pending":
                pass
            elif error == "slow_down":
                interval += 5  # RFC 8628, 3.5
            elif error == "access_denied":
                raise SignInFailed("the sign-in was refused at the provider")
            elif error == "expired_token":
                raise SignInFailed("the code expired before it was used: run broker login again")
            else:
                description = answer.get("error_description") or ""
                raise SignInFailed(f"the provider refused the sign-in: {error} {description}")
            if time.monotonic() > deadline:
                raise SignInFailed("the code expired before it was used: run broker login again")

    def _json(
        self, method: str, url: str, *, data: dict[str, str] | None = None, errors_ok: bool = False
    ) -> dict[str, Any]:
        try:
            response = self._http.request(method, url, data=data)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise BadUrl(f"invalid identity provider URL {url!r}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise BrokerUnreachable(f"cannot reach the identity provider at {url}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or (response.status_code >= 400 and not errors_ok):
            detail = body.get("error_description") if isinstance(body, dict) else None
            raise SignInFailed(
                f"the identity provider answered {response.status_code} at {url}"
                + (f": {detail}" if detail else "")
            )
        return body
