//! The chronicle benchmark: one program, one table.
//!
//!     cargo bench --bench bench                 # full (about 15 minutes on 2 cores)
//!     cargo bench --bench bench -- --quick      # small sizes, 1-2 minutes
//!     cargo bench --bench bench -- --runs 5     # more runs per figure (default 3)
//!     cargo bench --bench bench -- --only drain --peers   # the drain beside graphile-worker
//!
//! It drives the release binary (`chronicle inject`, `worker`, `rebuild`) as separate
//! processes, exactly as an operator would, and uses the `chronicle` library only for
//! the reads (the timeline page) and to generate the events of the latency test.
//!
//! `BENCH_CHRONICLE_BIN=/path/to/chronicle` measures another build of the binary (to
//! compare a change against the current tree with the same program).
//!
//! Database: `BENCH_DATABASE_URL`, else `DATABASE_URL`, else
//! `postgres://postgres@127.0.0.1:5432/postgres`. A database `chronicle_bench_<pid>` is
//! created there and dropped at the end (also on error or Ctrl+C, best effort).
//!
//! What it measures (each figure: median of `--runs` runs, min and max beside it):
//! - raw limits: a set-based `INSERT … SELECT` that builds comparable entries in SQL from
//!   the same events, `INSERT … SELECT *` of those rows, and `INSERT … SELECT *` of the
//!   entries a drain wrote (the cost of writing the drain's own rows with the read
//!   model's indexes, nothing else);
//! - `inject` rate (COPY, enqueue trigger included);
//! - the drain of an injected backlog by one worker process at the runbook's settings,
//!   a small grid of settings, and the best of them; the worker's peak RSS;
//! - latency from an event's insert to its entry while 1,000 events/s are written, with
//!   the listener and with polling only;
//! - `rebuild --truncate` and `rebuild --swap`, and how long a reader paging the
//!   timeline is blocked by the swap;
//! - the timeline page query (newest, filtered, English and Chinese search) on one large
//!   library;
//! - with `--peers`, a peer job queue beside the runbook's drain: graphile-worker 0.18
//!   (pinned with a lockfile in `benches/peers/`) at its documented performance preset
//!   (24 concurrent jobs, local queue of 500, batched completion), draining a backlog of
//!   as many jobs as the drain has events, each job one `INSERT` of its payload into a
//!   sink table; its rate, its peak RSS, and the runbook drain's rate ÷ its rate. The
//!   runs alternate with the runbook's (chronicle, graphile-worker, chronicle, …). It
//!   needs `node` and `npm` (`BENCH_NODE`, `BENCH_NPM` to name them; `npm ci` runs once
//!   when `benches/peers/node_modules` is missing); without them the report says so and
//!   only those rows are missing;
//! - memory (`--only memory`): the worker's peak RSS on heavy events (many keys, events
//!   over `OUTBOX_MAX_EVENT_BYTES`) and whether the backlog behind them drains;
//! - scale (`--only scale`, never part of the full run): one database grown through
//!   `--scale-sizes` (default 1, 3 and 10 million events, most of them in one library);
//!   at each size `inject`, both rebuilds (seconds, peak RSS), the drain of a fresh
//!   backlog into the full tables, the page queries and a deep keyset page, `status`,
//!   `verify` and `show`, and the disk bytes per event;
//! - gauges (`--only gauges`, never part of the full run): the worker's gauge sampler
//!   (`outbox::sample_gauges` as the worker calls it: its statements and their round
//!   trips) over an outbox grown through `--gauge-sizes` pending rows (default 10,000,
//!   1,000,000 and 10,000,000), written straight into the outbox; at each size, once
//!   analyzed (as the worker's analyze leaves it after a burst) and once vacuumed too:
//!   median and p99 of `GAUGE_SAMPLES` samples, the estimate against the true count, and
//!   the exact count the sampler no longer makes, for comparison;
//! - verify (`--only verify`, never part of the full run): one database grown through
//!   `--verify-sizes` (default 1 million events); at each size the full content check of
//!   `verify` (events/s, peak RSS), beside `rebuild --truncate` of the same events and
//!   `verify --sample 1000`.
//!
//! Progress goes to stderr, the report (machine, server, the table) to stdout.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chronicle::config::DbUrl;
use chronicle::entries::ENTRY_COLUMNS;
use chronicle::event::EventType;
use chronicle::synthetic::Generator;
use chronicle::timeline::{self, Cursor, EntryQuery};
use postgres::Client;
use uuid::Uuid;

type Res<T> = Result<T, String>;

const BIN: &str = env!("CARGO_BIN_EXE_chronicle");

/// What the full run should fit in on the reference machine (2 cores).
const BUDGET: Duration = Duration::from_secs(15 * 60);
/// The worker's peak RSS target: the "best settings" of the drain must meet it.
const RSS_TARGET_MB: f64 = 20.0;

// ---------------------------------------------------------------------------------
// Plan: sizes of each section

#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    runs: usize,
    /// Events of the drain dataset (inject rate, raw limits, drains, latency, rebuild
    /// when `rebuild_on_big` is false).
    small: u64,
    /// Events of the one-library dataset (queries, and the large rebuild).
    big: u64,
    /// Events per grid point (one run each).
    grid: u64,
    latency_seconds: f64,
    /// Queries per run and kind.
    queries: usize,
    /// Whether the rebuild runs (`--runs` of each mode) use the big dataset; else they
    /// use the small one and the big dataset gets one `--swap`.
    rebuild_on_big: bool,
    /// `--only drain,latency,…`: run only these sections (inject always runs: it makes
    /// the dataset; the raw limits run when a ratio needs them). None: all but `scale`,
    /// which runs only when named.
    only: Option<Vec<String>>,
    /// The sizes of the scale section, in events, ascending: one database grows through
    /// them (`--scale-sizes`).
    scale_sizes: Vec<u64>,
    /// Deliveries of the scale section's drain backlog.
    scale_backlog: u64,
    /// The sizes of the verify section, in events, ascending (`--verify-sizes`).
    verify_sizes: Vec<u64>,
    /// What was reduced from the target sizes, said in the report.
    reductions: Vec<String>,
    /// `--peers`: run the peer job queue beside the runbook's drain.
    peers: bool,
    /// The pending rows of the gauges section, ascending: one outbox grows through them
    /// (`--gauge-sizes`).
    gauge_sizes: Vec<u64>,
}

impl Plan {
    fn from_args() -> Res<Plan> {
        let mut quick = false;
        let mut peers = false;
        let mut runs = 3usize;
        let mut overrides: Vec<(String, String)> = Vec::new();
        let mut only: Option<Vec<String>> = None;
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => quick = true,
                "--peers" => peers = true,
                "--bench" | "--keep" => {} // cargo bench passes --bench to harness = false targets
                "--runs" => {
                    let v = args.next().ok_or("--runs needs a number")?;
                    runs = v.parse().map_err(|_| format!("invalid --runs {v:?}"))?;
                    if runs < 1 {
                        return Err("--runs must be at least 1".into());
                    }
                }
                "--only" => {
                    let v = args.next().ok_or("--only needs a list of sections")?;
                    let list: Vec<String> = v.split(',').map(|s| s.trim().to_string()).collect();
                    let known = ["drain", "latency", "rebuild", "queries", "memory", "scale", "gauges", "verify"];
                    if let Some(bad) = list.iter().find(|s| !known.contains(&s.as_str())) {
                        return Err(format!("--only: unknown section {bad:?} (known: {})", known.join(", ")));
                    }
                    only = Some(list);
                }
                "--small" | "--big" | "--grid" | "--latency-seconds" | "--queries" | "--rebuild-on-big"
                | "--scale-sizes" | "--gauge-sizes" | "--verify-sizes" => {
                    let v = args.next().ok_or(format!("{a} needs a value"))?;
                    overrides.push((a.clone(), v));
                }
                "-h" | "--help" => {
                    println!(
                        "cargo bench --bench bench [-- [--quick] [--runs N] [--small N] [--big N] [--grid N] \
                         [--latency-seconds S] [--queries N] [--rebuild-on-big yes|no] \
                         [--only drain,latency,rebuild,queries,memory,scale,gauges,verify] [--scale-sizes N,N,…] \
                         [--gauge-sizes N,N,…] [--verify-sizes N,N,…] [--peers] \
                         [--keep]]\n\n\
                         --peers: the drain section also runs graphile-worker 0.18 (benches/peers/, needs node \
                         and npm; BENCH_NODE / BENCH_NPM name them) at its performance preset on as many jobs as \
                         the drain has events, one INSERT per job, its runs alternating with the runbook drain's; \
                         without node or npm that row is skipped.\n\n\
                         Without --only: every section but `scale`. `--only scale` grows one database through \
                         --scale-sizes (default 1000000,3000000,10000000; --quick: 20000,60000) and measures at \
                         each size: inject, rebuild (seconds, peak RSS), the drain of a 40,000-delivery backlog \
                         (--quick: 5,000), \
                         page p99, status/verify/show, disk bytes per event. 10,000,000 events need about 25 GB \
                         of disk plus the swap's shadow table.\n\n\
                         `--only gauges` grows one outbox through --gauge-sizes pending rows (default \
                         10000,1000000,10000000; --quick: 10000,100000) and times the worker's gauge sample at \
                         each size. 10,000,000 rows need about 3 GB of disk.\n\n\
                         `--only verify` grows one database through --verify-sizes (default 1000000; --quick: \
                         20000) and measures at each size the full content check of `verify` (events/s, peak RSS), \
                         `rebuild --truncate` of the same events and `verify --sample 1000`."
                    );
                    std::process::exit(0);
                }
                other if other.starts_with("--") => return Err(format!("unknown flag {other}")),
                _ => {} // a benchmark name filter from cargo: nothing to filter
            }
        }
        let mut p = if quick {
            Plan {
                quick,
                runs,
                small: 20_000,
                big: 100_000,
                grid: 5_000,
                latency_seconds: 5.0,
                queries: 200,
                rebuild_on_big: false,
                only: None,
                scale_sizes: vec![20_000, 60_000],
                scale_backlog: 5_000,
                verify_sizes: vec![20_000],
                reductions: Vec::new(),
                peers,
                gauge_sizes: vec![10_000, 100_000],
            }
        } else {
            // The target sizes: rebuilds of 1,000,000 events, `--runs` times in each mode
            // (about 7 of the 13 minutes here since the rebuild writes in parallel).
            // `--rebuild-on-big no` runs them on the drain dataset instead, with one
            // `--truncate` of the 1,000,000-event library for the queries.
            Plan {
                quick,
                runs,
                small: 200_000,
                big: 1_000_000,
                grid: 40_000,
                latency_seconds: 10.0,
                queries: 200,
                rebuild_on_big: true,
                only: None,
                scale_sizes: vec![1_000_000, 3_000_000, 10_000_000],
                scale_backlog: 40_000,
                verify_sizes: vec![1_000_000],
                reductions: vec![
                    "rebuild --truncate and --swap: their runs use the 200,000-event drain dataset (the \
                     raw limits were measured on the same events); the 1,000,000-event library is rebuilt \
                     once (`--truncate`, for the queries): `--rebuild-on-big no`"
                        .into(),
                    "drain grid: one run per point on 40,000 events; the best point is then run on the full \
                     drain dataset"
                        .into(),
                ],
                peers,
                gauge_sizes: vec![10_000, 1_000_000, 10_000_000],
            }
        };
        for (k, v) in overrides {
            let num = || v.replace('_', "").parse::<u64>().map_err(|_| format!("invalid {k} {v:?}"));
            match k.as_str() {
                "--small" => p.small = num()?,
                "--big" => p.big = num()?,
                "--grid" => p.grid = num()?,
                "--queries" => p.queries = num()? as usize,
                "--latency-seconds" => {
                    p.latency_seconds = v.parse().map_err(|_| format!("invalid {k} {v:?}"))?;
                }
                "--rebuild-on-big" => p.rebuild_on_big = matches!(v.as_str(), "yes" | "true" | "1"),
                "--scale-sizes" | "--verify-sizes" => {
                    let sizes = v
                        .split(',')
                        .map(|s| s.trim().replace('_', "").parse::<u64>().map_err(|_| format!("invalid {k} {v:?}")))
                        .collect::<Res<Vec<u64>>>()?;
                    if k == "--scale-sizes" {
                        p.scale_sizes = sizes;
                    } else {
                        p.verify_sizes = sizes;
                    }
                }
                "--gauge-sizes" => {
                    p.gauge_sizes = v
                        .split(',')
                        .map(|s| s.trim().replace('_', "").parse::<u64>().map_err(|_| format!("invalid {k} {v:?}")))
                        .collect::<Res<Vec<u64>>>()?;
                }
                _ => unreachable!(),
            }
        }
        if p.scale_sizes.is_empty() || p.scale_sizes.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("--scale-sizes must be ascending sizes ({:?})", p.scale_sizes));
        }
        if p.gauge_sizes.is_empty() || p.gauge_sizes.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("--gauge-sizes must be ascending sizes ({:?})", p.gauge_sizes));
        }
        if p.verify_sizes.is_empty() || p.verify_sizes.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("--verify-sizes must be ascending sizes ({:?})", p.verify_sizes));
        }
        if p.scale_sizes[0] <= p.scale_backlog {
            return Err(format!(
                "--scale-sizes: the smallest size must exceed the drain backlog of {} events",
                p.scale_backlog
            ));
        }
        p.only = only;
        if let Some(only) = &p.only {
            p.reductions.push(format!("only these sections: {} (`--only`)", only.join(", ")));
        }
        if p.rebuild_on_big {
            p.reductions.retain(|r| !r.starts_with("rebuild"));
        }
        Ok(p)
    }

    /// The scale section runs only when `--only` names it.
    fn wants_scale(&self) -> bool {
        self.only.as_ref().is_some_and(|o| o.iter().any(|x| x == "scale"))
    }

    /// The gauges section runs only when `--only` names it.
    fn wants_gauges(&self) -> bool {
        self.only.as_ref().is_some_and(|o| o.iter().any(|x| x == "gauges"))
    }

    /// So does the verify section.
    fn wants_verify(&self) -> bool {
        self.only.as_ref().is_some_and(|o| o.iter().any(|x| x == "verify"))
    }
}

// ---------------------------------------------------------------------------------
// The report: one table

#[derive(Debug, Clone, Copy)]
enum Unit {
    Rate,
    Ms,
    Ratio,
    Mb,
    Secs,
    Bytes,
}

#[derive(Debug, Clone, Copy)]
enum Target {
    AtLeast(f64),
    AtMost(f64),
}

#[derive(Debug, Clone)]
struct Row {
    section: &'static str,
    measure: String,
    values: Vec<f64>,
    unit: Unit,
    target: Option<Target>,
    note: String,
}

fn fmt_value(v: f64, unit: Unit) -> String {
    if v.is_nan() {
        return "n/a".into();
    }
    match unit {
        Unit::Rate => format!("{} /s", thousands(v.round() as i64)),
        Unit::Ms => {
            if v < 10.0 {
                format!("{v:.2} ms")
            } else if v < 100.0 {
                format!("{v:.1} ms")
            } else {
                format!("{} ms", thousands(v.round() as i64))
            }
        }
        Unit::Ratio => format!("{v:.2}×"),
        Unit::Mb => format!("{v:.1} MB"),
        Unit::Secs => format!("{v:.1} s"),
        Unit::Bytes => format!("{} B", thousands(v.round() as i64)),
    }
}

