//! monitoring/grafana-dashboard.json: it is Grafana JSON with the variables operators
//! need, and it and the alert rules use exactly the metric names a real worker exports.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::rules::alert_exprs;
use crate::support::{families, metric_names, read_repo_file, Worker};
use crate::util::{insert_events, TestDb};

pub fn dashboard() -> Value {
    serde_json::from_str(&read_repo_file("monitoring/grafana-dashboard.json"))
        .unwrap_or_else(|e| panic!("monitoring/grafana-dashboard.json does not parse: {e}"))
}

/// Every `expr` of the dashboard's panels, with the panel title.
pub fn panel_exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((title.clone(), e.to_string()));
            }
        }
    }
    out
}

/// The panels, rows' nested panels included.
pub fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels").iter() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// The queries of the template variables (`label_values(...)`).
fn variable_queries(d: &Value) -> Vec<String> {
    d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["definition"].as_str().map(str::to_string))
        .collect()
}

fn variable<'a>(d: &'a Value, name: &str) -> &'a Value {
    d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("the dashboard has no `{name}` template variable"))
}

#[test]
fn the_dashboard_is_grafana_json_with_datasource_and_worker_id_variables() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_i64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "uid");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "title");

    let ds = variable(&d, "datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    assert!(
        d["__inputs"].as_array().into_iter().flatten().any(|i| i["name"] == "DS_PROMETHEUS"),
        "__inputs DS_PROMETHEUS"
    );
    let worker = variable(&d, "worker_id");
    assert_eq!(worker["type"], "query");
    assert!(worker["definition"].as_str().unwrap_or("").contains("worker_id"), "{worker}");
    assert_eq!(worker["includeAll"], true);
    assert_eq!(worker["multi"], true);

    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(ids.insert(p["id"].as_i64().expect("panel id")), "duplicate panel id in {title}");
        let g = &p["gridPos"];
        assert!(
            g["w"].as_i64().is_some_and(|w| w > 0)
                && g["x"].as_i64().is_some_and(|x| x + g["w"].as_i64().unwrap() <= 24),
            "{title}: gridPos {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: the panel's datasource is not the variable");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{title}: a target without expr"));
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}: {expr}");
            if !metric_names(expr).is_empty() {
                assert!(expr.contains("worker_id=~\"$worker_id\""), "{title}: not filtered by $worker_id: {expr}");
            }
        }
    }

    // The runbook's "must watch" list (section 8.1) each has a panel.
    let all: String = panel_exprs(&d).into_iter().map(|(_, e)| e + "\n").collect();
    for needle in [
        "chronicle_outbox_pending_events",
        "chronicle_outbox_oldest_pending_age_seconds",
        "chronicle_outbox_inflight_events",
        "chronicle_outbox_stuck_processing_events",
        "chronicle_outbox_failed_events",
        "rate(chronicle_outbox_processed_total",
        "rate(chronicle_outbox_retry_scheduled_total",
        "sum by (error_reason) (increase(chronicle_outbox_terminal_failed_total",
        "rate(chronicle_outbox_reclaimed_total",
        "rate(chronicle_outbox_lease_lost_total",
        "rate(chronicle_outbox_db_errors_total",
        "histogram_quantile(0.99, sum by (le) (rate(chronicle_outbox_batch_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(chronicle_projection_latency_seconds_bucket",
        "chronicle_rebuild_duration_seconds_bucket",
        "chronicle_rebuild_last_finished_timestamp_seconds",
        "chronicle_rebuild_last_success_timestamp_seconds",
    ] {
        assert!(all.contains(needle), "no dashboard query contains {needle:?}");
    }
}

/// Names are the contract (docs/DESIGN.md §6): a dashboard or rule naming a series the worker
/// does not export shows nothing and never fires. Checked against a real worker's
/// exposition, both ways for the dashboard (every family has a panel).
#[test]
fn the_dashboard_and_the_alert_rules_use_only_metric_names_a_worker_exports() {
    let db = TestDb::new();
    let worker = Worker::start(&db, &[]);
    let mut c = db.client();
    insert_events(&mut c, 20);
    worker.wait_for("chronicle_outbox_processed_total", &[], "20 events processed", |v| v == 20.0);
    let exported = families(&worker.metrics());
    assert!(exported.len() >= 17, "{exported:?}");

    let d = dashboard();
    let mut on_dashboard = BTreeSet::new();
    for (title, expr) in
        panel_exprs(&d).into_iter().chain(variable_queries(&d).into_iter().map(|q| ("variable".to_string(), q)))
    {
        for name in metric_names(&expr) {
            assert!(
                exported.contains_key(&name),
                "dashboard panel {title:?} uses {name}, which the worker does not export: {expr}"
            );
            on_dashboard.insert(name);
        }
    }
    for name in exported.keys() {
        assert!(on_dashboard.contains(name), "the worker exports {name}, which no dashboard panel shows");
    }

    for (alert, expr) in alert_exprs() {
        for name in metric_names(&expr) {
            assert!(
                exported.contains_key(&name),
                "alert {alert} uses {name}, which the worker does not export: {expr}"
            );
        }
    }
}
