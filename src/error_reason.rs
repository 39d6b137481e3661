//! The closed list of `error_reason` values (docs/DESIGN.md §3): why a delivery ended
//! `failed`. They label metrics and alerts and are what `replay-failed --error-reason`
//! selects, so the list is closed, spelled here once, and checked by the database too
//! (a CHECK constraint on `chronicle_outbox_events.error_reason`, migrations 2 and 12).
//! Pure.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorReason {
    /// The event type is not in this version's catalog.
    UnknownEventType,
    /// A field the type requires is missing or of the wrong JSON type, the event cannot
    /// be read by this version, or it is over `OUTBOX_MAX_EVENT_BYTES`.
    InvalidPayload,
    /// The database refused the entry (a data or constraint error).
    RejectedByReadModel,
    /// Transient failures, or lost leases, used up the attempts.
    MaxAttemptsExceeded,
    /// The projection of the event panicked: a bug in chronicle, caught at that one event.
    ProjectionPanicked,
}

impl ErrorReason {
    /// Every reason, in the order metrics render them.
    pub const ALL: [ErrorReason; 5] = [
        ErrorReason::UnknownEventType,
        ErrorReason::InvalidPayload,
        ErrorReason::RejectedByReadModel,
        ErrorReason::MaxAttemptsExceeded,
        ErrorReason::ProjectionPanicked,
    ];

    /// The name stored in the outbox and used as the metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorReason::UnknownEventType => "unknown_event_type",
            ErrorReason::InvalidPayload => "invalid_payload",
            ErrorReason::RejectedByReadModel => "rejected_by_read_model",
            ErrorReason::MaxAttemptsExceeded => "max_attempts_exceeded",
            ErrorReason::ProjectionPanicked => "projection_panicked",
        }
    }

    /// The reason named `name`, if it is one.
    pub fn parse(name: &str) -> Option<ErrorReason> {
        ErrorReason::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The names, comma-separated, for help texts and error messages.
    pub fn names() -> String {
        ErrorReason::ALL.map(ErrorReason::as_str).join(", ")
    }
}

impl fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        for r in ErrorReason::ALL {
            assert_eq!(ErrorReason::parse(r.as_str()), Some(r));
        }
        for bad in ["", "Invalid_Payload", "invalid payload", "none", "max_attempts"] {
            assert_eq!(ErrorReason::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            ErrorReason::names(),
            "unknown_event_type, invalid_payload, rejected_by_read_model, max_attempts_exceeded, projection_panicked"
        );
    }

    /// The database's CHECK constraint lists the same names (migration 12, which widened
    /// the one of migration 2).
    #[test]
    fn the_outbox_check_constraint_allows_exactly_these() {
        let sql = include_str!("../migrations/0012_projection_panicked.sql");
        let start = sql.find("error_reason IN (").expect("the error_reason constraint");
        let list = &sql[start..start + sql[start..].find(')').expect("its end")];
        let named: Vec<&str> = list.split('\'').skip(1).step_by(2).collect();
        assert_eq!(named, ErrorReason::ALL.map(ErrorReason::as_str));
    }
}
