//! `chronicle append`: writes events given as JSON into `chronicle_events`.
//!
//! It is the command-line writer for people and scripts (backfills, fixes, trying the
//! catalog out): it checks every event against the contract first, so a bad input is
//! refused whole with every problem named, and then writes all events in one
//! transaction with set-based statements, so the enqueue trigger gives each its outbox
//! row exactly as it does for the application's own writes.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use lexopt::prelude::*;
use uuid::Uuid;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::error::{AppError, Result};
use crate::help::Help;
use crate::input::{self, Rules, MAX_INPUT_BYTES, MAX_REPORTED_LINES};
use crate::writer;

pub const SUMMARY: &str = "Write JSON events (one, or JSON lines) into chronicle_events";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL];

pub fn help() -> Help {
    Help::new(
        "Read one JSON event, or JSON lines (one event per line; blank lines ignored), from stdin or --file, \
         check every event against the contract and the event catalog (docs/events.md), then write them all \
         in one transaction. The enqueue trigger gives each its outbox row. Prints the id of each event \
         written, one per line, in input order.\n\n\
         An event is an object with the columns of chronicle_events as keys:",
    )
    .rows([
        (
            "required",
            "library_id, entity_id (UUIDs), entity_type (library, bookshelf, book, block, tag), event_type \
             (a catalog type), occurred_at (RFC 3339)",
        ),
        (
            "optional",
            "id (UUID; a UUIDv7 is generated when absent), actor_user_id (UUID; null means the system), before, \
             after, diff (JSON objects), created_at (RFC 3339; default now), request_id, client, reason \
             (strings), ip (an IP address)",
        ),
    ])
    .text(format!(
        "Other keys are refused (typo protection), as is a NUL (\\u0000) in any string.\n\n\
         Nothing is written when any event is bad: every bad line is listed (the first {MAX_REPORTED_LINES}) \
         with its number and the reason, and the exit code is 2. An id already in chronicle_events, or \
         repeated in the input, is refused with exit 1. One event may be at most 16 MiB, the whole input at \
         most {} MiB.",
        MAX_INPUT_BYTES >> 20
    ))
    .usage(&["chronicle append [--file PATH] [--json] [--allow-unknown-type] [--check]"])
    .flags(
        SETTINGS,
        &[
            ("--file PATH", "Read the events from PATH instead of stdin (- is stdin).".into()),
            ("--json", "Print the ids written as one JSON array instead of one per line.".into()),
            (
                "--allow-unknown-type",
                "Accept an event_type the catalog does not know. The projector fails such events as \
                 unknown_event_type until a version that knows the type is deployed (then replay-failed)."
                    .into(),
            ),
            ("--check", "Only check the input and say how many events are valid; connect to nothing.".into()),
        ],
    )
    .examples(&[
        r#"echo '{"library_id":"0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d11","#,
        r#"      "entity_type":"book","event_type":"BookRenamed","#,
        r#"      "entity_id":"0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d12","#,
        r#"      "before":{"title":"Old"},"after":{"title":"New"},"#,
        r#"      "occurred_at":"2025-03-01T09:30:00Z"}' | chronicle append"#,
        "chronicle append --file backfill.jsonl --json",
        "chronicle append --check --file events.jsonl",
    ])
}

#[derive(Debug)]
pub struct Args {
    /// `None` with `--check`: nothing is written, no database is needed.
    pub database_url: Option<DbUrl>,
    /// `None` reads stdin.
    pub file: Option<PathBuf>,
    pub json: bool,
    pub rules: Rules,
    pub check_only: bool,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let mut file = None;
    let mut json = false;
    let mut rules = Rules::default();
    let mut check_only = false;
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("file") => {
                let path = PathBuf::from(p.value()?);
                if path.as_os_str().is_empty() {
                    return Err(AppError::usage("invalid --file \"\": is empty"));
                }
                file = Some(path).filter(|p| p.as_os_str() != "-");
            }
            Long("json") => json = true,
            Long("allow-unknown-type") => rules.allow_unknown_type = true,
            Long("check") => check_only = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    let database_url = if check_only { None } else { Some(src.database_url()?) };
    Ok(Some(Args { database_url, file, json, rules, check_only }))
}

