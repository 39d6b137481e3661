-- Row-level security (DESIGN.md §2 "Scope isolation"): an application role sees and
-- writes only the library named by its session setting `chronicle.library_id`:
--
--     SET chronicle.library_id = '0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01';   -- or SET LOCAL
--
-- ENABLE, not FORCE: the table owner (the role that ran `chronicle migrate`, which the
-- worker and the ops commands use) and superusers are not subject to the policies and
-- keep seeing every library. No role is created here: the README has the
-- statements an operator runs for the application's role.
--
-- Unset or empty setting: NULL, which matches no row, so a session that forgot to name
-- its library sees nothing and can write nothing (fail closed). A value that is not a
-- UUID makes the statement fail with invalid_text_representation, loudly.
ALTER TABLE chronicle_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE chronicle_entries ENABLE ROW LEVEL SECURITY;

-- FOR ALL: SELECT, INSERT, UPDATE, DELETE. USING filters the rows a statement sees;
-- WITH CHECK refuses a new or changed row of another library (an INSERT, or an UPDATE
-- moving a row out). The grants decide which of these commands a role may run at all
-- (the application gets SELECT, INSERT on events and SELECT on entries). The setting is
-- read once per statement (current_setting is stable): with the query's own
-- `library_id = $1` the policy is a one-time check, otherwise an index condition.
CREATE POLICY chronicle_events_library_scope ON chronicle_events
    FOR ALL
    USING (library_id = nullif(current_setting('chronicle.library_id', true), '')::uuid)
    WITH CHECK (library_id = nullif(current_setting('chronicle.library_id', true), '')::uuid);

CREATE POLICY chronicle_entries_library_scope ON chronicle_entries
    FOR ALL
    USING (library_id = nullif(current_setting('chronicle.library_id', true), '')::uuid)
    WITH CHECK (library_id = nullif(current_setting('chronicle.library_id', true), '')::uuid);

-- An application role that inserts events must not need any right on the outbox: the
-- enqueue trigger's function runs as its owner (SECURITY DEFINER). Its search_path is
-- pinned to the schema it lives in (then pg_temp, last, so no temporary table can
-- shadow the outbox), as a SECURITY DEFINER function must: otherwise a caller could put
-- its own chronicle_outbox_events first on its search_path and have the owner write
-- there. The schema is looked up, not assumed to be `public`.
DO $$
DECLARE
    fn_schema text;
BEGIN
    SELECT n.nspname INTO STRICT fn_schema
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.oid = 'chronicle_events_enqueue()'::regprocedure;
    EXECUTE format(
        'ALTER FUNCTION %I.chronicle_events_enqueue() SECURITY DEFINER SET search_path = %I, pg_temp',
        fn_schema, fn_schema);
END
$$;
