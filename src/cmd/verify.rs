//! `chronicle verify`: is the read model what the events say it should be? `--fix` heals it.

use lexopt::prelude::*;
use uuid::Uuid;

use crate::cmd::entries::uuid_value;
use crate::cmd::{setting_flag, string_value};
use crate::config::{self, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::error::{AppError, Result};
use crate::help::Help;
use crate::projection::PROJECTION_VERSION;
use crate::terminal::{Align, Table};
use crate::verify::{self, EventDrift, Finding, Fixed, Report};

pub const SUMMARY: &str = "Compare chronicle_entries with chronicle_events (--fix heals)";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL, &config::READ_DATABASE_URL];

pub fn help() -> Help {
    Help::new(format!(
        "Compare the read model (chronicle_entries) with the source of truth (chronicle_events), for one \
         library or all, in one consistent snapshot, and report three kinds of drift, each with its count and \
         up to {} example ids:",
        verify::MAX_EXAMPLES
    ))
    .rows([
        ("events without an entry", "the entry is missing".to_string()),
        ("entries without an event", "an orphan entry".to_string()),
        ("stale entries", format!("built by an older projection_version than this binary's ({PROJECTION_VERSION})")),
    ])
    .text(
        "An event whose delivery is pending or processing is in flight, not drift (the worker is about to write \
         it). An event whose delivery failed is drift, counted with its kind and reported apart: fix its cause, \
         then `chronicle replay-failed` (--fix does not touch it; a new delivery would fail the same way, \
         outside replay's audit trail). Exit 0 when clean, 1 on drift.\n\n\
         With --fix, in one transaction: every missing or stale event (not failed) gets a new pending delivery \
         (never a second live one), orphan entries are deleted, and idle workers are woken. A running worker \
         then projects them (or run `chronicle worker --until-empty`). Exit 0 when everything found was fixed, \
         1 when failed deliveries remain for replay-failed.",
    )
    .usage(&["chronicle verify [--library-id ID] [--fix] [--json]"])
    .flags(
        SETTINGS,
        &[
            ("--library-id ID", "Only this library (UUID). Default: every library.".into()),
            ("--fix", "Enqueue the missing and stale events, delete the orphan entries.".into()),
            (
                "--json",
                "Print one object: library_id, events_without_entry, entries_without_event, stale_entries (each \
                 {count, examples}; the event kinds also {failed: {count, examples}}), in_flight, \
                 projection_version, fixed ({missing_enqueued, stale_enqueued, orphans_deleted} or null without \
                 --fix), clean."
                    .into(),
            ),
        ],
    )
    .examples(&[
        "chronicle verify",
        "chronicle verify --library-id 0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01 --json",
        "chronicle verify --fix && chronicle worker --until-empty && chronicle verify",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub library_id: Option<Uuid>,
    pub fix: bool,
    pub json: bool,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let mut library_id = None;
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
            Long("fix") => fix = true,
            Long("json") => json = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    // Checking reads (a replica will do); fixing writes.
    let database_url = if fix { src.database_url()? } else { src.read_database_url()? };
    Ok(Some(Args { database_url, library_id, fix, json }))
}

pub fn run(args: Args) -> Result<()> {
    let mut client = db::connect_for_command(&args.database_url)?;
    let report = verify::check(&mut client, args.library_id)
        .map_err(|e| AppError::db("while comparing chronicle_entries with chronicle_events", e))?;
    let fixed = if args.fix && !report.is_clean() {
        Some(verify::fix(&mut client, args.library_id).map_err(|e| AppError::db("while fixing the drift", e))?)
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
    t.row(["in flight:".to_string(), format!("{} (pending or processing: not drift)", r.in_flight)]);
    out.push_str(&t.render());
    if r.is_clean() {
        out.push_str("clean: the read model matches the events\n");
        return out;
    }
    if let Some(f) = fixed {
        out.push_str(&format!(
            "fixed: enqueued {} missing and {} stale event(s) as pending deliveries (a worker projects them); \
             deleted {} orphan entr{}\n",
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
        assert!(!a.fix && !a.json && a.library_id.is_none());
        for bad in [&["--library-id", "x"][..], &["--frob"], &["--fix=yes"]] {
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
        let v = Report::default().to_json(Some(&Fixed { orphans_deleted: 3, ..Fixed::default() }));
        assert_eq!(v["fixed"]["orphans_deleted"], 3);
    }
}
