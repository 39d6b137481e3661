//! The projector worker, through the real binary against a real server.

#![cfg_attr(not(unix), allow(unused_imports, dead_code))] // Unix-only tests are marked #[cfg(unix)]

use std::process::Stdio;
use std::time::{Duration, Instant};

#[cfg(unix)]
use crate::util::signal;
use crate::util::{
    assert_fully_projected, count, insert_events, outbox_by_status, run, wait_until, worker_cmd, TestDb,
};

#[test]
fn a_drain_leaves_one_entry_per_event_and_every_row_done() {
    let db = TestDb::new();
    let mut c = db.client();
    let library = insert_events(&mut c, 1234);
    let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "100"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_fully_projected(&mut c);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts <> 1"), 0);
    let row = c
        .query_one(
            "SELECT n.summary, n.changed_fields, n.projection_version, n.library_id, n.search @@ to_tsquery('simple', '标题')
             FROM chronicle_entries n JOIN chronicle_events e USING (id) WHERE e.after->>'title' = 'Title 7'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Renamed book \"旧标题 7\" → \"Title 7\"");
    assert_eq!(row.get::<_, Vec<String>>(1), vec!["title".to_string()]);
    assert_eq!(row.get::<_, i32>(2), chronicle::projection::PROJECTION_VERSION);
    assert_eq!(row.get::<_, uuid::Uuid>(3), library);
    assert!(row.get::<_, bool>(4), "the Chinese word 标题 is searchable");
}

#[test]
fn a_poison_event_of_each_class_fails_alone_and_the_rest_is_projected() {
    let db = TestDb::new();
    let mut c = db.client();
    // The read model refuses entries whose summary mentions "REFUSE" (a constraint this
    // test adds): rejected_by_read_model.
    c.batch_execute("ALTER TABLE chronicle_entries ADD CONSTRAINT no_refuse CHECK (summary NOT LIKE '%REFUSE%')")
        .unwrap();
    insert_events(&mut c, 60);
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at) VALUES
         (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookVanished', NULL, '{}', now()),
         (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed', '{\"title\": 5}', '{\"title\": \"x\"}', now()),
         (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed', '{\"title\": \"a\"}', '{\"title\": \"REFUSE\"}', now())",
    )
    .unwrap();
    insert_events(&mut c, 60);
    let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "50"]));
    assert_eq!(r.code, Some(0), "{r}");
    let by = outbox_by_status(&mut c);
    assert_eq!(by.get("done"), Some(&120), "{by:?}");
    assert_eq!(by.get("failed/unknown_event_type"), Some(&1), "{by:?}");
    assert_eq!(by.get("failed/invalid_payload"), Some(&1), "{by:?}");
    assert_eq!(by.get("failed/rejected_by_read_model"), Some(&1), "{by:?}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 120);
    let errors: Vec<String> = c
        .query("SELECT error FROM chronicle_outbox_events WHERE status = 'failed' ORDER BY error_reason", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(errors[0].contains("before.title"), "{errors:?}");
    assert!(errors[1].contains("no_refuse"), "{errors:?}");
    assert!(errors[2].contains("BookVanished"), "{errors:?}");
}

#[cfg(unix)]
#[test]
fn a_lock_held_past_the_statement_timeout_retries_then_succeeds() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 20);
    let mut locker = db.client();
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE chronicle_entries IN ACCESS EXCLUSIVE MODE").unwrap();
    let mut child = worker_cmd(&db, &[])
        .env("OUTBOX_STATEMENT_TIMEOUT_SECONDS", "0.2")
        .env("OUTBOX_BASE_BACKOFF_SECONDS", "0.1")
        .env("OUTBOX_MAX_BACKOFF_SECONDS", "0.2")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "a retry to be scheduled", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending' AND attempts >= 1 AND error LIKE 'transient%'") > 0
    });
    tx.rollback().unwrap();
    wait_until(Duration::from_secs(20), "the drain after the lock is gone", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'") == 20
    });
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    assert_fully_projected(&mut c);
    assert!(count(&mut c, "SELECT max(attempts)::bigint FROM chronicle_outbox_events") >= 2);
}

#[cfg(unix)]
#[test]
fn a_lock_that_never_clears_ends_in_max_attempts_exceeded() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 5);
    let mut locker = db.client();
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE chronicle_entries IN ACCESS EXCLUSIVE MODE").unwrap();
    let mut child = worker_cmd(&db, &[])
        .env("OUTBOX_STATEMENT_TIMEOUT_SECONDS", "0.1")
        .env("OUTBOX_BASE_BACKOFF_SECONDS", "0.05")
        .env("OUTBOX_MAX_BACKOFF_SECONDS", "0.1")
        .env("OUTBOX_MAX_ATTEMPTS", "3")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "every row to fail", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed'") == 5
    });
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    let by = outbox_by_status(&mut c);
    assert_eq!(by.get("failed/max_attempts_exceeded"), Some(&5), "{by:?}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts <> 3"), 0);
    assert!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE error LIKE '%statement timeout%'") == 5);
    tx.rollback().unwrap();
}

