//! A server that refuses us (wrong credentials, a role that may not log in, an unknown
//! database) is exit 3 at once for a one-shot command, `migrate --wait` included: waiting
//! does not change its answer; so is a bounded worker run (`OUTBOX_RUN_SECONDS`,
//! `--until-empty`) refused at start, or ended before it ever reached its database. An
//! unbounded worker waits instead, as the contract asks of it, but says so as an error
//! an operator sees, answers `/readyz` with 503, and resumes by itself when let in.

#![cfg_attr(not(unix), allow(unused_imports, dead_code))] // Unix-only tests are marked #[cfg(unix)]

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[cfg(unix)]
use crate::util::signal;
use crate::util::{
    chronicle_cmd, count, free_port, http_get, insert_events, metric_sum, run, wait_until, worker_cmd, LoginRole,
    TestDb,
};

/// The same server as `db`, as another role (with the harness's password, if any).
fn url_as(db: &TestDb, user: &str, dbname: &str) -> String {
    let mut server = db.server.clone();
    server.user = user.to_string();
    server.url(dbname)
}

fn refused_urls(db: &TestDb) -> [(&'static str, String, &'static str); 2] {
    [
        ("an unknown database", db.server.url(&format!("{}_missing", db.name)), "SQLSTATE 3D000"),
        ("an unknown role", url_as(db, &format!("{}_nobody", db.name), &db.name), "SQLSTATE 28"),
    ]
}

#[test]
fn a_one_shot_command_refused_by_the_server_exits_3_at_once_even_with_wait() {
    let db = TestDb::new();
    for (what, url, code) in refused_urls(&db) {
        for args in [&["status"][..], &["migrate", "--wait", "60s"][..]] {
            let started = Instant::now();
            let r = run(chronicle_cmd(args).env("DATABASE_URL", &url));
            assert_eq!(r.code, Some(3), "{args:?}, {what}: {r}");
            assert!(started.elapsed() < Duration::from_secs(20), "{args:?}, {what}: waited {:?}", started.elapsed());
            assert!(r.stderr.contains(code), "{args:?}, {what}: the server's reason ({code}) is not shown: {r}");
            assert!(r.stderr.contains("cannot connect to postgresql://"), "{args:?}, {what}: no server named: {r}");
        }
    }
}

/// An unbounded worker waits for a server that refuses it (an operator may be fixing the
/// grant), but logs the refusal as an error once, not once per attempt, and is not ready.
#[cfg(unix)]
#[test]
fn an_unbounded_worker_refused_at_start_waits_and_reports_an_error_once() {
    let db = TestDb::new();
    for (what, url, code) in refused_urls(&db) {
        let port = free_port();
        let mut child = chronicle_cmd(&["worker"])
            .env("DATABASE_URL", &url)
            .env("OUTBOX_METRICS_PORT", port.to_string())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_until(Duration::from_secs(10), "/healthz", || {
            run(chronicle_cmd(&["healthcheck", "--timeout", "1s"]).env("OUTBOX_METRICS_PORT", port.to_string())).code
                == Some(0)
        });
        wait_until(Duration::from_secs(20), "several refused attempts", || {
            http_get(port, "/metrics").is_some_and(|m| metric_sum(&m, "chronicle_outbox_db_errors_total") >= 3.0)
        });
        let ready =
            run(chronicle_cmd(&["healthcheck", "--ready", "--timeout", "1s"])
                .env("OUTBOX_METRICS_PORT", port.to_string()));
        assert_eq!(ready.code, Some(1), "{what}: /readyz must not be ready while refused: {ready}");
        assert!(child.try_wait().unwrap().is_none(), "{what}: an unbounded worker gave up on a refusal");
        signal(child.id(), "TERM");
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{what}: stopped while waiting:\n{stderr}");
        let refusals: Vec<&str> = stderr.lines().filter(|l| l.contains("refuses our connections")).collect();
        assert_eq!(refusals.len(), 1, "{what}: one error line, not one per attempt:\n{stderr}");
        assert!(refusals[0].contains("ERROR") && refusals[0].contains(code), "{what}: {}", refusals[0]);
    }
}

