//! All integration tests build as one binary (like ripgrep's), sharing one harness.

mod util;

mod chaos;
mod cli;
mod events;
#[cfg(target_os = "linux")]
mod metrics_endpoint;
mod ops;
mod outbox;
mod read_model;
mod rebuild;
mod schema;
mod tls;
mod worker;
