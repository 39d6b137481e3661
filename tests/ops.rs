//! Operations: replay-failed, status, show, prune (and the worker's retention), erase,
//! through the real binary against a real server.

#![cfg_attr(not(unix), allow(unused_imports, dead_code))] // Unix-only tests are marked #[cfg(unix)]

use std::process::Stdio;
use std::time::Duration;

use postgres::Client;
use serde_json::Value;
use uuid::Uuid;

#[cfg(unix)]
use crate::util::signal;
use crate::util::{count, insert_events, run, server, wait_until, worker_cmd, Ran, TestDb};

/// Hostile audit text: quotes, backslashes, SQL, a newline and non-ASCII.
const HOSTILE: &str = "it's \"fixed\" \\ '); DROP TABLE chronicle_outbox_events; --\nv1.4 修复";

fn json_of(r: &Ran) -> Value {
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}):\n{r}"))
}

/// The event ids in outbox order (one delivery each after `insert_events`).
fn event_ids(c: &mut Client) -> Vec<Uuid> {
    c.query("SELECT event_id FROM chronicle_outbox_events ORDER BY id", &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

/// Leaves the delivery of `event` failed as a worker does (claim fields still set), its
/// failure `age_secs` old.
fn fail(c: &mut Client, event: Uuid, reason: &str, age_secs: f64) {
    let n = c
        .execute(
            "UPDATE chronicle_outbox_events
             SET status = 'failed', error_reason = $2, error = 'boom: ' || $2, attempts = 3,
                 claimed_by = 'w1', claim_token = gen_random_uuid(), claimed_at = now() - interval '1 hour',
                 lease_until = NULL, next_retry_at = now(),
                 updated_at = now() - make_interval(secs => $3)
             WHERE event_id = $1",
            &[&event, &reason, &age_secs],
        )
        .unwrap();
    assert_eq!(n, 1);
}

fn set_processing(c: &mut Client, event: Uuid) {
    c.execute(
        "UPDATE chronicle_outbox_events SET status = 'processing', attempts = 1, claimed_by = 'w2',
                claim_token = gen_random_uuid(), claimed_at = now(), lease_until = now() + interval '30 seconds'
         WHERE event_id = $1",
        &[&event],
    )
    .unwrap();
}

fn set_done(c: &mut Client, event: Uuid) {
    c.execute(
        "UPDATE chronicle_outbox_events SET status = 'done', attempts = 1, processed_at = now() WHERE event_id = $1",
        &[&event],
    )
    .unwrap();
}

/// Every column of the deliveries of `event`, as text.
fn delivery_rows(c: &mut Client, event: Uuid) -> Vec<String> {
    c.query("SELECT row_to_json(o)::text FROM chronicle_outbox_events o WHERE event_id = $1 ORDER BY id", &[&event])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn whole_outbox(c: &mut Client) -> Vec<String> {
    c.query("SELECT row_to_json(o)::text FROM chronicle_outbox_events o ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn replay(db: &TestDb, extra: &[&str]) -> Ran {
    let mut args = vec!["replay-failed", "--json"];
    args.extend_from_slice(extra);
    let r = run(&mut db.chronicle(&args));
    assert_eq!(r.code, Some(0), "{r}");
    r
}

fn replayed_events(v: &Value) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Uuid::parse_str(r["event_id"].as_str().unwrap()).unwrap())
        .collect();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
    v.sort();
    v
}

#[test]
fn replay_moves_only_failed_rows_and_writes_every_audit_field() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 6);
    let ids = event_ids(&mut c);
    fail(&mut c, ids[0], "invalid_payload", 10.0);
    fail(&mut c, ids[1], "rejected_by_read_model", 10.0);
    set_processing(&mut c, ids[2]);
    set_done(&mut c, ids[3]);
    // ids[4], ids[5] stay pending.
    let untouched: Vec<Vec<String>> = ids[2..].iter().map(|id| delivery_rows(&mut c, *id)).collect();

    let r = replay(&db, &["--by", "alice", "--reason", HOSTILE]);
    let v = json_of(&r);
    assert_eq!(v["replayed"], 2, "{r}");
    assert_eq!(v["dry_run"], false);
    assert_eq!(v["by_error_reason"], serde_json::json!({"invalid_payload": 1, "rejected_by_read_model": 1}));
    assert_eq!(v["skipped_live_delivery"], serde_json::json!([]));
    assert_eq!(replayed_events(&v), sorted(ids[..2].to_vec()));
    for row in v["rows"].as_array().unwrap() {
        assert_eq!(row["replay_count"], 1);
        assert!(row["outbox_id"].is_i64() && row["error_reason"].is_string(), "{row}");
    }
    let after: Vec<Vec<String>> = ids[2..].iter().map(|id| delivery_rows(&mut c, *id)).collect();
    assert_eq!(after, untouched, "pending, processing and done rows are never touched");

    let rows = c
        .query(
            "SELECT status, attempts, next_retry_at IS NULL, claimed_by IS NULL, claim_token IS NULL,
                    claimed_at IS NULL, lease_until IS NULL, replay_count, last_replayed_at > now() - interval '1 minute',
                    last_replayed_by, last_replayed_reason, error_reason, error, updated_at > now() - interval '1 minute'
             FROM chronicle_outbox_events WHERE event_id = ANY($1) ORDER BY id",
            &[&&ids[..2]],
        )
        .unwrap();
    let reasons = ["invalid_payload", "rejected_by_read_model"];
    for (row, reason) in rows.iter().zip(reasons) {
        assert_eq!(row.get::<_, String>(0), "pending");
        assert_eq!(row.get::<_, i32>(1), 0, "attempts reset");
        for i in 2..=6 {
            assert!(row.get::<_, bool>(i), "column {i} cleared");
        }
        assert_eq!(row.get::<_, i32>(7), 1);
        assert!(row.get::<_, bool>(8));
        assert_eq!(row.get::<_, String>(9), "alice");
        assert_eq!(row.get::<_, String>(10), HOSTILE, "the reason is stored verbatim");
        assert_eq!(row.get::<_, String>(11), reason, "error_reason stays readable");
        assert_eq!(row.get::<_, String>(12), format!("boom: {reason}"), "error stays readable");
        assert!(row.get::<_, bool>(13));
    }

    // Failed again, replayed again: the count goes on.
    fail(&mut c, ids[0], "invalid_payload", 10.0);
    let v = json_of(&replay(&db, &["--by", "bob", "--reason", "second try"]));
    assert_eq!(v["replayed"], 1);
    assert_eq!(v["rows"][0]["replay_count"], 2);
    let row = c
        .query_one(
            "SELECT replay_count, last_replayed_by, last_replayed_reason FROM chronicle_outbox_events WHERE event_id = $1",
            &[&ids[0]],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, i32>(0), row.get::<_, String>(1), row.get::<_, String>(2)),
        (2, "bob".into(), "second try".into())
    );

    // Nothing failed: nothing to do, exit 0.
    let v = json_of(&replay(&db, &["--by", "bob", "--reason", "again"]));
    assert_eq!(v["replayed"], 0);
    // The text form says the same.
    let r = run(&mut db.chronicle(&["replay-failed", "--by", "bob", "--reason", "again"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("replayed 0 failed row(s)"), "{r}");
}

#[test]
fn replay_honours_each_filter_and_the_limit() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 6);
    let ids = event_ids(&mut c);
    fail(&mut c, ids[0], "invalid_payload", 3.0 * 3600.0);
    fail(&mut c, ids[1], "invalid_payload", 1.0);
    fail(&mut c, ids[2], "rejected_by_read_model", 3.0 * 3600.0);
    fail(&mut c, ids[3], "unknown_event_type", 3.0 * 3600.0);
    fail(&mut c, ids[4], "max_attempts_exceeded", 3.0 * 3600.0);
    fail(&mut c, ids[5], "max_attempts_exceeded", 3.0 * 3600.0);
    let by = ["--by", "ops", "--reason", "filters"];

    let v = json_of(&replay(&db, &[&by[..], &["--error-reason", "invalid_payload", "--older-than", "1h"]].concat()));
    assert_eq!(replayed_events(&v), vec![ids[0]], "{v}");

    let v = json_of(&replay(&db, &[&by[..], &["--error-reason", "invalid_payload"]].concat()));
    assert_eq!(replayed_events(&v), vec![ids[1]], "{v}");

    let (e2, e3) = (ids[2].to_string(), ids[3].to_string());
    let v = json_of(&replay(&db, &[&by[..], &["--event-id", &e2, "--event-id", &e3]].concat()));
    assert_eq!(replayed_events(&v), sorted(vec![ids[2], ids[3]]), "{v}");

    let v = json_of(&replay(&db, &[&by[..], &["--older-than", "4h"]].concat()));
    assert_eq!(v["replayed"], 0, "nothing failed 4 hours ago: {v}");

    let v = json_of(&replay(&db, &[&by[..], &["--limit", "1"]].concat()));
    assert_eq!(replayed_events(&v), vec![ids[4]], "the oldest first: {v}");
    let v = json_of(&replay(&db, &[&by[..], &["--limit", "1"]].concat()));
    assert_eq!(replayed_events(&v), vec![ids[5]], "{v}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed'"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE replay_count <> 1"), 0);
}

