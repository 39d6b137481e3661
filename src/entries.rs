//! Writes to the read model: the set-based upsert of projected entries.
//!
//! `id` is the event's id, so writing an entry twice (replay, rebuild, a worker that
//! crashed after committing) updates it instead of duplicating it; an entry built by a
//! newer projection version is never overwritten by an older one (rolling deploys).

use postgres::types::ToSql;
use postgres::GenericClient;
use postgres::ToStatement;

use uuid::Uuid;

use crate::projection::Entry;

/// The columns of an entry row, in the order the statements below write them (a macro,
/// for `concat!`; `ENTRY_COLUMNS` is the same list as a constant).
macro_rules! entry_columns {
    () => {
        "id, library_id, actor_user_id, entity_type, entity_id, event_type, occurred_at, \
         created_at, request_id, client, ip, reason, summary, changed_fields, details, \
         search, projection_version, projected_at"
    };
}

/// Every column of `chronicle_entries`, in table order: what the statements below write.
/// The timeline's read (`timeline::SELECT_PAGE`) and the benchmark's raw build list the
/// same columns; a test compares each list with the migrated table.
pub const ENTRY_COLUMNS: &str = entry_columns!();

/// A batch of projected entries as rows, from one array parameter per column.
///
/// - `search` is the projector's tokens taken as they are (`array_to_tsvector`): the
///   document is already tokenized (`search::document`: words lowercased, CJK split into
///   bigrams), and queries are tsquery lexemes made by the same tokenizer, so Postgres'
///   parser has nothing to add. `to_tsvector('simple', …)` would parse the text a second
///   time (its cost is in BENCHMARKS.md) and could split a token the query keeps whole;
///   positions are not stored (no query uses them).
/// - `changed_fields` arrives as one array literal per entry (`text_array_literal`),
///   which the cast reads without a jsonb parse and sub-select per row.
/// - `details` arrives as the projector's JSON text, which the cast to jsonb parses once.
macro_rules! entry_rows {
    () => {
        "SELECT x.id, x.library_id, x.actor_user_id, x.entity_type, x.entity_id, x.event_type,
                x.occurred_at, x.created_at, x.request_id, x.client, x.ip, x.reason, x.summary,
                x.changed_fields::text[], x.details,
                array_to_tsvector(array_remove(string_to_array(x.search_text, ' '), '')), x.projection_version, now()
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::uuid[], $6::text[],
                     $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[], $11::text[]::inet[],
                     $12::text[], $13::text[], $14::text[], $15::text[]::jsonb[], $16::text[], $17::int[])
              AS x(id, library_id, actor_user_id, entity_type, entity_id, event_type, occurred_at,
                   created_at, request_id, client, ip, reason, summary, changed_fields, details,
                   search_text, projection_version)"
    };
}

/// Inserts or updates a batch of entries in one statement; an entry written by a newer
/// projection version is left as it is.
pub const UPSERT_ENTRIES: &str = concat!(
    "INSERT INTO chronicle_entries AS t (",
    entry_columns!(),
    ") ",
    entry_rows!(),
    "
    ON CONFLICT (id) DO UPDATE SET
        library_id = EXCLUDED.library_id, actor_user_id = EXCLUDED.actor_user_id,
        entity_type = EXCLUDED.entity_type, entity_id = EXCLUDED.entity_id,
        event_type = EXCLUDED.event_type, occurred_at = EXCLUDED.occurred_at,
        created_at = EXCLUDED.created_at, request_id = EXCLUDED.request_id,
        client = EXCLUDED.client, ip = EXCLUDED.ip, reason = EXCLUDED.reason,
        summary = EXCLUDED.summary, changed_fields = EXCLUDED.changed_fields,
        details = EXCLUDED.details, search = EXCLUDED.search,
        projection_version = EXCLUDED.projection_version, projected_at = EXCLUDED.projected_at
    WHERE t.projection_version <= EXCLUDED.projection_version"
);

/// Inserts a batch into the shadow table of `rebuild --swap` (no key yet while it loads:
/// every event is read once, so there is nothing to conflict with).
pub const INSERT_SHADOW_ENTRIES: &str =
    concat!("INSERT INTO chronicle_entries_rebuild (", entry_columns!(), ") ", entry_rows!());

/// The columns of an entry that its event decides, in table order: every column but
/// `id` (the key), `projection_version` (its own check: stale entries) and
/// `projected_at` (when the entry was written, not what it says).
pub const CONTENT_COLUMNS: [&str; 15] = [
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
    "search",
];

