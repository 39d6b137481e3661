//! Writing events: `chronicle append` (validated JSON in, all or nothing) and
//! `chronicle inject` (reproducible synthetic events), on a real server.

use std::collections::BTreeSet;

use chronicle::event::EventType;
use chronicle::input::{event_from_json, Rules};
use chronicle::synthetic::Generator;
use serde_json::{json, Value};

use crate::util::{chronicle_cmd, count, free_port, run, run_with_input, TestDb};

const LIB: &str = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01";
const BOOK: &str = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e05";
const SHELF: &str = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e03";

fn book_created(title: &str) -> Value {
    json!({
        "library_id": LIB, "entity_type": "book", "entity_id": BOOK, "event_type": "BookCreated",
        "after": {"title": title, "bookshelf_id": SHELF}, "occurred_at": "2025-03-01T09:30:00Z",
        "client": "web/1.42.0", "ip": "203.0.113.7",
    })
}

fn json_lines(events: &[Value]) -> Vec<u8> {
    events.iter().map(|e| format!("{e}\n")).collect::<String>().into_bytes()
}

fn events_and_outbox(db: &TestDb) -> (i64, i64) {
    let mut c = db.client();
    (
        count(&mut c, "SELECT count(*) FROM chronicle_events"),
        count(&mut c, "SELECT count(*) FROM chronicle_outbox_events"),
    )
}

/// Every row of `chronicle_events`, as JSON, in id order.
fn event_rows(db: &TestDb) -> Vec<Value> {
    let mut c = db.client();
    c.query("SELECT to_jsonb(e) FROM chronicle_events e ORDER BY id", &[])
        .expect("reading chronicle_events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn append_one_event_from_stdin_writes_it_and_its_outbox_row() {
    let db = TestDb::new();
    let r = run_with_input(&mut db.chronicle(&["append"]), book_created("Ops").to_string().as_bytes());
    assert_eq!(r.code, Some(0), "{r}");
    let id = r.stdout.trim();
    assert!(uuid::Uuid::parse_str(id).is_ok_and(|u| u.get_version_num() == 7), "{r}");
    let mut c = db.client();
    let row = c
        .query_one(
            "SELECT e.id::text, e.after->>'title', e.client, host(e.ip), o.status
             FROM chronicle_events e JOIN chronicle_outbox_events o ON o.event_id = e.id",
            &[],
        )
        .expect("the event and its outbox row");
    assert_eq!(row.get::<_, String>(0), id);
    assert_eq!(row.get::<_, String>(1), "Ops");
    assert_eq!(row.get::<_, String>(2), "web/1.42.0");
    assert_eq!(row.get::<_, String>(3), "203.0.113.7");
    assert_eq!(row.get::<_, String>(4), "pending");
    assert_eq!(events_and_outbox(&db), (1, 1));
}

#[test]
fn append_reads_json_lines_from_a_file_and_prints_ids_in_order() {
    let db = TestDb::new();
    let given = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9eff";
    let mut with_id = book_created("Second");
    with_id["id"] = json!(given);
    let mut input = json_lines(&[book_created("First")]);
    input.extend_from_slice(b"\n   \r\n");
    input.extend_from_slice(&json_lines(&[with_id, book_created("Third")]));
    let path = std::env::temp_dir().join(format!("{}.jsonl", db.name));
    std::fs::write(&path, &input).expect("writing the input file");
    let r = run(&mut db.chronicle(&["append", "--file", path.to_str().expect("utf-8 temp path")]));
    let _ = std::fs::remove_file(&path);
    assert_eq!(r.code, Some(0), "{r}");
    let ids: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(ids.len(), 3, "{r}");
    assert_eq!(ids[1], given);
    assert_eq!(events_and_outbox(&db), (3, 3));
    let mut c = db.client();
    let title: String = c
        .query_one("SELECT after->>'title' FROM chronicle_events WHERE id = $1::text::uuid", &[&ids[2]])
        .expect("the third event")
        .get(0);
    assert_eq!(title, "Third");
}

#[test]
fn append_json_prints_an_array_of_the_ids_written() {
    let db = TestDb::new();
    let input = json_lines(&[book_created("A"), book_created("B")]);
    let r = run_with_input(&mut db.chronicle(&["append", "--json"]), &input);
    assert_eq!(r.code, Some(0), "{r}");
    let ids: Vec<String> = serde_json::from_str(&r.stdout).expect("--json output is a JSON array of strings");
    assert_eq!(ids.len(), 2);
    let mut c = db.client();
    for id in &ids {
        let n: i64 = c
            .query_one("SELECT count(*) FROM chronicle_events WHERE id = $1::text::uuid", &[id])
            .expect("counting")
            .get(0);
        assert_eq!(n, 1, "{id}");
    }
}

#[test]
fn one_bad_line_among_good_ones_writes_nothing_and_is_named() {
    let db = TestDb::new();
    let mut bad = book_created("Bad");
    bad["after"] = json!({"bookshelf_id": SHELF});
    let input = json_lines(&[book_created("A"), book_created("B"), bad, book_created("D")]);
    let r = run_with_input(&mut db.chronicle(&["append"]), &input);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("line 3: after.title is missing (BookCreated requires title)"), "{r}");
    assert!(r.stderr.contains("nothing was written"), "{r}");
    assert!(r.stdout.is_empty(), "{r}");
    assert_eq!(events_and_outbox(&db), (0, 0));
}

