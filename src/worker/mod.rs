//! The projector worker: claim threads, the reclaim loop, the outbox's analyze, the lease
//! keeper, the gauge sampler, the rebuild runs' closing and the listener, started and
//! stopped together.
//!
//! Each background service has one job and is a `*_once` function inside a dumb loop
//! (River's shape): `reclaim_once`, `analyze_once`, `sample_gauges_once`,
//! `close_rebuild_runs_once` (its thread then samples the runs it may have closed,
//! `sample_rebuild_runs_once`), `prune_once`, `claim::run_once`. A test can run one turn
//! against a database without starting a worker (tests/worker.rs does for the reclaim
//! loop and the analyze). Database trouble never ends the process: every loop logs the
//! change of state once, waits with backoff and resumes by itself. Signals are the command's
//! business (`cmd/worker.rs`): it asks the worker to stop through `Shared`.

pub mod claim;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{CancelToken, GenericClient};
use uuid::Uuid;

use crate::config::WorkerConfig;
use crate::db::{self, migrate};
use crate::error::{AppError, Result};
use crate::error_reason::ErrorReason;
use crate::metrics::{http, Metrics};
use crate::outbox::{self, Analyze};

/// State shared by the threads of one worker process.
pub struct Shared {
    pub cfg: WorkerConfig,
    pub metrics: Arc<Metrics>,
    /// Set once: stop claiming, finish or release, exit.
    pub stop: AtomicBool,
    /// Bumped by the listener (and on stop) to wake idle claim threads at once.
    wake: (Mutex<u64>, Condvar),
    /// Claim tokens currently held by this process, for the lease keeper.
    pub held_claims: Mutex<HashSet<Uuid>>,
    /// Cancel tokens of the claim threads' connections, to interrupt them on shutdown.
    cancel_tokens: Mutex<Vec<CancelToken>>,
    /// Whether the database answers and has our schema (for /readyz).
    pub ready: Arc<AtomicBool>,
    /// Whether the database was last seen unreachable, so it is logged once per change.
    db_down: AtomicBool,
    /// The server (address and port) the database last answered from: a reconnection to
    /// another one (a failover to a standby of a multi-host URL) is logged as a switch.
    server: Mutex<Option<String>>,
    /// Refusals by the server (credentials, database name), reported at most once a minute.
    pub refusals: Arc<db::RefusalLog>,
    /// When the first batch that claimed rows started, and when the latest one ended: the
    /// time spent working, for the drain rate the exit line reports.
    work_span: Mutex<Option<(Instant, Instant)>>,
    /// Set once this role is known not to be allowed to analyze the outbox
    /// (`analyze_once` stops trying, having said so once).
    outbox_analyze_refused: AtomicBool,
    /// The channel only this process's listener listens on: shutdown notifies it, so the
    /// listener stops at once instead of at the end of its wait for notifications.
    stop_channel: String,
}

