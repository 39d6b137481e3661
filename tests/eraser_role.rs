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
