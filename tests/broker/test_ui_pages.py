"""The web pages' sessions and guards through HTTP, with scripted clusters behind the broker.

What a signed-in browser relies on: the session is on the server (sign-out, a revoked token, a
removed user or an expired session end it at once), every post needs the session's CSRF token,
pages carry a strict CSP, and the pages authorize exactly as the API does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from broker.api.app import create_app
from broker.clock import utcnow
from broker.db.engine import transaction
from broker.db.models import MembershipRecord, TokenRecord, UiSessionRecord, UserRecord
from broker.service import identity
from broker.ui.sessions import COOKIE
from tests.broker.harness import Env, build_env

SCRIPT = "#!/bin/bash\nsleep 1\n"


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    environment = build_env(f"sqlite:///{tmp_path}/ui.db", gpu_hours=100.0)
    yield environment
    environment.runtime.close()


@pytest.fixture
def app(env: Env) -> Any:
    return create_app(env.runtime)


def new_token(env: Env, user: str) -> tuple[str, str]:
    with transaction(env.runtime.sessions) as session:
        issued = identity.issue_token(session, "test", user, "ui")
    return issued.token, issued.id


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def signed_in(app: Any, env: Env, user: str, token: str | None = None) -> TestClient:
    client = TestClient(app, follow_redirects=False)
    form = client.get("/ui/login")
    assert form.status_code == 200
    answer = client.post(
        "/ui/login",
        data={
            "token": token or new_token(env, user)[0],
            "csrf_token": csrf_of(form.text),
            "next": "/ui/projects",
        },
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/ui/projects"
    return client


def test_pages_need_a_session_and_sign_in_takes_a_valid_token_once(app: Any, env: Env) -> None:
    client = TestClient(app, follow_redirects=False)
    answer = client.get("/ui/jobs?state=running")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/login?next=%2Fui%2Fjobs%3Fstate%3Drunning"
    # htmx polls are told where to go instead of swapping a sign-in page into a table.
    polled = client.get("/ui/jobs/rows", headers={"HX-Request": "true"})
    assert polled.headers["HX-Redirect"].startswith("/ui/login")
    form = client.get("/ui/login")
    bad = client.post(
        "/ui/login", data={"token": "brk_nope", "csrf_token": csrf_of(form.text), "next": ""}
    )
    assert bad.status_code == 401 and "That token is not valid" in bad.text
    assert COOKIE not in client.cookies
    # A sign-in form posted from elsewhere (no matching login cookie) is refused.
    elsewhere = TestClient(app, follow_redirects=False)
    forged = elsewhere.post(
        "/ui/login", data={"token": new_token(env, "alice")[0], "csrf_token": "x", "next": ""}
    )
    assert forged.status_code == 403 and COOKIE not in elsewhere.cookies
    alice = signed_in(app, env, "alice")
    cookie = alice.cookies[COOKIE]
    assert len(cookie) >= 40
    with env.runtime.sessions() as session:
        rows = session.query(UiSessionRecord).all()
    # Only the hash of the cookie is stored.
    assert len(rows) == 1 and rows[0].id_hash != cookie and rows[0].via == "token"


def test_sign_in_goes_only_to_pages_of_this_site(app: Any, env: Env) -> None:
    client = TestClient(app, follow_redirects=False)
    for target in ("https://evil.example/", "//evil.example/ui/", "/v1/me"):
        form = client.get("/ui/login", params={"next": target})
        answer = client.post(
            "/ui/login",
            data={
                "token": new_token(env, "alice")[0],
                "csrf_token": csrf_of(form.text),
                "next": target,
            },
        )
        assert answer.headers["location"] == "/ui/jobs"


def test_cookie_and_security_headers(app: Any, env: Env) -> None:
    client = TestClient(app, follow_redirects=False)
    form = client.get("/ui/login")
    csp = form.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert form.headers["x-frame-options"] == "DENY"
    answer = client.post(
        "/ui/login",
        data={"token": new_token(env, "alice")[0], "csrf_token": csrf_of(form.text), "next": ""},
    )
    cookie = next(
        v for k, v in answer.headers.multi_items() if k == "set-cookie" and v.startswith(COOKIE)
    )
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain HTTP here ...
    secure = TestClient(app, base_url="https://broker.example", follow_redirects=False)
    form = secure.get("/ui/login")
    answer = secure.post(
        "/ui/login",
        data={"token": new_token(env, "alice")[0], "csrf_token": csrf_of(form.text), "next": ""},
    )
    cookie = next(
        v for k, v in answer.headers.multi_items() if k == "set-cookie" and v.startswith(COOKIE)
    )
    assert "Secure" in cookie  # ... and Secure behind TLS
    # The API keeps its own answers: no page headers, problem documents.
    api = client.get("/v1/me")
    assert api.status_code == 401 and "content-security-policy" not in api.headers
    assert api.headers["content-type"].startswith("application/problem+json")


def test_every_post_needs_the_sessions_csrf_token(app: Any, env: Env) -> None:
    alice = signed_in(app, env, "alice")
    page = alice.get("/ui/submit")
    token = csrf_of(page.text)
    body = {
        "project": "climate",
        "gpus": "1",
        "time_limit_minutes": "5",
        "cluster": "alpha",
        "script": SCRIPT,
    }
    assert alice.post("/ui/submit", data=body).status_code == 403
    assert alice.post("/ui/submit", data={**body, "csrf_token": "wrong"}).status_code == 403
    # Another session's token is no good either: tokens are bound to their session.
    other = csrf_of(signed_in(app, env, "alice").get("/ui/submit").text)
    assert other != token
    assert alice.post("/ui/submit", data={**body, "csrf_token": other}).status_code == 403
    assert env.slurm["alpha"].jobs == {}  # nothing reached Slurm
    accepted = alice.post("/ui/submit", data={**body, "csrf_token": token})
    assert accepted.status_code == 303 and accepted.headers["location"].startswith("/ui/jobs/")
    # htmx sends the token as a header.
    job_id = accepted.headers["location"].rsplit("/", 1)[1]
    assert alice.post(f"/ui/jobs/{job_id}/cancel").status_code == 403
    cancelled = alice.post(f"/ui/jobs/{job_id}/cancel", headers={"X-CSRF-Token": token})
    assert cancelled.status_code == 303


def test_sign_out_and_a_revoked_token_end_the_session(app: Any, env: Env) -> None:
    alice = signed_in(app, env, "alice")
    assert alice.get("/ui/projects").status_code == 200
    token = csrf_of(alice.get("/ui/projects").text)
    cookie = alice.cookies[COOKIE]
    assert alice.post("/ui/logout", data={"csrf_token": token}).status_code == 303
    stale = TestClient(app, follow_redirects=False, cookies={COOKIE: cookie})
    assert stale.get("/ui/projects").status_code == 303

    secret, token_id = new_token(env, "alice")
    browser = signed_in(app, env, "alice", secret)
    assert browser.get("/ui/projects").status_code == 200
    with transaction(env.runtime.sessions) as session:
        identity.revoke_token(session, "test", "alice", token_id)
    assert browser.get("/ui/projects").status_code == 303


def test_a_changed_user_is_seen_at_once_and_sessions_expire(app: Any, env: Env) -> None:
    alice = signed_in(app, env, "alice")
    assert "climate" in alice.get("/ui/projects").text
    with transaction(env.runtime.sessions) as session:
        session.execute(update(UserRecord).where(UserRecord.name == "alice").values(role="admin"))
    assert alice.get("/ui/admin").status_code == 200
    with transaction(env.runtime.sessions) as session:
        session.execute(
            update(UserRecord).where(UserRecord.name == "alice").values(role="researcher")
        )
        session.query(MembershipRecord).filter(
            MembershipRecord.user_id == env.alice.user_id
        ).delete()
    assert alice.get("/ui/admin").status_code == 403
    assert alice.get("/ui/projects/climate").status_code == 404
    with transaction(env.runtime.sessions) as session:
        session.execute(
            update(UiSessionRecord).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert alice.get("/ui/projects").status_code == 303


def test_pages_authorize_as_the_api(app: Any, env: Env) -> None:
    bob = signed_in(app, env, "bob")
    token = csrf_of(bob.get("/ui/submit").text)
    created = bob.post(
        "/ui/submit",
        data={
            "csrf_token": token,
            "project": "other",
            "gpus": "1",
            "time_limit_minutes": "5",
            "cluster": "alpha",
            "script": SCRIPT,
        },
    )
    job_id = created.headers["location"].rsplit("/", 1)[1]
    alice = signed_in(app, env, "alice")
    for path in (
        f"/ui/jobs/{job_id}",
        f"/ui/jobs/{job_id}/status",
        f"/ui/jobs/{job_id}/cancel",
        f"/ui/jobs/{job_id}/output",
        "/ui/projects/other",
        "/ui/projects/other/jobs.csv",
        "/ui/projects/other/usage",
    ):
        assert alice.get(path).status_code == 404, path
    alice_token = csrf_of(alice.get("/ui/submit").text)
    forged = alice.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": alice_token})
    assert forged.status_code == 404
    # Alice may not submit into bob's project: the API's 404, by the project field.
    refused = alice.post(
        "/ui/submit",
        data={
            "csrf_token": alice_token,
            "project": "other",
            "gpus": "1",
            "time_limit_minutes": "5",
            "cluster": "alpha",
            "script": SCRIPT,
        },
    )
    assert refused.status_code == 404
    for path in ("/ui/admin", "/ui/admin/users/bob", "/ui/admin/projects/climate", "/ui/engineer"):
        assert alice.get(path).status_code == 403, path
    eve = signed_in(app, env, "eve")
    assert eve.get(f"/ui/jobs/{job_id}").status_code == 200
    assert eve.get("/ui/engineer").status_code == 200
    assert eve.get(f"/ui/jobs/{job_id}/cancel").status_code == 403
    assert eve.get("/ui/admin").status_code == 403


def test_the_submit_form_gives_the_apis_messages_by_the_field(app: Any, env: Env) -> None:
    alice = signed_in(app, env, "alice")
    token = csrf_of(alice.get("/ui/submit").text)
    hostile = "<script>alert(1)</script>"
    answer = alice.post(
        "/ui/submit",
        data={
            "csrf_token": token,
            "project": "climate",
            "name": hostile,
            "gpus": "0",
            "time_limit_minutes": "5",
            "script": "#SBATCH --array=1-9\n",
        },
    )
    assert answer.status_code == 422
    html = answer.text
    assert hostile not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    errors = dict(re.findall(r'<p class="field-error" id="([a-z_]+)-error">([^<]*)</p>', html))
    assert errors["gpus"] == "Input should be greater than or equal to 1"
    assert "String should match pattern" in errors["name"]
    assert "interpreter line" in errors["script"]
    # The API says the same for the same body.
    api_token = new_token(env, "alice")[0]
    problem = TestClient(app).post(
        "/v1/jobs",
        json={
            "project": "climate",
            "name": hostile,
            "gpus": 0,
            "time_limit_minutes": 5,
            "script": "#SBATCH --array=1-9\n",
        },
        headers={"Authorization": f"Bearer {api_token}"},
    )
    messages = {e["field"]: e["message"] for e in problem.json()["errors"]}
    assert messages["body.gpus"] == errors["gpus"]
    assert messages["body.script"].replace("'", "&#39;") == errors["script"]


def test_another_sign_in_method_starts_a_session_through_the_module(app: Any, env: Env) -> None:
    """The interface a federated sign-in (OIDC callback) uses once it knows the user's name."""
    from fastapi import Request
    from fastapi.responses import RedirectResponse

    from broker.errors import NotFound
    from broker.ui.sessions import start_session

    scope = {
        "type": "http",
        "scheme": "https",
        "server": ("broker.example", 443),
        "path": "/ui/login/oidc",
        "headers": [],
    }
    request = Request(scope)
    response = RedirectResponse("/ui/jobs", status_code=303)
    start_session(response, request, env.runtime, "alice", via="oidc")
    cookie = response.headers["set-cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie
    session_id = cookie.split(";", 1)[0].split("=", 1)[1]
    browser = TestClient(app, follow_redirects=False, cookies={COOKIE: session_id})
    assert browser.get("/ui/projects").status_code == 200
    with env.runtime.sessions() as session:
        (row,) = session.query(UiSessionRecord).all()
    assert row.via == "oidc" and row.token_id is None
    with pytest.raises(NotFound):
        start_session(response, request, env.runtime, "nobody", via="oidc")


def test_jobs_page_by_page_and_every_job_in_the_csv(tmp_path: Any) -> None:
    from broker.schemas import JobCreate

    env = build_env(f"sqlite:///{tmp_path}/pages.db", limits={"default_list_limit": 2})
    try:
        app = create_app(env.runtime)
        ids = []
        for n in range(3):
            body = JobCreate.model_validate(
                {
                    "project": "climate",
                    "name": f"j{n}",
                    "script": SCRIPT,
                    "gpus": 1,
                    "time_limit_minutes": 5,
                    "cluster": "alpha",
                }
            )
            ids.append(env.runtime.jobs.submit(env.alice, body, None).job.id)
        alice = signed_in(app, env, "alice")
        first = alice.get("/ui/jobs")
        shown = re.findall(r'data-job="([0-9a-f-]+)"', first.text)
        assert shown == [ids[2], ids[1]]
        older = re.search(r'href="(/ui/jobs\?[^"]+)">Older jobs', first.text)
        assert older
        second = alice.get(older.group(1).replace("&amp;", "&"))
        assert re.findall(r'data-job="([0-9a-f-]+)"', second.text) == [ids[0]]
        assert "Older jobs" not in second.text
        csv_text = alice.get("/ui/projects/climate/jobs.csv")
        assert csv_text.headers["content-type"].startswith("text/csv")
        lines = csv_text.text.strip().splitlines()
        assert lines[0].startswith("id,name,user,state")
        assert [line.split(",")[0] for line in lines[1:]] == list(reversed(ids))
    finally:
        env.runtime.close()


def test_an_admin_signs_a_user_out_of_every_browser(app: Any, env: Env) -> None:
    laptop, phone = signed_in(app, env, "alice"), signed_in(app, env, "alice")
    root = signed_in(app, env, "root")
    page = root.get("/ui/admin/users/alice")
    assert re.search(r'id="web-sessions">2 signed-in browsers<', page.text)
    ended = root.post("/ui/admin/users/alice/sessions/end", data={"csrf_token": csrf_of(page.text)})
    assert ended.status_code == 303
    assert laptop.get("/ui/projects").status_code == 303
    assert phone.get("/ui/projects").status_code == 303
    assert root.get("/ui/projects").status_code == 200  # only alice's sessions ended
    with env.runtime.sessions() as session:
        entries = identity_audit(session)
    assert ("ui_sessions.end", "alice", {"ended": 2}) in entries
    # Researchers cannot.
    bob = signed_in(app, env, "bob")
    token = csrf_of(bob.get("/ui/projects").text)
    refused = bob.post("/ui/admin/users/root/sessions/end", data={"csrf_token": token})
    assert refused.status_code == 403


def identity_audit(session: Any) -> list[tuple[str, str, dict[str, Any]]]:
    from sqlalchemy import select

    from broker.db.models import AuditRecord

    rows = session.scalars(select(AuditRecord).order_by(AuditRecord.id))
    return [(r.action, r.target, r.details) for r in rows]


def test_a_session_ends_when_the_token_it_was_signed_in_with_expires(app: Any, env: Env) -> None:
    with transaction(env.runtime.sessions) as session:
        issued = identity.issue_token(
            session, "test", "alice", "ui", expires_at=utcnow() + timedelta(hours=1)
        )
    browser = signed_in(app, env, "alice", issued.token)
    assert browser.get("/ui/projects").status_code == 200
    with transaction(env.runtime.sessions) as session:  # an hour later
        session.execute(
            update(TokenRecord)
            .where(TokenRecord.id == issued.id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert browser.get("/ui/projects").status_code == 303  # back to sign-in
