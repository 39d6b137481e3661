//! Connection strings taken apart, and masked for printing.
//!
//! Both libpq forms are read here: URLs (`postgresql://user:password@host:port/db?k=v`)
//! and `key=value` strings. People paste passwords into URLs without percent-encoding
//! them, so a URL's user information is taken to end at its LAST `@`: a password may
//! then hold `/ ? # @ :` unencoded (an `@` in a query value or database name must be
//! written `%40`). Every function here is total: masking works on anything, valid or
//! not, so error messages can use it.

/// libpq's connection keywords (and the driver's `keepalives_retries`). A word that is
/// not one of these is never a key; after a password it may be part of that password.
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "require_auth",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "keepalives_retries",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslnegotiation",
    "requiressl",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
];

pub(super) fn is_keyword(word: &str) -> bool {
    KEYWORDS.contains(&word)
}

/// Keys whose values are secrets.
pub(super) fn is_secret_key(key: &str) -> bool {
    key == "password" || key == "sslpassword"
}

/// Whether an unknown key may be shown: a plain word (`pasword`, `bogus`) is; anything
/// else may be a piece of a password pasted where it does not belong.
pub(super) fn is_plain_word(key: &str) -> bool {
    key.len() <= 40
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn shown_key(key: &str) -> &str {
    if is_plain_word(key) {
        key
    } else {
        "***"
    }
}

/// A URL's parts, as written (not decoded).
#[derive(Debug, PartialEq)]
pub(super) struct UrlParts<'a> {
    pub scheme: &'a str,
    /// Everything before the last `@`, when there is one.
    pub userinfo: Option<&'a str>,
    /// The host list: `host[:port][,host[:port]...]`.
    pub hosts: &'a str,
    /// After the `/` that follows the hosts, up to the first `?`.
    pub path: Option<&'a str>,
    /// After that `?`.
    pub query: Option<&'a str>,
}

impl UrlParts<'_> {
    /// The user name and password of the user information, split at the first `:` as
    /// libpq does (still percent-encoded).
    pub fn credentials(&self) -> Option<(&str, Option<&str>)> {
        self.userinfo.map(|u| match u.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (u, None),
        })
    }
}

/// Splits `scheme://...`; `None` when the text has no `://`.
pub(super) fn split_url(raw: &str) -> Option<UrlParts<'_>> {
    let (scheme, rest) = raw.split_once("://")?;
    // A password in the query (`?password=a@b`) is not user information.
    let limit = ["?password=", "&password=", "?sslpassword=", "&sslpassword="]
        .iter()
        .filter_map(|k| rest.find(k))
        .min()
        .unwrap_or(rest.len());
    let (userinfo, after) = match rest[..limit].rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let host_end = after.find(['/', '?']).unwrap_or(after.len());
    let (hosts, tail) = after.split_at(host_end);
    let (path, query) = match tail.strip_prefix('/') {
        Some(p) => match p.split_once('?') {
            Some((p, q)) => (Some(p), Some(q)),
            None => (Some(p), None),
        },
        None => (None, tail.strip_prefix('?')),
    };
    Some(UrlParts { scheme, userinfo, hosts, path, query })
}

/// A URL query's `key=value` pairs, split at `&` as libpq does (still encoded). A
/// segment without `=` has an empty value.
pub(super) fn query_pairs(query: &str) -> Vec<(&str, &str)> {
    query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect()
}

/// One `key=value` pair of a libpq string, with where its value lies in the text.
#[derive(Debug, PartialEq)]
pub(super) struct Pair {
    pub key: String,
    pub value: String,
    /// The byte range of the value as written (quotes included).
    pub span: std::ops::Range<usize>,
}

/// Why a libpq `key=value` string could not be split. What is shown of the text is
/// decided by the caller: the words next to a password may be part of it.
#[derive(Debug, PartialEq)]
pub(super) enum KvError {
    /// A word not followed by `=`; `after_secret` says it directly follows a password.
    NoValue {
        key: String,
        after_secret: bool,
    },
    Unterminated {
        key: String,
    },
}

impl KvError {
    pub fn describe(&self) -> String {
        match self {
            KvError::NoValue { after_secret: true, .. } => {
                "has a word without `=` after the password (not shown: it may \
                 be part of the password; quote a password holding spaces: password='...')"
                    .to_string()
            }
            KvError::NoValue { key, .. } if is_keyword(key) => format!("has a key without a value: {key:?}"),
            KvError::NoValue { .. } => "has a word that is not a key=value pair (not shown)".to_string(),
            KvError::Unterminated { key } if is_keyword(key) => format!("has an unterminated quoted value for {key:?}"),
            KvError::Unterminated { .. } => "has an unterminated quoted value".to_string(),
        }
    }
}

