//! What a database error means, decided once, by SQLSTATE code (never by message text):
//! whether the database is unreachable or refuses us (exit 3, the worker waits), whether
//! retrying may succeed (transient), and a one-line description for people. Pure: it
//! reads the driver's error and touches nothing, so the event model and the error type
//! use it without depending on the connection code.

use std::error::Error as _;

use postgres::error::SqlState;

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

/// Whether the server answered and refused us for a reason that waiting does not cure:
/// the credentials are wrong or the role may not log in (class 28), or the database
/// does not exist (3D000). A server that is down, starting up (57P03) or full (53300) is
/// not a refusal: those pass.
pub fn is_refusal(err: &postgres::Error) -> bool {
    err.code().is_some_and(|code| code.code().starts_with("28") || *code == SqlState::INVALID_CATALOG_NAME)
}

/// What a connection attempt's error says when the server was reached and lacks the
/// resources to take one more connection (class 53): its cause in words, for the log, which
/// otherwise reads as an unreachable server. `too_many_connections` (53300) is the usual
/// one: `max_connections`, or a role's or database's `CONNECTION LIMIT`, reached.
pub fn connection_shortage(err: &postgres::Error) -> Option<&'static str> {
    let code = err.code()?;
    if *code == SqlState::TOO_MANY_CONNECTIONS {
        Some("the server has no connection slots left")
    } else if code.code().starts_with("53") {
        Some("the server lacks the resources to accept a connection")
    } else {
        None
    }
}

/// Whether retrying the same work later may succeed (docs/DESIGN.md §3 "transient"): the
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
