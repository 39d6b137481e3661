//! `chronicle prune`: deletes old `done` deliveries so the outbox stays small, in short
//! batches that never hold many locks for long.

use std::time::Duration;

use lexopt::prelude::*;
use serde_json::json;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, parse_count, parse_duration, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::error::{AppError, Result};
use crate::help::Help;
use crate::outbox;

pub const SUMMARY: &str = "Delete done outbox rows older than a duration, in small batches";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL];

pub const DEFAULT_BATCH: u64 = 1_000;
pub const MAX_BATCH: u64 = 100_000;

pub fn help() -> Help {
    Help::new(
        "Delete the done rows of chronicle_outbox_events whose processed_at is older than --older-than. \
         Pending, processing and failed rows are never deleted, nor any event or entry. Each batch is its own \
         short statement (rows locked by anyone are skipped), so it is safe while workers run. The worker can do \
         the same on its own: set OUTBOX_DONE_RETENTION_SECONDS (see chronicle worker --help).",
    )
    .usage(&["chronicle prune --older-than DURATION [--batch-size N] [--dry-run] [--json]"])
    .flags(
        SETTINGS,
        &[
            (
                "--older-than DURATION",
                "Required. Delete done rows processed before now minus this (90s, 15m, 2h, 7d; 0 = all).".into(),
            ),
            ("--batch-size N", format!("Rows deleted per statement (1-{MAX_BATCH}; default {DEFAULT_BATCH}).")),
            ("--dry-run", "Count the rows that would be deleted; delete nothing.".into()),
            (
                "--json",
                "Print one JSON object: deleted, batches, dry_run, older_than_seconds, cutoff (see \
                 docs/operations.md)."
                    .into(),
            ),
        ],
    )
    .examples(&[
        "chronicle prune --older-than 7d",
        "chronicle prune --older-than 24h --dry-run",
        "chronicle prune --older-than 30d --batch-size 5000 --json",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub older_than: Duration,
    pub batch_size: u32,
    pub dry_run: bool,
    pub json: bool,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let mut older_than = None;
    let mut batch_size = DEFAULT_BATCH as u32;
    let (mut dry_run, mut json) = (false, false);
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("older-than") => {
                let v = string_value(p, "older-than")?;
                older_than = Some(
                    parse_duration(v.trim())
                        .map_err(|why| AppError::usage(format!("invalid --older-than {v:?}: {why}")))?,
                );
            }
            Long("batch-size") => {
                let v = string_value(p, "batch-size")?;
                batch_size = parse_count(v.trim(), 1, MAX_BATCH)
                    .map_err(|why| AppError::usage(format!("invalid --batch-size {v:?}: {why}")))?
                    as u32;
            }
            Long("dry-run") => dry_run = true,
            Long("json") => json = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    let older_than = older_than.ok_or_else(|| {
        AppError::usage("--older-than is required: how old a done row must be to go, e.g. --older-than 7d")
    })?;
    Ok(Some(Args { database_url: src.database_url()?, older_than, batch_size, dry_run, json }))
}

pub fn run(args: Args) -> Result<()> {
    let mut client = db::connect_for_command(&args.database_url)?;
    let cutoff = outbox::prune_cutoff(&mut client, args.older_than)
        .map_err(|e| AppError::db("while reading the database clock", e))?;
    let (deleted, batches) = if args.dry_run {
        let n = outbox::count_prunable(&mut client, cutoff).map_err(|e| AppError::db("while counting done rows", e))?;
        (n, 0)
    } else {
        let r = outbox::prune_done(&mut client, cutoff, args.batch_size, || true)
            .map_err(|e| AppError::db("while deleting done rows", e))?;
        (r.deleted, r.batches)
    };
    if args.json {
        println!(
            "{}",
            json!({"deleted": deleted, "batches": batches, "dry_run": args.dry_run,
                   "older_than_seconds": args.older_than.as_secs_f64(), "cutoff": cutoff})
        );
    } else if args.dry_run {
        println!(
            "would delete {deleted} done row(s) processed before {} (dry run: nothing deleted)",
            cutoff.to_rfc3339()
        );
    } else {
        println!("deleted {deleted} done row(s) processed before {} in {batches} batch(es)", cutoff.to_rfc3339());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    fn parse_args(args: &[&str]) -> Result<Option<Args>> {
        crate::cmd::parse_for_test(parse, args)
    }

    #[test]
    fn older_than_is_required_and_batch_bounded() {
        let a = parse_args(&["--older-than", "7d"]).unwrap().unwrap();
        assert_eq!((a.older_than, a.batch_size, a.dry_run), (Duration::from_secs(7 * 86_400), 1000, false));
        let a = parse_args(&["--older-than", "0", "--batch-size", "5", "--dry-run", "--json"]).unwrap().unwrap();
        assert_eq!((a.older_than, a.batch_size, a.dry_run, a.json), (Duration::ZERO, 5, true, true));
        for bad in [&[][..], &["--older-than", "week"], &["--older-than", "1d", "--batch-size", "0"]] {
            assert_eq!(parse_args(bad).unwrap_err().kind(), Kind::Usage, "{bad:?}");
        }
    }
}
