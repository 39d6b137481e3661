//! The metrics endpoint under pressure, against the real binary on loopback: it comes
//! back by itself after running out of file descriptors or threads (while the worker goes
//! on projecting), and a client that pipelines without reading, thousands of idle or slow
//! connections, a huge header or a huge declared body cost little and stop nothing.
//! Linux only: limits through `ulimit`/`setpriv`, memory and CPU from /proc.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{count, free_port, insert_events, wait_until, worker_cmd, TestDb};

/// A `chronicle worker` with its endpoint on a free loopback port, started through `bash`
/// so a test can set limits first (`exec` keeps the pid); killed when dropped.
struct Worker {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Worker {
    /// `limits` runs in bash before `exec chronicle worker`; `as_nobody` runs it as uid
    /// 65534 (RLIMIT_NPROC does not apply to root).
    fn start(db: &TestDb, limits: &str, as_nobody: bool) -> Worker {
        let port = free_port();
        let base = worker_cmd(db, &[]);
        let script = format!("{limits}\nexec \"$0\" worker");
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-c", &script]);
            c
        } else {
            let mut c = Command::new("bash");
            c.args(["-c", &script]);
            c
        };
        cmd.arg(base.get_program());
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.env("OUTBOX_METRICS_PORT", port.to_string())
            .env("OUTBOX_METRICS_BIND", "127.0.0.1")
            .env("OUTBOX_WORKER_ID", format!("pressure-{port}"))
            .env("RUST_LOG", "info");
        let log = std::env::temp_dir().join(format!("chronicle-pressure-{}-{port}.log", std::process::id()));
        let file = std::fs::File::create(&log).expect("creating the worker log");
        let out = file.try_clone().expect("cloning the log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(file);
        let child = cmd.spawn().expect("starting chronicle worker");
        let w = Worker { child, port, log };
        wait_until(Duration::from_secs(30), "the endpoint to answer", || {
            w.get("/healthz").is_some_and(|(s, _)| s == 200)
        });
        w
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One `GET` over HTTP/1.0: (status, body), or None when nothing answers within 2 s.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.get(9..12)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    }

    /// A sample of this worker's exposition (labels included in `series`).
    fn sample(&self, series: &str) -> Option<f64> {
        let (status, body) = self.get("/metrics")?;
        assert_eq!(status, 200);
        body.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    fn restarts(&self) -> f64 {
        self.sample(&format!("chronicle_metrics_server_restarts_total{{worker_id=\"pressure-{}\"}}", self.port))
            .unwrap_or_else(|| panic!("no restart counter:\n{}", self.log()))
    }

    /// A field of /proc/PID/status in kB (VmRSS, VmHWM).
    fn status_kb(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc/PID/status");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:"))?.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// User plus system CPU time so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("/proc/PID/stat");
        let after = stat.rsplit_once(')').expect("stat").1;
        let f: Vec<u64> = after.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
        // Fields 14 and 15 (utime, stime), counted after the command name; USER_HZ is 100.
        Duration::from_millis((f[11] + f[12]) * 10)
    }

