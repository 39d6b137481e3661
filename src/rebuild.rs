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
//!
//! The modes that write entries load them through a pipeline: this connection reads the
//! events in batches (keyset scan) and hands each batch to exactly one of `writers`
//! threads, each with its own connection, which projects it and writes it in its own
//! transaction while the next batches are read. One writer means no threads: read,
//! project and write one after the other on this connection.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use postgres::{Client, GenericClient, ToStatement};
use uuid::Uuid;

use crate::config::DbUrl;
use crate::db;
use crate::entries;
use crate::error::{AppError, Result};
use crate::error_reason::ErrorReason;
use crate::event::{read_event, Event, Unreadable, EVENT_COLUMNS};
use crate::outbox::{self, SizeLimits, EVENT_BYTES};
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
    /// Threads projecting and writing entries, each on its own connection, while the
    /// main connection reads the next batches; 1: all on the main connection, in turn.
    pub writers: usize,
    /// Where the writers connect: the database of the main connection.
    pub database_url: DbUrl,
    pub started_by: String,
    /// The worker's limits: an event over `max_event_bytes` is never loaded (it is
    /// recorded as a failed delivery, `invalid_payload`), and a batch read stops adding
    /// events once their text passes `batch_max_bytes`.
    pub sizes: SizeLimits,
}

/// The most writer connections a rebuild opens (`--writers`).
pub const MAX_WRITERS: usize = 16;

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
    /// `--emit-outbox`: the run's deliveries, by how each event got its one delivery.
    pub queued: Option<Queued>,
    /// Failed deliveries closed (`done`) because this run wrote their event's entry.
    pub failures_resolved: u64,
    /// What this run found left by runs that died, and cleaned up (in words).
    pub cleaned_up: Vec<String>,
    /// The events this run could not project (`--swap` does not read them again when it
    /// catches up).
    pub failed_events: HashSet<Uuid>,
    pub seconds: f64,
}

/// The deliveries of an `--emit-outbox` run: one per event of the scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queued {
    /// New pending deliveries.
    pub new: u64,
    /// Failed deliveries sent back to pending (the event's current delivery had failed).
    pub replayed: u64,
    /// Pending or processing deliveries already there, now counted in the run.
    pub adopted: u64,
}

/// The events of a batch that could not be projected: counted by reason, and which.
#[derive(Debug, Default)]
pub(crate) struct Failures {
    by_reason: BTreeMap<String, u64>,
    events: Vec<Uuid>,
}

impl Report {
    /// Adds a batch's failures to the run's.
    pub(crate) fn absorb(&mut self, f: Failures) {
        for (reason, n) in f.by_reason {
            *self.failures_by_reason.entry(reason).or_default() += n;
        }
        self.failed_events.extend(f.events);
    }

    pub fn failures(&self) -> u64 {
        self.failures_by_reason.values().sum()
    }

    /// The run's verdict when events could not be projected: how many, why, and where
    /// they are; None when every event was.
    pub fn failure_message(&self) -> Option<String> {
        let n = self.failures();
        (n > 0).then(|| {
            format!(
                "{n} of {} event(s) could not be projected ({}); they have no entry from this run, and each keeps \
                 one delivery, failed (or still pending): chronicle status lists the failed ones, chronicle \
                 replay-failed sends them again once fixed",
                self.events_total,
                reasons_text(&self.failures_by_reason)
            )
        })
    }
}

/// `{"a": 2, "b": 1}` as `a 2, b 1`.
fn reasons_text(by_reason: &BTreeMap<String, u64>) -> String {
    by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect::<Vec<_>>().join(", ")
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

/// The run holds the rebuild lock in the session that records it (`backend_pid`) for as
/// long as it runs: that is how a run that died is told from one that runs.
const START_RUN: &str = "
    INSERT INTO chronicle_rebuild_runs (mode, library_id, started_by, backend_pid)
    VALUES ($1, $2, $3, pg_backend_pid())
    RETURNING id";

/// SQL true when the rebuild run `r` is still running: the session that recorded it
/// (`r.backend_pid`; any session for a run recorded before that column) still holds the
/// rebuild lock (`$1`) in this database. `pg_locks` shows a bigint advisory key as
/// (classid, objid), its high and low 32 bits, with objsubid 1. The session asking is left
/// out: a rebuild asks while holding the lock itself. Locks held by a database session end with it (its
/// process ended, lost its connection, or the server restarted).
macro_rules! rebuild_run_is_live {
    () => {
        "EXISTS (SELECT 1 FROM pg_locks l
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                   AND ((l.classid::bigint << 32) | l.objid::bigint) = $1::bigint
                   AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
                   AND l.pid <> pg_backend_pid()
                   AND (r.backend_pid IS NULL OR l.pid = r.backend_pid))"
    };
}

