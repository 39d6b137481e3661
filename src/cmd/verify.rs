//! `chronicle verify`: is the read model what the events say it should be? `--fix` heals it.

use chrono::{DateTime, Utc};
use lexopt::prelude::*;
use uuid::Uuid;

use crate::cmd::entries::{time_value, uuid_value};
use crate::cmd::{setting_flag, string_value};
use crate::config::{self, parse_count, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::entries::CONTENT_COLUMNS;
use crate::error::{AppError, Result};
use crate::help::Help;
use crate::outbox::SizeLimits;
use crate::projection::PROJECTION_VERSION;
use crate::terminal::{Align, Table};
use crate::verify::{self, ContentOptions, EventDrift, Finding, Fixed, Report};

pub const SUMMARY: &str = "Compare chronicle_entries with chronicle_events (--fix heals)";

const SETTINGS: &[&Setting] =
    &[&config::DATABASE_URL, &config::READ_DATABASE_URL, &config::MAX_EVENT_BYTES, &config::BATCH_MAX_BYTES];

/// The largest --sample.
const MAX_SAMPLE: u64 = 1_000_000_000;

pub fn help() -> Help {
    Help::new(format!(
        "Compare the read model (chronicle_entries) with the source of truth (chronicle_events), for one \
         library or all, and report four kinds of drift, each with its count and up to {} example ids:",
        verify::MAX_EXAMPLES
    ))
    .rows([
        ("events without an entry", "the entry is missing".to_string()),
        ("entries without an event", "an orphan entry".to_string()),
        ("stale entries", format!("built by an older projection_version than this binary's ({PROJECTION_VERSION})")),
        (
            "differing entries",
            format!(
                "of this projection version, but some column is not what the event projects to now; compared: {}",
                CONTENT_COLUMNS.join(", ")
            ),
        ),
    ])
    .text(
        "The first three are counted in one consistent snapshot. For the fourth, every event of the scope whose \
         entry is of this projection version is projected again and the result compared with the stored entry, \
         column by column, in batches of events (memory follows the batch, not the table; the time is about a \
         rebuild's): all of them, or with --since only those of events since a time, with --sample a random \
         sample. An event this version cannot read or project is not compared (counted as not projectable).\n\n\
         An event whose delivery is pending or processing is in flight, not drift (the worker is about to write \
         it). An event whose delivery failed is drift, counted with its kind and reported apart: fix its cause, \
         then `chronicle replay-failed` (--fix does not touch it; a new delivery would fail the same way, \
         outside replay's audit trail). Exit 0 when clean, 1 on drift.\n\n\
         With --fix, each differing entry is written again from its event as it is found (the worker's upsert); \
         then, in one transaction, every missing or stale event (not failed) gets a new pending delivery \
         (never a second live one), orphan entries are deleted, and idle workers are woken. A running worker \
         then projects them (or run `chronicle worker --until-empty`). Exit 0 when everything found was fixed, \
         1 when failed deliveries remain for replay-failed.",
    )
    .usage(&[
        "chronicle verify [--library-id ID] [--since TIME] [--sample N]",
        "                 [--batch-size N] [--fix] [--json]",
    ])
    .flags(
        SETTINGS,
        &[
            ("--library-id ID", "Only this library (UUID). Default: every library.".into()),
            (
                "--since TIME",
                "Compare the content of the entries of events that occurred at or after TIME (RFC 3339) only. \
                 The other kinds are still counted over the whole scope."
                    .into(),
            ),
            (
                "--sample N",
                "Compare the content of N entries drawn at random (of the scope, and since TIME if given).".into(),
            ),
            (
                "--batch-size N",
                "Events read and compared per batch (1 to 50000, default 1000; a batch also stops once its \
                 events' text passes OUTBOX_BATCH_MAX_BYTES)."
                    .into(),
            ),
            (
                "--fix",
                "Rewrite the differing entries, enqueue the missing and stale events, delete the orphan entries."
                    .into(),
            ),
            (
                "--json",
                "Print one object: library_id, events_without_entry, entries_without_event, stale_entries (each \
                 {count, examples}; the event kinds also {failed: {count, examples}}), in_flight, \
                 differing_entries ({count, examples, columns: {<column>: {count, examples}}}), compared \
                 ({entries, scope: all|since|sample, since, sample, columns, not_projectable}), projection_version, \
                 fixed ({missing_enqueued, stale_enqueued, orphans_deleted, differing_rewritten} or null without \
                 --fix), clean."
                    .into(),
            ),
        ],
    )
    .examples(&[
        "chronicle verify",
        "chronicle verify --library-id 0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01 --json",
        "chronicle verify --sample 10000",
        "chronicle verify --since 2025-03-01T00:00:00Z --fix",
        "chronicle verify --fix && chronicle worker --until-empty && chronicle verify",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub library_id: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub sample: Option<i64>,
    pub batch_size: i64,
    pub fix: bool,
    pub json: bool,
    pub sizes: SizeLimits,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let mut library_id = None;
    let (mut since, mut sample) = (None, None);
    let mut batch_size = ContentOptions::default().batch;
    let mut fix = false;
    let mut json = false;
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("library-id") => library_id = Some(uuid_value(p, "library-id")?),
            Long("since") => since = Some(time_value(p, "since")?),
            Long("sample") => {
                let v = string_value(p, "sample")?;
                let n = parse_count(v.trim(), 1, MAX_SAMPLE)
                    .map_err(|why| AppError::usage(format!("invalid --sample {v:?}: {why}")))?;
                sample = Some(n as i64);
            }
            Long("batch-size") => {
                let v = string_value(p, "batch-size")?;
                batch_size = parse_count(v.trim(), 1, 50_000)
                    .map_err(|why| AppError::usage(format!("invalid --batch-size {v:?}: {why}")))?
                    as i64;
            }
            Long("fix") => fix = true,
            Long("json") => json = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    // Checking reads (a replica will do); fixing writes.
    let database_url = if fix { src.database_url()? } else { src.read_database_url()? };
    let defaults = SizeLimits::default();
    let sizes = SizeLimits {
        max_event_bytes: src.count(&config::MAX_EVENT_BYTES)?.unwrap_or(defaults.max_event_bytes),
        batch_max_bytes: src.count(&config::BATCH_MAX_BYTES)?.unwrap_or(defaults.batch_max_bytes),
    };
    Ok(Some(Args { database_url, library_id, since, sample, batch_size, fix, json, sizes }))
}

pub fn run(args: Args) -> Result<()> {
    let mut client = db::connect_for_command(&args.database_url)?;
    let mut report = verify::check(&mut client, args.library_id)
        .map_err(|e| AppError::db("while comparing chronicle_entries with chronicle_events", e))?;
    // A sample's random order is read through a portal on a connection of its own.
    let mut sampler = match args.sample {
        Some(_) => Some(db::connect_for_command(&args.database_url)?),
        None => None,
    };
    let opts = ContentOptions {
        since: args.since,
        sample: args.sample,
        fix: args.fix,
        batch: args.batch_size,
        sizes: args.sizes,
    };
    let (content, rewritten) = verify::check_content(&mut client, sampler.as_mut(), args.library_id, &opts)
        .map_err(|e| AppError::db("while comparing the entries' content with their events' projection", e))?;
    report.content = content;
    let fixed = if args.fix && !report.is_clean() {
        let mut fixed =
            verify::fix(&mut client, args.library_id).map_err(|e| AppError::db("while fixing the drift", e))?;
        fixed.differing_rewritten = rewritten;
        Some(fixed)
    } else if args.fix {
        Some(Fixed::default())
    } else {
        None
    };
    if args.json {
        println!("{}", report.to_json(fixed.as_ref()));
    } else {
        print!("{}", report_text(&report, fixed.as_ref()));
    }
    outcome(&report, fixed.as_ref())
}

/// The exit: clean, or everything fixable was fixed and nothing waits for replay: 0.
fn outcome(report: &Report, fixed: Option<&Fixed>) -> Result<()> {
    if report.is_clean() {
        return Ok(());
    }
    let replay = report.needs_replay();
    match fixed {
        Some(_) if replay == 0 => Ok(()),
        Some(_) => Err(AppError::failed(format!(
            "{replay} event(s) whose delivery failed were not fixed: fix the cause, then run \
             `chronicle replay-failed`"
        ))),
        None => Err(AppError::failed("the read model has drifted from chronicle_events (see above; --fix heals it)")),
    }
}

fn examples(t: &mut Table, f: &Finding) {
    for id in &f.examples {
        t.line(format!("      {id}"));
    }
    if f.count > f.examples.len() as i64 {
        t.line(format!("      … and {} more", f.count - f.examples.len() as i64));
    }
}

fn event_kind(t: &mut Table, label: &str, d: &EventDrift) {
    t.row([label, &d.all.count.to_string()]);
    examples(t, &d.all);
    if d.failed.count > 0 {
        t.line(format!("    of which delivery failed: {} (needs replay-failed)", d.failed.count));
        examples(t, &d.failed);
    }
}

/// The report for people.
pub fn report_text(r: &Report, fixed: Option<&Fixed>) -> String {
    let mut out = match r.library_id {
        Some(l) => format!("verify: library {l}, projection version {PROJECTION_VERSION}\n"),
        None => format!("verify: all libraries, projection version {PROJECTION_VERSION}\n"),
    };
    let mut t = Table::new(0, &[Align::Left, Align::Left]);
    event_kind(&mut t, "events without entry:", &r.events_without_entry);
    t.row(["entries without event:", &r.entries_without_event.count.to_string()]);
    examples(&mut t, &r.entries_without_event);
    event_kind(&mut t, "stale entries:", &r.stale_entries);
    let c = &r.content;
    t.row(["differing entries:".to_string(), format!("{} (compared: {})", c.differing.count, c.scope_text())]);
    examples(&mut t, &c.differing);
    for (column, f) in c.differing_columns() {
        t.line(format!("    {column} differs: {}", f.count));
        examples(&mut t, f);
    }
    if c.not_projectable > 0 {
        t.line(format!(
            "    not compared: {} entr{} whose event this version cannot read or project",
            c.not_projectable,
            if c.not_projectable == 1 { "y" } else { "ies" }
        ));
    }
    t.row(["in flight:".to_string(), format!("{} (pending or processing: not drift)", r.in_flight)]);
    out.push_str(&t.render());
    if r.is_clean() {
        out.push_str(&format!(
            "clean: the read model matches the events: every event has its entry, no entry is orphaned or stale, \
             and {} of projection version {PROJECTION_VERSION} equal{} their event's projection in every column \
             ({})\n",
            c.scope_text(),
            if c.compared == 1 { "s" } else { "" },
            CONTENT_COLUMNS.join(", ")
        ));
        return out;
    }
    if let Some(f) = fixed {
        out.push_str(&format!(
            "fixed: rewrote {} differing entr{} from their events; enqueued {} missing and {} stale event(s) as \
             pending deliveries (a worker projects them); deleted {} orphan entr{}\n",
            f.differing_rewritten,
            if f.differing_rewritten == 1 { "y" } else { "ies" },
            f.missing_enqueued,
            f.stale_enqueued,
            f.orphans_deleted,
            if f.orphans_deleted == 1 { "y" } else { "ies" }
        ));
        let replay = r.needs_replay();
        if replay > 0 {
            out.push_str(&format!("not fixed: {replay} event(s) whose delivery failed: use replay-failed\n"));
        }
    } else {
        out.push_str("drift found: run with --fix to heal it\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    fn parse_args(args: &[&str]) -> Result<Option<Args>> {
        crate::cmd::parse_for_test(parse, args)
    }

    #[test]
    fn flags_parse() {
        let a =
            parse_args(&["--library-id", "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01", "--fix", "--json"]).unwrap().unwrap();
        assert!(a.fix && a.json && a.library_id.is_some());
        let a = parse_args(&[]).unwrap().unwrap();
        assert!(!a.fix && !a.json && a.library_id.is_none() && a.sample.is_none() && a.since.is_none());
        let a = parse_args(&["--sample", "500", "--since", "2025-03-01T09:30:00+01:00"]).unwrap().unwrap();
        assert_eq!(a.sample, Some(500));
        assert_eq!(a.since.unwrap().to_rfc3339(), "2025-03-01T08:30:00+00:00");
        for bad in [
            &["--library-id", "x"][..],
            &["--frob"],
            &["--fix=yes"],
            &["--sample", "0"],
            &["--sample", "many"],
            &["--since", "yesterday"],
            &["--batch-size", "0"],
        ] {
            assert_eq!(parse_args(bad).unwrap_err().kind(), Kind::Usage, "{bad:?}");
        }
    }

    fn drift(count: i64, failed: i64) -> EventDrift {
        EventDrift { all: Finding { count, examples: vec![] }, failed: Finding { count: failed, examples: vec![] } }
    }

    #[test]
    fn exit_follows_what_is_left() {
        let clean = Report::default();
        assert!(outcome(&clean, None).is_ok());
        let fixable = Report { events_without_entry: drift(2, 0), ..Report::default() };
        assert_eq!(outcome(&fixable, None).unwrap_err().kind(), Kind::Failed);
        assert!(outcome(&fixable, Some(&Fixed::default())).is_ok());
        let failed = Report { stale_entries: drift(1, 1), ..Report::default() };
        let err = outcome(&failed, Some(&Fixed::default())).unwrap_err();
        assert_eq!(err.kind(), Kind::Failed);
        assert!(err.to_string().contains("replay-failed"));
        let orphans = Report { entries_without_event: Finding { count: 1, examples: vec![] }, ..Report::default() };
        assert!(!orphans.is_clean());
        let differing = Report {
            content: verify::Content { differing: Finding { count: 1, examples: vec![] }, ..Default::default() },
            ..Report::default()
        };
        assert!(!differing.is_clean());
        assert_eq!(outcome(&differing, None).unwrap_err().kind(), Kind::Failed);
        assert!(outcome(&differing, Some(&Fixed::default())).is_ok());
    }

    #[test]
    fn json_has_the_documented_keys() {
        let v = Report::default().to_json(None);
        for key in ["library_id", "events_without_entry", "entries_without_event", "stale_entries", "fixed", "clean"] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert!(v["fixed"].is_null());
        assert_eq!(v["clean"], true);
        assert_eq!(v["events_without_entry"]["failed"]["count"], 0);
        assert_eq!(v["differing_entries"]["count"], 0);
        assert_eq!(v["compared"]["entries"], 0);
        let v = Report::default().to_json(Some(&Fixed { orphans_deleted: 3, ..Fixed::default() }));
        assert_eq!(v["fixed"]["orphans_deleted"], 3);
        assert_eq!(v["fixed"]["differing_rewritten"], 0);
    }
}
