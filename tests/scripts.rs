//! run.sh, run with bash, as a developer runs it: the usage and the runbook's smoke run
//! (`./run.sh smoke`) against a test database, passing and failing. run.ps1 cannot run
//! here (no PowerShell); its verbs and usage are compared with run.sh's as text.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cli::verbs;
use crate::util::{count, insert_events, run, Ran, TestDb};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// `bash run.sh ARGS` with none of the chronicle variables of the caller's environment,
/// the debug binary as CHRONICLE_BIN (nothing is built) and the worker's metrics off.
fn run_sh(args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.arg(repo("run.sh")).args(args);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k == "DATABASE_URL"
            || k == "PROMETHEUS_PORT"
            || k.starts_with("OUTBOX_")
            || k.starts_with("CHRONICLE_")
            || k == "RUST_LOG"
        {
            c.env_remove(k.as_ref());
        }
    }
    c.env("CHRONICLE_BIN", env!("CARGO_BIN_EXE_chronicle")).env("OUTBOX_METRICS_PORT", "0");
    c.stdin(Stdio::null());
    c
}

/// A smoke run on a test database: not the dev database, so allowed to inject.
fn smoke(database_url: &str) -> Ran {
    run(run_sh(&["smoke"]).env("DATABASE_URL", database_url).env("CHRONICLE_SMOKE_WRITE", "1"))
}

const Q_OUTBOX: &str = "select status, count(*) from chronicle_outbox_events group by 1 order by 1;";
const Q_ENTRIES: &str = "select count(*) from chronicle_entries;";

#[test]
fn help_and_h_and_dash_dash_help_exit_0_and_list_every_verb() {
    let sh = std::fs::read_to_string(repo("run.sh")).unwrap();
    let all = verbs(&sh, false);
    assert!(all.iter().any(|v| v == "smoke") && all.iter().any(|v| v == "monitoring"), "run.sh verbs: {all:?}");
    for flag in ["--help", "-h", "help"] {
        let r = run(&mut run_sh(&[flag]));
        assert_eq!(r.code, Some(0), "./run.sh {flag}: {r}");
        for v in &all {
            assert!(
                r.stdout.lines().any(|l| l.trim_start().starts_with(&format!("{v} "))),
                "./run.sh {flag} does not list {v}: {r}"
            );
        }
        assert!(r.stdout.contains("CHRONICLE_BIN"), "./run.sh {flag} does not document CHRONICLE_BIN: {r}");
    }
    let r = run(&mut run_sh(&["--no-such-verb"]));
    assert_eq!(r.code, Some(2), "{r}");
    // run.ps1's usage lists the verbs of its own switch too (it cannot be run here).
    let ps = std::fs::read_to_string(repo("run.ps1")).unwrap();
    let usage = &ps[ps.find("function Show-Usage").expect("run.ps1 has Show-Usage")..];
    let usage = &usage[..usage.find("'@").expect("Show-Usage is a here-string")];
    for v in verbs(&ps, true) {
        assert!(
            usage.lines().any(|l| l.trim_start().starts_with(&format!("{v} "))),
            "run.ps1's usage does not list {v}"
        );
    }
    assert!(ps.contains("$Verb -eq '-h' -or $Verb -eq '--help'"), "run.ps1 does not take -h and --help for help");
}

#[test]
fn smoke_on_an_empty_outbox_injects_projects_and_prints_the_acceptance_queries() {
    let db = TestDb::new();
    let r = smoke(&db.url());
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("injecting 100 synthetic events"), "{r}");
    // The runbook's two queries ran (psql here), and their results are the database's.
    assert!(r.stdout.contains(Q_OUTBOX) && r.stdout.contains(Q_ENTRIES), "{r}");
    let mut c = db.client();
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 100);
    assert!(r.stdout.contains(" done   |   100"), "the outbox query's result is missing: {r}");
    assert!(r.stdout.lines().any(|l| l.trim() == "100"), "the entries count is missing: {r}");
    assert!(r.stdout.contains("smoke run OK") && r.stdout.contains("entries 0 -> 100"), "{r}");
    // The worker's log is shown (on stderr), not swallowed.
    assert!(r.stderr.contains("processed 100"), "{r}");
}

#[test]
fn smoke_with_pending_events_projects_them_without_injecting() {
    let db = TestDb::new();
    insert_events(&mut db.client(), 30);
    let r = smoke(&db.url());
    assert_eq!(r.code, Some(0), "{r}");
    assert!(!r.stdout.contains("injecting"), "{r}");
    assert!(r.stdout.contains("entries 0 -> 30"), "{r}");
    assert_eq!(count(&mut db.client(), "SELECT count(*) FROM chronicle_entries"), 30);
}

#[test]
fn smoke_fails_on_a_failed_row() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 5);
    // An event of a type this version does not know fails terminally.
    c.batch_execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         VALUES (gen_random_uuid(), gen_random_uuid(), 'book', gen_random_uuid(), 'NoSuchType', '{}', now())",
    )
    .unwrap();
    let r = smoke(&db.url());
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("smoke run FAILED"), "{r}");
    assert!(r.stderr.contains("1 event(s) failing (their delivery failed)"), "{r}");
    assert!(!r.stdout.contains("smoke run OK"), "{r}");
}