    fn healthcheck(&self) -> Option<i32> {
        crate::util::chronicle_cmd(&["healthcheck"])
            .env("OUTBOX_METRICS_PORT", self.port.to_string())
            .env("OUTBOX_METRICS_BIND", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("running chronicle healthcheck")
            .code()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the worker exited ({status}):\n{}", self.log());
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- log of the worker on port {}\n{}", self.port, self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn entries(db: &TestDb) -> i64 {
    count(&mut db.client(), "SELECT count(*) FROM chronicle_entries")
}

/// Opens up to `n` connections to the endpoint (fewer when its backlog is full).
fn connect_many(w: &Worker, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        // A full backlog drops the handshake, retried after 1 s: wait longer than that.
        match TcpStream::connect_timeout(&w.addr(), Duration::from_secs(3)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    held
}

/// The common scenario: a worker under `limits`, `n` connections held for `hold` while
/// events keep coming and must be projected; when they close, /metrics must answer again
/// soon, `chronicle healthcheck` must pass, and the server must have been restarted.
fn endpoint_survives(limits: &str, as_nobody: bool, n: usize, hold: Duration) {
    chronicle::rlimit::raise_open_files_limit();
    let db = TestDb::new();
    let mut w = Worker::start(&db, limits, as_nobody);
    let mut c = db.client();
    insert_events(&mut c, 20);
    wait_until(Duration::from_secs(30), "the first events to be projected", || entries(&db) == 20);

    let started = Instant::now();
    let held = connect_many(&w, n);
    eprintln!("{limits:?}: {} connections open", held.len());
    assert!(held.len() >= n.min(100), "only {} connections could be opened", held.len());
    // Under pressure the worker goes on: events inserted now are projected now.
    let mut expected = 20;
    while started.elapsed() < hold {
        insert_events(&mut c, 10);
        expected += 10;
        wait_until(Duration::from_secs(10), "events to be projected under pressure", || entries(&db) == expected);
        std::thread::sleep(Duration::from_millis(500));
    }
    w.assert_alive();
    drop(held);

    let released = Instant::now();
    wait_until(Duration::from_secs(15), "/metrics to answer again", || {
        w.get("/metrics").is_some_and(|(s, _)| s == 200)
    });
    let back = released.elapsed();
    eprintln!("{limits:?} + {n} connections held {hold:?}: /metrics answered again {back:?} after they closed");
    assert!(back < Duration::from_secs(10), "/metrics took {back:?} to answer again");
    assert_eq!(w.healthcheck(), Some(0), "chronicle healthcheck after the pressure");
    assert!(w.restarts() >= 1.0, "the pressure did not stop the server; the test proves nothing:\n{}", w.log());
    insert_events(&mut c, 10);
    wait_until(Duration::from_secs(10), "events to be projected after", || entries(&db) == expected + 10);
}

#[test]
fn the_endpoint_comes_back_after_running_out_of_descriptors_at_64() {
    endpoint_survives("ulimit -n 64", false, 100, Duration::from_secs(10));
}

#[test]
fn the_endpoint_comes_back_after_600_connections_at_1024_descriptors() {
    endpoint_survives("ulimit -n 1024", false, 600, Duration::from_secs(5));
}

/// RLIMIT_NPROC binds a user, never root: as root the worker runs as `nobody`.
#[test]
fn the_endpoint_comes_back_after_running_out_of_threads() {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if root {
        endpoint_survives("ulimit -u 100", true, 300, Duration::from_secs(5));
    } else {
        endpoint_survives(
            "ulimit -u $(( $(ps -L -u \"$(id -u)\" --no-headers | wc -l) + 80 ))",
            false,
            300,
            Duration::from_secs(5),
        );
    }
}

/// Up to 10 MB of pipelined GETs on one connection that never reads: the server stops
/// answering it once 4 answers wait, then closes it (it may close before 10 MB are sent).
#[test]
fn a_client_that_pipelines_without_reading_is_dropped_and_costs_little() {
    let db = TestDb::new();
    let mut w = Worker::start(&db, "", false);
    let before = w.status_kb("VmRSS");
    let mut s = TcpStream::connect(w.addr()).expect("connecting");
    s.set_write_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let one = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let chunk = one.repeat(64 * 1024 / one.len());
    let mut sent = 0;
    let mut closed = None;
    while sent < 10 * 1024 * 1024 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) => {
                closed = Some(e);
                break;
            }
        }
    }
    w.assert_alive();
    let peak = w.status_kb("VmHWM");
    eprintln!("pipelined GETs, never read: {sent} bytes sent, closed by the server: {closed:?}; VmRSS before {before} kB, VmHWM {peak} kB");
    assert!(closed.is_some(), "the server kept a connection that does not read its answers ({sent} bytes sent)");
    assert!(peak <= 64 * 1024, "peak RSS {peak} kB over 64 MB");
    drop(s);
    // Once the client is gone the process goes back to idle: a second of it using less
    // than a quarter of a CPU comes, however slow the machine (a server still answering
    // the dropped pipeline would use a whole one).
    let left = Instant::now();
    let mut windows = Vec::new();
    wait_until(Duration::from_secs(90), "the worker to be idle again after the client left", || {
        let cpu_then = w.cpu();
        std::thread::sleep(Duration::from_secs(1));
        let used = w.cpu() - cpu_then;
        windows.push(used);
        used < Duration::from_millis(250)
    });
    eprintln!("CPU per second after the client left: {windows:?} (idle {:?} after)", left.elapsed());
    assert_eq!(w.get("/metrics").map(|(s, _)| s), Some(200));
}

