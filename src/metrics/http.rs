//! The metrics endpoint: tiny_http serving `/metrics`, `/healthz` and `/readyz`. A
//! request never touches the database: gauges are sampled elsewhere.
//!
//! The public socket (`OUTBOX_METRICS_BIND:OUTBOX_METRICS_PORT`) belongs to the accept
//! front (`front.rs`), which bounds connections, request heads and bodies, and relays the
//! requests it accepts to tiny_http on an ephemeral loopback port. Around tiny_http,
//! which gives up for good when its accept thread meets an error (it ends on an `accept()`
//! error and panics when it cannot clone a socket or start a thread) and has no limits of
//! its own, this module keeps it alive and small:
//!
//! - The loopback listening socket is ours: tiny_http gets a clone of it, and a new server
//!   is started on another clone (same socket, so the same address) when the old one
//!   stops: when `recv` reports its accept error, when a tiny_http thread panics (seen by
//!   a panic hook), or when tiny_http fails its probe (`GET /healthz` every second) twice
//!   in a row. Restarts back off (250 ms, then 500 ms) and are counted in
//!   `chronicle_metrics_server_restarts_total`.
//! - Timeouts and small buffers are set on the public listening socket and inherited by
//!   every accepted one (unix), with a backlog of [`BACKLOG`].
//! - Answers are written by one thread per connection with requests in flight, from a
//!   queue of [`QUEUE_PER_CONNECTION`] requests; an answer is rendered only when that
//!   thread gets to it. A connection whose queue is full, or whose write fails, is dropped:
//!   its requests are discarded from then on without rendering or writing anything.
//!   At most [`MAX_WRITERS`] connections are answered at once (idle writers end to make
//!   room). The front relays over a few kept-alive connections; these bounds hold against
//!   anything else on the host that connects to the loopback port.
//! - On Linux, a reaper thread closes from outside the connections to tiny_http dropped
//!   above, those older than 30 s and the oldest beyond 512 (see `reaper.rs`).
//! - tiny_http drains an unread request body when the request is dropped, into one buffer
//!   of the declared size: a `Content-Length` beyond the memory aborts the process. The
//!   front relays no request with a body; one that reaches the loopback port otherwise,
//!   declaring more than [`BODY_LIMIT`], is never dropped: it is abandoned (leaked with its
//!   connection and tiny_http's thread for it), counted, and logged. Smaller bodies are
//!   drained by the writer or a drain thread, never by the thread receiving requests.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::error::{AppError, Result};
use crate::metrics::{front, Metrics};

/// Idle time after which a connection is closed, and how long a write may wait for a
/// client that does not read.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests waiting for their answer on one connection; one more drops the connection.
pub const QUEUE_PER_CONNECTION: usize = 4;
/// Connections being answered at once; requests from further ones are discarded.
pub const MAX_WRITERS: usize = 64;
/// Receive and send buffer size of every connection.
pub const SOCKET_BUFFER: usize = 64 * 1024;
/// The largest request body that may be dropped (tiny_http drains it into a buffer of
/// this size); this endpoint expects none.
pub const BODY_LIMIT: usize = 1 << 20;
/// Connections waiting to be accepted (the system may cap it: `net.core.somaxconn`).
#[cfg(unix)]
const BACKLOG: libc::c_int = 1024;
const DRAIN_QUEUE: usize = 16;
const WRITER_IDLE: Duration = Duration::from_secs(5);
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_FAILURES_BEFORE_RESTART: u32 = 2;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Stopped servers still drained (a server judged dead by its probe may still deliver).
const RETIRED_KEPT: usize = 4;
/// How long a dropped connection's address is remembered after its last request.
const DROPPED_FORGET: Duration = Duration::from_secs(60);

/// Set by the panic hook when a panic comes from tiny_http's code (its accept thread
/// unwraps a socket clone and a thread spawn): the server is then started again.
static TINY_HTTP_PANICKED: AtomicBool = AtomicBool::new(false);

