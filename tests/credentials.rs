//! Credentials: no password is ever printed, whatever it holds and whichever way it is
//! given; a password may come from PGPASSWORD or a password file instead of the command
//! line, and a password server accepts exactly those.

#![cfg_attr(not(unix), allow(unused_imports, dead_code))] // Unix-only tests are marked #[cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use uuid::Uuid;

#[cfg(unix)]
use crate::util::Cluster;
use crate::util::{chronicle_cmd, free_port, run, run_with_input, Ran, TestDb};

/// `chronicle` with no password source of the machine leaking in: PGPASSWORD and
/// PGPASSFILE removed, HOME a folder that does not exist (so no ~/.pgpass).
fn chronicle(args: &[&str]) -> Command {
    let mut c = chronicle_cmd(args);
    let home = std::env::temp_dir().join("chronicle-test-no-such-home");
    c.env_remove("PGPASSWORD").env_remove("PGPASSFILE").env("HOME", home);
    c
}

/// A password made of unique tokens joined by characters that mean something in a
/// connection string, so a leak of any piece of it is found by looking for the tokens.
struct Secret {
    password: String,
    tokens: Vec<String>,
}

impl Secret {
    fn new(template: &str) -> Secret {
        let mut tokens = Vec::new();
        let mut password = String::new();
        for (i, part) in template.split("{}").enumerate() {
            if i > 0 {
                let t = format!("tk{}", &Uuid::now_v7().simple().to_string()[20..]);
                password.push_str(&t);
                tokens.push(t);
            }
            password.push_str(part);
        }
        Secret { password, tokens }
    }

    /// The pieces of the password found in `text`.
    fn leaks(&self, text: &str) -> Vec<&str> {
        let mut found: Vec<&str> = self.tokens.iter().map(String::as_str).filter(|t| text.contains(t)).collect();
        if text.contains(&self.password) {
            found.push(&self.password);
        }
        found
    }
}

/// Passwords with every kind of character libpq users paste unencoded.
const TEMPLATES: &[&str] =
    &["{}/{}?{}#{}", "{}@{}:{}@{}", "{}'{} \"{}\\{}\\", "{}%{}%41{}&{}=", "{} {}=x {}", "{}&sslmode=disable&{}"];

