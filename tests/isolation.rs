//! One bad event fails alone: rows back from an expired lease (their holder died) are
//! claimed again alone, in halving claims, so an event that kills the worker ends
//! `failed / max_attempts_exceeded` by itself and the rest of its batch is projected.
//! The crashes are real: the binary's fail points (`FAILPOINTS`) abort the process.

#![cfg_attr(not(target_os = "linux"), allow(unused_imports, dead_code))] // some tests are Unix or Linux only

use std::process::Stdio;
use std::time::{Duration, Instant};

use chronicle::outbox::{self, ClaimRequest, SizeLimits};
use postgres::Client;
use uuid::Uuid;

use crate::util::{count, insert_events, outbox_by_status, worker_cmd, TestDb};

const LEASE: Duration = Duration::from_secs(30);

fn claim(c: &mut Client, limit: u32, suspects_first: bool) -> Vec<i64> {
    let req = ClaimRequest {
        limit,
        worker_id: "w",
        token: Uuid::now_v7(),
        lease: LEASE,
        suspects_first,
        sizes: SizeLimits::default(),
        floor: 0,
    };
    outbox::claim_batch_with(c, outbox::claim_batch_sql().as_str(), &req, |r| r.outbox_id).unwrap()
}

fn expire_and_reclaim(c: &mut Client) -> u64 {
    c.execute(
        "UPDATE chronicle_outbox_events SET lease_until = now() - interval '1 second' WHERE status = 'processing'",
        &[],
    )
    .unwrap();
    outbox::reclaim_stuck(c, Duration::from_secs(600), 10).unwrap().retried
}

#[test]
fn reclaimed_rows_are_claimed_alone_in_halving_claims_without_blocking_new_rows() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 8);
    let first = claim(&mut c, 8, true);
    assert_eq!(first.len(), 8, "a healthy claim takes the whole batch");
    // The holder dies: every row comes back once reclaimed, keeping its attempt.
    assert_eq!(expire_and_reclaim(&mut c), 8);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE reclaims = 1 AND attempts = 1"), 8);
    // New events meanwhile: a healthy turn takes them, never mixed with the suspects.
    insert_events(&mut c, 3);
    let healthy = claim(&mut c, 8, false);
    assert_eq!(healthy.len(), 3);
    assert!(healthy.iter().all(|id| !first.contains(id)), "{healthy:?} {first:?}");
    // A suspect turn: half the batch, oldest first, alone.
    let half = claim(&mut c, 8, true);
    assert_eq!(half, first[..4].to_vec());
    // That claim dies too: its rows are reclaimed a second time, a quarter of the batch.
    c.execute(
        "UPDATE chronicle_outbox_events SET lease_until = now() - interval '1 second' WHERE id = ANY($1)",
        &[&half],
    )
    .unwrap();
    assert_eq!(outbox::reclaim_stuck(&mut c, Duration::from_secs(600), 10).unwrap().retried, 4);
    assert_eq!(claim(&mut c, 8, true), first[..2].to_vec());
    // With no healthy row ready, a "healthy first" turn takes suspects anyway (the
    // oldest suspect is now one reclaimed once: half the batch).
    assert_eq!(claim(&mut c, 8, false), first[2..4].to_vec(), "reclaimed twice: a quarter");
    assert_eq!(claim(&mut c, 8, false), first[4..8].to_vec());
    assert!(claim(&mut c, 8, false).is_empty());
    // A replay gives a fresh start: no longer a suspect.
    c.execute("UPDATE chronicle_outbox_events SET status = 'failed', error_reason = 'invalid_payload', claim_token = NULL, lease_until = NULL WHERE id = $1", &[&first[0]]).unwrap();
    let r =
        outbox::replay_failed(&mut c, &outbox::ReplayFilter { limit: 10, ..Default::default() }, "t", "fixed").unwrap();
    assert_eq!(r.replayed.len(), 1);
    assert_eq!(
        count(&mut c, &format!("SELECT reclaims::bigint FROM chronicle_outbox_events WHERE id = {}", first[0])),
        0
    );
}

