//! `chronicle rebuild` in each mode, through the binary, against a real server.

#![cfg_attr(not(unix), allow(unused_imports, dead_code))] // Unix-only tests are marked #[cfg(unix)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use postgres::Client;
use serde_json::Value;

use crate::util::{assert_fully_projected, count, outbox_by_status, run, worker_cmd, TestDb};

/// Every entry as JSON, `projected_at` aside, ordered by id.
fn entries_snapshot(c: &mut Client, filter: &str) -> Vec<Value> {
    c.query(&format!("SELECT to_jsonb(e) - 'projected_at' FROM chronicle_entries e {filter} ORDER BY id"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn injected_and_drained(count: &str) -> TestDb {
    let db = TestDb::new();
    let r = run(&mut db.chronicle(&["inject", "--count", count, "--libraries", "3", "--seed", "11"]));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "500"]));
    assert_eq!(r.code, Some(0), "{r}");
    db
}

#[test]
fn rebuild_truncate_gives_the_entries_the_worker_produced() {
    let db = injected_and_drained("3000");
    let mut c = db.client();
    let by_worker = entries_snapshot(&mut c, "");
    assert_eq!(by_worker.len(), 3000);
    let r = run(&mut db.chronicle(&["rebuild", "--truncate", "--batch-size", "700", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (report["events_total"].as_i64(), report["rows_written"].as_i64()),
        (Some(3000), Some(3000)),
        "{report}"
    );
    assert_eq!(report["mode"], "truncate");
    assert!(r.stderr.contains("3000/3000 events"), "progress on stderr: {r}");
    assert_eq!(entries_snapshot(&mut c, ""), by_worker);
    // Without --truncate: re-projected over the existing rows, same result.
    let r = run(&mut db.chronicle(&["rebuild"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(entries_snapshot(&mut c, ""), by_worker);
    let runs: Vec<(String, bool, i64)> = c
        .query("SELECT mode, success, rows_written FROM chronicle_rebuild_runs ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(runs, vec![("truncate".into(), true, 3000), ("direct".into(), true, 3000)]);
}

#[test]
fn truncate_emit_outbox_then_a_drain_gives_the_same_entries() {
    let db = injected_and_drained("2000");
    let mut c = db.client();
    let by_worker = entries_snapshot(&mut c, "");
    let r = run(&mut db.chronicle(&["rebuild", "--truncate", "--emit-outbox"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'"), 2000);
    // Emitting again enqueues nothing twice: every event already has a live delivery,
    // which the new run counts as its own.
    let r = run(&mut db.chronicle(&["rebuild", "--emit-outbox", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let report: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(report["deliveries"], serde_json::json!({"new": 0, "replayed": 0, "adopted": 2000}), "{report}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'"), 2000);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE rebuild_run_id = 2"), 2000);
    let (first, _) = last_rebuild_run(&mut c, 1);
    assert!(first.contains("superseded by rebuild run #2"), "the first run is told: {first}");
    let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "500"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(entries_snapshot(&mut c, ""), by_worker);
}

#[test]
fn rebuild_library_id_touches_no_other_library() {
    let db = injected_and_drained("3000");
    let mut c = db.client();
    let lib: uuid::Uuid = c
        .query_one("SELECT library_id FROM chronicle_events GROUP BY 1 ORDER BY count(*) DESC LIMIT 1", &[])
        .unwrap()
        .get(0);
    let others = |c: &mut Client| -> Vec<Value> {
        c.query("SELECT to_jsonb(e) FROM chronicle_entries e WHERE library_id <> $1 ORDER BY id", &[&lib])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let before_others = others(&mut c); // projected_at included: not even rewritten
    let before_lib = entries_snapshot(&mut c, &format!("WHERE library_id = '{lib}'"));
    c.execute("DELETE FROM chronicle_entries WHERE library_id = $1", &[&lib]).unwrap();
    let r = run(&mut db.chronicle(&["rebuild", "--truncate", "--library-id", &lib.to_string()]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(others(&mut c), before_others);
    assert_eq!(entries_snapshot(&mut c, &format!("WHERE library_id = '{lib}'")), before_lib);
    let r = run(&mut db.chronicle(&["rebuild", "--swap", "--library-id", &lib.to_string()]));
    assert_eq!(r.code, Some(2), "{r}");
}

#[test]
fn events_that_cannot_be_projected_are_failed_deliveries_and_the_rebuild_goes_on() {
    let db = injected_and_drained("500");
    let mut c = db.client();
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at) VALUES
         (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookTeleported', '{}', now()),
         (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookCreated', '{\"title\": 1}', now())",
    )
    .unwrap();
    for args in [&["rebuild", "--truncate", "--json"][..], &["rebuild", "--swap", "--json"]] {
        let r = run(&mut db.chronicle(args));
        assert_eq!(r.code, Some(1), "{args:?}: {r}");
        let report: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(report["failures"], 2, "{report}");
        assert_eq!(report["failures_by_reason"]["unknown_event_type"], 1, "{report}");
        assert_eq!(report["failures_by_reason"]["invalid_payload"], 1, "{report}");
        assert_eq!(report["rows_written"], 500, "{report}");
        assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 500);
    }
    // Their one open delivery is still the one the trigger queued: no failed one beside it.
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'"), 2);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    // Recorded once each as failed deliveries, whatever the number of runs.
    for args in [&["rebuild", "--truncate", "--json"][..], &["rebuild", "--swap", "--json"]] {
        let r = run(&mut db.chronicle(args));
        assert_eq!(r.code, Some(1), "{args:?}: {r}");
        assert!(r.stdout.contains("\"failures\":2"), "{args:?}: {r}");
    }
    let by = outbox_by_status(&mut c);
    assert_eq!(by.get("failed/unknown_event_type"), Some(&1), "{by:?}");
    assert_eq!(by.get("failed/invalid_payload"), Some(&1), "{by:?}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'"), 2);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_rebuild_runs WHERE success = false AND failures = 2"), 4);
}

/// A rebuild run's error, and its mode.
fn last_rebuild_run(c: &mut Client, id: i64) -> (String, String) {
    let r = c.query_one("SELECT coalesce(error, ''), mode FROM chronicle_rebuild_runs WHERE id = $1", &[&id]).unwrap();
    (r.get(0), r.get(1))
}

/// The runs recorded so far: (mode, success, rows_written, failures).
fn runs(c: &mut Client) -> Vec<(String, Option<bool>, i64, i64)> {
    c.query("SELECT mode, success, rows_written, failures FROM chronicle_rebuild_runs ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[test]
fn several_writers_give_the_same_entries_as_the_worker_and_as_one_writer() {
    let db = injected_and_drained("3000");
    let mut c = db.client();
    let by_worker = entries_snapshot(&mut c, "");
    assert_eq!(by_worker.len(), 3000);
    // Batches of 97 with 3 writers: 31 batches, several in flight at once.
    for args in [
        &["rebuild", "--truncate", "--writers", "3", "--batch-size", "97", "--json"][..],
        &["rebuild", "--truncate", "--writers", "1", "--batch-size", "97", "--json"],
        &["rebuild", "--swap", "--writers", "3", "--batch-size", "97", "--json"],
        &["rebuild", "--swap", "--writers", "1", "--batch-size", "97", "--json"],
        &["rebuild", "--writers", "3", "--batch-size", "97", "--json"],
    ] {
        let r = run(&mut db.chronicle(args));
        assert_eq!(r.code, Some(0), "{args:?}: {r}");
        let report: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(
            (report["events_total"].as_i64(), report["rows_written"].as_i64()),
            (Some(3000), Some(3000)),
            "{args:?}: {report}"
        );
        assert_eq!(report["failures"], 0, "{args:?}: {report}");
        assert!(r.stderr.contains("3000/3000 events"), "{args:?}: progress on stderr: {r}");
        assert_eq!(entries_snapshot(&mut c, ""), by_worker, "{args:?}");
    }
    let modes: Vec<String> =
        runs(&mut c).into_iter().map(|(m, ok, rows, failed)| format!("{m} {ok:?} {rows} {failed}")).collect();
    assert_eq!(
        modes,
        ["truncate", "truncate", "swap", "swap", "direct"].map(|m| format!("{m} Some(true) 3000 0")).to_vec()
    );
    // The swapped-in table is whole: its indexes, and no shadow left behind.
    assert_eq!(count(&mut c, "SELECT count(*) FROM pg_indexes WHERE tablename = 'chronicle_entries'"), 6);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pg_class WHERE relname LIKE 'chronicle_entries_re%'"),
        0,
        "leftover tables"
    );
    // Every writer hung up: only this test's own connection is left on the database.
    crate::util::wait_until(Duration::from_secs(10), "the rebuild's connections to close", || {
        count(&mut c, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()") == 0
    });
}

#[test]
fn several_writers_record_the_same_failures_and_write_the_rest() {
    let db = injected_and_drained("1500");
    let mut c = db.client();
    // The read model refuses summaries with a marker: rejected_by_read_model. The shadow
    // table of --swap copies the constraint.
    c.batch_execute("ALTER TABLE chronicle_entries ADD CONSTRAINT no_poison CHECK (summary NOT LIKE '%POISON%')")
        .unwrap();
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at) VALUES
         (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookTeleported', '{}', now()),
         (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookCreated', '{\"title\": 1}', now());
         INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
         SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                '{\"title\": \"a\"}', jsonb_build_object('title', 'POISON ' || g), now()
         FROM generate_series(1, 5) g",
    )
    .unwrap();
    for args in [
        &["rebuild", "--truncate", "--writers", "3", "--batch-size", "97", "--json"][..],
        &["rebuild", "--swap", "--writers", "3", "--batch-size", "97", "--json"],
        &["rebuild", "--truncate", "--writers", "1", "--batch-size", "97", "--json"],
    ] {
        let r = run(&mut db.chronicle(args));
        assert_eq!(r.code, Some(1), "{args:?}: {r}");
        let report: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(report["failures"], 7, "{args:?}: {report}");
        assert_eq!(report["failures_by_reason"]["unknown_event_type"], 1, "{args:?}: {report}");
        assert_eq!(report["failures_by_reason"]["invalid_payload"], 1, "{args:?}: {report}");
        assert_eq!(report["failures_by_reason"]["rejected_by_read_model"], 5, "{args:?}: {report}");
        assert_eq!(
            (report["events_total"].as_i64(), report["rows_written"].as_i64()),
            (Some(1507), Some(1500)),
            "{args:?}: {report}"
        );
        assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 1500, "{args:?}");
        assert_eq!(
            count(&mut c, "SELECT count(*) FROM chronicle_events e WHERE NOT EXISTS (SELECT 1 FROM chronicle_entries n WHERE n.id = e.id)"),
            7,
            "{args:?}"
        );
    }
    // Their one open delivery each, failed once the workers have tried it.
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'"), 7);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(&mut db.chronicle(&["rebuild", "--truncate", "--writers", "3", "--batch-size", "97", "--json"]));
    assert_eq!(r.code, Some(1), "{r}");
    // Recorded once each as failed deliveries, whatever the number of runs and writers.
    let by = outbox_by_status(&mut c);
    assert_eq!(by.get("failed/unknown_event_type"), Some(&1), "{by:?}");
    assert_eq!(by.get("failed/invalid_payload"), Some(&1), "{by:?}");
    assert_eq!(by.get("failed/rejected_by_read_model"), Some(&5), "{by:?}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'"), 7);
    assert_eq!(runs(&mut c).iter().filter(|r| r.1 == Some(false) && r.2 == 1500 && r.3 == 7).count(), 4);
}

#[test]
fn a_writer_error_stops_the_rebuild_and_every_writer() {
    let db = injected_and_drained("3000");
    let mut c = db.client();
    // The first event in the scan's order makes the database fail its batch with an error
    // that is not the entry's fault (a serialization failure): the rebuild stops.
    c.batch_execute(
        "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.summary LIKE '%BOOM%' THEN
                 RAISE EXCEPTION 'boom on purpose' USING ERRCODE = 'serialization_failure';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER boom BEFORE INSERT OR UPDATE ON chronicle_entries FOR EACH ROW EXECUTE FUNCTION boom();
         INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
         VALUES ('00000000-0000-4000-8000-000000000001', gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                 '{\"title\": \"a\"}', '{\"title\": \"BOOM\"}', now());",
    )
    .unwrap();
    let r = run(&mut db.chronicle(&["rebuild", "--truncate", "--writers", "3", "--batch-size", "97", "--json"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("boom on purpose") && r.stderr.contains("while writing entries"), "{r}");
    assert!(r.stdout.is_empty(), "no report on failure: {r}");
    let (success, error, rows): (Option<bool>, Option<String>, i64) = {
        let row = c.query_one("SELECT success, error, rows_written FROM chronicle_rebuild_runs", &[]).unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(success, Some(false));
    assert!(error.as_deref().is_some_and(|e| e.contains("boom on purpose")), "{error:?}");
    // The reader and the other writers stopped early, with their batches in flight at most.
    assert!(rows < 3000, "{rows} rows written after the first batch failed");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), rows);
    crate::util::wait_until(Duration::from_secs(10), "the rebuild's connections to close", || {
        count(&mut c, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()") == 0
    });
    // The rebuild lock was released: the next run goes (and fails the same way).
    let r = run(&mut db.chronicle(&["rebuild", "--truncate", "--writers", "2"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("boom on purpose"), "{r}");
}

#[test]
fn a_transient_error_while_writing_a_batch_is_retried() {
    let db = injected_and_drained("2000");
    let mut c = db.client();
    // One event whose entry says FLAKY: the first two writes of its batch fail with a
    // serialization failure (as a deadlock with a worker would), the third goes through.
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
         VALUES (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                 '{\"title\": \"a\"}', '{\"title\": \"FLAKY\"}', now());
         CREATE SEQUENCE flaky_tries;
         CREATE FUNCTION flaky() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.summary LIKE '%FLAKY%' AND nextval('flaky_tries') <= 2 THEN
                 RAISE EXCEPTION 'flaky on purpose' USING ERRCODE = 'serialization_failure';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER flaky BEFORE INSERT OR UPDATE ON chronicle_entries FOR EACH ROW EXECUTE FUNCTION flaky();",
    )
    .unwrap();
    let r = run(&mut db.chronicle(&["rebuild", "--truncate", "--writers", "2", "--batch-size", "97", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(count(&mut c, "SELECT last_value FROM flaky_tries"), 3, "two failed writes, then one that went through");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_entries"),
        count(&mut c, "SELECT count(*) FROM chronicle_events")
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries WHERE summary LIKE '%FLAKY%'"), 1);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_rebuild_runs WHERE success"), 1);
}

#[test]
fn a_bad_writers_value_is_a_usage_error_naming_the_flag() {
    for bad in ["0", "x", "17", ""] {
        let r = run(crate::util::chronicle_cmd(&["rebuild", "--truncate", "--writers", bad])
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"));
        assert_eq!(r.code, Some(2), "--writers {bad:?}: {r}");
        assert!(r.stderr.contains("--writers"), "--writers {bad:?}: {r}");
    }
    let r = run(&mut crate::util::chronicle_cmd(&["rebuild", "--help"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.all().contains("--writers N"), "{r}");
}

/// A role for one test, dropped when the test ends.
struct TestRole {
    name: String,
    db: String,
    server: crate::util::Server,
}

impl TestRole {
    fn new(db: &TestDb) -> TestRole {
        let name = format!("chronicle_reader_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
        db.client().batch_execute(&format!("CREATE ROLE {name}")).unwrap();
        TestRole { name, db: db.name.clone(), server: db.server.clone() }
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let mut c = self.server.connect(&self.db);
        let _ = c.batch_execute(&format!("DROP OWNED BY {0}; DROP ROLE IF EXISTS {0}", self.name));
    }
}

#[cfg(unix)]
#[test]
fn swap_under_readers_writers_and_a_worker_keeps_the_timeline_whole() {
    let db = injected_and_drained("20000");
    let mut c = db.client();
    let role = TestRole::new(&db);
    c.batch_execute(&format!("GRANT SELECT ON chronicle_entries TO {}", role.name)).unwrap();
    let lib: uuid::Uuid = c.query_one("SELECT library_id FROM chronicle_events LIMIT 1", &[]).unwrap().get(0);
    let policies_before = count(&mut c, "SELECT count(*) FROM pg_policies WHERE tablename = 'chronicle_entries'");
    let index_names = |c: &mut postgres::Client| -> Vec<String> {
        c.query("SELECT indexname::text FROM pg_indexes WHERE tablename = 'chronicle_entries' ORDER BY 1", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let indexes_before = index_names(&mut c);

    let stop = Arc::new(AtomicBool::new(false));
    // A reader paging the library's timeline, newest first, as the UI does.
    let reader = {
        let (stop, mut rc) = (stop.clone(), db.client());
        std::thread::spawn(move || {
            let (mut pages, mut empty, mut slowest) = (0u64, 0u64, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let t = std::time::Instant::now();
                let rows = rc
                    .query(
                        "SELECT id FROM chronicle_entries WHERE library_id = $1 ORDER BY occurred_at DESC, id DESC LIMIT 50",
                        &[&lib],
                    )
                    .expect("a reader query failed during the swap");
                slowest = slowest.max(t.elapsed());
                pages += 1;
                if rows.is_empty() {
                    empty += 1;
                }
            }
            (pages, empty, slowest)
        })
    };
    // A writer inserting events, as the application does.
    let writer = {
        let (stop, mut wc) = (stop.clone(), db.client());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += crate::util::insert_events_into(&mut wc, lib, 20);
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    let mut worker = worker_cmd(&db, &[]).stderr(std::process::Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = run(&mut db.chronicle(&["rebuild", "--swap", "--json"]));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (pages, empty, slowest) = reader.join().unwrap();
    let written = writer.join().unwrap();
    assert_eq!(r.code, Some(0), "{r}");
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(report["swap_lock_held_ms"].as_f64().is_some(), "{report}");
    assert!(pages > 10 && written > 0, "the reader ({pages} pages) and writer ({written} events) did not run");
    assert_eq!(empty, 0, "the reader saw {empty} empty pages of {pages}");
    eprintln!("swap: {pages} reader pages, slowest {slowest:?}, {written} events written meanwhile, {report}");

    crate::util::wait_until(Duration::from_secs(60), "the worker to drain", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'") == 0
    });
    crate::util::signal(worker.id(), "TERM");
    assert!(worker.wait().unwrap().success());
    assert_fully_projected(&mut c);
    // The swapped-in table kept indexes, policies, row-level security and grants.
    assert_eq!(count(&mut c, "SELECT count(*) FROM pg_indexes WHERE tablename = 'chronicle_entries'"), 6);
    assert_eq!(index_names(&mut c), indexes_before, "the indexes kept their names");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'chronicle_replaced_%' OR relname LIKE 'chronicle_rb_%'"
        ),
        0,
        "leftover indexes of the old table or temporary names"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pg_policies WHERE tablename = 'chronicle_entries'"),
        policies_before
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pg_class WHERE relname = 'chronicle_entries' AND relrowsecurity"),
        if policies_before > 0 { 1 } else { 0 }
    );
    let granted: bool =
        c.query_one("SELECT has_table_privilege($1, 'chronicle_entries', 'SELECT')", &[&role.name]).unwrap().get(0);
    assert!(granted, "the grant was lost in the swap");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pg_class WHERE relname LIKE 'chronicle_entries_re%'"),
        0,
        "leftover tables"
    );
}

/// A rebuild through the outbox is queued, not finished, until the workers have delivered
/// it: then it is finished, successful only if none of its deliveries failed, with their
/// counts, and `status` shows its progress meanwhile.
#[test]
fn an_emit_outbox_rebuild_finishes_when_its_deliveries_do() {
    let db = injected_and_drained("300");
    let mut c = db.client();
    // One event the projector does not know: its delivery will fail.
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         VALUES (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookVanished', '{}', now())",
    )
    .unwrap();
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(&mut db.chronicle(&["rebuild", "--truncate", "--emit-outbox"]));
    assert_eq!(r.code, Some(0), "{r}");
    let last = || -> Value {
        let r = run(&mut db.chronicle(&["status", "--json"]));
        assert_eq!(r.code, Some(0), "{r}");
        let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
        v["last_rebuild"].clone()
    };
    let queued = last();
    assert!(queued["finished_at"].is_null() && queued["success"].is_null(), "queued, not finished: {queued}");
    assert_eq!(queued["deliveries"]["queued"], 301, "{queued}");
    assert_eq!(queued["deliveries"]["waiting"], 301, "{queued}");
    let text = run(&mut db.chronicle(&["status"]));
    assert!(text.stdout.contains("301 waiting"), "{text}");

    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    // The worker closes the run as it samples its gauges: run one that lives a little.
    let r = run(worker_cmd(&db, &[]).env("OUTBOX_RUN_SECONDS", "2"));
    assert_eq!(r.code, Some(0), "{r}");
    let done = last();
    assert!(done["finished_at"].is_string(), "{done}");
    assert_eq!(done["success"], false, "one delivery failed: {done}");
    assert_eq!((done["rows_written"].as_i64(), done["failures"].as_i64()), (Some(300), Some(1)), "{done}");
    assert_eq!(done["failures_by_reason"]["unknown_event_type"], 1, "{done}");
    assert_eq!(done["deliveries"]["waiting"], 0, "{done}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 300);
}

/// What an operator sees of the failures: `status --json` (`outbox.failed`, the sum of
/// `failed_by_reason`), the text status, and the failed rows themselves.
fn failing_seen(db: &TestDb, c: &mut Client) -> (i64, i64, i64, String) {
    let r = run(&mut db.chronicle(&["status", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let by_reason: i64 = v["failed_by_reason"].as_array().unwrap().iter().map(|f| f["count"].as_i64().unwrap()).sum();
    let text = run(&mut db.chronicle(&["status"]));
    assert_eq!(text.code, Some(0), "{text}");
    let line = text.stdout.lines().find(|l| l.trim_start().starts_with("failed ")).unwrap_or_default().to_string();
    let rows = count(c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed'");
    (v["outbox"]["failed"].as_i64().unwrap(), by_reason, rows, line)
}

fn assert_failing(db: &TestDb, c: &mut Client, n: i64, when: &str) {
    let (failed, by_reason, rows, line) = failing_seen(db, c);
    assert_eq!((failed, by_reason, rows), (n, n, n), "{when}: outbox {:?}", outbox_by_status(c));
    let figures: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(figures.get(1), Some(&n.to_string().as_str()), "{when}: text status line {line:?}");
}

/// The latest rebuild run as `status --json` shows it, and the text status.
fn last_rebuild(db: &TestDb) -> (Value, String) {
    let r = run(&mut db.chronicle(&["status", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let text = run(&mut db.chronicle(&["status"]));
    (v["last_rebuild"].clone(), text.stdout)
}

/// A worker with its metrics endpoint on, until `cond` holds of its metrics (then it is
/// stopped): closes the `--emit-outbox` runs and samples the gauges. Returns the metrics.
fn worker_until(db: &TestDb, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let port = crate::util::free_port();
    let mut child = worker_cmd(db, &[])
        .env("OUTBOX_METRICS_PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting chronicle worker");
    let mut seen = String::new();
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::util::wait_until(Duration::from_secs(60), what, || {
            seen = crate::util::http_get(port, "/metrics").unwrap_or_default();
            cond(&seen)
        })
    }));
    let _ = child.kill();
    let _ = child.wait();
    if ok.is_err() {
        panic!("timed out waiting for {what}; last metrics:\n{seen}");
    }
    seen
}

/// Three events that cannot be projected are three failing events whatever the operator
/// does: replays, rebuilds writing the entries, rebuilds through the outbox, twice each.
/// No run adds a failed delivery beside one an event already has, and each run's verdict
/// says what failed, why, and that those events have no entry.
#[test]
fn failing_events_are_counted_once_through_replays_and_rebuilds() {
    let db = injected_and_drained("200");
    let mut c = db.client();
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookTeleported', '{}', now()
         FROM generate_series(1, 3)",
    )
    .unwrap();
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_failing(&db, &mut c, 3, "after the first drain");
    let drain = |db: &TestDb| {
        let r = run(&mut worker_cmd(db, &["--until-empty"]));
        assert_eq!(r.code, Some(0), "{r}");
    };

    for round in 1..=2 {
        // A replay: the failed rows themselves go back to pending, and fail again.
        let r = run(&mut db.chronicle(&["replay-failed", "--by", "ops", "--reason", "try again"]));
        assert_eq!(r.code, Some(0), "{r}");
        assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'"), 3);
        drain(&db);
        assert_failing(&db, &mut c, 3, &format!("round {round}: after a replay"));

        // A rebuild writing the entries: the same failed rows, refreshed, none added.
        let r = run(&mut db.chronicle(&["rebuild", "--truncate"]));
        assert_eq!(r.code, Some(1), "{r}");
        assert!(r.stderr.contains("3 of 203 event(s) could not be projected (unknown_event_type 3)"), "{r}");
        assert_failing(&db, &mut c, 3, &format!("round {round}: after rebuild --truncate"));
        let (run_row, text) = last_rebuild(&db);
        assert_eq!(run_row["success"], false, "{run_row}");
        let error = run_row["error"].as_str().unwrap_or_default();
        assert!(error.contains("3 of 203 event(s) could not be projected (unknown_event_type 3)"), "{run_row}");
        assert!(text.contains("FAILED: 3 of 203 event(s)") && !text.contains("(no message)"), "{text}");

        // A rebuild through the outbox: each failing event's one delivery, sent again.
        let r = run(&mut db.chronicle(&["rebuild", "--emit-outbox", "--json"]));
        assert_eq!(r.code, Some(0), "{r}");
        let report: Value = serde_json::from_str(r.stdout.trim()).unwrap();
        assert_eq!(report["deliveries"]["replayed"], 3, "{report}");
        assert_eq!(report["deliveries"]["new"], 200, "{report}");
        assert_eq!(report["rows_written"], 203, "{report}");
        assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed'"), 0);
        drain(&db);
        assert_failing(&db, &mut c, 3, &format!("round {round}: after rebuild --emit-outbox"));
        // A worker closes the run; its gauge counts the failing events too.
        let metrics = worker_until(&db, "the failed gauge and the rebuild run's end", |m| {
            m.contains("chronicle_rebuild_last_finished_timestamp_seconds{")
                && crate::util::metric_sum(m, "chronicle_outbox_failed_events") == 3.0
                && count(&mut db.client(), "SELECT count(*) FROM chronicle_rebuild_runs WHERE finished_at IS NULL") == 0
        });
        // No run succeeded: the metrics say the last rebuild failed (ChronicleRebuildFailed).
        assert!(!metrics.contains("chronicle_rebuild_last_success_timestamp_seconds{"), "{metrics}");
        let (run_row, text) = last_rebuild(&db);
        assert_eq!(run_row["mode"], "emit-outbox", "{run_row}");
        assert_eq!(run_row["success"], false, "three events have no entry: {run_row}");
        assert_eq!((run_row["rows_written"].as_i64(), run_row["failures"].as_i64()), (Some(200), Some(3)));
        let error = run_row["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(
                "3 of its 203 deliveries failed (unknown_event_type 3), so 3 of the events it delivered have no entry"
            ),
            "{run_row}"
        );
        assert!(text.contains("FAILED: 3 of its 203 deliveries failed"), "{text}");
    }

    // A rebuild while replayed deliveries wait: they stay the events' one open delivery.
    let r = run(&mut db.chronicle(&["replay-failed", "--by", "ops", "--reason", "once more"]));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(&mut db.chronicle(&["rebuild", "--truncate"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert_failing(&db, &mut c, 0, "replayed, not delivered yet");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'"), 3);
    drain(&db);
    assert_failing(&db, &mut c, 3, "after the replayed deliveries failed");
    // The audit trail of each failing event's one delivery: three replays, two rebuilds.
    let audits: Vec<i32> = c
        .query("SELECT replay_count FROM chronicle_outbox_events WHERE status = 'failed' ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(audits, vec![5, 5, 5]);
}

/// Once the cause is fixed, a rebuild that writes an event's entry closes its failed
/// delivery (`done`, naming the run and keeping the failure it had; its replay audit is
/// left to replays): the event is no longer failing.
#[test]
fn a_rebuild_that_projects_a_failed_event_closes_its_failed_delivery() {
    let db = injected_and_drained("50");
    let mut c = db.client();
    let good: uuid::Uuid = c.query_one("SELECT id FROM chronicle_events ORDER BY id LIMIT 1", &[]).unwrap().get(0);
    // The event failed once (say, before a fix was deployed).
    c.execute(
        "INSERT INTO chronicle_outbox_events (event_id, status, error_reason, error)
         VALUES ($1, 'failed', 'invalid_payload', 'before the fix')",
        &[&good],
    )
    .unwrap();
    assert_failing(&db, &mut c, 1, "before the rebuild");
    let r = run(&mut db.chronicle(&["rebuild", "--truncate", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let report: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(report["failures_resolved"], 1, "{report}");
    assert_failing(&db, &mut c, 0, "after the rebuild");
    let row = c
        .query_one(
            "SELECT status, replay_count, last_replayed_by, rebuild_run_id, error, error_reason
             FROM chronicle_outbox_events WHERE event_id = $1 ORDER BY id DESC LIMIT 1",
            &[&good],
        )
        .unwrap();
    let (run_row, _) = last_rebuild(&db);
    assert_eq!(row.get::<_, String>(0), "done");
    assert_eq!((row.get::<_, i32>(1), row.get::<_, Option<String>>(2)), (0, None), "not a replay");
    assert_eq!(row.get::<_, Option<i64>>(3), run_row["id"].as_i64());
    let error: String = row.get(4);
    assert!(error.starts_with(&format!("closed by rebuild run #{} (truncate)", run_row["id"])), "{error}");
    assert!(error.ends_with("(it had failed: invalid_payload: before the fix)"), "{error}");
    assert_eq!(row.get::<_, Option<String>>(5), None);
    assert_eq!((run_row["success"].as_bool(), run_row["error"].as_str()), (Some(true), None), "{run_row}");
}

// ---------------------------------------------------------------------------------
// Interrupted runs: marked died, their leftovers cleaned up, the read model exact again.

/// One way to interrupt a run: the rebuild's flags and the fail point that stops it.
struct Interruption {
    flags: &'static [&'static str],
    failpoint: &'static str,
    /// Whether the read model has drifted once it is interrupted (what running again mends).
    drifts: bool,
    /// The table the interrupted `--swap` leaves behind, if any.
    leaves: Option<&'static str>,
}

const INTERRUPTIONS: &[Interruption] = &[
    Interruption { flags: &["--truncate"], failpoint: "rebuild-after-truncate", drifts: true, leaves: None },
    Interruption { flags: &["--truncate"], failpoint: "rebuild-batch", drifts: true, leaves: None },
    Interruption { flags: &[], failpoint: "rebuild-batch", drifts: false, leaves: None },
    Interruption {
        flags: &["--truncate", "--emit-outbox"],
        failpoint: "rebuild-enqueued",
        drifts: false,
        leaves: None,
    },
    Interruption { flags: &["--emit-outbox"], failpoint: "rebuild-enqueued", drifts: false, leaves: None },
    Interruption {
        flags: &["--swap"],
        failpoint: "rebuild-batch",
        drifts: false,
        leaves: Some("chronicle_entries_rebuild"),
    },
    Interruption {
        flags: &["--swap"],
        failpoint: "swap-before-swap",
        drifts: false,
        leaves: Some("chronicle_entries_rebuild"),
    },
    Interruption {
        flags: &["--swap"],
        failpoint: "swap-after-swap",
        drifts: false,
        leaves: Some("chronicle_entries_replaced"),
    },
];

/// `chronicle rebuild` with `flags`, in small batches on one writer (so a batch fail
/// point has batches to stop between).
fn rebuild_cmd(db: &TestDb, flags: &[&str]) -> std::process::Command {
    let mut args = vec!["rebuild", "--batch-size", "300", "--writers", "1"];
    args.extend_from_slice(flags);
    db.chronicle(&args)
}

fn table_exists(c: &mut Client, table: &str) -> bool {
    c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).unwrap().get(0)
}

fn unfinished_runs(c: &mut Client) -> i64 {
    count(c, "SELECT count(*) FROM chronicle_rebuild_runs WHERE finished_at IS NULL AND queued_at IS NULL")
}

/// `chronicle verify`'s verdict: exit 0 when the read model is exact.
fn verify_is_clean(db: &TestDb) -> bool {
    let r = run(&mut db.chronicle(&["verify"]));
    assert!(matches!(r.code, Some(0 | 1)), "verify: {r}");
    r.code == Some(0)
}

/// After an interruption: the run is shown died (with the command that does its work
/// again), running that command says what it cleaned up, and ends with an exact read model.
fn rerun_after_died(db: &TestDb, c: &mut Client, died_run: i64, flags: &[&str], leaves: Option<&str>, case: &str) {
    let (row, text) = last_rebuild(db);
    assert_eq!((row["id"].as_i64(), row["state"].as_str()), (Some(died_run), Some("died")), "{case}: {row}");
    let rerun = ["chronicle rebuild"].into_iter().chain(flags.iter().copied()).collect::<Vec<_>>().join(" ");
    assert_eq!(row["rerun"].as_str(), Some(rerun.as_str()), "{case}: {row}");
    assert!(text.contains("DIED") && text.contains(&format!("`{rerun}`")), "{case}: {text}");

    let mut args = flags.to_vec();
    args.push("--json");
    let r = run(&mut rebuild_cmd(db, &args));
    assert_eq!(r.code, Some(0), "{case}: {r}");
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    let cleaned: Vec<&str> = report["cleaned_up"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(
        cleaned.iter().any(|l| l.starts_with(&format!("rebuild run #{died_run} ("))),
        "{case}: the run says it found #{died_run} dead: {report}"
    );
    if let Some(table) = leaves {
        assert!(cleaned.iter().any(|l| l.starts_with(&format!("dropped {table}"))), "{case}: {report}");
    }
    assert!(!table_exists(c, "chronicle_entries_rebuild") && !table_exists(c, "chronicle_entries_replaced"), "{case}");
    if flags.contains(&"--emit-outbox") {
        let r = run(&mut worker_cmd(db, &["--until-empty"]));
        assert_eq!(r.code, Some(0), "{case}: {r}");
    }
    let (died, error): (Option<bool>, Option<String>) = {
        let r = c.query_one("SELECT success, error FROM chronicle_rebuild_runs WHERE id = $1", &[&died_run]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(died, Some(false), "{case}");
    assert!(error.as_deref().is_some_and(|e| e.starts_with("died:")), "{case}: {error:?}");
    assert_eq!(unfinished_runs(c), 0, "{case}: no run left running");
    let (row, _) = last_rebuild(db);
    assert!(matches!(row["state"].as_str(), Some("succeeded" | "queued")), "{case}: {row}");
    assert!(verify_is_clean(db), "{case}: verify after running it again");
}

/// A rebuild that stops anywhere, in each mode, leaves nothing half-done for good: it is
/// shown died at once (its process is gone), an interrupted `--emit-outbox` changed
/// nothing (with `--truncate`: the read model is not emptied with nothing queued to refill
/// it), and running the same command again cleans up what the dead run left and ends with
/// a read model `verify` finds exact.
#[test]
fn a_rebuild_killed_anywhere_is_marked_died_and_running_it_again_ends_exact() {
    let db = injected_and_drained("1200");
    let mut c = db.client();
    assert!(verify_is_clean(&db));
    for (n, case) in INTERRUPTIONS.iter().enumerate() {
        let name = format!(
            "{} at {}",
            if case.flags.is_empty() { "direct".into() } else { case.flags.join(" ") },
            case.failpoint
        );
        let entries_before = count(&mut c, "SELECT count(*) FROM chronicle_entries");
        // The second batch for the batch point: one is written, the rest is not.
        let action = if case.failpoint == "rebuild-batch" { "1*off->return(abort)" } else { "return(abort)" };
        let r = run(rebuild_cmd(&db, case.flags).env("FAILPOINTS", format!("{}={action}", case.failpoint)));
        assert_ne!(r.code, Some(0), "{name}: the fail point stops it: {r}");
        assert!(r.stderr.contains(&format!("fail point {}", case.failpoint)), "{name}: {r}");
        let died_run = count(&mut c, "SELECT max(id) FROM chronicle_rebuild_runs");
        assert_eq!(died_run, n as i64 * 2 + 1, "{name}: one run per command");
        if let Some(table) = case.leaves {
            assert!(table_exists(&mut c, table), "{name}: leaves {table}");
        }
        if case.failpoint == "rebuild-enqueued" {
            assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), entries_before, "{name}");
            assert_eq!(
                count(
                    &mut c,
                    &format!("SELECT count(*) FROM chronicle_outbox_events WHERE rebuild_run_id = {died_run}")
                ),
                0,
                "{name}: nothing queued"
            );
        }
        assert_eq!(!verify_is_clean(&db), case.drifts, "{name}: verify once interrupted");
        rerun_after_died(&db, &mut c, died_run, case.flags, case.leaves, &name);
    }
}

/// A running worker marks a run that died, so the metrics and `status` say so without
/// waiting for the next rebuild.
#[test]
fn a_worker_marks_a_rebuild_that_died() {
    let db = injected_and_drained("300");
    let mut c = db.client();
    let r = run(rebuild_cmd(&db, &["--truncate"]).env("FAILPOINTS", "rebuild-after-truncate=return(abort)"));
    assert_ne!(r.code, Some(0), "{r}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_rebuild_runs WHERE finished_at IS NULL"), 1);
    worker_until(&db, "the worker to mark the run died", |m| {
        crate::util::metric_sum(m, "chronicle_rebuild_last_finished_timestamp_seconds") > 0.0
    });
    let (row, _) = last_rebuild(&db);
    assert_eq!(row["state"], "died", "{row}");
    assert!(row["error"].as_str().is_some_and(|e| e.starts_with("died:")), "{row}");
    assert!(row["finished_at"].is_string() && row["success"] == false, "{row}");
    assert_eq!(row["rerun"], "chronicle rebuild --truncate", "{row}");
}

/// A throwaway cluster, stopped when the test ends (pass or fail).
#[cfg(unix)]
struct OwnCluster(crate::util::Cluster);

#[cfg(unix)]
impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = self.0.pg_ctl(&["stop", "-m", "immediate"]);
    }
}

/// The server restarts under a rebuild, in each mode, while the command is held at a fail
/// point: `status` shows the run `running` while its session holds the rebuild lock, and
/// `died` once the restart has ended that session, though the process itself still lives.
/// An interrupted `--truncate --emit-outbox` emptied nothing. Running the command again
/// cleans up and ends with a read model `verify` finds exact.
#[cfg(unix)]
#[test]
fn a_server_restart_under_a_rebuild_leaves_it_died_and_running_it_again_ends_exact() {
    let cluster = OwnCluster(
        crate::util::Cluster::start(&["fsync=off"]).unwrap_or_else(|e| panic!("starting a throwaway cluster: {e}")),
    );
    let db = TestDb::empty_on(&cluster.0.server);
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(&mut db.chronicle(&["inject", "--count", "1200", "--libraries", "3", "--seed", "5"]));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let log = cluster.0.dir.join("log").display().to_string();
    let cases: &[(&[&str], &str, &str)] = &[
        (&[], "rebuild-batch", "1*off->return(stall)"),
        (&["--truncate"], "rebuild-after-truncate", "return(stall)"),
        (&["--truncate", "--emit-outbox"], "rebuild-enqueued", "return(stall)"),
        (&["--emit-outbox"], "rebuild-enqueued", "return(stall)"),
        (&["--swap"], "rebuild-batch", "1*off->return(stall)"),
        (&["--swap"], "swap-before-swap", "return(stall)"),
    ];
    for (n, (flags, point, action)) in cases.iter().enumerate() {
        let name = format!("{} at {point}", if flags.is_empty() { "direct".to_string() } else { flags.join(" ") });
        let mut c = db.client();
        let entries_before = count(&mut c, "SELECT count(*) FROM chronicle_entries");
        let stderr_path = cluster.0.dir.join(format!("rebuild-{n}.stderr"));
        let mut child = rebuild_cmd(&db, flags)
            .env("FAILPOINTS", format!("{point}={action}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("starting chronicle rebuild");
        crate::util::wait_until(
            Duration::from_secs(60),
            &format!("{name}: the rebuild to reach its fail point"),
            || std::fs::read_to_string(&stderr_path).unwrap_or_default().contains("stalling until killed"),
        );
        let died_run = count(&mut c, "SELECT max(id) FROM chronicle_rebuild_runs");
        if flags.contains(&"--truncate") && *point == "rebuild-enqueued" {
            // Held before its commit, the run holds the read model's lock (the TRUNCATE),
            // which status's count of entries would wait for: the run's session is seen
            // holding the rebuild lock instead.
            let holds = count(
                &mut c,
                &format!(
                    "SELECT count(*) FROM pg_locks l JOIN chronicle_rebuild_runs r ON l.pid = r.backend_pid
                     WHERE r.id = {died_run} AND l.locktype = 'advisory' AND l.granted"
                ),
            );
            assert_eq!(holds, 1, "{name}: the run's session holds the rebuild lock");
        } else {
            let (row, _) = last_rebuild(&db);
            assert_eq!((row["id"].as_i64(), row["state"].as_str()), (Some(died_run), Some("running")), "{name}: {row}");
        }
        drop(c);

        let mode = if n % 2 == 0 { "fast" } else { "immediate" };
        let out = cluster.0.pg_ctl(&["restart", "-m", mode, "-w", "-t", "60", "-l", &log]);
        assert!(out.status.success(), "{name}: pg_ctl restart failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(child.try_wait().unwrap().is_none(), "{name}: the command still lives, held at its fail point");
        let (row, _) = last_rebuild(&db);
        assert_eq!((row["id"].as_i64(), row["state"].as_str()), (Some(died_run), Some("died")), "{name}: {row}");
        let _ = child.kill();
        let _ = child.wait();

        let mut c = db.client();
        if *point == "rebuild-enqueued" {
            assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), entries_before, "{name}");
            assert_eq!(
                count(
                    &mut c,
                    &format!("SELECT count(*) FROM chronicle_outbox_events WHERE rebuild_run_id = {died_run}")
                ),
                0,
                "{name}: nothing queued"
            );
        }
        let leaves = flags.contains(&"--swap").then_some("chronicle_entries_rebuild");
        if let Some(table) = leaves {
            assert!(table_exists(&mut c, table), "{name}: leaves {table}");
        }
        rerun_after_died(&db, &mut c, died_run, flags, leaves, &name);
    }
}
