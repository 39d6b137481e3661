//! Reading the read model: timeline pages, filters, search, row-level security, verify.

use std::collections::{BTreeMap, BTreeSet};

use chronicle::timeline::{self, Cursor, EntryQuery};
use chrono::{DateTime, Duration, TimeZone, Utc};
use postgres::Client;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::util::{count, insert_events, run, sql_state, worker_cmd, AppRole, TestDb};

/// Projects everything pending, asserting the worker succeeded.
fn drain(db: &TestDb) {
    let r = run(&mut worker_cmd(db, &["--until-empty", "--batch-size", "500"]));
    assert_eq!(r.code, Some(0), "{r}");
}

fn json_of(r: &crate::util::Ran) -> Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {r}"))
}

/// One event as the application writes it.
struct Ev {
    library: Uuid,
    entity_type: &'static str,
    entity_id: Uuid,
    event_type: &'static str,
    before: Option<Value>,
    after: Option<Value>,
    at: DateTime<Utc>,
    actor: Option<Uuid>,
}

fn insert(c: &mut Client, e: &Ev) -> Uuid {
    let id = Uuid::now_v7();
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, actor_user_id, entity_type, entity_id, event_type, before, after, occurred_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[&id, &e.library, &e.actor, &e.entity_type, &e.entity_id, &e.event_type, &e.before, &e.after, &e.at],
    )
    .expect("inserting an event");
    id
}

/// Inserts `n` BookRenamed events into `library`, all at `at`, with random ids.
fn insert_at(c: &mut Client, library: Uuid, n: i64, at: DateTime<Utc>) -> Vec<Uuid> {
    c.query(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
         SELECT gen_random_uuid(), $1, 'book', gen_random_uuid(), 'BookRenamed',
                jsonb_build_object('title', 'old ' || g), jsonb_build_object('title', 'new ' || g), $3
         FROM generate_series(1, $2::bigint) g
         RETURNING id",
        &[&library, &n, &at],
    )
    .expect("inserting events")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 9, 30, 0).unwrap()
}

fn ids_of(page: &Value) -> Vec<Uuid> {
    page["entries"].as_array().expect("entries").iter().map(|e| e["id"].as_str().unwrap().parse().unwrap()).collect()
}

#[test]
fn pages_return_each_entry_once_while_events_arrive_at_the_same_time() {
    let db = TestDb::new();
    let mut c = db.client();
    let library = Uuid::now_v7();
    // 230 events share one occurred_at (only the id orders them), 20 are older.
    let mut originals: BTreeSet<Uuid> = insert_at(&mut c, library, 230, t0()).into_iter().collect();
    for i in 1..=20 {
        originals.extend(insert_at(&mut c, library, 1, t0() - Duration::seconds(i)));
    }
    insert_events(&mut c, 50); // another library
    drain(&db);

    let lib = library.to_string();
    let mut seen: Vec<(DateTime<Utc>, Uuid)> = Vec::new();
    let mut newer: BTreeSet<Uuid> = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut args = vec!["entries", "--library-id", &lib, "--limit", "37", "--json"];
        if let Some(cur) = &cursor {
            args.extend(["--cursor", cur.as_str()]);
        }
        let r = run(&mut db.chronicle(&args));
        assert_eq!(r.code, Some(0), "{r}");
        let page = json_of(&r);
        for e in page["entries"].as_array().unwrap() {
            let at: DateTime<Utc> = e["occurred_at"].as_str().unwrap().parse().unwrap();
            seen.push((at, e["id"].as_str().unwrap().parse().unwrap()));
        }
        pages += 1;
        assert!(pages < 50, "pagination does not end");
        // Between two page fetches, events arrive: newer ones, and ones at the very
        // time of the cursor (some sort before it, some after).
        newer.extend(insert_at(&mut c, library, 3, t0() + Duration::hours(1)));
        insert_at(&mut c, library, 5, t0());
        drain(&db);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    let unique: BTreeSet<Uuid> = seen.iter().map(|(_, id)| *id).collect();
    assert_eq!(unique.len(), seen.len(), "a row was repeated across pages");
    assert!(originals.is_subset(&unique), "{} original rows skipped", originals.difference(&unique).count());
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "not strictly newest first on (occurred_at, id)");
    let first_page: BTreeSet<Uuid> = seen.iter().take(37).map(|(_, id)| *id).collect();
    assert!(newer.iter().all(|id| !unique.contains(id) || first_page.contains(id)), "a newer row entered a later page");
    assert!(pages >= 7, "{pages} pages");
}

