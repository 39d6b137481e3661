-- The erasure guard trusts nothing the deleting session controls.
--
-- * Every function of chronicle's pins its search_path. chronicle_events_refuse_change()
--   did not: a role with DELETE on chronicle_events and CREATE on any schema put its own
--   pg_has_role() first on its search_path and deleted events without being an eraser.
--   It needs nothing but the catalog, so it gets the catalog alone.
-- * The audit row also records what the session cannot forge: `db_session_user` (the
--   role that logged in), `db_current_user` (the role the DELETE ran as), and
--   `erased_at`, the transaction's start as the database tells it. `erased_by` and
--   `reason` stay what the eraser says (`chronicle erase --by --reason`).
-- * The counts are what the database deleted. For ids with no event left (a delivery or
--   an entry left behind), `chronicle erase` names them in `chronicle.erase_extra_ids`
--   and the trigger deletes what is there and counts it; the counts a session used to
--   pass (`chronicle.erase_extra_deliveries`, `..._entries`) are no longer read, and
--   only the ids that had something deleted are listed.
-- * Audit rows are written by the database alone: the eraser role may no longer insert
--   one (it could write any who, time and counts).

ALTER FUNCTION chronicle_events_refuse_change() SET search_path = pg_catalog, pg_temp;

ALTER TABLE chronicle_erasures
    ADD COLUMN db_session_user text,
    ADD COLUMN db_current_user text;

COMMENT ON COLUMN chronicle_erasures.db_session_user IS
    'session_user of the erasing transaction (NULL on rows written before migration 13)';
COMMENT ON COLUMN chronicle_erasures.db_current_user IS
    'current_user the DELETE ran as (NULL on rows written before migration 13)';

REVOKE INSERT ON chronicle_erasures FROM chronicle_eraser;

-- The role the DELETE ran as. The audit trigger runs as its owner (SECURITY DEFINER), where
-- current_user is the owner: this one runs as the deleter, just before it. Triggers of the
-- same event fire in the order of their names, and `..._audit_caller` sorts before
-- `..._audit_erasure`; nothing the session runs (its WHERE, its RETURNING) comes between
-- two statement triggers of the same statement, so the setting read there is this one.
CREATE OR REPLACE FUNCTION chronicle_events_note_caller() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM set_config('chronicle.erasing_role', current_user::text, true);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS chronicle_events_audit_caller ON chronicle_events;
CREATE TRIGGER chronicle_events_audit_caller
    AFTER DELETE ON chronicle_events
    FOR EACH STATEMENT EXECUTE FUNCTION chronicle_events_note_caller();

-- Replaces the one of migration 8; a replaced function loses its SECURITY DEFINER and its
-- search_path (its grants stay), so they are set again below, in its schema as there.
CREATE OR REPLACE FUNCTION chronicle_events_record_erasure() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    caller     text := nullif(current_setting('chronicle.erasing_role', true), '');
    erased_ids uuid[];
    extra_ids  uuid[] := coalesce(string_to_array(nullif(current_setting('chronicle.erase_extra_ids', true), ''), ',')::uuid[], '{}');
    ids        uuid[];
    delivered  uuid[];
    entered    uuid[];
    deliveries integer;
    entries    integer;
    audit_id   bigint;
BEGIN
    -- Read once: a second DELETE in the same transaction is noted and counted anew.
    PERFORM set_config('chronicle.erasing_role', '', true),
            set_config('chronicle.erase_extra_ids', '', true);
    SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO erased_ids FROM erased;
    SELECT coalesce(array_agg(DISTINCT x ORDER BY x), '{}') INTO extra_ids
    FROM unnest(extra_ids) x WHERE x <> ALL (erased_ids);
    IF cardinality(erased_ids) = 0 AND cardinality(extra_ids) = 0 THEN
        RETURN NULL;
    END IF;
    -- Deleting events passed chronicle_events_refuse_change() row by row; ids with no
    -- event pass no row trigger, so the same rule is checked here, on the caller.
    IF cardinality(extra_ids) > 0 AND NOT (
           coalesce(current_setting('chronicle.allow_erase', true), '') = 'on'
           AND caller IS NOT NULL
           AND (pg_has_role(caller, 'chronicle_eraser', 'MEMBER')
                OR pg_has_role(caller, (SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'MEMBER'))) THEN
        RAISE EXCEPTION 'erasing what is left of events (chronicle.erase_extra_ids) needs the chronicle_eraser role'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'an administrator grants it: GRANT chronicle_eraser TO <role>; then use `chronicle erase`';
    END IF;
    ids := erased_ids || extra_ids;
    -- Deliveries first: a worker completing one of them holds its row, so this waits for
    -- it to commit, and the next statement (a new snapshot) then sees its entry.
    WITH gone AS (DELETE FROM chronicle_outbox_events WHERE event_id = ANY (ids) RETURNING event_id)
    SELECT count(*), coalesce(array_agg(DISTINCT event_id), '{}') INTO deliveries, delivered FROM gone;
    WITH gone AS (DELETE FROM chronicle_entries WHERE id = ANY (ids) RETURNING id)
    SELECT count(*), coalesce(array_agg(id), '{}') INTO entries, entered FROM gone;
    SELECT coalesce(array_agg(x ORDER BY x), '{}') INTO extra_ids
    FROM unnest(extra_ids) x WHERE x = ANY (delivered) OR x = ANY (entered);
    IF cardinality(erased_ids) = 0 AND cardinality(extra_ids) = 0 THEN
        RETURN NULL;
    END IF;
    INSERT INTO chronicle_erasures (event_ids, erased_by, reason, erased_at, events_erased, deliveries_erased,
                                    entries_erased, db_session_user, db_current_user)
    VALUES (erased_ids || extra_ids,
            coalesce(nullif(current_setting('chronicle.erased_by', true), ''), session_user::text),
            coalesce(nullif(current_setting('chronicle.erase_reason', true), ''),
                     '(none given: deleted outside chronicle erase by role ' || session_user || ')'),
            transaction_timestamp(), cardinality(erased_ids), deliveries, entries, session_user::text, caller)
    RETURNING id INTO audit_id;
    PERFORM set_config('chronicle.erasure_id', audit_id::text, true);
    RETURN NULL;
END
$$;

DO $$
DECLARE
    fn_schema text;
BEGIN
    SELECT n.nspname INTO STRICT fn_schema
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.oid = 'chronicle_events_record_erasure()'::regprocedure;
    EXECUTE format(
        'ALTER FUNCTION %I.chronicle_events_record_erasure() SECURITY DEFINER SET search_path = %I, pg_temp',
        fn_schema, fn_schema);
END
$$;
