"""Audit chain sealed off the hot path.

Until now a BEFORE INSERT trigger chained every ``audit_log`` row as it was written: it locked the single
``audit_log_head`` row and kept it locked until the writing transaction committed. Every order placement
writes an audit row, so every placement in the system waited for the one before it to commit: one global
lock on the order path.

Now a row is inserted unsealed (``seq``, ``prev_hash`` and ``hash`` NULL, ``id`` from a sequence) and takes
no lock. ``tp_audit_log_seal(max_rows)`` chains committed unsealed rows in id order: it locks the head,
gives each row the next gapless ``seq``, ``prev_hash`` = the previous sealed row's hash and
``hash = sha256(coalesce(prev_hash, '') || content(seq, ...))``. The relay worker calls it continuously,
so a row is sealed well within a second of its commit. The chain order is the seal order, which is commit
order up to the sealer's batch: a row that commits after a higher id was sealed is sealed in the next batch.

The guard still refuses DELETE and TRUNCATE, and refuses any UPDATE except sealing an unsealed row without
changing its content. Rows chained by 0001's trigger keep their hashes: their ``seq`` is their id, which is
what their content was hashed with.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUDIT_GUARD = r"""
CREATE FUNCTION tp_audit_log_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND OLD.hash IS NULL
       AND (NEW.id, NEW.ts, NEW.actor_user_id, NEW.action, NEW.entity, NEW.entity_id, NEW.details)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.ts, OLD.actor_user_id, OLD.action, OLD.entity, OLD.entity_id, OLD.details)
    THEN
        RETURN NEW;  -- sealing: only seq, prev_hash and hash change, once
    END IF;
    RAISE EXCEPTION '% on % is refused: the table is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END
$$
"""

AUDIT_SEAL = r"""
CREATE FUNCTION tp_audit_log_seal(max_rows integer DEFAULT 10000) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    tip_seq bigint;
    tip_hash bytea;
    next_hash bytea;
    sealed integer := 0;
    r record;
BEGIN
    -- One sealer at a time. A second one waits here, then (READ COMMITTED: a new snapshot per statement)
    -- sees what the first sealed and skips it.
    SELECT last_seq, last_hash INTO tip_seq, tip_hash FROM audit_log_head WHERE singleton FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'audit_log_head row is missing';
    END IF;
    FOR r IN
        SELECT id, ts, actor_user_id, action, entity, entity_id, details
          FROM audit_log WHERE hash IS NULL ORDER BY id LIMIT max_rows
    LOOP
        tip_seq := tip_seq + 1;
        next_hash := sha256(
            coalesce(tip_hash, '\x'::bytea)
            || convert_to(
                tp_audit_log_content(tip_seq, r.ts, r.actor_user_id, r.action, r.entity, r.entity_id, r.details),
                'UTF8'
            )
        );
        UPDATE audit_log SET seq = tip_seq, prev_hash = tip_hash, hash = next_hash WHERE id = r.id;
        tip_hash := next_hash;
        sealed := sealed + 1;
    END LOOP;
    IF sealed > 0 THEN
        UPDATE audit_log_head SET last_seq = tip_seq, last_hash = tip_hash WHERE singleton;
    END IF;
    RETURN sealed;
END
$$
"""

AUDIT_VERIFY = r"""
CREATE FUNCTION tp_audit_log_verify() RETURNS SETOF bigint LANGUAGE sql STABLE AS $$
    SELECT id
      FROM (
        SELECT a.*, lag(a.hash) OVER w AS expected_prev, lag(a.seq) OVER w AS previous_seq
          FROM audit_log a
         WHERE a.seq IS NOT NULL
        WINDOW w AS (ORDER BY a.seq)
      ) chain
     WHERE prev_hash IS DISTINCT FROM expected_prev
        OR seq <> coalesce(previous_seq, 0) + 1
        OR hash <> sha256(
               coalesce(prev_hash, '\x'::bytea)
               || convert_to(
                   tp_audit_log_content(seq, ts, actor_user_id, action, entity, entity_id, details), 'UTF8'
               )
           )
     ORDER BY seq
$$
"""

# 0001's versions, restored by downgrade.
CHAIN_0001 = r"""
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

