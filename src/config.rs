//! Configuration: environment variables and flags turned into validated values.
//!
//! Everything here is pure: it reads a snapshot of the environment (a map) and the
//! flags a command received, and never touches the network, so every rule is
//! unit-tested from a map. The variable names are a contract (DESIGN.md §4): each one
//! has a flag named after it without its prefix, and the flag wins.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::{AppError, Result};

/// A snapshot of the process environment (or of a test's map).
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    pub fn from_process() -> Env {
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
            .collect();
        Env { vars }
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Env {
        Env { vars: pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }
}

/// What kind of value a setting takes; decides its validation and its help text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// A PostgreSQL connection string.
    DatabaseUrl,
    /// Free text, not empty.
    Text,
    /// A whole number within bounds (inclusive).
    Count { min: u64, max: u64 },
    /// A duration: plain (fractional) seconds or `250ms`, `90s`, `15m`, `2h`, `7d`.
    /// `allow_zero` says whether 0 is a valid value.
    Seconds { allow_zero: bool },
    /// A TCP port, 0-65535.
    Port,
    /// One of a closed list of words.
    Choice(&'static [&'static str]),
}

/// One configuration setting: its variable, its flag, its default and its rule.
#[derive(Debug)]
pub struct Setting {
    pub var: &'static str,
    pub flag: &'static str,
    pub default: Option<&'static str>,
    pub kind: Kind,
    pub help: &'static str,
}

impl Setting {
    /// The placeholder shown after the flag in help text.
    pub fn metavar(&self) -> &'static str {
        match self.kind {
            Kind::DatabaseUrl => "URL",
            Kind::Text => "TEXT",
            Kind::Count { .. } => "N",
            Kind::Seconds { .. } => "SECONDS",
            Kind::Port => "PORT",
            Kind::Choice(_) => "WORD",
        }
    }
}

macro_rules! setting {
    ($name:ident, $var:literal, $flag:literal, $default:expr, $kind:expr, $help:literal) => {
        pub const $name: Setting = Setting { var: $var, flag: $flag, default: $default, kind: $kind, help: $help };
    };
}

setting!(
    DATABASE_URL,
    "DATABASE_URL",
    "database-url",
    None,
    Kind::DatabaseUrl,
    "PostgreSQL to use: postgres://, postgresql://, postgresql+psycopg(2):// or libpq key=value. Required."
);
setting!(
    WORKER_ID,
    "OUTBOX_WORKER_ID",
    "worker-id",
    Some("chronicle"),
    Kind::Text,
    "Name of this worker in claimed_by, logs and the worker_id label."
);
setting!(
    METRICS_PORT,
    "OUTBOX_METRICS_PORT",
    "metrics-port",
    Some("9110"),
    Kind::Port,
    "Port of the metrics endpoint; 0 turns it off."
);
setting!(
    METRICS_BIND,
    "OUTBOX_METRICS_BIND",
    "metrics-bind",
    Some("127.0.0.1"),
    Kind::Text,
    "Address the metrics endpoint listens on (0.0.0.0 in containers)."
);
setting!(
    BATCH_SIZE,
    "OUTBOX_BATCH_SIZE",
    "batch-size",
    Some("50"),
    Kind::Count { min: 1, max: 10_000 },
    "Outbox rows claimed per batch (1-10000)."
);
setting!(
    POLL_INTERVAL,
    "OUTBOX_POLL_INTERVAL_SECONDS",
    "poll-interval-seconds",
    Some("0.2"),
    Kind::Seconds { allow_zero: false },
    "Fallback poll interval when idle; the listener wakes workers sooner."
);
setting!(
    LEASE,
    "OUTBOX_LEASE_SECONDS",
    "lease-seconds",
    Some("30"),
    Kind::Seconds { allow_zero: false },
    "How long a claim holds its rows before the reclaim loop may take them back."
);
setting!(
    MAX_ATTEMPTS,
    "OUTBOX_MAX_ATTEMPTS",
    "max-attempts",
    Some("10"),
    Kind::Count { min: 1, max: 1_000 },
    "Claims of one row before it ends failed with max_attempts_exceeded (1-1000)."
);
setting!(
    BASE_BACKOFF,
    "OUTBOX_BASE_BACKOFF_SECONDS",
    "base-backoff-seconds",
    Some("0.5"),
    Kind::Seconds { allow_zero: false },
    "First retry delay after a transient failure; doubles each attempt."
);
setting!(
    MAX_BACKOFF,
    "OUTBOX_MAX_BACKOFF_SECONDS",
    "max-backoff-seconds",
    Some("30"),
    Kind::Seconds { allow_zero: false },
    "Longest retry delay; must be at least the base backoff."
);
setting!(
    RECLAIM_INTERVAL,
    "OUTBOX_RECLAIM_INTERVAL_SECONDS",
    "reclaim-interval-seconds",
    Some("5"),
    Kind::Seconds { allow_zero: false },
    "How often expired leases are returned to pending."
);
setting!(
    MAX_PROCESSING,
    "OUTBOX_MAX_PROCESSING_SECONDS",
    "max-processing-seconds",
    Some("600"),
    Kind::Seconds { allow_zero: false },
    "A row processing longer than this since its claim is stuck and reclaimed."
);
setting!(
    RUN_SECONDS,
    "OUTBOX_RUN_SECONDS",
    "run-seconds",
    None,
    Kind::Seconds { allow_zero: false },
    "Run this long, then stop cleanly and exit 0 (smoke runs). Unset: run until stopped."
);
setting!(
    CONCURRENCY,
    "OUTBOX_CONCURRENCY",
    "concurrency",
    Some("1"),
    Kind::Count { min: 1, max: 64 },
    "Claim threads in this process, each with its own connection (1-64)."
);
setting!(
    STATEMENT_TIMEOUT,
    "OUTBOX_STATEMENT_TIMEOUT_SECONDS",
    "statement-timeout-seconds",
    Some("30"),
    Kind::Seconds { allow_zero: false },
    "Statement timeout of the worker's database sessions."
);
setting!(
    LOG_FORMAT,
    "CHRONICLE_LOG_FORMAT",
    "log-format",
    Some("text"),
    Kind::Choice(&["text", "json"]),
    "Log line format on stderr: text, or json (one object per line)."
);

