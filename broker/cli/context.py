"""The client commands' global options, taken once and handed to every command in its context.

``--url``/``BROKER_URL``, ``--token``/``BROKER_TOKEN`` (else the token ``broker login`` kept for
that URL) and ``--json`` are read by one callback on the ``broker`` command (``broker --json
jobs``). For scripts written before that, every client command also accepts them after its name
(``broker jobs --json``); given there, they win.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Annotated, Any, TypeVar

import typer
import typer.main
from typer.core import TyperCommand

from broker.cli import credentials, http
from broker.cli.errors import CliError, MissingToken

DEFAULT_URL = "http://127.0.0.1:8080"
PANEL = "Global options"


@dataclass(frozen=True)
class ClientOptions:
    """What every client command needs: where the broker is, who calls, how to print."""

    url: str = DEFAULT_URL
    token: str | None = None
    json: bool = False


def global_options(
    ctx: typer.Context,
    url: Annotated[
        str,
        typer.Option(
            "--url",
            envvar="BROKER_URL",
            help="Broker base URL.",
            show_envvar=True,
            rich_help_panel=PANEL,
        ),
    ] = DEFAULT_URL,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="BROKER_TOKEN",
            help="API token (required by client commands).",
            show_envvar=True,
            rich_help_panel=PANEL,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the broker's JSON as is.", rich_help_panel=PANEL)
    ] = False,
) -> None:
    """The ``broker`` command's callback: store the global options for the command that runs."""
    ctx.obj = ClientOptions(url=url, token=token, json=as_json)


def _command_options(
    client_url: Annotated[
        str | None,
        typer.Option("--url", help="Broker base URL (default: BROKER_URL).", rich_help_panel=PANEL),
    ] = None,
    client_token: Annotated[
        str | None,
        typer.Option("--token", help="API token (default: BROKER_TOKEN).", rich_help_panel=PANEL),
    ] = None,
    client_json: Annotated[
        bool, typer.Option("--json", help="Print the broker's JSON as is.", rich_help_panel=PANEL)
    ] = False,
) -> None:
    """Never called: typer builds each command's copy of the global options from this signature.

    No environment variables here: ``BROKER_URL`` read again after the command name would beat a
    ``--url`` given before it.
    """


def _build_command_options() -> list[Any]:
    probe = typer.Typer(add_completion=False)
    probe.command()(_command_options)
    return list(typer.main.get_command(probe).params)


class ClientCommand(TyperCommand):
    """A client command: it also takes the global options after its name, where they win."""

    _OPTIONS = _build_command_options()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(self._OPTIONS)

    def invoke(self, ctx: Any) -> Any:
        url = ctx.params.pop("client_url", None)
        token = ctx.params.pop("client_token", None)
        as_json = ctx.params.pop("client_json", False)
        base = options(ctx)
        ctx.obj = replace(
            base,
            url=url if url is not None else base.url,
            token=token if token is not None else base.token,
            json=bool(as_json) or base.json,
        )
        return super().invoke(ctx)


F = TypeVar("F", bound=Callable[..., Any])


class ClientTyper(typer.Typer):
    """A ``typer.Typer`` whose commands are ``ClientCommand``s unless told otherwise."""

    def command(
        self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any
    ) -> Callable[[F], F]:
        return super().command(name, cls=cls or ClientCommand, **kwargs)


def options(ctx: typer.Context) -> ClientOptions:
    """The global options as the running command sees them."""
    found = ctx.find_object(ClientOptions)
    if found is None:
        raise RuntimeError("client commands need the callback broker.cli.client.register installs")
    return found


@contextmanager
def connect(ctx: typer.Context) -> Iterator[http.BrokerClient]:
    """A client for the command's body; ``CliError``s become a stderr report and an exit code."""
    given = options(ctx)
    try:
        token = given.token or credentials.token_for(given.url)
        if not token:
            raise MissingToken(
                "no API token: pass --token or set BROKER_TOKEN (or sign in: broker login)"
            )
        client = http.BrokerClient(given.url, token, transport=http._transport)
    except CliError as exc:
        _report(exc)
        raise typer.Exit(exc.exit_code) from None
    try:
        yield client
    except CliError as exc:
        _report(exc)
        raise typer.Exit(exc.exit_code) from None
    finally:
        client.close()


@contextmanager
def report_errors() -> Iterator[None]:
    """``CliError``s in the block become a stderr report and the exit code."""
    try:
        yield
    except CliError as exc:
        _report(exc)
        raise typer.Exit(exc.exit_code) from None


def _report(exc: CliError) -> None:
    for line in exc.lines():
        typer.echo(line, err=True)
