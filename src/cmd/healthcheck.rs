//! `chronicle healthcheck`: probes a running worker's `/healthz` (or `/readyz`) over
//! HTTP and exits 0 when it answers 200. Minimal container images have no curl; their
//! HEALTHCHECK runs this instead.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use lexopt::prelude::*;

use crate::cmd::{setting_flag, string_value};
use crate::config::{self, Env, Setting, Sources};
use crate::error::{AppError, Result};
use crate::help::Help;

pub const SUMMARY: &str = "Probe a worker's /healthz (--ready: /readyz); 0 when healthy";

const SETTINGS: &[&Setting] = &[&config::METRICS_PORT, &config::METRICS_BIND];

pub fn help() -> Help {
    Help::new(
        "Probe the metrics endpoint of a running worker on this host: GET /healthz (the process is alive) or, \
         with --ready, GET /readyz (the database answers with the expected schema). Exit 0 on HTTP 200, 1 \
         otherwise. For container health checks (the image has no curl). A bind address of 0.0.0.0 or :: is \
         probed on loopback.",
    )
    .usage(&["chronicle healthcheck [--ready] [--timeout SECONDS]"])
    .flags(
        SETTINGS,
        &[
            ("--ready", "Probe /readyz instead of /healthz.".into()),
            ("--timeout SECONDS", "Give up after this long (default 3).".into()),
        ],
    )
    .examples(&[
        "chronicle healthcheck                       # in a Containerfile HEALTHCHECK",
        "OUTBOX_METRICS_PORT=9111 chronicle healthcheck --ready",
    ])
}

#[derive(Debug)]
pub struct Args {
    pub host: String,
    pub port: u16,
    pub path: &'static str,
    pub timeout: Duration,
}

pub fn parse(p: &mut lexopt::Parser, env: &Env) -> Result<Option<Args>> {
    let mut src = Sources::new(env);
    let mut path = "/healthz";
    let mut timeout = Duration::from_secs(3);
    while let Some(arg) = p.next()? {
        if let Some(s) = setting_flag(&arg, SETTINGS) {
            src.set_flag(s, string_value(p, s.flag)?);
            continue;
        }
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("ready") => path = "/readyz",
            Long("timeout") => {
                let v = string_value(p, "timeout")?;
                timeout = config::parse_duration(v.trim())
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| AppError::usage(format!("invalid --timeout {v:?}: a duration greater than 0")))?;
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    let port = src.port(&config::METRICS_PORT)?.unwrap_or(9110);
    if port == 0 {
        return Err(AppError::usage(format!(
            "{} is 0: the metrics endpoint is off, there is nothing to probe",
            config::METRICS_PORT.var
        )));
    }
    let bind = src.text(&config::METRICS_BIND)?.unwrap_or_else(|| "127.0.0.1".into());
    let host = match bind.as_str() {
        "0.0.0.0" => "127.0.0.1".to_string(),
        "::" | "[::]" => "::1".to_string(),
        other => other.trim_matches(['[', ']']).to_string(),
    };
    Ok(Some(Args { host, port, path, timeout }))
}

pub fn run(args: Args) -> Result<()> {
    let target = format!(
        "{}:{}",
        if args.host.contains(':') { format!("[{}]", args.host) } else { args.host.clone() },
        args.port
    );
    let status = probe(&target, args.path, args.timeout)
        .map_err(|e| AppError::failed(format!("unhealthy: GET http://{target}{}: {e}", args.path)))?;
    if status == 200 {
        println!("healthy: GET http://{target}{} -> {status}", args.path);
        Ok(())
    } else {
        Err(AppError::failed(format!("unhealthy: GET http://{target}{} -> {status}", args.path)))
    }
}

/// One HTTP/1.0 GET; returns the status code.
fn probe(target: &str, path: &str, timeout: Duration) -> std::io::Result<u16> {
    let addr = target
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP answer: {line:?}")))
}
