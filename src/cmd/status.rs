//! `chronicle status`: the runbook's acceptance queries, without psql.

use lexopt::prelude::*;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::error::{AppError, Result};
use crate::help::Help;
use crate::ops::{self, CountMode, Counts, Status};
use crate::outbox::horizon::{self, Horizon};
use crate::terminal::{printable, Align, Table};

pub const SUMMARY: &str = "The outbox by state, failures by reason, coverage, last rebuild";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL, &config::READ_DATABASE_URL, &config::MAX_PROCESSING];

pub fn help() -> Help {
    Help::new(format!(
        "Answer \"is the projector healthy?\" in one read-only snapshot: the outbox by state (with the age of the \
         oldest pending row and the stuck rows), the failing events (those whose current delivery failed, each \
         counted once however many failed deliveries it has) by error_reason with an example event each, events \
         against entries (and events that have no entry), the last rebuild run, and the outbox's dead rows with \
         what holds back the vacuum horizon (a warning past {horizon} s, when vacuum cannot remove them and the \
         drain slows). Informational: exits 0 \
         whatever it finds (3 if the database is unreachable).\n\n\
         Exact counts read the events, the entries and the whole outbox, which takes seconds on tens of \
         millions of events. So beyond {limit} events (by the planner's estimate) the events, the entries and \
         the done rows are estimated from the server's statistics, and \"events without entry\" counts those \
         that have a pending, processing or failed delivery (chronicle verify finds the others); the output \
         says which it did. The pending, processing, stuck and failed rows are always exact.",
        limit = thousands(ops::EXACT_COUNTS_UP_TO),
        horizon = horizon::WARN_AFTER_SECONDS,
    ))
    .usage(&["chronicle status [--json] [--exact | --estimate]"])
    .flags(
        SETTINGS,
        &[
            ("--exact", "Count exactly whatever the size (as the runbook's queries do).".into()),
            ("--estimate", "Estimate whatever the size (well under a second at any size).".into()),
            (
                "--json",
                "Print one JSON object: outbox, failed_by_reason, events, entries, events_without_entry, counts \
                 (\"exact\" or \"estimated\"), last_rebuild, standby, horizon, horizon_held_back (see \
                 docs/operations.md)."
                    .into(),
            ),
        ],
    )
    .examples(&[
        "chronicle status",
        "chronicle status --json | jq '.outbox.failed'",
        "chronicle status --max-processing-seconds 120  # processing > 2 min is stuck",
        "chronicle status --exact --json                # exact counts at any size",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub max_processing: std::time::Duration,
    pub json: bool,
    pub counts: CountMode,
}

/// 500000 as "500,000".
fn thousands(n: i64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let mut json = false;
    let mut counts = CountMode::Auto;
    let mut set_counts = |mode: CountMode, flag: &str| -> Result<()> {
        if counts != CountMode::Auto && counts != mode {
            return Err(AppError::usage(format!("{flag}: give either --exact or --estimate, not both")));
        }
        counts = mode;
        Ok(())
    };
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("json") => json = true,
            Long("exact") => set_counts(CountMode::Exact, "--exact")?,
            Long("estimate") => set_counts(CountMode::Estimated, "--estimate")?,
            _ => return Err(arg.unexpected().into()),
        }
    }
    let max_processing = src
        .seconds(&config::MAX_PROCESSING)?
        .ok_or_else(|| AppError::usage(format!("{} is required", config::MAX_PROCESSING.var)))?;
    Ok(Some(Args { database_url: src.read_database_url()?, max_processing, json, counts }))
}

pub fn run(args: Args) -> Result<()> {
    let mut client = db::connect_for_command(&args.database_url)?;
    let st = ops::status(&mut client, args.max_processing, args.counts)
        .map_err(|e| AppError::db("while reading the status", e))?;
    if args.json {
        let v = serde_json::to_value(&st)
            .map_err(|e| AppError::failed(format!("cannot render the status: {e}")).caused_by(e))?;
        println!("{v}");
    } else {
        print!("{}", render_text(&st));
    }
    Ok(())
}

/// The outbox's dead rows and what holds back the vacuum horizon, a section of one line;
/// and a warning line while it is held back past `horizon::WARN_AFTER_SECONDS`.
fn horizon_text(h: &Horizon) -> String {
    let oldest = match h.oldest() {
        Some((holder, seconds)) => format!(
            "held back {seconds:.1} s by {}{}",
            holder.as_str().replace('_', " "),
            h.of(holder).held_by.as_deref().map(|b| format!(" ({})", printable(b))).unwrap_or_default()
        ),
        None => "not held back by any transaction".to_string(),
    };
    let mut s = format!("\nVACUUM\n  dead rows: {}; vacuum horizon: {oldest}\n", h.outbox_dead_rows);
    if let Some(w) = horizon::warning(h) {
        s.push_str(&format!("  WARNING: {}\n", printable(&w)));
    }
    s
}

