//! Logging setup: `env_logger` on stderr, level from `RUST_LOG` (default `info`), as
//! text or, with `CHRONICLE_LOG_FORMAT=json` (or `--log-format json`), one JSON object
//! per line for container log pipelines.

use std::io::Write;

use crate::config::{Env, Sources, LOG_FORMAT};
use crate::error::Result;

/// The log format asked for: the `--log-format` flag (given before the command) wins
/// over `CHRONICLE_LOG_FORMAT`. Validated like every other setting.
pub fn format_from(env: &Env, args: &[String]) -> Result<String> {
    let mut src = Sources::new(env);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if !a.starts_with('-') {
            break; // the command: global flags come before it
        }
        if let Some(v) = a.strip_prefix("--log-format=") {
            src.set_flag(&LOG_FORMAT, v.to_string());
        } else if a == "--log-format" {
            src.set_flag(&LOG_FORMAT, it.next().cloned().unwrap_or_default());
        }
    }
    Ok(src.choice(&LOG_FORMAT)?.unwrap_or_else(|| "text".to_string()))
}

pub fn init(env: &Env, format: &str) {
    let mut b = env_logger::Builder::new();
    b.filter_level(log::LevelFilter::Info);
    // The driver logs every server NOTICE at info; only its warnings interest operators.
    b.filter_module("postgres", log::LevelFilter::Warn);
    b.filter_module("tokio_postgres", log::LevelFilter::Warn);
    if let Some(spec) = env.get("RUST_LOG") {
        b.parse_filters(spec);
    }
    if format == "json" {
        b.format(|buf, record| {
            // Escaped as text is: a log line quotes event fields and database messages.
            let line = crate::terminal::json(&serde_json::json!({
                "ts": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            }))?;
            writeln!(buf, "{line}")
        });
    } else {
        // env_logger's own layout, with the message made safe for a terminal: log lines
        // quote event fields and database messages, which may hold escape sequences. One
        // record is one line: a line break in it (a worker id, a message) is escaped too.
        b.format(|buf, record| {
            writeln!(
                buf,
                "[{} {:<5} {}] {}",
                buf.timestamp_millis(),
                record.level(),
                record.target(),
                crate::terminal::printable(&record.args().to_string())
            )
        });
    }
    b.target(env_logger::Target::Stderr);
    // A second init (tests calling main-like code twice) is harmless.
    let _ = b.try_init();
}
