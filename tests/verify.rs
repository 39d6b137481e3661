//! `verify`'s content check: each entry against its event's projection, column by column.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use postgres::Client;
use serde_json::{json, Value};
use uuid::Uuid;

use std::time::Duration;

use crate::util::{count, run, wait_until, worker_cmd, Ran, TestDb};

fn verify(db: &TestDb, args: &[&str]) -> (Ran, Value) {
    let mut all = vec!["verify", "--json"];
    all.extend_from_slice(args);
    // Without --fix it reads through a read-only session: it must not write.
    let r = run(db.chronicle(&all).env("CHRONICLE_READ_DATABASE_URL", db.url()));
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {r}"));
    (r, v)
}

fn ids(v: &Value) -> BTreeSet<Uuid> {
    v["examples"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().parse().unwrap()).collect()
}

/// The count of each column in `differing_entries.columns` that differs.
fn differing_columns(v: &Value) -> Vec<(String, i64)> {
    let columns = v["differing_entries"]["columns"].as_object().unwrap();
    columns.iter().filter(|(_, f)| f["count"] != 0).map(|(c, f)| (c.clone(), f["count"].as_i64().unwrap())).collect()
}

/// A read model of varied events (every event type the generator makes, with clients,
/// addresses and reasons), fully projected.
fn projected(db: &TestDb, events: &str) -> Client {
    let r = run(&mut db.chronicle(&["inject", "--count", events, "--libraries", "2", "--seed", "7"]));
    assert_eq!(r.code, Some(0), "{r}");
    let r = run(&mut worker_cmd(db, &["--until-empty"]));
    assert_eq!(r.code, Some(0), "{r}");
    db.client()
}

