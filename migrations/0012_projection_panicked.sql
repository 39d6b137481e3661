-- A new error_reason, projection_panicked: the projection of the event panicked (a bug in
-- chronicle, caught at that one event; DESIGN.md §3). The closed list of reasons grows by
-- one; every row the old constraint allowed, this one allows.
ALTER TABLE chronicle_outbox_events
    DROP CONSTRAINT chronicle_outbox_events_error_reason_check,
    ADD CONSTRAINT chronicle_outbox_events_error_reason_check
        CHECK (error_reason IN ('unknown_event_type', 'invalid_payload',
                                'rejected_by_read_model', 'max_attempts_exceeded', 'projection_panicked'));
