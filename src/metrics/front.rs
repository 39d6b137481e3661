//! The accept front of the metrics endpoint. tiny_http reads header lines without any
//! limit, keeps a thread and two descriptors for every connection it accepts, and can only
//! be told to drop a request by draining its declared body into one buffer of that size.
//! So the public socket is not tiny_http's: this front accepts every connection, reads
//! each request head into a bounded buffer parsed with `httparse`, refuses what the
//! endpoint does not serve, and relays the rest to tiny_http, which listens on an
//! ephemeral loopback port and answers as before.
//!
//! What it bounds:
//!
//! - a request line longer than [`LINE_LIMIT`] is refused with 414, a header line longer
//!   than [`LINE_LIMIT`] or a head longer than [`HEAD_LIMIT`] (or with more than
//!   [`MAX_HEADERS`] fields) with 431; a connection buffers at most one head;
//! - a request declaring a body (`Content-Length` above 0, or `Transfer-Encoding`) is
//!   refused with 413: the endpoint takes none. Every refusal carries `Connection: close`
//!   and closes the connection after a short lingering read, so the client sees it;
//! - a head must arrive within [`HEAD_TIMEOUT`] (idle keep-alive connections included);
//!   a client that does not read its answer is closed after the write timeout;
//! - at most [`connection_cap`] connections are open at once (a quarter of the open-file
//!   limit, at most [`MAX_CONNECTIONS`]), so the endpoint cannot take the descriptors the
//!   database pool needs: at the cap, the connection waiting longest for a request head is
//!   closed to make room, and when none is waiting the newcomer is answered 503;
//! - at most [`ANSWERING`] requests are relayed to tiny_http at once, over kept-alive
//!   loopback connections; a request that waits [`INNER_WAIT`] for its turn, or that
//!   tiny_http does not answer in [`INNER_TIMEOUT`], is answered 503.
//!
//! An error from `accept` (out of descriptors, for one) pauses accepting for 10 to 500 ms;
//! accepting again after such a pause is counted in `chronicle_metrics_server_restarts_total`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{AppError, Result};
use crate::metrics::Metrics;

/// The longest request line or header line, line ending excluded.
pub const LINE_LIMIT: usize = 8 * 1024;
/// The longest request head (request line and headers).
pub const HEAD_LIMIT: usize = 64 * 1024;
/// Header fields a request may carry.
pub const MAX_HEADERS: usize = 100;
/// How long a connection may take to send a whole request head, from its opening or the
/// end of its previous answer.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a client may wait for it to read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once, at most (a lower open-file limit lowers it).
pub const MAX_CONNECTIONS: usize = 512;