#[test]
fn after_kill_9_mid_drain_another_worker_finishes_exactly_once() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 20_000);
    let mut first = worker_cmd(&db, &["--batch-size", "200"])
        .env("OUTBOX_LEASE_SECONDS", "1")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), "the first worker to be mid-drain", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'") > 1000
    });
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let left = count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'");
    assert!(left > 0, "the kill came too late to test anything");
    let r = run(worker_cmd(&db, &["--until-empty", "--batch-size", "200"])
        .env("OUTBOX_LEASE_SECONDS", "1")
        .env("OUTBOX_RECLAIM_INTERVAL_SECONDS", "0.2"));
    assert_eq!(r.code, Some(0), "{r}");
    // Rows held by the killed worker are reclaimed once their lease expires; wait for
    // them with a second pass if the first ended before the lease did.
    wait_until(Duration::from_secs(20), "the killed worker's rows to be reclaimed", || {
        let r = run(worker_cmd(&db, &["--until-empty"]).env("OUTBOX_RECLAIM_INTERVAL_SECONDS", "0.2"));
        assert_eq!(r.code, Some(0), "{r}");
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'") == 0
    });
    assert_fully_projected(&mut c);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events"), 20_000, "one delivery per event");
}

/// `--until-empty` after a worker died holding claims: the claims whose lease has expired
/// are reclaimed and projected, and those whose lease has not are waited for (said in the
/// log), before it decides the outbox is empty; it does not leave them pending.
#[test]
fn until_empty_projects_a_dead_workers_claims_before_it_stops() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 3000);
    let expired =
        chronicle::outbox::claim_batch(&mut c, 1000, "dead", uuid::Uuid::now_v7(), Duration::from_millis(1)).unwrap();
    let live =
        chronicle::outbox::claim_batch(&mut c, 1000, "dead", uuid::Uuid::now_v7(), Duration::from_secs(3)).unwrap();
    assert_eq!((expired.len(), live.len()), (1000, 1000));
    let started = Instant::now();
    let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "200"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    assert_fully_projected(&mut c);
    assert!(r.stderr.contains("claimed by another worker"), "the wait for the live claims is not said: {r}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events"), 3000, "one delivery per event");
}

/// Two processes with one `OUTBOX_WORKER_ID` at once, one of them losing its claim: the
/// first holds its first batch (its projection paused by a fail point) past a lease it
/// cannot extend, the second, started while it holds it, reclaims those rows and projects
/// them, and the first's completion, when it comes, is refused by the claim token. Every
/// event ends with one entry and one done delivery.
#[test]
fn two_processes_sharing_a_worker_id_never_process_a_row_twice() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 20_000);
    let spawn = |concurrency: &str, env: &[(&str, &str)]| {
        let mut cmd = worker_cmd(&db, &["--until-empty", "--concurrency", concurrency, "--batch-size", "25"]);
        cmd.env("OUTBOX_WORKER_ID", "same").stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    };
    // A lease of 1 s that its keeper cannot extend past 1 s after the claim, a pause of
    // 10 s in its first projection, and no reclaim of its own after the first turn.
    let first = spawn(
        "1",
        &[
            ("OUTBOX_LEASE_SECONDS", "1"),
            ("OUTBOX_MAX_PROCESSING_SECONDS", "1"),
            ("OUTBOX_RECLAIM_INTERVAL_SECONDS", "3600"),
            ("FAILPOINTS", "project=1*sleep(10000)"),
        ],
    );
    wait_until(Duration::from_secs(60), "the first process to hold its first batch", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing'") > 0
    });
    let second = spawn("4", &[("OUTBOX_RECLAIM_INTERVAL_SECONDS", "0.2")]);
    let (first, second) = (first.wait_with_output().unwrap(), second.wait_with_output().unwrap());
    let (first_log, second_log) = (String::from_utf8_lossy(&first.stderr), String::from_utf8_lossy(&second.stderr));
    assert!(first.status.success(), "{first_log}");
    assert!(second.status.success(), "{second_log}");
    assert!(second_log.contains("reclaimed "), "the second process reclaimed the first's batch: {second_log}");
    assert!(
        first_log.contains("lost the claim on "),
        "the first process's completion of the batch it lost was refused: {first_log}"
    );
    assert_fully_projected(&mut c);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events"), 20_000, "one delivery per event");
    assert!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE reclaims > 0") > 0);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts <> 1 AND reclaims = 0"),
        0,
        "only the rows taken over were claimed twice"
    );
}

/// The run ends by itself once `OUTBOX_RUN_SECONDS` have passed, not before, and exits 0.
/// (Not after: `worker_cmd`'s own limit is 300 s, and the bound below is far under it.)
#[test]
fn outbox_run_seconds_exits_0_in_time() {
    let db = TestDb::new();
    let started = Instant::now();
    let r = run(worker_cmd(&db, &[]).env("OUTBOX_RUN_SECONDS", "2"));
    let took = started.elapsed();
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stderr.contains("OUTBOX_RUN_SECONDS reached: stopping"), "{r}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(60), "took {took:?}");
}

