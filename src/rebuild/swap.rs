//! `rebuild --swap`: zero-downtime rebuild.
//!
//! 1. Create `chronicle_entries_rebuild` shaped like `chronicle_entries` (columns,
//!    defaults, checks; no indexes yet, so the load is fast), commit it, and fill it from
//!    the events (with the rebuild's writers) while the old table keeps serving.
//! 2. Build the old table's indexes on it (temporary names), copy its row-level
//!    security, policies, grants, owner, storage options and triggers.
//! 3. Catch up with events written meanwhile (outside any lock), then, in one short
//!    transaction: block event writers (readers go on), catch up with the last few,
//!    take the read model's lock with a short lock timeout (so readers never queue long
//!    behind us; retried), rename the old table and move its indexes and constraints out
//!    of the way, rename the new table and give its indexes and constraints their
//!    original names, commit: catalog changes only, whatever the table's size.
//! 4. Drop the old table, outside that lock (dropping it inside would hold readers for
//!    as long as removing its files takes, which grows with the table).

use std::time::{Duration, Instant};

use postgres::{Client, GenericClient};

use super::{load, project_and_write, read_events, Failures, Options, Progress, Report};
use crate::entries::INSERT_SHADOW_ENTRIES;
use crate::error::{AppError, Result};
use crate::event::EVENT_COLUMNS;
use crate::outbox::{SizeLimits, EVENT_BYTES};

const SHADOW: &str = "chronicle_entries_rebuild";

/// The replaced table between the swap and its drop (left behind only by a process that
/// died in between: dropped by the next rebuild, as is a shadow left behind).
const REPLACED: &str = "chronicle_entries_replaced";

const CREATE_SHADOW: &str = "
    DROP TABLE IF EXISTS chronicle_entries_replaced;
    DROP TABLE IF EXISTS chronicle_entries_rebuild;
    CREATE TABLE chronicle_entries_rebuild (LIKE chronicle_entries
        INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING STORAGE
        INCLUDING COMMENTS)";

/// The indexes of the live table, with whether each backs a constraint (and its kind).
const SELECT_INDEXES: &str = "
    SELECT i.relname::text, pg_get_indexdef(i.oid), c.conname::text, c.contype::text
    FROM pg_index x
    JOIN pg_class i ON i.oid = x.indexrelid
    LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid
    WHERE x.indrelid = 'chronicle_entries'::regclass
    ORDER BY i.relname";

const SELECT_POLICIES: &str = "
    SELECT policyname::text, permissive, roles::text[], cmd, qual, with_check
    FROM pg_policies WHERE schemaname = current_schema() AND tablename = 'chronicle_entries'";

const SELECT_TABLE_SETTINGS: &str = "
    SELECT c.relrowsecurity, c.relforcerowsecurity, pg_get_userbyid(c.relowner)::text,
           coalesce(array_to_string(c.reloptions, ', '), '')
    FROM pg_class c WHERE c.oid = 'chronicle_entries'::regclass";

const SELECT_GRANTS: &str = "
    SELECT grantee::text, privilege_type::text, is_grantable = 'YES'
    FROM information_schema.role_table_grants
    WHERE table_schema = current_schema() AND table_name = 'chronicle_entries'
      AND grantee <> pg_get_userbyid((SELECT relowner FROM pg_class WHERE oid = 'chronicle_entries'::regclass))";

const SELECT_TRIGGERS: &str = "
    SELECT pg_get_triggerdef(t.oid) FROM pg_trigger t
    WHERE t.tgrelid = 'chronicle_entries'::regclass AND NOT t.tgisinternal";

/// Events with no entry in the shadow table yet (written during the load), except those
/// that could not be projected: by this run (`$2`), or by a worker meanwhile (a failed
/// delivery).
/// Columns as `rebuild::read_events` reads them: id, keyset time, size, then the event
/// (NULL when over `$1` bytes: it is recorded as failed, not loaded).
fn select_missing() -> String {
    format!(
        "SELECT k.id, k.occurred_at::text, k.bytes, e.* FROM (
             SELECT e.id, e.occurred_at, {EVENT_BYTES} AS bytes FROM chronicle_events e
             WHERE NOT EXISTS (SELECT 1 FROM chronicle_entries_rebuild s WHERE s.id = e.id)
               AND e.id <> ALL ($2::uuid[])
               AND NOT EXISTS (SELECT 1 FROM chronicle_outbox_events o
                               WHERE o.event_id = e.id AND o.status = 'failed')
         ) k
         LEFT JOIN LATERAL (SELECT {EVENT_COLUMNS} FROM chronicle_events
                            WHERE id = k.id AND k.bytes <= $1::bigint) e ON true"
    )
}

