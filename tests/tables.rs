//! Tables line up in any script: the header of `libraries` and `migrate --status` sits
//! over its rows whatever the names, English or Chinese (CJK two columns a character),
//! with control characters escaped and counted as printed.

use crate::util::{insert_events, insert_events_into, run, TestDb};

/// Columns where each cell of a line starts and ends (cells are two or more spaces apart),
/// counting CJK characters as two.
fn cell_spans(line: &str) -> Vec<(usize, usize)> {
    let width =
        |c: char| if ('\u{2E80}'..='\u{9FFF}').contains(&c) || ('\u{FF00}'..='\u{FF60}').contains(&c) { 2 } else { 1 };
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let (mut at, mut spaces) = (0, 0);
    for c in line.chars() {
        if c == ' ' {
            spaces += 1;
        } else {
            match spans.last_mut() {
                Some(span) if spaces < 2 => span.1 = at + width(c),
                _ => spans.push((at, at + width(c))),
            }
            spaces = 0;
        }
        at += width(c);
    }
    spans
}

#[test]
fn libraries_header_sits_over_its_rows_in_english_and_chinese() {
    let db = TestDb::new();
    let mut c = db.client();
    for (name, events) in
        [("Reading notes", 3), ("读书笔记", 12), ("分布式系统设计与实践：一本很长的书库", 1), ("bad\u{1b}[2Jname", 2)]
    {
        let library = uuid::Uuid::now_v7();
        c.execute(
            "INSERT INTO chronicle_events (id, library_id, entity_type, entity_id, event_type, before, after, occurred_at)
             VALUES (gen_random_uuid(), $1, 'library', $1, 'LibraryCreated', '{}', jsonb_build_object('name', $2::text),
                     now() - interval '1 day')",
            &[&library, &name],
        )
        .unwrap();
        insert_events_into(&mut c, library, events);
    }
    let r = run(&mut db.chronicle(&["libraries"]));
    assert_eq!(r.code, Some(0), "{r}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{r}");
    assert!(lines[0].starts_with("NAME"), "{r}");
    assert!(r.stdout.contains("bad\\x1b[2Jname") && !r.stdout.contains('\u{1b}'), "{r}");
    let header = cell_spans(lines[0]);
    assert_eq!(header.len(), 5, "{r}");
    for l in &lines[1..] {
        let cells = cell_spans(l);
        assert_eq!(cells.len(), 5, "{l:?} in\n{r}");
        // The id and the time start under their headings; the counts end under theirs.
        assert_eq!((cells[1].0, cells[4].0), (header[1].0, header[4].0), "{l:?} in\n{r}");
        assert_eq!((cells[2].1, cells[3].1), (header[2].1, header[3].1), "{l:?} in\n{r}");
    }
}

#[test]
fn migrate_status_lines_up_whatever_the_names() {
    // Applied (with their times) on a migrated database, pending on an empty one; the
    // names are of every length.
    for db in [TestDb::new(), TestDb::empty()] {
        let r = run(&mut db.chronicle(&["migrate", "--status"]));
        assert_eq!(r.code, Some(0), "{r}");
        let lines: Vec<&str> = r.stdout.lines().filter(|l| !l.starts_with("up to date")).collect();
        assert_eq!(lines.len(), chronicle::db::migrate::MIGRATIONS.len() + 1, "{r}");
        let header = cell_spans(lines[0]);
        assert_eq!(header.len(), 4, "{r}");
        for l in &lines[1..] {
            let cells = cell_spans(l);
            assert_eq!(cells.len(), 4, "{l:?} in\n{r}");
            // The version ends, the name and the time start, under their headings.
            assert_eq!((cells[1].1, cells[2].0, cells[3].0), (header[1].1, header[2].0, header[3].0), "{l:?} in\n{r}");
        }
    }
}

#[test]
fn status_tables_line_up_whatever_the_counts() {
    let db = TestDb::new();
    let mut c = db.client();
    insert_events(&mut c, 1234);
    // 1200 failed one way, 1 another, the rest pending: counts of 1 to 4 digits.
    c.batch_execute(
        "WITH ranked AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM chronicle_outbox_events)
         UPDATE chronicle_outbox_events o
         SET status = 'failed', error = 'boom', attempts = 3, updated_at = now(),
             error_reason = CASE WHEN r.n = 1 THEN 'max_attempts_exceeded' ELSE 'invalid_payload' END
         FROM ranked r WHERE r.id = o.id AND r.n <= 1201",
    )
    .unwrap();
    let r = run(&mut db.chronicle(&["status", "--exact"]));
    assert_eq!(r.code, Some(0), "{r}");
    let section = |title: &str| -> Vec<&str> {
        r.stdout.lines().skip_while(|l| !l.starts_with(title)).skip(1).take_while(|l| !l.is_empty()).collect()
    };
    // The counts end at one column in each table; what follows them starts at one.
    let outbox = section("OUTBOX");
    assert_eq!(outbox.len(), 4, "{r}");
    let ends: Vec<usize> = outbox.iter().map(|l| cell_spans(l)[1].1).collect();
    assert!(ends.iter().all(|&e| e == ends[0]), "{r}");
    let failed = section("FAILED BY REASON");
    assert!(failed[0].trim_start().starts_with("error_reason"), "{r}");
    let rows: Vec<&str> = failed.iter().copied().filter(|l| !l.trim_start().starts_with('(')).collect();
    assert_eq!(rows.len(), 3, "{r}");
    let header = cell_spans(rows[0]);
    for l in &rows[1..] {
        let cells = cell_spans(l);
        assert_eq!((cells[1].1, cells[2].0), (header[1].1, header[2].0), "{l:?} in\n{r}");
    }
    assert!(r.stdout.contains("1200"), "{r}");
}
