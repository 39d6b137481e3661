//! One claim thread: claim a batch, project it, complete it in one transaction.
//!
//! The path of one event reads straight through `ClaimThread::run_once`: `claim`
//! (outbox) → `project` (pure) → `complete`: upsert entries + mark done (one transaction,
//! which in a backlog also claims the next batch) → count (metrics).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::{Client, Statement};
use uuid::Uuid;

use crate::db::{self, PauseReason};
use crate::entries;
use crate::error_reason::ErrorReason;
use crate::failpoint::{self, Hit};
use crate::metrics::Metrics;
use crate::outbox::{self, ClaimRequest, Claimed, Failure, SizeLimits};
use crate::projection::{self, Entry};
use crate::retry::{backoff, Jitter};

use super::{panics, pooled, read_model, Reconnect, Shared};

/// The steps a pause is met in (`Shared::pause`): a pause met in one ends when that step
/// succeeds again.
pub const CLAIMING: &str = "claiming";
pub const COMPLETING: &str = "completing";
pub const CHECKING: &str = "checking the read model";

/// What one turn did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    pub claimed: usize,
    pub done: u64,
    pub failed: u64,
    pub retried: u64,
    pub lease_lost: u64,
    pub released: u64,
    /// The lowest outbox id claimed (none when nothing was).
    pub lowest_id: Option<i64>,
    /// The floor the turn's claim started from (`ClaimRequest::floor`).
    pub from: i64,
    /// The batch met a fault of the system: the worker is paused and the rows were given
    /// back (or will be, `ClaimThread::unsettled`), none judged.
    pub paused: bool,
}

/// A claim this thread holds: its rows, held as they came, for its turn to project and
/// complete. Between turns, one committed by the transaction that completed the batch
/// before it (a backlog's next batch, `complete`), carried to the next turn.
pub struct Carried {
    token: Uuid,
    started: Instant,
    from: i64,
    rows: Vec<postgres::Row>,
}

/// Where a claim thread's next healthy claim starts (`ClaimRequest::floor`).
///
/// While the thread drains a backlog (its previous claim was a full batch), the next claim
/// starts at the lowest id of the previous one instead of walking again over every row
/// claimed since the last vacuum (`outbox::CLAIM_BATCH`). It starts from 0 again after a
/// claim that found less than a full batch (no backlog left above the floor, or a claim
/// cut by `OUTBOX_BATCH_MAX_BYTES`) and at least every `FULL_SCAN_EVERY`, so a row that
/// went back to `pending` below the floor is claimed within that time even while the
/// backlog lasts. A claim from a floor that finds nothing does not mean the outbox is
/// empty: the thread claims again from 0 at once (`may_be_empty`).
#[derive(Debug, Clone, Default)]
pub struct ClaimFloor {
    floor: i64,
    last_full_scan: Option<Instant>,
}

impl ClaimFloor {
    /// The longest a claim thread goes without a claim from the lowest id.
    pub const FULL_SCAN_EVERY: Duration = Duration::from_secs(1);

    /// The floor of the next claim, made at `now`.
    pub fn next(&self, now: Instant) -> i64 {
        match self.last_full_scan {
            Some(t) if now.saturating_duration_since(t) < Self::FULL_SCAN_EVERY => self.floor,
            _ => 0,
        }
    }

    /// Records a claim made at `now` from `floor` that took `claimed` rows, the lowest
    /// `lowest_id`, of a batch of `batch_size`.
    pub fn record(&mut self, floor: i64, claimed: usize, lowest_id: Option<i64>, batch_size: u32, now: Instant) {
        if floor == 0 {
            self.last_full_scan = Some(now);
        }
        self.floor = match lowest_id {
            Some(id) if is_full(claimed, batch_size) => id,
            _ => 0,
        };
    }

    /// Whether a claim from `floor` that took nothing shows that nothing is ready: only a
    /// claim from 0 does.
    pub fn may_be_empty(floor: i64) -> bool {
        floor == 0
    }
}

/// Whether a claim of `claimed` rows took a full batch: the sign of a backlog.
pub fn is_full(claimed: usize, batch_size: u32) -> bool {
    claimed >= batch_size as usize
}

/// The statements of the hot path, prepared once per connection: a batch then costs no
/// parse or plan and one round trip less per statement. The text of each is the named
/// statement in `outbox` / `entries`.
pub struct Prepared {
    /// `BEGIN` and `outbox::CLAIM_PLANNER_SETTINGS`, sent as one message before a claim.
    begin_claim: String,
    claim_batch: Statement,
    mark_done: Statement,
    /// Prepared at its first use, inside a completing transaction: preparing it needs a
    /// lock on the read model, and a read model locked by someone else must show up as a
    /// failed completion (retried with backoff), never as a worker that cannot claim.
    upsert_entries: Option<Statement>,
}

