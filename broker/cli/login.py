"""``broker login`` and ``broker logout``: sign in at the site's identity provider (OIDC device
flow) and keep its token for the later commands (``broker.cli.credentials``)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Annotated

import typer

from broker.cli import credentials, http
from broker.cli.context import ClientTyper, options, report_errors
from broker.cli.device_flow import DeviceFlow, SignInFailed
from broker.cli.errors import ProblemError

app = ClientTyper()

PANEL = "Identity provider"


@app.command("login")
def login(
    ctx: typer.Context,
    issuer: Annotated[
        str,
        typer.Option(
            "--issuer",
            envvar="BROKER_OIDC_ISSUER",
            show_envvar=True,
            help="The identity provider's issuer URL (the broker's auth.oidc.issuer).",
            rich_help_panel=PANEL,
        ),
    ],
    client_id: Annotated[
        str,
        typer.Option(
            "--client-id",
            envvar="BROKER_OIDC_CLIENT_ID",
            show_envvar=True,
            help="The command line's client id at the provider.",
            rich_help_panel=PANEL,
        ),
    ] = "broker-cli",
    audience: Annotated[
        str | None,
        typer.Option(
            "--audience",
            envvar="BROKER_OIDC_AUDIENCE",
            show_envvar=True,
            help="Resource indicator to ask the token for (the broker's auth.oidc.audience), "
            "for providers that need one.",
            rich_help_panel=PANEL,
        ),
    ] = None,
) -> None:
    """Sign in at the identity provider: open the link shown, sign in there, and the token is
    kept (0600) in your config directory for the next commands."""
    url = options(ctx).url
    with report_errors():
        flow = DeviceFlow(issuer, client_id, transport=http._transport)
        try:
            code = flow.start("openid profile", audience)
            link = code.verification_uri_complete or code.verification_uri
            typer.echo(f"To sign in, open {link}", err=True)
            typer.echo(f"and check that it shows the code {code.user_code}.", err=True)
            typer.echo(
                f"Waiting for you to sign in (the code expires in {code.expires_in:.0f} s)...",
                err=True,
            )
            answer = flow.wait_for_token(code)
        finally:
            flow.close()
        expires_at = time.time() + answer.expires_in if answer.expires_in else None
        stored = credentials.StoredToken(answer.access_token, flow.issuer, client_id, expires_at)
        client = http.BrokerClient(url, answer.access_token, transport=http._transport)
        try:
            me = client.json("GET", "/v1/me")
        except ProblemError as exc:
            if exc.status == 401:
                refused = f"signed in at {issuer}, but the broker refuses you: {exc}"
                raise SignInFailed(refused) from None
            raise
        finally:
            client.close()
        where = credentials.save(url, replace(stored, user=me["name"]))
    typer.echo(f"Signed in to {url} as {me['name']} ({me['role']}); token kept in {where}.")


@app.command("logout")
def logout(ctx: typer.Context) -> None:
    """Forget the token ``broker login`` kept for this broker."""
    url = options(ctx).url
    if credentials.forget(url):
        typer.echo(f"Signed out of {url}.")
    else:
        typer.echo(f"No sign-in kept for {url}.")
