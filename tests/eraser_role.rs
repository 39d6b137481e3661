//! Erasure needs a role: with `chronicle.allow_erase` on, a role granted DELETE still
//! cannot delete an event; a member of `chronicle_eraser` can, and the database writes
//! the audit row (and removes the event's deliveries and entries) in the same
//! transaction, however the DELETE was issued. TRUNCATE, which no row trigger sees, is
//! refused to everyone.

use uuid::Uuid;

use crate::util::{count, insert_events, run, sql_state, worker_cmd, LoginRole, TestDb};

fn one_event_id(c: &mut postgres::Client) -> Uuid {
    c.query_one("SELECT id FROM chronicle_events ORDER BY id LIMIT 1", &[]).unwrap().get(0)
}

#[test]
fn a_role_granted_delete_cannot_erase_even_with_the_setting_on() {
    let db = TestDb::new();
    let mut c = db.client();
    let library = insert_events(&mut c, 3);
    let app = LoginRole::create(&db, "deleter", "GRANT SELECT, DELETE ON chronicle_events TO {role}");
    let mut a = app.client();
    let mut tx = a.transaction().unwrap();
    tx.batch_execute(&format!("SET LOCAL chronicle.library_id = '{library}'; SET LOCAL chronicle.allow_erase = 'on'"))
        .unwrap();
    let err = tx.batch_execute("DELETE FROM chronicle_events").expect_err("the delete must be refused");
    assert_eq!(sql_state(&err), "42501", "{err:?}");
    assert!(err.as_db_error().unwrap().message().contains("chronicle_eraser"), "{err:?}");
    drop(tx);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_events"), 3);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_erasures"), 0);

    // Not even the owner may TRUNCATE: no trigger could audit it.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SET LOCAL chronicle.allow_erase = 'on'").unwrap();
    let err = tx.batch_execute("TRUNCATE chronicle_events").expect_err("TRUNCATE must be refused");
    assert_eq!(sql_state(&err), "42501", "{err:?}");
}

#[test]
fn a_member_of_chronicle_eraser_can_erase_and_the_database_writes_the_audit_row() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 4);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let dpo = LoginRole::create(&db, "dpo", "GRANT chronicle_eraser TO {role}");

    // A plain DELETE, no library named: the eraser sees every library; the database
    // records the erasure and removes the delivery and the entry.
    let victim = one_event_id(&mut c);
    let mut d = dpo.client();
    let mut tx = d.transaction().unwrap();
    tx.batch_execute("SET LOCAL chronicle.allow_erase = 'on'").unwrap();
    let n = tx.execute("DELETE FROM chronicle_events WHERE id = $1", &[&victim]).unwrap();
    tx.commit().unwrap();
    assert_eq!(n, 1);
    let row = c
        .query_one(
            "SELECT event_ids, erased_by, reason, events_erased, deliveries_erased, entries_erased FROM chronicle_erasures",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Vec<Uuid>>(0), vec![victim]);
    assert_eq!(row.get::<_, String>(1), dpo.name);
    assert!(row.get::<_, String>(2).contains("outside chronicle erase"), "{:?}", row.get::<_, String>(2));
    assert_eq!((row.get::<_, i32>(3), row.get::<_, i32>(4), row.get::<_, i32>(5)), (1, 1, 1));
    for sql in [
        format!("SELECT count(*) FROM chronicle_outbox_events WHERE event_id = '{victim}'"),
        format!("SELECT count(*) FROM chronicle_entries WHERE id = '{victim}'"),
    ] {
        assert_eq!(count(&mut c, &sql), 0, "{sql}");
    }

    // `chronicle erase` as the eraser: one audit row with who and why, also for an id
    // that only had an entry left.
    let next = one_event_id(&mut c);
    let orphan = Uuid::now_v7();
    c.execute(
        "INSERT INTO chronicle_entries (id, library_id, entity_type, entity_id, event_type, occurred_at, created_at,
                                        summary, search, projection_version)
         VALUES ($1, gen_random_uuid(), 'tag', gen_random_uuid(), 'TagCreated', now(), now(), 'left over', '', 1)",
        &[&orphan],
    )
    .unwrap();
    let r = run(db
        .chronicle(&[
            "erase",
            "--event-id",
            &next.to_string(),
            "--event-id",
            &orphan.to_string(),
            "--by",
            "dpo@example.com",
            "--reason",
            "request 7",
            "--json",
        ])
        .env("DATABASE_URL", dpo.url()));
    assert_eq!(r.code, Some(0), "{r}");
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(
        (v["events_erased"].as_i64(), v["deliveries_erased"].as_i64(), v["entries_erased"].as_i64()),
        (Some(1), Some(1), Some(2)),
        "{v}"
    );
    let row = c
        .query_one(
            "SELECT event_ids, erased_by, reason FROM chronicle_erasures WHERE id = $1",
            &[&v["erasure_id"].as_i64().unwrap()],
        )
        .unwrap();
    let mut ids = row.get::<_, Vec<Uuid>>(0);
    ids.sort();
    let mut want = vec![next, orphan];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!((row.get::<_, String>(1), row.get::<_, String>(2)), ("dpo@example.com".into(), "request 7".into()));
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_erasures"), 2, "one audit row per erasure");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_events"), 2);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 2);

    // The eraser cannot touch the audit trail.
    let err = d.batch_execute("DELETE FROM chronicle_erasures").expect_err("the audit trail is not the eraser's");
    assert_eq!(sql_state(&err), "42501", "{err:?}");
}

