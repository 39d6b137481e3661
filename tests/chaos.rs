//! Chaos and bad input: the real `chronicle` binary, as separate processes,
//! against a real server, broken on purpose; afterwards the data is checked.
//!
//! `cargo test --test tests chaos:: -- --nocapture` shows each scenario's figures: what
//! it did (kills, restarts, cuts, events written, inputs tried) and what it checked
//! (entries missing, duplicated, rows wrongly failed, inputs refused cleanly, run time).
//! Scenarios that cut connections or restart a server only ever touch their own
//! database or their own throwaway cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chronicle::config::{Kind, Setting, WORKER_SETTINGS};
use postgres::{Client, NoTls};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::util::{
    chronicle_cmd, count, free_port, http_get, insert_events, metric_sum, outbox_by_status, run, run_with_input,
    signal, sql_state, wait_until, worker_cmd, AppRole, Cluster, Ran, Server, TestDb,
};

// ---------------------------------------------------------------------------------
// Helpers

/// A small xorshift generator: random kill moments without a dependency. The seed is
/// printed, so a failing run can be read back.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        Rng((t ^ (u64::from(std::process::id()) << 32)) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// A folder for the logs of the processes a scenario starts; kept when the test fails.
struct Logs {
    dir: PathBuf,
}

impl Logs {
    fn new(tag: &str) -> Logs {
        let dir = std::env::temp_dir().join(format!(
            "chronicle-chaos-{tag}-{}-{}",
            std::process::id(),
            &Uuid::now_v7().simple().to_string()[24..]
        ));
        std::fs::create_dir_all(&dir).expect("a log folder");
        Logs { dir }
    }