/// Entries of events erased during the load.
const DELETE_ORPHANS: &str = "
    DELETE FROM chronicle_entries_rebuild s
    WHERE NOT EXISTS (SELECT 1 FROM chronicle_events e WHERE e.id = s.id)";

/// How long the swap may wait for the read model's lock before it gives up and retries:
/// readers that arrive meanwhile queue behind it, so it must stay short.
const SWAP_LOCK_TIMEOUT: &str = "200ms";
const SWAP_TRIES: u32 = 50;

pub fn run(
    client: &mut Client,
    opts: &Options,
    report: &mut Report,
    started: Instant,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    client.batch_execute(CREATE_SHADOW).map_err(|e| AppError::db("while creating the shadow table", e))?;
    let result = load_and_swap(client, opts, report, started, progress);
    if result.is_err() {
        // The live table is untouched; only the shadow goes.
        let _ = client.batch_execute("DROP TABLE IF EXISTS chronicle_entries_rebuild");
    }
    result
}

fn load_and_swap(
    client: &mut Client,
    opts: &Options,
    report: &mut Report,
    started: Instant,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    // The shadow table is committed (`run` created it outside any transaction), so the
    // writers' connections can fill it. The scan reads each event once and hands its
    // batch to one writer: every event is inserted exactly once.
    load(client, opts, None, INSERT_SHADOW_ENTRIES, report, started, progress)?;
    let renames = copy_shape(client)?;
    client
        .batch_execute(&format!("ANALYZE {SHADOW}"))
        .map_err(|e| AppError::db("while analyzing the shadow table", e))?;
    // Most of what was written during the load, without holding any lock.
    report.rows_written += catch_up(client, report, &opts.sizes)?;
    crate::failpoint::check("swap-before-swap", None);

    for attempt in 1..=SWAP_TRIES {
        match swap_once(client, report, &renames, &opts.sizes) {
            Ok(held) => {
                report.swap_lock_held = Some(held);
                crate::failpoint::check("swap-after-swap", None);
                // The swap is done; a failure to drop the old table only leaves it behind.
                if let Err(e) = client.batch_execute(&format!("DROP TABLE IF EXISTS {REPLACED}")) {
                    log::warn!(
                        "rebuild --swap: the swap is done, but the old read model could not be dropped ({}); \
                         drop {REPLACED} by hand, or the next --swap will",
                        crate::db::describe_error(&e)
                    );
                }
                return Ok(());
            }
            Err(SwapFailure::Busy) => {
                log::info!("the read model is busy; retrying the swap ({attempt}/{SWAP_TRIES})");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(SwapFailure::Failed(e)) => return Err(e),
        }
    }
    Err(AppError::failed("could not swap: the read model stayed locked by other sessions"))
}

/// Projects the events that have no shadow entry yet.
fn catch_up(client: &mut impl GenericClient, report: &mut Report, sizes: &SizeLimits) -> Result<u64> {
    let max_event = sizes.max_event_bytes.min(i64::MAX as u64) as i64;
    let failed: Vec<uuid::Uuid> = report.failed_events.iter().copied().collect();
    let rows =
        client.query(&select_missing(), &[&max_event, &failed]).map_err(|e| AppError::db("while catching up", e))?;
    let events = read_events(&rows, sizes)?;
    if events.is_empty() {
        return Ok(0);
    }
    let mut failures = Failures::default();
    let written = project_and_write(client, &events, INSERT_SHADOW_ENTRIES, &mut failures);
    report.absorb(failures);
    written
}

/// At the swap: how to move the old table's indexes and constraints out of the way
/// (`away`, on the old table once renamed), then give the shadow's their final names.
struct Renames {
    away: Vec<String>,
    statements: Vec<String>,
}

/// Gives the shadow table everything the live one has besides rows.
fn copy_shape(client: &mut Client) -> Result<Renames> {
    let ctx = "while copying the read model's indexes, policies and grants";
    let mut renames = Vec::new();
    let mut away = Vec::new();
    let mut ddl = Vec::new();
    let indexes = client.query(SELECT_INDEXES, &[]).map_err(|e| AppError::db(ctx, e))?;
    for (n, r) in indexes.iter().enumerate() {
        let name: String = r.try_get(0).map_err(|e| AppError::db(ctx, e))?;
        let def: String = r.try_get(1).map_err(|e| AppError::db(ctx, e))?;
        let conname: Option<String> = r.try_get(2).map_err(|e| AppError::db(ctx, e))?;
        let contype: Option<String> = r.try_get(3).map_err(|e| AppError::db(ctx, e))?;
        let temp = format!("chronicle_rb_{n}");
        let on_live =
            def.find(" ON ").ok_or_else(|| AppError::failed(format!("unexpected index definition: {def}")))?;
        let using = def[on_live..].find(" USING ").map(|i| on_live + i).unwrap_or(def.len());
        let head = if def.starts_with("CREATE UNIQUE INDEX") { "CREATE UNIQUE INDEX" } else { "CREATE INDEX" };
        ddl.push(format!("{head} {temp} ON {SHADOW}{}", &def[using..]));
        let old = format!("chronicle_replaced_{n}");
        match (&conname, contype.as_deref()) {
            (Some(con), Some("p" | "u")) => {
                away.push(format!("ALTER TABLE {REPLACED} RENAME CONSTRAINT {} TO {old}", quote_ident(con)))
            }
            _ => away.push(format!("ALTER INDEX {} RENAME TO {old}", quote_ident(&name))),
        }
        match (conname, contype.as_deref()) {
            (Some(con), Some("p")) => {
                ddl.push(format!("ALTER TABLE {SHADOW} ADD CONSTRAINT {temp} PRIMARY KEY USING INDEX {temp}"));
                renames
                    .push(format!("ALTER TABLE chronicle_entries RENAME CONSTRAINT {temp} TO {}", quote_ident(&con)));
            }
            (Some(con), Some("u")) => {
                ddl.push(format!("ALTER TABLE {SHADOW} ADD CONSTRAINT {temp} UNIQUE USING INDEX {temp}"));
                renames
                    .push(format!("ALTER TABLE chronicle_entries RENAME CONSTRAINT {temp} TO {}", quote_ident(&con)));
            }
            _ => renames.push(format!("ALTER INDEX {temp} RENAME TO {}", quote_ident(&name))),
        }
    }
    let s = client.query_one(SELECT_TABLE_SETTINGS, &[]).map_err(|e| AppError::db(ctx, e))?;
    let (rls, force, owner, options): (bool, bool, String, String) = (
        s.try_get(0).map_err(|e| AppError::db(ctx, e))?,
        s.try_get(1).map_err(|e| AppError::db(ctx, e))?,
        s.try_get(2).map_err(|e| AppError::db(ctx, e))?,
        s.try_get(3).map_err(|e| AppError::db(ctx, e))?,
    );
    if !options.is_empty() {
        ddl.push(format!("ALTER TABLE {SHADOW} SET ({options})"));
    }
    if rls {
        ddl.push(format!("ALTER TABLE {SHADOW} ENABLE ROW LEVEL SECURITY"));
    }
    if force {
        ddl.push(format!("ALTER TABLE {SHADOW} FORCE ROW LEVEL SECURITY"));
    }
    for p in client.query(SELECT_POLICIES, &[]).map_err(|e| AppError::db(ctx, e))? {
        let name: String = p.try_get(0).map_err(|e| AppError::db(ctx, e))?;
        let permissive: String = p.try_get(1).map_err(|e| AppError::db(ctx, e))?;
        let roles: Vec<String> = p.try_get(2).map_err(|e| AppError::db(ctx, e))?;
        let cmd: String = p.try_get(3).map_err(|e| AppError::db(ctx, e))?;
        let qual: Option<String> = p.try_get(4).map_err(|e| AppError::db(ctx, e))?;
        let check: Option<String> = p.try_get(5).map_err(|e| AppError::db(ctx, e))?;
        let roles: Vec<String> =
            roles.iter().map(|r| if r == "public" { "PUBLIC".to_string() } else { quote_ident(r) }).collect();
        let mut sql = format!(
            "CREATE POLICY {} ON {SHADOW} AS {permissive} FOR {cmd} TO {}",
            quote_ident(&name),
            roles.join(", ")
        );
        if let Some(q) = qual {
            sql.push_str(&format!(" USING ({q})"));
        }
        if let Some(c) = check {
            sql.push_str(&format!(" WITH CHECK ({c})"));
        }
        ddl.push(sql);
    }
    for g in client.query(SELECT_GRANTS, &[]).map_err(|e| AppError::db(ctx, e))? {
        let grantee: String = g.try_get(0).map_err(|e| AppError::db(ctx, e))?;
        let privilege: String = g.try_get(1).map_err(|e| AppError::db(ctx, e))?;
        let grantable: bool = g.try_get(2).map_err(|e| AppError::db(ctx, e))?;
        let to = if grantee == "PUBLIC" { grantee } else { quote_ident(&grantee) };
        ddl.push(format!("GRANT {privilege} ON {SHADOW} TO {to}{}", if grantable { " WITH GRANT OPTION" } else { "" }));
    }
    for t in client.query(SELECT_TRIGGERS, &[]).map_err(|e| AppError::db(ctx, e))? {
        let def: String = t.try_get(0).map_err(|e| AppError::db(ctx, e))?;
        ddl.push(def.replacen(" ON chronicle_entries ", &format!(" ON {SHADOW} "), 1).replacen(
            " ON public.chronicle_entries ",
            &format!(" ON {SHADOW} "),
            1,
        ));
    }
    let current_user: String = client
        .query_one("SELECT current_user::text", &[])
        .and_then(|r| r.try_get(0))
        .map_err(|e| AppError::db(ctx, e))?;
    if owner != current_user {
        ddl.push(format!("ALTER TABLE {SHADOW} OWNER TO {}", quote_ident(&owner)));
    }
    for stmt in &ddl {
        log::debug!("rebuild --swap: {stmt}");
        client.batch_execute(stmt).map_err(|e| AppError::db(&format!("{ctx} ({stmt})"), e))?;
    }
    Ok(Renames { away, statements: renames })
}

enum SwapFailure {
    /// The read model's lock could not be had within the short lock timeout: retry.
    Busy,
    Failed(AppError),
}

impl SwapFailure {
    fn db(e: postgres::Error) -> SwapFailure {
        if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
            SwapFailure::Busy
        } else {
            SwapFailure::Failed(AppError::db("while swapping the rebuilt read model in", e))
        }
    }
}

