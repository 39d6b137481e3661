//! `chronicle erase`: the legal erasure of events, the one deliberate exception to the
//! append-only source of truth. The events, their deliveries and their entries go in one
//! transaction, and an audit row records ids, who, when, why and counts, never content.

use chrono::{DateTime, Utc};
use lexopt::prelude::*;
use serde_json::json;
use uuid::Uuid;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::error::{AppError, Result};
use crate::help::Help;
use crate::ops;

pub const SUMMARY: &str = "Legal erasure: events, deliveries, entries; audited (who, why)";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL];

/// Ids one erase may take (a larger request is split by the caller: each is audited).
pub const MAX_IDS: usize = 10_000;

pub fn help() -> Help {
    Help::new(
        "Erase events for a legal request: in ONE transaction, the events (chronicle_events, through its \
         deliberate erase path), every delivery of them (chronicle_outbox_events) and their entries \
         (chronicle_entries) are deleted, and a row of chronicle_erasures records the erased ids, --by, \
         --reason, the time and the counts (no content of the events). Nothing else ever deletes an event. \
         Refused while a rebuild runs (it could write an erased entry back): run it again after the rebuild.\n\n\
         WHO MAY ERASE: the database decides, whatever a role was granted: only the owner of the tables (the \
         role that ran `chronicle migrate`) or a member of the role chronicle_eraser (created by the \
         migrations, NOLOGIN). An administrator grants it to the person's role:",
    )
    .verbatim(&["GRANT chronicle_eraser TO dpo;"])
    .text(
        "The audit row is written by the database itself in the same transaction, so an event deleted any \
         other way still leaves one (with the connected role as erased_by). Beside --by and --reason it records \
         the roles the database saw (db_session_user, db_current_user), the transaction's time and the rows it \
         deleted.\n\n\
         Ids with nothing to erase are reported. If no given id has anything, nothing is written (no audit \
         row) and the exit code is 1.",
    )
    .usage(&["chronicle erase --event-id ID [--event-id ID ...] --by WHO --reason TEXT", "                [--json]"])
    .flags(
        SETTINGS,
        &[
            ("--event-id ID", format!("An event to erase (a UUID). Repeat for several (at most {MAX_IDS}).")),
            ("--by WHO", "Required. Who erases (recorded in chronicle_erasures.erased_by).".into()),
            ("--reason TEXT", "Required. Why, e.g. the request's reference (recorded verbatim).".into()),
            (
                "--json",
                "Print one JSON object: erasure_id, event_ids, not_found, events_erased, deliveries_erased, \
                 entries_erased, erased_by, reason, erased_at (see docs/operations.md)."
                    .into(),
            ),
        ],
    )
    .examples(&[
        "chronicle erase --event-id 0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e10 \\",
        "    --by dpo@example.com --reason 'GDPR request #4411'",
        "chronicle erase --event-id 0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e10 \\",
        "    --event-id 0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e11 --by alice \\",
        "    --reason 'legal hold released, erase ticket LEG-9' --json",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub event_ids: Vec<Uuid>,
    pub by: String,
    pub reason: String,
    pub json: bool,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let (mut by, mut reason) = (None, None);
    let mut event_ids = Vec::new();
    let mut json = false;
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("event-id") => event_ids.push(ops::parse_event_id("--event-id", &string_value(p, "event-id")?)?),
            Long("by") => by = Some(string_value(p, "by")?),
            Long("reason") => reason = Some(string_value(p, "reason")?),
            Long("json") => json = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    if event_ids.is_empty() {
        return Err(AppError::usage("--event-id is required: which event(s) to erase"));
    }
    let mut seen = std::collections::HashSet::new();
    event_ids.retain(|id| seen.insert(*id));
    if event_ids.len() > MAX_IDS {
        return Err(AppError::usage(format!(
            "{} event ids given, at most {MAX_IDS} per erase: split the request",
            event_ids.len()
        )));
    }
    let (by, reason) = ops::audit_fields(by, reason)?;
    Ok(Some(Args { database_url: src.database_url()?, event_ids, by, reason, json }))
}

/// What an erasure did.
#[derive(Debug, Clone, PartialEq)]
pub struct Erasure {
    pub erasure_id: i64,
    pub erased_at: DateTime<Utc>,
    /// Ids of which at least one row (event, delivery or entry) was deleted.
    pub event_ids: Vec<Uuid>,
    pub not_found: Vec<Uuid>,
    pub events_erased: i32,
    pub deliveries_erased: i32,
    pub entries_erased: i32,
}

/// Serialises with rebuilds (the same advisory lock, held to the end of this
/// transaction): a rebuild reads events in batches and could write back the entry of an
/// event erased meanwhile.
pub const TAKE_REBUILD_LOCK: &str = "SELECT pg_try_advisory_xact_lock($1)";

/// The deliberate path around the append-only trigger, for this transaction only, with
/// who and why for the audit row the database writes, and the ids to erase in
/// `chronicle.erase_extra_ids`: for an id with no event left, the database deletes its
/// deliveries and entries too (migrations 8 and 12: the role running this must own the
/// tables or be a member of `chronicle_eraser`).
pub const ALLOW_ERASE: &str = "SELECT set_config('chronicle.allow_erase', 'on', true),
                                      set_config('chronicle.erased_by', $1, true),
                                      set_config('chronicle.erase_reason', $2, true),
                                      set_config('chronicle.erase_extra_ids', $3, true)";

/// The events go (erasures are serialised by the rebuild lock). The database's statement
/// trigger deletes their deliveries and entries, and those left of the other ids, counts
/// what it deleted, and writes the audit row, whose id it leaves in `chronicle.erasure_id`
/// (unset when nothing at all was deleted).
pub const ERASE_EVENTS: &str = "DELETE FROM chronicle_events WHERE id = ANY($1) RETURNING id";
pub const AUDIT_ID: &str = "SELECT nullif(current_setting('chronicle.erasure_id', true), '')::bigint";

pub const READ_ERASURE: &str = "
    SELECT id, erased_at, events_erased, deliveries_erased, entries_erased, event_ids
    FROM chronicle_erasures WHERE id = $1";

/// Erases `ids` in one transaction; `Ok(None)` (nothing written) when none of them has
/// any row.
pub fn erase(client: &mut postgres::Client, ids: &[Uuid], by: &str, reason: &str) -> Result<Option<Erasure>> {
    let ctx = |what: &'static str| move |e: postgres::Error| AppError::db(what, e);
    let mut tx = client.transaction().map_err(ctx("while starting the erasure"))?;
    let locked: bool = tx
        .query_one(TAKE_REBUILD_LOCK, &[&crate::rebuild::REBUILD_LOCK_KEY])
        .and_then(|r| r.try_get(0))
        .map_err(ctx("while taking the rebuild lock"))?;
    if !locked {
        return Err(AppError::failed(
            "a rebuild is running on this database (it could write an erased entry back): \
             nothing was erased; run the erase again once the rebuild has finished",
        ));
    }
    let list = ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(",");
    tx.execute(ALLOW_ERASE, &[&by, &reason, &list]).map_err(ctx("while enabling the erase path"))?;
    tx.execute(ERASE_EVENTS, &[&ids]).map_err(ctx("while erasing events"))?;
    let audit_id: Option<i64> =
        tx.query_one(AUDIT_ID, &[]).and_then(|r| r.try_get(0)).map_err(ctx("while reading the audit row"))?;
    let Some(audit_id) = audit_id else {
        return Ok(None); // nothing was deleted; rolled back on drop
    };
    let row = tx.query_one(READ_ERASURE, &[&audit_id]).map_err(ctx("while reading the audit row"))?;
    let get = |i: usize| row.try_get::<_, i32>(i).map_err(ctx("while reading the audit row"));
    let recorded: Vec<Uuid> = row.try_get(5).map_err(ctx("while reading the audit row"))?;
    let erasure = Erasure {
        erasure_id: audit_id,
        erased_at: row.try_get(1).map_err(ctx("while reading the audit row"))?,
        event_ids: ids.iter().copied().filter(|id| recorded.contains(id)).collect(),
        not_found: ids.iter().copied().filter(|id| !recorded.contains(id)).collect(),
        events_erased: get(2)?,
        deliveries_erased: get(3)?,
        entries_erased: get(4)?,
    };
    tx.commit().map_err(ctx("while committing the erasure"))?;
    Ok(Some(erasure))
}

pub fn run(args: Args) -> Result<()> {
    let mut client = db::connect_for_command(&args.database_url)?;
    let Some(e) = erase(&mut client, &args.event_ids, &args.by, &args.reason)? else {
        return Err(AppError::failed(format!(
            "nothing to erase: none of the {} id(s) has an event, delivery or entry; nothing was written",
            args.event_ids.len()
        )));
    };
    log::info!(
        "erasure #{} by {:?}: {} event(s), {} delivery(ies), {} entry(ies)",
        e.erasure_id,
        args.by,
        e.events_erased,
        e.deliveries_erased,
        e.entries_erased
    );
    if args.json {
        println!(
            "{}",
            json!({
                "erasure_id": e.erasure_id, "event_ids": e.event_ids, "not_found": e.not_found,
                "events_erased": e.events_erased, "deliveries_erased": e.deliveries_erased,
                "entries_erased": e.entries_erased, "erased_by": args.by, "reason": args.reason,
                "erased_at": e.erased_at,
            })
        );
    } else {
        println!(
            "erasure #{} recorded: {} event(s), {} delivery(ies), {} entry(ies) erased",
            e.erasure_id, e.events_erased, e.deliveries_erased, e.entries_erased
        );
        for id in &e.not_found {
            println!("not found (nothing to erase): {id}");
        }
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
    fn ids_by_and_reason_are_required() {
        let id = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e10";
        let a = parse_args(&["--event-id", id, "--event-id", id, "--by", "dpo", "--reason", "r"]).unwrap().unwrap();
        assert_eq!(a.event_ids.len(), 1);
        for bad in [
            &["--by", "dpo", "--reason", "r"][..],
            &["--event-id", id, "--reason", "r"],
            &["--event-id", id, "--by", "dpo"],
            &["--event-id", "x", "--by", "dpo", "--reason", "r"],
        ] {
            assert_eq!(parse_args(bad).unwrap_err().kind(), Kind::Usage, "{bad:?}");
        }
    }
}
