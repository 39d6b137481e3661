//! In-process metrics (docs/DESIGN.md §6): atomics updated by the worker threads, rendered to
//! Prometheus text by a pure function. Names and labels are a contract with dashboards
//! and alert rules; every series carries `worker_id`.

mod front;
pub mod http;
#[cfg(target_os = "linux")]
mod reaper;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error_reason::ErrorReason;
use crate::outbox::horizon::{Holder, Horizon};
use crate::outbox::Gauges;
use crate::sqlstate::PauseReason;

/// A histogram with fixed buckets (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let s = if seconds.is_finite() && seconds > 0.0 { seconds } else { 0.0 };
        if let Some(i) = self.bounds.iter().position(|b| s <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add((s * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

const BATCH_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const REBUILD_BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0];

/// Everything one process counts.
pub struct Metrics {
    pub worker_id: String,
    pub processed: AtomicU64,
    pub retry_scheduled: AtomicU64,
    pub terminal_failed: [AtomicU64; ErrorReason::ALL.len()],
    pub reclaimed: AtomicU64,
    pub lease_lost: AtomicU64,
    pub db_errors: AtomicU64,
    /// Times the database answered again after it was lost (a restart, a failover).
    pub db_reconnects: AtomicU64,
    /// Times the metrics endpoint's server was started again after it stopped serving.
    pub metrics_server_restarts: AtomicU64,
    pub batch_duration: Histogram,
    pub projection_latency: Histogram,
    pub rebuild_duration: Histogram,
    /// Sampled from the database by one background query; `None` until the first sample.
    pub gauges: Mutex<Option<Gauges>>,
    /// The vacuum horizon and the outbox's dead rows, sampled less often; `None` until
    /// the first sample (or when the views cannot be read).
    pub horizon: Mutex<Option<Horizon>>,
    /// Rebuild timestamps (seconds since the epoch) as last read from the database.
    pub rebuild_last_finished: Mutex<Option<f64>>,
    pub rebuild_last_success: Mutex<Option<f64>>,
    /// Set while the worker is paused by a fault of the system (`worker::Shared::pause`).
    pub paused: Mutex<Option<Paused>>,
}

/// Why the worker is paused: `chronicle_worker_paused` and the body of `/readyz`.
#[derive(Debug, Clone, PartialEq)]
pub struct Paused {
    pub reason: PauseReason,
    /// The SQLSTATE of the error that paused it, when an error did.
    pub sqlstate: Option<String>,
    /// The error, described (`db::describe_error`) or the difference found.
    pub error: String,
    /// The step that met it: `claiming`, `completing`, `checking the read model`.
    pub during: &'static str,
    /// When it paused, seconds since the epoch.
    pub since: f64,
}

impl Paused {
    /// The JSON body of `/readyz` while paused.
    pub fn readyz_body(&self) -> String {
        let body = serde_json::json!({
            "status": "paused",
            "reason": self.reason.as_str(),
            "sqlstate": self.sqlstate,
            "error": self.error,
            "during": self.during,
            "since": self.since,
        });
        format!("{body}\n")
    }
}

impl Metrics {
    pub fn new(worker_id: &str) -> Metrics {
        Metrics {
            worker_id: worker_id.to_string(),
            processed: AtomicU64::new(0),
            retry_scheduled: AtomicU64::new(0),
            terminal_failed: Default::default(),
            reclaimed: AtomicU64::new(0),
            lease_lost: AtomicU64::new(0),
            db_errors: AtomicU64::new(0),
            db_reconnects: AtomicU64::new(0),
            metrics_server_restarts: AtomicU64::new(0),
            batch_duration: Histogram::new(BATCH_BUCKETS),
            projection_latency: Histogram::new(LATENCY_BUCKETS),
            rebuild_duration: Histogram::new(REBUILD_BUCKETS),
            gauges: Mutex::new(None),
            horizon: Mutex::new(None),
            rebuild_last_finished: Mutex::new(None),
            rebuild_last_success: Mutex::new(None),
            paused: Mutex::new(None),
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a terminal failure by its reason (an unknown reason is a bug: counted as
    /// the closest, `rejected_by_read_model`, rather than lost).
    pub fn terminal_failure(&self, reason: ErrorReason) {
        let i = reason as usize;
        self.terminal_failed[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn terminal_failed_total(&self) -> u64 {
        self.terminal_failed.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Why the worker is paused, if it is.
    pub fn paused(&self) -> Option<Paused> {
        self.paused.lock().ok().and_then(|p| p.clone())
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let w = escape_label(&self.worker_id);
        let lbl = format!("worker_id=\"{w}\"");
        let gauges = self.gauges.lock().map(|g| *g).unwrap_or(None);

        family(&mut out, "chronicle_build_info", "gauge", "Build information; always 1.");
        out.push_str(&format!("chronicle_build_info{{{lbl},version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION")));

        let pending_help = format!(
            "Outbox rows waiting to be projected (backlog): counted up to {}, estimated beyond \
             (chronicle_outbox_pending_estimated).",
            crate::outbox::PENDING_COUNTED_UP_TO
        );
        let gauge_rows: [(&str, &str, Option<f64>); 8] = [
            ("chronicle_outbox_pending_events", &pending_help, gauges.map(|g| g.pending as f64)),
            (
                "chronicle_outbox_pending_estimated",
                "1 when chronicle_outbox_pending_events and chronicle_outbox_lag_events are estimated, 0 when counted.",
                gauges.map(|g| if g.pending_estimated { 1.0 } else { 0.0 }),
            ),
            (
                "chronicle_outbox_lag_events",
                "Outbox rows not projected yet: pending plus processing (the runbook's lag).",
                gauges.map(|g| (g.pending + g.inflight) as f64),
            ),
            (
                "chronicle_outbox_oldest_pending_age_seconds",
                "Age of the oldest outbox row ready to be claimed (pending, not waiting for a retry).",
                gauges.map(|g| g.oldest_pending_age_seconds),
            ),
            (
                "chronicle_outbox_oldest_pending_with_retries_age_seconds",
                "Age of the oldest pending outbox row, ready or waiting for a retry.",
                gauges.map(|g| g.oldest_pending_with_retries_age_seconds),
            ),
            (
                "chronicle_outbox_inflight_events",
                "Outbox rows being processed (claimed under a lease).",
                gauges.map(|g| g.inflight as f64),
            ),
            (
                "chronicle_outbox_stuck_processing_events",
                "Processing rows past their lease or the maximum processing time.",
                gauges.map(|g| g.stuck as f64),
            ),
            (
                "chronicle_outbox_failed_events",
                "Failing events: events whose current delivery failed, each counted once.",
                gauges.map(|g| g.failed as f64),
            ),
        ];
        for (name, help, value) in gauge_rows {
            family(&mut out, name, "gauge", help);
            if let Some(v) = value {
                out.push_str(&format!("{name}{{{lbl}}} {}\n", fmt_f64(v)));
            }
        }

        let horizon = self.horizon.lock().map(|h| h.clone()).unwrap_or(None);
        render_horizon(&mut out, &lbl, horizon.as_ref());

        let counters: [(&str, &str, &AtomicU64); 7] = [
            ("chronicle_outbox_processed_total", "Events projected into entries and marked done.", &self.processed),
            (
                "chronicle_outbox_retry_scheduled_total",
                "Rows sent back to pending after a transient failure.",
                &self.retry_scheduled,
            ),
            (
                "chronicle_outbox_reclaimed_total",
                "Stuck rows returned to pending (or failed) by the reclaim loop.",
                &self.reclaimed,
            ),
            (
                "chronicle_outbox_lease_lost_total",
                "Rows this worker could not complete because its claim was lost.",
                &self.lease_lost,
            ),
            ("chronicle_outbox_db_errors_total", "Database errors met by this process.", &self.db_errors),
            (
                "chronicle_db_reconnects_total",
                "Times this process reached the database again after losing it (a restart, a failover).",
                &self.db_reconnects,
            ),
            (
                "chronicle_metrics_server_restarts_total",
                "Times the metrics endpoint was started again after it stopped serving.",
                &self.metrics_server_restarts,
            ),
        ];
        for (name, help, c) in counters {
            family(&mut out, name, "counter", help);
            out.push_str(&format!("{name}{{{lbl}}} {}\n", Self::get(c)));
        }
        family(
            &mut out,
            "chronicle_outbox_terminal_failed_total",
            "counter",
            "Deliveries that ended failed, by error_reason (a replayed event failing again counts again).",
        );
        for (reason, c) in ErrorReason::ALL.iter().zip(&self.terminal_failed) {
            out.push_str(&format!(
                "chronicle_outbox_terminal_failed_total{{{lbl},error_reason=\"{reason}\"}} {}\n",
                Self::get(c)
            ));
        }

        family(
            &mut out,
            "chronicle_worker_paused",
            "gauge",
            "1 while the worker is paused by a fault of the system (privileges, schema, resources, read_only, \
             shutdown, deterministic), by reason; 0 otherwise.",
        );
        let paused = self.paused().map(|p| p.reason);
        for reason in PauseReason::ALL {
            let v = u8::from(paused == Some(reason));
            out.push_str(&format!("chronicle_worker_paused{{{lbl},reason=\"{reason}\"}} {v}\n"));
        }

        histogram(
            &mut out,
            "chronicle_outbox_batch_duration_seconds",
            "Time to claim, project and complete one batch.",
            &lbl,
            &self.batch_duration,
        );
        histogram(
            &mut out,
            "chronicle_projection_latency_seconds",
            "Time from an event's delivery being enqueued (its outbox row, stamped by the database) to its completion.",
            &lbl,
            &self.projection_latency,
        );
        histogram(
            &mut out,
            "chronicle_rebuild_duration_seconds",
            "Duration of rebuild runs.",
            &lbl,
            &self.rebuild_duration,
        );
        for (name, help, v) in [
            (
                "chronicle_rebuild_last_finished_timestamp_seconds",
                "When the last rebuild finished (seconds since the epoch).",
                &self.rebuild_last_finished,
            ),
            (
                "chronicle_rebuild_last_success_timestamp_seconds",
                "When the last successful rebuild finished (seconds since the epoch).",
                &self.rebuild_last_success,
            ),
        ] {
            family(&mut out, name, "gauge", help);
            if let Some(t) = v.lock().map(|g| *g).unwrap_or(None) {
                out.push_str(&format!("{name}{{{lbl}}} {}\n", fmt_f64(t)));
            }
        }
        out
    }
}

/// The vacuum horizon's gauges, one series per kind of holder (0 when none of that kind
/// holds it back; the age in seconds left out where it is not known: for replication,
/// and for another role's transaction without `pg_read_all_stats`), and the outbox's dead
/// rows. Nothing before the first sample.
fn render_horizon(out: &mut String, lbl: &str, horizon: Option<&Horizon>) {
    let seconds = "chronicle_db_oldest_xmin_age_seconds";
    family(
        out,
        seconds,
        "gauge",
        "Age of the oldest transaction holding back the vacuum horizon, by holder (transaction, \
         prepared_transaction); 0 when none does.",
    );
    for holder in [Holder::Transaction, Holder::PreparedTransaction] {
        let Some(age) = horizon.map(|h| h.of(holder)) else { break };
        let value = if age.held_by.is_none() { Some(0.0) } else { age.age_seconds };
        if let Some(v) = value {
            out.push_str(&format!("{seconds}{{{lbl},holder=\"{}\"}} {}\n", holder.as_str(), fmt_f64(v)));
        }
    }
    let xids = "chronicle_db_oldest_xmin_age_transactions";
    family(
        out,
        xids,
        "gauge",
        "Transactions started since the snapshot of the oldest holder of the vacuum horizon, by holder \
         (transaction, prepared_transaction, replication); 0 when none does.",
    );
    for holder in Holder::ALL {
        let Some(age) = horizon.map(|h| h.of(holder)) else { break };
        let v = age.age_transactions.unwrap_or(0);
        out.push_str(&format!("{xids}{{{lbl},holder=\"{}\"}} {v}\n", holder.as_str()));
    }
    let dead = "chronicle_outbox_dead_rows";
    family(
        out,
        dead,
        "gauge",
        "Dead row versions in the outbox table that vacuum has not removed yet (the statistics' n_dead_tup).",
    );
    if let Some(h) = horizon {
        out.push_str(&format!("{dead}{{{lbl}}} {}\n", h.outbox_dead_rows));
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
}

fn histogram(out: &mut String, name: &str, help: &str, lbl: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    let mut cumulative = 0;
    for (b, c) in h.bounds.iter().zip(&h.counts) {
        cumulative += c.load(Ordering::Relaxed);
        out.push_str(&format!("{name}_bucket{{{lbl},le=\"{}\"}} {cumulative}\n", fmt_f64(*b)));
    }
    let count = h.count.load(Ordering::Relaxed);
    out.push_str(&format!("{name}_bucket{{{lbl},le=\"+Inf\"}} {count}\n"));
    out.push_str(&format!("{name}_sum{{{lbl}}} {}\n", fmt_f64(h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6)));
    out.push_str(&format!("{name}_count{{{lbl}}} {count}\n"));
}

fn fmt_f64(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Escapes a label value as the text format requires.
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help_type_and_worker_id() {
        let m = Metrics::new("c\"1");
        m.processed.fetch_add(3, Ordering::Relaxed);
        m.terminal_failure(ErrorReason::InvalidPayload);
        m.batch_duration.observe(0.003);
        *m.gauges.lock().unwrap() = Some(Gauges {
            pending: 5,
            pending_estimated: false,
            oldest_pending_age_seconds: 1.5,
            oldest_pending_with_retries_age_seconds: 7.25,
            inflight: 2,
            stuck: 0,
            failed: 1,
        });
        let text = m.render();
        for name in [
            "chronicle_outbox_pending_events",
            "chronicle_outbox_pending_estimated",
            "chronicle_outbox_lag_events",
            "chronicle_outbox_oldest_pending_age_seconds",
            "chronicle_outbox_oldest_pending_with_retries_age_seconds",
            "chronicle_outbox_inflight_events",
            "chronicle_outbox_stuck_processing_events",
            "chronicle_outbox_failed_events",
            "chronicle_outbox_processed_total",
            "chronicle_outbox_retry_scheduled_total",
            "chronicle_outbox_terminal_failed_total",
            "chronicle_outbox_reclaimed_total",
            "chronicle_outbox_lease_lost_total",
            "chronicle_outbox_db_errors_total",
            "chronicle_db_reconnects_total",
            "chronicle_metrics_server_restarts_total",
            "chronicle_outbox_batch_duration_seconds",
            "chronicle_projection_latency_seconds",
            "chronicle_rebuild_duration_seconds",
            "chronicle_rebuild_last_finished_timestamp_seconds",
            "chronicle_rebuild_last_success_timestamp_seconds",
            "chronicle_build_info",
            "chronicle_worker_paused",
            "chronicle_db_oldest_xmin_age_seconds",
            "chronicle_db_oldest_xmin_age_transactions",
            "chronicle_outbox_dead_rows",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains("chronicle_outbox_processed_total{worker_id=\"c\\\"1\"} 3\n"), "{text}");
        assert!(text.contains("error_reason=\"invalid_payload\"} 1\n"));
        assert!(text.contains("chronicle_outbox_pending_events{worker_id=\"c\\\"1\"} 5\n"));
        assert!(text.contains("chronicle_outbox_lag_events{worker_id=\"c\\\"1\"} 7\n"), "lag = pending + processing");
        assert!(text.contains("chronicle_outbox_pending_estimated{worker_id=\"c\\\"1\"} 0\n"), "{text}");
        assert!(text.contains("chronicle_outbox_oldest_pending_age_seconds{worker_id=\"c\\\"1\"} 1.5\n"), "{text}");
        assert!(
            text.contains("chronicle_outbox_oldest_pending_with_retries_age_seconds{worker_id=\"c\\\"1\"} 7.25\n"),
            "{text}"
        );
        assert!(
            text.contains("chronicle_outbox_batch_duration_seconds_bucket{worker_id=\"c\\\"1\",le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("chronicle_outbox_batch_duration_seconds_count{worker_id=\"c\\\"1\"} 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains("worker_id="), "{line}");
        }
    }

    #[test]
    fn the_paused_gauge_is_one_for_the_reason_and_zero_for_the_others() {
        let m = Metrics::new("w");
        let text = m.render();
        assert!(text.contains("chronicle_worker_paused{worker_id=\"w\",reason=\"privileges\"} 0\n"), "{text}");
        *m.paused.lock().unwrap() = Some(Paused {
            reason: PauseReason::Resources,
            sqlstate: Some("53100".into()),
            error: "could not extend file \"base/1/2\": No space left on device".into(),
            during: "completing",
            since: 1.5,
        });
        let text = m.render();
        assert!(text.contains("chronicle_worker_paused{worker_id=\"w\",reason=\"resources\"} 1\n"), "{text}");
        let ones = text.lines().filter(|l| l.starts_with("chronicle_worker_paused{") && l.ends_with(" 1")).count();
        assert_eq!(ones, 1, "{text}");
        let body: serde_json::Value = serde_json::from_str(&m.paused().unwrap().readyz_body()).unwrap();
        assert_eq!(body["status"], "paused");
        assert_eq!(body["reason"], "resources");
        assert_eq!(body["sqlstate"], "53100");
        assert!(body["error"].as_str().unwrap().contains("No space left"), "{body}");
    }

    #[test]
    fn the_horizon_renders_one_series_per_holder_and_leaves_out_unknown_ages() {
        use crate::outbox::horizon::HolderAge;
        let m = Metrics::new("w");
        let text = m.render();
        assert!(!text.contains("chronicle_db_oldest_xmin_age_seconds{"), "nothing before the first sample: {text}");
        *m.horizon.lock().unwrap() = Some(Horizon {
            transaction: HolderAge { age_seconds: None, age_transactions: Some(12), held_by: Some("pid 7".into()) },
            prepared_transaction: HolderAge {
                age_seconds: Some(301.5),
                age_transactions: Some(40),
                held_by: Some("prepared transaction 'x'".into()),
            },
            replication: HolderAge::default(),
            outbox_dead_rows: 1_200_000,
        });
        let text = m.render();
        assert!(
            !text.contains("chronicle_db_oldest_xmin_age_seconds{worker_id=\"w\",holder=\"transaction\"}"),
            "{text}"
        );
        for line in [
            "chronicle_db_oldest_xmin_age_seconds{worker_id=\"w\",holder=\"prepared_transaction\"} 301.5\n",
            "chronicle_db_oldest_xmin_age_transactions{worker_id=\"w\",holder=\"transaction\"} 12\n",
            "chronicle_db_oldest_xmin_age_transactions{worker_id=\"w\",holder=\"prepared_transaction\"} 40\n",
            "chronicle_db_oldest_xmin_age_transactions{worker_id=\"w\",holder=\"replication\"} 0\n",
            "chronicle_outbox_dead_rows{worker_id=\"w\"} 1200000\n",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        for s in [0.05, 0.5, 0.5, 5.0] {
            h.observe(s);
        }
        let mut out = String::new();
        histogram(&mut out, "x", "h", "a=\"b\"", &h);
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.1\"} 1\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"1\"} 3\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 4\n"));
        assert!(out.contains("x_sum{a=\"b\"} 6.05\n"), "{out}");
    }
}
