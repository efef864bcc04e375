"""Identities: ``broker whoami`` and the ``broker user ...`` group (users and their tokens)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from broker.cli import credentials
from broker.cli.context import ClientTyper, connect, options
from broker.cli.http import segment
from broker.cli.output import fields, print_json, print_record, print_table

app = ClientTyper()
group = ClientTyper(help="Users and their API tokens.", no_args_is_help=True)

NameArgument = Annotated[str, typer.Argument(metavar="NAME")]


@app.command("whoami")
def whoami(ctx: typer.Context) -> None:
    """Show who the broker takes you for (user, role, projects) and which token says so."""
    with connect(ctx) as api:
        data = api.json("GET", "/v1/me")
    given = options(ctx)
    if given.json:
        print_json(data)
        return
    stored = None if given.token else credentials.load(given.url)
    if stored is not None:
        data = {
            **data,
            "token": f"signed in at {stored.issuer} (broker login)",
            "token_expires": _expiry(stored.expires_at),
        }
    else:
        data = {**data, "token": "from --token or BROKER_TOKEN"}
    print_record(data, False)


def _expiry(expires_at: float | None) -> str:
    if expires_at is None:
        return "unknown"
    when = datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    minutes = (expires_at - time.time()) / 60
    return f"{when} (in {minutes:.0f} min)" if minutes >= 0 else f"{when} (expired)"


@group.command("create")
def user_create(
    ctx: typer.Context,
    name: NameArgument,
    role: Annotated[str, typer.Option("--role", help="researcher, engineer or admin.")],
    email: Annotated[str | None, typer.Option("--email")] = None,
    unix_user: Annotated[
        str | None,
        typer.Option("--unix-user", help="The Unix account the user's jobs run as."),
    ] = None,
) -> None:
    """Create a user."""
    body: dict[str, Any] = {"name": name, "role": role}
    if email is not None:
        body["email"] = email
    if unix_user is not None:
        body["unix_user"] = unix_user
    with connect(ctx) as api:
        data = api.json("POST", "/v1/users", body=body)
    print_record(data, options(ctx).json)


@group.command("set-unix-user")
def user_set_unix_user(
    ctx: typer.Context,
    name: NameArgument,
    unix_user: Annotated[str, typer.Argument(metavar="UNIX_USER")],
) -> None:
    """Set the Unix account a user's jobs run as (their Slurm associations follow)."""
    with connect(ctx) as api:
        data = api.json("PATCH", f"/v1/users/{segment(name)}", body={"unix_user": unix_user})
    print_record(data, options(ctx).json)


@group.command("list")
def user_list(ctx: typer.Context) -> None:
    """List users."""
    with connect(ctx) as api:
        data = api.json("GET", "/v1/users")
    if options(ctx).json:
        print_json(data)
        return
    rows = [
        [u.get("name"), u.get("role"), u.get("email"), u.get("projects"), u.get("created_at")]
        for u in data["data"]
    ]
    print_table(["NAME", "ROLE", "EMAIL", "PROJECTS", "CREATED"], rows, "No users.")


@group.command("token")
def user_token(
    ctx: typer.Context,
    name: NameArgument,
    description: Annotated[str | None, typer.Option("--description")] = None,
    expires_at: Annotated[
        str | None,
        typer.Option(
            "--expires-at", help="RFC 3339 time the token stops working, e.g. 2027-06-30T00:00:00Z"
        ),
    ] = None,
) -> None:
    """Issue an API token for a user; it is printed this once and never again."""
    body = {} if description is None else {"description": description}
    if expires_at is not None:
        body["expires_at"] = expires_at
    with connect(ctx) as api:
        data = api.json("POST", f"/v1/users/{segment(name)}/tokens", body=body)
    if options(ctx).json:
        print_json(data)
        return
    shown = ("id", "description", "created_at", "expires_at", "token")
    typer.echo(fields((k, data.get(k)) for k in shown if k != "expires_at" or data.get(k)))
    typer.echo("Store the token now: the broker keeps only its hash.", err=True)


@group.command("tokens")
def user_tokens(ctx: typer.Context, name: NameArgument) -> None:
    """List a user's tokens (never the secrets)."""
    with connect(ctx) as api:
        data = api.json("GET", f"/v1/users/{segment(name)}/tokens")
    if options(ctx).json:
        print_json(data)
        return
    rows = [
        [
            t.get("id"),
            t.get("description"),
            t.get("created_at"),
            t.get("last_used_at"),
            t.get("expires_at"),
            t.get("revoked"),
        ]
        for t in data["data"]
    ]
    headers = ["ID", "DESCRIPTION", "CREATED", "LAST USED", "EXPIRES", "REVOKED"]
    print_table(headers, rows, "No tokens.")


@group.command("revoke")
def user_revoke(
    ctx: typer.Context,
    name: NameArgument,
    token_id: Annotated[str, typer.Argument(metavar="TOKEN_ID")],
) -> None:
    """Revoke a token; it stops working at once."""
    with connect(ctx) as api:
        data = api.json("DELETE", f"/v1/users/{segment(name)}/tokens/{segment(token_id)}")
    if options(ctx).json:
        print_json(data)
    else:
        typer.echo(f"Revoked token {token_id} of {name}.")
