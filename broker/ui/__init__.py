"""The researcher's web pages under ``/ui/`` (server-rendered Jinja2 + htmx, served from the
package; no Node build step at run time)."""

from __future__ import annotations

from fastapi import FastAPI


def install(app: FastAPI) -> None:
    from broker.ui import pages, web

    web.install(app, pages.router)
