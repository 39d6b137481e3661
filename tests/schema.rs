//! Migrations, the outbox trigger and the append-only source of truth, on a real server.

use std::thread;

use postgres::fallible_iterator::FallibleIterator;

use crate::util::{count, run, TestDb};

#[test]
fn migrate_twice_is_a_no_op() {
    let db = TestDb::new();
    let mut c = db.client();
    let before: Vec<(i32, String)> = c
        .query("SELECT version, applied_at::text FROM chronicle_schema_migrations ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("up to date"), "{r}");
    let after: Vec<(i32, String)> = c
        .query("SELECT version, applied_at::text FROM chronicle_schema_migrations ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(before, after);
    assert_eq!(before.len(), chronicle::db::migrate::MIGRATIONS.len());
}

#[test]
fn concurrent_migrates_all_succeed_and_apply_once() {
    let db = TestDb::empty();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let mut cmd = db.chronicle(&["migrate"]);
            thread::spawn(move || run(&mut cmd))
        })
        .collect();
    let mut applied_lines = 0;
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.code, Some(0), "{r}");
        applied_lines += r.stdout.lines().filter(|l| l.starts_with("applied ")).count();
    }
    assert_eq!(applied_lines, chronicle::db::migrate::MIGRATIONS.len(), "each migration applied exactly once");
    let mut c = db.client();
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_schema_migrations"), applied_lines as i64);
}

#[test]
fn a_changed_applied_migration_is_refused() {
    let db = TestDb::new();
    let mut c = db.client();
    c.execute("UPDATE chronicle_schema_migrations SET checksum = 'edited' WHERE version = 2", &[]).unwrap();
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("migration 2 (outbox) differs"), "{r}");
    let r = run(&mut db.chronicle(&["migrate", "--status"]));
    assert_eq!(r.code, Some(1), "{r}");
}

#[test]
fn an_unknown_applied_migration_is_refused() {
    let db = TestDb::new();
    let mut c = db.client();
    c.execute(
        "INSERT INTO chronicle_schema_migrations (version, name, checksum, duration_ms) VALUES (999, 'future', 'x', 0)",
        &[],
    )
    .unwrap();
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("999 (future) is not known"), "{r}");
}

#[test]
fn status_lists_applied_and_pending() {
    let db = TestDb::empty();
    let r = run(&mut db.chronicle(&["migrate", "--status"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(
        r.stdout.lines().filter(|l| l.starts_with("pending")).count(),
        chronicle::db::migrate::MIGRATIONS.len(),
        "{r}"
    );
    run(&mut db.chronicle(&["migrate"]));
    let r = run(&mut db.chronicle(&["migrate", "--status"]));
    let first = |l: &str| l.split_whitespace().take(3).collect::<Vec<_>>() == ["applied", "1", "events"];
    assert!(r.stdout.lines().any(first), "{r}");
    assert!(r.stdout.contains("up to date"), "{r}");
}

const APP_EVENTS_TABLE: &str = "
    CREATE TABLE chronicle_events (
        id uuid PRIMARY KEY, library_id uuid NOT NULL, actor_user_id uuid, entity_type text NOT NULL,
        entity_id uuid NOT NULL, event_type text NOT NULL, before jsonb, after jsonb, diff jsonb,
        occurred_at timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
        request_id text, client text, reason text, ip inet, app_note text)";

#[test]
fn an_existing_compatible_events_table_is_adopted_and_its_events_enqueued() {
    let db = TestDb::empty();
    let mut c = db.client();
    c.batch_execute(APP_EVENTS_TABLE).unwrap();
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         VALUES (gen_random_uuid(), gen_random_uuid(), 'tag', gen_random_uuid(), 'TagCreated', '{\"name\":\"x\"}', now())",
    )
    .unwrap();
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("adopted"), "{r}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'"), 1);
    // The adopted table now has the trigger.
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         VALUES (gen_random_uuid(), gen_random_uuid(), 'tag', gen_random_uuid(), 'TagCreated', '{\"name\":\"y\"}', now())",
    )
    .unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events"), 2);
}

