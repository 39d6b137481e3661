//! What the external checks share: finding the tools (loudly), a worker with its metrics
//! endpoint on, a plain HTTP/1.0 client over `TcpStream`, reading samples out of the
//! Prometheus text, and a TCP gate that makes the database appear and disappear.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::{free_port, worker_cmd, TestDb};

/// How to get the tools, said by every failure that lacks one.
pub const INSTALL: &str = "Install Prometheus: on Debian/Ubuntu `apt-get install prometheus` gives both \
`prometheus` and `promtool` (`./run.sh check-all` installs it, then runs these checks); elsewhere \
download it from https://prometheus.io/download/ and put both on PATH, or set PROMTOOL and \
PROMETHEUS to their paths. These checks are never skipped.";

/// The path of an external tool (`promtool`, `prometheus`): `$PROMTOOL` / `$PROMETHEUS`
/// when set, else the first one on PATH; a missing tool fails the test.
pub fn tool(name: &str) -> PathBuf {
    let var = name.to_uppercase();
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{var}={} is not a file. {INSTALL}", p.display());
        return p;
    }
    let exe = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join(&exe)).find(|p| p.is_file()))
        .unwrap_or_default();
    found.unwrap_or_else(|| panic!("`{name}` is not installed (not on PATH) and this check needs it. {INSTALL}"))
}