fn thousands(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min_of(v: &[f64]) -> f64 {
    v.iter().copied().filter(|x| !x.is_nan()).fold(f64::NAN, f64::min)
}

fn max_of(v: &[f64]) -> f64 {
    v.iter().copied().filter(|x| !x.is_nan()).fold(f64::NAN, f64::max)
}

/// The q-quantile (0..1) of already sorted samples, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The order of the sections in the table (the runs happen in another order, so one
/// dataset serves several sections).
const SECTIONS: &[&str] =
    &["raw limits", "inject", "drain", "memory", "latency", "rebuild", "queries", "scale", "gauges", "verify"];

fn render_table(rows: &[Row]) -> String {
    let mut rows: Vec<&Row> = rows.iter().collect();
    rows.sort_by_key(|r| SECTIONS.iter().position(|s| *s == r.section).unwrap_or(SECTIONS.len()));
    let mut out = String::new();
    out.push_str("| section | measure | median | min | max | runs | target | met | notes |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---|---|---|\n");
    for r in rows {
        let med = median(&r.values);
        let (lo, hi) = if r.values.len() > 1 {
            (fmt_value(min_of(&r.values), r.unit), fmt_value(max_of(&r.values), r.unit))
        } else {
            ("".into(), "".into())
        };
        let (target, met) = match r.target {
            None => (String::new(), String::new()),
            Some(t) => {
                let (text, ok) = match t {
                    Target::AtLeast(x) => (format!("≥ {}", fmt_value(x, r.unit)), med >= x),
                    Target::AtMost(x) => (format!("≤ {}", fmt_value(x, r.unit)), med <= x),
                };
                let met = if med.is_nan() {
                    "n/a"
                } else if ok {
                    "met"
                } else {
                    "**missed**"
                };
                (text, met.to_string())
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.section,
            r.measure,
            fmt_value(med, r.unit),
            lo,
            hi,
            r.values.iter().filter(|v| !v.is_nan()).count(),
            target,
            met,
            r.note.replace('|', "\\|")
        ));
    }
    out
}

// ---------------------------------------------------------------------------------
// Cleanup (end, error, Ctrl+C)

struct Cleanup {
    admin: DbUrl,
    dbname: String,
    children: Vec<u32>,
    logs: PathBuf,
    keep: bool,
}

static CLEANUP: Mutex<Option<Cleanup>> = Mutex::new(None);

fn track_child(pid: u32) {
    if let Ok(mut g) = CLEANUP.lock() {
        if let Some(c) = g.as_mut() {
            c.children.push(pid);
        }
    }
}

fn untrack_child(pid: u32) {
    if let Ok(mut g) = CLEANUP.lock() {
        if let Some(c) = g.as_mut() {
            c.children.retain(|&p| p != pid);
        }
    }
}

/// Kills the workers still running and drops the database. Runs once.
fn cleanup() {
    let taken = CLEANUP.lock().ok().and_then(|mut g| g.take());
    let Some(c) = taken else { return };
    for pid in &c.children {
        let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
    }
    if c.keep {
        eprintln!("bench: kept database {} (--keep)", c.dbname);
        return;
    }
    match chronicle::db::connect(&c.admin) {
        Ok(mut admin) => {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", c.dbname);
            match admin.batch_execute(&sql) {
                Ok(()) => eprintln!("bench: dropped database {}", c.dbname),
                Err(e) => eprintln!("bench: could not drop database {}: {}", c.dbname, e),
            }
        }
        Err(e) => eprintln!("bench: could not connect to drop database {}: {}", c.dbname, e),
    }
    let _ = std::fs::remove_dir_all(&c.logs);
}

// ---------------------------------------------------------------------------------
// The bench context

struct Bench {
    plan: Plan,
    db: DbUrl,
    /// The same database as a libpq key=value string, for the child processes.
    child_url: String,
    logs: PathBuf,
    /// A private copy of the release binary, so a rebuild of `target/` during the run
    /// cannot change what is measured.
    bin: PathBuf,
    started: Instant,
    rows: Vec<Row>,
    notes: Vec<String>,
    listen_flag: bool,
    /// A section stopped on an error after some of its rows were recorded: the report is
    /// printed with them, and the run fails.
    failed: Option<String>,
}

fn main() {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bench: FAILED: {e}");
            1
        }
    };
    cleanup();
    std::process::exit(code);
}

fn run() -> Res<()> {
    let plan = Plan::from_args()?;
    let keep = std::env::args().any(|a| a == "--keep");
    let (raw, origin) = match (std::env::var("BENCH_DATABASE_URL"), std::env::var("DATABASE_URL")) {
        (Ok(u), _) => (u, "BENCH_DATABASE_URL"),
        (_, Ok(u)) => (u, "DATABASE_URL"),
        _ => ("postgres://postgres@127.0.0.1:5432/postgres".to_string(), "the default"),
    };
    let admin = DbUrl::parse(&raw).map_err(|e| format!("{origin} {e}"))?;
    let mut admin_client = chronicle::db::connect(&admin)
        .or_else(|_| chronicle::db::connect(&admin.with_dbname("postgres")))
        .map_err(|e| format!("cannot connect to {admin} ({origin}): {e}"))?;
    let dbname = format!("chronicle_bench_{}", std::process::id());
    let logs = std::env::temp_dir().join(&dbname);
    std::fs::create_dir_all(&logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
    admin_client
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .map_err(|e| format!("cannot create database {dbname}: {}", pg(&e)))?;
    drop(admin_client);
    *CLEANUP.lock().unwrap() =
        Some(Cleanup { admin: admin.clone(), dbname: dbname.clone(), children: Vec::new(), logs: logs.clone(), keep });
    let _ = ctrlc::set_handler(|| {
        eprintln!("bench: interrupted; cleaning up");
        cleanup();
        std::process::exit(130);
    });

    let db = admin.with_dbname(&dbname);
    let child_url = key_value_url(&db.config, &dbname);
    // BENCH_CHRONICLE_BIN: measure another build (an experiment) with the same program.
    let source = std::env::var("BENCH_CHRONICLE_BIN").unwrap_or_else(|_| BIN.to_string());
    let bin = logs.join("chronicle");
    std::fs::copy(&source, &bin).map_err(|e| format!("copying {source}: {e}"))?;
    let mut b = Bench {
        plan,
        db,
        child_url,
        logs,
        bin,
        started: Instant::now(),
        rows: Vec::new(),
        notes: Vec::new(),
        listen_flag: false,
        failed: None,
    };
    b.progress(&format!("database {dbname} created on {admin}; binary {source}"));
    b.chronicle(&["migrate"], &[])?;
    let help = b.chronicle(&["worker", "--help"], &[])?;
    b.listen_flag = help.contains("--listen");

    let header = b.header()?;
    eprintln!("{header}");
    b.all_sections()?;

    let elapsed = b.started.elapsed();
    let mut out = String::new();
    out.push_str(&header);
    out.push('\n');
    out.push_str(&render_table(&b.rows));
    out.push('\n');
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    b.notes.push(format!(
        "Whole run: {:.1} min ({}); load average at the end: {}.",
        elapsed.as_secs_f64() / 60.0,
        if b.plan.wants_scale() || b.plan.wants_gauges() || b.plan.wants_verify() {
            "the scale, gauges and verify sections have no time budget".to_string()
        } else if elapsed <= BUDGET || b.plan.quick {
            "within the 15-minute budget".to_string()
        } else {
            "OVER the 15-minute budget".to_string()
        },
        load_end.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    ));
    for r in &b.plan.reductions {
        out.push_str(&format!("- Reduced: {r}.\n"));
    }
    for n in &b.notes {
        out.push_str(&format!("- {n}\n"));
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
    match b.failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A libpq key=value connection string for `dbname` on the server of `cfg`.
fn key_value_url(cfg: &postgres::Config, dbname: &str) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut parts = Vec::new();
    if let Some(h) = cfg.get_hosts().first() {
        let host = match h {
            postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            postgres::config::Host::Unix(p) => p.to_string_lossy().into_owned(),
        };
        parts.push(format!("host={}", q(&host)));
    }
    if let Some(p) = cfg.get_ports().first() {
        parts.push(format!("port={p}"));
    }
    if let Some(u) = cfg.get_user() {
        parts.push(format!("user={}", q(u)));
    }
    if let Some(pw) = cfg.get_password() {
        parts.push(format!("password={}", q(&String::from_utf8_lossy(pw))));
    }
    parts.push(format!("dbname={}", q(dbname)));
    parts.join(" ")
}

/// What the worker processes of one drain did.
#[derive(Debug, Clone, Copy)]
struct Drain {
    seconds: f64,
    rate: f64,
    peak_rss_mb: f64,
}

/// One configuration of worker processes.
/// The runbook's worker variables: `OUTBOX_BATCH_SIZE=50` and nothing that sets the threads.
const RUNBOOK: Settings = Settings { batch: 50, threads: 0, procs: 1 };

#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    batch: u32,
    /// `OUTBOX_CONCURRENCY`; 0 leaves it unset (the worker's default, from the machine).
    threads: u32,
    procs: u32,
}

impl Settings {
    fn label(&self) -> String {
        if self.threads == 0 {
            let n = chronicle::config::default_concurrency();
            format!(
                "batch {} × the default threads ({n} here){}",
                self.batch,
                if self.procs > 1 { format!(" × {} processes", self.procs) } else { String::new() }
            )
        } else if self.procs > 1 {
            format!("batch {} × {} threads × {} processes", self.batch, self.threads, self.procs)
        } else {
            format!("batch {} × {} thread{}", self.batch, self.threads, if self.threads == 1 { "" } else { "s" })
        }
    }
}

impl Bench {
    fn progress(&self, msg: &str) {
        eprintln!("[{:>7.1}s] {msg}", self.started.elapsed().as_secs_f64());
    }

    fn connect(&self) -> Res<Client> {
        chronicle::db::connect(&self.db).map_err(|e| format!("cannot connect to the bench database: {e}"))
    }

    fn sql(&self, c: &mut Client, sql: &str) -> Res<()> {
        c.batch_execute(sql).map_err(|e| format!("{}: {}", first_line(sql), pg(&e)))
    }

    fn count(&self, c: &mut Client, sql: &str) -> Res<i64> {
        c.query_one(sql, &[]).and_then(|r| r.try_get(0)).map_err(|e| format!("{}: {}", first_line(sql), pg(&e)))
    }

    /// Runs `chronicle args` to completion with the bench database; returns its stdout.
    fn chronicle(&self, args: &[&str], env: &[(&str, &str)]) -> Res<String> {
        self.chronicle_polled(args, env, false).map(|(out, _)| out)
    }

    /// `chronicle`, and with `poll` the process's peak RSS in kB (its VmHWM polled every
    /// 20 ms, the last value read, as `drain` does); 0 without.
    fn chronicle_polled(&self, args: &[&str], env: &[(&str, &str)], poll: bool) -> Res<(String, u64)> {
        let log = self.logs.join(format!("{}.log", args.first().unwrap_or(&"chronicle")));
        let mut cmd = self.command(args, env, &log)?;
        cmd.stdout(Stdio::piped());
        let child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        let (out, peak_kb) = wait_polled(child, poll);
        let out = out.map_err(|e| format!("waiting for chronicle {args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!("chronicle {} failed ({}): {}", args.join(" "), out.status, tail(&log)));
        }
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), peak_kb))
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)], log: &Path) -> Res<Command> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("OUTBOX_") || k.starts_with("CHRONICLE_") || k == "DATABASE_URL" || k == "RUST_LOG" {
                cmd.env_remove(&k);
            }
        }
        cmd.env("DATABASE_URL", &self.child_url);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let f = std::fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(f);
        Ok(cmd)
    }

    fn json(&self, args: &[&str]) -> Res<serde_json::Value> {
        let out = self.chronicle(args, &[])?;
        parse_json_line(args, &out)
    }

    /// `json`, with the process's peak RSS in MB.
    fn json_with_peak(&self, args: &[&str]) -> Res<(serde_json::Value, f64)> {
        let (out, kb) = self.chronicle_polled(args, &[], true)?;
        Ok((parse_json_line(args, &out)?, kb as f64 / 1024.0))
    }
}

/// The last non-empty line of a command's stdout, as JSON.
fn parse_json_line(args: &[&str], out: &str) -> Res<serde_json::Value> {
    let line = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(line).map_err(|e| format!("chronicle {}: not JSON ({e}): {out}", args.join(" ")))
}