fn pct(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

fn kv_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Every form a password can be written in, for a server at `host:port` (`port` may be
/// garbage, for refused configurations). The flag says whether the form is well made
/// (the password encoded or quoted), so the command must get as far as connecting.
fn forms(pw: &str, port: &str) -> Vec<(&'static str, String, bool)> {
    let e = pct(pw);
    vec![
        ("url", format!("postgresql://u:{pw}@127.0.0.1:{port}/db"), false),
        ("url encoded", format!("postgresql://u:{e}@127.0.0.1:{port}/db"), true),
        ("postgres://", format!("postgres://u:{pw}@127.0.0.1:{port}/db"), false),
        ("+psycopg", format!("postgresql+psycopg://u:{pw}@127.0.0.1:{port}/db"), false),
        ("+psycopg encoded", format!("postgresql+psycopg://u:{e}@127.0.0.1:{port}/db"), true),
        ("+psycopg2", format!("postgresql+psycopg2://u:{pw}@127.0.0.1:{port}/db?sslmode=disable"), false),
        ("?password=", format!("postgresql://u@127.0.0.1:{port}/db?password={e}"), true),
        ("?password= raw", format!("postgresql://u@127.0.0.1:{port}/db?password={pw}"), false),
        ("key=value", format!("host=127.0.0.1 port={port} user=u dbname=db password={}", kv_quote(pw)), true),
        ("key=value raw", format!("password={pw} host=127.0.0.1 port={port} user=u dbname=db"), false),
    ]
}

/// The one-shot commands that connect, with what each needs to get that far.
fn commands() -> Vec<(Vec<String>, Option<Vec<u8>>)> {
    let id = Uuid::now_v7().to_string();
    let event = r#"{"library_id":"0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01","entity_type":"book","entity_id":"0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e05","event_type":"BookCreated","after":{"title":"t","bookshelf_id":"0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e03"},"occurred_at":"2025-03-01T09:30:00Z"}"#;
    let args: &[&[&str]] = &[
        &["migrate"],
        &["migrate", "--status"],
        &["inject", "--count", "1"],
        &["replay-failed", "--by", "t", "--reason", "t"],
        &["rebuild"],
        &["status"],
        &["show", &id],
        &["entries", "--library-id", &id],
        &["verify"],
        &["prune", "--older-than", "1d"],
        &["erase", "--event-id", &id, "--by", "t", "--reason", "t"],
    ];
    let mut v: Vec<(Vec<String>, Option<Vec<u8>>)> =
        args.iter().map(|a| (a.iter().map(|s| s.to_string()).collect(), None)).collect();
    v.push((vec!["append".into()], Some(format!("{event}\n").into_bytes())));
    v
}

/// One run of the binary with the URL given as the variable or the flag.
fn run_one(args: &[String], input: Option<&[u8]>, url: &str, flag: bool, debug: bool, extra: &[(&str, &str)]) -> Ran {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    if flag {
        all.extend(["--database-url", url]);
    }
    let mut c = chronicle(&all);
    if !flag {
        c.env("DATABASE_URL", url);
    }
    if debug {
        c.env("RUST_LOG", "debug");
    }
    for (k, v) in extra {
        c.env(k, v);
    }
    match input {
        Some(bytes) => run_with_input(&mut c, bytes),
        None => run(&mut c),
    }
}

/// Runs `jobs` on a few threads (most of the time is spent waiting on processes).
fn in_parallel<T: Send>(jobs: Vec<T>, threads: usize, f: impl Fn(T) -> Vec<String> + Sync) -> Vec<String> {
    let queue = std::sync::Mutex::new(jobs);
    let problems = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Some(job) = queue.lock().unwrap().pop() else { break };
                let found = f(job);
                problems.lock().unwrap().extend(found);
            });
        }
    });
    problems.into_inner().unwrap()
}

