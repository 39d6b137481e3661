//! Where the password comes from when the connection string has none: `PGPASSWORD`, then
//! libpq's password file, with libpq's rules (fe-connect.c, `passwordFromFile`).
//!
//! The file is `passfile=` of the connection string, else `PGPASSFILE`, else
//! `~/.pgpass` (`%APPDATA%\postgresql\pgpass.conf` on Windows). Each line is
//! `hostname:port:database:username:password`; `*` matches any value of a field, `\:`
//! and `\\` stand for `:` and `\`, the first matching line wins, and lines starting with
//! `#` are comments. On unix a file that is not a plain file, or that group or others
//! may access at all (any of the 0077 bits), is ignored with a warning, as libpq does
//! (libpq makes no exception for root-owned files here; that exception is for client
//! keys). A host given as the default unix-socket directory, or not given, matches
//! `localhost`; another socket directory is matched by its path.
//!
//! Everything here is pure: the environment and a file reader are passed in.

use std::path::{Path, PathBuf};

use super::Env;

/// What reading the password file gave: its text and what libpq checks of it.
#[derive(Debug, Clone)]
pub struct FileRead {
    pub text: String,
    /// Whether it is a regular file (a directory or a device is refused).
    pub is_file: bool,
    /// Its permission bits, where the platform has them (unix).
    pub mode: Option<u32>,
}

/// Reads a file from disk, checking what was opened (not the path again).
pub fn read_from_disk(path: &Path) -> std::io::Result<FileRead> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    #[cfg(unix)]
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        Some(meta.permissions().mode())
    };
    #[cfg(not(unix))]
    let mode = None;
    let mut bytes = Vec::new();
    if meta.is_file() {
        f.read_to_end(&mut bytes)?;
    }
    Ok(FileRead { text: String::from_utf8_lossy(&bytes).into_owned(), is_file: meta.is_file(), mode })
}

/// The connection a password is looked up for.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// A host name, an address, or a unix-socket directory.
    pub host: Option<String>,
    pub port: u16,
    pub dbname: String,
    pub user: String,
}

/// Socket directories that count as "the default" and so match `localhost`: libpq's
/// compiled-in default is one of these on every common build.
const DEFAULT_SOCKET_DIRS: &[&str] = &["/var/run/postgresql", "/run/postgresql", "/tmp"];

impl Target {
    /// The host as the password file names it.
    fn host_for_file(&self) -> &str {
        match self.host.as_deref() {
            None | Some("") => "localhost",
            Some(h) if DEFAULT_SOCKET_DIRS.contains(&h.trim_end_matches('/')) => "localhost",
            Some(h) => h,
        }
    }
}

/// A password found, and where (for logs: never the password itself).
#[derive(Debug, PartialEq)]
pub struct Found {
    pub password: String,
    pub from: String,
}

/// The password for `target`: `PGPASSWORD` when set and not empty, else the first
/// matching line of the password file. Warnings (a file ignored, and why) are returned
/// for the caller to log.
pub fn find_password(
    target: &Target,
    passfile: Option<&str>,
    env: &Env,
    read: &dyn Fn(&Path) -> std::io::Result<FileRead>,
    warnings: &mut Vec<String>,
) -> Option<Found> {
    if let Some(p) = env.get("PGPASSWORD").filter(|p| !p.is_empty()) {
        return Some(Found { password: p.to_string(), from: "PGPASSWORD".into() });
    }
    let path = passfile_path(passfile, env, cfg!(windows))?;
    let file = match read(&path) {
        Ok(f) => f,
        // libpq ignores a file it cannot open; only say so when asked.
        Err(e) => {
            log::debug!("password file {} not read: {e}", path.display());
            return None;
        }
    };
    if !file.is_file {
        warnings.push(format!("password file \"{}\" is not a plain file: ignored", path.display()));
        return None;
    }
    if let Some(mode) = file.mode {
        if mode & 0o077 != 0 {
            warnings.push(format!(
                "password file \"{}\" has group or world access (mode {:04o}); permissions should be u=rw (0600) \
                 or less: ignored",
                path.display(),
                mode & 0o7777
            ));
            return None;
        }
    }
    let (password, line) = lookup(&file.text, target)?;
    Some(Found { password, from: format!("{} line {line}", path.display()) })
}