/// While a claim thread drains a backlog, each claim starts where its previous one did
/// (the pending index is not walked again from its start); a row that goes back to
/// `pending` below that point, here by a replay, is still claimed within a second, not
/// only once the backlog is gone.
#[cfg(unix)]
#[test]
fn a_row_replayed_behind_a_draining_backlog_is_projected_before_the_backlog_ends() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 30_000);
    c.batch_execute(
        "UPDATE chronicle_outbox_events SET status = 'failed', error_reason = 'rejected_by_read_model', error = 'test'
         WHERE id IN (SELECT id FROM chronicle_outbox_events ORDER BY id LIMIT 5)",
    )
    .unwrap();
    let child = worker_cmd(&db, &["--batch-size", "10", "--concurrency", "1"]).stderr(Stdio::piped()).spawn().unwrap();
    wait_until(Duration::from_secs(60), "the drain to be under way", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'") >= 500
    });
    let r = run(&mut db.chronicle(&["replay-failed", "--by", "test", "--reason", "fixed", "--limit", "5"]));
    assert_eq!(r.code, Some(0), "{r}");
    let replayed_at = Instant::now();
    wait_until(Duration::from_secs(60), "the replayed rows to be done", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE replay_count = 1 AND status = 'done'") == 5
    });
    let waited = replayed_at.elapsed();
    let pending = count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'");
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        pending > 0,
        "the replayed rows were projected only after the backlog was drained ({waited:?} after the replay): {log}"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_entries e JOIN chronicle_outbox_events o ON o.event_id = e.id WHERE o.replay_count = 1"),
        5
    );
}

#[cfg(unix)]
#[test]
fn sigterm_releases_claimed_rows_and_gives_their_attempt_back() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 30);
    let mut locker = db.client();
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE chronicle_entries IN ACCESS EXCLUSIVE MODE").unwrap();
    let child = worker_cmd(&db, &["--batch-size", "10"]).stderr(Stdio::piped()).spawn().unwrap();
    // Each claim thread (two per CPU by default, at most 4) holds a batch of 10, blocked on the lock.
    wait_until(Duration::from_secs(20), "a batch to be claimed", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing'") >= 10
    });
    let signalled = Instant::now();
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(signalled.elapsed() < Duration::from_secs(15), "took {:?}, more than the lease", signalled.elapsed());
    tx.rollback().unwrap();
    let states: Vec<(String, i32, i64)> = c
        .query("SELECT status, attempts, count(*) FROM chronicle_outbox_events GROUP BY 1, 2 ORDER BY 1, 2", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(states, [("pending".to_string(), 0, 30)], "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 0);
}

/// Shutdown wakes the listener through its own channel: it stops on that notification,
/// not at the end of its wait for the next one, so an idle worker's exit is not held up.
#[cfg(unix)]
#[test]
fn a_stopping_worker_wakes_its_listener_on_its_own_channel() {
    let db = TestDb::new();
    let mut c = db.client();
    let child = worker_cmd(&db, &[]).env("RUST_LOG", "chronicle=debug").stderr(Stdio::piped()).spawn().unwrap();
    wait_until(Duration::from_secs(20), "the listener to listen on its own channel", || {
        count(
            &mut c,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND query LIKE 'LISTEN chronicle_outbox; LISTEN \"chronicle_stop_%'",
        ) == 1
    });
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("listener: stopping on the worker's shutdown notification"), "{stderr}");
}

/// A stop in the middle of a drain (every claim thread between a claim and its completion,
/// or anywhere else) leaves every row done (its entry written, one attempt) or pending with
/// no attempt spent, and none processing; the next worker finishes the rest.
#[cfg(unix)]
#[test]
fn sigterm_mid_drain_leaves_no_row_processing_and_spends_no_attempt() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 20_000);
    let child = worker_cmd(&db, &["--batch-size", "50"]).stderr(Stdio::piped()).spawn().unwrap();
    wait_until(Duration::from_secs(60), "the worker to be mid-drain", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'") > 1000
    });
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = outbox_by_status(&mut c);
    let done = count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done' AND attempts = 1");
    let pending =
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending' AND attempts = 0");
    assert!(pending > 0, "the stop came too late to test anything: {summary:?}");
    assert_eq!(done + pending, 20_000, "{summary:?}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), done, "one entry per done row");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM chronicle_outbox_events o WHERE o.status = 'done'
             AND NOT EXISTS (SELECT 1 FROM chronicle_entries n WHERE n.id = o.event_id)"
        ),
        0
    );
    let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "50"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_fully_projected(&mut c);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts <> 1"), 0);
}

#[cfg(unix)]
#[test]
fn the_worker_survives_its_connections_being_terminated() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 30_000);
    let mut child =
        worker_cmd(&db, &["--batch-size", "100", "--concurrency", "2"]).stderr(Stdio::null()).spawn().unwrap();
    let mut killed = 0;
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        killed += count(
            &mut c,
            &format!(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = '{}' AND application_name LIKE 'chronicle worker%'",
                db.name
            ),
        );
    }
    assert!(killed >= 3, "only {killed} connections were cut");
    wait_until(Duration::from_secs(90), "the drain to finish", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'") == 0
    });
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    assert_fully_projected(&mut c);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed'"), 0);
}

#[cfg(unix)]
#[test]
fn a_worker_started_before_the_database_is_reachable_starts_working_when_it_is() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 100);
    let port = crate::util::free_port();
    let _proxy = crate::util::Proxy::start_later(port, Duration::from_secs(2), &db.server);
    let url = format!("postgresql://{}@127.0.0.1:{port}/{}", db.server.user, db.name);
    let mut child = worker_cmd(&db, &[]).env("DATABASE_URL", &url).stderr(Stdio::null()).spawn().unwrap();
    wait_until(Duration::from_secs(30), "the drain through the late database", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'") == 100
    });
    assert!(child.try_wait().unwrap().is_none(), "the worker exited");
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
}

