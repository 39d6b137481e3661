//! Verifying the read model against the source of truth, and healing the drift found.
//!
//! Three kinds of drift, each one set-based statement over the whole scope:
//!
//! - **events without an entry**: the entry was lost (deleted by hand, a restore of an
//!   older backup of the read model, a bug);
//! - **entries without an event**: left over (an entry restored after an erasure, rows
//!   written by hand);
//! - **stale entries**: built by an older `projection_version` than this binary's;
//! - **differing entries**: of this binary's `projection_version`, but not what its event
//!   projects to now (a column changed by hand or by a migration, a restore that mixed
//!   tables). The content check (`check_content`) re-projects the events and compares the
//!   result with the stored entry column by column, in keyset batches (memory bounded
//!   by the batch, not by the table): over every entry, the entries of events since a
//!   time, or a random sample. `--fix` rewrites the differing entries with the normal
//!   upsert.
//!
//! An event whose delivery is live (`pending` or `processing`) is not drift: the worker
//! is about to write its entry, so it is counted as *in flight* and nothing else. An event
//! whose current delivery is `failed` is drift, counted with its kind, but also reported
//! apart: a new delivery would only fail the same way and bypass the replay's audit
//! trail, so `--fix` leaves it to `replay-failed` (after the cause is fixed).
//!
//! An event's *current* delivery is its live one if any, else its latest one.

use std::collections::HashSet;

use chrono::{DateTime, SecondsFormat, Utc};
use postgres::types::ToSql;
use postgres::{Client, GenericClient, IsolationLevel};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::entries::{self, CONTENT_COLUMNS};
use crate::event::{read_event, EVENT_COLUMNS};
use crate::outbox::{self, current_delivery, SizeLimits, EVENT_BYTES};
use crate::projection::{self, Entry, PROJECTION_VERSION};

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
    /// What the content check compared and found.
    pub content: Content,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.events_without_entry.all.count == 0
            && self.entries_without_event.count == 0
            && self.stale_entries.all.count == 0
            && self.content.differing.count == 0
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
            "differing_entries": self.content.differing_json(),
            "compared": self.content.compared_json(),
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
    /// Differing entries written again from their events (the content check's `--fix`).
    pub differing_rewritten: i64,
}

