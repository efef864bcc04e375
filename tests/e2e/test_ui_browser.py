"""The web pages in a real Chromium (Debian's ``chromium``, driven by Playwright), against a live
broker on real PostgreSQL and the real dev cluster.

Each test signs in with a broker token through the sign-in page, as a researcher would, and acts
only through the pages. The screenshots in docs/ui/ are taken here (docs/ui.md shows them).
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.e2e.live import Client, LiveBroker, new_project

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "docs" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HOSTILE = "<script>alert(1)</script>"
HOSTILE_OUTPUT = "<script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def shot(page: Page, name: str) -> None:
    """A screenshot of the whole page for docs/ui.md."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


class Session:
    """A signed-in browser context of one user, recording every dialog a page opens."""

    def __init__(self, browser: Browser, broker: LiveBroker, user: str) -> None:
        self.broker = broker
        self.context: BrowserContext = browser.new_context(
            base_url=broker.url, viewport={"width": 1280, "height": 860}
        )
        self.context.set_default_timeout(20_000)
        self.dialogs: list[str] = []
        self.csp_violations: list[str] = []
        self.page: Page = self.context.new_page()
        self.page.on("dialog", self._dialog)
        self.page.on("console", self._console)
        self.page.goto("/ui/jobs")  # not signed in: sent to the sign-in page
        expect(self.page).to_have_url(re.compile(r"/ui/login\?next="))
        self.page.fill("#token", broker.tokens[user])
        self.page.click("button[type=submit]")
        expect(self.page).to_have_url(re.compile(r"/ui/jobs$"))

    def _console(self, message: Any) -> None:
        if "Content Security Policy" in message.text:
            self.csp_violations.append(message.text)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def shot(self, name: str) -> None:
        shot(self.page, name)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def sign_in(browser: Browser, broker: LiveBroker) -> Iterator[Callable[[str], Session]]:
    sessions: list[Session] = []

    def open_as(user: str) -> Session:
        session = Session(browser, broker, user)
        sessions.append(session)
        return session

    yield open_as
    for session in sessions:
        assert session.dialogs == [], f"a page opened a dialog: {session.dialogs}"
        # The pages work under their own CSP: nothing they do is blocked.
        assert session.csp_violations == [], session.csp_violations
        session.close()


def alpha_only_project(admin: Client, member: str, gpu_hours: float) -> str:
    """A project with a Slurm account on alpha only: "let the broker choose" lands there."""
    name = f"p{uuid.uuid4().hex[:10]}"
    created = admin.http.post(
        "/v1/projects", json={"name": name, "slurm_accounts": {"alpha": name}}
    )
    assert created.status_code == 201, created.text
    assert admin.http.put(f"/v1/projects/{name}/members/{member}", json={}).status_code == 200
    now = datetime.now(UTC)
    quota = {
        "period_start": (now - timedelta(days=1)).isoformat(),
        "period_end": (now + timedelta(days=30)).isoformat(),
        "gpu_hours": gpu_hours,
        "gpu_type_weights": {"h100": 1.0},
    }
    assert admin.http.put(f"/v1/projects/{name}/quota", json=quota).status_code == 200
    return name


def fill_submit(page: Page, project: str, name: str, script: str, **fields: str) -> None:
    page.goto("/ui/submit")
    page.select_option("#project", project)
    page.fill("#name", name)
    page.fill("#gpus", fields.get("gpus", "1"))
    page.fill("#time_limit_minutes", fields.get("minutes", "10"))
    page.select_option("#cluster", fields.get("cluster", ""))
    page.fill("#script", script)


def job_id_of(page: Page) -> str:
    match = re.search(r"/ui/jobs/([0-9a-f-]{36})$", page.url)
    assert match, page.url
    return match.group(1)


def test_sign_in_page_refuses_a_bad_token(browser: Browser, broker: LiveBroker) -> None:
    context = browser.new_context(base_url=broker.url, viewport={"width": 1280, "height": 720})
    page = context.new_page()
    page.goto("/ui/login")
    shot(page, "sign-in")
    page.fill("#token", "brk_not-a-token")
    page.click("button[type=submit]")
    expect(page.locator(".problem")).to_contain_text("That token is not valid")
    response = page.goto("/ui/projects")
    assert response is not None and "/ui/login" in page.url
    context.close()


