//! Writes to the read model: the set-based upsert of projected entries.
//!
//! `id` is the event's id, so writing an entry twice (replay, rebuild, a worker that
//! crashed after committing) updates it instead of duplicating it; an entry built by a
//! newer projection version is never overwritten by an older one (rolling deploys).

use postgres::GenericClient;
use serde_json::Value;

use crate::projection::Entry;

/// The columns of an entry row, in the order the statements below write them.
macro_rules! entry_columns {
    () => {
        "id, library_id, actor_user_id, entity_type, entity_id, event_type, occurred_at, \
         created_at, request_id, client, ip, reason, summary, changed_fields, details, \
         search, projection_version, projected_at"
    };
}

/// A batch of projected entries as rows, from one array parameter per column. The search
/// column is built here from the projector's search text with the `simple`
/// configuration (no stemming: the text is English and Chinese, and CJK was already
/// split into bigrams).
macro_rules! entry_rows {
    () => {
        "SELECT x.id, x.library_id, x.actor_user_id, x.entity_type, x.entity_id, x.event_type,
                x.occurred_at, x.created_at, x.request_id, x.client, x.ip, x.reason, x.summary,
                ARRAY(SELECT jsonb_array_elements_text(x.changed_fields)), x.details,
                to_tsvector('simple', x.search_text), x.projection_version, now()
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::uuid[], $6::text[],
                     $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[], $11::inet[],
                     $12::text[], $13::text[], $14::jsonb[], $15::jsonb[], $16::text[], $17::int[])
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

/// Upserts `entries` in one round trip; returns the number of rows written (an entry
/// kept because it is newer than ours is not counted).
pub fn upsert_entries(client: &mut impl GenericClient, entries: &[&Entry]) -> Result<u64, postgres::Error> {
    write_entries(client, UPSERT_ENTRIES, entries)
}

/// Runs one of the statements above with `entries` as its array parameters.
pub fn write_entries(client: &mut impl GenericClient, statement: &str, entries: &[&Entry]) -> Result<u64, postgres::Error> {
    if entries.is_empty() {
        return Ok(0);
    }
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
    let ips: Vec<_> = entries.iter().map(|e| e.ip).collect();
    let reasons: Vec<Option<&str>> = entries.iter().map(|e| e.reason.as_deref()).collect();
    let summaries: Vec<&str> = entries.iter().map(|e| e.summary.as_str()).collect();
    let changed: Vec<Value> = entries.iter().map(|e| Value::from(e.changed_fields.clone())).collect();
    let details: Vec<&Value> = entries.iter().map(|e| &e.details).collect();
    let search: Vec<&str> = entries.iter().map(|e| e.search_text.as_str()).collect();
    let versions: Vec<i32> = entries.iter().map(|e| e.projection_version).collect();
    client.execute(
        statement,
        &[
            &ids, &library_ids, &actors, &entity_types, &entity_ids, &event_types, &occurred, &created,
            &request_ids, &clients, &ips, &reasons, &summaries, &changed, &details, &search, &versions,
        ],
    )
}
