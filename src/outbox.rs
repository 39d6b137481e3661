//! The outbox state machine (docs/DESIGN.md §3): one named SQL statement per transition,
//! each guarded by the state it expects, and one function that runs it and reports
//! what changed. Completion is fenced on the claim token, so a worker that lost its
//! claim (reclaimed after its lease, maybe claimed again by someone else) changes
//! nothing.
//!
//! ```text
//! pending ──claim_batch──▶ processing ──mark_done──▶ done
//!    ▲                        │ ├──mark_failed──▶ failed ──replay (ops)──▶ pending
//!    └──schedule_retry / release_claim(s) / reclaim_stuck (attempts ≥ max: failed)
//! ```
//!
//! The operations keep one open delivery per event (DESIGN §3): a rebuild records a
//! failure on the event's failed delivery, revives it (`--emit-outbox`), or closes it
//! (failed → done) when it wrote the event's entry.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{GenericClient, ToStatement};
use uuid::Uuid;

use crate::error_reason::ErrorReason;
use crate::event::{read_event, Event, Unreadable, EVENT_COLUMNS};

pub mod horizon;
pub mod replay_report;

/// A row claimed for projection, with its event: None if the event no longer exists or
/// is over the size limit (then `bytes` says so), `Err` if it exists but cannot be read
/// (it fails alone, not its batch).
#[derive(Debug, Clone)]
pub struct Claimed {
    pub outbox_id: i64,
    pub attempts: i32,
    pub event_id: Uuid,
    /// The event's size as text (its jsonb and text columns), measured by the database,
    /// or its stored size when that is already over the limit; None if the event does
    /// not exist.
    pub bytes: Option<i64>,
    pub event: Option<Result<Event, Unreadable>>,
}

/// The size limits of a claim, in bytes of the events' text (DESIGN: the worker's
/// memory follows them, not the events' count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimits {
    /// An event larger than this is never loaded: it fails `invalid_payload`.
    pub max_event_bytes: u64,
    /// A claim stops adding rows once their total passes this (always at least one row).
    pub batch_max_bytes: u64,
}

impl Default for SizeLimits {
    fn default() -> Self {
        SizeLimits { max_event_bytes: 16 << 20, batch_max_bytes: 32 << 20 }
    }
}

impl SizeLimits {
    /// The message of an event over the limit.
    pub fn too_large(&self, bytes: i64) -> Option<String> {
        (bytes > self.max_event_bytes as i64)
            .then(|| format!("event is {bytes} bytes; OUTBOX_MAX_EVENT_BYTES is {}", self.max_event_bytes))
    }
}

/// One claim's parameters.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// The batch size (`OUTBOX_BATCH_SIZE`): a healthy claim takes up to this many rows.
    pub limit: u32,
    pub worker_id: &'a str,
    pub token: Uuid,
    pub lease: Duration,
    /// Whether suspect rows (reclaimed after an expired lease) go before healthy ones
    /// this turn. Suspects are always taken when no healthy row is ready.
    pub suspects_first: bool,
    pub sizes: SizeLimits,
    /// The lowest id a healthy claim considers (`0`: every row). A claim thread passes
    /// the lowest id of its previous full claim while it drains a backlog
    /// (`worker::claim::ClaimFloor`), so the claim does not walk again over the rows already
    /// claimed before it.
    pub floor: i64,
}

/// The size of an event as text, the measure of both limits: what the driver receives.
pub const EVENT_BYTES: &str = "octet_length(e.entity_type)::bigint + octet_length(e.event_type)
    + coalesce(octet_length(e.before::text), 0)::bigint + coalesce(octet_length(e.after::text), 0)
    + coalesce(octet_length(e.diff::text), 0)::bigint + coalesce(octet_length(e.request_id), 0)
    + coalesce(octet_length(e.client), 0)::bigint + coalesce(octet_length(e.reason), 0)";

/// The size of an event as stored (its jsonb columns as PostgreSQL keeps them, possibly
/// compressed, and its text columns): cheap, since it reads no value. The claim uses it
/// first: an event whose stored size is already over the limit fails without being
/// turned into text (costly for a large event, and paid again on every claim that
/// considers it if the claim does not finish).
pub const STORED_EVENT_BYTES: &str = "octet_length(e.entity_type)::bigint + octet_length(e.event_type)
    + coalesce(pg_column_size(e.before), 0)::bigint + coalesce(pg_column_size(e.after), 0)
    + coalesce(pg_column_size(e.diff), 0)::bigint + coalesce(octet_length(e.request_id), 0)
    + coalesce(octet_length(e.client), 0)::bigint + coalesce(octet_length(e.reason), 0)";