impl Fixed {
    fn to_json(&self) -> Value {
        json!({
            "missing_enqueued": self.missing_enqueued,
            "stale_enqueued": self.stale_enqueued,
            "orphans_deleted": self.orphans_deleted,
            "differing_rewritten": self.differing_rewritten,
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
        content: Content::default(),
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
    Ok(Fixed { missing_enqueued, stale_enqueued, orphans_deleted, differing_rewritten: 0 })
}

// ---------------------------------------------------------------------------------
// Content: each entry against its event's projection

/// Which entries the content check compares: those of this projection version whose
/// event is in the scope (the library of `check`, `since`), all of them or a random
/// `sample` of that many.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContentOptions {
    /// Only entries of events that occurred at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only this many entries, drawn at random from the scope.
    pub sample: Option<i64>,
    /// Rewrite the differing entries (the normal upsert) as they are found.
    pub fix: bool,
    /// Events read per batch (a batch also stops at `sizes.batch_max_bytes`).
    pub batch: i64,
    /// The worker's limits: an event over `max_event_bytes` is not read (not compared).
    pub sizes: SizeLimits,
}

impl Default for ContentOptions {
    fn default() -> Self {
        ContentOptions { since: None, sample: None, fix: false, batch: 1000, sizes: SizeLimits::default() }
    }
}

/// What the content check compared and found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Content {
    pub since: Option<DateTime<Utc>>,
    pub sample: Option<i64>,
    /// Entries compared with their event's projection, column by column.
    pub compared: i64,
    /// Entries of this version whose event this version cannot read or project now (a
    /// failed delivery's business): not compared.
    pub not_projectable: i64,
    /// Entries with at least one differing column.
    pub differing: Finding,
    /// Per column of `CONTENT_COLUMNS`, in that order: the entries where it differs.
    pub columns: Vec<(&'static str, Finding)>,
}

impl Content {
    fn new(opts: &ContentOptions) -> Content {
        Content {
            since: opts.since,
            sample: opts.sample,
            columns: CONTENT_COLUMNS.iter().map(|c| (*c, Finding::default())).collect(),
            ..Content::default()
        }
    }

    /// The differing columns with their counts and examples (only those that differ).
    pub fn differing_columns(&self) -> impl Iterator<Item = &(&'static str, Finding)> {
        self.columns.iter().filter(|(_, f)| f.count > 0)
    }

    /// Which entries were compared, in words: "all 1000 entries", "a random sample of
    /// 100 entries", "the 20 entries of events since …".
    pub fn scope_text(&self) -> String {
        let since = self.since.map(|t| format!(" of events since {}", t.to_rfc3339_opts(SecondsFormat::AutoSi, true)));
        let n = self.compared;
        let entries = if n == 1 { "entry" } else { "entries" };
        match (self.sample, since) {
            (Some(_), None) => format!("a random sample of {n} {entries}"),
            (Some(_), Some(since)) => format!("a random sample of {n} {entries}{since}"),
            (None, None) => format!("all {n} {entries}"),
            (None, Some(since)) => format!("the {n} {entries}{since}"),
        }
    }

    fn differing_json(&self) -> Value {
        let mut v = self.differing.to_json();
        let columns: Map<String, Value> = self.columns.iter().map(|(c, f)| (c.to_string(), f.to_json())).collect();
        v["columns"] = Value::Object(columns);
        v
    }

    fn compared_json(&self) -> Value {
        json!({
            "entries": self.compared,
            "scope": match self.sample { Some(_) => "sample", None if self.since.is_some() => "since", None => "all" },
            "since": self.since.map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            "sample": self.sample,
            "columns": CONTENT_COLUMNS,
            "not_projectable": self.not_projectable,
        })
    }

    fn record(&mut self, differing: &[entries::Differing]) {
        for d in differing {
            note(&mut self.differing, d.id);
            for (column, finding) in self.columns.iter_mut() {
                if d.columns.contains(column) {
                    note(finding, d.id);
                }
            }
        }
    }
}

fn note(f: &mut Finding, id: Uuid) {
    f.count += 1;
    if (f.examples.len() as i64) < MAX_EXAMPLES {
        f.examples.push(id);
    }
}

/// A batch of events in the scope of the content check whose entry is of projection
/// version `$3`, in keyset order: at most `$7` events, and once their text passes `$5`
/// bytes no more (at least one); an event over `$4` bytes is measured, not loaded. `$2`
/// since, `$6` only these ids (the sample's). Over every library the walk follows the
/// primary key (`$1`: the last id); in one library (`$8`) it follows the library's
/// `(occurred_at, id)` index (`$1`: the last time, as text, which holds any time the
/// table can, `$9`: the last id). Columns: id, the keyset time as text, the size, then
/// `EVENT_COLUMNS` (NULL for an event not loaded).
pub fn read_compared_events(by_library: bool) -> String {
    let (keyset, order) = if by_library {
        ("e.library_id = $8 AND (e.occurred_at, e.id) > ($1::text::timestamptz, $9::uuid)", ["occurred_at", "id"])
    } else {
        ("e.id > $1::text::uuid", ["id", "id"])
    };
    let (s_order, k_order) = (format!("s.{}, s.{}", order[0], order[1]), format!("k.{}, k.{}", order[0], order[1]));
    format!(
        "SELECT k.id, k.keyset_at, k.bytes, e.* FROM (
             SELECT s.id, s.occurred_at, s.occurred_at::text AS keyset_at, s.bytes,
                    coalesce(sum(CASE WHEN s.bytes <= $4::bigint THEN s.bytes ELSE 0 END)
                             OVER (ORDER BY {s_order} ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
             FROM (SELECT e.id, e.occurred_at, {EVENT_BYTES} AS bytes
                   FROM chronicle_events e
                   -- One lookup per event, in keyset order: a join would be planned as
                   -- a merge over the whole entries table, for every batch.
                   CROSS JOIN LATERAL (SELECT 1 FROM chronicle_entries n
                                       WHERE n.id = e.id AND n.projection_version = $3 LIMIT 1) n
                   WHERE {keyset}
                     AND ($2::timestamptz IS NULL OR e.occurred_at >= $2)
                     AND ($6::uuid[] IS NULL OR e.id = ANY($6))
                   ORDER BY e.{}, e.{} LIMIT $7) s
         ) k
         LEFT JOIN LATERAL (SELECT {EVENT_COLUMNS} FROM chronicle_events
                            WHERE id = k.id AND k.bytes <= $4::bigint) e ON true
         WHERE k.before < $5::bigint
         ORDER BY {k_order}",
        order[0], order[1]
    )
}

/// The sample: entries of this projection version (`$3`) whose event is in the scope
/// (`$1` library, `$2` since), `$4` of them in random order (read through a portal, a
/// chunk at a time).
pub const SAMPLE_IDS: &str = "
    SELECT e.id FROM chronicle_events e
    JOIN chronicle_entries n ON n.id = e.id AND n.projection_version = $3
    WHERE ($1::uuid IS NULL OR e.library_id = $1) AND ($2::timestamptz IS NULL OR e.occurred_at >= $2)
    ORDER BY random() LIMIT $4";

/// Locks the events of entries about to be rewritten, so none is erased before the
/// rewrite commits (an erasure's DELETE waits for it, then deletes the entry too); an
/// event already erased is not returned, and its entry not written back.
pub const LOCK_EVENTS_TO_REWRITE: &str = "SELECT id FROM chronicle_events WHERE id = ANY($1) FOR KEY SHARE";

/// Re-projects the events of the scope and compares each result with its stored entry,
/// column by column (`entries::compare_entries`), in batches. With `opts.fix`, each
/// batch's differing entries are rewritten before the next batch is read. Without it,
/// only reads: it may run on a replica. `sampler` is a second connection, which a sample
/// needs (its random order is read through a portal while `client` compares); without
/// one, the whole scope is compared, and the report says so.
pub fn check_content(
    client: &mut Client,
    sampler: Option<&mut Client>,
    library_id: Option<Uuid>,
    opts: &ContentOptions,
) -> Result<(Content, i64), postgres::Error> {
    let mut content = Content::new(opts);
    let mut rewritten = 0;
    let read = read_compared_events(library_id.is_some());
    match (opts.sample, sampler) {
        (Some(n), Some(sampler)) => {
            let mut tx = sampler.build_transaction().read_only(true).start()?;
            let portal = tx.bind(SAMPLE_IDS, &[&library_id, &opts.since, &PROJECTION_VERSION, &n])?;
            loop {
                let rows = tx.query_portal(&portal, opts.batch.clamp(1, i32::MAX as i64) as i32)?;
                if rows.is_empty() {
                    break;
                }
                let mut ids = rows.iter().map(|r| r.try_get(0)).collect::<Result<Vec<Uuid>, _>>()?;
                ids.sort();
                rewritten += walk(client, &read, library_id, Some(&ids), opts, &mut content)?;
            }
            tx.commit()?;
        }
        _ => {
            content.sample = None;
            rewritten += walk(client, &read, library_id, None, opts, &mut content)?;
        }
    }
    Ok((content, rewritten))
}

/// One keyset walk over the scope (restricted to `ids` if given); returns the entries
/// rewritten.
fn walk(
    client: &mut Client,
    read: &str,
    library_id: Option<Uuid>,
    ids: Option<&[Uuid]>,
    opts: &ContentOptions,
    content: &mut Content,
) -> Result<i64, postgres::Error> {
    let max_event = opts.sizes.max_event_bytes.min(i64::MAX as u64) as i64;
    let max_batch = opts.sizes.batch_max_bytes.clamp(1, i64::MAX as u64) as i64;
    let limit = opts.batch.max(1);
    // The keyset: the last (time as text, id); the first batch starts before any.
    let (mut after_at, mut after_id) = ("-infinity".to_string(), Uuid::nil());
    let mut rewritten = 0;
    loop {
        let after_text = after_id.to_string();
        let common: [&(dyn ToSql + Sync); 6] = [&opts.since, &PROJECTION_VERSION, &max_event, &max_batch, &ids, &limit];
        let rows = match library_id {
            Some(library) => {
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after_at];
                params.extend(common);
                params.extend([&library as &(dyn ToSql + Sync), &after_id]);
                client.query(read, &params)?
            }
            None => {
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after_text];
                params.extend(common);
                client.query(read, &params)?
            }
        };
        let Some(tail) = rows.last() else { return Ok(rewritten) };
        (after_at, after_id) = (tail.try_get(1)?, tail.try_get(0)?);
        let mut projected: Vec<Entry> = Vec::with_capacity(rows.len());
        for r in &rows {
            let bytes: i64 = r.try_get(2)?;
            if opts.sizes.too_large(bytes).is_some() {
                content.not_projectable += 1;
                continue;
            }
            match read_event(r, 3)?.ok().map(|ev| projection::project(&ev)) {
                Some(Ok(entry)) => projected.push(entry),
                _ => content.not_projectable += 1,
            }
        }
        drop(rows);
        let refs: Vec<&Entry> = projected.iter().collect();
        let differing = entries::compare_entries(client, &refs)?;
        content.compared += refs.len() as i64;
        content.record(&differing);
        if opts.fix && !differing.is_empty() {
            let ids: HashSet<Uuid> = differing.iter().map(|d| d.id).collect();
            let to_write: Vec<&Entry> = refs.iter().copied().filter(|e| ids.contains(&e.id)).collect();
            rewritten += rewrite(client, &to_write)?;
        }
    }
}

/// Writes `entries` again (the normal upsert), those whose event still exists, in one
/// transaction that keeps their events from being erased meanwhile.
fn rewrite(client: &mut Client, entries: &[&Entry]) -> Result<i64, postgres::Error> {
    let mut tx = client.transaction()?;
    let ids: Vec<Uuid> = entries.iter().map(|e| e.id).collect();
    let present = tx
        .query(LOCK_EVENTS_TO_REWRITE, &[&ids])?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<HashSet<Uuid>, _>>()?;
    let kept: Vec<&Entry> = entries.iter().copied().filter(|e| present.contains(&e.id)).collect();
    let written = entries::upsert_entries(&mut tx, &kept)?;
    tx.commit()?;
    Ok(written as i64)
}
