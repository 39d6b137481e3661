//! The migration runner: applies the SQL files of `migrations/`, embedded in the binary.
//!
//! Like refinery, applied migrations are recorded with version, name and checksum, and a
//! changed or missing one is refused; unlike it, runs hold an advisory lock, so two
//! `migrate` started together (containers, CI) neither fail nor apply anything twice.

use postgres::{Client, GenericClient};

use crate::error::{AppError, Result};

/// One embedded migration.
#[derive(Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! migration {
    ($version:literal, $name:literal, $file:literal) => {
        Migration { version: $version, name: $name, sql: include_str!(concat!("../../migrations/", $file)) }
    };
}

/// Every migration this binary knows, in order. Never edit a released one: add another.
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "events", "0001_events.sql"),
    migration!(2, "outbox", "0002_outbox.sql"),
    migration!(3, "entries", "0003_entries.sql"),
    migration!(4, "rebuild_runs", "0004_rebuild_runs.sql"),
    migration!(5, "erasures", "0005_erasures.sql"),
    migration!(6, "row_level_security", "0006_row_level_security.sql"),
    migration!(7, "search_index_pending_list", "0007_search_index_pending_list.sql"),
    migration!(8, "eraser_role", "0008_eraser_role.sql"),
    migration!(9, "outbox_reclaims", "0009_outbox_reclaims.sql"),
    migration!(10, "rebuild_deliveries", "0010_rebuild_deliveries.sql"),
    migration!(11, "search_index_pending_list_per_transaction", "0011_search_index_pending_list_per_transaction.sql"),
    migration!(12, "projection_panicked", "0012_projection_panicked.sql"),
    migration!(13, "erasure_guard", "0013_erasure_guard.sql"),
    migration!(14, "rebuild_run_liveness", "0014_rebuild_run_liveness.sql"),
];