/// pending → processing: the oldest ready rows, skipping rows other workers hold, each
/// attempt counted, with their events loaded in the same round trip.
///
/// - Suspects (`reclaims` > 0, back from an expired lease) are claimed alone, `$1 >>
///   reclaims` at a time, so an event that kills the process is cornered in a claim of its
///   own within log2(batch) crashes. `$5` says whether they go first this turn (the worker
///   alternates, so they never starve the healthy backlog).
/// - Healthy rows are taken from id `$8` up (`worker::claim::ClaimFloor`): the pending
///   index keeps entries for rows that left `pending` until a vacuum, and a walk from the
///   lowest id would step over all of them at every claim of a backlog.
/// - Size limits: a candidate over `$6` is claimed without being loaded (the worker fails
///   it); rows are taken until their total passes `$7`. `sized` and `picked` are
///   MATERIALIZED so each size is measured once, not once per row of a later join.
/// - No step depends on the planner's row estimates (wrong exactly after a burst): the
///   event is a `LIMIT 1` primary-key lookup, the update finds its rows by the `ctid`s the
///   lock returned, and `CLAIM_PLANNER_SETTINGS` leave only the index walks, so one plan
///   per connection holds for an empty outbox and a backlog alike. A row updated by a
///   transaction that committed after the snapshot stays `pending` for the next claim.
/// - The lease counts from the statement's clock, not the transaction's: a claim chained
///   into a slow completion gets its whole lease.
pub const CLAIM_BATCH: &str = "
    WITH lead AS (
        SELECT reclaims FROM chronicle_outbox_events
        WHERE status = 'pending' AND reclaims > 0 AND (next_retry_at IS NULL OR next_retry_at <= now())
        ORDER BY id
        LIMIT 1
    ), plan AS (
        SELECT CASE WHEN (SELECT reclaims FROM lead) IS NULL THEN NULL
                    WHEN $5::bool OR (SELECT id FROM chronicle_outbox_events
                                      WHERE status = 'pending' AND reclaims = 0
                                        AND (next_retry_at IS NULL OR next_retry_at <= now())
                                      ORDER BY id
                                      LIMIT 1) IS NULL
                    THEN (SELECT reclaims FROM lead) END AS k
    ), suspects AS (
        SELECT id, ctid, event_id, attempts FROM chronicle_outbox_events
        WHERE status = 'pending' AND reclaims > 0 AND (next_retry_at IS NULL OR next_retry_at <= now())
          AND (SELECT k FROM plan) IS NOT NULL
        ORDER BY id
        LIMIT greatest(1, $1::bigint >> least((SELECT k FROM plan), 62))
        FOR UPDATE SKIP LOCKED
    ), healthy AS (
        SELECT id, ctid, event_id, attempts FROM chronicle_outbox_events
        WHERE status = 'pending' AND reclaims = 0 AND (next_retry_at IS NULL OR next_retry_at <= now())
          AND (SELECT k FROM plan) IS NULL AND id >= $8
        ORDER BY id
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    ), sized AS MATERIALIZED (
        SELECT r.id AS outbox_id, r.ctid AS outbox_ctid, r.attempts, r.event_id AS delivered_event_id,
               CASE WHEN {STORED_EVENT_BYTES} > $6::bigint THEN {STORED_EVENT_BYTES}
                    ELSE {EVENT_BYTES} END AS bytes,
               e.*
        FROM (SELECT id, ctid, event_id, attempts FROM suspects
              UNION ALL SELECT id, ctid, event_id, attempts FROM healthy) r
        LEFT JOIN LATERAL (SELECT * FROM chronicle_events e WHERE e.id = r.event_id LIMIT 1) e ON true
    ), picked AS MATERIALIZED (
        SELECT * FROM (
            SELECT sized.*,
                   coalesce(sum(CASE WHEN bytes <= $6::bigint THEN bytes ELSE 0 END)
                            OVER (ORDER BY outbox_id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                       AS bytes_before
            FROM sized
        ) s
        WHERE bytes_before < $7::bigint
    ), claimed AS (
        UPDATE chronicle_outbox_events o
        SET status = 'processing', claimed_by = $2, claim_token = $3, claimed_at = statement_timestamp(),
            lease_until = statement_timestamp() + make_interval(secs => $4), attempts = o.attempts + 1,
            updated_at = now()
        WHERE o.ctid = ANY (ARRAY(SELECT outbox_ctid FROM picked))
        RETURNING o.id
    )
    SELECT p.outbox_id, p.attempts + 1, p.delivered_event_id, p.bytes, e.* FROM picked p
    LEFT JOIN LATERAL (SELECT {EVENT_COLUMNS} FROM (SELECT p.*) x
                       WHERE p.bytes <= $6::bigint) e ON true
    WHERE (p.outbox_id IN (SELECT id FROM claimed)) IS TRUE
    ORDER BY p.outbox_id";

/// How a claim is planned: set with `SET LOCAL` in the claim's own transaction, so they
/// end with it (a pooler that hands the server connection to another client next passes
/// nothing on). One generic plan for the prepared `CLAIM_BATCH`, made once per connection
/// instead of at every claim, and no sequential scan, bitmap scan, sort or JIT to choose
/// from, so that the plan made once is the one of a few index, TID and primary-key
/// lookups whatever the table held when it was made: an empty outbox, one never
/// analyzed, statistics from a quiet day.
///
/// And one setting of how the claim's rows are read: in a `SQL_ASCII` database (which
/// `migrate` refuses, but which may have been migrated by an older version) text is stored
/// unchecked, and the server, converting a row to the driver's UTF-8, fails the whole
/// claim on one invalid byte (`22021`), every time, with the good events behind it. There
/// the claim takes the bytes as stored (`client_encoding` `SQL_ASCII`: no conversion),
/// and the driver, reading the event, finds the one that is not UTF-8: it fails alone,
/// `invalid_payload` (`event::read_event`). Any other database is left converting.
pub const CLAIM_PLANNER_SETTINGS: &str = "SET LOCAL plan_cache_mode = force_generic_plan; \
     SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off; \
     SET LOCAL jit = off; \
     SELECT set_config('client_encoding', 'SQL_ASCII', true) WHERE current_setting('server_encoding') = 'SQL_ASCII'";

/// `CLAIM_BATCH` with the event columns filled in: the text that is prepared or run.
pub fn claim_batch_sql() -> String {
    CLAIM_BATCH
        .replace("{EVENT_COLUMNS}", EVENT_COLUMNS)
        .replace("{STORED_EVENT_BYTES}", STORED_EVENT_BYTES)
        .replace("{EVENT_BYTES}", EVENT_BYTES)
}

/// A claim with the default size limits, suspects first (tests, tools).
pub fn claim_batch(
    client: &mut impl GenericClient,
    limit: u32,
    worker_id: &str,
    token: Uuid,
    lease: Duration,
) -> Result<Vec<Claimed>, postgres::Error> {
    let req =
        ClaimRequest { limit, worker_id, token, lease, suspects_first: true, sizes: SizeLimits::default(), floor: 0 };
    claim_batch_with(client, claim_batch_sql().as_str(), &req, |c| c)
}

/// A claim with the statement given: its text, or the same text prepared once on this
/// connection (the worker's hot path: no parse and plan per batch). Each row is handed
/// to `each` as it arrives from the server and dropped, so a batch's raw rows and what
/// `each` makes of them are never in memory at once.
pub fn claim_batch_with<S: ToStatement + ?Sized, T>(
    client: &mut impl GenericClient,
    statement: &S,
    req: &ClaimRequest<'_>,
    mut each: impl FnMut(Claimed) -> T,
) -> Result<Vec<T>, postgres::Error> {
    let values = ClaimValues::of(req);
    let mut rows = client.query_raw(statement, values.params())?;
    let mut claimed = Vec::with_capacity(req.limit.min(10_000) as usize);
    while let Some(r) = rows.next()? {
        claimed.push(each(read_claimed(&r, &req.sizes)?));
    }
    Ok(claimed)
}

/// The claim's rows as the server sent them, unread: the worker holds them, compact, until
/// the claim commits, then reads (`read_claimed`) and projects them one at a time.
pub fn claim_rows<S: ToStatement + ?Sized>(
    client: &mut impl GenericClient,
    statement: &S,
    req: &ClaimRequest<'_>,
) -> Result<Vec<postgres::Row>, postgres::Error> {
    client.query(statement, &ClaimValues::of(req).params())
}

/// One row of `CLAIM_BATCH`: its event read only when it is within the size limit.
pub fn read_claimed(r: &postgres::Row, sizes: &SizeLimits) -> Result<Claimed, postgres::Error> {
    let bytes: Option<i64> = r.try_get(3)?;
    let loaded = bytes.is_some_and(|b| b <= max_event_param(sizes));
    Ok(Claimed {
        outbox_id: r.try_get(0)?,
        attempts: r.try_get(1)?,
        event_id: r.try_get(2)?,
        bytes,
        event: if loaded { Some(read_event(r, 4)?) } else { None },
    })
}

fn max_event_param(sizes: &SizeLimits) -> i64 {
    sizes.max_event_bytes.min(i64::MAX as u64) as i64
}

/// The values of `CLAIM_BATCH`'s parameters, as the types it declares.
struct ClaimValues<'a> {
    limit: i64,
    worker_id: &'a str,
    token: Uuid,
    lease: f64,
    suspects_first: bool,
    max_event: i64,
    max_batch: i64,
    floor: i64,
}

impl<'a> ClaimValues<'a> {
    fn of(req: &ClaimRequest<'a>) -> ClaimValues<'a> {
        ClaimValues {
            limit: req.limit as i64,
            worker_id: req.worker_id,
            token: req.token,
            lease: req.lease.as_secs_f64(),
            suspects_first: req.suspects_first,
            max_event: max_event_param(&req.sizes),
            max_batch: req.sizes.batch_max_bytes.clamp(1, i64::MAX as u64) as i64,
            floor: req.floor.max(0),
        }
    }

    /// `$1` … `$8`, in order.
    fn params(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.limit,
            &self.worker_id,
            &self.token,
            &self.lease,
            &self.suspects_first,
            &self.max_event,
            &self.max_batch,
            &self.floor,
        ]
    }
}

/// processing → done, for the rows this claim still holds. Returns the ids marked and,
/// for the latency histogram, how long ago each delivery was enqueued, by the database's
/// clock on both ends (the outbox row's `created_at` is stamped by the enqueue trigger,
/// whatever the writer put in the event's `created_at`).
pub const MARK_DONE: &str = "
    UPDATE chronicle_outbox_events
    SET status = 'done', processed_at = now(), lease_until = NULL, next_retry_at = NULL,
        error_reason = NULL, error = NULL, updated_at = now()
    WHERE id = ANY($1) AND status = 'processing' AND claim_token = $2
    RETURNING id, extract(epoch FROM clock_timestamp() - created_at)::float8";

/// A row marked done, and the seconds since its delivery was enqueued.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Done {
    pub outbox_id: i64,
    pub since_enqueued_seconds: f64,
}

