//! `chronicle entries`: one page of a library's timeline, as the UI reads it.
//!
//! A thin shell over `timeline::page` (and `timeline::render` to print it), so operators
//! see exactly what the application's query returns, with the same filters, search and
//! cursors.

use chrono::{DateTime, Utc};
use lexopt::prelude::*;
use uuid::Uuid;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, parse_count, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::error::{AppError, Result};
use crate::event::ENTITY_TYPES;
use crate::help::Help;
use crate::timeline::render::{page_json, page_table, rfc3339, TABLE_SUMMARY_CHARS};
use crate::timeline::{self, Cursor, EntryQuery, DEFAULT_LIMIT, MAX_LIMIT};

pub const SUMMARY: &str = "Show one page of a library's timeline (filters, search, cursor)";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL, &config::READ_DATABASE_URL];

pub fn help() -> Help {
    Help::new(
        "Show one page of a library's timeline from chronicle_entries, newest first on (occurred_at, id), as \
         the application reads it. Filters combine with AND. A search matches entries containing every word of \
         TEXT: English words as prefixes (\"distrib\" finds \"distributed\"), Chinese (and Japanese, Korean) text \
         by its two-character words (\"系统\" finds \"分布式系统设计\"); results stay newest first (no relevance \
         ranking).\n\n\
         When more rows follow, the page ends with a cursor: pass it as --cursor for the next page. Pages are \
         stable while events arrive: no row is skipped or repeated.",
    )
    .usage(&["chronicle entries --library-id ID [FLAGS]"])
    .flags(
        SETTINGS,
        &[
            ("--library-id ID", "The library (UUID) whose timeline to read. Required: every read is scoped.".into()),
            ("--entity-type TYPE", format!("Only entries about one kind of object: {}.", ENTITY_TYPES.join(", "))),
            ("--entity-id ID", "Only one object's history (UUID).".into()),
            ("--actor ID", "Only what one user (UUID) did.".into()),
            ("--event-type TYPE", "Only one event type (e.g. BookRenamed).".into()),
            (
                "--since TIME",
                "Only entries that occurred at or after TIME (RFC 3339, e.g. 2025-03-01T09:00:00Z).".into(),
            ),
            ("--until TIME", "Only entries that occurred before TIME (RFC 3339; exclusive).".into()),
            (
                "--search TEXT",
                "Only entries whose summary, titles, names, tags or reason contain every word of TEXT.".into(),
            ),
            ("--limit N", format!("Entries per page, 1-{MAX_LIMIT} (default {DEFAULT_LIMIT}).")),
            ("--cursor CURSOR", "Continue after the page that printed CURSOR (same filters).".into()),
            (
                "--wide",
                format!(
                    "Every column at full width: times to the microsecond, whole actor ids and summaries (up to \
                     {TABLE_SUMMARY_CHARS} characters). The default table fits 100 columns."
                ),
            ),
            (
                "--json",
                r#"Print {"entries": [...], "next_cursor": "..." or null}; each entry has every column of chronicle_entries but the search vector."#
                    .into(),
            ),
        ],
    )
    .examples(&[
        "chronicle entries --library-id 0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01",
        "chronicle entries --library-id 0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01 \\",
        "    --search 系统 --limit 20",
        "chronicle entries --library-id 0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01 \\",
        "    --entity-type book --since 2025-03-01T00:00:00Z --json \\",
        "    --cursor AAYPRrzP0EABlfOgHCt9Po9AWmt8jZ4Q",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub query: EntryQuery,
    pub json: bool,
    /// Every column at full width instead of a table that fits 100 columns.
    pub wide: bool,
}

/// Parses a UUID flag value, naming the flag.
pub fn uuid_value(p: &mut lexopt::Parser, flag: &str) -> Result<Uuid> {
    let v = string_value(p, flag)?;
    Uuid::parse_str(v.trim()).map_err(|_| AppError::usage(format!("invalid --{flag} {v:?}: not a UUID")))
}

/// Parses an RFC 3339 time flag value, naming the flag.
pub fn time_value(p: &mut lexopt::Parser, flag: &str) -> Result<DateTime<Utc>> {
    let v = string_value(p, flag)?;
    DateTime::parse_from_rfc3339(v.trim()).map(|t| t.with_timezone(&Utc)).map_err(|e| {
        AppError::usage(format!("invalid --{flag} {v:?}: not an RFC 3339 time such as 2025-03-01T09:30:00Z ({e})"))
    })
}

fn text_value(p: &mut lexopt::Parser, flag: &str) -> Result<String> {
    let v = string_value(p, flag)?;
    if v.trim().is_empty() {
        return Err(AppError::usage(format!("invalid --{flag} {v:?}: is empty")));
    }
    Ok(v.trim().to_string())
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let mut library_id = None;
    let mut q = EntryQuery::new(Uuid::nil());
    let (mut json, mut wide) = (false, false);
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("library-id") => library_id = Some(uuid_value(p, "library-id")?),
            Long("entity-type") => {
                let v = text_value(p, "entity-type")?;
                if !ENTITY_TYPES.contains(&v.as_str()) {
                    return Err(AppError::usage(format!(
                        "invalid --entity-type {v:?}: must be one of {}",
                        ENTITY_TYPES.join(", ")
                    )));
                }
                q.entity_type = Some(v);
            }
            Long("entity-id") => q.entity_id = Some(uuid_value(p, "entity-id")?),
            Long("actor") => q.actor = Some(uuid_value(p, "actor")?),
            Long("event-type") => q.event_type = Some(text_value(p, "event-type")?),
            Long("since") => q.since = Some(time_value(p, "since")?),
            Long("until") => q.until = Some(time_value(p, "until")?),
            Long("search") => {
                let v = string_value(p, "search")?;
                if timeline::search_tsquery(&v).is_none() {
                    return Err(AppError::usage(format!(
                        "--search has no searchable words: {v:?} (give letters, digits or CJK text)"
                    )));
                }
                q.search = Some(v);
            }
            Long("limit") => {
                let v = string_value(p, "limit")?;
                q.limit = parse_count(v.trim(), 1, u64::from(MAX_LIMIT))
                    .map_err(|why| AppError::usage(format!("invalid --limit {v:?}: {why}")))?
                    as u32;
            }
            Long("cursor") => {
                let v = string_value(p, "cursor")?;
                q.cursor =
                    Some(Cursor::decode(&v).map_err(|why| AppError::usage(format!("invalid --cursor {v:?}: {why}")))?);
            }
            Long("json") => json = true,
            Long("wide") => wide = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    let Some(library_id) = library_id else {
        return Err(AppError::usage("--library-id is required: every read of the timeline is scoped to one library"));
    };
    q.library_id = library_id;
    if let (Some(since), Some(until)) = (q.since, q.until) {
        if since >= until {
            return Err(AppError::usage(format!(
                "--since ({}) must be before --until ({})",
                rfc3339(since),
                rfc3339(until)
            )));
        }
    }
    Ok(Some(Args { database_url: src.read_database_url()?, query: q, json, wide }))
}

pub fn run(args: Args) -> Result<()> {
    let mut client = db::connect_for_command(&args.database_url)?;
    // Names the library for row-level security, so the command also works when run as
    // the application's role; the table owner is not subject to the policies anyway.
    client
        .execute("SELECT set_config('chronicle.library_id', $1, false)", &[&args.query.library_id.to_string()])
        .map_err(|e| AppError::db("while setting chronicle.library_id", e))?;
    let page = timeline::page(&mut client, &args.query).map_err(|e| AppError::db("while reading the timeline", e))?;
    if args.json {
        let line = crate::terminal::json(&page_json(&page)?)
            .map_err(|e| AppError::failed(format!("while writing the entries as JSON: {e}")).caused_by(e))?;
        println!("{line}");
    } else {
        print!("{}", page_table(&page, args.wide));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIB: &str = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01";

    fn parse_args(args: &[&str]) -> Result<Option<Args>> {
        crate::cmd::parse_for_test(parse, args)
    }

    fn usage(args: &[&str]) -> String {
        match parse_args(args) {
            Err(e) if e.kind() == crate::error::Kind::Usage => e.to_string(),
            other => panic!("{args:?}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn every_flag_parses() {
        // Microseconds: PostgreSQL's precision, the cursor's.
        let at = DateTime::from_timestamp_micros(1_740_821_400_123_456).unwrap();
        let cursor = Cursor { occurred_at: at, id: Uuid::now_v7() };
        let encoded = cursor.encode();
        let a = parse_args(&[
            "--library-id",
            LIB,
            "--entity-type",
            "book",
            "--entity-id",
            LIB,
            "--actor",
            LIB,
            "--event-type",
            "BookRenamed",
            "--since",
            "2025-03-01T00:00:00Z",
            "--until",
            "2025-03-02T00:00:00+08:00",
            "--search",
            "系统 design",
            "--limit",
            "1000",
            "--cursor",
            &encoded,
            "--json",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(a.query.library_id.to_string(), LIB);
        assert_eq!(a.query.entity_type.as_deref(), Some("book"));
        assert_eq!(a.query.event_type.as_deref(), Some("BookRenamed"));
        assert_eq!(a.query.until.map(|t| t.to_rfc3339()), Some("2025-03-01T16:00:00+00:00".into()));
        assert_eq!(a.query.limit, 1000);
        assert_eq!(a.query.cursor, Some(cursor));
        assert!(a.json);
        let a = parse_args(&["--library-id", LIB]).unwrap().unwrap();
        assert_eq!(a.query.limit, DEFAULT_LIMIT);
        assert!(parse_args(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn scope_is_mandatory() {
        assert!(usage(&[]).contains("--library-id is required"));
        assert!(usage(&["--search", "x"]).contains("--library-id is required"));
    }

    #[test]
    fn bad_values_are_usage_errors_naming_the_flag() {
        for (args, needle) in [
            (&["--library-id", "nope"][..], "--library-id"),
            (&["--library-id", LIB, "--limit", "0"], "--limit"),
            (&["--library-id", LIB, "--limit", "1001"], "--limit"),
            (&["--library-id", LIB, "--limit", "ten"], "--limit"),
            (&["--library-id", LIB, "--cursor", "abc"], "invalid --cursor"),
            (&["--library-id", LIB, "--since", "yesterday"], "--since"),
            (&["--library-id", LIB, "--until", "2025-03-01"], "--until"),
            (&["--library-id", LIB, "--entity-type", "shelf"], "--entity-type"),
            (&["--library-id", LIB, "--event-type", " "], "--event-type"),
            (&["--library-id", LIB, "--actor", "me"], "--actor"),
            (&["--library-id", LIB, "--search", "!!! ——"], "--search has no searchable words"),
            (&["--library-id", LIB, "--since", "2025-03-02T00:00:00Z", "--until", "2025-03-01T00:00:00Z"], "--since"),
            (&["--library-id", LIB, "--frob"], "frob"),
        ] {
            let m = usage(args);
            assert!(m.contains(needle), "{args:?}: {m}");
        }
    }
}
