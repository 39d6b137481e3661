//! The projector worker: claim threads, the reclaim loop, the outbox's analyze, the lease
//! keeper, the gauge sampler (and, less often, the vacuum horizon), the rebuild runs'
//! closing and the listener, started and stopped together.
//!
//! Each background service has one job and is a `*_once` function inside a dumb loop
//! (River's shape): `reclaim_once`, `analyze_once`, `sample_gauges_once`, `sample_horizon_once`,
//! `close_rebuild_runs_once` (its thread then samples the runs it may have closed,
//! `sample_rebuild_runs_once`), `prune_once`, `claim::ClaimThread::run_once`. A test can
//! run one turn against a database without starting a worker (tests/worker.rs does for
//! the reclaim loop and the analyze). Database trouble never ends the process once it has
//! reached its database: every loop logs the change of state once, waits with backoff and
//! resumes by itself (a bounded run that never reached it ends with exit 3:
//! `wait_for_schema`). No wait on the network outlasts a stop: connections are made in
//! slices the caller can abandon (`db::connect_until`), and shutdown gives up on a
//! database that does not answer. A panic in one of its threads outside a projection, a
//! bug, ends the process: every thread is stopped as on a stop, and the worker exits 70
//! (`panics`). Signals are the command's business (`cmd/worker.rs`): it asks the worker to
//! stop through `Shared`.

pub mod claim;
pub mod panics;
pub mod read_model;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{CancelToken, GenericClient};
use uuid::Uuid;

use crate::config::WorkerConfig;
use crate::db::{self, migrate};
use crate::error::{AppError, Result};
use crate::error_reason::ErrorReason;
use crate::failpoint;
use crate::metrics::{http, Metrics, Paused};
use crate::outbox::{self, Analyze};

use panics::ThreadPanic;

/// State shared by the threads of one worker process.
pub struct Shared {
    pub cfg: WorkerConfig,
    pub metrics: Arc<Metrics>,
    /// Set once: stop claiming, finish or release, exit.
    pub stop: AtomicBool,
    /// Bumped by the listener to wake idle claim threads at once, on stop to wake every
    /// waiting thread, and by every claim that took rows (`Wakeups`).
    wake: (Mutex<Wakeups>, Condvar),
    /// Claim tokens currently held by this process, for the lease keeper.
    pub held_claims: Mutex<HashSet<Uuid>>,
    /// The cancel token of each claim thread's current connection, to interrupt it on
    /// shutdown: one per thread, replaced when the thread reconnects.
    cancel_tokens: Mutex<HashMap<ThreadId, CancelToken>>,
    /// Whether the database answers and has our schema (for /readyz).
    pub ready: Arc<AtomicBool>,
    /// Whether the database was last seen unreachable, so it is logged once per change.
    db_down: AtomicBool,
    /// Whether the server was last seen turning connections away for lack of slots
    /// (`db::RefusalLog::recent_shortage`), so it is logged once per change.
    slots_short: AtomicBool,
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
    /// The first panic outside a projection (`panics`): the worker stops, and exits 70.
    panicked: OnceLock<ThreadPanic>,
    /// Set once `--until-empty` has said it waits for rows claimed by other workers.
    until_empty_waiting: AtomicBool,
}