setting!(
    DONE_RETENTION,
    "OUTBOX_DONE_RETENTION_SECONDS",
    "done-retention-seconds",
    None,
    Kind::Seconds { allow_zero: false },
    "Delete done outbox rows processed longer ago than this (in small batches). Unset: keep them."
);
setting!(
    LISTEN,
    "OUTBOX_LISTEN",
    "listen",
    Some("on"),
    Kind::Choice(&["on", "off"]),
    "Wake idle claim threads on NOTIFY (on), or rely on polling alone (off)."
);
setting!(
    MAX_EVENT_BYTES,
    "OUTBOX_MAX_EVENT_BYTES",
    "max-event-bytes",
    Some("16777216"),
    Kind::Count { min: 1024, max: 1 << 30 },
    "Largest event loaded, in bytes of its text (16 MiB, as append); a larger one fails invalid_payload unread."
);
setting!(
    BATCH_MAX_BYTES,
    "OUTBOX_BATCH_MAX_BYTES",
    "batch-max-bytes",
    Some("33554432"),
    Kind::Count { min: 1024, max: 1 << 32 },
    "A claim stops adding rows once their events' text passes this many bytes (at least one row)."
);

/// Every setting the worker reads, in help order.
pub const WORKER_SETTINGS: &[&Setting] = &[
    &DATABASE_URL,
    &WORKER_ID,
    &METRICS_PORT,
    &METRICS_BIND,
    &BATCH_SIZE,
    &POLL_INTERVAL,
    &LEASE,
    &MAX_ATTEMPTS,
    &BASE_BACKOFF,
    &MAX_BACKOFF,
    &RECLAIM_INTERVAL,
    &MAX_PROCESSING,
    &RUN_SECONDS,
    &CONCURRENCY,
    &STATEMENT_TIMEOUT,
    &DONE_RETENTION,
    &LISTEN,
    &MAX_EVENT_BYTES,
    &BATCH_MAX_BYTES,
];

/// Where a value came from, so an error can name exactly what the user set.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Origin {
    Flag,
    Var,
    Default,
}

/// The flags a command received for its settings, plus the environment. Flags win.
#[derive(Debug, Clone)]
pub struct Sources<'a> {
    env: &'a Env,
    flags: BTreeMap<&'static str, String>,
}

