//! The outbox transitions as statements: fencing on the claim token, reclaim keeping
//! attempts, release giving them back.

use std::time::Duration;

use chronicle::outbox;
use uuid::Uuid;

use crate::util::{count, insert_events, wait_until, TestDb};

const LEASE: Duration = Duration::from_secs(30);

#[test]
fn a_worker_whose_claim_was_reclaimed_and_reclaimed_again_changes_nothing() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 5);
    let old = Uuid::now_v7();
    let claimed = outbox::claim_batch(&mut c, 10, "w1", old, LEASE).unwrap();
    assert_eq!(claimed.len(), 5);
    assert!(claimed.iter().all(|r| r.event.is_some() && r.attempts == 1));
    let ids: Vec<i64> = claimed.iter().map(|r| r.outbox_id).collect();
    // The lease expires; the reclaim loop takes the rows back, keeping the attempt.
    c.execute("UPDATE chronicle_outbox_events SET lease_until = now() - interval '1 second'", &[]).unwrap();
    let o = outbox::reclaim_stuck(&mut c, Duration::from_secs(600), 10).unwrap();
    assert_eq!(o.retried, 5);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending' AND attempts = 1"),
        5
    );
    // Another claim (here by the same worker id) takes them.
    let new = Uuid::now_v7();
    assert_eq!(outbox::claim_batch(&mut c, 10, "w1", new, LEASE).unwrap().len(), 5);
    // The old claim can complete, fail, retry or release nothing.
    assert!(outbox::mark_done(&mut c, &ids, old).unwrap().is_empty());
    let f: Vec<outbox::Failure> = ids
        .iter()
        .map(|id| outbox::Failure {
            outbox_id: *id,
            error_reason: chronicle::error_reason::ErrorReason::InvalidPayload,
            error: "x".into(),
        })
        .collect();
    assert!(outbox::mark_failed(&mut c, &f, old).unwrap().is_empty());
    let delays: Vec<(i64, Duration)> = ids.iter().map(|id| (*id, Duration::from_secs(1))).collect();
    assert_eq!(outbox::schedule_retry(&mut c, &delays, 10, "x", old).unwrap(), outbox::RetryOutcome::default());
    assert_eq!(outbox::release_claim(&mut c, &ids, old).unwrap(), 0);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'processing' AND attempts = 2"),
        5
    );
    // The new claim completes.
    assert_eq!(outbox::mark_done(&mut c, &ids, new).unwrap().len(), 5);
}

#[test]
fn reclaim_of_a_row_out_of_attempts_fails_it() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 2);
    outbox::claim_batch(&mut c, 10, "w", Uuid::now_v7(), LEASE).unwrap();
    c.execute("UPDATE chronicle_outbox_events SET lease_until = now() - interval '1 second'", &[]).unwrap();
    let o = outbox::reclaim_stuck(&mut c, Duration::from_secs(600), 1).unwrap();
    assert_eq!((o.retried, o.exhausted), (0, 2));
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed' AND error_reason = 'max_attempts_exceeded'"), 2);
}

#[test]
fn a_row_processing_past_max_processing_is_reclaimed_even_with_a_live_lease() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 1);
    outbox::claim_batch(&mut c, 10, "w", Uuid::now_v7(), LEASE).unwrap();
    assert_eq!(outbox::reclaim_stuck(&mut c, Duration::from_secs(600), 10).unwrap().retried, 0);
    c.execute("UPDATE chronicle_outbox_events SET claimed_at = now() - interval '11 minutes'", &[]).unwrap();
    let g = outbox::sample_gauges(&mut c, Duration::from_secs(600), Some(outbox::PENDING_COUNTED_UP_TO)).unwrap();
    assert_eq!((g.inflight, g.stuck), (1, 1));
    assert_eq!(outbox::reclaim_stuck(&mut c, Duration::from_secs(600), 10).unwrap().retried, 1);
}

