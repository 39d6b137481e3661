//! Logging setup: `env_logger` on stderr, level from `RUST_LOG` (default `info`).

use crate::config::Env;

pub fn init(env: &Env) {
    let mut b = env_logger::Builder::new();
    b.filter_level(log::LevelFilter::Info);
    // The driver logs every server NOTICE at info; only its warnings interest operators.
    b.filter_module("postgres", log::LevelFilter::Warn);
    b.filter_module("tokio_postgres", log::LevelFilter::Warn);
    if let Some(spec) = env.get("RUST_LOG") {
        b.parse_filters(spec);
    }
    b.format_timestamp_millis();
    b.target(env_logger::Target::Stderr);
    // A second init (tests calling main-like code twice) is harmless.
    let _ = b.try_init();
}
