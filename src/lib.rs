//! chronicle: keeps the activity timeline of a notes application correct, fast and
//! operable. The binary is a thin shell over this library so integration tests and
//! benchmarks use the same code.

pub mod cli;
pub mod cmd;
pub mod config;
pub mod db;
pub mod error;
pub mod event;
pub mod logging;
pub mod projection;
pub mod search;
