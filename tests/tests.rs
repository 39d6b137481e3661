//! All integration tests build as one binary (like ripgrep's), sharing one harness.

mod util;

mod cli;
mod events;
mod outbox;
mod worker;
mod schema;
