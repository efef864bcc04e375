"""Signing in to the web pages with the site's OpenID provider, in a real Chromium.

The provider is the real one (deploy/oidc, node-oidc-provider) on a free port, told to accept the
live broker's callback; the browser types the user name and password into the provider's own
login form. The broker runs on real PostgreSQL against the dev cluster, and the job submitted
after signing in runs there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.e2e.live import LiveBroker, dev_settings, free_port
from tests.e2e.test_ui_browser import CHROMIUM, alpha_only_project, fill_submit, job_id_of, shot
from tests.oidc_provider import PASSWORDS, UI_SECRET, Provider, provider_settings

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def broker_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory, broker_port: int) -> Iterator[Provider]:
    callback = f"http://127.0.0.1:{broker_port}/ui/auth/callback"
    started = Provider.start(tmp_path_factory.mktemp("oidc"), OIDC_UI_REDIRECT_URIS=callback)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def broker(e2e_database: str, provider: Provider, broker_port: int) -> Iterator[LiveBroker]:
    """A live broker whose web pages sign in with ``provider`` (its ``broker-ui`` client)."""
    oidc = provider_settings(
        provider,
        web_client_id="broker-ui",
        web_client_secret=UI_SECRET,
        web_login_label="the test provider",
        unknown_users="refuse",
    )
    settings = dev_settings(e2e_database, {"auth": {"oidc": oidc}})
    live = LiveBroker(settings, port=broker_port).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser: Browser, broker: LiveBroker) -> Iterator[BrowserContext]:
    context = browser.new_context(base_url=broker.url, viewport={"width": 1280, "height": 860})
    context.set_default_timeout(20_000)
    yield context
    context.close()


def to_provider_login(page: Page, provider: Provider, target: str = "/ui/jobs") -> None:
    """Open a page signed out, press "Sign in with ...", arrive at the provider's login form."""
    page.goto(target)
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    page.click("text=Sign in with the test provider")
    expect(page).to_have_url(re.compile(re.escape(provider.issuer) + r"/interaction/"))
    expect(page.locator("input[name=username]")).to_be_visible()


def type_credentials(page: Page, user: str, password: str) -> None:
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def test_alice_signs_in_at_the_provider_submits_a_job_and_signs_out(
    context: BrowserContext, broker: LiveBroker, provider: Provider
) -> None:
    admin = broker.client("root")
    project = alpha_only_project(admin, "alice", gpu_hours=2)
    page = context.new_page()

    page.goto("/ui/login")
    expect(page.locator("a.button", has_text="Sign in with the test provider")).to_be_visible()
    shot(page, "oidc-sign-in")
    to_provider_login(page, provider, target=f"/ui/projects/{project}")
    shot(page, "oidc-provider-login")
    type_credentials(page, "alice", PASSWORDS["alice"])

    # Back at the broker, on the page asked for, signed in as alice.
    expect(page).to_have_url(re.compile(rf"/ui/projects/{project}$"))
    expect(page.locator("body")).to_contain_text("alice")
    cookies = {c["name"]: c for c in context.cookies()}
    assert "broker_ui_oidc" not in cookies  # the sign-in in progress is used up
    page.goto("/ui/jobs")
    expect(page.locator("h1")).to_contain_text("My jobs")
    shot(page, "oidc-jobs")

    script = "#!/bin/bash\necho hello via the provider\n"
    fill_submit(page, project, "oidc-e2e", script, cluster="alpha")
    page.click("form.form-grid button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    job_id = job_id_of(page)
    expect(page.locator("#job-status .state").first).to_have_text("completed", timeout=120_000)
    expect(page.locator("pre#stdout")).to_contain_text("hello via the provider", timeout=30_000)
    shot(page, "oidc-job")
    job = broker.client("alice").http.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "completed" and job["user"] == "alice"

    # Sign-out ends the provider's session too (it asks to confirm), so that this browser's
    # next "Sign in with ..." asks for a password again instead of signing alice back in.
    page.click("button:has-text('Sign out')")
    expect(page).to_have_url(re.compile(re.escape(provider.issuer) + r"/session/end"))
    shot(page, "oidc-provider-sign-out")
    page.click("button:has-text('Yes, sign me out')")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.goto("/ui/jobs")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    to_provider_login(page, provider)  # the provider's login form, not a silent sign-in


def test_a_wrong_password_stays_at_the_provider(
    context: BrowserContext, provider: Provider
) -> None:
    page = context.new_page()
    to_provider_login(page, provider)
    type_credentials(page, "alice", "not-alices-password")
    expect(page.locator("[role=alert]")).to_contain_text("Wrong user name or password")
    assert page.url.startswith(provider.issuer)
    shot(page, "oidc-provider-wrong-password")
    # Still signed out at the broker.
    page.goto("/ui/jobs")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))


def test_a_callback_of_another_sign_in_is_refused(
    browser: Browser, context: BrowserContext, broker: LiveBroker, provider: Provider
) -> None:
    """Login CSRF: an attacker signs in at the provider and hands the victim the redirect back
    (its code and state). Neither browser ends up signed in."""
    started = httpx.get(f"{broker.url}/ui/auth/login", follow_redirects=False)
    assert started.status_code == 303
    attacker = browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        page = attacker.new_page()
        page.goto(started.headers["location"])
        type_credentials(page, "bob", PASSWORDS["bob"])
        # The attacker's browser never started that sign-in at the broker: refused.
        expect(page.locator(".problem")).to_contain_text("not started in this browser")
        stolen = page.url
        assert "/ui/auth/callback?" in stolen and "code=" in stolen
    finally:
        attacker.close()

    victim = context.new_page()
    to_provider_login(victim, provider)  # a sign-in of the victim's own is in progress
    response = victim.goto(stolen)
    assert response is not None and response.status == 400
    expect(victim.locator(".problem")).to_contain_text("does not belong to this browser")
    shot(victim, "oidc-refused")
    victim.goto("/ui/jobs")
    expect(victim).to_have_url(re.compile(r"/ui/login\?next="))


def test_a_refusal_at_the_provider_shows_its_reason(
    context: BrowserContext, broker: LiveBroker, provider: Provider
) -> None:
    """The provider redirecting back with an error (consent denied): a clear page, no session."""
    page = context.new_page()
    started = page.request.get("/ui/auth/login?next=/ui/projects", max_redirects=0)
    assert started.status == 303
    state = parse_qs(urlsplit(started.headers["location"]).query)["state"][0]
    query = urlencode({"error": "access_denied", "error_description": "denied", "state": state})
    response = page.goto(f"/ui/auth/callback?{query}")
    assert response is not None and response.status == 400
    expect(page.locator(".problem")).to_contain_text("refused the sign-in: denied")
    page.goto("/ui/jobs")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))


def test_an_unknown_user_is_refused_as_configured(
    context: BrowserContext, provider: Provider
) -> None:
    """``unknown_users = "refuse"``: the provider's "bob" is known, but "admin" is not a broker
    user of this broker (its admin is "root")."""
    page = context.new_page()
    to_provider_login(page, provider)
    type_credentials(page, "admin", PASSWORDS["admin"])
    expect(page.locator(".problem")).to_contain_text("Sign-in failed")
    page.goto("/ui/jobs")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
