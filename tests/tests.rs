//! All integration tests build as one binary (like ripgrep's), sharing one harness.

mod util;

#[cfg(unix)] // kills workers and servers with signals, restarts throwaway clusters
mod chaos;
mod cli;
mod credentials;
mod eraser_role;
mod events;
mod fail_fast;
mod horizon;
mod isolation;
#[cfg(target_os = "linux")] // ulimit, setpriv and /proc
mod metrics_endpoint;
mod network;
mod ops;
mod outbox;
mod panics;
mod pause;
mod read_model;
mod rebuild;
mod schema;
#[cfg(unix)] // runs run.sh with bash
mod scripts;
mod tables;
mod terminal_safety;
#[cfg(unix)] // throwaway clusters with key files of mode 0600
mod tls;
mod verify;
mod worker;
