//! Nothing waits forever on the network: `connect_timeout` bounds the whole connection
//! (the startup exchange with a server that accepts and never answers included), a worker
//! stops on time and on SIGTERM while the network is silent, resumes without loss when it
//! answers again, and a shutdown cancels each claim thread's statement on its current
//! connection only, however often it reconnected.

#![cfg_attr(not(unix), allow(unused_imports, dead_code))] // Unix-only tests are marked #[cfg(unix)]

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

#[cfg(unix)]
use crate::util::signal;
use crate::util::{
    assert_fully_projected, chronicle_cmd, count, insert_events, run, wait_until, worker_cmd, PausableProxy,
    SilentServer, TestDb,
};

/// Waits for `child` to exit; its exit code and how long it took from `since`.
fn exit_of(child: &mut Child, within: Duration, since: Instant) -> (Option<i32>, Duration) {
    wait_until(within, "the worker to exit", || child.try_wait().unwrap().is_some());
    (child.wait().unwrap().code(), since.elapsed())
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

#[test]
fn one_shot_commands_against_a_server_that_never_answers_exit_3_within_connect_timeout() {
    let silent = SilentServer::start();
    for (args, url, at_least, at_most) in [
        (&["status"][..], silent.url("&connect_timeout=2"), 1.9, 3.5),
        (&["migrate", "--wait", "3s"][..], silent.url("&connect_timeout=2"), 2.9, 4.5),
        // Unset, connect_timeout is 10 s, as the documentation says.
        (&["status"][..], silent.url(""), 9.9, 12.0),
    ] {
        let started = Instant::now();
        let r = run(chronicle_cmd(args).env("DATABASE_URL", &url));
        let took = started.elapsed().as_secs_f64();
        eprintln!("silent server: chronicle {args:?} with {url}: exit {:?} after {took:.2} s", r.code);
        assert_eq!(r.code, Some(3), "{args:?} {url}: {r}");
        assert!(took >= at_least && took <= at_most, "{args:?} {url}: took {took:.1} s: {r}");
        assert!(r.stderr.contains("was not complete after"), "{args:?} {url}: the reason is not said: {r}");
    }
    assert!(silent.accepted() >= 3, "the commands never reached the silent server");
}

/// A worker waiting for a server that accepts and never answers ends with its run time
/// (exit 3: nothing ran) and at SIGTERM within a second, bounded run or not.
#[cfg(unix)]
#[test]
fn a_worker_waiting_on_a_server_that_never_answers_stops_on_time_and_on_sigterm() {
    let silent = SilentServer::start();
    let started = Instant::now();
    let r = run(chronicle_cmd(&["worker"])
        .env("DATABASE_URL", silent.url(""))
        .env("OUTBOX_METRICS_PORT", "0")
        .env("OUTBOX_RUN_SECONDS", "2"));
    let took = started.elapsed();
    eprintln!("silent server: worker with OUTBOX_RUN_SECONDS=2: exit {:?} after {took:?}", r.code);
    assert_eq!(r.code, Some(3), "{r}");
    assert!(took < Duration::from_millis(3000), "OUTBOX_RUN_SECONDS=2 took {took:?}: {r}");
    assert!(r.stderr.contains("nothing was projected"), "{r}");

    for (run_seconds, code) in [(Some("300"), 3), (None, 0)] {
        let mut cmd = chronicle_cmd(&["worker"]);
        cmd.env("DATABASE_URL", silent.url("")).env("OUTBOX_METRICS_PORT", "0").stderr(Stdio::piped());
        if let Some(s) = run_seconds {
            cmd.env("OUTBOX_RUN_SECONDS", s);
        }
        let before = silent.accepted();
        let mut child = cmd.spawn().unwrap();
        wait_until(Duration::from_secs(10), "the worker to reach the silent server", || silent.accepted() > before);
        let sent = Instant::now();
        signal(child.id(), "TERM");
        let (exit, took) = exit_of(&mut child, Duration::from_secs(10), sent);
        let stderr = stderr_of(&mut child);
        eprintln!("silent server: SIGTERM, OUTBOX_RUN_SECONDS={run_seconds:?}: exit {exit:?} after {took:?}");
        assert_eq!(exit, Some(code), "OUTBOX_RUN_SECONDS={run_seconds:?}:\n{stderr}");
        assert!(took < Duration::from_secs(1), "OUTBOX_RUN_SECONDS={run_seconds:?}: SIGTERM took {took:?}:\n{stderr}");
    }
}

/// A network that stops forwarding mid-run without closing anything (the worker's
/// statements wait on it): after it resumes the worker projects again, nothing lost or
/// twice; while it is silent, SIGTERM and OUTBOX_RUN_SECONDS end the worker within a second.
#[cfg(unix)]
#[test]
fn a_worker_cut_off_by_a_silent_network_resumes_without_loss_and_stops_on_time() {
    let db = TestDb::new();
    let mut c = db.client();
    let proxy = PausableProxy::start(&db.server);
    let mut child = worker_cmd(&db, &["--concurrency", "2", "--batch-size", "50"])
        .env("DATABASE_URL", proxy.url(&db))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    insert_events(&mut c, 200);
    wait_until(Duration::from_secs(30), "the first events to be projected", || {
        count(&mut c, "SELECT count(*) FROM chronicle_entries") == 200
    });

    proxy.pause();
    insert_events(&mut c, 300);
    // The scenario: the network stays silent for a while, the worker's statements waiting.
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "the worker exited while the network was silent");
    proxy.resume();
    wait_until(Duration::from_secs(30), "the worker to project again once the network answers", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'") == 0
    });
    assert_fully_projected(&mut c);

    proxy.pause();
    insert_events(&mut c, 50);
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    signal(child.id(), "TERM");
    let (exit, took) = exit_of(&mut child, Duration::from_secs(20), sent);
    let stderr = stderr_of(&mut child);
    eprintln!("paused proxy: SIGTERM: exit {exit:?} after {took:?}");
    assert_eq!(exit, Some(0), "{stderr}");
    assert!(took < Duration::from_secs(1), "SIGTERM while the network was silent took {took:?}:\n{stderr}");
    proxy.resume();

    // OUTBOX_RUN_SECONDS while silent.
    let started = Instant::now();
    let mut child = worker_cmd(&db, &[])
        .env("DATABASE_URL", proxy.url(&db))
        .env("OUTBOX_RUN_SECONDS", "4")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "the worker to project the rest", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'") == 0
    });
    proxy.pause();
    insert_events(&mut c, 10);
    let (exit, took) = exit_of(&mut child, Duration::from_secs(20), started);
    let stderr = stderr_of(&mut child);
    eprintln!("paused proxy: OUTBOX_RUN_SECONDS=4: exit {exit:?} after {took:?}");
    proxy.resume();
    assert_eq!(exit, Some(0), "{stderr}");
    assert!(
        took < Duration::from_secs(5),
        "OUTBOX_RUN_SECONDS=4 while the network was silent took {took:?}:\n{stderr}"
    );
}