/// Past the rows the gauges count, the backlog is estimated, said so, and kept between
/// what was counted and the ids after it; under the limit, or with nothing pending past the
/// rows counted, it is exact.
#[test]
fn the_pending_gauge_counts_up_to_its_limit_and_estimates_beyond_it() {
    let db = TestDb::new();
    let mut c = db.client();
    let sample = |c: &mut postgres::Client, limit: Option<i64>| {
        outbox::sample_gauges(c, Duration::from_secs(600), limit).expect("sampling the gauges")
    };
    insert_events(&mut c, 50);
    let g = sample(&mut c, Some(100));
    assert_eq!((g.pending, g.pending_estimated), (50, false), "under the limit: counted");
    let g = sample(&mut c, Some(50));
    assert_eq!((g.pending, g.pending_estimated), (50, false), "at the limit with nothing past it: counted");

    insert_events(&mut c, 4950);
    // Before any statistics: the bound the ids give, exact here (no gaps).
    let g = sample(&mut c, Some(100));
    assert!(g.pending_estimated, "{g:?}");
    assert_eq!(g.pending, 5000, "{g:?}");
    // Half of them done, the statistics taken: the planner's share of pending rows.
    c.batch_execute(
        "UPDATE chronicle_outbox_events SET status = 'done', processed_at = now(), attempts = 1
         WHERE id IN (SELECT id FROM chronicle_outbox_events ORDER BY id DESC LIMIT 2500);
         ANALYZE chronicle_outbox_events",
    )
    .unwrap();
    let g = sample(&mut c, Some(100));
    assert!(g.pending_estimated, "{g:?}");
    assert!((2000..=2500).contains(&g.pending), "2,500 pending, about as many as the statistics say: {g:?}");
    assert_eq!(sample(&mut c, None).pending, 2500, "no limit: counted");
    // Statistics from before a drain: bounded by the ids still pending.
    c.batch_execute(
        "ANALYZE chronicle_outbox_events;
         UPDATE chronicle_outbox_events SET status = 'done', processed_at = now(), attempts = 1
         WHERE id IN (SELECT id FROM chronicle_outbox_events WHERE status = 'pending' ORDER BY id LIMIT 2000)",
    )
    .unwrap();
    let g = sample(&mut c, Some(100));
    assert!(g.pending_estimated, "{g:?}");
    assert_eq!(g.pending, 500, "the 500 ids left after the 2,000 drained: {g:?}");
}

/// The oldest pending age is of the row a claim would take next: a row waiting for its
/// retry does not count there, and has a gauge of its own.
#[test]
fn the_oldest_pending_age_is_of_the_oldest_ready_row() {
    let db = TestDb::new();
    let mut c = db.client();
    let sample = |c: &mut postgres::Client| {
        outbox::sample_gauges(c, Duration::from_secs(600), Some(outbox::PENDING_COUNTED_UP_TO))
            .expect("sampling the gauges")
    };
    let g = sample(&mut c);
    assert_eq!((g.oldest_pending_age_seconds, g.oldest_pending_with_retries_age_seconds), (0.0, 0.0));
    insert_events(&mut c, 3);
    c.batch_execute(
        "UPDATE chronicle_outbox_events SET created_at = now() - interval '1 hour', attempts = 1,
                next_retry_at = now() + interval '1 hour', error = 'transient: test'
         WHERE id = (SELECT min(id) FROM chronicle_outbox_events);
         UPDATE chronicle_outbox_events SET created_at = now() - interval '10 minutes'
         WHERE id <> (SELECT min(id) FROM chronicle_outbox_events)",
    )
    .unwrap();
    let g = sample(&mut c);
    assert!((600.0..1200.0).contains(&g.oldest_pending_age_seconds), "the oldest ready row: {g:?}");
    assert!(g.oldest_pending_with_retries_age_seconds >= 3600.0, "the row waiting for its retry: {g:?}");
    c.batch_execute("UPDATE chronicle_outbox_events SET next_retry_at = now() - interval '1 second'").unwrap();
    let g = sample(&mut c);
    assert!(g.oldest_pending_age_seconds >= 3600.0, "its retry is due: it is ready: {g:?}");

    // More rows wait for a retry than the sample counts: the ready rows after them are not
    // looked for one by one; their age is the last counted row's, and said to be estimated.
    insert_events(&mut c, 10);
    c.batch_execute(
        "UPDATE chronicle_outbox_events SET next_retry_at = now() + interval '1 hour', attempts = 1
         WHERE id IN (SELECT id FROM chronicle_outbox_events ORDER BY id LIMIT 3)",
    )
    .unwrap();
    let limited = outbox::sample_gauges(&mut c, Duration::from_secs(600), Some(3)).expect("sampling the gauges");
    assert!(limited.pending_estimated, "{limited:?}");
    assert!((600.0..1200.0).contains(&limited.oldest_pending_age_seconds), "the third row's age: {limited:?}");
    let exact = outbox::sample_gauges(&mut c, Duration::from_secs(600), None).expect("sampling the gauges");
    assert!(!exact.pending_estimated && exact.pending == 13, "{exact:?}");
    assert!(exact.oldest_pending_age_seconds < 600.0, "the first of the 10 new rows: {exact:?}");
}

