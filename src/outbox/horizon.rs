//! What slows the drain without failing anything: a transaction, a prepared transaction
//! or a replication slot that holds back the vacuum horizon. While one does, vacuum
//! cannot remove the outbox rows the claims and completions leave dead, every claim
//! walks past them, and the drain slows down with nothing failing. The worker samples
//! it (`worker::sample_horizon_once`, every `SAMPLE_EVERY`), exports it
//! (docs/DESIGN.md §6) and says it in its log; `chronicle status` prints it.

use std::time::Duration;

use postgres::GenericClient;
use serde::Serialize;

/// How often the worker samples the horizon: it moves by minutes, not seconds.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Past this age of the oldest transaction holding back the vacuum horizon, the worker
/// warns in its log and `chronicle status` prints a warning (docs/operations.md): no
/// request, batch or maintenance of a healthy deployment keeps a snapshot this long,
/// and the dead rows it keeps pile up at the drain's own rate.
pub const WARN_AFTER_SECONDS: f64 = 300.0;

/// What holds the horizon back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Holder {
    /// A backend's snapshot (`pg_stat_activity.backend_xmin`): an open transaction, a
    /// long query, a session idle in transaction.
    Transaction,
    /// A prepared transaction not yet committed or rolled back (`pg_prepared_xacts`).
    PreparedTransaction,
    /// A replication slot's `xmin`, or a standby's `hot_standby_feedback` through its
    /// walsender: no start time, so an age in transactions only.
    Replication,
}

impl Holder {
    pub const ALL: [Holder; 3] = [Holder::Transaction, Holder::PreparedTransaction, Holder::Replication];

    pub fn as_str(self) -> &'static str {
        match self {
            Holder::Transaction => "transaction",
            Holder::PreparedTransaction => "prepared_transaction",
            Holder::Replication => "replication",
        }
    }
}

/// The oldest of one kind of holder.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HolderAge {
    /// Seconds since it started (null when none holds it back, for replication, and for
    /// another role's transaction unless this role may read all statistics:
    /// `pg_read_all_stats`).
    pub age_seconds: Option<f64>,
    /// Transactions (xids) started since its snapshot: null when none holds it back.
    pub age_transactions: Option<i64>,
    /// Which one: `pid 4242 (user app, application psql, idle in transaction)`, a
    /// prepared transaction's gid, a slot's name.
    pub held_by: Option<String>,
}

/// The vacuum horizon and the outbox's dead rows, as one sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Horizon {
    /// The oldest holder of each kind, in `Holder::ALL`'s order.
    pub transaction: HolderAge,
    pub prepared_transaction: HolderAge,
    pub replication: HolderAge,
    /// Dead row versions in `chronicle_outbox_events`, by the statistics collector.
    pub outbox_dead_rows: i64,
}

impl Horizon {
    pub fn of(&self, holder: Holder) -> &HolderAge {
        match holder {
            Holder::Transaction => &self.transaction,
            Holder::PreparedTransaction => &self.prepared_transaction,
            Holder::Replication => &self.replication,
        }
    }

    fn of_mut(&mut self, holder: Holder) -> &mut HolderAge {
        match holder {
            Holder::Transaction => &mut self.transaction,
            Holder::PreparedTransaction => &mut self.prepared_transaction,
            Holder::Replication => &mut self.replication,
        }
    }

