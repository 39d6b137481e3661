//! Rebuilding the read model from the source of truth (the runbook's
//! rebuild_chronicle_entries.py), with the projection the worker uses, so there is one
//! definition of what an entry is.
//!
//! Modes: re-project over the existing entries (upsert); `--truncate` first; enqueue one
//! delivery per event for the workers (`--emit-outbox`); or build a shadow table while the
//! old one keeps serving and swap the two in one short transaction (`--swap`).
//! Events written while a rebuild runs get their delivery from the enqueue trigger as
//! always, so the workers project them in every mode; `--swap` also catches up with
//! them itself before swapping, since the workers write to the table being replaced.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use postgres::{Client, GenericClient};
use uuid::Uuid;

use crate::db;
use crate::entries;
use crate::error::{AppError, Result};
use crate::event::{read_event, Event, Unreadable, EVENT_COLUMNS};
use crate::projection::{self, Entry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Re-project every event over the existing entries.
    Direct,
    /// Empty the entries (of the scope), then re-project.
    Truncate,
    /// Enqueue one delivery per event for the workers.
    EmitOutbox,
    /// Empty the entries, then enqueue.
    TruncateEmitOutbox,
    /// Build a shadow table and swap it in.
    Swap,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Truncate => "truncate",
            Mode::EmitOutbox => "emit-outbox",
            Mode::TruncateEmitOutbox => "truncate+emit-outbox",
            Mode::Swap => "swap",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    pub library_id: Option<Uuid>,
    pub batch_size: usize,
    pub started_by: String,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub run_id: i64,
    pub mode: &'static str,
    pub events_total: i64,
    /// Entries written, or deliveries enqueued with `--emit-outbox`.
    pub rows_written: u64,
    pub failures_by_reason: BTreeMap<String, u64>,
    /// `--swap`: how long the final transaction held the read model locked.
    pub swap_lock_held: Option<Duration>,
    pub seconds: f64,
}

impl Report {
    pub fn failures(&self) -> u64 {
        self.failures_by_reason.values().sum()
    }
}

/// Progress as the rebuild goes: events done of the total.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub elapsed: Duration,
}

/// Key of the advisory lock that keeps two rebuilds from running at once (and an erase
/// from running during a rebuild, which could write back an erased event's entry).
pub const REBUILD_LOCK_KEY: i64 = 0x6368_726f_6e72_6231;

const START_RUN: &str = "
    INSERT INTO chronicle_rebuild_runs (mode, library_id, started_by) VALUES ($1, $2, $3)
    RETURNING id";

const FINISH_RUN: &str = "
    UPDATE chronicle_rebuild_runs
    SET finished_at = now(), events_total = $2, rows_written = $3, failures = $4,
        failures_by_reason = $5, success = $6, error = $7
    WHERE id = $1";

const COUNT_EVENTS: &str =
    "SELECT count(*) FROM chronicle_events WHERE ($1::uuid IS NULL OR library_id = $1)";

const TRUNCATE_ENTRIES: &str = "TRUNCATE chronicle_entries";
const DELETE_LIBRARY_ENTRIES: &str = "DELETE FROM chronicle_entries WHERE library_id = $1";

/// One delivery per event of the scope, except events that already have a live one.
const ENQUEUE_EVENTS: &str = "
    WITH enqueued AS (
        INSERT INTO chronicle_outbox_events (event_id)
        SELECT id FROM chronicle_events
        WHERE ($1::uuid IS NULL OR library_id = $1)
        ORDER BY occurred_at, id
        ON CONFLICT (event_id) WHERE status IN ('pending', 'processing') DO NOTHING
        RETURNING 1
    )
    SELECT count(*) FROM enqueued";

/// Events that cannot be projected become failed deliveries, so `status` and
/// `replay-failed` see them; an event already failed for that reason is not doubled.
const RECORD_FAILED_DELIVERIES: &str = "
    INSERT INTO chronicle_outbox_events (event_id, status, error_reason, error)
    SELECT f.event_id, 'failed', f.reason, f.error
    FROM unnest($1::uuid[], $2::text[], $3::text[]) AS f(event_id, reason, error)
    WHERE NOT EXISTS (SELECT 1 FROM chronicle_outbox_events o
                      WHERE o.event_id = f.event_id AND o.status = 'failed'
                        AND o.error_reason = f.reason)";

/// Runs a rebuild. `progress` is called after every batch.
pub fn rebuild(client: &mut Client, opts: &Options, progress: &mut dyn FnMut(Progress)) -> Result<Report> {
    if opts.mode == Mode::Swap && opts.library_id.is_some() {
        return Err(AppError::usage("--swap rebuilds the whole read model; it cannot be combined with --library-id"));
    }
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&REBUILD_LOCK_KEY])
        .and_then(|r| r.try_get(0))
        .map_err(|e| AppError::db("while taking the rebuild lock", &e))?;
    if !locked {
        return Err(AppError::failed("another rebuild is running on this database; wait for it to finish"));
    }
    let result = run_locked(client, opts, progress);
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&REBUILD_LOCK_KEY]);
    result
}