/// Marks the runs that died (unfinished, nothing queued, not running: see `rebuild_run_is_live`)
/// finished and not successful, their `error` starting with "died:". Returns each one's
/// id, mode and library. `$1`: the rebuild lock's key.
pub const MARK_DIED_RUNS: &str = concat!(
    "
    UPDATE chronicle_rebuild_runs r
    SET finished_at = now(), success = false,
        error = concat_ws('; ', 'died: its process ended, or lost its database session (a server \
                   restart), before the run finished; what it wrote stays written, what it did not was not done', r.error)
    WHERE r.finished_at IS NULL AND r.queued_at IS NULL AND NOT ",
    rebuild_run_is_live!(),
    "
    RETURNING r.id, r.mode, r.library_id"
);

/// The state of rebuild run `r` as `status` shows it: `succeeded`, `failed`, `died`,
/// `queued` (an `--emit-outbox` run waiting for its deliveries), `running`, or `unknown`
/// (unfinished, read on a standby, which cannot see the primary's locks). `$1`: the
/// rebuild lock's key.
macro_rules! rebuild_run_state {
    () => {
        concat!(
            "CASE WHEN r.finished_at IS NOT NULL THEN
              CASE WHEN r.success THEN 'succeeded' WHEN r.error LIKE 'died:%' THEN 'died' ELSE 'failed' END
          WHEN r.queued_at IS NOT NULL THEN 'queued'
          WHEN pg_is_in_recovery() THEN 'unknown'
          WHEN ",
            $crate::rebuild::rebuild_run_is_live!(),
            " THEN 'running'
          ELSE 'died' END"
        )
    };
}
pub(crate) use {rebuild_run_is_live, rebuild_run_state};

/// The tables a `--swap` that died leaves behind: its shadow (before the swap), or the
/// replaced read model (between the swap and its drop).
const SELECT_LEFTOVER_TABLES: &str = "
    SELECT t FROM unnest(ARRAY['chronicle_entries_rebuild', 'chronicle_entries_replaced']) t
    WHERE to_regclass(t) IS NOT NULL";

/// The command that does again what a run of `mode` (over `library`) set out to do.
pub fn rerun_command(mode: &str, library: Option<Uuid>) -> String {
    let flags = match mode {
        "truncate" => " --truncate",
        "emit-outbox" => " --emit-outbox",
        "truncate+emit-outbox" => " --truncate --emit-outbox",
        "swap" => " --swap",
        _ => "",
    };
    let scope = library.map(|l| format!(" --library-id {l}")).unwrap_or_default();
    format!("chronicle rebuild{flags}{scope}")
}

/// Under the rebuild lock, before a run starts: marks the runs that died (no rebuild can
/// be running but this one) and drops what a `--swap` that died left behind. Returns what
/// it did, in words.
fn clean_up_after_died_runs(client: &mut Client) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let died = client
        .query(MARK_DIED_RUNS, &[&REBUILD_LOCK_KEY])
        .map_err(|e| AppError::db("while marking the rebuild runs that died", e))?;
    for r in &died {
        let ctx = |e| AppError::db("while marking the rebuild runs that died", e);
        let (id, mode, library): (i64, String, Option<Uuid>) =
            (r.try_get(0).map_err(ctx)?, r.try_get(1).map_err(ctx)?, r.try_get(2).map_err(ctx)?);
        let what = match mode.as_str() {
            "direct" | "truncate" => "the read model it was rewriting may miss entries or hold stale ones",
            "swap" => "the read model serving stayed whole: the old one, or the new one if it had swapped",
            _ => "it had queued nothing",
        };
        done.push(format!(
            "rebuild run #{id} ({mode}) had died before it finished: marked died ({what}; its command: `{}`)",
            rerun_command(&mode, library)
        ));
    }
    let leftovers = client
        .query(SELECT_LEFTOVER_TABLES, &[])
        .map_err(|e| AppError::db("while looking for the tables of a --swap that died", e))?;
    for r in &leftovers {
        let table: String = r.try_get(0).map_err(|e| AppError::db("while looking for a --swap's tables", e))?;
        // A name from the fixed list above, never input.
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
            .map_err(|e| AppError::db(&format!("while dropping {table}, left by a --swap that died"), e))?;
        done.push(format!("dropped {table}, left behind by a --swap that died"));
    }
    for line in &done {
        log::warn!("rebuild: {line}");
    }
    Ok(done)
}