/// The schema version this binary expects.
pub fn expected_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Key of the advisory lock that serialises migration runs ("chronicl" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x6368_726f_6e69_636c;

const CREATE_TRACKING_TABLE: &str = "
    CREATE TABLE IF NOT EXISTS chronicle_schema_migrations (
        version     integer     PRIMARY KEY,
        name        text        NOT NULL,
        checksum    text        NOT NULL,
        applied_at  timestamptz NOT NULL DEFAULT now(),
        duration_ms bigint      NOT NULL
    )";

const SELECT_APPLIED: &str =
    "SELECT version, name, checksum, applied_at::text FROM chronicle_schema_migrations ORDER BY version";

const RECORD_APPLIED: &str =
    "INSERT INTO chronicle_schema_migrations (version, name, checksum, duration_ms) VALUES ($1, $2, $3, $4)";

/// The checksum recorded for a migration: SHA-256 of its text with carriage returns
/// removed, so a Windows checkout (CRLF) computes the same checksum as a Unix one.
pub fn checksum(sql: &str) -> String {
    let normalized: Vec<u8> = sql.bytes().filter(|&b| b != b'\r').collect();
    sha256_hex(&normalized)
}

/// A migration recorded in the database.
#[derive(Debug, Clone)]
pub struct Applied {
    pub version: i32,
    pub name: String,
    pub checksum: String,
    pub applied_at: String,
}

/// Where a database stands relative to this binary.
#[derive(Debug)]
pub struct Status {
    pub applied: Vec<Applied>,
    pub pending: Vec<&'static Migration>,
}

/// Reads the applied migrations and checks them against the embedded ones: a changed or
/// unknown applied migration is an error (exit 1), naming it.
pub fn status(client: &mut impl GenericClient) -> Result<Status> {
    let exists: bool = client
        .query_one("SELECT to_regclass('chronicle_schema_migrations') IS NOT NULL", &[])
        .and_then(|r| r.try_get(0))
        .map_err(|e| AppError::db("while reading the migration table", e))?;
    let applied = if exists {
        client
            .query(SELECT_APPLIED, &[])
            .map_err(|e| AppError::db("while reading applied migrations", e))?
            .iter()
            .map(|r| {
                Ok(Applied {
                    version: r.try_get(0)?,
                    name: r.try_get(1)?,
                    checksum: r.try_get(2)?,
                    applied_at: r.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, postgres::Error>>()
            .map_err(|e| AppError::db("while reading applied migrations", e))?
    } else {
        Vec::new()
    };
    for a in &applied {
        match MIGRATIONS.iter().find(|m| m.version == a.version) {
            None => {
                return Err(AppError::failed(format!(
                    "applied migration {} ({}) is not known to this chronicle {}: the database was \
                     migrated by a newer version; upgrade chronicle",
                    a.version,
                    a.name,
                    env!("CARGO_PKG_VERSION")
                )))
            }
            Some(m) if checksum(m.sql) != a.checksum => {
                return Err(AppError::failed(format!(
                    "applied migration {} ({}) differs from the one in this binary (checksum {} in the \
                     database, {} embedded): a released migration was edited; restore it and add a new one",
                    a.version,
                    a.name,
                    a.checksum,
                    checksum(m.sql)
                )))
            }
            Some(_) => {}
        }
    }
    let pending = MIGRATIONS.iter().filter(|m| applied.iter().all(|a| a.version != m.version)).collect();
    Ok(Status { applied, pending })
}

/// What a migrate run did.
#[derive(Debug, Default)]
pub struct Report {
    pub applied: Vec<(i32, &'static str)>,
    pub adopted_events_table: bool,
}

/// Applies every pending migration, each in its own transaction, under an advisory lock.
pub fn migrate(client: &mut Client) -> Result<Report> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .map_err(|e| AppError::db("while taking the migration lock", e))?;
    let result = migrate_locked(client);
    // The lock also ends with the session; unlocking explicitly lets a pooled or reused
    // connection go on without it. A failure here changes nothing already done.
    if let Err(e) = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY]) {
        log::warn!("could not release the migration lock: {}", super::describe_error(&e));
    }
    result
}

/// The server's encoding for this database, and its name.
const SELECT_ENCODING: &str = "SELECT current_setting('server_encoding'), current_database()::text";

/// Refuses a database whose encoding is not UTF-8. In `SQL_ASCII` PostgreSQL stores text
/// without checking it, so one invalid byte in an event reaches the worker; in any other
/// encoding an event's text may hold characters the read model and the search index
/// then cannot, or hold differently.
fn check_encoding(client: &mut Client) -> Result<()> {
    let (encoding, database): (String, String) = client
        .query_one(SELECT_ENCODING, &[])
        .and_then(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .map_err(|e| AppError::db("while reading the database's encoding", e))?;
    match encoding_refusal(&encoding, &database) {
        Some(why) => Err(AppError::failed(why)),
        None => Ok(()),
    }
}

/// Why a database of this encoding is refused, or None for UTF-8. Pure.
fn encoding_refusal(encoding: &str, database: &str) -> Option<String> {
    if encoding.eq_ignore_ascii_case("UTF8") {
        return None;
    }
    let why = if encoding.eq_ignore_ascii_case("SQL_ASCII") {
        "events are UTF-8 text, and SQL_ASCII stores any byte unchecked"
    } else {
        "events are UTF-8 text"
    };
    Some(format!(
        "the database {database:?} has encoding {encoding}; chronicle needs UTF8 ({why}): nothing was migrated. Create a UTF8 database (with a UTF-8 locale: C.UTF-8, en_US.UTF-8, ...) \
         and migrate that one: CREATE DATABASE <name> ENCODING 'UTF8' TEMPLATE template0 \
         LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
    ))
}

fn migrate_locked(client: &mut Client) -> Result<Report> {
    check_encoding(client)?;
    client
        .batch_execute(CREATE_TRACKING_TABLE)
        .map_err(|e| AppError::db("while creating chronicle_schema_migrations", e))?;
    let st = status(client)?;
    let mut report = Report::default();
    for m in st.pending {
        if m.version == 1 {
            report.adopted_events_table = check_existing_events_table(client)?;
        }
        let started = std::time::Instant::now();
        let mut tx = client.transaction().map_err(|e| AppError::db("while starting a migration", e))?;
        tx.batch_execute(m.sql)
            .map_err(|e| AppError::db(&format!("while applying migration {} ({})", m.version, m.name), e))?;
        let ms = started.elapsed().as_millis() as i64;
        tx.execute(RECORD_APPLIED, &[&m.version, &m.name, &checksum(m.sql), &ms])
            .map_err(|e| AppError::db(&format!("while recording migration {}", m.version), e))?;
        tx.commit().map_err(|e| AppError::db(&format!("while committing migration {}", m.version), e))?;
        log::debug!("applied migration {} ({}) in {ms} ms", m.version, m.name);
        report.applied.push((m.version, m.name));
    }
    Ok(report)
}

/// A column of a table as the contract fixes it (docs/DESIGN.md §2): its name, its type
/// (`pg_type.typname`, as `information_schema.columns.udt_name` names it) and whether it
/// is NOT NULL. `EVENTS_CONTRACT` here; the read model's in `worker::read_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContractColumn {
    pub name: &'static str,
    pub udt: &'static str,
    pub not_null: bool,
}

pub(crate) const fn col(name: &'static str, udt: &'static str, not_null: bool) -> ContractColumn {
    ContractColumn { name, udt, not_null }
}

/// What an existing `chronicle_events` must have to be adopted; the migrations create
/// exactly these (a test compares them).
pub const EVENTS_CONTRACT: &[ContractColumn] = &[
    col("id", "uuid", true),
    col("library_id", "uuid", true),
    col("actor_user_id", "uuid", false),
    col("entity_type", "text", true),
    col("entity_id", "uuid", true),
    col("event_type", "text", true),
    col("before", "jsonb", false),
    col("after", "jsonb", false),
    col("diff", "jsonb", false),
    col("occurred_at", "timestamptz", true),
    col("created_at", "timestamptz", true),
    col("request_id", "text", false),
    col("client", "text", false),
    col("reason", "text", false),
    col("ip", "inet", false),
];

const SELECT_EVENTS_COLUMNS: &str = "
    SELECT a.attname::text, t.typname::text, a.attnotnull, a.atthasdef
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = to_regclass('chronicle_events') AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attnum";

const SELECT_EVENTS_ID_IS_KEY: &str = "
    SELECT EXISTS (
        SELECT 1 FROM pg_index i
        WHERE i.indrelid = to_regclass('chronicle_events') AND i.indisunique
          AND i.indnkeyatts = 1
          AND i.indkey[0] = (SELECT attnum FROM pg_attribute
                             WHERE attrelid = to_regclass('chronicle_events') AND attname = 'id'))";

/// When `chronicle_events` already exists (created by the application's own migrations),
/// compares it with the contract column by column. Returns whether a table was adopted;
/// refuses with every difference listed when it is not compatible.
fn check_existing_events_table(client: &mut Client) -> Result<bool> {
    let rows = client
        .query(SELECT_EVENTS_COLUMNS, &[])
        .map_err(|e| AppError::db("while inspecting an existing chronicle_events", e))?;
    if rows.is_empty() {
        return Ok(false);
    }
    let mut existing = Vec::new();
    for r in &rows {
        let c: Result<(String, String, bool, bool), postgres::Error> =
            (|| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))();
        existing.push(c.map_err(|e| AppError::db("while inspecting an existing chronicle_events", e))?);
    }
    let id_is_key: bool = client
        .query_one(SELECT_EVENTS_ID_IS_KEY, &[])
        .and_then(|r| r.try_get(0))
        .map_err(|e| AppError::db("while inspecting an existing chronicle_events", e))?;
    let differences = events_table_differences(&existing, id_is_key);
    if differences.is_empty() {
        log::info!("adopting the existing chronicle_events table: it matches the contract");
        Ok(true)
    } else {
        Err(AppError::failed(format!(
            "chronicle_events already exists and does not match the contract (docs/DESIGN.md §2):\n  - {}\n\
             change the table (or its migrations in the application) and run migrate again",
            differences.join("\n  - ")
        )))
    }
}

/// The differences between an existing table's columns `(name, type, not null, has
/// default)` and the contract. Pure, so every rule is unit-tested.
fn events_table_differences(existing: &[(String, String, bool, bool)], id_is_key: bool) -> Vec<String> {
    let mut out = Vec::new();
    for c in EVENTS_CONTRACT {
        match existing.iter().find(|e| e.0 == c.name) {
            None => out.push(format!("column {} ({}) is missing", c.name, c.udt)),
            Some((_, udt, not_null, _)) => {
                if udt != c.udt {
                    out.push(format!("column {} is {udt}, the contract says {}", c.name, c.udt));
                }
                if c.not_null && !not_null {
                    out.push(format!("column {} allows NULL, the contract says NOT NULL", c.name));
                }
                if !c.not_null && *not_null {
                    out.push(format!("column {} is NOT NULL, the contract allows NULL", c.name));
                }
            }
        }
    }
    for (name, udt, not_null, has_default) in existing {
        if EVENTS_CONTRACT.iter().all(|c| c.name != name) && *not_null && !has_default {
            out.push(format!(
                "extra column {name} ({udt}) is NOT NULL without a default: writers following the contract cannot insert"
            ));
        }
    }
    if !id_is_key && existing.iter().any(|e| e.0 == "id") {
        out.push("column id is not a primary key or unique".to_string());
    }
    out
}

/// SHA-256 of `data` as lowercase hex.
fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_known_vectors() {
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(sha256_hex(long), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    }

    #[test]
    fn checksum_ignores_line_endings() {
        assert_eq!(checksum("a;\r\nb;\r\n"), checksum("a;\nb;\n"));
        assert_ne!(checksum("a;\n"), checksum("b;\n"));
    }

    #[test]
    fn only_a_utf8_database_is_migrated() {
        assert_eq!(encoding_refusal("UTF8", "app"), None);
        for encoding in ["SQL_ASCII", "LATIN1", "WIN1252", "EUC_JP"] {
            let why = encoding_refusal(encoding, "app").expect(encoding);
            assert!(why.contains(&format!("has encoding {encoding}")), "{why}");
            assert!(why.contains("ENCODING 'UTF8' TEMPLATE template0"), "{why}");
        }
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        // Strictly increasing from 1; a number may be skipped (kept for a migration
        // that lands on another branch), never reused.
        assert_eq!(MIGRATIONS[0].version, 1);
        for w in MIGRATIONS.windows(2) {
            assert!(w[1].version > w[0].version, "{} after {}", w[1].name, w[0].name);
        }
    }

    fn contract_rows() -> Vec<(String, String, bool, bool)> {
        EVENTS_CONTRACT.iter().map(|c| (c.name.to_string(), c.udt.to_string(), c.not_null, false)).collect()
    }

    #[test]
    fn a_contract_table_has_no_differences() {
        assert!(events_table_differences(&contract_rows(), true).is_empty());
        let mut extra = contract_rows();
        extra.push(("tenant_note".into(), "text".into(), false, false));
        extra.push(("seq".into(), "int8".into(), true, true));
        assert!(events_table_differences(&extra, true).is_empty());
    }

    #[test]
    fn every_kind_of_difference_is_listed() {
        let mut rows = contract_rows();
        rows.retain(|r| r.0 != "ip");
        rows.iter_mut().find(|r| r.0 == "occurred_at").unwrap().1 = "timestamp".into();
        rows.iter_mut().find(|r| r.0 == "library_id").unwrap().2 = false;
        rows.iter_mut().find(|r| r.0 == "reason").unwrap().2 = true;
        rows.push(("tenant".into(), "text".into(), true, false));
        let d = events_table_differences(&rows, false);
        assert_eq!(d.len(), 6, "{d:#?}");
        assert!(d.iter().any(|x| x.contains("ip (inet) is missing")));
        assert!(d.iter().any(|x| x.contains("occurred_at is timestamp")));
        assert!(d.iter().any(|x| x.contains("library_id allows NULL")));
        assert!(d.iter().any(|x| x.contains("reason is NOT NULL")));
        assert!(d.iter().any(|x| x.contains("extra column tenant")));
        assert!(d.iter().any(|x| x.contains("not a primary key")));
    }
}