#[test]
fn an_older_projection_version_does_not_overwrite_a_newer_entry() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 3);
    // A newer projector already wrote one of these entries.
    c.batch_execute(
        "INSERT INTO chronicle_entries (id, library_id, entity_type, entity_id, event_type, occurred_at, created_at,
                                        summary, search, projection_version)
         SELECT id, library_id, entity_type, entity_id, event_type, occurred_at, created_at,
                'written by v99', to_tsvector('simple', 'x'), 99
         FROM chronicle_events ORDER BY id LIMIT 1",
    )
    .unwrap();
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_fully_projected(&mut c);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM chronicle_entries WHERE summary = 'written by v99' AND projection_version = 99"
        ),
        1
    );
    let ours = format!(
        "SELECT count(*) FROM chronicle_entries WHERE projection_version = {}",
        chronicle::projection::PROJECTION_VERSION
    );
    assert_eq!(count(&mut c, &ours), 2);
}

#[test]
fn changed_field_names_and_search_tokens_reach_the_entry_exactly() {
    let db = TestDb::new();
    let mut c = db.client();
    // Payload keys are free text: quotes, backslashes, braces, commas, spaces, the word
    // NULL, an empty key and non-ASCII must come back as the projector listed them.
    let keys = ["", " spaced ", "NULL", "a,b", "q\"uote", "back\\slash", "{brace}", "标题", "x²"];
    let diff: serde_json::Map<String, serde_json::Value> =
        keys.iter().map(|k| (k.to_string(), serde_json::json!(1))).collect();
    let title = "Ünïcode x² naïve 分布式系统 v1.2 e-mail\u{301}";
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, diff, occurred_at)
         VALUES (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                 '{\"title\": \"Old\"}', $1, $2, now())",
        &[&serde_json::json!({ "title": title }), &serde_json::Value::Object(diff)],
    )
    .unwrap();
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_fully_projected(&mut c);
    let event = c.query_one(&format!("SELECT {} FROM chronicle_events", chronicle::event::EVENT_COLUMNS), &[]).unwrap();
    let event = chronicle::event::read_event(&event, 0).unwrap().unwrap();
    let expected = chronicle::projection::project(&event).unwrap();
    let row = c
        .query_one("SELECT changed_fields, array_to_string(tsvector_to_array(search), ' ') FROM chronicle_entries", &[])
        .unwrap();
    assert_eq!(row.get::<_, Vec<String>>(0), expected.changed_fields.to_vec());
    let mut tokens: Vec<&str> = expected.search_text.split(' ').filter(|t| !t.is_empty()).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let stored_text: String = row.get(1);
    let mut stored: Vec<&str> = stored_text.split(' ').collect();
    stored.sort_unstable();
    assert_eq!(stored, tokens, "the search column holds the projector's tokens, no more, no less");
    for term in ["x²", "naïve", "分布", "系统", "ÜNÏCODE", "V1"] {
        let q = chronicle::timeline::search_tsquery(term).unwrap();
        let sql =
            format!("SELECT count(*) FROM chronicle_entries WHERE search @@ '{}'::tsquery", q.replace('\'', "''"));
        assert_eq!(count(&mut c, &sql), 1, "{term} as {q}");
    }
}

#[test]
fn a_worker_refuses_an_unmigrated_or_newer_schema() {
    let db = TestDb::empty();
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("chronicle migrate"), "{r}");
    let db = TestDb::new();
    db.client()
        .batch_execute("INSERT INTO chronicle_schema_migrations (version, name, checksum, duration_ms) VALUES (99, 'future', 'x', 0)")
        .unwrap();
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("upgrade chronicle"), "{r}");
}

#[cfg(unix)]
#[test]
fn an_idle_worker_wakes_on_notify_and_not_only_by_polling() {
    use std::io::BufRead;
    let db = TestDb::new();
    let mut c = db.client();
    // Idle claim threads poll every 300 s: anything sooner is the listener's doing.
    for listen in ["on", "off"] {
        let mut child = worker_cmd(&db, &["--concurrency", "2"])
            .env("OUTBOX_POLL_INTERVAL_SECONDS", "300")
            .env("OUTBOX_LISTEN", listen)
            .env("RUST_LOG", "chronicle::worker::claim=trace")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Both claim threads have claimed once, found nothing, and gone idle for 300 s.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("nothing ready to claim") {
                    let _ = tx.send(());
                }
            }
        });
        for thread in 1..=2 {
            rx.recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("claim thread {thread} never went idle"));
        }
        let inserted = Instant::now();
        insert_events(&mut c, 5);
        let mut not_done = || count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'");
        if listen == "on" {
            // Well before the idle threads' poll could have found them.
            wait_until(Duration::from_secs(120), "the rows notified to be projected", || not_done() == 0);
            eprintln!("notified rows projected {:?} after their insert", inserted.elapsed());
        } else {
            // Nothing wakes the idle threads: whatever the machine's speed, nothing is done
            // in the first seconds of their 300 s wait.
            std::thread::sleep(Duration::from_secs(3));
            assert_eq!(not_done(), 5, "OUTBOX_LISTEN=off: rows projected before the idle poll");
        }
        signal(child.id(), "TERM");
        assert!(child.wait().unwrap().success());
        // Leave nothing for the next round.
        run(&mut worker_cmd(&db, &["--until-empty"]));
    }
}