const FINISH_RUN: &str = "
    UPDATE chronicle_rebuild_runs
    SET finished_at = now(), events_total = $2, rows_written = $3, failures = $4,
        failures_by_reason = $5, success = $6, error = $7
    WHERE id = $1";

/// The end of an `--emit-outbox` run's own work: its deliveries are queued ($2 of them);
/// the run stays unfinished until they are done or failed (`finish_queued_runs`).
const RECORD_QUEUED: &str = "
    UPDATE chronicle_rebuild_runs
    SET queued_at = now(), events_total = $2, deliveries_queued = $3, rows_written = 0
    WHERE id = $1";

/// Closes the queued runs none of whose deliveries is pending or processing any more:
/// finished when the last one was, successful only when none failed (and so every event
/// it delivered has an entry: the run has one delivery per event of its scope, and a done
/// delivery wrote its entry); otherwise its `error` says how many failed, by reason: those
/// events have no entry from it. It reads no entry: the worker's gauge sampler runs it,
/// and must not wait on a lock of the read model (a `--swap`, a DDL). Runs held by
/// another worker's statement are left to it (SKIP LOCKED).
const FINISH_QUEUED_RUNS: &str = "
    WITH closing AS (
        SELECT r.id FROM chronicle_rebuild_runs r
        WHERE r.queued_at IS NOT NULL AND r.finished_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM chronicle_outbox_events o
                          WHERE o.rebuild_run_id = r.id AND o.status IN ('pending', 'processing'))
        FOR UPDATE SKIP LOCKED
    ), tally AS (
        SELECT o.rebuild_run_id AS id,
               count(*) FILTER (WHERE o.status = 'done') AS done,
               count(*) FILTER (WHERE o.status = 'failed') AS failed,
               count(*) AS deliveries,
               max(o.processed_at) AS last
        FROM chronicle_outbox_events o JOIN closing c ON o.rebuild_run_id = c.id
        GROUP BY 1
    ), reasons AS (
        SELECT id, jsonb_object_agg(error_reason, n) AS by_reason,
               string_agg(error_reason || ' ' || n, ', ' ORDER BY error_reason) AS text
        FROM (SELECT o.rebuild_run_id AS id, coalesce(o.error_reason, 'none') AS error_reason, count(*) AS n
              FROM chronicle_outbox_events o JOIN closing c ON o.rebuild_run_id = c.id
              WHERE o.status = 'failed' GROUP BY 1, 2) f
        GROUP BY id
    )
    UPDATE chronicle_rebuild_runs r
    SET finished_at = greatest(r.queued_at, coalesce(t.last, r.queued_at)),
        rows_written = coalesce(t.done, 0),
        failures = coalesce(t.failed, 0),
        failures_by_reason = coalesce(rs.by_reason, '{}'),
        success = coalesce(t.failed, 0) = 0 AND r.error IS NULL,
        error = concat_ws('; ', r.error,
            CASE WHEN t.failed > 0 THEN format(
                '%s of its %s deliveries failed (%s), so %s of the events it delivered have no entry from it: '
                'chronicle status lists them, chronicle replay-failed sends them again once fixed',
                t.failed, t.deliveries, rs.text, t.failed) END)
    FROM closing c LEFT JOIN tally t USING (id) LEFT JOIN reasons rs USING (id)
    WHERE r.id = c.id
    RETURNING r.id";

/// Closes the `--emit-outbox` runs whose deliveries are all done or failed (see
/// `FINISH_QUEUED_RUNS`); returns how many. The worker calls it as it samples its gauges.
/// It also marks the runs that died (`MARK_DIED_RUNS`), and counts them with the others.
pub fn finish_queued_runs(client: &mut impl GenericClient) -> Result<u64, postgres::Error> {
    let queued = client.query(FINISH_QUEUED_RUNS, &[])?.len() as u64;
    let died = client.query(MARK_DIED_RUNS, &[&REBUILD_LOCK_KEY])?;
    for r in &died {
        log::warn!(
            "rebuild run #{} had died before it finished (its session no longer holds the rebuild lock): marked died",
            r.try_get::<_, i64>(0)?
        );
    }
    Ok(queued + died.len() as u64)
}

