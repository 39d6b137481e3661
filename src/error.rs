//! The application error: every failure a command can end with, and its exit code.
//!
//! Exit codes are a contract (docs/DESIGN.md §4): 0 success, 2 usage or configuration error,
//! 3 database unreachable or refusing us, 1 anything else.

use std::fmt;

#[derive(Debug)]
pub enum AppError {
    /// Bad command line or bad configuration value. Exit 2.
    Usage(String),
    /// The database cannot be reached, or refuses the connection (auth, missing
    /// database, too many connections). Exit 3.
    Unreachable(String),
    /// Any other failure, with its context. Exit 1.
    Failed(String),
}

impl AppError {
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::Usage(_) => 2,
            AppError::Unreachable(_) => 3,
            AppError::Failed(_) => 1,
        }
    }

    pub fn usage(msg: impl Into<String>) -> AppError {
        AppError::Usage(msg.into())
    }

    pub fn failed(msg: impl Into<String>) -> AppError {
        AppError::Failed(msg.into())
    }

    /// Wraps a database error with what we were doing, choosing the exit code from the
    /// error itself: a connection that could not be made or was refused is exit 3.
    pub fn db(context: &str, err: &postgres::Error) -> AppError {
        let msg = format!("{context}: {}", crate::sqlstate::describe_error(err));
        if err.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) {
            // Almost always a database nobody has migrated yet: say what to do.
            return AppError::Failed(format!(
                "{msg}\nThis database does not have chronicle's tables: run `chronicle migrate` first \
                 (on the same DATABASE_URL)."
            ));
        }
        if crate::sqlstate::is_connection_error(err) {
            AppError::Unreachable(msg)
        } else {
            AppError::Failed(msg)
        }
    }
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppError::Usage(m) | AppError::Unreachable(m) | AppError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for AppError {}

impl From<lexopt::Error> for AppError {
    fn from(e: lexopt::Error) -> AppError {
        AppError::Usage(e.to_string())
    }
}

pub type Result<T, E = AppError> = std::result::Result<T, E>;
