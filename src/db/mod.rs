//! Connecting to PostgreSQL: single connections, pools, and what a database error means.
//!
//! Errors are classified by SQLSTATE code (never by message text): whether an error
//! means "the database is not reachable or refuses us" (exit 3, the worker waits) or
//! "the world is temporarily wrong" (transient: retry) is decided here, once.

pub mod migrate;

use std::error::Error as _;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::{Client, NoTls};

use crate::config::DbUrl;
use crate::error::{AppError, Result};

/// How long a connection attempt may take before we call the database unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens one connection.
pub fn connect(url: &DbUrl) -> Result<Client, postgres::Error> {
    let mut config = url.config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.connect(NoTls)
}

/// Opens one connection for a one-shot command, mapping failure to exit code 3.
pub fn connect_for_command(url: &DbUrl) -> Result<Client> {
    connect(url).map_err(|e| AppError::db(&format!("cannot connect to {url}"), &e))
}

/// Connects, retrying until `wait` has passed (for containers started in any order).
pub fn connect_waiting(url: &DbUrl, wait: Duration) -> Result<Client> {
    let deadline = Instant::now() + wait;
    let mut delay = Duration::from_millis(100);
    let mut logged = false;
    loop {
        match connect(url) {
            Ok(c) => return Ok(c),
            Err(e) if is_connection_error(&e) && Instant::now() < deadline => {
                if !logged {
                    log::warn!("waiting up to {wait:?} for the database at {url}: {}", describe_error(&e));
                    logged = true;
                }
                std::thread::sleep(delay.min(deadline.saturating_duration_since(Instant::now())));
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(AppError::db(&format!("cannot connect to {url}"), &e)),
        }
    }
}

pub type Pool = r2d2::Pool<r2d2_postgres::PostgresConnectionManager<NoTls>>;
pub type PooledClient = r2d2::PooledConnection<r2d2_postgres::PostgresConnectionManager<NoTls>>;

/// Builds a pool of `size` connections. It does not connect until first used, so a
/// worker can start before the database does.
pub fn pool(url: &DbUrl, size: u32) -> Result<Pool> {
    let mut config = url.config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let manager = r2d2_postgres::PostgresConnectionManager::new(config, NoTls);
    Ok(r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(5))
        .test_on_check_out(false)
        .build_unchecked(manager))
}

/// Whether the error means we could not reach the database or it refused us: no
/// connection, a closed connection, an authentication failure, an unknown database,
/// too many connections, or a server shutting down or starting up.
pub fn is_connection_error(err: &postgres::Error) -> bool {
    match err.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("28") // invalid authorization
                || *code == SqlState::INVALID_CATALOG_NAME // database does not exist
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
        }
        None => err.is_closed() || err.source().is_some_and(|s| s.is::<std::io::Error>()),
    }
}

/// Whether retrying the same work later may succeed (DESIGN.md §3 "transient"): the
/// connection or server is in trouble, or we lost a race (serialization failure,
/// deadlock), or hit a lock or statement timeout.
pub fn is_transient(err: &postgres::Error) -> bool {
    if is_connection_error(err) {
        return true;
    }
    match err.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("40") // transaction rollback: serialization failure, deadlock
                || c.starts_with("53") // insufficient resources
                || c.starts_with("57") // operator intervention: query_canceled (statement timeout), shutdown
                || c.starts_with("58") // system error (I/O)
                || *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        }
        None => false,
    }
}

/// A one-line description of a database error with its SQLSTATE, detail and hint.
pub fn describe_error(err: &postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; detail: {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    match err.source() {
        Some(src) => format!("{err}: {src}"),
        None => err.to_string(),
    }
}