/// Inserts `n` valid events in one statement; those whose number is in `marked` carry
/// the key `crash_me` in `after` (the fail point's marker). Returns the ids in order.
fn insert_marked(c: &mut Client, n: i64, marked: &[i64]) -> Vec<Uuid> {
    c.query(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
         SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                jsonb_build_object('title', 'Old ' || g),
                jsonb_build_object('title', 'New ' || g)
                  || CASE WHEN g = ANY($2) THEN jsonb_build_object('crash_me', true) ELSE '{}' END,
                now() + (g || ' milliseconds')::interval
         FROM generate_series(1, $1::bigint) g
         RETURNING id",
        &[&n, &marked],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn statuses(c: &mut Client, ids: &[Uuid]) -> std::collections::BTreeMap<String, i64> {
    c.query(
        "SELECT status || coalesce('/' || error_reason, ''), count(*) FROM chronicle_outbox_events
         WHERE event_id = ANY($1) GROUP BY 1",
        &[&ids],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[cfg(unix)]
#[test]
fn events_that_kill_the_worker_fail_alone_and_the_rest_of_their_batch_is_projected() {
    let db = TestDb::new();
    let mut c = db.client();
    let marked = [3_i64, 11, 12, 27, 40, 50];
    let batch = insert_marked(&mut c, 50, &marked);
    let bad: Vec<Uuid> = marked.iter().map(|g| batch[*g as usize - 1]).collect();
    let good: Vec<Uuid> = batch.iter().filter(|id| !bad.contains(id)).copied().collect();
    let mut later: Vec<Uuid> = Vec::new();
    let mut later_done_during_bisection = false;
    let (mut crashes, mut runs) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(240);
    // A supervisor: restart the worker whenever it dies, until nothing is left to do.
    loop {
        assert!(Instant::now() < deadline, "not settled after {crashes} crashes: {:?}", outbox_by_status(&mut c));
        let mut w = worker_cmd(
            &db,
            &[
                "--batch-size",
                "50",
                "--concurrency",
                "1",
                "--lease-seconds",
                "0.5",
                "--reclaim-interval-seconds",
                "0.1",
            ],
        )
        .env("OUTBOX_MAX_ATTEMPTS", "8")
        .env("FAILPOINTS", "project=return(abort@crash_me)")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        runs += 1;
        // Until it dies, or until every row is settled.
        let exited = loop {
            if let Some(status) = w.try_wait().unwrap() {
                break Some(status);
            }
            if count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status IN ('pending', 'processing')")
                == 0
            {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match exited {
            Some(status) => {
                assert!(!status.success(), "the worker ended by itself: {status}");
                crashes += 1;
            }
            None => {
                crate::util::signal(w.id(), "TERM");
                assert!(w.wait().unwrap().success());
                break;
            }
        }
        if crashes == 1 {
            // Written after the first crash: projected while the bad events are hunted.
            later = insert_marked(&mut c, 20, &[]);
        }
        let bad_settled = statuses(&mut c, &bad).get("failed/max_attempts_exceeded").copied().unwrap_or(0);
        if !later.is_empty() && bad_settled < bad.len() as i64 {
            later_done_during_bisection |= statuses(&mut c, &later).get("done").copied() == Some(later.len() as i64);
        }
    }
    let summary = format!("{crashes} crashes in {runs} runs: {:?}", outbox_by_status(&mut c));
    assert!(crashes >= 8, "each bad event used its 8 attempts crashing the worker: {summary}");
    assert_eq!(statuses(&mut c, &good), [("done".to_string(), 44)].into(), "{summary}");
    assert_eq!(statuses(&mut c, &bad), [("failed/max_attempts_exceeded".to_string(), 6)].into(), "{summary}");
    assert_eq!(statuses(&mut c, &later), [("done".to_string(), 20)].into(), "{summary}");
    assert!(later_done_during_bisection, "events written later waited for the bad ones: {summary}");
    // Each bad event was cornered alone: its last claims held it by itself.
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_entries"),
        64,
        "one entry per good event, none for the bad ones: {summary}"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed' AND attempts = 8 AND reclaims = 8"
        ),
        6,
        "{summary}"
    );
    // A good event of the first batch was claimed at most log2(50) + 1 times.
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done' AND attempts > 6"),
        0,
        "{summary}"
    );
}

#[cfg(unix)]
#[test]
fn fail_points_error_and_stall_are_survived_without_losing_an_event() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 30);
    // The first completion fails with a (transient) database error, the first claim too:
    // the rows are retried and all end done.
    // Not --until-empty: the retried rows wait for their backoff, and a worker that found
    // nothing ready meanwhile would stop before them.
    let child = worker_cmd(&db, &["--batch-size", "10", "--base-backoff-seconds", "0.05"])
        .env("FAILPOINTS", "claim=1*return(error);complete=1*return(error)")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    crate::util::wait_until(Duration::from_secs(60), "every row done after the injected errors", || {
        outbox_by_status(&mut c) == [("done".to_string(), 30)].into()
    });
    crate::util::signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("fail point complete: returning an error"), "{stderr}");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts = 2"),
        10,
        "the retried batch"
    );
    // A worker that stalls inside its completion holds its rows: a second worker takes
    // them once the first one's claim runs past OUTBOX_MAX_PROCESSING_SECONDS. One claim
    // thread, so the stalled worker has none left to claim them back (another of its
    // threads would, and stall in turn).
    insert_events(&mut c, 5);
    let mut stalled = worker_cmd(&db, &["--batch-size", "10", "--concurrency", "1"])
        .env("FAILPOINTS", "complete=return(stall)")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    crate::util::wait_until(Duration::from_secs(30), "the stalled claim", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing'") == 5
    });
    let mut second = worker_cmd(&db, &["--max-processing-seconds", "1", "--reclaim-interval-seconds", "0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    crate::util::wait_until(Duration::from_secs(30), "the stalled rows done by the second worker", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'") == 35
    });
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE reclaims = 1 AND attempts = 2"), 5);
    crate::util::signal(second.id(), "TERM");
    assert!(second.wait().unwrap().success());
    stalled.kill().unwrap();
    stalled.wait().unwrap();
}