/// Installs (once) a panic hook that notes panics raised in tiny_http's code and logs them
/// as a warning; other panics go to the previous hook.
fn watch_tiny_http_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| match info.location().filter(|l| l.file().contains("tiny_http")) {
            Some(at) => {
                TINY_HTTP_PANICKED.store(true, Ordering::SeqCst);
                let what = info
                    .payload()
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| info.payload().downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                log::warn!("metrics endpoint: a tiny_http thread stopped: {what} (at {at})");
            }
            None => previous(info),
        }));
    });
}

/// The running server; dropping it does not stop it (the process exit does).
pub struct MetricsServer {
    pub addr: SocketAddr,
}

/// Binds `bind:port` at once (a port in use is a clear error at start) and serves from
/// background threads.
pub fn serve(bind: &str, port: u16, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> Result<MetricsServer> {
    let cannot = |e: &dyn std::fmt::Display| {
        AppError::failed(format!(
            "cannot serve metrics on {bind}:{port} (OUTBOX_METRICS_BIND/OUTBOX_METRICS_PORT): {e}"
        ))
    };
    watch_tiny_http_panics();
    let public = TcpListener::bind((bind, port)).map_err(|e| cannot(&e))?;
    set_socket_options(&public).map_err(|e| cannot(&e))?;
    let addr = public.local_addr().map_err(|e| cannot(&e))?;
    // tiny_http listens on loopback only, for the front's relayed requests.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .or_else(|_| TcpListener::bind((Ipv6Addr::LOCALHOST, 0)))
        .map_err(|e| cannot(&format!("no loopback port for tiny_http: {e}")))?;
    let inner = listener.local_addr().map_err(|e| cannot(&e))?;
    let server = start(&listener).map_err(|e| cannot(&e))?;

    let probe = Arc::new(Probe::default());
    let p = probe.clone();
    std::thread::Builder::new()
        .name("metrics-probe".into())
        .spawn(move || p.run(inner))
        .map_err(|e| AppError::failed(format!("cannot start the metrics probe thread: {e}")).caused_by(e))?;
    // Dropping a tiny_http server connects to its address (to wake its accept thread),
    // which can wait for minutes when the backlog is full: done on a thread of its own.
    let (retire_tx, retire_rx) = mpsc::channel::<tiny_http::Server>();
    std::thread::Builder::new()
        .name("metrics-retire".into())
        .spawn(move || retire_rx.iter().for_each(drop))
        .map_err(|e| AppError::failed(format!("cannot start the metrics thread: {e}")).caused_by(e))?;
    let to_close = start_reaper(inner)?;
    let (drain_tx, drain_rx) = mpsc::sync_channel::<tiny_http::Request>(DRAIN_QUEUE);
    std::thread::Builder::new()
        .name("metrics-drain".into())
        .spawn(move || drain_rx.iter().for_each(release))
        .map_err(|e| AppError::failed(format!("cannot start the metrics thread: {e}")).caused_by(e))?;
    let mut endpoint = Endpoint {
        listener,
        addr: inner,
        server,
        retired: VecDeque::new(),
        retire_tx,
        writers: Writers::new(drain_tx, to_close),
        metrics: metrics.clone(),
        ready,
        probe,
        restart_wanted: false,
        backoff: BACKOFF_MIN,
        next_restart: Instant::now(),
        probe_ok_at_restart: 0,
    };
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || endpoint.run())
        .map_err(|e| AppError::failed(format!("cannot start the metrics thread: {e}")).caused_by(e))?;
    let cap = front::connection_cap(crate::rlimit::open_files_limit());
    front::start(public, inner, cap, metrics)?;
    log::info!("serving metrics on http://{addr}/metrics (at most {cap} connections at once)");
    Ok(MetricsServer { addr })
}

/// The thread closing connections tiny_http keeps (Linux): returns where to send the
/// connections to close.
#[cfg(target_os = "linux")]
fn start_reaper(addr: SocketAddr) -> Result<Option<mpsc::Sender<SocketAddr>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("metrics-reaper".into())
        .spawn(move || super::reaper::run(addr, rx))
        .map_err(|e| AppError::failed(format!("cannot start the metrics thread: {e}")).caused_by(e))?;
    Ok(Some(tx))
}

#[cfg(not(target_os = "linux"))]
fn start_reaper(_addr: SocketAddr) -> Result<Option<mpsc::Sender<SocketAddr>>> {
    Ok(None)
}