/// A bounded run (`OUTBOX_RUN_SECONDS`, `--until-empty`) refused at start exits 3 at once:
/// the server will not change its mind before the run ends, and a smoke run must not
/// pass without having run.
#[test]
fn a_bounded_run_refused_at_start_exits_3_at_once() {
    let db = TestDb::new();
    for (what, url, code) in refused_urls(&db) {
        for (args, run_seconds) in [(&["worker"][..], Some("60")), (&["worker", "--until-empty"][..], None)] {
            let mut cmd = chronicle_cmd(args);
            cmd.env("DATABASE_URL", &url).env("OUTBOX_METRICS_PORT", "0");
            if let Some(s) = run_seconds {
                cmd.env("OUTBOX_RUN_SECONDS", s);
            }
            let started = Instant::now();
            let r = run(&mut cmd);
            assert_eq!(r.code, Some(3), "{what}, {args:?}: {r}");
            assert!(started.elapsed() < Duration::from_secs(10), "{what}, {args:?}: took {:?}", started.elapsed());
            assert!(r.stderr.contains(code) && r.stderr.contains("cannot connect to postgresql://"), "{what}: {r}");
        }
    }
}

/// A smoke run that never reached its database fails (exit 3), says why, and ends on time.
#[test]
fn a_smoke_run_that_never_reached_its_database_exits_3_on_time() {
    let started = Instant::now();
    let r = run(chronicle_cmd(&["worker"])
        .env("DATABASE_URL", format!("postgresql://u:pw@127.0.0.1:{}/db", free_port()))
        .env("OUTBOX_METRICS_PORT", "0")
        .env("OUTBOX_RUN_SECONDS", "1"));
    assert!(started.elapsed() < Duration::from_secs(2), "OUTBOX_RUN_SECONDS=1 took {:?}", started.elapsed());
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("nothing was projected") && r.stderr.contains("Connection refused"), "{r}");
    assert!(!r.stderr.contains(":pw@"), "the password is printed: {r}");
}

/// A worker whose role stops being allowed in (a rotated password looks the same to it)
/// keeps running, logs the refusal as an error once (not once per attempt), answers
/// `/readyz` with 503, and resumes by itself when it is let in again.
#[cfg(unix)]
#[test]
fn a_refusal_after_the_worker_ran_is_an_error_it_survives() {
    let db = TestDb::new();
    let mut c = db.client();
    let login = LoginRole::create(&db, "rotated", &format!("GRANT {} TO {{role}}", db.server.user));
    let role = login.name.clone();

    let port = free_port();
    let mut child = worker_cmd(&db, &[])
        .env("DATABASE_URL", url_as(&db, &role, &db.name))
        .env("OUTBOX_METRICS_PORT", port.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = |want: &str| {
        let r =
            run(chronicle_cmd(&["healthcheck", "--ready", "--timeout", "1s"])
                .env("OUTBOX_METRICS_PORT", port.to_string()));
        r.code == Some(if want == "ready" { 0 } else { 1 })
    };
    insert_events(&mut c, 20);
    wait_until(Duration::from_secs(30), "the first events to be projected", || {
        count(&mut c, "SELECT count(*) FROM chronicle_entries") == 20
    });
    wait_until(Duration::from_secs(20), "/readyz 200", || ready("ready"));

    c.batch_execute(&format!(
        "ALTER ROLE {role} NOLOGIN;
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
    ))
    .unwrap();
    insert_events(&mut c, 20);
    wait_until(Duration::from_secs(30), "/readyz 503 while the server refuses the worker", || ready("not ready"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "the worker exited when it was refused");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 20, "entries written while refused");

    c.batch_execute(&format!("ALTER ROLE {role} LOGIN")).unwrap();
    wait_until(Duration::from_secs(30), "the worker to resume once let in again", || {
        count(&mut c, "SELECT count(*) FROM chronicle_entries") == 40
    });
    wait_until(Duration::from_secs(20), "/readyz 200 again", || ready("ready"));
    signal(child.id(), "TERM");
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(child.wait().unwrap().success(), "{stderr}");
    let refusals: Vec<&str> = stderr.lines().filter(|l| l.contains("refuses our connections")).collect();
    assert_eq!(refusals.len(), 1, "the refusal is logged once a minute at most:\n{stderr}");
    assert!(refusals[0].contains("ERROR") && refusals[0].contains("SQLSTATE 28000"), "{}", refusals[0]);
}
