//! What operators read: the runbook's acceptance queries (`chronicle status`) and
//! everything about one event (`chronicle show`), so nobody needs psql to answer "is the
//! projector healthy?" or "why is this event wrong?".
//!
//! Read-only. Each report is read in one REPEATABLE READ snapshot, so its numbers agree
//! with each other even while workers run.

use std::time::Duration;

use chrono::{DateTime, Utc};
use postgres::{Client, GenericClient, IsolationLevel};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::error::{AppError, Result};

/// The outbox by state (docs/DESIGN.md §3), with the backlog's age and the stuck rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OutboxCounts {
    pub pending: i64,
    pub processing: i64,
    pub done: i64,
    /// Failing events: events whose current delivery failed (none pending or processing,
    /// none done since), each counted once however many failed deliveries it has.
    pub failed: i64,
    /// Age of the oldest pending row; 0 when nothing is pending (as the gauge).
    pub oldest_pending_age_seconds: f64,
    /// Processing past its lease, or past `OUTBOX_MAX_PROCESSING_SECONDS` since its claim.
    pub stuck: i64,
}

/// Failing events of one `error_reason` (that of each one's current failed delivery), with
/// the event of the latest such failure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedReason {
    pub error_reason: Option<String>,
    pub count: i64,
    pub example_event_id: Uuid,
}

/// One row of `chronicle_rebuild_runs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RebuildRun {
    pub id: i64,
    pub mode: String,
    pub library_id: Option<Uuid>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub events_total: Option<i64>,
    pub rows_written: i64,
    pub failures: i64,
    pub failures_by_reason: Value,
    pub success: Option<bool>,
    pub error: Option<String>,
    /// `running`, `queued` (`--emit-outbox`: waiting for its deliveries), `succeeded`,
    /// `failed`, `died` (its process is gone: it no longer holds the rebuild lock), or
    /// `unknown` (unfinished, read on a standby, which cannot see the primary's locks).
    pub state: String,
    /// For a run that died: the command that does its work again.
    pub rerun: Option<String>,
    /// For a run through the outbox (`--emit-outbox`): when its deliveries were queued,
    /// and where they stand. The run is finished when none is waiting any more.
    pub deliveries: Option<RunDeliveries>,
}

/// The deliveries a rebuild through the outbox queued, by where they stand now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunDeliveries {
    pub queued_at: DateTime<Utc>,
    pub queued: i64,
    pub done: i64,
    pub failed: i64,
    /// Pending or processing: not projected yet.
    pub waiting: i64,
}

/// `chronicle status`: its JSON form is this struct (keys documented in docs/operations.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub outbox: OutboxCounts,
    pub failed_by_reason: Vec<FailedReason>,
    pub events: i64,
    pub entries: i64,
    pub events_without_entry: i64,
    /// Whether `events`, `entries`, `outbox.done` and `events_without_entry` were counted
    /// or estimated (see [`CountMode`]).
    pub counts: Counts,
    pub last_rebuild: Option<RebuildRun>,
    /// Set when the server read is a standby (a read replica): how far behind it is.
    pub standby: Option<Standby>,
    /// What holds back the vacuum horizon, and the outbox's dead rows (null when this
    /// role may not read the views it comes from).
    pub horizon: Option<crate::outbox::horizon::Horizon>,
    /// Whether the horizon is held back past `horizon::WARN_AFTER_SECONDS` (the text
    /// output then prints a warning).
    pub horizon_held_back: bool,
}

/// How `status` arrived at its figures for the large tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Counts {
    /// Counted in the snapshot: `events_without_entry` includes events lost without a
    /// delivery.
    Exact,
    /// `events`, `entries` and `outbox.done` from the planner's statistics (a table without
    /// statistics is still counted); `events_without_entry` counts the events that have a
    /// pending, processing or failed delivery and no entry, exactly. The live outbox states,
    /// the stuck rows and the failures are exact in both.
    Estimated,
}

/// What `status` is asked for: exact counts, estimates, or whichever fits the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CountMode {
    /// Exact while the events table holds at most [`EXACT_COUNTS_UP_TO`] rows by the
    /// planner's estimate (or has no statistics yet), estimated beyond.
    #[default]
    Auto,
    Exact,
    Estimated,
}

/// In [`CountMode::Auto`], the largest events table (rows, by the planner's estimate)
/// that `status` still counts exactly: counting reads the events, the entries and the
/// whole outbox, a cost that grows with the tables (BENCHMARKS.md, *scale*).
pub const EXACT_COUNTS_UP_TO: i64 = 500_000;