#[test]
fn every_validation_rule_refuses_the_input_and_writes_nothing() {
    let db = TestDb::new();
    let with = |key: &str, v: Value| {
        let mut e = book_created("Ops");
        e[key] = v;
        e.to_string().into_bytes()
    };
    let mut missing = book_created("Ops");
    missing.as_object_mut().map(|o| o.remove("entity_id"));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("missing column", missing.to_string().into_bytes(), "entity_id is missing"),
        ("bad uuid", with("library_id", json!("lib-1")), "library_id: \"lib-1\" is not a UUID"),
        ("bad actor uuid", with("actor_user_id", json!(42)), "actor_user_id: must be a UUID string"),
        ("bad timestamp", with("occurred_at", json!("01/03/2025 09:30")), "is not an RFC 3339 time"),
        ("bad created_at", with("created_at", json!("2025-02-30T00:00:00Z")), "created_at:"),
        ("unknown entity type", with("entity_type", json!("page")), "\"page\" is not an entity type"),
        ("entity type of another event", with("entity_type", json!("tag")), "does not fit BookCreated"),
        ("wrong payload type", with("after", json!({"title": 7, "bookshelf_id": SHELF})), "after.title must be a string, got 7"),
        ("payload not an object", with("before", json!("x")), "before: must be a JSON object or null"),
        ("unknown event type", with("event_type", json!("BookArchived")), "--allow-unknown-type"),
        ("NUL escape", br#"{"library_id":"0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01","entity_type":"book","entity_id":"0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e05","event_type":"BookCreated","after":{"title":"a\u0000b","bookshelf_id":"0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e03"},"occurred_at":"2025-03-01T09:30:00Z"}"#.to_vec(), "after.title contains a NUL character"),
        ("bad ip", with("ip", json!("localhost")), "ip: \"localhost\" is not an IP address"),
        ("unknown key", with("ocurred_at", json!("2025-03-01T09:30:00Z")), "unknown key \"ocurred_at\" (did you mean \"occurred_at\"?)"),
        ("malformed JSON", b"{\"library_id\": ".to_vec(), "line 2: malformed JSON"),
        ("not an object", b"[1, 2]".to_vec(), "an event must be a JSON object"),
        ("non-UTF-8 bytes", b"{\"library_id\": \"\xff\xfe\"}".to_vec(), "line 2: not valid UTF-8"),
        ("empty input", b"\n\n".to_vec(), "no events"),
    ];
    for (name, input, expected) in cases {
        // Each bad event follows a good one: nothing of the input may be written.
        let mut all = json_lines(&[book_created("Good")]);
        all.extend_from_slice(&input);
        let input = if name == "empty input" { input } else { all };
        let r = run_with_input(&mut db.chronicle(&["append"]), &input);
        assert_eq!(r.code, Some(2), "{name}: {r}");
        assert!(r.stderr.contains(expected), "{name}: expected {expected:?} in\n{r}");
        assert_eq!(events_and_outbox(&db), (0, 0), "{name}: something was written");
    }
}

