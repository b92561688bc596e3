"""Initial schema.

Identity, money (double-entry ledger), reference data, trading, risk, market data (time-series), audit
trail and plumbing.

Written from ``tradeplane.adapters.db.tables`` as of this revision and frozen here: later revisions
change the schema with their own operations, never by importing the live metadata.

Beyond the tables this creates what Core cannot describe:

- ``ledger_entries`` is immutable and every ledger transaction must balance per asset at COMMIT
  (deferred constraint trigger ``tp_ledger_balanced``).
- ``audit_log`` is append-only and hash-chained (see ``tables.audit_log``).
- Market data (``ticks``, ``trades``, ``depth_snapshots``, ``spreads``) is stored in TimescaleDB
  hypertables with 1-day chunks when the extension can be installed, else in native daily range
  partitions created from yesterday to 7 days ahead.

All functions are prefixed ``tp_`` so a downgrade can find and drop every one of them.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from tradeplane.adapters.db.timeseries import (
    TIMESCALE_MARKER,
    enable_timescale,
    ensure_daily_partitions,
)

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SERIES_TABLES = ("ticks", "trades", "depth_snapshots", "spreads")
#: Native path: partitions from yesterday (late ticks around midnight) to this many days ahead.
PARTITION_DAYS_AHEAD = 7

FUNCTIONS = (
    "tp_refuse_change()",
    "tp_ledger_balanced()",
    "tp_audit_log_content(bigint, timestamptz, bigint, text, text, text, jsonb)",
    "tp_audit_log_chain()",
    "tp_audit_log_verify()",
)

REFUSE_CHANGE = """
CREATE FUNCTION tp_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on % is refused: the table is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END
$$
"""

LEDGER_BALANCED = """
CREATE FUNCTION tp_ledger_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced record;
BEGIN
    SELECT asset, sum(amount) AS total INTO unbalanced
      FROM ledger_entries
     WHERE transaction_id = NEW.transaction_id
     GROUP BY asset
    HAVING sum(amount) <> 0
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger transaction % does not balance: % entries sum to %',
            NEW.transaction_id, unbalanced.asset, unbalanced.total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$
"""

# Netstring-style content (length:value, '-' for NULL) so no two different rows share a content string.
AUDIT_CONTENT = r"""
CREATE FUNCTION tp_audit_log_content(
    id bigint, ts timestamptz, actor_user_id bigint, action text, entity text, entity_id text, details jsonb
) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT string_agg(CASE WHEN f IS NULL THEN '-' ELSE length(f) || ':' || f END, ',' ORDER BY n)
      FROM unnest(ARRAY[
               id::text,
               to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               actor_user_id::text,
               action,
               entity,
               entity_id,
               details::text
           ]) WITH ORDINALITY AS c(f, n)
$$
"""

AUDIT_CHAIN = r"""
CREATE FUNCTION tp_audit_log_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    tip_id bigint;
    tip_hash bytea;
BEGIN
    -- The head row lock serialises writers, so ids, chain links and commit order agree. Under
    -- REPEATABLE READ a concurrent append makes this fail with a serialization error: retry.
    SELECT last_id, last_hash INTO tip_id, tip_hash FROM audit_log_head WHERE singleton FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'audit_log_head row is missing';
    END IF;
    NEW.id := tip_id + 1;
    NEW.prev_hash := tip_hash;
    NEW.hash := sha256(
        coalesce(tip_hash, '\x'::bytea)
        || convert_to(
            tp_audit_log_content(
                NEW.id, NEW.ts, NEW.actor_user_id, NEW.action, NEW.entity, NEW.entity_id, NEW.details
            ),
            'UTF8'
        )
    );
    UPDATE audit_log_head SET last_id = NEW.id, last_hash = NEW.hash WHERE singleton;
    RETURN NEW;
