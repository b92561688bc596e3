"""PostgreSQL schema: SQLAlchemy Core metadata (`tables`), Alembic migrations (`migrate`) and the
time-series storage helpers (`timeseries`) shared by the migrations and the market-data ingester.

PostgreSQL is the system of record. The run-time code talks to it through asyncpg; SQLAlchemy is used
for the schema description, query building and migrations only.
"""