#[test]
fn idle_and_slow_connections_do_not_delay_a_scrape_and_idle_ones_are_closed() {
    chronicle::rlimit::raise_open_files_limit();
    let db = TestDb::new();
    let w = Worker::start(&db, "", false);
    let opened = Instant::now();
    let idle = connect_many(&w, 2000);
    assert_eq!(idle.len(), 2000, "could not open 2,000 connections");
    let mut slow = connect_many(&w, 200);
    let slow_opened = Instant::now();
    assert_eq!(slow.len(), 200, "could not open 200 more connections");
    for s in &mut slow {
        s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").expect("slow start");
    }
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        for s in &mut slow {
            let _ = s.write_all(b"a");
        }
        let t = Instant::now();
        let answer = w.get("/metrics");
        let took = t.elapsed();
        assert_eq!(answer.map(|(s, _)| s), Some(200), "a scrape among 2,200 open connections");
        worst = worst.max(took);
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("2,000 idle + 200 slow connections: slowest of 5 scrapes {worst:?}");
    // A scrape that had to wait for a connection to be given up would wait for the first
    // idle ones to time out (10 s) or the slow ones (30 s).
    assert!(worst < Duration::from_secs(8), "a scrape took {worst:?}");
    // Idle connections are closed by the server (over the cap of 512, or idle for 10 s),
    // and slow ones too, 30 s after their opening, though they keep sending.
    for s in idle.iter().step_by(100) {
        assert_closed_within(s, Duration::from_secs(60), "an idle connection");
    }
    // The slow ones go on sending a byte every 2 s, so no idle timeout closes them.
    let readers: Vec<TcpStream> = slow.iter().step_by(20).map(|s| s.try_clone().expect("clone")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dripping = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for s in &mut slow {
                    let _ = s.write_all(b"a");
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        })
    };
    // Closed 30 s after their opening; a machine slow to get there gets till 120 s.
    for s in &readers {
        assert_closed_within(s, Duration::from_secs(120).saturating_sub(slow_opened.elapsed()), "a slow connection");
    }
    eprintln!("every sampled connection closed {:?} after opening", opened.elapsed());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    dripping.join().expect("the dripping thread");
}

/// Reads until the server closes `s` (EOF or reset), failing after `within`.
fn assert_closed_within(s: &TcpStream, within: Duration, what: &str) {
    s.set_read_timeout(Some(within.max(Duration::from_millis(10)))).expect("timeout");
    let r = (&*s).read_to_end(&mut Vec::new());
    let closed = r.is_ok() || r.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset);
    assert!(closed, "{what} was not closed by the server: {r:?}");
}

#[test]
fn a_16_mb_header_is_answered_and_its_memory_given_back() {
    let db = TestDb::new();
    let mut w = Worker::start(&db, "", false);
    let before = w.status_kb("VmRSS");
    let mut s = TcpStream::connect(w.addr()).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut raw = b"GET /healthz HTTP/1.0\r\nX-Big: ".to_vec();
    raw.resize(raw.len() + 16 * 1024 * 1024, b'a');
    raw.extend_from_slice(b"\r\n\r\n");
    // Answered (any status) or refused (the connection closed): both are fine.
    let _ = s.write_all(&raw);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    drop(s);
    w.assert_alive();
    let peak = w.status_kb("VmHWM");
    let t = Instant::now();
    wait_until(Duration::from_secs(10), "RSS to come back near its baseline", || {
        w.status_kb("VmRSS") < before + 8 * 1024
    });
    eprintln!(
        "16 MB header: answer {:?}, VmRSS {before} kB before, VmHWM {peak} kB, back under +8 MB in {:?}",
        String::from_utf8_lossy(answer.get(..12).unwrap_or(&answer[..])),
        t.elapsed()
    );
    assert_eq!(w.get("/healthz").map(|(s, _)| s), Some(200));
}

/// tiny_http drains an unread body into one buffer of the declared size when a request is
/// dropped: a declared terabyte aborted the process. Such a request is abandoned instead.
#[test]
fn a_huge_declared_body_does_not_abort_the_worker() {
    let db = TestDb::new();
    let mut w = Worker::start(&db, "", false);
    for path in ["/metrics", "/nowhere"] {
        let mut s = TcpStream::connect(w.addr()).expect("connecting");
        s.write_all(format!("POST {path} HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\nxy").as_bytes())
            .expect("sending");
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(500));
    w.assert_alive();
    assert_eq!(w.get("/healthz").map(|(s, _)| s), Some(200));
    assert!(w.log().contains("abandoning a request"), "{}", w.log());
    let mut c = db.client();
    insert_events(&mut c, 5);
    wait_until(Duration::from_secs(10), "events to be projected", || entries(&db) == 5);
}

/// The bounds do not cost ordinary clients: many scrapes in a row (more connections than
/// are answered at once) and a short pipeline on one connection are all answered.
#[test]
fn quick_successive_scrapes_and_a_short_pipeline_are_all_answered() {
    let db = TestDb::new();
    let w = Worker::start(&db, "", false);
    for i in 0..300 {
        assert_eq!(w.get("/metrics").map(|(s, _)| s), Some(200), "scrape {i} of 300 in a row");
    }
    let mut s = TcpStream::connect(w.addr()).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let one = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let last = "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    s.write_all(format!("{one}{one}{last}").as_bytes()).expect("sending a pipeline of 3");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("reading the 3 answers");
    assert_eq!(raw.matches("HTTP/1.1 200").count(), 3, "{raw}");
    assert!(raw.rfind("ready").unwrap_or(0) > raw.rfind("\"ok\"").unwrap_or(usize::MAX), "answers out of order: {raw}");
}