END
$$
"""

AUDIT_VERIFY = r"""
CREATE FUNCTION tp_audit_log_verify() RETURNS SETOF bigint LANGUAGE sql STABLE AS $$
    SELECT id
      FROM (
        SELECT a.*, lag(a.hash) OVER w AS expected_prev, lag(a.id) OVER w AS previous_id
          FROM audit_log a
        WINDOW w AS (ORDER BY a.id)
      ) chain
     WHERE prev_hash IS DISTINCT FROM expected_prev
        OR id <> coalesce(previous_id, 0) + 1
        OR hash <> sha256(
               coalesce(prev_hash, '\x'::bytea)
               || convert_to(
                   tp_audit_log_content(id, ts, actor_user_id, action, entity, entity_id, details), 'UTF8'
               )
           )
     ORDER BY id
$$
"""

TRIGGERS = (
    # Ledger: immutable, balanced at commit.
    "CREATE TRIGGER tp_ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries"
    " FOR EACH ROW EXECUTE FUNCTION tp_refuse_change()",
    "CREATE TRIGGER tp_ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries"
    " FOR EACH STATEMENT EXECUTE FUNCTION tp_refuse_change()",
    "CREATE CONSTRAINT TRIGGER tp_ledger_balanced AFTER INSERT ON ledger_entries"
    " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tp_ledger_balanced()",
    # Audit log: append-only, chained on insert.
    "CREATE TRIGGER tp_audit_log_chain BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION tp_audit_log_chain()",
    "CREATE TRIGGER tp_audit_log_immutable BEFORE UPDATE OR DELETE ON audit_log"
    " FOR EACH ROW EXECUTE FUNCTION tp_refuse_change()",
    "CREATE TRIGGER tp_audit_log_no_truncate BEFORE TRUNCATE ON audit_log"
    " FOR EACH STATEMENT EXECUTE FUNCTION tp_refuse_change()",
    # The chain tip may move forward (the chain trigger updates it) but never disappear.
    "CREATE TRIGGER tp_audit_log_head_kept BEFORE DELETE ON audit_log_head"
    " FOR EACH ROW EXECUTE FUNCTION tp_refuse_change()",
    "CREATE TRIGGER tp_audit_log_head_no_truncate BEFORE TRUNCATE ON audit_log_head"
    " FOR EACH STATEMENT EXECUTE FUNCTION tp_refuse_change()",
)


def _series_table(name: str, native: bool, *elements: Any) -> None:
    """A market-data table: range-partitioned on ``ts`` natively, or plain (made a hypertable later)."""
    if native:
        op.create_table(name, *elements, postgresql_partition_by="RANGE (ts)")
    else:
        op.create_table(name, *elements)


def _store_series(bind: sa.Connection, native: bool) -> None:
    if not native:
        for table in SERIES_TABLES:
            bind.execute(
                sa.text(
                    "SELECT create_hypertable(CAST(:table AS regclass), 'ts',"
                    " chunk_time_interval => INTERVAL '1 day', create_default_indexes => false)"
                ),
                {"table": table},
            )
        return
    today = bind.execute(sa.text("SELECT CAST(timezone('UTC', now()) AS date)")).scalar_one()
    for table in SERIES_TABLES:
        ensure_daily_partitions(bind, table, today - timedelta(days=1), PARTITION_DAYS_AHEAD + 2)


def upgrade() -> None:
    bind = op.get_bind()
    native = not enable_timescale(bind)

    op.create_table(
        "assets",
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("scale", sa.SmallInteger(), nullable=False, comment="decimal places of the smallest unit"),
        sa.Column("name", sa.Text(), nullable=False),
        sa.CheckConstraint("scale BETWEEN 0 AND 18", name=op.f("ck_assets_scale_range")),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_assets")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False, comment="gapless, set by trigger"),
        sa.Column("ts", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("actor_user_id", sa.BigInteger(), nullable=True),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("entity", sa.Text(), nullable=False),
        sa.Column("entity_id", sa.Text(), nullable=True),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "prev_hash",
            postgresql.BYTEA(),
            nullable=True,
            comment="hash of the previous row; null for the first",
        ),
        sa.Column("hash", postgresql.BYTEA(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_entity_entity_id"), "audit_log", ["entity", "entity_id"], unique=False)
    op.create_index(op.f("ix_audit_log_ts"), "audit_log", ["ts"], unique=False)
    op.create_table(
        "audit_log_head",
        sa.Column("singleton", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("last_id", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_hash", postgresql.BYTEA(), nullable=True),
        sa.CheckConstraint("singleton", name=op.f("ck_audit_log_head_single_row")),
        sa.PrimaryKeyConstraint("singleton", name=op.f("pk_audit_log_head")),
    )
    _series_table(
        "depth_snapshots",
        native,
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("instrument_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "bids",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="[[price, size], ...] best first, as strings",
        ),
        sa.Column("asks", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=True),
    )
    op.create_index(
        "ix_depth_snapshots_instrument_id_ts",
        "depth_snapshots",
        ["instrument_id", sa.literal_column("ts DESC")],
        unique=False,
    )
    op.create_index("ix_depth_snapshots_ts_brin", "depth_snapshots", ["ts"], unique=False, postgresql_using="brin")
    op.create_table(
        "engine_offsets",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("last_sequence >= 0", name=op.f("ck_engine_offsets_last_sequence_nonnegative")),
        sa.PrimaryKeyConstraint("consumer", name=op.f("pk_engine_offsets")),
    )
    op.create_table(
        "ledger_transactions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False, comment="deposit, withdrawal, trade, fee, ..."),
        sa.Column("reference", sa.Text(), nullable=True, comment="what caused it, e.g. a fill id"),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_transactions")),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False, comment="bus subject / routing key"),
        sa.Column("key", sa.Text(), nullable=False, comment="partition key, e.g. symbol"),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index(
        "ix_outbox_unpublished_id",
        "outbox",
        ["id"],
        unique=False,
        postgresql_where=sa.text("published_at IS NULL"),
    )
    _series_table(
        "spreads",
        native,
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("instrument_id", sa.BigInteger(), nullable=False),
        sa.Column("spread", sa.Numeric(precision=38, scale=18), nullable=False),
    )
    op.create_index(
        "ix_spreads_instrument_id_ts",
        "spreads",
        ["instrument_id", sa.literal_column("ts DESC")],
        unique=False,
    )
    op.create_index("ix_spreads_ts_brin", "spreads", ["ts"], unique=False, postgresql_using="brin")
    _series_table(
        "ticks",
        native,
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("instrument_id", sa.BigInteger(), nullable=False),
        sa.Column("bid", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("ask", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("bid_size", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("ask_size", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("last", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("volume", sa.Numeric(precision=38, scale=18), nullable=True),
    )
    op.create_index("ix_ticks_instrument_id_ts", "ticks", ["instrument_id", sa.literal_column("ts DESC")], unique=False)
    op.create_index("ix_ticks_ts_brin", "ticks", ["ts"], unique=False, postgresql_using="brin")
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=True),
        sa.Column(
            "password_hash",
            sa.Text(),
            nullable=True,
            comment="argon2id; null for users who only use API keys",
        ),
        sa.Column("role", sa.String(length=16), server_default="trader", nullable=False),
        sa.Column("is_active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("role IN ('admin', 'trader', 'readonly', 'system')", name=op.f("ck_users_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "accounts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=True),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("currency", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="active", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind = 'house' OR user_id IS NOT NULL", name=op.f("ck_accounts_owner_unless_house")),
        sa.CheckConstraint("kind IN ('cash', 'margin', 'house')", name=op.f("ck_accounts_kind")),
        sa.CheckConstraint("status IN ('active', 'frozen', 'closed')", name=op.f("ck_accounts_status")),
        sa.ForeignKeyConstraint(["currency"], ["assets.code"], name=op.f("fk_accounts_currency_assets")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_accounts_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint(
            "user_id", "name", name=op.f("uq_accounts_user_id_name"), postgresql_nulls_not_distinct=True
        ),
    )
    op.create_index(op.f("ix_accounts_user_id"), "accounts", ["user_id"], unique=False)
    op.create_table(
        "api_keys",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("key_prefix", sa.String(length=16), nullable=False, comment="public part shown to humans"),
        sa.Column("key_hash", sa.Text(), nullable=False, comment="HMAC-SHA256 hex of the full key"),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("key_hash ~ '^[0-9a-f]{64}$'", name=op.f("ck_api_keys_key_hash_is_sha256_hex")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_api_keys_user_id_users"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
        sa.UniqueConstraint("key_prefix", name=op.f("uq_api_keys_key_prefix")),
    )
    op.create_index(op.f("ix_api_keys_user_id"), "api_keys", ["user_id"], unique=False)
    op.create_table(
        "broker_configs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("broker_type", sa.String(length=32), nullable=False),
        sa.Column("api_key", sa.Text(), nullable=False),
        sa.Column("api_secret_encrypted", postgresql.BYTEA(), nullable=False, comment="AES-GCM nonce || ciphertext"),
        sa.Column(
            "additional_params",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("is_active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_broker_configs_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_broker_configs")),
    )
    op.create_index(op.f("ix_broker_configs_user_id"), "broker_configs", ["user_id"], unique=False)
    op.create_table(
        "instruments",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("symbol", sa.String(length=32), nullable=False),
        sa.Column("base_asset", sa.String(length=16), nullable=False),
        sa.Column("quote_asset", sa.String(length=16), nullable=False),
        sa.Column("tick_size", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("lot_size", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("min_qty", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("max_qty", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column(
            "price_band_pct",
            sa.Numeric(precision=38, scale=18),
            nullable=False,
            comment="max % away from reference_price",
        ),
        sa.Column("reference_price", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column(
            "maker_fee_rate",
            sa.Numeric(precision=38, scale=18),
            server_default=sa.text("0"),
            nullable=False,
            comment="negative = rebate",
        ),
        sa.Column("taker_fee_rate", sa.Numeric(precision=38, scale=18), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "margin_rate",
            sa.Numeric(precision=38, scale=18),
            server_default=sa.text("1"),
            nullable=False,
            comment="initial margin fraction",
        ),
        sa.Column("status", sa.String(length=16), server_default="open", nullable=False),
        sa.Column("session_close_utc", sa.Time(), nullable=True, comment="DAY orders expire here"),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("status IN ('open', 'halted', 'closed')", name=op.f("ck_instruments_status")),
        sa.CheckConstraint("lot_size > 0", name=op.f("ck_instruments_lot_size_positive")),
        sa.CheckConstraint("maker_fee_rate > -1 AND maker_fee_rate < 1", name=op.f("ck_instruments_maker_fee_range")),
        sa.CheckConstraint("margin_rate > 0 AND margin_rate <= 1", name=op.f("ck_instruments_margin_rate_range")),
        sa.CheckConstraint("max_qty >= min_qty", name=op.f("ck_instruments_max_qty_not_below_min")),
        sa.CheckConstraint("min_qty > 0", name=op.f("ck_instruments_min_qty_positive")),
        sa.CheckConstraint("price_band_pct >= 0", name=op.f("ck_instruments_price_band_nonnegative")),
        sa.CheckConstraint(
            "reference_price IS NULL OR reference_price > 0",
            name=op.f("ck_instruments_reference_price_positive"),
        ),
        sa.CheckConstraint("taker_fee_rate >= 0", name=op.f("ck_instruments_taker_fee_nonnegative")),
        sa.CheckConstraint("tick_size > 0", name=op.f("ck_instruments_tick_size_positive")),
        sa.ForeignKeyConstraint(["quote_asset"], ["assets.code"], name=op.f("fk_instruments_quote_asset_assets")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instruments")),
        sa.UniqueConstraint("symbol", name=op.f("uq_instruments_symbol")),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("token_hash", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("expires_at > created_at", name=op.f("ck_sessions_expires_after_creation")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_sessions_user_id_users"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_sessions_token_hash")),
    )
    op.create_index(op.f("ix_sessions_expires_at"), "sessions", ["expires_at"], unique=False)
    op.create_index(op.f("ix_sessions_user_id"), "sessions", ["user_id"], unique=False)
    op.create_table(
        "strategies",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column(
            "params",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_strategies_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_strategies")),
        sa.UniqueConstraint("user_id", "name", name=op.f("uq_strategies_user_id_name")),
    )
    op.create_table(
        "balances",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("asset", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.Numeric(precision=38, scale=18), server_default=sa.text("0"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_balances_account_id_accounts")),
        sa.ForeignKeyConstraint(["asset"], ["assets.code"], name=op.f("fk_balances_asset_assets")),
        sa.PrimaryKeyConstraint("account_id", "asset", name=op.f("pk_balances")),
    )
    op.create_table(
        "candles",
        sa.Column("instrument_id", sa.BigInteger(), nullable=False),
        sa.Column("timeframe", sa.String(length=3), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False, comment="start of the period"),
        sa.Column("open", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("high", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("low", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("close", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("volume", sa.Numeric(precision=38, scale=18), server_default=sa.text("0"), nullable=False),
        sa.Column("tick_count", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint("timeframe IN ('M1', 'M5', 'M15', 'H1', 'H4', 'D1')", name=op.f("ck_candles_timeframe")),
        sa.CheckConstraint(
            "low <= open AND low <= close AND high >= open AND high >= close AND low <= high",
            name=op.f("ck_candles_ohlc_consistent"),
        ),
        sa.CheckConstraint("volume >= 0 AND tick_count >= 0", name=op.f("ck_candles_counts_nonnegative")),
        sa.ForeignKeyConstraint(
            ["instrument_id"], ["instruments.id"], name=op.f("fk_candles_instrument_id_instruments")
        ),
        sa.PrimaryKeyConstraint("instrument_id", "timeframe", "bucket", name=op.f("pk_candles")),
    )
    op.create_table(
        "deposits",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("asset", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("transaction_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_deposits_amount_positive")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_deposits_account_id_accounts")),
        sa.ForeignKeyConstraint(["asset"], ["assets.code"], name=op.f("fk_deposits_asset_assets")),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["ledger_transactions.id"],
            name=op.f("fk_deposits_transaction_id_ledger_transactions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deposits")),
        sa.UniqueConstraint("transaction_id", name=op.f("uq_deposits_transaction_id")),
    )
    op.create_index(op.f("ix_deposits_account_id"), "deposits", ["account_id"], unique=False)
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("transaction_id", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("asset", sa.String(length=16), nullable=False),
        sa.Column(
            "amount",
            sa.Numeric(precision=38, scale=18),
            nullable=False,
            comment="positive credits the account, negative debits it",
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("amount <> 0", name=op.f("ck_ledger_entries_amount_nonzero")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_ledger_entries_account_id_accounts")),
        sa.ForeignKeyConstraint(["asset"], ["assets.code"], name=op.f("fk_ledger_entries_asset_assets")),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["ledger_transactions.id"],
            name=op.f("fk_ledger_entries_transaction_id_ledger_transactions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
    )
    op.create_index(
        op.f("ix_ledger_entries_account_id_asset_id"),
        "ledger_entries",
        ["account_id", "asset", "id"],
        unique=False,
    )
    op.create_index(op.f("ix_ledger_entries_transaction_id"), "ledger_entries", ["transaction_id"], unique=False)
    op.create_table(
        "margin_calls",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "margin_level",
            sa.Numeric(precision=38, scale=18),
            nullable=False,
            comment="equity / used margin at the call",
        ),
        sa.Column("status", sa.String(length=16), server_default="open", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status = 'open') = (resolved_at IS NULL)", name=op.f("ck_margin_calls_resolved_when_closed")
        ),
        sa.CheckConstraint("status IN ('open', 'resolved', 'liquidated')", name=op.f("ck_margin_calls_status")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_margin_calls_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_margin_calls")),
    )
    op.create_index(op.f("ix_margin_calls_account_id"), "margin_calls", ["account_id"], unique=False)
    op.create_index(
        "uq_margin_calls_open_account_id",
        "margin_calls",
        ["account_id"],
        unique=True,
        postgresql_where=sa.text("status = 'open'"),
    )
    op.create_table(
        "orders",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("instrument_id", sa.BigInteger(), nullable=False),
        sa.Column("client_order_id", sa.String(length=64), nullable=True),
        sa.Column("side", sa.String(length=4), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("time_in_force", sa.String(length=8), server_default="gtc", nullable=False),
        sa.Column("quantity", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("price", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("stop_price", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("expire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("post_only", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("reduce_only", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("stp_mode", sa.String(length=16), server_default="cancel_newest", nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending_new", nullable=False),
        sa.Column("filled_quantity", sa.Numeric(precision=38, scale=18), server_default=sa.text("0"), nullable=False),
        sa.Column("average_fill_price", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("reject_reason", sa.Text(), nullable=True),
        sa.Column("sequence", sa.BigInteger(), nullable=True, comment="engine time priority"),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("side IN ('buy', 'sell')", name=op.f("ck_orders_side")),
        sa.CheckConstraint(
            "status IN ('pending_new', 'new', 'partially_filled', 'filled', 'pending_cancel',"
            " 'canceled', 'rejected', 'expired', 'replaced')",
            name=op.f("ck_orders_status"),
        ),
        sa.CheckConstraint(
            "stp_mode IN ('cancel_newest', 'cancel_oldest', 'cancel_both')", name=op.f("ck_orders_stp_mode")
        ),
        sa.CheckConstraint("time_in_force <> 'gtd' OR expire_at IS NOT NULL", name=op.f("ck_orders_gtd_has_expiry")),
        sa.CheckConstraint(
            "time_in_force IN ('gtc', 'ioc', 'fok', 'day', 'gtd')", name=op.f("ck_orders_time_in_force")
        ),
        sa.CheckConstraint("type IN ('market', 'limit', 'stop', 'stop_limit')", name=op.f("ck_orders_type")),
        sa.CheckConstraint(
            "type NOT IN ('limit', 'stop_limit') OR price IS NOT NULL", name=op.f("ck_orders_limit_has_price")
        ),
        sa.CheckConstraint(
            "type NOT IN ('stop', 'stop_limit') OR stop_price IS NOT NULL",
            name=op.f("ck_orders_stop_has_stop_price"),
        ),
        sa.CheckConstraint(
            "average_fill_price IS NULL OR average_fill_price > 0",
            name=op.f("ck_orders_average_fill_price_positive"),
        ),
        sa.CheckConstraint(
            "filled_quantity >= 0 AND filled_quantity <= quantity",
            name=op.f("ck_orders_filled_within_quantity"),
        ),
        sa.CheckConstraint("price IS NULL OR price > 0", name=op.f("ck_orders_price_positive")),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_orders_quantity_positive")),
        sa.CheckConstraint("stop_price IS NULL OR stop_price > 0", name=op.f("ck_orders_stop_price_positive")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_orders_account_id_accounts")),
        sa.ForeignKeyConstraint(
            ["instrument_id"], ["instruments.id"], name=op.f("fk_orders_instrument_id_instruments")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orders")),
        sa.UniqueConstraint("account_id", "client_order_id", name=op.f("uq_orders_account_id_client_order_id")),
    )
    op.create_index(
        "ix_orders_account_id_created_at",
        "orders",
        ["account_id", sa.literal_column("created_at DESC")],
        unique=False,
    )
    op.create_index(
        "ix_orders_open_instrument_id_status",
        "orders",
        ["instrument_id", "status"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending_new', 'new', 'partially_filled', 'pending_cancel')"),
    )
    op.create_index(op.f("ix_orders_status"), "orders", ["status"], unique=False)
    op.create_table(
        "positions",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("instrument_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "net_quantity",
            sa.Numeric(precision=38, scale=18),
            server_default=sa.text("0"),
            nullable=False,
            comment="negative = short",
        ),
        sa.Column("average_price", sa.Numeric(precision=38, scale=18), server_default=sa.text("0"), nullable=False),
        sa.Column("realized_pnl", sa.Numeric(precision=38, scale=18), server_default=sa.text("0"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("average_price >= 0", name=op.f("ck_positions_average_price_nonnegative")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_positions_account_id_accounts")),
        sa.ForeignKeyConstraint(
            ["instrument_id"], ["instruments.id"], name=op.f("fk_positions_instrument_id_instruments")
        ),
        sa.PrimaryKeyConstraint("account_id", "instrument_id", name=op.f("pk_positions")),
    )
    op.create_index(op.f("ix_positions_instrument_id"), "positions", ["instrument_id"], unique=False)
    op.create_table(
        "risk_limits",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("instrument_id", sa.BigInteger(), nullable=True),
        sa.Column("max_order_qty", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("max_order_notional", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("max_position", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("max_open_orders", sa.Integer(), nullable=True),
        sa.Column("max_orders_per_second", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "max_open_orders IS NULL OR max_open_orders > 0",
            name=op.f("ck_risk_limits_max_open_orders_positive"),
        ),
        sa.CheckConstraint(
            "max_order_notional IS NULL OR max_order_notional > 0",
            name=op.f("ck_risk_limits_max_order_notional_positive"),
        ),
        sa.CheckConstraint(
            "max_order_qty IS NULL OR max_order_qty > 0", name=op.f("ck_risk_limits_max_order_qty_positive")
        ),
        sa.CheckConstraint(
            "max_orders_per_second IS NULL OR max_orders_per_second > 0",
            name=op.f("ck_risk_limits_max_orders_per_second_positive"),
        ),
        sa.CheckConstraint(
            "max_position IS NULL OR max_position > 0", name=op.f("ck_risk_limits_max_position_positive")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_risk_limits_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["instrument_id"],
            ["instruments.id"],
            name=op.f("fk_risk_limits_instrument_id_instruments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_risk_limits")),
        sa.UniqueConstraint(
            "account_id",
            "instrument_id",
            name=op.f("uq_risk_limits_account_id_instrument_id"),
            postgresql_nulls_not_distinct=True,
        ),
    )
    _series_table(
        "trades",
        native,
        sa.Column("trade_id", sa.String(length=64), nullable=False),
        sa.Column("instrument_id", sa.BigInteger(), nullable=False),
        sa.Column("price", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("quantity", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("buy_order_id", sa.BigInteger(), nullable=True),
        sa.Column("sell_order_id", sa.BigInteger(), nullable=True),
        sa.Column("aggressor_side", sa.String(length=4), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("aggressor_side IN ('buy', 'sell')", name=op.f("ck_trades_aggressor_side")),
        sa.CheckConstraint("price > 0", name=op.f("ck_trades_price_positive")),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_trades_quantity_positive")),
        sa.ForeignKeyConstraint(
            ["instrument_id"], ["instruments.id"], name=op.f("fk_trades_instrument_id_instruments")
        ),
        sa.PrimaryKeyConstraint("trade_id", "ts", name=op.f("pk_trades")),
    )
    op.create_index(
        "ix_trades_instrument_id_ts", "trades", ["instrument_id", sa.literal_column("ts DESC")], unique=False
    )
    op.create_index("ix_trades_ts_brin", "trades", ["ts"], unique=False, postgresql_using="brin")
    op.create_table(
        "trading_sessions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("instrument_id", sa.BigInteger(), nullable=False),
        sa.Column("day_of_week", sa.SmallInteger(), nullable=False, comment="0 = Monday (ISO weekday - 1)"),
        sa.Column("opens_at", sa.Time(), nullable=False),
        sa.Column("closes_at", sa.Time(), nullable=False),
        sa.CheckConstraint("day_of_week BETWEEN 0 AND 6", name=op.f("ck_trading_sessions_day_of_week_range")),
        sa.CheckConstraint("opens_at <> closes_at", name=op.f("ck_trading_sessions_nonempty")),
        sa.ForeignKeyConstraint(
            ["instrument_id"],
            ["instruments.id"],
            name=op.f("fk_trading_sessions_instrument_id_instruments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trading_sessions")),
        sa.UniqueConstraint(
            "instrument_id",
            "day_of_week",
            "opens_at",
            name=op.f("uq_trading_sessions_instrument_id_day_of_week_opens_at"),
        ),
    )
    op.create_table(
        "withdrawals",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("asset", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("transaction_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_withdrawals_amount_positive")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_withdrawals_account_id_accounts")),
        sa.ForeignKeyConstraint(["asset"], ["assets.code"], name=op.f("fk_withdrawals_asset_assets")),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["ledger_transactions.id"],
            name=op.f("fk_withdrawals_transaction_id_ledger_transactions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_withdrawals")),
        sa.UniqueConstraint("transaction_id", name=op.f("uq_withdrawals_transaction_id")),
    )
    op.create_index(op.f("ix_withdrawals_account_id"), "withdrawals", ["account_id"], unique=False)
    op.create_table(
        "fills",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("fill_id", sa.String(length=64), nullable=False),
        sa.Column("order_id", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("instrument_id", sa.BigInteger(), nullable=False),
        sa.Column("side", sa.String(length=4), nullable=False),
        sa.Column("quantity", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("price", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column(
            "fee",
            sa.Numeric(precision=38, scale=18),
            server_default=sa.text("0"),
            nullable=False,
            comment="negative = rebate",
        ),
        sa.Column("fee_asset", sa.String(length=16), nullable=False),
        sa.Column("liquidity", sa.String(length=8), nullable=False),
        sa.Column("trade_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("liquidity IN ('maker', 'taker')", name=op.f("ck_fills_liquidity")),
        sa.CheckConstraint("side IN ('buy', 'sell')", name=op.f("ck_fills_side")),
        sa.CheckConstraint("price > 0", name=op.f("ck_fills_price_positive")),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_fills_quantity_positive")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_fills_account_id_accounts")),
        sa.ForeignKeyConstraint(["fee_asset"], ["assets.code"], name=op.f("fk_fills_fee_asset_assets")),
        sa.ForeignKeyConstraint(["instrument_id"], ["instruments.id"], name=op.f("fk_fills_instrument_id_instruments")),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"], name=op.f("fk_fills_order_id_orders")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fills")),
        sa.UniqueConstraint("fill_id", name=op.f("uq_fills_fill_id")),
    )
    op.create_index(
        "ix_fills_account_id_created_at",
        "fills",
        ["account_id", sa.literal_column("created_at DESC")],
        unique=False,
    )
    op.create_index(op.f("ix_fills_order_id"), "fills", ["order_id"], unique=False)
    op.create_index(op.f("ix_fills_trade_id"), "fills", ["trade_id"], unique=False)
    op.create_table(
        "holds",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("asset", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("order_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount > 0", name=op.f("ck_holds_amount_positive")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_holds_account_id_accounts")),
        sa.ForeignKeyConstraint(["asset"], ["assets.code"], name=op.f("fk_holds_asset_assets")),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"], name=op.f("fk_holds_order_id_orders")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_holds")),
    )
    op.create_index(
        "ix_holds_active_account_id_asset",
        "holds",
        ["account_id", "asset"],
        unique=False,
        postgresql_where=sa.text("released_at IS NULL"),
    )
    op.create_index(op.f("ix_holds_order_id"), "holds", ["order_id"], unique=False)

    _store_series(bind, native)
    op.execute("INSERT INTO audit_log_head (singleton, last_id, last_hash) VALUES (true, 0, NULL)")
    for ddl in (REFUSE_CHANGE, LEDGER_BALANCED, AUDIT_CONTENT, AUDIT_CHAIN, AUDIT_VERIFY, *TRIGGERS):
        op.execute(ddl)


def downgrade() -> None:
    # Children before parents; dropping a partitioned table or hypertable drops its partitions/chunks,
    # and dropping a table drops its triggers, after which the functions can go.
    for table in (
        "holds",
        "fills",
        "withdrawals",
        "deposits",
        "trading_sessions",
        "trades",
        "risk_limits",
        "positions",
        "orders",
        "margin_calls",
        "ledger_entries",
        "candles",
        "balances",
        "strategies",
        "sessions",
        "instruments",
        "broker_configs",
        "api_keys",
        "accounts",
        "users",
        "ticks",
        "spreads",
        "depth_snapshots",
        "outbox",
        "ledger_transactions",
        "engine_offsets",
        "audit_log_head",
        "audit_log",
        "assets",
    ):
        op.drop_table(table)
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}")
    # Only an extension this revision installed (marked by its comment) is removed.
    op.execute(
        f"""
        DO $$
        BEGIN
            IF obj_description((SELECT oid FROM pg_extension WHERE extname = 'timescaledb'), 'pg_extension')
               = '{TIMESCALE_MARKER}' THEN
                DROP EXTENSION timescaledb;
            END IF;
        END
        $$
        """
    )