#[test]
fn replay_skips_and_reports_rows_whose_event_has_a_live_delivery() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 3);
    let ids = event_ids(&mut c);
    // ids[0]: a failed delivery, and a pending one (its original row stays pending).
    c.execute(
        "INSERT INTO chronicle_outbox_events (event_id, status, error_reason, error) VALUES ($1, 'failed', 'invalid_payload', 'old')",
        &[&ids[0]],
    )
    .unwrap();
    // ids[1]: two failed deliveries; only the newest is replayed.
    fail(&mut c, ids[1], "invalid_payload", 60.0);
    c.execute(
        "INSERT INTO chronicle_outbox_events (event_id, status, error_reason, error) VALUES ($1, 'failed', 'rejected_by_read_model', 'newer')",
        &[&ids[1]],
    )
    .unwrap();
    // ids[2]: a plain failure.
    fail(&mut c, ids[2], "invalid_payload", 60.0);
    let before_0 = delivery_rows(&mut c, ids[0]);

    let v = json_of(&replay(&db, &["--by", "ops", "--reason", "live"]));
    assert_eq!(v["replayed"], 2, "{v}");
    assert_eq!(replayed_events(&v), sorted(vec![ids[1], ids[2]]));
    let newest: i64 =
        c.query_one("SELECT max(id) FROM chronicle_outbox_events WHERE event_id = $1", &[&ids[1]]).unwrap().get(0);
    assert!(
        v["rows"].as_array().unwrap().iter().any(|r| r["outbox_id"] == newest),
        "the newest failed row of ids[1]: {v}"
    );
    let mut skipped: Vec<Uuid> = v["skipped_live_delivery"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Uuid::parse_str(s.as_str().unwrap()).unwrap())
        .collect();
    skipped.sort();
    assert_eq!(skipped, sorted(vec![ids[0], ids[1]]), "{v}");
    assert_eq!(delivery_rows(&mut c, ids[0]), before_0, "the failed row of an event with a live delivery is untouched");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed'"),
        2,
        "the failed row of ids[0] and the older one of ids[1] stay failed"
    );

    let r = run(&mut db.chronicle(&["replay-failed", "--by", "ops", "--reason", "again"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("replayed 0") && r.stdout.contains(&ids[0].to_string()), "{r}");
}

#[test]
fn replay_dry_run_changes_nothing() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 4);
    let ids = event_ids(&mut c);
    fail(&mut c, ids[0], "invalid_payload", 5.0);
    fail(&mut c, ids[1], "max_attempts_exceeded", 5.0);
    let before = whole_outbox(&mut c);
    let v = json_of(&replay(&db, &["--by", "ops", "--reason", "look", "--dry-run"]));
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["replayed"], 2, "{v}");
    assert_eq!(v["rows"][0]["replay_count"], 1, "the count the row would get");
    assert_eq!(whole_outbox(&mut c), before);
    let r = run(&mut db.chronicle(&["replay-failed", "--by", "ops", "--reason", "look", "--dry-run"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("would replay 2") && r.stdout.contains(&ids[1].to_string()), "{r}");
    assert_eq!(whole_outbox(&mut c), before);
}

#[test]
fn a_replayed_row_whose_cause_is_fixed_ends_done() {
    let db = TestDb::new();
    let mut c = db.client();
    c.batch_execute("ALTER TABLE chronicle_entries ADD CONSTRAINT no_x CHECK (summary NOT LIKE '%POISON%')").unwrap();
    insert_events(&mut c, 10);
    let poison = Uuid::now_v7();
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
         VALUES ($1, gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed', '{\"title\": \"a\"}', '{\"title\": \"POISON\"}', now())",
        &[&poison],
    )
    .unwrap();
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let row = c
        .query_one("SELECT status, error_reason FROM chronicle_outbox_events WHERE event_id = $1", &[&poison])
        .unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("failed".into(), "rejected_by_read_model".into()));

    c.batch_execute("ALTER TABLE chronicle_entries DROP CONSTRAINT no_x").unwrap();
    let v = json_of(&replay(
        &db,
        &["--by", "alice", "--reason", "dropped no_x", "--error-reason", "rejected_by_read_model"],
    ));
    assert_eq!(v["replayed"], 1, "{v}");
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let row = c
        .query_one(
            "SELECT status, error_reason IS NULL AND error IS NULL, replay_count, attempts FROM chronicle_outbox_events WHERE event_id = $1",
            &[&poison],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "done");
    assert!(row.get::<_, bool>(1), "error cleared on success");
    assert_eq!((row.get::<_, i32>(2), row.get::<_, i32>(3)), (1, 1));
    let summary: String =
        c.query_one("SELECT summary FROM chronicle_entries WHERE id = $1", &[&poison]).unwrap().get(0);
    assert!(summary.contains("POISON"), "{summary}");
}

/// `status --json` against direct queries of the database.
fn assert_status_matches(db: &TestDb, c: &mut Client) -> Value {
    let v = status_json(db, &[]);
    let o = &v["outbox"];
    for s in ["pending", "processing", "done", "failed"] {
        let n = count(c, &format!("SELECT count(*) FROM chronicle_outbox_events WHERE status = '{s}'"));
        assert_eq!(o[s], n, "{s}: {v}");
    }
    let stuck = count(c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing' AND (lease_until < now() OR claimed_at < now() - interval '600 seconds')");
    assert_eq!(o["stuck"], stuck, "{v}");
    assert!(o["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0, "{v}");
    assert_eq!(v["events"], count(c, "SELECT count(*) FROM chronicle_events"));
    assert_eq!(v["entries"], count(c, "SELECT count(*) FROM chronicle_entries"));
    assert_eq!(
        v["events_without_entry"],
        count(c, "SELECT count(*) FROM chronicle_events e WHERE NOT EXISTS (SELECT 1 FROM chronicle_entries n WHERE n.id = e.id)")
    );
    let failed: Vec<(String, i64)> = c
        .query("SELECT error_reason, count(*) FROM chronicle_outbox_events WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC, 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let reported = v["failed_by_reason"].as_array().unwrap();
    assert_eq!(reported.len(), failed.len(), "{v}");
    for (f, (reason, n)) in reported.iter().zip(&failed) {
        assert_eq!(f["error_reason"], reason.as_str());
        assert_eq!(f["count"], *n);
        let example = Uuid::parse_str(f["example_event_id"].as_str().unwrap()).unwrap();
        let ok: bool = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM chronicle_outbox_events WHERE event_id = $1 AND status = 'failed' AND error_reason = $2)",
                &[&example, reason],
            )
            .unwrap()
            .get(0);
        assert!(ok, "example {example} is a {reason} failure");
    }
    let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "counts",
            "entries",
            "events",
            "events_without_entry",
            "failed_by_reason",
            "horizon",
            "horizon_held_back",
            "last_rebuild",
            "outbox",
            "standby"
        ]
    );
    assert_eq!(v["counts"], "exact", "a small database is counted: {v}");
    let mut okeys: Vec<&String> = o.as_object().unwrap().keys().collect();
    okeys.sort();
    assert_eq!(okeys, ["done", "failed", "oldest_pending_age_seconds", "pending", "processing", "stuck"]);
    v
}

#[test]
fn status_json_matches_the_database_in_each_state() {
    let db = TestDb::new();
    let mut c = db.client();
    // Empty.
    let v = assert_status_matches(&db, &mut c);
    assert_eq!(v["last_rebuild"], Value::Null);
    assert_eq!(v["outbox"]["oldest_pending_age_seconds"], 0.0);

    // Pending only.
    insert_events(&mut c, 12);
    c.batch_execute("UPDATE chronicle_outbox_events SET created_at = now() - interval '90 seconds'").unwrap();
    let v = assert_status_matches(&db, &mut c);
    assert_eq!(v["outbox"]["pending"], 12);
    assert!(v["outbox"]["oldest_pending_age_seconds"].as_f64().unwrap() >= 90.0, "{v}");

    // After a drain, more events: a partial drain.
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    insert_events(&mut c, 5);
    let v = assert_status_matches(&db, &mut c);
    assert_eq!((v["outbox"]["done"].as_i64(), v["outbox"]["pending"].as_i64()), (Some(12), Some(5)));
    assert_eq!(v["events_without_entry"], 5);

    // With failures and a stuck row.
    let ids = event_ids(&mut c);
    fail(&mut c, ids[12], "invalid_payload", 1.0);
    fail(&mut c, ids[13], "invalid_payload", 1.0);
    fail(&mut c, ids[14], "unknown_event_type", 1.0);
    c.execute(
        "UPDATE chronicle_outbox_events SET status = 'processing', claim_token = gen_random_uuid(), claimed_by = 'dead',
                claimed_at = now() - interval '1 minute', lease_until = now() - interval '1 second'
         WHERE event_id = $1",
        &[&ids[15]],
    )
    .unwrap();
    let v = assert_status_matches(&db, &mut c);
    assert_eq!(v["outbox"]["stuck"], 1);
    assert_eq!(v["failed_by_reason"][0]["error_reason"], "invalid_payload");
    assert_eq!(v["failed_by_reason"][0]["count"], 2);
    // Stuck by processing time: with --max-processing-seconds 30, a row claimed a minute ago
    // under a live lease counts too.
    c.execute(
        "UPDATE chronicle_outbox_events SET status = 'processing', claim_token = gen_random_uuid(), claimed_by = 'slow',
                claimed_at = now() - interval '1 minute', lease_until = now() + interval '1 hour'
         WHERE event_id = $1",
        &[&ids[16]],
    )
    .unwrap();
    let v = status_json(&db, &["--max-processing-seconds", "30"]);
    assert_eq!(v["outbox"]["stuck"], 2, "{v}");
    assert_status_matches(&db, &mut c);

    // After a rebuild run.
    let library = Uuid::now_v7();
    c.execute(
        "INSERT INTO chronicle_rebuild_runs (mode, library_id, started_at, finished_at, events_total, rows_written,
                                             failures, failures_by_reason, success, error)
         VALUES ('direct', NULL, now() - interval '1 hour', now() - interval '59 minutes', 10, 10, 0, '{}', true, NULL),
                ('truncate', $1, now() - interval '10 minutes', now() - interval '9 minutes', 17, 15, 2,
                 '{\"invalid_payload\": 2}', false, 'it broke')",
        &[&library],
    )
    .unwrap();
    let v = assert_status_matches(&db, &mut c);
    let lr = &v["last_rebuild"];
    assert_eq!(lr["mode"], "truncate", "{v}");
    assert_eq!(lr["library_id"], library.to_string());
    assert_eq!(
        (lr["events_total"].as_i64(), lr["rows_written"].as_i64(), lr["failures"].as_i64()),
        (Some(17), Some(15), Some(2))
    );
    assert_eq!(lr["failures_by_reason"], serde_json::json!({"invalid_payload": 2}));
    assert_eq!((lr["success"].as_bool(), lr["error"].as_str()), (Some(false), Some("it broke")));
    assert!(lr["id"].is_i64() && lr["started_at"].is_string() && lr["finished_at"].is_string(), "{lr}");

    // The text form is a table with the same numbers.
    let r = run(&mut db.chronicle(&["status"]));
    assert_eq!(r.code, Some(0), "{r}");
    for needle in
        ["OUTBOX", "pending", "FAILED BY REASON", "invalid_payload", "events without entry", "LAST REBUILD", "it broke"]
    {
        assert!(r.stdout.contains(needle), "{needle}: {r}");
    }
}