#[cfg(unix)]
#[test]
fn healthcheck_probes_a_running_worker() {
    let db = TestDb::new();
    let port = crate::util::free_port().to_string();
    let probe = |extra: &[&str]| {
        let mut args = vec!["healthcheck"];
        args.extend_from_slice(extra);
        run(crate::util::chronicle_cmd(&args).env("OUTBOX_METRICS_PORT", &port))
    };
    let r = probe(&["--timeout", "1s"]);
    assert_eq!(r.code, Some(1), "nothing listens yet: {r}");
    let mut child = worker_cmd(&db, &[]).env("OUTBOX_METRICS_PORT", &port).stderr(Stdio::null()).spawn().unwrap();
    wait_until(Duration::from_secs(20), "the worker's /healthz", || probe(&[]).code == Some(0));
    wait_until(Duration::from_secs(20), "the worker's /readyz", || probe(&["--ready"]).code == Some(0));
    assert!(probe(&[]).stdout.contains("healthy"));
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    assert_eq!(probe(&["--timeout", "1s"]).code, Some(1));
    let r = run(crate::util::chronicle_cmd(&["healthcheck"]).env("OUTBOX_METRICS_PORT", "0"));
    assert_eq!(r.code, Some(2), "{r}");
}

/// The exit line says what really happened: the rate while there was work (not over the
/// whole run) and the backlog read at exit (rows released at shutdown are pending again).
#[test]
fn the_exit_line_reports_the_drain_rate_and_the_backlog_at_exit() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 500);
    let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "100"]));
    assert_eq!(r.code, Some(0), "{r}");
    let last = r.stderr.lines().rev().find(|l| l.contains("processed ")).unwrap_or_default().to_string();
    assert!(last.contains("processed 500 in ") && last.contains(" s of work ("), "{last}");
    assert!(last.contains("backlog now: 0 pending, 0 processing"), "{last}");

    // A batch that cannot complete (the read model is locked) is released at exit: all 30
    // rows are pending again, which the exit line reads from the database.
    insert_events(&mut c, 30);
    let mut locker = db.client();
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE chronicle_entries IN ACCESS EXCLUSIVE MODE").unwrap();
    let r =
        run(worker_cmd(&db, &["--batch-size", "10"]).env("OUTBOX_RUN_SECONDS", "1").env("OUTBOX_LEASE_SECONDS", "3"));
    tx.rollback().unwrap();
    assert_eq!(r.code, Some(0), "{r}");
    let last = r.stderr.lines().rev().find(|l| l.contains("processed ")).unwrap_or_default().to_string();
    assert!(last.contains("processed 0;") && last.contains("backlog now: 30 pending, 0 processing"), "{last}\n{r}");
}

/// Lag as the runbook means it (pending + processing), and the projection latency from
/// the delivery's enqueueing, so backdated events (a backfill, `inject`) give real
/// figures instead of falling in +Inf.
#[cfg(unix)]
#[test]
fn lag_counts_pending_and_processing_and_latency_starts_at_enqueueing() {
    use crate::util::{http_get, metric_sum};
    let db = TestDb::new();
    let mut c = db.client();
    // Written a year ago, as far as the events say.
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at, created_at)
         SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                '{\"title\": \"a\"}', '{\"title\": \"b\"}', now() - interval '1 year', now() - interval '1 year'
         FROM generate_series(1, 30)",
    )
    .unwrap();
    let mut locker = db.client();
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE chronicle_entries IN ACCESS EXCLUSIVE MODE").unwrap();
    let port = crate::util::free_port();
    // Two claim threads, each holding a batch of 10 behind the lock: 20 in flight, 10 pending.
    let mut child = worker_cmd(&db, &["--batch-size", "10", "--concurrency", "2"])
        .env("OUTBOX_METRICS_PORT", port.to_string())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let scrape = || http_get(port, "/metrics").unwrap_or_default();
    wait_until(Duration::from_secs(30), "lag 30 with 20 rows in flight", || {
        let m = scrape();
        metric_sum(&m, "chronicle_outbox_lag_events") == 30.0
            && metric_sum(&m, "chronicle_outbox_inflight_events") == 20.0
    });
    tx.rollback().unwrap();
    wait_until(Duration::from_secs(30), "the drain and lag 0", || {
        let m = scrape();
        metric_sum(&m, "chronicle_outbox_processed_total") == 30.0
            && metric_sum(&m, "chronicle_outbox_lag_events") == 0.0
    });
    let m = scrape();
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    let count = metric_sum(&m, "chronicle_projection_latency_seconds_count");
    let within_5m = m
        .lines()
        .find(|l| l.starts_with("chronicle_projection_latency_seconds_bucket") && l.contains("le=\"300\""))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse::<f64>().ok());
    assert_eq!(count, 30.0, "{m}");
    assert_eq!(within_5m, Some(30.0), "events written 'a year ago' were enqueued seconds ago:\n{m}");
}