#[test]
fn an_incompatible_events_table_is_refused_with_its_differences() {
    let db = TestDb::empty();
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE chronicle_events (
            id uuid PRIMARY KEY, library_id uuid, entity_type text NOT NULL, entity_id text NOT NULL,
            event_type text NOT NULL, before jsonb, after jsonb, diff jsonb,
            occurred_at timestamp NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
            request_id text, client text, reason text, ip inet, tenant text NOT NULL)",
    )
    .unwrap();
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(1), "{r}");
    for expected in [
        "actor_user_id (uuid) is missing",
        "library_id allows NULL",
        "entity_id is text, the contract says uuid",
        "occurred_at is timestamp, the contract says timestamptz",
        "extra column tenant",
    ] {
        assert!(r.stderr.contains(expected), "missing {expected:?} in {r}");
    }
    // Nothing was applied.
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_schema_migrations"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM pg_class WHERE relname = 'chronicle_outbox_events'"), 0);
}

const INSERT_ONE: &str = "
    INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
    VALUES (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRestored', '{\"title\":\"t\"}', now())";

#[test]
fn a_plain_sql_insert_enqueues_exactly_one_pending_row() {
    let db = TestDb::new();
    let mut c = db.client();
    c.batch_execute(INSERT_ONE).unwrap();
    let row = c
        .query_one(
            "SELECT o.status, o.attempts, count(*) OVER () FROM chronicle_outbox_events o JOIN chronicle_events e ON e.id = o.event_id",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 0);
    assert_eq!(row.get::<_, i64>(2), 1);
}

#[test]
fn a_multi_row_insert_enqueues_one_row_per_event() {
    let db = TestDb::new();
    let mut c = db.client();
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         SELECT gen_random_uuid(), gen_random_uuid(), 'tag', gen_random_uuid(), 'TagCreated',
                jsonb_build_object('name', 'tag ' || g), now() - g * interval '1 minute'
         FROM generate_series(1, 250) g",
    )
    .unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events"), 250);
    assert_eq!(
        count(&mut c, "SELECT count(DISTINCT event_id) FROM chronicle_outbox_events WHERE status = 'pending'"),
        250
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_events e WHERE NOT EXISTS (SELECT 1 FROM chronicle_outbox_events o WHERE o.event_id = e.id)"),
        0
    );
}

#[test]
fn a_rolled_back_insert_enqueues_nothing() {
    let db = TestDb::new();
    let mut c = db.client();
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(INSERT_ONE).unwrap();
    assert_eq!(count(&mut tx, "SELECT count(*) FROM chronicle_outbox_events"), 1);
    tx.rollback().unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_events"), 0);
}

#[test]
fn a_multi_row_insert_notifies_listeners_once_and_only_on_commit() {
    let db = TestDb::new();
    let mut listener = db.client();
    listener.batch_execute("LISTEN chronicle_outbox").unwrap();
    let mut next = |wait_ms: u64| {
        let mut n = listener.notifications();
        let got = n.timeout_iter(std::time::Duration::from_millis(wait_ms)).next().unwrap();
        got.map(|n| n.channel().to_string())
    };
    let mut c = db.client();
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRestored', '{\"title\":\"t\"}', now()
         FROM generate_series(1, 3)",
    )
    .unwrap();
    assert_eq!(next(500), None, "notified before the commit");
    tx.commit().unwrap();
    assert_eq!(next(5000).as_deref(), Some("chronicle_outbox"), "no notification after the commit");
    assert_eq!(next(500), None, "three rows, one statement: one notification, not one per row");
    // A rolled-back insert notifies nobody.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(INSERT_ONE).unwrap();
    tx.rollback().unwrap();
    assert_eq!(next(500), None, "notified for a rolled-back insert");
}

#[test]
fn events_cannot_be_updated_deleted_or_truncated() {
    let db = TestDb::new();
    let mut c = db.client();
    c.batch_execute(INSERT_ONE).unwrap();
    for sql in ["UPDATE chronicle_events SET reason = 'x'", "DELETE FROM chronicle_events", "TRUNCATE chronicle_events"]
    {
        let err = c.batch_execute(sql).expect_err(sql);
        let db_err = err.as_db_error().expect("a database error");
        assert!(db_err.message().contains("append-only"), "{sql}: {db_err:?}");
    }
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_events"), 1);
    // The deliberate path for a legal erasure: DELETE only, only with the session setting.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SET LOCAL chronicle.allow_erase = 'on'").unwrap();
    assert!(tx.batch_execute("UPDATE chronicle_events SET reason = 'x'").is_err());
    tx.rollback().unwrap();
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SET LOCAL chronicle.allow_erase = 'on'; DELETE FROM chronicle_events").unwrap();
    tx.commit().unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_events"), 0);
}

#[test]
fn at_most_one_live_delivery_per_event() {
    let db = TestDb::new();
    let mut c = db.client();
    c.batch_execute(INSERT_ONE).unwrap();
    let err = c
        .batch_execute("INSERT INTO chronicle_outbox_events (event_id) SELECT event_id FROM chronicle_outbox_events")
        .expect_err("a second pending delivery must be refused");
    assert_eq!(err.code(), Some(&postgres::error::SqlState::UNIQUE_VIOLATION));
}

/// The columns of `table` in the migrated database, in table order, with their type and
/// whether they are NOT NULL.
fn table_columns(db: &TestDb, table: &str) -> Vec<(String, String, bool)> {
    let sql = "SELECT column_name::text, udt_name::text, is_nullable = 'NO' FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position";
    db.client().query(sql, &[&table]).unwrap().iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
}

/// The names of a comma-separated column list, `expression AS name` as `name`.
fn list_names(list: &str) -> Vec<String> {
    list.split(',')
        .map(|c| c.split_whitespace().collect::<Vec<_>>().join(" "))
        .map(|c| c.rsplit(" AS ").next().unwrap_or_default().to_string())
        .collect()
}

/// The list between the first `(` after `marker` and its `)`.
fn list_after<'a>(sql: &'a str, marker: &str) -> &'a str {
    let start = sql.find(marker).expect(marker) + marker.len();
    let open = start + sql[start..].find('(').expect("(") + 1;
    &sql[open..open + sql[open..].find(')').expect(")")]
}