    /// Starts `cmd` with its stderr (the log) going to a file of this folder.
    fn spawn(&self, mut cmd: Command, name: &str) -> Proc {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("a log file");
        let out = file.try_clone().expect("a log file");
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(file).spawn().expect("spawning chronicle");
        Proc { child, log, name: name.to_string() }
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("(process logs kept in {})", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running `chronicle` process, killed when dropped (a failing test leaves none behind).
struct Proc {
    child: Child,
    log: PathBuf,
    name: String,
}

impl Proc {
    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// Panics if the process exited by itself.
    fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().expect("try_wait") {
            panic!("{} exited by itself ({st}); its log ends with:\n{}", self.name, self.tail());
        }
    }

    /// SIGKILL, and reap it.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (30 s at most) for the exit.
    fn stop(&mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "{} did not stop within 30 s of SIGTERM:\n{}", self.name, self.tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` with its output going to a log file, and SIGTERM after `limit` if it is
/// still running: the output, and whether it had to be stopped.
fn run_limited(logs: &Logs, cmd: Command, name: &str, limit: Duration) -> (Ran, bool) {
    let mut p = logs.spawn(cmd, name);
    let deadline = Instant::now() + limit;
    let (status, overran) = loop {
        if let Some(st) = p.child.try_wait().expect("try_wait") {
            break (st, false);
        }
        if Instant::now() >= deadline {
            break (p.stop(), true);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (Ran { code: status.code(), stdout: String::new(), stderr: p.log() }, overran)
}

/// An application writing events continuously, on its own connection, reconnecting
/// after errors (a restart, a cut): what a real writer does.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<WriterStats>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct WriterStats {
    /// INSERT statements committed (acknowledged to the writer).
    statements: u64,
    /// Events in those statements.
    events: u64,
    /// Failed statements or connection attempts.
    errors: u64,
}

const WRITE_SQL: &str = "
    INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
    SELECT gen_random_uuid(), $1, 'tag', gen_random_uuid(), 'TagCreated',
           jsonb_build_object('name', 'chaos ' || $3::text || '/' || g), now()
    FROM generate_series(1, $2::bigint) g";

fn start_writer(server: &Server, db: &str, libraries: Vec<Uuid>, every: Duration, per_statement: i64) -> Writer {
    start_writer_at(server.key_value(db), libraries, every, per_statement)
}

/// `start_writer` on a connection string of its own (several hosts, say).
fn start_writer_at(conn: String, libraries: Vec<Uuid>, every: Duration, per_statement: i64) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut stats = WriterStats::default();
        let mut client: Option<Client> = None;
        let mut i = 0u64;
        while !flag.load(Ordering::Relaxed) {
            if client.as_ref().is_none_or(Client::is_closed) {
                let mut cfg: postgres::Config = conn.parse().expect("connection string");
                cfg.connect_timeout(Duration::from_secs(2));
                match cfg.connect(NoTls) {
                    Ok(c) => client = Some(c),
                    Err(_) => {
                        stats.errors += 1;
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                }
            }
            let library = libraries[(i % libraries.len() as u64) as usize];
            i += 1;
            match client.as_mut().unwrap().execute(WRITE_SQL, &[&library, &per_statement, &i.to_string()]) {
                Ok(n) => {
                    stats.statements += 1;
                    stats.events += n;
                }
                Err(_) => {
                    stats.errors += 1;
                    client = None;
                }
            }
            std::thread::sleep(every);
        }
        stats
    });
    Writer { stop, handle: Some(handle) }
}

impl Writer {
    fn finish(mut self) -> WriterStats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("the writer thread panicked")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Stops a throwaway cluster when the scenario ends, even when it fails.
struct StopCluster<'a>(&'a Cluster);

impl Drop for StopCluster<'_> {
    fn drop(&mut self) {
        let _ = self.0.pg_ctl(&["stop", "-m", "immediate"]);
    }
}

/// The end state of a database, in the figures the suite reports.
#[derive(Debug, Clone, Copy)]
struct Tally {
    events: i64,
    entries: i64,
    /// Events with no entry (anti-join).
    missing: i64,
    /// Entries with no event.
    orphans: i64,
    /// Events with more than one `done` delivery (projected twice).
    duplicated: i64,
    pending: i64,
    processing: i64,
    failed: i64,
    deliveries: i64,
}

fn tally(c: &mut Client) -> Tally {
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM chronicle_events),
                    (SELECT count(*) FROM chronicle_entries),
                    (SELECT count(*) FROM chronicle_events e WHERE NOT EXISTS (SELECT 1 FROM chronicle_entries n WHERE n.id = e.id)),
                    (SELECT count(*) FROM chronicle_entries n WHERE NOT EXISTS (SELECT 1 FROM chronicle_events e WHERE e.id = n.id)),
                    (SELECT count(*) FROM (SELECT event_id FROM chronicle_outbox_events WHERE status = 'done'
                                           GROUP BY 1 HAVING count(*) > 1) d),
                    (SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'),
                    (SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing'),
                    (SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed'),
                    (SELECT count(*) FROM chronicle_outbox_events)",
            &[],
        )
        .expect("tally");
    Tally {
        events: r.get(0),
        entries: r.get(1),
        missing: r.get(2),
        orphans: r.get(3),
        duplicated: r.get(4),
        pending: r.get(5),
        processing: r.get(6),
        failed: r.get(7),
        deliveries: r.get(8),
    }
}

impl Tally {
    /// Every event has exactly one entry, nothing is left in flight, nothing failed.
    fn assert_exactly_once(&self, scenario: &str) {
        assert_eq!(
            (self.entries, self.missing, self.orphans, self.duplicated, self.pending, self.processing, self.failed),
            (self.events, 0, 0, 0, 0, 0, 0),
            "{scenario}: (entries, missing, orphans, duplicated, pending, processing, failed) vs events: {self:?}"
        );
    }
}

/// Every entry as JSON, `projected_at` aside, ordered by id.
/// How many entries do not match their event: a column copied from the event differs
/// (compared in SQL, by the database), or the text the projection makes of the event
/// (summary, changed fields, details) is not the pure projection's of that event as
/// stored. Independent of the worker's and the rebuild's writers, which are what the
/// chaos scenarios put under stress.
fn entries_differing_from_their_events(c: &mut Client) -> usize {
    let copied = count(
        c,
        "SELECT count(*) FROM chronicle_entries n JOIN chronicle_events e USING (id)
         WHERE (n.library_id, n.actor_user_id, n.entity_type, n.entity_id, n.event_type, n.occurred_at,
                n.created_at, n.request_id, n.client, n.ip, n.reason)
               IS DISTINCT FROM
               (e.library_id, e.actor_user_id, e.entity_type, e.entity_id, e.event_type, e.occurred_at,
                e.created_at, e.request_id, e.client, e.ip, e.reason)",
    );
    let sql = format!(
        "SELECT n.summary, n.changed_fields, n.details, n.projection_version, e.*
         FROM chronicle_entries n
         JOIN LATERAL (SELECT {} FROM chronicle_events WHERE id = n.id) e ON true",
        chronicle::event::EVENT_COLUMNS
    );
    let projected = c
        .query(&sql, &[])
        .expect("entries with their events")
        .iter()
        .filter(|row| {
            let event = chronicle::event::read_event(row, 4).expect("reading an event").expect("a readable event");
            let want = chronicle::projection::project(&event).expect("a projectable event");
            let want_details: Value = serde_json::from_str(&want.details).expect("details are JSON");
            (row.get::<_, String>(0), row.get::<_, Vec<String>>(1), row.get::<_, Value>(2), row.get::<_, i32>(3))
                != (want.summary, want.changed_fields.to_vec(), want_details, want.projection_version)
        })
        .count();
    copied as usize + projected
}

fn libraries_of(c: &mut Client) -> Vec<Uuid> {
    c.query("SELECT DISTINCT library_id FROM chronicle_events ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn in_flight(c: &mut Client) -> i64 {
    count(c, "SELECT count(*) FROM chronicle_outbox_events WHERE status IN ('pending', 'processing')")
}

fn done_count(c: &mut Client) -> i64 {
    count(c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'")
}

/// Runs `worker --until-empty` passes (short lease, fast reclaim) until nothing is
/// pending or processing: rows held by killed workers come back once their lease
/// expires. Returns the number of passes.
fn final_drain(db: &TestDb, c: &mut Client, max_attempts: &str, timeout: Duration) -> u32 {
    let deadline = Instant::now() + timeout;
    let mut passes = 0;
    loop {
        let r = run(worker_cmd(db, &["--until-empty", "--batch-size", "200"])
            .env("OUTBOX_LEASE_SECONDS", "1")
            .env("OUTBOX_RECLAIM_INTERVAL_SECONDS", "0.2")
            .env("OUTBOX_MAX_ATTEMPTS", max_attempts)
            .env("OUTBOX_BASE_BACKOFF_SECONDS", "0.05")
            .env("OUTBOX_MAX_BACKOFF_SECONDS", "0.5"));
        assert_eq!(r.code, Some(0), "final drain: {r}");
        passes += 1;
        if in_flight(c) == 0 {
            return passes;
        }
        assert!(Instant::now() < deadline, "the final drain did not finish in {timeout:?}: {:?}", outbox_by_status(c));
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn inject(db: &TestDb, n: u32, seed: u32) {
    let r =
        run(&mut db.chronicle(&["inject", "--count", &n.to_string(), "--libraries", "3", "--seed", &seed.to_string()]));
    assert_eq!(r.code, Some(0), "inject: {r}");
}

fn json_of(r: &Ran) -> Value {
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}):\n{r}"))
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------------
// 1. Kill loop

#[test]
fn chaos_kill_loop_leaves_exactly_one_entry_per_event() {
    let started = Instant::now();
    let db = TestDb::new();
    let mut c = db.client();
    let logs = Logs::new("kill");
    let mut rng = Rng::seeded();
    let seed = rng.0;
    const INJECTED: u32 = 15_000;
    inject(&db, INJECTED, 7);
    let writer = start_writer(&db.server, &db.name, libraries_of(&mut c), Duration::from_millis(100), 5);

    const PROCESSES: usize = 3;
    const KILLS: u32 = 24;
    // Each kill can cost the rows its process held one attempt (a reclaimed row keeps
    // its attempt, docs/DESIGN.md §3); with 1 s leases and 24+ kills a row could in theory
    // be caught many times, so the maximum is raised well above what kills can burn.
    const MAX_ATTEMPTS: &str = "50";
    let spawn = |slot: usize, generation: u32| {
        let mut cmd = worker_cmd(&db, &["--concurrency", "2", "--batch-size", "10"]);
        cmd.env("OUTBOX_WORKER_ID", format!("k{slot}"))
            .env("OUTBOX_LEASE_SECONDS", "1")
            .env("OUTBOX_RECLAIM_INTERVAL_SECONDS", "0.2")
            .env("OUTBOX_MAX_ATTEMPTS", MAX_ATTEMPTS)
            .env("OUTBOX_BASE_BACKOFF_SECONDS", "0.05")
            .env("OUTBOX_MAX_BACKOFF_SECONDS", "0.5");
        logs.spawn(cmd, &format!("k{slot}-{generation}"))
    };
    let mut workers: Vec<Proc> = (0..PROCESSES).map(|s| spawn(s, 0)).collect();
    wait_until(Duration::from_secs(30), "the workers to start projecting", || done_count(&mut c) > 0);

    let (mut kills, mut kills_holding, mut rows_held, mut restarts) = (0u32, 0u32, 0i64, 0u32);
    let mut min_backlog = i64::MAX;
    while kills < KILLS {
        std::thread::sleep(rng.ms(100, 450));
        let slot = rng.below(PROCESSES as u64) as usize;
        workers[slot].assert_running();
        let held = count(
            &mut c,
            &format!(
                "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing' AND claimed_by = 'k{slot}'"
            ),
        );
        workers[slot].kill9();
        kills += 1;
        if held > 0 {
            kills_holding += 1;
            rows_held += held;
        }
        min_backlog = min_backlog.min(in_flight(&mut c));
        workers[slot] = spawn(slot, kills);
        restarts += 1;
    }
    let written = writer.finish();
    // The survivors die the same way.
    for w in workers.iter_mut() {
        w.assert_running();
        w.kill9();
        kills += 1;
    }
    let left_processing = count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing'");
    let passes = final_drain(&db, &mut c, MAX_ATTEMPTS, Duration::from_secs(90));

    let t = tally(&mut c);
    let reclaimed_rows = count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts > 1");
    let max_attempts = count(&mut c, "SELECT max(attempts)::bigint FROM chronicle_outbox_events");
    t.assert_exactly_once("kill loop");
    assert_eq!(t.deliveries, t.events, "one delivery per event (nothing re-enqueued)");
    assert!(kills_holding > 0, "no kill landed while a process held rows: the loop tested nothing");

    // Each entry is its own event's: checked against the events themselves, not against
    // another run of the same writer.
    let differing = entries_differing_from_their_events(&mut c);
    assert_eq!(differing, 0, "{differing} entries differ from their events");

    eprintln!(
        "chaos kill loop (seed {seed}): {PROCESSES} worker processes (--concurrency 2, batch 10, lease 1 s, reclaim 0.2 s, \
         OUTBOX_MAX_ATTEMPTS={MAX_ATTEMPTS} so kills cannot exhaust attempts); {kills} kill -9 ({KILLS} at random moments \
         100-450 ms apart + {PROCESSES} at the end), {restarts} restarts; {kills_holding} kills hit a process holding rows \
         ({rows_held} rows held in all), {left_processing} rows left processing by the last kills; smallest backlog at a kill \
         {min_backlog}; events written: {INJECTED} injected + {} by the writer ({} statements, {} errors) = {}; final drain \
         {passes} pass(es); rows claimed again after a kill {reclaimed_rows}, max attempts {max_attempts}. \
         Checked: entries {} = events, missing {}, duplicated {}, orphans {}, processing {}, failed (wrongly) {}, \
         entries differing from their events {differing}. Run time {}",
        written.events,
        written.statements,
        written.errors,
        t.events,
        t.entries,
        t.missing,
        t.duplicated,
        t.orphans,
        t.processing,
        t.failed,
        secs(started.elapsed())
    );
}

// ---------------------------------------------------------------------------------
// 2. Database restart

#[test]
fn chaos_database_restarts_during_a_drain_lose_nothing() {
    let started = Instant::now();
    let cluster = Cluster::start(&["fsync=off"]).unwrap_or_else(|e| panic!("starting a throwaway cluster: {e}"));
    let _stop = StopCluster(&cluster);
    let db = TestDb::empty_on(&cluster.server);
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(0), "{r}");
    let mut injected = 6000;
    inject(&db, 6000, 8);
    let logs = Logs::new("restart");
    let libraries = libraries_of(&mut db.client());
    let writer = start_writer(&cluster.server, &db.name, libraries, Duration::from_millis(100), 5);
    let spawn = |i: usize| {
        let mut cmd = worker_cmd(&db, &["--batch-size", "20"]);
        cmd.env("OUTBOX_WORKER_ID", format!("r{i}"))
            .env("OUTBOX_LEASE_SECONDS", "2")
            .env("OUTBOX_RECLAIM_INTERVAL_SECONDS", "0.5")
            .env("OUTBOX_MAX_BACKOFF_SECONDS", "2");
        logs.spawn(cmd, &format!("r{i}"))
    };
    let mut workers = vec![spawn(0), spawn(1)];
    let log = cluster.dir.join("log").display().to_string();

    // The same options Cluster::start gave the server, for a start after a stop.
    let opts = format!(
        "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off",
        cluster.server.port,
        cluster.dir.display()
    );
    let mut restarts = Vec::new();
    // Three restarts (fast, immediate, fast), then an outage: stopped, down 3 s, started.
    for (round, mode) in ["fast", "immediate", "fast", "down"].into_iter().enumerate() {
        let mut c = db.client();
        let before = done_count(&mut c);
        wait_until(Duration::from_secs(60), "the workers to be mid-drain", || done_count(&mut c) >= before + 200);
        if count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'") < 2000 {
            inject(&db, 3000, 20 + round as u32);
            injected += 3000;
        }
        let pending = in_flight(&mut c);
        drop(c);
        let t = Instant::now();
        let steps: Vec<Vec<&str>> = if mode == "down" {
            vec![vec!["stop", "-m", "immediate", "-w"], vec!["start", "-w", "-t", "60", "-o", &opts, "-l", &log]]
        } else {
            vec![vec!["restart", "-m", mode, "-w", "-t", "60", "-l", &log]]
        };
        for step in steps {
            if step[0] == "start" {
                std::thread::sleep(Duration::from_secs(3));
            }
            let out = cluster.pg_ctl(&step);
            assert!(
                out.status.success(),
                "pg_ctl {step:?} failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let down = t.elapsed();
        let mut c = db.client();
        let at = done_count(&mut c);
        let t = Instant::now();
        wait_until(Duration::from_secs(60), "the workers to resume by themselves after the restart", || {
            done_count(&mut c) > at
        });
        let resumed = t.elapsed();
        for w in &mut workers {
            w.assert_running();
        }
        let what = if mode == "down" {
            "stop -m immediate, 3 s down, start".to_string()
        } else {
            format!("restart -m {mode}")
        };
        restarts.push(format!(
            "{what} with {pending} rows in flight: took {}, first rows done {} later",
            secs(down),
            secs(resumed)
        ));
    }
    let written = writer.finish();
    let mut c = db.client();
    wait_until(Duration::from_secs(120), "the drain to complete", || in_flight(&mut c) == 0);
    for w in &mut workers {
        w.assert_running();
    }
    let unreachable: Vec<usize> = workers.iter().map(|w| w.log().matches("database unreachable").count()).collect();
    let again: Vec<usize> = workers.iter().map(|w| w.log().matches("database reachable again").count()).collect();
    for w in &mut workers {
        let st = w.stop();
        assert!(st.success(), "{} exited with {st}:\n{}", w.name, w.tail());
    }
    assert!(again.iter().all(|&n| n >= 1), "each worker logs that the database is back: {again:?}");
    let t = tally(&mut c);
    t.assert_exactly_once("database restart");
    crate::util::assert_fully_projected(&mut c);
    assert!(
        t.events >= injected + written.events as i64,
        "{} events in the database, {} injected + {} acknowledged to the writer",
        t.events,
        injected,
        written.events
    );
    let max_attempts = count(&mut c, "SELECT max(attempts)::bigint FROM chronicle_outbox_events");
    drop(c);
    drop(db);

    eprintln!(
        "chaos database restart: throwaway cluster on port {}, 2 worker processes (batch 20, lease 2 s), a writer \
         reconnecting after errors; 4 outages while draining: {}. Workers never exited; 'database unreachable' logged \
         {unreachable:?} times and 'reachable again' {again:?} times per worker. Events written: {injected} injected + {} \
         acknowledged by the writer ({} writer errors during restarts) = {} in the database. Checked: entries {} = events, \
         missing {}, duplicated {}, processing {}, failed {}, max attempts {max_attempts}. Run time {}",
        cluster.server.port,
        restarts.join("; "),
        written.events,
        written.errors,
        t.events,
        t.entries,
        t.missing,
        t.duplicated,
        t.processing,
        t.failed,
        secs(started.elapsed())
    );
}

// ---------------------------------------------------------------------------------
// 3. Connections cut

#[test]
fn chaos_connections_cut_repeatedly_lose_nothing() {
    let started = Instant::now();
    let db = TestDb::new();
    let mut c = db.client();
    let logs = Logs::new("cut");
    let mut rng = Rng::seeded();
    let mut injected = 8000;
    inject(&db, 8000, 9);
    let writer = start_writer(&db.server, &db.name, libraries_of(&mut c), Duration::from_millis(100), 5);
    // A cut can cost the rows in flight on that connection one attempt; 12+ rounds could
    // in theory hit one row many times, so the maximum is raised (and reported).
    let spawn = |i: usize| {
        let mut cmd = worker_cmd(&db, &["--concurrency", "2", "--batch-size", "10"]);
        cmd.env("OUTBOX_WORKER_ID", format!("c{i}"))
            .env("OUTBOX_LEASE_SECONDS", "1")
            .env("OUTBOX_RECLAIM_INTERVAL_SECONDS", "0.2")
            .env("OUTBOX_MAX_ATTEMPTS", "50")
            .env("OUTBOX_BASE_BACKOFF_SECONDS", "0.05")
            .env("OUTBOX_MAX_BACKOFF_SECONDS", "0.5");
        logs.spawn(cmd, &format!("c{i}"))
    };
    let mut workers = vec![spawn(0), spawn(1)];
    wait_until(Duration::from_secs(30), "the workers to start projecting", || done_count(&mut c) > 0);
    let terminate = format!(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = '{}' AND application_name LIKE 'chronicle worker%'",
        db.name
    );
    let (mut rounds, mut rounds_with_cuts, mut cuts) = (0, 0, 0i64);
    while rounds_with_cuts < 20 && rounds < 60 {
        std::thread::sleep(rng.ms(200, 500));
        let n = count(&mut c, &terminate);
        rounds += 1;
        cuts += n;
        if n > 0 {
            rounds_with_cuts += 1;
        }
        if count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'") < 500 {
            inject(&db, 2000, 30 + rounds);
            injected += 2000;
        }
    }
    assert!(rounds_with_cuts >= 10, "only {rounds_with_cuts} of {rounds} rounds found worker connections to cut");
    let written = writer.finish();
    wait_until(Duration::from_secs(120), "the drain to complete", || in_flight(&mut c) == 0);
    for w in &mut workers {
        w.assert_running();
    }
    for w in &mut workers {
        let st = w.stop();
        assert!(st.success(), "{} exited with {st}:\n{}", w.name, w.tail());
    }
    let t = tally(&mut c);
    t.assert_exactly_once("connections cut");
    assert_eq!(t.deliveries, t.events, "one delivery per event");
    let retried = count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts > 1");
    let max_attempts = count(&mut c, "SELECT max(attempts)::bigint FROM chronicle_outbox_events");
    eprintln!(
        "chaos connections cut: 2 worker processes (--concurrency 2, batch 10, lease 1 s, OUTBOX_MAX_ATTEMPTS=50); \
         {rounds} rounds of pg_terminate_backend on this database's 'chronicle worker%' sessions, {rounds_with_cuts} \
         rounds cut something, {cuts} connections cut in all; events written: {injected} injected + {} by the writer = {}; \
         rows claimed more than once {retried}, max attempts {max_attempts}. Checked: workers never exited and stopped with \
         exit 0; entries {} = events, missing {}, duplicated {}, processing {}, failed (wrongly) {}. Run time {}",
        written.events,
        t.events,
        t.entries,
        t.missing,
        t.duplicated,
        t.processing,
        t.failed,
        secs(started.elapsed())
    );
}

// ---------------------------------------------------------------------------------
// 4. Lock and timeout pressure

#[test]
fn chaos_lock_pressure_retries_until_done_and_endless_pressure_fails_rows() {
    let started = Instant::now();
    let db = TestDb::new();
    let mut c = db.client();
    let logs = Logs::new("locks");
    let mut rng = Rng::seeded();
    // Enough events that the drain spans many lock bursts however fast the worker is
    // between them (at the fastest seen here, 12,000 take about 20 s: some 30 bursts),
    // and few enough that a loaded machine (about 110 events/s under this pressure, in a
    // debug build next to other tests) still finishes well within the wait below.
    const EVENTS: i64 = 12_000;
    insert_events(&mut c, EVENTS);
    let port = free_port();
    let mut cmd = worker_cmd(&db, &["--concurrency", "2", "--batch-size", "10"]);
    cmd.env("OUTBOX_METRICS_PORT", port.to_string())
        .env("OUTBOX_STATEMENT_TIMEOUT_SECONDS", "0.1")
        .env("OUTBOX_BASE_BACKOFF_SECONDS", "0.05")
        .env("OUTBOX_MAX_BACKOFF_SECONDS", "0.4")
        .env("OUTBOX_MAX_ATTEMPTS", "50");
    let mut worker = logs.spawn(cmd, "pressure");

    // Intermittent pressure: the read model locked for 250-600 ms, then free for
    // 100-250 ms, over and over, while the worker drains in batches of 10 (small enough
    // that the drain spans many bursts).
    let stop = Arc::new(AtomicBool::new(false));
    let locker = {
        let (stop, mut lc, seed) = (stop.clone(), db.client(), rng.next());
        std::thread::spawn(move || {
            let mut rng = Rng(seed | 1);
            let (mut bursts, mut held) = (0u32, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let mut tx = lc.transaction().expect("locker transaction");
                tx.batch_execute("LOCK TABLE chronicle_entries IN ACCESS EXCLUSIVE MODE").expect("LOCK TABLE");
                let hold = rng.ms(250, 600);
                std::thread::sleep(hold);
                tx.rollback().expect("releasing the lock");
                bursts += 1;
                held += hold;
                std::thread::sleep(rng.ms(100, 250));
            }
            (bursts, held)
        })
    };
    wait_until(Duration::from_secs(180), "the drain under intermittent pressure", || done_count(&mut c) == EVENTS);
    stop.store(true, Ordering::Relaxed);
    let (bursts, held) = locker.join().expect("the locker thread panicked");
    let metrics = http_get(port, "/metrics").unwrap_or_default();
    let retries_metric = metric_sum(&metrics, "chronicle_outbox_retry_scheduled_total");
    let st = worker.stop();
    assert!(st.success(), "the worker exited with {st}:\n{}", worker.tail());
    let retried_rows = count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE attempts > 1");
    let extra_attempts = count(&mut c, "SELECT coalesce(sum(attempts - 1), 0)::bigint FROM chronicle_outbox_events");
    let max_attempts = count(&mut c, "SELECT max(attempts)::bigint FROM chronicle_outbox_events");
    let t = tally(&mut c);
    t.assert_exactly_once("intermittent lock pressure");
    assert!(bursts >= 8, "only {bursts} lock bursts happened during the drain");
    assert!(retried_rows > 0, "no row was retried: the pressure did not bite");
    assert!(retries_metric > 0.0, "chronicle_outbox_retry_scheduled_total stayed 0:\n{metrics}");

    // Pressure that never ends: every new row ends failed / max_attempts_exceeded, over
    // several batches, and the rows done before are not touched.
    let mut lc = db.client();
    let mut tx = lc.transaction().unwrap();
    tx.batch_execute("LOCK TABLE chronicle_entries IN ACCESS EXCLUSIVE MODE").unwrap();
    const STUCK: i64 = 60;
    insert_events(&mut c, STUCK);
    let mut cmd = worker_cmd(&db, &["--batch-size", "20"]);
    cmd.env("OUTBOX_STATEMENT_TIMEOUT_SECONDS", "0.1")
        .env("OUTBOX_BASE_BACKOFF_SECONDS", "0.05")
        .env("OUTBOX_MAX_BACKOFF_SECONDS", "0.1")
        .env("OUTBOX_MAX_ATTEMPTS", "3");
    let mut endless = logs.spawn(cmd, "endless");
    wait_until(Duration::from_secs(60), "every row under endless pressure to fail", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed'") == STUCK
    });
    let st = endless.stop();
    assert!(st.success(), "the worker exited with {st}:\n{}", endless.tail());
    let by = outbox_by_status(&mut c);
    assert_eq!(by.get("failed/max_attempts_exceeded"), Some(&STUCK), "{by:?}");
    assert_eq!(by.get("done"), Some(&EVENTS), "rows done before were touched: {by:?}");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed' AND attempts <> 3"),
        0
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed' AND error LIKE '%statement timeout%'"
        ),
        STUCK
    );
    tx.rollback().unwrap();
    // Once the pressure is gone, replay brings them home.
    let r = run(&mut db.chronicle(&[
        "replay-failed",
        "--by",
        "chaos",
        "--reason",
        "lock released",
        "--error-reason",
        "max_attempts_exceeded",
        "--limit",
        "1000",
        "--json",
    ]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(json_of(&r)["replayed"], STUCK, "{r}");
    final_drain(&db, &mut c, "10", Duration::from_secs(60));
    let t = tally(&mut c);
    t.assert_exactly_once("after the replay");

    eprintln!(
        "chaos lock pressure: {bursts} bursts of LOCK TABLE chronicle_entries IN ACCESS EXCLUSIVE MODE ({} locked in all) \
         during a drain of {EVENTS} events (statement timeout 0.1 s, backoff 0.05-0.4 s, batch 10, 2 threads): {retried_rows} \
         rows retried, {extra_attempts} extra attempts, max attempts {max_attempts}, retry_scheduled_total {retries_metric}; \
         all {EVENTS} done, failed 0. Endless lock, OUTBOX_MAX_ATTEMPTS=3: {STUCK} rows failed max_attempts_exceeded after \
         exactly 3 attempts with 'statement timeout', the {EVENTS} done rows untouched; replayed after release and all \
         {} entries = events, missing {}, duplicated {}. Run time {}",
        secs(held),
        t.entries,
        t.missing,
        t.duplicated,
        secs(started.elapsed())
    );
}

// ---------------------------------------------------------------------------------
// 5. Replay storm

#[test]
fn chaos_replay_storm_during_drains_and_rebuilds_keeps_the_audit_exact() {
    let started = Instant::now();
    let db = TestDb::new();
    let mut c = db.client();
    let logs = Logs::new("storm");
    inject(&db, 2000, 10);
    // The read model refuses summaries with a marker: rejected_by_read_model. HAIL rows
    // (the oldest) keep failing after their first replays, until their constraint goes
    // too: they are replayed more than once.
    c.batch_execute(
        "ALTER TABLE chronicle_entries ADD CONSTRAINT chaos_no_storm CHECK (summary NOT LIKE '%STORM%');
         ALTER TABLE chronicle_entries ADD CONSTRAINT chaos_no_hail CHECK (summary NOT LIKE '%HAIL%');",
    )
    .unwrap();
    const HAIL: i64 = 8;
    const STORM: i64 = 150;
    const BAD: i64 = HAIL + STORM;
    let storm_library = Uuid::now_v7();
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
         SELECT gen_random_uuid(), $1, 'book', gen_random_uuid(), 'BookRenamed',
                jsonb_build_object('title', 'calm ' || g), jsonb_build_object('title', 'HAIL ' || g), now()
         FROM generate_series(1, $2::bigint) g",
        &[&storm_library, &HAIL],
    )
    .unwrap();
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
         SELECT gen_random_uuid(), $1, 'book', gen_random_uuid(), 'BookRenamed',
                jsonb_build_object('title', 'calm ' || g), jsonb_build_object('title', 'STORM ' || g), now()
         FROM generate_series(1, $2::bigint) g",
        &[&storm_library, &STORM],
    )
    .unwrap();
    let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "100"]));
    assert_eq!(r.code, Some(0), "{r}");
    let by = outbox_by_status(&mut c);
    assert_eq!(by.get("failed/rejected_by_read_model"), Some(&BAD), "{by:?}");
    c.batch_execute("ALTER TABLE chronicle_entries DROP CONSTRAINT chaos_no_storm").unwrap();

    let writer = start_writer(&db.server, &db.name, libraries_of(&mut c), Duration::from_millis(100), 5);
    let spawn = |i: usize| {
        let mut cmd = worker_cmd(&db, &["--batch-size", "20"]);
        cmd.env("OUTBOX_WORKER_ID", format!("s{i}"));
        logs.spawn(cmd, &format!("s{i}"))
    };
    let mut workers = vec![spawn(0), spawn(1)];

    // The storm: small replays, one after another, each with its own reason.
    let rebuilds_done = Arc::new(AtomicBool::new(false));
    let round_now = Arc::new(Mutex::new(0u32));
    let storm = {
        let (done_flag, round_now) = (rebuilds_done.clone(), round_now.clone());
        let (url, mut sc) = (db.url(), db.client());
        std::thread::spawn(move || {
            let mut last_reason: BTreeMap<i64, String> = BTreeMap::new();
            let mut times: BTreeMap<i64, i64> = BTreeMap::new();
            let (mut replayed_sum, mut refused, mut skipped_live, mut round) = (0i64, 0u32, 0usize, 0u32);
            loop {
                round += 1;
                *round_now.lock().unwrap() = round;
                let reason = format!("round {round}");
                let r = run(chronicle_cmd(&[
                    "replay-failed",
                    "--by",
                    "storm",
                    "--reason",
                    &reason,
                    "--limit",
                    "4",
                    "--json",
                ])
                .env("DATABASE_URL", &url));
                match r.code {
                    Some(0) => {
                        let v = json_of(&r);
                        let n = v["replayed"].as_i64().expect("replayed");
                        let rows = v["rows"].as_array().expect("rows");
                        assert_eq!(rows.len() as i64, n, "{r}");
                        for row in rows {
                            let id = row["outbox_id"].as_i64().expect("outbox_id");
                            last_reason.insert(id, reason.clone());
                            *times.entry(id).or_default() += 1;
                            assert_eq!(row["replay_count"].as_i64(), Some(times[&id]), "{r}");
                        }
                        replayed_sum += n;
                        skipped_live += v["skipped_live_delivery"].as_array().map_or(0, Vec::len);
                    }
                    // Documented: refused as a whole when a concurrent writer gives an event a
                    // live delivery at the same instant; nothing changed, run it again.
                    Some(1) => refused += 1,
                    _ => panic!("replay-failed, round {round}: {r}"),
                }
                let failed = count(&mut sc, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed'");
                if failed == 0 && done_flag.load(Ordering::SeqCst) {
                    break;
                }
                assert!(round < 2000, "the storm does not end: {failed} rows still failed");
                std::thread::sleep(Duration::from_millis(60));
            }
            (round, replayed_sum, refused, skipped_live, last_reason, times)
        })
    };

    wait_until(Duration::from_secs(60), "a HAIL row to be replayed twice", || {
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE replay_count >= 2") > 0
    });
    c.batch_execute("ALTER TABLE chronicle_entries DROP CONSTRAINT chaos_no_hail").unwrap();
    let mut rebuilds = Vec::new();
    for mode in [&["rebuild", "--json"][..], &["rebuild", "--swap", "--json"]] {
        let from = *round_now.lock().unwrap();
        let r = run(&mut db.chronicle(mode));
        let to = *round_now.lock().unwrap();
        assert_eq!(r.code, Some(0), "{mode:?}: {r}");
        let v = json_of(&r);
        rebuilds.push(format!("{} ({} rows, storm rounds {from}-{to} meanwhile)", v["mode"], v["rows_written"]));
    }
    rebuilds_done.store(true, Ordering::SeqCst);
    let (rounds, replayed_sum, refused, skipped_live, last_reason, times) =
        storm.join().expect("the storm thread panicked");
    let written = writer.finish();
    wait_until(Duration::from_secs(120), "the drain to complete", || in_flight(&mut c) == 0);
    for w in &mut workers {
        w.assert_running();
        let st = w.stop();
        assert!(st.success(), "{} exited with {st}:\n{}", w.name, w.tail());
    }

    let t = tally(&mut c);
    t.assert_exactly_once("replay storm");
    // The audit: exactly the rows the commands reported, each with its last round's reason.
    let audit: Vec<(i64, i32, Option<String>, Option<String>)> = c
        .query(
            "SELECT id, replay_count, last_replayed_by, last_replayed_reason FROM chronicle_outbox_events
             WHERE replay_count > 0 ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let audited: BTreeSet<i64> = audit.iter().map(|a| a.0).collect();
    let reported: BTreeSet<i64> = last_reason.keys().copied().collect();
    assert_eq!(audited, reported, "rows with replay_count > 0 vs rows the replays reported");
    let mut wrong = Vec::new();
    for (id, n, by, reason) in &audit {
        if i64::from(*n) != times[id] || by.as_deref() != Some("storm") || reason.as_ref() != last_reason.get(id) {
            wrong.push(format!(
                "{id}: count {n} (reported {}), by {by:?}, reason {reason:?} (expected {:?})",
                times[id], last_reason[id]
            ));
        }
    }
    assert!(wrong.is_empty(), "audit fields wrong:\n{}", wrong.join("\n"));
    let sum_counts: i64 = audit.iter().map(|a| i64::from(a.1)).sum();
    assert_eq!(sum_counts, replayed_sum, "sum of replay_count vs rows reported replayed");
    // Every failed row was replayed, or closed by a rebuild that wrote its entry first.
    let closed = count(
        &mut c,
        "SELECT count(*) FROM chronicle_outbox_events
         WHERE replay_count = 0 AND status = 'done' AND rebuild_run_id IS NOT NULL AND error LIKE 'closed by rebuild run #%'",
    );
    assert_eq!(audit.len() as i64 + closed, BAD, "every failed row was replayed or closed by a rebuild");
    let storm_entries = c
        .query_one(
            "SELECT count(*) FROM chronicle_entries WHERE library_id = $1 AND (summary LIKE '%STORM%' OR summary LIKE '%HAIL%')",
            &[&storm_library],
        )
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(storm_entries, BAD);
    let max_count = audit.iter().map(|a| a.1).max().unwrap_or(0);
    let multi = audit.iter().filter(|a| a.1 > 1).count();
    assert!(max_count >= 2, "no row was replayed twice");

    eprintln!(
        "chaos replay storm: {BAD} rows failed rejected_by_read_model (CHECK constraints), then {rounds} rounds of \
         replay-failed --limit 4 (each its own --reason) while 2 workers drained {} new events and rebuilds ran: {}; \
         {HAIL} rows kept failing until their constraint was dropped mid-storm ({multi} rows replayed more than once, \
         up to {max_count} times); {replayed_sum} rows reported replayed, {refused} rounds refused (exit 1, documented), {skipped_live} \
         skipped_live_delivery reports. Checked: sum(replay_count) {sum_counts} = rows reported; every replayed row's \
         replay_count, last_replayed_by 'storm' and last_replayed_reason exactly as reported; entries {} = events {}, \
         missing {}, duplicated {}, pending/processing {}/{}, failed {}. Run time {}",
        written.events,
        rebuilds.join(", "),
        t.entries,
        t.events,
        t.missing,
        t.duplicated,
        t.pending,
        t.processing,
        t.failed,
        secs(started.elapsed())
    );
}

// ---------------------------------------------------------------------------------
// 6. Scope under attack

#[test]
fn chaos_scope_under_attack_never_reaches_another_library() {
    let started = Instant::now();
    let db = TestDb::new();
    let mut owner = db.client();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    const NA: i64 = 30;
    const NB: i64 = 40;
    for (lib, n, title) in [(a, NA, "aardvark notes"), (b, NB, "zebrafish secret 秘密文件")] {
        owner
            .execute(
                "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at, reason)
                 SELECT gen_random_uuid(), $1, 'book', gen_random_uuid(), 'BookRenamed',
                        jsonb_build_object('title', 'old ' || g), jsonb_build_object('title', $3 || ' ' || g), now(), $3
                 FROM generate_series(1, $2::bigint) g",
                &[&lib, &n, &title],
            )
            .unwrap();
    }
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let b_rows = |c: &mut Client| -> Vec<Value> {
        c.query(
            "SELECT to_jsonb(x) FROM (SELECT 'event' AS t, to_jsonb(e) AS row FROM chronicle_events e WHERE library_id = $1
             UNION ALL SELECT 'entry', to_jsonb(n) FROM chronicle_entries n WHERE library_id = $1) x ORDER BY 1",
            &[&b],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let b_before = b_rows(&mut owner);
    let b_event: Uuid =
        owner.query_one("SELECT id FROM chronicle_events WHERE library_id = $1 LIMIT 1", &[&b]).unwrap().get(0);
    let b_ids: Vec<Uuid> = owner
        .query("SELECT id FROM chronicle_events WHERE library_id = $1", &[&b])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    let role = AppRole::create(&db);
    let notices = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut cfg: postgres::Config = db.server.key_value(&db.name).parse().unwrap();
    let sink = notices.clone();
    cfg.notice_callback(move |n| sink.lock().unwrap().push(format!("{} {}", n.message(), n.detail().unwrap_or(""))));
    let mut app = cfg.connect(NoTls).expect("the attacker's connection");
    app.batch_execute(&format!("SET ROLE {}", role.name)).unwrap();

    let mut tried: Vec<String> = Vec::new();
    let mut leaks: Vec<String> = Vec::new();
    let q = |app: &mut Client, sql: &str| -> Result<i64, postgres::Error> { app.query_one(sql, &[]).map(|r| r.get(0)) };
    // Each attack: (what it tried, what it must get).
    let expect_count =
        |app: &mut Client, what: &str, sql: &str, want: i64, tried: &mut Vec<String>, leaks: &mut Vec<String>| {
            tried.push(what.to_string());
            match q(app, sql) {
                Ok(n) if n == want => {}
                Ok(n) => leaks.push(format!("{what}: got {n}, expected {want} ({sql})")),
                Err(e) => leaks.push(format!("{what}: unexpected error {e} ({sql})")),
            }
        };
    let expect_refused =
        |app: &mut Client, what: &str, sql: &str, state: &str, tried: &mut Vec<String>, leaks: &mut Vec<String>| {
            tried.push(what.to_string());
            match app.batch_execute(sql) {
                Ok(()) => leaks.push(format!("{what}: was NOT refused ({sql})")),
                Err(e) if state.is_empty() || sql_state(&e) == state => {}
                Err(e) => leaks.push(format!("{what}: refused with {} instead of {state}: {e}", sql_state(&e))),
            }
        };
    let (sa, sb) = (a.to_string(), b.to_string());

    // No library named: nothing at all (fail closed).
    expect_count(
        &mut app,
        "count entries, no library set",
        "SELECT count(*) FROM chronicle_entries",
        0,
        &mut tried,
        &mut leaks,
    );
    expect_count(
        &mut app,
        "count events, no library set",
        "SELECT count(*) FROM chronicle_events",
        0,
        &mut tried,
        &mut leaks,
    );
    app.batch_execute(&format!("SET chronicle.library_id = '{sa}'")).unwrap();
    expect_count(&mut app, "count own entries", "SELECT count(*) FROM chronicle_entries", NA, &mut tried, &mut leaks);
    expect_count(&mut app, "count own events", "SELECT count(*) FROM chronicle_events", NA, &mut tried, &mut leaks);
    for (what, sql) in [
        ("read B's entries by library_id", format!("SELECT count(*) FROM chronicle_entries WHERE library_id = '{sb}'")),
        ("read B's events by library_id", format!("SELECT count(*) FROM chronicle_events WHERE library_id = '{sb}'")),
        ("read B's event by id", format!("SELECT count(*) FROM chronicle_events WHERE id = '{b_event}'")),
        ("read B's entry by id", format!("SELECT count(*) FROM chronicle_entries WHERE id = '{b_event}'")),
        ("search B's word", "SELECT count(*) FROM chronicle_entries WHERE search @@ to_tsquery('simple', 'zebrafish')".into()),
        ("search B's Chinese word", "SELECT count(*) FROM chronicle_entries WHERE search @@ to_tsquery('simple', '秘密')".into()),
        ("search B's reason in events", "SELECT count(*) FROM chronicle_events WHERE reason LIKE '%zebrafish%'".into()),
        ("count other libraries", format!("SELECT count(DISTINCT library_id) FROM chronicle_entries WHERE library_id <> '{sa}'")),
        ("join events to entries across libraries", format!("SELECT count(*) FROM chronicle_events e JOIN chronicle_entries n USING (id) WHERE e.library_id = '{sb}' OR n.library_id = '{sb}'")),
    ] {
        expect_count(&mut app, what, &sql, 0, &mut tried, &mut leaks);
    }
    expect_count(
        &mut app,
        "group by library",
        "SELECT count(*) FROM (SELECT library_id FROM chronicle_entries GROUP BY 1) g",
        1,
        &mut tried,
        &mut leaks,
    );
    // Sanity: the same searches find the own library's rows.
    expect_count(
        &mut app,
        "search own word (control)",
        "SELECT count(*) FROM chronicle_entries WHERE search @@ to_tsquery('simple', 'aardvark')",
        NA,
        &mut tried,
        &mut leaks,
    );
    // An error oracle: the division by zero would only fire on B's rows.
    expect_count(
        &mut app,
        "division-by-zero oracle on B's rows",
        &format!(
            "SELECT count(*) FROM chronicle_entries WHERE 1 / (CASE WHEN library_id = '{sb}' THEN 0 ELSE 1 END) = 1"
        ),
        NA,
        &mut tried,
        &mut leaks,
    );
    // A leaky function (RAISE NOTICE of every row it sees), cheap enough that the
    // planner would like to run it first: the policy must still filter before it.
    tried.push("leaky function printing every row it sees".into());
    match app.batch_execute(
        "CREATE FUNCTION pg_temp.peek(t text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS
         $$ BEGIN RAISE NOTICE 'peek: %', t; RETURN true; END $$",
    ) {
        Ok(()) => {
            for sql in [
                "SELECT count(*) FROM chronicle_entries WHERE pg_temp.peek(summary || ' ' || library_id::text)",
                "SELECT count(*) FROM chronicle_events WHERE pg_temp.peek(after::text || coalesce(reason, ''))",
            ] {
                match q(&mut app, sql) {
                    Ok(n) if n == NA => {}
                    other => leaks.push(format!("leaky function: {other:?} ({sql})")),
                }
            }
        }
        Err(e) => eprintln!("(the attacker may not create a temporary function: {e})"),
    }
    expect_refused(
        &mut app,
        "declare a function LEAKPROOF",
        "CREATE FUNCTION pg_temp.peek2(t text) RETURNS boolean LANGUAGE sql LEAKPROOF AS $$ SELECT true $$",
        "42501",
        &mut tried,
        &mut leaks,
    );
    expect_refused(
        &mut app,
        "SET row_security = off",
        "SET row_security = off; SELECT count(*) FROM chronicle_entries",
        "42501",
        &mut tried,
        &mut leaks,
    );
    app.batch_execute("RESET row_security").unwrap();
    // COPY applies the policies too.
    tried.push("COPY chronicle_entries TO STDOUT".into());
    let mut copied = String::new();
    app.copy_out("COPY chronicle_entries TO STDOUT").expect("COPY TO").read_to_string(&mut copied).unwrap();
    if copied.lines().count() as i64 != NA || copied.contains("zebrafish") {
        leaks.push(format!(
            "COPY TO returned {} lines, zebrafish: {}",
            copied.lines().count(),
            copied.contains("zebrafish")
        ));
    }
    // Writes into B, and any change of events, are refused.
    let b_insert = format!(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         VALUES (gen_random_uuid(), '{sb}', 'tag', gen_random_uuid(), 'TagCreated', '{{\"name\": \"planted\"}}', now())"
    );
    for (what, sql) in [
        ("insert an event into B", b_insert.clone()),
        ("insert an entry into B", format!("INSERT INTO chronicle_entries (id, library_id, entity_type, entity_id, event_type, occurred_at, created_at, summary, search, projection_version) VALUES (gen_random_uuid(), '{sb}', 'tag', gen_random_uuid(), 'TagCreated', now(), now(), 'planted', '', 1)")),
        ("update B's entries", format!("UPDATE chronicle_entries SET summary = 'hacked' WHERE library_id = '{sb}'")),
        ("delete B's entries", format!("DELETE FROM chronicle_entries WHERE library_id = '{sb}'")),
        ("update events", "UPDATE chronicle_events SET reason = 'hacked'".into()),
        ("delete events", "DELETE FROM chronicle_events".into()),
        ("delete events with allow_erase on", "SET chronicle.allow_erase = 'on'; DELETE FROM chronicle_events".into()),
        ("truncate events", "TRUNCATE chronicle_events".into()),
        ("read the outbox", "SELECT count(*) FROM chronicle_outbox_events".into()),
        ("write the outbox", format!("INSERT INTO chronicle_outbox_events (event_id) VALUES ('{b_event}')")),
    ] {
        expect_refused(&mut app, what, &sql, "42501", &mut tried, &mut leaks);
    }
    app.batch_execute("RESET chronicle.allow_erase").unwrap();
    expect_refused(
        &mut app,
        "call the SECURITY DEFINER enqueue function",
        "SELECT chronicle_events_enqueue()",
        "",
        &mut tried,
        &mut leaks,
    );
    // An id of B reused in A: refused by the primary key; the message names only the id
    // the attacker already had (an existence oracle for known ids, inherent to unique
    // keys under row-level security), never B's content.
    tried.push("insert into A with the id of B's event".into());
    match app.batch_execute(&format!(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         VALUES ('{b_event}', '{sa}', 'tag', gen_random_uuid(), 'TagCreated', '{{\"name\": \"x\"}}', now())"
    )) {
        Ok(()) => leaks.push("an event of A was written with B's event id".into()),
        Err(e) => {
            let text = format!("{e} {:?}", e.as_db_error().map(|d| d.detail()));
            if text.contains("zebrafish") || text.contains(&sb) {
                leaks.push(format!("the duplicate-key error shows B's content: {text}"));
            }
        }
    }
    // The setting: unset, emptied or garbage mid-transaction fails closed; switched, the
    // scope is exactly the library it names (never a union); a rollback restores it.
    app.batch_execute("BEGIN").unwrap();
    app.execute("SELECT set_config('chronicle.library_id', '', true)", &[]).unwrap();
    expect_count(
        &mut app,
        "empty setting mid-transaction",
        "SELECT count(*) FROM chronicle_entries",
        0,
        &mut tried,
        &mut leaks,
    );
    app.execute("SELECT set_config('chronicle.library_id', $1, true)", &[&sb]).unwrap();
    expect_count(
        &mut app,
        "switched setting: own library A invisible",
        &format!("SELECT count(*) FROM chronicle_entries WHERE library_id = '{sa}'"),
        0,
        &mut tried,
        &mut leaks,
    );
    expect_count(
        &mut app,
        "switched setting: exactly the named library",
        "SELECT count(*) FROM chronicle_entries",
        NB,
        &mut tried,
        &mut leaks,
    );
    app.batch_execute("ROLLBACK").unwrap();
    expect_count(
        &mut app,
        "after ROLLBACK the scope is A again",
        "SELECT count(*) FROM chronicle_entries",
        NA,
        &mut tried,
        &mut leaks,
    );
    for (what, value) in [
        ("garbage setting", "not-a-uuid".to_string()),
        ("SQL in the setting", format!("{sa}' OR '1'='1")),
        ("two libraries in the setting", format!("{sa},{sb}")),
        ("a wildcard setting", "%".to_string()),
    ] {
        tried.push(what.to_string());
        app.execute("SELECT set_config('chronicle.library_id', $1, false)", &[&value]).unwrap();
        match q(&mut app, "SELECT count(*) FROM chronicle_entries") {
            Err(e) if sql_state(&e) == "22P02" => {}
            other => leaks.push(format!("{what} ({value:?}): {other:?}")),
        }
    }
    app.batch_execute("RESET chronicle.library_id").unwrap();
    expect_count(&mut app, "after RESET", "SELECT count(*) FROM chronicle_entries", 0, &mut tried, &mut leaks);

    let seen = notices.lock().unwrap().clone();
    let notice_leaks: Vec<&String> = seen.iter().filter(|n| n.contains("zebrafish") || n.contains(&sb)).collect();
    if !notice_leaks.is_empty() {
        leaks.push(format!("the leaky function saw B's rows: {notice_leaks:?}"));
    }
    drop(app);
    let b_after = b_rows(&mut owner);
    let b_changed = b_before != b_after;
    if b_changed {
        leaks.push("B's events or entries changed".into());
    }
    let planted = count(&mut owner, "SELECT count(*) FROM chronicle_events WHERE after->>'name' = 'planted'");
    assert!(b_ids.len() as i64 == NB);
    assert!(leaks.is_empty(), "{} of {} attacks got through:\n{}", leaks.len(), tried.len(), leaks.join("\n"));
    assert_eq!(planted, 0);
    eprintln!(
        "chaos scope under attack: an application role (SELECT, INSERT on events; SELECT on entries) scoped to library A \
         made {} probes, attacks on library B plus 4 controls on its own: {}. All {} held: no B row or count seen, the leaky function saw {} rows and none \
         of B's, B's events and entries unchanged, nothing planted. Note: the scope is whatever chronicle.library_id names; \
         a role that sets it to B sees exactly B (by design, docs/DESIGN.md §2). Run time {}",
        tried.len(),
        tried.join("; "),
        tried.len(),
        seen.len(),
        secs(started.elapsed())
    );
}

// ---------------------------------------------------------------------------------
// 7. Bad input everywhere

const LIB: &str = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01";
const SHELF: &str = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e03";

fn good_event() -> Value {
    json!({"library_id": LIB, "entity_type": "book", "entity_id": "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e05",
           "event_type": "BookCreated", "after": {"title": "Good", "bookshelf_id": SHELF},
           "occurred_at": "2025-03-01T09:30:00Z"})
}

fn block_moved(position: Value) -> Value {
    json!({"library_id": LIB, "entity_type": "block", "entity_id": "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e06",
           "event_type": "BlockMoved", "before": {"position": 1}, "after": {"position": position},
           "occurred_at": "2025-03-01T09:30:00Z"})
}

/// `good_event()` with raw bytes in place of its title's text.
fn title_bytes(b: &[u8]) -> Vec<u8> {
    let s = good_event().to_string();
    let (head, tail) = s.split_once("Good").unwrap();
    [head.as_bytes(), b, tail.as_bytes()].concat()
}

/// `good_event()` with `path` (`key` or `after.key`) set to `v`.
fn with(path: &str, v: Value) -> Vec<u8> {
    let mut e = good_event();
    match path.split_once('.') {
        Some((side, key)) => e[side][key] = v,
        None => e[path] = v,
    }
    e.to_string().into_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// Exit 2, this text in stderr, nothing written.
    Refused(&'static str),
    /// Exit 0, one event written, stored verbatim.
    Accepted,
    /// Either, as long as it is clean.
    Either,
}

/// Row counts of every chronicle table and the list of tables: what must not change
/// when an input is refused (or accepted, for the other tables).
fn footprint(c: &mut Client) -> (Vec<i64>, String) {
    let counts = [
        "chronicle_events",
        "chronicle_outbox_events",
        "chronicle_entries",
        "chronicle_rebuild_runs",
        "chronicle_erasures",
        "chronicle_schema_migrations",
    ]
    .iter()
    .map(|t| count(c, &format!("SELECT count(*) FROM {t}")))
    .collect();
    let tables: String = c
        .query_one(
            "SELECT string_agg(relname::text, ',' ORDER BY relname) FROM pg_class
             WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')",
            &[],
        )
        .unwrap()
        .get(0);
    (counts, tables)
}

/// Bad values for a worker setting, from its kind: empty, out of range, not a number.
fn bad_values(s: &Setting) -> Vec<String> {
    let mut v: Vec<String> = vec!["".into(), "   ".into()];
    match s.kind {
        Kind::DatabaseUrl => v.extend(
            [
                "mysql://u:pw@127.0.0.1/db",
                "not a url",
                "postgres://u:pw@127.0.0.1:notaport/db",
                "postgres://u@127.0.0.1/db?sslmode=sometimes",
                "host=127.0.0.1 bogus_key=1",
            ]
            .map(String::from),
        ),
        Kind::Text => {
            if s.var == "OUTBOX_WORKER_ID" {
                v.push("w".repeat(201));
            }
        }
        Kind::Count { min, max } => {
            v.extend(["abc", "-1", "1.5", "1e3", "0x10", "99999999999999999999999", "12abc"].map(String::from));
            if min > 0 {
                v.push((min - 1).to_string());
            }
            v.push((max + 1).to_string());
        }
        Kind::Seconds { allow_zero } => {
            v.extend(
                ["abc", "-1", "1y", "400d", "nan", "inf", "1e3", "0x10", "1..2", "5 s", "ms", "-0.5s"]
                    .map(String::from),
            );
            if !allow_zero {
                v.extend(["0", "0.0", "0ms"].map(String::from));
            }
        }
        Kind::Port => v.extend(["abc", "-1", "65536", "1.5", "99999", "80x"].map(String::from)),
        Kind::Choice(words) => {
            v.extend([
                "maybe".to_string(),
                words[0].to_uppercase(),
                format!("{},{}", words[0], words[words.len() - 1]),
            ]);
        }
    }
    v
}

/// Runs a command that must refuse its configuration at once: exit 2, never hanging
/// (a bad value accepted would start a worker, which the trap port would notice).
fn run_bounded(cmd: &mut Command) -> Ran {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning chronicle");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn chaos_bad_input_everywhere_is_refused_cleanly_or_stored_verbatim() {
    let started = Instant::now();
    let db = TestDb::new();
    let mut c = db.client();
    let mut tried = 0u32;
    let mut clean = 0u32;
    let mut refused = 0u32;
    let mut problems: Vec<String> = Vec::new();
    let mut sections: Vec<String> = Vec::new();

    // --- append ---------------------------------------------------------------------
    let big = "x".repeat(20 * 1024 * 1024);
    let mb_title = "长文本 long text ".repeat(1024 * 1024 / 20);
    let mut many_keys = good_event();
    for i in 0..5000 {
        many_keys["after"][format!("extra_{i}")] = json!(i);
    }
    let sql_strings = json!({
        "library_id": LIB, "entity_type": "book", "entity_id": "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e05",
        "event_type": "BookCreated", "occurred_at": "2025-03-01T09:30:00Z",
        "after": {"title": "Robert'); DROP TABLE chronicle_events; --", "bookshelf_id": SHELF,
                  "'; DROP TABLE chronicle_entries; --": "$$ || pg_sleep(10) || $$", "%_\\": "\\\\' \" \u{1F980}"},
        "reason": "'; DROP TABLE chronicle_entries; --",
        "client": "Robert'); DELETE FROM chronicle_events WHERE ('1'='1",
        "request_id": "$1 $$; TRUNCATE chronicle_outbox_events; $$ %_ \\"
    });
    let utf16: Vec<u8> = {
        let mut v = vec![0xFF, 0xFE];
        for u in good_event().to_string().encode_utf16() {
            v.extend_from_slice(&u.to_le_bytes());
        }
        v
    };
    let replace = |from: &str, to: &str| good_event().to_string().replace(from, to).into_bytes();
    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        // malformed JSON
        ("trailing comma", br#"{"library_id": "x", }"#.to_vec(), Want::Refused("malformed JSON")),
        ("single quotes", b"{'library_id': 'x'}".to_vec(), Want::Refused("malformed JSON")),
        ("unterminated string", br#"{"library_id": "abc"#.to_vec(), Want::Refused("malformed JSON")),
        ("NaN", replace("\"Good\"", "NaN"), Want::Refused("malformed JSON")),
        (
            "a comment line",
            [b"// a comment\n".as_slice(), good_event().to_string().as_bytes()].concat(),
            Want::Refused("line 1: malformed JSON"),
        ),
        ("two objects on one line", format!("{0}{0}", good_event()).into_bytes(), Want::Refused("malformed JSON")),
        ("bare null", b"null".to_vec(), Want::Refused("must be a JSON object")),
        ("bare string", b"\"event\"".to_vec(), Want::Refused("must be a JSON object")),
        ("bare number", b"42".to_vec(), Want::Refused("must be a JSON object")),
        ("empty object", b"{}".to_vec(), Want::Refused("library_id is missing")),
        ("100000 nested arrays", "[".repeat(100_000).into_bytes(), Want::Refused("malformed JSON")),
        (
            "200 nested arrays in after",
            replace("\"Good\"", &format!("\"Good\",\"deep\":{}1{}", "[".repeat(200), "]".repeat(200))),
            Want::Refused("recursion limit"),
        ),
        ("only whitespace", b"   \n\t\n".to_vec(), Want::Refused("no events")),
        ("BOM then garbage", b"\xEF\xBB\xBFxyz".to_vec(), Want::Refused("malformed JSON")),
        ("UTF-16 document", utf16, Want::Refused("not valid UTF-8")),
        // wrong types
        ("library_id a number", with("library_id", json!(123)), Want::Refused("library_id: must be a UUID string")),
        ("entity_id a boolean", with("entity_id", json!(true)), Want::Refused("entity_id: must be a UUID string")),
        (
            "occurred_at epoch seconds",
            with("occurred_at", json!(1740821400)),
            Want::Refused("occurred_at: must be an RFC 3339 time string"),
        ),
        ("entity_type a number", with("entity_type", json!(5)), Want::Refused("entity_type: must be a string")),
        (
            "event_type an array",
            with("event_type", json!(["BookCreated"])),
            Want::Refused("event_type: must be a string"),
        ),
        ("event_type null", with("event_type", json!(null)), Want::Refused("event_type is null")),
        ("after a string", with("after", json!("title")), Want::Refused("after: must be a JSON object or null")),
        ("before an array", with("before", json!([])), Want::Refused("before: must be a JSON object or null")),
        ("diff a number", with("diff", json!(5)), Want::Refused("diff: must be a JSON object")),
        ("reason an object", with("reason", json!({})), Want::Refused("reason: must be a string")),
        ("ip a number", with("ip", json!(3232235777u64)), Want::Refused("ip: must be a string")),
        ("ip not an address", with("ip", json!("999.1.1.1")), Want::Refused("is not an IP address")),
        (
            "bookshelf_id not a UUID",
            with("after.bookshelf_id", json!("shelf-1")),
            Want::Refused("after.bookshelf_id must be"),
        ),
        ("title null", with("after.title", json!(null)), Want::Refused("after.title must be")),
        (
            "position a string",
            block_moved(json!("3")).to_string().into_bytes(),
            Want::Refused("after.position must be"),
        ),
        (
            "position fractional",
            block_moved(json!(1.5)).to_string().into_bytes(),
            Want::Refused("after.position must be"),
        ),
        (
            "position 1e400",
            block_moved(json!(0)).to_string().replace("\"position\":0", "\"position\":1e400").into_bytes(),
            Want::Refused("after.position must be"),
        ),
        (
            "position past u64",
            block_moved(json!(0))
                .to_string()
                .replace("\"position\":0", "\"position\":18446744073709551616")
                .into_bytes(),
            Want::Refused("after.position must be"),
        ),
        ("position i64::MIN", block_moved(json!(i64::MIN)).to_string().into_bytes(), Want::Either),
        // huge
        ("a 20 MB line", with("after.title", json!(big)), Want::Refused("16 MiB")),
        ("a 1 MB after.title", with("after.title", json!(mb_title)), Want::Accepted),
        ("5000 extra payload keys", many_keys.to_string().into_bytes(), Want::Accepted),
        // invalid UUIDs
        ("empty UUID", with("library_id", json!("")), Want::Refused("is not a UUID")),
        (
            "UUID one digit short",
            with("library_id", json!("0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e0")),
            Want::Refused("is not a UUID"),
        ),
        (
            "UUID with a g",
            with("library_id", json!("0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e0g")),
            Want::Refused("is not a UUID"),
        ),
        ("UUID with a space", with("library_id", json!(format!(" {LIB}"))), Want::Refused("is not a UUID")),
        ("UUID with a newline", with("entity_id", json!(format!("{LIB}\n"))), Want::Refused("is not a UUID")),
        (
            "SQL as a UUID",
            with("library_id", json!("'; DROP TABLE chronicle_events; --")),
            Want::Refused("is not a UUID"),
        ),
        ("braced UUID", with("library_id", json!(format!("{{{LIB}}}"))), Want::Either),
        ("urn UUID", with("library_id", json!(format!("urn:uuid:{LIB}"))), Want::Either),
        ("nil UUID", with("actor_user_id", json!("00000000-0000-0000-0000-000000000000")), Want::Accepted),
        // invalid timestamps
        ("month 13", with("occurred_at", json!("2025-13-01T00:00:00Z")), Want::Refused("is not an RFC 3339 time")),
        ("date only", with("occurred_at", json!("2025-03-01")), Want::Refused("is not an RFC 3339 time")),
        ("no offset", with("occurred_at", json!("2025-03-01T09:30:00")), Want::Refused("is not an RFC 3339 time")),
        ("a word", with("occurred_at", json!("yesterday")), Want::Refused("is not an RFC 3339 time")),
        ("empty time", with("occurred_at", json!("")), Want::Refused("is not an RFC 3339 time")),
        ("hour 24", with("occurred_at", json!("2025-03-01T24:00:00Z")), Want::Refused("is not an RFC 3339 time")),
        (
            "offset +25:00",
            with("occurred_at", json!("2025-03-01T09:30:00+25:00")),
            Want::Refused("is not an RFC 3339 time"),
        ),
        (
            "five-digit year",
            with("occurred_at", json!("10000-01-01T00:00:00Z")),
            Want::Refused("is not an RFC 3339 time"),
        ),
        ("space for T", with("occurred_at", json!("2025-03-01 09:30:00Z")), Want::Either),
        ("year 9999", with("occurred_at", json!("9999-12-31T23:59:59.999999Z")), Want::Accepted),
        ("year 1", with("created_at", json!("0001-01-01T00:00:00Z")), Want::Accepted),
        ("nanoseconds and +08:00", with("occurred_at", json!("2025-03-01T09:30:00.123456789+08:00")), Want::Accepted),
        // unknown entity and event types
        ("entity type page", with("entity_type", json!("page")), Want::Refused("is not an entity type")),
        ("entity type Book", with("entity_type", json!("Book")), Want::Refused("is not an entity type")),
        ("entity type empty", with("entity_type", json!("")), Want::Refused("is not an entity type")),
        ("entity type padded", with("entity_type", json!(" book")), Want::Refused("is not an entity type")),
        ("entity type Cyrillic", with("entity_type", json!("книга")), Want::Refused("is not an entity type")),
        (
            "event type lowercase",
            with("event_type", json!("bookcreated")),
            Want::Refused("did you mean \"BookCreated\""),
        ),
        ("event type empty", with("event_type", json!("")), Want::Refused("is not in the event catalog")),
        // SQL-looking strings: stored verbatim
        ("SQL everywhere", sql_strings.to_string().into_bytes(), Want::Accepted),
        ("control characters", with("after.title", json!("a\u{1}b\u{1f}c\u{7f}d\t\r\n")), Want::Accepted),
        ("emoji, ZWJ, RTL override", with("after.title", json!("👩‍👩‍👧‍👦 \u{202e}txet 🦀 e\u{301}")), Want::Accepted),
        // non-UTF-8 bytes and bad escapes
        ("byte 0xFF", title_bytes(b"Go\xFFod"), Want::Refused("not valid UTF-8")),
        ("overlong slash", title_bytes(b"G\xC0\xAF"), Want::Refused("not valid UTF-8")),
        ("CESU surrogate", title_bytes(b"G\xED\xA0\x80"), Want::Refused("not valid UTF-8")),
        ("truncated sequence", title_bytes(b"G\xE4\xB8"), Want::Refused("not valid UTF-8")),
        ("Latin-1 e-acute", title_bytes(b"caf\xE9"), Want::Refused("not valid UTF-8")),
        ("lone surrogate escape", replace("Good", "\\ud800"), Want::Refused("malformed JSON")),
        ("NUL in a payload key", replace("\"title\"", "\"ti\\u0000tle\""), Want::Refused("NUL")),
        ("NUL in reason", with("reason", json!("a\u{0}b")), Want::Refused("NUL")),
    ];
    let (mut a_tried, mut a_refused, mut a_accepted) = (0, 0, 0);
    for (name, input, want) in &cases {
        let before = footprint(&mut c);
        let r = run_with_input(&mut db.chronicle(&["append", "--json"]), input);
        let after = footprint(&mut c);
        a_tried += 1;
        let crashed = r.code.is_none() || r.stderr.contains("panicked");
        let problem = if crashed {
            Some(format!("crashed: {r}"))
        } else {
            match (r.code, *want) {
                (Some(2), Want::Accepted) => Some(format!("refused, expected to be accepted: {r}")),
                (Some(2), Want::Refused(text)) if !r.stderr.contains(text) => {
                    Some(format!("refused without saying {text:?}: {r}"))
                }
                (Some(2), _) if after != before => {
                    Some(format!("refused but something changed: {before:?} -> {after:?}"))
                }
                (Some(2), _) if !r.stderr.contains("nothing was written") => {
                    Some(format!("refused without saying nothing was written: {r}"))
                }
                (Some(2), _) => {
                    a_refused += 1;
                    None
                }
                (Some(0), Want::Refused(_)) => Some(format!("accepted, expected a refusal: {r}")),
                (Some(0), _) => {
                    let ids: Vec<Uuid> = serde_json::from_str::<Vec<String>>(r.stdout.trim())
                        .map(|v| v.iter().filter_map(|s| s.parse().ok()).collect())
                        .unwrap_or_default();
                    let mut expected = before.0.clone();
                    expected[0] += 1;
                    expected[1] += 1;
                    if ids.len() != 1 || after.0 != expected || after.1 != before.1 {
                        Some(format!("accepted, but footprint {before:?} -> {after:?}, ids {ids:?}"))
                    } else {
                        a_accepted += 1;
                        // Stored verbatim: what comes back is what went in.
                        let sent: Value = serde_json::from_slice(input).unwrap();
                        let row = c
                            .query_one(
                                "SELECT after, coalesce(reason, ''), coalesce(client, ''), coalesce(request_id, '')
                                 FROM chronicle_events WHERE id = $1",
                                &[&ids[0]],
                            )
                            .unwrap();
                        let stored: (Value, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
                        let field = |k: &str| sent[k].as_str().unwrap_or("").to_string();
                        if stored != (sent["after"].clone(), field("reason"), field("client"), field("request_id")) {
                            Some(format!("not stored verbatim: {:?}", (&stored.1, &stored.2, &stored.3)))
                        } else {
                            None
                        }
                    }
                }
                _ => Some(format!("expected {want:?}: {r}")),
            }
        };
        if let Some(p) = problem {
            problems.push(format!("append {name}: {p}"));
        }
    }
    tried += a_tried;
    refused += a_refused;
    clean += a_refused + a_accepted;
    sections.push(format!(
        "append: {a_tried} inputs, {a_refused} refused with exit 2 and nothing written, {a_accepted} accepted verbatim"
    ));
    // The accepted ones project (or fail with a reason) and the tables are all still there.
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(!r.stderr.contains("panicked"), "{r}");
    assert_eq!(in_flight(&mut c), 0, "{:?}", outbox_by_status(&mut c));

    // --- every worker setting, as variable and as flag --------------------------------
    // A trap port: a refused configuration must never connect anywhere.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_url = format!("postgresql://u:pw@127.0.0.1:{}/db", trap.local_addr().unwrap().port());
    let (mut s_tried, mut s_refused) = (0, 0);
    let mut by_setting: Vec<String> = Vec::new();
    for s in WORKER_SETTINGS {
        let values = bad_values(s);
        for value in &values {
            for as_flag in [false, true] {
                let mut cmd = chronicle_cmd(&["worker", "--until-empty"]);
                cmd.env("DATABASE_URL", &trap_url).env("OUTBOX_METRICS_PORT", "0");
                if as_flag {
                    cmd.arg(format!("--{}", s.flag)).arg(value);
                } else {
                    cmd.env(s.var, value);
                }
                let r = run_bounded(&mut cmd);
                s_tried += 1;
                let named = if as_flag {
                    r.stderr.contains(&format!("--{}", s.flag)) || r.stderr.contains(s.var)
                } else {
                    r.stderr.contains(s.var)
                };
                if r.code == Some(2) && named && !r.stderr.contains("panicked") {
                    s_refused += 1;
                } else {
                    problems.push(format!(
                        "{} = {value:?} ({}): {r}",
                        s.var,
                        if as_flag { "flag" } else { "variable" }
                    ));
                }
            }
        }
        // The flag without its value.
        let r = run_bounded(chronicle_cmd(&["worker", &format!("--{}", s.flag)]).env("DATABASE_URL", &trap_url));
        s_tried += 1;
        if r.code == Some(2) && r.stderr.contains(s.flag) {
            s_refused += 1;
        } else {
            problems.push(format!("--{} without a value: {r}", s.flag));
        }
        by_setting.push(format!("{} {}", s.var, values.len() * 2 + 1));
    }
    // Non-UTF-8 values, and a rule across two settings.
    {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"5\xff");
        for (what, mut cmd) in [
            ("non-UTF-8 --batch-size", {
                let mut c = chronicle_cmd(&["worker"]);
                c.arg("--batch-size").arg(bad);
                c
            }),
            ("non-UTF-8 OUTBOX_BATCH_SIZE", {
                let mut c = chronicle_cmd(&["worker"]);
                c.env("OUTBOX_BATCH_SIZE", bad);
                c
            }),
            ("max backoff below base", {
                let mut c = chronicle_cmd(&["worker"]);
                c.env("OUTBOX_BASE_BACKOFF_SECONDS", "10").env("OUTBOX_MAX_BACKOFF_SECONDS", "5");
                c
            }),
        ] {
            cmd.env("DATABASE_URL", &trap_url).env("OUTBOX_METRICS_PORT", "0");
            let r = run_bounded(&mut cmd);
            s_tried += 1;
            if r.code == Some(2)
                && (r.stderr.contains("BATCH_SIZE")
                    || r.stderr.contains("batch-size")
                    || r.stderr.contains("MAX_BACKOFF"))
            {
                s_refused += 1;
            } else {
                problems.push(format!("{what}: {r}"));
            }
        }
    }
    // An address that does not resolve is refused naming the setting, before connecting
    // (exit 1: found when binding, not by the parser).
    let r = run_bounded(
        chronicle_cmd(&["worker", "--until-empty"])
            .env("DATABASE_URL", &trap_url)
            .env("OUTBOX_METRICS_BIND", "no-such-host.invalid")
            .env("OUTBOX_METRICS_PORT", free_port().to_string()),
    );
    s_tried += 1;
    if matches!(r.code, Some(1) | Some(2)) && r.stderr.contains("OUTBOX_METRICS_BIND") {
        s_refused += 1;
    } else {
        problems.push(format!("OUTBOX_METRICS_BIND unresolvable: {r}"));
    }
    assert!(trap.accept().is_err(), "a refused worker configuration connected to the database");
    tried += s_tried;
    refused += s_refused;
    clean += s_refused;
    sections.push(format!("worker settings: {s_tried} bad values (each of {} settings empty/out of range/not a number, as variable and as flag: {}), {s_refused} refused with exit 2 naming the setting, none connected", WORKER_SETTINGS.len(), by_setting.join(", ")));

    // --- replay-failed --reason/--by and entries --search with hostile text ------------
    const HOSTILE: &[&str] = &[
        "'; DROP TABLE chronicle_entries; --",
        "\\",
        "\\\\'",
        "%_",
        "$$",
        "$1",
        "' OR '1'='1",
        "\"quoted\"",
        "a & b | !c <-> d:*",
        "Robert'); DELETE FROM chronicle_events; --",
        "100% _done_",
        "line\nbreak",
        "emoji 🎉 和中文",
        "-x",
    ];
    let hostile_lib = Uuid::now_v7();
    let mut ids = Vec::new();
    for (i, h) in HOSTILE.iter().enumerate() {
        // One failed delivery per string (an unknown type), and one entry whose tag name is the string.
        let failed: Uuid = c
            .query_one(
                "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
                 VALUES (gen_random_uuid(), $1, 'tag', gen_random_uuid(), 'ChaosUnknown', '{}', now()) RETURNING id",
                &[&hostile_lib],
            )
            .unwrap()
            .get(0);
        c.execute(
            "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
             VALUES (gen_random_uuid(), $1, 'tag', gen_random_uuid(), 'TagCreated', jsonb_build_object('name', $2::text), now() - make_interval(secs => $3))",
            &[&hostile_lib, h, &(i as f64)],
        )
        .unwrap();
        ids.push(failed);
    }
    let r = run(&mut worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let tables_before = footprint(&mut c).1;
    let (mut h_tried, mut h_clean, mut h_refused) = (0, 0, 0);
    for (h, id) in HOSTILE.iter().zip(&ids) {
        let r = run(&mut db.chronicle(&[
            "replay-failed",
            "--by",
            h,
            "--reason",
            h,
            "--event-id",
            &id.to_string(),
            "--json",
        ]));
        h_tried += 1;
        let row = c
            .query_one(
                "SELECT coalesce(last_replayed_by, ''), coalesce(last_replayed_reason, ''), status FROM chronicle_outbox_events WHERE event_id = $1",
                &[id],
            )
            .unwrap();
        let (by, reason, status): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        if r.code == Some(0) && json_of(&r)["replayed"] == 1 && by == *h && reason == *h && status == "pending" {
            h_clean += 1;
        } else {
            problems.push(format!("replay-failed --reason {h:?}: by {by:?}, reason {reason:?}, status {status}: {r}"));
        }
    }
    for empty in ["", "   "] {
        let r = run(&mut db.chronicle(&["replay-failed", "--by", "x", "--reason", empty, "--json"]));
        h_tried += 1;
        if r.code == Some(2) && r.stderr.contains("--reason") {
            h_clean += 1;
            h_refused += 1;
        } else if empty.trim().is_empty() && r.code == Some(0) && !empty.is_empty() {
            h_clean += 1; // whitespace kept verbatim is acceptable too
        } else {
            problems.push(format!("replay-failed --reason {empty:?}: {r}"));
        }
    }
    let lib = hostile_lib.to_string();
    let long_query = "ab ".repeat(5000);
    let searches: Vec<&str> =
        HOSTILE.iter().copied().chain(["", "&&&", "'", ":*", "!", "<->", long_query.as_str()]).collect();
    for s in &searches {
        let r = run(&mut db.chronicle(&["entries", "--library-id", &lib, "--search", s, "--limit", "100", "--json"]));
        h_tried += 1;
        let terms = chronicle::search::query_terms(s);
        if terms.is_empty() {
            // Nothing to search for: refused, clearly.
            if r.code == Some(2) {
                h_clean += 1;
                h_refused += 1;
            } else {
                problems.push(format!("entries --search {s:?} (no term): {r}"));
            }
            continue;
        }
        if r.code != Some(0) {
            problems.push(format!("entries --search {s:?}: {r}"));
            continue;
        }
        let page = json_of(&r);
        let names: Vec<String> = page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["details"]["after"]["name"].as_str().unwrap_or("").to_string())
            .collect();
        // The tag named exactly this string is found when the string has words, and its
        // name comes back verbatim (the one-line summary folds a newline into a space).
        if HOSTILE.contains(s) && !names.iter().any(|x| x == s) {
            problems.push(format!("entries --search {s:?} did not find its entry verbatim: {names:?}"));
        } else {
            h_clean += 1;
        }
    }
    assert_eq!(footprint(&mut c).1, tables_before, "a table appeared or vanished");
    tried += h_tried;
    refused += h_refused;
    clean += h_clean;
    sections.push(format!(
        "hostile text: {} replay-failed --by/--reason values stored verbatim (+2 empty refused), {} entries --search queries \
         ({} with no searchable term refused with exit 2, the rest found their entry verbatim), every table still there",
        HOSTILE.len(),
        searches.len(),
        h_refused - 2
    ));

    // --- odd but legal content written by plain SQL ------------------------------------
    let odd_lib = Uuid::now_v7();
    #[derive(Debug, PartialEq)]
    enum End {
        Done,
        Failed(&'static str),
    }
    let odd: Vec<(&str, &str, &str, &str, &str, &str, End)> = vec![
        // (name, entity_type, event_type, before, after, extra columns "reason, client, request_id, ip, occurred_at", expected)
        ("every optional column NULL", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "n"}'"#, "NULL, NULL, NULL, NULL, now()", End::Done),
        ("empty strings", "'tag'", "'TagCreated'", "NULL", r#"'{"name": ""}'"#, "'', '', '', NULL, now()", End::Done),
        ("empty titles", "'book'", "'BookRenamed'", r#"'{"title": ""}'"#, r#"'{"title": ""}'"#, "NULL, NULL, NULL, NULL, now()", End::Done),
        ("emoji, ZWJ, RTL, combining", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "👩‍👩‍👧‍👦 \u202etxet 🦀 é"}'"#, "'🎉', '📱/1.0', 'req-🔑', NULL, now()", End::Done),
        ("control characters", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "a\u0001b\u001fc\u007f\t\n"}'"#, "E'x\\x01y', NULL, NULL, NULL, now()", End::Done),
        ("1 MB block text of words", "'block'", "'BlockCreated'", "NULL", "jsonb_build_object('book_id', gen_random_uuid(), 'kind', 'p', 'text', repeat('lorem ipsum dolor ', 60000))", "NULL, NULL, NULL, NULL, now()", End::Done),
        ("1 MB one word", "'block'", "'BlockCreated'", "NULL", "jsonb_build_object('book_id', gen_random_uuid(), 'kind', 'p', 'text', repeat('x', 1048576))", "NULL, NULL, NULL, NULL, now()", End::Done),
        ("1 MB of CJK", "'block'", "'BlockCreated'", "NULL", "jsonb_build_object('book_id', gen_random_uuid(), 'kind', 'p', 'text', repeat('分布式系统', 70000))", "NULL, NULL, NULL, NULL, now()", End::Done),
        ("1 MB reason", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "why"}'"#, "repeat('because ', 131072), NULL, NULL, NULL, now()", End::Done),
        ("100 levels of nesting", "'tag'", "'TagCreated'", "NULL", "jsonb_build_object('name', 'deep', 'x', (repeat('[', 100) || '1' || repeat(']', 100))::jsonb)", "NULL, NULL, NULL, NULL, now()", End::Done),
        ("10000 payload keys", "'tag'", "'TagCreated'", "NULL", "(SELECT jsonb_object_agg('k' || g, g) || '{\"name\": \"many\"}' FROM generate_series(1, 10000) g)", "NULL, NULL, NULL, NULL, now()", End::Done),
        ("SQL in every text", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "''); DROP TABLE chronicle_entries; --", "$$": "%_\\"}'"#, "'''; DROP TABLE chronicle_events; --', '$$ || pg_sleep(5) || $$', '\\', NULL, now()", End::Done),
        ("numbers past 64 bits", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "big", "n": 123456789012345678901234567890, "f": 0.1000000000000000000000000001}'"#, "NULL, NULL, NULL, NULL, now()", End::Done),
        ("inet with a netmask", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "net"}'"#, "NULL, NULL, NULL, '10.1.2.3/8', now()", End::Done),
        ("IPv6 with a netmask", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "net6"}'"#, "NULL, NULL, NULL, '2001:db8::1/64', now()", End::Done),
        ("IPv6 zone-less address", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "v6"}'"#, "NULL, NULL, NULL, '2001:db8::1', now()", End::Done),
        ("a BC date", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "ides"}'"#, "NULL, NULL, NULL, NULL, '0044-03-15 12:00:00+00 BC'", End::Done),
        ("year 9999", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "future"}'"#, "NULL, NULL, NULL, NULL, '9999-12-31 23:59:59+00'", End::Done),
        ("JSON null payload", "'tag'", "'TagCreated'", "NULL", "'null'::jsonb", "NULL, NULL, NULL, NULL, now()", End::Failed("invalid_payload")),
        ("array payload", "'tag'", "'TagCreated'", "NULL", "'[1, 2]'", "NULL, NULL, NULL, NULL, now()", End::Failed("invalid_payload")),
        ("scalar payload", "'tag'", "'TagCreated'", "NULL", r#"'"x"'"#, "NULL, NULL, NULL, NULL, now()", End::Failed("invalid_payload")),
        ("empty event type", "'tag'", "''", "NULL", r#"'{"name": "n"}'"#, "NULL, NULL, NULL, NULL, now()", End::Failed("unknown_event_type")),
        ("padded event type", "'tag'", "' TagCreated'", "NULL", r#"'{"name": "n"}'"#, "NULL, NULL, NULL, NULL, now()", End::Failed("unknown_event_type")),
        ("entity type outside the list", "'page'", "'TagCreated'", "NULL", r#"'{"name": "n"}'"#, "NULL, NULL, NULL, NULL, now()", End::Failed("invalid_payload")),
        ("empty entity type", "''", "'TagCreated'", "NULL", r#"'{"name": "n"}'"#, "NULL, NULL, NULL, NULL, now()", End::Failed("invalid_payload")),
        ("diff an array", "'tag'", "'TagCreated'", "NULL", r#"'{"name": "n"}'"#, "NULL, NULL, NULL, NULL, now()", End::Done),
    ];
    let mut odd_ids = Vec::new();
    for (name, entity_type, event_type, before, after, extra, _) in &odd {
        let diff = if *name == "diff an array" { "'[1]'" } else { "NULL" };
        let sql = format!(
            "INSERT INTO chronicle_events (id, library_id, actor_user_id, entity_type, entity_id, event_type, before, after, diff,
                                           reason, client, request_id, ip, occurred_at)
             VALUES (gen_random_uuid(), '{odd_lib}', NULL, {entity_type}, gen_random_uuid(), {event_type}, {before}, {after}, {diff}, {extra})
             RETURNING id"
        );
        let id: Uuid = c.query_one(&sql, &[]).unwrap_or_else(|e| panic!("{name}: {e}\n{sql}")).get(0);
        odd_ids.push(id);
    }
    let r = run(&mut worker_cmd(&db, &["--until-empty", "--batch-size", "5"]));
    tried += odd.len() as u32;
    if r.code != Some(0) || r.stderr.contains("panicked") {
        problems.push(format!("the worker on odd content: {r}"));
    }
    let worker_exit = r.code;
    let closed = ["unknown_event_type", "invalid_payload", "rejected_by_read_model", "max_attempts_exceeded"];
    // What each projected entry holds, as a condition on the entry `n` and its event `e`
    // (on top of the columns copied from the event, compared for every entry below). A
    // long text is cut in `details` at 4 KiB on a character boundary, with its length.
    let cut = |chars: usize| {
        format!(
            "n.details->'after'->>'text' = left(e.after->>'text', {chars}) || '… [cut: ' || octet_length(e.after->>'text') || ' bytes in the event]'
             AND (n.details->'after') - 'text' = e.after - 'text' AND n.details - 'after' = '{{}}'"
        )
    };
    let holds = |name: &str| -> String {
        let whole = "n.details = jsonb_build_object('after', e.after)";
        match name {
            "every optional column NULL" => format!(
                "{whole} AND n.reason IS NULL AND n.client IS NULL AND n.request_id IS NULL AND n.ip IS NULL AND n.actor_user_id IS NULL"
            ),
            "empty strings" => format!("{whole} AND n.details->'after'->>'name' = '' AND n.reason = '' AND n.client = '' AND n.request_id = ''"),
            "empty titles" => "n.details = jsonb_build_object('before', e.before, 'after', e.after) AND n.details->'after'->>'title' = ''".into(),
            "emoji, ZWJ, RTL, combining" => format!(
                "{whole} AND n.details->'after'->>'name' = U&'\\+01F469\\200D\\+01F469\\200D\\+01F467\\200D\\+01F466 \\202Etxet \\+01F980 \\00E9'
                 AND n.reason = U&'\\+01F389' AND n.client = U&'\\+01F4F1/1.0' AND n.request_id = U&'req-\\+01F511'"
            ),
            "control characters" => format!(
                "{whole} AND n.details->'after'->>'name' = E'a\\x01b\\x1fc\\x7f\\t\\n' AND n.reason = E'x\\x01y'"
            ),
            "1 MB block text of words" | "1 MB one word" => cut(4096),
            // Three bytes a character: 1365 characters are 4095 bytes.
            "1 MB of CJK" => cut(1365),
            "1 MB reason" => format!("{whole} AND octet_length(n.reason) = 1048576 AND n.reason = repeat('because ', 131072)"),
            "100 levels of nesting" => format!("{whole} AND n.details->'after'->'x' = (repeat('[', 100) || '1' || repeat(']', 100))::jsonb"),
            "10000 payload keys" => format!("{whole} AND (SELECT count(*) FROM jsonb_object_keys(n.details->'after')) = 10001"),
            "SQL in every text" => format!(
                "{whole} AND n.details->'after'->>'name' = $q$'); DROP TABLE chronicle_entries; --$q$
                 AND n.reason = $q$'; DROP TABLE chronicle_events; --$q$ AND n.client = $q$$$ || pg_sleep(5) || $$$q$ AND n.request_id = $q$\\$q$"
            ),
            "numbers past 64 bits" => format!(
                "{whole} AND (n.details->'after'->'n')::text = '123456789012345678901234567890'
                 AND (n.details->'after'->'f')::text = '0.1000000000000000000000000001'"
            ),
            "inet with a netmask" => format!("{whole} AND n.ip::text = '10.1.2.3/8' AND abbrev(n.ip) = '10.1.2.3/8'"),
            "IPv6 with a netmask" => format!("{whole} AND n.ip::text = '2001:db8::1/64' AND abbrev(n.ip) = '2001:db8::1/64'"),
            "IPv6 zone-less address" => format!("{whole} AND n.ip::text = '2001:db8::1/128' AND abbrev(n.ip) = '2001:db8::1'"),
            "a BC date" => format!("{whole} AND n.occurred_at = '0044-03-15 12:00:00+00 BC'"),
            "year 9999" => format!("{whole} AND n.occurred_at = '9999-12-31 23:59:59+00'"),
            "diff an array" => "n.details = jsonb_build_object('after', e.after, 'diff', '[1]'::jsonb)".into(),
            _ => "false".into(),
        }
    };
    let mut outcomes = Vec::new();
    let mut o_clean = 0;
    for ((name, .., want), id) in odd.iter().zip(&odd_ids) {
        let row = c
            .query_one(
                "SELECT status, error_reason, (SELECT count(*) FROM chronicle_entries n WHERE n.id = o.event_id)
                 FROM chronicle_outbox_events o WHERE event_id = $1",
                &[id],
            )
            .unwrap();
        let (status, reason, entries): (String, Option<String>, i64) = (row.get(0), row.get(1), row.get(2));
        let mut ok = match (status.as_str(), want) {
            ("done", End::Done) => entries == 1,
            ("failed", End::Failed(r)) => reason.as_deref() == Some(*r) && entries == 0,
            _ => false,
        };
        if ok && *want == End::Done {
            let sql = format!(
                "SELECT ({}) AND (n.library_id, n.actor_user_id, n.entity_type, n.entity_id, n.event_type, n.occurred_at,
                                  n.created_at, n.request_id, n.client, n.ip, masklen(n.ip), n.reason)
                                 IS NOT DISTINCT FROM
                                 (e.library_id, e.actor_user_id, e.entity_type, e.entity_id, e.event_type, e.occurred_at,
                                  e.created_at, e.request_id, e.client, e.ip, masklen(e.ip), e.reason)
                 FROM chronicle_entries n JOIN chronicle_events e USING (id) WHERE n.id = $1",
                holds(name)
            );
            let held: bool = c.query_one(&sql, &[id]).unwrap_or_else(|e| panic!("{name}: {e:?}\n{sql}")).get(0);
            if !held {
                let shown: String = c
                    .query_one("SELECT left(row_to_json(n)::text, 600) FROM chronicle_entries n WHERE id = $1", &[id])
                    .map(|r| r.get(0))
                    .unwrap_or_default();
                problems.push(format!("odd content {name:?}: the entry does not hold what its event had: {shown}"));
                ok = false;
            }
        }
        outcomes.push(format!("{name}: {status}{}", reason.as_ref().map(|r| format!("/{r}")).unwrap_or_default()));
        if ok {
            o_clean += 1;
        } else {
            problems.push(format!("odd content {name:?}: {status} {reason:?}, {entries} entries, expected {want:?}"));
        }
    }
    clean += o_clean;
    // The timeline shows the netmasks and every digit too.
    let r = run(&mut db.chronicle(&["entries", "--library-id", &odd_lib.to_string(), "--limit", "100", "--json"]));
    tried += 1;
    let shown = json_of(&r);
    let shown_entries = shown["entries"].as_array().cloned().unwrap_or_default();
    let ip_of =
        |name: &str| shown_entries.iter().find(|e| e["details"]["after"]["name"] == name).map(|e| e["ip"].clone());
    let big = shown_entries
        .iter()
        .find(|e| e["details"]["after"]["name"] == "big")
        .map(|e| e["details"]["after"].to_string());
    let (net, net6, v6) = (ip_of("net"), ip_of("net6"), ip_of("v6"));
    if r.code == Some(0)
        && net == Some(json!("10.1.2.3/8"))
        && net6 == Some(json!("2001:db8::1/64"))
        && v6 == Some(json!("2001:db8::1"))
        && big.as_deref().is_some_and(|b| {
            b.contains("\"n\":123456789012345678901234567890") && b.contains("\"f\":0.1000000000000000000000000001")
        })
    {
        clean += 1;
    } else {
        problems.push(format!("entries --json on odd content: ip {net:?}, {net6:?}, {v6:?}; numbers {big:?}; {r}"));
    }
    let search_len: i64 = count(&mut c, "SELECT coalesce(max(length(search::text)), 0)::bigint FROM chronicle_entries");
    sections.push(format!(
        "odd SQL content: {} events ({}), worker exit {:?}, each entry holding what its event had (texts over 4 KiB cut \
         in details, netmasks and every digit of numbers past f64 kept); largest search document {search_len} chars",
        odd.len(),
        outcomes.join(", "),
        worker_exit,
    ));
    // The rebuild over all of it ends (exit 1: there are failures) with closed reasons only.
    let r = run(&mut db.chronicle(&["rebuild", "--json"]));
    tried += 1;
    if r.code == Some(1)
        && json_of(&r)["failures_by_reason"].as_object().is_some_and(|m| m.keys().all(|k| closed.contains(&k.as_str())))
    {
        clean += 1;
    } else {
        problems.push(format!("rebuild over odd content: {r}"));
    }

    eprintln!(
        "chaos bad input: {tried} inputs tried, {clean} handled cleanly ({refused} refused with a clear error and nothing \
         written, the rest accepted verbatim or projected/failed with a closed-list reason), {} problems.\n  {}\nRun time {}",
        problems.len(),
        sections.join("\n  "),
        secs(started.elapsed())
    );
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    assert_eq!(clean, tried);
}

// ---------------------------------------------------------------------------------
// 7b. Events the database driver cannot decode (found by this suite)

/// Legal rows of `chronicle_events` that PostgreSQL stores but the Rust driver cannot
/// turn into values: jsonb nested deeper than serde_json's limit of 128, a timestamptz
/// of 'infinity' (a number beyond f64 in jsonb used to be one; it is now read whole). Each must fail alone, with a
/// deterministic reason, and the rest of its batch must be projected; a rebuild must go
/// on past them.
#[test]
fn chaos_events_the_driver_cannot_decode_fail_alone_not_their_batch() {
    let started = Instant::now();
    let db = TestDb::new();
    let mut c = db.client();
    let lib = Uuid::now_v7();
    let insert = |c: &mut Client, name: &str, after: &str, occurred_at: &str| -> Uuid {
        c.query_one(
            &format!(
                "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
                 VALUES (gen_random_uuid(), $1, 'tag', gen_random_uuid(), 'TagCreated', {after}, {occurred_at}) RETURNING id"
            ),
            &[&lib],
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .get(0)
    };
    let mut good = Vec::new();
    for i in 0..3 {
        good.push(insert(&mut c, "good", &format!("'{{\"name\": \"before {i}\"}}'"), "now() - interval '1 hour'"));
    }
    let poison = [
        (
            "jsonb nested 200 deep",
            insert(
                &mut c,
                "deep",
                "('{\"name\": \"deep\", \"x\": ' || repeat('[', 200) || repeat(']', 200) || '}')::jsonb",
                "now() - interval '30 minutes'",
            ),
        ),
        ("occurred_at 'infinity'", insert(&mut c, "infinity", "'{\"name\": \"forever\"}'", "'infinity'")),
    ];
    // Beyond a double's range, once undecodable: now read with every digit (1001 of them).
    let huge_number =
        insert(&mut c, "huge number", "'{\"name\": \"big\", \"n\": 1e1000}'", "now() - interval '30 minutes'");
    good.push(huge_number);
    for i in 0..2 {
        good.push(insert(&mut c, "good", &format!("'{{\"name\": \"after {i}\"}}'"), "now()"));
    }
    // Batches of 4: each poison event shares its batch with good ones.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut passes = 0;
    while in_flight(&mut c) > 0 && Instant::now() < deadline {
        let r = run(worker_cmd(&db, &["--until-empty", "--batch-size", "4"])
            .env("OUTBOX_LEASE_SECONDS", "1")
            .env("OUTBOX_RECLAIM_INTERVAL_SECONDS", "0.2")
            .env("OUTBOX_MAX_ATTEMPTS", "3"));
        assert_eq!(r.code, Some(0), "{r}");
        passes += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut problems = Vec::new();
    for id in &good {
        let row = c
            .query_one(
                "SELECT status, coalesce(error_reason, '') FROM chronicle_outbox_events WHERE event_id = $1",
                &[id],
            )
            .unwrap();
        let (status, reason): (String, String) = (row.get(0), row.get(1));
        if status != "done" {
            problems.push(format!(
                "a valid event {id} ended {status} {reason} because it shared a batch with an undecodable one"
            ));
        }
    }
    let digits: Option<bool> = c
        .query_one(
            "SELECT n.details->'after'->'n' = e.after->'n' AND (n.details->'after'->>'n') = '1' || repeat('0', 1000)
             FROM chronicle_entries n JOIN chronicle_events e USING (id) WHERE id = $1",
            &[&huge_number],
        )
        .ok()
        .map(|r| r.get(0));
    if digits != Some(true) {
        problems.push(format!("the entry of a jsonb number of 1e1000 does not hold its 1001 digits: {digits:?}"));
    }
    for (what, id) in &poison {
        let row = c
            .query_one("SELECT status, coalesce(error_reason, ''), coalesce(error, '') FROM chronicle_outbox_events WHERE event_id = $1", &[id])
            .unwrap();
        let (status, reason, error): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        if status != "failed" || reason == "max_attempts_exceeded" {
            problems.push(format!(
                "{what}: {status} {reason} ({error}); expected failed with a deterministic reason (invalid_payload)"
            ));
        }
    }
    let r = run(&mut db.chronicle(&["rebuild", "--json"]));
    let rebuilt_good = r.code == Some(1) && r.stdout.contains("\"rows_written\":6");
    if !rebuilt_good {
        problems.push(format!(
            "rebuild stops at the first undecodable event instead of counting it and going on: {}",
            r.all().trim()
        ));
    }
    // The library's walk (keyset on occurred_at, id) must get past the 'infinity' time too.
    let r = run(&mut db.chronicle(&[
        "rebuild",
        "--truncate",
        "--library-id",
        &lib.to_string(),
        "--batch-size",
        "2",
        "--json",
    ]));
    if !(r.code == Some(1) && r.stdout.contains("\"rows_written\":6") && r.stdout.contains("\"failures\":2")) {
        problems.push(format!("rebuild --library-id does not get past the undecodable events: {}", r.all().trim()));
    }
    eprintln!(
        "chaos undecodable events: 6 valid events (one with a jsonb number of 1e1000) and 2 legal-but-undecodable ones ({}) in batches of 4, {passes} worker \
         passes (lease 1 s, OUTBOX_MAX_ATTEMPTS=3): {} problem(s). Run time {}",
        poison.iter().map(|p| p.0).collect::<Vec<_>>().join(", "),
        problems.len(),
        secs(started.elapsed())
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------
// 7c. OUTBOX_RUN_SECONDS while the database is unreachable (found by this suite)

/// The runbook's smoke run (`OUTBOX_RUN_SECONDS=2 chronicle worker`) must end in about
/// that time, exit 0, also when the database never answers: the worker waits for an
/// unreachable database instead of failing, so the time limit is what ends it.
#[test]
fn chaos_run_seconds_ends_a_worker_that_never_reached_its_database() {
    let logs = Logs::new("run-seconds");
    let mut cmd = chronicle_cmd(&["worker"]);
    cmd.env("DATABASE_URL", format!("postgresql://u:pw@127.0.0.1:{}/db", free_port()))
        .env("OUTBOX_METRICS_PORT", "0")
        .env("OUTBOX_RUN_SECONDS", "1");
    let t = Instant::now();
    let (r, overran) = run_limited(&logs, cmd, "unreachable", Duration::from_secs(10));
    eprintln!(
        "chaos run seconds: OUTBOX_RUN_SECONDS=1 against an unreachable database: {} after {} (exit {:?})",
        if overran { "still running, stopped by SIGTERM" } else { "stopped by itself" },
        secs(t.elapsed()),
        r.code
    );
    assert!(
        !overran,
        "OUTBOX_RUN_SECONDS=1 did not stop a worker waiting for an unreachable database within 10 s:\n{r}"
    );
    assert_eq!(r.code, Some(3), "a run that never reached its database: {r}");
}

// ---------------------------------------------------------------------------------
// 8. Secrets

#[test]
fn chaos_the_password_and_event_content_never_leak() {
    let started = Instant::now();
    let db = TestDb::new();
    let mut c = db.client();
    let s = &db.server;
    let marker = format!("pw{}", Uuid::now_v7().simple());
    let odd_password = format!("Zq!x@y:z/{marker}%&?=#");
    let content = format!("TITLE{}", Uuid::now_v7().simple());
    let host = if s.host.starts_with('/') { "127.0.0.1" } else { &s.host };
    let pct = |p: &str| -> String {
        p.bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect()
    };
    // Trust authentication ignores the password; either way it must never be shown.
    let url = format!("postgresql://{}:{}@{host}:{}/{}", s.user, marker, s.port, db.name);
    let forms = [
        url.clone(),
        format!("postgresql+psycopg://{}:{}@{host}:{}/{}", s.user, pct(&odd_password), s.port, db.name),
        format!(
            "host={host} port={} user={} dbname={} password='{}'",
            s.port,
            s.user,
            db.name,
            odd_password.replace('\'', "\\'")
        ),
    ];
    let secrets = [marker.clone(), odd_password.clone(), pct(&odd_password)];
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut record = |what: String, text: String| outputs.push((what, text));

    // Every command's help.
    for cmd in chronicle::cli::COMMANDS {
        for args in [vec![cmd.name, "--help"], vec!["help", cmd.name]] {
            let r = run(chronicle_cmd(&args).env("DATABASE_URL", &url));
            record(format!("{args:?}"), r.all());
        }
    }
    record("--help".into(), run(chronicle_cmd(&["--help"]).env("DATABASE_URL", &url)).all());

    let id: Uuid = c
        .query_one(
            "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at, reason)
             SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                    jsonb_build_object('title', 'old'), jsonb_build_object('title', $1::text), now(), $1::text
             RETURNING id",
            &[&content],
        )
        .unwrap()
        .get(0);
    insert_events(&mut c, 200);
    let lib: Uuid = c.query_one("SELECT library_id FROM chronicle_events WHERE id = $1", &[&id]).unwrap().get(0);
    let (sid, slib) = (id.to_string(), lib.to_string());
    // Commands that work, with each form of the URL (variable and flag).
    for form in &forms {
        for args in [
            vec!["status"],
            vec!["status", "--json"],
            vec!["migrate", "--status"],
            vec!["verify", "--json"],
            vec!["entries", "--library-id", &slib, "--json"],
            vec!["show", &sid, "--json"],
            vec!["replay-failed", "--by", "x", "--reason", "y", "--dry-run", "--json"],
            vec!["prune", "--older-than", "1d", "--dry-run", "--json"],
        ] {
            let r = run(chronicle_cmd(&args).env("DATABASE_URL", form));
            assert!(matches!(r.code, Some(0) | Some(1)), "{args:?}: {r}");
            record(format!("{args:?} ({})", &form[..12]), r.all());
        }
        let r = run(&mut chronicle_cmd(&["status", "--database-url", form]));
        record(format!("status --database-url ({})", &form[..12]), r.all());
    }
    // Errors: bad flags, bad values, unreachable servers, a missing database, TLS refused.
    let dead = free_port();
    for (what, args, env_url) in [
        ("status --bogus", vec!["status", "--bogus"], url.clone()),
        ("worker --batch-size 0", vec!["worker", "--batch-size", "0"], url.clone()),
        ("status, unreachable port", vec!["status"], format!("postgresql://u:{marker}@127.0.0.1:{dead}/db")),
        (
            "migrate, unreachable port (psycopg form)",
            vec!["migrate"],
            format!("postgresql+psycopg://u:{}@127.0.0.1:{dead}/db", pct(&odd_password)),
        ),
        ("status, bad port", vec!["status"], format!("postgresql://u:{marker}@127.0.0.1:notaport/db")),
        ("status, bad sslmode", vec!["status"], format!("postgresql://u:{marker}@127.0.0.1/db?sslmode=sometimes")),
        (
            "status, missing sslrootcert",
            vec!["status"],
            format!("{url}?sslmode=verify-full&sslrootcert=/nonexistent/root.crt"),
        ),
        ("status, sslmode=require without TLS", vec!["status"], format!("{url}?sslmode=require")),
        (
            "status, missing database",
            vec!["status", "--json"],
            format!("postgresql://{}:{marker}@{host}:{}/no_such_db_chaos", s.user, s.port),
        ),
        ("the password alone as DATABASE_URL", vec!["status"], marker.clone()),
        ("key=value with a bad key", vec!["status"], format!("host=127.0.0.1 password={marker} nonsense=1")),
    ] {
        let r = run(chronicle_cmd(&args).env("DATABASE_URL", &env_url));
        assert!(r.code.is_some() && !r.stderr.contains("panicked"), "{what}: {r}");
        record(what.to_string(), r.all());
    }
    // A worker against an unreachable server, debug logs on, stopped by SIGTERM after 3 s:
    // a bounded run (the harness's OUTBOX_RUN_SECONDS) that never reached its database
    // exits 3.
    let logs = Logs::new("secrets");
    let mut cmd = worker_cmd(&db, &[]);
    cmd.env("DATABASE_URL", format!("postgresql://u:{marker}@127.0.0.1:{dead}/db")).env("RUST_LOG", "debug");
    let (r, _) = run_limited(&logs, cmd, "unreachable", Duration::from_secs(3));
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("database unreachable"), "{r}");
    record("worker, unreachable, RUST_LOG=debug".into(), r.all());

    // A working worker, debug logs on, its /metrics scraped while it drains.
    let port = free_port();
    let mut cmd = worker_cmd(&db, &["--batch-size", "20"]);
    cmd.env("DATABASE_URL", &forms[2])
        .env("RUST_LOG", "debug")
        .env("OUTBOX_METRICS_PORT", port.to_string())
        .env("OUTBOX_RUN_SECONDS", "5");
    let mut worker = logs.spawn(cmd, "debug-worker");
    let mut scrapes = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(4500) {
        for path in ["/metrics", "/healthz", "/readyz"] {
            if let Some(body) = http_get(port, path) {
                scrapes.push(body);
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let st = loop {
        if let Some(st) = worker.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the worker did not stop after OUTBOX_RUN_SECONDS");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(st.success(), "{st}: {}", worker.tail());
    let worker_log = worker.log();
    record("worker RUST_LOG=debug log".into(), worker_log.clone());
    let metrics: Vec<&String> = scrapes.iter().filter(|b| b.contains("chronicle_outbox_processed_total")).collect();
    assert!(!metrics.is_empty(), "no /metrics scrape succeeded");
    assert!(
        metrics.iter().any(|m| metric_sum(m, "chronicle_outbox_processed_total") > 0.0),
        "the scrapes saw no processing"
    );
    for (i, body) in scrapes.iter().enumerate() {
        record(format!("scrape {i}"), body.clone());
    }
    assert_eq!(in_flight(&mut c), 0, "the debug worker drained everything");

    let mut leaks = Vec::new();
    for (what, text) in &outputs {
        for secret in &secrets {
            if text.contains(secret.as_str()) {
                leaks.push(format!("the password ({secret}) in {what}"));
            }
        }
    }
    let metric_leaks = scrapes.iter().filter(|b| b.contains(&content) || b.contains(&slib)).count();
    if metric_leaks > 0 {
        leaks.push(format!("event content in {metric_leaks} metrics scrapes"));
    }
    let bytes: usize = outputs.iter().map(|o| o.1.len()).sum();
    eprintln!(
        "chaos secrets: password markers (plain, and with URL-special characters in 3 URL forms) looked for in {} outputs \
         ({bytes} bytes: every command's --help, status, status --json, migrate --status, verify, entries, show, \
         replay-failed, prune, 11 error cases, a worker's RUST_LOG=debug log reaching and not reaching the server, \
         {} scrapes of /metrics, /healthz, /readyz); event content marker looked for in the scrapes: {} leak(s). Run time {}",
        outputs.len(),
        scrapes.len(),
        leaks.len(),
        secs(started.elapsed())
    );
    assert!(leaks.is_empty(), "{}", leaks.join("\n"));
}

// ---------------------------------------------------------------------------------
// Failover to a streaming standby

/// The metrics endpoint's port of a worker, for `OUTBOX_METRICS_PORT`.
fn with_metrics(mut cmd: Command) -> (Command, u16) {
    let port = free_port();
    cmd.env("OUTBOX_METRICS_PORT", port.to_string()).env("OUTBOX_METRICS_BIND", "127.0.0.1");
    (cmd, port)
}

#[test]
fn chaos_failover_to_a_promoted_standby_projects_every_surviving_event_once() {
    let started = Instant::now();
    let conf = ["fsync=off", "wal_level=replica", "hot_standby=on"];
    let primary = Cluster::start(&conf).unwrap_or_else(|e| panic!("starting the primary: {e}"));
    let _stop_primary = StopCluster(&primary);
    let db = TestDb::empty_on(&primary.server);
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(0), "{r}");
    inject(&db, 4000, 31);
    let standby = Cluster::standby_of(&primary, &conf).unwrap_or_else(|e| panic!("starting the standby: {e}"));
    let _stop_standby = StopCluster(&standby);
    let (p1, p2) = (primary.server.port, standby.server.port);
    wait_until(Duration::from_secs(30), "the standby to replay the database", || {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(p2)
            .user("postgres")
            .dbname(&db.name)
            .connect(NoTls)
            .is_ok_and(|mut c| count(&mut c, "SELECT count(*) FROM chronicle_events") == 4000)
    });
    let name = &db.name;
    let both = format!("postgresql://postgres@127.0.0.1:{p1},127.0.0.1:{p2}/{name}?target_session_attrs=read-write");
    let only_standby = format!("host=127.0.0.1 port={p2} user=postgres dbname={name} target_session_attrs=read-write");

    let logs = Logs::new("failover");
    let libraries = libraries_of(&mut db.client());
    let writer = start_writer_at(
        format!("host=127.0.0.1,127.0.0.1 port={p1},{p2} user=postgres dbname={name} target_session_attrs=read-write"),
        libraries,
        Duration::from_millis(50),
        10,
    );
    let mut workers = Vec::new();
    for i in 0..2 {
        let mut cmd = worker_cmd(&db, &["--batch-size", "20"]);
        cmd.env("DATABASE_URL", &both)
            .env("OUTBOX_WORKER_ID", format!("f{i}"))
            .env("OUTBOX_LEASE_SECONDS", "2")
            .env("OUTBOX_RECLAIM_INTERVAL_SECONDS", "0.5")
            .env("OUTBOX_MAX_BACKOFF_SECONDS", "2");
        let (cmd, port) = with_metrics(cmd);
        workers.push((logs.spawn(cmd, &format!("f{i}")), port));
    }
    // A worker whose only host is the standby: it waits, not ready, and writes nothing.
    let mut cmd = worker_cmd(&db, &[]);
    cmd.env("DATABASE_URL", &only_standby).env("OUTBOX_WORKER_ID", "lonely");
    let (cmd, lonely_port) = with_metrics(cmd);
    let mut lonely = logs.spawn(cmd, "lonely");

    let mut c = db.client();
    wait_until(Duration::from_secs(60), "the workers to be mid-drain", || done_count(&mut c) >= 1000);
    drop(c);
    let ready = http_get(lonely_port, "/readyz").unwrap_or_default();
    assert!(ready.contains("not ready"), "a worker with only a standby is not ready: {ready}");
    lonely.assert_running();
    assert_eq!(
        lonely.log().matches("database reachable").count() + lonely.log().matches("connected to the database").count(),
        0,
        "the lonely worker never connected:\n{}",
        lonely.tail()
    );

    // The primary dies; the standby is promoted.
    let out = primary.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    assert!(out.status.success(), "stopping the primary: {}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_secs(1));
    let out = standby.pg_ctl(&["promote", "-w", "-t", "60"]);
    assert!(out.status.success(), "promoting the standby: {}", String::from_utf8_lossy(&out.stderr));
    let promoted = Instant::now();
    let mut c = standby.server.connect(name);
    let fresh: Uuid = c
        .query_one(
            "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
             VALUES (gen_random_uuid(), gen_random_uuid(), 'tag', gen_random_uuid(), 'TagCreated', '{\"name\": \"fresh\"}', now())
             RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    wait_until(Duration::from_secs(30), "the fresh event's entry", || {
        count(&mut c, &format!("SELECT count(*) FROM chronicle_entries WHERE id = '{fresh}'")) == 1
    });
    let fresh_after = promoted.elapsed();
    let written_before = count(&mut c, "SELECT count(*) FROM chronicle_events");
    wait_until(Duration::from_secs(60), "the writer to write on the new primary", || {
        count(&mut c, "SELECT count(*) FROM chronicle_events") >= written_before + 200
    });
    let stats = writer.finish();
    wait_until(Duration::from_secs(120), "the drain on the new primary", || in_flight(&mut c) == 0);

    let events = count(&mut c, "SELECT count(*) FROM chronicle_events");
    let missing = count(
        &mut c,
        "SELECT count(*) FROM chronicle_events e WHERE NOT EXISTS (SELECT 1 FROM chronicle_entries n WHERE n.id = e.id)",
    );
    let orphans = count(
        &mut c,
        "SELECT count(*) FROM chronicle_entries n WHERE NOT EXISTS (SELECT 1 FROM chronicle_events e WHERE e.id = n.id)",
    );
    let outbox = outbox_by_status(&mut c);
    let switches: Vec<usize> =
        workers.iter().map(|(w, _)| w.log().matches("database reachable again at another server").count()).collect();
    let reconnects: Vec<f64> = workers
        .iter()
        .map(|(_, port)| metric_sum(&http_get(*port, "/metrics").unwrap_or_default(), "chronicle_db_reconnects_total"))
        .collect();
    eprintln!(
        "failover: {events} events on the promoted server ({} acknowledged to the writer, {} writer errors); \
         missing entries {missing}, orphan entries {orphans}; outbox {outbox:?}; fresh event projected \
         {fresh_after:?} after promotion; switches logged {switches:?}; reconnects {reconnects:?}; {:?} in all",
        stats.events,
        stats.errors,
        started.elapsed()
    );
    assert_eq!((missing, orphans), (0, 0), "every event has its one entry, every entry its event");
    assert_eq!(outbox.keys().collect::<Vec<_>>(), ["done"], "nothing failed: {outbox:?}");
    assert!(fresh_after <= Duration::from_secs(10), "fresh event projected {fresh_after:?} after promotion");
    for (w, _) in &mut workers {
        w.assert_running();
    }
    assert_eq!(switches, [1, 1], "each worker logs the switch once");
    assert!(reconnects.iter().all(|r| *r >= 1.0), "reconnections counted: {reconnects:?}");
    for (w, _) in &mut workers {
        assert!(w.stop().success(), "{}", w.tail());
    }
    lonely.kill9();
}

#[test]
fn chaos_with_a_synchronous_standby_nothing_acknowledged_is_lost_in_a_failover() {
    // The server waits for the standby before acknowledging a commit: after the primary
    // dies mid-write and the standby is promoted, every event a writer was told is
    // committed is there, with its outbox row.
    let primary = Cluster::start(&["fsync=off"]).unwrap_or_else(|e| panic!("starting the primary: {e}"));
    let _stop_primary = StopCluster(&primary);
    let db = TestDb::empty_on(&primary.server);
    let r = run(&mut db.chronicle(&["migrate"]));
    assert_eq!(r.code, Some(0), "{r}");
    let standby = Cluster::standby_of(&primary, &["fsync=off"]).unwrap_or_else(|e| panic!("starting the standby: {e}"));
    let _stop_standby = StopCluster(&standby);
    let mut c = db.client();
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "ALTER SYSTEM SET synchronous_commit = on",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).unwrap();
    }
    wait_until(Duration::from_secs(30), "the standby to be synchronous", || {
        count(&mut c, "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") == 1
    });
    drop(c);

    let stop = Arc::new(AtomicBool::new(false));
    let (flag, conn) = (stop.clone(), primary.server.key_value(&db.name));
    let writer = std::thread::spawn(move || {
        let mut acknowledged = Vec::new();
        let Ok(mut c) = conn.parse::<postgres::Config>().expect("connection string").connect(NoTls) else {
            return acknowledged;
        };
        while !flag.load(Ordering::Relaxed) {
            let id = Uuid::now_v7();
            let ok = c.execute(
                "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
                 VALUES ($1, $1, 'tag', $1, 'TagCreated', '{\"name\": \"sync\"}', now())",
                &[&id],
            );
            match ok {
                Ok(_) => acknowledged.push(id),
                Err(_) => break,
            }
        }
        acknowledged
    });
    let mut c = db.client();
    wait_until(Duration::from_secs(30), "the writer to be writing", || {
        count(&mut c, "SELECT count(*) FROM chronicle_events") >= 200
    });
    drop(c);
    let out = primary.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    assert!(out.status.success(), "stopping the primary: {}", String::from_utf8_lossy(&out.stderr));
    stop.store(true, Ordering::Relaxed);
    let acknowledged = writer.join().expect("the writer thread");
    let out = standby.pg_ctl(&["promote", "-w", "-t", "60"]);
    assert!(out.status.success(), "promoting the standby: {}", String::from_utf8_lossy(&out.stderr));
    let mut c = standby.server.connect(&db.name);
    let lost = c
        .query_one(
            "SELECT count(*) FROM unnest($1::uuid[]) a(id)
             WHERE NOT EXISTS (SELECT 1 FROM chronicle_events e WHERE e.id = a.id)
                OR NOT EXISTS (SELECT 1 FROM chronicle_outbox_events o WHERE o.event_id = a.id)",
            &[&acknowledged],
        )
        .unwrap()
        .get::<_, i64>(0);
    eprintln!(
        "synchronous failover: {} commits acknowledged, {lost} of them missing after promotion",
        acknowledged.len()
    );
    assert!(acknowledged.len() >= 200);
    assert_eq!(lost, 0, "an acknowledged event was lost");
}