fn run_locked(client: &mut Client, opts: &Options, progress: &mut dyn FnMut(Progress)) -> Result<Report> {
    let started = Instant::now();
    let run_id: i64 = client
        .query_one(START_RUN, &[&opts.mode.name(), &opts.library_id, &opts.started_by])
        .and_then(|r| r.try_get(0))
        .map_err(|e| AppError::db("while recording the rebuild run", &e))?;
    let mut report = Report { run_id, mode: opts.mode.name(), ..Default::default() };
    let outcome = run_mode(client, opts, &mut report, started, progress);
    report.seconds = started.elapsed().as_secs_f64();
    let error = outcome.as_ref().err().map(|e| e.to_string());
    let success = error.is_none() && report.failures() == 0;
    let by_reason = serde_json::to_value(&report.failures_by_reason).unwrap_or_default();
    let finish = client.execute(
        FINISH_RUN,
        &[&run_id, &report.events_total, &(report.rows_written as i64), &(report.failures() as i64), &by_reason, &success, &error],
    );
    if let Err(e) = finish {
        log::warn!("could not record the end of rebuild run {run_id}: {}", db::describe_error(&e));
    }
    outcome.map(|()| report)
}

fn run_mode(
    client: &mut Client,
    opts: &Options,
    report: &mut Report,
    started: Instant,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    report.events_total = client
        .query_one(COUNT_EVENTS, &[&opts.library_id])
        .and_then(|r| r.try_get(0))
        .map_err(|e| AppError::db("while counting events", &e))?;
    if matches!(opts.mode, Mode::Truncate | Mode::TruncateEmitOutbox) {
        let r = match opts.library_id {
            None => client.execute(TRUNCATE_ENTRIES, &[]),
            Some(lib) => client.execute(DELETE_LIBRARY_ENTRIES, &[&lib]),
        };
        r.map_err(|e| AppError::db("while emptying chronicle_entries", &e))?;
    }
    match opts.mode {
        Mode::EmitOutbox | Mode::TruncateEmitOutbox => {
            let n: i64 = client
                .query_one(ENQUEUE_EVENTS, &[&opts.library_id])
                .and_then(|r| r.try_get(0))
                .map_err(|e| AppError::db("while enqueueing deliveries", &e))?;
            let _ = client.execute("SELECT pg_notify('chronicle_outbox', '')", &[]);
            report.rows_written = n as u64;
            progress(Progress { done: report.events_total as u64, total: report.events_total as u64, elapsed: started.elapsed() });
            Ok(())
        }
        Mode::Direct | Mode::Truncate => {
            let total = report.events_total as u64;
            let mut done = 0u64;
            scan_events(client, opts.library_id, opts.batch_size, &mut |c, batch| {
                let written = project_and_write(c, batch, entries::UPSERT_ENTRIES, &mut report.failures_by_reason)?;
                report.rows_written += written;
                done += batch.len() as u64;
                progress(Progress { done, total, elapsed: started.elapsed() });
                Ok(())
            })
        }
        Mode::Swap => swap::run(client, opts, report, started, progress),
    }
}

/// A batch of events as read: each one readable, or not (it then fails alone).
type EventBatch = [Result<Event, Unreadable>];

/// Walks the events of the scope in batches (keyset on the primary key, or on the
/// library's `(occurred_at, id)` index), calling `f` with each batch.
fn scan_events(
    client: &mut Client,
    library: Option<Uuid>,
    batch: usize,
    f: &mut dyn FnMut(&mut Client, &EventBatch) -> Result<()>,
) -> Result<()> {
    // The keyset time travels as text: an event may hold a time chrono cannot
    // (`infinity`), and the walk must go past it.
    let by_id = format!("SELECT {EVENT_COLUMNS}, occurred_at::text AS keyset_at FROM chronicle_events WHERE id > $1 ORDER BY id LIMIT $2");
    let by_library = format!(
        "SELECT {EVENT_COLUMNS}, occurred_at::text AS keyset_at FROM chronicle_events
         WHERE library_id = $1 AND (occurred_at, id) > ($2::text::timestamptz, $3)
         ORDER BY occurred_at, id LIMIT $4"
    );
    let first_of_library = format!(
        "SELECT {EVENT_COLUMNS}, occurred_at::text AS keyset_at FROM chronicle_events WHERE library_id = $1
         ORDER BY occurred_at, id LIMIT $2"
    );
    let limit = batch as i64;
    let keyset_at = EVENT_COLUMNS.split(", ").count();
    let mut last: Option<(String, Uuid)> = None;
    loop {
        let rows = match (library, &last) {
            (None, _) => {
                let after = last.as_ref().map(|l| l.1).unwrap_or(Uuid::nil());
                client.query(&by_id, &[&after, &limit])
            }
            (Some(lib), Some((t, id))) => client.query(&by_library, &[&lib, t, id, &limit]),
            (Some(lib), None) => client.query(&first_of_library, &[&lib, &limit]),
        }
        .map_err(|e| AppError::db("while reading events", &e))?;
        let Some(tail) = rows.last() else { return Ok(()) };
        last = Some((
            tail.try_get(keyset_at).map_err(|e| AppError::db("while reading events", &e))?,
            tail.try_get(0).map_err(|e| AppError::db("while reading events", &e))?,
        ));
        let events = read_events(&rows)?;
        f(client, &events)?;
        if events.len() < batch {
            return Ok(());
        }
    }
}

