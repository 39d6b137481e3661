//! The outbox state machine (DESIGN.md §3): one named SQL statement per transition,
//! each guarded by the state it expects, and one function that runs it and reports
//! what changed. Completion is fenced on the claim token, so a worker that lost its
//! claim (reclaimed after its lease, maybe claimed again by someone else) changes
//! nothing.
//!
//!     pending ──claim_batch──▶ processing ──mark_done──▶ done
//!        ▲                        │ ├──mark_failed──▶ failed ──replay (ops)──▶ pending
//!        └──schedule_retry / release_claim / reclaim_stuck (attempts ≥ max: failed)

use std::time::Duration;

use postgres::GenericClient;
use uuid::Uuid;

use crate::event::{Event, EVENT_COLUMNS};

/// A row claimed for projection, with its event (None if the event no longer exists).
#[derive(Debug, Clone)]
pub struct Claimed {
    pub outbox_id: i64,
    pub attempts: i32,
    pub event_id: Uuid,
    pub event: Option<Event>,
}

/// pending → processing: the oldest ready rows, skipping rows other workers hold, each
/// attempt counted, with their events loaded in the same round trip.
pub const CLAIM_BATCH: &str = "
    WITH ready AS (
        SELECT id FROM chronicle_outbox_events
        WHERE status = 'pending' AND (next_retry_at IS NULL OR next_retry_at <= now())
        ORDER BY id
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE chronicle_outbox_events o
        SET status = 'processing', claimed_by = $2, claim_token = $3, claimed_at = now(),
            lease_until = now() + make_interval(secs => $4), attempts = o.attempts + 1,
            updated_at = now()
        FROM ready
        WHERE o.id = ready.id AND o.status = 'pending'
        RETURNING o.id, o.attempts, o.event_id
    )
    SELECT c.id, c.attempts, c.event_id, e.id IS NOT NULL AS found, e.* FROM claimed c
    LEFT JOIN LATERAL (SELECT {EVENT_COLUMNS} FROM chronicle_events WHERE id = c.event_id) e ON true
    ORDER BY c.id";

pub fn claim_batch(
    client: &mut impl GenericClient,
    limit: u32,
    worker_id: &str,
    token: Uuid,
    lease: Duration,
) -> Result<Vec<Claimed>, postgres::Error> {
    let sql = CLAIM_BATCH.replace("{EVENT_COLUMNS}", EVENT_COLUMNS);
    let rows = client.query(&sql, &[&(limit as i64), &worker_id, &token, &lease.as_secs_f64()])?;
    rows.iter()
        .map(|r| {
            let found: bool = r.try_get(3)?;
            Ok(Claimed {
                outbox_id: r.try_get(0)?,
                attempts: r.try_get(1)?,
                event_id: r.try_get(2)?,
                event: if found { Some(Event::from_row(r, 4)?) } else { None },
            })
        })
        .collect()
}

/// processing → done, for the rows this claim still holds. Returns the ids marked and
/// the database's clock (for the latency histogram).
pub const MARK_DONE: &str = "
    UPDATE chronicle_outbox_events
    SET status = 'done', processed_at = now(), lease_until = NULL, next_retry_at = NULL,
        error_reason = NULL, error = NULL, updated_at = now()
    WHERE id = ANY($1) AND status = 'processing' AND claim_token = $2
    RETURNING id";

pub fn mark_done(client: &mut impl GenericClient, ids: &[i64], token: Uuid) -> Result<Vec<i64>, postgres::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = client.query(MARK_DONE, &[&ids, &token])?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

/// A deterministic failure of one row: its closed-list reason and the full message.
#[derive(Debug, Clone)]
pub struct Failure {
    pub outbox_id: i64,
    pub error_reason: &'static str,
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
) -> Result<Vec<String>, postgres::Error> {
    if failures.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = failures.iter().map(|f| f.outbox_id).collect();
    let reasons: Vec<&str> = failures.iter().map(|f| f.error_reason).collect();
    let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
    let rows = client.query(MARK_FAILED, &[&ids, &reasons, &errors, &token])?;
    rows.iter().map(|r| r.try_get(1)).collect()
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
    let mut out = RetryOutcome::default();
    for r in &rows {
        let status: String = r.try_get(0)?;
        if status == "failed" {
            out.exhausted += 1;
        } else {
            out.retried += 1;
        }
    }
    Ok(out)
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

/// processing → pending for stuck rows (lease expired, or processing longer than
/// `OUTBOX_MAX_PROCESSING_SECONDS`), keeping the attempt so an event that kills every
/// worker still ends; a row that has used its attempts → failed `max_attempts_exceeded`.
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
        claim_token = NULL, lease_until = NULL, next_retry_at = NULL, updated_at = now()
    FROM stuck WHERE o.id = stuck.id
    RETURNING o.status";

pub fn reclaim_stuck(
    client: &mut impl GenericClient,
    max_processing: Duration,
    max_attempts: u32,
) -> Result<RetryOutcome, postgres::Error> {
    let rows = client.query(RECLAIM_STUCK, &[&max_processing.as_secs_f64(), &(max_attempts as i32)])?;
    let mut out = RetryOutcome::default();
    for r in &rows {
        let status: String = r.try_get(0)?;
        if status == "failed" {
            out.exhausted += 1;
        } else {
            out.retried += 1;
        }
    }
    Ok(out)
}

/// The gauges an operator watches, sampled in one query (DESIGN.md §6).
pub const SAMPLE_GAUGES: &str = "
    SELECT
        count(*) FILTER (WHERE status = 'pending'),
        coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending')), 0)::float8,
        count(*) FILTER (WHERE status = 'processing'),
        count(*) FILTER (WHERE status = 'processing'
                         AND (lease_until < now() OR claimed_at < now() - make_interval(secs => $1))),
        count(*) FILTER (WHERE status = 'failed')
    FROM chronicle_outbox_events
    WHERE status <> 'done'";

#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Gauges {
    pub pending: i64,
    pub oldest_pending_age_seconds: f64,
    pub inflight: i64,
    pub stuck: i64,
    pub failed: i64,
}

pub fn sample_gauges(client: &mut impl GenericClient, max_processing: Duration) -> Result<Gauges, postgres::Error> {
    let r = client.query_one(SAMPLE_GAUGES, &[&max_processing.as_secs_f64()])?;
    Ok(Gauges {
        pending: r.try_get(0)?,
        oldest_pending_age_seconds: r.try_get(1)?,
        inflight: r.try_get(2)?,
        stuck: r.try_get(3)?,
        failed: r.try_get(4)?,
    })
}
