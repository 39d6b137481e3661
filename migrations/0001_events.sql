-- chronicle_events: the source of truth. Written by the application (any language),
-- never updated; deleted only by a deliberate legal erasure (see below).
--
-- CREATE ... IF NOT EXISTS because the application may have created this table with its
-- own migrations: `chronicle migrate` first checks such a table column by column against
-- the contract (DESIGN.md §2) and only then adopts it here.
CREATE TABLE IF NOT EXISTS chronicle_events (
    id            uuid        PRIMARY KEY,
    library_id    uuid        NOT NULL,
    actor_user_id uuid        NULL,
    entity_type   text        NOT NULL,
    entity_id     uuid        NOT NULL,
    event_type    text        NOT NULL,
    before        jsonb       NULL,
    after         jsonb       NULL,
    diff          jsonb       NULL,
    occurred_at   timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    request_id    text        NULL,
    client        text        NULL,
    reason        text        NULL,
    ip            inet        NULL
);

-- An adopted table may lack the default the contract gives created_at.
ALTER TABLE chronicle_events ALTER COLUMN created_at SET DEFAULT now();

-- Rebuilds and verify walk one library (or all) in the stable order (occurred_at, id).
CREATE INDEX IF NOT EXISTS chronicle_events_library_time_idx
    ON chronicle_events (library_id, occurred_at, id);

-- Append-only, enforced by the database whoever the writer is. UPDATE is always refused.
-- DELETE (and TRUNCATE) are refused unless the session has deliberately set
--     SET LOCAL chronicle.allow_erase = 'on';
-- which only a legal erasure does (`chronicle erase`, with an audit row).
CREATE OR REPLACE FUNCTION chronicle_events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'TRUNCATE')
       AND coalesce(current_setting('chronicle.allow_erase', true), '') = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'chronicle_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'events are never changed; a legal erasure goes through `chronicle erase`';
END
$$;

DROP TRIGGER IF EXISTS chronicle_events_append_only ON chronicle_events;
CREATE TRIGGER chronicle_events_append_only
    BEFORE UPDATE OR DELETE ON chronicle_events
    FOR EACH ROW EXECUTE FUNCTION chronicle_events_refuse_change();

DROP TRIGGER IF EXISTS chronicle_events_no_truncate ON chronicle_events;
CREATE TRIGGER chronicle_events_no_truncate
    BEFORE TRUNCATE ON chronicle_events
    FOR EACH STATEMENT EXECUTE FUNCTION chronicle_events_refuse_change();