/// The final transaction. Returns how long it held the read model's lock.
fn swap_once(
    client: &mut Client,
    report: &mut Report,
    renames: &Renames,
    sizes: &SizeLimits,
) -> Result<Duration, SwapFailure> {
    let mut tx = client.transaction().map_err(SwapFailure::db)?;
    // Writers of events wait (readers do not) while the last events are caught up.
    tx.batch_execute("SET LOCAL lock_timeout = '5s'; LOCK TABLE chronicle_events IN EXCLUSIVE MODE")
        .map_err(SwapFailure::db)?;
    report.rows_written += catch_up(&mut tx, report, sizes).map_err(SwapFailure::Failed)?;
    tx.batch_execute(DELETE_ORPHANS).map_err(SwapFailure::db)?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'")).map_err(SwapFailure::db)?;
    tx.batch_execute("LOCK TABLE chronicle_entries IN ACCESS EXCLUSIVE MODE").map_err(SwapFailure::db)?;
    let locked = Instant::now();
    tx.batch_execute(&format!("ALTER TABLE chronicle_entries RENAME TO {REPLACED}")).map_err(SwapFailure::db)?;
    for stmt in &renames.away {
        tx.batch_execute(stmt).map_err(SwapFailure::db)?;
    }
    tx.batch_execute(&format!("ALTER TABLE {SHADOW} RENAME TO chronicle_entries")).map_err(SwapFailure::db)?;
    for stmt in &renames.statements {
        tx.batch_execute(stmt).map_err(SwapFailure::db)?;
    }
    tx.commit().map_err(SwapFailure::db)?;
    Ok(locked.elapsed())
}

fn quote_ident(s: &str) -> String {
    if !s.is_empty()
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
    {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}