VERIFY_0001 = r"""
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


def upgrade() -> None:
    op.execute("DROP TRIGGER tp_audit_log_chain ON audit_log")
    op.execute("DROP FUNCTION tp_audit_log_chain()")
    op.execute("DROP TRIGGER tp_audit_log_immutable ON audit_log")

    op.execute("ALTER TABLE audit_log ADD COLUMN seq bigint")
    op.execute("COMMENT ON COLUMN audit_log.seq IS 'gapless chain position, set by the sealer; null until sealed'")
    op.execute("UPDATE audit_log SET seq = id")  # no guard trigger yet: 0001 rows were chained by id
    op.execute("ALTER TABLE audit_log ALTER COLUMN hash DROP NOT NULL")
    op.execute("ALTER TABLE audit_log ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY")
    op.execute("COMMENT ON COLUMN audit_log.id IS 'insertion order; the chain order is seq'")
    op.execute("SELECT setval(pg_get_serial_sequence('audit_log', 'id'), max(id)) FROM audit_log HAVING max(id) > 0")
    op.execute("ALTER TABLE audit_log ADD CONSTRAINT uq_audit_log_seq UNIQUE (seq)")
    op.execute(
        "ALTER TABLE audit_log ADD CONSTRAINT ck_audit_log_sealed_together"
        " CHECK ((seq IS NULL) = (hash IS NULL) AND (seq IS NOT NULL OR prev_hash IS NULL))"
    )
    op.execute("CREATE INDEX ix_audit_log_id_unsealed ON audit_log (id) WHERE hash IS NULL")
    op.execute("ALTER TABLE audit_log_head RENAME COLUMN last_id TO last_seq")

    op.execute(AUDIT_GUARD)
    op.execute(
        "CREATE TRIGGER tp_audit_log_immutable BEFORE UPDATE OR DELETE ON audit_log"
        " FOR EACH ROW EXECUTE FUNCTION tp_audit_log_guard()"
    )
    op.execute(AUDIT_SEAL)
    op.execute("DROP FUNCTION tp_audit_log_verify()")
    op.execute(AUDIT_VERIFY)


def downgrade() -> None:
    # Rows still unsealed are chained now, so the 0001 layout (every row chained, id = chain position) holds.
    op.execute("SELECT tp_audit_log_seal(2147483647)")
    op.execute("DROP TRIGGER tp_audit_log_immutable ON audit_log")
    op.execute("DROP FUNCTION tp_audit_log_seal(integer)")
    op.execute("DROP FUNCTION tp_audit_log_guard()")
    op.execute("DROP FUNCTION tp_audit_log_verify()")
    op.execute(VERIFY_0001)

    op.execute("ALTER TABLE audit_log_head RENAME COLUMN last_seq TO last_id")
    op.execute("DROP INDEX ix_audit_log_id_unsealed")
    op.execute("ALTER TABLE audit_log DROP CONSTRAINT ck_audit_log_sealed_together")
    op.execute("ALTER TABLE audit_log DROP CONSTRAINT uq_audit_log_seq")
    op.execute("ALTER TABLE audit_log ALTER COLUMN id DROP IDENTITY")
    # 0001 numbered rows by chain position: renumber (ids may differ from seq after out-of-order commits).
    op.execute("ALTER TABLE audit_log DROP CONSTRAINT pk_audit_log")
    op.execute("UPDATE audit_log SET id = seq")
    op.execute("ALTER TABLE audit_log ADD CONSTRAINT pk_audit_log PRIMARY KEY (id)")
    op.execute("ALTER TABLE audit_log ALTER COLUMN hash SET NOT NULL")
    op.execute("ALTER TABLE audit_log DROP COLUMN seq")

    op.execute(
        "CREATE TRIGGER tp_audit_log_immutable BEFORE UPDATE OR DELETE ON audit_log"
        " FOR EACH ROW EXECUTE FUNCTION tp_refuse_change()"
    )
    op.execute(CHAIN_0001)
    op.execute(
        "CREATE TRIGGER tp_audit_log_chain BEFORE INSERT ON audit_log"
        " FOR EACH ROW EXECUTE FUNCTION tp_audit_log_chain()"
    )