impl Prepared {
    pub fn new(conn: &mut Client) -> Result<Prepared, postgres::Error> {
        Ok(Prepared {
            begin_claim: format!("BEGIN; {}", outbox::CLAIM_PLANNER_SETTINGS),
            claim_batch: conn.prepare(&outbox::claim_batch_sql())?,
            mark_done: conn.prepare(outbox::MARK_DONE)?,
            upsert_entries: None,
        })
    }

    fn upsert_entries(&mut self, conn: &mut Client) -> Result<Statement, postgres::Error> {
        match &self.upsert_entries {
            Some(s) => Ok(s.clone()),
            None => {
                let s = conn.prepare(entries::UPSERT_ENTRIES)?;
                self.upsert_entries = Some(s.clone());
                Ok(s)
            }
        }
    }
}

/// The loop of one claim thread: a turn, then sleep when idle (woken by the listener).
///
/// On every connection it takes, the thread first compares the read model with what this
/// version writes (`read_model::differences`): a difference pauses the worker until a
/// check finds none. A fault of the system met by a turn (`db::PauseReason`) pauses it
/// too: the thread tries again after a backoff of up to `PAUSE_PROBE_MAX`, each try a
/// normal turn whose claim is given back while the fault lasts, and the first turn that
/// settles its batch (or, for a pause met while claiming, claims without error) resumes.
pub fn claim_loop(shared: &Shared, pool: &db::Pool, until_empty: bool) {
    let mut thread = ClaimThread::new(shared);
    let mut reconnect = Reconnect::new();
    let mut probe = Reconnect::new();
    while !shared.stopping() {
        let Some(mut conn) = pooled(shared, pool, "claim") else {
            reconnect.wait(shared);
            continue;
        };
        match read_model::differences(&mut *conn) {
            Ok(drift) if drift.is_empty() => {
                if shared.paused().is_some_and(|p| p.during == CHECKING) {
                    shared.resume();
                }
            }
            Ok(drift) => {
                let error =
                    format!("the read model chronicle_entries is not what this chronicle writes: {}", drift.join("; "));
                shared.pause(CHECKING, PauseReason::Schema, None, error);
                drop(conn);
                probe.wait(shared);
                continue;
            }
            Err(e) => {
                shared.db_error("while checking the read model", &e);
                drop(conn);
                reconnect.wait(shared);
                continue;
            }
        }
        let mut prepared = match Prepared::new(&mut conn) {
            Ok(p) => p,
            Err(e) => {
                match Pause::of(&e).filter(|p| !p.connection_lost) {
                    Some(p) => shared.pause(CLAIMING, p.reason, p.sqlstate, p.error),
                    None => shared.db_error("while preparing the claim statements", &e),
                }
                drop(conn);
                reconnect.wait(shared);
                continue;
            }
        };
        shared.register_cancel(conn.cancel_token());
        thread.connected();
        // Keep this connection while it works; a broken one goes back to the pool, which
        // discards it, and the next turn gets a fresh one.
        while !shared.stopping() {
            // Read before the claim, so a notification that arrives while it runs (for
            // rows committed just after its snapshot) ends the idle wait at once instead
            // of being missed until the next poll.
            let wakeups = shared.wakeups();
            failpoint::check("claim-loop", None);
            match thread.run_once(&mut conn, &mut prepared) {
                Ok(r) if r.paused => {
                    shared.db_ok(&mut *conn);
                    reconnect.reset();
                    probe.wait(shared);
                }
                Ok(r) => {
                    shared.db_ok(&mut *conn);
                    reconnect.reset();
                    if r.claimed > 0 {
                        probe.reset();
                        shared.resume();
                    } else if shared.paused().is_some_and(|p| p.during == CLAIMING) {
                        shared.resume();
                    }
                    if r.claimed == 0 && ClaimFloor::may_be_empty(r.from) {
                        if until_empty && super::settled_for_until_empty(shared, &mut *conn) {
                            return;
                        }
                        log::trace!("nothing ready to claim: idle for up to {:?}", shared.cfg.poll_interval);
                        shared.idle_wait_since(wakeups, shared.cfg.poll_interval);
                    }
                }
                Err(e) => match Pause::of(&e).filter(|p| !p.connection_lost && !conn.is_closed()) {
                    // Nothing was claimed (or what was is given back by a later turn): no
                    // attempt is spent.
                    Some(p) => {
                        Metrics::add(&shared.metrics.db_errors, 1);
                        shared.pause(CLAIMING, p.reason, p.sqlstate, p.error);
                        probe.wait(shared);
                    }
                    None => {
                        shared.db_error("while claiming a batch", &e);
                        if conn.is_closed() || db::is_connection_error(&e) {
                            break;
                        }
                        reconnect.wait(shared);
                    }
                },
            }
        }
        drop(conn);
        if !shared.stopping() {
            reconnect.wait(shared);
        }
    }
    // Stopping: a batch the last completion claimed is given back, on any connection, and
    // so are the rows of a pause not given back yet.
    if thread.carried.is_some() || thread.unsettled.is_some() {
        if let Some(mut conn) = pooled(shared, pool, "claim") {
            thread.release_carried(&mut conn);
            if let Some((token, ids)) = thread.unsettled.take() {
                release_on_shutdown(&mut conn, &ids, token);
            }
        }
    }
}