const COUNT_EVENTS: &str = "SELECT count(*) FROM chronicle_events WHERE ($1::uuid IS NULL OR library_id = $1)";

const TRUNCATE_ENTRIES: &str = "TRUNCATE chronicle_entries";
const DELETE_LIBRARY_ENTRIES: &str = "DELETE FROM chronicle_entries WHERE library_id = $1";

/// Runs a rebuild. `progress` is called after every batch.
pub fn rebuild(client: &mut Client, opts: &Options, progress: &mut dyn FnMut(Progress)) -> Result<Report> {
    if opts.mode == Mode::Swap && opts.library_id.is_some() {
        return Err(AppError::usage("--swap rebuilds the whole read model; it cannot be combined with --library-id"));
    }
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&REBUILD_LOCK_KEY])
        .and_then(|r| r.try_get(0))
        .map_err(|e| AppError::db("while taking the rebuild lock", e))?;
    if !locked {
        return Err(AppError::failed("another rebuild is running on this database; wait for it to finish"));
    }
    let result = clean_up_after_died_runs(client).and_then(|cleaned| run_locked(client, opts, cleaned, progress));
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&REBUILD_LOCK_KEY]);
    result
}

fn run_locked(
    client: &mut Client,
    opts: &Options,
    cleaned_up: Vec<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report> {
    let started = Instant::now();
    let run_id: i64 = client
        .query_one(START_RUN, &[&opts.mode.name(), &opts.library_id, &opts.started_by])
        .and_then(|r| r.try_get(0))
        .map_err(|e| AppError::db("while recording the rebuild run", e))?;
    let mut report = Report { run_id, mode: opts.mode.name(), cleaned_up, ..Default::default() };
    let outcome = run_mode(client, opts, &mut report, started, progress);
    report.seconds = started.elapsed().as_secs_f64();
    let mut error = outcome.as_ref().err().map(|e| e.to_string());
    if error.is_none() && matches!(opts.mode, Mode::EmitOutbox | Mode::TruncateEmitOutbox) {
        // Recorded as queued with its deliveries: finished only when they are (the worker
        // closes the run).
        return outcome.map(|()| report);
    }
    // Entries written by this run close the failed deliveries of their events (also
    // after an error: what was written stays written).
    if !matches!(opts.mode, Mode::EmitOutbox | Mode::TruncateEmitOutbox) {
        let note = format!("closed by rebuild run #{run_id} ({}), which wrote the event's entry", opts.mode.name());
        let resolved = client.query_one(outbox::RESOLVE_FAILED_BY_REBUILD, &[&run_id, &opts.library_id, &note]);
        match resolved.and_then(|r| r.try_get::<_, i64>(0)) {
            Ok(n) => report.failures_resolved = n.max(0) as u64,
            Err(e) => log::warn!(
                "could not close the failed deliveries of the events rebuild run {run_id} projected: {}",
                db::describe_error(&e)
            ),
        }
    }
    let success = error.is_none() && report.failures() == 0;
    if error.is_none() {
        error = report.failure_message();
    }
    let by_reason = serde_json::to_value(&report.failures_by_reason).unwrap_or_default();
    let finish = client.execute(
        FINISH_RUN,
        &[
            &run_id,
            &report.events_total,
            &(report.rows_written as i64),
            &(report.failures() as i64),
            &by_reason,
            &success,
            &error,
        ],
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
        .map_err(|e| AppError::db("while counting events", e))?;
    if opts.mode == Mode::Truncate {
        // A run that dies from here on leaves the read model partly filled: it is marked
        // died, and running it again fills it.
        empty_entries(client, opts.library_id).map_err(|e| AppError::db("while emptying chronicle_entries", e))?;
        crate::failpoint::check("rebuild-after-truncate", None);
    }
    match opts.mode {
        Mode::EmitOutbox | Mode::TruncateEmitOutbox => {
            // It adopts the live deliveries, locking them, so it may meet a worker
            // completing some of them (a deadlock, a serialization failure): then it is
            // tried again, as a batch write is.
            let mut retries = 0;
            let queued = loop {
                let attempt = enqueue_once(client, opts, report);
                match attempt {
                    Err(e) if db::is_transient(&e) && !db::is_connection_error(&e) && retries < WRITE_RETRIES => {
                        retries += 1;
                        log::info!(
                            "rebuild: enqueueing the deliveries failed ({}); retry {retries} of {WRITE_RETRIES}",
                            db::describe_error(&e)
                        );
                        std::thread::sleep(Duration::from_millis(50 << retries));
                    }
                    other => break other.map_err(|e| AppError::db("while enqueueing deliveries", e))?,
                }
            };
            let _ = client.execute("SELECT pg_notify('chronicle_outbox', '')", &[]);
            report.rows_written = queued.new + queued.replayed + queued.adopted;
            report.queued = Some(queued);
            progress(Progress {
                done: report.events_total as u64,
                total: report.events_total as u64,
                elapsed: started.elapsed(),
            });
            Ok(())
        }
        Mode::Direct | Mode::Truncate => {
            load(client, opts, opts.library_id, entries::UPSERT_ENTRIES, report, started, progress)
        }
        Mode::Swap => swap::run(client, opts, report, started, progress),
    }
}

/// Empties the entries of the scope: the whole table, or one library's rows.
fn empty_entries(client: &mut impl GenericClient, library: Option<Uuid>) -> Result<u64, postgres::Error> {
    match library {
        None => client.execute(TRUNCATE_ENTRIES, &[]),
        Some(lib) => client.execute(DELETE_LIBRARY_ENTRIES, &[&lib]),
    }
}

/// An `--emit-outbox` run's work, in one transaction: one delivery per event of the scope,
/// then (`--truncate`) the entries emptied, and the run recorded as queued. A run that
/// dies before the commit did none of it (the read model is never left empty with nothing
/// queued to fill it); after, the workers do the rest.
fn enqueue_once(client: &mut Client, opts: &Options, report: &Report) -> Result<Queued, postgres::Error> {
    let why = format!("rebuild run #{} ({}) delivers every event again", report.run_id, opts.mode.name());
    let mut tx = client.transaction()?;
    let r = tx.query_one(outbox::ENQUEUE_FOR_REBUILD, &[&opts.library_id, &report.run_id, &opts.started_by, &why])?;
    let n = |i: usize| r.try_get::<_, i64>(i).map(|n| n.max(0) as u64);
    let queued = Queued { new: n(0)?, replayed: n(1)?, adopted: n(2)? };
    if opts.mode == Mode::TruncateEmitOutbox {
        // Last: the read model's lock is held from here to the commit only.
        empty_entries(&mut tx, opts.library_id)?;
    }
    let total = (queued.new + queued.replayed + queued.adopted) as i64;
    tx.execute(RECORD_QUEUED, &[&report.run_id, &report.events_total, &total])?;
    crate::failpoint::check("rebuild-enqueued", None);
    tx.commit()?;
    Ok(queued)
}

/// A batch of events as read: each one readable, or not (it then fails alone).
type EventBatch = [Result<Event, Unreadable>];
/// The same, owned: what the reader hands to a writer.
type Batch = Vec<Result<Event, Unreadable>>;

/// Projects every event of the scope and writes the entries with `statement`, counting
/// them and their failures in `report`; `progress` after every batch written.
fn load(
    client: &mut Client,
    opts: &Options,
    library: Option<Uuid>,
    statement: &str,
    report: &mut Report,
    started: Instant,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    // No more writers than batches to write (a small scope needs no extra connections).
    let batches = usize::try_from(report.events_total).unwrap_or(usize::MAX).div_ceil(opts.batch_size.max(1));
    let writers = opts.writers.min(batches);
    let mut tally = Tally { report, progress, started, done: 0, error: None };
    if writers > 1 {
        return load_in_parallel(client, opts, writers, library, statement, &mut tally);
    }
    let prepared = client.prepare(statement).map_err(|e| AppError::db("while preparing the entries' statement", e))?;
    scan_events(client, library, opts.batch_size, &opts.sizes, &mut |c, batch| {
        let mut failures = Failures::default();
        let rows = project_and_write(c, &batch, &prepared, &mut failures)?;
        tally.add(Written { events: batch.len() as u64, rows, failures });
        Ok(())
    })
}

/// What a writer did with one batch.
struct Written {
    events: u64,
    rows: u64,
    failures: Failures,
}

/// The load's results as they come back, into the report; the first writer error.
struct Tally<'a> {
    report: &'a mut Report,
    progress: &'a mut dyn FnMut(Progress),
    started: Instant,
    done: u64,
    error: Option<AppError>,
}

impl Tally<'_> {
    fn add(&mut self, w: Written) {
        self.report.rows_written += w.rows;
        self.report.absorb(w.failures);
        self.done += w.events;
        let total = self.report.events_total as u64;
        (self.progress)(Progress { done: self.done, total, elapsed: self.started.elapsed() });
        crate::failpoint::check("rebuild-batch", None);
    }

    fn take(&mut self, outcome: Result<Written>) {
        match outcome {
            Ok(w) => self.add(w),
            Err(e) if self.error.is_none() => self.error = Some(e),
            Err(e) => log::debug!("rebuild: another writer failed too: {e}"),
        }
    }
}