/// The status as a readable table.
pub fn render_text(st: &Status) -> String {
    let o = &st.outbox;
    let mut s = String::new();
    if let Some(sb) = &st.standby {
        let seconds = sb.replay_lag_seconds.map_or_else(|| "?".to_string(), |v| format!("{v:.1} s"));
        let bytes = sb.replay_lag_bytes.map_or_else(|| "?".to_string(), |v| format!("{v} bytes"));
        s.push_str(&format!(
            "READ FROM A STANDBY (a replica): replay lag {seconds} since its last replayed commit, {bytes} received \
             and not replayed yet\n\n"
        ));
    }
    s.push_str("OUTBOX (chronicle_outbox_events)\n");
    let about = if st.counts == Counts::Estimated { "~" } else { "" };
    let mut outbox = Table::new(2, &[Align::Left, Align::Right, Align::Left]);
    outbox.row(["pending", &o.pending.to_string(), &format!("oldest pending: {:.1} s", o.oldest_pending_age_seconds)]);
    outbox.row(["processing", &o.processing.to_string(), &format!("stuck: {}", o.stuck)]);
    outbox.row(["done", &format!("{about}{}", o.done), ""]);
    outbox.row(["failed", &o.failed.to_string(), "events whose delivery failed, each counted once"]);
    s.push_str(&outbox.render());
    if let Some(h) = &st.horizon {
        s.push_str(&horizon_text(h));
    }
    s.push_str("\nFAILED BY REASON (events)\n");
    if st.failed_by_reason.is_empty() {
        s.push_str("  (none)\n");
    } else {
        let mut failed = Table::new(2, &[Align::Left, Align::Right, Align::Left]);
        failed.row(["error_reason", "events", "example event"]);
        for f in &st.failed_by_reason {
            let reason = f.error_reason.as_deref().unwrap_or("none");
            failed.row([reason, &f.count.to_string(), &f.example_event_id.to_string()]);
        }
        s.push_str(&failed.render());
        s.push_str("  (chronicle show EVENT_ID for one; chronicle replay-failed once fixed)\n");
    }
    match st.counts {
        Counts::Exact => s.push_str("\nREAD MODEL (counted)\n"),
        Counts::Estimated => {
            s.push_str("\nREAD MODEL (~ estimated from the server's statistics; chronicle status --exact counts)\n")
        }
    }
    let mut read_model = Table::new(2, &[Align::Left, Align::Right, Align::Left]);
    read_model.row(["events", &format!("{about}{}", st.events), ""]);
    read_model.row(["entries", &format!("{about}{}", st.entries), ""]);
    let note = if st.counts == Counts::Estimated {
        "(with a pending, processing or failed delivery; chronicle verify finds the others)"
    } else {
        ""
    };
    read_model.row(["events without entry", &st.events_without_entry.to_string(), note]);
    s.push_str(&read_model.render());
    s.push_str("\nLAST REBUILD\n");
    match &st.last_rebuild {
        None => s.push_str("  (never)\n"),
        Some(r) => {
            let scope = r.library_id.map(|l| format!("library {l}")).unwrap_or_else(|| "all libraries".into());
            let error = || printable(r.error.as_deref().unwrap_or("(no message)"));
            let outcome = match (r.state.as_str(), r.success) {
                ("queued", _) => "queued: finished when the workers have delivered it".to_string(),
                ("running", _) => "running".to_string(),
                ("unknown", _) => "running, or died (a standby cannot tell)".to_string(),
                ("died", _) if r.finished_at.is_none() => {
                    "DIED: its process is gone (it no longer holds the rebuild lock)".to_string()
                }
                ("died", _) => format!("DIED: {}", error()),
                (_, Some(true)) => "success".to_string(),
                (_, Some(false)) => format!("FAILED: {}", error()),
                (_, None) => "unknown".to_string(),
            };
            s.push_str(&format!("  run #{} {} ({scope}): {outcome}\n", r.id, printable(&r.mode)));
            if let Some(cmd) = &r.rerun {
                s.push_str(&format!(
                    "  to do its work: `{}` (which also cleans up what the dead run left)\n",
                    printable(cmd)
                ));
            }
            s.push_str(&format!(
                "  started {}  finished {}\n",
                r.started_at.to_rfc3339(),
                r.finished_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
            ));
            s.push_str(&format!(
                "  events {}  rows written {}  failures {} {}\n",
                r.events_total.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                r.rows_written,
                r.failures,
                if r.failures > 0 { r.failures_by_reason.to_string() } else { String::new() }
            ));
            if let Some(d) = &r.deliveries {
                s.push_str(&format!(
                    "  deliveries queued {} at {}: {} done, {} failed, {} waiting\n",
                    d.queued,
                    d.queued_at.to_rfc3339(),
                    d.done,
                    d.failed,
                    d.waiting
                ));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::horizon::HolderAge;

    fn held(seconds: f64) -> Horizon {
        Horizon {
            transaction: HolderAge {
                age_seconds: Some(seconds),
                age_transactions: Some(3),
                held_by: Some("pid 42 (user app, application psql, idle in transaction)".into()),
            },
            outbox_dead_rows: 1_200_000,
            ..Horizon::default()
        }
    }

    #[test]
    fn the_horizon_line_names_the_holder_and_warns_only_past_the_threshold() {
        let quiet = horizon_text(&held(12.0));
        assert_eq!(
            quiet,
            "\nVACUUM\n  dead rows: 1200000; vacuum horizon: held back 12.0 s by transaction (pid 42 (user app, application \
             psql, idle in transaction))\n"
        );
        let loud = horizon_text(&held(horizon::WARN_AFTER_SECONDS + 1.0));
        let warning = loud.lines().nth(3).expect("a warning line");
        assert!(
            warning.starts_with("  WARNING: the vacuum horizon is held back by a transaction open for 301 s"),
            "{loud}"
        );
        assert_eq!(
            horizon_text(&Horizon::default()),
            "\nVACUUM\n  dead rows: 0; vacuum horizon: not held back by any transaction\n"
        );
    }
}