/// Splits a libpq `key=value` string; values may be single-quoted, with `\` escaping
/// the next character (quoted or not), as libpq reads them.
pub(super) fn parse_key_values(s: &str) -> Result<Vec<Pair>, KvError> {
    let mut out: Vec<Pair> = Vec::new();
    let mut chars = s.char_indices().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices>| {
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
    };
    loop {
        skip_ws(&mut chars);
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        skip_ws(&mut chars);
        if chars.next().map(|(_, c)| c) != Some('=') {
            let after_secret = out.last().is_some_and(|p| is_secret_key(&p.key));
            return Err(KvError::NoValue { key, after_secret });
        }
        skip_ws(&mut chars);
        let start = chars.peek().map_or(s.len(), |&(i, _)| i);
        let mut value = String::new();
        if chars.peek().map(|&(_, c)| c) == Some('\'') {
            chars.next();
            loop {
                match chars.next().map(|(_, c)| c) {
                    None => return Err(KvError::Unterminated { key }),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some((_, c)) => value.push(c),
                        None => return Err(KvError::Unterminated { key }),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&(_, c)) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some((_, e)) = chars.next() {
                        value.push(e);
                    }
                    continue;
                }
                value.push(c);
            }
        }
        let end = chars.peek().map_or(s.len(), |&(i, _)| i);
        out.push(Pair { key, value, span: start..end });
    }
}

/// Replaces every secret of a connection string (a URL's password, `password=` and
/// `sslpassword=` values, values of unknown keys, which may be a misspelt `password`)
/// with `***`. Errs on the side of hiding: what cannot be told apart from a password
/// is hidden with it.
pub fn mask_password(raw: &str) -> String {
    match split_url(raw) {
        Some(parts) => mask_url(&parts),
        None if raw.contains('=') => mask_key_values(raw),
        None => raw.to_string(),
    }
}

fn mask_url(p: &UrlParts) -> String {
    let mut s = format!("{}://", p.scheme);
    match p.credentials() {
        Some((user, Some(_))) => s.push_str(&format!("{user}:***@")),
        Some((user, None)) => s.push_str(&format!("{user}@")),
        None => {
            // No `@`: a `:` followed by something that is not a port may be a password
            // whose host was left out (`postgresql://user:secret`). Hide all from there.
            if let Some(cut) = suspicious_port(p.hosts) {
                s.push_str(&p.hosts[..=cut]);
                s.push_str("***");
                return s;
            }
        }
    }
    s.push_str(p.hosts);
    if let Some(path) = p.path {
        s.push('/');
        s.push_str(path);
    }
    if let Some(q) = p.query {
        s.push('?');
        s.push_str(&mask_query(q));
    }
    s
}

/// The position of the `:` of the first host whose port is not a number.
fn suspicious_port(hosts: &str) -> Option<usize> {
    let mut offset = 0;
    for chunk in hosts.split(',') {
        // Skip a bracketed IPv6 address.
        let from = if chunk.starts_with('[') { chunk.find(']').map_or(chunk.len(), |i| i + 1) } else { 0 };
        if let Some(colon) = chunk[from..].find(':').map(|i| from + i) {
            let port = &chunk[colon + 1..];
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Some(offset + colon);
            }
        }
        offset += chunk.len() + 1;
    }
    None
}

/// Masks a query: the value of a secret runs up to the next `&` that starts a known
/// `key=` (an unencoded `&` in a password is hidden with it); unknown keys' values are
/// hidden too.
fn mask_query(q: &str) -> String {
    let segments: Vec<&str> = q.split('&').collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < segments.len() {
        let seg = segments[i];
        i += 1;
        let Some((key, _)) = seg.split_once('=') else {
            out.push(if seg.is_empty() || is_keyword(seg) { seg.to_string() } else { "***".to_string() });
            continue;
        };
        if is_secret_key(key) {
            while i < segments.len() && !segments[i].split_once('=').is_some_and(|(k, _)| is_keyword(k)) {
                i += 1;
            }
            out.push(format!("{key}=***"));
        } else if is_keyword(key) {
            out.push(seg.to_string());
        } else {
            out.push(format!("{}=***", shown_key(key)));
        }
    }
    out.join("&")
}

/// Masks a `key=value` string. Unquoted secret values run to the next word that starts a
/// `key=` (unquoted spaces in a password are hidden with it); a quote left open hides
/// everything after it.
fn mask_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let trimmed = rest.trim_start();
        out.push_str(&rest[..rest.len() - trimmed.len()]);
        rest = trimmed;
        if rest.is_empty() {
            return out;
        }
        let key_end = rest.find(|c: char| c == '=' || c.is_whitespace()).unwrap_or(rest.len());
        let key = &rest[..key_end];
        let after_key = rest[key_end..].trim_start();
        let Some(after_eq) = after_key.strip_prefix('=') else {
            // A word without `=`: not a key. Shown only when it is a known keyword.
            out.push_str(if is_keyword(key) { key } else { "***" });
            rest = &rest[key_end..];
            continue;
        };
        let value = after_eq.trim_start();
        let hide = !is_keyword(key) || is_secret_key(key);
        let value_len = if let Some(q) = value.strip_prefix('\'') {
            let mut esc = false;
            let mut end = None;
            for (i, c) in q.char_indices() {
                if esc {
                    esc = false;
                } else if c == '\\' {
                    esc = true;
                } else if c == '\'' {
                    end = Some(i + 2);
                    break;
                }
            }
            end.unwrap_or(value.len())
        } else if hide {
            next_key_start(value).unwrap_or(value.len())
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        out.push_str(shown_key(key));
        out.push('=');
        out.push_str(if hide { "***" } else { &value[..value_len] });
        rest = &value[value_len..];
    }
}