impl Bench {
    fn header(&self) -> Res<String> {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let mem_kb: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0.0);
        let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut c = self.connect()?;
        let version: String = c.query_one("SELECT version()", &[]).and_then(|r| r.try_get(0)).map_err(|e| pg(&e))?;
        let settings = c
            .query(
                "SELECT name, setting, coalesce(unit, '') FROM pg_settings WHERE name IN ('shared_buffers', \
                 'synchronous_commit', 'fsync', 'wal_level', 'max_wal_size', 'checkpoint_timeout', 'work_mem', \
                 'maintenance_work_mem', 'full_page_writes', 'max_connections') ORDER BY name",
                &[],
            )
            .map_err(|e| pg(&e))?;
        let settings: Vec<String> = settings
            .iter()
            .map(|r| {
                let (n, s, u): (String, String, String) = (r.get(0), r.get(1), r.get(2));
                format!("{n}={}", human_setting(&s, &u))
            })
            .collect();
        let p = &self.plan;
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let code = match git(&["rev-parse", "--short", "HEAD"]) {
            Some(sha) => {
                let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
                format!("git {sha}{}", if dirty { " with uncommitted changes" } else { "" })
            }
            None => "unknown".into(),
        };
        let code = match std::env::var("BENCH_CHRONICLE_BIN") {
            Ok(other) => format!("the binary {other} (BENCH_CHRONICLE_BIN), benchmark program from {code}"),
            Err(_) => code,
        };
        Ok(format!(
            "## chronicle benchmark{}\n\n\
             - command: `cargo bench --bench bench{}` (runs per figure: {}); code: {code}\n\
             - machine: {nproc} CPUs ({cpu}), {:.1} GiB RAM, Linux {}; load average at start: {}\n\
             - server: {}\n\
             - settings: {}\n\
             - sizes: drain dataset {} events (3 libraries), one-library dataset {} events, grid {} events per point, \
             latency {} s at 1,000 events/s, {} queries per run and kind{}\n",
            if p.quick { " (quick)" } else { "" },
            {
                let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
                if args.is_empty() {
                    String::new()
                } else {
                    format!(" -- {}", args.join(" "))
                }
            },
            p.runs,
            mem_kb / 1024.0 / 1024.0,
            kernel.trim(),
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            version,
            settings.join(", "),
            thousands(p.small as i64),
            thousands(p.big as i64),
            thousands(p.grid as i64),
            p.latency_seconds,
            p.queries,
            if p.wants_scale() {
                format!(
                    "; scale: {} events, drain backlog {} deliveries",
                    p.scale_sizes.iter().map(|n| thousands(*n as i64)).collect::<Vec<_>>().join(" → "),
                    thousands(p.scale_backlog as i64)
                )
            } else {
                String::new()
            }
        ))
    }

    fn push(
        &mut self,
        section: &'static str,
        measure: impl Into<String>,
        values: Vec<f64>,
        unit: Unit,
        target: Option<Target>,
        note: impl Into<String>,
    ) {
        let row = Row { section, measure: measure.into(), values, unit, target, note: note.into() };
        self.progress(&format!(
            "= {} / {}: median {} (min {}, max {})",
            row.section,
            row.measure,
            fmt_value(median(&row.values), row.unit),
            fmt_value(min_of(&row.values), row.unit),
            fmt_value(max_of(&row.values), row.unit)
        ));
        self.rows.push(row);
    }

    // -----------------------------------------------------------------------------
    // The order of the sections: the small dataset serves inject, raw limits, drains,
    // latency (and rebuilds unless on the big one); one inject of the big dataset serves
    // the large rebuild and the queries. The scale section, last, starts from an empty
    // database of its own.

    fn all_sections(&mut self) -> Res<()> {
        let wants = |s: &str| self.plan.only.as_ref().is_none_or(|o| o.iter().any(|x| x == s));
        let (drain, rebuild, latency, queries) = (wants("drain"), wants("rebuild"), wants("latency"), wants("queries"));
        if self.plan.peers && !drain {
            self.notes.push("--peers: the peer runs beside the drain section, which did not run.".into());
        }
        if wants("memory") {
            self.memory_section()?;
        }
        if drain || rebuild || latency || queries {
            self.dataset_sections(drain, rebuild, latency, queries)?;
        }
        if self.plan.wants_scale() {
            self.scale_section()?;
        }
        if self.plan.wants_gauges() {
            self.gauges_section()?;
        }
        if self.plan.wants_verify() {
            self.verify_section()?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------
    // verify: the full content check

    /// One database grown through `verify_sizes`: at each size the new events are
    /// injected, the read model built by `rebuild --truncate` (timed, the reference), then
    /// `verify` runs `runs` times (the full content check: every entry re-projected and
    /// compared column by column), and `verify --sample 1000` once.
    fn verify_section(&mut self) -> Res<()> {
        self.reset_all()?;
        let mut have = 0u64;
        for (index, n) in self.plan.verify_sizes.clone().into_iter().enumerate() {
            self.inject(n - have, 5, 90_001 + index as u64)?;
            have = n;
            let mut c = self.connect()?;
            self.sql(&mut c, "TRUNCATE chronicle_outbox_events")?;
            let size = thousands(self.count(&mut c, "SELECT count(*) FROM chronicle_events")?);
            self.checkpoint(&mut c);
            let v = self.json(&["rebuild", "--truncate", "--json"])?;
            let rebuild_rate =
                v["events_total"].as_f64().unwrap_or(f64::NAN) / v["seconds"].as_f64().unwrap_or(f64::NAN);
            self.progress(&format!("verify: {size} events rebuilt at {rebuild_rate:.0} events/s"));
            self.sql(&mut c, "VACUUM ANALYZE chronicle_events, chronicle_entries")?;
            let (mut rates, mut peaks) = (Vec::new(), Vec::new());
            for run in 0..self.plan.runs {
                self.checkpoint(&mut c);
                let started = Instant::now();
                let (v, peak_mb) = self.json_with_peak(&["verify", "--json"])?;
                let secs = started.elapsed().as_secs_f64();
                let compared = v["compared"]["entries"].as_f64().unwrap_or(f64::NAN);
                self.progress(&format!(
                    "verify run {}: {compared} entries compared in {secs:.1} s, peak RSS {peak_mb:.1} MB",
                    run + 1
                ));
                rates.push(compared / secs);
                peaks.push(peak_mb);
            }
            self.push(
                "verify",
                format!("`verify` (full content check), {size} events"),
                rates,
                Unit::Rate,
                None,
                "entries compared (`compared.entries`) ÷ the process's wall time, presence checks included",
            );
            self.push(
                "verify",
                format!("`verify` peak RSS, {size} events"),
                peaks,
                Unit::Mb,
                None,
                "/proc/<pid>/status VmHWM polled every 20 ms",
            );
            self.push(
                "verify",
                format!("`rebuild --truncate`, the same {size} events"),
                vec![rebuild_rate],
                Unit::Rate,
                None,
                "`rebuild --json` events_total ÷ seconds: the reference",
            );
            self.checkpoint(&mut c);
            let started = Instant::now();
            self.json(&["verify", "--sample", "1000", "--json"])?;
            self.push(
                "verify",
                format!("`verify --sample 1000`, {size} events"),
                vec![started.elapsed().as_secs_f64()],
                Unit::Secs,
                None,
                "wall time: the presence checks and 1,000 entries drawn at random",
            );
        }
        Ok(())
    }

    fn dataset_sections(&mut self, drain: bool, rebuild: bool, latency: bool, queries: bool) -> Res<()> {
        let (small, big) = (self.plan.small, self.plan.big);
        self.inject_section()?;
        let raw_small =
            if drain || (rebuild && !self.plan.rebuild_on_big) { self.raw_section()? } else { (f64::NAN, f64::NAN) };
        if drain {
            self.drain_section(raw_small)?;
        }
        // Before the latency test, which adds its events to the dataset.
        if rebuild && !self.plan.rebuild_on_big {
            self.rebuild_section(small, raw_small.0, self.plan.runs, true)?;
        }
        if latency {
            if !drain {
                // The drains leave every delivery done and the entries built; do the same.
                self.json(&["rebuild", "--truncate", "--json"])?;
                let mut c = self.connect()?;
                self.sql(&mut c, "TRUNCATE chronicle_outbox_events")?;
            }
            self.latency_section()?;
        }
        if !(queries || (rebuild && self.plan.rebuild_on_big)) {
            return Ok(());
        }
        // The one-library dataset.
        self.reset_all()?;
        let t = self.inject(big, 1, 7_000_001)?;
        self.push(
            "inject",
            format!("inject {} events, 1 library (`--count {big} --libraries 1`)", thousands(big as i64)),
            vec![big as f64 / t],
            Unit::Rate,
            Some(Target::AtLeast(50_000.0)),
            format!("{t:.1} s; the dataset of the sections below"),
        );
        let mut c = self.connect()?;
        // The deliveries the trigger made are not needed: the rebuilds project directly.
        self.sql(&mut c, "TRUNCATE chronicle_outbox_events")?;
        if self.plan.rebuild_on_big {
            let raw_big = self.raw_section()?;
            self.rebuild_section(big, raw_big.0, self.plan.runs, true)?;
        } else {
            // One `--truncate` builds what the queries read.
            self.rebuild_section(big, f64::NAN, 1, false)?;
        }
        self.query_section()?;
        Ok(())
    }

    /// Empties the three tables (the events too: this is our own throwaway database).
    fn reset_all(&self) -> Res<()> {
        let mut c = self.connect()?;
        self.sql(
            &mut c,
            // The benchmark's own database: TRUNCATE of the events is refused to everyone
            // (no trigger could audit it), so the owner lifts the table's triggers for the
            // length of this transaction.
            "TRUNCATE chronicle_entries, chronicle_outbox_events;
             BEGIN;
             ALTER TABLE chronicle_events DISABLE TRIGGER USER;
             TRUNCATE chronicle_events;
             ALTER TABLE chronicle_events ENABLE TRIGGER USER;
             COMMIT;
             DROP TABLE IF EXISTS bench_raw_entries, bench_raw_entries2;",
        )?;
        self.sql(&mut c, "VACUUM ANALYZE chronicle_events, chronicle_entries, chronicle_outbox_events")?;
        self.checkpoint(&mut c);
        Ok(())
    }

    /// Starts each timed run from the same state: dirty buffers written out.
    fn checkpoint(&self, c: &mut Client) {
        let _ = c.batch_execute("CHECKPOINT");
    }

    fn inject(&self, count: u64, libraries: u64, seed: u64) -> Res<f64> {
        let (count_s, lib_s, seed_s) = (count.to_string(), libraries.to_string(), seed.to_string());
        let v = self.json(&["inject", "--count", &count_s, "--libraries", &lib_s, "--seed", &seed_s, "--json"])?;
        v["seconds"].as_f64().ok_or_else(|| format!("inject printed no seconds: {v}"))
    }

    // -----------------------------------------------------------------------------
    // inject

    fn inject_section(&mut self) -> Res<()> {
        let n = self.plan.small;
        let mut rates = Vec::new();
        for run in 0..self.plan.runs {
            self.reset_all()?;
            let t = self.inject(n, 3, 1_000 + run as u64)?;
            self.progress(&format!("inject run {}: {n} events in {t:.2} s", run + 1));
            rates.push(n as f64 / t);
        }
        self.push(
            "inject",
            format!("inject {} events (COPY + enqueue trigger, one transaction)", thousands(n as i64)),
            rates,
            Unit::Rate,
            Some(Target::AtLeast(50_000.0)),
            "`chronicle inject --json` seconds (connect to commit); the last run's events serve the drains",
        );
        Ok(())
    }

    // -----------------------------------------------------------------------------
    // raw limits

    /// (a) entries built in SQL from the events, (b) finished entries copied; returns
    /// the medians of (a) in events/s and (b) in rows/s.
    fn raw_section(&mut self) -> Res<(f64, f64)> {
        let mut c = self.connect()?;
        let events = self.count(&mut c, "SELECT count(*) FROM chronicle_events")?;
        self.sql(
            &mut c,
            "DROP TABLE IF EXISTS bench_raw_entries, bench_raw_entries2;
             CREATE TABLE bench_raw_entries (LIKE chronicle_entries INCLUDING ALL);
             CREATE TABLE bench_raw_entries2 (LIKE chronicle_entries INCLUDING ALL);",
        )?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for run in 0..self.plan.runs {
            self.sql(&mut c, "TRUNCATE bench_raw_entries, bench_raw_entries2")?;
            self.checkpoint(&mut c);
            let t = Instant::now();
            let build = format!("INSERT INTO bench_raw_entries ({ENTRY_COLUMNS}) {RAW_ROWS}");
            let written = c.execute(&build, &[]).map_err(|e| format!("raw INSERT … SELECT: {}", pg(&e)))?;
            let ta = t.elapsed().as_secs_f64();
            self.checkpoint(&mut c);
            let t = Instant::now();
            let copied = c
                .execute("INSERT INTO bench_raw_entries2 SELECT * FROM bench_raw_entries", &[])
                .map_err(|e| format!("raw INSERT SELECT *: {}", pg(&e)))?;
            let tb = t.elapsed().as_secs_f64();
            self.progress(&format!(
                "raw run {}: (a) {written} rows in {ta:.2} s, (b) {copied} rows in {tb:.2} s",
                run + 1
            ));
            a.push(written as f64 / ta);
            b.push(copied as f64 / tb);
        }
        let lexemes: f64 = c
            .query_one("SELECT coalesce(avg(length(search)), 0)::float8 FROM bench_raw_entries", &[])
            .and_then(|r| r.try_get(0))
            .unwrap_or(f64::NAN);
        let size = thousands(events);
        let (med_a, med_b) = (median(&a), median(&b));
        self.push(
            "raw limits",
            format!("(a) `INSERT … SELECT` building the entries in SQL, {size} events"),
            a,
            Unit::Rate,
            None,
            format!(
                "same columns and indexes (`LIKE chronicle_entries INCLUDING ALL`), summary via format()/CASE, \
                 to_tsvector('simple') of summary+names+texts (no CJK bigrams: {lexemes:.1} lexemes/row)"
            ),
        );
        self.push(
            "raw limits",
            format!("(b) `INSERT INTO t2 SELECT * FROM` (a): finished entries written, {size} rows"),
            b,
            Unit::Rate,
            None,
            "rows/s; the cost of the table and its 6 indexes alone",
        );
        self.sql(&mut c, "DROP TABLE IF EXISTS bench_raw_entries, bench_raw_entries2")?;
        Ok((med_a, med_b))
    }

    /// (c) the drain's own finished entries (what `chronicle_entries` holds after a drain
    /// of the whole dataset) copied into a table with the same indexes: the raw cost of
    /// the writes a drain must make to the read model, with its real search vectors (CJK
    /// bigrams included). (d) those writes and the outbox's two transitions per event that
    /// docs/DESIGN.md §3 asks for, each set-based in one statement of one backend: the
    /// copy of (c), then `pending → processing` (`RAW_CLAIM`) and `processing → done`
    /// (`RAW_DONE`) of one delivery per entry, in a copy of the outbox with its indexes,
    /// filled as the enqueue trigger fills it. (d) is what the contract's writes cost with
    /// no claim statement, no lock, no event read, no client and no second backend.
    /// Returns the medians of (c) and (d) in rows/s.
    fn raw_copy_of_drained_entries(&mut self) -> Res<(f64, f64)> {
        let mut c = self.connect()?;
        let entries = self.count(&mut c, "SELECT count(*) FROM chronicle_entries")?;
        self.sql(
            &mut c,
            "DROP TABLE IF EXISTS bench_raw_copy, bench_raw_outbox;
             CREATE TABLE bench_raw_copy (LIKE chronicle_entries INCLUDING ALL);
             CREATE TABLE bench_raw_outbox (LIKE chronicle_outbox_events INCLUDING ALL);",
        )?;
        let (mut rates, mut with_outbox, mut splits) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..self.plan.runs {
            self.sql(
                &mut c,
                "TRUNCATE bench_raw_copy, bench_raw_outbox;
                 INSERT INTO bench_raw_outbox (event_id) SELECT id FROM chronicle_entries ORDER BY occurred_at, id;",
            )?;
            self.sql(&mut c, "VACUUM ANALYZE bench_raw_outbox")?;
            self.checkpoint(&mut c);
            let timed = |c: &mut Client, what: &str, sql: &str| -> Res<(u64, f64)> {
                let t = Instant::now();
                let n = c.execute(sql, &[]).map_err(|e| format!("raw {what}: {}", pg(&e)))?;
                Ok((n, t.elapsed().as_secs_f64()))
            };
            let (copied, secs) = timed(
                &mut c,
                "copy of the drained entries",
                "INSERT INTO bench_raw_copy SELECT * FROM chronicle_entries",
            )?;
            let (claimed, claim_secs) = timed(&mut c, "claim transition", RAW_CLAIM)?;
            let (done, done_secs) = timed(&mut c, "done transition", RAW_DONE)?;
            if claimed != copied || done != copied {
                return Err(format!(
                    "raw (d): {copied} entries copied but {claimed} deliveries claimed and {done} done"
                ));
            }
            let total = secs + claim_secs + done_secs;
            self.progress(&format!(
                "raw run {}: (c) {copied} rows in {secs:.2} s; (d) + claim {claim_secs:.2} s + done {done_secs:.2} s = {total:.2} s",
                run + 1
            ));
            rates.push(copied as f64 / secs);
            with_outbox.push(copied as f64 / total);
            splits.push((secs, claim_secs, done_secs));
        }
        let lexemes: f64 = c
            .query_one("SELECT coalesce(avg(length(search)), 0)::float8 FROM chronicle_entries", &[])
            .and_then(|r| r.try_get(0))
            .unwrap_or(f64::NAN);
        let (med, med_d) = (median(&rates), median(&with_outbox));
        let split = |i: usize| median(&splits.iter().map(|s| [s.0, s.1, s.2][i]).collect::<Vec<_>>());
        let size = thousands(entries);
        self.push(
            "raw limits",
            format!("(c) `INSERT INTO t2 SELECT * FROM chronicle_entries`: the drain's own finished entries, {size} rows"),
            rates,
            Unit::Rate,
            None,
            format!(
                "rows/s; the entries the best-settings drain wrote ({lexemes:.1} lexemes/row, CJK bigrams included), \
                 copied into a table with the same indexes: the writes a drain must make to the read model, and nothing else"
            ),
        );
        self.push(
            "raw limits",
            format!("(d) (c) and the outbox's two transitions per event, set-based: {size} rows"),
            with_outbox,
            Unit::Rate,
            None,
            format!(
                "rows/s; one backend, three statements: the copy of (c) ({:.2} s), then every delivery of a copy of \
                 the outbox with its indexes `pending → processing` ({:.2} s) and `processing → done` ({:.2} s), the \
                 columns the worker's claim and completion set (medians); no lock, event read or client. (d) ÷ (c) = {:.2}",
                split(0),
                split(1),
                split(2),
                med_d / med
            ),
        );
        self.sql(&mut c, "DROP TABLE IF EXISTS bench_raw_copy, bench_raw_outbox")?;
        Ok((med, med_d))
    }

    // -----------------------------------------------------------------------------
    // drains

    /// Empties the read model and gives `limit` events (all when None) a pending
    /// delivery; the previous drain's done deliveries are removed first.
    fn reset_for_drain(&self, limit: Option<u64>) -> Res<u64> {
        let mut c = self.connect()?;
        self.sql(&mut c, "TRUNCATE chronicle_outbox_events")?;
        match limit {
            None => {
                let v = self.json(&["rebuild", "--truncate", "--emit-outbox", "--json"])?;
                if v["rows_written"].as_i64().unwrap_or(-1) != v["events_total"].as_i64().unwrap_or(-2) {
                    return Err(format!("rebuild --truncate --emit-outbox enqueued fewer than all events: {v}"));
                }
            }
            Some(n) => {
                // The same as `rebuild --truncate --emit-outbox`, for the first n events.
                self.sql(&mut c, "TRUNCATE chronicle_entries")?;
                c.execute(
                    "INSERT INTO chronicle_outbox_events (event_id)
                     SELECT id FROM chronicle_events ORDER BY occurred_at, id LIMIT $1",
                    &[&(n as i64)],
                )
                .map_err(|e| format!("enqueueing {n} events: {}", pg(&e)))?;
            }
        }
        self.sql(&mut c, "VACUUM ANALYZE chronicle_outbox_events, chronicle_entries")?;
        self.checkpoint(&mut c);
        let pending = self.count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'")?;
        Ok(pending as u64)
    }

    /// Runs the worker processes with `--until-empty` until they exit; polls their
    /// VmHWM every 20 ms. Exactly `expect_failed` deliveries may end `failed` (invalid_payload),
    /// the rest must be done.
    fn drain(&self, s: Settings, extra_env: &[(&str, &str)], expect_failed: i64) -> Res<Drain> {
        let mut c = self.connect()?;
        let pending = self.count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'")?;
        let (batch, threads) = (s.batch.to_string(), s.threads.to_string());
        let mut children: Vec<Child> = Vec::new();
        let started = Instant::now();
        for i in 0..s.procs {
            let id = format!("bench-{i}");
            let mut env: Vec<(&str, &str)> =
                vec![("OUTBOX_BATCH_SIZE", &batch), ("OUTBOX_METRICS_PORT", "0"), ("OUTBOX_WORKER_ID", &id)];
            if s.threads > 0 {
                env.push(("OUTBOX_CONCURRENCY", &threads));
            }
            env.extend_from_slice(extra_env);
            let log = self.logs.join(format!("worker-{i}.log"));
            let child = self
                .command(&["worker", "--until-empty"], &env, &log)?
                .spawn()
                .map_err(|e| format!("cannot start the worker: {e}"))?;
            track_child(child.id());
            children.push(child);
        }
        let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
        let hwm = Arc::new(Mutex::new(vec![0u64; pids.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let (hwm, stop, pids) = (hwm.clone(), stop.clone(), pids.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    for (i, pid) in pids.iter().enumerate() {
                        if let Some(kb) = vm_hwm_kb(*pid) {
                            hwm.lock().unwrap()[i] = kb;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let mut failed = None;
        for (i, mut child) in children.into_iter().enumerate() {
            let status = child.wait().map_err(|e| format!("waiting for the worker: {e}"))?;
            untrack_child(child.id());
            if !status.success() {
                failed = Some(format!(
                    "worker {i} exited with {status}: {}",
                    tail(&self.logs.join(format!("worker-{i}.log")))
                ));
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::SeqCst);
        let _ = poller.join();
        if let Some(f) = failed {
            return Err(f);
        }
        let left = self.count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status <> 'done'")?;
        let invalid = self.count(
            &mut c,
            "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'failed' AND error_reason = 'invalid_payload'",
        )?;
        if left != expect_failed || invalid != expect_failed {
            return Err(format!(
                "{left} deliveries not done after the drain ({}), {invalid} failed invalid_payload; expected {expect_failed}",
                s.label()
            ));
        }
        let peak = hwm.lock().unwrap().iter().copied().max().unwrap_or(0);
        Ok(Drain { seconds, rate: pending as f64 / seconds, peak_rss_mb: peak as f64 / 1024.0 })
    }

    // -----------------------------------------------------------------------------
    // memory

    /// The worker's peak RSS (one process, one thread, batch 50) on three heavy backlogs,
    /// each made by SQL from an empty database and drained `--runs` times.
    fn memory_section(&mut self) -> Res<()> {
        // (measure, target MB, the statements that make the backlog, deliveries that fail)
        let cases: [(&str, f64, &str, i64); 3] = [
            (
                "10 events of 100,000 keys in one batch",
                100.0,
                "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
                 SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                        jsonb_build_object('title', 'Old ' || g),
                        (SELECT jsonb_object_agg('key_' || k, 'value number ' || k) FROM generate_series(1, 100000) k)
                          || jsonb_build_object('title', 'New ' || g),
                        now()
                 FROM generate_series(1, 10) g",
                0,
            ),
            (
                "one 50 MB event: failed / invalid_payload",
                40.0,
                "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
                 VALUES (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                         '{\"title\": \"Old\"}', jsonb_build_object('title', 'New', 'text', repeat('x', 50000000)), now())",
                1,
            ),
            (
                "5 × 50 MB in one INSERT, then 100 events: five fail, the rest drains",
                40.0,
                "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
                 SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                        jsonb_build_object('title', 'Old ' || g),
                        jsonb_build_object('title', 'New ' || g, 'text', repeat(md5(g::text), 1562500)), now()
                 FROM generate_series(1, 5) g;
                 INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
                 SELECT gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'BookRenamed',
                        jsonb_build_object('title', 'Old ' || g), jsonb_build_object('title', 'New ' || g), now()
                 FROM generate_series(1, 100) g",
                5,
            ),
        ];
        let settings = Settings { batch: 50, threads: 1, procs: 1 };
        for (measure, target, backlog, failed) in cases {
            let mut peaks = Vec::new();
            let mut seconds = Vec::new();
            for run in 0..self.plan.runs {
                // Earlier events stay (append-only: TRUNCATE is refused); only the new
                // ones are enqueued.
                let mut c = self.connect()?;
                self.sql(&mut c, "TRUNCATE chronicle_entries, chronicle_outbox_events")?;
                self.sql(&mut c, backlog)?;
                self.checkpoint(&mut c);
                let d = self.drain(settings, &[], failed)?;
                self.progress(&format!(
                    "memory: {measure}, run {}: peak RSS {:.1} MB, drained in {:.2} s",
                    run + 1,
                    d.peak_rss_mb,
                    d.seconds
                ));
                peaks.push(d.peak_rss_mb);
                seconds.push(d.seconds);
            }
            self.push(
                "memory",
                format!("worker peak RSS (VmHWM): {measure}"),
                peaks,
                Unit::Mb,
                Some(Target::AtMost(target)),
                format!(
                    "{}; drained in {:.1} s (median); default limits; {failed} failed invalid_payload, the rest done",
                    settings.label(),
                    median(&seconds)
                ),
            );
        }
        Ok(())
    }

    fn drain_runs(&self, s: Settings, extra_env: &[(&str, &str)]) -> Res<Vec<Drain>> {
        (0..self.plan.runs).map(|run| self.drain_run(s, extra_env, run)).collect()
    }

    /// One drain of the whole dataset's backlog.
    fn drain_run(&self, s: Settings, extra_env: &[(&str, &str)], run: usize) -> Res<Drain> {
        let n = self.reset_for_drain(None)?;
        let d = self.drain(s, extra_env, 0)?;
        self.progress(&format!(
            "drain {} run {}: {n} events in {:.2} s = {:.0} events/s, peak RSS {:.1} MB",
            s.label(),
            run + 1,
            d.seconds,
            d.rate,
            d.peak_rss_mb
        ));
        Ok(d)
    }

    fn drain_section(&mut self, raw: (f64, f64)) -> Res<()> {
        let n = thousands(self.plan.small as i64);
        // The runbook's settings (its variables and nothing else: the claim threads are the
        // worker's default), then the same with one thread (the default before it came from
        // the machine); with `--peers`, each run followed by one of the peer's, so that the
        // machine's drift touches all alike.
        let runbook = RUNBOOK;
        let one_thread = Settings { threads: 1, ..RUNBOOK };
        let peer = if self.plan.peers { self.peer_setup() } else { None };
        let mut rb = Vec::new();
        let mut rb1 = Vec::new();
        let mut peer_runs: Vec<Drain> = Vec::new();
        let mut peer_error = None;
        for run in 0..self.plan.runs {
            rb.push(self.drain_run(runbook, &[], run)?);
            rb1.push(self.drain_run(one_thread, &[], run)?.rate);
            if let (Some(p), None) = (&peer, &peer_error) {
                match self.peer_run(p, self.plan.small, run) {
                    Ok(d) => peer_runs.push(d),
                    Err(e) => peer_error = Some(e),
                }
            }
        }
        let rb_rates: Vec<f64> = rb.iter().map(|d| d.rate).collect();
        let rb_rss: Vec<f64> = rb.iter().map(|d| d.peak_rss_mb).collect();

        // The grid, one run per point on fewer events.
        let mut grid: Vec<(Settings, f64)> = Vec::new();
        // Peak RSS of each grid point: "best" is the fastest point within the memory target.
        let mut grid_rss: Vec<f64> = Vec::new();
        for batch in [200, 500, 1000] {
            for threads in [1, 2, 4] {
                let s = Settings { batch, threads, procs: 1 };
                let pending = self.reset_for_drain(Some(self.plan.grid))?;
                let d = self.drain(s, &[], 0)?;
                self.progress(&format!(
                    "grid {}: {pending} events in {:.2} s = {:.0} events/s",
                    s.label(),
                    d.seconds,
                    d.rate
                ));
                grid.push((s, d.rate));
                grid_rss.push(d.peak_rss_mb);
            }
        }
        // Scaling out: 1, 2 and 4 worker processes of one thread, and 2 × 2, at the best
        // batch.
        let best_batch = grid.iter().max_by(|a, b| a.1.partial_cmp(&b.1).unwrap()).map(|g| g.0.batch).unwrap_or(500);
        let mut scaling: Vec<(Settings, f64)> =
            grid.iter().filter(|(s, _)| s.batch == best_batch && s.threads == 1).copied().collect();
        for (threads, procs) in [(1, 2), (1, 4), (2, 2)] {
            let s = Settings { batch: best_batch, threads, procs };
            let pending = self.reset_for_drain(Some(self.plan.grid))?;
            let d = self.drain(s, &[], 0)?;
            self.progress(&format!(
                "grid {}: {pending} events in {:.2} s = {:.0} events/s",
                s.label(),
                d.seconds,
                d.rate
            ));
            grid.push((s, d.rate));
            grid_rss.push(d.peak_rss_mb);
            scaling.push((s, d.rate));
        }
        let fastest = grid.iter().max_by(|a, b| a.1.partial_cmp(&b.1).unwrap()).map(|g| g.0).unwrap();
        // Within the memory target, the fastest point; of the points within 3 % of it
        // (one grid run's noise), the one using the least memory.
        let feasible: Vec<(Settings, f64, f64)> = grid
            .iter()
            .zip(&grid_rss)
            .filter(|(_, rss)| **rss <= RSS_TARGET_MB)
            .map(|((s, r), rss)| (*s, *r, *rss))
            .collect();
        let top = feasible.iter().map(|f| f.1).fold(f64::NAN, f64::max);
        let best = feasible
            .iter()
            .filter(|f| f.1 >= 0.97 * top)
            .min_by(|a, b| a.2.partial_cmp(&b.2).unwrap())
            .map(|f| f.0)
            .unwrap_or(fastest);
        let one = scaling.first().map(|s| s.1).unwrap_or(f64::NAN);
        let scaling_text: Vec<String> = scaling
            .iter()
            .map(|(s, r)| format!("{}: {} ({:.2}×)", s.label(), thousands(r.round() as i64), r / one))
            .collect();
        self.push(
            "drain",
            format!("scaling out at batch {best_batch}: rate with 4 processes × 1 thread ÷ 1 process"),
            vec![scaling.iter().find(|(s, _)| s.procs == 4).map(|s| s.1 / one).unwrap_or(f64::NAN)],
            Unit::Ratio,
            None,
            format!(
                "1 run of {} events each, events/s (× one process): {}",
                thousands(self.plan.grid as i64),
                scaling_text.join("; ")
            ),
        );

        let bd = self.drain_runs(best, &[])?;
        let (raw_copy, raw_writes) = self.raw_copy_of_drained_entries()?;
        let best_rates: Vec<f64> = bd.iter().map(|d| d.rate).collect();
        let best_rss: Vec<f64> = bd.iter().map(|d| d.peak_rss_mb).collect();

        let (rb_med, best_med) = (median(&rb_rates), median(&best_rates));
        self.push(
            "drain",
            format!("runbook settings ({}, `--until-empty`), {n} events", runbook.label()),
            rb_rates,
            Unit::Rate,
            None,
            "wall time from start to exit of `chronicle worker --until-empty`: the runbook's variables, no other",
        );
        let rb1_med = median(&rb1);
        self.push(
            "drain",
            format!("runbook settings with `OUTBOX_CONCURRENCY=1`, {n} events"),
            rb1,
            Unit::Rate,
            None,
            format!(
                "diagnostic: one claim thread, the default until it came from the machine; the default drains {:.2} × this",
                rb_med / rb1_med
            ),
        );
        self.push(
            "drain",
            "runbook settings ÷ raw (a)",
            vec![rb_med / raw.0],
            Unit::Ratio,
            Some(Target::AtLeast(0.25)),
            "ratio of the medians",
        );
        if let Some(p) = &peer {
            self.push_peer_rows(p, &peer_runs, rb_med);
        }
        if let Some(e) = peer_error {
            // The chronicle figures stand; the run still fails, as for any section's error.
            self.notes.push(format!("--peers: graphile-worker stopped after {} run(s): {e}", peer_runs.len()));
            self.failed.get_or_insert(format!("--peers: {e}"));
        }
        let grid_text: Vec<String> = grid
            .iter()
            .zip(&grid_rss)
            .map(|((s, r), rss)| format!("{}: {} ({rss:.1} MB)", s.label(), thousands(r.round() as i64)))
            .collect();
        self.push(
            "drain",
            format!("best settings ({}), {n} events", best.label()),
            best_rates,
            Unit::Rate,
            Some(Target::AtLeast(14_000.0)),
            format!(
                "of the grid points within {RSS_TARGET_MB} MB peak RSS, the one using the least memory among those within 3 % of the fastest{}; grid, 1 run of {} events each, events/s (peak RSS): {}",
                if fastest != best { format!(" (the fastest of all: {})", fastest.label()) } else { String::new() },
                thousands(self.plan.grid as i64),
                grid_text.join("; ")
            ),
        );
        self.push(
            "drain",
            "best settings ÷ raw (a)",
            vec![best_med / raw.0],
            Unit::Ratio,
            Some(Target::AtLeast(0.5)),
            "ratio of the medians",
        );
        self.push(
            "drain",
            "best settings ÷ raw (b)",
            vec![best_med / raw.1],
            Unit::Ratio,
            None,
            "ratio of the medians (raw (b) copies (a)'s rows: fewer lexemes than the drain's entries)",
        );
        self.push(
            "drain",
            "best settings ÷ raw (c)",
            vec![best_med / raw_copy],
            Unit::Ratio,
            Some(Target::AtLeast(0.7)),
            "ratio of the medians: the drain against writing its own finished entries",
        );
        self.push(
            "drain",
            "best settings ÷ raw (d)",
            vec![best_med / raw_writes],
            Unit::Ratio,
            None,
            "ratio of the medians: the drain on every core against one backend making the same writes set-based",
        );
        self.push(
            "drain",
            "runbook settings ÷ raw (c)",
            vec![rb_med / raw_copy],
            Unit::Ratio,
            None,
            "ratio of the medians",
        );
        self.push(
            "memory",
            "worker peak RSS (VmHWM), runbook settings",
            rb_rss,
            Unit::Mb,
            Some(Target::AtMost(RSS_TARGET_MB)),
            "/proc/<pid>/status VmHWM polled every 20 ms during the drain",
        );
        self.push(
            "memory",
            format!("worker peak RSS (VmHWM), best settings ({})", best.label()),
            best_rss,
            Unit::Mb,
            Some(Target::AtMost(RSS_TARGET_MB)),
            if best.procs > 1 { "the larger of the processes" } else { "" },
        );
        if self.listen_flag {
            // Diagnostic: the same best settings without the listener thread.
            let d = self.drain_runs(best, &[("OUTBOX_LISTEN", "off")])?;
            self.push(
                "drain",
                format!("best settings with `OUTBOX_LISTEN=off`, {n} events"),
                d.iter().map(|d| d.rate).collect(),
                Unit::Rate,
                None,
                "diagnostic: the same drain without the listener thread",
            );
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------
    // latency

    fn latency_section(&mut self) -> Res<()> {
        let secs = self.plan.latency_seconds;
        for listen in [true, false] {
            let label = if listen { "listener (default)" } else { "polling only (OUTBOX_LISTEN=off, poll 0.2 s)" };
            if !listen && !self.listen_flag {
                self.push(
                    "latency",
                    format!("p99, {label}"),
                    vec![f64::NAN],
                    Unit::Ms,
                    Some(Target::AtMost(20.0)),
                    "not available: `chronicle worker --help` shows no --listen",
                );
                continue;
            }
            let (mut p50, mut p99, mut max, mut rates) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for run in 0..self.plan.runs {
                let r = self.latency_run(listen, secs, 9_000 + run as u64 + if listen { 0 } else { 100 })?;
                self.progress(&format!(
                    "latency {label} run {}: {} events at {:.0}/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                    run + 1,
                    r.events,
                    r.write_rate,
                    r.p50,
                    r.p99,
                    r.max
                ));
                p50.push(r.p50);
                p99.push(r.p99);
                max.push(r.max);
                rates.push(r.write_rate);
            }
            let note = format!(
                "entry.projected_at − event.created_at, both the server's clock; projected_at is the start of the \
                 worker's completing transaction (its commit is not included); runbook settings ({}); \
                 {secs} s of 10 events per INSERT every 10 ms (achieved {:.0} events/s)",
                RUNBOOK.label(),
                median(&rates)
            );
            self.push("latency", format!("p50, {label}"), p50, Unit::Ms, None, "");
            self.push(
                "latency",
                format!("p99, {label}"),
                p99,
                Unit::Ms,
                if listen { Some(Target::AtMost(20.0)) } else { None },
                note,
            );
            self.push("latency", format!("max, {label}"), max, Unit::Ms, None, "");
        }
        Ok(())
    }

    fn latency_run(&self, listen: bool, secs: f64, seed: u64) -> Res<LatencyRun> {
        let mut c = self.connect()?;
        let left = self
            .count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status IN ('pending', 'processing')")?;
        if left != 0 {
            return Err(format!("{left} deliveries pending before the latency test"));
        }
        // The sections before leave gigabytes of WAL behind: without this a WAL-triggered
        // checkpoint starts during the run, and its full-page writes are what the tail
        // then measures (max 60–120 ms seen), not the worker.
        self.checkpoint(&mut c);
        let mut env: Vec<(&str, &str)> = vec![("OUTBOX_METRICS_PORT", "0"), ("OUTBOX_WORKER_ID", "bench-latency")];
        if !listen {
            env.push(("OUTBOX_LISTEN", "off"));
            env.push(("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"));
        }
        let log = self.logs.join("worker-latency.log");
        let mut child =
            self.command(&["worker"], &env, &log)?.spawn().map_err(|e| format!("cannot start the worker: {e}"))?;
        track_child(child.id());
        let result = self.latency_with_worker(&mut c, &mut child, listen, secs, seed);
        // SIGTERM: the worker finishes its batch and exits 0.
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        untrack_child(child.id());
        result.map_err(|e| format!("{e} (worker log: {})", tail(&log)))
    }

    fn latency_with_worker(
        &self,
        c: &mut Client,
        child: &mut Child,
        listen: bool,
        secs: f64,
        seed: u64,
    ) -> Res<LatencyRun> {
        // Ready: the claim connections are open (and the listener listens).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let claimers = self.count(
                c,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'chronicle worker%'",
            )?;
            let listening = self.count(
                c,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN chronicle_outbox%'",
            )?;
            if claimers > 0 && (!listen || listening > 0) {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("the worker exited early ({st})"));
            }
            if Instant::now() > deadline {
                return Err("the worker did not get ready within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));

        // The writer: 10 events per INSERT every 10 ms, on an absolute schedule.
        let total = (secs * 1000.0).round() as u64;
        let mut writer = self.connect()?;
        let mut gen = Generator::new(seed, 3, total);
        let mut ids: Vec<Uuid> = Vec::with_capacity(total as usize);
        let start = Instant::now();
        let mut tick = 0u32;
        loop {
            let batch: Vec<_> = gen.by_ref().take(10).collect();
            if batch.is_empty() {
                break;
            }
            let due = start + Duration::from_millis(10) * tick;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            tick += 1;
            insert_events(&mut writer, &batch)?;
            ids.extend(batch.iter().filter_map(|e| e.id));
        }
        let write_rate = ids.len() as f64 / start.elapsed().as_secs_f64();

        // Wait for every entry.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let n: i64 = c
                .query_one("SELECT count(*) FROM chronicle_entries WHERE id = ANY($1)", &[&ids])
                .and_then(|r| r.try_get(0))
                .map_err(|e| pg(&e))?;
            if n as usize >= ids.len() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("only {n} of {} entries after 120 s", ids.len()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut lat: Vec<f64> = c
            .query(
                "SELECT (extract(epoch FROM en.projected_at - ev.created_at) * 1000)::float8
                 FROM chronicle_events ev JOIN chronicle_entries en ON en.id = ev.id WHERE ev.id = ANY($1)",
                &[&ids],
            )
            .map_err(|e| pg(&e))?
            .iter()
            .map(|r| r.get::<_, f64>(0))
            .collect();
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Ok(LatencyRun {
            events: lat.len(),
            write_rate,
            p50: quantile(&lat, 0.50),
            p99: quantile(&lat, 0.99),
            max: lat.last().copied().unwrap_or(f64::NAN),
        })
    }

    // -----------------------------------------------------------------------------
    // rebuild

    fn rebuild_section(&mut self, n: u64, raw: f64, runs: usize, swap: bool) -> Res<()> {
        let mut c = self.connect()?;
        let events = self.count(&mut c, "SELECT count(*) FROM chronicle_events")?;
        if events as u64 != n {
            self.progress(&format!("rebuild: {events} events in the dataset (planned {n})"));
        }
        let size = thousands(events);
        let lib: Uuid = c
            .query_one("SELECT library_id FROM chronicle_events GROUP BY 1 ORDER BY count(*) DESC LIMIT 1", &[])
            .and_then(|r| r.try_get(0))
            .map_err(|e| pg(&e))?;
        let lib_events =
            self.count(&mut c, &format!("SELECT count(*) FROM chronicle_events WHERE library_id = '{lib}'"))?;
        {
            let mut rates = Vec::new();
            for run in 0..runs {
                self.checkpoint(&mut c);
                let v = self.json(&["rebuild", "--truncate", "--json"])?;
                let secs = v["seconds"].as_f64().unwrap_or(f64::NAN);
                let total = v["events_total"].as_f64().unwrap_or(f64::NAN);
                self.progress(&format!("rebuild --truncate run {}: {total} events in {secs:.2} s", run + 1));
                rates.push(total / secs);
            }
            let med = median(&rates);
            self.push(
                "rebuild",
                format!("`rebuild --truncate`, {size} events"),
                rates,
                Unit::Rate,
                None,
                "`rebuild --json` seconds",
            );
            if !raw.is_nan() {
                self.push(
                    "rebuild",
                    "`rebuild --truncate` ÷ raw (a)",
                    vec![med / raw],
                    Unit::Ratio,
                    Some(Target::AtLeast(0.8)),
                    "ratio of the medians, same events",
                );
            }
        }
        if !swap {
            return Ok(());
        }
        // --swap, with a reader paging the largest library's timeline meanwhile.
        let (mut rates, mut lock_ms, mut reader_max, mut reader_p99, mut queries, mut errors) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0usize, 0usize);
        // The swap replaces an existing table: make sure there is one to replace.
        let have = self.count(&mut c, "SELECT count(*) FROM chronicle_entries")?;
        if have == 0 {
            self.progress("swap: the read model is empty; filling it first with `rebuild --truncate`");
            self.json(&["rebuild", "--truncate", "--json"])?;
        }
        self.sql(&mut c, "VACUUM ANALYZE chronicle_entries")?;
        for run in 0..runs {
            self.checkpoint(&mut c);
            let stop = Arc::new(AtomicBool::new(false));
            let reader = {
                let (db, stop) = (self.db.clone(), stop.clone());
                std::thread::spawn(move || reader_loop(&db, lib, &stop))
            };
            // Let the reader warm up.
            std::thread::sleep(Duration::from_millis(300));
            let v = self.json(&["rebuild", "--swap", "--json"]);
            stop.store(true, Ordering::SeqCst);
            let samples = reader.join().map_err(|_| "the reader thread panicked".to_string())??;
            let v = v?;
            let secs = v["seconds"].as_f64().unwrap_or(f64::NAN);
            let total = v["events_total"].as_f64().unwrap_or(f64::NAN);
            let held = v["swap_lock_held_ms"].as_f64().unwrap_or(f64::NAN);
            let mut times = samples.times.clone();
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            self.progress(&format!(
                "rebuild --swap run {}: {total} events in {secs:.2} s, lock held {held:.1} ms; reader: {} queries, max {:.1} ms, {} errors",
                run + 1,
                times.len(),
                times.last().copied().unwrap_or(f64::NAN),
                samples.errors
            ));
            rates.push(total / secs);
            lock_ms.push(held);
            reader_max.push(times.last().copied().unwrap_or(f64::NAN));
            reader_p99.push(quantile(&times, 0.99));
            queries += times.len();
            errors += samples.errors;
        }
        let med = median(&rates);
        self.push(
            "rebuild",
            format!("`rebuild --swap`, {size} events"),
            rates,
            Unit::Rate,
            None,
            "`rebuild --json` seconds (shadow table, indexes, catch-up, swap)",
        );
        if !raw.is_nan() {
            self.push(
                "rebuild",
                "`rebuild --swap` ÷ raw (a)",
                vec![med / raw],
                Unit::Ratio,
                None,
                "ratio of the medians, same events",
            );
        }
        self.push(
            "rebuild",
            format!("`rebuild --swap`, {size} events: longest reader query"),
            reader_max,
            Unit::Ms,
            Some(Target::AtMost(100.0)),
            format!(
                "a thread paging a {}-event library's timeline (timeline::page, 50 per page, 5 pages, again) during the \
                 whole rebuild: {queries} queries, {errors} errors; reader p99 {}",
                thousands(lib_events),
                fmt_value(median(&reader_p99), Unit::Ms)
            ),
        );
        self.push(
            "rebuild",
            format!("`rebuild --swap`, {size} events: swap_lock_held_ms"),
            lock_ms,
            Unit::Ms,
            None,
            "as reported by the command",
        );
        Ok(())
    }

    // -----------------------------------------------------------------------------
    // queries

    fn query_section(&mut self) -> Res<()> {
        let mut c = self.connect()?;
        self.sql(&mut c, "VACUUM ANALYZE chronicle_entries")?;
        let lib: Uuid = c
            .query_one("SELECT library_id FROM chronicle_entries GROUP BY 1 ORDER BY count(*) DESC LIMIT 1", &[])
            .and_then(|r| r.try_get(0))
            .map_err(|e| pg(&e))?;
        let entries =
            self.count(&mut c, &format!("SELECT count(*) FROM chronicle_entries WHERE library_id = '{lib}'"))?;
        for (label, q) in page_kinds(lib) {
            let (tsq, et) = (q.search.as_deref().and_then(timeline::search_tsquery), q.event_type.clone());
            let matching = self.count_matching(&mut c, lib, et.as_deref(), tsq.as_deref())?;
            let plan = self.explain(&mut c, &q)?;
            self.progress(&format!("query {label}: {matching} matching entries; plan: {plan}"));
            let (p50, p99, rows) = self.time_page(&mut c, label, &q)?;
            let note = format!(
                "{} of {} entries match; {rows} rows returned; plan: {plan}",
                thousands(matching),
                thousands(entries)
            );
            self.push("queries", format!("page of 50, {label}: p50"), p50, Unit::Ms, None, "");
            self.push("queries", format!("page of 50, {label}: p99"), p99, Unit::Ms, Some(Target::AtMost(10.0)), note);
        }
        Ok(())
    }

    /// `timeline::page` of `q`, `--queries` times per run after 5 warm-ups, `--runs`
    /// runs: each run's p50 and p99 in ms, and the rows of the last page.
    fn time_page(&self, c: &mut Client, label: &str, q: &EntryQuery) -> Res<(Vec<f64>, Vec<f64>, usize)> {
        let (mut p50, mut p99) = (Vec::new(), Vec::new());
        let mut rows = 0;
        for _ in 0..5 {
            timeline::page(c, q).map_err(|e| format!("page {label}: {}", pg(&e)))?;
        }
        for _ in 0..self.plan.runs {
            let mut times = Vec::with_capacity(self.plan.queries);
            for _ in 0..self.plan.queries {
                let t = Instant::now();
                let page = timeline::page(c, q).map_err(|e| format!("page {label}: {}", pg(&e)))?;
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                rows = page.entries.len();
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            p50.push(quantile(&times, 0.5));
            p99.push(quantile(&times, 0.99));
        }
        Ok((p50, p99, rows))
    }

    fn count_matching(&self, c: &mut Client, lib: Uuid, event_type: Option<&str>, tsq: Option<&str>) -> Res<i64> {
        c.query_one(
            "SELECT count(*) FROM chronicle_entries WHERE library_id = $1
               AND ($2::text IS NULL OR event_type = $2) AND ($3::text IS NULL OR search @@ CAST($3 AS tsquery))",
            &[&lib, &event_type, &tsq],
        )
        .and_then(|r| r.try_get(0))
        .map_err(|e| pg(&e))
    }

    /// The plan's node names, outermost first, from EXPLAIN (ANALYZE, BUFFERS) of the
    /// page statement with the query's values.
    fn explain(&self, c: &mut Client, q: &EntryQuery) -> Res<String> {
        let tsq = q.search.as_deref().and_then(timeline::search_tsquery);
        let sql = format!("EXPLAIN (ANALYZE, BUFFERS) {}", timeline::SELECT_PAGE);
        let none_t: Option<String> = None;
        let none_u: Option<Uuid> = None;
        let none_ts: Option<chrono::DateTime<chrono::Utc>> = None;
        let (cursor_at, cursor_id) = (q.cursor.map(|c| c.occurred_at), q.cursor.map(|c| c.id));
        let rows = c
            .query(
                &sql,
                &[
                    &q.library_id,
                    &none_t,
                    &none_u,
                    &none_u,
                    &q.event_type,
                    &none_ts,
                    &none_ts,
                    &tsq,
                    &cursor_at,
                    &cursor_id,
                    &51i64,
                ],
            )
            .map_err(|e| format!("EXPLAIN: {}", pg(&e)))?;
        let lines: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        let nodes: Vec<String> = lines
            .iter()
            .filter(|l| l.trim_start().starts_with("->") || !l.starts_with(' '))
            .filter(|l| !l.starts_with("Planning") && !l.starts_with("Execution") && !l.starts_with("Buffers"))
            .map(|l| {
                let t = l.trim_start().trim_start_matches("->").trim();
                t.split("  (").next().unwrap_or(t).to_string()
            })
            .collect();
        let exec = lines.iter().find(|l| l.starts_with("Execution Time")).cloned().unwrap_or_default();
        let buffers = lines
            .iter()
            .find(|l| l.trim_start().starts_with("Buffers"))
            .map(|l| l.trim().to_string())
            .unwrap_or_default();
        Ok(format!("{} ({exec}; {buffers})", nodes.join(" → ")))
    }
}

// ---------------------------------------------------------------------------------
// scale

/// What the scale section measured at one size of its database.
struct ScaleStep {
    events: u64,
    added: u64,
    inject_secs: f64,
    inject_note: String,
    truncate_secs: f64,
    truncate_rss: f64,
    swap_secs: f64,
    swap_rss: f64,
    swap_lock_ms: f64,
    /// Per setting of `SCALE_DRAINS`: the rate of each run, and the workers' peak RSS.
    drains: Vec<(Vec<f64>, Vec<f64>)>,
    /// Per page kind: its label, the p99 of each run, a note.
    pages: Vec<(&'static str, Vec<f64>, String)>,
    /// Per command of `SCALE_COMMANDS`: the wall time of each run, ms.
    commands: Vec<Vec<f64>>,
    /// Per table: its name, total bytes (heap, TOAST, indexes), index bytes.
    disk: Vec<(String, i64, i64)>,
}

/// The drains of the scale section: the runbook's settings and the drain section's best.
const SCALE_DRAINS: [(&str, Settings); 2] =
    [("runbook settings", RUNBOOK), ("best settings", Settings { batch: 500, threads: 1, procs: 2 })];

/// The commands the scale section times (`show` gets an event id appended before `--json`).
/// `status` twice: as it runs by default (estimating beyond 500,000 events) and `--exact`.
/// `verify` with a sample of its content check: the presence checks grow with the tables;
/// the full content check has its own section (`--only verify`).
const SCALE_COMMANDS: [&[&str]; 4] = [&["status"], &["status", "--exact"], &["verify", "--sample", "1000"], &["show"]];

/// Share of each size step's new events that goes to the one large library, in tenths.
const SCALE_LARGE_TENTHS: u64 = 7;

/// Gauge samples timed per size and state in the gauges section.
const GAUGE_SAMPLES: usize = 200;

impl Bench {
    /// One database grows through `--scale-sizes`; at each size the same measures. A
    /// failure stops the growth: the sizes completed are reported, and the run fails.
    /// The gauge sampler over an outbox grown through `--gauge-sizes` pending rows. The
    /// rows are written straight into the outbox (the sampler reads nothing else), behind
    /// a small history of the other states: done rows, a claim in flight, a few failed
    /// rows and a few waiting for a retry.
    fn gauges_section(&mut self) -> Res<()> {
        self.reset_all()?;
        let mut c = self.connect()?;
        self.sql(
            &mut c,
            "INSERT INTO chronicle_outbox_events (event_id, status, attempts, processed_at)
             SELECT lpad(to_hex(g), 32, 'f')::uuid, 'done', 1, now() FROM generate_series(1, 1000) g;
             INSERT INTO chronicle_outbox_events (event_id, status, attempts, claim_token, claimed_by, claimed_at,
                                                  lease_until)
             SELECT lpad(to_hex(g), 32, 'e')::uuid, 'processing', 1, gen_random_uuid(), 'bench', now(),
                    now() + interval '1 hour'
             FROM generate_series(1, 100) g;
             INSERT INTO chronicle_outbox_events (event_id, status, attempts, error_reason, error)
             SELECT lpad(to_hex(g), 32, 'd')::uuid, 'failed', 1, 'invalid_payload', 'bench'
             FROM generate_series(1, 10) g;
             INSERT INTO chronicle_outbox_events (event_id, attempts, next_retry_at, error)
             SELECT lpad(to_hex(g), 32, 'c')::uuid, 1, now() + interval '1 hour', 'transient: bench'
             FROM generate_series(1, 10) g;",
        )?;
        // The 10 rows waiting for a retry are pending too.
        let mut have = 10u64;
        for n in self.plan.gauge_sizes.clone() {
            // In chunks of a million, so the progress shows and no one statement holds
            // all of it.
            let t = Instant::now();
            while have < n {
                let chunk = (n - have).min(1_000_000);
                self.sql(
                    &mut c,
                    &format!(
                        "INSERT INTO chronicle_outbox_events (event_id)
                         SELECT lpad(to_hex(g), 32, '0')::uuid FROM generate_series({}, {}) g",
                        have + 1,
                        have + chunk
                    ),
                )?;
                have += chunk;
            }
            self.progress(&format!(
                "gauges: the outbox holds {} pending rows ({:.1} s to fill)",
                thousands(n as i64),
                t.elapsed().as_secs_f64()
            ));
            for (state, prepare) in [
                ("analyzed", "ANALYZE chronicle_outbox_events"),
                ("vacuumed", "VACUUM ANALYZE chronicle_outbox_events"),
            ] {
                self.sql(&mut c, prepare)?;
                self.checkpoint(&mut c);
                self.gauge_samples(&mut c, n, state)?;
            }
            let mut exact = Vec::new();
            for _ in 0..self.plan.runs {
                let t = Instant::now();
                self.count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'")?;
                exact.push(t.elapsed().as_secs_f64() * 1e3);
            }
            self.push(
                "gauges",
                format!("for comparison: the exact count of {} pending rows (vacuumed)", thousands(n as i64)),
                exact,
                Unit::Ms,
                None,
                "`SELECT count(*) … WHERE status = 'pending'`, what each sample read before",
            );
        }
        Ok(())
    }

    /// `GAUGE_SAMPLES` gauge samples as the worker takes them, after a few to warm up.
    fn gauge_samples(&mut self, c: &mut Client, pending: u64, state: &str) -> Res<()> {
        let limit = Some(chronicle::outbox::PENDING_COUNTED_UP_TO);
        let sample = |c: &mut Client| {
            chronicle::outbox::sample_gauges(c, Duration::from_secs(600), limit)
                .map_err(|e| format!("sampling the gauges: {}", pg(&e)))
        };
        for _ in 0..5 {
            sample(c)?;
        }
        let mut ms = Vec::with_capacity(GAUGE_SAMPLES);
        let mut last = None;
        for _ in 0..GAUGE_SAMPLES {
            let t = Instant::now();
            last = Some(sample(c)?);
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let g = last.ok_or("no gauge sample")?;
        let mut sorted = ms.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let truth = pending as f64;
        self.push(
            "gauges",
            format!("one gauge sample, {} pending rows, {state}", thousands(pending as i64)),
            ms,
            Unit::Ms,
            Some(Target::AtMost(20.0)),
            format!(
                "p99 {}; pending {}{} ({:+.2} % of {}); oldest ready {:.0} s, with retries {:.0} s",
                fmt_value(quantile(&sorted, 0.99), Unit::Ms),
                if g.pending_estimated { "~" } else { "" },
                thousands(g.pending),
                (g.pending as f64 - truth) / truth * 100.0,
                thousands(pending as i64),
                g.oldest_pending_age_seconds,
                g.oldest_pending_with_retries_age_seconds
            ),
        );
        Ok(())
    }

    fn scale_section(&mut self) -> Res<()> {
        self.reset_all()?;
        let sizes = self.plan.scale_sizes.clone();
        let mut steps: Vec<ScaleStep> = Vec::new();
        let mut big: Option<Uuid> = None;
        let mut have = 0u64;
        for (i, &n) in sizes.iter().enumerate() {
            self.progress(&format!("scale: growing the database to {} events", thousands(n as i64)));
            match self.scale_step(i, have, n, &mut big) {
                Ok(step) => {
                    have = n;
                    steps.push(step);
                }
                Err(e) => {
                    let msg = format!("scale: stopped at {} events: {e}", thousands(n as i64));
                    self.progress(&msg);
                    self.notes.push(format!("{msg} (the scale rows are the sizes completed before)"));
                    self.failed = Some(msg);
                    break;
                }
            }
        }
        if let Ok(mut c) = self.connect() {
            let _ = c.batch_execute("DROP TRIGGER IF EXISTS bench_big_library ON chronicle_events");
        }
        self.scale_rows(&steps);
        Ok(())
    }

    fn scale_step(&self, index: usize, have: u64, n: u64, big: &mut Option<Uuid>) -> Res<ScaleStep> {
        let added = n - have;
        let large = added * SCALE_LARGE_TENTHS / 10;
        let small = added - large;
        let mut c = self.connect()?;

        // 1. The new events: most into the one large library (from the second size on,
        // a row trigger of the benchmark's own moves the new library's events into it:
        // every seed of `inject` makes new libraries), the rest over 5 new libraries.
        let mut t_large = 0.0;
        if large > 0 {
            if let Some(lib) = big {
                self.sql(
                    &mut c,
                    &format!(
                        "CREATE OR REPLACE FUNCTION bench_big_library() RETURNS trigger LANGUAGE plpgsql AS $$
                         BEGIN NEW.library_id := '{lib}'::uuid; RETURN NEW; END $$;
                         CREATE TRIGGER bench_big_library BEFORE INSERT ON chronicle_events
                             FOR EACH ROW EXECUTE FUNCTION bench_big_library();"
                    ),
                )?;
            }
            self.checkpoint(&mut c);
            let t = self.inject(large, 1, 70_001 + index as u64);
            self.sql(&mut c, "DROP TRIGGER IF EXISTS bench_big_library ON chronicle_events")?;
            t_large = t?;
        }
        if big.is_none() {
            let lib: Uuid = c
                .query_one("SELECT library_id FROM chronicle_events GROUP BY 1 ORDER BY count(*) DESC LIMIT 1", &[])
                .and_then(|r| r.try_get(0))
                .map_err(|e| format!("the large library: {}", pg(&e)))?;
            *big = Some(lib);
        }
        let mut t_small = 0.0;
        if small > 0 {
            self.checkpoint(&mut c);
            t_small = self.inject(small, 5, 80_001 + index as u64)?;
        }
        let inject_secs = t_large + t_small;
        let part = |count: u64, secs: f64| {
            format!(
                "{} in {secs:.1} s ({} /s)",
                thousands(count as i64),
                thousands((count as f64 / secs).round() as i64)
            )
        };
        let inject_note = format!(
            "`inject --libraries 1`: {}{}; `--libraries 5`: {}",
            part(large, t_large),
            if index > 0 { ", moved into the large library by a BEFORE INSERT row trigger" } else { "" },
            part(small, t_small)
        );
        self.progress(&format!("scale: injected {} events: {inject_note}", thousands(added as i64)));
        // The new deliveries done, as a worker leaves them (the rebuild below projects
        // the events); the table compacted after the update, as if they had been
        // written done.
        let t = Instant::now();
        self.sql(
            &mut c,
            "UPDATE chronicle_outbox_events
             SET status = 'done', attempts = 1, claimed_by = 'bench-scale', claim_token = gen_random_uuid(),
                 claimed_at = now(), processed_at = now(), updated_at = now()
             WHERE status = 'pending'",
        )?;
        self.sql(&mut c, "VACUUM FULL chronicle_outbox_events")?;
        self.sql(&mut c, "VACUUM ANALYZE chronicle_events, chronicle_outbox_events")?;
        self.progress(&format!(
            "scale: deliveries marked done, outbox compacted in {:.1} s",
            t.elapsed().as_secs_f64()
        ));

        // 2. The whole read model, rebuilt in each mode.
        let lib = big.ok_or("scale: no large library")?;
        let mut rebuild = |mode: &str| -> Res<(serde_json::Value, f64, f64)> {
            self.checkpoint(&mut c);
            let (v, rss) = self.json_with_peak(&["rebuild", mode, "--json"])?;
            let secs = v["seconds"].as_f64().ok_or_else(|| format!("rebuild {mode} printed no seconds: {v}"))?;
            let total = v["events_total"].as_u64().unwrap_or(0);
            if total != n {
                return Err(format!("rebuild {mode}: {total} events, expected {n}: {v}"));
            }
            self.progress(&format!("scale: rebuild {mode}: {n} events in {secs:.1} s, peak RSS {rss:.1} MB"));
            Ok((v, secs, rss))
        };
        let (_, truncate_secs, truncate_rss) = rebuild("--truncate")?;
        let (v, swap_secs, swap_rss) = rebuild("--swap")?;
        let swap_lock_ms = v["swap_lock_held_ms"].as_f64().unwrap_or(f64::NAN);
        self.sql(&mut c, "VACUUM ANALYZE chronicle_entries")?;

        // 3. Drains of a fresh backlog on the full tables.
        let mut drains = Vec::new();
        for (label, s) in SCALE_DRAINS {
            let (mut rates, mut rss) = (Vec::new(), Vec::new());
            for run in 0..self.plan.runs {
                let mark = self.scale_backlog()?;
                let d = self.drain(s, &[], 0);
                let cleared = self.scale_backlog_clear(mark);
                let d = d?;
                cleared?;
                self.progress(&format!(
                    "scale: drain, {label} ({}) run {}: {} events in {:.2} s = {:.0} events/s, peak RSS {:.1} MB",
                    s.label(),
                    run + 1,
                    self.plan.scale_backlog,
                    d.seconds,
                    d.rate,
                    d.peak_rss_mb
                ));
                rates.push(d.rate);
                rss.push(d.peak_rss_mb);
            }
            drains.push((rates, rss));
        }
        self.sql(&mut c, "VACUUM ANALYZE chronicle_entries, chronicle_outbox_events")?;

        // 4. Pages of the large library, and its 100th page by the keyset cursor.
        let lib_entries =
            self.count(&mut c, &format!("SELECT count(*) FROM chronicle_entries WHERE library_id = '{lib}'"))?;
        let mut kinds = page_kinds(lib);
        let mut deep = EntryQuery::new(lib);
        for page in 1..100 {
            let p = timeline::page(&mut c, &deep).map_err(|e| format!("page {page}: {}", pg(&e)))?;
            let cur = p.next_cursor.ok_or_else(|| format!("the large library has only {page} pages"))?;
            deep.cursor = Some(Cursor::decode(&cur)?);
        }
        kinds.push(("100th page of newest (keyset cursor)", deep));
        let mut pages = Vec::new();
        for (label, q) in kinds {
            let plan = self.explain(&mut c, &q)?;
            let (p50, p99, rows) = self.time_page(&mut c, label, &q)?;
            self.progress(&format!(
                "scale: page {label} in a library of {lib_entries} entries: p99 {}, p50 {}; plan: {plan}",
                fmt_value(median(&p99), Unit::Ms),
                fmt_value(median(&p50), Unit::Ms)
            ));
            let note = format!(
                "p50 {}; {rows} rows; library of {} entries; plan: {plan}",
                fmt_value(median(&p50), Unit::Ms),
                thousands(lib_entries)
            );
            pages.push((label, p99, note));
        }

        // 5. The operator's commands.
        let newest: Uuid = c
            .query_one(
                "SELECT id FROM chronicle_entries WHERE library_id = $1 ORDER BY occurred_at DESC, id DESC LIMIT 1",
                &[&lib],
            )
            .and_then(|r| r.try_get(0))
            .map_err(|e| pg(&e))?;
        let newest = newest.to_string();
        let mut commands = Vec::new();
        for command in SCALE_COMMANDS {
            let mut args: Vec<&str> = command.to_vec();
            if command == ["show"] {
                args.push(&newest);
            }
            args.push("--json");
            let mut ms = Vec::new();
            for _ in 0..self.plan.runs {
                let t = Instant::now();
                self.chronicle(&args, &[])?;
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            self.progress(&format!("scale: chronicle {}: {}", args.join(" "), fmt_value(median(&ms), Unit::Ms)));
            commands.push(ms);
        }

        // 6. Disk.
        self.sql(&mut c, "VACUUM ANALYZE chronicle_events, chronicle_outbox_events, chronicle_entries")?;
        let disk: Vec<(String, i64, i64)> = c
            .query(
                "SELECT t::text, pg_total_relation_size(t), pg_indexes_size(t)
                 FROM unnest(ARRAY['chronicle_events', 'chronicle_outbox_events', 'chronicle_entries']::regclass[]) t",
                &[],
            )
            .map_err(|e| format!("table sizes: {}", pg(&e)))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        for (t, total, idx) in &disk {
            self.progress(&format!(
                "scale: {t}: {:.0} MB ({:.0} MB indexes) = {:.0} B per event",
                *total as f64 / 1e6,
                *idx as f64 / 1e6,
                *total as f64 / n as f64
            ));
        }
        Ok(ScaleStep {
            events: n,
            added,
            inject_secs,
            inject_note,
            truncate_secs,
            truncate_rss,
            swap_secs,
            swap_rss,
            swap_lock_ms,
            drains,
            pages,
            commands,
            disk,
        })
    }

    /// A drain backlog on the grown tables: the entries of the newest `--scale-backlog`
    /// events (by id: UUIDv7, the event's time) deleted, and one pending delivery each,
    /// enqueued as the trigger does (in `(occurred_at, id)` order), so the drain writes
    /// new entries into a table of all the others. Returns the highest delivery id
    /// before the backlog.
    fn scale_backlog(&self) -> Res<i64> {
        let n = self.plan.scale_backlog as i64;
        let mut c = self.connect()?;
        let mark = self.count(&mut c, "SELECT coalesce(max(id), 0) FROM chronicle_outbox_events")?;
        let mut tx = c.transaction().map_err(|e| pg(&e))?;
        tx.execute(
            "DELETE FROM chronicle_entries WHERE id IN (SELECT id FROM chronicle_events ORDER BY id DESC LIMIT $1)",
            &[&n],
        )
        .map_err(|e| format!("deleting the backlog's entries: {}", pg(&e)))?;
        tx.execute(
            "INSERT INTO chronicle_outbox_events (event_id)
             SELECT id FROM (SELECT id, occurred_at FROM chronicle_events ORDER BY id DESC LIMIT $1) t
             ORDER BY occurred_at, id",
            &[&n],
        )
        .map_err(|e| format!("enqueueing the backlog: {}", pg(&e)))?;
        tx.commit().map_err(|e| pg(&e))?;
        self.sql(&mut c, "VACUUM ANALYZE chronicle_outbox_events, chronicle_entries")?;
        self.checkpoint(&mut c);
        Ok(mark)
    }

    /// Removes the backlog's deliveries (the events keep their first, done one).
    fn scale_backlog_clear(&self, mark: i64) -> Res<()> {
        let mut c = self.connect()?;
        c.execute("DELETE FROM chronicle_outbox_events WHERE id > $1", &[&mark])
            .map_err(|e| format!("removing the backlog's deliveries: {}", pg(&e)))?;
        Ok(())
    }

    /// The table rows of the scale section: each measure at every size, then the
    /// comparison of the largest size with the first.
    fn scale_rows(&mut self, steps: &[ScaleStep]) {
        let (Some(first), Some(last)) = (steps.first(), steps.last()) else { return };
        let at = |s: &ScaleStep| format!("at {} events", thousands(s.events as i64));
        let is_last = |s: &ScaleStep| s.events == last.events;
        let compare = steps.len() > 1;
        let vs = format!("at {} ÷ at {}", thousands(last.events as i64), thousands(first.events as i64));
        for s in steps {
            self.push(
                "scale",
                format!("inject {} new events, {}", thousands(s.added as i64), at(s)),
                vec![s.added as f64 / s.inject_secs],
                Unit::Rate,
                None,
                s.inject_note.clone(),
            );
        }
        for s in steps {
            self.push(
                "scale",
                format!("`rebuild --truncate`, {}", at(s)),
                vec![s.truncate_secs],
                Unit::Secs,
                None,
                format!(
                    "{} events/s; peak RSS {:.1} MB",
                    thousands((s.events as f64 / s.truncate_secs) as i64),
                    s.truncate_rss
                ),
            );
        }
        for s in steps {
            self.push(
                "scale",
                format!("`rebuild --swap`, {}", at(s)),
                vec![s.swap_secs],
                Unit::Secs,
                None,
                format!(
                    "{} events/s; peak RSS {:.1} MB; swap_lock_held_ms {:.0}",
                    thousands((s.events as f64 / s.swap_secs) as i64),
                    s.swap_rss,
                    s.swap_lock_ms
                ),
            );
        }
        if compare {
            for (mode, a, b) in
                [("--truncate", first.truncate_rss, last.truncate_rss), ("--swap", first.swap_rss, last.swap_rss)]
            {
                self.push(
                    "scale",
                    format!("`rebuild {mode}` peak RSS {vs}"),
                    vec![b / a],
                    Unit::Ratio,
                    Some(Target::AtMost(1.5)),
                    format!("VmHWM polled every 20 ms: {a:.1} MB → {b:.1} MB"),
                );
            }
        }
        for (k, (label, settings)) in SCALE_DRAINS.iter().enumerate() {
            for s in steps {
                let (rates, rss) = &s.drains[k];
                self.push(
                    "scale",
                    format!("drain, {label} ({}), {}", settings.label(), at(s)),
                    rates.clone(),
                    Unit::Rate,
                    None,
                    format!(
                        "{} new entries into a table of the others; worker peak RSS {:.1} MB",
                        thousands(self.plan.scale_backlog as i64),
                        median(rss)
                    ),
                );
            }
            if compare {
                let (a, b) = (median(&first.drains[k].0), median(&last.drains[k].0));
                self.push(
                    "scale",
                    format!("drain, {label}: rate {vs}"),
                    vec![b / a],
                    Unit::Ratio,
                    Some(Target::AtLeast(0.8)),
                    "ratio of the medians",
                );
            }
        }
        for k in 0..first.pages.len() {
            for s in steps {
                let (label, p99, note) = &s.pages[k];
                self.push(
                    "scale",
                    format!("page of 50, {label}: p99, {}", at(s)),
                    p99.clone(),
                    Unit::Ms,
                    is_last(s).then_some(Target::AtMost(10.0)),
                    note.clone(),
                );
            }
        }
        for (k, command) in SCALE_COMMANDS.iter().enumerate() {
            for s in steps {
                let id = if *command == ["show"] { " <id>" } else { "" };
                self.push(
                    "scale",
                    format!("`chronicle {}{id} --json`, {}", command.join(" "), at(s)),
                    s.commands[k].clone(),
                    Unit::Ms,
                    (*command == ["status"] && is_last(s)).then_some(Target::AtMost(1000.0)),
                    "wall time of the process (start, connect, query, exit)",
                );
            }
        }
        for k in 0..first.disk.len() {
            for s in steps {
                let (table, total, idx) = &s.disk[k];
                self.push(
                    "scale",
                    format!("disk per event, {table}, {}", at(s)),
                    vec![*total as f64 / s.events as f64],
                    Unit::Bytes,
                    None,
                    format!(
                        "pg_total_relation_size {:.0} MB, of which indexes (pg_indexes_size) {:.0} MB = {} B per event",
                        *total as f64 / 1e6,
                        *idx as f64 / 1e6,
                        thousands((*idx as f64 / s.events as f64).round() as i64)
                    ),
                );
            }
        }
        for s in steps {
            let total: i64 = s.disk.iter().map(|d| d.1).sum();
            self.push(
                "scale",
                format!("disk per event, the three tables, {}", at(s)),
                vec![total as f64 / s.events as f64],
                Unit::Bytes,
                None,
                format!("{:.2} GB after VACUUM ANALYZE", total as f64 / 1e9),
            );
        }
    }
}

/// The page queries of the queries and scale sections, on library `lib`.
fn page_kinds(lib: Uuid) -> Vec<(&'static str, EntryQuery)> {
    vec![
        ("newest", EntryQuery::new(lib)),
        (
            "event type BookRenamed",
            EntryQuery { event_type: Some(EventType::BookRenamed.to_string()), ..EntryQuery::new(lib) },
        ),
        ("search \"sourdough\" (English)", EntryQuery { search: Some("sourdough".into()), ..EntryQuery::new(lib) }),
        ("search \"菜谱\" (Chinese)", EntryQuery { search: Some("菜谱".into()), ..EntryQuery::new(lib) }),
    ]
}

struct LatencyRun {
    events: usize,
    write_rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

struct ReaderSamples {
    times: Vec<f64>,
    errors: usize,
}

/// Pages a library's timeline (5 pages, then from the top again) until stopped; the
/// duration of every query in ms.
fn reader_loop(db: &DbUrl, lib: Uuid, stop: &AtomicBool) -> Res<ReaderSamples> {
    let mut c = chronicle::db::connect(db).map_err(|e| format!("reader: {e}"))?;
    let mut out = ReaderSamples { times: Vec::new(), errors: 0 };
    let mut q = EntryQuery::new(lib);
    let mut pages = 0;
    while !stop.load(Ordering::SeqCst) {
        let t = Instant::now();
        let r = timeline::page(&mut c, &q);
        out.times.push(t.elapsed().as_secs_f64() * 1000.0);
        match r {
            Ok(page) => {
                pages += 1;
                match page.next_cursor {
                    Some(cur) if pages < 5 => q.cursor = Some(Cursor::decode(&cur)?),
                    _ => {
                        q.cursor = None;
                        pages = 0;
                    }
                }
            }
            Err(e) => {
                out.errors += 1;
                if out.errors <= 3 {
                    eprintln!("reader: query failed: {}", pg(&e));
                }
                if c.is_closed() {
                    c = chronicle::db::connect(db).map_err(|e| format!("reader: {e}"))?;
                }
                q.cursor = None;
                pages = 0;
            }
        }
    }
    Ok(out)
}

/// Inserts events with `created_at` left to the server (now()).
fn insert_events(c: &mut Client, events: &[chronicle::input::NewEvent]) -> Res<()> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.id.unwrap_or_else(Uuid::now_v7)).collect();
    let libs: Vec<Uuid> = events.iter().map(|e| e.library_id).collect();
    let actors: Vec<Option<Uuid>> = events.iter().map(|e| e.actor_user_id).collect();
    let entity_types: Vec<&str> = events.iter().map(|e| e.entity_type.as_str()).collect();
    let entity_ids: Vec<Uuid> = events.iter().map(|e| e.entity_id).collect();
    let event_types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let before: Vec<Option<serde_json::Value>> = events.iter().map(|e| e.before.clone()).collect();
    let after: Vec<Option<serde_json::Value>> = events.iter().map(|e| e.after.clone()).collect();
    let diff: Vec<Option<serde_json::Value>> = events.iter().map(|e| e.diff.clone()).collect();
    let occurred: Vec<chrono::DateTime<chrono::Utc>> = events.iter().map(|e| e.occurred_at).collect();
    let request_ids: Vec<Option<&str>> = events.iter().map(|e| e.request_id.as_deref()).collect();
    let clients: Vec<Option<&str>> = events.iter().map(|e| e.client.as_deref()).collect();
    let reasons: Vec<Option<&str>> = events.iter().map(|e| e.reason.as_deref()).collect();
    let ips: Vec<Option<std::net::IpAddr>> = events.iter().map(|e| e.ip).collect();
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, actor_user_id, entity_type, entity_id, event_type, before,
                                       after, diff, occurred_at, request_id, client, reason, ip)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::uuid[], $6::text[], $7::jsonb[],
                              $8::jsonb[], $9::jsonb[], $10::timestamptz[], $11::text[], $12::text[], $13::text[],
                              $14::inet[])",
        &[
            &ids,
            &libs,
            &actors,
            &entity_types,
            &entity_ids,
            &event_types,
            &before,
            &after,
            &diff,
            &occurred,
            &request_ids,
            &clients,
            &reasons,
            &ips,
        ],
    )
    .map_err(|e| format!("inserting events: {}", pg(&e)))?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// --peers: a peer job queue beside the runbook's drain

/// How to run the peer (`benches/peers/graphile.js`), found once per run.
struct Peer {
    node: String,
    node_version: String,
    dir: PathBuf,
    /// The TLS version and cipher of the bench's own connection, made as chronicle makes
    /// its connections (same URL, same `sslmode`), or None when it is not encrypted. The
    /// peer is run over the same transport: comparing a TLS drain with a plain one would
    /// measure the encryption as much as the queue.
    tls: Option<String>,
}

impl Bench {
    /// `node` and `npm` (or `BENCH_NODE` / `BENCH_NPM`), and the pinned packages installed
    /// with `npm ci` when `node_modules` is missing. None, said on stderr and in the
    /// report, when either is missing or the install fails: only the peer's rows are
    /// skipped.
    fn peer_setup(&mut self) -> Option<Peer> {
        let node = std::env::var("BENCH_NODE").unwrap_or_else(|_| "node".into());
        let npm = std::env::var("BENCH_NPM").unwrap_or_else(|_| "npm".into());
        let version = |prog: &str| {
            Command::new(prog)
                .arg("--version")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let (Some(node_version), Some(_)) = (version(&node), version(&npm)) else {
            self.skip_peer("node/npm not found, the graphile-worker row is skipped".into());
            return None;
        };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches").join("peers");
        if !dir.join("node_modules").is_dir() {
            self.progress(&format!("--peers: npm ci in {}", dir.display()));
            let log = self.logs.join("npm-ci.log");
            let status = std::fs::File::create(&log).and_then(|f| Ok((f.try_clone()?, f))).and_then(|(out, err)| {
                Command::new(&npm)
                    .args(["ci", "--no-audit", "--no-fund"])
                    .current_dir(&dir)
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    .status()
            });
            match status {
                Ok(s) if s.success() => {}
                Ok(s) => {
                    self.skip_peer(format!(
                        "`npm ci` in benches/peers failed ({s}), the graphile-worker row is skipped: {}",
                        tail(&log)
                    ));
                    return None;
                }
                Err(e) => {
                    self.skip_peer(format!("cannot run `{npm} ci` ({e}), the graphile-worker row is skipped"));
                    return None;
                }
            }
        }
        let tls = match self.transport() {
            Ok(t) => t,
            Err(e) => {
                self.skip_peer(format!(
                    "cannot tell whether the connection uses TLS ({e}), the graphile-worker row is skipped"
                ));
                return None;
            }
        };
        Some(Peer { node, node_version, dir, tls })
    }

    /// The TLS version and cipher of a connection made as chronicle makes them, or None.
    fn transport(&self) -> Res<Option<String>> {
        let mut c = self.connect()?;
        let sql =
            "SELECT CASE WHEN ssl THEN version || ' ' || cipher END FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
        c.query_one(sql, &[]).and_then(|r| r.try_get(0)).map_err(|e| format!("{}: {}", first_line(sql), pg(&e)))
    }

    fn skip_peer(&mut self, msg: String) {
        eprintln!("--peers: {msg}");
        self.notes.push(format!("--peers: {msg}."));
    }

    /// One run of `node benches/peers/graphile.js jobs` against the bench database (the
    /// script makes its `graphile_worker` schema and sink table afresh; both are dropped
    /// after the run). Its peak RSS: VmHWM polled every 20 ms, as for the worker.
    fn peer_run(&self, peer: &Peer, jobs: u64, run: usize) -> Res<Drain> {
        let log = self.logs.join("graphile.log");
        let stderr = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let mut cmd = Command::new(&peer.node);
        cmd.arg(peer.dir.join("graphile.js")).arg(jobs.to_string()).current_dir(&peer.dir);
        // The connection through libpq's variables, which node-postgres reads: nothing
        // to quote or percent-encode.
        for (k, _) in std::env::vars() {
            if k.starts_with("PG") || k == "DATABASE_URL" {
                cmd.env_remove(&k);
            }
        }
        let cfg = &self.db.config;
        if let Some(h) = cfg.get_hosts().first() {
            let host = match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                #[cfg(unix)]
                postgres::config::Host::Unix(p) => p.to_string_lossy().into_owned(),
            };
            cmd.env("PGHOST", host);
        }
        if let Some(p) = cfg.get_ports().first() {
            cmd.env("PGPORT", p.to_string());
        }
        if let Some(u) = cfg.get_user() {
            cmd.env("PGUSER", u);
        }
        if let Some(pw) = cfg.get_password() {
            cmd.env("PGPASSWORD", String::from_utf8_lossy(pw).into_owned());
        }
        cmd.env("PGDATABASE", cfg.get_dbname().unwrap_or("postgres"));
        // node-postgres reads PGSSLMODE: `no-verify` is TLS with any certificate, as
        // chronicle's default `sslmode=prefer` is when the server offers TLS.
        cmd.env("PGSSLMODE", if peer.tls.is_some() { "no-verify" } else { "disable" });
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        let child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", peer.node))?;
        let (out, peak_kb) = wait_polled(child, true);
        let out = out.map_err(|e| format!("waiting for node graphile.js: {e}"))?;
        let mut c = self.connect()?;
        self.sql(&mut c, "DROP SCHEMA IF EXISTS graphile_worker CASCADE; DROP TABLE IF EXISTS peer_sink")?;
        if !out.status.success() {
            return Err(format!("node graphile.js {jobs} failed ({}): {}", out.status, tail(&log)));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v = parse_json_line(&["(graphile.js)"], &stdout)?;
        let (seconds, done, sink) = (v["seconds"].as_f64(), v["jobs"].as_u64(), v["sink_rows"].as_u64());
        let Some(seconds) = seconds.filter(|_| done == Some(jobs) && sink == Some(jobs)) else {
            return Err(format!("graphile.js: expected {jobs} jobs and sink rows: {v}"));
        };
        let d = Drain { seconds, rate: jobs as f64 / seconds, peak_rss_mb: peak_kb as f64 / 1024.0 };
        self.progress(&format!(
            "graphile-worker run {}: {jobs} jobs in {:.2} s = {:.0} jobs/s, peak RSS {:.1} MB",
            run + 1,
            d.seconds,
            d.rate,
            d.peak_rss_mb
        ));
        Ok(d)
    }

    /// The peer's rate, and the runbook drain's rate ÷ it (target ≥ 2).
    fn push_peer_rows(&mut self, peer: &Peer, runs: &[Drain], runbook_median: f64) {
        if runs.is_empty() {
            return;
        }
        let rates: Vec<f64> = runs.iter().map(|d| d.rate).collect();
        let rss: Vec<f64> = runs.iter().map(|d| d.peak_rss_mb).collect();
        let peer_median = median(&rates);
        self.push(
            "drain",
            format!(
                "graphile-worker 0.18 preset (24 concurrent, local queue 500, batched completion), one INSERT per \
                 job, {} jobs",
                thousands(self.plan.small as i64)
            ),
            rates,
            Unit::Rate,
            None,
            format!(
                "`node benches/peers/graphile.js` (node {}): backlog added in one `add_jobs` before the start, \
                 wall time from just before `run()` to the job table seen empty; {}; node's peak RSS (VmHWM) {:.1} MB \
                 (min {:.1}, max {:.1}); runs alternate with the runbook drain's",
                peer.node_version,
                match &peer.tls {
                    Some(t) => format!("over TLS ({t}) as the chronicle runs are (`PGSSLMODE=no-verify`)"),
                    None => "without TLS, as the chronicle runs are".to_string(),
                },
                median(&rss),
                min_of(&rss),
                max_of(&rss)
            ),
        );
        self.push(
            "drain",
            "runbook settings ÷ graphile-worker preset",
            vec![runbook_median / peer_median],
            Unit::Ratio,
            Some(Target::AtLeast(2.0)),
            "ratio of the medians, same run",
        );
    }
}

/// Waits for a child (tracked for the cleanup meanwhile), with `poll` its peak RSS in kB:
/// its VmHWM polled every 20 ms, the largest value read (0 without).
fn wait_polled(child: Child, poll: bool) -> (std::io::Result<std::process::Output>, u64) {
    let pid = child.id();
    track_child(pid);
    let hwm = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll.then(|| {
        let (hwm, stop) = (hwm.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some(kb) = vm_hwm_kb(pid) {
                    hwm.fetch_max(kb, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    });
    let out = child.wait_with_output();
    stop.store(true, Ordering::SeqCst);
    if let Some(p) = poller {
        let _ = p.join();
    }
    untrack_child(pid);
    (out, hwm.load(Ordering::SeqCst))
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn human_setting(setting: &str, unit: &str) -> String {
    let Ok(n) = setting.parse::<f64>() else { return setting.to_string() };
    let bytes = match unit {
        "8kB" => n * 8192.0,
        "kB" => n * 1024.0,
        "MB" => n * 1024.0 * 1024.0,
        "s" => return format!("{setting}s"),
        "ms" => return format!("{setting}ms"),
        "" => return setting.to_string(),
        _ => return format!("{setting}{unit}"),
    };
    if bytes >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.0}GB", bytes / 1024.0 / 1024.0 / 1024.0)
    } else {
        format!("{:.0}MB", bytes / 1024.0 / 1024.0)
    }
}

fn pg(e: &postgres::Error) -> String {
    chronicle::db::describe_error(e)
}

fn first_line(s: &str) -> String {
    s.trim().lines().next().unwrap_or("").chars().take(80).collect()
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// Raw (d)'s claim: every pending delivery of the outbox's copy set as `CLAIM_BATCH`
/// sets a claimed row (`src/outbox.rs`), in one statement.
const RAW_CLAIM: &str = "UPDATE bench_raw_outbox
    SET status = 'processing', claimed_by = 'bench', claim_token = '00000000-0000-7000-8000-000000000000',
        claimed_at = now(), lease_until = now() + make_interval(secs => 30), attempts = attempts + 1,
        updated_at = now()
    WHERE status = 'pending'";

/// Raw (d)'s completion: every processing delivery set as `MARK_DONE` sets it.
const RAW_DONE: &str = "UPDATE bench_raw_outbox
    SET status = 'done', processed_at = now(), lease_until = NULL, next_retry_at = NULL,
        error_reason = NULL, error = NULL, updated_at = now()
    WHERE status = 'processing'";

/// Raw limit (a): the entries of every event built by one set-based statement, into a
/// table shaped like the read model. The summary is built like the projection's (same
/// sentences, quoted names cut to 120 characters); the search document is the summary,
/// the reason, the display names and the block texts through `to_tsvector('simple')`
/// (Postgres' own parser: no CJK bigrams, so fewer lexemes than the real entries). The
/// rows, one value per column of `ENTRY_COLUMNS` in its order, for `INSERT … SELECT`.
const RAW_ROWS: &str = r#"
SELECT e.id, e.library_id, e.actor_user_id, e.entity_type, e.entity_id, e.event_type, e.occurred_at,
       e.created_at, e.request_id, e.client, e.ip, e.reason, s.summary,
       ARRAY(SELECT k FROM (SELECT jsonb_object_keys(CASE WHEN jsonb_typeof(e.before) = 'object' THEN e.before ELSE '{}' END)
                            UNION SELECT jsonb_object_keys(CASE WHEN jsonb_typeof(e.after) = 'object' THEN e.after ELSE '{}' END)
                            UNION SELECT jsonb_object_keys(CASE WHEN jsonb_typeof(e.diff) = 'object' THEN e.diff ELSE '{}' END)) ks(k)
             WHERE e.before -> k IS DISTINCT FROM e.after -> k OR coalesce(e.diff ? k, false) ORDER BY k),
       CASE WHEN e.before IS NULL OR e.before = 'null' THEN '{}'::jsonb ELSE jsonb_build_object('before', e.before) END
         || CASE WHEN e.after IS NULL OR e.after = 'null' THEN '{}'::jsonb ELSE jsonb_build_object('after', e.after) END
         || CASE WHEN e.diff IS NULL OR e.diff = 'null' THEN '{}'::jsonb ELSE jsonb_build_object('diff', e.diff) END,
       to_tsvector('simple', concat_ws(' ', s.summary, e.reason,
           e.after ->> 'name', e.after ->> 'title', e.after ->> 'tag_name', e.after ->> 'book_title', e.after ->> 'bookshelf_name',
           e.before ->> 'name', e.before ->> 'title', e.before ->> 'tag_name', e.before ->> 'book_title', e.before ->> 'bookshelf_name',
           e.after ->> 'text', e.before ->> 'text')),
       1, now()
FROM chronicle_events e
CROSS JOIN LATERAL (SELECT
    '"' || left(coalesce(e.after ->> 'name', e.before ->> 'name'), 120) || '"' AS name,
    '"' || left(coalesce(e.after ->> 'title', e.before ->> 'title'), 120) || '"' AS title,
    '"' || left(coalesce(e.after ->> 'book_title', e.before ->> 'book_title'), 120) || '"' AS book_title,
    '"' || left(coalesce(e.after ->> 'tag_name', e.before ->> 'tag_name'), 120) || '"' AS tag_name) q
CROSS JOIN LATERAL (SELECT CASE e.event_type
    WHEN 'LibraryCreated' THEN format('Created library %s', q.name)
    WHEN 'LibraryRenamed' THEN format('Renamed library "%s" → "%s"', left(e.before ->> 'name', 120), left(e.after ->> 'name', 120))
    WHEN 'BookshelfCreated' THEN format('Created bookshelf %s', q.name)
    WHEN 'BookshelfRenamed' THEN format('Renamed bookshelf "%s" → "%s"', left(e.before ->> 'name', 120), left(e.after ->> 'name', 120))
    WHEN 'BookshelfDeleted' THEN format('Deleted bookshelf %s', q.name)
    WHEN 'BookCreated' THEN format('Created book %s in bookshelf "%s"', q.title, left(e.after ->> 'bookshelf_name', 120))
    WHEN 'BookRenamed' THEN format('Renamed book "%s" → "%s"', left(e.before ->> 'title', 120), left(e.after ->> 'title', 120))
    WHEN 'BookMoved' THEN format('Moved book %s from bookshelf "%s" to bookshelf "%s"', q.title,
                                 left(e.before ->> 'bookshelf_name', 120), left(e.after ->> 'bookshelf_name', 120))
    WHEN 'BookDeleted' THEN format('Deleted book %s', q.title)
    WHEN 'BookRestored' THEN format('Restored book %s', q.title)
    WHEN 'BlockCreated' THEN format('Created %s block in %s', left(e.after ->> 'kind', 40), q.book_title)
    WHEN 'BlockUpdated' THEN format('Edited block in %s', q.book_title)
    WHEN 'BlockMoved' THEN format('Moved block in %s from position %s to %s', q.book_title, e.before -> 'position', e.after -> 'position')
    WHEN 'BlockDeleted' THEN format('Deleted block in %s', q.book_title)
    WHEN 'TagCreated' THEN format('Created tag %s', q.name)
    WHEN 'TagRenamed' THEN format('Renamed tag "%s" → "%s"', left(e.before ->> 'name', 120), left(e.after ->> 'name', 120))
    WHEN 'TagDeleted' THEN format('Deleted tag %s', q.name)
    WHEN 'TagAdded' THEN format('Added tag %s to %s %s', q.tag_name, e.entity_type, coalesce(q.book_title, q.title))
    WHEN 'TagRemoved' THEN format('Removed tag %s from %s %s', q.tag_name, e.entity_type, coalesce(q.book_title, q.title))
    ELSE e.event_type END AS summary) s
"#;