/// A file of this repository.
pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn read_repo_file(rel: &str) -> String {
    let p = repo_file(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

// ---------------------------------------------------------------- a worker

/// A running `chronicle worker` with its metrics endpoint on a free loopback port; killed
/// when dropped (its log is printed if the test is failing), or by the watchdog.
pub struct Worker {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Worker {
    /// `worker_cmd(db)` (which turns the endpoint off) with the endpoint on, plus `env`.
    pub fn start(db: &TestDb, env: &[(&str, &str)]) -> Worker {
        Worker::start_cmd(worker_cmd(db, &[]), env, true)
    }

    /// Starts `cmd` with the endpoint on; with `wait`, returns once /metrics answers.
    pub fn start_cmd(mut cmd: Command, env: &[(&str, &str)], wait: bool) -> Worker {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("chronicle-external-worker-{}-{port}.log", std::process::id()));
        let file = std::fs::File::create(&log).expect("creating the worker log");
        cmd.env("OUTBOX_METRICS_PORT", port.to_string()).env("OUTBOX_METRICS_BIND", "127.0.0.1");
        cmd.env("OUTBOX_WORKER_ID", format!("ext-{port}"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null()).stderr(file);
        let child = cmd.spawn().expect("starting chronicle worker");
        watchdog(child.id(), "environ", &format!("OUTBOX_WORKER_ID=ext-{port}"), &log);
        let mut w = Worker { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), log };
        if wait {
            w.wait_for_endpoint();
        }
        w
    }

    pub fn worker_id(&self) -> String {
        format!("ext-{}", self.addr.port())
    }

    /// Waits until the endpoint answers /metrics with 200 (the server binds before the
    /// worker waits for its database).
    pub fn wait_for_endpoint(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the worker exited ({status}) before serving /metrics:\n{}", self.log());
            }
            if request(self.addr, &get_bytes("/metrics"), Duration::from_secs(2)).is_ok_and(|r| r.status == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "the worker's /metrics did not answer within 30 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Response {
        get(self.addr, path)
    }

    /// The exposition, asserting a 200.
    pub fn metrics(&self) -> String {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {r:?}");
        r.body
    }

    /// Polls /metrics until the sample `name{labels}` satisfies `ok`, or fails after 30 s
    /// with the last exposition and the worker's log.
    pub fn wait_for(&self, name: &str, labels: &[(&str, &str)], what: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.metrics();
            if let Some(v) = sample(&text, name, labels) {
                if ok(v) {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what} ({name}{labels:?} = {:?})\n--- exposition\n{text}--- worker log\n{}",
                sample(&text, name, labels),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- log of the worker on {}\n{}", self.addr, self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// When this test process ends without dropping a child (killed, aborted), a shell waiting
/// for our pid stops it, only if that pid is still ours (its /proc/PID/`file`, cmdline or
/// environ, contains `marker`), and removes `path`. Unix only, like the harness's clusters.
pub fn watchdog(child: u32, file: &str, marker: &str, path: &Path) {
    if cfg!(unix) {
        let script = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
             if grep -qaF '{marker}' /proc/{child}/{file} 2>/dev/null; then kill {child}; sleep 1; fi; rm -rf '{path}'",
            path = path.display(),
            me = std::process::id()
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

// ---------------------------------------------------------------- HTTP/1.0 over TcpStream

/// One HTTP answer: status, head (status line and headers) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
    pub elapsed: Duration,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

pub fn get_bytes(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").into_bytes()
}

/// Sends `raw` on a new connection and reads the answer until the server closes (HTTP/1.0).
pub fn request(addr: SocketAddr, raw: &[u8], timeout: Duration) -> std::io::Result<Response> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(raw)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no end of headers in the answer: {text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in the answer: {head:?}")))?;
    Ok(Response { status, head: head.to_string(), body: body.to_string(), elapsed })
}

/// GET `path`, failing the test if there is no answer within 10 s.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, &get_bytes(path), Duration::from_secs(10)).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// Percent-encodes a query-string value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------- the text format

/// The value of the first sample `name{...}` whose labels include `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        let matches = n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if matches {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// The families of an exposition (`# TYPE name kind`): name → kind.
pub fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_string(), k.trim().to_string()))
        .collect()
}

/// The chronicle metric names a PromQL expression uses (`chronicle_[a-z_]+`), with the
/// histogram suffixes `_bucket`, `_sum` and `_count` taken off.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("chronicle_").map(|p| p + i) {
        let starts_word = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let end = expr[at..].find(|c: char| !(c.is_ascii_lowercase() || c == '_')).map_or(expr.len(), |e| at + e);
        if starts_word {
            let name = &expr[at..end];
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            names.insert(base.to_string());
        }
        i = end.max(at + 1);
    }
    names
}

// ---------------------------------------------------------------- a gate in front of the database

/// A TCP forwarder on a loopback port to the test server that can be opened (it listens
/// and forwards) and closed (it stops listening, so connecting is refused, and cuts every
/// connection it forwarded): the database appearing and going away, for a worker that
/// connects through it.
pub struct Gate {
    pub port: u16,
    open: Arc<AtomicBool>,
    listening: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Gate {
    /// A closed gate to the server of `db`.
    pub fn new(db: &TestDb) -> Gate {
        let host = if db.server.host.starts_with('/') { "127.0.0.1" } else { db.server.host.as_str() };
        let target =
            (host, db.server.port).to_socket_addrs().expect("the test server's address").next().expect("an address");
        let port = free_port();
        let (open, listening, stop) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (open, listening, stop, conns) = (open.clone(), listening.clone(), stop.clone(), conns.clone());
            std::thread::spawn(move || {
                let mut listener: Option<TcpListener> = None;
                while !stop.load(Ordering::SeqCst) {
                    let want = open.load(Ordering::SeqCst);
                    if want && listener.is_none() {
                        match TcpListener::bind(("127.0.0.1", port)) {
                            Ok(l) => {
                                l.set_nonblocking(true).expect("a non-blocking listener");
                                listener = Some(l);
                                listening.store(true, Ordering::SeqCst);
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(20)),
                        }
                        continue;
                    }
                    if !want && listener.is_some() {
                        listener = None;
                        listening.store(false, Ordering::SeqCst);
                        continue;
                    }
                    let accepted = listener.as_ref().map(|l| l.accept());
                    match accepted {
                        Some(Ok((client, _))) => forward(client, target, &conns),
                        _ => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Gate { port, open, listening, stop, conns, thread: Some(thread) }
    }

    /// The URL of `db` through this gate.
    pub fn url(&self, db: &TestDb) -> String {
        let mut s = db.server.clone();
        s.host = "127.0.0.1".into();
        s.port = self.port;
        s.url(&db.name)
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        crate::util::wait_until(Duration::from_secs(10), "the gate to listen", || {
            self.listening.load(Ordering::SeqCst)
        });
    }

    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        crate::util::wait_until(Duration::from_secs(10), "the gate to stop listening", || {
            !self.listening.load(Ordering::SeqCst)
        });
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn forward(client: TcpStream, target: SocketAddr, conns: &Mutex<Vec<TcpStream>>) {
    let _ = client.set_nonblocking(false);
    let Ok(upstream) = TcpStream::connect(target) else { return };
    let mut list = conns.lock().unwrap();
    for s in [&client, &upstream] {
        if let Ok(c) = s.try_clone() {
            list.push(c);
        }
    }
    let (Ok(mut c_r), Ok(mut u_w)) = (client.try_clone(), upstream.try_clone()) else { return };
    let (mut u_r, mut c_w) = (upstream, client);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_r, &mut u_w);
        let _ = u_w.shutdown(std::net::Shutdown::Both);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut u_r, &mut c_w);
        let _ = c_w.shutdown(std::net::Shutdown::Both);
    });
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.conns.lock().map(|mut c| c.drain(..).collect::<Vec<_>>()).unwrap_or_default() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn metric_names_are_taken_from_expressions_without_histogram_suffixes() {
    let names = metric_names(
        "histogram_quantile(0.9, sum by (le) (rate(chronicle_outbox_batch_duration_seconds_bucket{job=\"chronicle\"}[5m]))) \
         / max(chronicle_outbox_pending_events) + xchronicle_no",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["chronicle_outbox_batch_duration_seconds".to_string(), "chronicle_outbox_pending_events".to_string()]
    );
    let text = "# TYPE a_total counter\na_total{worker_id=\"w\",error_reason=\"x\"} 3\na_total{worker_id=\"w\",error_reason=\"y\"} 4\n";
    assert_eq!(sample(text, "a_total", &[("error_reason", "y")]), Some(4.0));
    assert_eq!(families(text).get("a_total").map(String::as_str), Some("counter"));
}
