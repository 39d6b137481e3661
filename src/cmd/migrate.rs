//! `chronicle migrate`: brings the database schema to what this binary expects.

use std::time::Duration;

use lexopt::prelude::*;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, parse_duration, DbUrl, Env, Setting, Sources};
use crate::db::{self, migrate};
use crate::error::{AppError, Result};

pub const SUMMARY: &str = "Apply the embedded schema migrations (or list them with --status)";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL];

pub fn help() -> String {
    format!(
        "Apply the SQL migrations embedded in this binary, in order, each in its own transaction.
Applied migrations are recorded (version, name, checksum, time) in chronicle_schema_migrations;
a changed or unknown applied migration is refused (exit 1). Concurrent runs wait for each
other on an advisory lock and apply nothing twice. Up to date: does nothing.
An existing chronicle_events (created by the application) is adopted when it matches the
contract, and refused with the list of differences otherwise. A database whose encoding
is not UTF8 (SQL_ASCII, LATIN1, ...) is refused (exit 1) before anything is changed.

USAGE:
    chronicle migrate [--status] [--wait DURATION]

FLAGS:
{}  --status
      List applied and pending migrations; change nothing.
  --wait DURATION
      Wait up to DURATION (e.g. 30s, 2m) for the database to accept connections first.
      Without it an unreachable database exits 3 at once.

EXAMPLES:
    DATABASE_URL=postgresql://postgres@localhost/app chronicle migrate
    chronicle migrate --status --database-url 'host=/var/run/postgresql dbname=app'
    chronicle migrate --wait 60s      # in a container started before its database
",
        config::settings_help(SETTINGS)
    )
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub status_only: bool,
    pub wait: Option<Duration>,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let mut status_only = false;
    let mut wait = None;
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("status") => status_only = true,
            Long("wait") => {
                let v = string_value(p, "wait")?;
                wait = Some(parse_duration(&v).map_err(|why| AppError::usage(format!("invalid --wait {v:?}: {why}")))?);
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    Ok(Some(Args { database_url: src.database_url()?, status_only, wait }))
}

pub fn run(args: Args) -> Result<()> {
    let mut client = match args.wait {
        Some(w) => db::connect_waiting(&args.database_url, w)?,
        None => db::connect_for_command(&args.database_url)?,
    };
    if args.status_only {
        let st = migrate::status(&mut client)?;
        for a in &st.applied {
            println!("applied  {:>4}  {:<12} {}", a.version, a.name, a.applied_at);
        }
        for m in &st.pending {
            println!("pending  {:>4}  {}", m.version, m.name);
        }
        if st.pending.is_empty() {
            println!("up to date (schema version {})", migrate::expected_version());
        }
        return Ok(());
    }
    let report = migrate::migrate(&mut client)?;
    if report.adopted_events_table {
        println!("adopted the existing chronicle_events table (it matches the contract)");
    }
    if report.applied.is_empty() {
        println!("up to date (schema version {})", migrate::expected_version());
    } else {
        for (v, name) in &report.applied {
            println!("applied {v} {name}");
        }
        println!("schema version {}", migrate::expected_version());
    }
    Ok(())
}
