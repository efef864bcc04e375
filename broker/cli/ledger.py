"""``broker ledger check`` and ``broker ledger rebuild``: the ledger's running totals against the
job rows they summarise (``broker.service.ledger``), straight on the database."""

from __future__ import annotations

import typer

from broker.cli.server import ConfigOption, _settings

ledger_app = typer.Typer(
    help="The ledger's running totals against the job rows.", no_args_is_help=True
)


def register(root: typer.Typer) -> None:
    root.add_typer(ledger_app, name="ledger")


@ledger_app.command("check")
def check(config: ConfigOption = None) -> None:
    """Recompute every total from the rows and compare (exit 1 and one line per difference)."""
    from broker.db.engine import make_engine, make_session_factory
    from broker.service import ledger

    engine = make_engine(_settings(config).database.url)
    try:
        with make_session_factory(engine)() as session:
            problems = ledger.check(session)
    finally:
        engine.dispose()
    for line in problems:
        typer.echo(line)
    if problems:
        typer.echo(f"{len(problems)} totals differ from the rows", err=True)
        raise typer.Exit(1)
    typer.echo("the ledger's totals equal the job rows")


@ledger_app.command("rebuild")
def rebuild(config: ConfigOption = None) -> None:
    """Replace every total with what the rows give (under every project's ledger lock)."""
    from broker.db.engine import make_engine, make_session_factory, transaction
    from broker.service import ledger

    engine = make_engine(_settings(config).database.url)
    try:
        with transaction(make_session_factory(engine)) as session:
            ledger.rebuild(session)
    finally:
        engine.dispose()
    typer.echo("the ledger's totals were rebuilt from the job rows")