#[test]
fn a_role_that_shadows_pg_has_role_on_its_search_path_cannot_erase() {
    let db = TestDb::new();
    let mut c = db.client();
    let library = insert_events(&mut c, 3);
    let app = LoginRole::create(
        &db,
        "shadow",
        &format!(
            "GRANT SELECT, DELETE ON chronicle_events TO {{role}}; GRANT CREATE ON DATABASE {} TO {{role}}",
            db.name
        ),
    );
    let mut a = app.client();
    a.batch_execute(
        "CREATE SCHEMA shadow;
         CREATE FUNCTION shadow.pg_has_role(name, text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
         CREATE FUNCTION shadow.pg_has_role(name, oid, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';",
    )
    .unwrap();
    let mut tx = a.transaction().unwrap();
    tx.batch_execute(&format!(
        "SET LOCAL search_path = shadow, pg_catalog, public; SET LOCAL chronicle.library_id = '{library}';
         SET LOCAL chronicle.allow_erase = 'on'"
    ))
    .unwrap();
    // The shadow answers for the role's own calls: the bypass is armed.
    assert!(tx
        .query_one("SELECT pg_has_role(current_user, 'chronicle_eraser', 'MEMBER')", &[])
        .unwrap()
        .get::<_, bool>(0));
    let err = tx.batch_execute("DELETE FROM chronicle_events").expect_err("the delete must be refused");
    assert_eq!(sql_state(&err), "42501", "{err:?}");
    drop(tx);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_events"), 3);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_erasures"), 0);
}