impl<'a> Sources<'a> {
    pub fn new(env: &'a Env) -> Sources<'a> {
        Sources { env, flags: BTreeMap::new() }
    }

    /// Records a flag's value (the last one given wins, as usual for flags).
    pub fn set_flag(&mut self, setting: &Setting, value: String) {
        self.flags.insert(setting.flag, value);
    }

    fn raw(&self, s: &Setting) -> Option<(String, Origin)> {
        if let Some(v) = self.flags.get(s.flag) {
            return Some((v.clone(), Origin::Flag));
        }
        if let Some(v) = self.env.get(s.var) {
            return Some((v.to_string(), Origin::Var));
        }
        s.default.map(|d| (d.to_string(), Origin::Default))
    }

    fn invalid(s: &Setting, origin: Origin, shown: &str, why: &str) -> AppError {
        let name = match origin {
            Origin::Flag => format!("--{}", s.flag),
            Origin::Var => s.var.to_string(),
            Origin::Default => format!("the default of {}", s.var),
        };
        AppError::Usage(format!("invalid {name} {shown:?}: {why}"))
    }

    /// The database URL, required.
    pub fn database_url(&self) -> Result<DbUrl> {
        let s = &DATABASE_URL;
        match self.raw(s) {
            None => Err(AppError::Usage(format!(
                "{} is not set: set it (or pass --{}) to the PostgreSQL database to use, \
                 e.g. postgresql://user:password@localhost:5432/dbname",
                s.var, s.flag
            ))),
            Some((v, origin)) => DbUrl::parse(&v).map_err(|why| {
                // A value that is neither a URL nor key=value pairs may be a pasted
                // password: it is not repeated back.
                if v.contains("://") || v.contains('=') || v.trim().is_empty() {
                    Self::invalid(s, origin, &mask_password(&v), &why)
                } else {
                    let name = if origin == Origin::Flag { format!("--{}", s.flag) } else { s.var.to_string() };
                    AppError::Usage(format!("invalid {name} (value not shown, it may be a secret): {why}"))
                }
            }),
        }
    }

    pub fn text(&self, s: &Setting) -> Result<Option<String>> {
        match self.raw(s) {
            None => Ok(None),
            Some((v, origin)) if v.trim().is_empty() => Err(Self::invalid(s, origin, &v, "is empty")),
            Some((v, _)) => Ok(Some(v)),
        }
    }

    pub fn count(&self, s: &Setting) -> Result<Option<u64>> {
        let (min, max) = match s.kind {
            Kind::Count { min, max } => (min, max),
            _ => (0, u64::MAX),
        };
        self.parsed(s, |v| parse_count(v, min, max))
    }

    pub fn port(&self, s: &Setting) -> Result<Option<u16>> {
        self.parsed(s, |v| parse_count(v, 0, 65_535).map(|n| n as u16))
    }

    pub fn seconds(&self, s: &Setting) -> Result<Option<Duration>> {
        let allow_zero = matches!(s.kind, Kind::Seconds { allow_zero: true });
        self.parsed(s, |v| {
            let d = parse_duration(v)?;
            if d.is_zero() && !allow_zero {
                return Err("must be greater than 0".to_string());
            }
            Ok(d)
        })
    }

    pub fn choice(&self, s: &Setting) -> Result<Option<String>> {
        let words = match s.kind {
            Kind::Choice(w) => w,
            _ => &[],
        };
        self.parsed(s, |v| {
            if words.contains(&v) {
                Ok(v.to_string())
            } else {
                Err(format!("must be one of: {}", words.join(", ")))
            }
        })
    }

    fn parsed<T>(&self, s: &Setting, f: impl Fn(&str) -> Result<T, String>) -> Result<Option<T>> {
        match self.raw(s) {
            None => Ok(None),
            Some((v, origin)) => f(v.trim()).map(Some).map_err(|why| Self::invalid(s, origin, &v, &why)),
        }
    }
}

/// Parses a whole number in `min..=max`.
pub fn parse_count(v: &str, min: u64, max: u64) -> Result<u64, String> {
    if v.is_empty() {
        return Err("is empty".into());
    }
    let n: u64 = v.parse().map_err(|_| "is not a whole number".to_string())?;
    if n < min || n > max {
        return Err(format!("must be between {min} and {max}"));
    }
    Ok(n)
}

/// The longest duration we accept anywhere: a year. Past it, a typo is likelier than intent.
const MAX_DURATION_SECS: f64 = 366.0 * 86_400.0;

/// Parses plain seconds (`0.2`, `30`) or a number with a unit (`250ms`, `90s`, `15m`,
/// `2h`, `7d`).
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    if v.is_empty() {
        return Err("is empty".into());
    }
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = v.strip_suffix('h') {
        (n, 3_600.0)
    } else if let Some(n) = v.strip_suffix('d') {
        (n, 86_400.0)
    } else {
        (v, 1.0)
    };
    let is_decimal = !num.is_empty()
        && num.chars().all(|c| c.is_ascii_digit() || c == '.')
        && num.chars().filter(|&c| c == '.').count() <= 1
        && num != ".";
    if !is_decimal {
        return Err("is not a duration (seconds such as 0.5, or 250ms, 90s, 15m, 2h, 7d)".into());
    }
    let n: f64 = num.parse().map_err(|_| "is not a number".to_string())?;
    let secs = n * scale;
    if !secs.is_finite() || secs > MAX_DURATION_SECS {
        return Err("is longer than a year".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// How to secure the connection, as libpq's `sslmode` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A validated `DATABASE_URL`: the driver's configuration plus the TLS settings that
/// libpq understands and the driver does not, and a masked form safe to print.
#[derive(Clone)]
pub struct DbUrl {
    pub config: postgres::Config,
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<String>,
    masked: String,
}

impl std::fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbUrl({})", self.masked)
    }
}

impl std::fmt::Display for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked)
    }
}

