//! Faults of the system pause the worker instead of failing the events that meet them:
//! no attempt is spent, no event failed, `/readyz` and `chronicle_worker_paused` say
//! why, and the worker resumes by itself once the cause is gone (docs/DESIGN.md §3).

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::util::{
    count, free_port, http_get, insert_events, outbox_by_status, run, signal, wait_until, worker_cmd, LoginRole,
    Server, TestDb,
};

/// A worker with its metrics endpoint on `port` and its log in a file (a pipe nobody
/// reads while it runs could fill and block it).
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(db: &TestDb, url: &str, port: u16, extra: &[&str]) -> Worker {
        let log = std::env::temp_dir().join(format!("chronicle-{}-worker.log", db.name));
        let file = std::fs::File::create(&log).unwrap();
        let child = worker_cmd(db, extra)
            .env("DATABASE_URL", url)
            .env("OUTBOX_METRICS_PORT", port.to_string())
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap();
        Worker { child, log }
    }

    /// Stops it (SIGTERM) and returns its log; asserts it exited 0.
    fn stop(mut self) -> String {
        signal(self.child.id(), "TERM");
        let status = self.child.wait().unwrap();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(status.success(), "{status}: {log}");
        log
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn readyz(port: u16) -> String {
    http_get(port, "/readyz").unwrap_or_default()
}

fn paused_gauge(port: u16, reason: &str) -> f64 {
    let text = http_get(port, "/metrics").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("chronicle_worker_paused{") && l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn failed(c: &mut postgres::Client) -> i64 {
    count(c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed'")
}

fn done(c: &mut postgres::Client) -> i64 {
    count(c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'")
}

/// Rows that spent more than the one attempt their projection needs.
fn spent_more_than_one(c: &mut postgres::Client) -> i64 {
    count(c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts > 1")
}

#[cfg(unix)]
#[test]
fn a_revoked_read_model_pauses_the_worker_and_the_grant_resumes_it() {
    let db = TestDb::new();
    let owner = db.server.user.clone();
    // A worker role that has the owner's privileges (a superuser ignores REVOKE).
    let role = LoginRole::create(&db, "worker", &format!("GRANT {owner} TO {{role}}"));
    let mut c = db.client();
    c.batch_execute(&format!("REVOKE INSERT, UPDATE ON chronicle_entries FROM {owner}")).unwrap();
    insert_events(&mut c, 400);
    let port = free_port();
    let w = Worker::start(&db, &role.url(), port, &["--batch-size", "50", "--concurrency", "2"]);
    wait_until(Duration::from_secs(30), "/readyz to say paused (privileges)", || {
        readyz(port).contains("\"reason\":\"privileges\"")
    });
    let body = readyz(port);
    assert!(body.contains("\"status\":\"paused\"") && body.contains("42501"), "{body}");
    assert_eq!(paused_gauge(port, "privileges"), 1.0);
    // Paused for a while: the worker keeps trying, and judges nothing.
    let paused_at = Instant::now();
    wait_until(Duration::from_secs(30), "a few tries while paused", || {
        paused_at.elapsed() > Duration::from_secs(2) && readyz(port).contains("paused")
    });
    assert_eq!(failed(&mut c), 0, "{:?}", outbox_by_status(&mut c));
    assert_eq!(spent_more_than_one(&mut c), 0, "no attempt spent while paused");
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 0);

    c.batch_execute(&format!("GRANT INSERT, UPDATE ON chronicle_entries TO {owner}")).unwrap();
    let granted = Instant::now();
    wait_until(Duration::from_secs(10), "the projection to resume within 10 s of the grant", || done(&mut c) > 0);
    let resumed_after = granted.elapsed();
    wait_until(Duration::from_secs(60), "the backlog to be projected", || done(&mut c) == 400);
    wait_until(Duration::from_secs(10), "/readyz to say ready", || readyz(port).contains("\"status\":\"ready\""));
    assert_eq!(paused_gauge(port, "privileges"), 0.0);
    let log = w.stop();
    assert_eq!(failed(&mut c), 0);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts <> 1"),
        0,
        "one attempt each"
    );
    let pauses = log.lines().filter(|l| l.contains("ERROR") && l.contains("paused (privileges)")).count();
    assert_eq!(pauses, 1, "one ERROR line for the pause, not one per row or per try: {log}");
    assert!(log.contains("resumed"), "{log}");
    assert!(!log.contains("failed (rejected_by_read_model)"), "{log}");
    eprintln!("resumed {resumed_after:?} after the grant");
}

/// A tmpfs mounted for one test as a tablespace, dropped and unmounted when the test
/// ends, even when it fails (declared before the database, so dropped after it).
struct SmallTablespace {
    name: String,
    dir: PathBuf,
    server: Server,
}

impl SmallTablespace {
    /// None when this machine cannot (not root, no mount, a server on another host).
    fn create(server: &Server, size: &str) -> Option<SmallTablespace> {
        use std::os::unix::fs::MetadataExt;
        let mut admin = server.connect("postgres");
        let data: String = admin.query_one("SELECT current_setting('data_directory')", &[]).ok()?.get(0);
        let owner = std::fs::metadata(&data).ok()?.uid();
        let name = format!("chronicle_small_{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        let ts = SmallTablespace { name, dir, server: server.clone() };
        std::os::unix::fs::chown(&ts.dir, Some(owner), None).unwrap();
        admin.batch_execute(&format!("CREATE TABLESPACE {} LOCATION '{}'", ts.name, ts.dir.display())).unwrap();
        Some(ts)
    }
}

impl Drop for SmallTablespace {
    fn drop(&mut self) {
        if let Ok(mut admin) = std::panic::catch_unwind(|| self.server.connect("postgres")) {
            let _ = admin.batch_execute(&format!("DROP TABLESPACE IF EXISTS {}", self.name));
        }
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_tablespace_under_the_entries_pauses_the_worker_until_space_is_freed() {
    let server = crate::util::server();
    let Some(ts) = SmallTablespace::create(server, "8M") else {
        eprintln!("skipped: cannot mount a tmpfs as a tablespace of this server here (needs root and a local server)");
        return;
    };
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 300);
    let indexes: Vec<String> = c
        .query("SELECT indexname::text FROM pg_indexes WHERE tablename = 'chronicle_entries'", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.batch_execute(&format!("ALTER TABLE chronicle_entries SET TABLESPACE {}", ts.name)).unwrap();
    for i in indexes {
        c.batch_execute(&format!("ALTER INDEX {i} SET TABLESPACE {}", ts.name)).unwrap();
    }
    // Fill the tablespace: the insert fails when the disk is full, and the file keeps
    // the space it took.
    c.batch_execute(&format!("CREATE TABLE filler (a bigint, b bigint, c bigint) TABLESPACE {}", ts.name)).unwrap();
    let full = c.batch_execute("INSERT INTO filler SELECT g, g, g FROM generate_series(1, 10000000) g").unwrap_err();
    assert_eq!(crate::util::sql_state(&full), "53100", "{full}");

    let port = free_port();
    let w = Worker::start(&db, &db.url(), port, &["--batch-size", "50", "--concurrency", "2"]);
    wait_until(Duration::from_secs(30), "/readyz to say paused (resources)", || {
        readyz(port).contains("\"reason\":\"resources\"")
    });
    assert!(readyz(port).contains("53100"), "{}", readyz(port));
    assert_eq!(paused_gauge(port, "resources"), 1.0);
    let paused_at = Instant::now();
    wait_until(Duration::from_secs(30), "a few tries while paused", || {
        paused_at.elapsed() > Duration::from_secs(2) && readyz(port).contains("paused")
    });
    assert_eq!(failed(&mut c), 0, "{:?}", outbox_by_status(&mut c));
    assert_eq!(spent_more_than_one(&mut c), 0, "no attempt spent while paused");

    c.batch_execute("DROP TABLE filler").unwrap();
    let freed = Instant::now();
    wait_until(Duration::from_secs(10), "the projection to resume after space is freed", || done(&mut c) > 0);
    let resumed_after = freed.elapsed();
    wait_until(Duration::from_secs(60), "the backlog to be projected", || done(&mut c) == 300);
    let log = w.stop();
    assert_eq!(failed(&mut c), 0);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts <> 1"),
        0,
        "one attempt each"
    );
    let pauses = log.lines().filter(|l| l.contains("ERROR") && l.contains("paused (resources)")).count();
    assert_eq!(pauses, 1, "{log}");
    eprintln!("resumed {resumed_after:?} after space was freed");
    drop(db);
    drop(ts);
}

/// A read model narrowed under the running worker: the one long summary among short ones
/// fails alone (its value does not fit: the event's fault); a batch of long summaries
/// only is refused alike, and the read model then differs from what this version
/// writes: the worker pauses (schema) instead of failing them, and resumes once the
/// column is restored.
#[cfg(unix)]
#[test]
fn a_narrowed_summary_column_fails_the_long_one_alone_and_pauses_when_every_entry_is_refused() {
    let db = TestDb::new();
    let mut c = db.client();
    // Summaries are "Renamed book "old" → "new"": short titles fit 40 characters.
    c.batch_execute("ALTER TABLE chronicle_entries ALTER COLUMN summary TYPE varchar(40)").unwrap();
    let insert = |c: &mut postgres::Client, title: &str, n: i64| {
        c.execute(
            "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
             SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                    jsonb_build_object('title', 'a'), jsonb_build_object('title', $1::text || g), now()
             FROM generate_series(1, $2::bigint) g",
            &[&title, &n],
        )
        .unwrap();
    };
    insert(&mut c, "s", 30);
    // A worker started on the drifted read model refuses to start, naming the difference.
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("column summary is varchar, this version writes text"), "{r}");
    assert_eq!(done(&mut c), 0);

    // Restored, then narrowed again while the worker runs.
    c.batch_execute("ALTER TABLE chronicle_entries ALTER COLUMN summary TYPE text").unwrap();
    let port = free_port();
    let w = Worker::start(&db, &db.url(), port, &["--batch-size", "20", "--concurrency", "1"]);
    wait_until(Duration::from_secs(30), "the first events to be projected", || done(&mut c) == 30);
    c.batch_execute("ALTER TABLE chronicle_entries ALTER COLUMN summary TYPE varchar(40)").unwrap();
    insert(&mut c, "s", 30);
    insert(&mut c, &"long ".repeat(20), 1);
    insert(&mut c, "s", 30);
    wait_until(Duration::from_secs(30), "the short ones to be projected", || done(&mut c) == 90);
    wait_until(Duration::from_secs(30), "the long one to be settled", || failed(&mut c) == 1);
    let by = outbox_by_status(&mut c);
    assert_eq!(by.get("failed/rejected_by_read_model"), Some(&1), "the long one fails alone: {by:?}");

    insert(&mut c, &"long ".repeat(20), 40);
    wait_until(Duration::from_secs(30), "/readyz to say paused (schema)", || {
        readyz(port).contains("\"reason\":\"schema\"")
    });
    assert!(readyz(port).contains("summary is varchar"), "{}", readyz(port));
    assert_eq!(failed(&mut c), 1, "none of the long ones failed: {:?}", outbox_by_status(&mut c));
    c.batch_execute("ALTER TABLE chronicle_entries ALTER COLUMN summary TYPE text").unwrap();
    wait_until(Duration::from_secs(30), "the long ones to be projected", || done(&mut c) == 130);
    let log = w.stop();
    assert_eq!(failed(&mut c), 1);
    assert_eq!(spent_more_than_one(&mut c), 0, "no attempt spent while paused");
    assert!(log.lines().filter(|l| l.contains("ERROR") && l.contains("paused (schema)")).count() == 1, "{log}");
}

/// A column the worker writes dropped: a worker started on it refuses to start, naming
/// it; dropped while a worker runs, the worker pauses (schema) and fails nothing, and
/// resumes once the column is back.
#[cfg(unix)]
#[test]
fn a_dropped_column_refuses_the_start_and_pauses_a_running_worker() {
    let db = TestDb::new();
    let mut c = db.client();
    c.batch_execute("ALTER TABLE chronicle_entries DROP COLUMN reason").unwrap();
    insert_events(&mut c, 20);
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("column reason (text) is missing"), "{r}");
    assert_eq!(done(&mut c), 0);

    c.batch_execute("ALTER TABLE chronicle_entries ADD COLUMN reason text").unwrap();
    let port = free_port();
    let w = Worker::start(&db, &db.url(), port, &["--batch-size", "10"]);
    wait_until(Duration::from_secs(30), "the first events to be projected", || done(&mut c) == 20);
    c.batch_execute("ALTER TABLE chronicle_entries DROP COLUMN reason").unwrap();
    insert_events(&mut c, 30);
    wait_until(Duration::from_secs(30), "/readyz to say paused (schema)", || {
        readyz(port).contains("\"reason\":\"schema\"")
    });
    // Met by a statement (42703) or by the column check of a claim thread's new
    // connection, whichever comes first: either names what is wrong.
    let body = readyz(port);
    assert!(body.contains("42703") || body.contains("column reason (text) is missing"), "{body}");
    assert_eq!(paused_gauge(port, "schema"), 1.0);
    assert_eq!(failed(&mut c), 0, "{:?}", outbox_by_status(&mut c));
    c.batch_execute("ALTER TABLE chronicle_entries ADD COLUMN reason text").unwrap();
    wait_until(Duration::from_secs(30), "the rest to be projected", || done(&mut c) == 50);
    let log = w.stop();
    assert_eq!(failed(&mut c), 0);
    assert_eq!(spent_more_than_one(&mut c), 0, "no attempt spent while paused");
    assert_eq!(log.lines().filter(|l| l.contains("ERROR") && l.contains("paused (schema)")).count(), 1, "{log}");
}
