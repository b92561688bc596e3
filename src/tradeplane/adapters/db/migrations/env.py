"""Alembic environment: one async engine (asyncpg), migrations run through ``connection.run_sync``.

Invoked by :mod:`tradeplane.adapters.db.migrate`, which puts the database URL in
``config.attributes``; ``sqlalchemy.url`` in a config file is honoured as a fallback for ad-hoc use.
Offline (SQL script) mode is not supported: the initial revision inspects the server to choose the
time-series storage.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import create_async_engine

from tradeplane.adapters.db.migrate import URL_ATTRIBUTE, async_url
from tradeplane.adapters.db.tables import metadata

config = context.config


def database_url() -> URL:
    url = config.attributes.get(URL_ATTRIBUTE)
    if isinstance(url, URL):
        return url
    configured = config.get_main_option("sqlalchemy.url")
    if not configured:
        raise RuntimeError("no database URL: call tradeplane.adapters.db.migrate.upgrade(url)")
    return async_url(configured)


def run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_async_engine(database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported: the schema depends on the server's extensions")
asyncio.run(run_async_migrations())
