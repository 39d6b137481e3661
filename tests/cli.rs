//! The binary's command line, configuration and exit codes, end to end.

use crate::util::{chronicle_cmd, run, server, TestDb};

#[test]
fn help_of_every_command_exits_0() {
    let r = run(&mut chronicle_cmd(&["--help"]));
    assert_eq!(r.code, Some(0), "{r}");
    for c in chronicle::cli::COMMANDS {
        assert!(r.stdout.contains(c.name), "--help does not list {}", c.name);
        for args in [vec![c.name, "--help"], vec!["help", c.name], vec![c.name, "-h"]] {
            let r = run(&mut chronicle_cmd(&args));
            assert_eq!(r.code, Some(0), "{args:?}: {r}");
            assert!(r.stdout.contains("USAGE"), "{args:?}: {r}");
        }
    }
    // Every setting the worker reads is documented where a user looks for it: the
    // worker's own help names the variable and its flag.
    let worker = run(&mut chronicle_cmd(&["help", "worker"]));
    for s in chronicle::config::WORKER_SETTINGS {
        assert!(worker.stdout.contains(s.var), "{} missing from `chronicle help worker`", s.var);
        assert!(worker.stdout.contains(&format!("--{}", s.flag)), "--{} missing from `chronicle help worker`", s.flag);
    }
    let r = run(&mut chronicle_cmd(&["--version"]));
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.starts_with("chronicle "), "{r}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [&["nonsense"][..], &[], &["migrate", "--bogus"], &["migrate", "--wait", "soon"]] {
        let r = run(&mut chronicle_cmd(args));
        assert_eq!(r.code, Some(2), "{args:?}: {r}");
    }
}

#[test]
fn every_database_url_form_connects() {
    let db = TestDb::new();
    let s = &db.server;
    let mut forms = vec![
        s.url_with_scheme("postgres", &db.name),
        s.url_with_scheme("postgresql", &db.name),
        s.url_with_scheme("postgresql+psycopg", &db.name),
        s.url_with_scheme("postgresql+psycopg2", &db.name),
        s.key_value(&db.name),
    ];
    // The unix-socket form (Unix only), through the socket directory the server really has here.
    if cfg!(unix) {
        let socket_dir = s.socket_dir.clone().unwrap_or_else(|| {
            panic!("the test server ({}) has no unix socket on this machine to test the socket form with", s.origin)
        });
        forms.push(format!("host={socket_dir} port={} user={} dbname={}", s.port, s.user, db.name));
    }
    for url in forms {
        let r = run(chronicle_cmd(&["migrate", "--status"]).env("DATABASE_URL", &url));
        assert_eq!(r.code, Some(0), "{url}: {r}");
        assert!(r.stdout.contains("up to date"), "{url}: {r}");
        // The flag works too, and wins over the variable.
        let r = run(chronicle_cmd(&["migrate", "--status", "--database-url", &url]).env("DATABASE_URL", "mysql://x"));
        assert_eq!(r.code, Some(0), "{url}: {r}");
    }
}

#[test]
fn bad_or_missing_database_url_exits_2_before_connecting_and_hides_the_password() {
    // None of these may reach the network: a listener on this port would see a connection.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = trap.local_addr().unwrap().port();
    trap.set_nonblocking(true).unwrap();
    for url in [
        format!("mysql://root:s3cr3t-pw@127.0.0.1:{port}/db"),
        format!("127.0.0.1:{port}"),
        format!("postgres://u:s3cr3t-pw@127.0.0.1:{port}/db?sslmode=maybe"),
        format!("host=127.0.0.1 port={port} password=s3cr3t-pw nonsense=1"),
        "postgresql://u:s3cr3t-pw@127.0.0.1:notaport/db".to_string(),
        String::new(),
    ] {
        let r = run(chronicle_cmd(&["migrate"]).env("DATABASE_URL", &url));
        assert_eq!(r.code, Some(2), "{url}: {r}");
        assert!(r.stderr.contains("DATABASE_URL"), "{url}: {r}");
        assert!(!r.all().contains("s3cr3t-pw"), "password shown: {r}");
    }
    let r = run(&mut chronicle_cmd(&["migrate"]));
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("DATABASE_URL is not set"), "{r}");
    assert!(trap.accept().is_err(), "a refused configuration still connected");
}

