//! `chronicle worker`: the projector (the runbook's chronicle_outbox_worker.py).

use lexopt::prelude::*;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, Env, Sources, WorkerConfig};
use std::sync::Arc;

use crate::error::{AppError, Result};
use crate::help::Help;
use crate::worker::{self, Shared};

pub const SUMMARY: &str = "Run the projector: claim outbox rows, write chronicle_entries";

pub fn help() -> Help {
    Help::new(
        "Run the projector worker. It claims ready outbox rows under a lease (FOR UPDATE SKIP LOCKED), projects \
         their events into chronicle_entries and marks them done, in one transaction per batch. Transient \
         failures retry with exponential backoff and jitter; deterministic ones end failed with an error_reason \
         (see `chronicle replay-failed`). A reclaim loop returns rows of crashed workers to pending. Idle \
         threads wake on NOTIFY; polling is the fallback.\n\n\
         Ctrl+C / SIGTERM: stop claiming, finish or release the current batch, exit 0. A second signal exits \
         130 at once. A panic while projecting one event fails that event alone (projection_panicked); a \
         panic anywhere else stops the worker the same way, then exits 70. An unreachable database is waited \
         for, never fatal; one that refuses us (credentials, database name) too, reported as an error at most \
         once a minute. A bounded run (OUTBOX_RUN_SECONDS, --until-empty) is different: refused at start, or \
         ended before it ever reached its database, it exits 3.",
    )
    .usage(&["chronicle worker [FLAGS]"])
    .flags_titled(
        "FLAGS (each also read from its environment variable; the flag wins):",
        config::WORKER_SETTINGS,
        &[(
            "--until-empty",
            "Stop once nothing is ready to claim and no row is held by another worker's claim (a dead worker's \
             claims are reclaimed and projected first; batch jobs, tests)."
                .into(),
        )],
    )
    .examples(&[
        "DATABASE_URL=postgresql+psycopg://wordloom@localhost:5435/wordloom_test \\",
        "    chronicle worker",
        "OUTBOX_RUN_SECONDS=2 chronicle worker  # 2 s smoke run (exit 3: no database)",
        "chronicle worker --concurrency 4 --batch-size 500 --until-empty",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub config: WorkerConfig,
    pub until_empty: bool,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let mut until_empty = false;
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, config::WORKER_SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("until-empty") => until_empty = true,
            _ => return Err(arg.unexpected().into()),
        }
    }
    Ok(Some(Args { config: WorkerConfig::resolve(&src)?, until_empty }))
}

pub fn run(args: Args) -> Result<()> {
    let shared = Shared::new(args.config);
    install_signal_handler(&shared)?;
    worker::run(shared, args.until_empty)
}

/// Ctrl+C, SIGTERM (and Windows console events): the first stops cleanly, a second
/// exits at once.
fn install_signal_handler(shared: &Arc<Shared>) -> Result<()> {
    let s = shared.clone();
    ctrlc::set_handler(move || {
        if s.stopping() {
            eprintln!("chronicle: second signal, exiting now");
            std::process::exit(130);
        }
        log::info!("stop requested: finishing or releasing the current batches");
        s.request_stop();
    })
    .map_err(|e| AppError::failed(format!("cannot install the signal handler: {e}")).caused_by(e))
}