#[test]
fn the_audit_row_records_who_the_database_saw_and_the_counts_it_deleted() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 3);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let dpo = LoginRole::create(&db, "dpo", "GRANT chronicle_eraser TO {role}");
    let victim = one_event_id(&mut c);
    let orphan = Uuid::now_v7(); // nothing anywhere: listed nowhere
    let mut d = dpo.client();
    let mut tx = d.transaction().unwrap();
    // Everything the session can set, set to lie: who, counts, and the role noted for the
    // audit, again from the statement's own RETURNING.
    tx.batch_execute(&format!(
        "SET LOCAL chronicle.allow_erase = 'on'; SET LOCAL chronicle.erased_by = 'alice';
         SET LOCAL chronicle.erase_reason = 'routine'; SET LOCAL chronicle.erasing_role = 'alice';
         SET LOCAL chronicle.erase_extra_ids = '{orphan}';
         SET LOCAL chronicle.erase_extra_deliveries = '1000000'; SET LOCAL chronicle.erase_extra_entries = '1000000'"
    ))
    .unwrap();
    let started: chrono::DateTime<chrono::Utc> = tx.query_one("SELECT now()", &[]).unwrap().get(0);
    tx.query(
        "DELETE FROM chronicle_events WHERE id = $1 RETURNING set_config('chronicle.erasing_role', 'alice', true)",
        &[&victim],
    )
    .unwrap();
    // Nor may the eraser write an audit row of its own.
    let mut sp = tx.transaction().unwrap();
    let err = sp
        .execute(
            "INSERT INTO chronicle_erasures (event_ids, erased_by, reason, events_erased, deliveries_erased, entries_erased)
             VALUES ('{}', 'alice', 'forged', 0, 0, 1000000)",
            &[],
        )
        .expect_err("an audit row is the database's to write");
    assert_eq!(sql_state(&err), "42501", "{err:?}");
    drop(sp);
    tx.commit().unwrap();

    let row = c
        .query_one(
            "SELECT event_ids, erased_by, reason, erased_at, events_erased, deliveries_erased, entries_erased,
                    db_session_user, db_current_user
             FROM chronicle_erasures",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Vec<Uuid>>(0), vec![victim]);
    assert_eq!((row.get::<_, String>(1), row.get::<_, String>(2)), ("alice".into(), "routine".into()), "as claimed");
    assert_eq!(row.get::<_, chrono::DateTime<chrono::Utc>>(3), started, "the transaction's time");
    assert_eq!((row.get::<_, i32>(4), row.get::<_, i32>(5), row.get::<_, i32>(6)), (1, 1, 1), "what was deleted");
    assert_eq!(
        (row.get::<_, Option<String>>(7), row.get::<_, Option<String>>(8)),
        (Some(dpo.name.clone()), Some(dpo.name.clone())),
        "who the database saw"
    );
}

#[test]
fn only_an_eraser_may_clean_up_what_is_left_of_an_event() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 1);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let id = one_event_id(&mut c);
    // An event erased while its entry was restored by hand: the entry is left.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(
        "SET LOCAL chronicle.allow_erase = 'on'; CREATE TEMP TABLE keep AS SELECT * FROM chronicle_entries",
    )
    .unwrap();
    tx.execute("DELETE FROM chronicle_events WHERE id = $1", &[&id]).unwrap();
    tx.batch_execute("INSERT INTO chronicle_entries SELECT * FROM keep").unwrap();
    tx.commit().unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 1);

    // A role granted DELETE, naming it with a DELETE of no event: refused.
    let app = LoginRole::create(&db, "deleter", "GRANT SELECT, DELETE ON chronicle_events TO {role}");
    let mut a = app.client();
    let mut tx = a.transaction().unwrap();
    tx.batch_execute(&format!("SET LOCAL chronicle.allow_erase = 'on'; SET LOCAL chronicle.erase_extra_ids = '{id}'"))
        .unwrap();
    let err = tx.batch_execute("DELETE FROM chronicle_events WHERE false").expect_err("not an eraser");
    assert_eq!(sql_state(&err), "42501", "{err:?}");
    drop(tx);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 1);

    // `chronicle erase` as an eraser: the entry goes, counted by the database.
    let dpo = LoginRole::create(&db, "dpo", "GRANT chronicle_eraser TO {role}");
    let r = run(db
        .chronicle(&["erase", "--event-id", &id.to_string(), "--by", "dpo", "--reason", "left over", "--json"])
        .env("DATABASE_URL", dpo.url()));
    assert_eq!(r.code, Some(0), "{r}");
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!((v["events_erased"].as_i64(), v["entries_erased"].as_i64()), (Some(0), Some(1)), "{v}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_erasures WHERE db_current_user IS NOT NULL"), 2);
}