#[test]
fn release_gives_the_attempt_back_and_retry_waits_for_its_time() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 3);
    let t = Uuid::now_v7();
    let ids: Vec<i64> = outbox::claim_batch(&mut c, 10, "w", t, LEASE).unwrap().iter().map(|r| r.outbox_id).collect();
    assert_eq!(outbox::release_claim(&mut c, &ids, t).unwrap(), 3);
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending' AND attempts = 0 AND claim_token IS NULL"), 3);
    let t = Uuid::now_v7();
    outbox::claim_batch(&mut c, 10, "w", t, LEASE).unwrap();
    let delays: Vec<(i64, Duration)> = ids.iter().map(|id| (*id, Duration::from_secs(60))).collect();
    let o = outbox::schedule_retry(&mut c, &delays, 10, "transient: boom", t).unwrap();
    assert_eq!(o.retried, 3);
    // Not ready yet: nothing to claim until next_retry_at.
    assert!(outbox::claim_batch(&mut c, 10, "w", Uuid::now_v7(), LEASE).unwrap().is_empty());
    c.execute("UPDATE chronicle_outbox_events SET next_retry_at = now() - interval '1 second'", &[]).unwrap();
    assert_eq!(outbox::claim_batch(&mut c, 10, "w", Uuid::now_v7(), LEASE).unwrap().len(), 3);
}

#[test]
fn the_lease_keeper_extends_only_held_rows_and_never_past_max_processing() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 2);
    let t = Uuid::now_v7();
    outbox::claim_batch(&mut c, 1, "w", t, Duration::from_secs(1)).unwrap();
    outbox::claim_batch(&mut c, 1, "w", Uuid::now_v7(), Duration::from_secs(1)).unwrap();
    assert_eq!(outbox::extend_lease(&mut c, &[t], Duration::from_secs(30), Duration::from_secs(600)).unwrap(), 1);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE lease_until > now() + interval '20 seconds'"),
        1
    );
    c.execute(
        "UPDATE chronicle_outbox_events SET claimed_at = now() - interval '11 minutes' WHERE claim_token = $1",
        &[&t],
    )
    .unwrap();
    assert_eq!(outbox::extend_lease(&mut c, &[t], Duration::from_secs(30), Duration::from_secs(600)).unwrap(), 0);
}

