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
        if limits.contains("ulimit -n 64") {
            // Each pooled connection costs several descriptors (its socket, its runtime's
            // poller and waker, TLS): at 64, four claim threads and the services would leave
            // the endpoint none to defend. One claim thread measures the endpoint alone.
            cmd.env("OUTBOX_CONCURRENCY", "1");
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

    /// A field of /proc/PID/status in kB (VmRSS, VmHWM), or a count (Threads).
    fn status_kb(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc/PID/status");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:"))?.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// Descriptors the worker has open.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).expect("/proc/PID/fd").count()
    }

    /// Threads of the worker.
    fn threads(&self) -> u64 {
        self.status_kb("Threads")
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

/// How many of `held` the server has closed (or answered, with 503) by now.
fn closed_by_server(held: &[TcpStream]) -> usize {
    held.iter()
        .filter(|s| {
            s.set_nonblocking(true).expect("nonblocking");
            let r = (&**s).read(&mut [0u8; 64]);
            !matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
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
    let fds = w.fds();
    let closed = closed_by_server(&held);
    eprintln!(
        "{limits:?}: {closed} of {} held connections closed or answered 503 by the server; {fds} descriptors open",
        held.len()
    );
    assert!(closed > 0, "the pressure never reached the endpoint's bounds; the test proves nothing:\n{}", w.log());
    assert!(!w.log().contains("metrics-conn"), "a connection thread panicked:\n{}", w.log());
    // The endpoint keeps to its share of descriptors: nothing else runs short of them. The
    // endpoint itself may meet the limit (its front then waits before accepting again,
    // tiny_http's accept fails and it is started again with backoff, leaving the
    // descriptors to the rest); no other part of the worker may.
    let log = w.log();
    let short = log
        .lines()
        .filter(|l| l.contains("os error 24") && !l.contains(" chronicle::metrics::") && !l.contains(" tiny_http]"))
        .collect::<Vec<_>>();
    assert!(short.is_empty(), "something ran out of descriptors:\n{}", short.join("\n"));
    drop(held);

    let released = Instant::now();
    wait_until(Duration::from_secs(15), "/metrics to answer again", || {
        w.get("/metrics").is_some_and(|(s, _)| s == 200)
    });
    let back = released.elapsed();
    eprintln!("{limits:?} + {n} connections held {hold:?}: /metrics answered again {back:?} after they closed");
    assert!(back < Duration::from_secs(10), "/metrics took {back:?} to answer again");
    assert_eq!(w.healthcheck(), Some(0), "chronicle healthcheck after the pressure");
    eprintln!("{limits:?}: {} restarts of the endpoint", w.restarts());
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
    let mut served = 0;
    for _ in 0..5 {
        for s in &mut slow {
            let _ = s.write_all(b"a");
        }
        let t = Instant::now();
        let answer = w.get("/metrics").map(|(s, _)| s);
        let took = t.elapsed();
        // 503 is the front's answer when its relay to tiny_http is saturated (a loaded
        // machine): an answer all the same, never a hang.
        assert!(matches!(answer, Some(200 | 503)), "a scrape among 2,200 open connections: {answer:?}");
        served += usize::from(answer == Some(200));
        worst = worst.max(took);
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("2,000 idle + 200 slow connections: slowest of 5 scrapes {worst:?}, {served} of 5 answered 200");
    assert!(served > 0, "no scrape among 2,200 open connections got the metrics");
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

/// Sends `raw` and reads until the server closes: the answer, or None when the
/// connection fails or nothing ends within 10 s.
fn exchange(w: &Worker, raw: &[u8]) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&w.addr(), Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(raw).ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    Some(String::from_utf8_lossy(&answer).into_owned())
}

/// A request line over 8 KiB is refused with 414, a header line over 8 KiB or headers over
/// 64 KiB with 431, and a 512 MB header line on one connection, then on ten at once, is
/// cut short: the worker's peak RSS stays under 64 MB and projection goes on.
#[test]
fn oversized_heads_are_refused_and_a_512_mb_header_costs_little() {
    let db = TestDb::new();
    let mut w = Worker::start(&db, "", false);
    let before = w.status_kb("VmRSS");
    let status = |raw: &[u8]| exchange(&w, raw).and_then(|a| a.get(9..12).map(str::to_string));
    let long = |prefix: &str, n: usize, suffix: &str| {
        let mut v = prefix.as_bytes().to_vec();
        v.resize(v.len() + n, b'a');
        v.extend_from_slice(suffix.as_bytes());
        v
    };
    assert_eq!(status(&long("GET /", 8 * 1024, " HTTP/1.1\r\n\r\n")).as_deref(), Some("414"));
    assert_eq!(status(&long("GET / HTTP/1.1\r\nX-Big: ", 8 * 1024, "\r\n\r\n")).as_deref(), Some("431"));
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..70 {
        many.extend_from_slice(&long(&format!("X-{i}: "), 1000, "\r\n"));
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(status(&many).as_deref(), Some("431"), "70 KB of headers");
    assert_eq!(
        status(&long("GET /healthz HTTP/1.1\r\nConnection: close\r\nX-Fits: ", 8000, "\r\n\r\n")).as_deref(),
        Some("200")
    );

    let mut c = db.client();
    let mut expected = 0;
    for clients in [1, 10] {
        let started = Instant::now();
        let senders: Vec<_> = (0..clients)
            .map(|_| {
                let addr = w.addr();
                std::thread::spawn(move || -> (u64, Option<std::io::Error>) {
                    let mut s = TcpStream::connect(addr).expect("connecting");
                    s.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
                    let chunk = vec![b'a'; 64 * 1024];
                    let mut sent = 0u64;
                    let mut failed = s.write_all(b"GET /metrics HTTP/1.1\r\nX-Big: ").err();
                    let started = Instant::now();
                    while failed.is_none() && sent < 512 * 1024 * 1024 && started.elapsed() < Duration::from_secs(60) {
                        match s.write_all(&chunk) {
                            Ok(()) => sent += chunk.len() as u64,
                            Err(e) => failed = Some(e),
                        }
                    }
                    (sent, failed)
                })
            })
            .collect();
        // Projection goes on meanwhile.
        insert_events(&mut c, 10);
        expected += 10;
        wait_until(Duration::from_secs(10), "events to be projected under the headers", || entries(&db) == expected);
        let mut most = 0;
        for sender in senders {
            let (sent, failed) = sender.join().expect("a sender");
            assert!(failed.is_some(), "the server took a {sent}-byte header line");
            assert!(sent < 64 * 1024 * 1024, "the server read {sent} bytes of one header line before refusing it");
            most = most.max(sent);
        }
        w.assert_alive();
        let peak = w.status_kb("VmHWM");
        eprintln!(
            "512 MB header on {clients} connection(s): cut after at most {most} bytes sent, all within {:?}; \
             VmRSS before {before} kB, VmHWM so far {peak} kB",
            started.elapsed()
        );
        assert!(peak <= 64 * 1024, "peak RSS {peak} kB over 64 MB");
    }
    assert_eq!(w.get("/healthz").map(|(s, _)| s), Some(200));
}

/// tiny_http would drain an unread body into one buffer of its declared size, and a
/// request that is not drained kept its thread and two descriptors for good: a request
/// declaring a body is answered 413 by the front and its connection closed. After 20,000
/// of them, threads and descriptors are back within 10 % of what they were, /metrics and
/// `chronicle healthcheck` answer, and projection never stopped.
#[test]
fn huge_declared_bodies_are_refused_and_20000_leave_nothing_behind() {
    chronicle::rlimit::raise_open_files_limit();
    let db = TestDb::new();
    let mut w = Worker::start(&db, "", false);
    let mut c = db.client();
    insert_events(&mut c, 5);
    wait_until(Duration::from_secs(10), "events to be projected", || entries(&db) == 5);
    for _ in 0..20 {
        assert_eq!(w.get("/metrics").map(|(s, _)| s), Some(200));
    }
    let (threads, fds) = (w.threads(), w.fds());

    for path in ["/metrics", "/nowhere"] {
        let answer =
            exchange(&w, format!("POST {path} HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\nxy").as_bytes())
                .expect("an answer, then the connection closed");
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        assert!(answer.contains("Connection: close"), "{answer}");
    }

    let total = 20_000;
    let clients = 8;
    let started = Instant::now();
    let senders: Vec<_> = (0..clients)
        .map(|_| {
            let addr = w.addr();
            std::thread::spawn(move || -> (u32, Vec<String>) {
                let mut refused = 0;
                let mut other = Vec::new();
                let started = Instant::now();
                for _ in 0..total / clients {
                    if started.elapsed() > Duration::from_secs(120) {
                        other.push("out of time".to_string());
                        break;
                    }
                    let answer = (|| -> std::io::Result<String> {
                        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\nxy")?;
                        let mut answer = String::new();
                        s.read_to_string(&mut answer)?;
                        Ok(answer)
                    })();
                    match answer {
                        Ok(a) if a.starts_with("HTTP/1.1 413 ") => refused += 1,
                        Ok(a) => other.push(a.chars().take(40).collect()),
                        Err(e) => other.push(e.to_string()),
                    }
                }
                (refused, other)
            })
        })
        .collect();
    let mut expected = 5;
    while !senders.iter().all(|s| s.is_finished()) {
        insert_events(&mut c, 5);
        expected += 5;
        wait_until(Duration::from_secs(10), "events to be projected during the requests", || entries(&db) == expected);
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut refused = 0;
    for sender in senders {
        let (n, other) = sender.join().expect("a sender");
        refused += n;
        assert!(
            other.is_empty(),
            "{} requests not answered 413, such as {:?}",
            other.len(),
            &other[..other.len().min(5)]
        );
    }
    let took = started.elapsed();
    assert_eq!(refused, total);
    w.assert_alive();
    let ended = Instant::now();
    wait_until(Duration::from_secs(10), "threads and descriptors back within 10 % of before", || {
        w.threads() * 10 <= threads * 11 && w.fds() * 10 <= fds * 11
    });
    eprintln!(
        "{total} requests declaring 1 TB answered 413 in {took:?}; threads {threads} -> {}, descriptors {fds} -> {} \
         (within 10 % after {:?})",
        w.threads(),
        w.fds(),
        ended.elapsed()
    );
    assert_eq!(w.get("/metrics").map(|(s, _)| s), Some(200));
    assert_eq!(w.healthcheck(), Some(0));
    assert!(!w.log().contains("os error 24"), "something ran out of descriptors:\n{}", w.log());
    insert_events(&mut c, 5);
    wait_until(Duration::from_secs(10), "events to be projected after", || entries(&db) == expected + 5);
}

/// 200 scrapers at once, 10 scrapes each on a new connection: every scrape is answered,
/// 200 or 503, and 99 % of them within a second.
#[test]
fn two_hundred_concurrent_scrapers_are_all_answered_within_a_second_at_p99() {
    chronicle::rlimit::raise_open_files_limit();
    let db = TestDb::new();
    let w = Worker::start(&db, "", false);
    let scrapers = 200;
    let start = std::sync::Arc::new(std::sync::Barrier::new(scrapers));
    let threads: Vec<_> = (0..scrapers)
        .map(|_| {
            let (addr, start) = (w.addr(), start.clone());
            std::thread::spawn(move || -> Vec<(Option<u16>, Duration)> {
                start.wait();
                (0..10)
                    .map(|_| {
                        let t = Instant::now();
                        let status = (|| -> std::io::Result<Option<u16>> {
                            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                            s.set_read_timeout(Some(Duration::from_secs(5)))?;
                            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
                            let mut raw = Vec::new();
                            s.read_to_end(&mut raw)?;
                            Ok(String::from_utf8_lossy(&raw).get(9..12).and_then(|c| c.parse().ok()))
                        })()
                        .ok()
                        .flatten();
                        (status, t.elapsed())
                    })
                    .collect()
            })
        })
        .collect();
    let mut all: Vec<(Option<u16>, Duration)> =
        threads.into_iter().flat_map(|t| t.join().expect("a scraper")).collect();
    all.sort_by_key(|(_, took)| *took);
    let unanswered = all.iter().filter(|(s, _)| !matches!(s, Some(200 | 503))).count();
    let busy = all.iter().filter(|(s, _)| *s == Some(503)).count();
    let p99 = all[all.len() * 99 / 100 - 1].1;
    let p50 = all[all.len() / 2].1;
    eprintln!(
        "{} scrapes by {scrapers} concurrent scrapers: {unanswered} unanswered, {busy} answered 503; p50 {p50:?}, \
         p99 {p99:?}, slowest {:?}",
        all.len(),
        all[all.len() - 1].1
    );
    assert_eq!(unanswered, 0, "scrapes without a 200 or 503 answer");
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
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
