//! Connecting to PostgreSQL: single connections, pools, and what a database error means.
//!
//! Errors are classified by SQLSTATE code (never by message text): whether an error
//! means "the database is not reachable or refuses us" (exit 3, the worker waits) or
//! "the world is temporarily wrong" (transient: retry) is decided here, once.

pub mod migrate;
pub mod tls;

pub use crate::sqlstate::{describe_error, is_connection_error, is_refusal, is_transient};

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::{CancelToken, Client, GenericClient};

use crate::config::DbUrl;
use crate::error::{AppError, Result};

/// How long a connection attempt may take before we call the database unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens one connection, with TLS as the URL's `sslmode` says. Callers check the TLS
/// settings first (`tls::connector`, exit 2 when they are unusable).
pub fn connect(url: &DbUrl) -> Result<Client, postgres::Error> {
    let mut config = url.config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    match tls::connector(url) {
        Ok(connector) => config.connect(connector),
        Err(e) => config.connect(tls::Unusable(tls::SetupError(e.to_string()))),
    }
}

/// Opens one connection for a one-shot command: unusable TLS settings are exit 2, a
/// connection that cannot be made or is refused exit 3.
pub fn connect_for_command(url: &DbUrl) -> Result<Client> {
    tls::connector(url)?;
    connect(url).map_err(|e| connect_failure(url, e))
}

/// What a failed connection attempt means for a command. A failure that is not the
/// server's error response (network, TLS negotiation or certificate, authentication
/// exchange) means we could not get a connection: exit 3. The server's errors keep
/// their SQLSTATE classification.
pub fn connect_failure(url: &DbUrl, err: postgres::Error) -> AppError {
    let context = format!("cannot connect to {url}");
    if let Some(setup) = err.source().and_then(|s| s.downcast_ref::<tls::SetupError>()) {
        return AppError::usage(format!("{context}: {setup}")).caused_by(err);
    }
    if err.as_db_error().is_none() {
        let hint = tls::refusal_hint(&err).map(|h| format!("; hint: {h}")).unwrap_or_default();
        return AppError::unreachable(format!("{context}: {}{hint}", describe_error(&err))).caused_by(err);
    }
    AppError::db(&context, err)
}

/// Sends a cancel request for the query running on the token's connection, over TLS
/// when the connection used it.
pub fn cancel_query(url: &DbUrl, token: &CancelToken) -> Result<(), postgres::Error> {
    match tls::connector(url) {
        Ok(connector) => token.cancel_query(connector),
        Err(e) => token.cancel_query(tls::Unusable(tls::SetupError(e.to_string()))),
    }
}

/// Connects, retrying until `wait` has passed (for containers started in any order).
/// A server that refuses us (`is_refusal`) is not waited for: it will not change its mind.
pub fn connect_waiting(url: &DbUrl, wait: Duration) -> Result<Client> {
    tls::connector(url)?;
    let deadline = Instant::now() + wait;
    let mut delay = Duration::from_millis(100);
    let mut logged = false;
    loop {
        match connect(url) {
            Ok(c) => return Ok(c),
            Err(e) if is_connection_error(&e) && !is_refusal(&e) && Instant::now() < deadline => {
                if !logged {
                    log::warn!("waiting up to {wait:?} for the database at {url}: {}", describe_error(&e));
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

pub type Pool = r2d2::Pool<r2d2_postgres::PostgresConnectionManager<tls::Connector>>;
pub type PooledClient = r2d2::PooledConnection<r2d2_postgres::PostgresConnectionManager<tls::Connector>>;

/// Builds a pool of `size` connections, with TLS as the URL's `sslmode` says (unusable
/// TLS settings are exit 2); refusals to open one are reported to `refusals`. It does not connect until first used, so a worker can
/// start before the database does.
pub fn pool(url: &DbUrl, size: u32, refusals: Arc<RefusalLog>) -> Result<Pool> {
    let connector = tls::connector(url)?;
    let mut config = url.config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let manager = r2d2_postgres::PostgresConnectionManager::new(config, connector);
    Ok(r2d2::Pool::builder()
        .error_handler(Box::new(PoolErrors { url: url.clone(), refusals }))
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(5))
        .test_on_check_out(false)
        .build_unchecked(manager))
}

/// Reports a server that refuses us (a wrong or rotated password, a role no longer
/// allowed to log in, a dropped database): an error an operator must fix, logged at error
/// level at most once a minute while it lasts, naming the server (password masked) and
/// its reason. One per worker process, shared by its connection attempts.
#[derive(Debug, Default)]
pub struct RefusalLog {
    last_logged: std::sync::Mutex<Option<Instant>>,
}

const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

impl RefusalLog {
    pub fn report(&self, url: &DbUrl, err: &postgres::Error) {
        let Ok(mut last) = self.last_logged.lock() else { return };
        if last.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
            *last = Some(Instant::now());
            log::error!(
                "the database at {url} refuses our connections: {}; retrying (check the credentials and the \
                 database name; this message repeats at most once a minute while it lasts)",
                describe_error(err)
            );
        }
    }
}

/// What the pool does with a failed attempt to open a connection: a refusal is reported
/// (see `RefusalLog`); an unreachable server is the callers' to report, once per outage.
#[derive(Debug)]
struct PoolErrors {
    url: DbUrl,
    refusals: Arc<RefusalLog>,
}

impl r2d2::HandleError<postgres::Error> for PoolErrors {
    fn handle_error(&self, err: postgres::Error) {
        if is_refusal(&err) {
            self.refusals.report(&self.url, &err);
        } else {
            log::debug!("cannot open a connection to {}: {}", self.url, describe_error(&err));
        }
    }
}