/// Each reconnection of a claim thread replaces its cancel token: after 50 forced
/// reconnections, a shutdown that must interrupt the claim threads' statements opens one
/// cancel connection per claim thread, not one per connection the worker ever had.
#[cfg(unix)]
#[test]
fn a_shutdown_cancels_each_claim_thread_once_however_often_it_reconnected() {
    const CONCURRENCY: usize = 2;
    let db = TestDb::new();
    let mut c = db.client();
    let proxy = PausableProxy::start(&db.server);
    let worker_id = "cancel-test";
    let mut child = worker_cmd(&db, &["--concurrency", &CONCURRENCY.to_string()])
        .env("DATABASE_URL", proxy.url(&db))
        .env("OUTBOX_WORKER_ID", worker_id)
        .env("OUTBOX_LISTEN", "off")
        .env("OUTBOX_LEASE_SECONDS", "3")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let backends = format!(
        "SELECT coalesce(array_agg(pid), '{{}}') FROM pg_stat_activity WHERE application_name = 'chronicle worker {worker_id}' \
         AND datname = current_database()"
    );
    let mut seen = std::collections::HashSet::new();
    wait_until(Duration::from_secs(30), "the claim threads to connect", || {
        let pids: Vec<i32> = c.query_one(&backends, &[]).unwrap().get(0);
        seen.extend(pids.iter().copied());
        pids.len() >= CONCURRENCY
    });
    for round in 0..50 {
        c.execute(
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'chronicle worker {worker_id}' AND datname = current_database()"
            ),
            &[],
        )
        .unwrap();
        wait_until(Duration::from_secs(30), &format!("the worker to reconnect (round {round})"), || {
            let pids: Vec<i32> = c.query_one(&backends, &[]).unwrap().get(0);
            let new = pids.iter().filter(|p| !seen.contains(p)).count();
            if new >= CONCURRENCY {
                seen.extend(pids);
                true
            } else {
                false
            }
        });
    }

    // The claim threads' statements wait on a lock: shutdown has to cancel them.
    let mut locker = db.client();
    locker.batch_execute("BEGIN; LOCK TABLE chronicle_entries IN ACCESS EXCLUSIVE MODE").unwrap();
    insert_events(&mut c, 200);
    wait_until(Duration::from_secs(30), "both claim threads to wait on the lock", || {
        count(
            &mut c,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chronicle worker {worker_id}' \
                 AND datname = current_database() AND wait_event_type = 'Lock'"
            ),
        ) == CONCURRENCY as i64
    });
    let before = proxy.accepted();
    signal(child.id(), "TERM");
    let (exit, _) = exit_of(&mut child, Duration::from_secs(30), Instant::now());
    let stderr = stderr_of(&mut child);
    let opened = proxy.accepted() - before;
    locker.batch_execute("ROLLBACK").unwrap();
    eprintln!("cancel: {opened} connection(s) opened by the shutdown after {} backends seen", seen.len());
    assert_eq!(exit, Some(0), "{stderr}");
    assert!(stderr.contains("interrupting them"), "the shutdown did not have to cancel anything:\n{stderr}");
    assert!(
        opened <= CONCURRENCY + 2,
        "the shutdown opened {opened} connections for {CONCURRENCY} claim threads after {} reconnections:\n{stderr}",
        seen.len()
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing'"),
        0,
        "the interrupted batches were not released"
    );
}