/// A fault of the system met by a batch (`db::PauseReason`): the worker pauses.
#[derive(Debug, Clone)]
struct Pause {
    reason: PauseReason,
    sqlstate: Option<String>,
    error: String,
    /// The error ended the connection (a server shutting down, `57P0x`): the rows are
    /// given back on the next one, and the worker reports the database unreachable rather
    /// than paused.
    connection_lost: bool,
}

impl Pause {
    fn of(e: &postgres::Error) -> Option<Pause> {
        db::pause_reason(e).map(|reason| Pause {
            reason,
            sqlstate: e.code().map(|c| c.code().to_string()),
            error: db::describe_error(e),
            connection_lost: db::is_connection_error(e),
        })
    }
}

/// How a completion ended.
enum Settle {
    /// Committed: the rows done or failed, and the next batch when it was chained.
    Done(Completed, Option<Vec<postgres::Row>>),
    /// A fault of the system: nothing committed, nothing judged.
    Pause(Pause),
    /// Any other database error: the rows are retried with backoff.
    Failed(postgres::Error),
}

/// One claim thread's state from turn to turn, and its turn (`run_once`) in three steps:
/// `claim`, `project`, `complete`.
pub struct ClaimThread<'a> {
    shared: &'a Shared,
    jitter: Jitter,
    /// Suspect rows (back from an expired lease) go first every other turn, and the first
    /// turn on a connection is a healthy one: a process restarted after a crash projects
    /// the healthy backlog before it tries a suspect again.
    suspects_first: bool,
    floor: ClaimFloor,
    /// A batch claimed by the last completion, kept across a reconnection: its rows are
    /// fenced on its token, not on a connection.
    carried: Option<Carried>,
    /// The rows (and claim token) of a batch a pause could not give back yet (the
    /// connection was lost, or the release failed too): given back before the next claim.
    /// Fenced on the token: rows reclaimed meanwhile are left alone.
    unsettled: Option<(Uuid, Vec<i64>)>,
}

impl<'a> ClaimThread<'a> {
    pub fn new(shared: &'a Shared) -> ClaimThread<'a> {
        ClaimThread {
            shared,
            jitter: Jitter::from_entropy(),
            suspects_first: false,
            floor: ClaimFloor::default(),
            carried: None,
            unsettled: None,
        }
    }

    /// A new connection: its first turn is a healthy one, from the lowest id.
    pub fn connected(&mut self) {
        self.suspects_first = false;
        self.floor = ClaimFloor::default();
    }

    /// One turn: claim up to a batch, project, complete. A database error before anything
    /// was claimed is returned; once rows are claimed, every outcome is handled here (done,
    /// failed, retried, released, or left for the reclaim loop if the connection is gone).
    pub fn run_once(&mut self, conn: &mut Client, prepared: &mut Prepared) -> Result<BatchReport, postgres::Error> {
        if let Some((token, ids)) = self.unsettled.take() {
            match outbox::release_claim(conn, &ids, token) {
                Ok(n) => log::debug!("gave back {n} row(s) of a paused batch"),
                Err(e) => {
                    self.unsettled = Some((token, ids));
                    return Err(e);
                }
            }
        }
        let Carried { token, started, from, rows } = self.claim(conn, prepared)?;
        let projected = match self.project(rows) {
            Ok(p) => p,
            Err(e) => {
                hold(self.shared, token, false);
                return Err(e);
            }
        };
        let mut report = BatchReport {
            claimed: projected.len(),
            lowest_id: projected.iter().map(|p| p.outbox_id).min(),
            from,
            ..Default::default()
        };
        self.suspects_first = !self.suspects_first;
        self.floor.record(from, report.claimed, report.lowest_id, self.shared.cfg.batch_size, Instant::now());
        if !projected.is_empty() {
            self.shared.note_claimed();
            if let Err(e) = self.complete(conn, prepared, token, projected, &mut report) {
                hold(self.shared, token, false);
                return Err(e);
            }
        }
        hold(self.shared, token, false);
        if report.claimed == 0 || report.paused {
            return Ok(report);
        }
        let m = &self.shared.metrics;
        Metrics::add(&m.processed, report.done);
        Metrics::add(&m.retry_scheduled, report.retried);
        Metrics::add(&m.lease_lost, report.lease_lost);
        if report.lease_lost > 0 {
            log::warn!(
                "lost the claim on {} row(s) (reclaimed by another worker); changed nothing for them",
                report.lease_lost
            );
        }
        m.batch_duration.observe(started.elapsed().as_secs_f64());
        self.shared.note_work(started);
        Ok(report)
    }

    /// The claim parameters of this thread's next claim.
    fn request(&self, token: Uuid, floor: i64) -> ClaimRequest<'a> {
        let cfg = &self.shared.cfg;
        ClaimRequest {
            limit: cfg.batch_size,
            worker_id: &cfg.worker_id,
            token,
            lease: cfg.lease,
            suspects_first: self.suspects_first,
            sizes: cfg.sizes,
            floor,
        }
    }

