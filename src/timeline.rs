//! Reads of the read model: one page of a library's timeline, filtered and searched.
//!
//! This is the query the UI (and `chronicle entries`) runs. Its shape follows from the
//! contract (docs/DESIGN.md §2):
//!
//! - **Scope first**: every read names one library; there is no cross-library page.
//! - **Newest first on `(occurred_at DESC, id DESC)`**, the order of the timeline index.
//!   `id` breaks ties, so the order is total even when many events share one time.
//! - **Keyset pagination**: a page ends with a cursor holding the last row's
//!   `(occurred_at, id)`; the next page is the rows strictly after it in that order.
//!   Unlike OFFSET, this neither skips nor repeats a row when events arrive between two
//!   page fetches: rows newer than the cursor never enter later pages, and a late event
//!   older than the cursor shows up in its place, once. The cursor is opaque to callers
//!   (base64url of the two values) so its format can change.
//! - **Search ranks by recency**, the timeline's own order, not by `ts_rank`: the UI shows
//!   a timeline, a relevance order could not be keyset-paginated (the cursor would have
//!   to carry a rank that changes with every projection version), and `ts_rank` would
//!   have to score every match before the first row is returned, where recency lets the
//!   index stop after one page. With CJK bigrams and short titles, a rank says little.

use chrono::{DateTime, Utc};
use postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

use crate::search;

pub mod render;

/// The most rows one page may hold.
pub const MAX_LIMIT: u32 = 1000;

/// The rows of a page when the caller does not say.
pub const DEFAULT_LIMIT: u32 = 50;

/// What to read: one library's timeline, optionally narrowed.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryQuery {
    pub library_id: Uuid,
    pub entity_type: Option<String>,
    pub entity_id: Option<Uuid>,
    pub actor: Option<Uuid>,
    pub event_type: Option<String>,
    /// Entries that occurred at or after this time (inclusive).
    pub since: Option<DateTime<Utc>>,
    /// Entries that occurred before this time (exclusive), so `--since` and `--until`
    /// of consecutive windows never count an entry twice.
    pub until: Option<DateTime<Utc>>,
    /// Free text, tokenized by `search::query_terms`; every term must match. A text
    /// without any searchable word matches nothing (the command refuses it earlier).
    pub search: Option<String>,
    /// Rows per page, 1..=MAX_LIMIT (clamped here; the command refuses other values).
    pub limit: u32,
    /// Where the previous page ended.
    pub cursor: Option<Cursor>,
}

impl EntryQuery {
    /// The first page of a library's whole timeline.
    pub fn new(library_id: Uuid) -> EntryQuery {
        EntryQuery {
            library_id,
            entity_type: None,
            entity_id: None,
            actor: None,
            event_type: None,
            since: None,
            until: None,
            search: None,
            limit: DEFAULT_LIMIT,
            cursor: None,
        }
    }
}

/// One row of `chronicle_entries` as readers see it (every column but the tsvector).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntryRow {
    pub id: Uuid,
    pub library_id: Uuid,
    pub actor_user_id: Option<Uuid>,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub request_id: Option<String>,
    pub client: Option<String>,
    /// As PostgreSQL shows an `inet` (`abbrev`): with its netmask unless a whole address.
    pub ip: Option<String>,
    pub reason: Option<String>,
    pub summary: String,
    pub changed_fields: Vec<String>,
    pub details: serde_json::Value,
    pub projection_version: i32,
    pub projected_at: DateTime<Utc>,
}

/// One page, and the cursor of the next one when there are more rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub entries: Vec<EntryRow>,
    pub next_cursor: Option<String>,
}

/// A position in the timeline: the `(occurred_at, id)` of the last row of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub occurred_at: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor {
    /// The opaque text form: base64url (no padding) of the time in microseconds since
    /// the epoch (8 bytes, big-endian) followed by the id (16 bytes). Microseconds are
    /// PostgreSQL's precision, so the round trip is exact.
    pub fn encode(&self) -> String {
        let mut bytes = [0u8; 24];
        bytes[..8].copy_from_slice(&self.occurred_at.timestamp_micros().to_be_bytes());
        bytes[8..].copy_from_slice(self.id.as_bytes());
        base64url_encode(&bytes)
    }

    /// Reads a cursor made by `encode`; says what is wrong otherwise.
    pub fn decode(text: &str) -> Result<Cursor, String> {
        let bytes = base64url_decode(text.trim()).ok_or("not a cursor made by chronicle (bad characters or length)")?;
        let (time, id) = bytes.split_at(8);
        let (Ok(time), Ok(id)) = (<[u8; 8]>::try_from(time), <[u8; 16]>::try_from(id)) else {
            return Err("not a cursor made by chronicle (wrong length)".into());
        };
        let occurred_at = DateTime::from_timestamp_micros(i64::from_be_bytes(time))
            .ok_or("not a cursor made by chronicle (time out of range)")?;
        Ok(Cursor { occurred_at, id: Uuid::from_bytes(id) })
    }
}

