"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from fastapi import FastAPI

from broker.api import problems
from broker.api.guards import BodySizeLimit, RateLimiter
from broker.api.routes import jobs, projects, system, users
from broker.api.threads import ReadThreads
from broker.runtime import Runtime
from broker.service.oidc_login import origin_of
from broker.service.ratelimit import SharedBudget
from broker.ui import install as install_pages

API_DESCRIPTION = (
    "Ask for GPUs on the AI Factory's Slurm clusters within your project's quota. "
    "Errors are RFC 9457 problem documents (application/problem+json)."
)


def create_app(runtime: Runtime, *, run_poller: bool = False) -> FastAPI:
    """Build the app around an existing runtime; the poller starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.tokens.start(runtime.engine)
        if run_poller:
            runtime.start_poller()
        try:
            yield
        finally:
            runtime.close()

    app = FastAPI(
        title="AI Factory GPU broker", version="1", description=API_DESCRIPTION, lifespan=lifespan
    )
    app.state.runtime = runtime
    app.state.read_threads = ReadThreads(runtime.settings.server.read_threads)
    limits = runtime.settings.limits
    shared = None
    if runtime.engine.dialect.name == "postgresql" and limits.requests_per_minute > 0:
        shared = SharedBudget(
            runtime.sessions,
            limits.requests_per_minute,
            limits.shared_rate_slice or max(1, limits.requests_per_minute // 20),
        )
    app.state.rate_limiter = RateLimiter(
        limits.requests_per_minute, limits.request_burst, shared=shared
    )
    app.state.metrics_registry = runtime.metrics.scrape_registry
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    problems.install(app)
    for module in (system, users, projects, jobs):
        app.include_router(module.router)
    oidc = runtime.settings.auth.oidc
    web_sign_in = oidc.enabled and bool(oidc.web_client_id)
    # Sign-out posts a form that ends at the provider's end-session page (broker.ui.pages).
    signs_out_there = web_sign_in and oidc.web_sign_out_at_provider
    install_pages(app, form_targets=[origin_of(oidc.issuer)] if signs_out_there else [])
    if web_sign_in:
        # The sign-in page offers the site's provider (broker.ui.pages: /ui/auth/login).
        app.state.ui_oidc_login_url = "/ui/auth/login"
        app.state.ui_oidc_login_label = (
            oidc.web_login_label or urlsplit(oidc.issuer).hostname or "your institution"
        )
    return app
