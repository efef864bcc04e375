"""Plumbing of the web pages: templates, the signed-in caller, CSRF, errors and security headers.

Every read and write goes through the same service functions as the API (``broker.service``),
with the ``Actor`` of the page session, so a page shows and changes exactly what the API would
let the same user see and change (404 for the invisible, 403 for a role that may not act).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from markupsafe import escape
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.errors import BrokerError
from broker.runtime import Runtime
from broker.ui.sessions import PageSession, csrf_ok, current_session

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATE_DIR = HERE / "templates"
PREFIX = "/ui"


def security_headers(form_targets: Sequence[str] = ()) -> dict[str, str]:
    """The headers of every page: a strict CSP whose ``form-action`` allows this origin and
    ``form_targets`` (the provider's origin, where sign-out continues there), and no framing,
    sniffing or caching."""
    form_action = " ".join(["'self'", *form_targets])
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self'; form-action {form_action}; frame-ancestors 'none'; base-uri 'none'"
    )
    return {
        "content-security-policy": policy,
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
        "referrer-policy": "same-origin",
        "cache-control": "no-store",
    }


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    autoescape=True,  # every template, whatever its name: job names and output are hostile
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _hours(value: float | None) -> str:
    """GPU-hours to the GPU-second-ish precision people read: 0.011, 99.989, 50,000.0."""
    if value is None:
        return "-"
    return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.1f}"


def _when(value: datetime | str | None) -> str:
    """A time as ``2026-11-26 17:03 UTC``."""
    if not value:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _short(value: datetime | str | None) -> str:
    """A time in a table cell: ``2026-11-26 17:03`` (UTC, as the column header says)."""
    return _when(value)[:16] if value else "-"


ENV.filters["short"] = _short
ENV.filters["hours"] = _hours
ENV.filters["when"] = _when
ENV.filters["q"] = lambda value: quote(str(value), safe="")


class SignInRequired(Exception):
    """No (valid) page session: the browser is sent to the sign-in page."""


class CsrfRefused(Exception):
    """A form post without the session's CSRF token."""


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def render(
    request: Request,
    template: str,
    page: PageSession | None,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    body = ENV.get_template(template).render(
        request=request, page=page, nav=_nav(page), path=request.url.path, **context
    )
    return HTMLResponse(body, status_code=status, headers=headers)


def _nav(page: PageSession | None) -> list[tuple[str, str]]:
    """The menu for the caller's role: only what they may open."""
    if page is None:
        return []
    role = page.actor.role
    items = [("/ui/jobs", "My jobs" if role == "researcher" else "Jobs")]
    if role in ("researcher", "admin"):
        items.append(("/ui/submit", "Submit"))
    items.append(("/ui/projects", "Projects"))
    if role in ("engineer", "admin"):
        items.append(("/ui/engineer", "Pool"))
    if role == "admin":
        items.append(("/ui/admin", "Admin"))
    return items


async def signed_in(request: Request) -> PageSession:
    """Dependency: the page session, or ``SignInRequired``."""
    page = await run_in_threadpool(current_session, request, runtime_of(request))
    if page is None:
        raise SignInRequired
    return page


@dataclass(frozen=True, slots=True)
class Post:
    """A form post from a signed-in page whose CSRF token matched."""

    page: PageSession
    form: FormData

    def text(self, name: str) -> str:
        value = self.form.get(name)
        return value.strip() if isinstance(value, str) else ""


async def csrf_post(request: Request) -> Post:
    """Dependency of every form post: the session, and its CSRF token in the form (or the
    ``X-CSRF-Token`` header htmx sends); anything else is refused with 403."""
    page = await signed_in(request)
    form = await request.form()
    presented = form.get("csrf_token")
    token = presented if isinstance(presented, str) else request.headers.get("x-csrf-token")
    if not csrf_ok(page.csrf_token, token):
        raise CsrfRefused
    return Post(page, form)


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _sign_in(request: Request, exc: Exception) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    login = f"{PREFIX}/login?next={quote(target, safe='')}"
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": login})
    return redirect(login)


def _csrf_refused(request: Request, exc: Exception) -> Response:
    log.warning("form post to %s without a valid CSRF token refused", request.url.path)
    return render(
        request,
        "error.html",
        None,
        status=403,
        title="Refused",
        message="This form was not sent from a page of this session. Reload the page, try again.",
    )


_TITLES = {
    401: "Please sign in",
    403: "Not allowed",
    404: "Not found",
    409: "Conflict",
    422: "Invalid request",
    429: "Too many requests",
    503: "Unavailable",
}


def _error_page(request: Request, status: int, message: str) -> Response:
    page = current_session(request, runtime_of(request))
    if is_htmx(request):
        return HTMLResponse(f"<p class='error'>{escape(message)}</p>", status_code=status)
    title = _TITLES.get(status, "Error")
    return render(request, "error.html", page, status=status, title=title, message=message)


def install(app: FastAPI, router: Any, form_targets: Sequence[str] = ()) -> None:
    """Mount the pages, their static files and their error pages; other paths keep the API's
    problem documents. ``form_targets``: origins a form post may end at besides this one."""
    from fastapi.staticfiles import StaticFiles

    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    app.add_exception_handler(SignInRequired, _sign_in)
    app.add_exception_handler(CsrfRefused, _csrf_refused)
    for kind in (BrokerError, StarletteHTTPException):
        api_handler = app.exception_handlers[kind]
        app.add_exception_handler(kind, _page_or_problem(api_handler))
    app.add_middleware(PageHeaders, form_targets=tuple(form_targets))


def _page_or_problem(api_handler: Any) -> Any:
    async def handler(request: Request, exc: Exception) -> Response:
        if not request.url.path.startswith(PREFIX + "/") and request.url.path != PREFIX:
            response: Response = await _maybe_await(api_handler(request, exc))
            return response
        if isinstance(exc, BrokerError):
            status, message = exc.status, exc.detail
        else:
            assert isinstance(exc, StarletteHTTPException)
            status, message = exc.status_code, str(exc.detail)
        if status == 404:
            message = "There is nothing here, or you may not see it."
        return await run_in_threadpool(_error_page, request, status, message)

    return handler


async def _maybe_await(value: Any) -> Any:
    if hasattr(value, "__await__"):
        return await value
    return value


class PageHeaders:
    """Security headers on every ``/ui/`` response: a strict CSP (no inline script or style),
    no framing, no sniffing, no caching of pages that show private data."""

    def __init__(self, app: ASGIApp, form_targets: tuple[str, ...] = ()) -> None:
        self.app = app
        self.headers = [
            (name.encode(), value.encode())
            for name, value in security_headers(form_targets).items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        static = path.startswith(PREFIX + "/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])]
                for name, value in self.headers:
                    if static and name == b"cache-control":
                        continue
                    headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
