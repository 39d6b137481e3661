//! What `chronicle replay-failed` prints about a replay: a report for people, or JSON.
//! Pure.

use std::collections::BTreeMap;

use serde_json::json;

use crate::outbox::{ReplayFilter, ReplayOutcome};
use crate::terminal::{Align, Table};

/// Replayed rows per `error_reason` (`none` for a row without one).
fn by_reason(outcome: &ReplayOutcome) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for r in &outcome.replayed {
        *m.entry(r.error_reason.clone().unwrap_or_else(|| "none".into())).or_insert(0) += 1;
    }
    m
}

/// Distinct event ids of the skipped rows, in order.
fn skipped_events(outcome: &ReplayOutcome) -> Vec<uuid::Uuid> {
    let mut ids: Vec<uuid::Uuid> = Vec::new();
    for r in &outcome.skipped_live_delivery {
        if !ids.contains(&r.event_id) {
            ids.push(r.event_id);
        }
    }
    ids
}

/// The replay as JSON: counts, skipped events and every replayed row.
pub fn report_json(outcome: &ReplayOutcome, dry_run: bool) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = outcome
        .replayed
        .iter()
        .map(|r| {
            json!({"outbox_id": r.outbox_id, "event_id": r.event_id, "error_reason": r.error_reason,
                   "replay_count": r.replay_count})
        })
        .collect();
    json!({
        "replayed": outcome.replayed.len(),
        "by_error_reason": by_reason(outcome),
        "skipped_live_delivery": skipped_events(outcome),
        "dry_run": dry_run,
        "rows": rows,
    })
}

/// The replay for people: counts per reason, the rows of a dry run, what was skipped.
pub fn report_text(outcome: &ReplayOutcome, dry_run: bool, filter: &ReplayFilter) -> String {
    let mut s = String::new();
    let verb = if dry_run { "would replay" } else { "replayed" };
    s.push_str(&format!("{verb} {} failed row(s)", outcome.replayed.len()));
    if dry_run {
        s.push_str(" (dry run: nothing changed)");
    }
    s.push('\n');
    let mut counts = Table::new(2, &[Align::Left, Align::Right]);
    for (reason, n) in by_reason(outcome) {
        counts.row([reason.to_string(), n.to_string()]);
    }
    s.push_str(&counts.render());
    if dry_run && !outcome.replayed.is_empty() {
        let mut rows = Table::new(2, &[Align::Right, Align::Left, Align::Left, Align::Right]);
        rows.row(["outbox_id", "event_id", "error_reason", "replay_count"]);
        for r in &outcome.replayed {
            rows.row([
                r.outbox_id.to_string(),
                r.event_id.to_string(),
                r.error_reason.as_deref().unwrap_or("none").to_string(),
                r.replay_count.to_string(),
            ]);
        }
        s.push_str(&rows.render());
    }
    let skipped = skipped_events(outcome);
    if skipped.is_empty() {
        s.push_str("skipped 0 (no matching failed row's event has a pending or processing delivery)\n");
    } else {
        s.push_str(&format!(
            "skipped {} failed row(s) of {} event(s) that already have a pending or processing delivery:\n",
            outcome.skipped_live_delivery.len(),
            skipped.len()
        ));
        for id in skipped {
            s.push_str(&format!("  {id}\n"));
        }
    }
    if outcome.replayed.len() as u64 == filter.limit as u64 {
        s.push_str(&format!("--limit {} reached: run again for more\n", filter.limit));
    }
    s
}
