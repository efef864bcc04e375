"""The everyday command-line client: ``broker submit``, ``broker jobs``, ``broker project ...``.

It talks to a running broker only through the REST contract (API.md), with the URL from
``--url`` or ``BROKER_URL`` and the bearer token from ``--token`` or ``BROKER_TOKEN``, else the
identity provider's token ``broker login`` kept. Output is a
plain table for people; ``--json`` prints the broker's JSON (for scripts). These three global
options go before the command (``broker --json jobs``) or after it (``broker jobs --json``).
Errors go to stderr as the problem document's ``title: detail``, followed by its numbers
(``requested``, ``remaining``).

Exit codes scripts can rely on (``broker.cli.errors`` maps failures to them):

    0  success
    1  unexpected error (a 5xx other than 502/503/504, a response that is not JSON, a bug)
    2  usage error: bad flags or arguments, unreadable script, malformed --url
    3  not found: 404 (the resource does not exist or the caller may not see it)
    4  refused by policy or quota: 409 quota-exceeded, 409 conflict, 422 limit-exceeded,
       422 idempotency-conflict, 422 submit-rejected (Slurm said no)
    5  invalid input: 422 validation-error (and any other 422), 400, 413 payload-too-large
    6  authentication or permission: 401, 403, or no token given
    7  broker or cluster unavailable, retry later: 503, 502, 504, 429, connection refused, timeout
"""

from __future__ import annotations

import typer

from broker.cli import clusters, jobs, login, logs, projects, reports, users
from broker.cli.context import global_options


def register(app: typer.Typer) -> None:
    """Add the client commands and the ``project``, ``user``, ``report`` groups to ``app``, and
    make ``global_options`` its callback (it replaces any callback ``app`` had)."""
    app.callback()(global_options)
    for commands in (
        jobs.app,
        logs.app,
        projects.app,
        clusters.app,
        users.app,
        reports.app,
        login.app,
    ):
        app.add_typer(commands)
    app.add_typer(projects.group, name="project")
    app.add_typer(users.group, name="user")
    app.add_typer(reports.group, name="report")