/// A small library with one event of each shape the filters and searches need.
struct Fixture {
    a: Uuid,
    b: Uuid,
    alice: Uuid,
    bob: Uuid,
    book: Uuid,
    /// BookCreated "Distributed Systems Handbook" (alice, t0+1m)
    english: Uuid,
    /// BookRenamed to "分布式系统设计" (bob, t0+2m), same book
    chinese: Uuid,
    /// TagCreated "科幻" (system, t0+3m)
    tag: Uuid,
    /// BlockCreated in the book (alice, t0+4m)
    block: Uuid,
    /// BookshelfCreated "Reading" (bob, t0+5m)
    shelf: Uuid,
    /// Library B: BookCreated "系统架构" and "Distributed Ledgers" (alice)
    other: Vec<Uuid>,
}

fn fixture(db: &TestDb) -> Fixture {
    let mut c = db.client();
    let (a, b, alice, bob, book) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let at = |m: i64| t0() + Duration::minutes(m);
    let ev = |library, entity_type, entity_id, event_type, before, after, m, actor| Ev {
        library,
        entity_type,
        entity_id,
        event_type,
        before,
        after,
        at: at(m),
        actor,
    };
    let shelf_id = Uuid::now_v7();
    let english = insert(
        &mut c,
        &ev(
            a,
            "book",
            book,
            "BookCreated",
            None,
            Some(json!({"title": "Distributed Systems Handbook", "bookshelf_id": shelf_id})),
            1,
            Some(alice),
        ),
    );
    let chinese = insert(
        &mut c,
        &ev(
            a,
            "book",
            book,
            "BookRenamed",
            Some(json!({"title": "Distributed Systems Handbook"})),
            Some(json!({"title": "分布式系统设计"})),
            2,
            Some(bob),
        ),
    );
    let tag = insert(&mut c, &ev(a, "tag", Uuid::now_v7(), "TagCreated", None, Some(json!({"name": "科幻"})), 3, None));
    let block = insert(
        &mut c,
        &ev(
            a,
            "block",
            Uuid::now_v7(),
            "BlockCreated",
            None,
            Some(json!({"book_id": book, "kind": "paragraph", "text": "Consensus needs a quorum."})),
            4,
            Some(alice),
        ),
    );
    let shelf = insert(
        &mut c,
        &ev(a, "bookshelf", shelf_id, "BookshelfCreated", None, Some(json!({"name": "Reading"})), 5, Some(bob)),
    );
    let other = vec![
        insert(
            &mut c,
            &ev(
                b,
                "book",
                Uuid::now_v7(),
                "BookCreated",
                None,
                Some(json!({"title": "系统架构", "bookshelf_id": Uuid::now_v7()})),
                1,
                Some(alice),
            ),
        ),
        insert(
            &mut c,
            &ev(
                b,
                "book",
                Uuid::now_v7(),
                "BookCreated",
                None,
                Some(json!({"title": "Distributed Ledgers", "bookshelf_id": Uuid::now_v7()})),
                2,
                Some(alice),
            ),
        ),
    ];
    drain(db);
    Fixture { a, b, alice, bob, book, english, chinese, tag, block, shelf, other }
}

fn page_ids(c: &mut Client, q: &EntryQuery) -> Vec<Uuid> {
    timeline::page(c, q).expect("reading a page").entries.iter().map(|e| e.id).collect()
}