fn base64url_encode(bytes: &[u8; 24]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn base64url_decode(text: &str) -> Option<[u8; 24]> {
    use base64::Engine;
    // A cursor is exactly 24 bytes: 32 characters, no padding.
    if text.len() != 32 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()?;
    bytes.try_into().ok()
}

/// The tsquery text for a user's search, or `None` when it has no searchable word.
///
/// Terms come from `search::query_terms`, the tokenizer that also built the documents,
/// and are ANDed. A word term matches as a prefix (`'distrib':*` finds "distributed"); a
/// CJK term (a bigram, or a lone character) matches exactly, since the document holds
/// every bigram and single character of its CJK runs: "系统" finds "分布式系统设计", and a
/// prefix would add nothing but false hits. Each lexeme is quoted, with quotes and
/// backslashes escaped, so no input can inject tsquery operators (the terms hold only
/// letters and digits anyway); the text is passed to SQL as a parameter.
pub fn search_tsquery(text: &str) -> Option<String> {
    let terms = search::query_terms(text);
    if terms.is_empty() {
        return None;
    }
    let lexemes: Vec<String> = terms
        .iter()
        .map(|t| {
            let quoted = format!("'{}'", t.replace('\\', "\\\\").replace('\'', "''"));
            if t.chars().any(search::is_cjk) {
                quoted
            } else {
                quoted + ":*"
            }
        })
        .collect();
    Some(lexemes.join(" & "))
}

/// One page of a library's timeline.
///
/// One statement whatever the filters: an absent filter is a NULL parameter and its
/// predicate folds away, because the driver prepares the statement for each call and
/// PostgreSQL plans it with the parameter values (a custom plan; a generic plan, reused
/// by a named prepared statement after five runs, would scan the whole library: see
/// docs/operations.md for other languages). Checked with EXPLAIN ANALYZE on 15,000 injected entries in 3
/// libraries (8,000 in the one read), after VACUUM ANALYZE:
/// - the timeline, and its later pages: Index Scan on `chronicle_entries_timeline_idx`,
///   `library_id` and the row comparison `(occurred_at, id) < (...)` as index
///   conditions, `--since`/`--until` too; the LIMIT stops it after one page;
/// - an entity, actor or event type: `chronicle_entries_entity_idx`, `_actor_idx`,
///   `_event_type_idx` (an entity type alone filters the timeline index);
/// - a search for a rare or CJK term: Bitmap Index Scan on `chronicle_entries_search_idx`
///   (GIN), then a top-N sort of the matches; for a common term the planner walks the
///   timeline index and filters, stopping after one page.
///
/// Right after a bulk projection the GIN index's pending list (fastupdate) may still hold
/// the new entries, and the planner may prefer a sequential scan until (auto)vacuum
/// merges it; the list is bounded by `gin_pending_list_limit` (4 MB by default).
pub const SELECT_PAGE: &str = "
    SELECT id, library_id, actor_user_id, entity_type, entity_id, event_type, occurred_at,
           created_at, request_id, client, abbrev(ip), reason, summary, changed_fields, details,
           projection_version, projected_at
    FROM chronicle_entries
    WHERE library_id = $1
      AND ($2::text IS NULL OR entity_type = $2)
      AND ($3::uuid IS NULL OR entity_id = $3)
      AND ($4::uuid IS NULL OR actor_user_id = $4)
      AND ($5::text IS NULL OR event_type = $5)
      AND ($6::timestamptz IS NULL OR occurred_at >= $6)
      AND ($7::timestamptz IS NULL OR occurred_at < $7)
      AND ($8::text IS NULL OR search @@ CAST($8 AS tsquery))
      AND ($9::timestamptz IS NULL OR (occurred_at, id) < ($9, $10::uuid))
    ORDER BY occurred_at DESC, id DESC
    LIMIT $11";

/// Reads one page: up to `q.limit` entries after `q.cursor`, newest first. Reads one row
/// more than asked to know whether a next page exists, so the last page has no cursor.
pub fn page(client: &mut impl GenericClient, q: &EntryQuery) -> Result<Page, postgres::Error> {
    let tsquery = match &q.search {
        Some(text) => match search_tsquery(text) {
            Some(t) => Some(t),
            None => return Ok(Page { entries: Vec::new(), next_cursor: None }),
        },
        None => None,
    };
    let limit = q.limit.clamp(1, MAX_LIMIT);
    let fetch = i64::from(limit) + 1;
    let (cursor_at, cursor_id) = match q.cursor {
        Some(c) => (Some(c.occurred_at), Some(c.id)),
        None => (None, None),
    };
    let rows = client.query(
        SELECT_PAGE,
        &[
            &q.library_id,
            &q.entity_type,
            &q.entity_id,
            &q.actor,
            &q.event_type,
            &q.since,
            &q.until,
            &tsquery,
            &cursor_at,
            &cursor_id,
            &fetch,
        ],
    )?;
    let mut entries = rows.iter().map(entry_row).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if entries.len() > limit as usize {
        entries.truncate(limit as usize);
        entries.last().map(|e| Cursor { occurred_at: e.occurred_at, id: e.id }.encode())
    } else {
        None
    };
    Ok(Page { entries, next_cursor })
}

fn entry_row(r: &postgres::Row) -> Result<EntryRow, postgres::Error> {
    Ok(EntryRow {
        id: r.try_get(0)?,
        library_id: r.try_get(1)?,
        actor_user_id: r.try_get(2)?,
        entity_type: r.try_get(3)?,
        entity_id: r.try_get(4)?,
        event_type: r.try_get(5)?,
        occurred_at: r.try_get(6)?,
        created_at: r.try_get(7)?,
        request_id: r.try_get(8)?,
        client: r.try_get(9)?,
        ip: r.try_get(10)?,
        reason: r.try_get(11)?,
        summary: r.try_get(12)?,
        changed_fields: r.try_get(13)?,
        details: r.try_get(14)?,
        projection_version: r.try_get(15)?,
        projected_at: r.try_get(16)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entries::ENTRY_COLUMNS;

    /// `sql` without `--` comments, its whitespace runs made one space.
    fn normalized(sql: &str) -> String {
        let code: Vec<&str> = sql.lines().map(|l| l.split("--").next().unwrap_or_default()).collect();
        code.join(" ").split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// The page reads every column of `chronicle_entries` but the search vector, `ip`
    /// as text with its netmask.
    #[test]
    fn the_page_reads_every_entry_column_but_the_search_vector() {
        let sql = normalized(SELECT_PAGE);
        let list = sql.strip_prefix("SELECT ").and_then(|s| s.split(" FROM ").next()).expect("a select list");
        let read: Vec<&str> = list.split(", ").collect();
        let columns = normalized(ENTRY_COLUMNS);
        let expected: Vec<&str> =
            columns.split(", ").filter(|c| *c != "search").map(|c| if c == "ip" { "abbrev(ip)" } else { c }).collect();
        assert_eq!(read, expected);
    }

    /// docs/operations.md shows other languages this very statement.
    #[test]
    fn the_operations_guide_shows_the_page_statement() {
        let doc = include_str!("../docs/operations.md");
        let start = doc.find("```sql\nSELECT id, library_id").expect("the statement in docs/operations.md") + 7;
        let end = start + doc[start..].find("```").expect("its end");
        assert_eq!(normalized(&doc[start..end]), normalized(SELECT_PAGE));
    }

    #[test]
    fn cursors_round_trip_exactly() {
        for (micros, id) in [
            (0i64, Uuid::nil()),
            (1_740_821_400_123_456, Uuid::now_v7()),
            (-62_135_596_800_000_000, Uuid::max()),
            (253_402_300_799_999_999, Uuid::now_v7()),
        ] {
            let c = Cursor { occurred_at: DateTime::from_timestamp_micros(micros).unwrap(), id };
            let text = c.encode();
            assert_eq!(text.len(), 32);
            assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{text}");
            assert_eq!(Cursor::decode(&text), Ok(c));
        }
    }

    #[test]
    fn bad_cursors_are_refused() {
        let good = Cursor { occurred_at: Utc::now(), id: Uuid::now_v7() }.encode();
        for bad in [
            "",
            "abc",
            &good[1..],
            &format!("{good}A"),
            &good.replace(|c: char| c.is_ascii_digit(), "+"),
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        ] {
            if bad == good {
                continue;
            }
            assert!(Cursor::decode(bad).is_err(), "{bad:?} accepted");
        }
        // Right length and alphabet, but a time chrono cannot represent.
        let huge = base64url_encode(&[0x7f; 24]);
        assert!(Cursor::decode(&huge).is_err());
    }

    #[test]
    fn english_terms_are_prefixes_and_cjk_terms_exact() {
        assert_eq!(search_tsquery("Distrib"), Some("'distrib':*".into()));
        assert_eq!(search_tsquery("系统"), Some("'系统'".into()));
        assert_eq!(search_tsquery("分布式 Rust"), Some("'分布' & '布式' & 'rust':*".into()));
        assert_eq!(search_tsquery("统"), Some("'统'".into()));
    }

    #[test]
    fn operators_and_quotes_never_reach_the_tsquery() {
        for text in ["'; drop table x; --", "a & !b | c:* <-> d", "it's \\ ok"] {
            let q = search_tsquery(text).unwrap();
            for lexeme in q.split(" & ") {
                let inner = lexeme.trim_end_matches(":*");
                assert!(inner.starts_with('\'') && inner.ends_with('\''), "{q}");
                assert!(inner[1..inner.len() - 1].chars().all(char::is_alphanumeric), "{q}");
            }
        }
    }

    #[test]
    fn a_search_without_words_has_no_tsquery() {
        for text in ["", "   ", "&|!():*'", "——。"] {
            assert_eq!(search_tsquery(text), None, "{text:?}");
        }
    }
}