/// Every list of `chronicle_events`' columns in the code names the migrated table's
/// columns, in table order: a migration that adds, drops or renames a column fails here
/// until the writers, readers, input and adoption contract follow.
#[test]
fn the_code_lists_every_column_of_chronicle_events() {
    let db = TestDb::new();
    let table = table_columns(&db, "chronicle_events");
    let names: Vec<String> = table.iter().map(|c| c.0.clone()).collect();
    assert_eq!(list_names(chronicle::event::EVENT_COLUMNS), names, "event::EVENT_COLUMNS");
    assert_eq!(list_names(list_after(chronicle::writer::COPY_EVENTS, "COPY")), names, "writer::COPY_EVENTS");
    let contract: Vec<(String, String, bool)> = chronicle::db::migrate::EVENTS_CONTRACT
        .iter()
        .map(|c| (c.name.to_string(), c.udt.to_string(), c.not_null))
        .collect();
    assert_eq!(contract, table, "db::migrate::EVENTS_CONTRACT");

    // What `append` reads and `inject` writes: a key per column.
    let first = chronicle::synthetic::Generator::new(1, 1, 1).next().expect("an event");
    let some = serde_json::json!({"k": 1});
    let e = chronicle::input::NewEvent {
        id: Some(uuid::Uuid::nil()),
        actor_user_id: Some(uuid::Uuid::nil()),
        before: Some(some.clone()),
        after: Some(some.clone()),
        diff: Some(some),
        created_at: Some(first.occurred_at),
        request_id: Some("r".into()),
        client: Some("c".into()),
        reason: Some("why".into()),
        ip: Some(std::net::IpAddr::from([192, 0, 2, 1])),
        ..first
    };
    let json = chronicle::input::event_to_json(None, &e);
    let mut keys: Vec<String> = json.as_object().expect("an object").keys().cloned().collect();
    let mut sorted = names.clone();
    keys.sort();
    sorted.sort();
    assert_eq!(keys, sorted, "input::NewEvent (event_to_json)");
}