pub fn mark_done(client: &mut impl GenericClient, ids: &[i64], token: Uuid) -> Result<Vec<Done>, postgres::Error> {
    mark_done_with(client, MARK_DONE, ids, token)
}

/// `mark_done` with the statement given (its text, or `MARK_DONE` prepared).
pub fn mark_done_with<S: ToStatement + ?Sized>(
    client: &mut impl GenericClient,
    statement: &S,
    ids: &[i64],
    token: Uuid,
) -> Result<Vec<Done>, postgres::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = client.query(statement, &[&ids, &token])?;
    rows.iter().map(|r| Ok(Done { outbox_id: r.try_get(0)?, since_enqueued_seconds: r.try_get(1)? })).collect()
}

/// The rows among `$1` that the claim `$2` still holds, locked until the transaction ends:
/// a completion that must write entries one at a time (`worker::claim`'s isolating path)
/// takes them first, so that nothing reclaims them before they are settled and no row
/// lost meanwhile gets an entry. Not a transition: the rows stay `processing`.
pub const LOCK_HELD: &str = "
    SELECT id FROM chronicle_outbox_events
    WHERE id = ANY($1) AND status = 'processing' AND claim_token = $2
    ORDER BY id
    FOR UPDATE";

pub fn lock_held(
    client: &mut impl GenericClient,
    ids: &[i64],
    token: Uuid,
) -> Result<std::collections::HashSet<i64>, postgres::Error> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    client.query(LOCK_HELD, &[&ids, &token])?.iter().map(|r| r.try_get(0)).collect()
}

/// A deterministic failure of one row: its closed-list reason and the full message.
#[derive(Debug, Clone)]
pub struct Failure {
    pub outbox_id: i64,
    pub error_reason: ErrorReason,
    pub error: String,
}

/// processing → failed (deterministic: retrying cannot help), fenced.
pub const MARK_FAILED: &str = "
    UPDATE chronicle_outbox_events o
    SET status = 'failed', error_reason = f.reason, error = f.error, lease_until = NULL,
        next_retry_at = NULL, updated_at = now()
    FROM unnest($1::bigint[], $2::text[], $3::text[]) AS f(id, reason, error)
    WHERE o.id = f.id AND o.status = 'processing' AND o.claim_token = $4
    RETURNING o.id, o.error_reason";

/// Returns the reasons of the rows actually marked.
pub fn mark_failed(
    client: &mut impl GenericClient,
    failures: &[Failure],
    token: Uuid,
) -> Result<Vec<ErrorReason>, postgres::Error> {
    if failures.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = failures.iter().map(|f| f.outbox_id).collect();
    let reasons: Vec<&str> = failures.iter().map(|f| f.error_reason.as_str()).collect();
    let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
    let rows = client.query(MARK_FAILED, &[&ids, &reasons, &errors, &token])?;
    // The reasons of the rows it failed (those this claim still held).
    let failed: std::collections::HashSet<i64> = rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
    Ok(failures.iter().filter(|f| failed.contains(&f.outbox_id)).map(|f| f.error_reason).collect())
}

/// processing → pending with a retry time (transient failure), or → failed with
/// `max_attempts_exceeded` once the row has used its attempts. Fenced.
pub const SCHEDULE_RETRY: &str = "
    UPDATE chronicle_outbox_events o
    SET status = CASE WHEN o.attempts >= $3 THEN 'failed' ELSE 'pending' END,
        error_reason = CASE WHEN o.attempts >= $3 THEN 'max_attempts_exceeded' END,
        next_retry_at = CASE WHEN o.attempts >= $3 THEN NULL
                             ELSE now() + make_interval(secs => r.delay) END,
        error = $4, claim_token = NULL, lease_until = NULL, updated_at = now()
    FROM unnest($1::bigint[], $2::float8[]) AS r(id, delay)
    WHERE o.id = r.id AND o.status = 'processing' AND o.claim_token = $5
    RETURNING o.status";

/// What a retry statement did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetryOutcome {
    pub retried: u64,
    pub exhausted: u64,
}

impl RetryOutcome {
    /// Counts rows returned as `RETURNING status`: failed ones used their last attempt.
    fn from_statuses(rows: &[postgres::Row]) -> Result<RetryOutcome, postgres::Error> {
        let mut out = RetryOutcome::default();
        for r in rows {
            let status: String = r.try_get(0)?;
            if status == "failed" {
                out.exhausted += 1;
            } else {
                out.retried += 1;
            }
        }
        Ok(out)
    }
}

pub fn schedule_retry(
    client: &mut impl GenericClient,
    ids_and_delays: &[(i64, Duration)],
    max_attempts: u32,
    error: &str,
    token: Uuid,
) -> Result<RetryOutcome, postgres::Error> {
    let ids: Vec<i64> = ids_and_delays.iter().map(|(id, _)| *id).collect();
    let delays: Vec<f64> = ids_and_delays.iter().map(|(_, d)| d.as_secs_f64()).collect();
    let rows = client.query(SCHEDULE_RETRY, &[&ids, &delays, &(max_attempts as i32), &error, &token])?;
    RetryOutcome::from_statuses(&rows)
}