    /// Step 1: the batch of this turn, its token held for the lease keeper. The claim
    /// commits before any of its events is read, so its attempts count even if a
    /// projection takes the process down; its rows are held as they came (bounded by
    /// OUTBOX_BATCH_MAX_BYTES). A backlog's claims after the first are committed by the
    /// completion of the batch before them (`complete`), and carried here.
    fn claim(&mut self, conn: &mut Client, prepared: &Prepared) -> Result<Carried, postgres::Error> {
        if let Some(c) = self.carried.take() {
            return Ok(c);
        }
        let started = Instant::now();
        let token = Uuid::now_v7();
        let from = self.floor.next(started);
        if failpoint::check("claim", None) == Hit::Error {
            conn.batch_execute(failpoint::RAISE_TRANSIENT)?;
        }
        hold(self.shared, token, true);
        match claim_committed(conn, prepared, &self.request(token, from)) {
            Ok(rows) => Ok(Carried { token, started, from, rows }),
            Err(e) => {
                hold(self.shared, token, false);
                Err(e)
            }
        }
    }

    /// Step 2: each row is read, projected and dropped in turn: what stays in memory is
    /// the entries.
    fn project(&self, rows: Vec<postgres::Row>) -> Result<Vec<Projected>, postgres::Error> {
        let sizes = &self.shared.cfg.sizes;
        rows.into_iter().map(|r| Ok(project_one(outbox::read_claimed(&r, sizes)?, sizes))).collect()
    }

