//! A real Prometheus server on loopback scraping a real worker every second, with the
//! alert rules loaded: what it stores is what the worker did, the rules evaluate, a
//! poison event fires ChronicleTerminalFailures, and every dashboard query is valid
//! PromQL that it answers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::dashboard::{dashboard, panel_exprs};
use crate::endpoint::insert_poison_event;
use crate::rules::alert_blocks;
use crate::support::{get, repo_file, tool, url_encode, watchdog, Worker};
use crate::util::{free_port, insert_events, TestDb};

/// A Prometheus server with its data in a temporary folder; killed and its folder removed
/// when dropped (or by the watchdog if this test process dies first).
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Scrapes `targets` every second as job "chronicle", with monitoring/alerts.yml loaded.
    pub fn start(targets: &[SocketAddr]) -> Prometheus {
        let bin = tool("prometheus");
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("chronicle-external-prometheus-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("creating the prometheus folder");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n  - job_name: chronicle\n    static_configs:\n      - targets: [{}]\n",
            repo_file("monitoring/alerts.yml").display(),
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("writing prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("creating the prometheus log");
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        // Our Prometheus is the process whose command line names its folder.
        watchdog(child.id(), "cmdline", &dir.display().to_string(), &dir);
        let p = Prometheus { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), dir };
        p.wait("Prometheus to be ready", || {
            crate::support::request(p.addr, &crate::support::get_bytes("/-/ready"), Duration::from_secs(2))
                .is_ok_and(|r| r.status == 200)
        });
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Polls `cond` every 200 ms for up to 60 s; fails with Prometheus' log.
    pub fn wait(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n--- prometheus log\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// GET an API path; the parsed JSON.
    pub fn api(&self, path_and_query: &str) -> Value {
        let r = get(self.addr, path_and_query);
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("GET {path_and_query}: {e}: {r:?}"))
    }

    /// An instant query: the result vector (`status` must be success).
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let v = self.api(&format!("/api/v1/query?query={}", url_encode(promql)));
        assert_eq!(v["status"], "success", "query {promql}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query that returns one series, if it does.
    pub fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql);
        let [one] = result.as_slice() else { return None };
        one["value"][1].as_str().and_then(|s| s.parse().ok())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The worker's target as Prometheus' API reports it, once it has been scraped: health.
fn target_health(p: &Prometheus) -> Option<String> {
    let v = p.api("/api/v1/targets?state=active");
    let t = v["data"]["activeTargets"].as_array()?.iter().find(|t| t["labels"]["job"] == "chronicle")?.clone();
    t["health"].as_str().map(str::to_string)
}

#[test]
fn a_real_prometheus_reads_back_what_the_worker_did_and_fires_on_a_poison_event() {
    const N: i64 = 300;
    let db = TestDb::new();
    let worker = Worker::start(&db, &[]);
    let prom = Prometheus::start(&[worker.addr]);
    let id = worker.worker_id();

    // Scraped, with every counter at 0, before any work: increase() then sees the rises.
    prom.wait("the worker's target to be up", || target_health(&prom).as_deref() == Some("up"));
    prom.wait("processed_total = 0 stored", || {
        prom.value("chronicle_outbox_processed_total{job=\"chronicle\"}") == Some(0.0)
    });
    prom.wait("terminal failures stored", || {
        prom.value("chronicle_outbox_terminal_failed_total{job=\"chronicle\",error_reason=\"unknown_event_type\"}")
            == Some(0.0)
    });
    assert_eq!(prom.value("up{job=\"chronicle\"}"), Some(1.0));

    let mut c = db.client();
    insert_events(&mut c, N);
    insert_poison_event(&mut c);
    worker.wait_for("chronicle_outbox_processed_total", &[], "the drain", |v| v == N as f64);

    let processed = format!("chronicle_outbox_processed_total{{job=\"chronicle\",worker_id=\"{id}\"}}");
    prom.wait("Prometheus to store processed_total = N", || prom.value(&processed) == Some(N as f64));
    let series = prom.query(&processed);
    assert_eq!(series[0]["metric"]["instance"], worker.addr.to_string(), "{series:?}");
    prom.wait("the backlog gauge at 0", || prom.value("max(chronicle_outbox_pending_events)") == Some(0.0));
    prom.wait("the failed gauge at 1", || prom.value("max(chronicle_outbox_failed_events)") == Some(1.0));

    // The rules are loaded and evaluate without errors.
    let names: Vec<String> = alert_blocks().into_iter().map(|(n, _)| n).collect();
    prom.wait("every rule evaluated", || {
        let v = prom.api("/api/v1/rules");
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        for r in &rules {
            assert_ne!(r["health"], "err", "rule {} fails to evaluate: {r}", r["name"]);
        }
        rules.len() == names.len() && rules.iter().all(|r| r["health"] == "ok")
    });

    // The poison event fires the terminal-failure alert, with its error_reason.
    prom.wait("ChronicleTerminalFailures to fire for unknown_event_type", || {
        let v = prom.api("/api/v1/alerts");
        v["data"]["alerts"].as_array().into_iter().flatten().any(|a| {
            a["labels"]["alertname"] == "ChronicleTerminalFailures"
                && a["labels"]["error_reason"] == "unknown_event_type"
                && a["labels"]["severity"] == "warning"
                && a["state"] == "firing"
        })
    });
    let alerts = prom.api("/api/v1/alerts");
    for a in alerts["data"]["alerts"].as_array().into_iter().flatten() {
        let name = a["labels"]["alertname"].as_str().unwrap_or("");
        // Nothing else is wrong with this worker (the others need minutes, or are absent).
        assert!(
            name == "ChronicleTerminalFailures" || a["state"] == "pending",
            "unexpected alert {name} {}: {a}",
            a["state"]
        );
    }
}

/// Every dashboard query, with Grafana's variables filled in, is valid PromQL that a real
/// Prometheus answers while it scrapes a worker; the outbox panels return data.
#[test]
fn every_dashboard_query_runs_on_a_real_prometheus() {
    let db = TestDb::new();
    let worker = Worker::start(&db, &[]);
    let prom = Prometheus::start(&[worker.addr]);
    let mut c = db.client();
    prom.wait("two scrapes", || prom.value("count_over_time(up{job=\"chronicle\"}[1m])").is_some_and(|n| n >= 2.0));
    insert_events(&mut c, 50);
    worker.wait_for("chronicle_outbox_processed_total", &[], "the drain", |v| v == 50.0);
    prom.wait("processed_total = 50 stored", || prom.value("chronicle_outbox_processed_total") == Some(50.0));

    let d = dashboard();
    for (title, expr) in panel_exprs(&d) {
        let promql = expr
            .replace("$__rate_interval", "10s")
            .replace("$__range", "1h")
            .replace("$job", "chronicle")
            .replace("$worker_id", ".*");
        assert!(!promql.contains('$'), "{title}: an unknown variable in {expr}");
        let result = prom.query(&promql);
        let outbox_gauge = [
            "pending_events",
            "inflight_events",
            "failed_events",
            "stuck_processing_events",
            "oldest_pending_age_seconds",
            "up{",
        ]
        .iter()
        .any(|g| promql.contains(g));
        if outbox_gauge {
            assert!(!result.is_empty(), "{title}: no data for {promql}");
        }
    }
    prom.wait("the processed rate panel to show work", || {
        prom.query("sum by (worker_id) (rate(chronicle_outbox_processed_total[1m]))")
            .first()
            .and_then(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()))
            .is_some_and(|r| r > 0.0)
    });
}