/// The statement of `compare_entries`, over the columns given (`CONTENT_COLUMNS`).
macro_rules! compare_entries {
    ($($c:ident),*) => {
        concat!(
            "SELECT d.* FROM (SELECT p.id",
            $(", p.", stringify!($c), " IS DISTINCT FROM n.", stringify!($c),)*
            " FROM (",
            entry_rows!(),
            ") AS p(",
            entry_columns!(),
            ")
            JOIN chronicle_entries n ON n.id = p.id AND n.projection_version = p.projection_version
            WHERE false",
            $(" OR p.", stringify!($c), " IS DISTINCT FROM n.", stringify!($c),)*
            ") d"
        )
    };
}

/// Of a batch of projected entries, those whose stored entry, of the same projection
/// version, differs from them: the id, then one flag per `CONTENT_COLUMNS` column. The
/// projected values become column values through the very expressions of the write
/// (`entry_rows!`: the same casts, the same search vector), so a column differs exactly
/// when writing the entry again would change it. Reads only.
pub const COMPARE_ENTRIES: &str = compare_entries!(
    library_id,
    actor_user_id,
    entity_type,
    entity_id,
    event_type,
    occurred_at,
    created_at,
    request_id,
    client,
    ip,
    reason,
    summary,
    changed_fields,
    details,
    search
);

/// A stored entry that differs from its event's projection, and the columns that do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Differing {
    pub id: Uuid,
    pub columns: Vec<&'static str>,
}

/// Compares `entries` (projected now) with the stored entries of the same projection
/// version (`COMPARE_ENTRIES`), in chunks of at most `WRITE_CHUNK_BYTES` of text. An
/// entry not stored, or stored by another projection version, is not compared.
pub fn compare_entries(client: &mut impl GenericClient, entries: &[&Entry]) -> Result<Vec<Differing>, postgres::Error> {
    let mut differing = Vec::new();
    for chunk in chunks(entries) {
        let rows = with_entry_params(chunk, |params| client.query(COMPARE_ENTRIES, params))?;
        for r in rows {
            let mut columns = Vec::new();
            for (i, column) in CONTENT_COLUMNS.iter().enumerate() {
                if r.try_get::<_, bool>(i + 1)? {
                    columns.push(*column);
                }
            }
            differing.push(Differing { id: r.try_get(0)?, columns });
        }
    }
    Ok(differing)
}

/// The search index's pending list limit for a worker's completing transaction, as a
/// `SET LOCAL` (migration 11 leaves the limit to the writing session). GIN's fastupdate
/// appends new entries to a pending list and merges it into the index in the insert that
/// grows it past the limit: a long list merges for less per entry, but the insert that
/// merges it waits longer. A worker draining a backlog (its claims come back full) takes
/// the server's default of 4 MB, where throughput counts and one batch's wait is lost in
/// the queue; one keeping up with a trickle takes 256 kB, so no batch waits long.
/// BENCHMARKS.md has the A/B of both.
pub fn search_pending_list(backlog: bool) -> &'static str {
    if backlog {
        "SET LOCAL gin_pending_list_limit = '4MB'"
    } else {
        "SET LOCAL gin_pending_list_limit = '256kB'"
    }
}

/// Upserts `entries` in one round trip; returns the number of rows written (an entry
/// kept because it is newer than ours is not counted).
pub fn upsert_entries(client: &mut impl GenericClient, entries: &[&Entry]) -> Result<u64, postgres::Error> {
    write_entries(client, UPSERT_ENTRIES, entries)
}

/// The most bytes of entry text (details, changed fields, summary, search) one statement
/// carries: a batch of large entries is written in several statements of the same
/// transaction, so the encoded parameters never hold the whole batch at once.
pub const WRITE_CHUNK_BYTES: usize = 4 << 20;

/// Runs one of the statements above (its text, or the same statement prepared on this
/// connection) with `entries` as its array parameters, in chunks of at most
/// `WRITE_CHUNK_BYTES` of text (at least one entry each). Returns the rows written.
pub fn write_entries<S: ToStatement + ?Sized>(
    client: &mut impl GenericClient,
    statement: &S,
    entries: &[&Entry],
) -> Result<u64, postgres::Error> {
    let mut written = 0;
    for chunk in chunks(entries) {
        written += write_chunk(client, statement, chunk)?;
    }
    Ok(written)
}