/// One turn of a background service, in this process, without starting a worker: the
/// reclaim loop returns a row whose lease expired to pending, keeping its attempt, and
/// counts it, and only that; the analyze service gives the outbox its statistics.
#[test]
fn one_turn_of_the_reclaim_loop_runs_in_process() {
    use chronicle::config::{Env, Sources, WorkerConfig};
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 3);
    c.batch_execute(
        "UPDATE chronicle_outbox_events
         SET status = 'processing', attempts = 1, claim_token = gen_random_uuid(), claimed_by = 'gone',
             claimed_at = now() - interval '1 minute', lease_until = now() - interval '1 second'
         WHERE id = (SELECT min(id) FROM chronicle_outbox_events)",
    )
    .unwrap();
    let url = db.url();
    let env = Env::from_pairs([("DATABASE_URL", url.as_str())]);
    let cfg = WorkerConfig::resolve(&Sources::new(&env)).unwrap();
    let shared = chronicle::worker::Shared::new(cfg);
    let pool = chronicle::db::pool(&shared.cfg.database_url, 1, shared.refusals.clone()).unwrap();
    chronicle::worker::reclaim_once(&shared, &pool);
    assert_eq!(chronicle::metrics::Metrics::get(&shared.metrics.reclaimed), 1);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending' AND attempts = 1"),
        1,
        "reclaimed to pending, its attempt kept"
    );
    chronicle::worker::reclaim_once(&shared, &pool);
    assert_eq!(chronicle::metrics::Metrics::get(&shared.metrics.reclaimed), 1, "nothing more to reclaim");
    let analyzed = "SELECT count(*) FROM pg_class WHERE oid = 'chronicle_outbox_events'::regclass AND reltuples >= 0";
    assert_eq!(count(&mut c, analyzed), 0, "the reclaim loop does not analyze");
    // The outbox had rows and no statistics: the analyze service's turn gave it its first
    // ANALYZE.
    chronicle::worker::analyze_once(&shared, &pool);
    assert_eq!(count(&mut c, analyzed), 1, "the outbox analyzed");
}

/// The search index's pending list, in bytes, by pgstattuple's `pgstatginindex`.
fn search_pending_list_bytes(c: &mut postgres::Client) -> i64 {
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        .expect("pgstattuple (shipped with PostgreSQL's contrib modules) reads the search index's pending list");
    count(c, "SELECT pending_pages::bigint * current_setting('block_size')::bigint FROM pgstatginindex('chronicle_entries_search_idx')")
}

#[test]
fn a_drained_backlog_merges_the_search_index_in_long_runs_and_a_trickle_in_short_ones() {
    let db = TestDb::new();
    let mut c = db.client();
    // Which pending list limit each write into the read model ran under. Autovacuum
    // (which merges a pending list whenever it passes, an ANALYZE of its included) is kept
    // off the read model, so the lists measured below are the ones the drains left, however
    // long they took.
    c.batch_execute(
        "ALTER TABLE chronicle_entries SET (autovacuum_enabled = false);
         CREATE TABLE limits_seen (lim text);
         CREATE FUNCTION note_limit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO limits_seen VALUES (current_setting('gin_pending_list_limit')); RETURN NULL; END $$;
         CREATE TRIGGER note_limit AFTER INSERT ON chronicle_entries
             FOR EACH STATEMENT EXECUTE FUNCTION note_limit();",
    )
    .unwrap();
    let limits_seen = |c: &mut postgres::Client| -> Vec<(String, i64)> {
        c.query("SELECT lim, count(*) FROM limits_seen GROUP BY lim ORDER BY lim", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    // Drains what is pending with one claim thread, claims of 100; returns the limits seen.
    let drain = |c: &mut postgres::Client| {
        c.batch_execute("TRUNCATE limits_seen").unwrap();
        let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "100", "--concurrency", "1"]));
        assert_eq!(r.code, Some(0), "{r}");
        assert_fully_projected(c);
        limits_seen(c)
    };
    // A backlog of 20 full claims: about 700 kB of search index entries, more than the
    // pending list a trickle keeps (256 kB), less than the one a backlog lets grow (4 MB).
    insert_events(&mut c, 2000);
    assert_eq!(drain(&mut c), [("4MB".to_string(), 20)], "every full claim's entries under 4 MB");
    let after_backlog = search_pending_list_bytes(&mut c);
    assert!(
        after_backlog > 256 * 1024,
        "full claims let the pending list grow past 256 kB before it is merged; it holds {after_backlog} bytes"
    );

    let library = insert_events(&mut c, 1);
    assert_eq!(drain(&mut c), [("256kB".to_string(), 1)], "a short claim's entry under 256 kB");
    let after_trickle = search_pending_list_bytes(&mut c);
    assert!(
        after_trickle < 256 * 1024,
        "a claim short of a full batch merges a pending list past 256 kB; it holds {after_trickle} bytes"
    );
    // Whichever way an entry reached the index, the search finds it.
    let q = chronicle::timeline::search_tsquery("旧标题").unwrap();
    let found = |c: &mut postgres::Client, library: Option<uuid::Uuid>| {
        let row = c
            .query_one(
                "SELECT count(*) FROM chronicle_entries WHERE search @@ $1::text::tsquery
                   AND ($2::uuid IS NULL OR library_id = $2)",
                &[&q, &library],
            )
            .unwrap();
        row.get::<_, i64>(0)
    };
    assert_eq!(found(&mut c, None), 2001);
    assert_eq!(found(&mut c, Some(library)), 1);
}