    /// The holder with the oldest start, and its age in seconds (none when nothing with a
    /// known start holds the horizon back).
    pub fn oldest(&self) -> Option<(Holder, f64)> {
        Holder::ALL.iter().filter_map(|&h| self.of(h).age_seconds.map(|s| (h, s))).max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// The oldest holder of the vacuum horizon of each kind, one row per kind (`Holder::ALL`),
/// and the outbox's dead rows on every row. Only what holds back the outbox's horizon
/// counts: a transaction of this database (one of another database holds back only its
/// own), a prepared transaction of this database, a standby's feedback, a slot's `xmin`
/// (a logical slot's `catalog_xmin` holds back the catalogs only). This statement's own
/// snapshot is not counted (`pg_backend_pid()`), nor autovacuum's: the horizon ignores a
/// vacuum's snapshot. Reads views of shared memory and the statistics of one table: its
/// cost does not grow with the data.
pub const SAMPLE_HORIZON: &str = "
    WITH holders AS (
        SELECT CASE WHEN a.backend_type = 'walsender' THEN 'replication' ELSE 'transaction' END AS holder,
               extract(epoch FROM now() - a.xact_start)::float8 AS seconds,
               age(a.backend_xmin)::bigint AS xids,
               format('pid %s (user %s, application %s%s)', a.pid, coalesce(a.usename::text, '?'),
                      coalesce(nullif(a.application_name, ''), a.backend_type, '?'),
                      coalesce(', ' || a.state, '')) AS held_by
        FROM pg_stat_activity a
        WHERE a.backend_xmin IS NOT NULL AND a.pid <> pg_backend_pid()
          AND (a.datname = current_database() OR a.backend_type = 'walsender')
          AND a.backend_type IS DISTINCT FROM 'autovacuum worker'
        UNION ALL
        SELECT 'prepared_transaction', extract(epoch FROM now() - p.prepared)::float8, age(p.transaction)::bigint,
               format('prepared transaction %L (owner %s, database %s)', p.gid, p.owner, p.database)
        FROM pg_prepared_xacts p
        WHERE p.database = current_database()
        UNION ALL
        SELECT 'replication', NULL::float8,
               age(s.xmin)::bigint, format('replication slot %L (%s)', s.slot_name, s.slot_type)
        FROM pg_replication_slots s
        WHERE s.xmin IS NOT NULL
    )
    SELECT k.holder, max(h.seconds), max(h.xids),
           (SELECT o.held_by FROM holders o WHERE o.holder = k.holder
            ORDER BY o.seconds DESC NULLS LAST, o.xids DESC NULLS LAST LIMIT 1),
           coalesce(pg_stat_get_dead_tuples('chronicle_outbox_events'::regclass), 0)
    FROM (VALUES ('transaction'), ('prepared_transaction'), ('replication')) k(holder)
    LEFT JOIN holders h ON h.holder = k.holder
    GROUP BY k.holder";

/// Samples the vacuum horizon and the outbox's dead rows (`SAMPLE_HORIZON`).
pub fn sample_horizon(client: &mut impl GenericClient) -> Result<Horizon, postgres::Error> {
    let mut h = Horizon::default();
    for r in client.query(SAMPLE_HORIZON, &[])? {
        let kind: &str = r.try_get(0)?;
        h.outbox_dead_rows = r.try_get(4)?;
        let Some(holder) = Holder::ALL.into_iter().find(|k| k.as_str() == kind) else { continue };
        *h.of_mut(holder) =
            HolderAge { age_seconds: r.try_get(1)?, age_transactions: r.try_get(2)?, held_by: r.try_get(3)? };
    }
    Ok(h)
}

/// Whether the horizon is held back past `WARN_AFTER_SECONDS`.
pub fn held_back(h: &Horizon) -> bool {
    h.oldest().is_some_and(|(_, s)| s > WARN_AFTER_SECONDS)
}

/// The warning for the log and `chronicle status` while the horizon is held back past
/// `WARN_AFTER_SECONDS`, naming the holder and what it costs; None otherwise.
pub fn warning(h: &Horizon) -> Option<String> {
    let (holder, seconds) = h.oldest().filter(|&(_, s)| s > WARN_AFTER_SECONDS)?;
    let age = h.of(holder);
    let what = match holder {
        Holder::Transaction => "a transaction",
        Holder::PreparedTransaction => "a prepared transaction",
        Holder::Replication => "replication",
    };
    let by = age.held_by.as_deref().map(|b| format!(": {b}")).unwrap_or_default();
    let cure = match holder {
        Holder::Transaction => "commit or end it (pg_terminate_backend)",
        Holder::PreparedTransaction => "COMMIT PREPARED or ROLLBACK PREPARED it",
        Holder::Replication => "drop the slot or reconnect its consumer",
    };
    Some(format!(
        "the vacuum horizon is held back by {what} open for {seconds:.0} s{by} (over {:.0} s): vacuum cannot remove \
         the outbox's dead rows ({} now), so the claims slow down as they pile up; {cure}",
        WARN_AFTER_SECONDS, h.outbox_dead_rows
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(holder: Holder, seconds: Option<f64>, by: &str) -> Horizon {
        let mut h = Horizon { outbox_dead_rows: 1_200_000, ..Horizon::default() };
        *h.of_mut(holder) =
            HolderAge { age_seconds: seconds, age_transactions: Some(42), held_by: Some(by.to_string()) };
        h
    }

    #[test]
    fn nothing_holding_the_horizon_warns_of_nothing() {
        let h = Horizon::default();
        assert_eq!(h.oldest(), None);
        assert!(!held_back(&h));
        assert_eq!(warning(&h), None);
    }

    #[test]
    fn a_transaction_under_the_threshold_is_not_a_warning() {
        for s in [0.0, 1.5, WARN_AFTER_SECONDS] {
            let h = held(Holder::Transaction, Some(s), "pid 1");
            assert_eq!(h.oldest(), Some((Holder::Transaction, s)));
            assert!(!held_back(&h), "{s}");
            assert_eq!(warning(&h), None, "{s}");
        }
    }

    #[test]
    fn a_transaction_past_the_threshold_is_named_with_its_age_and_the_dead_rows() {
        let h = held(Holder::Transaction, Some(312.4), "pid 4242 (user app, application psql, idle in transaction)");
        assert!(held_back(&h));
        let w = warning(&h).expect("a warning");
        assert!(w.contains("a transaction open for 312 s: pid 4242 (user app, application psql"), "{w}");
        assert!(w.contains("(1200000 now)") && w.contains("pg_terminate_backend"), "{w}");
    }

    #[test]
    fn the_oldest_holder_with_a_start_is_the_one_named() {
        let mut h = held(Holder::PreparedTransaction, Some(900.0), "prepared transaction 'x'");
        h.transaction =
            HolderAge { age_seconds: Some(400.0), age_transactions: Some(10), held_by: Some("pid 1".into()) };
        h.replication =
            HolderAge { age_seconds: None, age_transactions: Some(9_999_999), held_by: Some("slot".into()) };
        assert_eq!(h.oldest(), Some((Holder::PreparedTransaction, 900.0)));
        let w = warning(&h).expect("a warning");
        assert!(w.contains("a prepared transaction open for 900 s: prepared transaction 'x'"), "{w}");
        assert!(w.contains("ROLLBACK PREPARED"), "{w}");
    }

    #[test]
    fn a_slot_alone_has_no_age_in_seconds_so_no_warning() {
        let h = held(Holder::Replication, None, "replication slot 'old'");
        assert_eq!(h.oldest(), None);
        assert_eq!(warning(&h), None);
    }

    #[test]
    fn a_transaction_of_unknown_start_does_not_warn() {
        // Another role's transaction without pg_read_all_stats: its start is hidden.
        let h = held(Holder::Transaction, None, "pid 7");
        assert!(!held_back(&h));
    }
}
