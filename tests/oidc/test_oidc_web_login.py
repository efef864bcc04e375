"""The web pages' sign-in protocol (``broker.service.oidc_login``) against the real provider: the
browser part through its real authorization endpoint and login form, the code exchange and the
ID token check by the broker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from broker.errors import Unauthenticated
from broker.service.oidc_login import LoginFailed, OidcLogin, PendingLogin
from tests.broker.harness import Env, build_env
from tests.oidc_provider import PASSWORDS, UI_SECRET, Browser, Provider, provider_settings

CALLBACK = "http://127.0.0.1:8080/ui/auth/callback"
"""The provider's default redirect URI for the broker-ui client (deploy/oidc/server.mjs)."""


@pytest.fixture
def env(tmp_path: Path, provider: Provider) -> Iterator[Env]:
    oidc = provider_settings(provider, web_client_id="broker-ui", web_client_secret=UI_SECRET)
    environment = build_env(f"sqlite:///{tmp_path}/broker.db", auth={"oidc": oidc})
    yield environment
    environment.runtime.close()


@pytest.fixture
def login(env: Env) -> OidcLogin:
    assert env.runtime.oidc is not None
    return OidcLogin(env.runtime.oidc)


def sign_in_at_provider(
    provider: Provider, url: str, user: str, password: str | None = None
) -> httpx.Response:
    """A person's browser: open the authorization URL, sign in, end at the redirect back."""
    browser = Browser(provider)
    try:
        page = browser.go("GET", url)
        return browser.sign_in(page, user, password or PASSWORDS[user])
    finally:
        browser.close()


def callback_params(response: httpx.Response) -> dict[str, str]:
    assert response.is_redirect, response.text[:300]
    location = response.headers["location"]
    assert location.startswith(CALLBACK + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def test_sign_in_with_code_and_pkce_names_the_broker_user(
    login: OidcLogin, provider: Provider, env: Env
) -> None:
    url, pending = login.begin(CALLBACK)
    query = parse_qs(urlsplit(url).query)
    assert url.startswith(provider.issuer + "/auth?")
    assert query["code_challenge_method"] == ["S256"]
    assert query["code_challenge"] != [pending.code_verifier]

    params = callback_params(sign_in_at_provider(provider, url, "alice"))
    assert params["state"] == pending.state
    # The pending login survives a round trip through the page session (JSON).
    signed_in = login.finish(PendingLogin.from_dict(pending.to_dict()), params)
    assert signed_in.user == "alice"
    assert signed_in.claims["nonce"] == pending.nonce
    assert signed_in.claims["aud"] == "broker-ui"
    actor = login.actor(env.runtime.sessions, signed_in)
    assert (actor.name, actor.role) == ("alice", "researcher")

    # A code is good for one exchange only.
    with pytest.raises(LoginFailed, match="refused the code"):
        login.finish(pending, params)


def test_an_answer_for_another_sign_in_is_refused(login: OidcLogin, provider: Provider) -> None:
    url, pending = login.begin(CALLBACK)
    params = callback_params(sign_in_at_provider(provider, url, "alice"))
    # An attacker's callback link (their state) in the victim's browser: CSRF on the sign-in.
    _, other = login.begin(CALLBACK)
    with pytest.raises(LoginFailed, match="state"):
        login.finish(other, params)
    # The right state but another verifier: the code was not obtained by this browser (PKCE).
    stolen = replace(pending, code_verifier=other.code_verifier)
    with pytest.raises(LoginFailed, match="refused the code"):
        login.finish(stolen, params)


def test_a_wrong_password_never_reaches_the_callback(login: OidcLogin, provider: Provider) -> None:
    url, _ = login.begin(CALLBACK)
    answer = sign_in_at_provider(provider, url, "alice", password="guess")
    assert answer.status_code == 401
    assert "Wrong user name or password" in answer.text


def test_a_user_the_broker_does_not_know_is_refused(
    login: OidcLogin, provider: Provider, env: Env
) -> None:
    url, pending = login.begin(CALLBACK)
    signed_in = login.finish(pending, callback_params(sign_in_at_provider(provider, url, "admin")))
    assert signed_in.user == "admin"
    with pytest.raises(Unauthenticated, match="not known to the broker"):
        login.actor(env.runtime.sessions, signed_in)