#[test]
fn a_backlog_batch_is_claimed_by_the_transaction_that_completes_the_batch_before_it() {
    let db = TestDb::new();
    let mut c = db.client();
    // The transaction of each claim and of each completion, as the outbox rows change state.
    c.batch_execute(
        "CREATE TABLE transitions (xid bigint, id bigint, status text);
         CREATE FUNCTION note_transition() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO transitions VALUES (txid_current(), NEW.id, NEW.status); RETURN NULL; END $$;
         CREATE TRIGGER note_transition AFTER UPDATE OF status ON chronicle_outbox_events
             FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION note_transition();",
    )
    .unwrap();
    insert_events(&mut c, 500);
    let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "100", "--concurrency", "1"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_fully_projected(&mut c);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts <> 1"), 0, "one claim each");
    // Per claim, in order: its transaction, the transaction that completed it, and the
    // batch's claimed_at and processed_at.
    type Batch = (i64, i64, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>);
    let batches: Vec<Batch> = c
        .query(
            "SELECT p.xid, min(d.xid), min(o.claimed_at), max(o.processed_at)
             FROM transitions p JOIN transitions d ON d.id = p.id AND d.status = 'done'
             JOIN chronicle_outbox_events o ON o.id = p.id
             WHERE p.status = 'processing' GROUP BY p.xid ORDER BY min(o.claimed_at)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(batches.len(), 5, "five claims of 100: {batches:?}");
    for pair in batches.windows(2) {
        let (before, next) = (&pair[0], &pair[1]);
        assert_eq!(next.0, before.1, "claimed by the transaction that completed the batch before: {batches:?}");
        // The lease of a claim counts from its own statement, which comes after the start
        // of that transaction (processed_at).
        assert!(next.2 >= before.3, "claimed after the completing transaction began: {batches:?}");
    }
}

/// A completion slowed past the lease commits a chained claim whose lease starts at the
/// claim's own statement: the rows it claims are not taken back by the reclaim loop, and
/// no attempt is spent on them.
#[test]
fn a_chained_claim_after_a_slow_completion_keeps_its_whole_lease() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 30);
    // The first completion sleeps 3 s inside its transaction, longer than the 2 s lease,
    // before it claims the second batch; the reclaim loop looks every 0.1 s.
    let r = run(worker_cmd(&db, &["--until-empty", "--batch-size", "10", "--concurrency", "1"])
        .env("OUTBOX_LEASE_SECONDS", "2")
        .env("OUTBOX_RECLAIM_INTERVAL_SECONDS", "0.1")
        .env("FAILPOINTS", "complete=1*sleep(3000)"));
    assert_eq!(r.code, Some(0), "{r}");
    assert_fully_projected(&mut c);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts <> 1 OR reclaims <> 0"),
        0,
        "nothing reclaimed, one attempt each: {}",
        r.stderr
    );
    assert!(!r.stderr.contains("stuck row"), "{r}");
    // The second batch was claimed 3 s into the transaction that completed the first
    // (whose processed_at is that transaction's start): its lease began then.
    let gap: f64 = c
        .query_one(
            "SELECT extract(epoch FROM
                 (SELECT min(claimed_at) FROM (SELECT claimed_at FROM chronicle_outbox_events ORDER BY id OFFSET 10 LIMIT 10) b)
                 - (SELECT max(processed_at) FROM (SELECT processed_at FROM chronicle_outbox_events ORDER BY id LIMIT 10) a))::float8",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(gap >= 2.9, "the second batch's lease started {gap:.2} s after the first batch's completion began");
}

/// A completion that finds half of its batch taken by another worker while it projected
/// settles the half it still holds in the same turn (the deterministic failures among
/// them included) instead of leaving it to the lease, and counts only the other half as
/// lost.
#[cfg(unix)]
#[test]
fn a_completion_that_lost_half_its_batch_settles_the_other_half_in_the_same_turn() {
    let db = TestDb::new();
    let mut c = db.client();
    // The read model refuses summaries with "REFUSE": the batch's completion meets a
    // deterministic error and completes entry by entry.
    c.batch_execute("ALTER TABLE chronicle_entries ADD CONSTRAINT no_refuse CHECK (summary NOT LIKE '%REFUSE%')")
        .unwrap();
    insert_events(&mut c, 8);
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at) VALUES
         (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed', '{\"title\": 5}', '{\"title\": \"x\"}', now()),
         (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed', '{\"title\": \"a\"}', '{\"title\": \"REFUSE\"}', now())",
    )
    .unwrap();
    // The first projection of the batch takes 3 s: time for another worker to take five
    // of its rows (after their lease, as far as this test is concerned).
    let child = worker_cmd(&db, &["--batch-size", "10", "--concurrency", "1"])
        .env("FAILPOINTS", "project=1*sleep(3000)")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "the batch to be claimed", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing'") == 10
    });
    let taken = c
        .execute(
            "UPDATE chronicle_outbox_events
             SET claim_token = gen_random_uuid(), claimed_by = 'other', claimed_at = now(),
                 lease_until = now() + interval '1 hour'
             WHERE id IN (SELECT o.id FROM chronicle_outbox_events o JOIN chronicle_events e ON e.id = o.event_id
                          WHERE e.after->>'title' LIKE 'Title %' ORDER BY o.id LIMIT 5)",
            &[],
        )
        .unwrap();
    assert_eq!(taken, 5);
    // Settled by the completion itself, well within the 30 s lease.
    wait_until(Duration::from_secs(20), "the rows still held to be settled", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status IN ('done', 'failed')") == 5
    });
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let by = outbox_by_status(&mut c);
    assert_eq!(
        by,
        [
            ("done".to_string(), 3),
            ("failed/invalid_payload".to_string(), 1),
            ("failed/rejected_by_read_model".to_string(), 1),
            ("processing".to_string(), 5)
        ]
        .into(),
        "{log}"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing' AND claimed_by = 'other'"
        ),
        5,
        "the rows taken are left to their new holder"
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts <> 1 OR reclaims <> 0"),
        0,
        "one claim each, nothing reclaimed"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 3);
    assert!(log.contains("lost the claim on 5 row(s)"), "{log}");
}