#[test]
fn unreachable_database_exits_3_without_showing_the_password() {
    let port = crate::util::free_port();
    let url = format!("postgresql+psycopg://u:s3cr3t-pw@127.0.0.1:{port}/db");
    let r = run(chronicle_cmd(&["migrate"]).env("DATABASE_URL", &url));
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("cannot connect"), "{r}");
    assert!(!r.all().contains("s3cr3t-pw"), "{r}");
}

#[test]
fn wrong_credentials_or_missing_database_exit_3() {
    let s = server();
    let r = run(chronicle_cmd(&["migrate"]).env("DATABASE_URL", s.url("chronicle_no_such_database_here")));
    assert_eq!(r.code, Some(3), "{r}");
}

#[test]
fn migrate_wait_waits_for_a_database_that_comes_up_later() {
    let port = crate::util::free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    // Nothing comes up: --wait gives up after its duration with exit 3.
    let started = std::time::Instant::now();
    let r = run(chronicle_cmd(&["migrate", "--status", "--wait", "1s"]).env("DATABASE_URL", &url));
    assert_eq!(r.code, Some(3), "{r}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "gave up too early");
    // Without --wait, it does not wait.
    let r = run(chronicle_cmd(&["migrate", "--status"]).env("DATABASE_URL", &url));
    assert_eq!(r.code, Some(3), "{r}");

    // The database appears 1.5 s after migrate started: --wait 30s gets it.
    let db = TestDb::empty();
    let _proxy = crate::util::Proxy::start_later(port, std::time::Duration::from_millis(1500), &db.server);
    let url = db.server.url(&db.name).replace(&format!(":{}/", db.server.port), &format!(":{port}/"));
    let url = url.replace(&db.server.host, "127.0.0.1");
    let r = run(chronicle_cmd(&["migrate", "--wait", "30s"]).env("DATABASE_URL", &url));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("schema version"), "{r}");
}

/// The verbs of a dispatch: run.sh's `case` arms (`  verb) ...`) or run.ps1's `switch`
/// arms (`  'verb' { ... }`), in order.
pub(crate) fn verbs(text: &str, powershell: bool) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| {
            let t = l.trim_start();
            if l.len() - t.len() != 2 {
                return None;
            }
            if powershell {
                let rest = t.strip_prefix('\'')?;
                let (verb, after) = rest.split_once('\'')?;
                after.trim_start().starts_with('{').then(|| verb.to_string())
            } else {
                let (verb, _) = t.split_once(") ")?;
                verb.chars().all(|c| c.is_ascii_lowercase() || c == '-').then(|| verb.to_string())
            }
        })
        .collect()
}

#[test]
fn run_sh_and_run_ps1_have_the_same_verbs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let sh = std::fs::read_to_string(format!("{root}/run.sh")).unwrap();
    let ps = std::fs::read_to_string(format!("{root}/run.ps1")).unwrap();
    let (a, b) = (verbs(&sh, false), verbs(&ps, true));
    assert!(a.len() >= 8, "run.sh verbs: {a:?}");
    for required in ["test", "demo", "migrate", "db-start", "db-stop", "worker"] {
        assert!(a.iter().any(|v| v == required), "run.sh lacks {required}");
    }
    assert_eq!(a, b, "run.sh and run.ps1 differ");
}

/// `chronicle` with its output not a terminal and no COLUMNS: help is laid out in 80.
fn at_80_columns(args: &[&str]) -> crate::util::Ran {
    run(chronicle_cmd(args).env_remove("COLUMNS"))
}

