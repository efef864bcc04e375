"""The commands that run on the broker's own host with its configuration: ``broker serve``,
``broker worker``, ``broker db upgrade`` and the ``broker admin`` bootstrap (straight to the
database, for the first admin and token)."""

from __future__ import annotations

from datetime import UTC, datetime
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
    from broker.runtime import configure_logging

    configure_logging(level)


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="listen address")] = None,
    port: Annotated[int | None, typer.Option(help="listen port")] = None,
    no_poller: Annotated[bool, typer.Option("--no-poller", help="API only")] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, help="API processes on this host (PostgreSQL only above 1); default [server]"
        ),
    ] = None,
    log_level: str = "info",
) -> None:
    """Serve the REST API (and, unless --no-poller, the poller), in one process or --workers.

    With several workers every one of them serves the API and ticks the poller; the poller's
    database lease lets exactly one of them poll at a time (another takes over if it dies).
    """
    import os

    import uvicorn

    from broker.db.migrate import upgrade

    _logging(log_level)
    settings = _settings(config)
    count = workers or settings.server.workers
    run_poller = settings.poller.enabled and not no_poller
    listen = {
        "host": host or settings.server.host,
        "port": port or settings.server.port,
        "log_level": log_level,
        "proxy_headers": True,
        "loop": "auto",  # uvloop and httptools when installed (dependencies of the package)
        "http": "auto",
    }
    if count == 1:
        from broker.api.app import create_app
        from broker.runtime import build_runtime

        runtime = build_runtime(settings)
        upgrade(runtime.engine)
        uvicorn.run(create_app(runtime, run_poller=run_poller), **listen)  # type: ignore[arg-type]
        return
    if settings.database.url.startswith("sqlite"):
        typer.echo(
            "configuration error: --workers above 1 needs PostgreSQL (SQLite is one process's)",
            err=True,
        )
        raise typer.Exit(5)
    from broker.api.worker import LOG_LEVEL_ENV, POLLER_ENV
    from broker.db.engine import make_engine

    engine = make_engine(settings.database.url)
    upgrade(engine)
    engine.dispose()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_directory())
    if config is not None:
        os.environ["BROKER_CONFIG"] = str(config.resolve())
    os.environ[POLLER_ENV] = "1" if run_poller else "0"
    os.environ[LOG_LEVEL_ENV] = log_level
    uvicorn.run(
        "broker.api.worker:create_worker_app",
        factory=True,
        workers=count,
        **listen,  # type: ignore[arg-type]
    )


def _metrics_directory() -> Path:
    """An empty directory for the workers' event metrics (prometheus_client multiprocess mode):
    ``$PROMETHEUS_MULTIPROC_DIR`` emptied of earlier runs' files, else a new temporary one."""
    import os
    import tempfile

    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        return Path(tempfile.mkdtemp(prefix="broker-metrics-"))
    directory = Path(given)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return directory


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
            metrics_port, addr=metrics_host, registry=runtime.metrics.scrape_registry
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
    expires_at: Annotated[
        datetime | None,
        typer.Option(
            "--expires-at",
            formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d"],
            help="when the token stops working (UTC if no offset given: 2027-06-30)",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Issue a token for NAME and print it (shown this once)."""
    from broker.db.engine import make_engine, make_session_factory, transaction
    from broker.errors import NotFound, ValidationFailed
    from broker.service import identity

    if expires_at is not None and expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    settings = _settings(config)
    engine = make_engine(settings.database.url)
    try:
        with transaction(make_session_factory(engine)) as session:
            issued = identity.issue_token(
                session, "cli", name, description, settings.auth.token_bytes, expires_at
            )
    except NotFound as exc:
        typer.echo(exc.detail, err=True)
        raise typer.Exit(3) from exc
    except ValidationFailed as exc:
        typer.echo(exc.detail, err=True)
        raise typer.Exit(5) from exc
    finally:
        engine.dispose()
    typer.echo(issued.token)