/// The rows the nodes of a claim's plan read, from `EXPLAIN (ANALYZE, FORMAT JSON)` of the
/// claim, in a transaction that first runs `settings`: the most any one node produced
/// (rows × loops), and the most any one node discarded by a filter or join filter.
/// Rolled back: nothing claimed.
fn claim_plan_rows(c: &mut postgres::Client, limit: i64, settings: &str) -> (f64, f64) {
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(settings).unwrap();
    // Prepared and executed by name, as the worker runs it: under `CLAIM_PLANNER_SETTINGS`
    // its generic plan, made from the statistics of the moment.
    tx.batch_execute(&format!(
        "PREPARE claim (bigint, text, uuid, float8, bool, bigint, bigint, bigint) AS {}",
        outbox::claim_batch_sql()
    ))
    .unwrap();
    let sql = format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim ({limit}, 'w', '{}', 30, false, 16777216, 33554432, 0)",
        Uuid::now_v7()
    );
    let plan: serde_json::Value = tx.query_one(&sql, &[]).unwrap().get(0);
    fn walk(node: &serde_json::Value, most: &mut (f64, f64)) {
        let n = |k: &str| node.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        let loops = n("Actual Loops").max(1.0);
        most.0 = most.0.max(n("Actual Rows") * loops);
        most.1 = most.1.max((n("Rows Removed by Filter") + n("Rows Removed by Join Filter")) * loops);
        for child in node.get("Plans").and_then(|p| p.as_array()).into_iter().flatten() {
            walk(child, most);
        }
    }
    let mut most = (0.0, 0.0);
    walk(&plan[0]["Plan"], &mut most);
    tx.batch_execute("DEALLOCATE claim").unwrap();
    tx.rollback().unwrap();
    most
}

#[test]
fn a_claim_reads_about_the_rows_it_claims_even_when_the_statistics_predate_the_backlog() {
    let db = TestDb::new();
    let mut c = db.client();
    // The statistics of a quiet outbox: everything done, then analyzed.
    insert_events(&mut c, 300);
    c.batch_execute(
        "UPDATE chronicle_outbox_events SET status = 'done', processed_at = now();
         ANALYZE chronicle_outbox_events",
    )
    .unwrap();
    // Then a backlog far larger than the statistics say could be pending.
    insert_events(&mut c, 5000);
    for limit in [50, 500] {
        let (rows, removed) = claim_plan_rows(&mut c, limit, "");
        let bound = 3.0 * limit as f64;
        assert!(rows <= bound, "a claim of {limit} had a plan node produce {rows} rows (more than {bound})");
        assert!(removed <= bound, "a claim of {limit} had a plan node discard {removed} rows (more than {bound})");
    }
}

#[test]
fn a_claim_after_a_drain_reads_about_the_rows_it_claims_once_the_worker_refreshed_the_statistics() {
    let db = TestDb::new();
    let mut c = db.client();
    // Statistics taken while a backlog waited: every row pending.
    insert_events(&mut c, 20_000);
    c.batch_execute("ANALYZE chronicle_outbox_events").unwrap();
    // The backlog drains (each row updated twice, in two transactions, as a claim and a
    // completion do), then a trickle arrives. The statistics still say all is pending.
    c.batch_execute(
        "UPDATE chronicle_outbox_events SET status = 'processing', claim_token = gen_random_uuid(),
                lease_until = now() + interval '30 seconds'",
    )
    .unwrap();
    c.batch_execute("UPDATE chronicle_outbox_events SET status = 'done', processed_at = now(), lease_until = NULL")
        .unwrap();
    insert_events(&mut c, 100);
    wait_until(Duration::from_secs(10), "the drain's updates in the table's activity statistics", || {
        count(&mut c, "SELECT n_mod_since_analyze FROM pg_stat_user_tables WHERE relname = 'chronicle_outbox_events'")
            >= 40_000
    });
    assert_eq!(outbox::analyze_if_stale(&mut c).unwrap(), outbox::Analyze::Analyzed);
    let (rows, removed) = claim_plan_rows(&mut c, 50, outbox::CLAIM_PLANNER_SETTINGS);
    assert!(rows <= 150.0, "a claim of 50 had a plan node produce {rows} rows");
    assert!(removed <= 150.0, "a claim of 50 had a plan node discard {removed} rows");
    // Fresh statistics are left alone.
    assert_eq!(outbox::analyze_if_stale(&mut c).unwrap(), outbox::Analyze::Fresh);
}