const URL_SCHEMES: &[&str] = &["postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"];

impl DbUrl {
    /// Accepts `postgres://`, `postgresql://`, the SQLAlchemy forms
    /// `postgresql+psycopg://` and `postgresql+psycopg2://`, and libpq `key=value`
    /// strings (a `host` starting with `/` is a unix-socket directory).
    pub fn parse(raw: &str) -> Result<DbUrl, String> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err("is empty".into());
        }
        let mut ssl_mode = SslMode::Prefer;
        let mut ssl_root_cert = None;
        let mut take_tls = |key: &str, value: &str| -> Result<bool, String> {
            match key {
                "sslmode" => {
                    ssl_mode = match value {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => return Err(format!("unknown sslmode {other:?}")),
                    };
                    Ok(true)
                }
                "sslrootcert" => {
                    ssl_root_cert = Some(value.to_string());
                    Ok(true)
                }
                _ => Ok(false),
            }
        };

        let driver_text = if let Some((scheme, rest)) = raw.split_once("://") {
            if !URL_SCHEMES.contains(&scheme) {
                return Err(format!(
                    "unsupported scheme {scheme:?}: use postgres://, postgresql://, \
                     postgresql+psycopg:// or postgresql+psycopg2://"
                ));
            }
            let (base, query) = match rest.split_once('?') {
                Some((b, q)) => (b, Some(q)),
                None => (rest, None),
            };
            let mut kept = Vec::new();
            for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if !take_tls(k, &percent_decode(v))? {
                    kept.push(pair);
                }
            }
            let mut s = format!("postgresql://{base}");
            if !kept.is_empty() {
                s.push('?');
                s.push_str(&kept.join("&"));
            }
            s
        } else if raw.contains('=') {
            let pairs = parse_key_values(raw)?;
            let mut s = String::new();
            for (k, v) in pairs {
                if take_tls(&k, &v)? {
                    continue;
                }
                let quoted = v.replace('\\', "\\\\").replace('\'', "\\'");
                s.push_str(&format!("{k}='{quoted}' "));
            }
            s
        } else {
            return Err("is not a PostgreSQL connection string: expected postgres://, postgresql://, \
                 postgresql+psycopg://, postgresql+psycopg2:// or libpq key=value pairs"
                .into());
        };

        let mut config: postgres::Config =
            driver_text.parse().map_err(|e: postgres::Error| format!("is not a valid connection string: {e}"))?;
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            #[cfg(unix)]
            config.host_path("/var/run/postgresql");
            #[cfg(not(unix))]
            config.host("localhost");
        }
        if config.get_user().is_none() {
            let user = std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .or_else(|_| std::env::var("USERNAME"))
                .unwrap_or_else(|_| "postgres".to_string());
            config.user(&user);
        }
        if config.get_application_name().is_none() {
            config.application_name("chronicle");
        }
        // The driver's mode says whether to ask the server for TLS; what is checked of
        // its certificate is the connector's part (db::tls). Unix sockets never use TLS
        // (the server does not offer it there), as with libpq.
        let socket_only = config.get_hostaddrs().is_empty() && config.get_hosts().iter().all(is_unix_socket);
        config.ssl_mode(match ssl_mode {
            _ if socket_only => postgres::config::SslMode::Disable,
            SslMode::Disable => postgres::config::SslMode::Disable,
            SslMode::Prefer => postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => postgres::config::SslMode::Require,
        });
        Ok(DbUrl { config, ssl_mode, ssl_root_cert, masked: mask_password(raw) })
    }

    /// The same server and credentials, another database.
    pub fn with_dbname(&self, dbname: &str) -> DbUrl {
        let mut other = self.clone();
        other.config.dbname(dbname);
        other.masked = format!("{} (database {dbname})", self.masked);
        other
    }
}

