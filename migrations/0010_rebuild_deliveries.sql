-- A rebuild through the outbox (`chronicle rebuild --emit-outbox`) is finished when the
-- deliveries it queued are, not when they are queued. Each delivery it queues carries the
-- run's id; the run records when it queued them and how many. The worker closes such a
-- run once none of its deliveries is pending or processing: finished_at is the last
-- delivery's completion, rows_written the deliveries done, failures those failed (by
-- error_reason), success whether none failed.
ALTER TABLE chronicle_outbox_events ADD COLUMN rebuild_run_id bigint NULL;

ALTER TABLE chronicle_rebuild_runs
    ADD COLUMN queued_at         timestamptz NULL,
    ADD COLUMN deliveries_queued bigint      NULL;

-- "Is any delivery of run R still live?" and the tally at its end, without a scan.
CREATE INDEX chronicle_outbox_events_rebuild_run_idx
    ON chronicle_outbox_events (rebuild_run_id, status) WHERE rebuild_run_id IS NOT NULL;