/// Where, after whitespace, the next `word=` (a known keyword) begins in `s`.
fn next_key_start(s: &str) -> Option<usize> {
    let mut search = 0;
    while let Some(ws) = s[search..].find(char::is_whitespace).map(|i| search + i) {
        let after = s[ws..].trim_start();
        let start = s.len() - after.len();
        let word_end = after.find(|c: char| c == '=' || c.is_whitespace()).unwrap_or(after.len());
        if is_keyword(&after[..word_end]) && after[word_end..].trim_start().starts_with('=') {
            return Some(ws);
        }
        if start >= s.len() {
            return None;
        }
        search = start;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_information_ends_at_the_last_at_sign() {
        let p = split_url("postgresql://u:a@b/c?d#e:f@h1:5432,h2/db?sslmode=require").unwrap();
        assert_eq!(p.credentials(), Some(("u", Some("a@b/c?d#e:f"))));
        assert_eq!((p.hosts, p.path, p.query), ("h1:5432,h2", Some("db"), Some("sslmode=require")));
        let p = split_url("postgres://u@h/db?password=a@b").unwrap();
        assert_eq!((p.userinfo, p.hosts, p.query), (Some("u"), "h", Some("password=a@b")));
        let p = split_url("postgres://h?user=x").unwrap();
        assert_eq!((p.userinfo, p.hosts, p.path, p.query), (None, "h", None, Some("user=x")));
        let p = split_url("postgresql://@/db").unwrap();
        assert_eq!((p.userinfo, p.hosts, p.path), (Some(""), "", Some("db")));
    }

    #[test]
    fn key_values_split_like_libpq_and_record_where_values_lie() {
        let s = r"host=h  password = 'a b\'c' user=u\ x";
        let pairs = parse_key_values(s).unwrap();
        let kv: Vec<(&str, &str)> = pairs.iter().map(|p| (p.key.as_str(), p.value.as_str())).collect();
        assert_eq!(kv, [("host", "h"), ("password", "a b'c"), ("user", "u x")]);
        assert_eq!(&s[pairs[1].span.clone()], r"'a b\'c'");
        assert_eq!(parse_key_values("password=a b"), Err(KvError::NoValue { key: "b".into(), after_secret: true }));
        for after_secret in [true, false] {
            let e = KvError::NoValue { key: "zq9:fragment".into(), after_secret };
            assert!(!e.describe().contains("zq9"), "{}", e.describe());
        }
        let e = KvError::NoValue { key: "sslmode".into(), after_secret: false };
        assert!(e.describe().contains("sslmode"), "a keyword is named: {}", e.describe());
        assert!(matches!(parse_key_values("password='open"), Err(KvError::Unterminated { .. })));
    }

    #[test]
    fn masking_hides_every_form_of_password() {
        let cases = [
            ("postgres://u:hunter2@h/db", "postgres://u:***@h/db"),
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            ("postgresql://u:a/b?c#d@h:5/db?sslmode=disable", "postgresql://u:***@h:5/db?sslmode=disable"),
            ("postgresql+psycopg://u:x%2Fy@h/db", "postgresql+psycopg://u:***@h/db"),
            ("postgres://u@h/db?password=hunter2&sslmode=require", "postgres://u@h/db?password=***&sslmode=require"),
            ("postgres://u@h/db?password=a&b=c&d&sslmode=require", "postgres://u@h/db?password=***&sslmode=require"),
            ("postgres://u@h/db?pasword=hunter2", "postgres://u@h/db?pasword=***"),
            ("postgres://u:hunter2", "postgres://u:***"),
            ("postgres://u:hun/ter2", "postgres://u:***"),
            ("postgres://[::1]:5432/db", "postgres://[::1]:5432/db"),
            ("postgres://h/db", "postgres://h/db"),
            ("host=h password=hunter2 user=u", "host=h password=*** user=u"),
            ("host=h password = 'hun ter2' user=u", "host=h password=*** user=u"),
            ("host=h password=hun ter2 x user=u", "host=h password=*** user=u"),
            ("host=h password='hun\\'ter2", "host=h password=***"),
            ("host=h pasword=hunter2 user=u", "host=h pasword=*** user=u"),
            ("host=h sslpassword=hunter2", "host=h sslpassword=***"),
            ("u:p=w@h", "***=***"),
            ("postgres://u@h/db?password=a@b", "postgres://u@h/db?password=***"),
            ("postgres://u@h/db?x:y=a", "postgres://u@h/db?***=***"),
        ];
        for (raw, masked) in cases {
            assert_eq!(mask_password(raw), masked, "{raw}");
        }
    }
}
