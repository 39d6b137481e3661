//! The read model the worker writes into, compared with what this version writes.
//!
//! A read model changed under the worker (a column dropped, its type changed) would
//! refuse every entry, and each refusal would fail an event that has nothing wrong with
//! it. So the worker compares `chronicle_entries`' columns with `ENTRIES_CONTRACT` before
//! it starts (a difference refuses the start, exit 1), on every connection of a claim
//! thread, and when every entry of a batch is refused alike (a difference pauses it).

use postgres::GenericClient;

use crate::db::migrate::{col, ContractColumn};

/// The columns of `chronicle_entries` as the migrations create them, in table order (a
/// test compares them with the migrated table); `entries::UPSERT_ENTRIES` writes each.
pub const ENTRIES_CONTRACT: &[ContractColumn] = &[
    col("id", "uuid", true),
    col("library_id", "uuid", true),
    col("actor_user_id", "uuid", false),
    col("entity_type", "text", true),
    col("entity_id", "uuid", true),
    col("event_type", "text", true),
    col("occurred_at", "timestamptz", true),
    col("created_at", "timestamptz", true),
    col("request_id", "text", false),
    col("client", "text", false),
    col("ip", "inet", false),
    col("reason", "text", false),
    col("summary", "text", true),
    col("changed_fields", "_text", true),
    col("details", "jsonb", true),
    col("search", "tsvector", true),
    col("projection_version", "int4", true),
    col("projected_at", "timestamptz", true),
];

/// The columns of `chronicle_entries` as the server has them (none when it has no such
/// table on the search path): name, type, NOT NULL, has a default.
pub const SELECT_ENTRIES_COLUMNS: &str = "
    SELECT a.attname::text, t.typname::text, a.attnotnull, a.atthasdef
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = to_regclass('chronicle_entries') AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attnum";

/// What differs between the server's `chronicle_entries` and what this version writes
/// (empty when nothing does). One catalog query.
pub fn differences(client: &mut impl GenericClient) -> Result<Vec<String>, postgres::Error> {
    let rows = client.query(SELECT_ENTRIES_COLUMNS, &[])?;
    let mut existing = Vec::with_capacity(rows.len());
    for r in &rows {
        existing.push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?));
    }
    Ok(column_differences(&existing))
}

/// The differences between a table's columns `(name, type, not null, has default)` and
/// `ENTRIES_CONTRACT` that make the worker's writes fail: a column missing or of another
/// type, a NOT NULL where the worker may write NULL, an extra NOT NULL column without a
/// default. Pure, so every rule is unit-tested. A column that allows NULL where the
/// contract has NOT NULL, or an extra column with a default or NULL allowed, refuses
/// no write: not a difference.
pub fn column_differences(existing: &[(String, String, bool, bool)]) -> Vec<String> {
    if existing.is_empty() {
        return vec!["table chronicle_entries does not exist (or is not on the search path)".to_string()];
    }
    let mut out = Vec::new();
    for c in ENTRIES_CONTRACT {
        match existing.iter().find(|e| e.0 == c.name) {
            None => out.push(format!("column {} ({}) is missing", c.name, c.udt)),
            Some((_, udt, not_null, _)) => {
                if udt != c.udt {
                    out.push(format!("column {} is {udt}, this version writes {}", c.name, c.udt));
                }
                if !c.not_null && *not_null {
                    out.push(format!("column {} is NOT NULL, this version writes NULL into it", c.name));
                }
            }
        }
    }
    for (name, udt, not_null, has_default) in existing {
        if ENTRIES_CONTRACT.iter().all(|c| c.name != name) && *not_null && !has_default {
            out.push(format!("extra column {name} ({udt}) is NOT NULL without a default: this version cannot insert"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract_rows() -> Vec<(String, String, bool, bool)> {
        ENTRIES_CONTRACT.iter().map(|c| (c.name.to_string(), c.udt.to_string(), c.not_null, false)).collect()
    }

    #[test]
    fn the_contract_table_has_no_differences() {
        assert!(column_differences(&contract_rows()).is_empty());
        let mut relaxed = contract_rows();
        relaxed.iter_mut().find(|r| r.0 == "summary").unwrap().2 = false;
        relaxed.push(("note".into(), "text".into(), false, false));
        relaxed.push(("seq".into(), "int8".into(), true, true));
        assert!(column_differences(&relaxed).is_empty(), "{:?}", column_differences(&relaxed));
    }

    #[test]
    fn every_difference_that_refuses_writes_is_named() {
        let mut rows = contract_rows();
        rows.retain(|r| r.0 != "details");
        rows.iter_mut().find(|r| r.0 == "summary").unwrap().1 = "varchar".into();
        rows.iter_mut().find(|r| r.0 == "reason").unwrap().2 = true;
        rows.push(("tenant".into(), "text".into(), true, false));
        let d = column_differences(&rows);
        assert_eq!(d.len(), 4, "{d:#?}");
        assert!(d.iter().any(|x| x == "column details (jsonb) is missing"), "{d:?}");
        assert!(d.iter().any(|x| x == "column summary is varchar, this version writes text"), "{d:?}");
        assert!(d.iter().any(|x| x.contains("column reason is NOT NULL")), "{d:?}");
        assert!(d.iter().any(|x| x.contains("extra column tenant (text)")), "{d:?}");
    }

    #[test]
    fn a_missing_table_is_one_difference() {
        let d = column_differences(&[]);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("does not exist"), "{d:?}");
    }
}
