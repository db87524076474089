"""Alembic environment of the project database.

The connection comes from `config.attributes["connection"]` (migrate_to_head passes one that holds the
migration lock), else from `sqlalchemy.url`, else from the settings (DATABASE_URL or the embedded
PostgreSQL, started if needed), so `.venv/bin/alembic revision --autogenerate -m "..."` works as is.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

import operations.db_models  # noqa: F401 - imports every domain's models: autogenerate sees every table
from operations.infra.database import Base, _new_engine
from operations.settings import get_settings

config = context.config
if config.config_file_name is not None:  # the alembic command line (alembic.ini), not migrate_to_head
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from operations.infra.embedded_postgres import resolve_database_url

    return resolve_database_url(get_settings())


def _configure(**kwargs: object) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kwargs)


def _run(connection: Connection) -> None:
    # SQLite alters tables by copying them ("batch" mode)
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """`alembic upgrade --sql`: print the SQL instead of running it."""
    url = _url()
    _configure(
        url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, render_as_batch=url.startswith("sqlite")
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = _new_engine(_url(), migrations=True)
    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
