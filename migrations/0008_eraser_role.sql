-- Erasure needs a role, and always leaves an audit row.
--
-- Deleting an event is the one exception to the append-only source of truth. Until now a
-- session setting was enough, so any role granted DELETE on chronicle_events could erase
-- without a trace. From here:
--   * DELETE needs the setting (`SET LOCAL chronicle.allow_erase = 'on'`) AND a role that
--     is a member of `chronicle_eraser` or of the table's owner (the role that ran
--     `chronicle migrate`, which `chronicle erase` normally uses). Superusers pass, as
--     they pass every check.
--   * TRUNCATE is always refused: it fires no row trigger, so it could not be audited.
--   * The audit row is written by the database, in the same transaction, by a statement
--     trigger over the deleted rows, whoever deleted them: no event leaves without one.
--     The same trigger deletes the events' deliveries and entries, so nothing is left
--     behind that names an erased event. `chronicle erase` passes who and why through
--     `chronicle.erased_by` and `chronicle.erase_reason` (and, for ids that had only a
--     delivery or an entry left, `chronicle.erase_extra_ids` with the counts it deleted,
--     so one erasure is one audit row); a DELETE that sets none is recorded with the
--     connected role and a reason saying so.
--
-- Granting the right to erase, to a login role `dpo` (see README "Security"):
--     GRANT chronicle_eraser TO dpo;
-- The role itself gets what `chronicle erase` needs (below): to find and delete events,
-- their deliveries and entries in every library (policies open row-level security to it
-- for SELECT and DELETE only), and to add audit rows. It cannot change or remove one.

-- The role is cluster-wide; several databases (or two migrations at once) may create it.
-- A migrating role that may not create roles (no CREATEROLE) needs an administrator to
-- create it once per server; the migration then stops, changing nothing, and says so.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'chronicle_eraser') THEN
        CREATE ROLE chronicle_eraser NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
    WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'the role chronicle_eraser does not exist, and % may not create roles', current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'an administrator runs once on this server: CREATE ROLE chronicle_eraser NOLOGIN; '
                         'then run chronicle migrate again';
END
$$;

GRANT SELECT, DELETE ON chronicle_events, chronicle_entries, chronicle_outbox_events TO chronicle_eraser;
GRANT SELECT, INSERT ON chronicle_erasures TO chronicle_eraser;

DROP POLICY IF EXISTS chronicle_events_eraser_select ON chronicle_events;
CREATE POLICY chronicle_events_eraser_select ON chronicle_events FOR SELECT TO chronicle_eraser USING (true);
DROP POLICY IF EXISTS chronicle_events_eraser_delete ON chronicle_events;
CREATE POLICY chronicle_events_eraser_delete ON chronicle_events FOR DELETE TO chronicle_eraser USING (true);
DROP POLICY IF EXISTS chronicle_entries_eraser_select ON chronicle_entries;
CREATE POLICY chronicle_entries_eraser_select ON chronicle_entries FOR SELECT TO chronicle_eraser USING (true);
DROP POLICY IF EXISTS chronicle_entries_eraser_delete ON chronicle_entries;
CREATE POLICY chronicle_entries_eraser_delete ON chronicle_entries FOR DELETE TO chronicle_eraser USING (true);

CREATE OR REPLACE FUNCTION chronicle_events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND coalesce(current_setting('chronicle.allow_erase', true), '') = 'on'
       AND (pg_has_role(current_user, 'chronicle_eraser', 'MEMBER')
            OR pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'MEMBER')) THEN
        RETURN OLD;
    END IF;
    IF TG_OP = 'DELETE' AND coalesce(current_setting('chronicle.allow_erase', true), '') = 'on' THEN
        RAISE EXCEPTION 'chronicle_events is append-only: erasing events needs the chronicle_eraser role'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'an administrator grants it: GRANT chronicle_eraser TO <role>; then use `chronicle erase`';
    END IF;
    RAISE EXCEPTION 'chronicle_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'events are never changed; a legal erasure goes through `chronicle erase`';
END
$$;

-- Runs as its owner (SECURITY DEFINER): the erasing role needs no right on the outbox,
-- the entries or the audit table, and cannot skip the audit. Its search_path is pinned
-- below, as for the enqueue trigger.
CREATE OR REPLACE FUNCTION chronicle_events_record_erasure() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ids        uuid[];
    deliveries integer;
    entries    integer;
    audit_id   bigint;
    extra_ids  uuid[] := coalesce(string_to_array(nullif(current_setting('chronicle.erase_extra_ids', true), ''), ',')::uuid[], '{}');
    extra_deliveries integer := coalesce(nullif(current_setting('chronicle.erase_extra_deliveries', true), '')::integer, 0);
    extra_entries    integer := coalesce(nullif(current_setting('chronicle.erase_extra_entries', true), '')::integer, 0);
BEGIN
    SELECT array_agg(id ORDER BY id) INTO ids FROM erased;
    IF ids IS NULL THEN
        RETURN NULL;
    END IF;
    -- Deliveries first: a worker completing one of them holds its row, so this waits for
    -- it to commit, and the next statement (a new snapshot) then sees its entry.
    WITH gone AS (DELETE FROM chronicle_outbox_events WHERE event_id = ANY (ids) RETURNING 1)
    SELECT count(*) INTO deliveries FROM gone;
    WITH gone AS (DELETE FROM chronicle_entries WHERE id = ANY (ids) RETURNING 1)
    SELECT count(*) INTO entries FROM gone;
    INSERT INTO chronicle_erasures (event_ids, erased_by, reason, events_erased, deliveries_erased, entries_erased)
    VALUES (ids || extra_ids,
            coalesce(nullif(current_setting('chronicle.erased_by', true), ''), session_user::text),
            coalesce(nullif(current_setting('chronicle.erase_reason', true), ''),
                     '(none given: deleted outside chronicle erase by role ' || session_user || ')'),
            cardinality(ids), deliveries + extra_deliveries, entries + extra_entries)
    RETURNING id INTO audit_id;
    PERFORM set_config('chronicle.erasure_id', audit_id::text, true);
    -- Counted once: a second DELETE in the same transaction gets its own row.
    PERFORM set_config('chronicle.erase_extra_ids', '', true),
            set_config('chronicle.erase_extra_deliveries', '', true),
            set_config('chronicle.erase_extra_entries', '', true);
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
REVOKE ALL ON FUNCTION chronicle_events_record_erasure() FROM PUBLIC;

DROP TRIGGER IF EXISTS chronicle_events_audit_erasure ON chronicle_events;
CREATE TRIGGER chronicle_events_audit_erasure
    AFTER DELETE ON chronicle_events
    REFERENCING OLD TABLE AS erased
    FOR EACH STATEMENT EXECUTE FUNCTION chronicle_events_record_erasure();