/// How far a standby's copy is behind, as the standby knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Standby {
    /// Seconds since the commit of the last transaction it replayed (null before the
    /// first). While the primary is idle this grows without the standby being behind.
    pub replay_lag_seconds: Option<f64>,
    /// WAL received but not replayed yet, in bytes (null when it streams nothing).
    pub replay_lag_bytes: Option<i64>,
}

/// On a standby: its replay lag in seconds and bytes; no row on a primary.
pub const STATUS_STANDBY: &str = "
    SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8,
           pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint
    WHERE pg_is_in_recovery()";

/// The `done` rows, counted: a scan of the whole outbox, which only an exact status pays
/// for. The other states come from `outbox::SAMPLE_GAUGES`, through the partial indexes.
pub const STATUS_OUTBOX_DONE: &str = "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done'";

/// The read model against its source, exactly: events, entries, and events that have no
/// entry. Reads both tables whole.
pub const STATUS_READ_MODEL: &str = "
    SELECT (SELECT count(*) FROM chronicle_events),
           (SELECT count(*) FROM chronicle_entries),
           (SELECT count(*) FROM chronicle_events e
            WHERE NOT EXISTS (SELECT 1 FROM chronicle_entries n WHERE n.id = e.id))";

/// The planner's row estimate of each large table, as the planner itself makes it: the
/// `reltuples` of the last `ANALYZE` (or vacuum) scaled to the table's current size in
/// pages. Null where the server has no statistics yet (never analyzed, or analyzed empty
/// and written since): such a table is counted exactly. Reads the catalog only.
pub const STATUS_ESTIMATES: &str = "
    SELECT c.relname::text,
           CASE WHEN c.reltuples < 0 THEN NULL
                WHEN c.relpages = 0 THEN CASE WHEN pg_relation_size(c.oid) = 0 THEN 0 END
                ELSE round(c.reltuples / c.relpages
                           * (pg_relation_size(c.oid) / current_setting('block_size')::float8))::bigint
           END
    FROM pg_class c
    WHERE c.oid IN ('chronicle_events'::regclass, 'chronicle_entries'::regclass,
                    'chronicle_outbox_events'::regclass)";

/// Events without an entry among those with a pending, processing or failed delivery:
/// exact, and cheap while the backlog is small (each state through its partial index,
/// each event through the entries' primary key). An event lost without such a delivery
/// is not among them: `chronicle verify` finds those.
pub const STATUS_UNDELIVERED_WITHOUT_ENTRY: &str = "
    SELECT count(DISTINCT o.event_id)
    FROM (SELECT event_id FROM chronicle_outbox_events WHERE status = 'pending'
          UNION ALL
          SELECT event_id FROM chronicle_outbox_events WHERE status = 'processing'
          UNION ALL
          SELECT event_id FROM chronicle_outbox_events WHERE status = 'failed') o
    WHERE NOT EXISTS (SELECT 1 FROM chronicle_entries n WHERE n.id = o.event_id)";

/// Failing events by reason, most frequent first, each with the event of its latest
/// failure. An event counts once, under the reason of its current failed delivery
/// (`outbox::current_failure`); older failed deliveries of it are history (served by the
/// partial index on failed rows, one lookup of the event's deliveries per failed row).
pub const STATUS_FAILED_BY_REASON: &str = concat!(
    "
    WITH failing AS (
        SELECT DISTINCT ON (f.event_id) f.event_id, f.error_reason, f.updated_at, f.id
        FROM chronicle_outbox_events f
        WHERE ",
    crate::outbox::current_failure!("f"),
    "
        ORDER BY f.event_id, f.id DESC
    )
    SELECT r.error_reason, r.n,
           (SELECT x.event_id FROM failing x WHERE x.error_reason IS NOT DISTINCT FROM r.error_reason
            ORDER BY x.updated_at DESC, x.id DESC LIMIT 1)
    FROM (SELECT error_reason, count(*) AS n FROM failing GROUP BY error_reason) r
    ORDER BY r.n DESC, r.error_reason"
);