/// `status --json` with these flags, exit 0.
fn status_json(db: &TestDb, flags: &[&str]) -> Value {
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(flags);
    let r = run(&mut db.chronicle(&args));
    assert_eq!(r.code, Some(0), "{r}");
    json_of(&r)
}

#[test]
fn status_estimates_large_tables_from_statistics_and_says_so() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 12);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    insert_events(&mut c, 5);
    c.batch_execute("ANALYZE chronicle_events, chronicle_entries, chronicle_outbox_events").unwrap();

    // Freshly analyzed small tables: the estimates are the counts, and the events without an
    // entry are those with a live delivery.
    let v = status_json(&db, &["--estimate"]);
    assert_eq!(v["counts"], "estimated", "{v}");
    assert_eq!((v["events"].as_i64(), v["entries"].as_i64()), (Some(17), Some(12)), "{v}");
    assert_eq!((v["outbox"]["done"].as_i64(), v["outbox"]["pending"].as_i64()), (Some(12), Some(5)), "{v}");
    assert_eq!(v["events_without_entry"], 5, "{v}");

    // An event lost with its delivery: only the exact count (or verify) sees it; a failed
    // one is seen by both.
    let ids = event_ids(&mut c);
    c.execute("DELETE FROM chronicle_outbox_events WHERE event_id = $1", &[&ids[12]]).unwrap();
    fail(&mut c, ids[13], "invalid_payload", 1.0);
    let v = status_json(&db, &["--estimate"]);
    assert_eq!((v["events_without_entry"].as_i64(), v["outbox"]["failed"].as_i64()), (Some(4), Some(1)), "{v}");
    let v = status_json(&db, &["--exact"]);
    assert_eq!((v["counts"].as_str(), v["events_without_entry"].as_i64()), (Some("exact"), Some(5)), "{v}");

    // Without a flag, the planner's size of the events table decides: statistics saying
    // two million rows (written into the catalog, as an ANALYZE of a large table would)
    // make status estimate, and say so in both forms.
    c.batch_execute("UPDATE pg_class SET reltuples = 2000000 WHERE oid = 'chronicle_events'::regclass").unwrap();
    let v = status_json(&db, &[]);
    assert_eq!((v["counts"].as_str(), v["events"].as_i64()), (Some("estimated"), Some(2_000_000)), "{v}");
    assert_eq!(v["outbox"]["pending"], 3, "live states stay exact: {v}");
    let r = run(&mut db.chronicle(&["status"]));
    assert!(r.stdout.contains("estimated") && r.stdout.contains("~2000000"), "{r}");
    let v = status_json(&db, &["--exact"]);
    assert_eq!((v["counts"].as_str(), v["events"].as_i64()), (Some("exact"), Some(17)), "{v}");

    // Asking for both is refused, naming the flags.
    let r = run(&mut db.chronicle(&["status", "--exact", "--estimate"]));
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("--exact") && r.stderr.contains("--estimate"), "{r}");
}