#[test]
fn each_filter_narrows_the_timeline() {
    let db = TestDb::new();
    let f = fixture(&db);
    let mut c = db.client();
    let all = EntryQuery::new(f.a);
    assert_eq!(page_ids(&mut c, &all), [f.shelf, f.block, f.tag, f.chinese, f.english]);
    let cases: Vec<(EntryQuery, Vec<Uuid>)> = vec![
        (EntryQuery { entity_type: Some("book".into()), ..all.clone() }, vec![f.chinese, f.english]),
        (EntryQuery { entity_id: Some(f.book), ..all.clone() }, vec![f.chinese, f.english]),
        (EntryQuery { actor: Some(f.alice), ..all.clone() }, vec![f.block, f.english]),
        (EntryQuery { actor: Some(f.bob), ..all.clone() }, vec![f.shelf, f.chinese]),
        (EntryQuery { event_type: Some("TagCreated".into()), ..all.clone() }, vec![f.tag]),
        (EntryQuery { since: Some(t0() + Duration::minutes(3)), ..all.clone() }, vec![f.shelf, f.block, f.tag]),
        (EntryQuery { until: Some(t0() + Duration::minutes(3)), ..all.clone() }, vec![f.chinese, f.english]),
        (
            EntryQuery {
                since: Some(t0() + Duration::minutes(2)),
                until: Some(t0() + Duration::minutes(5)),
                actor: Some(f.alice),
                ..all.clone()
            },
            vec![f.block],
        ),
        (EntryQuery { limit: 2, ..all.clone() }, vec![f.shelf, f.block]),
        (EntryQuery { entity_type: Some("library".into()), ..all.clone() }, vec![]),
        (EntryQuery { library_id: f.b, ..all.clone() }, vec![f.other[1], f.other[0]]),
    ];
    for (q, want) in cases {
        assert_eq!(page_ids(&mut c, &q), want, "{q:?}");
    }

    // A page ends with a cursor exactly when more rows follow.
    let first = timeline::page(&mut c, &EntryQuery { limit: 3, ..all.clone() }).unwrap();
    let cursor = Cursor::decode(first.next_cursor.as_deref().expect("more rows follow")).unwrap();
    let rest = timeline::page(&mut c, &EntryQuery { limit: 3, cursor: Some(cursor), ..all.clone() }).unwrap();
    assert_eq!(rest.entries.iter().map(|e| e.id).collect::<Vec<_>>(), [f.chinese, f.english]);
    assert_eq!(rest.next_cursor, None);

    // The command applies the same filters.
    let (lib, actor) = (f.a.to_string(), f.alice.to_string());
    let r = run(&mut db.chronicle(&[
        "entries",
        "--library-id",
        &lib,
        "--actor",
        &actor,
        "--entity-type",
        "book",
        "--json",
    ]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(ids_of(&json_of(&r)), [f.english]);
    let r = run(&mut db.chronicle(&[
        "entries",
        "--library-id",
        &lib,
        "--event-type",
        "BookRenamed",
        "--since",
        "2025-03-01T09:31:00Z",
        "--until",
        "2025-03-01T17:33:00+08:00",
        "--json",
    ]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(ids_of(&json_of(&r)), [f.chinese]);
    // The table: one header, one line per entry, the system actor named.
    let r = run(&mut db.chronicle(&["entries", "--library-id", &lib, "--limit", "3"]));
    assert_eq!(r.code, Some(0), "{r}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{r}");
    assert!(lines[0].contains("OCCURRED_AT") && lines[0].contains("SUMMARY"), "{r}");
    assert!(lines[1].contains("BookshelfCreated") && lines[1].contains("Created bookshelf \"Reading\""), "{r}");
    assert!(lines[3].contains("TagCreated") && lines[3].contains(" system "), "{r}");
    assert!(lines[4].starts_with("more: --cursor "), "{r}");
}

#[test]
fn english_and_chinese_searches_find_their_entries_and_nothing_of_another_library() {
    let db = TestDb::new();
    let f = fixture(&db);
    let mut c = db.client();
    let search = |c: &mut Client, library: Uuid, text: &str| {
        page_ids(c, &EntryQuery { search: Some(text.into()), ..EntryQuery::new(library) })
    };
    let cases: &[(&str, Vec<Uuid>)] = &[
        // A two-character Chinese word inside a title, and longer or shorter pieces of it.
        ("系统", vec![f.chinese]),
        ("设计", vec![f.chinese]),
        ("分布式", vec![f.chinese]),
        ("系统设计", vec![f.chinese]),
        ("统", vec![f.chinese]),
        ("系设", vec![]),
        ("科幻", vec![f.tag]),
        // English words match as prefixes, case-insensitively, every word required.
        ("distrib", vec![f.chinese, f.english]),
        ("DISTRIBUTED handbook", vec![f.chinese, f.english]),
        ("sys hand", vec![f.chinese, f.english]),
        ("handbook 系统", vec![f.chinese]),
        ("quorum", vec![f.block]),
        ("reading", vec![f.shelf]),
        ("ledger", vec![]),
        ("'; DROP TABLE chronicle_entries; --", vec![]),
    ];
    for (text, want) in cases {
        assert_eq!(&search(&mut c, f.a, text), want, "search {text:?} in library A");
    }
    // The other library's titles are found there, never from library A, and back.
    assert_eq!(search(&mut c, f.b, "系统"), [f.other[0]]);
    assert_eq!(search(&mut c, f.b, "ledger"), [f.other[1]]);
    assert_eq!(search(&mut c, f.b, "handbook"), Vec::<Uuid>::new());
    assert_eq!(search(&mut c, f.b, "科幻"), Vec::<Uuid>::new());
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_entries"), 7);

    let lib = f.a.to_string();
    let r = run(&mut db.chronicle(&["entries", "--library-id", &lib, "--search", "系统", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(ids_of(&json_of(&r)), [f.chinese]);
    let r = run(&mut db.chronicle(&["entries", "--library-id", &lib, "--search", "Distrib", "--limit", "1", "--json"]));
    let page = json_of(&r);
    assert_eq!(ids_of(&page), [f.chinese]);
    let cursor = page["next_cursor"].as_str().expect("a second match follows").to_string();
    let r = run(&mut db.chronicle(&[
        "entries",
        "--library-id",
        &lib,
        "--search",
        "Distrib",
        "--limit",
        "1",
        "--cursor",
        &cursor,
        "--json",
    ]));
    let page = json_of(&r);
    assert_eq!(ids_of(&page), [f.english]);
    assert!(page["next_cursor"].is_null(), "{page}");
    let r = run(&mut db.chronicle(&["entries", "--library-id", &lib, "--search", " !? —— "]));
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("--search has no searchable words"), "{r}");
}

#[test]
fn entries_refuses_bad_usage_and_prints_the_documented_json() {
    let db = TestDb::new();
    let f = fixture(&db);
    let lib = f.a.to_string();
    for (args, needle) in [
        (&["entries"][..], "--library-id is required"),
        (&["entries", "--search", "系统"], "--library-id is required"),
        (&["entries", "--library-id", &lib, "--cursor", "not-a-cursor"], "invalid --cursor"),
        (&["entries", "--library-id", &lib, "--limit", "0"], "--limit"),
        (&["entries", "--library-id", &lib, "--limit", "1001"], "--limit"),
        (&["entries", "--library-id", &lib, "--since", "yesterday"], "--since"),
        (&["entries", "--library-id", "lib-1"], "--library-id"),
    ] {
        let r = run(&mut db.chronicle(args));
        assert_eq!(r.code, Some(2), "{args:?}: {r}");
        assert!(r.stderr.contains(needle), "{args:?}: {r}");
    }
    let r = run(&mut db.chronicle(&["entries", "--library-id", &lib, "--limit", "1000", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let page = json_of(&r);
    let keys: BTreeSet<&str> = page.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["entries", "next_cursor"]));
    assert!(page["next_cursor"].is_null());
    let entry = &page["entries"][4];
    let keys: BTreeSet<&str> = entry.as_object().unwrap().keys().map(String::as_str).collect();
    let want = BTreeSet::from([
        "id",
        "library_id",
        "actor_user_id",
        "entity_type",
        "entity_id",
        "event_type",
        "occurred_at",
        "created_at",
        "request_id",
        "client",
        "ip",
        "reason",
        "summary",
        "changed_fields",
        "details",
        "projection_version",
        "projected_at",
    ]);
    assert_eq!(keys, want);
    assert_eq!(entry["id"], f.english.to_string());
    assert_eq!(entry["library_id"], lib);
    assert_eq!(entry["actor_user_id"], f.alice.to_string());
    assert_eq!(entry["summary"], "Created book \"Distributed Systems Handbook\"");
    assert_eq!(entry["occurred_at"], "2025-03-01T09:31:00Z");
    assert!(entry["changed_fields"].is_array() && entry["details"].is_object(), "{entry}");
    assert_eq!(entry["projection_version"], chronicle::projection::PROJECTION_VERSION);
    assert!(page["entries"][2]["actor_user_id"].is_null());
    // A library without entries is an empty page, not an error.
    let empty = Uuid::now_v7().to_string();
    let r = run(&mut db.chronicle(&["entries", "--library-id", &empty, "--json"]));
    assert_eq!(json_of(&r), json!({"entries": [], "next_cursor": null}));
}

#[test]
fn an_application_role_sees_and_writes_only_its_library() {
    let db = TestDb::new();
    let f = fixture(&db);
    let role = AppRole::create(&db);
    let mut owner = db.client();
    // What the test uses to prove the policies (not only the grants) stop it.
    owner.batch_execute(&format!("GRANT INSERT, UPDATE ON chronicle_entries TO {}", role.name)).unwrap();

    let mut app = db.client();
    app.batch_execute(&format!("SET ROLE {}", role.name)).unwrap();
    // No library named: nothing visible (fail closed).
    assert_eq!(count(&mut app, "SELECT count(*) FROM chronicle_entries"), 0);
    assert_eq!(count(&mut app, "SELECT count(*) FROM chronicle_events"), 0);

    app.batch_execute(&format!("SET chronicle.library_id = '{}'", f.a)).unwrap();
    // Only library A, not even a count of B.
    assert_eq!(count(&mut app, "SELECT count(*) FROM chronicle_entries"), 5);
    assert_eq!(count(&mut app, "SELECT count(*) FROM chronicle_events"), 5);
    let b_entries = app.query_one("SELECT count(*) FROM chronicle_entries WHERE library_id = $1", &[&f.b]).unwrap();
    assert_eq!(b_entries.get::<_, i64>(0), 0);
    let b_events = app.query_one("SELECT count(*) FROM chronicle_events WHERE id = ANY($1)", &[&f.other]).unwrap();
    assert_eq!(b_events.get::<_, i64>(0), 0);
    // The timeline query, as the application runs it: its library only.
    assert_eq!(page_ids(&mut app, &EntryQuery::new(f.a)).len(), 5);
    assert!(page_ids(&mut app, &EntryQuery::new(f.b)).is_empty());
    assert!(page_ids(&mut app, &EntryQuery { search: Some("系统".into()), ..EntryQuery::new(f.b) }).is_empty());

    // Writing into another library is refused by the policies' WITH CHECK.
    let other_event = app.execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, after, occurred_at)
         VALUES (gen_random_uuid(), $1, 'tag', gen_random_uuid(), 'TagCreated', '{\"name\": \"x\"}', now())",
        &[&f.b],
    );
    assert_eq!(sql_state(&other_event.unwrap_err()), "42501");
    let other_entry = app.execute(
        "INSERT INTO chronicle_entries (id, library_id, entity_type, entity_id, event_type, occurred_at, created_at,
                                        summary, search, projection_version)
         VALUES (gen_random_uuid(), $1, 'tag', gen_random_uuid(), 'TagCreated', now(), now(), 'x', '', 1)",
        &[&f.b],
    );
    assert_eq!(sql_state(&other_entry.unwrap_err()), "42501");
    // Rows of another library cannot be updated (invisible), nor can a row be moved there.
    let n = app.execute("UPDATE chronicle_entries SET summary = 'hacked' WHERE library_id = $1", &[&f.b]).unwrap();
    assert_eq!(n, 0);
    let moved = app.execute("UPDATE chronicle_entries SET library_id = $1 WHERE id = $2", &[&f.b, &f.tag]);
    assert_eq!(sql_state(&moved.unwrap_err()), "42501");
    // No right on the outbox, nor to change events.
    let outbox = app.query("SELECT 1 FROM chronicle_outbox_events", &[]);
    assert_eq!(sql_state(&outbox.unwrap_err()), "42501");
    let change = app.execute("UPDATE chronicle_events SET reason = 'x'", &[]);
    assert_eq!(sql_state(&change.unwrap_err()), "42501");

    // Its own library: the insert works and the trigger (SECURITY DEFINER) enqueues it.
    let id = Uuid::now_v7();
    app.execute(
        "INSERT INTO chronicle_events (id, library_id, actor_user_id, entity_type, entity_id, event_type, after, occurred_at)
         VALUES ($1, $2, $3, 'tag', gen_random_uuid(), 'TagCreated', '{\"name\": \"数据库\"}', $4)",
        &[&id, &f.a, &f.bob, &(t0() + Duration::minutes(9))],
    )
    .expect("the application inserts an event of its library");
    let queued = owner
        .query_one("SELECT count(*) FROM chronicle_outbox_events WHERE event_id = $1 AND status = 'pending'", &[&id])
        .unwrap();
    assert_eq!(queued.get::<_, i64>(0), 1);
    let untouched = owner
        .query_one(
            "SELECT count(*) FROM chronicle_entries WHERE summary = 'hacked' OR (library_id = $1 AND id = $2)",
            &[&f.b, &f.tag],
        )
        .unwrap();
    assert_eq!(untouched.get::<_, i64>(0), 0);

    // The worker and the commands (the owner) keep working with row-level security on.
    drain(&db);
    assert_eq!(page_ids(&mut app, &EntryQuery { search: Some("数据库".into()), ..EntryQuery::new(f.a) }), [id]);
    assert_eq!(count(&mut app, "SELECT count(*) FROM chronicle_entries"), 6);
    assert_eq!(count(&mut owner, "SELECT count(*) FROM chronicle_entries"), 8);
    let r = run(&mut db.chronicle(&["entries", "--library-id", &f.a.to_string(), "--limit", "1", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(ids_of(&json_of(&r)), [id]);
    let r = run(&mut db.chronicle(&["verify", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
}

#[test]
fn the_row_level_security_migration_keeps_the_owner_unaffected_and_pins_the_trigger() {
    let db = TestDb::new();
    let mut c = db.client();
    let rows = c
        .query(
            "SELECT c.relname::text, c.relrowsecurity, c.relforcerowsecurity, count(p.polname)
             FROM pg_class c LEFT JOIN pg_policy p ON p.polrelid = c.oid
             WHERE c.relname IN ('chronicle_events', 'chronicle_entries')
             GROUP BY 1, 2, 3 ORDER BY 1",
            &[],
        )
        .unwrap();
    let got: Vec<(String, bool, bool, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert_eq!(
        got,
        // The library scope, and chronicle_eraser's SELECT and DELETE across libraries.
        [("chronicle_entries".to_string(), true, false, 3), ("chronicle_events".to_string(), true, false, 3)]
    );
    let f = c
        .query_one(
            "SELECT prosecdef, proconfig FROM pg_proc WHERE oid = 'chronicle_events_enqueue()'::regprocedure",
            &[],
        )
        .unwrap();
    assert!(f.get::<_, bool>(0), "the enqueue trigger runs as its owner");
    assert_eq!(f.get::<_, Vec<String>>(1), ["search_path=public, pg_temp"]);
}

fn verify(db: &TestDb, args: &[&str]) -> (crate::util::Ran, Value) {
    let mut all = vec!["verify", "--json"];
    all.extend_from_slice(args);
    let r = run(&mut db.chronicle(&all));
    let v = json_of(&r);
    (r, v)
}

fn examples(v: &Value) -> BTreeSet<Uuid> {
    v["examples"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().parse().unwrap()).collect()
}

#[test]
fn verify_finds_each_kind_of_drift_and_fix_heals_it() {
    let db = TestDb::new();
    let mut c = db.client();
    let a = insert_events(&mut c, 30);
    let b = insert_events(&mut c, 10);
    // A poison event in library B: its delivery fails (invalid_payload), no entry.
    let poison = Uuid::now_v7();
    c.execute(
        "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
         VALUES ($1, $2, 'book', gen_random_uuid(), 'BookRenamed', '{\"title\": 5}', '{\"title\": \"x\"}', now())",
        &[&poison, &b],
    )
    .unwrap();
    drain(&db);
    let (lib_a, lib_b) = (a.to_string(), b.to_string());

    let (r, v) = verify(&db, &["--library-id", &lib_a]);
    assert_eq!(r.code, Some(0), "{r}");
    let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    for k in ["library_id", "events_without_entry", "entries_without_event", "stale_entries", "fixed", "clean"] {
        assert!(keys.contains(k), "{k} missing: {v}");
    }
    assert_eq!(
        (v["clean"].clone(), v["fixed"].clone(), v["library_id"].clone()),
        (json!(true), Value::Null, json!(lib_a))
    );

    // Drift of each kind in library A.
    let ids: Vec<Uuid> = c
        .query("SELECT id FROM chronicle_entries WHERE library_id = $1 ORDER BY occurred_at LIMIT 3", &[&a])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (lost, stale, copied) = (ids[0], ids[1], ids[2]);
    let orphan = Uuid::now_v7();
    c.execute("DELETE FROM chronicle_entries WHERE id = $1", &[&lost]).unwrap();
    c.execute("UPDATE chronicle_entries SET projection_version = 0 WHERE id = $1", &[&stale]).unwrap();
    c.execute(
        "INSERT INTO chronicle_entries (id, library_id, actor_user_id, entity_type, entity_id, event_type, occurred_at,
                created_at, summary, changed_fields, details, search, projection_version)
         SELECT $1, library_id, actor_user_id, entity_type, entity_id, event_type, occurred_at, created_at, summary,
                changed_fields, details, search, projection_version
         FROM chronicle_entries WHERE id = $2",
        &[&orphan, &copied],
    )
    .unwrap();
    // Events not projected yet are in flight, not drift.
    let in_flight = insert_at(&mut c, a, 3, t0());

    let (r, v) = verify(&db, &["--library-id", &lib_a]);
    assert_eq!(r.code, Some(1), "{r}");
    assert_eq!(v["clean"], false);
    assert_eq!(v["events_without_entry"]["count"], 1, "{v}");
    assert_eq!(examples(&v["events_without_entry"]), BTreeSet::from([lost]));
    assert_eq!(v["events_without_entry"]["failed"]["count"], 0);
    assert_eq!(v["entries_without_event"]["count"], 1);
    assert_eq!(examples(&v["entries_without_event"]), BTreeSet::from([orphan]));
    assert_eq!(v["stale_entries"]["count"], 1);
    assert_eq!(examples(&v["stale_entries"]), BTreeSet::from([stale]));
    assert_eq!(v["in_flight"], 3);
    // The same in words, with the ids.
    let r = run(&mut db.chronicle(&["verify", "--library-id", &lib_a]));
    assert_eq!(r.code, Some(1), "{r}");
    for id in [lost, stale, orphan] {
        assert!(r.stdout.contains(&id.to_string()), "{r}");
    }
    assert!(r.stderr.contains("drifted"), "{r}");

    // --fix: new deliveries for the missing and the stale, never a second live one for
    // the events in flight; the orphan deleted.
    let (r, v) = verify(&db, &["--library-id", &lib_a, "--fix"]);
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(
        v["fixed"],
        json!({"missing_enqueued": 1, "stale_enqueued": 1, "orphans_deleted": 1, "differing_rewritten": 0})
    );
    let live: BTreeMap<Uuid, i64> = c
        .query("SELECT event_id, count(*) FROM chronicle_outbox_events WHERE status = 'pending' GROUP BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut want: BTreeMap<Uuid, i64> = in_flight.iter().map(|id| (*id, 1)).collect();
    want.extend([(lost, 1), (stale, 1)]);
    assert_eq!(live, want);
    // Run again before any worker: all in flight now, nothing to do.
    let (r, v) = verify(&db, &["--library-id", &lib_a, "--fix"]);
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!((v["clean"].clone(), v["in_flight"].clone()), (json!(true), json!(5)));
    assert_eq!(count(&mut c, "SELECT count(*) FROM chronicle_outbox_events WHERE status = 'pending'"), 5);

    drain(&db);
    let (r, v) = verify(&db, &["--library-id", &lib_a]);
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!((v["clean"].clone(), v["in_flight"].clone()), (json!(true), json!(0)));
    let healed = c.query_one("SELECT projection_version FROM chronicle_entries WHERE id = $1", &[&stale]).unwrap();
    assert_eq!(healed.get::<_, i32>(0), chronicle::projection::PROJECTION_VERSION);

    // The failed event of library B is drift that --fix leaves to replay-failed.
    let (r, v) = verify(&db, &[]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(v["library_id"].is_null());
    assert_eq!(v["events_without_entry"]["count"], 1);
    assert_eq!(examples(&v["events_without_entry"]["failed"]), BTreeSet::from([poison]));
    let (r, v) = verify(&db, &["--library-id", &lib_b, "--fix"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("replay-failed"), "{r}");
    assert_eq!(v["fixed"]["missing_enqueued"], 0);
    let deliveries =
        c.query_one("SELECT count(*) FROM chronicle_outbox_events WHERE event_id = $1", &[&poison]).unwrap();
    assert_eq!(deliveries.get::<_, i64>(0), 1, "no new delivery for a failed event");
    let r = run(&mut db.chronicle(&["verify", "--library-id", &lib_b]));
    assert!(r.stdout.contains("delivery failed: 1"), "{r}");
}

#[test]
fn libraries_lists_each_library_with_its_name_counts_and_newest_event() {
    let db = TestDb::new();
    let mut c = db.client();
    let r = run(&mut db.chronicle(&["inject", "--count", "600", "--libraries", "3", "--seed", "11"]));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(&mut crate::util::worker_cmd(&db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(&mut db.chronicle(&["libraries", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("JSON");
    let listed = v["libraries"].as_array().expect("libraries");
    assert_eq!(listed.len(), 3, "{v}");
    assert_eq!(v["more"], false);
    let mut newest_before = None;
    for l in listed {
        let id: uuid::Uuid = l["library_id"].as_str().unwrap().parse().unwrap();
        let events = c
            .query_one("SELECT count(*), max(occurred_at)::text FROM chronicle_events WHERE library_id = $1", &[&id])
            .unwrap();
        assert_eq!(l["events"].as_i64(), Some(events.get::<_, i64>(0)), "{l}");
        assert_eq!(l["entries"].as_i64(), Some(events.get::<_, i64>(0)), "every event projected: {l}");
        let name: Option<String> = c
            .query_one(
                "SELECT after->>'name' FROM chronicle_events WHERE library_id = $1
                 AND event_type IN ('LibraryCreated', 'LibraryRenamed') ORDER BY occurred_at DESC, id DESC LIMIT 1",
                &[&id],
            )
            .unwrap()
            .get(0);
        assert_eq!(l["name"].as_str(), name.as_deref(), "{l}");
        let newest = l["newest_event_at"].as_str().unwrap().to_string();
        if let Some(before) = newest_before.replace(newest.clone()) {
            assert!(before >= newest, "most recently active first: {v}");
        }
    }
    let r = run(&mut db.chronicle(&["libraries", "--limit", "2"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(r.stdout.lines().count(), 4, "header, 2 libraries, the --limit note:\n{r}");
    assert!(r.stdout.contains("raise --limit"), "{r}");
}