/// processing → pending on a clean shutdown: the attempt is given back, since the row
/// was never tried. Fenced.
pub const RELEASE_CLAIM: &str = "
    UPDATE chronicle_outbox_events
    SET status = 'pending', attempts = greatest(attempts - 1, 0), claimed_by = NULL,
        claim_token = NULL, claimed_at = NULL, lease_until = NULL, updated_at = now()
    WHERE id = ANY($1) AND status = 'processing' AND claim_token = $2";

pub fn release_claim(client: &mut impl GenericClient, ids: &[i64], token: Uuid) -> Result<u64, postgres::Error> {
    client.execute(RELEASE_CLAIM, &[&ids, &token])
}

/// processing → pending for every row still held by the given claims, when the worker
/// stops and a claim thread could not give its rows back itself (it panicked, or did not
/// finish in time): the attempt is given back, as by `RELEASE_CLAIM`. Rows locked by a
/// completion still running are skipped: it settles them, or their lease expires. Fenced.
pub const RELEASE_CLAIMS: &str = "
    WITH held AS (
        SELECT id FROM chronicle_outbox_events
        WHERE status = 'processing' AND claim_token = ANY($1)
        FOR UPDATE SKIP LOCKED
    )
    UPDATE chronicle_outbox_events o
    SET status = 'pending', attempts = greatest(o.attempts - 1, 0), claimed_by = NULL,
        claim_token = NULL, claimed_at = NULL, lease_until = NULL, updated_at = now()
    FROM held WHERE o.id = held.id";

pub fn release_claims(client: &mut impl GenericClient, tokens: &[Uuid]) -> Result<u64, postgres::Error> {
    if tokens.is_empty() {
        return Ok(0);
    }
    client.execute(RELEASE_CLAIMS, &[&tokens])
}

/// Extends the lease of rows still held by the given claims (a live worker on a slow
/// database), never past `OUTBOX_MAX_PROCESSING_SECONDS` since the claim. Rows locked
/// by their own completing transaction are skipped: they cannot be reclaimed anyway.
pub const EXTEND_LEASE: &str = "
    WITH held AS (
        SELECT id FROM chronicle_outbox_events
        WHERE status = 'processing' AND claim_token = ANY($1)
          AND claimed_at + make_interval(secs => $3) > now()
        FOR UPDATE SKIP LOCKED
    )
    UPDATE chronicle_outbox_events o
    SET lease_until = least(now() + make_interval(secs => $2),
                            o.claimed_at + make_interval(secs => $3)),
        updated_at = now()
    FROM held WHERE o.id = held.id";

pub fn extend_lease(
    client: &mut impl GenericClient,
    tokens: &[Uuid],
    lease: Duration,
    max_processing: Duration,
) -> Result<u64, postgres::Error> {
    if tokens.is_empty() {
        return Ok(0);
    }
    client.execute(EXTEND_LEASE, &[&tokens, &lease.as_secs_f64(), &max_processing.as_secs_f64()])
}

/// The outbox's statistics: the planner's row estimate (negative until its first `ANALYZE`
/// or `VACUUM`), whether it holds rows, the rows inserted, updated or deleted since its
/// last `ANALYZE` (the server's activity statistics), and whether this role may analyze
/// it (its owner, or the database's).
pub const OUTBOX_STATISTICS: &str = "
    SELECT c.reltuples::float8, pg_relation_size(c.oid) > 0, coalesce(s.n_mod_since_analyze, 0),
           pg_has_role(c.relowner, 'USAGE')
             OR pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE')
    FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
    WHERE c.oid = 'chronicle_outbox_events'::regclass";

/// Fresh statistics for the outbox. `SKIP_LOCKED`: while a (auto)vacuum or another worker's
/// `ANALYZE` holds the table, it does nothing rather than wait. Not a transition of any row.
pub const ANALYZE_OUTBOX: &str = "ANALYZE (SKIP_LOCKED) chronicle_outbox_events";

/// Rows changed since the last `ANALYZE` past which the outbox's statistics are stale: this
/// many, plus `STALE_SHARE` of the rows they counted. Autovacuum analyzes the outbox much
/// sooner (migration 2 sets 1,000 plus 2 %); the worker's check is for a server whose
/// autovacuum is off or behind.
pub const STALE_ROWS: f64 = 1000.0;
pub const STALE_SHARE: f64 = 0.2;

/// Whether the outbox needs an `ANALYZE`: it holds rows and has never been analyzed, or
/// more rows changed since its last one than `STALE_ROWS` + `STALE_SHARE` of its rows.
pub fn statistics_are_stale(reltuples: f64, has_rows: bool, modified_since_analyze: i64) -> bool {
    if reltuples < 0.0 {
        return has_rows;
    }
    modified_since_analyze as f64 > STALE_ROWS + STALE_SHARE * reltuples
}

/// What `analyze_if_stale` found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Analyze {
    /// The statistics are fresh enough, or the outbox is empty and was never analyzed.
    Fresh,
    /// Analyzed now.
    Analyzed,
    /// Stale, but the table was busy (a vacuum or another `ANALYZE`): the next turn tries again.
    Busy,
    /// Stale, and only the table's or the database's owner may analyze it.
    NotAllowed,
}

/// Analyzes the outbox when its statistics are missing or stale (`statistics_are_stale`):
/// with the server's autovacuum off, before its first pass, or behind. The plans made
/// from them read the whole table otherwise: with no statistics the planner guesses how
/// many rows are pending; with statistics taken while a backlog waited, every row looks
/// pending, and a claim may walk the primary key over the whole `done` history the drain
/// left instead of the pending index (`CLAIM_BATCH`). An `ANALYZE` invalidates the plans
/// the claim threads hold, so their next claim is planned from the new statistics.
pub fn analyze_if_stale(client: &mut impl GenericClient) -> Result<Analyze, postgres::Error> {
    let before = outbox_statistics(client)?;
    if !before.is_stale() {
        return Ok(Analyze::Fresh);
    }
    if !before.may_analyze {
        return Ok(Analyze::NotAllowed);
    }
    client.batch_execute(ANALYZE_OUTBOX)?;
    Ok(if outbox_statistics(client)?.is_stale() { Analyze::Busy } else { Analyze::Analyzed })
}

struct OutboxStatistics {
    reltuples: f64,
    has_rows: bool,
    modified_since_analyze: i64,
    may_analyze: bool,
}

impl OutboxStatistics {
    fn is_stale(&self) -> bool {
        statistics_are_stale(self.reltuples, self.has_rows, self.modified_since_analyze)
    }
}

fn outbox_statistics(client: &mut impl GenericClient) -> Result<OutboxStatistics, postgres::Error> {
    let r = client.query_one(OUTBOX_STATISTICS, &[])?;
    Ok(OutboxStatistics {
        reltuples: r.try_get(0)?,
        has_rows: r.try_get(1)?,
        modified_since_analyze: r.try_get(2)?,
        may_analyze: r.try_get(3)?,
    })
}