/// The latest rebuild run (running or finished), with its state (`$1`: the rebuild
/// lock's key, see `rebuild::RUN_STATE`).
pub const STATUS_LAST_REBUILD: &str = concat!(
    "
    SELECT r.id, r.mode, r.library_id, r.started_at, r.finished_at, r.events_total, r.rows_written, r.failures,
           r.failures_by_reason, r.success, r.error, r.queued_at, r.deliveries_queued,
           d.done, d.failed, d.waiting, ",
    crate::rebuild::rebuild_run_state!(),
    "
    FROM chronicle_rebuild_runs r
    LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE o.status = 'done') AS done,
               count(*) FILTER (WHERE o.status = 'failed') AS failed,
               count(*) FILTER (WHERE o.status IN ('pending', 'processing')) AS waiting
        FROM chronicle_outbox_events o WHERE r.queued_at IS NOT NULL AND o.rebuild_run_id = r.id
    ) d ON true
    ORDER BY r.started_at DESC, r.id DESC
    LIMIT 1"
);

/// Reads the whole status in one snapshot.
/// One library that has events, for `chronicle libraries`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Library {
    pub library_id: Uuid,
    /// From the library's latest `LibraryCreated` or `LibraryRenamed` event, if any.
    pub name: Option<String>,
    pub events: i64,
    pub entries: i64,
    pub newest_event_at: DateTime<Utc>,
}

/// Libraries by their newest event, most recent first. Both counts come from the
/// library-leading indexes; the name from the library's own naming events.
const LIBRARIES: &str = "
    WITH ev AS (
        SELECT library_id, count(*) AS events, max(occurred_at) AS newest
        FROM chronicle_events GROUP BY library_id
        ORDER BY newest DESC, library_id LIMIT $1
    )
    SELECT ev.library_id,
           (SELECT coalesce(e.after->>'name', e.before->>'name')
            FROM chronicle_events e
            WHERE e.library_id = ev.library_id AND e.event_type IN ('LibraryCreated', 'LibraryRenamed')
            ORDER BY e.occurred_at DESC, e.id DESC LIMIT 1),
           ev.events,
           (SELECT count(*) FROM chronicle_entries n WHERE n.library_id = ev.library_id),
           ev.newest
    FROM ev ORDER BY ev.newest DESC, ev.library_id";

pub fn libraries(client: &mut impl GenericClient, limit: u64) -> Result<Vec<Library>, postgres::Error> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    client
        .query(LIBRARIES, &[&limit])?
        .iter()
        .map(|r| {
            Ok(Library {
                library_id: r.try_get(0)?,
                name: r.try_get(1)?,
                events: r.try_get(2)?,
                entries: r.try_get(3)?,
                newest_event_at: r.try_get(4)?,
            })
        })
        .collect()
}