impl Shared {
    pub fn new(cfg: WorkerConfig) -> Arc<Shared> {
        let metrics = Arc::new(Metrics::new(&cfg.worker_id));
        Arc::new(Shared {
            cfg,
            metrics,
            stop: AtomicBool::new(false),
            wake: (Mutex::new(0), Condvar::new()),
            held_claims: Mutex::new(HashSet::new()),
            cancel_tokens: Mutex::new(Vec::new()),
            ready: Arc::new(AtomicBool::new(false)),
            db_down: AtomicBool::new(false),
            server: Mutex::new(None),
            refusals: Arc::new(db::RefusalLog::default()),
            work_span: Mutex::new(None),
            outbox_analyze_refused: AtomicBool::new(false),
            stop_channel: format!("chronicle_stop_{}", Uuid::now_v7().simple()),
        })
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    pub fn wake_all(&self) {
        if let Ok(mut g) = self.wake.0.lock() {
            *g = g.wrapping_add(1);
        }
        self.wake.1.notify_all();
    }

    /// Sleeps up to `timeout`, or less if woken (a notification, or stop).
    pub fn idle_wait(&self, timeout: Duration) {
        self.idle_wait_since(self.wakeups(), timeout);
    }

    /// How many wake-ups there have been: read it before looking for work, then pass it
    /// to `idle_wait_since`, so a wake-up in between is not lost.
    pub fn wakeups(&self) -> u64 {
        self.wake.0.lock().map(|g| *g).unwrap_or(0)
    }

    /// Sleeps up to `timeout`, or not at all if woken since `seen` was read, or less if
    /// woken meanwhile (a notification, or stop).
    pub fn idle_wait_since(&self, seen: u64, timeout: Duration) {
        let Ok(g) = self.wake.0.lock() else { return };
        let _ = self.wake.1.wait_timeout_while(g, timeout, |v| *v == seen && !self.stopping());
    }

    /// Records a database error: counted, and logged once when the database goes away.
    pub fn db_error(&self, context: &str, err: &postgres::Error) {
        Metrics::add(&self.metrics.db_errors, 1);
        if db::is_connection_error(err) {
            self.ready.store(false, Ordering::Relaxed);
            if !self.db_down.swap(true, Ordering::SeqCst) {
                log::warn!("database unreachable ({context}): {}; retrying with backoff", db::describe_error(err));
            }
        } else {
            log::warn!("{context}: {}", db::describe_error(err));
        }
    }

    /// Records that the database answered on `conn`. The first time, and when it answers
    /// again after it was lost, says which server answered (one query): a reconnection is
    /// counted, and logged as a switch when another server answers than before.
    pub fn db_ok(&self, conn: &mut impl GenericClient) {
        let recovered = self.db_down.swap(false, Ordering::SeqCst);
        let known = self.server.lock().map(|s| s.is_some()).unwrap_or(true);
        if !recovered && known {
            return;
        }
        let now =
            db::server_address(conn).unwrap_or_else(|e| format!("an unnamed server ({})", db::describe_error(&e)));
        let before = self.server.lock().ok().and_then(|mut s| s.replace(now.clone()));
        if !recovered {
            log::info!("connected to the database server at {now}");
            return;
        }
        Metrics::add(&self.metrics.db_reconnects, 1);
        match before {
            Some(before) if before != now => {
                log::warn!("database reachable again at another server: {now} (was {before}); resuming there")
            }
            _ => log::info!("database reachable again at {now}; resuming"),
        }
    }

    /// Records a batch that claimed rows and ran from `started` until now.
    pub fn note_work(&self, started: Instant) {
        if let Ok(mut span) = self.work_span.lock() {
            let first = span.map_or(started, |(first, _)| first.min(started));
            *span = Some((first, Instant::now()));
        }
    }

    pub fn register_cancel(&self, t: CancelToken) {
        if let Ok(mut v) = self.cancel_tokens.lock() {
            v.push(t);
        }
    }
}

/// Backoff for reconnect loops: 100 ms doubling to 5 s.
pub struct Reconnect(Duration);

impl Reconnect {
    pub fn new() -> Reconnect {
        Reconnect(Duration::from_millis(100))
    }
    pub fn wait(&mut self, shared: &Shared) {
        shared.idle_wait(self.0);
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
    pub fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

impl Default for Reconnect {
    fn default() -> Self {
        Self::new()
    }
}

/// How long shutdown waits for in-flight batches before cancelling them and releasing
/// their rows: well within the lease.
fn shutdown_grace(lease: Duration) -> Duration {
    (lease / 3).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// Runs the worker until stopped (`Shared::request_stop`, which the command's signal
/// handler calls; `OUTBOX_RUN_SECONDS`; or `until_empty`).
pub fn run(shared: Arc<Shared>, until_empty: bool) -> Result<()> {
    let cfg = &shared.cfg;
    // Unusable TLS settings (an unreadable sslrootcert) are a configuration error, found
    // before anything connects.
    db::tls::connector(&cfg.database_url)?;
    crate::rlimit::raise_open_files_limit();
    if cfg.metrics_port != 0 {
        http::serve(&cfg.metrics_bind, cfg.metrics_port, shared.metrics.clone(), shared.ready.clone())?;
    }
    // OUTBOX_RUN_SECONDS counts from here: a smoke run ends on time even when the
    // database never answers.
    let started = Instant::now();
    if !wait_for_schema(&shared, started)? {
        log::info!("stopped before the database was reachable");
        return Ok(());
    }
    log::info!(
        "worker {} started: concurrency {}, batch {}, lease {:?}, max attempts {}{}",
        cfg.worker_id,
        cfg.concurrency,
        cfg.batch_size,
        cfg.lease,
        cfg.max_attempts,
        cfg.run_for.map(|d| format!(", running for {d:?}")).unwrap_or_default()
    );

    let pool = db::pool(
        &session_url(cfg),
        cfg.concurrency + 5 + u32::from(cfg.done_retention.is_some()),
        shared.refusals.clone(),
    )?;
    let active_claimers = Arc::new(AtomicUsize::new(cfg.concurrency as usize));
    let mut claimers = Vec::new();
    for i in 0..cfg.concurrency {
        let (s, p, active) = (shared.clone(), pool.clone(), active_claimers.clone());
        claimers.push(spawn(&format!("claim-{i}"), move || {
            claim::claim_loop(&s, &p, until_empty);
            active.fetch_sub(1, Ordering::SeqCst);
            // The supervisor waits for this (`--until-empty`): tell it now.
            s.wake_all();
        })?);
    }
    let mut services = Vec::new();
    {
        let (s, p) = (shared.clone(), pool.clone());
        services.push(spawn("reclaim", move || every(&s, s.cfg.reclaim_interval, || reclaim_once(&s, &p)))?);
        let (s, p) = (shared.clone(), pool.clone());
        services.push(spawn("analyze", move || every(&s, s.cfg.reclaim_interval, || analyze_once(&s, &p)))?);
        let (s, p) = (shared.clone(), pool.clone());
        let tick = (s.cfg.lease / 3).min(s.cfg.reclaim_interval);
        services.push(spawn("lease-keeper", move || every(&s, tick, || extend_leases_once(&s, &p)))?);
        let (s, p) = (shared.clone(), pool.clone());
        services.push(spawn("gauges", move || every(&s, Duration::from_secs(1), || sample_gauges_once(&s, &p)))?);
        let (s, p) = (shared.clone(), pool.clone());
        services.push(spawn("rebuild-runs", move || {
            let mut last_run_seen = 0;
            every(&s, Duration::from_secs(1), || {
                close_rebuild_runs_once(&s, &p);
                sample_rebuild_runs_once(&s, &p, &mut last_run_seen);
            })
        })?);
        if shared.cfg.listen {
            let s = shared.clone();
            services.push(spawn("listener", move || listen_loop(&s))?);
        }
        if let Some(retention) = cfg.done_retention {
            let (s, p) = (shared.clone(), pool.clone());
            let tick = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
            services.push(spawn("prune", move || every(&s, tick, || prune_once(&s, &p, retention)))?);
        }
    }

    supervise(&shared, &active_claimers, started);
    shutdown(&shared, &pool, claimers, services);
    log_exit(&shared, &pool);
    log::info!("worker {} stopped", shared.cfg.worker_id);
    Ok(())
}

/// The worker's sessions carry a statement timeout, so nothing waits forever on a lock.
fn session_url(cfg: &WorkerConfig) -> crate::config::DbUrl {
    let mut url = cfg.database_url.clone();
    let ms = cfg.statement_timeout.as_millis().max(1);
    let options = format!("{} -c statement_timeout={ms}", url.config.get_options().unwrap_or("")).trim().to_string();
    url.config.options(&options);
    url.config.application_name(&format!("chronicle worker {}", cfg.worker_id));
    url
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| AppError::failed(format!("cannot start thread {name}: {e}")).caused_by(e))
}

/// Waits (with backoff, until stopped) for the database, then checks the schema: behind
/// or ahead of this binary is an error. Returns false if stopped while waiting. A server
/// that refuses us (wrong credentials, a role that may not log in, an unknown database)
/// is waited for too, as the contract asks of the worker, but reported as an error (see
/// `RefusalLog`); so is an `OUTBOX_RUN_SECONDS` that ends before the database ever
/// answered, so a smoke run that never ran does not read like one that did.
fn wait_for_schema(shared: &Shared, started: Instant) -> Result<bool> {
    let url = &shared.cfg.database_url;
    let mut backoff = Reconnect::new();
    let mut last_error = None;
    loop {
        if shared.stopping() {
            return Ok(false);
        }
        if let Some(limit) = shared.cfg.run_for.filter(|d| started.elapsed() >= *d) {
            let why = last_error.unwrap_or_else(|| "no answer".to_string());
            log::error!(
                "OUTBOX_RUN_SECONDS ({limit:?}) reached before the database at {url} was reachable ({why}): \
                 nothing was projected; stopping"
            );
            return Ok(false);
        }
        match db::connect(url) {
            Ok(mut client) => {
                shared.db_ok(&mut client);
                let st = migrate::status(&mut client)?;
                if !st.pending.is_empty() {
                    return Err(AppError::failed(format!(
                        "the database schema is behind this chronicle ({} migration(s) pending, first: {} {}): \
                         run `chronicle migrate` first",
                        st.pending.len(),
                        st.pending[0].version,
                        st.pending[0].name
                    )));
                }
                shared.ready.store(true, Ordering::Relaxed);
                return Ok(true);
            }
            Err(e) if db::is_refusal(&e) => {
                Metrics::add(&shared.metrics.db_errors, 1);
                shared.ready.store(false, Ordering::Relaxed);
                shared.refusals.report(url, &e);
                last_error = Some(db::describe_error(&e));
                backoff.wait(shared);
            }
            Err(e) if db::is_connection_error(&e) => {
                shared.db_error("at start", &e);
                last_error = Some(db::describe_error(&e));
                backoff.wait(shared);
            }
            Err(e) => return Err(db::connect_failure(url, e)),
        }
    }
}

/// Runs `f` now and then every `interval` until stop.
fn every(shared: &Shared, interval: Duration, mut f: impl FnMut()) {
    while !shared.stopping() {
        f();
        shared.idle_wait(interval);
    }
}

/// One turn of the reclaim loop: stuck rows back to pending (or failed when out of
/// attempts), counted.
pub fn reclaim_once(shared: &Shared, pool: &db::Pool) {
    let Some(mut c) = pooled(shared, pool, "reclaim") else { return };
    match outbox::reclaim_stuck(&mut *c, shared.cfg.max_processing, shared.cfg.max_attempts) {
        Ok(o) => {
            shared.db_ok(&mut *c);
            let n = o.retried + o.exhausted;
            if n > 0 {
                log::warn!(
                    "reclaimed {n} stuck row(s): {} back to pending, {} failed (max_attempts_exceeded)",
                    o.retried,
                    o.exhausted
                );
                Metrics::add(&shared.metrics.reclaimed, n);
                for _ in 0..o.exhausted {
                    shared.metrics.terminal_failure(ErrorReason::MaxAttemptsExceeded);
                }
            }
        }
        Err(e) => shared.db_error("while reclaiming stuck rows", &e),
    }
}

/// One turn of the analyze service: an `ANALYZE` of the outbox when its planner statistics
/// are missing or stale (`outbox::analyze_if_stale`), which the claims and the gauges'
/// estimate plan from. Routine (a new outbox, a burst before autovacuum's next pass), so
/// logged at debug; a role that may not analyze is said once, as a warning.
pub fn analyze_once(shared: &Shared, pool: &db::Pool) {
    if shared.outbox_analyze_refused.load(Ordering::Relaxed) {
        return;
    }
    let Some(mut c) = pooled(shared, pool, "analyze") else { return };
    match outbox::analyze_if_stale(&mut *c) {
        Ok(Analyze::Fresh) => {}
        Ok(Analyze::Analyzed) => log::debug!(
            "analyzed chronicle_outbox_events: its planner statistics were missing or older than a large \
             share of its rows"
        ),
        Ok(Analyze::Busy) => log::debug!("chronicle_outbox_events is being vacuumed or analyzed: analyze it later"),
        Ok(Analyze::NotAllowed) => {
            log::warn!(
                "chronicle_outbox_events has missing or stale planner statistics and this role cannot analyze \
                 it (only its owner can): the claims, gauges and operations plan from them until autovacuum \
                 or an ANALYZE by its owner refreshes them"
            );
            shared.outbox_analyze_refused.store(true, Ordering::Relaxed);
        }
        Err(e) => shared.db_error("while checking the outbox's planner statistics", &e),
    }
}

fn extend_leases_once(shared: &Shared, pool: &db::Pool) {
    let tokens: Vec<Uuid> = shared.held_claims.lock().map(|h| h.iter().copied().collect()).unwrap_or_default();
    if tokens.is_empty() {
        return;
    }
    let Some(mut c) = pooled(shared, pool, "lease keeper") else { return };
    match outbox::extend_lease(&mut *c, &tokens, shared.cfg.lease, shared.cfg.max_processing) {
        Ok(n) if n > 0 => log::debug!("extended the lease of {n} row(s)"),
        Ok(_) => {}
        Err(e) => shared.db_error("while extending leases", &e),
    }
}

/// Rows deleted per statement by the worker's prune: small, so no statement holds many
/// locks or runs long.
const PRUNE_BATCH: u32 = 1000;

/// One turn of the prune service (`OUTBOX_DONE_RETENTION_SECONDS`): `done` rows older
/// than the retention are deleted in small batches, stopping early on shutdown.
pub fn prune_once(shared: &Shared, pool: &db::Pool, retention: Duration) {
    let Some(mut c) = pooled(shared, pool, "prune") else { return };
    let result = outbox::prune_cutoff(&mut *c, retention)
        .and_then(|cutoff| outbox::prune_done(&mut *c, cutoff, PRUNE_BATCH, || !shared.stopping()));
    match result {
        Ok(r) if r.deleted > 0 => log::info!("pruned {} done row(s) older than {retention:?}", r.deleted),
        Ok(_) => {}
        Err(e) => shared.db_error("while pruning done rows", &e),
    }
}

/// One turn of the gauge sampler: the outbox gauges, the pending rows counted up to
/// `outbox::PENDING_COUNTED_UP_TO` and estimated beyond.
pub fn sample_gauges_once(shared: &Shared, pool: &db::Pool) {
    let Some(mut c) = pooled(shared, pool, "gauges") else { return };
    match outbox::sample_gauges(&mut *c, shared.cfg.max_processing, Some(outbox::PENDING_COUNTED_UP_TO)) {
        Ok(g) => {
            shared.ready.store(true, Ordering::Relaxed);
            if let Ok(mut slot) = shared.metrics.gauges.lock() {
                *slot = Some(g);
            }
        }
        Err(e) => shared.db_error("while sampling gauges", &e),
    }
}

/// One turn of the rebuild runs' closing: the runs through the outbox (`--emit-outbox`)
/// whose deliveries are all done or failed are finished (`rebuild::finish_queued_runs`).
pub fn close_rebuild_runs_once(shared: &Shared, pool: &db::Pool) {
    let Some(mut c) = pooled(shared, pool, "rebuild runs") else { return };
    match crate::rebuild::finish_queued_runs(&mut *c) {
        Ok(n) if n > 0 => log::debug!("closed {n} rebuild run(s) delivered through the outbox"),
        Ok(_) => {}
        Err(e) => shared.db_error("while closing rebuilds delivered through the outbox", &e),
    }
}

/// One turn of the rebuild runs' sampler: the runs finished since the last turn, each
/// observed once in the rebuild histogram; the newest set the timestamps.
pub fn sample_rebuild_runs_once(shared: &Shared, pool: &db::Pool, last_run_seen: &mut i64) {
    let Some(mut c) = pooled(shared, pool, "rebuild runs") else { return };
    match crate::rebuild::finished_runs_after(&mut *c, *last_run_seen) {
        Ok(runs) => {
            let m = &shared.metrics;
            for run in runs {
                *last_run_seen = run.id;
                m.rebuild_duration.observe(run.seconds);
                if let Ok(mut t) = m.rebuild_last_finished.lock() {
                    *t = Some(t.map_or(run.finished_at, |prev: f64| prev.max(run.finished_at)));
                }
                if run.success {
                    if let Ok(mut t) = m.rebuild_last_success.lock() {
                        *t = Some(t.map_or(run.finished_at, |prev: f64| prev.max(run.finished_at)));
                    }
                }
            }
        }
        Err(e) => shared.db_error("while sampling rebuild runs", &e),
    }
}

/// A pooled connection, or None (logged) when the database is not reachable.
pub fn pooled(shared: &Shared, pool: &db::Pool, what: &str) -> Option<db::PooledClient> {
    match pool.get() {
        Ok(c) => Some(c),
        Err(e) => {
            Metrics::add(&shared.metrics.db_errors, 1);
            shared.ready.store(false, Ordering::Relaxed);
            if !shared.db_down.swap(true, Ordering::SeqCst) {
                log::warn!("database unreachable ({what}): {e}; retrying with backoff");
            }
            None
        }
    }
}

/// How long the listener waits for a notification before it looks whether the worker is
/// stopping. Shutdown notifies the listener's own channel, so this is only the fallback
/// for a shutdown that could not (no idle connection, or the database gone).
const LISTENER_WAIT: Duration = Duration::from_secs(1);

/// Keeps one connection listening on `chronicle_outbox` and wakes idle claim threads
/// when the enqueue trigger notifies. Polling stays the fallback.
fn listen_loop(shared: &Shared) {
    let mut backoff = Reconnect::new();
    while !shared.stopping() {
        let mut client = match db::connect(&shared.cfg.database_url) {
            Ok(c) => c,
            Err(e) => {
                log::debug!("listener cannot connect: {}", db::describe_error(&e));
                backoff.wait(shared);
                continue;
            }
        };
        let listen = format!("LISTEN chronicle_outbox; LISTEN \"{}\"", shared.stop_channel);
        if let Err(e) = client.batch_execute(&listen) {
            log::debug!("listener cannot LISTEN: {}", db::describe_error(&e));
            backoff.wait(shared);
            continue;
        }
        backoff.reset();
        // Anything written while we were not listening is found by this wake-up.
        shared.wake_all();
        let mut notifications = client.notifications();
        loop {
            if shared.stopping() {
                return;
            }
            // A fresh iterator each turn: the driver's timeout is not re-armed after it
            // fires once, and a spent one returns at once without ever waiting on the
            // socket again (a busy loop that never sees a notification).
            match notifications.timeout_iter(LISTENER_WAIT).next() {
                Ok(Some(n)) if n.channel() == shared.stop_channel => {
                    log::debug!("listener: stopping on the worker's shutdown notification");
                    return;
                }
                Ok(Some(_)) => {
                    log::debug!("notified: waking idle claim threads");
                    shared.wake_all()
                }
                Ok(None) => {}
                Err(e) => {
                    log::debug!("listener connection lost: {}", db::describe_error(&e));
                    break;
                }
            }
        }
    }
}

/// Waits until stop is requested, `OUTBOX_RUN_SECONDS` have passed, or (with
/// `--until-empty`) every claim thread found nothing ready; logs progress meanwhile.
fn supervise(shared: &Shared, active_claimers: &AtomicUsize, started: Instant) {
    let mut last_log = (Instant::now(), 0u64);
    while !shared.stopping() {
        if shared.cfg.run_for.is_some_and(|d| started.elapsed() >= d) {
            log::info!("OUTBOX_RUN_SECONDS reached: stopping");
            shared.request_stop();
            break;
        }
        if active_claimers.load(Ordering::SeqCst) == 0 {
            log::info!("nothing left to claim: stopping (--until-empty)");
            shared.request_stop();
            break;
        }
        shared.idle_wait(Duration::from_millis(100));
        if last_log.0.elapsed() >= Duration::from_secs(5) {
            last_log = (Instant::now(), log_progress(shared, Some(last_log)));
        }
    }
}

/// One info line: processed, failed, retries, backlog, events/s. Returns processed.
fn log_progress(shared: &Shared, since: Option<(Instant, u64)>) -> u64 {
    let m = &shared.metrics;
    let processed = Metrics::get(&m.processed);
    let backlog = m.gauges.lock().ok().and_then(|g| *g).map(|g| pending_text(&g)).unwrap_or_else(|| "?".into());
    let rate = since
        .map(|(t, p)| (processed.saturating_sub(p)) as f64 / t.elapsed().as_secs_f64().max(1e-3))
        .map(|r| format!(", {r:.0} events/s"))
        .unwrap_or_default();
    log::info!(
        "processed {processed}, failed {}, retries {}, reclaimed {}, backlog {backlog}{rate}",
        m.terminal_failed_total(),
        Metrics::get(&m.retry_scheduled),
        Metrics::get(&m.reclaimed)
    );
    processed
}

/// The pending rows as the gauges have them: "~1200000" when estimated.
fn pending_text(g: &outbox::Gauges) -> String {
    format!("{}{}", if g.pending_estimated { "~" } else { "" }, g.pending)
}

/// The last line: what this process did, at the rate it drained while it had work (the
/// time from its first claim to its last completion, not the whole run), and the backlog
/// read from the database now, not the gauges' last sample.
fn log_exit(shared: &Shared, pool: &db::Pool) {
    let m = &shared.metrics;
    let processed = Metrics::get(&m.processed);
    let span = shared.work_span.lock().ok().and_then(|s| *s).map(|(first, last)| last.duration_since(first));
    let rate = match span {
        Some(d) if processed > 0 => {
            format!(
                " in {:.2} s of work ({:.0} events/s)",
                d.as_secs_f64(),
                processed as f64 / d.as_secs_f64().max(1e-3)
            )
        }
        _ => String::new(),
    };
    let backlog = match pool.get_timeout(Duration::from_secs(2)) {
        Ok(mut c) => {
            match outbox::sample_gauges(&mut *c, shared.cfg.max_processing, Some(outbox::PENDING_COUNTED_UP_TO)) {
                Ok(g) => format!("{} pending, {} processing", pending_text(&g), g.inflight),
                Err(e) => format!("unknown ({})", db::describe_error(&e)),
            }
        }
        Err(e) => format!("unknown ({e})"),
    };
    log::info!(
        "processed {processed}{rate}; failed {}, retries {}, reclaimed {}; backlog now: {backlog}",
        m.terminal_failed_total(),
        Metrics::get(&m.retry_scheduled),
        Metrics::get(&m.reclaimed)
    );
}

/// Stops the threads: claim threads finish their batch within the grace period, or are
/// interrupted (their rows released with the attempt given back); then the listener is
/// notified on its own channel, so that it does not hold the exit up for the rest of its
/// wait.
fn shutdown(shared: &Shared, pool: &db::Pool, claimers: Vec<JoinHandle<()>>, services: Vec<JoinHandle<()>>) {
    shared.request_stop();
    let grace = shutdown_grace(shared.cfg.lease);
    let mut finished = wait_finished(&claimers, Instant::now() + grace);
    let hard_deadline = Instant::now() + grace + Duration::from_secs(2);
    if !finished {
        log::warn!("in-flight batches did not finish within {grace:?}: interrupting them and releasing their rows");
        // A cancel stops only the statement running when it arrives: a thread between two
        // statements then would block on its next one. So the claim threads' statements
        // are cancelled again until every thread has finished (a release that a cancel
        // interrupts is tried again: `claim::release_on_shutdown`).
        while !finished && Instant::now() < hard_deadline {
            if let Ok(tokens) = shared.cancel_tokens.lock() {
                for t in tokens.iter() {
                    let _ = db::cancel_query(&shared.cfg.database_url, t);
                }
            }
            finished = wait_finished(&claimers, (Instant::now() + Duration::from_millis(250)).min(hard_deadline));
        }
    }
    if shared.cfg.listen {
        notify_listener_of_shutdown(shared, pool);
    }
    for h in claimers.into_iter().chain(services) {
        if wait_finished(std::slice::from_ref(&h), hard_deadline) {
            let _ = h.join();
        }
    }
}

/// Wakes the listener for shutdown, through a connection the pool has idle (the claim
/// threads' are, once they have finished); without one, the listener stops at the end of
/// its wait (`LISTENER_WAIT`).
fn notify_listener_of_shutdown(shared: &Shared, pool: &db::Pool) {
    let Some(mut c) = pool.try_get() else {
        log::debug!("no idle connection to notify the listener of shutdown with");
        return;
    };
    if let Err(e) = c.execute("SELECT pg_notify($1, '')", &[&shared.stop_channel]) {
        log::debug!("could not notify the listener of shutdown: {}", db::describe_error(&e));
    }
}

/// Waits until every one of `threads` has finished, or `until`; whether they all have.
fn wait_finished(threads: &[JoinHandle<()>], until: Instant) -> bool {
    loop {
        if threads.iter().all(|h| h.is_finished()) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
