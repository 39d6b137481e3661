//! A panic never leaves a zombie: one met while projecting an event fails that event alone,
//! in its batch's turn; one anywhere else stops the whole worker within 2 s with exit 70,
//! its claims given back. The panics are real: the binary's fail points (`FAILPOINTS`).

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use postgres::Client;

use crate::util::{count, insert_events, outbox_by_status, worker_cmd, TestDb};

/// How long after a panic outside a projection the worker may take to exit (docs/DESIGN.md
/// §4: within 2 s).
const STOPPED_WITHIN: Duration = Duration::from_secs(2);

/// A worker run to its end: its exit code, when it exited, and its log lines with the
/// moment each arrived.
struct Ended {
    code: Option<i32>,
    exited_at: Instant,
    lines: Vec<(Instant, String)>,
}

impl Ended {
    fn log(&self) -> String {
        self.lines.iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    /// When the first line containing `needle` arrived.
    fn seen(&self, needle: &str) -> Option<Instant> {
        self.lines.iter().find(|(_, l)| l.contains(needle)).map(|(t, _)| *t)
    }
}

/// Runs `cmd` until it exits, calling `during` meanwhile; kills it and fails the test if it
/// has not exited after `timeout` (a worker that hangs).
fn run_to_end(cmd: &mut Command, timeout: Duration, mut during: impl FnMut()) -> Ended {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        during();
        std::thread::sleep(Duration::from_millis(10));
    };
    let exited_at = Instant::now();
    reader.join().unwrap();
    let ended = Ended { code: status.and_then(|s| s.code()), exited_at, lines: rx.try_iter().collect() };
    assert!(status.is_some(), "the worker did not exit within {timeout:?}:\n{}", ended.log());
    ended
}

/// Inserts `n` valid events; the `marked`-th (from 1) carries the key `crash_me` in `after`
/// (the fail point's marker). Returns the marked event's id.
fn insert_with_one_marked(c: &mut Client, n: i64, marked: i64) -> uuid::Uuid {
    c.query_one(
        "WITH ins AS (
             INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
             SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                    jsonb_build_object('title', 'Old ' || g),
                    jsonb_build_object('title', 'New ' || g)
                      || CASE WHEN g = $2 THEN jsonb_build_object('crash_me', true) ELSE '{}' END,
                    now()
             FROM generate_series(1, $1::bigint) g
             RETURNING id, after)
         SELECT id FROM ins WHERE after ? 'crash_me'",
        &[&n, &marked],
    )
    .unwrap()
    .get(0)
}

/// Asserts that every row is pending with no attempt spent, or done with one.
fn assert_released_or_done(c: &mut Client, what: &str, log: &str) {
    let odd = count(
        c,
        "SELECT count(*) FROM chronicle_outbox_events
         WHERE NOT ((status = 'pending' AND attempts = 0 AND claim_token IS NULL)
                    OR (status = 'done' AND attempts = 1))",
    );
    assert_eq!(odd, 0, "{what}: rows neither given back nor done: {:?}\n{log}", outbox_by_status(c));
}

#[test]
fn a_panic_projecting_one_event_fails_that_event_alone_in_its_batchs_turn() {
    let db = TestDb::new();
    let mut c = db.client();
    let bad = insert_with_one_marked(&mut c, 50, 17);
    let ended = run_to_end(
        worker_cmd(&db, &["--until-empty", "--batch-size", "50", "--concurrency", "1"])
            .env("FAILPOINTS", "project=return(panic@crash_me)"),
        Duration::from_secs(60),
        || {},
    );
    let log = ended.log();
    assert_eq!(ended.code, Some(0), "{log}");
    let by = outbox_by_status(&mut c);
    assert_eq!(by.get("done"), Some(&49), "{by:?}\n{log}");
    assert_eq!(by.get("failed/projection_panicked"), Some(&1), "{by:?}\n{log}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 49);
    // Failed in the turn of the batch that claimed it: one claim, never reclaimed.
    let (id, attempts, reclaims, error): (i64, i32, i32, String) = {
        let r = c
            .query_one("SELECT id, attempts, reclaims, error FROM chronicle_outbox_events WHERE event_id = $1", &[&bad])
            .unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    };
    assert_eq!((attempts, reclaims), (1, 0), "{log}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts <> 1"), 0);
    assert!(error.starts_with("the projection panicked: fail point project: injected panic"), "{error}");
    // Logged once through the log, with the row and the event, not by the default hook.
    assert!(log.contains(&format!("the projection of outbox row {id} (event {bad}) panicked at ")), "{log}");
    assert!(!log.contains("RUST_BACKTRACE"), "the default panic hook's message: {log}");
}

