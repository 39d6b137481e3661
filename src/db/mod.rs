//! Connecting to PostgreSQL: single connections, pools, and what a database error means.
//!
//! Errors are classified by SQLSTATE code (never by message text): whether an error
//! means "the database is not reachable or refuses us" (exit 3, the worker waits) or
//! "the world is temporarily wrong" (transient: retry) is decided here, once.

pub mod migrate;
pub mod tls;

pub use crate::sqlstate::{
    describe_error, is_connection_error, is_refusal, is_transient, pause_reason, says_nothing_of_the_value, PauseReason,
};

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use postgres::tls::MakeTlsConnect;
use postgres::{CancelToken, Client, GenericClient, Socket};

use crate::config::DbUrl;
use crate::error::{AppError, Result};

/// Why no connection was made.
#[derive(Debug)]
pub enum ConnectError {
    /// The driver's error: the server's refusal, a network or a TLS failure.
    Driver(postgres::Error),
    /// The connection was not complete (the TCP connect and the startup exchange: TLS,
    /// authentication) after `after`: `connect_timeout` when `by_connect_timeout`, else the
    /// caller's own limit.
    TimedOut { after: Duration, by_connect_timeout: bool },
    /// Given up because the caller is stopping.
    Stopped,
    /// So many earlier attempts are still unanswered (each holds a thread and a socket
    /// until the server answers or the network gives up on it) that no new one is made.
    Unanswered(usize),
    /// No thread could be started for the attempt.
    Thread(std::io::Error),
}

impl ConnectError {
    /// The server refused us for a reason waiting does not cure (`is_refusal`).
    pub fn is_refusal(&self) -> bool {
        matches!(self, ConnectError::Driver(e) if is_refusal(e))
    }

    /// Whether this means the database is not reachable (or refuses us) rather than
    /// something wrong with the request: everything but the driver's other errors.
    pub fn is_connection_error(&self) -> bool {
        match self {
            ConnectError::Driver(e) => is_connection_error(e),
            _ => true,
        }
    }

    /// The driver's error, when it is one.
    pub fn driver(&self) -> Option<&postgres::Error> {
        match self {
            ConnectError::Driver(e) => Some(e),
            _ => None,
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Driver(e) => f.write_str(&describe_error(e)),
            ConnectError::TimedOut { after, by_connect_timeout } => write!(
                f,
                "no answer: the connection (TCP connect, TLS, authentication) was not complete after {:.1} s{}",
                after.as_secs_f64(),
                if *by_connect_timeout { " (connect_timeout)" } else { "" }
            ),
            ConnectError::Stopped => f.write_str("stopped while connecting"),
            ConnectError::Unanswered(n) => {
                write!(f, "{n} earlier connection attempts are still unanswered: not starting another")
            }
            ConnectError::Thread(e) => write!(f, "cannot start a thread to connect: {e}"),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Driver(e) => Some(e),
            ConnectError::Thread(e) => Some(e),
            _ => None,
        }
    }
}

/// Connection attempts running (each on its own thread), abandoned ones included.
static CONNECTING: AtomicUsize = AtomicUsize::new(0);

/// At most this many connection attempts run at once. An attempt given up on runs on
/// until the server answers or the network gives up on it (keepalives,
/// `tcp_user_timeout`): against a server that accepts and never answers, this bounds the
/// threads and sockets a process waiting for it holds.
const MAX_CONNECTING: usize = 32;

/// One running connection attempt, counted while it lives.
struct Attempt;

