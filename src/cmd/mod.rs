//! One module per subcommand: its help text, `parse` (pure) and `run`.

pub mod append;
pub mod entries;
pub mod erase;
pub mod healthcheck;
pub mod inject;
pub mod libraries;
pub mod migrate;
pub mod prune;
pub mod rebuild;
pub mod replay_failed;
pub mod show;
pub mod status;
pub mod verify;
pub mod worker;
