//! Configuration: environment variables and flags turned into validated values.
//!
//! Everything here is pure: it reads a snapshot of the environment (a map) and the
//! flags a command received, and never touches the network, so every rule is
//! unit-tested from a map. The variable names are a contract (docs/DESIGN.md §4): each one
//! has a flag named after it without its prefix, and the flag wins.

mod conninfo;
pub mod pgpass;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

pub use conninfo::mask_password;
use percent_encoding::percent_decode_str;

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
    "PostgreSQL to use: postgres://, postgresql://, postgresql+psycopg(2):// or libpq key=value. Required.\n      \
     Without a password in it: PGPASSWORD, else the password file (passfile=, PGPASSFILE, ~/.pgpass)."
);
setting!(
    READ_DATABASE_URL,
    "CHRONICLE_READ_DATABASE_URL",
    "read-database-url",
    None,
    Kind::DatabaseUrl,
    "A replica for the read-only commands (entries, status, show, verify without --fix, libraries),\n      \
     in the same forms; its sessions are read-only. DATABASE_URL when unset."
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
    None,
    Kind::Count { min: 1, max: 64 },
    "Claim threads in this process, each with its own connection (1-64). Unset: two per CPU the process may use (cgroup limits included), at most 4."
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

/// Reads a password file: the disk, or a test's data.
pub type ReadFile<'a> = &'a dyn Fn(&Path) -> std::io::Result<pgpass::FileRead>;

/// The flags a command received for its settings, plus the environment. Flags win.
#[derive(Clone)]
pub struct Sources<'a> {
    env: &'a Env,
    flags: BTreeMap<&'static str, String>,
    read_file: ReadFile<'a>,
}

impl std::fmt::Debug for Sources<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Flag values are not shown: --database-url may carry a password.
        f.debug_struct("Sources").field("flags", &self.flags.keys().collect::<Vec<_>>()).finish()
    }
}

/// The warning for a password given on the command line.
pub const PASSWORD_ON_COMMAND_LINE: &str = "--database-url carries a password, which other local users can read \
     (ps, /proc); set DATABASE_URL, PGPASSWORD or a password file (PGPASSFILE, ~/.pgpass) instead";

