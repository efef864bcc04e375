"""The researcher's web pages under ``/ui/`` (server-rendered Jinja2 + htmx, served from the
package; no Node build step at run time)."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI


def install(app: FastAPI, form_targets: Sequence[str] = ()) -> None:
    from broker.ui import pages, web

    web.install(app, pages.router, form_targets)
