"""The real local OpenID provider (deploy/oidc, node-oidc-provider) for tests, and a small
form-filling "browser" that signs in through its real pages: the device flow's code page, the
login form, the authorization endpoint. Tokens come from the provider's own endpoints, never
from the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
OIDC_DIR = REPO / "deploy" / "oidc"
AUDIENCE = "urn:aifactory:broker"
OTHER_AUDIENCE = "urn:aifactory:other-service"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ROBOT_SECRET = "dev-only-broker-robot-secret"
UI_SECRET = "dev-only-broker-ui-secret"
PASSWORDS = {
    "alice": "alice-dev-password",
    "bob": "bob-dev-password",
    "admin": "admin-dev-password",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Provider:
    """One provider process started by deploy/oidc/up.sh, stopped by down.sh."""

    port: int
    issuer: str
    state_dir: Path
    admin_token: str
    env: dict[str, str]

    @classmethod
    def start(cls, state_dir: Path, port: int | None = None, **settings: str) -> Provider:
        port = port or free_port()
        env = {
            **os.environ,
            "OIDC_PORT": str(port),
            "OIDC_STATE_DIR": str(state_dir),
            **settings,
        }
        done = subprocess.run(
            ["bash", str(OIDC_DIR / "up.sh")], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        values = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        return cls(port, values["OIDC_ISSUER"], state_dir, values["OIDC_ADMIN_TOKEN"], env)

    @property
    def url(self) -> str:
        """Where this process listens (its issuer may name another host:port)."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        subprocess.run(["bash", str(OIDC_DIR / "down.sh")], env=self.env, check=True, timeout=30)

    def _admin(self, method: str, action: str = "") -> list[str]:
        response = httpx.request(
            method,
            f"{self.url}/admin/keys{'/' + action if action else ''}",
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        response.raise_for_status()
        return [key["kid"] for key in response.json()["keys"]]

    def key_ids(self) -> list[str]:
        """The published key ids, the signing one first."""
        return self._admin("GET")

    def rotate_keys(self) -> list[str]:
        return self._admin("POST", "rotate")

    def retire_old_keys(self) -> list[str]:
        return self._admin("POST", "retire")


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        given = {key: value or "" for key, value in attrs}
        if tag == "form":
            self.forms.append({"action": given.get("action", ""), "fields": {}})
        elif tag == "input" and self.forms and given.get("name"):
            self.forms[-1]["fields"][given["name"]] = given.get("value", "")


class _ToPort(httpx.HTTPTransport):
    """Sends every request to one port: for a provider whose issuer names another one."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(port=self.port)
        return super().handle_request(request)


class Browser:
    """Follows the provider's pages like a person would: submit each form, fill in the login,
    follow redirects within the provider and stop at one that leaves it (a client's callback)."""

    def __init__(self, provider: Provider) -> None:
        self.http = httpx.Client(transport=_ToPort(provider.port))
        issuer = httpx.URL(provider.issuer)
        # The provider's own pages: at its issuer's origin, or where it listens (requests to
        # the issuer's origin are sent there).
        self.origins = {(issuer.host, issuer.port), ("127.0.0.1", provider.port)}

    def close(self) -> None:
        self.http.close()

    def go(
        self, method: str, url: str | httpx.URL, data: Mapping[str, str] | None = None
    ) -> httpx.Response:
        response = self.http.request(method, url, data=data)
        for _ in range(20):
            if not response.is_redirect:
                return response
            location = response.url.join(response.headers["location"])
            if (location.host, location.port) not in self.origins:
                return response  # leaving the provider: the caller reads the Location
            response = self.http.get(location)
        raise AssertionError("too many redirects")

    def sign_in(self, start: httpx.Response, username: str, password: str) -> httpx.Response:
        """Submit the forms from ``start`` on (the login form with these credentials) until a
        page without a form, or a redirect away from the provider, ends the journey."""
        response = start
        for _ in range(10):
            if response.is_redirect or response.status_code == 401:
                return response
            parser = _Forms()
            parser.feed(response.text)
            if not parser.forms:
                return response
            form = parser.forms[0]
            fields: dict[str, str] = dict(form["fields"])
            if "username" in fields:
                fields.update(username=username, password=password)
            response = self.go("POST", response.url.join(form["action"]), fields)
        raise AssertionError("the sign-in did not finish within 10 pages")

    def sign_out(self, end_session_url: str) -> httpx.Response:
        """A person sent to the provider's sign-out page (RP-initiated logout) answering "Yes,
        sign me out"; the answer is the redirect back to the client (or the provider's page)."""
        page = self.go("GET", end_session_url)
        parser = _Forms()
        parser.feed(page.text)
        assert parser.forms, page.text[:500]
        form = parser.forms[0]
        return self.go("POST", page.url.join(form["action"]), {**form["fields"], "logout": "yes"})

    def approve_device(self, verification_uri_complete: str, username: str) -> httpx.Response:
        """A person opening the device flow's link and signing in there."""
        page = self.go("GET", verification_uri_complete)
        done = self.sign_in(page, username, PASSWORDS.get(username, "wrong"))
        assert "Sign-in Success" in done.text, done.text[:500]
        return done


def device_token(
    provider: Provider,
    username: str,
    *,
    client_id: str = "broker-cli",
    resource: str | None = None,
) -> dict[str, Any]:
    """A token response of the device flow, ``username`` signing in at the provider's pages."""
    browser = Browser(provider)
    try:
        data = {"client_id": client_id, "scope": "openid profile email"}
        if resource:
            data["resource"] = resource
        started = browser.http.post(f"{provider.url}/device/auth", data=data)
        started.raise_for_status()
        grant = started.json()
        browser.approve_device(grant["verification_uri_complete"], username)
        token = browser.http.post(
            f"{provider.url}/token",
            data={
                "client_id": client_id,
                "grant_type": DEVICE_GRANT,
                "device_code": grant["device_code"],
            },
        )
        assert token.status_code == 200, token.text
        body: dict[str, Any] = token.json()
        return body
    finally:
        browser.close()


def robot_token(provider: Provider, resource: str = AUDIENCE) -> str:
    """A client-credentials access token: a machine, no user."""
    response = httpx.post(
        f"{provider.url}/token",
        data={"grant_type": "client_credentials", "scope": "broker", "resource": resource},
        auth=("broker-robot", ROBOT_SECRET),
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def provider_settings(provider: Provider, **changes: Any) -> Mapping[str, Any]:
    """``[auth.oidc]`` for a broker that trusts ``provider``."""
    return {
        "enabled": True,
        "issuer": provider.issuer,
        "audience": AUDIENCE,
        "leeway_seconds": 0,
        "jwks_refresh_min_seconds": 0.2,
        **changes,
    }
