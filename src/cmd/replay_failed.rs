//! `chronicle replay-failed`: sends failed deliveries back to the projector once their
//! cause is fixed, with an audit trail (who, why, how often) on every row.

use lexopt::prelude::*;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, parse_count, parse_duration, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::error::{AppError, Result};
use crate::error_reason::ErrorReason;
use crate::help::Help;
use crate::ops;
use crate::outbox::replay_report::{report_json, report_text};
use crate::outbox::{self, ReplayFilter};

pub const SUMMARY: &str = "Send failed outbox rows back to pending, audited (after a fix)";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL];

/// Rows replayed per run unless --limit says otherwise, and the most a run may take.
pub const DEFAULT_LIMIT: u64 = 100;
pub const MAX_LIMIT: u64 = 100_000;

pub fn help() -> Help {
    Help::new(
        "Move failed outbox rows back to pending so the worker projects them again, typically after deploying a \
         fix for their error_reason. In one transaction, the oldest matching failed rows (at most --limit) get \
         attempts 0, no retry time and no claim, replay_count + 1, last_replayed_at = now, last_replayed_by = \
         --by and last_replayed_reason = --reason. error and error_reason stay readable until the row succeeds. \
         Rows held by someone else are skipped (SKIP LOCKED), so it is safe while workers run. Only failed rows \
         are ever touched.\n\n\
         A failed row whose event already has a pending or processing delivery is left failed and reported (one \
         open delivery per event); of several failed rows of one event, only the newest is replayed (the others \
         are reported the same way: they are history, and `chronicle status` counts the event once).",
    )
    .usage(&[
        "chronicle replay-failed --by WHO --reason TEXT [--limit N] [FILTERS]",
        "                        [--dry-run] [--json]",
    ])
    .flags(
        SETTINGS,
        &[
            ("--by WHO", "Required. Who replays (recorded in last_replayed_by).".into()),
            (
                "--reason TEXT",
                "Required. Why (recorded verbatim in last_replayed_reason), e.g. the fix deployed.".into(),
            ),
            (
                "--limit N",
                format!(
                    "Replay at most N rows, oldest first (1-{MAX_LIMIT}; default {DEFAULT_LIMIT}). Run again for more."
                ),
            ),
            ("--error-reason REASON", format!("Only rows failed with this reason: {}.", ErrorReason::names())),
            ("--event-id ID", "Only the deliveries of this event (a UUID). Repeat for several events.".into()),
            (
                "--older-than DURATION",
                "Only rows that failed at least this long ago (by updated_at), e.g. 90s, 15m, 2h, 7d.".into(),
            ),
            ("--dry-run", "Show what would be replayed (the same statement, rolled back); change nothing.".into()),
            (
                "--json",
                "Print one JSON object: replayed, by_error_reason, skipped_live_delivery, dry_run, rows (see \
                 docs/operations.md)."
                    .into(),
            ),
        ],
    )
    .text(
        "Exit codes: 0 done (also when nothing matched), 2 bad or missing flags, 3 database unreachable, 1 other \
         failures.",
    )
    .examples(&[
        "chronicle replay-failed --error-reason invalid_payload --by alice \\",
        "    --reason 'fixed BookMoved parsing (v1.4.2)'",
        "chronicle replay-failed --by alice --reason 'retry after outage' \\",
        "    --error-reason max_attempts_exceeded --limit 5000",
        "chronicle replay-failed --by ops-bot --reason 'ticket OPS-17' \\",
        "    --event-id 0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e10",
        "chronicle replay-failed --by alice --reason check --older-than 1h \\",
        "    --dry-run --json",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub filter: ReplayFilter,
    pub by: String,
    pub reason: String,
    pub dry_run: bool,
    pub json: bool,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let (mut by, mut reason) = (None, None);
    let mut filter = ReplayFilter { limit: DEFAULT_LIMIT as u32, ..Default::default() };
    let mut event_ids = Vec::new();
    let (mut dry_run, mut json) = (false, false);
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("by") => by = Some(string_value(p, "by")?),
            Long("reason") => reason = Some(string_value(p, "reason")?),
            Long("limit") => {
                let v = string_value(p, "limit")?;
                let n = parse_count(v.trim(), 1, MAX_LIMIT)
                    .map_err(|why| AppError::usage(format!("invalid --limit {v:?}: {why}")))?;
                filter.limit = n as u32;
            }
            Long("error-reason") => {
                let v = string_value(p, "error-reason")?;
                if ErrorReason::parse(&v).is_none() {
                    return Err(AppError::usage(format!(
                        "invalid --error-reason {v:?}: must be one of {}",
                        ErrorReason::names()
                    )));
                }
                filter.error_reason = Some(v);
            }
            Long("event-id") => event_ids.push(ops::parse_event_id("--event-id", &string_value(p, "event-id")?)?),
            Long("older-than") => {
                let v = string_value(p, "older-than")?;
                let d = parse_duration(v.trim())
                    .map_err(|why| AppError::usage(format!("invalid --older-than {v:?}: {why}")))?;
                filter.older_than = Some(d);
            }
            Long("dry-run") => dry_run = true,
            Long("json") => json = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    let (by, reason) = ops::audit_fields(by, reason)?;
    if !event_ids.is_empty() {
        event_ids.sort();
        event_ids.dedup();
        filter.event_ids = Some(event_ids);
    }
    Ok(Some(Args { database_url: src.database_url()?, filter, by, reason, dry_run, json }))
}

pub fn run(args: Args) -> Result<()> {
    let mut client = db::connect_for_command(&args.database_url)?;
    let mut tx = client.transaction().map_err(|e| AppError::db("while starting the replay", e))?;
    let outcome = outbox::replay_failed(&mut tx, &args.filter, &args.by, &args.reason).map_err(replay_error)?;
    if args.dry_run {
        tx.rollback().map_err(|e| AppError::db("while rolling back the dry run", e))?;
    } else {
        if !outcome.replayed.is_empty() {
            outbox::notify_workers(&mut tx).map_err(|e| AppError::db("while notifying the workers", e))?;
        }
        tx.commit().map_err(|e| AppError::db("while committing the replay", e))?;
        log::info!("replayed {} failed row(s) by {:?} because {:?}", outcome.replayed.len(), args.by, args.reason);
    }
    if args.json {
        println!("{}", report_json(&outcome, args.dry_run));
    } else {
        print!("{}", report_text(&outcome, args.dry_run, &args.filter));
    }
    Ok(())
}

/// A concurrent writer (a rebuild enqueuing deliveries) may have given one of the events
/// a live delivery after our statement looked: the unique index refuses, nothing changed.
fn replay_error(e: postgres::Error) -> AppError {
    if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
        return AppError::failed(format!(
            "while replaying: an event got a pending delivery meanwhile (probably a rebuild enqueuing); \
             nothing was replayed, run again: {}",
            db::describe_error(&e)
        ))
        .caused_by(e);
    }
    AppError::db("while replaying failed rows", e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use std::time::Duration;

    fn parse_args(args: &[&str]) -> Result<Option<Args>> {
        let mut p = lexopt::Parser::from_args(args.iter().copied());
        parse(&mut p, &Env::from_pairs([("DATABASE_URL", "postgres://u:secret@localhost/db")]))
    }

    fn usage(args: &[&str]) -> String {
        match parse_args(args) {
            Err(e) => {
                assert_eq!(e.kind(), Kind::Usage, "{args:?}: {e}");
                e.to_string()
            }
            Ok(a) => panic!("{args:?} parsed: {a:?}"),
        }
    }

    #[test]
    fn every_flag_parses() {
        let id = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e10";
        let a = parse_args(&[
            "--by",
            "ana",
            "--reason",
            "it's \\ fixed'; DROP TABLE x; --",
            "--limit",
            "7",
            "--error-reason",
            "invalid_payload",
            "--event-id",
            id,
            "--event-id",
            id,
            "--older-than",
            "2h",
            "--dry-run",
            "--json",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(a.by, "ana");
        assert_eq!(a.reason, "it's \\ fixed'; DROP TABLE x; --");
        assert_eq!(a.filter.limit, 7);
        assert_eq!(a.filter.error_reason.as_deref(), Some("invalid_payload"));
        assert_eq!(a.filter.event_ids, Some(vec![uuid::Uuid::parse_str(id).unwrap()]));
        assert_eq!(a.filter.older_than, Some(Duration::from_secs(7200)));
        assert!(a.dry_run && a.json);
        let a = parse_args(&["--by", "a", "--reason", "r"]).unwrap().unwrap();
        assert_eq!(a.filter, ReplayFilter { limit: DEFAULT_LIMIT as u32, ..Default::default() });
        assert!(parse_args(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn bad_or_missing_flags_are_usage_errors() {
        assert!(usage(&[]).contains("--by and --reason"));
        assert!(usage(&["--by", "a"]).contains("--reason"));
        assert!(usage(&["--reason", "r", "--by", ""]).contains("--by"));
        assert!(usage(&["--by", "a", "--reason", "r", "--error-reason", "bogus"]).contains("invalid_payload"));
        assert!(usage(&["--by", "a", "--reason", "r", "--event-id", "nope"]).contains("--event-id"));
        assert!(usage(&["--by", "a", "--reason", "r", "--older-than", "soon"]).contains("--older-than"));
        for bad in ["0", "100001", "x", ""] {
            assert!(usage(&["--by", "a", "--reason", "r", "--limit", bad]).contains("--limit"), "{bad}");
        }
        assert!(usage(&["--by", "a", "--reason", "r", "--frob"]).contains("frob"));
    }
}