impl Attempt {
    fn start() -> Result<Attempt, ConnectError> {
        let before = CONNECTING.fetch_add(1, Ordering::SeqCst);
        if before >= MAX_CONNECTING {
            CONNECTING.fetch_sub(1, Ordering::SeqCst);
            return Err(ConnectError::Unanswered(before));
        }
        Ok(Attempt)
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        CONNECTING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Opens one connection, with TLS as the URL's `sslmode` says, within the URL's
/// `connect_timeout` (the whole connection). Callers check the TLS settings first
/// (`tls::connector`, exit 2 when they are unusable).
pub fn connect(url: &DbUrl) -> Result<Client, ConnectError> {
    connect_until(url, None, &|| false)
}

/// As `connect`, given up at `until` too, and as soon as `stop` says so (looked at every
/// tenth of a second).
///
/// The driver bounds only the TCP connect; its startup exchange waits on the server for
/// as long as it takes, and a server that accepts and never answers (a stopped
/// postmaster, a half-open path) holds it forever. So the attempt runs on its own thread
/// and the caller waits for it in slices it can abandon. An abandoned attempt that later
/// completes is closed at once; one that never completes ends when the network gives up
/// on it (keepalives, `tcp_user_timeout`), and `MAX_CONNECTING` bounds how many wait.
pub fn connect_until(url: &DbUrl, until: Option<Instant>, stop: &dyn Fn() -> bool) -> Result<Client, ConnectError> {
    let started = Instant::now();
    // libpq's timeout is per host tried.
    let hosts = url.config.get_hosts().len().max(url.config.get_hostaddrs().len()).max(1) as u32;
    let limit = url.connect_timeout.map(|t| started + t * hosts);
    let deadline = match (limit, until) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let answer = match tls::connector(url) {
        Ok(connector) => start_attempt(url.config.clone(), connector)?,
        Err(e) => start_attempt(url.config.clone(), tls::Unusable(tls::SetupError(e.to_string())))?,
    };
    const SLICE: Duration = Duration::from_millis(100);
    loop {
        let wait = deadline.map_or(SLICE, |d| d.saturating_duration_since(Instant::now()).min(SLICE));
        match answer.recv_timeout(wait) {
            Ok(result) => return result.map_err(ConnectError::Driver),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(ConnectError::Thread(std::io::Error::other(
                    "the connecting thread ended without an answer",
                )))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if stop() {
                    return Err(ConnectError::Stopped);
                }
                if let Some(d) = deadline.filter(|d| Instant::now() >= *d) {
                    let by_connect_timeout = limit == Some(d);
                    return Err(ConnectError::TimedOut { after: started.elapsed(), by_connect_timeout });
                }
            }
        }
    }
}

/// Starts a connection attempt on its own thread; its result arrives on the receiver (a
/// client nobody takes any more is dropped with the channel, closing the connection).
fn start_attempt<T>(
    config: postgres::Config,
    tls: T,
) -> Result<mpsc::Receiver<Result<Client, postgres::Error>>, ConnectError>
where
    T: MakeTlsConnect<Socket> + Send + 'static,
    T::TlsConnect: Send,
    T::Stream: Send,
    <T::TlsConnect as postgres::tls::TlsConnect<Socket>>::Future: Send,
{
    let attempt = Attempt::start()?;
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("connect".into())
        .spawn(move || {
            let _attempt = attempt;
            let _ = tx.send(config.connect(tls));
        })
        .map_err(ConnectError::Thread)?;
    Ok(rx)
}

/// Opens one connection for a one-shot command: unusable TLS settings are exit 2, a
/// connection that cannot be made or is refused exit 3.
pub fn connect_for_command(url: &DbUrl) -> Result<Client> {
    tls::connector(url)?;
    connect(url).map_err(|e| connect_failure(url, e))
}

/// What a failed connection attempt means for a command. A failure that is not the
/// server's error response (network, TLS negotiation or certificate, authentication
/// exchange, no answer in time) means we could not get a connection: exit 3. The
/// server's errors keep their SQLSTATE classification.
pub fn connect_failure(url: &DbUrl, err: ConnectError) -> AppError {
    let context = format!("cannot connect to {url}");
    let ConnectError::Driver(err) = err else {
        return AppError::unreachable(format!("{context}: {err}")).caused_by(err);
    };
    if let Some(setup) = err.source().and_then(|s| s.downcast_ref::<tls::SetupError>()) {
        return AppError::usage(format!("{context}: {setup}")).caused_by(err);
    }
    if err.as_db_error().is_none() {
        let hint = tls::refusal_hint(&err).map(|h| format!("; hint: {h}")).unwrap_or_default();
        return AppError::unreachable(format!("{context}: {}{hint}", describe_error(&err))).caused_by(err);
    }
    AppError::db(&context, err)
}

/// How long a cancel request may take (its TCP connect is bounded by the URL's
/// `connect_timeout` too).
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends a cancel request for the query running on the token's connection, over TLS
/// when the connection used it. The driver waits for the server to close the cancel
/// connection; a server that never does is given up on after `CANCEL_TIMEOUT` (the
/// attempt's thread then ends with the process or when the network gives up on it).
pub fn cancel_query(url: &DbUrl, token: &CancelToken) -> Result<(), ConnectError> {
    let attempt = Attempt::start()?;
    let (tx, rx) = mpsc::sync_channel(1);
    let (url, token) = (url.clone(), token.clone());
    std::thread::Builder::new()
        .name("cancel".into())
        .spawn(move || {
            let _attempt = attempt;
            let result = match tls::connector(&url) {
                Ok(connector) => token.cancel_query(connector),
                Err(e) => token.cancel_query(tls::Unusable(tls::SetupError(e.to_string()))),
            };
            let _ = tx.send(result);
        })
        .map_err(ConnectError::Thread)?;
    match rx.recv_timeout(CANCEL_TIMEOUT) {
        Ok(result) => result.map_err(ConnectError::Driver),
        Err(_) => Err(ConnectError::TimedOut { after: CANCEL_TIMEOUT, by_connect_timeout: false }),
    }
}

/// Connects, retrying until `wait` has passed (for containers started in any order).
/// A server that refuses us (`is_refusal`) is not waited for: it will not change its mind.
/// An attempt is given up on at the end of `wait` too, so the whole wait ends on time.
pub fn connect_waiting(url: &DbUrl, wait: Duration) -> Result<Client> {
    tls::connector(url)?;
    let deadline = Instant::now() + wait;
    let mut delay = Duration::from_millis(100);
    let mut logged = false;
    loop {
        match connect_until(url, Some(deadline), &|| false) {
            Ok(c) => return Ok(c),
            Err(e) if e.is_connection_error() && !e.is_refusal() && Instant::now() < deadline => {
                if !logged {
                    log::warn!("waiting up to {wait:?} for the database at {url}: {e}");
                    logged = true;
                }
                std::thread::sleep(delay.min(deadline.saturating_duration_since(Instant::now())));
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(connect_failure(url, e)),
        }
    }
}

/// The address and port of the server `client` is connected to (`10.0.0.7:5432`), or its
/// socket directory's port for a unix socket: which server of a multi-host URL answers.
pub fn server_address(client: &mut impl GenericClient) -> Result<String, postgres::Error> {
    let row = client.query_one(
        "SELECT coalesce(host(inet_server_addr()) || ':' || inet_server_port(),
                         'the local socket, port ' || current_setting('port'))",
        &[],
    )?;
    row.try_get(0)
}

pub type Pool = r2d2::Pool<Manager>;
pub type PooledClient = r2d2::PooledConnection<Manager>;

/// Opens the pool's connections with `connect`: the whole connection within
/// `connect_timeout`, as everywhere else.
#[derive(Debug)]
pub struct Manager {
    url: DbUrl,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Client;
    type Error = ConnectError;

