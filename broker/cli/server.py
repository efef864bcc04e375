"""The commands that run on the broker's own host with its configuration: ``broker serve``,
``broker worker``, ``broker db upgrade`` and the ``broker admin`` bootstrap (straight to the
database, for the first admin and token)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from broker.config import Settings

app = typer.Typer()
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
admin_app = typer.Typer(
    help="Bootstrap users and tokens directly in the database.", no_args_is_help=True
)


def register(root: typer.Typer) -> None:
    """Add ``serve``, ``worker`` and the ``db`` and ``admin`` groups to ``root``."""
    root.add_typer(app)
    root.add_typer(db_app, name="db")
    root.add_typer(admin_app, name="admin")


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="BROKER_CONFIG", help="config.toml (or BROKER_CONFIG)"),
]


def _settings(config: Path | None) -> Settings:
    from broker.config import ConfigError, load_settings

    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(5) from exc


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    if level.lower() != "debug":
        # APScheduler logs every run of the poller's job at INFO: per-cycle chatter that buries
        # what matters (the poller logs its own events: lease taken, jobs settled, outages).
        logging.getLogger("apscheduler").setLevel(logging.WARNING)


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="listen address")] = None,
    port: Annotated[int | None, typer.Option(help="listen port")] = None,
    no_poller: Annotated[bool, typer.Option("--no-poller", help="API only")] = False,
    log_level: str = "info",
) -> None:
    """Serve the REST API (and, unless --no-poller, the poller) in one process."""
    import uvicorn

    from broker.api.app import create_app
    from broker.db.migrate import upgrade
    from broker.runtime import build_runtime

    _logging(log_level)
    settings = _settings(config)
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    api = create_app(runtime, run_poller=settings.poller.enabled and not no_poller)
    uvicorn.run(
        api,
        host=host or settings.server.host,
        port=port or settings.server.port,
        log_level=log_level,
        proxy_headers=True,
    )


@app.command()
def worker(
    config: ConfigOption = None,
    metrics_host: Annotated[str, typer.Option(help="address of the worker's /metrics")] = (
        "127.0.0.1"
    ),
    metrics_port: Annotated[
        int, typer.Option(help="port of the worker's /metrics; 0: none")
    ] = 9464,
    log_level: str = "info",
) -> None:
    """Run only the poller (for deployments whose API replicas run with --no-poller).

    Its poll, queue-wait, Slurm-command and SSH metrics are served on --metrics-port.
    """
    import signal
    import threading

    from prometheus_client import start_http_server

    from broker.db.migrate import upgrade
    from broker.runtime import build_runtime

    _logging(log_level)
    runtime = build_runtime(_settings(config))
    upgrade(runtime.engine)
    server = None
    if metrics_port:
        server, _ = start_http_server(
            metrics_port, addr=metrics_host, registry=runtime.metrics.registry
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    runtime.start_poller()
    try:
        stop.wait()
    finally:
        runtime.close()
        if server is not None:
            server.shutdown()


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply every pending Alembic migration."""
    from broker.db.engine import make_engine
    from broker.db.migrate import upgrade

    settings = _settings(config)
    engine = make_engine(settings.database.url)
    upgrade(engine)
    engine.dispose()
    typer.echo("database is at the newest schema")


@admin_app.command("create-user")
def create_user(
    name: str,
    role: Annotated[str, typer.Option(help="admin, engineer or researcher")],
    email: Annotated[str | None, typer.Option()] = None,
    config: ConfigOption = None,
) -> None:
    """Create a user without going through the API (bootstrap the first admin)."""
    from pydantic import ValidationError

    from broker.db.engine import make_engine, make_session_factory, transaction
    from broker.db.migrate import upgrade
    from broker.errors import Conflict
    from broker.schemas import UserCreate
    from broker.service import identity

    try:
        body = UserCreate.model_validate({"name": name, "role": role, "email": email})
    except ValidationError as exc:
        typer.echo(f"invalid user: {exc.errors()[0]['msg']}", err=True)
        raise typer.Exit(5) from exc
    settings = _settings(config)
    engine = make_engine(settings.database.url)
    upgrade(engine)
    try:
        with transaction(make_session_factory(engine)) as session:
            identity.create_user(session, "cli", body)
    except Conflict as exc:
        typer.echo(exc.detail, err=True)
        raise typer.Exit(4) from exc
    finally:
        engine.dispose()
    typer.echo(f"created {role} {name}")


@admin_app.command("issue-token")
def issue_token(
    name: str,
    description: Annotated[str, typer.Option()] = "issued by broker admin issue-token",
    config: ConfigOption = None,
) -> None:
    """Issue a token for NAME and print it (shown this once)."""
    from broker.db.engine import make_engine, make_session_factory, transaction
    from broker.errors import NotFound
    from broker.service import identity

    settings = _settings(config)
    engine = make_engine(settings.database.url)
    try:
        with transaction(make_session_factory(engine)) as session:
            issued = identity.issue_token(
                session, "cli", name, description, settings.auth.token_bytes
            )
    except NotFound as exc:
        typer.echo(exc.detail, err=True)
        raise typer.Exit(3) from exc
    finally:
        engine.dispose()
    typer.echo(issued.token)