/// Reads a batch of event rows (selected with `EVENT_COLUMNS` first).
fn read_events(rows: &[postgres::Row]) -> Result<Vec<Result<Event, Unreadable>>> {
    rows.iter()
        .map(|r| read_event(r, 0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AppError::db("while reading events", &e))
}

/// Projects a batch and writes it with `statement`; failures are recorded as failed
/// deliveries and counted by reason. Returns the entries written.
fn project_and_write(
    client: &mut impl GenericClient,
    events: &EventBatch,
    statement: &str,
    failures: &mut BTreeMap<String, u64>,
) -> Result<u64> {
    let mut ok: Vec<Entry> = Vec::with_capacity(events.len());
    let (mut ids, mut reasons, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for ev in events {
        let (id, reason, error) = match ev.as_ref().map(|ev| (ev.id, projection::project(ev))) {
            Ok((_, Ok(entry))) => {
                ok.push(entry);
                continue;
            }
            Ok((id, Err(e))) => (id, e.error_reason(), e.to_string()),
            Err(unreadable) => (unreadable.id, "invalid_payload", unreadable.message()),
        };
        *failures.entry(reason.to_string()).or_default() += 1;
        ids.push(id);
        reasons.push(reason);
        errors.push(error);
    }
    let refs: Vec<&Entry> = ok.iter().collect();
    // In its own transaction (a savepoint inside the swap's), so a refused batch leaves
    // nothing behind and the caller's transaction usable.
    let batch = client.transaction().and_then(|mut tx| {
        let n = entries::write_entries(&mut tx, statement, &refs)?;
        tx.commit()?;
        Ok(n)
    });
    let written = match batch {
        Ok(n) => n,
        Err(e) if !db::is_transient(&e) => {
            // One entry the read model refuses must not stop the rebuild: write them one
            // by one and record the refused ones.
            let mut n = 0;
            for entry in &refs {
                let mut tx = client.transaction().map_err(|e| AppError::db("while isolating a refused entry", &e))?;
                match entries::write_entries(&mut tx, statement, &[entry]) {
                    Ok(w) => {
                        tx.commit().map_err(|e| AppError::db("while writing entries", &e))?;
                        n += w;
                    }
                    Err(e) if !db::is_transient(&e) => {
                        drop(tx);
                        *failures.entry("rejected_by_read_model".to_string()).or_default() += 1;
                        ids.push(entry.id);
                        reasons.push("rejected_by_read_model");
                        errors.push(format!("the read model refused the entry: {}", db::describe_error(&e)));
                    }
                    Err(e) => return Err(AppError::db("while writing entries", &e)),
                }
            }
            n
        }
        Err(e) => return Err(AppError::db("while writing entries", &e)),
    };
    if !ids.is_empty() {
        client
            .execute(RECORD_FAILED_DELIVERIES, &[&ids, &reasons, &errors])
            .map_err(|e| AppError::db("while recording failed deliveries", &e))?;
    }
    Ok(written)
}

mod swap;

/// The last finished rebuild runs newer than `after_id`: (id, duration seconds, finished
/// at, success), for the worker's metrics.
pub const SELECT_FINISHED_RUNS: &str = "
    SELECT id, extract(epoch FROM finished_at - started_at)::float8,
           extract(epoch FROM finished_at)::float8, coalesce(success, false)
    FROM chronicle_rebuild_runs
    WHERE finished_at IS NOT NULL AND id > $1
    ORDER BY id";

#[derive(Debug, Clone, Copy)]
pub struct FinishedRun {
    pub id: i64,
    pub seconds: f64,
    pub finished_at: f64,
    pub success: bool,
}

pub fn finished_runs_after(client: &mut impl GenericClient, after_id: i64) -> Result<Vec<FinishedRun>, postgres::Error> {
    client
        .query(SELECT_FINISHED_RUNS, &[&after_id])?
        .iter()
        .map(|r| Ok(FinishedRun { id: r.try_get(0)?, seconds: r.try_get(1)?, finished_at: r.try_get(2)?, success: r.try_get(3)? }))
        .collect()
}
