//! Nothing chronicle prints for a person lets data it did not write drive the terminal:
//! escape sequences, bells and bidirectional overrides in events, in database messages
//! or on the command line are shown escaped by `show`, `status`, `entries`, errors and
//! logs, as text or as JSON.

use crate::util::{chronicle_cmd, insert_events, run, worker_cmd, Ran, TestDb};

/// Clears the screen, retitles the window, rings the bell, reverses the text after it,
/// and hides, reorders or breaks what follows with invisible marks and separators.
const HOSTILE: &str =
    "\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m\u{202e}gnp.exe\u{7f}\u{2067}\u{200b}\u{200f}\u{61c}\u{2028}\u{feff}";

fn assert_inert(what: &str, r: &Ran) {
    for (stream, text) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
        let raw: Vec<char> = text.chars().filter(|&c| chronicle::terminal::is_unsafe(c) && c != '\n').collect();
        assert!(raw.is_empty(), "{what} sent {raw:?} raw to its {stream}:\n{r}");
    }
}

#[test]
fn hostile_text_in_events_and_arguments_is_printed_escaped() {
    let db = TestDb::new();
    let mut c = db.client();
    let library = uuid::Uuid::now_v7();
    let (good, bad) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after,
                                       occurred_at, request_id, client, reason)
         VALUES ($1, $3, 'book', gen_random_uuid(), 'BookRenamed', jsonb_build_object('title', 'Old'),
                 jsonb_build_object('title', 'New ' || $4), now(), $4, $4, $4),
                ($2, $3, 'book', gen_random_uuid(), 'Book' || $4, NULL, jsonb_build_object('title', $4),
                 now(), $4, $4, $4)",
        &[&good, &bad, &library, &HOSTILE],
    )
    .unwrap();

    let r = run(worker_cmd(&db, &["--until-empty"]).env("RUST_LOG", "debug"));
    assert_eq!(r.code, Some(0), "{r}");
    assert_inert("worker logs", &r);
    let r = run(worker_cmd(&db, &["--until-empty"]).env("CHRONICLE_LOG_FORMAT", "json").env("RUST_LOG", "debug"));
    assert_inert("worker logs as JSON", &r);

    for id in [good, bad] {
        let r = run(&mut db.chronicle(&["show", &id.to_string()]));
        assert_eq!(r.code, Some(0), "{r}");
        assert_inert("show", &r);
        assert!(r.stdout.contains("\\x1b[2J\\x1b]0;pwned\\x07"), "show hides the text instead of escaping it:\n{r}");
    }
    let r = run(&mut db.chronicle(&["status"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_inert("status", &r);
    let r = run(&mut db.chronicle(&["entries", "--library-id", &library.to_string()]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_inert("entries", &r);
    assert!(r.stdout.contains("New"), "{r}");

    for args in
        [vec![HOSTILE], vec!["entries", "--event-type", HOSTILE, "--library-id", HOSTILE], vec!["show", HOSTILE]]
    {
        let r = run(&mut db.chronicle(&args));
        assert_eq!(r.code, Some(2), "{args:?}: {r}");
        assert_inert("an error", &r);
    }
    let r = run(chronicle_cmd(&["status"]).env("DATABASE_URL", format!("{}{HOSTILE}", db.url())));
    assert_inert("an error about DATABASE_URL", &r);
}

#[test]
fn json_output_and_json_logs_escape_what_text_escapes_and_keep_the_value() {
    let db = TestDb::new();
    let mut c = db.client();
    let library = uuid::Uuid::now_v7();
    let id = uuid::Uuid::now_v7();
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after,
                                       occurred_at, request_id, client, reason)
         VALUES ($1, $2, 'book', gen_random_uuid(), 'BookRenamed', jsonb_build_object('title', 'Old'),
                 jsonb_build_object('title', 'New ' || $3), now(), $3, $3, $3)",
        &[&id, &library, &HOSTILE],
    )
    .unwrap();
    let r = run(worker_cmd(&db, &["--until-empty"]).env("CHRONICLE_LOG_FORMAT", "json").env("RUST_LOG", "debug"));
    assert_eq!(r.code, Some(0), "{r}");
    assert_inert("worker logs as JSON", &r);
    for line in r.stderr.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    }

    let r = run(&mut db.chronicle(&["show", &id.to_string(), "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_inert("show --json", &r);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["event"]["request_id"], HOSTILE, "the same value: {v}");
    assert_eq!(v["event"]["after"]["title"], format!("New {HOSTILE}"), "{v}");

    let r = run(&mut db.chronicle(&["entries", "--library-id", &library.to_string(), "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_inert("entries --json", &r);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["entries"][0]["reason"], HOSTILE, "the same value: {v}");
    assert_eq!(v["entries"][0]["details"]["after"]["title"], format!("New {HOSTILE}"), "{v}");
}

#[test]
fn a_line_break_in_a_logged_value_does_not_split_the_log_line() {
    let db = TestDb::new();
    insert_events(&mut db.client(), 1);
    let r =
        run(worker_cmd(&db, &["--until-empty"]).env("OUTBOX_WORKER_ID", "w1\n[2026-01-01T00:00:00Z ERROR forged] x"));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stderr.contains("w1\\n[2026"), "the worker id is logged escaped: {r}");
    for line in r.stderr.lines() {
        assert!(line.starts_with("[20") && !line.starts_with("[2026-01-01"), "a split or forged line: {line:?}\n{r}");
    }
}