#[test]
fn status_never_prints_the_database_password() {
    let db = TestDb::new();
    let s = server();
    // A password the server ignores (trust) or the real one: either way it must not appear.
    let password = s.password.clone().unwrap_or_else(|| "hunter2-never-shown".to_string());
    let url = format!(
        "postgresql://{}:{}@{}:{}/{}",
        s.user,
        password,
        if s.host.starts_with('/') { "127.0.0.1" } else { &s.host },
        s.port,
        db.name
    );
    let r = run(db.chronicle(&["status"]).env("DATABASE_URL", &url));
    assert!(!r.all().contains(&password), "{r}");
    let r = run(db
        .chronicle(&["status", "--json"])
        .env("DATABASE_URL", format!("postgresql://u:{password}@127.0.0.1:1/x")));
    assert_eq!(r.code, Some(3), "{r}");
    assert!(!r.all().contains(&password), "{r}");
}

#[test]
fn show_prints_the_event_its_deliveries_and_its_entry() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 2);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let id = event_ids(&mut c)[0];
    c.execute(
        "INSERT INTO chronicle_outbox_events (event_id, status, error_reason, error, replay_count, last_replayed_by)
         VALUES ($1, 'failed', 'invalid_payload', 'a later failure', 1, 'alice')",
        &[&id],
    )
    .unwrap();

    let r = run(&mut db.chronicle(&["show", &id.to_string(), "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let v = json_of(&r);
    let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["deliveries", "entry", "event"]);
    let event_columns: Vec<String> = c
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_name = $1 ORDER BY 1",
            &[&"chronicle_events"],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut shown: Vec<String> = v["event"].as_object().unwrap().keys().cloned().collect();
    shown.sort();
    assert_eq!(shown, event_columns, "every column of the event");
    assert_eq!(v["event"]["id"], id.to_string());
    assert_eq!(v["event"]["event_type"], "BookRenamed");
    assert!(v["event"]["after"]["title"].is_string(), "payloads are JSON: {v}");
    let deliveries = v["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 2);
    assert_eq!(deliveries[0]["status"], "done");
    assert_eq!(deliveries[1]["status"], "failed");
    assert_eq!(deliveries[1]["error"], "a later failure");
    for k in [
        "id",
        "event_id",
        "status",
        "attempts",
        "next_retry_at",
        "claimed_by",
        "claim_token",
        "claimed_at",
        "lease_until",
        "processed_at",
        "error_reason",
        "error",
        "replay_count",
        "last_replayed_at",
        "last_replayed_by",
        "last_replayed_reason",
        "created_at",
        "updated_at",
    ] {
        assert!(deliveries[1].get(k).is_some(), "delivery lacks {k}: {v}");
    }
    assert_eq!(v["entry"]["id"], id.to_string());
    let summary: String = c.query_one("SELECT summary FROM chronicle_entries WHERE id = $1", &[&id]).unwrap().get(0);
    assert_eq!(v["entry"]["summary"], summary.as_str());

    let r = run(&mut db.chronicle(&["show", &id.to_string()]));
    assert_eq!(r.code, Some(0), "{r}");
    for needle in ["EVENT", "DELIVERIES (2", "ENTRY", "a later failure", "alice", &summary, "library_id"] {
        assert!(r.stdout.contains(needle), "{needle}: {r}");
    }

    let unknown = Uuid::now_v7().to_string();
    let r = run(&mut db.chronicle(&["show", &unknown]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains(&unknown) && r.stderr.contains("no event"), "{r}");
    let r = run(&mut db.chronicle(&["show", "not-a-uuid"]));
    assert_eq!(r.code, Some(2), "{r}");
}

#[test]
fn prune_deletes_only_old_done_rows_in_batches() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 30);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let ids = event_ids(&mut c);
    // 20 done rows processed two days ago; 10 recent ones.
    c.execute(
        "UPDATE chronicle_outbox_events SET processed_at = now() - interval '2 days' WHERE event_id = ANY($1)",
        &[&&ids[..20]],
    )
    .unwrap();
    // Old rows in every other state: never pruned, whatever their processed_at.
    for (i, status) in ["pending", "failed", "processing"].iter().enumerate() {
        c.execute(
            "UPDATE chronicle_outbox_events SET status = $2, claim_token = gen_random_uuid(), lease_until = now(),
                    error_reason = CASE WHEN $2 = 'failed' THEN 'invalid_payload' END
             WHERE event_id = $1",
            &[&ids[i], status],
        )
        .unwrap();
    }
    let before = whole_outbox(&mut c);

    let r = run(&mut db.chronicle(&["prune", "--older-than", "1d", "--dry-run", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let v = json_of(&r);
    assert_eq!((v["deleted"].as_i64(), v["dry_run"].as_bool()), (Some(17), Some(true)), "{v}");
    assert_eq!(whole_outbox(&mut c), before, "a dry run deletes nothing");

    let r = run(&mut db.chronicle(&["prune", "--older-than", "1d", "--batch-size", "4", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let v = json_of(&r);
    assert_eq!(v["deleted"], 17, "{v}");
    assert!(v["batches"].as_i64().unwrap() >= 5, "17 rows in batches of 4: {v}");
    assert_eq!(v["dry_run"], false);
    assert_eq!(v["older_than_seconds"], 86400.0);
    assert!(v["cutoff"].is_string());
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events"), 13);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'"), 10);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'"), 3);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 30, "entries are never pruned");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_events"), 30, "events are never pruned");

    let r = run(&mut db.chronicle(&["prune", "--older-than", "1d"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("deleted 0"), "{r}");
    let r = run(&mut db.chronicle(&["prune"]));
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("--older-than"), "{r}");
}

#[cfg(unix)]
#[test]
fn the_worker_prunes_done_rows_when_retention_is_set() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 40);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    c.batch_execute("UPDATE chronicle_outbox_events SET processed_at = now() - interval '1 hour'").unwrap();
    // A 10 s retention: the prune runs every second (a tenth of it, at least 1 s).
    let mut child = worker_cmd(&db, &[])
        .env("OUTBOX_DONE_RETENTION_SECONDS", "10")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "the worker to prune the old done rows", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events") == 0
    });
    // New events are projected; their done rows are younger than the retention and kept,
    // while a prune turn provably runs: one of them, aged by hand, goes.
    insert_events(&mut c, 5);
    wait_until(Duration::from_secs(20), "the new events to be projected", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'") == 5
    });
    c.batch_execute(
        "UPDATE chronicle_outbox_events SET processed_at = now() - interval '1 hour'
         WHERE id = (SELECT min(id) FROM chronicle_outbox_events)",
    )
    .unwrap();
    wait_until(Duration::from_secs(20), "a prune turn to remove the aged row", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events") == 4
    });
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'"), 4);
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 45);
}

