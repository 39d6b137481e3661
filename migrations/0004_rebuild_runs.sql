-- chronicle_rebuild_runs: every `chronicle rebuild` run, so operators (status) and
-- metrics (rebuild duration, last finished, last success) can see them.
CREATE TABLE chronicle_rebuild_runs (
    id                 bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- direct | truncate | emit-outbox | truncate+emit-outbox | swap
    mode               text        NOT NULL,
    library_id         uuid        NULL,
    started_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz NULL,
    events_total       bigint      NULL,
    rows_written       bigint      NOT NULL DEFAULT 0,
    failures           bigint      NOT NULL DEFAULT 0,
    -- {"invalid_payload": 2, ...}
    failures_by_reason jsonb       NOT NULL DEFAULT '{}',
    -- NULL while running (or if the process died); true/false once finished.
    success            boolean     NULL,
    error              text        NULL,
    started_by         text        NULL
);

CREATE INDEX chronicle_rebuild_runs_finished_idx ON chronicle_rebuild_runs (finished_at DESC);
