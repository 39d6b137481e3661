//! The metrics endpoint: one tiny_http thread serving `/metrics`, `/healthz` and
//! `/readyz`. A request never touches the database: gauges are sampled elsewhere.
//!
//! The accepting thread never writes to a client itself: each connection's answers are
//! written by a thread of its own, so a client that pipelines requests and never reads
//! its answers blocks only its own writer, not other scrapes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::error::{AppError, Result};
use crate::metrics::Metrics;

/// The running server; dropping it does not stop it (the process exit does).
pub struct MetricsServer {
    pub addr: std::net::SocketAddr,
}

/// Binds `bind:port` at once (a port in use is a clear error at start) and serves from a
/// background thread.
pub fn serve(bind: &str, port: u16, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> Result<MetricsServer> {
    let server = tiny_http::Server::http((bind, port)).map_err(|e| {
        AppError::failed(format!(
            "cannot serve metrics on {bind}:{port} (OUTBOX_METRICS_BIND/OUTBOX_METRICS_PORT): {e}"
        ))
    })?;
    let addr = server.server_addr().to_ip().ok_or_else(|| AppError::failed("the metrics server has no IP address"))?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            let mut writers = Writers::new();
            loop {
                match server.recv_timeout(Duration::from_secs(1)) {
                    Ok(Some(req)) => writers.answer(req, &metrics, &ready),
                    Ok(None) => {}
                    Err(e) => log::warn!("metrics endpoint: {e}"),
                }
            }
        })
        .map_err(|e| AppError::failed(format!("cannot start the metrics thread: {e}")))?;
    log::info!("serving metrics on http://{addr}/metrics");
    Ok(MetricsServer { addr })
}

/// Answers in the background: one writer thread per client connection, fed in order
/// (answers on one connection must keep the order of its requests). A connection that
/// does not read its answers blocks only its own writer. A writer ends after a few idle
/// seconds and is then forgotten.
struct Writers {
    by_peer: HashMap<Option<SocketAddr>, Writer>,
}

struct Writer {
    tx: mpsc::Sender<tiny_http::Request>,
    alive: Arc<AtomicBool>,
}

const WRITER_IDLE: Duration = Duration::from_secs(5);

impl Writers {
    fn new() -> Writers {
        Writers { by_peer: HashMap::new() }
    }

    fn answer(&mut self, req: tiny_http::Request, metrics: &Arc<Metrics>, ready: &Arc<AtomicBool>) {
        self.by_peer.retain(|_, w| w.alive.load(Ordering::SeqCst));
        let peer = req.remote_addr().copied();
        let req = match self.by_peer.get(&peer) {
            Some(w) => match w.tx.send(req) {
                Ok(()) => return,
                Err(mpsc::SendError(req)) => req, // it just went idle and ended
            },
            None => req,
        };
        let (tx, rx) = mpsc::channel::<tiny_http::Request>();
        let alive = Arc::new(AtomicBool::new(true));
        let (m, r, a) = (metrics.clone(), ready.clone(), alive.clone());
        let spawned = std::thread::Builder::new().name("metrics-answer".into()).spawn(move || {
            while let Ok(req) = rx.recv_timeout(WRITER_IDLE) {
                respond(req, &m, &r);
            }
            a.store(false, Ordering::SeqCst);
        });
        match spawned {
            Ok(_) => {
                if tx.send(req).is_ok() {
                    self.by_peer.insert(peer, Writer { tx, alive });
                }
            }
            Err(e) => log::warn!("metrics endpoint: cannot start a writer thread: {e}"),
        }
    }
}

fn respond(req: tiny_http::Request, metrics: &Metrics, ready: &AtomicBool) {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let is_get = matches!(req.method(), tiny_http::Method::Get | tiny_http::Method::Head);
    let (status, body, ctype) = match path.as_str() {
        "/metrics" | "/healthz" | "/readyz" if !is_get => (405, "method not allowed\n".to_string(), "text/plain"),
        "/metrics" => (200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8"),
        "/healthz" => (200, "{\"status\":\"ok\"}\n".to_string(), "application/json"),
        "/readyz" if ready.load(Ordering::Relaxed) => (200, "{\"status\":\"ready\"}\n".to_string(), "application/json"),
        "/readyz" => (503, "{\"status\":\"not ready\"}\n".to_string(), "application/json"),
        _ => (404, "not found\n".to_string(), "text/plain"),
    };
    let mut resp = tiny_http::Response::from_string(body).with_status_code(status);
    if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes()) {
        resp = resp.with_header(h);
    }
    if let Err(e) = req.respond(resp) {
        log::debug!("metrics endpoint: could not answer: {e}");
    }
}
