-- chronicle_erasures: the audit trail of legal erasures (`chronicle erase`). One row per
-- erasure: which event ids, who, when, why, and how many rows went. Never any content of
-- the erased events: keeping it here would defeat the erasure.
CREATE TABLE chronicle_erasures (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_ids         uuid[]      NOT NULL,
    erased_by         text        NOT NULL,
    reason            text        NOT NULL,
    erased_at         timestamptz NOT NULL DEFAULT now(),
    events_erased     integer     NOT NULL,
    deliveries_erased integer     NOT NULL,
    entries_erased    integer     NOT NULL
);

-- "Was this event erased, and when?" without scanning every erasure.
CREATE INDEX chronicle_erasures_event_ids_idx ON chronicle_erasures USING gin (event_ids);