    fn connect(&self) -> Result<Client, ConnectError> {
        connect(&self.url)
    }

    fn is_valid(&self, conn: &mut Client) -> Result<(), ConnectError> {
        conn.simple_query("").map(|_| ()).map_err(ConnectError::Driver)
    }

    fn has_broken(&self, conn: &mut Client) -> bool {
        conn.is_closed()
    }
}

/// Builds a pool of `size` connections, with TLS as the URL's `sslmode` says (unusable
/// TLS settings are exit 2); refusals to open one are reported to `refusals`. It does
/// not connect until first used, so a worker can start before the database does.
pub fn pool(url: &DbUrl, size: u32, refusals: Arc<RefusalLog>) -> Result<Pool> {
    tls::connector(url)?;
    Ok(r2d2::Pool::builder()
        .error_handler(Box::new(PoolErrors { url: url.clone(), refusals }))
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(5))
        .test_on_check_out(false)
        .build_unchecked(Manager { url: url.clone() }))
}

/// Reports a server that refuses us (a wrong or rotated password, a role no longer
/// allowed to log in, a dropped database): an error an operator must fix, logged at error
/// level at most once a minute while it lasts, naming the server (password masked) and
/// its reason. One per worker process, shared by its connection attempts.
///
/// It also keeps the latest attempt the server turned away for lack of connection slots
/// (`sqlstate::connection_shortage`), which the pool's callers learn only as a timeout:
/// the worker names that cause instead of an unreachable server (`recent_shortage`).
#[derive(Debug, Default)]
pub struct RefusalLog {
    last_logged: std::sync::Mutex<Option<Instant>>,
    shortage: std::sync::Mutex<Option<(Instant, &'static str, String)>>,
}

const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

impl RefusalLog {
    pub fn report(&self, url: &DbUrl, err: &ConnectError) {
        let Ok(mut last) = self.last_logged.lock() else { return };
        if last.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
            *last = Some(Instant::now());
            log::error!(
                "the database at {url} refuses our connections: {err}; retrying (check the credentials and the \
                 database name; this message repeats at most once a minute while it lasts)"
            );
        }
    }