#[test]
fn the_worker_gives_a_never_analyzed_outbox_its_first_statistics_once() {
    use outbox::Analyze;
    let db = TestDb::new();
    let mut c = db.client();
    assert_eq!(outbox::analyze_if_stale(&mut c).unwrap(), Analyze::Fresh, "an empty outbox: nothing to analyze");
    insert_events(&mut c, 2000);
    let reltuples = |c: &mut postgres::Client| -> f32 {
        c.query_one("SELECT reltuples FROM pg_class WHERE oid = 'chronicle_outbox_events'::regclass", &[])
            .unwrap()
            .get(0)
    };
    assert!(reltuples(&mut c) < 0.0, "a new outbox has no statistics");
    assert_eq!(outbox::analyze_if_stale(&mut c).unwrap(), Analyze::Analyzed);
    assert_eq!(reltuples(&mut c), 2000.0);
    // Statistics the table has outgrown by less than the stale share are left alone.
    insert_events(&mut c, 10);
    assert_eq!(outbox::analyze_if_stale(&mut c).unwrap(), Analyze::Fresh);
    // And the claim then walks the pending index: it reads what it claims.
    let (rows, _) = claim_plan_rows(&mut c, 50, "");
    assert!(rows <= 150.0, "a claim of 50 on a fresh outbox had a plan node produce {rows} rows");
}

#[test]
fn outbox_statistics_are_stale_when_missing_or_outgrown() {
    assert!(!outbox::statistics_are_stale(-1.0, false, 0), "never analyzed, empty");
    assert!(outbox::statistics_are_stale(-1.0, true, 0), "never analyzed, with rows");
    assert!(!outbox::statistics_are_stale(0.0, true, 1000), "analyzed empty, a thousand rows since");
    assert!(outbox::statistics_are_stale(0.0, true, 1001));
    assert!(!outbox::statistics_are_stale(100_000.0, true, 21_000), "a fifth of the rows and a thousand");
    assert!(outbox::statistics_are_stale(100_000.0, true, 21_001));
}

#[test]
fn the_worker_claims_without_reading_the_backlog_even_with_no_statistics() {
    let db = TestDb::new();
    let mut c = db.client();
    // An outbox never analyzed: the planner guesses how many rows are pending.
    insert_events(&mut c, 5000);
    let (rows, removed) = claim_plan_rows(&mut c, 50, outbox::CLAIM_PLANNER_SETTINGS);
    assert!(rows <= 150.0, "a claim of 50 had a plan node produce {rows} rows");
    assert!(removed <= 150.0, "a claim of 50 had a plan node discard {removed} rows");
    // The settings end with the claim's transaction: the connection keeps none of them.
    let seqscan: String = c.query_one("SHOW enable_seqscan", &[]).unwrap().get(0);
    assert_eq!(seqscan, "on");
}

#[test]
fn a_claim_from_a_floor_takes_rows_from_that_id_up_and_a_claim_from_zero_the_rest() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 10);
    let ids: Vec<i64> =
        c.query("SELECT id FROM chronicle_outbox_events ORDER BY id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    let claim = |c: &mut postgres::Client, floor: i64| -> Vec<i64> {
        let req = outbox::ClaimRequest {
            limit: 100,
            worker_id: "w",
            token: Uuid::now_v7(),
            lease: LEASE,
            suspects_first: false,
            sizes: outbox::SizeLimits::default(),
            floor,
        };
        outbox::claim_batch_with(c, outbox::claim_batch_sql().as_str(), &req, |r| r.outbox_id).unwrap()
    };
    assert_eq!(claim(&mut c, ids[6]), ids[6..]);
    assert_eq!(claim(&mut c, ids[6]), Vec::<i64>::new(), "nothing pending from the floor up");
    assert_eq!(claim(&mut c, 0), ids[..6], "a claim from 0 takes the rows below any floor");
}