pub fn status(client: &mut Client, max_processing: Duration, mode: CountMode) -> Result<Status, postgres::Error> {
    let mut tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start()?;
    let live = crate::outbox::sample_gauges(&mut tx, max_processing, None)?;
    // Exact counts need no estimate, so not even the catalog read.
    let estimates = match mode {
        CountMode::Exact => std::collections::HashMap::new(),
        _ => tx
            .query(STATUS_ESTIMATES, &[])?
            .iter()
            .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, Option<i64>>(1)?)))
            .collect::<Result<std::collections::HashMap<_, _>, postgres::Error>>()?,
    };
    let estimate = |table: &str| estimates.get(table).copied().flatten();
    let counts = match mode {
        CountMode::Exact => Counts::Exact,
        CountMode::Estimated => Counts::Estimated,
        CountMode::Auto => match estimate("chronicle_events") {
            Some(n) if n > EXACT_COUNTS_UP_TO => Counts::Estimated,
            _ => Counts::Exact,
        },
    };
    let (done, events, entries, events_without_entry) = match counts {
        Counts::Exact => {
            let done: i64 = tx.query_one(STATUS_OUTBOX_DONE, &[])?.try_get(0)?;
            let r = tx.query_one(STATUS_READ_MODEL, &[])?;
            (done, r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)
        }
        Counts::Estimated => {
            let mut count = |table: &str, exact: &str| -> Result<i64, postgres::Error> {
                match estimate(table) {
                    Some(n) => Ok(n),
                    None => tx.query_one(exact, &[])?.try_get(0),
                }
            };
            let events = count("chronicle_events", "SELECT count(*) FROM chronicle_events")?;
            let entries = count("chronicle_entries", "SELECT count(*) FROM chronicle_entries")?;
            let done = match estimate("chronicle_outbox_events") {
                Some(n) => (n - live.pending - live.inflight - live.failed).max(0),
                None => tx.query_one(STATUS_OUTBOX_DONE, &[])?.try_get(0)?,
            };
            let without: i64 = tx.query_one(STATUS_UNDELIVERED_WITHOUT_ENTRY, &[])?.try_get(0)?;
            (done, events, entries, without)
        }
    };
    let outbox = OutboxCounts {
        pending: live.pending,
        processing: live.inflight,
        done,
        failed: live.failed,
        oldest_pending_age_seconds: live.oldest_pending_age_seconds,
        stuck: live.stuck,
    };
    let failed_by_reason = tx
        .query(STATUS_FAILED_BY_REASON, &[])?
        .iter()
        .map(|r| {
            Ok(FailedReason { error_reason: r.try_get(0)?, count: r.try_get(1)?, example_event_id: r.try_get(2)? })
        })
        .collect::<Result<Vec<_>, postgres::Error>>()?;
    let last_rebuild = match tx.query_opt(STATUS_LAST_REBUILD, &[&crate::rebuild::REBUILD_LOCK_KEY])? {
        None => None,
        Some(r) => Some(RebuildRun {
            state: r.try_get(16)?,
            rerun: match r.try_get::<_, String>(16)?.as_str() {
                "died" => Some(crate::rebuild::rerun_command(&r.try_get::<_, String>(1)?, r.try_get(2)?)),
                _ => None,
            },
            id: r.try_get(0)?,
            mode: r.try_get(1)?,
            library_id: r.try_get(2)?,
            started_at: r.try_get(3)?,
            finished_at: r.try_get(4)?,
            events_total: r.try_get(5)?,
            rows_written: r.try_get(6)?,
            failures: r.try_get(7)?,
            failures_by_reason: r.try_get(8)?,
            success: r.try_get(9)?,
            error: r.try_get(10)?,
            deliveries: match r.try_get::<_, Option<DateTime<Utc>>>(11)? {
                None => None,
                Some(queued_at) => Some(RunDeliveries {
                    queued_at,
                    queued: r.try_get::<_, Option<i64>>(12)?.unwrap_or(0),
                    done: r.try_get(13)?,
                    failed: r.try_get(14)?,
                    waiting: r.try_get(15)?,
                }),
            },
        }),
    };
    let standby = match tx.query_opt(STATUS_STANDBY, &[])? {
        None => None,
        Some(r) => Some(Standby { replay_lag_seconds: r.try_get(0)?, replay_lag_bytes: r.try_get(1)? }),
    };
    let horizon = status_horizon(&mut tx)?;
    let horizon_held_back = horizon.as_ref().is_some_and(crate::outbox::horizon::held_back);
    tx.commit()?;
    Ok(Status {
        outbox,
        failed_by_reason,
        events,
        entries,
        events_without_entry,
        counts,
        last_rebuild,
        standby,
        horizon,
        horizon_held_back,
    })
}