    /// Notes an attempt the server turned away for lack of connection slots (or of another
    /// resource); any other error is not one.
    pub fn note_shortage(&self, e: &postgres::Error) {
        let Some(cause) = crate::sqlstate::connection_shortage(e) else { return };
        if let Ok(mut s) = self.shortage.lock() {
            *s = Some((Instant::now(), cause, describe_error(e)));
        }
    }

    /// The cause and the error of the latest attempt turned away for lack of connection
    /// slots, if one was within `within`.
    pub fn recent_shortage(&self, within: Duration) -> Option<(&'static str, String)> {
        let s = self.shortage.lock().ok()?;
        s.as_ref().filter(|(at, _, _)| at.elapsed() <= within).map(|(_, cause, e)| (*cause, e.clone()))
    }
}

/// What the pool does with a failed attempt to open a connection: a refusal is reported
/// (see `RefusalLog`); an unreachable server is the callers' to report, once per outage.
#[derive(Debug)]
struct PoolErrors {
    url: DbUrl,
    refusals: Arc<RefusalLog>,
}

impl r2d2::HandleError<ConnectError> for PoolErrors {
    fn handle_error(&self, err: ConnectError) {
        if err.is_refusal() {
            self.refusals.report(&self.url, &err);
        } else {
            if let Some(e) = err.driver() {
                self.refusals.note_shortage(e);
            }
            log::debug!("cannot open a connection to {}: {err}", self.url);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_attempts_beyond_the_bound_are_refused_until_one_ends() {
        let mut running = Vec::new();
        while let Ok(a) = Attempt::start() {
            running.push(a);
            assert!(running.len() <= MAX_CONNECTING, "more than {MAX_CONNECTING} attempts started");
        }
        assert!(matches!(Attempt::start(), Err(ConnectError::Unanswered(n)) if n == MAX_CONNECTING));
        running.pop();
        assert!(Attempt::start().is_ok(), "an ended attempt frees its place");
    }

    #[test]
    fn a_connection_that_never_completes_is_a_connection_error_naming_the_limit() {
        let by_timeout = ConnectError::TimedOut { after: Duration::from_secs(10), by_connect_timeout: true };
        assert!(by_timeout.is_connection_error() && !by_timeout.is_refusal());
        assert!(by_timeout.to_string().contains("10.0 s (connect_timeout)"), "{by_timeout}");
        let by_caller = ConnectError::TimedOut { after: Duration::from_millis(500), by_connect_timeout: false };
        assert!(!by_caller.to_string().contains("connect_timeout"), "{by_caller}");
        assert!(ConnectError::Stopped.is_connection_error() && ConnectError::Unanswered(32).is_connection_error());
    }
}