#[test]
fn verify_finds_entries_whose_content_differs_names_the_columns_and_fix_rewrites_them() {
    let db = TestDb::new();
    let mut c = projected(&db, "400");
    let entries = count(&mut c, "SELECT count(*) FROM chronicle_entries");
    assert_eq!(entries, 400);

    let (r, v) = verify(&db, &[]);
    assert_eq!(r.code, Some(0), "an untouched read model is clean, every column of every shape: {r}");
    assert_eq!(v["clean"], true);
    assert_eq!(v["differing_entries"]["count"], 0, "{v}");
    assert_eq!(v["compared"]["entries"], entries, "{v}");
    assert_eq!(v["compared"]["scope"], "all");
    assert_eq!(v["compared"]["not_projectable"], 0);
    let r = run(&mut db.chronicle(&["verify"]));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains(&format!("all {entries} entries of projection version")), "{r}");
    assert!(r.stdout.contains("summary, changed_fields, details, search"), "the message names the columns: {r}");

    // The damage of a column change: summaries cut to 10 characters; and one entry each
    // with other details, another changed field, another search vector.
    let originals: Vec<(Uuid, String)> = c
        .query("SELECT id, summary FROM chronicle_entries WHERE length(summary) > 10 ORDER BY id LIMIT 5", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let cut: BTreeSet<Uuid> = originals.iter().map(|(id, _)| *id).collect();
    let cut_ids: Vec<Uuid> = cut.iter().copied().collect();
    let n = c.execute("UPDATE chronicle_entries SET summary = left(summary, 10) WHERE id = ANY($1)", &[&cut_ids]);
    assert_eq!(n.unwrap(), 5);
    let others: Vec<Uuid> = c
        .query(
            "SELECT id FROM chronicle_entries WHERE cardinality(changed_fields) > 0 AND id <> ALL($1) ORDER BY id LIMIT 4",
            &[&cut_ids],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (details, changed, search, rewritten_only) = (others[0], others[1], others[2], others[3]);
    c.execute("UPDATE chronicle_entries SET details = details || '{\"extra\": 1}' WHERE id = $1", &[&details]).unwrap();
    c.execute("UPDATE chronicle_entries SET changed_fields = changed_fields[2:] WHERE id = $1", &[&changed]).unwrap();
    c.execute("UPDATE chronicle_entries SET search = to_tsvector('simple', 'nothing') WHERE id = $1", &[&search])
        .unwrap();
    // When an entry was written is not what it says.
    c.execute(
        "UPDATE chronicle_entries SET projected_at = now() - interval '1 year' WHERE id = $1",
        &[&rewritten_only],
    )
    .unwrap();

    let (r, v) = verify(&db, &[]);
    assert_eq!(r.code, Some(1), "{r}");
    assert_eq!(v["clean"], false);
    assert_eq!(v["differing_entries"]["count"], 8, "{v}");
    let mut all = cut.clone();
    all.extend([details, changed, search]);
    assert_eq!(ids(&v["differing_entries"]), all);
    assert_eq!(
        differing_columns(&v),
        [("changed_fields".to_string(), 1), ("details".into(), 1), ("search".into(), 1), ("summary".into(), 5)]
    );
    let columns = &v["differing_entries"]["columns"];
    assert_eq!(ids(&columns["summary"]), cut);
    assert_eq!(ids(&columns["details"]), BTreeSet::from([details]));
    assert_eq!(ids(&columns["changed_fields"]), BTreeSet::from([changed]));
    assert_eq!(ids(&columns["search"]), BTreeSet::from([search]));
    // The presence checks see nothing: every entry is there, of this version.
    assert_eq!(v["events_without_entry"]["count"], 0);
    assert_eq!(v["stale_entries"]["count"], 0);
    // The same in words.
    let r = run(&mut db.chronicle(&["verify"]));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stdout.contains("differing entries:") && r.stdout.contains("summary differs: 5"), "{r}");
    assert!(r.stderr.contains("drifted"), "{r}");

    // --fix rewrites exactly the differing entries from their events.
    let before_fix: DateTime<Utc> =
        c.query_one("SELECT projected_at FROM chronicle_entries WHERE id = $1", &[&rewritten_only]).unwrap().get(0);
    let r = run(&mut db.chronicle(&["verify", "--fix", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["fixed"]["differing_rewritten"], 8, "{v}");
    assert_eq!(v["fixed"]["missing_enqueued"], 0);
    for (id, summary) in &originals {
        let now: String = c.query_one("SELECT summary FROM chronicle_entries WHERE id = $1", &[id]).unwrap().get(0);
        assert_eq!(&now, summary);
    }
    let untouched: DateTime<Utc> =
        c.query_one("SELECT projected_at FROM chronicle_entries WHERE id = $1", &[&rewritten_only]).unwrap().get(0);
    assert_eq!(untouched, before_fix, "an entry that does not differ is not written");
    let (r, v) = verify(&db, &[]);
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!((v["clean"].clone(), v["differing_entries"]["count"].clone()), (json!(true), json!(0)));
}

#[test]
fn verify_sample_and_since_compare_only_what_they_name() {
    let db = TestDb::new();
    let mut c = projected(&db, "300");
    // Every entry damaged: whatever is compared differs.
    c.batch_execute("UPDATE chronicle_entries SET summary = summary || '!'").unwrap();

    let (r, v) = verify(&db, &["--sample", "25"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert_eq!(v["compared"]["entries"], 25, "{v}");
    assert_eq!((v["compared"]["scope"].clone(), v["compared"]["sample"].clone()), (json!("sample"), json!(25)));
    assert_eq!(v["differing_entries"]["count"], 25);
    // A sample larger than the table compares the table.
    let (_, v) = verify(&db, &["--sample", "1000"]);
    assert_eq!(v["compared"]["entries"], 300, "{v}");

    // --since: the entries of events that occurred at or after the time.
    let since: String = c
        .query_one("SELECT to_char(percentile_disc(0.5) WITHIN GROUP (ORDER BY occurred_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM chronicle_events", &[])
        .unwrap()
        .get(0);
    let t: DateTime<Utc> = since.parse().unwrap();
    let after =
        c.query_one("SELECT count(*) FROM chronicle_events WHERE occurred_at >= $1", &[&t]).unwrap().get::<_, i64>(0);
    assert!(after > 0 && after < 300, "{after}");
    let (r, v) = verify(&db, &["--since", &since]);
    assert_eq!(r.code, Some(1), "{r}");
    assert_eq!(v["compared"]["entries"], after, "{v}");
    assert_eq!(v["compared"]["scope"], "since");
    assert_eq!(v["differing_entries"]["count"], after);
    let r = run(&mut db.chronicle(&["verify", "--since", &since]));
    assert!(r.stdout.contains(&format!("(compared: the {after} entries of events since ")), "{r}");

    // --fix with --since heals those only; then the sample of the rest still differs.
    let r = run(&mut db.chronicle(&["verify", "--since", &since, "--fix", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["fixed"]["differing_rewritten"], after, "{v}");
    let (r, v) = verify(&db, &["--since", &since]);
    assert_eq!((r.code, v["differing_entries"]["count"].clone()), (Some(0), json!(0)), "{r}");
    let (r, v) = verify(&db, &[]);
    assert_eq!(r.code, Some(1), "{r}");
    assert_eq!(v["differing_entries"]["count"], 300 - after);

    // A library's sample stays in the library.
    let library: Uuid = c.query_one("SELECT library_id FROM chronicle_events LIMIT 1", &[]).unwrap().get(0);
    let in_library = c
        .query_one("SELECT count(*) FROM chronicle_events WHERE library_id = $1", &[&library])
        .unwrap()
        .get::<_, i64>(0);
    let (_, v) = verify(&db, &["--library-id", &library.to_string(), "--sample", "1000"]);
    assert_eq!(v["compared"]["entries"], in_library, "{v}");
}

/// Small batches: the keyset walks (by id over every library, by the library's
/// (occurred_at, id) index in one) cover every entry once, across many batches.
#[test]
fn verify_walks_every_entry_once_across_batches() {
    let db = TestDb::new();
    let mut c = projected(&db, "250");
    let damaged = c.execute("UPDATE chronicle_entries SET details = '{}' WHERE right(id::text, 1) < '8'", &[]).unwrap();
    assert!(damaged > 0 && damaged < 250, "{damaged}");
    let (r, v) = verify(&db, &["--batch-size", "7"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert_eq!(
        (v["compared"]["entries"].clone(), v["differing_entries"]["count"].clone()),
        (json!(250), json!(damaged))
    );
    for library in c.query("SELECT DISTINCT library_id FROM chronicle_events", &[]).unwrap() {
        let library: Uuid = library.get(0);
        let mut want = |sql: &str| c.query_one(sql, &[&library]).unwrap().get::<_, i64>(0);
        let events = want("SELECT count(*) FROM chronicle_events WHERE library_id = $1");
        let differing = want("SELECT count(*) FROM chronicle_entries WHERE library_id = $1 AND details = '{}'");
        let lib = library.to_string();
        let (_, v) = verify(&db, &["--library-id", &lib, "--batch-size", "7"]);
        assert_eq!(
            (v["compared"]["entries"].clone(), v["differing_entries"]["count"].clone()),
            (json!(events), json!(differing)),
            "{v}"
        );
        let (_, v) = verify(&db, &["--library-id", &lib, "--batch-size", "3", "--sample", "40"]);
        assert_eq!(v["compared"]["entries"], events.min(40), "{v}");
    }
    let r = run(&mut db.chronicle(&["verify", "--batch-size", "7", "--fix", "--json"]));
    assert_eq!(r.code, Some(0), "{r}");
    let (r, _) = verify(&db, &[]);
    assert_eq!(r.code, Some(0), "{r}");
}

/// `--fix` never writes back the entry of an event erased while it runs: the rewrite holds
/// the events it writes for, and an event gone by then gets no entry.
#[test]
fn verify_fix_does_not_write_back_the_entry_of_an_event_erased_meanwhile() {
    let db = TestDb::new();
    let mut c = projected(&db, "30");
    let id: Uuid = c.query_one("SELECT id FROM chronicle_entries ORDER BY id LIMIT 1", &[]).unwrap().get(0);
    c.execute("UPDATE chronicle_entries SET summary = 'damaged' WHERE id = $1", &[&id]).unwrap();
    // An erasure of that event, not committed yet: verify reads the event (still there
    // for others), finds the entry differing, and its rewrite waits for the erasure.
    let mut eraser = db.client();
    let mut erase = eraser.transaction().unwrap();
    erase.execute(chronicle::cmd::erase::ALLOW_ERASE, &[&"dpo", &"a test", &id.to_string()]).unwrap();
    assert_eq!(erase.execute(chronicle::cmd::erase::ERASE_EVENTS, &[&vec![id]]).unwrap(), 1);
    let child = db
        .chronicle(&["verify", "--fix", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), "verify's rewrite to wait for the erasure", || {
        count(
            &mut c,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FOR KEY SHARE%'",
        ) == 1
    });
    erase.commit().unwrap();
    let out = child.wait_with_output().unwrap();
    let r = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{r} {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&r).unwrap();
    assert_eq!(v["differing_entries"]["count"], 1, "{v}");
    assert_eq!(v["fixed"]["differing_rewritten"], 0, "{v}");
    assert_eq!(count(&mut c, &format!("SELECT count(*) FROM chronicle_entries WHERE id = '{id}'")), 0);
    let (r, _) = verify(&db, &[]);
    assert_eq!(r.code, Some(0), "{r}");
}