/// processing → pending for stuck rows (lease expired, or processing longer than
/// `OUTBOX_MAX_PROCESSING_SECONDS`), keeping the attempt so an event that kills every
/// worker still ends; a row that has used its attempts → failed `max_attempts_exceeded`.
/// Each reclaim is counted on the row (`reclaims`): the claim takes such suspects alone,
/// in ever smaller claims (`CLAIM_BATCH`).
pub const RECLAIM_STUCK: &str = "
    WITH stuck AS (
        SELECT id FROM chronicle_outbox_events
        WHERE status = 'processing'
          AND (lease_until < now() OR claimed_at < now() - make_interval(secs => $1))
        ORDER BY id
        LIMIT 10000
        FOR UPDATE SKIP LOCKED
    )
    UPDATE chronicle_outbox_events o
    SET status = CASE WHEN o.attempts >= $2 THEN 'failed' ELSE 'pending' END,
        error_reason = CASE WHEN o.attempts >= $2 THEN 'max_attempts_exceeded' END,
        error = CASE WHEN o.attempts >= $2
                     THEN 'reclaimed after its lease expired with every attempt used (last claimed by '
                          || coalesce(o.claimed_by, '?') || ')'
                     ELSE o.error END,
        claim_token = NULL, lease_until = NULL, next_retry_at = NULL, reclaims = o.reclaims + 1,
        updated_at = now()
    FROM stuck WHERE o.id = stuck.id
    RETURNING o.status";

pub fn reclaim_stuck(
    client: &mut impl GenericClient,
    max_processing: Duration,
    max_attempts: u32,
) -> Result<RetryOutcome, postgres::Error> {
    let rows = client.query(RECLAIM_STUCK, &[&max_processing.as_secs_f64(), &(max_attempts as i32)])?;
    RetryOutcome::from_statuses(&rows)
}

/// How many rows are `processing` under a claim other than those in `$1` (another
/// worker's, running or dead), and how long until the last of their leases runs out.
pub const CLAIMED_ELSEWHERE: &str = "
    SELECT count(*), coalesce(extract(epoch FROM max(lease_until) - now()), 0)::float8
    FROM chronicle_outbox_events
    WHERE status = 'processing' AND NOT coalesce(claim_token = ANY ($1::uuid[]), false)";

/// Rows held by claims other than `ours`, and the seconds until the last lease of them ends.
pub fn claimed_elsewhere(client: &mut impl GenericClient, ours: &[Uuid]) -> Result<(i64, f64), postgres::Error> {
    let r = client.query_one(CLAIMED_ELSEWHERE, &[&ours])?;
    Ok((r.try_get(0)?, r.try_get(1)?))
}

/// How many `pending` rows the gauges count one by one; beyond it they estimate
/// (`estimate_pending`). Counting reads an index entry per row, every second in every
/// worker: past this many, a rebuild's millions of deliveries would make each sample take
/// seconds.
pub const PENDING_COUNTED_UP_TO: i64 = 10_000;

/// The gauges an operator watches, sampled in one query (docs/DESIGN.md §6). Each figure is
/// its own sub-select on a partial index, so the cost follows the live rows (pending,
/// processing, failed), never the `done` history: a scan of the whole outbox every second
/// read it all (BENCHMARKS.md).
///
/// The pending rows are counted in id order up to `$2` (NULL: all of them), so the count
/// walks the pending index and stops there; with it comes the last id it counted, from
/// which `ESTIMATE_PENDING` goes on. "Oldest pending" is the oldest row *ready* to be
/// claimed (not waiting for a retry), the one the worker claims next; the oldest pending
/// row of any kind comes with it. Both are the smallest id, the order the worker claims
/// in: found at the start of the pending index, the ready one after the rows ahead of it
/// that wait for a retry, looked for among the same first `$2` rows (NULL when none of
/// them is ready), so a pile of rows waiting for their retry costs no more than the
/// count; with it, the age of the last row counted, which the ready row after them is
/// not much older than (`sample_gauges`).
pub const SAMPLE_GAUGES: &str = "
    SELECT
        p.counted, p.last_counted_id,
        (SELECT extract(epoch FROM now() - h.created_at)
         FROM (SELECT id, created_at, next_retry_at FROM chronicle_outbox_events
               WHERE status = 'pending' ORDER BY id LIMIT $2) h
         WHERE h.next_retry_at IS NULL OR h.next_retry_at <= now()
         ORDER BY h.id LIMIT 1)::float8,
        coalesce((SELECT extract(epoch FROM now() - created_at) FROM chronicle_outbox_events
                  WHERE status = 'pending' ORDER BY id LIMIT 1), 0)::float8,
        (SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing'),
        (SELECT count(*) FROM chronicle_outbox_events
         WHERE status = 'processing'
           AND (lease_until < now() OR claimed_at < now() - make_interval(secs => $1))),
        (SELECT count(DISTINCT f.event_id) FROM chronicle_outbox_events f
         WHERE f.status = 'failed'
           AND NOT EXISTS (SELECT 1 FROM chronicle_outbox_events s WHERE s.event_id = f.event_id
                           AND (s.status IN ('pending', 'processing') OR (s.status = 'done' AND s.id > f.id)))),
        (SELECT extract(epoch FROM now() - created_at) FROM chronicle_outbox_events
         WHERE id = p.last_counted_id)::float8
    FROM (SELECT count(*) AS counted, max(id) AS last_counted_id
          FROM (SELECT id FROM chronicle_outbox_events WHERE status = 'pending' ORDER BY id LIMIT $2) c) p";

/// What the estimate of the pending rows beyond the counted ones starts from: the last
/// pending id (the end of the pending index), and the planner's own estimate of the
/// pending rows, as it makes it (the share of `pending` among the status values its last
/// `ANALYZE` sampled, times its row estimate scaled to the table's current size in
/// pages); NULL without statistics. Reads the end of one index and the catalog only.
pub const ESTIMATE_PENDING: &str = "
    SELECT
        (SELECT id FROM chronicle_outbox_events WHERE status = 'pending' ORDER BY id DESC LIMIT 1),
        (SELECT CASE WHEN c.reltuples < 0 OR c.relpages = 0 THEN NULL
                     ELSE c.reltuples / c.relpages * (pg_relation_size(c.oid) / current_setting('block_size')::float8)
                          * (SELECT f.freq
                             FROM pg_stats s
                             CROSS JOIN LATERAL unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS f(val, freq)
                             WHERE s.schemaname = n.nspname AND s.tablename = c.relname AND s.attname = 'status'
                               AND NOT s.inherited AND f.val = 'pending')
                END::float8
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = 'chronicle_outbox_events'::regclass)";

/// The pending rows past `counted` (the first rows of the pending index, in id order, the
/// last of them `last_counted_id`), estimated: the planner's estimate, kept within what is
/// certain. At least the rows counted; at most those plus one per id after the last one
/// counted up to the last pending id (ids are unique, so no more rows can be pending). The
/// claims take rows in id order, so past the first rows (those that wait for a retry, the
/// ready ones being claimed) a backlog is nearly every id: that bound is close while a
/// backlog drains, and corrects statistics taken before it drained. Without statistics,
/// the bound.
pub fn estimate_pending(counted: i64, last_counted_id: i64, last_pending_id: i64, planner: Option<f64>) -> i64 {
    let upper = counted.saturating_add(last_pending_id.saturating_sub(last_counted_id).max(0));
    let estimate = planner.filter(|p| p.is_finite()).map_or(upper, |p| p.round().min(i64::MAX as f64) as i64);
    estimate.clamp(counted, upper)
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Gauges {
    /// Counted up to the limit the sample was given, estimated beyond it (`pending_estimated`).
    pub pending: i64,
    /// Whether `pending` is an estimate; and then, when every row counted waits for a
    /// retry, `oldest_pending_age_seconds` too.
    pub pending_estimated: bool,
    /// The oldest row ready to be claimed: `pending` and not waiting for a retry.
    pub oldest_pending_age_seconds: f64,
    /// The oldest `pending` row, ready or waiting for a retry.
    pub oldest_pending_with_retries_age_seconds: f64,
    pub inflight: i64,
    pub stuck: i64,
    pub failed: i64,
}

/// Samples the gauges, counting the pending rows up to `pending_counted_up_to` (None: all
/// of them, as `chronicle status` does) and estimating beyond (`estimate_pending`).
pub fn sample_gauges(
    client: &mut impl GenericClient,
    max_processing: Duration,
    pending_counted_up_to: Option<i64>,
) -> Result<Gauges, postgres::Error> {
    let r = client.query_one(SAMPLE_GAUGES, &[&max_processing.as_secs_f64(), &pending_counted_up_to])?;
    let counted: i64 = r.try_get(0)?;
    let oldest_ready: Option<f64> = r.try_get(2)?;
    let mut g = Gauges {
        pending: counted,
        pending_estimated: false,
        oldest_pending_age_seconds: oldest_ready.unwrap_or(0.0),
        oldest_pending_with_retries_age_seconds: r.try_get(3)?,
        inflight: r.try_get(4)?,
        stuck: r.try_get(5)?,
        failed: r.try_get(6)?,
    };
    if let (Some(limit), Some(last_counted_id)) = (pending_counted_up_to, r.try_get::<_, Option<i64>>(1)?) {
        if counted >= limit {
            let e = client.query_one(ESTIMATE_PENDING, &[])?;
            // None: the rows counted were claimed since; nothing is pending past them.
            let last_pending_id = e.try_get::<_, Option<i64>>(0)?.unwrap_or(last_counted_id);
            if last_pending_id > last_counted_id {
                g.pending = estimate_pending(counted, last_counted_id, last_pending_id, e.try_get(1)?);
                g.pending_estimated = true;
                // Every row counted waits for a retry: the oldest ready row comes after the
                // last of them, created about when it was or later.
                if oldest_ready.is_none() {
                    g.oldest_pending_age_seconds = r.try_get::<_, Option<f64>>(7)?.unwrap_or(0.0);
                }
            }
        }
    }
    Ok(g)
}

/// Which `failed` rows a replay takes (`chronicle replay-failed`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayFilter {
    /// Only rows failed with this `error_reason`.
    pub error_reason: Option<String>,
    /// Only deliveries of these events.
    pub event_ids: Option<Vec<Uuid>>,
    /// Only rows whose last change (`updated_at`: when they failed) is at least this old.
    pub older_than: Option<Duration>,
    /// At most this many rows replayed, oldest first.
    pub limit: u32,
}

/// One row a replay moved to `pending`, or left alone.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayRow {
    pub outbox_id: i64,
    pub event_id: Uuid,
    pub error_reason: Option<String>,
    pub replay_count: i32,
}

