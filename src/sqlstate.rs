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

/// Why the worker pauses instead of judging events: an error that says nothing about
/// the event it met, so every event would meet it alike (docs/DESIGN.md §3 "paused").
/// The label of `chronicle_worker_paused` and the reason `/readyz` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PauseReason {
    /// The role may not write where the worker writes (`42501`).
    Privileges,
    /// A table, column or schema the worker writes into is missing or not what this
    /// version expects (`42P01`, `42703`, `3F000`, or the read model's columns differ).
    Schema,
    /// The server is out of a resource: disk, memory, connections, a limit (class `53`).
    Resources,
    /// The server accepts no writes (`25006`: a standby, or `default_transaction_read_only`).
    ReadOnly,
    /// The server is shutting down, starting up or its database is going away (`57P0x`).
    Shutdown,
    /// Every entry of a batch was refused with the same error, one that does not judge a
    /// value of the event (`claim::refused_alike`).
    Deterministic,
}

impl PauseReason {
    pub const ALL: [PauseReason; 6] = [
        PauseReason::Privileges,
        PauseReason::Schema,
        PauseReason::Resources,
        PauseReason::ReadOnly,
        PauseReason::Shutdown,
        PauseReason::Deterministic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Privileges => "privileges",
            PauseReason::Schema => "schema",
            PauseReason::Resources => "resources",
            PauseReason::ReadOnly => "read_only",
            PauseReason::Shutdown => "shutdown",
            PauseReason::Deterministic => "deterministic",
        }
    }
}

impl std::fmt::Display for PauseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fault of the system a SQLSTATE names, if it names one: privileges (`42501`), a
/// missing object (`42P01` table, `42703` column, `3F000` schema), resources (class
/// `53`: disk full, out of memory, too many connections, a configured limit), a
/// read-only server (`25006`) or a server going away (`57P01`..`57P05`). None for every
/// other code, among them the transient ones (`40001`, `55P03`, `57014`), which are
/// retried per event, and the ones that judge a value (classes `22`, `23`).
pub fn pause_reason_of(code: &SqlState) -> Option<PauseReason> {
    let c = code.code();
    if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        Some(PauseReason::Privileges)
    } else if *code == SqlState::UNDEFINED_TABLE
        || *code == SqlState::UNDEFINED_COLUMN
        || *code == SqlState::INVALID_SCHEMA_NAME
    {
        Some(PauseReason::Schema)
    } else if c.starts_with("53") {
        Some(PauseReason::Resources)
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        Some(PauseReason::ReadOnly)
    } else if c.starts_with("57P") {
        Some(PauseReason::Shutdown)
    } else {
        None
    }
}

/// `pause_reason_of` for a database error (none for an error without a SQLSTATE).
pub fn pause_reason(err: &postgres::Error) -> Option<PauseReason> {
    err.code().and_then(pause_reason_of)
}

/// Whether an error every entry of a batch met alike says nothing about the events
/// either: any code but those that judge a value (class `22`, data exception: a value
/// too long, out of range, malformed; class `23`, a constraint the row violates) and a
/// trigger's own `RAISE` (`P0001`, which may judge the row). A run of events that each
/// carry a bad value is not told from a bad table by its code: those fail one by one.
pub fn says_nothing_of_the_value(code: &SqlState) -> bool {
    let c = code.code();
    !(c.starts_with("22") || c.starts_with("23") || *code == SqlState::RAISE_EXCEPTION)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(code: &str) -> Option<PauseReason> {
        pause_reason_of(&SqlState::from_code(code))
    }

    #[test]
    fn faults_of_the_system_pause_with_their_reason() {
        assert_eq!(reason("42501"), Some(PauseReason::Privileges));
        for code in ["42P01", "42703", "3F000"] {
            assert_eq!(reason(code), Some(PauseReason::Schema), "{code}");
        }
        for code in ["53000", "53100", "53200", "53300", "53400"] {
            assert_eq!(reason(code), Some(PauseReason::Resources), "{code}");
        }
        assert_eq!(reason("25006"), Some(PauseReason::ReadOnly));
        for code in ["57P01", "57P02", "57P03", "57P04", "57P05"] {
            assert_eq!(reason(code), Some(PauseReason::Shutdown), "{code}");
        }
    }

    #[test]
    fn errors_of_one_event_or_one_moment_do_not_pause() {
        // Values and constraints (the event's), and races and timeouts (retried).
        for code in ["22001", "22003", "23502", "23505", "23514", "40001", "40P01", "55P03", "57014", "P0001", "XX000"]
        {
            assert_eq!(reason(code), None, "{code}");
        }
    }

    #[test]
    fn only_errors_that_judge_no_value_make_a_batch_refused_alike_systemic() {
        for code in ["42804", "42P10", "0A000", "XX000", "2BP01", "42883"] {
            assert!(says_nothing_of_the_value(&SqlState::from_code(code)), "{code}");
        }
        for code in ["22001", "22003", "22P02", "23502", "23505", "23514", "P0001"] {
            assert!(!says_nothing_of_the_value(&SqlState::from_code(code)), "{code}");
        }
    }

    #[test]
    fn every_pause_reason_has_a_distinct_label() {
        let labels: std::collections::HashSet<&str> = PauseReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), PauseReason::ALL.len());
    }
}