/// The pipeline: this connection reads batches and sends each one over a bounded
/// channel (so memory stays bounded) to whichever of the writers takes it first; each
/// writer projects it and writes it on its own connection. Results come back over a
/// second channel. The first error stops the reader and every writer (each finishes
/// the statement it is running), and is returned once all of them have stopped.
fn load_in_parallel(
    client: &mut Client,
    opts: &Options,
    n_writers: usize,
    library: Option<Uuid>,
    statement: &str,
    tally: &mut Tally<'_>,
) -> Result<()> {
    let mut writers = Vec::with_capacity(n_writers);
    for _ in 0..n_writers {
        let mut c = db::connect_for_command(&opts.database_url)?;
        let prepared =
            c.prepare(statement).map_err(|e| AppError::db("while preparing a rebuild writer's statement", e))?;
        writers.push((c, prepared));
    }
    log::debug!("rebuild: {} writer connections, batches of {}", writers.len(), opts.batch_size);
    let stop = AtomicBool::new(false);
    let (batch_tx, batch_rx) = mpsc::sync_channel::<Batch>(2 * n_writers);
    // Each writer holds the receiver: when the last one stops, the reader's send fails
    // instead of waiting for room forever.
    let batch_rx = Arc::new(Mutex::new(batch_rx));
    let (result_tx, result_rx) = mpsc::channel::<Result<Written>>();
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(writers.len());
        for (n, (c, prepared)) in writers.into_iter().enumerate() {
            let (batches, results, stop) = (Arc::clone(&batch_rx), result_tx.clone(), &stop);
            let spawned = std::thread::Builder::new()
                .name(format!("rebuild-writer-{n}"))
                .spawn_scoped(scope, move || write_batches(c, &prepared, &batches, &results, stop));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    tally.error =
                        Some(AppError::failed(format!("cannot start a rebuild writer thread: {e}")).caused_by(e));
                    break;
                }
            }
        }
        drop(batch_rx);
        drop(result_tx);

        let scanned = match tally.error.take() {
            Some(e) => Err(e),
            None => scan_events(client, library, opts.batch_size, &opts.sizes, &mut |_, batch| {
                for outcome in result_rx.try_iter() {
                    tally.take(outcome);
                }
                // A writer failed (its error is returned below) or every writer is gone.
                if tally.error.is_some() || stop.load(Ordering::SeqCst) || batch_tx.send(batch).is_err() {
                    return Err(AppError::failed("the rebuild's writers stopped"));
                }
                Ok(())
            }),
        };
        if scanned.is_err() {
            stop.store(true, Ordering::SeqCst);
        }
        // No more batches: the writers finish what is queued (or stop), then hang up.
        drop(batch_tx);
        for outcome in result_rx.iter() {
            tally.take(outcome);
        }
        let mut panicked = false;
        for h in handles {
            panicked |= h.join().is_err();
        }
        // A writer's error first: the reader may have stopped only because of it.
        if let Some(e) = tally.error.take() {
            return Err(e);
        }
        if panicked {
            return Err(AppError::failed("a rebuild writer thread panicked"));
        }
        scanned
    })
}

