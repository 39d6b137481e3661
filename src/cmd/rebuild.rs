//! `chronicle rebuild`: the read model rebuilt from the source of truth.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use lexopt::prelude::*;
use uuid::Uuid;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, parse_count, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::error::{AppError, Result};
use crate::help::Help;
use crate::rebuild::{self, Mode, Options, Progress};

pub const SUMMARY: &str = "Rebuild the read model (--truncate, --emit-outbox, --swap)";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL, &config::MAX_EVENT_BYTES, &config::BATCH_MAX_BYTES];

/// Writer connections by default: on two cores, two writers keep the server busy while
/// this connection reads and the writers project.
const DEFAULT_WRITERS: usize = 2;

pub fn help() -> Help {
    Help::new("Rebuild the read model from the source of truth, with the worker's projection.")
    .rows([
        ("(no mode flag)", "re-project every event over the existing entries (upsert)"),
        ("--truncate", "empty chronicle_entries first, then re-project"),
        (
            "--emit-outbox",
            "give every event one pending delivery for the workers, instead of projecting here: a new one, or \
             its failed one sent back (replayed, with the audit), or the pending or processing one it already has \
             (counted in the run); with --truncate, the read model is also emptied, in the same transaction (a run \
             interrupted before it commits changed nothing). The run is finished when its deliveries are; it succeeds only if none failed and every event it delivered \
             has an entry",
        ),
        (
            "--swap",
            "zero downtime: build a shadow table while the old one keeps serving, catch up with events written \
             meanwhile, then swap the two in one short transaction, keeping indexes, constraints, row-level \
             security, policies and grants. Readers never see an empty or half-built timeline.",
        ),
    ])
    .text(
        "Events that cannot be projected are counted by error_reason and recorded as failed deliveries, one per \
         event however many runs fail it (see `chronicle status`, `chronicle replay-failed`); the rebuild goes \
         on and exits 1 at the end. An event whose delivery had failed and whose entry the rebuild writes has \
         that delivery closed (done, naming the run, keeping the failure it had). Every run is recorded in \
         chronicle_rebuild_runs with its verdict and, when it failed, why. Progress goes to stderr. Only one \
         rebuild runs at a time per database.\n\n\
         A run interrupted anywhere (killed, its connection lost, the server restarted) is marked died by the \
         next rebuild or by a running worker (`chronicle status` shows it, with the command to run again); the \
         next rebuild also drops the tables a --swap that died left behind, and says what it cleaned up. Running \
         the interrupted command again finishes its work.",
    )
    .usage(&[
        "chronicle rebuild [--truncate] [--emit-outbox | --swap] [--library-id ID]",
        "                  [--batch-size N] [--writers N] [--json]",
    ])
    .flags(
        SETTINGS,
        &[
            (
                "--library-id ID",
                "Rebuild one library (scope) only; other libraries are not touched. Not with --swap.".into(),
            ),
            ("--batch-size N", "Events read, projected and written per statement (default 1000, 1-50000).".into()),
            (
                "--writers N",
                format!(
                    "Connections projecting and writing entries in parallel while this one reads the next batches \
                     (default {DEFAULT_WRITERS}, 1-16; 1: read, project and write in turn on one connection). Not \
                     used by --emit-outbox."
                ),
            ),
            (
                "--json",
                r#"Print the report as JSON: {"run_id", "mode", "library_id", "events_total", "rows_written", "failures", "failures_by_reason", "failures_resolved", "deliveries", "seconds", "swap_lock_held_ms", "cleaned_up"}; deliveries (--emit-outbox, else null): {"new", "replayed", "adopted"}; cleaned_up: what this run found left by runs that died and cleaned up, in words."#
                    .into(),
            ),
        ],
    )
    .examples(&[
        "chronicle rebuild --truncate",
        "chronicle rebuild --truncate --emit-outbox && chronicle worker --until-empty",
        "chronicle rebuild --swap",
        "chronicle rebuild --library-id 0190a5c4-9a0e-7cc1-8a42-2f7e3f6c2d11",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub mode: Mode,
    pub library_id: Option<Uuid>,
    pub batch_size: usize,
    pub writers: usize,
    pub json: bool,
    pub started_by: String,
    pub sizes: crate::outbox::SizeLimits,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let (mut truncate, mut emit, mut swap, mut json) = (false, false, false, false);
    let mut library_id = None;
    let mut batch_size = 1000;
    let mut writers = DEFAULT_WRITERS;
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("truncate") => truncate = true,
            Long("emit-outbox") => emit = true,
            Long("swap") => swap = true,
            Long("json") => json = true,
            Long("library-id") => {
                let v = string_value(p, "library-id")?;
                library_id = Some(
                    Uuid::parse_str(v.trim())
                        .map_err(|_| AppError::usage(format!("invalid --library-id {v:?}: not a UUID")))?,
                );
            }
            Long("batch-size") => {
                let v = string_value(p, "batch-size")?;
                batch_size = parse_count(v.trim(), 1, 50_000)
                    .map_err(|why| AppError::usage(format!("invalid --batch-size {v:?}: {why}")))?
                    as usize;
            }
            Long("writers") => {
                let v = string_value(p, "writers")?;
                writers = parse_count(v.trim(), 1, rebuild::MAX_WRITERS as u64)
                    .map_err(|why| AppError::usage(format!("invalid --writers {v:?}: {why}")))?
                    as usize;
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    let mode = match (truncate, emit, swap) {
        (_, true, true) => return Err(AppError::usage("--swap and --emit-outbox cannot be combined")),
        (true, _, true) => return Err(AppError::usage("--swap replaces the table; --truncate is not needed with it")),
        (false, false, false) => Mode::Direct,
        (true, false, false) => Mode::Truncate,
        (false, true, false) => Mode::EmitOutbox,
        (true, true, false) => Mode::TruncateEmitOutbox,
        (false, false, true) => Mode::Swap,
    };
    if mode == Mode::Swap && library_id.is_some() {
        return Err(AppError::usage("--swap rebuilds the whole read model; it cannot be combined with --library-id"));
    }
    let started_by = env.get("USER").or_else(|| env.get("USERNAME")).unwrap_or("unknown").to_string();
    let sizes = crate::outbox::SizeLimits {
        max_event_bytes: src
            .count(&config::MAX_EVENT_BYTES)?
            .unwrap_or(crate::outbox::SizeLimits::default().max_event_bytes),
        batch_max_bytes: src
            .count(&config::BATCH_MAX_BYTES)?
            .unwrap_or(crate::outbox::SizeLimits::default().batch_max_bytes),
    };
    Ok(Some(Args { database_url: src.database_url()?, mode, library_id, batch_size, writers, json, started_by, sizes }))
}

pub fn run(args: Args) -> Result<()> {
    let mut client = db::connect_for_command(&args.database_url)?;
    let opts = Options {
        mode: args.mode,
        library_id: args.library_id,
        batch_size: args.batch_size,
        writers: args.writers,
        database_url: args.database_url.clone(),
        started_by: args.started_by,
        sizes: args.sizes,
    };
    let mut reporter = ProgressLine::new();
    let report = rebuild::rebuild(&mut client, &opts, &mut |p| reporter.show(p))?;
    reporter.finish();
    if args.json {
        let out = serde_json::json!({
            "run_id": report.run_id,
            "mode": report.mode,
            "library_id": args.library_id,
            "events_total": report.events_total,
            "rows_written": report.rows_written,
            "failures": report.failures(),
            "failures_by_reason": report.failures_by_reason,
            "failures_resolved": report.failures_resolved,
            "deliveries": report.queued.map(|q| serde_json::json!({
                "new": q.new, "replayed": q.replayed, "adopted": q.adopted,
            })),
            "seconds": report.seconds,
            "swap_lock_held_ms": report.swap_lock_held.map(|d| d.as_secs_f64() * 1000.0),
            "cleaned_up": report.cleaned_up,
        });
        println!("{out}");
    } else {
        for line in &report.cleaned_up {
            println!("cleaned up: {line}");
        }
        let what = if matches!(args.mode, Mode::EmitOutbox | Mode::TruncateEmitOutbox) {
            "deliveries enqueued"
        } else {
            "entries written"
        };
        println!(
            "rebuild {} (run {}): {} events, {} {what}, {} failed, {:.2} s",
            report.mode,
            report.run_id,
            report.events_total,
            report.rows_written,
            report.failures(),
            report.seconds
        );
        if let Some(q) = report.queued {
            println!(
                "  deliveries: {} new, {} failed ones sent again (replayed), {} already waiting (counted in this run); \
                 the run is finished when the workers have delivered them (chronicle status shows its verdict)",
                q.new, q.replayed, q.adopted
            );
        }
        if report.failures_resolved > 0 {
            println!("  {} failed deliveries closed: this run wrote their events' entries", report.failures_resolved);
        }
        if let Some(held) = report.swap_lock_held {
            println!("swap: the read model was locked for {:.1} ms", held.as_secs_f64() * 1000.0);
        }
        for (reason, n) in &report.failures_by_reason {
            println!("  failed {reason}: {n} (one failed delivery per event; see chronicle status, replay-failed)");
        }
    }
    if let Some(why) = report.failure_message() {
        return Err(AppError::failed(format!("{why}; the rest of the rebuild was done")));
    }
    Ok(())
}

/// Progress on stderr: a line rewritten in place on a terminal, a line every few
/// seconds otherwise (logs, CI).
struct ProgressLine {
    tty: bool,
    last: Option<Instant>,
    shown: bool,
}

impl ProgressLine {
    fn new() -> ProgressLine {
        ProgressLine { tty: std::io::stderr().is_terminal(), last: None, shown: false }
    }

    fn show(&mut self, p: Progress) {
        let every = if self.tty { Duration::from_millis(200) } else { Duration::from_secs(5) };
        if self.last.is_some_and(|t| t.elapsed() < every) && p.done < p.total {
            return;
        }
        self.last = Some(Instant::now());
        let secs = p.elapsed.as_secs_f64().max(1e-3);
        let rate = p.done as f64 / secs;
        let eta = if rate > 0.0 && p.total > p.done { (p.total - p.done) as f64 / rate } else { 0.0 };
        let pct = if p.total > 0 { 100.0 * p.done as f64 / p.total as f64 } else { 100.0 };
        let line = format!("rebuild: {}/{} events ({pct:.1}%), {rate:.0} events/s, ETA {eta:.0} s", p.done, p.total);
        let mut err = std::io::stderr().lock();
        let _ = if self.tty { write!(err, "\r{line}\x1b[K") } else { writeln!(err, "{line}") };
        self.shown = true;
    }

    fn finish(&mut self) {
        if self.tty && self.shown {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    fn parse_args(args: &[&str]) -> Result<Option<Args>> {
        crate::cmd::parse_for_test(parse, args)
    }

    #[test]
    fn writers_default_to_two_and_are_bounded() {
        let a = parse_args(&["--truncate"]).unwrap().unwrap();
        assert_eq!((a.mode, a.batch_size, a.writers), (Mode::Truncate, 1000, DEFAULT_WRITERS));
        let a = parse_args(&["--swap", "--writers", "16", "--batch-size", "97"]).unwrap().unwrap();
        assert_eq!((a.mode, a.batch_size, a.writers), (Mode::Swap, 97, 16));
        assert_eq!(parse_args(&["--writers", " 1 "]).unwrap().unwrap().writers, 1);
        for bad in ["0", "17", "x", "", "-1", "2.5"] {
            let e = parse_args(&["--truncate", "--writers", bad]).unwrap_err();
            assert_eq!(e.kind(), Kind::Usage, "{bad:?}");
            assert!(e.to_string().contains("--writers"), "{bad:?}: {e}");
        }
        assert_eq!(parse_args(&["--writers"]).unwrap_err().kind(), Kind::Usage);
    }

    #[test]
    fn help_names_every_flag() {
        let h = help().render(80);
        for flag in ["--truncate", "--emit-outbox", "--swap", "--library-id", "--batch-size", "--writers", "--json"] {
            assert!(h.contains(flag), "{flag}");
        }
    }
}