#[test]
fn the_main_help_fits_a_screen_and_points_at_each_command_help() {
    let r = at_80_columns(&["--help"]);
    assert_eq!(r.code, Some(0), "{r}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines.len() <= 24, "chronicle --help is {} lines long:\n{r}", lines.len());
    for l in &lines {
        assert!(l.chars().count() <= 80, "a line wider than 80 columns: {l:?}");
    }
    for c in chronicle::cli::COMMANDS {
        let one = lines.iter().filter(|l| l.trim_start().starts_with(&format!("{} ", c.name))).count();
        assert_eq!(one, 1, "{} should have exactly one line in chronicle --help", c.name);
    }
    assert!(r.stdout.contains("chronicle help <COMMAND>"), "{r}");
}

#[test]
fn every_command_help_fits_80_columns_and_wraps_to_the_width_asked() {
    for c in chronicle::cli::COMMANDS {
        let r = at_80_columns(&["help", c.name]);
        assert_eq!(r.code, Some(0), "{r}");
        for l in r.stdout.lines() {
            assert!(chronicle::terminal::columns(l) <= 80, "`chronicle help {}`: wider than 80: {l:?}", c.name);
        }
        assert_eq!(r.stdout, chronicle::cli::command_help(c).render(80), "{}", c.name);
        // COLUMNS, when set, is the width (kept within 40 to 100).
        for (columns, width) in [("60", 60), ("20", 40), ("300", 100)] {
            let r = run(chronicle_cmd(&["help", c.name]).env("COLUMNS", columns));
            assert_eq!(r.stdout, chronicle::cli::command_help(c).render(width), "COLUMNS={columns} {}", c.name);
        }
    }
}

#[test]
fn a_mistyped_flag_gets_the_nearest_flag_and_exits_2() {
    for (args, near) in [
        (&["worker", "--batchsize", "10"][..], "did you mean --batch-size?"),
        (&["worker", "--batch_size", "10"], "did you mean --batch-size?"),
        (&["libraries", "--limt", "5"], "did you mean --limit?"),
    ] {
        let r = run(&mut chronicle_cmd(args));
        assert_eq!(r.code, Some(2), "{args:?}: {r}");
        assert!(r.stderr.contains(&format!("invalid option '{}'", args[1])), "{args:?}: {r}");
        assert!(r.stderr.contains(near), "{args:?}: {r}");
        assert!(r.stderr.contains(&format!("`chronicle help {}`", args[0])), "{args:?}: {r}");
    }
    // Nothing near: no guess, still the pointer to the command's flags.
    let r = run(&mut chronicle_cmd(&["worker", "--frobnicate"]));
    assert_eq!(r.code, Some(2), "{r}");
    assert!(!r.stderr.contains("did you mean"), "{r}");
    assert!(r.stderr.contains("invalid option '--frobnicate'; `chronicle help worker` lists its flags"), "{r}");
    // A mistyped command gets the same kind of suggestion.
    let r = run(&mut chronicle_cmd(&["wrker"]));
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("unknown command \"wrker\" (did you mean worker?)"), "{r}");
}

#[test]
fn every_command_on_a_database_without_the_schema_says_to_run_migrate() {
    let db = TestDb::empty();
    let id = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e10";
    let commands: Vec<Vec<&str>> = vec![
        vec!["status"],
        vec!["entries", "--library-id", id],
        vec!["verify"],
        vec!["inject", "--count", "10", "--seed", "1"],
        vec!["show", id],
        vec!["replay-failed", "--by", "ops", "--reason", "fix applied"],
        vec!["prune", "--older-than", "1d"],
        vec!["rebuild", "--truncate"],
        vec!["erase", "--event-id", id, "--by", "dpo", "--reason", "r"],
        vec!["libraries"],
        vec!["worker", "--until-empty"],
    ];
    for args in commands {
        let r = run(db.chronicle(&args).env("OUTBOX_METRICS_PORT", "0"));
        assert_eq!(r.code, Some(1), "{args:?}: {r}");
        assert!(r.stderr.contains("run `chronicle migrate` first"), "{args:?} does not say to migrate: {r}");
    }
}
