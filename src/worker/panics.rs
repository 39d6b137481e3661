//! A panic is a bug, and a bug must not leave a worker that looks healthy. It is caught at
//! the one boundary whose blast radius is known, one event's projection
//! (`catch_projection`: that event fails `projection_panicked`, the rest of its batch goes
//! on); anywhere else in a thread of the worker's own (`own_thread`: the claim threads, the
//! services, the listener, the metrics endpoint's thread) it stops the whole worker
//! (`install_hook` tells the supervisor, which stops every thread, gives the claims back,
//! and the command exits 70). A panic in a thread a library started and looks after (the
//! connection pool's, tiny_http's) is that library's to survive, as it does when it runs
//! out of descriptors or threads, and so is a panic inside a call into a library whose
//! caller goes on without it (`catch_library`: tiny_http's server start when no thread can
//! be spawned). Every panic is logged through `log`, with its thread and
//! place, instead of the default hook's message on stderr.

use std::any::Any;
use std::backtrace::{Backtrace, BacktraceStatus};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;

use uuid::Uuid;

/// A panic outside a projection: the thread it ended, and what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadPanic {
    pub thread: String,
    pub message: String,
}

thread_local! {
    /// The outbox row and event this thread is projecting inside `catch_projection`.
    static PROJECTING: Cell<Option<(i64, Uuid)>> = const { Cell::new(None) };
    /// Whether this thread is one of the worker's own (`own_thread`).
    static OWN: Cell<bool> = const { Cell::new(false) };
    /// Whether this thread is inside `catch_library`.
    static IN_LIBRARY: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as one of the worker's own: a panic in it (outside a
/// projection) stops the worker. Called first thing by each such thread.
pub fn own_thread() {
    OWN.with(|own| own.set(true));
}

/// Runs `project`, the projection of outbox row `outbox_id` (event `event_id`); a panic
/// in it is returned as its message. The projection is pure, so nothing it could have left
/// half-changed outlives the unwinding.
pub fn catch_projection<T>(outbox_id: i64, event_id: Uuid, project: impl FnOnce() -> T) -> Result<T, String> {
    PROJECTING.with(|p| p.set(Some((outbox_id, event_id))));
    let result = std::panic::catch_unwind(AssertUnwindSafe(project));
    PROJECTING.with(|p| p.set(None));
    result.map_err(|payload| message(payload.as_ref()))
}

/// Runs `call`, a call into a library that may panic where its caller knows how to go on
/// (tiny_http unwraps a thread spawn when it starts a server, which fails when the process
/// is out of threads): a panic in it is returned as its message and logged as the
/// library's, without stopping the worker.
pub fn catch_library<T>(call: impl FnOnce() -> T) -> Result<T, String> {
    let outer = IN_LIBRARY.with(|l| l.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(call));
    IN_LIBRARY.with(|l| l.set(outer));
    result.map_err(|payload| message(payload.as_ref()))
}

/// Installs the process's panic hook: every panic is logged as an error, with its thread,
/// place and message (and a backtrace when `RUST_BACKTRACE` asks for one); one in a thread
/// of the worker's own, outside a projection, is also handed to `stop`, which stops the
/// worker.
pub fn install_hook(stop: impl Fn(ThreadPanic) + Send + Sync + 'static) {
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        let message = message(info.payload());
        let place = info.location().map_or_else(|| "an unknown place".to_string(), |l| l.to_string());
        let backtrace = Backtrace::capture();
        let backtrace =
            if backtrace.status() == BacktraceStatus::Captured { format!("\n{backtrace}") } else { String::new() };
        match PROJECTING.try_with(Cell::get).ok().flatten() {
            Some((outbox_id, event_id)) => log::error!(
                "the projection of outbox row {outbox_id} (event {event_id}) panicked at {place}: {message}; \
                 the row fails projection_panicked{backtrace}"
            ),
            None if OWN.try_with(Cell::get).unwrap_or(false) && !IN_LIBRARY.try_with(Cell::get).unwrap_or(false) => {
                log::error!("thread {thread} panicked at {place}: {message}; stopping the worker (exit 70){backtrace}");
                stop(ThreadPanic { thread, message });
            }
            None => log::error!("thread {thread} (a library's) panicked at {place}: {message}{backtrace}"),
        }
    }));
}

/// The message a panic was raised with (`panic!`'s text), or a placeholder.
pub fn message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_projection_is_returned_as_its_message() {
        let ok = catch_projection(1, Uuid::nil(), || 5);
        assert_eq!(ok, Ok(5));
        let id = 7;
        let caught = catch_projection(2, Uuid::nil(), || -> i32 { panic!("bad event {id}") });
        assert_eq!(caught, Err("bad event 7".to_string()));
        let caught = catch_projection(3, Uuid::nil(), || -> i32 { panic!("static text") });
        assert_eq!(caught, Err("static text".to_string()));
        assert_eq!(PROJECTING.with(Cell::get), None, "the boundary is left behind");
    }

    #[test]
    fn a_panicking_library_call_is_returned_as_its_message_and_the_boundary_is_left() {
        assert_eq!(catch_library(|| 5), Ok(5));
        let caught = catch_library(|| -> i32 { panic!("failed to spawn thread") });
        assert_eq!(caught, Err("failed to spawn thread".to_string()));
        assert!(!IN_LIBRARY.with(Cell::get), "the boundary is left behind");
    }
}