/// The vacuum horizon for `status`, in a savepoint: a role that may not read its views
/// gets none, and the rest of the status.
fn status_horizon(
    tx: &mut postgres::Transaction<'_>,
) -> Result<Option<crate::outbox::horizon::Horizon>, postgres::Error> {
    let mut sp = tx.transaction()?;
    match crate::outbox::horizon::sample_horizon(&mut sp) {
        Ok(h) => {
            sp.commit()?;
            Ok(Some(h))
        }
        Err(e) if e.code() == Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            sp.rollback()?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A row as (column, value) pairs in the table's column order, every column included
/// (read through `row_to_json`, so a column added later shows up without a code change).
pub type Columns = Vec<(String, Value)>;

/// `chronicle show`: an event, its deliveries and its entry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Shown {
    pub event: Option<Columns>,
    pub deliveries: Vec<Columns>,
    pub entry: Option<Columns>,
}

impl Shown {
    pub fn is_empty(&self) -> bool {
        self.event.is_none() && self.deliveries.is_empty() && self.entry.is_none()
    }
}

/// The event's columns ($1 the event id).
pub const SHOW_EVENT: &str = "
    SELECT 0::bigint, j.key, j.value
    FROM chronicle_events t, json_each(row_to_json(t)) WITH ORDINALITY AS j(key, value, n)
    WHERE t.id = $1
    ORDER BY j.n";

/// Every delivery of the event, oldest first.
pub const SHOW_DELIVERIES: &str = "
    SELECT t.id, j.key, j.value
    FROM chronicle_outbox_events t, json_each(row_to_json(t)) WITH ORDINALITY AS j(key, value, n)
    WHERE t.event_id = $1
    ORDER BY t.id, j.n";

/// The event's entry (entry id = event id).
pub const SHOW_ENTRY: &str = "
    SELECT 0::bigint, j.key, j.value
    FROM chronicle_entries t, json_each(row_to_json(t)) WITH ORDINALITY AS j(key, value, n)
    WHERE t.id = $1
    ORDER BY j.n";

/// Reads one event, its deliveries and its entry in one snapshot.
pub fn show(client: &mut Client, event_id: Uuid) -> Result<Shown, postgres::Error> {
    let mut tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start()?;
    let event = rows_as_columns(&mut tx, SHOW_EVENT, event_id)?.into_iter().next();
    let deliveries = rows_as_columns(&mut tx, SHOW_DELIVERIES, event_id)?;
    let entry = rows_as_columns(&mut tx, SHOW_ENTRY, event_id)?.into_iter().next();
    tx.commit()?;
    Ok(Shown { event, deliveries, entry })
}

/// Groups (row key, column, value) rows into one `Columns` per row key, in order.
fn rows_as_columns(client: &mut impl GenericClient, sql: &str, id: Uuid) -> Result<Vec<Columns>, postgres::Error> {
    let mut out: Vec<(i64, Columns)> = Vec::new();
    for r in client.query(sql, &[&id])? {
        let key: i64 = r.try_get(0)?;
        let pair = (r.try_get::<_, String>(1)?, r.try_get::<_, Value>(2)?);
        match out.last_mut() {
            Some((k, cols)) if *k == key => cols.push(pair),
            _ => out.push((key, vec![pair])),
        }
    }
    Ok(out.into_iter().map(|(_, cols)| cols).collect())
}

/// Columns as one JSON object (for `--json`).
pub fn columns_json(cols: &Columns) -> Value {
    Value::Object(cols.iter().cloned().collect())
}

/// A value for text output: strings bare, `null` as `null`, anything else as compact JSON.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Validates the `--by` / `--reason` of an audited operation: required and not blank,
/// both named when missing, so the audit trail always says who and why.
pub fn audit_fields(by: Option<String>, reason: Option<String>) -> Result<(String, String)> {
    let missing: Vec<&str> = [("--by", &by), ("--reason", &reason)]
        .iter()
        .filter(|(_, v)| v.as_deref().is_none_or(|s| s.trim().is_empty()))
        .map(|(n, _)| *n)
        .collect();
    match (by, reason) {
        (Some(by), Some(reason)) if missing.is_empty() => Ok((by, reason)),
        _ => Err(AppError::usage(format!(
            "{} {} required and must not be empty: the audit trail records who did this (--by) and why (--reason)",
            missing.join(" and "),
            if missing.len() == 1 { "is" } else { "are" }
        ))),
    }
}

/// Parses an event id given on the command line, naming the flag when it is not a UUID.
pub fn parse_event_id(flag: &str, v: &str) -> Result<Uuid> {
    Uuid::parse_str(v.trim()).map_err(|_| AppError::usage(format!("invalid {flag} {v:?}: not a UUID")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    #[test]
    fn audit_fields_name_what_is_missing() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(audit_fields(s("ana"), s("fixed")).unwrap(), ("ana".into(), "fixed".into()));
        for (by, reason, expect) in [
            (None, None, "--by and --reason are"),
            (s("ana"), None, "--reason is"),
            (None, s("x"), "--by is"),
            (s("  "), s("x"), "--by is"),
            (s("ana"), s(""), "--reason is"),
        ] {
            let e = audit_fields(by, reason).unwrap_err();
            assert_eq!(e.kind(), Kind::Usage);
            assert!(e.to_string().contains(expect), "{e}");
        }
    }

    #[test]
    fn event_ids_must_be_uuids() {
        assert!(parse_event_id("--event-id", "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e10").is_ok());
        let e = parse_event_id("--event-id", "42").unwrap_err();
        assert_eq!(e.kind(), Kind::Usage);
        assert!(e.to_string().contains("--event-id") && e.to_string().contains("\"42\""), "{e}");
    }

    #[test]
    fn text_values_are_bare_strings_or_json() {
        assert_eq!(value_text(&Value::from("a\"b")), "a\"b");
        assert_eq!(value_text(&Value::Null), "null");
        assert_eq!(value_text(&serde_json::json!({"title": "x"})), "{\"title\":\"x\"}");
    }
}
