"""Audit chain sealed into its own table: ``audit_log`` is never updated.

Since 0005 the sealer gave each row its ``seq``, ``prev_hash`` and ``hash`` with an UPDATE: a non-HOT update
of a wide row with five indexes and the guard trigger, ~40 us a row, with a dead tuple left for autovacuum.
Now ``audit_log`` rows are written once and never touched; the sealer appends one narrow row per sealed row
to ``audit_chain(seq, audit_id, prev_hash, hash)`` with one set-based INSERT per batch. The hash is what it
was, ``sha256(coalesce(prev_hash, '') || convert_to(tp_audit_log_content(seq, ts, actor_user_id, action,
entity, entity_id, details), 'UTF8'))``, so every row chained before keeps its hash.

Finding the unsealed rows without an UPDATE (or a partial index that needs one) uses the inserting
transaction's id, as ``trades`` does since 0007: ``audit_log.xact_id`` defaults to ``pg_current_xact_id()``
(the INSERT is unchanged), and ``audit_log_head`` keeps the cursor. A batch takes rows after the cursor whose
``xact_id`` is below its snapshot's ``xmin``, in (``xact_id``, ``id``) order: every transaction below ``xmin``
has ended, so no row can appear behind the cursor later, whatever the commit order. The cursor is a position
(``xact_cursor``, ``id_cursor``): a batch cut by ``max_rows`` inside one transaction's rows resumes after the
last row sealed. Sealers serialise on the head row lock; a row is sealed only if it has no ``audit_chain`` row
(``audit_chain.audit_id`` is unique as well), so a row can be neither skipped nor sealed twice. A writing
transaction left open anywhere on the server holds the cursor back (delays sealing, never loses a row). The
chain order is therefore transaction-id order, which is close to commit order but not the same.

``audit_chain.audit_id`` has no foreign key: its check takes a KEY SHARE lock on every sealed ``audit_log``
row, which writes that row's tuple header (and WAL) again, the write this revision removes, for ~4 us a row.
Audit rows cannot be deleted, and ``tp_audit_log_verify()`` reports a chain row whose audit row is gone.

Transaction ids are the server's, not the database's: a database restored (pg_restore) onto a server whose ids
are behind the cursor would leave new rows below it. The sealer sees that (the cursor is above the next id
the server will assign, impossible on one server) and re-bases: it seals every committed row that has no
chain row yet and restarts the cursor at the server's ``xmin``; rows brought from the old server with ids
the new one has not reached are then skipped by the chain-row check.

``tp_audit_log_content`` gets an equivalent body (same text for every input) that the planner inlines: the
0001 body (``unnest`` + ``string_agg``, run by the SQL-function executor) took ~11 us a call, this one ~4 us.

Rows are chained before the layout changes (the 0005 sealer runs first), so nothing is left behind. The
guards now refuse every UPDATE, DELETE and TRUNCATE of ``audit_log`` and ``audit_chain``, statement by
statement. Downgrade copies the chain back into the 0005 columns; rows not chained yet become unsealed rows,
which the 0005 sealer chains.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The 0001 netstring content (``length:value``, ``-`` for NULL, joined by commas) as one expression, so the
# planner inlines it into the calling query. Every field is non-null after the coalesce, so string_agg's
# separators and this concatenation's agree.
AUDIT_CONTENT = r"""
CREATE OR REPLACE FUNCTION tp_audit_log_content(
    id bigint, ts timestamptz, actor_user_id bigint, action text, entity text, entity_id text, details jsonb
) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(length(id::text) || ':' || id::text, '-')
           || ',' || coalesce(
               length(to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')) || ':'
               || to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               '-'
           )
           || ',' || coalesce(length(actor_user_id::text) || ':' || actor_user_id::text, '-')
           || ',' || coalesce(length(action) || ':' || action, '-')
           || ',' || coalesce(length(entity) || ':' || entity, '-')
           || ',' || coalesce(length(entity_id) || ':' || entity_id, '-')
           || ',' || coalesce(length(details::text) || ':' || details::text, '-')
$$
"""

AUDIT_SEAL = r"""
CREATE FUNCTION tp_audit_log_seal(max_rows integer DEFAULT 10000) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    head record;
    horizon bigint;
    next_xid bigint;
    from_xact bigint;
    from_id bigint;
    rebased boolean := false;
    ids bigint[];
    xacts bigint[];
    contents bytea[];
    prevs bytea[] := '{}';
    hashes bytea[] := '{}';
    tip_hash bytea;
    n integer;
BEGIN
    -- One sealer at a time. A second one waits here and then (READ COMMITTED) reads the head, and in the
    -- statements below the chain rows, as the first one committed them.
    SELECT last_seq, last_hash, xact_cursor, id_cursor INTO head FROM audit_log_head WHERE singleton FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'audit_log_head row is missing';
    END IF;
    -- A snapshot taken after the lock. Every transaction below its xmin has ended, so its rows are visible to
    -- the later statements too, and none can appear there afterwards.
    SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint
      INTO horizon, next_xid FROM pg_current_snapshot() AS s;

    IF head.xact_cursor > next_xid THEN
        -- The cursor counts another server's transaction ids (a restore onto a server that is behind): seal
        -- every committed row not chained yet, then restart the cursor at this server's horizon.
        rebased := true;
        SELECT array_agg(q.id ORDER BY q.o), array_agg(q.xact_id ORDER BY q.o),
               array_agg(convert_to(tp_audit_log_content(head.last_seq + q.o, q.ts, q.actor_user_id, q.action,
                                                         q.entity, q.entity_id, q.details), 'UTF8') ORDER BY q.o)
          INTO ids, xacts, contents
          FROM (SELECT a.*, row_number() OVER (ORDER BY a.xact_id, a.id) AS o
                  FROM audit_log a
                 WHERE (a.xact_id < horizon OR a.xact_id >= next_xid)
                   AND NOT EXISTS (SELECT FROM audit_chain c WHERE c.audit_id = a.id)) q;
    ELSE
        -- The window: after the cursor position, below the horizon.
        from_xact := head.xact_cursor;
        IF head.id_cursor IS NULL THEN
            from_id := -9223372036854775808;
        ELSIF head.id_cursor = 9223372036854775807 THEN
            from_xact := from_xact + 1;
            from_id := -9223372036854775808;
        ELSE
            from_id := head.id_cursor + 1;
        END IF;
        SELECT array_agg(q.id ORDER BY q.o), array_agg(q.xact_id ORDER BY q.o),
               array_agg(convert_to(tp_audit_log_content(head.last_seq + q.o, q.ts, q.actor_user_id, q.action,
                                                         q.entity, q.entity_id, q.details), 'UTF8') ORDER BY q.o)
          INTO ids, xacts, contents
          FROM (SELECT w.*, row_number() OVER (ORDER BY w.xact_id, w.id) AS o
                  FROM (SELECT a.*
                          FROM audit_log a
                         WHERE (a.xact_id, a.id) >= (from_xact, from_id)
                           AND a.xact_id < horizon
                           AND NOT EXISTS (SELECT FROM audit_chain c WHERE c.audit_id = a.id)
                         ORDER BY a.xact_id, a.id
                         LIMIT max_rows) w) q;
    END IF;

    n := coalesce(array_length(ids, 1), 0);
    tip_hash := head.last_hash;
    FOR i IN 1 .. n LOOP
        prevs[i] := tip_hash;
        tip_hash := sha256(coalesce(tip_hash, '\x'::bytea) || contents[i]);
        hashes[i] := tip_hash;
    END LOOP;
    IF n > 0 THEN
        INSERT INTO audit_chain (seq, audit_id, prev_hash, hash)
        SELECT head.last_seq + u.o, u.id, u.prev_hash, u.hash
          FROM unnest(ids, prevs, hashes) WITH ORDINALITY AS u(id, prev_hash, hash, o);
    END IF;
    IF rebased OR n >= max_rows THEN
        -- A full batch may have stopped inside a transaction's rows: resume after the last one sealed.
        UPDATE audit_log_head
           SET last_seq = head.last_seq + n, last_hash = tip_hash,
               xact_cursor = CASE WHEN rebased THEN horizon ELSE xacts[n] END,
               id_cursor = CASE WHEN rebased THEN NULL ELSE ids[n] END
         WHERE singleton;
    ELSIF n > 0 THEN
        -- The whole window is sealed. (An empty window leaves the head alone: nothing lies behind the horizon.)
        UPDATE audit_log_head
           SET last_seq = head.last_seq + n, last_hash = tip_hash, xact_cursor = horizon, id_cursor = NULL
         WHERE singleton;
    END IF;
    RETURN n;
END
$$
"""

AUDIT_VERIFY = r"""
CREATE FUNCTION tp_audit_log_verify() RETURNS SETOF bigint LANGUAGE sql STABLE AS $$
    SELECT audit_id
      FROM (
        SELECT c.seq, c.audit_id, c.prev_hash, c.hash, a.id, a.ts, a.actor_user_id, a.action, a.entity,
               a.entity_id, a.details, lag(c.hash) OVER w AS expected_prev, lag(c.seq) OVER w AS previous_seq
          FROM audit_chain c LEFT JOIN audit_log a ON a.id = c.audit_id
        WINDOW w AS (ORDER BY c.seq)
      ) chain
     WHERE id IS NULL
        OR prev_hash IS DISTINCT FROM expected_prev
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

GUARDS = (
    "CREATE TRIGGER tp_audit_log_immutable BEFORE UPDATE OR DELETE ON audit_log"
    " FOR EACH STATEMENT EXECUTE FUNCTION tp_refuse_change()",
    "CREATE TRIGGER tp_audit_chain_immutable BEFORE UPDATE OR DELETE ON audit_chain"
    " FOR EACH STATEMENT EXECUTE FUNCTION tp_refuse_change()",
    "CREATE TRIGGER tp_audit_chain_no_truncate BEFORE TRUNCATE ON audit_chain"
    " FOR EACH STATEMENT EXECUTE FUNCTION tp_refuse_change()",
)

# 0001's content function and 0005's guard, sealer and verifier, restored by downgrade.
CONTENT_0001 = r"""
CREATE OR REPLACE FUNCTION tp_audit_log_content(
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

GUARD_0005 = r"""
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

SEAL_0005 = r"""
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

VERIFY_0005 = r"""
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


def upgrade() -> None:
    # The head first (a running 0005 sealer holds its row, then updates audit_log), then audit_log, which
    # waits for every transaction still writing to it: after this, every row is committed and none is added.
    op.execute("LOCK TABLE audit_log_head, audit_log IN ACCESS EXCLUSIVE MODE")
    op.execute("SELECT tp_audit_log_seal(2147483647)")  # 0005's sealer: chain everything first
    unsealed = op.get_bind().execute(sa.text("SELECT count(*) FROM audit_log WHERE hash IS NULL")).scalar_one()
    if unsealed:
        raise RuntimeError(f"{unsealed} audit_log rows are still unsealed after sealing; nothing was changed")

    op.create_table(
        "audit_chain",
        sa.Column("seq", sa.BigInteger(), nullable=False, comment="gapless chain position"),
        sa.Column("audit_id", sa.BigInteger(), nullable=False, comment="the audit_log row sealed at this position"),
        sa.Column(
            "prev_hash", postgresql.BYTEA(), nullable=True, comment="hash of the previous row; null for the first"
        ),
        sa.Column("hash", postgresql.BYTEA(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_chain")),
        sa.UniqueConstraint("audit_id", name=op.f("uq_audit_chain_audit_id")),
    )
    op.execute(
        "INSERT INTO audit_chain (seq, audit_id, prev_hash, hash) SELECT seq, id, prev_hash, hash FROM audit_log"
        " ORDER BY seq"
    )

    op.execute("DROP TRIGGER tp_audit_log_immutable ON audit_log")
    op.execute("DROP FUNCTION tp_audit_log_guard()")
    op.execute("DROP FUNCTION tp_audit_log_seal(integer)")
    op.execute("DROP FUNCTION tp_audit_log_verify()")
    op.execute("DROP INDEX ix_audit_log_id_unsealed")
    op.execute("ALTER TABLE audit_log DROP CONSTRAINT ck_audit_log_sealed_together")
    op.execute("ALTER TABLE audit_log DROP CONSTRAINT uq_audit_log_seq")
    op.execute("ALTER TABLE audit_log DROP COLUMN seq, DROP COLUMN prev_hash, DROP COLUMN hash")
    op.execute("COMMENT ON COLUMN audit_log.id IS 'insertion order; the chain order is audit_chain.seq'")

    # A constant default first (no table rewrite: existing rows read 0, all of them chained above), then the
    # inserting transaction's id for new rows.
    op.add_column(
        "audit_log",
        sa.Column(
            "xact_id",
            sa.BigInteger(),
            nullable=False,
            server_default=sa.text("0"),
            comment="inserting transaction (sealer cursor); 0 for rows chained before revision 0009",
        ),
    )
    op.execute("ALTER TABLE audit_log ALTER COLUMN xact_id SET DEFAULT (pg_current_xact_id()::text)::bigint")
    op.create_index("ix_audit_log_xact_id_id", "audit_log", ["xact_id", "id"])

    op.add_column(
        "audit_log_head",
        sa.Column(
            "xact_cursor",
            sa.BigInteger(),
            nullable=False,
            server_default=sa.text("0"),
            comment="rows of transactions below this are sealed",
        ),
    )
    op.add_column(
        "audit_log_head",
        sa.Column(
            "id_cursor",
            sa.BigInteger(),
            nullable=True,
            comment="rows of transaction xact_cursor up to this id are sealed too; null: none of them",
        ),
    )
    # Every row is chained and has xact_id 0; transaction ids start at 3.
    op.execute("UPDATE audit_log_head SET xact_cursor = 1 WHERE singleton")

    for ddl in (AUDIT_CONTENT, AUDIT_SEAL, AUDIT_VERIFY, *GUARDS):
        op.execute(ddl)


def downgrade() -> None:
    op.execute("LOCK TABLE audit_log_head, audit_log, audit_chain IN ACCESS EXCLUSIVE MODE")
    op.execute("DROP TRIGGER tp_audit_log_immutable ON audit_log")
    op.execute("DROP FUNCTION tp_audit_log_seal(integer)")
    op.execute("DROP FUNCTION tp_audit_log_verify()")
    op.execute(CONTENT_0001)

    op.execute("ALTER TABLE audit_log ADD COLUMN prev_hash bytea, ADD COLUMN hash bytea, ADD COLUMN seq bigint")
    op.execute("COMMENT ON COLUMN audit_log.prev_hash IS 'hash of the previous row; null for the first'")
    op.execute("COMMENT ON COLUMN audit_log.seq IS 'gapless chain position, set by the sealer; null until sealed'")
    op.execute("COMMENT ON COLUMN audit_log.id IS 'insertion order; the chain order is seq'")
    # Rows without a chain row stay unsealed (all three NULL): the 0005 sealer chains them.
    op.execute(
        "UPDATE audit_log a SET seq = c.seq, prev_hash = c.prev_hash, hash = c.hash"
        " FROM audit_chain c WHERE c.audit_id = a.id"
    )
    op.execute("ALTER TABLE audit_log ADD CONSTRAINT uq_audit_log_seq UNIQUE (seq)")
    op.execute(
        "ALTER TABLE audit_log ADD CONSTRAINT ck_audit_log_sealed_together"
        " CHECK ((seq IS NULL) = (hash IS NULL) AND (seq IS NOT NULL OR prev_hash IS NULL))"
    )
    op.execute("CREATE INDEX ix_audit_log_id_unsealed ON audit_log (id) WHERE hash IS NULL")

    op.drop_table("audit_chain")
    op.drop_index("ix_audit_log_xact_id_id", table_name="audit_log")
    op.drop_column("audit_log", "xact_id")
    op.drop_column("audit_log_head", "id_cursor")
    op.drop_column("audit_log_head", "xact_cursor")

    op.execute(GUARD_0005)
    op.execute(
        "CREATE TRIGGER tp_audit_log_immutable BEFORE UPDATE OR DELETE ON audit_log"
        " FOR EACH ROW EXECUTE FUNCTION tp_audit_log_guard()"
    )
    op.execute(SEAL_0005)
    op.execute(VERIFY_0005)
