//! Verifying the read model against the source of truth, and healing the drift found.
//!
//! Three kinds of drift, each one set-based statement over the whole scope:
//!
//! - **events without an entry**: the entry was lost (deleted by hand, a restore of an
//!   older backup of the read model, a bug);
//! - **entries without an event**: left over (an entry restored after an erasure, rows
//!   written by hand);
//! - **stale entries**: built by an older `projection_version` than this binary's.
//!
//! An event whose delivery is live (`pending` or `processing`) is not drift: the worker
//! is about to write its entry, so it is counted as *in flight* and nothing else. An event
//! whose current delivery is `failed` is drift, counted with its kind, but also reported
//! apart: a new delivery would only fail the same way and bypass the replay's audit
//! trail, so `--fix` leaves it to `replay-failed` (after the cause is fixed).
//!
//! An event's *current* delivery is its live one if any, else its latest one.

use postgres::{Client, GenericClient, IsolationLevel};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::outbox::{self, current_delivery};
use crate::projection::PROJECTION_VERSION;

/// The most example ids reported per kind.
pub const MAX_EXAMPLES: i64 = 10;

/// How many of one kind, and the first few ids (oldest first).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Finding {
    pub count: i64,
    pub examples: Vec<Uuid>,
}

impl Finding {
    fn to_json(&self) -> Value {
        json!({ "count": self.count, "examples": self.examples.iter().map(Uuid::to_string).collect::<Vec<_>>() })
    }
}

/// One kind of drift concerning events, with its subset whose delivery failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventDrift {
    /// Every event of this kind, failed deliveries included.
    pub all: Finding,
    /// Those whose current delivery is `failed`: `replay-failed`, not `--fix`, heals them.
    pub failed: Finding,
}

impl EventDrift {
    fn to_json(&self) -> Value {
        let mut v = self.all.to_json();
        v["failed"] = self.failed.to_json();
        v
    }
}

/// What `check` found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub library_id: Option<Uuid>,
    pub events_without_entry: EventDrift,
    pub entries_without_event: Finding,
    pub stale_entries: EventDrift,
    /// Events without a current entry whose delivery is pending or processing (not drift).
    pub in_flight: i64,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.events_without_entry.all.count == 0
            && self.entries_without_event.count == 0
            && self.stale_entries.all.count == 0
    }

    /// Drift that `fix` cannot heal: events whose delivery failed.
    pub fn needs_replay(&self) -> i64 {
        self.events_without_entry.failed.count + self.stale_entries.failed.count
    }

    pub fn to_json(&self, fixed: Option<&Fixed>) -> Value {
        json!({
            "library_id": self.library_id.map(|l| l.to_string()),
            "events_without_entry": self.events_without_entry.to_json(),
            "entries_without_event": self.entries_without_event.to_json(),
            "stale_entries": self.stale_entries.to_json(),
            "in_flight": self.in_flight,
            "projection_version": PROJECTION_VERSION,
            "fixed": fixed.map(Fixed::to_json),
            "clean": self.is_clean(),
        })
    }
}

/// What `fix` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fixed {
    /// New pending deliveries for events without an entry.
    pub missing_enqueued: i64,
    /// New pending deliveries for events whose entry is stale.
    pub stale_enqueued: i64,
    pub orphans_deleted: i64,
}

impl Fixed {
    fn to_json(&self) -> Value {
        json!({
            "missing_enqueued": self.missing_enqueued,
            "stale_enqueued": self.stale_enqueued,
            "orphans_deleted": self.orphans_deleted,
        })
    }
}

/// Events of the scope without an entry, with their current delivery status: count of
/// the drifted ones, of the failed among them, of those in flight, and examples.
pub const CHECK_EVENTS_WITHOUT_ENTRY: &str = concat!(
    "WITH missing AS (
        SELECT e.id, e.occurred_at, d.status
        FROM chronicle_events e
        LEFT JOIN LATERAL (",
    current_delivery!(),
    ") d ON true
        WHERE ($1::uuid IS NULL OR e.library_id = $1)
          AND NOT EXISTS (SELECT 1 FROM chronicle_entries n WHERE n.id = e.id)
    ), drift AS (
        SELECT * FROM missing WHERE status IS DISTINCT FROM 'pending' AND status IS DISTINCT FROM 'processing'
    )
    SELECT (SELECT count(*) FROM drift),
           (SELECT count(*) FROM drift WHERE status = 'failed'),
           (SELECT count(*) FROM missing) - (SELECT count(*) FROM drift),
           ARRAY(SELECT id FROM drift ORDER BY occurred_at, id LIMIT $2),
           ARRAY(SELECT id FROM drift WHERE status = 'failed' ORDER BY occurred_at, id LIMIT $2)"
);