#[test]
fn no_command_prints_a_hostile_password_when_it_cannot_connect_or_is_misconfigured() {
    let dead = free_port().to_string();
    let secrets: Vec<Secret> = TEMPLATES.iter().map(|t| Secret::new(t)).collect();
    let cmds = commands();
    let mut jobs = Vec::new();
    for (si, secret) in secrets.iter().enumerate() {
        for (case, port) in [("unreachable", dead.as_str()), ("bad port", "notaport")] {
            for (fi, (form, url, well_made)) in forms(&secret.password, port).into_iter().enumerate() {
                for (ci, (args, input)) in cmds.iter().enumerate() {
                    // Each combination of variable/flag and log level, spread over the runs.
                    let n = si + fi + ci;
                    jobs.push((secret, case, form, url.clone(), well_made, args, input, n % 2 == 0, n % 4 < 2));
                }
            }
        }
    }
    let total = jobs.len();
    let problems = in_parallel(jobs, 4, |(secret, case, form, url, well_made, args, input, flag, debug)| {
        let r = run_one(args, input.as_deref(), &url, flag, debug, &[]);
        let what = format!(
            "{} ({case}, {form}, {}{})",
            args.join(" "),
            if flag { "flag" } else { "variable" },
            if debug { ", RUST_LOG=debug" } else { "" }
        );
        let mut p = Vec::new();
        let leaks = secret.leaks(&r.all());
        if !leaks.is_empty() {
            p.push(format!("{what}: printed {leaks:?} of {:?}:\n{r}", secret.password));
        }
        let expected: &[i32] = match (case, well_made) {
            ("unreachable", true) => &[3],
            ("unreachable", false) => &[2, 3],
            _ => &[2],
        };
        if !r.code.is_some_and(|c| expected.contains(&c)) || r.stderr.contains("panicked") {
            p.push(format!("{what}: expected exit {expected:?}:\n{r}"));
        }
        p
    });
    eprintln!("credentials: {total} runs of {} commands, {} passwords, 10 forms each", cmds.len(), secrets.len());
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn waiting_commands_and_the_worker_never_print_a_hostile_password() {
    let dead = free_port().to_string();
    let secrets: Vec<Secret> = TEMPLATES.iter().map(|t| Secret::new(t)).collect();
    let mut jobs = Vec::new();
    for secret in &secrets {
        for (form, url, well_made) in forms(&secret.password, &dead) {
            for which in ["migrate --wait", "worker"] {
                jobs.push((secret, form, url.clone(), well_made, which));
            }
        }
    }
    let total = jobs.len();
    let problems = in_parallel(jobs, 8, |(secret, form, url, well_made, which)| {
        let flag = form.len() % 2 == 0;
        let r = if which == "worker" {
            let env = [("OUTBOX_RUN_SECONDS", "1"), ("OUTBOX_METRICS_PORT", "0")];
            run_one(&["worker".to_string()], None, &url, flag, true, &env)
        } else {
            run_one(&["migrate".into(), "--wait".into(), "1s".into()], None, &url, flag, true, &[])
        };
        let mut p = Vec::new();
        let leaks = secret.leaks(&r.all());
        if !leaks.is_empty() {
            p.push(format!("{which} ({form}): printed {leaks:?} of {:?}:\n{r}", secret.password));
        }
        // A worker run bounded by OUTBOX_RUN_SECONDS that never reached its database exits 3.
        let expected: &[i32] = match well_made {
            true => &[3],
            false => &[2, 3],
        };
        if !r.code.is_some_and(|c| expected.contains(&c)) {
            p.push(format!("{which} ({form}): expected exit {expected:?}:\n{r}"));
        }
        // The waiting itself is logged, with the URL masked.
        if well_made && which != "worker" && !r.stderr.contains("waiting up to") {
            p.push(format!("{which} ({form}): no waiting message:\n{r}"));
        }
        p
    });
    eprintln!("credentials: {total} runs of migrate --wait 1s and worker (OUTBOX_RUN_SECONDS=1), RUST_LOG=debug");
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn a_password_on_the_command_line_is_warned_about_once_and_not_in_the_variable() {
    let dead = free_port();
    let with_pw = format!("postgresql://u:hunter2@127.0.0.1:{dead}/db");
    let r = run(&mut chronicle(&["status", "--database-url", &with_pw]));
    assert_eq!(r.code, Some(3), "{r}");
    assert_eq!(r.stderr.matches("--database-url carries a password").count(), 1, "{r}");
    for alternative in ["DATABASE_URL", "PGPASSWORD", "PGPASSFILE", "~/.pgpass"] {
        assert!(r.stderr.contains(alternative), "the warning does not name {alternative}: {r}");
    }
    assert!(!r.all().contains("hunter2"), "{r}");
    // The variable, or the flag without a password (PGPASSWORD gives it): no warning.
    let r = run(chronicle(&["status"]).env("DATABASE_URL", &with_pw));
    assert!(!r.stderr.contains("carries a password"), "{r}");
    let no_pw = format!("postgresql://u@127.0.0.1:{dead}/db");
    let r = run(chronicle(&["status", "--database-url", &no_pw]).env("PGPASSWORD", "hunter2"));
    assert_eq!(r.code, Some(3), "{r}");
    assert!(!r.stderr.contains("carries a password") && !r.all().contains("hunter2"), "{r}");
}

// ---------------------------------------------------------------------------------
// A server that asks for a password.

/// A throwaway cluster where TCP logins other than `postgres` need a SCRAM password,
/// and a role with a hostile password. Shared by the tests below; stopped and removed
/// when the test process ends (the cluster's watchdog).
#[cfg(unix)]
struct PasswordServer {
    cluster: Cluster,
    role: String,
    password: String,
}

#[cfg(unix)]
fn password_server() -> &'static PasswordServer {
    static SERVER: OnceLock<PasswordServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let cluster = Cluster::start(&["fsync=off", "password_encryption=scram-sha-256"])
            .unwrap_or_else(|e| panic!("starting a cluster for the password tests: {e}"));
        let hba =
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n";
        std::fs::write(cluster.dir.join("data").join("pg_hba.conf"), hba).expect("writing pg_hba.conf");
        // A `%` not followed by two hex digits stays itself even unencoded in a URL.
        let password = format!("p/w?{}@x:y#'\\ %z &z", Uuid::now_v7().simple());
        let role = "chronicle_pw".to_string();
        let mut admin = cluster.server.connect("postgres");
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN PASSWORD '{}' CREATEDB; CREATE ROLE chronicle_eraser NOLOGIN;
                 SELECT pg_reload_conf();",
                password.replace('\'', "''")
            ))
            .expect("creating the password role");
        PasswordServer { cluster, role, password }
    })
}

