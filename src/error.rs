//! The application error: what went wrong, of which kind, with a message that says what
//! was being done (`while claiming a batch: …`, `cannot connect to postgresql://u:***@…`),
//! and the error that caused it, kept whole as `source()` (the driver's error with its
//! SQLSTATE, an I/O error). Which exit code a kind means is the command line's decision
//! (`cli::exit_code`, docs/DESIGN.md §4), not the library's.

use std::fmt;

/// What kind of failure, for the caller to decide what it means (an exit code, waiting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A bad command line or configuration value.
    Usage,
    /// The database cannot be reached, or refuses the connection (authentication, an
    /// unknown database, too many connections).
    Unreachable,
    /// Anything else.
    Failed,
    /// A bug in chronicle: a thread of the worker panicked.
    Panicked,
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug)]
pub struct AppError {
    kind: Kind,
    message: String,
    source: Option<Source>,
}

impl AppError {
    fn new(kind: Kind, message: impl Into<String>) -> AppError {
        AppError { kind, message: message.into(), source: None }
    }

    pub fn usage(message: impl Into<String>) -> AppError {
        AppError::new(Kind::Usage, message)
    }

    pub fn unreachable(message: impl Into<String>) -> AppError {
        AppError::new(Kind::Unreachable, message)
    }

    pub fn failed(message: impl Into<String>) -> AppError {
        AppError::new(Kind::Failed, message)
    }

    pub fn panicked(message: impl Into<String>) -> AppError {
        AppError::new(Kind::Panicked, message)
    }

    /// The same error, caused by `source` (kept for `source()`).
    pub fn caused_by(mut self, source: impl Into<Source>) -> AppError {
        self.source = Some(source.into());
        self
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Wraps a database error with what we were doing, choosing the kind from the error
    /// itself: a connection that could not be made or was refused is `Unreachable`; a
    /// missing table means a database nobody migrated, and says what to do.
    pub fn db(context: &str, err: postgres::Error) -> AppError {
        let message = format!("{context}: {}", crate::sqlstate::describe_error(&err));
        let e = if err.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) {
            AppError::failed(format!(
                "{message}\nThis database does not have chronicle's tables: run `chronicle migrate` first \
                 (on the same DATABASE_URL)."
            ))
        } else if crate::sqlstate::is_connection_error(&err) {
            AppError::unreachable(message)
        } else {
            AppError::failed(message)
        };
        e.caused_by(err)
    }

    /// Wraps an I/O error with what we were doing.
    pub fn io(context: &str, err: std::io::Error) -> AppError {
        AppError::failed(format!("{context}: {err}")).caused_by(err)
    }
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AppError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<lexopt::Error> for AppError {
    fn from(e: lexopt::Error) -> AppError {
        AppError::usage(e.to_string()).caused_by(e)
    }
}

pub type Result<T, E = AppError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn the_cause_is_kept_and_the_message_says_what_was_done() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let e = AppError::io("while reading events.jsonl", io);
        assert_eq!(e.kind(), Kind::Failed);
        assert_eq!(e.to_string(), "while reading events.jsonl: denied");
        let cause = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()).expect("the io error");
        assert_eq!(cause.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(AppError::usage("bad").source().is_none());
    }
}