/// What one replay did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayOutcome {
    /// Rows moved to `pending`, with their new `replay_count`.
    pub replayed: Vec<ReplayRow>,
    /// Matching failed rows left `failed` because their event already has a pending or
    /// processing delivery, or gets one from this very replay (an older failed delivery
    /// of an event whose newest one is replayed). At most `limit` of them are listed.
    pub skipped_live_delivery: Vec<ReplayRow>,
}

/// The replay filters over the alias given, with $1 error_reason, $2 event ids and $3
/// minimum age in seconds (each NULL when not filtering).
#[rustfmt::skip]
macro_rules! replay_filter {
    ($t:literal) => {
        concat!(
            "($1::text IS NULL OR ", $t, ".error_reason = $1)
             AND ($2::uuid[] IS NULL OR ", $t, ".event_id = ANY($2))
             AND ($3::float8 IS NULL OR ", $t, ".updated_at <= now() - make_interval(secs => $3))"
        )
    };
}

/// failed → pending (ops), set-based, for the oldest matching rows not held by anyone
/// else (SKIP LOCKED, so it is safe while workers and other replays run). Each row gets
/// a fresh start (attempts 0, reclaims 0, no retry time, no claim) and the replay audit (count, when,
/// who, why); `error` and `error_reason` stay readable until the row succeeds
/// (`MARK_DONE` clears them). A row whose event already has a pending or processing
/// delivery is not touched (the partial unique index allows one live delivery per
/// event), and of several matching failed rows of one event only the newest is
/// replayed. Those left alone come back as `replayed = false`.
/// $4 limit, $5 by, $6 reason.
pub const REPLAY_FAILED: &str = concat!(
    "
    WITH picked AS (
        SELECT o.id FROM chronicle_outbox_events o
        WHERE o.status = 'failed' AND ",
    replay_filter!("o"),
    "
          AND NOT EXISTS (SELECT 1 FROM chronicle_outbox_events l
                          WHERE l.event_id = o.event_id AND l.status IN ('pending', 'processing'))
          AND NOT EXISTS (SELECT 1 FROM chronicle_outbox_events n
                          WHERE n.event_id = o.event_id AND n.status = 'failed' AND n.id > o.id AND ",
    replay_filter!("n"),
    ")
        ORDER BY o.id
        LIMIT $4
        FOR UPDATE OF o SKIP LOCKED
    ), replayed AS (
        UPDATE chronicle_outbox_events o
        SET status = 'pending', attempts = 0, reclaims = 0, next_retry_at = NULL, claimed_by = NULL,
            claim_token = NULL, claimed_at = NULL, lease_until = NULL,
            replay_count = o.replay_count + 1, last_replayed_at = now(),
            last_replayed_by = $5, last_replayed_reason = $6, updated_at = now()
        FROM picked
        WHERE o.id = picked.id AND o.status = 'failed'
        RETURNING o.id, o.event_id, o.error_reason, o.replay_count
    ), skipped AS (
        SELECT o.id, o.event_id, o.error_reason, o.replay_count FROM chronicle_outbox_events o
        WHERE o.status = 'failed' AND ",
    replay_filter!("o"),
    "
          AND o.id NOT IN (SELECT id FROM replayed)
          AND (o.event_id IN (SELECT event_id FROM replayed)
               OR EXISTS (SELECT 1 FROM chronicle_outbox_events l
                          WHERE l.event_id = o.event_id AND l.status IN ('pending', 'processing')))
        ORDER BY o.id
        LIMIT $4
    )
    SELECT true AS replayed, id, event_id, error_reason, replay_count FROM replayed
    UNION ALL
    SELECT false, id, event_id, error_reason, replay_count FROM skipped
    ORDER BY 1 DESC, 2"
);

pub fn replay_failed(
    client: &mut impl GenericClient,
    filter: &ReplayFilter,
    by: &str,
    reason: &str,
) -> Result<ReplayOutcome, postgres::Error> {
    let older_than = filter.older_than.map(|d| d.as_secs_f64());
    let rows = client.query(
        REPLAY_FAILED,
        &[&filter.error_reason, &filter.event_ids, &older_than, &(filter.limit as i64), &by, &reason],
    )?;
    let mut out = ReplayOutcome::default();
    for r in &rows {
        let row = ReplayRow {
            outbox_id: r.try_get(1)?,
            event_id: r.try_get(2)?,
            error_reason: r.try_get(3)?,
            replay_count: r.try_get(4)?,
        };
        if r.try_get(0)? {
            out.replayed.push(row);
        } else {
            out.skipped_live_delivery.push(row);
        }
    }
    Ok(out)
}

/// The cutoff of a prune, read once from the database's clock so every batch (and a dry
/// run's count) uses the same one.
pub const PRUNE_CUTOFF: &str = "SELECT now() - make_interval(secs => $1)";

/// How many `done` rows a prune with this cutoff would delete (dry run).
pub const COUNT_PRUNABLE: &str =
    "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'done' AND processed_at < $1";

/// done → deleted: one small batch of `done` rows processed before the cutoff, walking
/// the primary key from `$2` (keyset), so a prune is one pass over the table and each
/// statement is its own short transaction holding few locks. Rows locked by anyone are
/// skipped. Returns the rows deleted and the last id examined (the next batch's start).
pub const PRUNE_DONE: &str = "
    WITH doomed AS (
        SELECT id FROM chronicle_outbox_events
        WHERE status = 'done' AND processed_at < $1 AND id > $2
        ORDER BY id
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM chronicle_outbox_events o USING doomed
        WHERE o.id = doomed.id AND o.status = 'done'
        RETURNING o.id
    )
    SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM doomed), (SELECT max(id) FROM doomed)";