/// The same for `chronicle_entries`: what the projector writes (and what the worker
/// compares the table with before it writes), and every column but the search vector in
/// what readers get (`timeline::EntryRow`, the rows of `entries --json`).
/// `timeline::SELECT_PAGE` is compared with `ENTRY_COLUMNS` by a unit test.
#[test]
fn the_code_lists_every_column_of_chronicle_entries() {
    let db = TestDb::new();
    let table = table_columns(&db, "chronicle_entries");
    let contract: Vec<(String, String, bool)> = chronicle::worker::read_model::ENTRIES_CONTRACT
        .iter()
        .map(|c| (c.name.to_string(), c.udt.to_string(), c.not_null))
        .collect();
    assert_eq!(contract, table, "worker::read_model::ENTRIES_CONTRACT (what the worker checks before it writes)");
    let mut c = db.client();
    assert_eq!(chronicle::worker::read_model::differences(&mut c).unwrap(), Vec::<String>::new());
    let names: Vec<String> = table.into_iter().map(|c| c.0).collect();
    assert_eq!(list_names(chronicle::entries::ENTRY_COLUMNS), names, "entries::ENTRY_COLUMNS");
    assert_eq!(
        list_names(list_after(chronicle::entries::UPSERT_ENTRIES, "INSERT INTO")),
        names,
        "entries::UPSERT_ENTRIES"
    );

    let now = chrono::Utc::now();
    let row = chronicle::timeline::EntryRow {
        id: uuid::Uuid::nil(),
        library_id: uuid::Uuid::nil(),
        actor_user_id: None,
        entity_type: "tag".into(),
        entity_id: uuid::Uuid::nil(),
        event_type: "TagCreated".into(),
        occurred_at: now,
        created_at: now,
        request_id: None,
        client: None,
        ip: None,
        reason: None,
        summary: String::new(),
        changed_fields: vec![],
        details: serde_json::json!({}),
        projection_version: 1,
        projected_at: now,
    };
    let json = serde_json::to_value(&row).unwrap();
    let mut keys: Vec<String> = json.as_object().expect("an object").keys().cloned().collect();
    let mut readable: Vec<String> = names.into_iter().filter(|c| c != "search").collect();
    keys.sort();
    readable.sort();
    assert_eq!(keys, readable, "timeline::EntryRow");
}

#[test]
fn migrate_refuses_a_database_that_is_not_utf8_naming_its_encoding() {
    let db = TestDb::sql_ascii();
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("has encoding SQL_ASCII; chronicle needs UTF8"), "{r}");
    assert!(r.stderr.contains("CREATE DATABASE <name> ENCODING 'UTF8' TEMPLATE template0"), "{r}");
    let mut c = db.client();
    assert_eq!(count(&mut c, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'chronicle%'"), 0, "nothing created");
}

/// A function that trusts the caller's search_path runs whatever the caller put first
/// on it (its own `pg_has_role`, its own table): every function the migrations create
/// pins it.
#[test]
fn every_function_of_the_migrations_pins_its_search_path() {
    let db = TestDb::new();
    let rows = db
        .client()
        .query(
            "SELECT p.proname::text, coalesce(array_to_string(p.proconfig, ' '), '')
             FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                                                           AND d.objid = p.oid AND d.deptype = 'e')
             ORDER BY 1",
            &[],
        )
        .unwrap();
    let functions: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let names: Vec<&str> = functions.iter().map(|f| f.0.as_str()).collect();
    for expected in ["chronicle_events_enqueue", "chronicle_events_record_erasure", "chronicle_events_refuse_change"] {
        assert!(names.contains(&expected), "{expected} not found in {names:?}");
    }
    for (name, config) in &functions {
        assert!(config.contains("search_path="), "{name} does not pin its search_path ({config:?})");
    }
}

/// `chronicle_erasures` is a contract (docs/DESIGN.md §2.5, docs/operations.md): each of
/// its columns is named there.
#[test]
fn the_docs_name_every_column_of_chronicle_erasures() {
    let db = TestDb::new();
    let design = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/DESIGN.md")).unwrap();
    let section = &design[design.find("### 2.5").expect("§2.5")..design.find("## 3.").expect("§3")];
    let operations = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    for (column, _, _) in table_columns(&db, "chronicle_erasures").iter().filter(|c| c.0 != "id") {
        assert!(section.contains(&format!("`{column}`")), "docs/DESIGN.md §2.5 does not name {column}");
        assert!(operations.contains(&format!("`{column}`")), "docs/operations.md does not name {column}");
    }
}
