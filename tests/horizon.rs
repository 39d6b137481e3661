//! What slows the drain without failing anything, said to the operator: a transaction
//! holding back the vacuum horizon (gauges, `chronicle status`), and a server with no
//! connection slots left (named in the log, once).

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use postgres::IsolationLevel;
use serde_json::Value;

use crate::util::{
    assert_fully_projected, count, free_port, http_get, insert_events, metric_sum, run, signal, wait_until, worker_cmd,
    LoginRole, TestDb,
};

/// The value of one series (`name{...label...}`) in a scrape.
fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}

/// A transaction left open in REPEATABLE READ holds its snapshot, and with it the vacuum
/// horizon: the worker's gauges show its age and the outbox rows the drain left dead
/// behind it, and `chronicle status` names the backend that holds it (by pid) in its text
/// and its JSON. Once it ends, the gauge falls back to 0.
#[test]
fn a_transaction_holding_the_horizon_is_exported_and_named_by_status() {
    let db = TestDb::new();
    let mut c = db.client();
    let mut holder = db.client();
    let holder_pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let mut held = holder.build_transaction().isolation_level(IsolationLevel::RepeatableRead).start().unwrap();
    held.query("SELECT 1", &[]).unwrap();

    insert_events(&mut c, 200);
    let port = free_port();
    let mut child = worker_cmd(&db, &["--batch-size", "50"])
        .env("OUTBOX_METRICS_PORT", port.to_string())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let scrape = || http_get(port, "/metrics").unwrap_or_default();
    wait_until(Duration::from_secs(60), "the drain to finish", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'") == 0
    });
    // The horizon is sampled every 10 s; the statistics arrive within a second or so.
    let mut last = String::new();
    wait_until(Duration::from_secs(40), "the horizon's age and the dead rows in the gauges", || {
        last = scrape();
        sample(&last, "chronicle_db_oldest_xmin_age_seconds", "holder=\"transaction\"").is_some_and(|s| s >= 1.0)
            && metric_sum(&last, "chronicle_outbox_dead_rows") >= 200.0
    });
    assert!(
        sample(&last, "chronicle_db_oldest_xmin_age_transactions", "holder=\"transaction\"").is_some_and(|x| x >= 1.0),
        "the projection's transactions started after the held snapshot:\n{last}"
    );
    assert_eq!(sample(&last, "chronicle_db_oldest_xmin_age_seconds", "holder=\"prepared_transaction\""), Some(0.0));

    let json = run(&mut db.chronicle(&["status", "--json"]));
    assert_eq!(json.code, Some(0), "{json}");
    let st: Value = serde_json::from_str(&json.stdout).unwrap();
    let tx = &st["horizon"]["transaction"];
    assert!(tx["age_seconds"].as_f64().is_some_and(|s| s >= 1.0), "{st}");
    let by = tx["held_by"].as_str().unwrap_or_default();
    assert!(by.starts_with(&format!("pid {holder_pid} (")), "the held transaction is named: {by}");
    assert!(st["horizon"]["outbox_dead_rows"].as_i64().is_some_and(|n| n >= 200), "{st}");
    assert_eq!(st["horizon_held_back"], Value::Bool(false), "under the 300 s threshold: {st}");

    let text = run(&mut db.chronicle(&["status"]));
    assert!(text.stdout.contains("vacuum horizon: held back "), "{text}");
    assert!(text.stdout.contains(&format!("by transaction (pid {holder_pid} (")), "{text}");
    assert!(!text.stdout.contains("WARNING"), "under the threshold: {text}");

    held.rollback().unwrap();
    wait_until(Duration::from_secs(40), "the horizon's age back to 0", || {
        sample(&scrape(), "chronicle_db_oldest_xmin_age_seconds", "holder=\"transaction\"") == Some(0.0)
    });
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
}

/// A server with no connection slots left for the worker's role (53300) is named in the
/// log as that, once, while the worker works on the connections it has: not a database
/// "unreachable" and "reachable again" flapping with each attempt.
#[cfg(unix)]
#[test]
fn a_server_out_of_connection_slots_is_named_once_and_the_worker_drains_on() {
    let db = TestDb::new();
    let mut c = db.client();
    let role = LoginRole::create(
        &db,
        "few",
        &format!("GRANT {} TO {{role}}; ALTER ROLE {{role}} CONNECTION LIMIT 3", db.server.user),
    );
    insert_events(&mut c, 300);
    // Four claim threads and the services want more than three connections.
    let mut child = worker_cmd(&db, &["--batch-size", "10", "--concurrency", "4"])
        .env("DATABASE_URL", role.url())
        .env("OUTBOX_RUN_SECONDS", "20")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), "the drain to finish", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'") == 0
    });
    let status = child.wait().unwrap();
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(status.success(), "{log}");
    assert_fully_projected(&mut c);
    let named: Vec<&str> = log.lines().filter(|l| l.contains("the server has no connection slots left")).collect();
    assert_eq!(named.len(), 1, "named once:\n{log}");
    assert!(named[0].contains("SQLSTATE 53300") && named[0].contains("CONNECTION LIMIT"), "{}", named[0]);
    assert!(!log.contains("database unreachable") && !log.contains("reachable again"), "no flapping:\n{log}");
}
