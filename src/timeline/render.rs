//! A page of the timeline rendered for `chronicle entries`: an aligned table for people
//! (every value made safe for a terminal, widths in terminal columns) or JSON for
//! scripts. Pure.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::error::{AppError, Result};
use crate::terminal::{Align, Table};
use crate::timeline::Page;

/// The most characters of a summary shown in the table (JSON has it whole).
pub const TABLE_SUMMARY_CHARS: usize = 100;

/// The width the default table fits in, for an 80-to-100-column terminal.
pub const TABLE_COLUMNS: usize = 100;

/// `{"entries": [...], "next_cursor": ... }`.
pub fn page_json(page: &Page) -> Result<serde_json::Value> {
    let entries = serde_json::to_value(&page.entries)
        .map_err(|e| AppError::failed(format!("while writing the entries as JSON: {e}")).caused_by(e))?;
    Ok(serde_json::json!({ "entries": entries, "next_cursor": page.next_cursor }))
}

/// A time as RFC 3339, to the microsecond when it has them.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// The page as an aligned table, then the next cursor when there is one. The default fits
/// `TABLE_COLUMNS`: times to the second, actors by the first 8 digits of their id, the
/// summary cut to the room left; `wide` shows everything at full width.
pub fn page_table(page: &Page, wide: bool) -> String {
    let rows: Vec<[String; 4]> = page
        .entries
        .iter()
        .map(|e| {
            let summary: String = if e.summary.chars().count() > TABLE_SUMMARY_CHARS {
                e.summary.chars().take(TABLE_SUMMARY_CHARS - 1).chain(['…']).collect()
            } else {
                e.summary.clone()
            };
            // One line per entry, whatever the summary holds (the table shows anything else
            // a terminal would obey escaped).
            let summary = summary.replace(['\n', '\r', '\t'], " ");
            let actor = match e.actor_user_id {
                None => "system".to_string(),
                Some(a) if wide => a.to_string(),
                Some(a) => a.simple().to_string()[..8].to_string(),
            };
            let time =
                if wide { rfc3339(e.occurred_at) } else { e.occurred_at.to_rfc3339_opts(SecondsFormat::Secs, true) };
            [time, e.event_type.clone(), actor, summary]
        })
        .collect();
    let mut table = Table::new(0, &[Align::Left; 4]);
    if !wide {
        table = table.max_total_width(TABLE_COLUMNS);
    }
    table.row(["OCCURRED_AT", "EVENT_TYPE", "ACTOR", "SUMMARY"]);
    for r in rows {
        table.row(r);
    }
    let mut out = table.render();
    if page.entries.is_empty() {
        out.push_str("(no entries)\n");
    }
    if let Some(c) = &page.next_cursor {
        out.push_str(&format!("more: --cursor {c}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terminal::columns;
    use crate::timeline;
    use uuid::Uuid;

    #[test]
    fn table_shows_system_actor_and_the_cursor() {
        let now = Utc::now();
        let row = timeline::EntryRow {
            id: Uuid::now_v7(),
            library_id: Uuid::now_v7(),
            actor_user_id: None,
            entity_type: "tag".into(),
            entity_id: Uuid::now_v7(),
            event_type: "TagDeleted".into(),
            occurred_at: now,
            created_at: now,
            request_id: None,
            client: None,
            ip: None,
            reason: None,
            summary: format!("Deleted tag \"{}\"\nsecond line", "x".repeat(200)),
            changed_fields: vec![],
            details: serde_json::json!({}),
            projection_version: 1,
            projected_at: now,
        };
        let mut chinese = row.clone();
        chinese.actor_user_id = Some(Uuid::now_v7());
        chinese.summary = format!("Renamed book \"{}\" → \"{}\"", "旧标题".repeat(20), "分布式系统".repeat(20));
        let page = Page { entries: vec![row, chinese], next_cursor: Some("CUR".into()) };
        let t = page_table(&page, false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("OCCURRED_AT"));
        assert!(lines[1].contains(" system ") && lines[1].ends_with('…'), "{t}");
        assert_eq!(lines[3], "more: --cursor CUR");
        for l in &lines {
            assert!(columns(l) <= TABLE_COLUMNS, "{} columns: {l}", columns(l));
        }
        let wide = page_table(&page, true);
        assert!(wide.lines().any(|l| columns(l) > TABLE_COLUMNS), "--wide cuts nothing:\n{wide}");
        assert!(wide.contains(&page.entries[1].actor_user_id.unwrap().to_string()), "{wide}");
        assert!(page_table(&Page { entries: vec![], next_cursor: None }, false).contains("(no entries)"));
    }
}