#[test]
fn erase_leaves_no_trace_of_the_event_and_records_who_and_why() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 3);
    let secret = Uuid::now_v7();
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at, reason, request_id)
         VALUES ($1, gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed', '{\"title\": \"SECRET-OLD\"}',
                 '{\"title\": \"SECRET-NEW\"}', now(), 'SECRET-REASON', 'SECRET-REQ')",
        &[&secret],
    )
    .unwrap();
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    c.execute("INSERT INTO chronicle_outbox_events (event_id, status, error_reason, error) VALUES ($1, 'failed', 'invalid_payload', 'SECRET-ERR')", &[&secret]).unwrap();
    let missing = Uuid::now_v7();

    // Without the deliberate path, the database still refuses.
    assert!(c.execute("DELETE FROM chronicle_events WHERE id = $1", &[&secret]).is_err());

    let (s, m) = (secret.to_string(), missing.to_string());
    let r = run(&mut db.chronicle(&[
        "erase",
        "--event-id",
        &s,
        "--event-id",
        &m,
        "--by",
        "dpo@example.com",
        "--reason",
        HOSTILE,
        "--json",
    ]));
    assert_eq!(r.code, Some(0), "{r}");
    let v = json_of(&r);
    assert_eq!(v["event_ids"], serde_json::json!([s]));
    assert_eq!(v["not_found"], serde_json::json!([m]));
    assert_eq!(
        (v["events_erased"].as_i64(), v["deliveries_erased"].as_i64(), v["entries_erased"].as_i64()),
        (Some(1), Some(2), Some(1))
    );
    assert_eq!(v["erased_by"], "dpo@example.com");
    assert_eq!(v["reason"], HOSTILE);
    assert!(v["erasure_id"].is_i64() && v["erased_at"].is_string(), "{v}");

    for (table, col) in
        [("chronicle_events", "id"), ("chronicle_outbox_events", "event_id"), ("chronicle_entries", "id")]
    {
        let n: i64 = c.query_one(&format!("SELECT count(*) FROM {table} WHERE {col} = $1"), &[&secret]).unwrap().get(0);
        assert_eq!(n, 0, "{table} still holds the event");
        let leaked =
            count(&mut c, &format!("SELECT count(*) FROM {table} t WHERE row_to_json(t)::text LIKE '%SECRET%'"));
        assert_eq!(leaked, 0, "{table} still holds its content");
    }
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_events"), 3, "the other events stay");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 3);

    let row = c
        .query_one(
            "SELECT event_ids, erased_by, reason, erased_at > now() - interval '1 minute', events_erased, deliveries_erased,
                    entries_erased, row_to_json(a)::text
             FROM chronicle_erasures a",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Vec<Uuid>>(0), vec![secret]);
    assert_eq!(row.get::<_, String>(1), "dpo@example.com");
    assert_eq!(row.get::<_, String>(2), HOSTILE);
    assert!(row.get::<_, bool>(3));
    assert_eq!((row.get::<_, i32>(4), row.get::<_, i32>(5), row.get::<_, i32>(6)), (1, 2, 1));
    assert!(!row.get::<_, String>(7).contains("SECRET"), "the audit row holds no content");

    // Nothing to erase: exit 1, no audit row.
    let r = run(&mut db.chronicle(&["erase", "--event-id", &s, "--by", "dpo", "--reason", "again"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("nothing to erase"), "{r}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_erasures"), 1);
}

#[test]
fn erase_is_refused_while_a_rebuild_runs() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 1);
    let id = event_ids(&mut c)[0].to_string();
    let mut rebuild = db.client();
    rebuild.execute("SELECT pg_advisory_lock($1)", &[&chronicle::rebuild::REBUILD_LOCK_KEY]).unwrap();
    let r = run(&mut db.chronicle(&["erase", "--event-id", &id, "--by", "dpo", "--reason", "r"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("rebuild"), "{r}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_events"), 1);
    rebuild.execute("SELECT pg_advisory_unlock($1)", &[&chronicle::rebuild::REBUILD_LOCK_KEY]).unwrap();
    let r = run(&mut db.chronicle(&["erase", "--event-id", &id, "--by", "dpo", "--reason", "r"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_events"), 0);
}

#[test]
fn every_operations_command_has_help_with_examples() {
    for name in ["replay-failed", "status", "show", "prune", "erase"] {
        for args in [vec![name, "--help"], vec!["help", name]] {
            let r = run(&mut crate::util::chronicle_cmd(&args));
            assert_eq!(r.code, Some(0), "{args:?}: {r}");
            assert!(r.stdout.contains("EXAMPLES") && r.stdout.contains(&format!("chronicle {name}")), "{args:?}: {r}");
        }
    }
    let r = run(&mut crate::util::chronicle_cmd(&["--help"]));
    for name in ["replay-failed", "status", "show", "prune", "erase"] {
        assert!(r.stdout.contains(name), "{name} missing from chronicle --help");
    }
    let r = run(&mut crate::util::chronicle_cmd(&["help", "worker"]));
    assert!(r.stdout.contains("OUTBOX_DONE_RETENTION_SECONDS"), "the retention is missing from chronicle help worker");
}

#[test]
fn missing_by_or_reason_exits_2_naming_them() {
    let db = TestDb::new();
    let id = Uuid::now_v7().to_string();
    for (args, names) in [
        (vec!["replay-failed"], vec!["--by", "--reason"]),
        (vec!["replay-failed", "--by", "ana"], vec!["--reason"]),
        (vec!["replay-failed", "--by", "", "--reason", "r"], vec!["--by"]),
        (vec!["erase", "--event-id", &id], vec!["--by", "--reason"]),
        (vec!["erase", "--event-id", &id, "--by", "ana", "--reason", " "], vec!["--reason"]),
    ] {
        let r = run(&mut db.chronicle(&args));
        assert_eq!(r.code, Some(2), "{args:?}: {r}");
        for n in names {
            assert!(r.stderr.contains(n), "{args:?} does not name {n}: {r}");
        }
    }
    let r = run(&mut db.chronicle(&["replay-failed", "--by", "a", "--reason", "r", "--error-reason", "flaky"]));
    assert_eq!(r.code, Some(2), "{r}");
    let r = run(&mut db.chronicle(&["replay-failed", "--by", "a", "--reason", "r", "--event-id", "42"]));
    assert_eq!(r.code, Some(2), "{r}");
}

/// The keys each `--json` prints are the keys docs/operations.md documents for it, no
/// more and no fewer: the test reads the tables users read, not a list copied from the
/// code.
#[test]
fn every_json_key_printed_is_documented_and_every_documented_key_printed() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    let documented = |command: &str| -> std::collections::BTreeSet<String> {
        let start = doc.find(&format!("\n### {command}\n")).unwrap_or_else(|| panic!("no section for {command}"));
        let section = &doc[start + 1..];
        let section = &section[..section[4..].find("\n### ").map_or(section.len(), |i| i + 4)];
        let table =
            section.split("| key | type | meaning |").nth(1).unwrap_or_else(|| panic!("{command}: no key table"));
        table
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .flat_map(|l| l.split('|').nth(1).unwrap_or("").split(", ").map(str::trim).collect::<Vec<_>>())
            .map(|k| k.trim_matches('`').split('.').next().unwrap_or("").to_string())
            .collect()
    };
    let printed = |r: &crate::util::Ran| -> std::collections::BTreeSet<String> {
        let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {r}"));
        v.as_object().unwrap().keys().cloned().collect()
    };
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 3);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let id: Uuid = c.query_one("SELECT id FROM chronicle_events LIMIT 1", &[]).unwrap().get(0);
    let id = id.to_string();
    let runs: Vec<(&str, Vec<&str>)> = vec![
        ("status", vec!["status", "--json"]),
        ("show", vec!["show", &id, "--json"]),
        ("replay-failed", vec!["replay-failed", "--by", "ops", "--reason", "r", "--dry-run", "--json"]),
        ("prune", vec!["prune", "--older-than", "1d", "--dry-run", "--json"]),
        ("erase", vec!["erase", "--event-id", &id, "--by", "dpo", "--reason", "r", "--json"]),
    ];
    for (command, args) in runs {
        let r = run(&mut db.chronicle(&args));
        assert_eq!(r.code, Some(0), "{args:?}: {r}");
        assert_eq!(printed(&r), documented(command), "{command} --json against docs/operations.md");
    }
}

/// The read-only commands read where `CHRONICLE_READ_DATABASE_URL` (or
/// `--read-database-url`) says, a hot standby here, without attempting a write there;
/// `verify --fix` writes through `DATABASE_URL`.
#[cfg(unix)]
#[test]
fn read_only_commands_read_a_standby_and_write_nothing_there() {
    use crate::util::Cluster;
    let primary = Cluster::start(&["fsync=off"]).unwrap_or_else(|e| panic!("starting the primary: {e}"));
    let db = TestDb::empty_on(&primary.server);
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(0), "{r}");
    // The standby first, so it replays the writes below (and knows when they committed).
    let standby = Cluster::standby_of(&primary, &["fsync=off"]).unwrap_or_else(|e| panic!("starting the standby: {e}"));
    let mut c = db.client();
    insert_events(&mut c, 5);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let mut s = standby.server.connect(&db.name);
    wait_until(Duration::from_secs(30), "the standby to have the entries", || {
        count(&mut s, "SELECT count(*) FROM chronicle_entries") == 5
    });
    let id: Uuid = c.query_one("SELECT id FROM chronicle_events LIMIT 1", &[]).unwrap().get(0);
    let id = id.to_string();
    let library: Uuid = c.query_one("SELECT library_id FROM chronicle_events LIMIT 1", &[]).unwrap().get(0);
    let library = library.to_string();
    let read = standby.server.url(&db.name);
    let nowhere = "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2";
    let reads: Vec<Vec<&str>> = vec![
        vec!["status", "--json"],
        vec!["entries", "--library-id", &library, "--json"],
        vec!["show", &id, "--json"],
        vec!["verify", "--json"],
        vec!["libraries", "--json"],
    ];
    for args in &reads {
        // DATABASE_URL leads nowhere: what they print comes from the standby.
        let r = run(db.chronicle(args).env("DATABASE_URL", nowhere).env("CHRONICLE_READ_DATABASE_URL", &read));
        assert_eq!(r.code, Some(0), "{args:?} on the standby: {r}");
        let mut flag = args.clone();
        flag.extend(["--read-database-url", &read]);
        let r = run(db.chronicle(&flag).env("DATABASE_URL", nowhere));
        assert_eq!(r.code, Some(0), "{flag:?}: {r}");
        // On the primary as a reader, their sessions are read-only and they still work.
        let r = run(db.chronicle(args).env("CHRONICLE_READ_DATABASE_URL", db.url()));
        assert_eq!(r.code, Some(0), "{args:?} read-only on the primary: {r}");
    }
    let status = |r: &Ran| -> Value { serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {r}")) };
    let r = run(db.chronicle(&["status", "--json"]).env("CHRONICLE_READ_DATABASE_URL", &read));
    let on_standby = status(&r);
    assert_eq!(on_standby["entries"], 5, "{on_standby}");
    assert!(on_standby["standby"]["replay_lag_bytes"].is_i64(), "{on_standby}");
    assert!(on_standby["standby"]["replay_lag_seconds"].is_f64(), "{on_standby}");
    let r = run(db.chronicle(&["status"]).env("CHRONICLE_READ_DATABASE_URL", &read));
    assert!(r.stdout.starts_with("READ FROM A STANDBY"), "{r}");
    assert!(status(&run(&mut db.chronicle(&["status", "--json"])))["standby"].is_null());
    // Fixing writes: through DATABASE_URL, whatever the reader's URL.
    c.batch_execute("DELETE FROM chronicle_entries WHERE id IN (SELECT id FROM chronicle_entries LIMIT 1)").unwrap();
    let r = run(db.chronicle(&["verify", "--fix", "--json"]).env("CHRONICLE_READ_DATABASE_URL", &read));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(serde_json::from_str::<Value>(r.stdout.trim()).unwrap()["fixed"]["missing_enqueued"], 1, "{r}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'"), 1);
    drop((c, s));
    drop(db);
    let _ = standby.pg_ctl(&["stop", "-m", "immediate"]);
    let _ = primary.pg_ctl(&["stop", "-m", "immediate"]);
}