/// What a prune did (or, dry, would do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub deleted: u64,
    pub batches: u64,
}

pub fn prune_cutoff(
    client: &mut impl GenericClient,
    older_than: Duration,
) -> Result<chrono::DateTime<chrono::Utc>, postgres::Error> {
    client.query_one(PRUNE_CUTOFF, &[&older_than.as_secs_f64()])?.try_get(0)
}

pub fn count_prunable(
    client: &mut impl GenericClient,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<u64, postgres::Error> {
    let n: i64 = client.query_one(COUNT_PRUNABLE, &[&cutoff])?.try_get(0)?;
    Ok(n.max(0) as u64)
}

/// Deletes `done` rows processed before `cutoff`, `batch_size` rows per statement (each
/// autocommitted: call it outside a transaction), until none is left or `keep_going`
/// says stop (checked before each batch). Pending, processing and failed rows are never
/// touched.
pub fn prune_done(
    client: &mut impl GenericClient,
    cutoff: chrono::DateTime<chrono::Utc>,
    batch_size: u32,
    mut keep_going: impl FnMut() -> bool,
) -> Result<PruneReport, postgres::Error> {
    let mut report = PruneReport::default();
    let mut after: i64 = 0;
    while keep_going() {
        let r = client.query_one(PRUNE_DONE, &[&cutoff, &after, &(batch_size as i64)])?;
        let deleted: i64 = r.try_get(0)?;
        let examined: i64 = r.try_get(1)?;
        let last: Option<i64> = r.try_get(2)?;
        report.batches += 1;
        report.deleted += deleted.max(0) as u64;
        match last {
            Some(last) if examined >= batch_size as i64 => after = last,
            _ => break,
        }
    }
    Ok(report)
}

/// Wakes idle workers (their listener) when the transaction commits, as the enqueue
/// trigger does for new events: replayed rows are picked up at once, not at the next poll.
pub const NOTIFY_WORKERS: &str = "SELECT pg_notify('chronicle_outbox', '')";

pub fn notify_workers(client: &mut impl GenericClient) -> Result<(), postgres::Error> {
    client.execute(NOTIFY_WORKERS, &[]).map(|_| ())
}

// ---------------------------------------------------------------------------------
// Deliveries created in bulk by the operations (rebuild, verify --fix)

/// An event's current delivery status (live first, else latest), or NULL if it has none.
/// Used as a lateral subquery over `e`.
macro_rules! current_delivery {
    () => {
        "SELECT o.status FROM chronicle_outbox_events o WHERE o.event_id = e.id
         ORDER BY (o.status IN ('pending', 'processing')) DESC, o.id DESC LIMIT 1"
    };
}
pub(crate) use current_delivery;

/// none → pending, for `verify --fix`: one new delivery for every event of the scope
/// without an entry of the
/// current projection version, unless its current delivery is live (the partial unique
/// index also stops a race with another writer: DO NOTHING) or failed (replay-failed's
/// job). Counts what it enqueued, missing and stale apart.
pub const ENQUEUE_MISSING_AND_STALE: &str = concat!(
    "WITH todo AS (
        SELECT e.id, e.occurred_at, (n.id IS NULL) AS missing
        FROM chronicle_events e
        LEFT JOIN chronicle_entries n ON n.id = e.id
        LEFT JOIN LATERAL (",
    current_delivery!(),
    ") d ON true
        WHERE ($1::uuid IS NULL OR e.library_id = $1)
          AND (n.id IS NULL OR n.projection_version < $2)
          AND (d.status IS NULL OR d.status = 'done')
    ), enqueued AS (
        INSERT INTO chronicle_outbox_events (event_id)
        SELECT id FROM todo ORDER BY occurred_at, id
        ON CONFLICT (event_id) WHERE status IN ('pending', 'processing') DO NOTHING
        RETURNING event_id
    )
    SELECT count(*) FILTER (WHERE t.missing), count(*) FILTER (WHERE NOT t.missing)
    FROM enqueued q JOIN todo t ON t.id = q.event_id"
);

/// An event's failed delivery that is its current one: none of the event's deliveries
/// is pending or processing, and none done after it. Of an event's failed deliveries,
/// the newest such one is the event's failure; an older one is history, superseded (a
/// condition over the alias given, for the statements that count or take failures).
#[rustfmt::skip]
macro_rules! current_failure {
    ($f:literal) => {
        concat!(
            $f, ".status = 'failed'
             AND NOT EXISTS (SELECT 1 FROM chronicle_outbox_events s
                             WHERE s.event_id = ", $f, ".event_id
                               AND (s.status IN ('pending', 'processing') OR (s.status = 'done' AND s.id > ", $f, ".id)))"
        )
    };
}
pub(crate) use current_failure;

/// For `rebuild --emit-outbox` (run `$2`), every event of the scope (`$1`, NULL for all)
/// gets exactly one delivery in the run, so the run's verdict covers all of them
/// (docs/DESIGN.md §3, one open delivery per event):
/// - a pending or processing delivery already there is adopted: it joins the run as it
///   stands, its state untouched (rows locked in id order; should a worker completing
///   some of them deadlock with it, the caller runs it again);
/// - failed → pending for an event whose current delivery failed: the failed row itself is
///   replayed, with the replay audit (`$3` who, `$4` why), instead of a second delivery
///   beside it (guarded by its state, not locked ahead: a row a concurrent replay took
///   is left to it);
/// - none → pending for every other event (no delivery, or only done ones).
///
/// An unfinished earlier run whose waiting deliveries are adopted is told so in its
/// `error`: it finishes with what it delivered, unsuccessful.
///
/// Returns the deliveries queued (new), replayed and adopted.
pub const ENQUEUE_FOR_REBUILD: &str = concat!(
    "
    WITH live AS (
        SELECT o.id, o.rebuild_run_id AS prior FROM chronicle_outbox_events o
        WHERE o.status IN ('pending', 'processing')
          AND ($1::uuid IS NULL OR EXISTS (SELECT 1 FROM chronicle_events e
                                           WHERE e.id = o.event_id AND e.library_id = $1))
        ORDER BY o.id
        FOR UPDATE OF o
    ), adopted AS (
        UPDATE chronicle_outbox_events o SET rebuild_run_id = $2
        FROM live WHERE o.id = live.id AND o.status IN ('pending', 'processing')
        RETURNING o.event_id
    ), superseded AS (
        UPDATE chronicle_rebuild_runs r
        SET error = concat_ws('; ', r.error, format('superseded by rebuild run #%s, which took over its waiting deliveries', $2::bigint))
        WHERE r.id IN (SELECT prior FROM live WHERE prior <> $2) AND r.finished_at IS NULL
        RETURNING 1
    ), failing AS (
        SELECT DISTINCT ON (f.event_id) f.id FROM chronicle_outbox_events f
        WHERE ",
    current_failure!("f"),
    "
          AND ($1::uuid IS NULL OR EXISTS (SELECT 1 FROM chronicle_events e
                                           WHERE e.id = f.event_id AND e.library_id = $1))
        ORDER BY f.event_id, f.id DESC
    ), replayed AS (
        UPDATE chronicle_outbox_events o
        SET status = 'pending', attempts = 0, reclaims = 0, next_retry_at = NULL, claimed_by = NULL,
            claim_token = NULL, claimed_at = NULL, lease_until = NULL, rebuild_run_id = $2,
            replay_count = o.replay_count + 1, last_replayed_at = now(),
            last_replayed_by = $3, last_replayed_reason = $4, updated_at = now()
        FROM failing WHERE o.id = failing.id AND o.status = 'failed'
        RETURNING o.event_id
    ), enqueued AS (
        INSERT INTO chronicle_outbox_events (event_id, rebuild_run_id)
        SELECT e.id, $2 FROM chronicle_events e
        WHERE ($1::uuid IS NULL OR e.library_id = $1)
          AND e.id NOT IN (SELECT event_id FROM replayed)
        ORDER BY e.occurred_at, e.id
        ON CONFLICT (event_id) WHERE status IN ('pending', 'processing') DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM enqueued), (SELECT count(*) FROM replayed), (SELECT count(*) FROM adopted)"
);

/// none → failed, or failed → failed again, for `rebuild`: an event it cannot project
/// ($1 ids, $2 reasons, $3 messages) has one failed delivery, so `status` and
/// `replay-failed` see it once however many runs failed it. Its current failed delivery
/// takes the new reason and message; an event with a pending or processing delivery
/// gets nothing (that delivery is its one open delivery, and ends failed itself if the
/// event still cannot be projected); any other event gets a new failed delivery.
pub const RECORD_FAILED_DELIVERIES: &str = concat!(
    "
    WITH f AS (
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[]) AS f(event_id, reason, error)
    ), again AS (
        UPDATE chronicle_outbox_events o
        SET error_reason = f.reason, error = f.error, processed_at = now(), updated_at = now()
        FROM f WHERE o.event_id = f.event_id AND ",
    current_failure!("o"),
    "
        RETURNING o.event_id
    )
    INSERT INTO chronicle_outbox_events (event_id, status, error_reason, error, processed_at)
    SELECT f.event_id, 'failed', f.reason, f.error, now() FROM f
    WHERE f.event_id NOT IN (SELECT event_id FROM again)
      AND NOT EXISTS (SELECT 1 FROM chronicle_outbox_events o
                      WHERE o.event_id = f.event_id AND o.status IN ('pending', 'processing'))"
);