/// The largest body a request of another method than GET or HEAD may declare to be
/// answered 405 (the method is what is wrong); a larger one is answered 413. The body is
/// never read either way.
pub const SMALL_BODY: u64 = 8 * 1024;
/// Connections open at once, at least, however low the open-file limit.
pub const MIN_CONNECTIONS: usize = 8;
/// Requests relayed to tiny_http at once.
pub const ANSWERING: usize = 4;
/// How long a request waits for its turn to be relayed before it is answered 503.
pub const INNER_WAIT: Duration = Duration::from_millis(500);
/// How long tiny_http may take to answer a relayed request.
pub const INNER_TIMEOUT: Duration = Duration::from_secs(2);
/// Kept-alive loopback connections are not reused past this age (tiny_http's side is
/// closed by the reaper at 30 s).
const INNER_MAX_AGE: Duration = Duration::from_secs(20);
/// The largest answer relayed.
const ANSWER_LIMIT: usize = 16 * 1024 * 1024;
const READ_CHUNK: usize = 8 * 1024;
const THREAD_STACK: usize = 256 * 1024;
/// After a refusal, how long and how much the client's remaining bytes are read and
/// discarded before closing, so that closing does not reset the connection before the
/// client has read the answer.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 256 * 1024;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// How many connections the front keeps open at once under an open-file limit of
/// `open_files` (None: unknown): a quarter of it, within [`MIN_CONNECTIONS`] and
/// [`MAX_CONNECTIONS`]. The rest is for the database pool and everything else.
pub fn connection_cap(open_files: Option<u64>) -> usize {
    let quarter = open_files.map_or(MAX_CONNECTIONS as u64, |n| n / 4);
    usize::try_from(quarter).unwrap_or(MAX_CONNECTIONS).clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// What a buffer holding the start of a request amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Examined {
    /// A head not yet complete, within the limits so far.
    Partial,
    /// A complete head of `len` bytes with no body, to relay. `head_only`: a HEAD request
    /// (its answer has no body); `close`: the connection ends after the answer.
    Relay { len: usize, head_only: bool, close: bool },
    /// A request refused; the connection ends after the answer.
    Refuse(Refusal),
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Refusal {
    /// 400: not HTTP/1.x as `httparse` reads it.
    BadRequest,
    /// 413: a declared body (over [`SMALL_BODY`], or of a GET or HEAD).
    BodyNotAccepted,
    /// 405: another method than GET or HEAD, declaring a body of at most [`SMALL_BODY`]
    /// (without a body, tiny_http answers it 405 itself).
    MethodNotAllowed,
    /// 414: a request line over [`LINE_LIMIT`].
    UriTooLong,
    /// 431: a header line over [`LINE_LIMIT`], a head over [`HEAD_LIMIT`], or too many fields.
    HeadersTooLarge,
}

impl Refusal {
    fn answer(self) -> Vec<u8> {
        let (status, reason, message) = match self {
            Refusal::BadRequest => (400, "Bad Request", "bad request\n"),
            Refusal::BodyNotAccepted => (413, "Content Too Large", "this endpoint takes no request body\n"),
            Refusal::MethodNotAllowed => {
                let message = "this endpoint answers GET and HEAD only\n";
                return format!(
                    "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Type: text/plain; \
                     charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{message}",
                    message.len()
                )
                .into_bytes();
            }
            Refusal::UriTooLong => (414, "URI Too Long", "request line over 8 KiB\n"),
            Refusal::HeadersTooLarge => {
                (431, "Request Header Fields Too Large", "header line over 8 KiB or headers over 64 KiB\n")
            }
        };
        plain_answer(status, reason, message)
    }
}

fn plain_answer(status: u16, reason: &str, message: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{message}",
        message.len()
    )
    .into_bytes()
}

fn busy_answer() -> Vec<u8> {
    plain_answer(503, "Service Unavailable", "busy, try again\n")
}

/// Reads the request head at the start of `buf` with `httparse`, within the limits.
pub fn examine(buf: &[u8]) -> Examined {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let parsed = req.parse(buf);
    let end = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        _ => buf.len(),
    };
    if let Some(refusal) = over_limits(&buf[..end]) {
        return Examined::Refuse(refusal);
    }
    let len = match parsed {
        Ok(httparse::Status::Partial) => return Examined::Partial,
        Err(httparse::Error::TooManyHeaders) => return Examined::Refuse(Refusal::HeadersTooLarge),
        Err(_) => return Examined::Refuse(Refusal::BadRequest),
        Ok(httparse::Status::Complete(n)) => n,
    };
    // As tiny_http decides: HTTP/1.0 ends after one answer, and so does `Connection: close`
    // (or `upgrade`, which the endpoint does not do).
    let mut close = req.version != Some(1);
    for field in req.headers.iter() {
        let value = String::from_utf8_lossy(field.value).to_ascii_lowercase();
        if field.name.eq_ignore_ascii_case("Content-Length") {
            match value.trim().parse::<u64>() {
                Ok(0) => {}
                Ok(n) if n <= SMALL_BODY && !matches!(req.method, Some("GET" | "HEAD")) => {
                    return Examined::Refuse(Refusal::MethodNotAllowed)
                }
                Ok(_) => return Examined::Refuse(Refusal::BodyNotAccepted),
                Err(_) => return Examined::Refuse(Refusal::BadRequest),
            }
        } else if field.name.eq_ignore_ascii_case("Transfer-Encoding") {
            return Examined::Refuse(Refusal::BodyNotAccepted);
        } else if field.name.eq_ignore_ascii_case("Connection")
            && (value.contains("close") || value.contains("upgrade"))
        {
            close = true;
        }
    }
    Examined::Relay { len, head_only: req.method == Some("HEAD"), close }
}