#[test]
fn an_event_that_is_not_utf8_in_a_sql_ascii_database_fails_alone() {
    let db = TestDb::sql_ascii();
    db.apply_migrations_unchecked();
    let mut c = db.client();
    insert_events(&mut c, 5);
    // SQL_ASCII takes any byte: one event's title, and another's request id, are not UTF-8.
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
         VALUES ('00000000-0000-7000-8000-000000000001', gen_random_uuid(), 'book', gen_random_uuid(),
                 'BookRenamed', '{\"title\": \"a\"}', E'{\"title\": \"caf\\xe9\"}', now());
         INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at, request_id)
         VALUES ('00000000-0000-7000-8000-000000000002', gen_random_uuid(), 'book', gen_random_uuid(),
                 'BookCreated', '{\"title\": \"b\"}', now(), E'req-\\xff');",
    )
    .unwrap();
    insert_events(&mut c, 5);
    let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "50"]));
    assert_eq!(r.code, Some(0), "{r}");
    let failed: Vec<(String, String, i32)> = c
        .query(
            "SELECT event_id::text, error_reason, attempts FROM chronicle_outbox_events WHERE status = 'failed'
             ORDER BY event_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        failed,
        vec![
            ("00000000-0000-7000-8000-000000000001".into(), "invalid_payload".into(), 1),
            ("00000000-0000-7000-8000-000000000002".into(), "invalid_payload".into(), 1),
        ],
        "{r}"
    );
    assert_eq!(outbox_by_status(&mut c).get("done"), Some(&10), "the good events are projected: {r}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 10);
    let s = run(&mut db.chronicle(&["status", "--json"]));
    assert!(s.stdout.contains("invalid_payload"), "status shows the failures: {s}");
}

/// Any role may notify the outbox channel. A flood of notifications with nothing to claim
/// costs each claim thread about one claim per poll interval (as polling alone does), not
/// one per notification; and a row written after the flood is still projected at once.
#[cfg(unix)]
#[test]
fn a_flood_of_notifications_costs_about_one_claim_per_thread_per_poll_interval() {
    use crate::util::{signal, Cluster};
    // pg_stat_statements counts the claim statement's executions as they happen.
    let cluster = Cluster::start(&["fsync=off", "shared_preload_libraries=pg_stat_statements"])
        .unwrap_or_else(|e| panic!("starting a throwaway cluster: {e}"));
    let db = TestDb::empty_on(&cluster.server);
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(0), "{r}");
    let mut c = db.client();
    c.batch_execute("CREATE EXTENSION pg_stat_statements").unwrap();
    let claims = |c: &mut postgres::Client| {
        count(c, "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements WHERE query LIKE '%WITH lead AS%'")
    };
    let (threads, poll) = (2u32, Duration::from_millis(500));
    let child = worker_cmd(&db, &["--concurrency", &threads.to_string()])
        .env("OUTBOX_POLL_INTERVAL_SECONDS", "0.5")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "the worker to listen and to claim", || {
        count(&mut c, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN chronicle_outbox%'") == 1
            && claims(&mut c) >= i64::from(threads)
    });

    let started = Instant::now();
    let before = claims(&mut c);
    for _ in 0..5_000 {
        c.batch_execute("NOTIFY chronicle_outbox").unwrap();
    }
    let (after, elapsed) = (claims(&mut c), started.elapsed());
    let polls = elapsed.as_secs_f64() / poll.as_secs_f64();
    let allowed = (f64::from(threads) * (polls + 3.0)).ceil() as i64;
    let made = after - before;

    // Work behind the flood is not held up by it.
    insert_events(&mut c, 3);
    let inserted = Instant::now();
    wait_until(Duration::from_secs(20), "the events to be projected", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'") == 3
    });
    let latency = inserted.elapsed();
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        made <= allowed,
        "5,000 notifications in {elapsed:?} made {made} claims; at most {allowed} expected \
         ({threads} threads, poll interval {poll:?})"
    );
    assert!(latency < poll * 4, "projected {latency:?} after the insert");
}
