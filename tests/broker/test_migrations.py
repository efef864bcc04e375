"""The migrations build exactly the schema the models describe, on both databases, and step down."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from broker.db.migrate import alembic_config, upgrade
from broker.db.models import Base


def test_upgraded_schema_matches_the_models(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        upgrade(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": False})
            differences = compare_metadata(context, Base.metadata)
        assert differences == []
    finally:
        engine.dispose()


def test_one_head_and_every_migration_steps_down_and_up_again(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        config = alembic_config(database_url)
        assert len(ScriptDirectory.from_config(config).get_heads()) == 1  # one chain
        upgrade(engine)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        upgrade(engine)
    finally:
        engine.dispose()