/// A tiny_http server on a clone of `listener`. Starting its accept thread can panic
/// (tiny_http unwraps the thread spawn): caught and returned as an error.
fn start(listener: &TcpListener) -> std::io::Result<tiny_http::Server> {
    let clone = listener.try_clone()?;
    match crate::worker::panics::catch_library(|| tiny_http::Server::from_listener(clone, None)) {
        Ok(Ok(server)) => Ok(server),
        Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
        Err(why) => Err(std::io::Error::other(format!("cannot start the accept thread: {why}"))),
    }
}

/// Sets [`IO_TIMEOUT`] as the receive and send timeouts of the listening socket, and
/// [`SOCKET_BUFFER`] as its buffer sizes; Linux and the BSDs copy them to every accepted
/// socket. Small buffers bound what a client that stops reading (or leaves) leaves behind:
/// answers rendered into its send buffer, requests still to parse in its receive buffer.
#[cfg(unix)]
fn set_socket_options(listener: &TcpListener) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    fn set<T>(fd: libc::c_int, opt: libc::c_int, value: &T) -> std::io::Result<()> {
        // SAFETY: setsockopt reads `size_of::<T>()` bytes from a value we own.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (value as *const T).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    let fd = listener.as_raw_fd();
    // `as _`: the field's own type (time_t), whose name musl's libc crate deprecates.
    let tv = libc::timeval { tv_sec: IO_TIMEOUT.as_secs() as _, tv_usec: 0 };
    set(fd, libc::SO_RCVTIMEO, &tv)?;
    set(fd, libc::SO_SNDTIMEO, &tv)?;
    let size = SOCKET_BUFFER as libc::c_int;
    set(fd, libc::SO_RCVBUF, &size)?;
    set(fd, libc::SO_SNDBUF, &size)?;
    // Listening again only sets the backlog: std's 128 drops the handshakes of a larger
    // burst of scrapers, which their clients retry a second later.
    // SAFETY: listen on a socket we own.
    if unsafe { libc::listen(fd, BACKLOG) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(unix))]
fn set_socket_options(_listener: &TcpListener) -> std::io::Result<()> {
    Ok(())
}

/// tiny_http asked `GET /healthz` every second on its loopback port: proves its whole path
/// (accept, parse, answer) works.
#[derive(Default)]
struct Probe {
    /// Failures in a row.
    failures: AtomicU32,
    /// Successes so far.
    successes: AtomicU64,
}

impl Probe {
    fn run(&self, target: SocketAddr) {
        loop {
            std::thread::sleep(PROBE_EVERY);
            match probe_once(target) {
                Ok(()) => {
                    self.failures.store(0, Ordering::SeqCst);
                    self.successes.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    let n = self.failures.fetch_add(1, Ordering::SeqCst) + 1;
                    log::debug!("metrics endpoint: probe failed ({n} in a row): {e}");
                }
            }
        }
    }
}

fn probe_once(target: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&target, PROBE_TIMEOUT)?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))?;
    s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")?;
    let mut status = [0u8; 12];
    s.read_exact(&mut status)?;
    // "HTTP/1.x 200": only the status code matters.
    if &status[9..12] == b"200" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("answered {:?}", String::from_utf8_lossy(&status))))
    }
}

/// The thread receiving requests: hands them to the writers, and starts the server again
/// when it has stopped.
struct Endpoint {
    listener: TcpListener,
    addr: SocketAddr,
    server: tiny_http::Server,
    retired: VecDeque<tiny_http::Server>,
    retire_tx: mpsc::Sender<tiny_http::Server>,
    writers: Writers,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    probe: Arc<Probe>,
    restart_wanted: bool,
    backoff: Duration,
    next_restart: Instant,
    probe_ok_at_restart: u64,
}

