//! `chronicle show EVENT_ID`: everything about one event, the first thing an operator
//! reads when one timeline entry is wrong or missing.

use lexopt::prelude::*;
use serde_json::json;
use uuid::Uuid;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::error::{AppError, Result};
use crate::help::Help;
use crate::ops::{self, Columns, Shown};
use crate::terminal::{self, Align, Table};

pub const SUMMARY: &str = "One event, every delivery of it (errors, replays), its entry";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL, &config::READ_DATABASE_URL];

pub fn help() -> Help {
    Help::new(
        "Print one event (every column of chronicle_events), every delivery of it (every column of \
         chronicle_outbox_events: status, attempts, next retry, claim, error_reason and error, replay audit) \
         oldest first, and its entry in chronicle_entries if there is one. Read in one snapshot. An id with no \
         event exits 1 (any delivery or entry left for it is still printed); an id that is not a UUID exits 2.",
    )
    .usage(&["chronicle show EVENT_ID [--json]"])
    .flags(SETTINGS, &[("--json", "Print one JSON object: event, deliveries, entry (see docs/operations.md).".into())])
    .examples(&[
        "chronicle show 0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e10",
        "chronicle show 0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e10 --json \\",
        "    | jq '.deliveries[] | {status, error}'",
        "chronicle status --json | jq -r '.failed_by_reason[0].example_event_id' \\",
        "    | xargs chronicle show",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub event_id: Uuid,
    pub json: bool,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let mut json = false;
    let mut event_id = None;
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("json") => json = true,
            Value(v) if event_id.is_none() => {
                let v = v.into_string().map_err(|_| AppError::usage("invalid EVENT_ID: not valid UTF-8"))?;
                event_id = Some(ops::parse_event_id("EVENT_ID", &v)?);
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    let event_id =
        event_id.ok_or_else(|| AppError::usage("missing EVENT_ID: usage: chronicle show EVENT_ID [--json]"))?;
    Ok(Some(Args { database_url: src.read_database_url()?, event_id, json }))
}

pub fn run(args: Args) -> Result<()> {
    let mut client = db::connect_for_command(&args.database_url)?;
    let shown = ops::show(&mut client, args.event_id).map_err(|e| AppError::db("while reading the event", e))?;
    if shown.is_empty() {
        return Err(AppError::failed(format!(
            "no event {} in chronicle_events (and no delivery or entry of it)",
            args.event_id
        )));
    }
    if args.json {
        let line = terminal::json(&render_json(&shown))
            .map_err(|e| AppError::failed(format!("while writing the event as JSON: {e}")).caused_by(e))?;
        println!("{line}");
    } else {
        print!("{}", render_text(args.event_id, &shown));
    }
    if shown.event.is_none() {
        return Err(AppError::failed(format!(
            "no event {} in chronicle_events, but {} delivery(ies) and {} entry(ies) of it remain (printed above)",
            args.event_id,
            shown.deliveries.len(),
            usize::from(shown.entry.is_some())
        )));
    }
    Ok(())
}

pub fn render_json(shown: &Shown) -> serde_json::Value {
    json!({
        "event": shown.event.as_ref().map(ops::columns_json),
        "deliveries": shown.deliveries.iter().map(ops::columns_json).collect::<Vec<_>>(),
        "entry": shown.entry.as_ref().map(ops::columns_json),
    })
}

fn push_columns(s: &mut String, cols: &Columns) {
    let mut table = Table::new(2, &[Align::Left, Align::Left]);
    for (k, v) in cols {
        table.row([k.as_str(), &ops::value_text(v)]);
    }
    s.push_str(&table.render());
}

pub fn render_text(id: Uuid, shown: &Shown) -> String {
    let mut s = format!("EVENT {id}\n");
    match &shown.event {
        Some(cols) => push_columns(&mut s, cols),
        None => s.push_str("  (not in chronicle_events)\n"),
    }
    s.push_str(&format!("\nDELIVERIES ({}, oldest first)\n", shown.deliveries.len()));
    if shown.deliveries.is_empty() {
        s.push_str("  (none)\n");
    }
    for (i, cols) in shown.deliveries.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        push_columns(&mut s, cols);
    }
    s.push_str("\nENTRY\n");
    match &shown.entry {
        Some(cols) => push_columns(&mut s, cols),
        None => s.push_str("  (none: not projected yet, failed, or erased)\n"),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    fn parse_args(args: &[&str]) -> Result<Option<Args>> {
        crate::cmd::parse_for_test(parse, args)
    }

    #[test]
    fn takes_one_uuid() {
        let id = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e10";
        let a = parse_args(&[id, "--json"]).unwrap().unwrap();
        assert_eq!(a.event_id.to_string(), id);
        assert!(a.json);
        for bad in [&[][..], &["not-a-uuid"], &[id, id]] {
            assert_eq!(parse_args(bad).unwrap_err().kind(), Kind::Usage, "{bad:?}");
        }
    }
}
