//! chronicle: keeps the activity timeline of a notes application correct, fast and
//! operable. The binary is a thin shell over this library so integration tests and
//! benchmarks use the same code.

pub mod cli;
pub mod cmd;
pub mod config;
pub mod db;
pub mod entries;
pub mod error;
pub mod error_reason;
pub mod event;
pub mod failpoint;
pub mod help;
pub mod input;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod projection;
pub mod rebuild;
pub mod retry;
pub mod rlimit;
pub mod search;
pub mod sqlstate;
pub mod suggest;
pub mod synthetic;
pub mod terminal;
pub mod timeline;
pub mod verify;
pub mod worker;
pub mod writer;
