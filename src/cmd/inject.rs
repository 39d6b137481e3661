//! `chronicle inject`: writes realistic synthetic events, reproducibly and fast.
//!
//! It exists to fill a database for demos, load tests and benchmarks of the worker with
//! events that look like a notes application's: every catalog type, English and
//! Chinese titles and texts, several actors and clients per library, system events,
//! and entities that hang together (a book is renamed from its previous title, a block
//! is edited from its previous text). Everything is derived from `--seed` — ids and
//! times too, never the clock — so the same seed writes byte-identical rows, which
//! makes a benchmark or a bug report repeatable. The generator is pure; `run` only
//! streams its rows into COPY statements.

use std::io::Write;
use std::sync::mpsc;
use std::time::Instant;

use lexopt::prelude::*;
use postgres::error::SqlState;
use serde_json::json;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, parse_count, DbUrl, Env, Setting, Sources};
use crate::db;
use crate::error::{AppError, Result};
use crate::help::Help;
use crate::synthetic::Generator;
use crate::writer::{begin_copy, end_copy, write_copy_row, COPY_EVENTS};

pub const SUMMARY: &str = "Write N realistic synthetic events (reproducible with --seed)";

const SETTINGS: &[&Setting] = &[&config::DATABASE_URL];

/// The most events one run writes.
pub const MAX_COUNT: u64 = 100_000_000;
/// The most libraries events are spread across.
pub const MAX_LIBRARIES: u64 = 10_000;
/// Rows per COPY statement: the enqueue trigger runs once per statement.
const COPY_CHUNK: usize = 10_000;