#[test]
fn smoke_fails_when_the_server_refuses_the_role() {
    let db = TestDb::new();
    let url = db.url().replacen(&format!("://{}", crate::util::server().user), "://chronicle_no_such_role", 1);
    assert_ne!(url, db.url());
    let r = smoke(&url);
    assert_eq!(r.code, Some(3), "{r}");
    assert!(!r.stdout.lines().any(|l| l.starts_with("==> ") && l.ends_with(" worker")), "the worker ran: {r}");
    assert!(!r.stdout.contains("smoke run OK"), "{r}");
}

#[test]
fn smoke_fails_when_the_worker_logs_an_error_or_exits_non_zero() {
    let db = TestDb::new();
    let dir = std::env::temp_dir().join(format!("chronicle-scripts-{}-{}", std::process::id(), db.name));
    std::fs::create_dir_all(&dir).unwrap();
    // A chronicle that is the real one except for `worker`: one that logs an ERROR line
    // and exits 0 all the same, and one that exits 3 (a run that never reached its database).
    let error_line = "[2026-01-01T00:00:00.000Z ERROR chronicle::worker] OUTBOX_RUN_SECONDS (2s) reached before \
                      the database at x was reachable (no answer): nothing was projected; stopping";
    for (name, worker, expect) in [
        ("logs-error", format!("echo '{error_line}' >&2; exit 0"), "the worker logged ERROR lines"),
        ("exits-3", "exit 3".to_string(), "the worker exited with 3"),
    ] {
        let fake = dir.join(name);
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nif [ \"$1\" = worker ]; then {worker}; fi\nexec '{}' \"$@\"\n",
                env!("CARGO_BIN_EXE_chronicle")
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let r = run(run_sh(&["smoke", "--yes"]).env("DATABASE_URL", db.url()).env("CHRONICLE_BIN", &fake));
        assert_eq!(r.code, Some(1), "{name}: {r}");
        assert!(r.stderr.contains(expect), "{name}: {r}");
        assert!(r.stderr.contains("chronicle_entries did not grow"), "{name}: {r}");
        if name == "logs-error" {
            // Shown as it came, and quoted in the verdict.
            assert_eq!(r.stderr.matches("nothing was projected").count(), 2, "{name}: {r}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A database that is not the dev one gets no synthetic events unless the caller says so
/// (`--yes` or `CHRONICLE_SMOKE_WRITE=1`): without, the smoke run stops, exit 2, having
/// written no event, and says how to allow it. No prompt: CI has no one to answer.
#[test]
fn smoke_injects_into_another_database_only_when_allowed() {
    let db = TestDb::new();
    let r = run(run_sh(&["smoke"]).env("DATABASE_URL", db.url()));
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("not the dev database") && r.stderr.contains("smoke --yes"), "{r}");
    assert!(!r.stdout.contains("injecting"), "{r}");
    assert_eq!(count(&mut db.client(), "SELECT count(*) FROM chronicle_events"), 0, "nothing was injected");
    let r = run(run_sh(&["smoke", "--yes"]).env("DATABASE_URL", db.url()));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("injecting 100 synthetic events") && r.stdout.contains("entries 0 -> 100"), "{r}");
    let r = run(run_sh(&["smoke", "--force"]).env("DATABASE_URL", db.url()));
    assert_eq!(r.code, Some(2), "{r}");
}

/// `db-destroy` deletes the dev cluster's folder only with `--yes`; without, it says what
/// it would delete and how large it is. Run from a copy of run.sh, so the cluster folder
/// is the copy's own, never this checkout's.
#[test]
fn db_destroy_deletes_the_dev_cluster_only_with_yes() {
    let dir = std::env::temp_dir().join(format!("chronicle-db-destroy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(repo("run.sh"), dir.join("run.sh")).unwrap();
    let destroy = |args: &[&str]| {
        let mut c = run_sh(&[]);
        c.arg("db-destroy").args(args);
        let mut sh = Command::new("bash");
        sh.arg(dir.join("run.sh")).arg("db-destroy").args(args);
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => sh.env(k, v),
                None => sh.env_remove(k),
            };
        }
        sh.stdin(Stdio::null());
        run(&mut sh)
    };
    let r = destroy(&[]);
    assert_eq!(r.code, Some(0), "{r}");
    let devdb =
        r.stdout.split("no dev cluster at ").nth(1).and_then(|t| t.split("; nothing").next()).unwrap_or_default();
    assert!(!devdb.is_empty(), "{r}");
    let devdb = PathBuf::from(devdb);
    std::fs::create_dir_all(devdb.join("data")).unwrap();
    // 3 MB and a little less, so that the folders' own blocks keep it at 3 MB rounded up.
    std::fs::write(devdb.join("data").join("base"), vec![0u8; (3 << 20) - (64 << 10)]).unwrap();
    let r = destroy(&[]);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("(3 MB)") && r.stderr.contains("db-destroy --yes"), "{r}");
    assert!(devdb.join("data").join("base").exists(), "deleted without --yes");
    let r = destroy(&["--yes"]);
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("dev cluster deleted"), "{r}");
    assert!(!devdb.exists(), "{r}");
    let _ = std::fs::remove_dir_all(&dir);
}
