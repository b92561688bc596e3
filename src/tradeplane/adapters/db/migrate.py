"""Alembic, driven from code: no alembic.ini, the script location is this package's ``migrations``.

The functions are synchronous because Alembic is: each runs its own event loop (asyncpg is the only
driver), so async callers must use ``await asyncio.to_thread(upgrade, url)``, never call them on the
loop's thread.

``database_url`` is a plain ``postgresql://user:pass@host:port/db`` URL (``?host=/socket/dir`` for a
Unix socket works too); the ``+asyncpg`` driver is added here. The URL travels to ``env.py`` through
``Config.attributes``, never through the ini parser, so passwords containing ``%`` survive.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import pool
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: Key in ``Config.attributes`` under which env.py finds the async SQLAlchemy URL.
URL_ATTRIBUTE = "tradeplane_database_url"


def async_url(database_url: str) -> URL:
    """``postgresql://`` (any driver suffix) to ``postgresql+asyncpg://``; refuses other databases."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {url.render_as_string(hide_password=True)}")
    return url.set(drivername="postgresql+asyncpg")


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if database_url is not None:
        config.attributes[URL_ATTRIBUTE] = async_url(database_url)
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (all of it runs in one transaction)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Migrate down to ``revision``; ``base`` removes every object the migrations created."""
    command.downgrade(alembic_config(database_url), revision)


def heads() -> list[str]:
    """Head revision ids of the migration scripts shipped with this package."""
    return list(ScriptDirectory.from_config(alembic_config()).get_heads())


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def _current(database_url: str) -> str | None:
    engine = create_async_engine(async_url(database_url), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current_revision)
    finally:
        await engine.dispose()


def current(database_url: str) -> str | None:
    """The revision the database is at, or None if it was never migrated (or is at base)."""
    return asyncio.run(_current(database_url))
