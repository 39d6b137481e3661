//! All integration tests build as one binary (like ripgrep's), sharing one harness.

mod util;

mod chaos;
mod cli;
mod credentials;
mod eraser_role;
mod events;
mod fail_fast;
mod isolation;
#[cfg(target_os = "linux")]
mod metrics_endpoint;
mod ops;
mod outbox;
mod read_model;
mod rebuild;
mod schema;
mod scripts;
mod terminal_safety;
mod tls;
mod worker;
