//! The worker's HTTP endpoint as Prometheus sees it: the exposition passes
//! `promtool check metrics`, every metric moves as the worker works, the status codes,
//! /readyz following the database, and clients that misbehave.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{get_bytes, request, sample, tool, Gate, Worker};
use crate::util::{count, insert_events, run_with_input, wait_until, worker_cmd, TestDb};

/// An event of a type this version does not know: failed with `unknown_event_type`.
pub fn insert_poison_event(c: &mut postgres::Client) {
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         VALUES (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'NoSuchType', '{}', now())",
    )
    .expect("inserting the poison event");
}

/// `promtool check metrics` on `text`: it must print nothing and exit 0.
fn assert_promtool_accepts(text: &str, when: &str) {
    let mut cmd = Command::new(tool("promtool"));
    cmd.args(["check", "metrics"]);
    let r = run_with_input(&mut cmd, text.as_bytes());
    assert!(
        r.code == Some(0) && r.stdout.is_empty() && r.stderr.is_empty(),
        "promtool check metrics ({when}) complained:\n{r}\n--- exposition\n{text}"
    );
}

#[test]
fn the_exposition_passes_promtool_check_metrics_before_and_after_work() {
    let db = TestDb::new();
    let worker = Worker::start(&db, &[]);

    let first = worker.get("/metrics");
    assert_eq!(first.status, 200, "{first:?}");
    let ctype = first.header("Content-Type").unwrap_or("");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "Content-Type: {ctype:?}");
    assert_promtool_accepts(&first.body, "at start");

    let mut c = db.client();
    insert_events(&mut c, 100);
    insert_poison_event(&mut c);
    worker.wait_for("chronicle_outbox_processed_total", &[], "100 events processed", |v| v == 100.0);
    worker.wait_for("chronicle_outbox_failed_events", &[], "the failed gauge to show the poison event", |v| v == 1.0);
    let after = worker.metrics();
    assert_promtool_accepts(&after, "after a drain with a terminal failure");
    let id = worker.worker_id();
    for line in after.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.contains(&format!("worker_id=\"{id}\"")), "a series without worker_id=\"{id}\": {line}");
    }
}