/// A writer: takes batches until there are no more or the rebuild stops, and sends back
/// what each one gave. Stops the rebuild on its first error.
fn write_batches(
    mut client: Client,
    statement: &postgres::Statement,
    batches: &Mutex<Receiver<Batch>>,
    results: &Sender<Result<Written>>,
    stop: &AtomicBool,
) {
    let _stop_on_panic = StopOnPanic(stop);
    while !stop.load(Ordering::SeqCst) {
        let next = batches.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(batch) = next else { return };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut failures = Failures::default();
        let outcome = project_and_write(&mut client, &batch, statement, &mut failures).map(|rows| Written {
            events: batch.len() as u64,
            rows,
            failures,
        });
        let failed = outcome.is_err();
        if failed {
            stop.store(true, Ordering::SeqCst);
        }
        if results.send(outcome).is_err() || failed {
            return;
        }
    }
}

/// Stops the rebuild if a writer panics, so the reader and the others do not go on.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Walks the events of the scope in batches (keyset on the primary key, or on the
/// library's `(occurred_at, id)` index), calling `f` with each batch.
fn scan_events(
    client: &mut Client,
    library: Option<Uuid>,
    batch: usize,
    sizes: &SizeLimits,
    f: &mut dyn FnMut(&mut Client, Batch) -> Result<()>,
) -> Result<()> {
    // The keyset time travels as text: an event may hold a time chrono cannot
    // (`infinity`), and the walk must go past it.
    let by_id = sized_scan("WHERE id > $1 ORDER BY id LIMIT $2", "id", "$3", "$4");
    let by_library = sized_scan(
        "WHERE library_id = $1 AND (occurred_at, id) > ($2::text::timestamptz, $3) ORDER BY occurred_at, id LIMIT $4",
        "occurred_at, id",
        "$5",
        "$6",
    );
    let first_of_library =
        sized_scan("WHERE library_id = $1 ORDER BY occurred_at, id LIMIT $2", "occurred_at, id", "$3", "$4");
    let limit = batch as i64;
    let max_event = sizes.max_event_bytes.min(i64::MAX as u64) as i64;
    let max_batch = sizes.batch_max_bytes.clamp(1, i64::MAX as u64) as i64;
    let mut last: Option<(String, Uuid)> = None;
    loop {
        let rows = match (library, &last) {
            (None, _) => {
                let after = last.as_ref().map(|l| l.1).unwrap_or(Uuid::nil());
                client.query(&by_id, &[&after, &limit, &max_event, &max_batch])
            }
            (Some(lib), Some((t, id))) => client.query(&by_library, &[&lib, t, id, &limit, &max_event, &max_batch]),
            (Some(lib), None) => client.query(&first_of_library, &[&lib, &limit, &max_event, &max_batch]),
        }
        .map_err(|e| AppError::db("while reading events", e))?;
        // A batch cut by its size is shorter than `batch`: only an empty one ends the walk.
        let Some(tail) = rows.last() else { return Ok(()) };
        last = Some((
            tail.try_get(1).map_err(|e| AppError::db("while reading events", e))?,
            tail.try_get(0).map_err(|e| AppError::db("while reading events", e))?,
        ));
        let events = read_events(&rows, sizes)?;
        f(client, events)?;
    }
}