/// A database owned by the password role, dropped at the end of the test.
#[cfg(unix)]
fn owned_db() -> (TestDb, &'static PasswordServer) {
    let ps = password_server();
    let db = TestDb::empty_on(&ps.cluster.server);
    db.client().batch_execute(&format!("ALTER DATABASE {} OWNER TO {}", db.name, ps.role)).expect("owning");
    (db, ps)
}

#[cfg(unix)]
fn url_without_password(ps: &PasswordServer, db: &TestDb) -> String {
    format!("postgresql://{}@127.0.0.1:{}/{}", ps.role, ps.cluster.server.port, db.name)
}

fn private_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing a password file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    #[cfg(not(unix))]
    let _ = mode;
    path
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chronicle-test-{name}-{}-{}", std::process::id(), Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("creating a scratch folder");
    dir
}

/// The password file line for the server, with `:` and `\` escaped.
#[cfg(unix)]
fn pgpass_line(ps: &PasswordServer, db: &str, host: &str) -> String {
    let esc = ps.password.replace('\\', "\\\\").replace(':', "\\:");
    format!("{host}:{}:{db}:{}:{esc}", ps.cluster.server.port, ps.role)
}

#[cfg(unix)]
#[test]
fn the_password_server_refuses_a_login_without_the_password() {
    let (db, ps) = owned_db();
    let url = url_without_password(ps, &db);
    let r = run(chronicle(&["migrate"]).env("DATABASE_URL", &url));
    assert_eq!(r.code, Some(3), "{r}");
    let r = run(chronicle(&["migrate"]).env("DATABASE_URL", &url).env("PGPASSWORD", "wrong"));
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("password authentication failed"), "{r}");
}

#[cfg(unix)]
#[test]
fn a_hostile_password_written_raw_encoded_or_quoted_logs_in() {
    let (db, ps) = owned_db();
    let (port, pw) = (ps.cluster.server.port, &ps.password);
    for url in [
        format!("postgresql://{}:{pw}@127.0.0.1:{port}/{}", ps.role, db.name),
        format!("postgresql+psycopg://{}:{}@127.0.0.1:{port}/{}", ps.role, pct(pw), db.name),
        format!("host=127.0.0.1 port={port} user={} dbname={} password={}", ps.role, db.name, kv_quote(pw)),
    ] {
        let r = run(chronicle(&["migrate"]).env("DATABASE_URL", &url));
        assert_eq!(r.code, Some(0), "{url}: {r}");
        assert!(!r.all().contains(pw.as_str()), "{r}");
    }
}

#[cfg(unix)]
#[test]
fn pgpassword_logs_in_and_a_worker_drains_with_it() {
    let (db, ps) = owned_db();
    let url = url_without_password(ps, &db);
    let r = run(chronicle(&["migrate"]).env("DATABASE_URL", &url).env("PGPASSWORD", &ps.password));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(chronicle(&["inject", "--count", "50"]).env("DATABASE_URL", &url).env("PGPASSWORD", &ps.password));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(chronicle(&["worker", "--until-empty"])
        .env("DATABASE_URL", &url)
        .env("PGPASSWORD", &ps.password)
        .env("OUTBOX_METRICS_PORT", "0")
        .env("OUTBOX_RUN_SECONDS", "120")
        .env("RUST_LOG", "debug"));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(!r.all().contains(ps.password.as_str()), "{r}");
    crate::util::assert_fully_projected(&mut db.client());
    assert_eq!(crate::util::count(&mut db.client(), "SELECT count(*) FROM chronicle_entries"), 50);
}