/// The password file to read: `passfile=` of the connection string, else `PGPASSFILE`,
/// else the per-user default. `None` when there is no home to find the default in.
pub fn passfile_path(explicit: Option<&str>, env: &Env, windows: bool) -> Option<PathBuf> {
    if let Some(p) = explicit.filter(|p| !p.is_empty()).or_else(|| env.get("PGPASSFILE").filter(|p| !p.is_empty())) {
        return Some(PathBuf::from(p));
    }
    if windows {
        env.get("APPDATA").filter(|a| !a.is_empty()).map(|a| Path::new(a).join("postgresql").join("pgpass.conf"))
    } else {
        env.get("HOME").filter(|h| !h.is_empty()).map(|h| Path::new(h).join(".pgpass"))
    }
}

/// The password of the first line matching `target`, and that line's number (from 1).
pub fn lookup(text: &str, target: &Target) -> Option<(String, usize)> {
    if target.dbname.is_empty() || target.user.is_empty() {
        return None;
    }
    let port = target.port.to_string();
    let fields = [target.host_for_file(), port.as_str(), target.dbname.as_str(), target.user.as_str()];
    for (n, line) in text.split('\n').enumerate() {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut rest = Some(line.as_bytes());
        for f in fields {
            rest = rest.and_then(|r| match_field(r, f.as_bytes()));
        }
        if let Some(rest) = rest {
            return Some((unescape_password(rest), n + 1));
        }
    }
    None
}

/// libpq's `pwdfMatchesString`: whether the line starts with a field equal to `token`
/// (or `*`), returning what follows its `:`.
fn match_field<'a>(line: &'a [u8], token: &[u8]) -> Option<&'a [u8]> {
    if line.starts_with(b"*:") {
        return Some(&line[2..]);
    }
    let (mut i, mut t) = (0, 0);
    while i < line.len() {
        let mut escaped = false;
        if line[i] == b'\\' {
            i += 1;
            escaped = true;
        }
        let c = *line.get(i)?;
        if c == b':' && t == token.len() && !escaped {
            return Some(&line[i + 1..]);
        }
        if t == token.len() || c != token[t] {
            return None;
        }
        i += 1;
        t += 1;
    }
    None
}

