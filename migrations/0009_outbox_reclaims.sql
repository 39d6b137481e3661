-- How many times a row came back from an expired lease (its holder died or hung while
-- holding it). Such a row is a suspect: it may be the event that kills the worker. The
-- claim takes suspects alone, in claims halved at each reclaim (batch >> reclaims, down
-- to one row), so an event that crashes every worker ends failed on its own and the rest
-- of its first batch is projected. A replay gives the row a fresh start (0).
ALTER TABLE chronicle_outbox_events
    ADD COLUMN reclaims integer NOT NULL DEFAULT 0
        CONSTRAINT chronicle_outbox_events_reclaims_check CHECK (reclaims >= 0);

-- The claim looks for the oldest ready suspect on every turn: a small partial index, so
-- that costs nothing however long the healthy backlog.
CREATE INDEX chronicle_outbox_events_suspect_idx
    ON chronicle_outbox_events (id) WHERE status = 'pending' AND reclaims > 0;
