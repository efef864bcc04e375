"""The web pages' provider sign-in routes (``/ui/auth/login``, ``/ui/auth/callback``) through
HTTP, against the real provider: the person's part at the provider is done by the form-filling
browser of tests/oidc_provider.py, the broker's part by the app itself."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from broker.api.app import create_app
from broker.db.models import UiSessionRecord, UserRecord
from broker.ui.pages import OIDC_PENDING_COOKIE
from tests.broker.harness import Env, build_env
from tests.broker.test_ui_pages import csrf_of, new_token
from tests.oidc_provider import (
    PASSWORDS,
    UI_SECRET,
    Browser,
    Provider,
    free_port,
    provider_settings,
)

BROKER = "http://127.0.0.1:8080"
"""The broker-ui client's default redirect URI at the provider is this broker's callback."""


def broker_env(tmp_path: Path, provider: Provider | None, **oidc: Any) -> Env:
    auth = None
    if provider is not None:
        settings = provider_settings(
            provider, web_client_id="broker-ui", web_client_secret=UI_SECRET, **oidc
        )
        auth = {"oidc": settings}
    return build_env(f"sqlite:///{tmp_path}/broker.db", auth=auth)


@pytest.fixture
def env(tmp_path: Path, provider: Provider) -> Iterator[Env]:
    environment = broker_env(tmp_path, provider)
    yield environment
    environment.runtime.close()


def page_client(env: Env) -> TestClient:
    return TestClient(create_app(env.runtime), base_url=BROKER, follow_redirects=False)


def at_provider(provider: Provider, start: httpx.Response, user: str, password: str) -> str:
    """The person at the provider: open its page, sign in; the URL it sends them back to."""
    assert start.status_code == 303, start.text
    browser = Browser(provider)
    try:
        page = browser.go("GET", start.headers["location"])
        back = browser.sign_in(page, user, password)
    finally:
        browser.close()
    assert back.is_redirect, back.text[:300]
    location: str = back.headers["location"]
    assert location.startswith(f"{BROKER}/ui/auth/callback?")
    return location


def callback(client: TestClient, location: str) -> httpx.Response:
    parts = urlsplit(location)
    answer: httpx.Response = client.get(f"{parts.path}?{parts.query}")
    return answer


def test_sign_in_at_the_provider_starts_a_page_session(provider: Provider, env: Env) -> None:
    client = page_client(env)
    login_page = client.get("/ui/login?next=/ui/projects")
    assert 'href="/ui/auth/login?next=%2Fui%2Fprojects"' in login_page.text
    assert "Sign in with 127.0.0.1" in login_page.text  # the issuer's host, with no label set

    start = client.get("/ui/auth/login?next=/ui/projects")
    query = parse_qs(urlsplit(start.headers["location"]).query)
    assert query["code_challenge_method"] == ["S256"] and query["client_id"] == ["broker-ui"]
    assert query["redirect_uri"] == [f"{BROKER}/ui/auth/callback"]
    cookie = start.headers["set-cookie"]
    assert cookie.startswith(f"{OIDC_PENDING_COOKIE}=")
    for attribute in ("HttpOnly", "SameSite=lax", "Path=/ui/auth", "Max-Age=600"):
        assert attribute in cookie

    location = at_provider(provider, start, "alice", PASSWORDS["alice"])
    answer = callback(client, location)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/ui/projects"
    assert f'{OIDC_PENDING_COOKIE}=""' in answer.headers["set-cookie"]  # used up
    jobs = client.get("/ui/jobs")
    assert jobs.status_code == 200 and "alice" in jobs.text
    with env.runtime.sessions() as session:
        vias = session.scalars(select(UiSessionRecord.via)).all()
    assert vias == ["oidc"]

    # The same answer again (a replay, or the back button): no sign-in in progress any more.
    fresh = page_client(env)
    again = callback(fresh, location)
    assert again.status_code == 400
    assert "was not started in this browser" in again.text
    assert fresh.get("/ui/jobs").status_code == 303


def test_the_page_after_sign_in_is_one_of_these_pages(provider: Provider, env: Env) -> None:
    client = page_client(env)
    for target in ("https://evil.example/", "//evil.example/ui/", "/v1/users"):
        start = client.get("/ui/auth/login", params={"next": target})
        location = at_provider(provider, start, "alice", PASSWORDS["alice"])
        answer = callback(client, location)
        assert answer.headers["location"] == "/ui/jobs", target


def test_a_refusal_or_a_forged_answer_shows_a_page_not_a_500(provider: Provider, env: Env) -> None:
    client = page_client(env)
    start = client.get("/ui/auth/login")
    state = parse_qs(urlsplit(start.headers["location"]).query)["state"][0]
    denied = client.get(
        "/ui/auth/callback",
        params={"error": "access_denied", "error_description": "consent denied", "state": state},
    )
    assert denied.status_code == 400
    assert "the identity provider refused the sign-in: consent denied" in denied.text
    # A garbled pending-sign-in cookie is refused the same way.
    client.cookies.set(OIDC_PENDING_COOKIE, "not-base64-json!", path="/ui/auth")
    garbled = client.get("/ui/auth/callback", params={"code": "x", "state": "y"})
    assert garbled.status_code == 400 and "not started in this browser" in garbled.text
    assert client.get("/ui/jobs").status_code == 303


def test_unknown_users_follow_the_setting(provider: Provider, tmp_path: Path) -> None:
    refusing = broker_env(tmp_path / "refuse", provider)
    try:
        client = page_client(refusing)
        location = at_provider(provider, client.get("/ui/auth/login"), "admin", PASSWORDS["admin"])
        answer = callback(client, location)
        assert answer.status_code == 400
        assert "not known to the broker" in answer.text
        assert client.get("/ui/jobs").status_code == 303
    finally:
        refusing.runtime.close()

    creating = broker_env(tmp_path / "create", provider, unknown_users="create")
    try:
        client = page_client(creating)
        location = at_provider(provider, client.get("/ui/auth/login"), "admin", PASSWORDS["admin"])
        assert callback(client, location).status_code == 303
        assert client.get("/ui/jobs").status_code == 200
        with creating.runtime.sessions() as session:
            user = session.scalars(select(UserRecord).where(UserRecord.name == "admin")).one()
        assert user.role == "researcher"
    finally:
        creating.runtime.close()


def test_a_provider_that_is_down_gives_a_clear_page(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    down = Provider(port, f"http://127.0.0.1:{port}", tmp_path, "", {})
    environment = broker_env(tmp_path, down, http_timeout_seconds=1)
    try:
        client = page_client(environment)
        answer = client.get("/ui/auth/login")
        assert answer.status_code == 502
        assert "the identity provider cannot be reached" in answer.text
    finally:
        environment.runtime.close()


def test_without_a_web_client_only_token_sign_in_is_offered(tmp_path: Path) -> None:
    environment = broker_env(tmp_path, None)
    try:
        client = page_client(environment)
        assert "Sign in with" not in client.get("/ui/login").text
        assert client.get("/ui/auth/login").status_code == 404
        assert client.get("/ui/auth/callback?code=x&state=y").status_code == 404
    finally:
        environment.runtime.close()


def test_behind_a_tls_proxy_the_redirect_uri_is_the_public_one(
    provider: Provider, tmp_path: Path
) -> None:
    environment = broker_env(tmp_path, provider)
    settings = environment.runtime.settings
    public = settings.server.model_copy(update={"public_url": "https://broker.example.org/"})
    runtime = replace(environment.runtime, settings=settings.model_copy(update={"server": public}))
    try:
        client = TestClient(create_app(runtime), base_url=BROKER, follow_redirects=False)
        start = client.get("/ui/auth/login")
        query = parse_qs(urlsplit(start.headers["location"]).query)
        assert query["redirect_uri"] == ["https://broker.example.org/ui/auth/callback"]
    finally:
        environment.runtime.close()


def test_signing_out_ends_the_session_at_the_provider_too(provider: Provider, env: Env) -> None:
    """On a shared terminal, "Sign out" must not leave the provider's session behind: the next
    "Sign in with ..." in that browser would go through without a password, as the last user."""
    client = page_client(env)
    csp = client.get("/ui/login").headers["content-security-policy"]
    assert f"form-action 'self' {provider.issuer};" in csp  # the sign-out form may end there
    browser = Browser(provider)
    try:

        def start_at_provider() -> httpx.Response:
            start = client.get("/ui/auth/login")
            assert start.status_code == 303, start.text
            return browser.go("GET", start.headers["location"])

        back = browser.sign_in(start_at_provider(), "alice", PASSWORDS["alice"])
        assert callback(client, back.headers["location"]).status_code == 303
        # The premise: while the provider's session lasts, signing in again asks for nothing.
        silent = start_at_provider()
        assert silent.is_redirect, silent.text[:300]
        assert silent.headers["location"].startswith(f"{BROKER}/ui/auth/callback?")

        out = client.post("/ui/logout", data={"csrf_token": csrf_of(client.get("/ui/jobs").text)})
        assert out.status_code == 303
        end_session = out.headers["location"]
        query = parse_qs(urlsplit(end_session).query)
        assert end_session.startswith(f"{provider.issuer}/session/end?")
        assert query == {
            "client_id": ["broker-ui"],
            "post_logout_redirect_uri": [f"{BROKER}/ui/login"],
        }
        assert client.get("/ui/jobs").status_code == 303  # the broker's session ended at once

        returned = browser.sign_out(end_session)
        assert returned.is_redirect and returned.headers["location"] == f"{BROKER}/ui/login"
        again = start_at_provider()
        assert again.status_code == 200 and 'name="password"' in again.text  # asked again
    finally:
        browser.close()


@pytest.mark.parametrize("how", ["token", "setting off"])
def test_a_sign_out_that_does_not_involve_the_provider_goes_to_the_sign_in_page(
    provider: Provider, tmp_path: Path, how: str
) -> None:
    # A token's session with the setting on; a provider's session with it off.
    environment = broker_env(tmp_path, provider, web_sign_out_at_provider=how == "token")
    try:
        client = page_client(environment)
        if how == "token":
            secret, _ = new_token(environment, "alice")
            form = client.get("/ui/login")
            signed = client.post(
                "/ui/login",
                data={"token": secret, "csrf_token": csrf_of(form.text), "next": ""},
            )
        else:
            start = client.get("/ui/auth/login")
            signed = callback(client, at_provider(provider, start, "alice", PASSWORDS["alice"]))
        assert signed.status_code == 303, signed.text
        out = client.post("/ui/logout", data={"csrf_token": csrf_of(client.get("/ui/jobs").text)})
        assert (out.status_code, out.headers["location"]) == (303, "/ui/login")
        if how == "setting off":
            assert "form-action 'self';" in out.headers["content-security-policy"]
    finally:
        environment.runtime.close()
