//! `chronicle migrate`: brings the database schema to what this binary expects.

use std::time::Duration;

use lexopt::prelude::*;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, parse_duration, DbUrl, Env, Setting, Sources};
use crate::db::{self, migrate};
use crate::error::{AppError, Result};
use crate::help::Help;
use crate::terminal::{Align, Table};

pub const SUMMARY: &str = "Apply the embedded schema migrations (--status: list them)";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL];

pub fn help() -> Help {
    Help::new(
        "Apply the SQL migrations embedded in this binary, in order, each in its own transaction. Applied \
         migrations are recorded (version, name, checksum, time) in chronicle_schema_migrations; a changed or \
         unknown applied migration is refused (exit 1). Concurrent runs wait for each other on an advisory lock \
         and apply nothing twice. Up to date: does nothing.\n\n\
         An existing chronicle_events (created by the application) is adopted when it matches the contract, \
         and refused with the list of differences otherwise. A database whose encoding is not UTF8 (SQL_ASCII, \
         LATIN1, ...) is refused (exit 1) before anything is changed.",
    )
    .usage(&["chronicle migrate [--status] [--wait DURATION]"])
    .flags(
        SETTINGS,
        &[
            ("--status", "List applied and pending migrations; change nothing.".into()),
            (
                "--wait DURATION",
                "Wait up to DURATION (e.g. 30s, 2m) for the database to accept connections first. Without it \
                 an unreachable database exits 3 at once."
                    .into(),
            ),
        ],
    )
    .examples(&[
        "DATABASE_URL=postgresql://postgres@localhost/app chronicle migrate",
        "chronicle migrate --status \\",
        "    --database-url 'host=/var/run/postgresql dbname=app'",
        "chronicle migrate --wait 60s    # a container started before its database",
    ])
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
        print!("{}", render_status(&migrate::status(&mut client)?));
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

/// `migrate --status` for people: one aligned line per migration, applied then pending.
pub fn render_status(st: &migrate::Status) -> String {
    let mut table = Table::new(0, &[Align::Left, Align::Right, Align::Left, Align::Left]);
    table.row(["STATE", "VERSION", "NAME", "APPLIED_AT"]);
    for a in &st.applied {
        table.row(["applied", &a.version.to_string(), &a.name, &a.applied_at]);
    }
    for m in &st.pending {
        table.row(["pending", &m.version.to_string(), m.name, "-"]);
    }
    let mut s = table.render();
    if st.pending.is_empty() {
        s.push_str(&format!("up to date (schema version {})\n", migrate::expected_version()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terminal::cell_spans;

    #[test]
    fn status_lines_up_whatever_the_names() {
        let applied = |version: i32, name: &str| migrate::Applied {
            version,
            name: name.to_string(),
            checksum: String::new(),
            applied_at: "2026-12-01 09:30:00+00".to_string(),
        };
        let st = migrate::Status {
            applied: vec![
                applied(1, "events"),
                applied(9, "a_much_longer_migration_name_than_twelve"),
                applied(10, "读书笔记索引"),
            ],
            pending: migrate::MIGRATIONS.iter().rev().take(2).collect(),
        };
        let text = render_status(&st);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        // The version ends, the name and the time start, at the same column on every line.
        let header = cell_spans(lines[0]);
        for l in &lines {
            let cells = cell_spans(l);
            assert_eq!(cells.len(), 4, "{text}");
            assert_eq!(cells[1].1, header[1].1, "{text}");
            assert_eq!(cells[2].0, header[2].0, "{text}");
            assert_eq!(cells[3].0, header[3].0, "{text}");
        }
    }
}