pub fn run(args: Args) -> Result<()> {
    let input = read_input(args.file.as_ref())?;
    let events = input::parse_events(&input, args.rules).map_err(|e| AppError::usage(e.to_string()))?;
    drop(input);
    let repeated = input::repeated_ids(&events);
    if !repeated.is_empty() {
        let lines: Vec<String> = repeated
            .iter()
            .take(MAX_REPORTED_LINES)
            .map(|(line, earlier, id)| format!("\n  line {line}: id {id} repeats the id of line {earlier}"))
            .collect();
        return Err(AppError::failed(format!(
            "{} event(s) repeat an id of the input; nothing was written:{}",
            repeated.len(),
            lines.concat()
        )));
    }
    let Some(url) = args.database_url.filter(|_| !args.check_only) else {
        println!("{} valid event(s); nothing written (--check)", events.len());
        return Ok(());
    };

    // Ids are generated in input order, so events given without one keep it.
    let with_ids: Vec<(Uuid, &input::NewEvent)> =
        events.iter().map(|e| (e.event.id.unwrap_or_else(Uuid::now_v7), &e.event)).collect();

    let mut client = db::connect_for_command(&url)?;
    let mut tx = client.transaction().map_err(|e| AppError::db("while starting the transaction", e))?;
    writer::insert_events(&mut tx, &with_ids)?;
    tx.commit().map_err(|e| AppError::db("while committing the events", e))?;

    let ids: Vec<String> = with_ids.iter().map(|(id, _)| id.to_string()).collect();
    if args.json {
        println!("{}", serde_json::Value::from(ids));
    } else {
        let mut out = ids.join("\n");
        out.push('\n');
        print!("{out}");
    }
    log::info!("appended {} event(s)", with_ids.len());
    Ok(())
}

/// Reads the whole input, refusing more than `MAX_INPUT_BYTES` without reading it all.
fn read_input(file: Option<&PathBuf>) -> Result<Vec<u8>> {
    let limit = MAX_INPUT_BYTES as u64 + 1;
    let mut buf = Vec::new();
    let (what, read) = match file {
        Some(path) => {
            let f = std::fs::File::open(path)
                .map_err(|e| AppError::usage(format!("cannot open --file {}: {e}", path.display())))?;
            (path.display().to_string(), f.take(limit).read_to_end(&mut buf))
        }
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!(
                    "chronicle append: reading events from the terminal (end with Ctrl-D; Ctrl-Z Enter on Windows)"
                );
            }
            ("stdin".to_string(), stdin.lock().take(limit).read_to_end(&mut buf))
        }
    };
    read.map_err(|e| AppError::failed(format!("cannot read {what}: {e}")).caused_by(e))?;
    if buf.len() > MAX_INPUT_BYTES {
        return Err(AppError::usage(format!(
            "{what} holds more than {} MiB: split it into several appends (each is atomic on its own); \
             nothing was written",
            MAX_INPUT_BYTES >> 20
        )));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    fn parse_args(args: &[&str], env: &[(&str, &str)]) -> Result<Option<Args>> {
        let mut p = lexopt::Parser::from_args(args.iter().copied());
        parse(&mut p, &Env::from_pairs(env.iter().copied()))
    }

    #[test]
    fn flags_parse_and_check_needs_no_database() {
        let url = [("DATABASE_URL", "postgres://u@localhost/db")];
        let a = parse_args(&["--file", "x.jsonl", "--json", "--allow-unknown-type"], &url).unwrap().unwrap();
        assert_eq!(a.file, Some(PathBuf::from("x.jsonl")));
        assert!(a.json && a.rules.allow_unknown_type && !a.check_only);
        let a = parse_args(&["--file", "-"], &url).unwrap().unwrap();
        assert_eq!(a.file, None);
        assert!(parse_args(&["--check"], &[]).unwrap().unwrap().check_only);
        assert_eq!(parse_args(&[], &[]).unwrap_err().kind(), Kind::Usage);
        assert_eq!(parse_args(&["--bogus"], &url).unwrap_err().kind(), Kind::Usage);
        assert!(parse_args(&["--help"], &[]).unwrap().is_none());
    }
}