impl Endpoint {
    fn run(&mut self) {
        // A panic in this thread is a bug of the worker's, which stops it; the threads of
        // tiny_http, which this one restarts, are not the worker's.
        crate::worker::panics::own_thread();
        loop {
            crate::failpoint::check("metrics", None);
            match self.server.recv_timeout(Duration::from_millis(250)) {
                Ok(Some(req)) => self.writers.answer(req, &self.metrics, &self.ready),
                Ok(None) => {}
                Err(e) => {
                    if !self.restart_wanted {
                        log::warn!(
                            "metrics endpoint: the server stopped accepting connections ({e}); starting it again"
                        );
                    }
                    self.restart_wanted = true;
                }
            }
            for old in &self.retired {
                for _ in 0..1000 {
                    match old.try_recv() {
                        Ok(Some(req)) => self.writers.answer(req, &self.metrics, &self.ready),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            if TINY_HTTP_PANICKED.swap(false, Ordering::SeqCst) && !self.restart_wanted {
                log::warn!("metrics endpoint: starting the server again after a panic in tiny_http");
                self.restart_wanted = true;
            }
            let failures = self.probe.failures.load(Ordering::SeqCst);
            if failures >= PROBE_FAILURES_BEFORE_RESTART && !self.restart_wanted {
                log::warn!(
                    "metrics endpoint: {failures} probes of tiny_http (http://{}/healthz) failed in a row; starting it again",
                    self.addr
                );
                self.restart_wanted = true;
            }
            if self.probe.successes.load(Ordering::SeqCst) > self.probe_ok_at_restart {
                self.backoff = BACKOFF_MIN;
            }
            if self.restart_wanted && Instant::now() >= self.next_restart {
                self.restart();
            }
        }
    }

    fn restart(&mut self) {
        self.next_restart = Instant::now() + self.backoff;
        let backoff = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        match start(&self.listener) {
            Ok(server) => {
                let old = std::mem::replace(&mut self.server, server);
                self.retired.push_back(old);
                while self.retired.len() > RETIRED_KEPT {
                    if let Some(old) = self.retired.pop_front() {
                        let _ = self.retire_tx.send(old);
                    }
                }
                self.restart_wanted = false;
                self.probe.failures.store(0, Ordering::SeqCst);
                self.probe_ok_at_restart = self.probe.successes.load(Ordering::SeqCst);
                let n = self.metrics.metrics_server_restarts.fetch_add(1, Ordering::Relaxed) + 1;
                log::warn!("metrics endpoint: tiny_http started again on {} (restart {n})", self.addr);
            }
            Err(e) if backoff == BACKOFF_MIN => {
                log::warn!("metrics endpoint: cannot start again yet ({e}); trying again with backoff");
            }
            Err(e) => log::debug!("metrics endpoint: cannot start again yet ({e}); next try in {backoff:?}"),
        }
    }
}

/// Answers in the background: one writer thread per client connection with requests in
/// flight, fed in order (answers on one connection keep the order of its requests) from a
/// bounded queue. A connection that does not read its answers blocks only its own writer
/// until its queue is full or its write times out; it is then dropped.
struct Writers {
    by_peer: HashMap<Option<SocketAddr>, Writer>,
    /// Connections dropped, with when their last request came.
    dropped: HashMap<Option<SocketAddr>, Instant>,
    last_sweep: Instant,
    drain: mpsc::SyncSender<tiny_http::Request>,
    abandoned: u64,
    /// The reaper (Linux), which closes the connections sent to it.
    to_close: Option<mpsc::Sender<SocketAddr>>,
}

struct Writer {
    tx: mpsc::SyncSender<tiny_http::Request>,
    state: Arc<WriterState>,
}

impl Writer {
    /// Queues a request, counted as pending until its writer is done with it. The error
    /// gives the request back, as `try_send` does.
    #[allow(clippy::result_large_err)]
    fn send(&self, req: tiny_http::Request) -> std::result::Result<(), mpsc::TrySendError<tiny_http::Request>> {
        self.state.pending.fetch_add(1, Ordering::SeqCst);
        let sent = self.tx.try_send(req);
        if sent.is_err() {
            self.state.pending.fetch_sub(1, Ordering::SeqCst);
        }
        sent
    }
}

#[derive(Default)]
struct WriterState {
    /// Requests queued or being answered.
    pending: AtomicUsize,
    ended: AtomicBool,
    /// Set when the connection is dropped: the writer discards what is queued.
    dropped: AtomicBool,
}

impl Writers {
    fn new(drain: mpsc::SyncSender<tiny_http::Request>, to_close: Option<mpsc::Sender<SocketAddr>>) -> Writers {
        Writers {
            by_peer: HashMap::new(),
            dropped: HashMap::new(),
            last_sweep: Instant::now(),
            drain,
            abandoned: 0,
            to_close,
        }
    }

    fn answer(&mut self, req: tiny_http::Request, metrics: &Arc<Metrics>, ready: &Arc<AtomicBool>) {
        self.sweep();
        let body = body_to_drain(&req);
        if body > BODY_LIMIT {
            return self.abandon(req, body);
        }
        let peer = req.remote_addr().copied();
        if let Some(seen) = self.dropped.get_mut(&peer) {
            *seen = Instant::now();
            return self.discard(req);
        }
        let req = match self.by_peer.get(&peer) {
            Some(w) if w.state.dropped.load(Ordering::SeqCst) => {
                self.drop_connection(peer);
                return self.discard(req);
            }
            Some(w) => match w.send(req) {
                Ok(()) => return,
                Err(mpsc::TrySendError::Full(req)) => {
                    log::debug!("metrics endpoint: dropping {peer:?}: it does not read its answers");
                    self.drop_connection(peer);
                    return self.discard(req);
                }
                Err(mpsc::TrySendError::Disconnected(req)) => req, // it just went idle and ended
            },
            None => req,
        };
        if self.by_peer.len() >= MAX_WRITERS {
            self.evict_idle();
        }
        if self.by_peer.len() >= MAX_WRITERS {
            log::debug!("metrics endpoint: {MAX_WRITERS} connections being answered; discarding a request");
            return self.discard(req);
        }
        let (tx, rx) = mpsc::sync_channel::<tiny_http::Request>(QUEUE_PER_CONNECTION);
        let state = Arc::new(WriterState::default());
        let (m, r, s, close) = (metrics.clone(), ready.clone(), state.clone(), self.to_close.clone());
        let spawned = std::thread::Builder::new().name("metrics-answer".into()).spawn(move || {
            while let Ok(req) = rx.recv_timeout(WRITER_IDLE) {
                if s.dropped.load(Ordering::SeqCst) {
                    release(req);
                } else if let Err(e) = respond(req, &m, &r) {
                    log::debug!("metrics endpoint: dropping {peer:?}: {e}");
                    s.dropped.store(true, Ordering::SeqCst);
                    if let (Some(close), Some(peer)) = (&close, peer) {
                        let _ = close.send(peer);
                    }
                }
                s.pending.fetch_sub(1, Ordering::SeqCst);
            }
            s.ended.store(true, Ordering::SeqCst);
        });
        let writer = Writer { tx, state };
        match spawned {
            Ok(_) => match writer.send(req) {
                Ok(()) => {
                    self.by_peer.insert(peer, writer);
                }
                Err(mpsc::TrySendError::Full(req) | mpsc::TrySendError::Disconnected(req)) => self.discard(req),
            },
            Err(e) => {
                log::warn!("metrics endpoint: cannot start a writer thread: {e}");
                // The closure, and with it the queue, is gone; the request was not sent.
                self.discard(req);
            }
        }
    }

    /// Gets rid of a request without rendering or writing anything; one with a body to
    /// drain goes to the drain thread (abandoned when its queue is full).
    fn discard(&mut self, req: tiny_http::Request) {
        let body = body_to_drain(&req);
        if body == 0 {
            return release(req);
        }
        if let Err(mpsc::TrySendError::Full(req) | mpsc::TrySendError::Disconnected(req)) = self.drain.try_send(req) {
            self.abandon(req, body);
        }
    }

    /// Leaks a request rather than let tiny_http drain its body into one buffer of the
    /// declared size; its connection stays open until the process ends.
    fn abandon(&mut self, req: tiny_http::Request, body: usize) {
        self.abandoned += 1;
        log::warn!(
            "metrics endpoint: abandoning a request from {:?} declaring a {body}-byte body (over {BODY_LIMIT}); \
             {} abandoned so far, each holding a connection",
            req.remote_addr(),
            self.abandoned
        );
        std::mem::forget(req);
    }

    /// Lets the writers with nothing to do end (their queue closes), keeping in mind the
    /// connections they dropped. A later request of theirs starts a new writer; tiny_http
    /// still writes answers in request order.
    fn evict_idle(&mut self) {
        let idle: Vec<Option<SocketAddr>> = self
            .by_peer
            .iter()
            .filter(|(_, w)| w.state.pending.load(Ordering::SeqCst) == 0 || w.state.ended.load(Ordering::SeqCst))
            .map(|(p, _)| *p)
            .collect();
        for peer in idle {
            if let Some(w) = self.by_peer.remove(&peer) {
                if w.state.dropped.load(Ordering::SeqCst) {
                    self.dropped.insert(peer, Instant::now());
                }
            }
        }
    }

    fn drop_connection(&mut self, peer: Option<SocketAddr>) {
        if let Some(w) = self.by_peer.remove(&peer) {
            w.state.dropped.store(true, Ordering::SeqCst);
        }
        self.dropped.insert(peer, Instant::now());
        if let (Some(close), Some(peer)) = (&self.to_close, peer) {
            let _ = close.send(peer);
        }
    }

    /// Forgets writers that ended and dropped connections long silent.
    fn sweep(&mut self) {
        if self.last_sweep.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last_sweep = Instant::now();
        self.by_peer.retain(|_, w| !w.state.ended.load(Ordering::SeqCst));
        self.dropped.retain(|_, seen| seen.elapsed() < DROPPED_FORGET);
    }
}

/// Gets rid of a request without writing anything: its writer is released unused, so the
/// connection's later answers are not held up either. Dropping it drains its body, if it
/// has one (at most [`BODY_LIMIT`]), which can block up to [`IO_TIMEOUT`].
fn release(req: tiny_http::Request) {
    drop(req.into_writer());
}

/// The body tiny_http will read when `req` is dropped (bodies up to 1 KiB without
/// `Expect` were read with the headers).
fn body_to_drain(req: &tiny_http::Request) -> usize {
    let n = req.body_length().unwrap_or(0);
    let expects = req.headers().iter().any(|h| h.field.equiv("Expect"));
    if n > 1024 || (n > 0 && expects) {
        n
    } else {
        0
    }
}

fn respond(req: tiny_http::Request, metrics: &Metrics, ready: &AtomicBool) -> std::io::Result<()> {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let is_get = matches!(req.method(), tiny_http::Method::Get | tiny_http::Method::Head);
    let (status, body, ctype) = match path.as_str() {
        "/metrics" | "/healthz" | "/readyz" if !is_get => (405, "method not allowed\n".to_string(), "text/plain"),
        "/metrics" => (200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8"),
        "/healthz" => (200, "{\"status\":\"ok\"}\n".to_string(), "application/json"),
        "/readyz" => match metrics.paused() {
            Some(p) => (503, p.readyz_body(), "application/json"),
            None if ready.load(Ordering::Relaxed) => (200, "{\"status\":\"ready\"}\n".to_string(), "application/json"),
            None => (503, "{\"status\":\"not ready\"}\n".to_string(), "application/json"),
        },
        _ => (404, "not found\n".to_string(), "text/plain"),
    };
    let mut resp = tiny_http::Response::from_string(body).with_status_code(status);
    if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes()) {
        resp = resp.with_header(h);
    }
    req.respond(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bodies_not_read_with_the_headers_are_to_drain() {
        let with = |headers: &[(&str, &str)]| {
            let mut t = tiny_http::TestRequest::new().with_method(tiny_http::Method::Post);
            for (k, v) in headers {
                t = t.with_header(tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap());
            }
            let req = tiny_http::Request::from(t);
            let n = body_to_drain(&req);
            // Dropping it would drain the declared body, which these requests lack.
            std::mem::forget(req);
            n
        };
        assert_eq!(with(&[]), 0);
        assert_eq!(with(&[("Content-Length", "1000000000000")]), 1_000_000_000_000);
        assert_eq!(with(&[("Content-Length", "2000")]), 2000);
        assert_eq!(with(&[("Content-Length", "20"), ("Expect", "100-continue")]), 20);
    }
}
