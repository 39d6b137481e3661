//! Named fail points for the crash-isolation tests (cargo feature `failpoints`, which
//! the tests enable and release builds never have: without it every check is a no-op).
//!
//! Points: `claim` (before a claim in a transaction of its own, not before one that a
//! backlog's completion makes), `project` (before one event is projected, inside the
//! boundary that catches a projection's panic) and `complete` (inside the completing
//! transaction). One more in the turn of each of the worker's other threads, where a panic
//! stops the whole worker: `claim-loop` (a claim thread's turn, outside the projection),
//! `reclaim`, `analyze`, `lease-keeper`, `gauges`, `rebuild-runs`, `prune`, `listener` and
//! `metrics` (the metrics endpoint's thread). In `chronicle rebuild`: `rebuild-after-truncate`
//! (`--truncate`, the entries emptied, none written yet), `rebuild-batch` (after each batch
//! of entries written), `rebuild-enqueued` (`--emit-outbox`, its transaction not committed
//! yet), `swap-before-swap` (the shadow table loaded, the swap not begun) and
//! `swap-after-swap` (swapped, the old table not dropped yet).
//!
//! The environment variable `FAILPOINTS` (the `fail` crate's syntax) configures them in a
//! process, e.g. `FAILPOINTS='project=return(abort@crash_me)'` or
//! `FAILPOINTS='reclaim=1*sleep(1000)->panic'`. The argument of `return` says what to do:
//! `abort` the process, return an `error`, `stall` (sleep until killed) or `panic`;
//! `@KEY` limits the point to events whose `after` object has the key KEY. The fail
//! crate's own actions (`panic`, `sleep(ms)`, `1*return(...)`, `50%return(...)`, `->`)
//! work too. An `error` means something only where the point can fail (`claim`, `project`,
//! `complete`); elsewhere it is ignored.

use crate::event::Event;

/// What a fail point asks its caller to do (abort and stall never return).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    /// Go on as if there were no fail point.
    Pass,
    /// Fail here with an error.
    Error,
}

/// The statement that makes a real, transient database error (serialization failure)
/// for the `error` action of the points that talk to the database.
pub const RAISE_TRANSIENT: &str =
    "DO $$ BEGIN RAISE EXCEPTION 'fail point: injected error' USING ERRCODE = '40001'; END $$";

/// Reads `FAILPOINTS` for this process. Keep the value alive while the process runs.
#[cfg(feature = "failpoints")]
pub fn setup() -> Option<fail::FailScenario<'static>> {
    Some(fail::FailScenario::setup())
}

#[cfg(not(feature = "failpoints"))]
pub fn setup() -> Option<()> {
    None
}

/// Evaluates the point `name` for `event` (None: a point not about one event).
#[cfg(feature = "failpoints")]
pub fn check(name: &str, event: Option<&Event>) -> Hit {
    let Some(arg) = fail::eval(name, |arg| arg.unwrap_or_default()) else { return Hit::Pass };
    let (action, key) = match arg.split_once('@') {
        Some((a, k)) => (a, Some(k)),
        None => (arg.as_str(), None),
    };
    if let Some(key) = key {
        let marked =
            event.and_then(|e| e.after.as_ref()).and_then(|a| a.as_object()).is_some_and(|a| a.contains_key(key));
        if !marked {
            return Hit::Pass;
        }
    }
    let what = event.map(|e| format!(" (event {})", e.id)).unwrap_or_default();
    match action {
        "abort" => {
            log::error!("fail point {name}: aborting the process{what}");
            std::process::abort()
        }
        "stall" => {
            log::error!("fail point {name}: stalling until killed{what}");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        "panic" => panic!("fail point {name}: injected panic{what}"),
        "error" | "" => {
            log::warn!("fail point {name}: returning an error{what}");
            Hit::Error
        }
        other => {
            log::warn!("fail point {name}: unknown action {other:?} (abort, error, stall, panic); ignored");
            Hit::Pass
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn check(_name: &str, _event: Option<&Event>) -> Hit {
    Hit::Pass
}
