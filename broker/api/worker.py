"""The app of one ``broker serve --workers N`` worker process, built from the environment.

uvicorn starts each worker as a fresh process and imports this factory by name; ``broker serve``
has already checked the configuration, migrated the database and prepared the metrics directory,
and hands the rest over in the environment: ``BROKER_CONFIG`` (and the usual ``BROKER_*``
overrides) and ``BROKER_SERVE_POLLER`` (1: tick the poller; its lease lets one process poll).
"""

from __future__ import annotations

import os

from fastapi import FastAPI

POLLER_ENV = "BROKER_SERVE_POLLER"
LOG_LEVEL_ENV = "BROKER_SERVE_LOG_LEVEL"


def create_worker_app() -> FastAPI:
    from pathlib import Path

    from broker.api.app import create_app
    from broker.config import load_settings
    from broker.runtime import build_runtime, configure_logging

    configure_logging(os.environ.get(LOG_LEVEL_ENV, "info"))
    config = os.environ.get("BROKER_CONFIG")
    settings = load_settings(Path(config) if config else None)
    runtime = build_runtime(settings)
    return create_app(runtime, run_poller=os.environ.get(POLLER_ENV) == "1")