impl Shared {
    pub fn new(cfg: WorkerConfig) -> Arc<Shared> {
        let metrics = Arc::new(Metrics::new(&cfg.worker_id));
        Arc::new(Shared {
            cfg,
            metrics,
            stop: AtomicBool::new(false),
            wake: (Mutex::new(Wakeups::default()), Condvar::new()),
            held_claims: Mutex::new(HashSet::new()),
            cancel_tokens: Mutex::new(HashMap::new()),
            ready: Arc::new(AtomicBool::new(false)),
            db_down: AtomicBool::new(false),
            slots_short: AtomicBool::new(false),
            server: Mutex::new(None),
            refusals: Arc::new(db::RefusalLog::default()),
            work_span: Mutex::new(None),
            outbox_analyze_refused: AtomicBool::new(false),
            stop_channel: format!("chronicle_stop_{}", Uuid::now_v7().simple()),
            panicked: OnceLock::new(),
            until_empty_waiting: AtomicBool::new(false),
        })
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// A thread panicked outside a projection (the panic hook, `panics::install_hook`): the
    /// worker is not ready from now on, and stops. It runs on the panicking thread, so it
    /// takes no lock that thread could hold when it panics (only the wake-up's, for a
    /// moment).
    pub fn thread_panicked(&self, panic: ThreadPanic) {
        let _ = self.panicked.set(panic);
        self.stop.store(true, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
        self.wake_all();
    }

    /// The first panic outside a projection, if one happened.
    pub fn panicked(&self) -> Option<&ThreadPanic> {
        self.panicked.get()
    }

    /// Says the worker is ready (the database answers and has our schema), unless it is
    /// stopping: stored first and checked after, so a panic's `thread_panicked` cannot be
    /// overwritten by a readiness noted just before it.
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
        if self.stopping() {
            self.ready.store(false, Ordering::SeqCst);
        }
    }

    /// Wakes every waiting thread: the claim threads, and the services' and supervisor's
    /// waits (`idle_wait`).
    pub fn wake_all(&self) {
        if let Ok(mut g) = self.wake.0.lock() {
            g.all = g.all.wrapping_add(1);
        }
        self.wake.1.notify_all();
    }

    /// Wakes the idle claim threads on a notification (new work may be ready), and nothing
    /// else: the services keep their own pace whatever the notifications.
    pub fn wake_claimers(&self) {
        if let Ok(mut g) = self.wake.0.lock() {
            g.notified = g.notified.wrapping_add(1);
        }
        self.wake.1.notify_all();
    }

    /// Sleeps up to `timeout`, or less if woken by `wake_all` (stop, a claim thread's end).
    pub fn idle_wait(&self, timeout: Duration) {
        let Ok(g) = self.wake.0.lock() else { return };
        let seen = g.all;
        let _ = self.wake.1.wait_timeout_while(g, timeout, |w| w.all == seen && !self.stopping());
    }

    /// The wake-ups so far: read them before looking for work, then pass them to
    /// `idle_wait_since`, so a wake-up in between is not lost.
    pub fn wakeups(&self) -> Wakeups {
        self.wake.0.lock().map(|g| *g).unwrap_or_default()
    }

    /// A claim thread's idle wait, after a claim that found nothing: up to `timeout` (the
    /// poll interval), not at all if woken since `seen` was read, or less if woken
    /// meanwhile (a notification, or stop).
    ///
    /// Wake-ups cost what they are worth. Any role may notify the outbox channel, and each
    /// notification answered costs a claim transaction per idle thread. So when this thread
    /// answered a notification and no claim of this process has taken rows since
    /// (`note_claimed`), the notifications that follow within `timeout` of that one are
    /// coalesced: the thread answers them once, at the end of that `timeout`. A flood costs
    /// each thread at most about one claim per `timeout` beyond the work there is, and a
    /// row hidden in it waits at most `timeout`, as with polling alone. A notification that
    /// brought work (to this thread or another) changes nothing: the next one is answered
    /// at once, as before.
    pub fn idle_wait_since(&self, seen: Wakeups, timeout: Duration) {
        let entered = Instant::now();
        let Ok(mut g) = self.wake.0.lock() else { return };
        let unproven = ANSWERED_AT.with(|a| a.get()).filter(|&(at, work)| work == g.work && at + timeout > entered);
        if let Some((at, work)) = unproven {
            // Deaf to notifications (not to stop) until `timeout` after the one answered,
            // or until a claim takes rows.
            g = match self.wake.1.wait_timeout_while(g, at + timeout - entered, |w| {
                w.all == seen.all && w.work == work && !self.stopping()
            }) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
        let left = timeout.saturating_sub(entered.elapsed());
        let g = match self
            .wake
            .1
            .wait_timeout_while(g, left, |w| w.all == seen.all && w.notified == seen.notified && !self.stopping())
        {
            Ok((g, _)) => g,
            Err(_) => return,
        };
        let answering = g.all == seen.all && g.notified != seen.notified && !self.stopping();
        let answered = answering.then(|| (Instant::now(), g.work));
        ANSWERED_AT.with(|a| a.set(answered));
    }

    /// Records that a claim took rows, as soon as it has them: the notifications answered
    /// meanwhile brought work, and a claim thread holding back notifications
    /// (`idle_wait_since`) answers them again at once.
    pub fn note_claimed(&self) {
        if let Ok(mut g) = self.wake.0.lock() {
            g.work = g.work.wrapping_add(1);
        }
        self.wake.1.notify_all();
    }

    /// Records a database error: counted, and logged once when the database goes away, or
    /// when it turns connections away for lack of slots (53300, which only a connection
    /// attempt meets: `short_of_slots`). Another error of class 53 (a disk full, out of
    /// memory) met by a statement is logged as it is.
    pub fn db_error(&self, context: &str, err: &postgres::Error) {
        Metrics::add(&self.metrics.db_errors, 1);
        let no_slots = err.code() == Some(&postgres::error::SqlState::TOO_MANY_CONNECTIONS);
        if let Some(cause) = crate::sqlstate::connection_shortage(err).filter(|_| no_slots) {
            self.refusals.note_shortage(err);
            self.short_of_slots(context, cause, &db::describe_error(err));
        } else if db::is_connection_error(err) {
            self.ready.store(false, Ordering::Relaxed);
            if !self.db_down.swap(true, Ordering::SeqCst) {
                log::warn!("database unreachable ({context}): {}; retrying with backoff", db::describe_error(err));
            }
        } else {
            log::warn!("{context}: {}", db::describe_error(err));
        }
    }

    /// Pauses the worker for a fault of the system (`db::PauseReason`), met `during` a step
    /// (`"claiming"`, `"completing"`, `"checking the read model"`): `/readyz` answers 503
    /// with the reason, `chronicle_worker_paused` says it, and the claim threads give back
    /// what they claimed and try again with backoff (`claim::claim_loop`). One ERROR line
    /// when the worker pauses or the reason changes, none while it stays paused for it.
    pub fn pause(&self, during: &'static str, reason: db::PauseReason, sqlstate: Option<String>, error: String) {
        let Ok(mut slot) = self.metrics.paused.lock() else { return };
        if slot.as_ref().is_some_and(|p| p.reason == reason && p.sqlstate == sqlstate) {
            return;
        }
        log::error!(
            "paused ({reason}) while {during}: {error}; no event is failed and no attempt spent for it: claims are \
             given back, and the worker tries again with backoff (at most every {:?}) and resumes by itself once \
             the cause is gone",
            PAUSE_PROBE_MAX
        );
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        *slot = Some(Paused { reason, sqlstate, error, during, since });
    }

    /// Why the worker is paused, if it is.
    pub fn paused(&self) -> Option<Paused> {
        self.metrics.paused()
    }

    /// Ends a pause (a batch completed, or the step that paused the worker succeeded):
    /// one line, with how long it lasted.
    pub fn resume(&self) {
        let Some(p) = self.metrics.paused.lock().ok().and_then(|mut s| s.take()) else { return };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        log::info!("resumed: the cause of the pause ({}) is gone after {:.1} s", p.reason, (now - p.since).max(0.0));
    }

    /// Records that the database answered on `conn`. The first time, and when it answers
    /// again after it was lost, says which server answered (one query): a reconnection is
    /// counted, and logged as a switch when another server answers than before.
    pub fn db_ok(&self, conn: &mut impl GenericClient) {
        self.slots_back();
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

    /// Records that the server turned a connection away for lack of slots (or of another
    /// resource): logged once, naming the cause, until no attempt has been turned away for
    /// `SLOTS_QUIET` (`slots_back`). The database answers on the connections the worker
    /// has, so this is not an outage: not logged as one (nor its end as a reconnection),
    /// and the worker stays ready while they work.
    fn short_of_slots(&self, context: &str, cause: &str, err: &str) {
        if !self.slots_short.swap(true, Ordering::SeqCst) {
            log::warn!(
                "{cause} ({context}): {err}; working on the connections this worker has and retrying the others \
                 with backoff (raise max_connections or the role's or database's CONNECTION LIMIT, or lower \
                 OUTBOX_CONCURRENCY or the number of workers)"
            );
        }
    }

    /// Says the server has connection slots again, once no attempt has been turned away
    /// for `SLOTS_QUIET` while the database answers.
    fn slots_back(&self) {
        if self.slots_short.load(Ordering::SeqCst)
            && self.refusals.recent_shortage(SLOTS_QUIET).is_none()
            && self.slots_short.swap(false, Ordering::SeqCst)
        {
            log::info!(
                "the server has accepted this worker's connections again (none turned away for lack of slots \
                 for {} s)",
                SLOTS_QUIET.as_secs()
            );
        }
    }

    /// Records a batch that claimed rows and ran from `started` until now.
    pub fn note_work(&self, started: Instant) {
        if let Ok(mut span) = self.work_span.lock() {
            let first = span.map_or(started, |(first, _)| first.min(started));
            *span = Some((first, Instant::now()));
        }
    }

    /// Records the cancel token of the calling thread's current connection, in place of
    /// the one of its connection before (a connection that is gone needs no cancel).
    pub fn register_cancel(&self, t: CancelToken) {
        if let Ok(mut v) = self.cancel_tokens.lock() {
            v.insert(std::thread::current().id(), t);
        }
    }

    /// The cancel token registered by `thread`, if any.
    fn cancel_token_of(&self, thread: ThreadId) -> Option<CancelToken> {
        self.cancel_tokens.lock().ok().and_then(|v| v.get(&thread).cloned())
    }

    /// Records a failed connection attempt as `db_error` does a database error.
    pub fn connect_error(&self, context: &str, err: &db::ConnectError) {
        if let Some(e) = err.driver() {
            return self.db_error(context, e);
        }
        Metrics::add(&self.metrics.db_errors, 1);
        self.ready.store(false, Ordering::Relaxed);
        if !self.db_down.swap(true, Ordering::SeqCst) {
            log::warn!("database unreachable ({context}): {err}; retrying with backoff");
        }
    }
}

/// How long no connection attempt may have been turned away for lack of slots before the
/// worker says the server accepts its connections again: longer than the pool's wait for
/// a connection, so one shortage is one warning, not one per attempt.
const SLOTS_QUIET: Duration = Duration::from_secs(30);

/// A failure to get a pooled connection comes after the pool's wait (5 s) for one: an
/// attempt turned away for lack of slots this recently is its cause.
const SHORTAGE_SEEN_WITHIN: Duration = Duration::from_secs(10);

/// The wake-up counters: `all` counts the wake-ups of every thread (stop, a claim
/// thread's end, the listener's start), `notified` the notifications of the outbox
/// channel (claim threads only), `work` the claims that took rows.
#[derive(Debug, Default, Clone, Copy)]
pub struct Wakeups {
    all: u64,
    notified: u64,
    work: u64,
}

thread_local! {
    /// On a claim thread: when it last answered a notification, and `Wakeups::work` then
    /// (`Shared::idle_wait_since`).
    static ANSWERED_AT: std::cell::Cell<Option<(Instant, u64)>> = const { std::cell::Cell::new(None) };
}

/// The longest a paused claim thread waits before it tries again.
pub const PAUSE_PROBE_MAX: Duration = Duration::from_secs(5);

/// Backoff for reconnect loops: 100 ms doubling to 5 s.
pub struct Reconnect(Duration);

impl Reconnect {
    pub fn new() -> Reconnect {
        Reconnect(Duration::from_millis(100))
    }
    pub fn wait(&mut self, shared: &Shared) {
        self.wait_until(shared, None);
    }
    /// As `wait`, ending at `end` at the latest.
    pub fn wait_until(&mut self, shared: &Shared, end: Option<Instant>) {
        let wait = end.map_or(self.0, |end| self.0.min(end.saturating_duration_since(Instant::now())));
        shared.idle_wait(wait);
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
/// their rows: well within the lease; after a panic, short, so the worker is gone within
/// 2 s of it.
fn shutdown_grace(lease: Duration, panicked: bool) -> Duration {
    if panicked {
        return Duration::from_millis(500);
    }
    (lease / 3).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// Runs the worker until stopped (`Shared::request_stop`, which the command's signal
/// handler calls; `OUTBOX_RUN_SECONDS`; or `until_empty`), or until a thread panics
/// outside a projection: then every thread is stopped and the claims given back as on a
/// stop, and the result is an error of kind `Panicked` (exit 70).
pub fn run(shared: Arc<Shared>, until_empty: bool) -> Result<()> {
    {
        let s = shared.clone();
        panics::install_hook(move |p| s.thread_panicked(p));
    }
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
    let bounded = until_empty || cfg.run_for.is_some();
    if !wait_for_schema(&shared, started, bounded)? {
        if shared.panicked().is_none() {
            log::info!("stopped before the database was reachable");
        }
        return outcome(&shared);
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
        services.push(spawn("reclaim", move || every(&s, "reclaim", s.cfg.reclaim_interval, || reclaim_once(&s, &p)))?);
        let (s, p) = (shared.clone(), pool.clone());
        services.push(spawn("analyze", move || every(&s, "analyze", s.cfg.reclaim_interval, || analyze_once(&s, &p)))?);
        let (s, p) = (shared.clone(), pool.clone());
        let tick = (s.cfg.lease / 3).min(s.cfg.reclaim_interval);
        services.push(spawn("lease-keeper", move || every(&s, "lease-keeper", tick, || extend_leases_once(&s, &p)))?);
        let (s, p) = (shared.clone(), pool.clone());
        // The horizon on the gauges' thread, less often: no connection more.
        services.push(spawn("gauges", move || {
            let mut horizon = HorizonState::default();
            every(&s, "gauges", Duration::from_secs(1), || {
                sample_gauges_once(&s, &p);
                if horizon.sampled_at.is_none_or(|t| t.elapsed() >= outbox::horizon::SAMPLE_EVERY) {
                    horizon.sampled_at = Some(Instant::now());
                    sample_horizon_once(&s, &p, &mut horizon);
                }
            })
        })?);
        let (s, p) = (shared.clone(), pool.clone());
        services.push(spawn("rebuild-runs", move || {
            let mut last_run_seen = 0;
            every(&s, "rebuild-runs", Duration::from_secs(1), || {
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
            services.push(spawn("prune", move || every(&s, "prune", tick, || prune_once(&s, &p, retention)))?);
        }
    }

    supervise(&shared, &active_claimers, started);
    shutdown(&shared, &pool, claimers, services);
    log_exit(&shared, &pool);
    outcome(&shared)
}

/// How the worker ended: stopped, or stopped by a panic (a bug: exit 70).
fn outcome(shared: &Shared) -> Result<()> {
    match shared.panicked() {
        None => {
            log::info!("worker {} stopped", shared.cfg.worker_id);
            Ok(())
        }
        Some(p) => {
            shared.ready.store(false, Ordering::SeqCst);
            Err(AppError::panicked(format!(
                "worker {} stopped: its thread {} panicked ({}); this is a bug in chronicle",
                shared.cfg.worker_id, p.thread, p.message
            )))
        }
    }
}

/// The worker's sessions carry a statement timeout, so nothing waits forever on a lock,
/// and an idle-in-transaction timeout of the longer of it and the lease: the worker sends
/// a transaction's statements back to back, so a transaction left idle that long belongs
/// to a thread that is stuck, and the server ends it rather than let its row locks hold
/// the rows past their lease (the reclaim loop skips locked rows).
fn session_url(cfg: &WorkerConfig) -> crate::config::DbUrl {
    let mut url = cfg.database_url.clone();
    let ms = cfg.statement_timeout.as_millis().max(1);
    let idle_ms = cfg.statement_timeout.max(cfg.lease).as_millis().max(1);
    let options = format!(
        "{} -c statement_timeout={ms} -c idle_in_transaction_session_timeout={idle_ms}",
        url.config.get_options().unwrap_or("")
    )
    .trim()
    .to_string();
    url.config.options(&options);
    url.config.application_name(&format!("chronicle worker {}", cfg.worker_id));
    url
}

/// Starts one of the worker's own threads (`panics::own_thread`).
fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            panics::own_thread();
            f()
        })
        .map_err(|e| AppError::failed(format!("cannot start thread {name}: {e}")).caused_by(e))
}

/// Waits (with backoff, until stopped) for the database, then checks the schema: behind
/// or ahead of this binary is an error. Returns false if stopped while waiting.
///
/// A bounded run (`OUTBOX_RUN_SECONDS`, `--until-empty`) that ends before the database
/// ever answered is an error (exit 3), so a smoke run that never ran is not read as one
/// that did; so is a server that refuses such a run (wrong credentials, a role that may
/// not log in, an unknown database): it will not change its mind before the run ends. An
/// unbounded worker waits for a refusing server too, as the contract asks of it,
/// reporting it as an error (see `RefusalLog`). Every wait, a connection attempt's
/// included, ends as soon as the worker is asked to stop or its run time is up.
fn wait_for_schema(shared: &Shared, started: Instant, bounded: bool) -> Result<bool> {
    let url = &shared.cfg.database_url;
    let run_end = shared.cfg.run_for.map(|d| started + d);
    let mut backoff = Reconnect::new();
    let mut last_error = None;
    loop {
        let ran_out = run_end.is_some_and(|end| Instant::now() >= end);
        if shared.stopping() || ran_out {
            if !bounded {
                return Ok(false);
            }
            let why = last_error.unwrap_or_else(|| "no answer".to_string());
            let end = match shared.cfg.run_for {
                Some(limit) if ran_out => format!("OUTBOX_RUN_SECONDS ({limit:?}) reached"),
                _ => "stopped".to_string(),
            };
            return Err(AppError::unreachable(format!(
                "{end} before the database at {url} was reachable ({why}): nothing was projected"
            )));
        }
        match db::connect_until(url, run_end, &|| shared.stopping()) {
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
                let drift = read_model::differences(&mut client)
                    .map_err(|e| AppError::db("while checking the read model chronicle_entries", e))?;
                if !drift.is_empty() {
                    return Err(AppError::failed(format!(
                        "the read model chronicle_entries is not what this chronicle writes (docs/DESIGN.md §2):\n  - \
                         {}\nrestore it (`chronicle migrate --status` lists the migrations) or run the chronicle \
                         that matches it",
                        drift.join("\n  - ")
                    )));
                }
                shared.ready.store(true, Ordering::Relaxed);
                return Ok(true);
            }
            Err(e) if e.is_refusal() && bounded => return Err(db::connect_failure(url, e)),
            Err(db::ConnectError::Stopped) => {}
            Err(e) if e.is_refusal() => {
                Metrics::add(&shared.metrics.db_errors, 1);
                shared.ready.store(false, Ordering::Relaxed);
                shared.refusals.report(url, &e);
                last_error = Some(e.to_string());
                backoff.wait_until(shared, run_end);
            }
            Err(e) if e.is_connection_error() => {
                shared.connect_error("at start", &e);
                last_error = Some(e.to_string());
                backoff.wait_until(shared, run_end);
            }
            Err(e) => return Err(db::connect_failure(url, e)),
        }
    }
}

/// Runs `f` now and then every `interval` until stop; each turn passes the fail point
/// `name` first.
fn every(shared: &Shared, name: &str, interval: Duration, mut f: impl FnMut()) {
    while !shared.stopping() {
        failpoint::check(name, None);
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
            note_reclaimed(shared, &o);
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

/// Logs and counts what a reclaim did; how many rows it reclaimed.
fn note_reclaimed(shared: &Shared, o: &outbox::RetryOutcome) -> u64 {
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
    n
}

/// For `--until-empty`, once a claim thread found nothing ready: whether the outbox is
/// done with. Rows claimed by a worker that died are not: those whose lease has expired
/// are reclaimed here at once (the claim thread projects them next), and those whose
/// lease has not are waited for (said once in the log), as are the rows a running worker
/// holds, until it completes them.
pub fn settled_for_until_empty(shared: &Shared, conn: &mut impl GenericClient) -> bool {
    match outbox::reclaim_stuck(conn, shared.cfg.max_processing, shared.cfg.max_attempts) {
        Ok(o) if note_reclaimed(shared, &o) > 0 => return false,
        Ok(_) => {}
        Err(e) => {
            shared.db_error("while reclaiming stuck rows before stopping (--until-empty)", &e);
            return false;
        }
    }
    let ours: Vec<Uuid> = shared.held_claims.lock().map(|h| h.iter().copied().collect()).unwrap_or_default();
    match outbox::claimed_elsewhere(conn, &ours) {
        Ok((0, _)) => true,
        Ok((n, lease_left)) => {
            if !shared.until_empty_waiting.swap(true, Ordering::SeqCst) {
                log::info!(
                    "--until-empty: nothing is ready, but {n} row(s) are claimed by another worker (one still \
                     running, or one that stopped without giving them back): waiting for them to be completed or \
                     for their lease to run out (the last in {:.0} s), to reclaim and project them",
                    lease_left.max(0.0)
                );
            }
            false
        }
        Err(e) => {
            shared.db_error("while looking for rows claimed elsewhere (--until-empty)", &e);
            false
        }
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
            shared.mark_ready();
            if let Ok(mut slot) = shared.metrics.gauges.lock() {
                *slot = Some(g);
            }
        }
        Err(e) => shared.db_error("while sampling gauges", &e),
    }
}

/// What the horizon sampler remembers between turns: when it last sampled (the gauges'
/// thread runs it every `horizon::SAMPLE_EVERY`), whether it warned of a horizon held
/// back (so the log says it once per change), and whether this role may not read the
/// views it samples (said once; then it stops trying).
#[derive(Debug, Default)]
pub struct HorizonState {
    pub sampled_at: Option<Instant>,
    pub warned: bool,
    pub refused: bool,
}

/// One turn of the horizon sampler: the age of the oldest holder of the vacuum horizon and
/// the outbox's dead rows (`outbox::horizon`), exported, and a warning in the log when the
/// horizon is held back past `horizon::WARN_AFTER_SECONDS`, once per change.
pub fn sample_horizon_once(shared: &Shared, pool: &db::Pool, state: &mut HorizonState) {
    use outbox::horizon;
    if state.refused {
        return;
    }
    let Some(mut c) = pooled(shared, pool, "horizon") else { return };
    match horizon::sample_horizon(&mut *c) {
        Ok(h) => {
            match horizon::warning(&h) {
                Some(w) if !state.warned => log::warn!("{w}"),
                None if state.warned => log::info!(
                    "the vacuum horizon is no longer held back past {:.0} s: vacuum can remove the outbox's dead \
                     rows again ({} now)",
                    horizon::WARN_AFTER_SECONDS,
                    h.outbox_dead_rows
                ),
                _ => {}
            }
            state.warned = horizon::held_back(&h);
            if let Ok(mut slot) = shared.metrics.horizon.lock() {
                *slot = Some(h);
            }
        }
        Err(e) if e.code() == Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            log::warn!(
                "cannot sample the vacuum horizon (this role may not read pg_stat_activity, pg_prepared_xacts or \
                 pg_replication_slots): {}; its gauges stay empty",
                db::describe_error(&e)
            );
            state.refused = true;
        }
        Err(e) => shared.db_error("while sampling the vacuum horizon", &e),
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
            if let Some((cause, err)) = shared.refusals.recent_shortage(SHORTAGE_SEEN_WITHIN) {
                shared.short_of_slots(what, cause, &err);
                return None;
            }
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
/// when the enqueue trigger notifies. Polling stays the fallback. Any role may notify the
/// channel: the notifications already received when one arrives are taken with it, as
/// one wake-up, and the claim threads coalesce the wake-ups that find nothing to claim
/// (`Shared::idle_wait_since`).
fn listen_loop(shared: &Shared) {
    let mut backoff = Reconnect::new();
    while !shared.stopping() {
        let mut client = match db::connect_until(&shared.cfg.database_url, None, &|| shared.stopping()) {
            Ok(c) => c,
            Err(e) => {
                log::debug!("listener cannot connect: {e}");
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
            failpoint::check("listener", None);
            // A fresh iterator each turn: the driver's timeout is not re-armed after it
            // fires once, and a spent one returns at once without ever waiting on the
            // socket again (a busy loop that never sees a notification).
            let next = notifications.timeout_iter(LISTENER_WAIT).next();
            match next {
                Ok(Some(n)) if n.channel() == shared.stop_channel => {
                    log::debug!("listener: stopping on the worker's shutdown notification");
                    return;
                }
                Ok(Some(_)) => {
                    // Those already received (a burst) are one wake-up with this one.
                    let mut pending = notifications.iter();
                    let mut taken = 1u64;
                    loop {
                        match pending.next() {
                            Ok(Some(n)) if n.channel() == shared.stop_channel => {
                                log::debug!("listener: stopping on the worker's shutdown notification");
                                return;
                            }
                            Ok(Some(_)) => taken += 1,
                            Ok(None) | Err(_) => break, // an error shows again on the next wait
                        }
                    }
                    log::trace!("notified ({taken}): waking idle claim threads");
                    shared.wake_claimers()
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
    let (pool, max_processing) = (pool.clone(), shared.cfg.max_processing);
    // Not asked of a database that was not answering when the worker stopped (readiness is
    // no guide: it ends with the stop).
    let answers = !shared.db_down.load(Ordering::SeqCst);
    let backlog = answers
        .then(|| {
            within(Duration::from_secs(3), move || match pool.get_timeout(Duration::from_secs(2)) {
                Ok(mut c) => {
                    match outbox::sample_gauges(&mut *c, max_processing, Some(outbox::PENDING_COUNTED_UP_TO)) {
                        Ok(g) => format!("{} pending, {} processing", pending_text(&g), g.inflight),
                        Err(e) => format!("unknown ({})", db::describe_error(&e)),
                    }
                }
                Err(e) => format!("unknown ({e})"),
            })
        })
        .flatten()
        .unwrap_or_else(|| "unknown (the database did not answer in time)".to_string());
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
    let panicked = shared.panicked().is_some();
    let grace = shutdown_grace(shared.cfg.lease, panicked);
    let mut finished = wait_finished(&claimers, Instant::now() + SHUTDOWN_PROBE_AFTER.min(grace));
    if !finished && !database_answers(shared, pool) {
        shared.ready.store(false, Ordering::Relaxed);
        shared.db_down.store(true, Ordering::SeqCst);
        log::warn!(
            "the database does not answer: not waiting for in-flight batches (their rows return to pending \
             when their lease runs out)"
        );
        return;
    }
    finished = finished || wait_finished(&claimers, Instant::now() + grace);
    let hard_deadline = Instant::now() + grace + Duration::from_secs(if panicked { 1 } else { 2 });
    if !finished {
        log::warn!("in-flight batches did not finish within {grace:?}: interrupting them and releasing their rows");
        // A cancel stops only the statement running when it arrives: a thread between two
        // statements then would block on its next one. So the statement of each claim
        // thread still running is cancelled again until it has finished (a release that a
        // cancel interrupts is tried again: `claim::release_on_shutdown`): one cancel
        // request at a time per thread, on the thread's current connection, each on a
        // thread of its own so that a server that never answers one holds nothing up.
        let mut cancels: HashMap<ThreadId, JoinHandle<()>> = HashMap::new();
        while !finished && Instant::now() < hard_deadline {
            for claimer in claimers.iter().filter(|h| !h.is_finished()) {
                let id = claimer.thread().id();
                if cancels.get(&id).is_some_and(|c| !c.is_finished()) {
                    continue;
                }
                let Some(token) = shared.cancel_token_of(id) else { continue };
                let url = shared.cfg.database_url.clone();
                let cancel = spawn("cancel", move || {
                    if let Err(e) = db::cancel_query(&url, &token) {
                        log::debug!("could not cancel a claim thread's statement: {e}");
                    }
                });
                if let Ok(cancel) = cancel {
                    cancels.insert(id, cancel);
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
            // A panic was seen by the panic hook already (`Shared::thread_panicked`).
            let _ = h.join();
        }
    }
    release_held_claims(shared, pool);
}

/// Gives back, with their attempt, the rows of every claim still held once the threads
/// have stopped: a claim thread that panicked could not, nor one that did not finish in
/// time. Otherwise they would wait for their lease, or for `OUTBOX_MAX_PROCESSING_SECONDS`.
fn release_held_claims(shared: &Shared, pool: &db::Pool) {
    let tokens: Vec<Uuid> = shared.held_claims.lock().map(|mut h| h.drain().collect()).unwrap_or_default();
    if tokens.is_empty() {
        return;
    }
    let released = pool
        .get_timeout(Duration::from_secs(1))
        .map_err(|e| e.to_string())
        .and_then(|mut c| outbox::release_claims(&mut *c, &tokens).map_err(|e| db::describe_error(&e)));
    match released {
        Ok(n) => log::info!("gave back {n} row(s) of {} claim(s) left held at shutdown", tokens.len()),
        Err(e) => log::warn!(
            "could not give back the rows of {} claim(s) left held at shutdown (the reclaim loop of a worker \
             will, once their lease expires): {e}",
            tokens.len()
        ),
    }
}

/// How long shutdown waits for in-flight batches before it looks whether the database
/// still answers at all (`database_answers`).
const SHUTDOWN_PROBE_AFTER: Duration = Duration::from_millis(150);

/// How long the database may take to answer at shutdown before it is taken not to answer
/// at all: a server that answers does in far less.
const SHUTDOWN_PROBE_LIMIT: Duration = Duration::from_millis(500);

/// Whether the database answers within `SHUTDOWN_PROBE_LIMIT`: a `SELECT 1` on a
/// connection the pool has idle (one round trip), else a new connection. A claim thread
/// waiting on a network gone silent (a path that drops packets, a server that stopped
/// answering) would not finish in any grace period, nor would a cancel request reach the
/// server: shutdown then stops waiting at once.
fn database_answers(shared: &Shared, pool: &db::Pool) -> bool {
    let url = &shared.cfg.database_url;
    if let Some(mut c) = pool.try_get() {
        match within(SHUTDOWN_PROBE_LIMIT, move || c.simple_query("SELECT 1").map(|_| ())) {
            Some(Ok(())) => return true,
            None => {
                log::debug!("at shutdown, the database at {url} does not answer within {SHUTDOWN_PROBE_LIMIT:?}");
                return false;
            }
            // That connection was broken: a new one says whether the database answers.
            Some(Err(e)) => log::debug!("at shutdown, an idle connection is broken: {}", db::describe_error(&e)),
        }
    }
    match db::connect_until(url, Some(Instant::now() + SHUTDOWN_PROBE_LIMIT), &|| false) {
        Ok(_) => true,
        Err(e) => {
            log::debug!("at shutdown, the database at {url} does not answer: {e}");
            false
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
    let channel = shared.stop_channel.clone();
    match within(LISTENER_WAIT, move || c.execute("SELECT pg_notify($1, '')", &[&channel])) {
        Some(Ok(_)) => {}
        Some(Err(e)) => log::debug!("could not notify the listener of shutdown: {}", db::describe_error(&e)),
        None => log::debug!("the database did not answer the listener's shutdown notification in time"),
    }
}

/// Runs `f` on a thread of its own and waits for its result up to `limit`: for a
/// statement at exit, where a server gone silent must not hold the process (the thread
/// is then left to end with it).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    spawn("exit-query", move || {
        let _ = tx.send(f());
    })
    .ok()?;
    rx.recv_timeout(limit).ok()
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