/// The worker's peak resident memory (VmHWM), in MB.
#[cfg(target_os = "linux")] // the worker's peak memory from /proc
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024.0
}

/// Runs a worker (batch 50, one thread) until no row is pending or processing, and
/// returns its peak RSS in MB.
#[cfg(target_os = "linux")] // the worker's peak memory from /proc
fn drain_measuring(db: &TestDb, c: &mut Client) -> f64 {
    let mut w = worker_cmd(db, &["--batch-size", "50", "--concurrency", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    crate::util::wait_until(Duration::from_secs(40), "the drain", || {
        count(c, "SELECT count(*) FROM chronicle_outbox_events WHERE status IN ('pending', 'processing')") == 0
    });
    let peak = peak_rss_mb(w.id());
    crate::util::signal(w.id(), "TERM");
    assert!(w.wait().unwrap().success());
    peak
}

/// Inserts `n` events (one statement) whose `after` holds `keys` extra keys, and `n_big`
/// whose `after` holds a text of `big_mb` MB.
fn insert_heavy(c: &mut Client, n: i64, keys: i64, n_big: i64, big_mb: i64) {
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
         SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                jsonb_build_object('title', 'Old ' || g),
                CASE WHEN g <= $1::bigint
                     THEN (SELECT jsonb_object_agg('key_' || k, 'value number ' || k) FROM generate_series(1, $2::bigint) k)
                     ELSE jsonb_build_object('text', repeat('x', ($4::bigint * 1000000)::int)) END
                  || jsonb_build_object('title', 'New ' || g),
                now()
         FROM generate_series(1, $1::bigint + $3::bigint) g",
        &[&n, &keys, &n_big, &big_mb],
    )
    .unwrap();
}

#[cfg(target_os = "linux")] // the worker's peak memory from /proc
#[test]
fn events_over_the_size_limit_fail_unread_and_the_worker_stays_small() {
    // One event of 50 MB: never loaded, failed with its size; the worker's peak memory
    // stays near its baseline (generous bound: a debug build, shared machine).
    let db = TestDb::new();
    let mut c = db.client();
    insert_heavy(&mut c, 0, 0, 1, 50);
    let peak = drain_measuring(&db, &mut c);
    assert_eq!(outbox_by_status(&mut c), [("failed/invalid_payload".to_string(), 1)].into());
    let error: String = c.query_one("SELECT error FROM chronicle_outbox_events", &[]).unwrap().get(0);
    assert!(
        error.starts_with("event is 500000") && error.ends_with("bytes; OUTBOX_MAX_EVENT_BYTES is 16777216"),
        "{error}"
    );
    assert!(peak <= 40.0, "peak RSS {peak:.0} MB for one 50 MB event");
    // The rest of the backlog is not held up by it.
    insert_events(&mut c, 100);
    drain_measuring(&db, &mut c);
    assert_eq!(outbox_by_status(&mut c), [("done".to_string(), 100), ("failed/invalid_payload".to_string(), 1)].into());
}

#[cfg(target_os = "linux")] // the worker's peak memory from /proc
#[test]
fn several_large_events_in_one_insert_fail_once_and_the_backlog_behind_them_drains() {
    // Five 50 MB events written by one statement, then the ordinary backlog: the first
    // claim that sees them measures each once and fails them unread; the backlog is
    // projected behind them, and the worker stays small (generous bound: debug build).
    let db = TestDb::new();
    let mut c = db.client();
    insert_heavy(&mut c, 0, 0, 5, 50);
    insert_events(&mut c, 100);
    let peak = drain_measuring(&db, &mut c);
    assert_eq!(outbox_by_status(&mut c), [("done".to_string(), 100), ("failed/invalid_payload".to_string(), 5)].into());
    let attempts = count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts = 1");
    assert_eq!(attempts, 105, "every row took one claim");
    let errors = count(
        &mut c,
        "SELECT count(*) FROM chronicle_outbox_events WHERE error LIKE 'event is 500000% bytes; OUTBOX_MAX_EVENT_BYTES is 16777216'",
    );
    assert_eq!(errors, 5);
    assert!(peak <= 80.0, "peak RSS {peak:.0} MB with five 50 MB events");
}

#[cfg(target_os = "linux")] // the worker's peak memory from /proc
#[test]
fn a_batch_of_events_with_many_keys_is_projected_whole_within_bounded_memory() {
    // Ten events of 100,000 keys each (3.4 MB of JSON apiece) in one batch: every entry
    // keeps every key, and the worker holds each event's payload as text, not as a tree
    // per entry (generous bound for a debug build on a shared machine; the release
    // figure is in BENCHMARKS.md).
    let db = TestDb::new();
    let mut c = db.client();
    insert_heavy(&mut c, 10, 100_000, 0, 0);
    let peak = drain_measuring(&db, &mut c);
    assert_eq!(outbox_by_status(&mut c), [("done".to_string(), 10)].into());
    let whole = count(
        &mut c,
        "SELECT count(*) FROM chronicle_entries n JOIN chronicle_events e USING (id)
         WHERE n.details = jsonb_build_object('before', e.before, 'after', e.after)
           AND cardinality(n.changed_fields) = 100001 AND n.changed_fields[1] = 'key_1'",
    );
    assert_eq!(whole, 10, "entries with all their keys");
    eprintln!("ten events of 100,000 keys: worker peak RSS {peak:.1} MB");
    assert!(peak <= 150.0, "peak RSS {peak:.0} MB for ten events of 100,000 keys");
}
