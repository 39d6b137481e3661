//! `./run.sh monitoring`, run with bash: the Prometheus it starts answers on the URL it
//! prints, has the shipped rules loaded, and scrapes the local worker as job `chronicle`.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::rules::alert_blocks;
use crate::support::{get, repo_file, request, watchdog, Worker};
use crate::util::{free_port, TestDb};

fn json(addr: SocketAddr, path: &str) -> Value {
    let r = get(addr, path);
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("GET {path}: {e}: {r:?}"))
}

#[test]
fn run_sh_monitoring_serves_the_rules_and_scrapes_the_local_worker() {
    let db = TestDb::new();
    let worker = Worker::start(&db, &[]);
    let port = free_port();
    // Its own temporary folder, where the verb keeps Prometheus' config and data.
    let tmp = std::env::temp_dir().join(format!("chronicle-external-run-sh-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let out = tmp.join("stdout");
    let mut cmd = Command::new("bash");
    cmd.arg(repo_file("run.sh")).arg("monitoring");
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("OUTBOX_") || k.starts_with("CHRONICLE_") || k == "PROMETHEUS_PORT" {
            cmd.env_remove(k.as_ref());
        }
    }
    let mut child = cmd
        .env("PROMETHEUS_PORT", port.to_string())
        .env("OUTBOX_METRICS_PORT", worker.addr.port().to_string())
        .env("TMPDIR", &tmp)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(tmp.join("stderr")).unwrap())
        .spawn()
        .expect("running bash run.sh monitoring");
    // run.sh execs Prometheus: the same pid, whose command line names our folder.
    watchdog(child.id(), "cmdline", &tmp.display().to_string(), &tmp);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let logs = || {
        format!(
            "--- stdout\n{}--- stderr\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(tmp.join("stderr")).unwrap_or_default()
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut wait = |what: &str, cond: &mut dyn FnMut() -> bool| {
        while !cond() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("run.sh monitoring exited ({status}) while waiting for {what}\n{}", logs());
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait("Prometheus to be ready", &mut || {
        request(addr, &crate::support::get_bytes("/-/ready"), Duration::from_secs(2)).is_ok_and(|r| r.status == 200)
    });
    let printed = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(printed.contains(&format!("http://127.0.0.1:{port}")), "the URL is not printed:\n{}", logs());
    // Every shipped alert is loaded, in group chronicle.
    let rules = json(addr, "/api/v1/rules");
    let groups = rules["data"]["groups"].as_array().cloned().unwrap_or_default();
    let group =
        groups.iter().find(|g| g["name"] == "chronicle").unwrap_or_else(|| panic!("no group chronicle: {rules}"));
    let loaded: Vec<&str> = group["rules"].as_array().unwrap().iter().filter_map(|r| r["name"].as_str()).collect();
    for (alert, _) in alert_blocks() {
        assert!(loaded.contains(&alert.as_str()), "{alert} is not loaded: {loaded:?}");
    }
    // The worker is scraped as job chronicle, and its samples are stored.
    let scrape_url = format!("http://{}/metrics", worker.addr);
    wait("the worker's target to be up", &mut || {
        let v = json(addr, "/api/v1/targets?state=active");
        v["data"]["activeTargets"].as_array().is_some_and(|ts| {
            ts.iter().any(|t| {
                t["labels"]["job"] == "chronicle" && t["scrapeUrl"] == scrape_url.as_str() && t["health"] == "up"
            })
        })
    });
    let v = json(addr, "/api/v1/query?query=chronicle_build_info");
    assert!(v["data"]["result"].as_array().is_some_and(|r| !r.is_empty()), "chronicle_build_info not stored: {v}");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&tmp);
}