/// Entries of the scope built by an older projection version whose event exists: count,
/// failed, in flight, examples (as above).
pub const CHECK_STALE_ENTRIES: &str = concat!(
    "WITH stale AS (
        SELECT e.id, e.occurred_at, d.status
        FROM chronicle_entries n
        JOIN chronicle_events e ON e.id = n.id
        LEFT JOIN LATERAL (",
    current_delivery!(),
    ") d ON true
        WHERE ($1::uuid IS NULL OR n.library_id = $1)
          AND n.projection_version < $3
    ), drift AS (
        SELECT * FROM stale WHERE status IS DISTINCT FROM 'pending' AND status IS DISTINCT FROM 'processing'
    )
    SELECT (SELECT count(*) FROM drift),
           (SELECT count(*) FROM drift WHERE status = 'failed'),
           (SELECT count(*) FROM stale) - (SELECT count(*) FROM drift),
           ARRAY(SELECT id FROM drift ORDER BY occurred_at, id LIMIT $2),
           ARRAY(SELECT id FROM drift WHERE status = 'failed' ORDER BY occurred_at, id LIMIT $2)"
);

/// Entries of the scope whose event does not exist: count and examples.
pub const CHECK_ENTRIES_WITHOUT_EVENT: &str = "
    WITH orphans AS (
        SELECT n.id, n.occurred_at
        FROM chronicle_entries n
        WHERE ($1::uuid IS NULL OR n.library_id = $1)
          AND NOT EXISTS (SELECT 1 FROM chronicle_events e WHERE e.id = n.id)
    )
    SELECT (SELECT count(*) FROM orphans),
           ARRAY(SELECT id FROM orphans ORDER BY occurred_at, id LIMIT $2)";

/// Compares the read model with the events of one library (or all), in one snapshot
/// (a read-only repeatable-read transaction of its own), so the counts agree.
pub fn check(client: &mut Client, library_id: Option<Uuid>) -> Result<Report, postgres::Error> {
    let mut tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start()?;
    let r = tx.query_one(CHECK_EVENTS_WITHOUT_ENTRY, &[&library_id, &MAX_EXAMPLES])?;
    let (events_without_entry, missing_in_flight) = event_drift(&r)?;
    let r = tx.query_one(CHECK_STALE_ENTRIES, &[&library_id, &MAX_EXAMPLES, &PROJECTION_VERSION])?;
    let (stale_entries, stale_in_flight) = event_drift(&r)?;
    let r = tx.query_one(CHECK_ENTRIES_WITHOUT_EVENT, &[&library_id, &MAX_EXAMPLES])?;
    let entries_without_event = Finding { count: r.try_get(0)?, examples: r.try_get(1)? };
    tx.commit()?;
    Ok(Report {
        library_id,
        events_without_entry,
        entries_without_event,
        stale_entries,
        in_flight: missing_in_flight + stale_in_flight,
    })
}

/// Reads (drift count, failed count, in flight, examples, failed examples).
fn event_drift(r: &postgres::Row) -> Result<(EventDrift, i64), postgres::Error> {
    let drift = EventDrift {
        all: Finding { count: r.try_get(0)?, examples: r.try_get(3)? },
        failed: Finding { count: r.try_get(1)?, examples: r.try_get(4)? },
    };
    Ok((drift, r.try_get(2)?))
}

/// Deletes the entries of the scope whose event does not exist. Safe against a
/// concurrent projection: an entry is only ever written after its event committed, so
/// an entry this statement sees has its event visible too, unless it really is gone.
pub const DELETE_ORPHAN_ENTRIES: &str = "
    DELETE FROM chronicle_entries n
    WHERE ($1::uuid IS NULL OR n.library_id = $1)
      AND NOT EXISTS (SELECT 1 FROM chronicle_events e WHERE e.id = n.id)";

/// Heals what `fix` can, in one transaction: enqueues the missing and stale events and
/// deletes the orphan entries, then wakes idle workers.
pub fn fix(client: &mut impl GenericClient, library_id: Option<Uuid>) -> Result<Fixed, postgres::Error> {
    let mut tx = client.transaction()?;
    let r = tx.query_one(outbox::ENQUEUE_MISSING_AND_STALE, &[&library_id, &PROJECTION_VERSION])?;
    let (missing_enqueued, stale_enqueued): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
    let orphans_deleted = tx.execute(DELETE_ORPHAN_ENTRIES, &[&library_id])? as i64;
    if missing_enqueued + stale_enqueued > 0 {
        tx.execute("SELECT pg_notify('chronicle_outbox', '')", &[])?;
    }
    tx.commit()?;
    Ok(Fixed { missing_enqueued, stale_enqueued, orphans_deleted })
}