/// `entries` in chunks of at most `WRITE_CHUNK_BYTES` of text (at least one entry each).
fn chunks<'a, 'e>(entries: &'a [&'e Entry]) -> impl Iterator<Item = &'a [&'e Entry]> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= entries.len() {
            return None;
        }
        let mut end = start;
        let mut bytes = 0;
        while end < entries.len() && (end == start || bytes + text_bytes(entries[end]) <= WRITE_CHUNK_BYTES) {
            bytes += text_bytes(entries[end]);
            end += 1;
        }
        let chunk = &entries[start..end];
        start = end;
        Some(chunk)
    })
}

/// The bytes of an entry's variable-length text, as the statement's parameters carry it.
fn text_bytes(e: &Entry) -> usize {
    e.details.len() + e.summary.len() + e.search_text.len() + e.changed_fields.text_len() + 3 * e.changed_fields.len()
}

fn write_chunk<S: ToStatement + ?Sized>(
    client: &mut impl GenericClient,
    statement: &S,
    entries: &[&Entry],
) -> Result<u64, postgres::Error> {
    if entries.is_empty() {
        return Ok(0);
    }
    with_entry_params(entries, |params| client.execute(statement, params))
}

/// Calls `f` with `entries` as the 17 array parameters of `entry_rows!` (one per column).
fn with_entry_params<R>(entries: &[&Entry], f: impl FnOnce(&[&(dyn ToSql + Sync)]) -> R) -> R {
    let ids: Vec<_> = entries.iter().map(|e| e.id).collect();
    let library_ids: Vec<_> = entries.iter().map(|e| e.library_id).collect();
    let actors: Vec<_> = entries.iter().map(|e| e.actor_user_id).collect();
    let entity_types: Vec<&str> = entries.iter().map(|e| e.entity_type.as_str()).collect();
    let entity_ids: Vec<_> = entries.iter().map(|e| e.entity_id).collect();
    let event_types: Vec<&str> = entries.iter().map(|e| e.event_type.as_str()).collect();
    let occurred: Vec<_> = entries.iter().map(|e| e.occurred_at).collect();
    let created: Vec<_> = entries.iter().map(|e| e.created_at).collect();
    let request_ids: Vec<Option<&str>> = entries.iter().map(|e| e.request_id.as_deref()).collect();
    let clients: Vec<Option<&str>> = entries.iter().map(|e| e.client.as_deref()).collect();
    let ips: Vec<Option<&str>> = entries.iter().map(|e| e.ip.as_deref()).collect();
    let reasons: Vec<Option<&str>> = entries.iter().map(|e| e.reason.as_deref()).collect();
    let summaries: Vec<&str> = entries.iter().map(|e| e.summary.as_str()).collect();
    let changed: Vec<String> = entries.iter().map(|e| text_array_literal(e.changed_fields.iter())).collect();
    let details: Vec<&str> = entries.iter().map(|e| e.details.as_str()).collect();
    let search: Vec<&str> = entries.iter().map(|e| e.search_text.as_str()).collect();
    let versions: Vec<i32> = entries.iter().map(|e| e.projection_version).collect();
    f(&[
        &ids,
        &library_ids,
        &actors,
        &entity_types,
        &entity_ids,
        &event_types,
        &occurred,
        &created,
        &request_ids,
        &clients,
        &ips,
        &reasons,
        &summaries,
        &changed,
        &details,
        &search,
        &versions,
    ])
}

/// A Postgres array literal of `items` (`{"a","b\"c"}`): every element quoted, with
/// backslashes and double quotes escaped, so any text reads back exactly.
pub fn text_array_literal<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from("{");
    for (n, item) in items.into_iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_literals_quote_every_element() {
        assert_eq!(text_array_literal([]), "{}");
        assert_eq!(text_array_literal(["title"]), r#"{"title"}"#);
        assert_eq!(text_array_literal(["a b", "", "NULL"]), r#"{"a b","","NULL"}"#);
        assert_eq!(text_array_literal([r#"q"u\o{t},e"#]), r#"{"q\"u\\o{t},e"}"#);
    }

    #[test]
    fn the_comparison_covers_every_column_but_the_key_version_and_write_time() {
        let mut all: Vec<&str> = ENTRY_COLUMNS.split(',').map(str::trim).collect();
        all.retain(|c| !["id", "projection_version", "projected_at"].contains(c));
        assert_eq!(all, CONTENT_COLUMNS);
        for c in CONTENT_COLUMNS {
            let flag = format!("p.{c} IS DISTINCT FROM n.{c}");
            assert_eq!(COMPARE_ENTRIES.matches(&flag).count(), 2, "{c}: one flag and one condition");
        }
    }
}