def test_researcher_submits_watches_output_cancels_and_sees_the_budget_move(
    broker: LiveBroker, sign_in: Callable[[str], Session]
) -> None:
    admin = broker.client("root")
    project = alpha_only_project(admin, "alice", gpu_hours=2)
    alice = sign_in("alice")
    page = alice.page

    page.goto(f"/ui/projects/{project}")
    expect(page.locator("#budget .remaining")).to_have_text("2.000")

    script = "#!/bin/bash\necho hello from the browser\nsleep 4\necho to stderr >&2\n"
    fill_submit(page, project, "ui-e2e", script, gpus="4", cluster="alpha")
    alice.shot("submit")
    page.click("form.form-grid button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    job_id = job_id_of(page)
    page.evaluate("window.notReloaded = true")
    # While it runs, the page follows the job without a reload: state, then output.
    expect(page.locator("#job-status .state").first).to_have_text(
        re.compile("pending|running|completed"), timeout=30_000
    )
    expect(page.locator("#job-status .state").first).to_have_text("completed", timeout=120_000)
    expect(page.locator("pre#stdout")).to_contain_text("hello from the browser", timeout=30_000)
    expect(page.locator("pre#stderr")).to_contain_text("to stderr", timeout=30_000)
    expect(page.locator("pre#stdout .eof")).to_have_count(1, timeout=30_000)
    assert page.evaluate("window.notReloaded") is True
    alice.shot("job")
    job = broker.client("alice").http.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "completed" and job["charged_gpu_hours"] > 0

    # Another job, placed by the broker (no cluster sent), cancelled through the confirmation.
    fill_submit(page, project, "to-cancel", "#!/bin/bash\nsleep 600\n", minutes="20")
    page.click("form.form-grid button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    cancel_id = job_id_of(page)
    assert broker.client("alice").http.get(f"/v1/jobs/{cancel_id}").json()["cluster"] == "alpha"
    expect(page.locator("#job-status .state").first).to_have_text(
        re.compile("pending|running"), timeout=30_000
    )
    page.goto(f"/ui/projects/{project}")
    expect(page.locator("#budget .reserved")).to_have_text("0.333")  # 1 GPU x 20 minutes
    alice.shot("project")
    # A second tab on the jobs list sees the cancellation without reloading.
    listing = alice.context.new_page()
    listing.on("console", alice._console)
    listing.goto(f"/ui/jobs?project={project}")
    row_state = listing.locator(f"tr[data-job='{cancel_id}'] .state")
    expect(row_state).to_have_text(re.compile("pending|running"))
    listing.evaluate("window.notReloaded = true")
    page.goto(f"/ui/jobs/{cancel_id}")
    page.click("text=Cancel job…")
    expect(page).to_have_url(re.compile(r"/cancel$"))
    alice.shot("cancel")
    page.click("text=Yes, cancel the job")
    expect(page).to_have_url(re.compile(rf"/ui/jobs/{cancel_id}$"))
    expect(page.locator("#job-status .state").first).to_have_text("cancelled", timeout=60_000)
    expect(row_state).to_have_text("cancelled", timeout=15_000)
    assert listing.evaluate("window.notReloaded") is True
    listing.close()

    # The jobs list shows both, live.
    page.goto(f"/ui/jobs?project={project}")
    expect(page.locator(f"tr[data-job='{job_id}'] .state")).to_have_text("completed")
    expect(page.locator(f"tr[data-job='{cancel_id}'] .state")).to_have_text("cancelled")
    alice.shot("jobs")

    # The project's bar moved: the charges are used, nothing stays reserved.
    page.goto(f"/ui/projects/{project}")
    expect(page.locator("#budget .reserved")).to_have_text("0.000", timeout=30_000)
    usage = broker.client("alice").http.get(f"/v1/projects/{project}/usage").json()
    used = float(page.locator("#budget .used").inner_text())
    remaining = float(page.locator("#budget .remaining").inner_text())
    assert usage["used_gpu_hours"] > 0.004  # 4 GPUs for 4 seconds at least
    assert used == pytest.approx(usage["used_gpu_hours"], abs=0.0005)
    assert remaining == pytest.approx(2 - usage["used_gpu_hours"], abs=0.0005)
    expect(page.locator("table.hbars").first).to_contain_text("alice")
    csv = alice.context.request.get(f"/ui/projects/{project}/jobs.csv")
    assert csv.status == 200 and csv.headers["content-type"].startswith("text/csv")
    assert job_id in csv.text() and cancel_id in csv.text()


def test_the_form_shows_the_apis_problems_by_the_field(
    broker: LiveBroker, sign_in: Callable[[str], Session]
) -> None:
    project = new_project(broker.client("root"), "alice", gpu_hours=1, max_gpus_per_job=4)
    alice = sign_in("alice")
    page = alice.page
    fill_submit(page, project, "too-big", "#!/bin/bash\ntrue\n", gpus="8", cluster="alpha")
    page.click("form.form-grid button[type=submit]")
    expect(page.locator("#gpus-error")).to_contain_text("limit-exceeded")
    # The same message as the API's problem document for the same request.
    api = broker.client("alice").http.post(
        "/v1/jobs",
        json={
            "project": project,
            "name": "too-big",
            "script": "#!/bin/bash\ntrue\n",
            "gpus": 8,
            "time_limit_minutes": 10,
            "cluster": "alpha",
        },
    )
    assert api.status_code == 422
    expect(page.locator("#gpus-error")).to_contain_text(api.json()["detail"])
    # A value the API's schema refuses: its validation message, by that field.
    fill_submit(page, project, "no-time", "#!/bin/bash\ntrue\n", minutes="0")
    page.click("form.form-grid button[type=submit]")
    expect(page.locator("#time_limit_minutes-error")).to_contain_text("greater than or equal to 1")
    # The budget: 409 quota-exceeded above the form, with the numbers.
    fill_submit(page, project, "costly", "#!/bin/bash\ntrue\n", gpus="4", minutes="600")
    page.select_option("#cluster", "alpha")
    page.click("form.form-grid button[type=submit]")
    expect(page.locator(".problem")).to_contain_text("quota-exceeded")
    # A schema error: the script's first line and a non-number.
    fill_submit(page, project, "bad", "echo no shebang\n", gpus="two", cluster="alpha")
    page.click("form.form-grid button[type=submit]")
    expect(page.locator("#script-error")).to_contain_text("must start with an interpreter line")
    expect(page.locator("#gpus-error")).to_contain_text("Input should be a valid integer")
    alice.shot("submit-problems")


def test_hostile_text_is_shown_as_text(
    broker: LiveBroker, sign_in: Callable[[str], Session]
) -> None:
    admin = broker.client("root")
    project = alpha_only_project(admin, "alice", gpu_hours=50)
    alice = sign_in("alice")
    page = alice.page
    # A job name with markup: refused by the API's pattern, echoed back in the field as text.
    script = f"#!/bin/bash\necho '{HOSTILE_OUTPUT}'\n"
    fill_submit(page, project, HOSTILE, script, cluster="alpha")
    page.click("form.form-grid button[type=submit]")
    expect(page.locator("#name-error")).to_contain_text("String should match pattern")
    assert page.input_value("#name") == HOSTILE
    # Output with markup: shown literally while it is followed.
    page.fill("#name", "hostile-output")
    page.click("form.form-grid button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    expect(page.locator("pre#stdout")).to_contain_text(HOSTILE_OUTPUT, timeout=120_000)
    assert page.locator("pre#stdout img").count() == 0
    scripts = page.eval_on_selector_all("script", "els => els.map(e => e.src)")
    assert all(src.endswith("/ui/static/htmx.min.js") for src in scripts), scripts
    # Free text an admin typed is no safer: a project description with markup.
    described = f"p{uuid.uuid4().hex[:10]}"
    created = admin.http.post(
        "/v1/projects", json={"name": described, "description": HOSTILE_OUTPUT}
    )
    assert created.status_code == 201, created.text
    assert admin.http.put(f"/v1/projects/{described}/members/alice", json={}).status_code == 200
    page.goto(f"/ui/projects/{described}")
    expect(page.locator("main")).to_contain_text(HOSTILE_OUTPUT)
    assert page.locator("main img").count() == 0
    page.wait_for_timeout(500)
    assert alice.dialogs == []


def test_a_researcher_cannot_open_another_projects_job(
    broker: LiveBroker, sign_in: Callable[[str], Session]
) -> None:
    admin = broker.client("root")
    theirs = alpha_only_project(admin, "bob", gpu_hours=10)
    created = broker.client("bob").http.post(
        "/v1/jobs",
        json={
            "project": theirs,
            "script": "#!/bin/bash\ntrue\n",
            "gpus": 1,
            "time_limit_minutes": 5,
            "name": "bobs",
        },
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    alice = sign_in("alice")
    for path in (
        f"/ui/jobs/{job_id}",
        f"/ui/jobs/{job_id}/cancel",
        f"/ui/jobs/{job_id}/output?stream=stdout",
        f"/ui/projects/{theirs}",
        f"/ui/projects/{theirs}/jobs.csv",
    ):
        response = alice.page.goto(path)
        assert response is not None and response.status == 404, path
    expect(alice.page.locator("h1")).to_have_text("Not found")
    unknown = alice.page.goto(f"/ui/jobs/{uuid.uuid4()}")
    assert unknown is not None and unknown.status == 404
    # Researchers have no admin or pool pages (403, as the API refuses them).
    for path in ("/ui/admin", "/ui/engineer", "/ui/admin/users/alice"):
        response = alice.page.goto(path)
        assert response is not None and response.status == 403, path
    nav = alice.page.locator("header nav").inner_text()
    assert "Admin" not in nav and "Pool" not in nav


def test_a_form_post_without_the_csrf_token_is_refused(
    broker: LiveBroker, sign_in: Callable[[str], Session]
) -> None:
    project = alpha_only_project(broker.client("root"), "alice", gpu_hours=10)
    alice = sign_in("alice")
    form = {
        "project": project,
        "name": "forged",
        "gpus": "1",
        "time_limit_minutes": "5",
        "script": "#!/bin/bash\ntrue\n",
    }
    # The browser's own cookies go with these posts, as with a forged cross-site form.
    for extra in ({}, {"csrf_token": "not-the-token"}):
        refused = alice.context.request.post("/ui/submit", form={**form, **extra})
        assert refused.status == 403
    assert alice.context.request.post(f"/ui/jobs/{uuid.uuid4()}/cancel", form={}).status == 403
    assert alice.context.request.post("/ui/logout", form={}).status == 403
    jobs = broker.client("alice").http.get("/v1/jobs", params={"project": project}).json()
    assert jobs["data"] == []
    # The pages' headers: strict CSP, no framing, the cookie HttpOnly and SameSite.
    response = alice.page.goto("/ui/jobs")
    assert response is not None
    headers = response.headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    (cookie,) = [c for c in alice.context.cookies() if c["name"] == "broker_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    # Signing out ends the session on the server: the old cookie no longer opens a page.
    alice.page.click("text=Sign out")
    expect(alice.page).to_have_url(re.compile(r"/ui/login$"))
    replay = alice.context.request.get(
        "/ui/jobs", headers={"cookie": f"broker_session={cookie['value']}"}, max_redirects=0
    )
    assert replay.status == 303


def test_an_admin_changes_a_quota_and_issues_a_token(
    broker: LiveBroker, sign_in: Callable[[str], Session]
) -> None:
    admin_api = broker.client("root")
    project = new_project(admin_api, "alice", gpu_hours=100)
    root = sign_in("root")
    page = root.page
    page.goto("/ui/admin")
    root.shot("admin")
    page.goto(f"/ui/admin/projects/{project}")
    page.fill("#gpu_hours", "-5")
    page.click("text=Save quota")
    expect(page.locator("#gpu_hours-error")).to_contain_text(
        "Input should be greater than or equal to 0"
    )
    page.fill("#gpu_hours", "250")
    page.fill("#max_gpus_per_job", "4")
    page.fill("#allowed_gpu_types", "h100, a100")
    page.click("text=Save quota")
    expect(page.locator(".notice")).to_have_text("Quota saved.")
    root.shot("admin-project")
    quota = admin_api.http.get(f"/v1/projects/{project}").json()["quota"]
    assert quota["gpu_hours"] == 250 and quota["max_gpus_per_job"] == 4
    assert quota["allowed_gpu_types"] == ["h100", "a100"]
    assert quota["gpu_type_weights"] == {"h100": 1.0, "a100": 0.5}  # kept as it was

    # The new limit holds at once for the researcher's next submission.
    alice = sign_in("alice")
    fill_submit(alice.page, project, "eight", "#!/bin/bash\ntrue\n", gpus="8", cluster="alpha")
    alice.page.click("form.form-grid button[type=submit]")
    expect(alice.page.locator("#gpus-error")).to_contain_text("gpus_per_job")

    page.goto("/ui/admin/users/alice")
    page.fill("input[name=description]", "laptop")
    page.click("button:has-text('Issue')")
    token = page.locator("#issued-token").inner_text().strip()
    assert token.startswith("brk_")
    me = Client(broker.url, token).http.get("/v1/me")
    assert me.status_code == 200 and me.json()["name"] == "alice"
    root.shot("admin-user")


def test_engineer_sees_the_pool(broker: LiveBroker, sign_in: Callable[[str], Session]) -> None:
    project = alpha_only_project(broker.client("root"), "alice", gpu_hours=20)
    queued = broker.client("alice").http.post(
        "/v1/jobs",
        json={
            "project": project,
            "script": "#!/bin/bash\nsleep 120\n",
            "gpus": 2,
            "time_limit_minutes": 5,
        },
    )
    assert queued.status_code == 201, queued.text
    eve = sign_in("eve")
    page = eve.page
    page.goto("/ui/engineer")
    expect(page.locator("h2", has_text="alpha")).to_be_visible()
    expect(page.locator(f"tr:has-text('{project}')")).to_contain_text("2")
    nav = page.locator("header nav").inner_text()
    assert "Pool" in nav and "Admin" not in nav and "Submit" not in nav
    eve.shot("engineer")
    response = page.goto("/ui/admin")
    assert response is not None and response.status == 403
