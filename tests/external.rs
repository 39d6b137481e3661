//! Checks that need tools from outside the Rust toolchain: `promtool` and a real
//! Prometheus server (Debian's package `prometheus` gives both; `./run.sh check-all`
//! installs it, then runs this binary with `cargo test --test external`).
//!
//! A missing tool fails the test that needs it, loudly, saying how to install it:
//! nothing here is ever skipped. The checks cover `monitoring/` (alert rules, their unit
//! tests, the Grafana dashboard) against the exposition of a real worker, and the
//! worker's HTTP endpoint as Prometheus and misbehaving clients meet it.

#[path = "util.rs"]
mod util;

#[path = "external/support.rs"]
mod support;

#[path = "external/dashboard.rs"]
mod dashboard;
#[path = "external/endpoint.rs"]
mod endpoint;
#[path = "external/prometheus.rs"]
mod prometheus;
#[path = "external/rules.rs"]
mod rules;
#[path = "external/run_sh.rs"]
mod run_sh;
