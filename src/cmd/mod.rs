//! One module per subcommand: its help text, `parse` (pure) and `run`.

pub mod append;
pub mod events_input;
pub mod inject;
pub mod migrate;
pub mod worker;