/// `status` counts failing events, once each: an event with several failed deliveries
/// (left by an older version, or beside a replay of its newest) is one failing event,
/// under the reason of its newest failure; an event whose newest delivery is pending or
/// done is not failing, whatever failed before. The text says it counts events.
#[test]
fn status_counts_each_failing_event_once() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 4);
    let ids = event_ids(&mut c);
    let add_failed = |c: &mut Client, event: Uuid, reason: &str| {
        c.execute(
            "INSERT INTO chronicle_outbox_events (event_id, status, error_reason, error) VALUES ($1, 'failed', $2, 'x')",
            &[&event, &reason],
        )
        .unwrap();
    };
    // ids[0]: three failed deliveries, the newest rejected_by_read_model.
    fail(&mut c, ids[0], "invalid_payload", 60.0);
    add_failed(&mut c, ids[0], "invalid_payload");
    add_failed(&mut c, ids[0], "rejected_by_read_model");
    // ids[1]: a failed delivery and a pending one (replayed or re-delivered): not failing.
    add_failed(&mut c, ids[1], "invalid_payload");
    // ids[2]: a failed delivery, then a done one: projected since, not failing.
    add_failed(&mut c, ids[2], "unknown_event_type");
    set_done(&mut c, ids[2]);
    c.execute(
        "UPDATE chronicle_outbox_events SET status = 'failed', error_reason = 'unknown_event_type'
         WHERE id = (SELECT min(id) FROM chronicle_outbox_events WHERE event_id = $1)",
        &[&ids[2]],
    )
    .unwrap();
    // ids[3]: one failed delivery.
    fail(&mut c, ids[3], "invalid_payload", 30.0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed'"), 6);

    let v = status_json(&db, &[]);
    assert_eq!(v["outbox"]["failed"], 2, "ids[0] and ids[3]: {v}");
    let by: Vec<(String, i64, String)> = v["failed_by_reason"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["error_reason"].as_str().unwrap().to_string(),
                f["count"].as_i64().unwrap(),
                f["example_event_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        by,
        vec![
            ("invalid_payload".to_string(), 1, ids[3].to_string()),
            ("rejected_by_read_model".to_string(), 1, ids[0].to_string())
        ],
        "{v}"
    );
    let r = run(&mut db.chronicle(&["status"]));
    assert_eq!(r.code, Some(0), "{r}");
    let line = r.stdout.lines().find(|l| l.trim_start().starts_with("failed ")).unwrap_or_default();
    assert_eq!(line.split_whitespace().nth(1), Some("2"), "{r}");
    assert!(line.contains("events"), "the text says what it counts: {line:?}");
}
