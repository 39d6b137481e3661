//! Nothing chronicle prints for a person lets data it did not write drive the terminal:
//! escape sequences, bells and bidirectional overrides in events, in database messages
//! or on the command line are shown escaped by `show`, `status`, `entries`, errors and
//! logs.

use crate::util::{chronicle_cmd, run, worker_cmd, Ran, TestDb};

/// Clears the screen, retitles the window, rings the bell, reverses the text after it.
const HOSTILE: &str = "\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m\u{202e}gnp.exe";

fn assert_inert(what: &str, r: &Ran) {
    for (stream, text) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
        let raw: Vec<char> =
            text.chars().filter(|&c| (c.is_control() && c != '\n') || ('\u{202A}'..='\u{202E}').contains(&c)).collect();
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