/// Each background thread in turn panics (its fail point, on its second turn) while the
/// claim threads hold batches blocked on a locked read model: the worker stops within 2 s
/// of the panic with exit 70, every claimed row given back with its attempt.
#[test]
fn a_panic_in_any_background_thread_stops_the_worker_with_exit_70_and_gives_its_claims_back() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 40);
    for (point, thread) in [
        ("reclaim", "reclaim"),
        ("analyze", "analyze"),
        ("lease-keeper", "lease-keeper"),
        ("gauges", "gauges"),
        ("rebuild-runs", "rebuild-runs"),
        ("listener", "listener"),
        ("metrics", "metrics-http"),
        ("prune", "prune"),
    ] {
        let port = crate::util::free_port().to_string();
        let mut locker = db.client();
        let mut tx = locker.transaction().unwrap();
        tx.batch_execute("LOCK TABLE chronicle_entries IN ACCESS EXCLUSIVE MODE").unwrap();
        // When each probe of /readyz was sent, and whether it said ready.
        let mut probes: Vec<(Instant, bool)> = Vec::new();
        let ended = run_to_end(
            worker_cmd(&db, &["--until-empty", "--batch-size", "10", "--concurrency", "2"])
                .env("OUTBOX_RECLAIM_INTERVAL_SECONDS", "0.1")
                .env("OUTBOX_DONE_RETENTION_SECONDS", "10")
                .env("OUTBOX_METRICS_PORT", &port)
                .env("FAILPOINTS", format!("{point}=1*sleep(1500)->panic")),
            Duration::from_secs(60),
            || {
                let sent = Instant::now();
                let body = crate::util::http_get(port.parse().unwrap(), "/readyz").unwrap_or_default();
                probes.push((sent, body.contains("\"status\":\"ready\"")));
            },
        );
        tx.rollback().unwrap();
        let log = ended.log();
        assert_eq!(ended.code, Some(70), "{point}:\n{log}");
        let panicked = ended
            .seen(&format!("thread {thread} panicked at "))
            .unwrap_or_else(|| panic!("{point}: no log line of the panic:\n{log}"));
        let took = ended.exited_at.duration_since(panicked);
        eprintln!("{point}: exited {took:?} after the panic");
        assert!(took <= STOPPED_WITHIN, "{point}: exited {took:?} after the panic:\n{log}");
        assert!(log.contains(&format!("its thread {thread} panicked (failpoint {point} panic)")), "{point}:\n{log}");
        assert!(!log.contains("RUST_BACKTRACE"), "the default panic hook's message: {log}");
        // Ready until the panic; never again from the moment it was logged (50 ms after
        // the line arrived here) until the process was gone.
        if point != "metrics" {
            assert!(probes.iter().any(|(t, ready)| *ready && *t < panicked), "{point}: never ready before the panic");
            let after = probes.iter().filter(|(t, _)| *t > panicked + Duration::from_millis(50));
            assert_eq!(after.filter(|(_, ready)| *ready).count(), 0, "{point}: /readyz said ready after the panic");
        }
        assert_released_or_done(&mut c, point, &log);
        assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'"), 0);
    }
}

/// A claim thread that panics between two turns, holding the batch that its last
/// completion claimed: the worker stops with exit 70 and that batch is given back.
#[test]
fn a_claim_thread_that_panics_holding_a_batch_has_it_given_back() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 30);
    // First turn: a full batch, whose completion claims the next; second turn: the panic.
    let ended = run_to_end(
        worker_cmd(&db, &["--until-empty", "--batch-size", "10", "--concurrency", "1"])
            .env("FAILPOINTS", "claim-loop=1*off->panic"),
        Duration::from_secs(60),
        || {},
    );
    let log = ended.log();
    assert_eq!(ended.code, Some(70), "{log}");
    let panicked =
        ended.seen("thread claim-0 panicked at ").unwrap_or_else(|| panic!("no log line of the panic:\n{log}"));
    assert!(ended.exited_at.duration_since(panicked) <= STOPPED_WITHIN, "{log}");
    assert_released_or_done(&mut c, "claim-loop", &log);
    assert_eq!(outbox_by_status(&mut c), [("done".to_string(), 10), ("pending".to_string(), 20)].into(), "{log}");
    assert!(log.contains("gave back 10 row(s) of 1 claim(s) left held at shutdown"), "{log}");
}

/// A panic inside the transaction that completes a batch: the transaction is rolled back
/// before its connection goes back to the pool (no session is left idle in a transaction,
/// holding what it locked), and its rows are given back as the worker stops.
#[test]
fn a_panic_inside_a_completion_leaves_no_session_idle_in_transaction() {
    let db = TestDb::new();
    let mut c = db.client();
    let mut watcher = db.client();
    insert_events(&mut c, 10);
    let mut idle_seen = 0;
    let ended = run_to_end(
        worker_cmd(&db, &["--until-empty", "--batch-size", "10", "--concurrency", "1"])
            .env("FAILPOINTS", "complete=panic")
            // A backtrace takes the panic hook a while to resolve, with the transaction
            // still open (the unwinding that rolls it back comes after the hook).
            .env_remove("RUST_BACKTRACE"),
        Duration::from_secs(60),
        || {
            // A transaction is idle between two of its statements for an instant; one idle
            // for 200 ms is one nobody will finish.
            idle_seen = idle_seen.max(count(
                &mut watcher,
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name LIKE 'chronicle worker%'
                   AND state = 'idle in transaction' AND state_change < clock_timestamp() - interval '200 milliseconds'",
            ));
        },
    );
    let log = ended.log();
    assert_eq!(ended.code, Some(70), "{log}");
    assert!(log.contains("thread claim-0 panicked at "), "{log}");
    assert_eq!(idle_seen, 0, "a worker session was left idle in a transaction:\n{log}");
    assert_released_or_done(&mut c, "complete", &log);
    assert_eq!(outbox_by_status(&mut c), [("pending".to_string(), 10)].into(), "{log}");
}