/// failed → done, for a `rebuild` that wrote the entries itself (run `$1`, scope `$2`):
/// an event whose current delivery failed and whose entry this run wrote (projected
/// since the run started) is projected; its failed delivery is closed. The row says by
/// what: `rebuild_run_id` is the run (its row says who started it), and `error` keeps
/// the failure it had, after `$3` (the run's note). The replay audit is left as it is:
/// it records the replays, not this. Returns how many.
pub const RESOLVE_FAILED_BY_REBUILD: &str = concat!(
    "
    WITH resolved AS (
        UPDATE chronicle_outbox_events f
        SET status = 'done', processed_at = now(), error_reason = NULL,
            error = $3 || ' (it had failed: ' || coalesce(f.error_reason, 'no reason') || ': ' || coalesce(f.error, '') || ')',
            next_retry_at = NULL, claim_token = NULL, lease_until = NULL, rebuild_run_id = $1,
            updated_at = now()
        FROM chronicle_rebuild_runs r, chronicle_entries n
        WHERE r.id = $1 AND n.id = f.event_id AND n.projected_at >= r.started_at
          AND ($2::uuid IS NULL OR n.library_id = $2) AND ",
    current_failure!("f"),
    "
        RETURNING 1
    )
    SELECT count(*) FROM resolved"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pending_estimate_stays_between_the_rows_counted_and_the_ids_after_them() {
        // 10,000 counted up to id 10,500; pending ids run to 1,010,500: at most 1,010,000.
        let (counted, last, end) = (10_000, 10_500, 1_010_500);
        assert_eq!(estimate_pending(counted, last, end, Some(600_000.0)), 600_000, "the planner's, within bounds");
        assert_eq!(
            estimate_pending(counted, last, end, Some(5_000_000.0)),
            1_010_000,
            "statistics from before a drain"
        );
        assert_eq!(estimate_pending(counted, last, end, Some(12.0)), 10_000, "never fewer than counted");
        assert_eq!(estimate_pending(counted, last, end, None), 1_010_000, "no statistics: the ids' bound");
        assert_eq!(estimate_pending(counted, last, end, Some(f64::NAN)), 1_010_000);
        assert_eq!(estimate_pending(counted, last, last, Some(9e18)), 10_000, "nothing past the last counted");
        assert_eq!(estimate_pending(counted, last, 7, Some(1.0)), 10_000, "a last id before the counted ones");
        assert_eq!(estimate_pending(counted, 0, i64::MAX, Some(f64::INFINITY)), i64::MAX);
    }
}