fn is_unix_socket(host: &postgres::config::Host) -> bool {
    !matches!(host, postgres::config::Host::Tcp(_))
}

/// Splits a libpq `key=value` string; values may be single-quoted with `\` escapes.
fn parse_key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("has a key without a value: {key:?}"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("has an unterminated quoted value for {key:?}")),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("has an unterminated quoted value for {key:?}")),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    if let Some(e) = chars.next() {
                        value.push(e);
                    }
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces the password in a connection string (URL userinfo, `?password=` or libpq
/// `password=`) with `***`. Works on anything, valid or not, so errors can use it.
pub fn mask_password(raw: &str) -> String {
    let mut s = raw.to_string();
    if let Some(start) = s.find("://").map(|i| i + 3) {
        let end = s[start..].find(['/', '?']).map_or(s.len(), |i| start + i);
        if let Some(at) = s[start..end].rfind('@').map(|i| start + i) {
            if let Some(colon) = s[start..at].find(':').map(|i| start + i) {
                s.replace_range(colon + 1..at, "***");
            }
        }
    }
    // `password=...` in a query string or a key=value string, quoted or not.
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(pos) = rest.find("password") {
        let (before, after) = rest.split_at(pos);
        out.push_str(before);
        out.push_str("password");
        let after = &after["password".len()..];
        let trimmed = after.trim_start();
        let boundary_ok = before.is_empty() || before.ends_with(|c: char| c.is_whitespace() || c == '?' || c == '&');
        if boundary_ok && trimmed.starts_with('=') {
            let value = trimmed[1..].trim_start();
            out.push_str("=***");
            let consumed = if let Some(q) = value.strip_prefix('\'') {
                let mut end = q.len();
                let mut esc = false;
                for (i, c) in q.char_indices() {
                    if esc {
                        esc = false;
                    } else if c == '\\' {
                        esc = true;
                    } else if c == '\'' {
                        end = i + 1;
                        break;
                    }
                }
                1 + end.min(q.len())
            } else {
                value.find(|c: char| c.is_whitespace() || c == '&').unwrap_or(value.len())
            };
            rest = &value[consumed.min(value.len())..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The worker's validated configuration (DESIGN.md §4).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub database_url: DbUrl,
    pub worker_id: String,
    pub metrics_port: u16,
    pub metrics_bind: String,
    pub batch_size: u32,
    pub poll_interval: Duration,
    pub lease: Duration,
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    pub reclaim_interval: Duration,
    pub max_processing: Duration,
    pub run_for: Option<Duration>,
    pub concurrency: u32,
    pub statement_timeout: Duration,
    /// `OUTBOX_DONE_RETENTION_SECONDS`: when set, the worker prunes older done rows.
    pub done_retention: Option<Duration>,
    /// `OUTBOX_LISTEN`: whether a listener connection wakes idle claim threads.
    pub listen: bool,
    /// `OUTBOX_MAX_EVENT_BYTES` and `OUTBOX_BATCH_MAX_BYTES`.
    pub sizes: crate::outbox::SizeLimits,
}

/// Reads a setting that has a default, so it is always present.
fn required<T>(v: Result<Option<T>>, s: &Setting) -> Result<T> {
    v?.ok_or_else(|| AppError::Usage(format!("{} is required", s.var)))
}

impl WorkerConfig {
    pub fn resolve(src: &Sources) -> Result<WorkerConfig> {
        let cfg = WorkerConfig {
            database_url: src.database_url()?,
            worker_id: required(src.text(&WORKER_ID), &WORKER_ID)?,
            metrics_port: required(src.port(&METRICS_PORT), &METRICS_PORT)?,
            metrics_bind: required(src.text(&METRICS_BIND), &METRICS_BIND)?,
            batch_size: required(src.count(&BATCH_SIZE), &BATCH_SIZE)? as u32,
            poll_interval: required(src.seconds(&POLL_INTERVAL), &POLL_INTERVAL)?,
            lease: required(src.seconds(&LEASE), &LEASE)?,
            max_attempts: required(src.count(&MAX_ATTEMPTS), &MAX_ATTEMPTS)? as u32,
            base_backoff: required(src.seconds(&BASE_BACKOFF), &BASE_BACKOFF)?,
            max_backoff: required(src.seconds(&MAX_BACKOFF), &MAX_BACKOFF)?,
            reclaim_interval: required(src.seconds(&RECLAIM_INTERVAL), &RECLAIM_INTERVAL)?,
            max_processing: required(src.seconds(&MAX_PROCESSING), &MAX_PROCESSING)?,
            run_for: src.seconds(&RUN_SECONDS)?,
            concurrency: required(src.count(&CONCURRENCY), &CONCURRENCY)? as u32,
            statement_timeout: required(src.seconds(&STATEMENT_TIMEOUT), &STATEMENT_TIMEOUT)?,
            done_retention: src.seconds(&DONE_RETENTION)?,
            listen: required(src.choice(&LISTEN), &LISTEN)? == "on",
            sizes: crate::outbox::SizeLimits {
                max_event_bytes: required(src.count(&MAX_EVENT_BYTES), &MAX_EVENT_BYTES)?,
                batch_max_bytes: required(src.count(&BATCH_MAX_BYTES), &BATCH_MAX_BYTES)?,
            },
        };
        if cfg.worker_id.chars().count() > 200 {
            return Err(AppError::Usage(format!("invalid {}: longer than 200 characters", WORKER_ID.var)));
        }
        if cfg.max_backoff < cfg.base_backoff {
            return Err(AppError::Usage(format!(
                "invalid {} {:?}: must be at least {} ({:?})",
                MAX_BACKOFF.var,
                cfg.max_backoff.as_secs_f64(),
                BASE_BACKOFF.var,
                cfg.base_backoff.as_secs_f64()
            )));
        }
        Ok(cfg)
    }
}

/// Renders one help line per setting: flag, variable, default and meaning.
pub fn settings_help(settings: &[&Setting]) -> String {
    let mut out = String::new();
    for s in settings {
        let default = match s.default {
            Some(d) => format!("default {d}"),
            None if s.var == DATABASE_URL.var => "required".to_string(),
            None => "unset".to_string(),
        };
        out.push_str(&format!("  --{} {:<8} [{}; {}]\n      {}\n", s.flag, s.metavar(), s.var, default, s.help));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(env: &[(&str, &str)], flags: &[(&Setting, &str)]) -> Result<WorkerConfig> {
        let mut pairs = vec![("DATABASE_URL", "postgres://u:secret@localhost/db")];
        pairs.extend_from_slice(env);
        let env = Env::from_pairs(pairs);
        let mut src = Sources::new(&env);
        for (s, v) in flags {
            src.set_flag(s, v.to_string());
        }
        WorkerConfig::resolve(&src)
    }

    fn usage_err(r: Result<WorkerConfig>) -> String {
        match r {
            Err(AppError::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_runbook_values() {
        let c = worker(&[], &[]).unwrap();
        assert_eq!(c.batch_size, 50);
        assert_eq!(c.poll_interval, Duration::from_millis(200));
        assert_eq!(c.lease, Duration::from_secs(30));
        assert_eq!(c.max_attempts, 10);
        assert_eq!(c.base_backoff, Duration::from_millis(500));
        assert_eq!(c.max_backoff, Duration::from_secs(30));
        assert_eq!(c.reclaim_interval, Duration::from_secs(5));
        assert_eq!(c.max_processing, Duration::from_secs(600));
        assert_eq!(c.metrics_port, 9110);
        assert_eq!(c.metrics_bind, "127.0.0.1");
        assert_eq!(c.concurrency, 1);
        assert_eq!(c.statement_timeout, Duration::from_secs(30));
        assert_eq!(c.run_for, None);
        assert_eq!(c.done_retention, None);
        assert!(c.listen);
    }

    #[test]
    fn variables_are_read_and_flags_win() {
        let c = worker(
            &[("OUTBOX_BATCH_SIZE", "200"), ("OUTBOX_RUN_SECONDS", "2"), ("OUTBOX_LEASE_SECONDS", "12.5")],
            &[(&BATCH_SIZE, "7")],
        )
        .unwrap();
        assert_eq!(c.batch_size, 7);
        assert_eq!(c.run_for, Some(Duration::from_secs(2)));
        assert_eq!(c.lease, Duration::from_millis(12_500));
    }

    #[test]
    fn every_numeric_variable_refuses_empty_non_numeric_and_out_of_range() {
        let cases: &[(&str, &[&str])] = &[
            ("OUTBOX_BATCH_SIZE", &["", "abc", "0", "-1", "1.5", "10001"]),
            ("OUTBOX_MAX_ATTEMPTS", &["", "x", "0", "1001"]),
            ("OUTBOX_CONCURRENCY", &["", "two", "0", "65"]),
            ("OUTBOX_METRICS_PORT", &["", "http", "-1", "65536"]),
            ("OUTBOX_POLL_INTERVAL_SECONDS", &["", "fast", "0", "-0.2", "1e3", "400d"]),
            ("OUTBOX_LEASE_SECONDS", &["", "x", "0"]),
            ("OUTBOX_BASE_BACKOFF_SECONDS", &["", "x", "0"]),
            ("OUTBOX_MAX_BACKOFF_SECONDS", &["", "x", "0"]),
            ("OUTBOX_RECLAIM_INTERVAL_SECONDS", &["", "x", "0"]),
            ("OUTBOX_MAX_PROCESSING_SECONDS", &["", "x", "0"]),
            ("OUTBOX_RUN_SECONDS", &["", "soon", "0"]),
            ("OUTBOX_STATEMENT_TIMEOUT_SECONDS", &["", "x", "0"]),
            ("OUTBOX_DONE_RETENTION_SECONDS", &["", "x", "0"]),
            ("OUTBOX_LISTEN", &["", "yes", "1"]),
            ("OUTBOX_WORKER_ID", &["", "   "]),
        ];
        for (var, values) in cases {
            for value in *values {
                let msg = usage_err(worker(&[(var, value)], &[]));
                assert!(msg.contains(var), "{var}={value:?}: message {msg:?} does not name it");
                assert!(msg.contains(&format!("{value:?}")), "{var}={value:?}: message {msg:?} lacks the value");
            }
        }
    }

    #[test]
    fn a_bad_flag_is_named_as_a_flag() {
        let msg = usage_err(worker(&[("OUTBOX_BATCH_SIZE", "5")], &[(&BATCH_SIZE, "lots")]));
        assert!(msg.contains("--batch-size") && msg.contains("\"lots\""), "{msg}");
    }

    #[test]
    fn max_backoff_below_base_is_refused() {
        let msg = usage_err(worker(&[("OUTBOX_BASE_BACKOFF_SECONDS", "5"), ("OUTBOX_MAX_BACKOFF_SECONDS", "1")], &[]));
        assert!(msg.contains("OUTBOX_MAX_BACKOFF_SECONDS"), "{msg}");
    }

    #[test]
    fn durations_accept_fractions_and_units() {
        assert_eq!(parse_duration("0.2").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        for bad in ["", "s", ".", "1..2", "1x", "-5", "NaN", "inf", "1e9"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn database_url_forms_are_accepted() {
        for url in [
            "postgres://u:p@localhost:5432/db",
            "postgresql://u:p@localhost/db",
            "postgresql+psycopg://wordloom:wordloom@localhost:5435/wordloom_test",
            "postgresql+psycopg2://u:p@127.0.0.1:5432/db?sslmode=disable",
            "host=localhost port=5432 user=u password=p dbname=db",
            "host=/var/run/postgresql user=postgres dbname=db",
            "host=localhost user=u password='a b\\'c' dbname=db sslmode=prefer",
        ] {
            let parsed = DbUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(!parsed.to_string().contains("p@") || !url.contains(":p@"), "{parsed}");
        }
        let sock = DbUrl::parse("host=/var/run/postgresql user=postgres dbname=db").unwrap();
        assert!(matches!(sock.config.get_hosts()[0], postgres::config::Host::Unix(_)));
        let sa = DbUrl::parse("postgresql+psycopg://wordloom:wordloom@localhost:5435/wordloom_test").unwrap();
        assert_eq!(sa.config.get_ports(), &[5435]);
        assert_eq!(sa.config.get_dbname(), Some("wordloom_test"));
        assert_eq!(sa.config.get_password(), Some(&b"wordloom"[..]));
    }

    #[test]
    fn tls_settings_are_taken_from_both_forms() {
        use postgres::config::SslMode as Driver;
        let cases: &[(&str, SslMode, Option<&str>, Driver)] = &[
            ("postgres://u@db.example/x", SslMode::Prefer, None, Driver::Prefer),
            ("postgres://u@db.example/x?sslmode=allow", SslMode::Prefer, None, Driver::Prefer),
            ("postgres://u@db.example/x?sslmode=disable", SslMode::Disable, None, Driver::Disable),
            ("postgres://u@db.example/x?sslmode=require", SslMode::Require, None, Driver::Require),
            (
                "postgresql+psycopg://u@db.example/x?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca%20x.crt",
                SslMode::VerifyCa,
                Some("/etc/ca x.crt"),
                Driver::Require,
            ),
            (
                "host=db.example user=u dbname=x sslmode=verify-full sslrootcert='/etc/ca x.crt'",
                SslMode::VerifyFull,
                Some("/etc/ca x.crt"),
                Driver::Require,
            ),
            // The server offers no TLS on a unix socket; libpq does not ask there.
            ("host=/var/run/postgresql user=u dbname=x sslmode=require", SslMode::Require, None, Driver::Disable),
        ];
        for (raw, mode, root, driver) in cases {
            let u = DbUrl::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(
                (u.ssl_mode, u.ssl_root_cert.as_deref(), u.config.get_ssl_mode()),
                (*mode, *root, *driver),
                "{raw}"
            );
        }
    }

    #[test]
    fn bad_database_urls_are_refused_with_the_password_masked() {
        for url in [
            "mysql://u:hunter2@localhost/db",
            "localhost:5432",
            "hunter2",
            "postgres://u:hunter2@localhost:notaport/db",
            "host=localhost password=hunter2 bogus=1",
            "host=localhost password='hunter2",
            "postgres://u:hunter2@localhost/db?sslmode=sometimes",
        ] {
            let env = Env::from_pairs([("DATABASE_URL", url)]);
            let err = Sources::new(&env).database_url().unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.exit_code(), 2, "{url}");
            assert!(msg.contains("DATABASE_URL"), "{msg}");
            assert!(!msg.contains("hunter2"), "password leaked: {msg}");
        }
        let env = Env::from_pairs([]);
        let err = Sources::new(&env).database_url().unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("DATABASE_URL is not set"));
    }

    #[test]
    fn masking_covers_every_form() {
        assert_eq!(mask_password("postgres://u:hunter2@h/db"), "postgres://u:***@h/db");
        assert_eq!(mask_password("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(mask_password("postgres://u@h/db?password=hunter2&x=1"), "postgres://u@h/db?password=***&x=1");
        assert_eq!(mask_password("host=h password=hunter2 user=u"), "host=h password=*** user=u");
        assert_eq!(mask_password("host=h password = 'hun ter2' user=u"), "host=h password=*** user=u");
        assert_eq!(mask_password("postgres://h/db"), "postgres://h/db");
        let dbu = DbUrl::parse("postgresql+psycopg://wordloom:hunter2@localhost:5435/x").unwrap();
        assert!(!format!("{dbu} {dbu:?}").contains("hunter2"));
    }
}