    /// Step 3: the entries written and the rows marked done or failed in one transaction
    /// (`complete`, or `complete_isolating` after a deterministic database error), which
    /// in a backlog also claims the next batch; after a transient error the rows are
    /// retried with backoff, or given back when the worker is stopping. Counts into
    /// `report`; an error is returned only when the rows could not be settled at all
    /// (the connection is gone: their lease expires and the reclaim loop returns them).
    fn complete(
        &mut self,
        conn: &mut Client,
        prepared: &mut Prepared,
        token: Uuid,
        projected: Vec<Projected>,
        report: &mut BatchReport,
    ) -> Result<(), postgres::Error> {
        let shared = self.shared;
        let cfg = &shared.cfg;
        let backlog = is_full(projected.len(), cfg.batch_size);
        // While a backlog lasts, the transaction that completes this batch claims the next
        // one: one commit per batch instead of two, and the next batch's attempts are still
        // committed before any of its events is projected.
        let next_token = Uuid::now_v7();
        let next_from = self.floor.next(Instant::now());
        let chain = (backlog && !shared.stopping()).then(|| self.request(next_token, next_from));
        if chain.is_some() {
            hold(shared, next_token, true);
        }
        let held: Vec<(i64, i32)> = projected.iter().map(|p| (p.outbox_id, p.attempts)).collect();
        let mut ok = Vec::with_capacity(projected.len());
        let mut failures = Vec::new();
        for p in projected {
            match p.result {
                Ok(entry) => ok.push((p.outbox_id, entry)),
                Err(f) => failures.push(f),
            }
        }
        let pause_code = shared.paused().and_then(|p| p.sqlstate);
        let settle = match complete(conn, prepared, &ok, &failures, token, backlog, chain.as_ref()) {
            Ok((c, next)) => Settle::Done(c, next),
            Err(e) => match Pause::of(&e) {
                Some(p) => Settle::Pause(p),
                None if db::is_transient(&e) => Settle::Failed(e),
                // A deterministic database error on the batch: find the entries the read
                // model refuses, one savepoint each, and fail only those, unless it
                // refuses them all alike (`refused_alike`).
                None => match complete_isolating(conn, &ok, &failures, token, pause_code.as_deref()) {
                    Ok(Isolated::Settled(c)) => Settle::Done(c, None),
                    Ok(Isolated::RefusedAlike(p)) => Settle::Pause(p),
                    Err(e) => Pause::of(&e).map_or(Settle::Failed(e), Settle::Pause),
                },
            },
        };
        let result = match settle {
            Settle::Done(c, next) => {
                match next {
                    Some(rows) if !rows.is_empty() => {
                        self.carried =
                            Some(Carried { token: next_token, started: Instant::now(), from: next_from, rows })
                    }
                    Some(_) => self.floor.record(next_from, 0, None, cfg.batch_size, Instant::now()),
                    None => {}
                }
                Ok(c)
            }
            Settle::Pause(p) => {
                // The chained claim rolled back with the completion: it holds nothing.
                if chain.is_some() {
                    hold(shared, next_token, false);
                }
                let ids: Vec<i64> = held.iter().map(|(id, _)| *id).collect();
                return self.pause_batch(conn, token, ids, p, report);
            }
            Settle::Failed(e) => Err(e),
        };
        if chain.is_some() && self.carried.is_none() {
            hold(shared, next_token, false);
        }
        match result {
            Ok(c) => {
                for seconds in &c.latencies {
                    shared.metrics.projection_latency.observe(*seconds);
                }
                report.done = c.done.len() as u64;
                report.failed = c.failed_reasons.len() as u64;
                for r in &c.failed_reasons {
                    shared.metrics.terminal_failure(*r);
                }
                for f in failures.iter().chain(&c.rejected) {
                    log::warn!("outbox row {} failed ({}): {}", f.outbox_id, f.error_reason, f.error);
                }
                report.lease_lost = (ok.len() + failures.len()) as u64 - report.done - report.failed;
            }
            Err(e) => {
                shared.db_error("while completing a batch", &e);
                let ids: Vec<i64> = held.iter().map(|(id, _)| *id).collect();
                if shared.stopping() {
                    // Interrupted by shutdown: the rows were not tried; give them back.
                    report.released = release_on_shutdown(conn, &ids, token);
                } else {
                    let delays: Vec<(i64, Duration)> = held
                        .iter()
                        .map(|&(id, attempts)| {
                            let jitter = self.jitter.next_f64();
                            (id, backoff(attempts.max(1) as u32, cfg.base_backoff, cfg.max_backoff, jitter))
                        })
                        .collect();
                    let msg = format!("transient: {}", db::describe_error(&e));
                    match outbox::schedule_retry(conn, &delays, cfg.max_attempts, &msg, token) {
                        Ok(o) => {
                            report.retried = o.retried;
                            report.failed = o.exhausted;
                            for _ in 0..o.exhausted {
                                shared.metrics.terminal_failure(ErrorReason::MaxAttemptsExceeded);
                            }
                            report.lease_lost = ids.len() as u64 - o.retried - o.exhausted;
                        }
                        Err(e2) => {
                            // The connection is gone too: the lease expires and the reclaim
                            // loop returns the rows, keeping their attempt.
                            log::debug!("could not schedule a retry: {}", db::describe_error(&e2));
                            return Err(e2);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A batch met a fault of the system (`Pause`): the worker pauses (unless the fault
    /// ended the connection: the database is then reported unreachable), and the rows are
    /// given back with their attempt (`outbox::release_claim`): no event is judged and no
    /// attempt spent. Rows that cannot be given back now are kept (`unsettled`) for the
    /// next turn; an error is returned only when the connection is gone.
    fn pause_batch(
        &mut self,
        conn: &mut Client,
        token: Uuid,
        ids: Vec<i64>,
        p: Pause,
        report: &mut BatchReport,
    ) -> Result<(), postgres::Error> {
        let shared = self.shared;
        Metrics::add(&shared.metrics.db_errors, 1);
        if !p.connection_lost {
            shared.pause(COMPLETING, p.reason, p.sqlstate, p.error);
            report.paused = true;
        }
        match outbox::release_claim(conn, &ids, token) {
            Ok(n) => {
                report.released = n;
                report.lease_lost = ids.len() as u64 - n;
                Ok(())
            }
            Err(e) => {
                log::debug!("could not give back a paused batch now: {}", db::describe_error(&e));
                self.unsettled = Some((token, ids));
                report.paused = true;
                if conn.is_closed() || db::is_connection_error(&e) {
                    return Err(e);
                }
                Ok(())
            }
        }
    }

    /// On shutdown: gives back a batch claimed by the last completion and not yet
    /// projected, with its attempt (`outbox::release_claim`); left to the reclaim loop if
    /// that fails.
    fn release_carried(&mut self, conn: &mut Client) {
        let Some(c) = self.carried.take() else { return };
        let ids: Vec<i64> = c.rows.iter().filter_map(|r| r.try_get::<_, i64>(0).ok()).collect();
        let n = release_on_shutdown(conn, &ids, c.token);
        log::debug!("released {n} claimed row(s) on shutdown");
        hold(self.shared, c.token, false);
    }
}

/// The claim in its own transaction, under the planner settings of the claim
/// (`outbox::CLAIM_PLANNER_SETTINGS`, which end with it).
fn claim_committed(
    conn: &mut Client,
    prepared: &Prepared,
    req: &ClaimRequest<'_>,
) -> Result<Vec<postgres::Row>, postgres::Error> {
    in_transaction(conn, &prepared.begin_claim, |c| outbox::claim_rows(c, &prepared.claim_batch, req))
}

/// Runs `body` in a transaction opened by `begin` (`BEGIN` and the transaction's `SET
/// LOCAL`s, sent as one message: no round trip of their own), committed when `body`
/// succeeds and rolled back when it fails or panics (`Open`).
fn in_transaction<T>(
    conn: &mut Client,
    begin: &str,
    body: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
) -> Result<T, postgres::Error> {
    conn.batch_execute(begin)?;
    let mut open = Open { conn, settled: false };
    let value = body(open.conn)?;
    // A failed COMMIT ends the transaction too: nothing is left to roll back.
    open.settled = true;
    open.conn.batch_execute("COMMIT")?;
    Ok(value)
}

/// A transaction opened by `in_transaction`, rolled back when dropped unsettled (its body
/// returned an error, or unwound from a panic), as `postgres::Transaction` is: the
/// connection never goes back to the pool inside an open transaction holding row locks.
struct Open<'c> {
    conn: &'c mut Client,
    settled: bool,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Err(e) = self.conn.batch_execute("ROLLBACK") {
            log::debug!("could not roll back a failed transaction: {}", db::describe_error(&e));
        }
    }
}

/// `outbox::release_claim` during shutdown, which cancels the claim threads' statements
/// until they have all finished: a cancel that lands on the release (or on the rollback
/// before it) is not a reason to leave the rows to the lease, so the release is tried
/// again, a few times, after a rollback of whatever the cancel left open.
/// Returns the rows released; a failure is logged and leaves them to the reclaim loop.
fn release_on_shutdown(conn: &mut Client, ids: &[i64], token: Uuid) -> u64 {
    let mut tries = 0;
    loop {
        match outbox::release_claim(conn, ids, token) {
            Err(e) if tries < 5 && !conn.is_closed() => {
                log::debug!("releasing rows on shutdown, again: {}", db::describe_error(&e));
                tries += 1;
                if let Err(e2) = conn.batch_execute("ROLLBACK") {
                    log::debug!("rollback before releasing again: {}", db::describe_error(&e2));
                }
            }
            Ok(n) => return n,
            Err(e) => {
                log::warn!("could not release rows on shutdown (the reclaim loop will): {}", db::describe_error(&e));
                return 0;
            }
        }
    }
}

fn hold(shared: &Shared, token: Uuid, held: bool) {
    if let Ok(mut h) = shared.held_claims.lock() {
        if held {
            h.insert(token);
        } else {
            h.remove(&token);
        }
    }
}

/// One claimed row, projected: its entry, or its deterministic failure.
struct Projected {
    outbox_id: i64,
    attempts: i32,
    result: Result<Entry, Failure>,
}

/// Projects one claimed row. Takes it, so its event is freed as soon as its entry exists.
fn project_one(c: Claimed, sizes: &SizeLimits) -> Projected {
    let fail = |error_reason: ErrorReason, error: String| Err(Failure { outbox_id: c.outbox_id, error_reason, error });
    let result = match (&c.event, c.bytes) {
        (_, None) => {
            fail(ErrorReason::InvalidPayload, format!("event {} does not exist in chronicle_events", c.event_id))
        }
        (None, Some(bytes)) => match sizes.too_large(bytes) {
            Some(message) => fail(ErrorReason::InvalidPayload, message),
            None => fail(ErrorReason::InvalidPayload, format!("event {} was not loaded", c.event_id)),
        },
        (Some(Err(unreadable)), _) => fail(ErrorReason::InvalidPayload, unreadable.message()),
        // A panic here is a bug met by this one event: it fails alone, its batch goes on.
        (Some(Ok(ev)), _) => {
            match panics::catch_projection(c.outbox_id, c.event_id, || match failpoint::check("project", Some(ev)) {
                Hit::Error => None,
                Hit::Pass => Some(projection::project(ev)),
            }) {
                Ok(None) => fail(ErrorReason::InvalidPayload, "fail point project: injected error".to_string()),
                Ok(Some(Ok(entry))) => Ok(entry),
                Ok(Some(Err(e))) => fail(e.error_reason(), e.to_string()),
                Err(message) => fail(ErrorReason::ProjectionPanicked, format!("the projection panicked: {message}")),
            }
        }
    };
    Projected { outbox_id: c.outbox_id, attempts: c.attempts, result }
}

/// What a completion committed.
struct Completed {
    /// The rows marked done (this claim still held them).
    done: HashSet<i64>,
    failed_reasons: Vec<ErrorReason>,
    /// Entries the read model refused (isolated path only).
    rejected: Vec<Failure>,
    /// Seconds from each done row's enqueueing to its completion (the latency histogram).
    latencies: Vec<f64>,
}

fn latencies(marked: &[outbox::Done]) -> Vec<f64> {
    marked.iter().map(|d| d.since_enqueued_seconds.max(0.0)).collect()
}

/// The normal completion, one transaction: mark done the rows this claim still holds
/// (locking them, so no reclaim can take them now), upsert their entries, mark the
/// deterministic failures failed; then, given a `chain` request, claim the next batch,
/// whose rows come back for the next turn. The search index's pending list is sized for
/// a `backlog` or for a trickle (`entries::search_pending_list`). With a chained claim
/// the transaction also takes the claim's planner settings (`CLAIM_PLANNER_SETTINGS`),
/// sent with its `BEGIN`: they decide only how statements are planned, and the
/// completion's statements are lookups by key and an insert from arrays either way.
fn complete(
    conn: &mut Client,
    prepared: &mut Prepared,
    ok: &[(i64, Entry)],
    failures: &[Failure],
    token: Uuid,
    backlog: bool,
    chain: Option<&ClaimRequest<'_>>,
) -> Result<(Completed, Option<Vec<postgres::Row>>), postgres::Error> {
    let mut begin = format!("BEGIN; {}", entries::search_pending_list(backlog));
    if chain.is_some() {
        begin = format!("{begin}; {}", outbox::CLAIM_PLANNER_SETTINGS);
    }
    in_transaction(conn, &begin, |tx| {
        if failpoint::check("complete", None) == Hit::Error {
            tx.batch_execute(failpoint::RAISE_TRANSIENT)?;
        }
        let ids: Vec<i64> = ok.iter().map(|(id, _)| *id).collect();
        let marked = outbox::mark_done_with(tx, &prepared.mark_done, &ids, token)?;
        let done: HashSet<i64> = marked.iter().map(|d| d.outbox_id).collect();
        let held: Vec<&Entry> = ok.iter().filter(|(id, _)| done.contains(id)).map(|(_, e)| e).collect();
        if !held.is_empty() {
            let upsert = prepared.upsert_entries(tx)?;
            entries::write_entries(tx, &upsert, &held)?;
        }
        let failed_reasons = outbox::mark_failed(tx, failures, token)?;
        let next = match chain {
            Some(req) => Some(outbox::claim_rows(tx, &prepared.claim_batch, req)?),
            None => None,
        };
        Ok((Completed { done, latencies: latencies(&marked), failed_reasons, rejected: Vec::new() }, next))
    })
}

/// What the isolating completion found.
enum Isolated {
    /// Committed: the entries written, those refused failed alone.
    Settled(Completed),
    /// Every entry was refused alike (`refused_alike`): nothing committed, the worker
    /// pauses.
    RefusedAlike(Pause),
}

/// The completion after a deterministic database error: the rows this claim still holds
/// are locked first (`outbox::lock_held`), so none is reclaimed before it is settled and
/// none lost meanwhile gets an entry; then each of their entries in its own savepoint:
/// those the read model refuses fail with `rejected_by_read_model`, the rest are done, and
/// the deterministic failures among them fail. The rows lost are left to their new holder.
/// When the read model refuses every entry alike (`refused_alike`), nothing is committed
/// and the worker pauses instead: the read model is at fault, not the events. Costs a
/// round trip per entry, only on this rare path.
fn complete_isolating(
    conn: &mut Client,
    ok: &[(i64, Entry)],
    failures: &[Failure],
    token: Uuid,
    paused_code: Option<&str>,
) -> Result<Isolated, postgres::Error> {
    let mut tx = conn.transaction()?;
    let claimed: Vec<i64> = ok.iter().map(|(id, _)| *id).chain(failures.iter().map(|f| f.outbox_id)).collect();
    let held = outbox::lock_held(&mut tx, &claimed, token)?;
    let mut written = Vec::new();
    let mut rejected = Vec::new();
    let mut refusals = Vec::new();
    for (id, entry) in ok.iter().filter(|(id, _)| held.contains(id)) {
        let mut sp = tx.savepoint("entry")?;
        match entries::upsert_entries(&mut sp, &[entry]) {
            Ok(_) => {
                sp.commit()?;
                written.push(*id);
            }
            Err(e) if !db::is_transient(&e) => {
                drop(sp);
                if let Some(code) = e.code() {
                    refusals.push(code.clone());
                }
                rejected.push(Failure {
                    outbox_id: *id,
                    error_reason: ErrorReason::RejectedByReadModel,
                    error: format!("the read model refused the entry: {}", db::describe_error(&e)),
                });
            }
            Err(e) => return Err(e),
        }
    }
    if written.is_empty() && refusals.len() == rejected.len() {
        if let Some(code) = refused_alike(&refusals, paused_code) {
            let first = rejected.first().map(|f| f.error.clone()).unwrap_or_default();
            let summary = format!("every entry of a batch of {} was refused alike: {first}", rejected.len());
            let drift = read_model::differences(&mut tx)?;
            let pause = if !drift.is_empty() {
                Some((PauseReason::Schema, format!("{summary}; the read model differs: {}", drift.join("; "))))
            } else if db::says_nothing_of_the_value(&code) || paused_code == Some(code.code()) {
                Some((PauseReason::Deterministic, summary))
            } else {
                None
            };
            if let Some((reason, error)) = pause {
                // Dropped unsettled: rolled back, nothing judged.
                drop(tx);
                let sqlstate = Some(code.code().to_string());
                return Ok(Isolated::RefusedAlike(Pause { reason, sqlstate, error, connection_lost: false }));
            }
        }
    }
    // Locked above: every row written is still held, and marked.
    let marked = outbox::mark_done(&mut tx, &written, token)?;
    let done: HashSet<i64> = marked.iter().map(|d| d.outbox_id).collect();
    let all_failures: Vec<Failure> =
        failures.iter().filter(|f| held.contains(&f.outbox_id)).chain(&rejected).cloned().collect();
    let failed_reasons = outbox::mark_failed(&mut tx, &all_failures, token)?;
    tx.commit()?;
    Ok(Isolated::Settled(Completed { done, latencies: latencies(&marked), failed_reasons, rejected }))
}

/// Whether the read model's refusals of every entry of a batch (`codes`, one per entry)
/// say that the system is at fault rather than the events: the same SQLSTATE for each of
/// more than one entry, or, for a batch of one, the SQLSTATE the worker is already paused
/// for (one entry alone cannot tell a bad event from a bad table; while paused for that
/// error, it tells nothing new). Returns that SQLSTATE. The caller then pauses when the
/// read model differs from what this version writes, or when the code judges no value
/// (`db::says_nothing_of_the_value`): a run of events that each carry a bad value (class
/// 22, 23) into a read model that is as this version expects fails one by one.
fn refused_alike(codes: &[SqlState], paused_code: Option<&str>) -> Option<SqlState> {
    let first = codes.first()?;
    if codes.iter().any(|c| c != first) {
        return None;
    }
    (codes.len() > 1 || paused_code == Some(first.code())).then(|| first.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_follows_full_claims_and_falls_back_to_zero() {
        let t0 = Instant::now();
        let mut f = ClaimFloor::default();
        assert_eq!(f.next(t0), 0, "the first claim looks everywhere");
        f.record(0, 50, Some(100), 50, t0);
        assert_eq!(f.next(t0), 100, "a full claim: the next starts at its lowest id");
        f.record(100, 50, Some(180), 50, t0);
        assert_eq!(f.next(t0 + Duration::from_millis(500)), 180);
        f.record(180, 49, Some(230), 50, t0);
        assert_eq!(f.next(t0), 0, "a claim short of a full batch: the next looks everywhere");
        f.record(0, 0, None, 50, t0);
        assert_eq!(f.next(t0), 0);
    }

    #[test]
    fn a_floor_is_dropped_at_least_once_a_second() {
        let t0 = Instant::now();
        let mut f = ClaimFloor::default();
        f.record(0, 50, Some(100), 50, t0);
        f.record(100, 50, Some(150), 50, t0 + Duration::from_millis(900));
        assert_eq!(f.next(t0 + Duration::from_millis(999)), 150);
        assert_eq!(f.next(t0 + ClaimFloor::FULL_SCAN_EVERY), 0, "a second since the last claim from 0");
        f.record(0, 50, Some(20), 50, t0 + ClaimFloor::FULL_SCAN_EVERY);
        assert_eq!(f.next(t0 + Duration::from_millis(1500)), 20, "the second counts from the last claim from 0");
    }

    #[test]
    fn a_batch_is_refused_alike_only_by_one_code_for_more_than_one_entry() {
        let code = |c: &str| SqlState::from_code(c);
        let alike = [code("42804"), code("42804"), code("42804")];
        assert_eq!(refused_alike(&alike, None), Some(code("42804")));
        assert_eq!(refused_alike(&[code("42804"), code("23514")], None), None, "two kinds: each entry's own");
        assert_eq!(refused_alike(&[code("22001")], None), None, "a batch of one cannot tell");
        assert_eq!(refused_alike(&[code("22001")], Some("22001")), Some(code("22001")), "paused for it already");
        assert_eq!(refused_alike(&[code("22001")], Some("42501")), None);
        assert_eq!(refused_alike(&[], None), None);
    }

    #[test]
    fn only_a_claim_from_zero_that_took_nothing_means_nothing_is_ready() {
        assert!(ClaimFloor::may_be_empty(0));
        assert!(!ClaimFloor::may_be_empty(7));
    }
}
