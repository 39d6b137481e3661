-- chronicle_entries: the read model the UI pages, filters and searches. One row per
-- projected event; id = the event's id, the idempotency key that makes replays and
-- rebuilds unable to duplicate an entry.
CREATE TABLE chronicle_entries (
    id                 uuid        PRIMARY KEY,
    library_id         uuid        NOT NULL,
    actor_user_id      uuid        NULL,
    entity_type        text        NOT NULL,
    entity_id          uuid        NOT NULL,
    event_type         text        NOT NULL,
    occurred_at        timestamptz NOT NULL,
    created_at         timestamptz NOT NULL,
    request_id         text        NULL,
    client             text        NULL,
    ip                 inet        NULL,
    reason             text        NULL,
    summary            text        NOT NULL,
    changed_fields     text[]      NOT NULL DEFAULT '{}',
    details            jsonb       NOT NULL DEFAULT '{}',
    -- Built by the projector from summary, titles, names, tags and reason, with CJK text
    -- split into overlapping bigrams so a two-character Chinese word is a lexeme.
    search             tsvector    NOT NULL,
    projection_version integer     NOT NULL,
    projected_at       timestamptz NOT NULL DEFAULT now()
);

-- A library's timeline, newest first, keyset-paginated on (occurred_at, id).
CREATE INDEX chronicle_entries_timeline_idx
    ON chronicle_entries (library_id, occurred_at DESC, id DESC);
-- One entity's history.
CREATE INDEX chronicle_entries_entity_idx
    ON chronicle_entries (library_id, entity_id, occurred_at DESC, id DESC);
-- One actor's actions.
CREATE INDEX chronicle_entries_actor_idx
    ON chronicle_entries (library_id, actor_user_id, occurred_at DESC, id DESC);
-- One event type.
CREATE INDEX chronicle_entries_event_type_idx
    ON chronicle_entries (library_id, event_type, occurred_at DESC, id DESC);
-- Full-text search.
CREATE INDEX chronicle_entries_search_idx
    ON chronicle_entries USING gin (search);