/// Whether a head, or the start of one, breaks a length limit: each line against
/// [`LINE_LIMIT`] (the first non-empty one is the request line), the whole against
/// [`HEAD_LIMIT`]. The last line may be incomplete.
fn over_limits(head: &[u8]) -> Option<Refusal> {
    let mut request_line = true;
    for line in head.split(|b| *b == b'\n') {
        let len = line.strip_suffix(b"\r").unwrap_or(line).len();
        if len > LINE_LIMIT {
            return Some(if request_line { Refusal::UriTooLong } else { Refusal::HeadersTooLarge });
        }
        request_line &= len == 0;
    }
    (head.len() > HEAD_LIMIT).then_some(Refusal::HeadersTooLarge)
}

/// The running front.
struct Front {
    cap: usize,
    live: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    inner: Inner,
    metrics: Arc<Metrics>,
    /// When a warning was last logged for an accept or thread failure (seconds since
    /// start): at most one a minute, the rest at debug level.
    last_warning: AtomicU64,
    started: Instant,
}

/// One client connection, shared between its thread and the table of live connections
/// (which may shut it down to make room).
struct Conn {
    stream: TcpStream,
    /// Since when it has been waiting for a request head; None while it is answered.
    waiting_since: Mutex<Option<Instant>>,
    evicted: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Accepts on `listener` from a thread of its own and relays to tiny_http at `inner`.
pub fn start(listener: TcpListener, inner: SocketAddr, cap: usize, metrics: Arc<Metrics>) -> Result<()> {
    let front = Arc::new(Front {
        cap,
        live: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        inner: Inner::new(inner),
        metrics,
        last_warning: AtomicU64::new(0),
        started: Instant::now(),
    });
    std::thread::Builder::new()
        .name("metrics-accept".into())
        .spawn(move || front.accept_loop(listener))
        .map_err(|e| AppError::failed(format!("cannot start the metrics accept thread: {e}")).caused_by(e))?;
    Ok(())
}

impl Front {
    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        let mut failed = false;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if failed {
                        failed = false;
                        let n = self.metrics.metrics_server_restarts.fetch_add(1, Ordering::Relaxed) + 1;
                        log::info!("metrics endpoint: accepting connections again (restart {n})");
                    }
                    backoff = ACCEPT_BACKOFF_MIN;
                    self.admit(stream);
                }
                // The listening socket's receive timeout, or a client gone before accept.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => {
                    failed = true;
                    self.warn(format_args!(
                        "metrics endpoint: cannot accept a connection ({e}); accepting again in {backoff:?}"
                    ));
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }

    /// Logs a warning, or at debug level when one was logged in the last minute.
    fn warn(&self, what: std::fmt::Arguments) {
        let now = self.started.elapsed().as_secs() + 60;
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 60
            && self.last_warning.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            log::warn!("{what}");
        } else {
            log::debug!("{what}");
        }
    }

    /// Gives a new connection its thread, making room at the cap by closing the connection
    /// that has waited longest for a request head; answers 503 when there is no room.
    fn admit(self: &Arc<Self>, stream: TcpStream) {
        let conn = Arc::new(Conn { stream, waiting_since: Mutex::new(None), evicted: AtomicBool::new(false) });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut live = lock(&self.live);
            if live.len() >= self.cap {
                evict_longest_waiting(&live);
            }
            // Closed connections leave the table when their thread ends, at once: a small
            // margin lets newcomers in meanwhile.
            if live.len() >= self.cap + self.cap / 8 {
                drop(live);
                log::debug!("metrics endpoint: {} connections open; answering 503", self.cap);
                return refuse_now(&conn.stream);
            }
            live.insert(id, conn.clone());
        }
        let (front, c) = (self.clone(), conn.clone());
        let spawned =
            std::thread::Builder::new().name("metrics-conn".into()).stack_size(THREAD_STACK).spawn(move || {
                let leaving = Leaving(&front, id);
                leaving.0.serve(&c);
            });
        if let Err(e) = spawned {
            lock(&self.live).remove(&id);
            self.warn(format_args!("metrics endpoint: cannot start a connection thread ({e}); answering 503"));
            refuse_now(&conn.stream);
        }
    }

    /// Serves one connection: request heads in turn, each relayed or refused.
    fn serve(&self, conn: &Conn) {
        let stream = &conn.stream;
        if stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let mut buf = Vec::new();
        loop {
            *lock(&conn.waiting_since) = Some(Instant::now());
            let examined = read_head(stream, &mut buf, Instant::now() + HEAD_TIMEOUT, &conn.evicted);
            *lock(&conn.waiting_since) = None;
            match examined {
                None | Some(Examined::Partial) => return,
                Some(Examined::Refuse(refusal)) => {
                    log::debug!("metrics endpoint: refusing a request from {:?}: {refusal:?}", stream.peer_addr());
                    let _ = (&*stream).write_all(&refusal.answer());
                    return linger(stream);
                }
                Some(Examined::Relay { len, head_only, close }) => {
                    let answer = self.inner.ask(&buf[..len], head_only, close);
                    buf.drain(..len);
                    match answer {
                        Ok(answer) => {
                            if (&*stream).write_all(&answer).is_err() {
                                return;
                            }
                            if close {
                                return linger(stream);
                            }
                        }
                        Err(e) => {
                            log::debug!("metrics endpoint: answering 503: {e}");
                            let _ = (&*stream).write_all(&busy_answer());
                            return linger(stream);
                        }
                    }
                }
            }
        }
    }
}