impl<'a> Sources<'a> {
    pub fn new(env: &'a Env) -> Sources<'a> {
        Sources { env, flags: BTreeMap::new(), read_file: &pgpass::read_from_disk }
    }

    /// Reads password files with `read` instead of from disk.
    pub fn with_file_reader(mut self, read: ReadFile<'a>) -> Sources<'a> {
        self.read_file = read;
        self
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
        AppError::usage(format!("invalid {name} {shown:?}: {why}"))
    }

    /// The database URL, required, with its password filled in from `PGPASSWORD` or the
    /// password file when it has none. Logs the warnings of `resolve_database_url`.
    pub fn database_url(&self) -> Result<DbUrl> {
        let (url, warnings) = self.resolve_database_url()?;
        for w in warnings {
            log::warn!("{w}");
        }
        Ok(url)
    }

    /// The database URL and the warnings for the user: a password on the command line
    /// (readable by other local users), a password file ignored.
    pub fn resolve_database_url(&self) -> Result<(DbUrl, Vec<String>)> {
        let (mut url, origin) = self.parse_database_url()?;
        let mut warnings = Vec::new();
        if origin == Origin::Flag && url.has_password() {
            warnings.push(PASSWORD_ON_COMMAND_LINE.to_string());
        }
        warnings.extend(url.fill_password(self.env, self.read_file));
        Ok((url, warnings))
    }

    /// Where the read-only commands read: `CHRONICLE_READ_DATABASE_URL` (a replica) when
    /// set, in read-only sessions, else `DATABASE_URL`. Logs the warnings of either.
    pub fn read_database_url(&self) -> Result<DbUrl> {
        if self.raw(&READ_DATABASE_URL).is_none() {
            return self.database_url();
        }
        let (mut url, origin) = self.parse_url(&READ_DATABASE_URL)?;
        if origin == Origin::Flag && url.has_password() {
            log::warn!("{}", PASSWORD_ON_COMMAND_LINE.replace("--database-url", "--read-database-url"));
        }
        for w in url.fill_password(self.env, self.read_file) {
            log::warn!("{w}");
        }
        url.read_only();
        Ok(url)
    }

    fn parse_database_url(&self) -> Result<(DbUrl, Origin)> {
        self.parse_url(&DATABASE_URL)
    }

    fn parse_url(&self, s: &Setting) -> Result<(DbUrl, Origin)> {
        match self.raw(s) {
            None => Err(AppError::usage(format!(
                "{} is not set: set it (or pass --{}) to the PostgreSQL database to use, \
                 e.g. postgresql://user:password@localhost:5432/dbname",
                s.var, s.flag
            ))),
            Some((v, origin)) => DbUrl::parse_in(&v, self.env).map(|u| (u, origin)).map_err(|why| {
                // A value that is neither a URL nor key=value pairs may be a pasted
                // password: it is not repeated back.
                if v.contains("://") || v.contains('=') || v.trim().is_empty() {
                    Self::invalid(s, origin, &mask_password(&v), &why)
                } else {
                    let name = if origin == Origin::Flag { format!("--{}", s.flag) } else { s.var.to_string() };
                    AppError::usage(format!("invalid {name} (value not shown, it may be a secret): {why}"))
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
    /// `passfile=` of the connection string: the password file to use instead of
    /// `PGPASSFILE` or `~/.pgpass`.
    passfile: Option<String>,
    /// libpq's `connect_timeout`: how long a whole connection may take, the TCP connect
    /// and the startup exchange (TLS, authentication) included, per host tried.
    /// `CONNECT_TIMEOUT` when unset; `None` (wait indefinitely) for `connect_timeout=0`.
    pub connect_timeout: Option<Duration>,
    masked: String,
}

/// `connect_timeout` when the connection string does not set it (as libpq's
/// documentation recommends: a value that fits an unhurried network).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive and `tcp_user_timeout` defaults, for a connection string that does not
/// set them: a peer that goes silent mid-statement (a host gone, a network that drops
/// packets) is found after about a minute instead of the operating system's two hours.
/// Keepalive probes start after `KEEPALIVES_IDLE` without traffic, every
/// `KEEPALIVES_INTERVAL`, and `KEEPALIVES_COUNT` unanswered ones drop the connection;
/// data the peer has not acknowledged for `TCP_USER_TIMEOUT` drops it too (Linux).
pub const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
pub const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVES_COUNT: u32 = 3;
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// libpq's reading of `connect_timeout`: whole seconds; zero or negative is no limit; the
/// least limit is 2 s.
fn parse_connect_timeout(value: &str) -> Result<Option<Duration>, String> {
    let secs: i64 =
        value.trim().parse().map_err(|_| format!("connect_timeout {value:?} is not a whole number of seconds"))?;
    Ok((secs > 0).then(|| Duration::from_secs(secs.max(2) as u64)))
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

/// Why a key of a connection string is refused, without showing what may be a secret:
/// when the string holds a `password=`, an unknown key may be a piece of it (an
/// unencoded `&` or an unquoted space in the password).
fn unknown_key(key: &str, may_be_secret: bool) -> String {
    if may_be_secret {
        "has a parameter that is not a connection keyword (not shown: it may be part of the password; in a \
         URL write & in a password as %26, in key=value form quote the password)"
            .to_string()
    } else if conninfo::is_plain_word(key) {
        format!("has an unknown key {key:?}")
    } else {
        "has a key that is not a connection keyword (not shown)".to_string()
    }
}

impl DbUrl {
    /// Accepts `postgres://`, `postgresql://`, the SQLAlchemy forms
    /// `postgresql+psycopg://` and `postgresql+psycopg2://`, and libpq `key=value`
    /// strings (a `host` starting with `/` is a unix-socket directory). The user
    /// defaults to `PGUSER`, `USER` or `USERNAME` of the process.
    pub fn parse(raw: &str) -> Result<DbUrl, String> {
        DbUrl::parse_in(raw, &Env::from_process())
    }

    /// As `parse`, with the environment given. The password never reaches the driver's
    /// parser (whose errors may quote what they read): it is set on the configuration
    /// afterwards.
    pub fn parse_in(raw: &str, env: &Env) -> Result<DbUrl, String> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err("is empty".into());
        }
        let mut ssl_mode = SslMode::Prefer;
        let mut ssl_root_cert = None;
        let mut passfile = None;
        let mut connect_timeout = Some(CONNECT_TIMEOUT);
        let mut keepalives_count = None;
        let mut tcp_settings_given = Vec::new();
        let mut password: Option<Vec<u8>> = None;
        let mut url_user: Option<String> = None;
        // Settings the driver does not know: taken out of the text it parses.
        let mut take_ours = |key: &str, value: &str| -> Result<bool, String> {
            match key {
                // Ours: the driver's bounds only the TCP connect (set from ours below).
                "connect_timeout" => {
                    connect_timeout = parse_connect_timeout(value)?;
                    Ok(true)
                }
                // libpq's name; the driver knows it as keepalives_retries.
                "keepalives_count" | "keepalives_retries" => {
                    let n = value
                        .trim()
                        .parse::<u32>()
                        .map_err(|_| format!("{key} {value:?} is not a number of probes"))?;
                    keepalives_count = Some(n);
                    Ok(true)
                }
                "keepalives_idle" | "keepalives_interval" | "tcp_user_timeout" => {
                    tcp_settings_given.push(key.to_string());
                    Ok(false)
                }
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
                "passfile" => {
                    passfile = Some(value.to_string());
                    Ok(true)
                }
                // Passed on to the driver, which knows fewer values than libpq: refused
                // here by name rather than as "an invalid connection string".
                "target_session_attrs" => match value {
                    "any" | "read-write" | "read-only" => Ok(false),
                    other => Err(format!(
                        "unknown target_session_attrs {other:?}: use any, read-write (the primary of \
                         several hosts) or read-only"
                    )),
                },
                "load_balance_hosts" => match value {
                    "disable" | "random" => Ok(false),
                    other => Err(format!("unknown load_balance_hosts {other:?}: use disable or random")),
                },
                _ => Ok(false),
            }
        };
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();

        let driver_text = if let Some(parts) = conninfo::split_url(raw) {
            if !URL_SCHEMES.contains(&parts.scheme) {
                return Err(format!(
                    "unsupported scheme {:?}: use postgres://, postgresql://, postgresql+psycopg:// or \
                     postgresql+psycopg2://",
                    parts.scheme
                ));
            }
            if let Some((user, pw)) = parts.credentials() {
                url_user = Some(decode(user)).filter(|u| !u.is_empty());
                password = pw.map(|p| percent_decode_str(p).collect());
            }
            let pairs = conninfo::query_pairs(parts.query.unwrap_or(""));
            let has_secret = pairs.iter().any(|(k, _)| conninfo::is_secret_key(&decode(k)));
            let mut kept = Vec::new();
            for (k, v) in &pairs {
                let key = decode(k);
                if key == "password" {
                    password = Some(percent_decode_str(v).collect());
                    continue;
                }
                if !conninfo::is_keyword(&key) || (has_secret && v.is_empty()) {
                    return Err(unknown_key(&key, has_secret));
                }
                if !take_ours(&key, &decode(v))? {
                    kept.push(format!("{k}={v}"));
                }
            }
            let mut s = format!("postgresql://{}", parts.hosts);
            if let Some(path) = parts.path {
                s.push('/');
                s.push_str(path);
            }
            if !kept.is_empty() {
                s.push('?');
                s.push_str(&kept.join("&"));
            }
            s
        } else if raw.contains('=') {
            let pairs = conninfo::parse_key_values(raw).map_err(|e| e.describe())?;
            let has_secret = pairs.iter().any(|p| conninfo::is_secret_key(&p.key));
            let mut s = String::new();
            for pair in &pairs {
                if pair.key == "password" {
                    password = Some(pair.value.clone().into_bytes());
                    continue;
                }
                if !conninfo::is_keyword(&pair.key) {
                    return Err(unknown_key(&pair.key, has_secret));
                }
                if take_ours(&pair.key, &pair.value)? {
                    continue;
                }
                let quoted = pair.value.replace('\\', "\\\\").replace('\'', "\\'");
                s.push_str(&format!("{}='{quoted}' ", pair.key));
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
        // A user in the query wins over the URL's user information, as in libpq.
        if let (None, Some(u)) = (config.get_user(), &url_user) {
            config.user(u);
        }
        if config.get_user().is_none() {
            let user = ["PGUSER", "USER", "USERNAME"]
                .iter()
                .find_map(|v| env.get(v).filter(|u| !u.is_empty()))
                .unwrap_or("postgres");
            config.user(user);
        }
        // An empty password is no password (libpq then looks elsewhere).
        if let Some(p) = password.filter(|p| !p.is_empty()) {
            config.password(p);
        }
        if config.get_application_name().is_none() {
            config.application_name("chronicle");
        }
        // The driver's mode says whether to ask the server for TLS; what is checked of
        // its certificate is the connector's part (db::tls). Unix sockets never use TLS
        // (the server does not offer it there), as with libpq.
        match connect_timeout {
            Some(t) => config.connect_timeout(t),
            // The driver has no "indefinitely" to go back to: a day stands for it.
            None => config.connect_timeout(Duration::from_secs(86_400)),
        };
        config.keepalives_retries(keepalives_count.unwrap_or(KEEPALIVES_COUNT));
        if !tcp_settings_given.iter().any(|k| k == "keepalives_idle") {
            config.keepalives_idle(KEEPALIVES_IDLE);
        }
        if !tcp_settings_given.iter().any(|k| k == "keepalives_interval") {
            config.keepalives_interval(KEEPALIVES_INTERVAL);
        }
        if !tcp_settings_given.iter().any(|k| k == "tcp_user_timeout") {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        let socket_only = config.get_hostaddrs().is_empty() && config.get_hosts().iter().all(is_unix_socket);
        config.ssl_mode(match ssl_mode {
            _ if socket_only => postgres::config::SslMode::Disable,
            SslMode::Disable => postgres::config::SslMode::Disable,
            SslMode::Prefer => postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => postgres::config::SslMode::Require,
        });
        Ok(DbUrl { config, ssl_mode, ssl_root_cert, passfile, connect_timeout, masked: mask_password(raw) })
    }

    /// Makes every session read-only (`default_transaction_read_only`), on top of the
    /// string's own `options`: a replica's reader never writes, even where a server would
    /// let it.
    pub fn read_only(&mut self) {
        let options = match self.config.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{o} -c default_transaction_read_only=on"),
            _ => "-c default_transaction_read_only=on".to_string(),
        };
        self.config.options(&options);
    }

    /// Whether the connection string itself carries a password.
    pub fn has_password(&self) -> bool {
        self.config.get_password().is_some()
    }

    /// What the password file is searched for: the first host (the driver keeps one
    /// password for all the hosts of a multi-host URL), its port, the database (by
    /// default the user's name) and the user.
    pub fn password_target(&self) -> pgpass::Target {
        use postgres::config::Host;
        let host = match (self.config.get_hosts().first(), self.config.get_hostaddrs().first()) {
            (Some(Host::Tcp(h)), _) => Some(h.clone()),
            #[cfg(unix)]
            (Some(Host::Unix(p)), _) => Some(p.to_string_lossy().into_owned()),
            (None, Some(addr)) => Some(addr.to_string()),
            (None, None) => None,
        };
        let user = self.config.get_user().unwrap_or("").to_string();
        pgpass::Target {
            host,
            port: self.config.get_ports().first().copied().unwrap_or(5432),
            dbname: self.config.get_dbname().map_or_else(|| user.clone(), str::to_string),
            user,
        }
    }

    /// When the connection string has no password: `PGPASSWORD`, else the password
    /// file (see `pgpass`). Returns the warnings to show (a password file ignored).
    pub fn fill_password(
        &mut self,
        env: &Env,
        read: &dyn Fn(&Path) -> std::io::Result<pgpass::FileRead>,
    ) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.has_password() {
            return warnings;
        }
        let target = self.password_target();
        if let Some(found) = pgpass::find_password(&target, self.passfile.as_deref(), env, read, &mut warnings) {
            log::debug!("password for user {:?} taken from {}", target.user, found.from);
            self.config.password(found.password);
        }
        warnings
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

/// The worker's validated configuration (docs/DESIGN.md §4).
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
/// `OUTBOX_CONCURRENCY` when unset: two claim threads per CPU this process may use (std
/// reads the affinity mask and the cgroup quota), at most 4. A claim thread spends part
/// of every batch waiting on the database (its round trips, its commits' flushes), so
/// more threads than CPUs keep them busy through those waits; beyond 4, more threads
/// mostly contend on the database server (BENCHMARKS.md, *Changes measured by A/B*).
pub fn default_concurrency() -> u32 {
    concurrency_for_cpus(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The default number of claim threads on `cpus` CPUs: 2 on one, 4 from two.
fn concurrency_for_cpus(cpus: usize) -> u32 {
    cpus.saturating_mul(2).clamp(2, 4) as u32
}

fn required<T>(v: Result<Option<T>>, s: &Setting) -> Result<T> {
    v?.ok_or_else(|| AppError::usage(format!("{} is required", s.var)))
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
            concurrency: src.count(&CONCURRENCY)?.map_or_else(default_concurrency, |n| n as u32),
            statement_timeout: required(src.seconds(&STATEMENT_TIMEOUT), &STATEMENT_TIMEOUT)?,
            done_retention: src.seconds(&DONE_RETENTION)?,
            listen: required(src.choice(&LISTEN), &LISTEN)? == "on",
            sizes: crate::outbox::SizeLimits {
                max_event_bytes: required(src.count(&MAX_EVENT_BYTES), &MAX_EVENT_BYTES)?,
                batch_max_bytes: required(src.count(&BATCH_MAX_BYTES), &BATCH_MAX_BYTES)?,
            },
        };
        if cfg.worker_id.chars().count() > 200 {
            return Err(AppError::usage(format!("invalid {}: longer than 200 characters", WORKER_ID.var)));
        }
        if cfg.max_backoff < cfg.base_backoff {
            return Err(AppError::usage(format!(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

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
            Err(e) if e.kind() == crate::error::Kind::Usage => e.to_string(),
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
        // Not a runbook variable: two threads per CPU this process may use, 2 to 4.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(c.concurrency as usize, (2 * cpus).clamp(2, 4), "{cpus} CPUs");
        let by_cpus: Vec<u32> = [1, 2, 3, 4, 64].into_iter().map(concurrency_for_cpus).collect();
        assert_eq!(by_cpus, [2, 4, 4, 4, 4]);
        assert_eq!(worker(&[("OUTBOX_CONCURRENCY", "1")], &[]).unwrap().concurrency, 1);
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
    fn connect_timeout_and_keepalives_default_and_read_like_libpq() {
        let parse = |s: &str| DbUrl::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        let u = parse("postgres://u@h/db");
        assert_eq!(u.connect_timeout, Some(CONNECT_TIMEOUT));
        assert_eq!(u.config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert!(u.config.get_keepalives());
        assert_eq!(u.config.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(u.config.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(u.config.get_keepalives_retries(), Some(KEEPALIVES_COUNT));
        assert_eq!(u.config.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));

        for (raw, want) in [
            ("postgres://u@h/db?connect_timeout=5", Some(5)),
            ("host=h user=u connect_timeout=5", Some(5)),
            ("postgres://u@h/db?connect_timeout=1", Some(2)),
            ("postgres://u@h/db?connect_timeout=0", None),
            ("postgres://u@h/db?connect_timeout=-3", None),
        ] {
            assert_eq!(parse(raw).connect_timeout, want.map(Duration::from_secs), "{raw}");
        }
        let e = DbUrl::parse("postgres://u@h/db?connect_timeout=soon").unwrap_err();
        assert!(e.contains("connect_timeout") && e.contains("soon"), "{e}");

        let u =
            parse("postgres://u@h/db?keepalives_idle=5&keepalives_interval=2&keepalives_count=7&tcp_user_timeout=9");
        assert_eq!(u.config.get_keepalives_idle(), Duration::from_secs(5));
        assert_eq!(u.config.get_keepalives_interval(), Some(Duration::from_secs(2)));
        assert_eq!(u.config.get_keepalives_retries(), Some(7));
        assert_eq!(u.config.get_tcp_user_timeout(), Some(&Duration::from_secs(9)));
        assert_eq!(parse("host=h keepalives_retries=4").config.get_keepalives_retries(), Some(4));
        assert!(!parse("postgres://u@h/db?keepalives=0").config.get_keepalives());
        // 0 is the system's default, as in libpq: none of ours then.
        assert_eq!(parse("postgres://u@h/db?tcp_user_timeout=0").config.get_tcp_user_timeout(), None);
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
        #[cfg(unix)] // the driver knows socket hosts on Unix only
        {
            let sock = DbUrl::parse("host=/var/run/postgresql user=postgres dbname=db").unwrap();
            assert!(matches!(sock.config.get_hosts()[0], postgres::config::Host::Unix(_)));
        }
        let sa = DbUrl::parse("postgresql+psycopg://wordloom:wordloom@localhost:5435/wordloom_test").unwrap();
        assert_eq!(sa.config.get_ports(), &[5435]);
        assert_eq!(sa.config.get_dbname(), Some("wordloom_test"));
        assert_eq!(sa.config.get_password(), Some(&b"wordloom"[..]));
    }

    #[test]
    fn several_hosts_are_read_in_every_form_with_their_session_attributes() {
        use postgres::config::{Host, TargetSessionAttrs};
        let hosts = |u: &DbUrl| -> Vec<String> {
            u.config.get_hosts().iter().map(|h| if let Host::Tcp(h) = h { h.clone() } else { "unix".into() }).collect()
        };
        for (raw, attrs) in [
            (
                "postgresql://u:hunter2@db1:5432,db2:5433/app?target_session_attrs=read-write",
                TargetSessionAttrs::ReadWrite,
            ),
            ("postgres://u:hunter2@db1:5432,db2:5433/app?target_session_attrs=any", TargetSessionAttrs::Any),
            (
                "postgresql+psycopg://u:hunter2@db1:5432,db2:5433/app?target_session_attrs=read-only&sslmode=require",
                TargetSessionAttrs::ReadOnly,
            ),
            (
                "host=db1,db2 port=5432,5433 user=u password=hunter2 dbname=app target_session_attrs=read-write",
                TargetSessionAttrs::ReadWrite,
            ),
        ] {
            let u = DbUrl::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(hosts(&u), ["db1", "db2"], "{raw}");
            assert_eq!(u.config.get_ports(), [5432, 5433], "{raw}");
            assert_eq!(u.config.get_target_session_attrs(), attrs, "{raw}");
            let shown = format!("{u} {u:?}");
            assert!(!shown.contains("hunter2") && shown.contains("db1") && shown.contains("db2"), "{shown}");
        }
        let tls =
            DbUrl::parse("postgresql://u@db1,db2/app?sslmode=verify-full&target_session_attrs=read-write").unwrap();
        assert_eq!(
            (tls.ssl_mode, tls.config.get_ssl_mode()),
            (SslMode::VerifyFull, postgres::config::SslMode::Require)
        );
        // libpq values the driver does not know are refused by name, whatever the form.
        for (raw, value) in [
            ("postgresql://u:hunter2@db1,db2/app?target_session_attrs=primary", "primary"),
            ("postgresql+psycopg://u:hunter2@db1,db2/app?target_session_attrs=prefer-standby", "prefer-standby"),
            ("host=db1,db2 user=u password=hunter2 target_session_attrs=standby", "standby"),
            ("postgres://u@db1,db2/app?load_balance_hosts=always", "always"),
        ] {
            let env = Env::from_pairs([("DATABASE_URL", raw)]);
            let err = Sources::new(&env).database_url().unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.kind(), Kind::Usage, "{raw}");
            assert!(msg.contains(&format!("{value:?}")) && !msg.contains("hunter2"), "{msg}");
        }
    }

    #[test]
    fn readers_use_the_read_url_in_read_only_sessions_else_the_database_url() {
        let env = Env::from_pairs([("DATABASE_URL", "postgresql://u@primary/app")]);
        let reader = Sources::new(&env).read_database_url().unwrap();
        assert_eq!(reader.config.get_hosts(), [postgres::config::Host::Tcp("primary".into())]);
        assert_eq!(reader.config.get_options(), None, "no read URL: DATABASE_URL as it is");
        let env = Env::from_pairs([
            ("DATABASE_URL", "postgresql://u@primary/app"),
            ("CHRONICLE_READ_DATABASE_URL", "postgresql://u:hunter2@replica/app?options=-c%20work_mem%3D8MB"),
        ]);
        let reader = Sources::new(&env).read_database_url().unwrap();
        assert_eq!(reader.config.get_hosts(), [postgres::config::Host::Tcp("replica".into())]);
        assert_eq!(reader.config.get_options(), Some("-c work_mem=8MB -c default_transaction_read_only=on"));
        assert!(!reader.to_string().contains("hunter2"));
        // Without DATABASE_URL, a reader needs only its own URL; a bad one is named.
        let env = Env::from_pairs([("CHRONICLE_READ_DATABASE_URL", "postgresql://u@replica/app")]);
        assert!(Sources::new(&env).read_database_url().is_ok());
        let env = Env::from_pairs([("CHRONICLE_READ_DATABASE_URL", "mysql://u@replica/app")]);
        let err = Sources::new(&env).read_database_url().unwrap_err();
        assert_eq!(err.kind(), Kind::Usage);
        assert!(err.to_string().contains("CHRONICLE_READ_DATABASE_URL"), "{err}");
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
            assert_eq!(err.kind(), Kind::Usage, "{url}");
            assert!(msg.contains("DATABASE_URL"), "{msg}");
            assert!(!msg.contains("hunter2"), "password leaked: {msg}");
        }
        let env = Env::from_pairs([]);
        let err = Sources::new(&env).database_url().unwrap_err();
        assert_eq!(err.kind(), Kind::Usage);
        assert!(err.to_string().contains("DATABASE_URL is not set"));
    }

    #[test]
    fn masking_covers_every_form() {
        assert_eq!(mask_password("postgres://u:hunter2@h/db"), "postgres://u:***@h/db");
        assert_eq!(mask_password("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(mask_password("postgres://u@h/db?password=hunter2&port=1"), "postgres://u@h/db?password=***&port=1");
        assert_eq!(mask_password("host=h password=hunter2 user=u"), "host=h password=*** user=u");
        assert_eq!(mask_password("host=h password = 'hun ter2' user=u"), "host=h password=*** user=u");
        assert_eq!(mask_password("postgres://h/db"), "postgres://h/db");
        let dbu = DbUrl::parse("postgresql+psycopg://wordloom:hunter2@localhost:5435/x").unwrap();
        assert!(!format!("{dbu} {dbu:?}").contains("hunter2"));
    }

    /// Passwords with every character that has a meaning somewhere in a connection string.
    const HOSTILE: &[&str] = &[
        "p/ss?w#rd",
        "a@b:c/d?e#f@",
        "q'uo\"te d\\back\\",
        "100%sure&port=1",
        "%41%zz%",
        "::@@//??##",
        "pass word=with=eq",
        "ünï密码 ",
        "password=x&sslmode=disable",
    ];

    fn pct(s: &str) -> String {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    fn kv_quote(s: &str) -> String {
        format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
    }

    /// Each form a password can take, and whether the form keeps it exactly (a raw `%`
    /// in a URL is a percent-escape, as in libpq).
    fn forms(pw: &str) -> Vec<(String, bool)> {
        let raw_ok = !pw.contains('%') && !pw.starts_with(' ') && !pw.ends_with(' ');
        let mut v = Vec::new();
        for scheme in URL_SCHEMES {
            v.push((format!("{scheme}://u:{}@db.example:5433/app", pct(pw)), true));
            v.push((format!("{scheme}://u:{pw}@db.example:5433/app"), raw_ok));
        }
        v.push((format!("postgresql://u@db.example:5433/app?password={}", pct(pw)), true));
        v.push((format!("postgresql://u@db.example:5433/app?sslmode=disable&password={}", pct(pw)), true));
        v.push((format!("host=db.example port=5433 user=u dbname=app password={}", kv_quote(pw)), true));
        v.push((format!("password = {} host=db.example port=5433 user=u dbname=app", kv_quote(pw)), true));
        v
    }

    #[test]
    fn hostile_passwords_are_read_exactly_and_never_shown() {
        for pw in HOSTILE {
            for (raw, exact) in forms(pw) {
                let u = DbUrl::parse_in(&raw, &Env::default()).unwrap_or_else(|e| panic!("{raw}: {e}"));
                let c = &u.config;
                if exact {
                    assert_eq!(c.get_password(), Some(pw.as_bytes()), "{raw}");
                }
                assert_eq!(c.get_user(), Some("u"), "{raw}");
                assert_eq!(c.get_hosts(), &[postgres::config::Host::Tcp("db.example".into())], "{raw}");
                assert_eq!((c.get_ports(), c.get_dbname()), (&[5433][..], Some("app")), "{raw}");
                let shown = format!("{u} {u:?} {c:?}");
                for secret in [pw.to_string(), pct(pw), pw.trim().to_string()] {
                    assert!(!shown.contains(&secret), "{raw}: shown as {shown}");
                }
            }
        }
    }

    #[test]
    fn hostile_passwords_in_refused_values_are_never_shown() {
        for pw in HOSTILE {
            let mut bad = Vec::new();
            for (raw, _) in forms(pw) {
                if raw.contains("://") {
                    bad.push(raw.replace(":5433", ":notaport"));
                    bad.push(raw.replace("postgres", "mysql"));
                    bad.push(format!("{raw}{}sslmode=sometimes", if raw.contains('?') { '&' } else { '?' }));
                    bad.push(raw.replace("@db.example:5433", ""));
                } else {
                    bad.push(format!("{raw} bogus=1"));
                    bad.push(format!("{raw} sslmode=sometimes"));
                    bad.push(raw.replace("port=5433", "port=x"));
                }
            }
            // Passwords pasted where they do not belong.
            bad.push(pw.to_string());
            bad.push(format!("host=db.example password={pw}"));
            bad.push(format!("host=db.example pasword={}", kv_quote(pw)));
            bad.push(format!("postgresql://u@db.example/app?pasword={}", pct(pw)));
            bad.push(format!("u:{pw}@db.example/app"));
            bad.push(format!("postgresql://u@db.example/app?password={pw}"));
            bad.push(format!("postgresql://u@db.example/app?password={pw}&bogus=1"));
            bad.push(format!("host=db.example user=u password={pw} dbname=app"));
            for raw in bad {
                for origin in ["env", "flag"] {
                    let env = if origin == "env" {
                        Env::from_pairs([("DATABASE_URL", raw.as_str())])
                    } else {
                        Env::default()
                    };
                    let mut src = Sources::new(&env);
                    if origin == "flag" {
                        src.set_flag(&DATABASE_URL, raw.clone());
                    }
                    let msg = match src.resolve_database_url() {
                        Err(e) => e.to_string(),
                        // Some of these are valid after all (a password of the form
                        // `x&sslmode=...`): then what is shown is the masked form.
                        Ok((u, w)) => format!("{u} {u:?} {w:?}"),
                    };
                    for secret in [pw.to_string(), pct(pw), pw.trim().to_string()] {
                        assert!(!msg.contains(&secret), "{origin} {raw:?}: {msg}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_password_on_the_command_line_is_warned_about_and_not_in_the_variable() {
        let url = "postgresql://u:pw@h/db";
        let env = Env::from_pairs([("DATABASE_URL", url)]);
        let (_, warnings) = Sources::new(&env).resolve_database_url().unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        for with_password in [url, "host=h user=u password=pw", "postgresql://u@h/db?password=pw"] {
            let mut src = Sources::new(&env);
            src.set_flag(&DATABASE_URL, with_password.to_string());
            let (_, warnings) = src.resolve_database_url().unwrap();
            assert_eq!(warnings, [PASSWORD_ON_COMMAND_LINE], "{with_password}");
            for alternative in ["DATABASE_URL", "PGPASSWORD", "PGPASSFILE", "~/.pgpass", "ps"] {
                assert!(PASSWORD_ON_COMMAND_LINE.contains(alternative));
            }
        }
        let mut src = Sources::new(&env);
        src.set_flag(&DATABASE_URL, "postgresql://u@h/db".to_string());
        let (_, warnings) = src.resolve_database_url().unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn without_a_password_pgpassword_then_the_password_file_is_used() {
        let file = |text: &'static str, mode: u32| {
            move |p: &Path| -> std::io::Result<pgpass::FileRead> {
                assert_eq!(p, Path::new("/home/u/.pgpass"));
                Ok(pgpass::FileRead { text: text.into(), is_file: true, mode: Some(mode) })
            }
        };
        let resolve = |url: &str, extra: &[(&str, &str)], read: ReadFile| {
            let mut pairs = vec![("DATABASE_URL", url), ("HOME", "/home/u")];
            pairs.extend_from_slice(extra);
            let env = Env::from_pairs(pairs);
            let (u, w) = Sources::new(&env).with_file_reader(read).resolve_database_url().unwrap();
            (u.config.get_password().map(|p| String::from_utf8_lossy(p).into_owned()), w)
        };
        let good = file("h:5432:db:u:from-file\n*:*:*:*:any", 0o600);
        // The URL's own password wins; then PGPASSWORD; then the file.
        assert_eq!(resolve("postgresql://u:own@h/db", &[("PGPASSWORD", "env")], &good).0.as_deref(), Some("own"));
        assert_eq!(resolve("postgresql://u@h/db", &[("PGPASSWORD", "env")], &good).0.as_deref(), Some("env"));
        assert_eq!(resolve("postgresql://u:@h/db", &[], &good).0.as_deref(), Some("from-file"));
        assert_eq!(resolve("host=h user=u dbname=db", &[], &good).0.as_deref(), Some("from-file"));
        assert_eq!(resolve("postgresql://u@h:5433/db", &[], &good).0.as_deref(), Some("any"));
        // The first host of a multi-host URL is the one looked up.
        assert_eq!(resolve("postgresql://u@h:5432,other:5432/db", &[], &good).0.as_deref(), Some("from-file"));
        assert_eq!(resolve("postgresql://u@other:5432,h:5432/db", &[], &good).0.as_deref(), Some("any"));
        // The database defaults to the user's name.
        let by_user = file("h:5432:u:u:db-is-user", 0o600);
        assert_eq!(resolve("postgresql://u@h", &[], &by_user).0.as_deref(), Some("db-is-user"));
        // No host: the default socket directory, which the file calls localhost.
        let local = file("localhost:5432:db:u:local", 0o600);
        assert_eq!(resolve("postgresql://u@/db", &[], &local).0.as_deref(), Some("local"));
        assert_eq!(resolve("host=/var/run/postgresql user=u dbname=db", &[], &local).0.as_deref(), Some("local"));
        // A file others can read is refused, with a warning naming it.
        let (pw, w) = resolve("postgresql://u@h/db", &[], &file("h:5432:db:u:from-file", 0o644));
        assert_eq!(pw, None);
        assert!(w.len() == 1 && w[0].contains("/home/u/.pgpass") && w[0].contains("0644"), "{w:?}");
        // PGPASSFILE and passfile= choose the file.
        let other = |p: &Path| -> std::io::Result<pgpass::FileRead> {
            let text = if p == Path::new("/etc/chronicle.pgpass") { "*:*:*:*:chosen" } else { "*:*:*:*:wrong" };
            Ok(pgpass::FileRead { text: text.into(), is_file: true, mode: Some(0o600) })
        };
        let pf = [("PGPASSFILE", "/etc/chronicle.pgpass")];
        assert_eq!(resolve("postgresql://u@h/db", &pf, &other).0.as_deref(), Some("chosen"));
        let url = "postgresql://u@h/db?passfile=%2Fetc%2Fchronicle.pgpass";
        assert_eq!(resolve(url, &[("PGPASSFILE", "/x")], &other).0.as_deref(), Some("chosen"));
        let kv = "host=h user=u dbname=db passfile='/etc/chronicle.pgpass'";
        assert_eq!(resolve(kv, &[], &other).0.as_deref(), Some("chosen"));
    }
}
