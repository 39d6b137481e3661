//! `chronicle libraries`: which libraries have events, so an id for `entries --library-id`
//! needs no psql.

use lexopt::prelude::*;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, parse_count, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::error::{AppError, Result};
use crate::help::Help;
use crate::ops::{self, Library};
use crate::terminal::{Align, Table};

pub const SUMMARY: &str = "List the libraries: name, events, entries, newest event";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL, &config::READ_DATABASE_URL];

const DEFAULT_LIMIT: u64 = 100;
const MAX_LIMIT: u64 = 100_000;

pub fn help() -> Help {
    Help::new(
        "List the libraries that have events, the most recently active first: the library's name (from its \
         latest LibraryCreated or LibraryRenamed event, if any), its id, how many events and entries it has, \
         and the time of its newest event. Counting reads the events' and entries' library indexes whole.",
    )
    .usage(&["chronicle libraries [--limit N] [--json]"])
    .flags(
        SETTINGS,
        &[
            ("--limit N", format!("At most N libraries (1-{MAX_LIMIT}; default {DEFAULT_LIMIT}).")),
            (
                "--json",
                "Print one JSON object: libraries (an array of objects with library_id, name, events, entries, \
                 newest_event_at), and more (whether libraries were left out by --limit)."
                    .into(),
            ),
        ],
    )
    .examples(&[
        "chronicle libraries",
        "chronicle entries --library-id \\",
        "    \"$(chronicle libraries --json | jq -r '.libraries[0].library_id')\"",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub limit: u64,
    pub json: bool,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let (mut limit, mut json) = (DEFAULT_LIMIT, false);
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("limit") => {
                let v = string_value(p, "limit")?;
                limit = parse_count(v.trim(), 1, MAX_LIMIT)
                    .map_err(|why| AppError::usage(format!("invalid --limit {v:?}: {why}")))?;
            }
            Long("json") => json = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    Ok(Some(Args { database_url: src.read_database_url()?, limit, json }))
}

pub fn run(args: Args) -> Result<()> {
    let mut client = db::connect_for_command(&args.database_url)?;
    let mut libraries =
        ops::libraries(&mut client, args.limit + 1).map_err(|e| AppError::db("while listing the libraries", e))?;
    let more = libraries.len() as u64 > args.limit;
    libraries.truncate(args.limit as usize);
    if args.json {
        let v = serde_json::json!({ "libraries": libraries, "more": more });
        println!("{v}");
    } else {
        print!("{}", render_text(&libraries, more));
    }
    Ok(())
}

/// Names are cut to this many terminal columns, to keep a line within 100; the id is never
/// cut.
const NAME_COLUMNS: usize = 18;

pub fn render_text(libraries: &[Library], more: bool) -> String {
    if libraries.is_empty() {
        return "(no libraries: chronicle_events is empty)\n".to_string();
    }
    let mut table =
        Table::new(0, &[Align::Left, Align::Left, Align::Right, Align::Right, Align::Left]).max_width(0, NAME_COLUMNS);
    table.row(["NAME", "LIBRARY_ID", "EVENTS", "ENTRIES", "NEWEST_EVENT"]);
    for l in libraries {
        table.row([
            l.name.as_deref().unwrap_or("-").to_string(),
            l.library_id.to_string(),
            l.events.to_string(),
            l.entries.to_string(),
            l.newest_event_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ]);
    }
    let mut s = table.render();
    if more {
        s.push_str("(more libraries: raise --limit)\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use crate::terminal::columns;

    fn parse_args(args: &[&str]) -> Result<Option<Args>> {
        crate::cmd::parse_for_test(parse, args)
    }

    #[test]
    fn limit_is_bounded_and_named_when_wrong() {
        assert_eq!(parse_args(&[]).unwrap().unwrap().limit, DEFAULT_LIMIT);
        assert_eq!(parse_args(&["--limit", "7", "--json"]).unwrap().unwrap().limit, 7);
        for bad in ["0", "x", "100001"] {
            let e = parse_args(&["--limit", bad]).unwrap_err();
            assert_eq!(e.kind(), Kind::Usage);
            assert!(e.to_string().contains("--limit"), "{e}");
        }
    }

    fn library(name: Option<&str>, events: i64) -> Library {
        Library {
            library_id: uuid::Uuid::nil(),
            name: name.map(String::from),
            events,
            entries: events / 2,
            newest_event_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        }
    }

    #[test]
    fn the_header_lines_up_with_english_and_chinese_names() {
        let libraries = [
            library(Some("Reading notes"), 7),
            library(Some("读书笔记"), 123_456),
            library(Some("分布式系统设计与实践：一本很长很长的书库名字"), 12),
            library(Some("bad\u{1b}[31mname"), 3),
            library(None, 1),
        ];
        let text = render_text(&libraries, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        // Every line has its id at the same column as the header's LIBRARY_ID, and ends
        // with a time as wide as NEWEST_EVENT's column.
        let id_at = |l: &str| columns(&l[..l.find("LIBRARY_ID").or_else(|| l.find("00000000-")).unwrap()]);
        let end = columns(lines[1]);
        for l in &lines {
            assert_eq!(id_at(l), id_at(lines[0]), "{text}");
            assert!(!l.contains('\u{1b}'), "{text}");
        }
        for l in &lines[1..] {
            assert_eq!(columns(l), end, "{text}");
        }
        assert_eq!(columns(lines[0]) - columns("NEWEST_EVENT"), end - columns("2023-11-14T22:13:20Z"), "{text}");
    }

    #[test]
    fn the_table_fits_100_columns_whatever_the_name() {
        let l = Library {
            library_id: uuid::Uuid::nil(),
            name: Some("分布式系统设计与实践：一本很长很长的书库名字".into()),
            events: 123_456_789,
            entries: 123_456_789,
            newest_event_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        };
        for line in render_text(&[l, library(Some("x"), 1)], true).lines() {
            assert!(columns(line) <= 100, "{line}");
        }
    }
}
