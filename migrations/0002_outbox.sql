-- chronicle_outbox_events: one row per delivery of an event to the projector.
-- States (DESIGN.md §3): pending -> processing -> done | failed; failed -> pending by replay.
CREATE TABLE chronicle_outbox_events (
    id                   bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- No foreign key to chronicle_events: the enqueue trigger only ever inserts ids of
    -- rows it just saw inserted, events are never deleted except by `erase` (which
    -- removes their deliveries in the same transaction), and a foreign key would add an
    -- index probe per row to every bulk insert of events.
    event_id             uuid        NOT NULL,
    status               text        NOT NULL DEFAULT 'pending'
        CONSTRAINT chronicle_outbox_events_status_check
        CHECK (status IN ('pending', 'processing', 'done', 'failed')),
    attempts             integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_retry_at        timestamptz NULL,
    claimed_by           text        NULL,
    -- The identity of the claim that holds the row (new for every claim, unique even
    -- when two processes share OUTBOX_WORKER_ID): completion is fenced on it.
    claim_token          uuid        NULL,
    claimed_at           timestamptz NULL,
    lease_until          timestamptz NULL,
    processed_at         timestamptz NULL,
    error_reason         text        NULL
        CONSTRAINT chronicle_outbox_events_error_reason_check
        CHECK (error_reason IN ('unknown_event_type', 'invalid_payload',
                                'rejected_by_read_model', 'max_attempts_exceeded')),
    error                text        NULL,
    replay_count         integer     NOT NULL DEFAULT 0,
    last_replayed_at     timestamptz NULL,
    last_replayed_by     text        NULL,
    last_replayed_reason text        NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT chronicle_outbox_events_processing_has_claim
        CHECK (status <> 'processing' OR (claim_token IS NOT NULL AND lease_until IS NOT NULL))
);

-- Every row is inserted once and updated two or three times within seconds (claim, then
-- done), and done rows are pruned later: a write-heavy, churning table.
-- * fillfactor 70 leaves room on each page so an update can put the new row version on
--   the same page (cheaper, and keeps the table from growing while rows churn);
-- * autovacuum runs after 1% of the rows changed (not the default 20%) and without cost
--   delay, so dead versions are reclaimed while the table is small instead of piling up
--   and slowing the claim scans; analyze follows at 2% so the planner sees the backlog.
ALTER TABLE chronicle_outbox_events SET (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_analyze_threshold = 1000
);

-- At most one pending-or-processing delivery per event (DESIGN.md §2).
CREATE UNIQUE INDEX chronicle_outbox_events_live_event_uq
    ON chronicle_outbox_events (event_id) WHERE status IN ('pending', 'processing');
-- Claiming: the oldest ready pending rows.
CREATE INDEX chronicle_outbox_events_pending_idx
    ON chronicle_outbox_events (id) WHERE status = 'pending';
-- Reclaiming: processing rows whose lease expired or that run too long.
CREATE INDEX chronicle_outbox_events_processing_idx
    ON chronicle_outbox_events (lease_until) WHERE status = 'processing';
-- Operating on failures: status, replay-failed by error_reason.
CREATE INDEX chronicle_outbox_events_failed_idx
    ON chronicle_outbox_events (error_reason, updated_at) WHERE status = 'failed';
-- Looking up the deliveries of one event (show, verify, replay skip check).
CREATE INDEX chronicle_outbox_events_event_idx
    ON chronicle_outbox_events (event_id);

-- The enqueue trigger: one pending delivery per inserted event, in the inserting
-- transaction, so every writer (the API, psql, `chronicle append`) gets it for free.
-- Statement-level over the transition table: a bulk INSERT costs one set-based insert
-- and one notification, not one per row. The notification wakes idle workers; it is
-- delivered only if the transaction commits.
CREATE FUNCTION chronicle_events_enqueue() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chronicle_outbox_events (event_id)
    SELECT id FROM chronicle_new_events ORDER BY occurred_at, id;
    IF FOUND THEN
        PERFORM pg_notify('chronicle_outbox', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER chronicle_events_enqueue
    AFTER INSERT ON chronicle_events
    REFERENCING NEW TABLE AS chronicle_new_events
    FOR EACH STATEMENT EXECUTE FUNCTION chronicle_events_enqueue();

-- Events that exist before the outbox does (an adopted table) are enqueued once, so
-- none is left out of the read model.
INSERT INTO chronicle_outbox_events (event_id)
SELECT id FROM chronicle_events ORDER BY occurred_at, id;