/// The password field: up to an unescaped `:` or the end, `\x` standing for `x`.
fn unescape_password(field: &[u8]) -> String {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() && field[i] != b':' {
        if field[i] == b'\\' && i + 1 < field.len() {
            i += 1;
        }
        out.push(field[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: Option<&str>, port: u16, db: &str, user: &str) -> Target {
        Target { host: host.map(String::from), port, dbname: db.into(), user: user.into() }
    }

    const FILE: &str = "\
# comment: *:*:*:*:never
db.example:5432:app:alice:first
db.example:*:app:alice:second
*:5433:*:bob:b\\:o\\\\b:ignored-after-colon
localhost:5432:*:carol:local
/srv/pg:5432:*:carol:socket
h\\:x:5432:app:dave:escaped-host\r
*:*:*:*:fallback
";

    #[test]
    fn the_first_matching_line_wins_with_wildcards_and_escapes() {
        let cases = [
            (target(Some("db.example"), 5432, "app", "alice"), Some(("first", 2))),
            (target(Some("db.example"), 6000, "app", "alice"), Some(("second", 3))),
            (target(Some("anything"), 5433, "x", "bob"), Some(("b:o\\b", 4))),
            (target(Some("localhost"), 5432, "x", "carol"), Some(("local", 5))),
            (target(None, 5432, "x", "carol"), Some(("local", 5))),
            (target(Some("/var/run/postgresql"), 5432, "x", "carol"), Some(("local", 5))),
            (target(Some("/tmp/"), 5432, "x", "carol"), Some(("local", 5))),
            (target(Some("/srv/pg"), 5432, "x", "carol"), Some(("socket", 6))),
            (target(Some("h:x"), 5432, "app", "dave"), Some(("escaped-host", 7))),
            (target(Some("db.example"), 5432, "other", "alice"), Some(("fallback", 8))),
        ];
        for (t, want) in cases {
            let got = lookup(FILE, &t);
            assert_eq!(got.as_ref().map(|(p, n)| (p.as_str(), *n)), want, "{t:?}");
        }
        assert_eq!(lookup("h:5432:db:u:pw", &target(Some("h"), 5432, "db", "")), None, "no user, no lookup");
        assert_eq!(lookup("h:5432:db:u:pw\n", &target(Some("h"), 5432, "db", "v")), None);
        assert_eq!(lookup("h:5432:db:u", &target(Some("h"), 5432, "db", "u")), None, "no password field");
        assert_eq!(lookup("h:5432:db:u:", &target(Some("h"), 5432, "db", "u")).map(|x| x.0), Some(String::new()));
        assert_eq!(lookup(" #x:*:*:*:p", &target(Some(" #x"), 1, "d", "u")).map(|x| x.0), Some("p".into()));
    }

    fn file(text: &str, mode: Option<u32>, is_file: bool) -> impl Fn(&Path) -> std::io::Result<FileRead> {
        let f = FileRead { text: text.to_string(), is_file, mode };
        move |_| Ok(f.clone())
    }

    #[test]
    fn pgpassword_comes_first_then_the_file_checked_like_libpq() {
        let t = target(Some("h"), 5432, "db", "u");
        let line = "h:5432:db:u:from-file";
        let mut w = Vec::new();
        let env = Env::from_pairs([("PGPASSWORD", "from-env"), ("HOME", "/home/u")]);
        let found = find_password(&t, None, &env, &file(line, Some(0o600), true), &mut w).unwrap();
        assert_eq!((found.password.as_str(), found.from.as_str()), ("from-env", "PGPASSWORD"));

        let env = Env::from_pairs([("PGPASSWORD", ""), ("HOME", "/home/u")]);
        let found = find_password(&t, None, &env, &file(line, Some(0o100600), true), &mut w).unwrap();
        assert_eq!((found.password.as_str(), found.from.as_str()), ("from-file", "/home/u/.pgpass line 1"));
        assert!(w.is_empty());

        for mode in [0o640, 0o604, 0o644, 0o610, 0o601, 0o100660] {
            let mut w = Vec::new();
            assert_eq!(find_password(&t, None, &env, &file(line, Some(mode), true), &mut w), None, "{mode:o}");
            assert_eq!(w.len(), 1, "{mode:o}");
            assert!(w[0].contains("/home/u/.pgpass") && w[0].contains("group or world access"), "{w:?}");
        }
        let mut w = Vec::new();
        assert_eq!(find_password(&t, None, &env, &file(line, Some(0o700), false), &mut w), None);
        assert!(w[0].contains("not a plain file"), "{w:?}");
        // No permission bits (Windows): no check.
        let found = find_password(&t, None, &env, &file(line, None, true), &mut Vec::new());
        assert_eq!(found.map(|f| f.password), Some("from-file".into()));
        // A file that cannot be read is ignored without a warning, as libpq does.
        let missing = |_: &Path| Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        let mut w = Vec::new();
        assert_eq!(find_password(&t, None, &env, &missing, &mut w), None);
        assert!(w.is_empty());
    }

    #[test]
    fn the_file_is_passfile_then_pgpassfile_then_the_home_default() {
        let env = Env::from_pairs([("PGPASSFILE", "/etc/pw"), ("HOME", "/home/u"), ("APPDATA", r"C:\Users\u\AppData")]);
        assert_eq!(passfile_path(Some("/x/pw"), &env, false), Some(PathBuf::from("/x/pw")));
        assert_eq!(passfile_path(None, &env, false), Some(PathBuf::from("/etc/pw")));
        assert_eq!(passfile_path(Some(""), &env, false), Some(PathBuf::from("/etc/pw")));
        let env = Env::from_pairs([("HOME", "/home/u"), ("APPDATA", r"C:\Users\u\AppData")]);
        assert_eq!(passfile_path(None, &env, false), Some(PathBuf::from("/home/u/.pgpass")));
        let win = passfile_path(None, &env, true).unwrap();
        assert!(win.starts_with(r"C:\Users\u\AppData") && win.ends_with("pgpass.conf"), "{win:?}");
        assert_eq!(passfile_path(None, &Env::from_pairs([]), false), None);
    }
}