#[cfg(unix)]
#[test]
fn a_private_password_file_logs_in_through_pgpassfile_or_home() {
    let (db, ps) = owned_db();
    let url = url_without_password(ps, &db);
    let dir = scratch_dir("pgpass");
    // Comments, lines for other servers and users first; wildcards; the first match wins.
    let text = format!(
        "# chronicle test\n127.0.0.1:{}:{}:someone_else:nope\nother.example:*:*:*:nope\n{}\n*:*:*:*:too-late\n",
        ps.cluster.server.port,
        db.name,
        pgpass_line(ps, "*", "127.0.0.1")
    );
    let file = private_file(&dir, "pw", &text, 0o600);
    let r = run(chronicle(&["migrate"]).env("DATABASE_URL", &url).env("PGPASSFILE", &file));
    assert_eq!(r.code, Some(0), "{r}");
    // The same file as ~/.pgpass of a worker.
    let home = scratch_dir("home");
    private_file(&home, ".pgpass", &text, 0o600);
    let r = run(chronicle(&["inject", "--count", "20"]).env("DATABASE_URL", &url).env("HOME", &home));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(chronicle(&["worker", "--until-empty"])
        .env("DATABASE_URL", &url)
        .env("HOME", &home)
        .env("OUTBOX_METRICS_PORT", "0")
        .env("OUTBOX_RUN_SECONDS", "120"));
    assert_eq!(r.code, Some(0), "{r}");
    crate::util::assert_fully_projected(&mut db.client());
    assert!(!r.all().contains(ps.password.as_str()), "{r}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(home);
}

#[cfg(unix)]
#[test]
fn a_password_file_others_can_read_is_refused_with_a_warning_naming_it() {
    let (db, ps) = owned_db();
    let url = url_without_password(ps, &db);
    let dir = scratch_dir("pgpass-open");
    let file = private_file(&dir, "pw", &format!("{}\n", pgpass_line(ps, "*", "*")), 0o644);
    let r = run(chronicle(&["migrate"]).env("DATABASE_URL", &url).env("PGPASSFILE", &file));
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains(&file.display().to_string()) && r.stderr.contains("group or world access"), "{r}");
    // Made private, the same file is used.
    private_file(&dir, "pw", &format!("{}\n", pgpass_line(ps, "*", "*")), 0o600);
    let r = run(chronicle(&["migrate"]).env("DATABASE_URL", &url).env("PGPASSFILE", &file));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(!r.stderr.contains("group or world access"), "{r}");
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(unix)]
#[test]
fn pgpassword_wins_over_the_password_file_and_the_url_over_both() {
    let (db, ps) = owned_db();
    let url = url_without_password(ps, &db);
    let dir = scratch_dir("pgpass-order");
    let file = private_file(&dir, "pw", "*:*:*:*:wrong-from-file\n", 0o600);
    let r =
        run(chronicle(&["migrate"]).env("DATABASE_URL", &url).env("PGPASSFILE", &file).env("PGPASSWORD", &ps.password));
    assert_eq!(r.code, Some(0), "PGPASSWORD is used before the file: {r}");
    let with_pw =
        format!("postgresql://{}:{}@127.0.0.1:{}/{}", ps.role, pct(&ps.password), ps.cluster.server.port, db.name);
    let r = run(chronicle(&["migrate", "--status"]).env("DATABASE_URL", &with_pw).env("PGPASSWORD", "wrong"));
    assert_eq!(r.code, Some(0), "the URL's password is used before PGPASSWORD: {r}");
    let _ = std::fs::remove_dir_all(dir);
}