pub fn help() -> Help {
    Help::new(
        "Write N synthetic events into chronicle_events, in one transaction, with binary COPY (the enqueue \
         trigger gives each its outbox row). They cover the whole event catalog: libraries, bookshelves, books \
         (English and Chinese titles), blocks, tags; a few actors and clients per library, request ids, IP \
         addresses from the documentation ranges, a few percent of system events (no actor). Times spread \
         over 90 days ending at a fixed point derived from the seed (not now), so the same seed writes the \
         same rows, ids included; injecting one seed twice into one database is refused as duplicate ids. The \
         first event of each library is its LibraryCreated. Prints how many events were written, to how many \
         libraries, and the rate.",
    )
    .usage(&["chronicle inject --count N [--libraries K] [--seed S] [--json]"])
    .flags(
        SETTINGS,
        &[
            ("--count N", format!("How many events to write (1-{MAX_COUNT}). Required.")),
            (
                "--libraries K",
                format!(
                    "How many libraries to spread them across (1-{MAX_LIBRARIES}; default 3). Some are busier \
                     than others; with fewer events than libraries, fewer libraries get events."
                ),
            ),
            (
                "--seed S",
                "The seed (a whole number). Same seed, same events. Default: a new seed each run, printed.".into(),
            ),
            ("--json", r#"Print {"events": N, "libraries": K, "seed": S, "seconds": x} instead of a sentence."#.into()),
        ],
    )
    .examples(&["chronicle inject --count 2000", "chronicle inject --count 1000000 --libraries 50 --seed 7 --json"])
}

#[derive(Debug)]
pub struct Args {
    pub database_url: DbUrl,
    pub count: u64,
    pub libraries: u64,
    /// None: a fresh seed per run (printed, so the run can be repeated).
    pub seed: Option<u64>,
    pub json: bool,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let mut count = None;
    let mut libraries = 3;
    let mut seed = None;
    let mut json = false;
    let number = |flag: &str, v: &str, min: u64, max: u64| {
        parse_count(v.trim(), min, max).map_err(|why| AppError::usage(format!("invalid --{flag} {v:?}: {why}")))
    };
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("count") => count = Some(number("count", &string_value(p, "count")?, 1, MAX_COUNT)?),
            Long("libraries") => libraries = number("libraries", &string_value(p, "libraries")?, 1, MAX_LIBRARIES)?,
            Long("seed") => seed = Some(number("seed", &string_value(p, "seed")?, 0, u64::MAX)?),
            Long("json") => json = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    let Some(count) = count else {
        return Err(AppError::usage(format!("--count is required (how many events to write, 1-{MAX_COUNT})")));
    };
    Ok(Some(Args { database_url: src.database_url()?, count, libraries, seed, json }))
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let mut client = db::connect_for_command(&args.database_url)?;
    let mut tx = client.transaction().map_err(|e| AppError::db("while starting the transaction", e))?;

    // Generating rows and copying them overlap: one thread renders chunks of COPY text
    // while this one streams the previous chunk to the server.
    let (sender, chunks) = mpsc::sync_channel::<(Vec<u8>, usize)>(2);
    // Without --seed every run writes new events (a demo can be run again on the same
    // database); the seed is printed so the run can be repeated exactly.
    let seed = args.seed.unwrap_or_else(|| crate::retry::Jitter::from_entropy().next_u64() >> 16);
    let (count, libraries) = (args.count, args.libraries);
    let generator = std::thread::spawn(move || {
        let mut g = Generator::new(seed, libraries, count);
        loop {
            let mut buf = Vec::with_capacity(COPY_CHUNK * 512);
            begin_copy(&mut buf);
            let mut rows = 0;
            while rows < COPY_CHUNK {
                let Some(e) = g.next() else { break };
                write_copy_row(&mut buf, e.id.unwrap_or_default(), &e);
                rows += 1;
            }
            end_copy(&mut buf);
            if rows == 0 || sender.send((buf, rows)).is_err() {
                break;
            }
        }
        g.libraries_started()
    });

    let mut written: u64 = 0;
    let mut next_report = 1_000_000;
    let copied = (|| -> Result<()> {
        for (buf, rows) in chunks.iter() {
            let mut w = tx.copy_in(COPY_EVENTS).map_err(|e| AppError::db("while starting COPY", e))?;
            let wrote = w.write_all(&buf);
            let finished = w.finish();
            match (wrote, finished) {
                (_, Err(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    return Err(AppError::failed(format!(
                        "the events of seed {seed} are already in chronicle_events (the same seed writes the same \
                         ids); nothing was written: use another --seed ({})",
                        db::describe_error(&e)
                    )))
                }
                (_, Err(e)) => return Err(AppError::db("while copying events", e)),
                (Err(e), Ok(_)) => return Err(AppError::failed(format!("while copying events: {e}")).caused_by(e)),
                (Ok(()), Ok(_)) => {}
            }
            written += rows as u64;
            if written >= next_report {
                log::info!("inject: {written} of {count} events copied");
                next_report += 1_000_000;
            }
        }
        Ok(())
    })();
    drop(chunks);
    let libraries_written = generator.join().map_err(|_| AppError::failed("the event generator panicked"))?;
    copied?;
    if written != count {
        return Err(AppError::failed(format!("generated {written} events instead of {count}; nothing was written")));
    }
    tx.commit().map_err(|e| AppError::db("while committing the events", e))?;

    let seconds = started.elapsed().as_secs_f64();
    let rate = written as f64 / seconds.max(1e-9);
    if args.json {
        let out = json!({"events": written, "libraries": libraries_written, "seed": seed, "seconds": seconds});
        println!("{out}");
    } else {
        println!(
            "wrote {written} events to {libraries_written} libraries in {seconds:.2} s ({rate:.0} events/s), seed {seed}"
        );
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
    fn flags_are_checked_before_anything_connects() {
        let a = parse_args(&["--count", "10"]).unwrap().unwrap();
        assert_eq!((a.count, a.libraries, a.seed, a.json), (10, 3, None, false));
        let a = parse_args(&["--count", "5", "--libraries", "2", "--seed", "42", "--json"]).unwrap().unwrap();
        assert_eq!((a.count, a.libraries, a.seed, a.json), (5, 2, Some(42), true));
        for (args, names) in [
            (&[][..], "--count"),
            (&["--count", "0"], "--count"),
            (&["--count", "abc"], "--count"),
            (&["--count", "100000001"], "--count"),
            (&["--count", "1", "--libraries", "0"], "--libraries"),
            (&["--count", "1", "--seed", "-1"], "--seed"),
        ] {
            let e = parse_args(args).unwrap_err();
            assert_eq!(e.kind(), Kind::Usage, "{args:?}");
            assert!(e.to_string().contains(names), "{args:?}: {e}");
        }
    }
}