/// Takes a connection out of the table when its thread ends, however it ends (the table
/// holds its socket open).
struct Leaving<'a>(&'a Front, u64);

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        lock(&self.0.live).remove(&self.1);
    }
}

/// Shuts down the connection that has waited longest for a request head, if any.
fn evict_longest_waiting(live: &HashMap<u64, Arc<Conn>>) {
    let longest = live
        .values()
        .filter(|c| !c.evicted.load(Ordering::Relaxed))
        .filter_map(|c| lock(&c.waiting_since).map(|since| (since, c)))
        .min_by_key(|(since, _)| *since);
    if let Some((_, c)) = longest {
        c.evicted.store(true, Ordering::Relaxed);
        let _ = c.stream.shutdown(Shutdown::Both);
    }
}

/// Answers 503 from the accepting thread, without waiting for the client. What the client
/// already sent is read first (a little of it): closing with unread bytes resets the
/// connection, which can discard the answer before the client reads it.
fn refuse_now(stream: &TcpStream) {
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&*stream).write(&busy_answer());
        let mut sink = [0u8; READ_CHUNK];
        for _ in 0..4 {
            if !matches!((&*stream).read(&mut sink), Ok(n) if n > 0) {
                break;
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Ends a connection after its last answer: no more writes, then what the client still
/// sends is read and discarded for a moment (closing with unread bytes resets the
/// connection, which can discard the answer before the client reads it).
fn linger(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let until = Instant::now() + LINGER;
    let mut sink = [0u8; READ_CHUNK];
    let mut read = 0;
    while read < LINGER_BYTES {
        let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { return };
        if stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*stream).read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => read += n,
        }
    }
}

/// Reads until `buf` starts with a complete head or breaks a limit. None: the client
/// closed, failed, was evicted, or did not finish in time. Bytes after the head (the
/// next pipelined request) stay in `buf`.
fn read_head(stream: &TcpStream, buf: &mut Vec<u8>, deadline: Instant, evicted: &AtomicBool) -> Option<Examined> {
    let mut chunk = [0u8; READ_CHUNK];
    let mut check = !buf.is_empty();
    loop {
        if check {
            match examine(buf) {
                Examined::Partial => {}
                done => return Some(done),
            }
        }
        if evicted.load(Ordering::Relaxed) {
            return None;
        }
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
        stream.set_read_timeout(Some(left)).ok()?;
        let n = match (&*stream).read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        // A head can only complete at a line end; parsing again only then (or when a limit
        // is passed) keeps a client sending one byte at a time from costing quadratic time.
        let line_start = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        buf.extend_from_slice(&chunk[..n]);
        check = chunk[..n].contains(&b'\n') || buf.len() - line_start > LINE_LIMIT || buf.len() > HEAD_LIMIT;
    }
}