#[test]
fn an_unknown_type_is_written_only_with_allow_unknown_type() {
    let db = TestDb::new();
    let mut e = book_created("Ops");
    e["event_type"] = json!("BookArchived");
    let r = run_with_input(&mut db.chronicle(&["append", "--allow-unknown-type"]), e.to_string().as_bytes());
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(events_and_outbox(&db), (1, 1));
}

#[test]
fn duplicate_ids_are_refused_and_nothing_is_written() {
    let db = TestDb::new();
    let id = "0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9eaa";
    let mut e = book_created("Ops");
    e["id"] = json!(id);

    // Repeated within the input.
    let r = run_with_input(&mut db.chronicle(&["append"]), &json_lines(&[e.clone(), book_created("X"), e.clone()]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains(&format!("line 3: id {id} repeats the id of line 1")), "{r}");
    assert_eq!(events_and_outbox(&db), (0, 0));

    // Already in the table.
    let r = run_with_input(&mut db.chronicle(&["append"]), e.to_string().as_bytes());
    assert_eq!(r.code, Some(0), "{r}");
    let r = run_with_input(&mut db.chronicle(&["append"]), &json_lines(&[book_created("New"), e]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("already in chronicle_events") && r.stderr.contains(id), "{r}");
    assert_eq!(events_and_outbox(&db), (1, 1));
}

#[test]
fn append_check_validates_without_a_database() {
    let r = run_with_input(
        &mut chronicle_cmd(&["append", "--check"]),
        &json_lines(&[book_created("A"), book_created("B")]),
    );
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("2 valid event"), "{r}");
}

#[test]
fn append_to_an_unreachable_database_exits_3() {
    let url = format!("postgresql://postgres@127.0.0.1:{}/nothing", free_port());
    let r =
        run_with_input(chronicle_cmd(&["append"]).env("DATABASE_URL", &url), book_created("A").to_string().as_bytes());
    assert_eq!(r.code, Some(3), "{r}");
}

/// The JSON examples of the event catalog (docs/events.md, its "Examples" section), one
/// per code block: what users copy is what this test feeds to `append`.
fn catalog_examples() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/events.md");
    let doc = std::fs::read_to_string(path).expect("reading docs/events.md");
    let start = doc.find("\n## Examples").expect("docs/events.md has the Examples section");
    let section = &doc[start + 1..];
    let text = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut examples = Vec::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        match (&mut block, line.trim()) {
            (None, "```json") => block = Some(String::new()),
            (Some(b), "```") => {
                examples.push(
                    serde_json::from_str(b).unwrap_or_else(|e| panic!("docs/events.md catalog example: {e}\n{b}")),
                );
                block = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    examples
}

#[test]
fn the_catalog_examples_are_valid_appends_one_per_type() {
    let examples = catalog_examples();
    let types: BTreeSet<&str> = examples.iter().skip(1).filter_map(|e| e["event_type"].as_str()).collect();
    let all: BTreeSet<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
    assert_eq!(types, all, "docs/events.md needs one example per catalog type");
    assert_eq!(examples.len(), EventType::ALL.len() + 1);
    let db = TestDb::new();
    let r = run_with_input(&mut db.chronicle(&["append"]), &json_lines(&examples));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(events_and_outbox(&db), (examples.len() as i64, examples.len() as i64));
}

#[test]
fn inject_writes_exactly_n_valid_events_covering_the_catalog() {
    let db = TestDb::new();
    let r = run(&mut db.chronicle(&["inject", "--count", "2000", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let report: Value = serde_json::from_str(&r.stdout).expect("--json output");
    assert_eq!(report["events"], 2000);
    assert_eq!(report["libraries"], 3);
    // Without --seed a fresh seed is chosen and reported, so the run can be repeated.
    let seed = report["seed"].as_u64().expect("the seed is reported");
    assert!(report["seconds"].as_f64().is_some(), "{report}");
    assert_eq!(events_and_outbox(&db), (2000, 2000));

    let mut types = BTreeSet::new();
    let mut libraries = BTreeSet::new();
    let mut stored = Vec::new();
    for row in event_rows(&db) {
        match event_from_json(&row, Rules::default()) {
            Ok(e) => stored.push(e),
            Err(problems) => panic!("an injected event is not valid: {problems:?}\n{row}"),
        }
        types.insert(row["event_type"].as_str().unwrap_or_default().to_string());
        libraries.insert(row["library_id"].to_string());
    }
    // What the database holds is exactly what the generator made (binary COPY loses
    // nothing: texts with tabs, newlines, backslashes and Chinese, times to the µs).
    let mut generated: Vec<_> = Generator::new(seed, 3, 2000).collect();
    generated.sort_by_key(|e| e.id);
    assert!(stored == generated, "the stored events differ from the generated ones");
    let all: BTreeSet<String> = EventType::ALL.iter().map(|t| t.to_string()).collect();
    assert_eq!(types, all);
    assert_eq!(libraries.len(), 3);
    let mut c = db.client();
    assert!(count(&mut c, "SELECT count(*) FROM chronicle_events WHERE actor_user_id IS NULL") > 0);
    assert!(count(&mut c, "SELECT count(*) FROM chronicle_events WHERE after->>'title' ~ '[\\u4e00-\\u9fff]'") > 0);
}

#[test]
fn inject_is_reproducible_from_its_seed() {
    let (a, b, c) = (TestDb::new(), TestDb::new(), TestDb::new());
    for (db, seed) in [(&a, "5"), (&b, "5"), (&c, "6")] {
        let r = run(&mut db.chronicle(&["inject", "--count", "700", "--libraries", "4", "--seed", seed]));
        assert_eq!(r.code, Some(0), "{r}");
        assert!(r.stdout.contains("wrote 700 events to 4 libraries"), "{r}");
    }
    let rows = |db: &TestDb| -> Vec<String> {
        let mut client = db.client();
        client
            .query("SELECT e::text FROM chronicle_events e ORDER BY id", &[])
            .expect("reading rows")
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let (ra, rb, rc) = (rows(&a), rows(&b), rows(&c));
    assert_eq!(ra.len(), 700);
    assert_eq!(ra, rb, "the same seed must write the same rows");
    assert_ne!(ra, rc, "another seed must write other rows");

    // The same seed twice into one database: the same ids, refused as a whole.
    let r = run(&mut a.chronicle(&["inject", "--count", "700", "--libraries", "4", "--seed", "5"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("another --seed"), "{r}");
    assert_eq!(events_and_outbox(&a), (700, 700));
}

#[test]
fn inject_refuses_a_bad_count() {
    let db = TestDb::new();
    for args in [
        &["inject", "--count", "0"][..],
        &["inject", "--count", "abc"],
        &["inject", "--count", "100000001"],
        &["inject"],
        &["inject", "--count", "10", "--libraries", "0"],
    ] {
        let r = run(&mut db.chronicle(args));
        assert_eq!(r.code, Some(2), "{args:?}: {r}");
        assert!(r.stderr.contains("--count") || r.stderr.contains("--libraries"), "{args:?}: {r}");
    }
    assert_eq!(events_and_outbox(&db), (0, 0));
}