/// Each family moves with the work: the gauges show a backlog held in flight (entries are
/// locked, so a claimed batch cannot complete), then fall to 0 when it drains; the
/// counters and histograms rise by exactly what happened.
#[test]
fn every_metric_moves_as_the_worker_drains() {
    const N: i64 = 200;
    let db = TestDb::new();
    let worker = Worker::start(&db, &[("OUTBOX_BATCH_SIZE", "20")]);
    worker.wait_for("chronicle_outbox_pending_events", &[], "the first gauge sample", |v| v == 0.0);
    let reason = [("error_reason", "unknown_event_type")];
    assert_eq!(worker_sample(&worker, "chronicle_outbox_processed_total", &[]), 0.0);
    assert_eq!(worker_sample(&worker, "chronicle_outbox_terminal_failed_total", &reason), 0.0);
    assert_eq!(worker_sample(&worker, "chronicle_outbox_inflight_events", &[]), 0.0);

    let mut locker = db.client();
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE chronicle_entries IN EXCLUSIVE MODE").unwrap();
    let mut c = db.client();
    insert_events(&mut c, N);
    insert_poison_event(&mut c);
    worker.wait_for("chronicle_outbox_inflight_events", &[], "a batch held in flight", |v| v >= 1.0);
    let pending = worker.wait_for("chronicle_outbox_pending_events", &[], "a backlog", |v| v >= 1.0);
    assert!(pending <= (N + 1) as f64, "pending {pending}");
    assert_eq!(
        worker_sample(&worker, "chronicle_outbox_processed_total", &[]),
        0.0,
        "nothing completes while entries are locked"
    );
    tx.commit().unwrap();

    worker.wait_for("chronicle_outbox_processed_total", &[], "every event processed", |v| v == N as f64);
    worker.wait_for("chronicle_outbox_terminal_failed_total", &reason, "the poison event counted", |v| v == 1.0);
    worker.wait_for("chronicle_outbox_pending_events", &[], "the backlog gone", |v| v == 0.0);
    worker.wait_for("chronicle_outbox_inflight_events", &[], "nothing in flight", |v| v == 0.0);
    worker.wait_for("chronicle_outbox_failed_events", &[], "the failed gauge", |v| v == 1.0);
    worker.wait_for("chronicle_outbox_oldest_pending_age_seconds", &[], "no pending age", |v| v == 0.0);

    let text = worker.metrics();
    let at = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    assert_eq!(at("chronicle_projection_latency_seconds_count", &[]), N as f64, "one latency per projected event");
    let batches = at("chronicle_outbox_batch_duration_seconds_count", &[]);
    assert!(batches >= (N / 20) as f64, "batches observed: {batches}");
    assert!(at("chronicle_outbox_batch_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(at("chronicle_outbox_batch_duration_seconds_bucket", &[("le", "+Inf")]), batches);
    for other in ["invalid_payload", "rejected_by_read_model", "max_attempts_exceeded", "projection_panicked"] {
        assert_eq!(at("chronicle_outbox_terminal_failed_total", &[("error_reason", other)]), 0.0, "{other}");
    }
    for quiet in [
        "chronicle_outbox_retry_scheduled_total",
        "chronicle_outbox_reclaimed_total",
        "chronicle_outbox_lease_lost_total",
        "chronicle_outbox_db_errors_total",
        "chronicle_outbox_stuck_processing_events",
    ] {
        assert_eq!(at(quiet, &[]), 0.0, "{quiet} moved in a healthy drain\n{}", worker.log());
    }
    assert_eq!(at("chronicle_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    let mut c = db.client();
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'"), N);
}

fn worker_sample(worker: &Worker, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = worker.metrics();
    sample(&text, name, labels).unwrap_or_else(|| panic!("{name}{labels:?} missing:\n{text}"))
}

#[test]
fn health_readiness_and_wrong_requests_get_their_status_codes() {
    let db = TestDb::new();
    let worker = Worker::start(&db, &[]);
    wait_until(Duration::from_secs(30), "/readyz 200", || worker.get("/readyz").status == 200);
    let ready = worker.get("/readyz");
    assert!(ready.body.contains("ready"), "{ready:?}");
    let health = worker.get("/healthz");
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.header("Content-Type"), Some("application/json"), "{health:?}");
    assert_eq!(worker.get("/metrics?debug=1").status, 200, "a query string is ignored");
    assert_eq!(worker.get("/nope").status, 404);
    assert_eq!(worker.get("/").status, 404);
    let head = request(worker.addr, b"HEAD /metrics HTTP/1.0\r\n\r\n", Duration::from_secs(10)).unwrap();
    assert_eq!(head.status, 200, "{head:?}");
    for path in ["/metrics", "/healthz", "/readyz"] {
        let raw = format!("POST {path} HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi");
        let r = request(worker.addr, raw.as_bytes(), Duration::from_secs(10)).unwrap();
        assert_eq!(r.status, 405, "POST {path}: {r:?}");
    }
    let r = request(worker.addr, b"DELETE /metrics HTTP/1.0\r\n\r\n", Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 405, "{r:?}");
}

/// /readyz answers 503 while the worker cannot reach its database (here: not yet there,
/// then gone after having been there) and 200 while it can; /healthz and /metrics answer
/// 200 throughout. (A worker on an unmigrated database refuses to start at all.)
#[test]
fn readyz_follows_the_database_and_healthz_stays_up() {
    let db = TestDb::new();
    let gate = Gate::new(&db);
    let mut cmd = worker_cmd(&db, &[]);
    cmd.env("DATABASE_URL", gate.url(&db));
    let worker = Worker::start_cmd(cmd, &[], true);
    let ready = |want: u16| worker.get("/readyz").status == want;

    assert_eq!(worker.get("/readyz").status, 503, "no database yet\n{}", worker.log());
    assert_eq!(worker.get("/healthz").status, 200);
    assert_eq!(worker.get("/metrics").status, 200);

    gate.open();
    wait_until(Duration::from_secs(30), "/readyz 200 once the database is there", || ready(200));
    let mut c = db.client();
    insert_events(&mut c, 10);
    worker.wait_for("chronicle_outbox_processed_total", &[], "10 events processed", |v| v == 10.0);

    gate.close();
    wait_until(Duration::from_secs(30), "/readyz 503 once the database is gone", || ready(503));
    assert_eq!(worker.get("/healthz").status, 200);
    let text = worker.metrics();
    assert!(sample(&text, "chronicle_outbox_db_errors_total", &[]).unwrap_or(0.0) >= 1.0, "db errors counted:\n{text}");

    gate.open();
    wait_until(Duration::from_secs(30), "/readyz 200 once the database is back", || ready(200));
    insert_events(&mut c, 5);
    worker.wait_for("chronicle_outbox_processed_total", &[], "the 5 new events processed", |v| v == 15.0);
}

/// Clients that connect and send nothing, send garbage, or send a 1 MB header neither
/// delay a concurrent scrape (each answers within 1 s) nor slow the drain.
#[test]
fn silent_garbage_and_huge_header_clients_delay_neither_scrapes_nor_the_drain() {
    const N: i64 = 2000;
    let db = TestDb::new();
    let worker = Worker::start(&db, &[("OUTBOX_BATCH_SIZE", "100")]);
    let mut c = db.client();

    // Baseline: a drain with no bad clients.
    let started = Instant::now();
    insert_events(&mut c, N);
    worker.wait_for("chronicle_outbox_processed_total", &[], "the baseline drain", |v| v == N as f64);
    let baseline = started.elapsed();

    let mut bad: Vec<TcpStream> = Vec::new();
    for _ in 0..64 {
        bad.push(TcpStream::connect(worker.addr).expect("a silent client connects"));
        // sends nothing
    }
    for garbage in [
        &b"\x00\xff\xfe garbage without a line end"[..],
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ] {
        let mut s = TcpStream::connect(worker.addr).unwrap();
        s.write_all(garbage).unwrap();
        bad.push(s);
    }
    // A 1 MB header, sent and left unfinished, and one finished.
    let big = format!("GET /metrics HTTP/1.0\r\nX-Big: {}", "a".repeat(1 << 20));
    let mut unfinished = TcpStream::connect(worker.addr).unwrap();
    unfinished.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    unfinished.write_all(big.as_bytes()).unwrap();
    bad.push(unfinished);
    let finished_big = {
        let addr = worker.addr;
        let raw = format!("{big}\r\n\r\n").into_bytes();
        std::thread::spawn(move || request(addr, &raw, Duration::from_secs(20)))
    };
    // A slow client: one byte of a request every 100 ms, in the background.
    let slow = {
        let addr = worker.addr;
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            for b in get_bytes("/metrics").iter().take(40) {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let started = Instant::now();
    insert_events(&mut c, N);
    let mut slowest = Duration::ZERO;
    while worker_sample(&worker, "chronicle_outbox_processed_total", &[]) < (2 * N) as f64 {
        let r = request(worker.addr, &get_bytes("/metrics"), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("a scrape failed while bad clients were connected: {e}\n{}", worker.log()));
        assert_eq!(r.status, 200);
        slowest = slowest.max(r.elapsed);
        assert!(started.elapsed() < baseline * 5 + Duration::from_secs(30), "the drain stalled\n{}", worker.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let with_bad_clients = started.elapsed();
    for _ in 0..20 {
        let r = request(worker.addr, &get_bytes("/metrics"), Duration::from_secs(5)).expect("a scrape");
        slowest = slowest.max(r.elapsed);
    }
    assert!(slowest < Duration::from_secs(1), "a scrape took {slowest:?} while bad clients were connected");
    assert!(
        with_bad_clients <= baseline * 4 + Duration::from_secs(5),
        "the drain took {with_bad_clients:?} with bad clients connected, {baseline:?} without"
    );
    let big_answer = finished_big.join().unwrap();
    eprintln!("1 MB header request answered: {:?}", big_answer.as_ref().map(|r| r.status));
    slow.join().unwrap();
    assert!(worker_sample(&worker, "chronicle_outbox_db_errors_total", &[]) == 0.0);
    drop(bad);
}

#[test]
fn a_client_that_pipelines_requests_and_never_reads_does_not_stall_other_scrapes() {
    let db = TestDb::new();
    let worker = Worker::start(&db, &[]);
    // One connection sends thousands of requests and reads nothing: its answers fill
    // the socket buffers and block the writer of that connection only.
    let mut hog = TcpStream::connect(worker.addr).unwrap();
    let flood = std::thread::spawn(move || {
        for _ in 0..5000 {
            if hog.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
                break;
            }
        }
        hog // kept open until the test ends
    });
    std::thread::sleep(Duration::from_millis(1000));
    for i in 0..5 {
        let t = Instant::now();
        let r = request(worker.addr, b"GET /metrics HTTP/1.0\r\n\r\n", Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("scrape {i} failed while a client does not read: {e}"));
        assert_eq!(r.status, 200);
        assert!(t.elapsed() < Duration::from_secs(1), "scrape {i} took {:?}", t.elapsed());
    }
    drop(flood);
}