/// A read of events in keyset order (`inner`: the filter, order and limit over
/// `chronicle_events`; `order`: its order's columns) that measures each event (as the
/// claim does), stops once the events' text passes `p_batch` bytes (at least one event),
/// and loads only the events of at most `p_max` bytes. Columns: id, the keyset time as
/// text, the size, then `EVENT_COLUMNS` (NULL for an event not loaded).
fn sized_scan(inner: &str, order: &str, p_max: &str, p_batch: &str) -> String {
    let order_s: Vec<String> = order.split(", ").map(|c| format!("s.{c}")).collect();
    let order_k: Vec<String> = order.split(", ").map(|c| format!("k.{c}")).collect();
    let (order_s, order_k) = (order_s.join(", "), order_k.join(", "));
    format!(
        "SELECT k.id, k.keyset_at, k.bytes, e.* FROM (
             SELECT s.id, s.occurred_at, s.occurred_at::text AS keyset_at, s.bytes,
                    coalesce(sum(CASE WHEN s.bytes <= {p_max}::bigint THEN s.bytes ELSE 0 END)
                             OVER (ORDER BY {order_s} ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
             FROM (SELECT e.id, e.occurred_at, {EVENT_BYTES} AS bytes FROM chronicle_events e {inner}) s
         ) k
         LEFT JOIN LATERAL (SELECT {EVENT_COLUMNS} FROM chronicle_events
                            WHERE id = k.id AND k.bytes <= {p_max}::bigint) e ON true
         WHERE k.before < {p_batch}::bigint
         ORDER BY {order_k}"
    )
}

/// Reads a batch of event rows (selected by `sized_scan`): an event over the size limit
/// is unreadable (it fails alone, recorded as a failed delivery).
fn read_events(rows: &[postgres::Row], sizes: &SizeLimits) -> Result<Batch> {
    let read = |r: &postgres::Row| -> Result<Result<Event, Unreadable>, postgres::Error> {
        let bytes: i64 = r.try_get(2)?;
        match sizes.too_large(bytes) {
            Some(error) => Ok(Err(Unreadable { id: r.try_get(0)?, error, too_large: true })),
            None => read_event(r, 3),
        }
    };
    rows.iter().map(read).collect::<Result<Vec<_>, _>>().map_err(|e| AppError::db("while reading events", e))
}

/// How often a batch write that failed with a transient error is tried again (after
/// 100, 200, 400 ms) before the rebuild fails.
const WRITE_RETRIES: u32 = 3;

/// Projects a batch and writes it with `statement`; failures are recorded as failed
/// deliveries and counted by reason. Returns the entries written.
fn project_and_write<S: ToStatement + ?Sized>(
    client: &mut impl GenericClient,
    events: &EventBatch,
    statement: &S,
    failures: &mut Failures,
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
            Err(unreadable) => (unreadable.id, ErrorReason::InvalidPayload, unreadable.message()),
        };
        *failures.by_reason.entry(reason.to_string()).or_default() += 1;
        ids.push(id);
        reasons.push(reason.as_str());
        errors.push(error);
    }
    let refs: Vec<&Entry> = ok.iter().collect();
    // In its own transaction (a savepoint inside the swap's), so a refused batch leaves
    // nothing behind and the caller's transaction usable.
    // A transient error (a deadlock with a worker writing the same new event's entry, a
    // serialization failure) is retried a few times before it fails the rebuild.
    let mut retries = 0;
    let batch = loop {
        let attempt = client.transaction().and_then(|mut tx| {
            let n = entries::write_entries(&mut tx, statement, &refs)?;
            tx.commit()?;
            Ok(n)
        });
        match attempt {
            Err(e) if db::is_transient(&e) && !db::is_connection_error(&e) && retries < WRITE_RETRIES => {
                retries += 1;
                log::info!(
                    "rebuild: writing a batch failed ({}); retry {retries} of {WRITE_RETRIES}",
                    db::describe_error(&e)
                );
                std::thread::sleep(Duration::from_millis(50 << retries));
            }
            other => break other,
        }
    };
    let written = match batch {
        Ok(n) => n,
        Err(e) if !db::is_transient(&e) => {
            // One entry the read model refuses must not stop the rebuild: write them one
            // by one and record the refused ones.
            let mut n = 0;
            for entry in &refs {
                let mut tx = client.transaction().map_err(|e| AppError::db("while isolating a refused entry", e))?;
                match entries::write_entries(&mut tx, statement, &[entry]) {
                    Ok(w) => {
                        tx.commit().map_err(|e| AppError::db("while writing entries", e))?;
                        n += w;
                    }
                    Err(e) if !db::is_transient(&e) => {
                        drop(tx);
                        let reason = ErrorReason::RejectedByReadModel;
                        *failures.by_reason.entry(reason.to_string()).or_default() += 1;
                        ids.push(entry.id);
                        reasons.push(reason.as_str());
                        errors.push(format!("the read model refused the entry: {}", db::describe_error(&e)));
                    }
                    Err(e) => return Err(AppError::db("while writing entries", e)),
                }
            }
            n
        }
        Err(e) => return Err(AppError::db("while writing entries", e)),
    };
    if !ids.is_empty() {
        client
            .execute(outbox::RECORD_FAILED_DELIVERIES, &[&ids, &reasons, &errors])
            .map_err(|e| AppError::db("while recording failed deliveries", e))?;
        failures.events.extend(ids);
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

pub fn finished_runs_after(
    client: &mut impl GenericClient,
    after_id: i64,
) -> Result<Vec<FinishedRun>, postgres::Error> {
    client
        .query(SELECT_FINISHED_RUNS, &[&after_id])?
        .iter()
        .map(|r| {
            Ok(FinishedRun {
                id: r.try_get(0)?,
                seconds: r.try_get(1)?,
                finished_at: r.try_get(2)?,
                success: r.try_get(3)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_with_failures_says_how_many_of_how_many_and_why() {
        let mut r = Report { events_total: 203, ..Default::default() };
        assert_eq!(r.failure_message(), None);
        r.failures_by_reason.insert("unknown_event_type".into(), 2);
        r.failures_by_reason.insert("invalid_payload".into(), 1);
        let m = r.failure_message().unwrap();
        assert!(
            m.starts_with("3 of 203 event(s) could not be projected (invalid_payload 1, unknown_event_type 2)"),
            "{m}"
        );
        assert!(m.contains("replay-failed"), "{m}");
    }
}