/// The relay to tiny_http: at most [`ANSWERING`] requests at once, over loopback
/// connections kept alive between requests.
struct Inner {
    addr: SocketAddr,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
    free: Mutex<usize>,
    freed: Condvar,
}

struct Turn<'a>(&'a Inner);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *lock(&self.0.free) += 1;
        self.0.freed.notify_one();
    }
}

impl Inner {
    fn new(addr: SocketAddr) -> Inner {
        Inner { addr, idle: Mutex::new(Vec::new()), free: Mutex::new(ANSWERING), freed: Condvar::new() }
    }

    fn turn(&self) -> io::Result<Turn<'_>> {
        let until = Instant::now() + INNER_WAIT;
        let mut free = lock(&self.free);
        while *free == 0 {
            let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, format!("{ANSWERING} requests being answered")));
            };
            free = self.freed.wait_timeout(free, left).map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
        *free -= 1;
        Ok(Turn(self))
    }

    /// Relays one request head; returns tiny_http's whole answer. A kept-alive connection
    /// that fails (tiny_http closed it meanwhile) is replaced by a new one, once.
    fn ask(&self, head: &[u8], head_only: bool, close: bool) -> io::Result<Vec<u8>> {
        let _turn = self.turn()?;
        let reused = {
            let mut idle = lock(&self.idle);
            idle.retain(|(_, since)| since.elapsed() < INNER_MAX_AGE);
            idle.pop().map(|(s, _)| s)
        };
        let (s, answer) = match reused {
            Some(mut s) => match exchange(&mut s, head, head_only) {
                Ok(answer) => (s, answer),
                Err(_) => {
                    let mut s = self.connect()?;
                    let answer = exchange(&mut s, head, head_only)?;
                    (s, answer)
                }
            },
            None => {
                let mut s = self.connect()?;
                let answer = exchange(&mut s, head, head_only)?;
                (s, answer)
            }
        };
        let (bytes, keep) = answer;
        if keep && !close {
            lock(&self.idle).push((s, Instant::now()));
        } else {
            let _ = s.shutdown(Shutdown::Both);
        }
        Ok(bytes)
    }

    fn connect(&self) -> io::Result<TcpStream> {
        let s = TcpStream::connect_timeout(&self.addr, INNER_TIMEOUT)?;
        s.set_read_timeout(Some(INNER_TIMEOUT))?;
        s.set_write_timeout(Some(INNER_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(s)
    }
}

/// How an answer's body ends.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Writes `head` and reads one whole answer (head and body, as sent). The flag says
/// whether the connection can carry another request.
fn exchange<S: Read + Write>(s: &mut S, head: &[u8], head_only: bool) -> io::Result<(Vec<u8>, bool)> {
    s.write_all(head)?;
    let mut buf = Vec::new();
    let (body_at, framing, keep) = loop {
        more(s, &mut buf)?;
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        match resp.parse(&buf).map_err(|e| invalid(format!("tiny_http's answer: {e}")))? {
            httparse::Status::Partial if buf.len() > HEAD_LIMIT => {
                return Err(invalid("tiny_http's answer head is too long"))
            }
            httparse::Status::Partial => continue,
            httparse::Status::Complete(n) => {
                let code = resp.code.unwrap_or(0);
                if code < 200 {
                    return Err(invalid(format!("tiny_http answered {code}")));
                }
                let field = |name: &str| {
                    resp.headers
                        .iter()
                        .find(|f| f.name.eq_ignore_ascii_case(name))
                        .map(|f| String::from_utf8_lossy(f.value).trim().to_ascii_lowercase())
                };
                let framing = if head_only || code == 204 || code == 304 {
                    Framing::Length(0)
                } else if field("Transfer-Encoding").is_some_and(|v| v.contains("chunked")) {
                    Framing::Chunked
                } else if let Some(v) = field("Content-Length") {
                    Framing::Length(v.parse().map_err(|_| invalid(format!("tiny_http's Content-Length {v:?}")))?)
                } else {
                    Framing::UntilClose
                };
                let keep = resp.version == Some(1)
                    && framing != Framing::UntilClose
                    && !field("Connection").is_some_and(|v| v.contains("close"));
                break (n, framing, keep);
            }
        }
    };
    let end = match framing {
        Framing::Length(n) => {
            let end =
                body_at.checked_add(n).filter(|e| *e <= ANSWER_LIMIT).ok_or_else(|| invalid("answer too large"))?;
            fill(s, &mut buf, end)?;
            end
        }
        Framing::Chunked => chunked_end(s, &mut buf, body_at)?,
        Framing::UntilClose => {
            while more(s, &mut buf).is_ok() {}
            buf.len()
        }
    };
    let keep = keep && buf.len() == end;
    buf.truncate(end);
    Ok((buf, keep))
}

/// Reads a chunked body starting at `at` (its size lines read with `httparse`); returns
/// where it ends.
fn chunked_end<S: Read>(s: &mut S, buf: &mut Vec<u8>, mut at: usize) -> io::Result<usize> {
    loop {
        match httparse::parse_chunk_size(&buf[at..]).map_err(|_| invalid("tiny_http's chunk size"))? {
            httparse::Status::Partial => more(s, buf)?,
            httparse::Status::Complete((size_line, 0)) => {
                // The last chunk, then no trailer fields: an empty line.
                let end = at + size_line + 2;
                fill(s, buf, end)?;
                if &buf[end - 2..end] != b"\r\n" {
                    return Err(invalid("trailer fields in tiny_http's answer"));
                }
                return Ok(end);
            }
            httparse::Status::Complete((size_line, size)) => {
                let end = usize::try_from(size)
                    .ok()
                    .and_then(|n| (at + size_line).checked_add(n)?.checked_add(2))
                    .filter(|e| *e <= ANSWER_LIMIT)
                    .ok_or_else(|| invalid("answer too large"))?;
                fill(s, buf, end)?;
                at = end;
            }
        }
    }
}

/// Reads at least one more byte into `buf`.
fn more<S: Read>(s: &mut S, buf: &mut Vec<u8>) -> io::Result<()> {
    let want = buf.len() + 1;
    fill(s, buf, want)
}

/// Reads until `buf` holds `want` bytes (at most [`ANSWER_LIMIT`]).
fn fill<S: Read>(s: &mut S, buf: &mut Vec<u8>, want: usize) -> io::Result<()> {
    let mut chunk = [0u8; READ_CHUNK];
    while buf.len() < want {
        if buf.len() >= ANSWER_LIMIT {
            return Err(invalid("answer too large"));
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tiny_http closed the connection")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(len: usize, head_only: bool, close: bool) -> Examined {
        Examined::Relay { len, head_only, close }
    }

    #[test]
    fn complete_heads_are_relayed_with_what_ends_the_connection() {
        let get = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(examine(get), relay(get.len(), false, false));
        let mut two = get.to_vec();
        two.extend_from_slice(b"GET /hea");
        assert_eq!(examine(&two), relay(get.len(), false, false), "a pipelined request stays for later");
        assert_eq!(examine(b"HEAD / HTTP/1.1\r\n\r\n"), relay(19, true, false));
        assert_eq!(examine(b"GET / HTTP/1.0\r\n\r\n"), relay(18, false, true));
        assert_eq!(examine(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"), relay(37, false, true));
        assert_eq!(examine(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), relay(37, false, false));
        assert_eq!(examine(b"GET /metrics HTTP/1.1\r\nHost"), Examined::Partial);
        assert_eq!(examine(b""), Examined::Partial);
    }

    #[test]
    fn bodies_and_garbage_are_refused() {
        let refused = |raw: &[u8]| match examine(raw) {
            Examined::Refuse(r) => Some(r),
            _ => None,
        };
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\n"),
            Some(Refusal::BodyNotAccepted)
        );
        assert_eq!(refused(b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\n"), Some(Refusal::BodyNotAccepted));
        assert_eq!(refused(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"), Some(Refusal::MethodNotAllowed));
        assert_eq!(refused(b"PUT / HTTP/1.1\r\nContent-Length: 8192\r\n\r\n"), Some(Refusal::MethodNotAllowed));
        assert_eq!(refused(b"PUT / HTTP/1.1\r\nContent-Length: 8193\r\n\r\n"), Some(Refusal::BodyNotAccepted));
        assert_eq!(refused(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Some(Refusal::BodyNotAccepted));
        assert_eq!(refused(b"GET / HTTP/1.1\r\nContent-Length: lots\r\n\r\n"), Some(Refusal::BadRequest));
        assert_eq!(refused(b"\x16\x03\x01\x02\x00"), Some(Refusal::BadRequest));
        assert_eq!(refused(b"GET / HTTP/2.0\r\n\r\n"), Some(Refusal::BadRequest));
    }

    #[test]
    fn lines_and_heads_beyond_the_limits_are_refused_before_they_end() {
        let long = |prefix: &str, n: usize| {
            let mut v = prefix.as_bytes().to_vec();
            v.resize(v.len() + n, b'a');
            v
        };
        assert_eq!(examine(&long("GET /", LINE_LIMIT)), Examined::Refuse(Refusal::UriTooLong));
        assert_eq!(examine(&long("GET /", LINE_LIMIT - 6)), Examined::Partial, "8 KiB exactly is allowed");
        assert_eq!(examine(&long("\r\nGET /", LINE_LIMIT)), Examined::Refuse(Refusal::UriTooLong));
        let header = long("GET / HTTP/1.1\r\nX-Big: ", LINE_LIMIT);
        assert_eq!(examine(&header), Examined::Refuse(Refusal::HeadersTooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        while many.len() <= HEAD_LIMIT {
            many.extend_from_slice(&long("X-A: ", 1000));
            many.extend_from_slice(b"\r\n");
        }
        assert_eq!(examine(&many), Examined::Refuse(Refusal::HeadersTooLarge), "over 64 KiB in all");
        let mut fields = b"GET / HTTP/1.1\r\n".to_vec();
        for _ in 0..=MAX_HEADERS {
            fields.extend_from_slice(b"X: y\r\n");
        }
        fields.extend_from_slice(b"\r\n");
        assert_eq!(examine(&fields), Examined::Refuse(Refusal::HeadersTooLarge), "too many fields");
    }

    #[test]
    fn the_cap_is_a_quarter_of_the_open_file_limit_within_bounds() {
        assert_eq!(connection_cap(None), MAX_CONNECTIONS);
        assert_eq!(connection_cap(Some(20_000)), MAX_CONNECTIONS);
        assert_eq!(connection_cap(Some(1024)), 256);
        assert_eq!(connection_cap(Some(64)), 16);
        assert_eq!(connection_cap(Some(10)), MIN_CONNECTIONS);
        assert_eq!(connection_cap(Some(u64::MAX)), MAX_CONNECTIONS);
    }

    /// A scripted peer: what it answers, and what it was sent.
    struct Peer {
        answer: io::Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }

    impl Read for Peer {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // One byte at a time: every framing must cope with answers cut anywhere.
            let n = buf.len().min(1);
            self.answer.read(&mut buf[..n])
        }
    }

    impl Write for Peer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn ask(answer: &str, head_only: bool) -> io::Result<(String, bool)> {
        let mut peer = Peer { answer: io::Cursor::new(answer.as_bytes().to_vec()), sent: Vec::new() };
        let (bytes, keep) = exchange(&mut peer, b"GET / HTTP/1.1\r\n\r\n", head_only)?;
        assert_eq!(peer.sent, b"GET / HTTP/1.1\r\n\r\n");
        Ok((String::from_utf8(bytes).unwrap(), keep))
    }

    #[test]
    fn an_answer_is_read_to_its_end_however_it_is_framed() {
        let sized = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(ask(sized, false).unwrap(), (sized.to_string(), true));
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(ask(head, true).unwrap(), (head.to_string(), true), "HEAD: no body");
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(ask(chunked, false).unwrap(), (chunked.to_string(), true));
        let until_close = "HTTP/1.0 200 OK\r\n\r\nabcdef";
        assert_eq!(ask(until_close, false).unwrap(), (until_close.to_string(), false));
        let closing = "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na";
        assert_eq!(ask(closing, false).unwrap(), (closing.to_string(), false));
        assert!(ask("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", false).is_err(), "cut short");
        assert!(ask("HTTP/1.1 100 Continue\r\n\r\n", false).is_err());
        assert!(ask("", false).is_err());
    }
}
