//! The audit trail as stored (migration 0018). Records are inserted
//! unchained, in the transaction of the change they record: a request's
//! through [`note`] and [`audited_tx!`], the store's own (schedule fires,
//! rule actions) directly. The chainer numbers and hashes them per tenant
//! (`kiln_core::audit`), one chainer at a time per database.

pub mod note;

use std::collections::HashMap;
use std::time::Duration;

use futures::TryStreamExt;
use kiln_core::audit::{chain_hash, AuditRecord, Break, ChainCheck, ChainedRecord, GENESIS};
use kiln_core::Millis;
use serde::Serialize;

use crate::{Db, DbResult};

/// Most records one read returns.
pub const AUDIT_PAGE_MAX: i64 = 1000;

/// Most records one chaining pass takes.
const CHAIN_BATCH: i64 = 5000;

pub(crate) const INSERT: &str =
    "INSERT INTO audit (tenant, time, actor_kind, actor, action, resource, \
     request_id, source, outcome, rationale) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

/// A record with its link (none yet: not chained), from
/// [`FROM_LINKED`].
const COLUMNS: &str = "a.id, a.tenant, a.time, a.actor_kind, a.actor, a.action, a.resource, \
     a.request_id, a.source, a.outcome, a.rationale, l.seq, l.prev_hash, l.hash";

const FROM_LINKED: &str = "audit a LEFT JOIN audit_links l ON l.id = a.id";

/// How long a record may stay invisible (its transaction still open) and
/// still be chained by the ordinary pass: the pass reads only past the
/// watermark (`audit_chainer.low`), which moves to the newest id seen a
/// grace period before. A transaction open longer is caught by the sweep.
const CHAIN_GRACE_MS: i64 = 60_000;

/// Inserts `record` on `conn` (a transaction's connection of either
/// driver): the change's own transaction where the caller has one.
macro_rules! insert_on {
    ($conn:expr, $r:expr) => {
        sqlx::query($crate::audit::INSERT)
            .bind(&$r.tenant)
            .bind($r.time)
            .bind(&$r.actor_kind)
            .bind(&$r.actor)
            .bind(&$r.action)
            .bind(&$r.resource)
            .bind(&$r.request_id)
            .bind(&$r.source)
            .bind(&$r.outcome)
            .bind(&$r.rationale)
            .execute($conn)
            .await
            .map(drop)
    };
}
pub(crate) use insert_on;

/// Runs `$body` in a transaction of `$pool` bound to `$tx` and commits
/// it. A store method that makes a request's change runs in one and calls
/// [`stamp!`] where the change is known to have happened, so the request's
/// record commits with it or not at all; without a stamp it is a plain
/// transaction. When the transaction fails, a record it claimed is given
/// back, to be written afterwards with the request's real outcome.
macro_rules! audited_in {
    ($pool:expr, |$tx:ident| $body:expr) => {{
        let claimed_before = $crate::audit::note::claimed();
        let result: $crate::DbResult<_> = async {
            #[allow(unused_mut)]
            let mut $tx = $pool.begin().await?;
            let out = $body;
            $tx.commit().await?;
            Ok(out)
        }
        .await;
        if result.is_err() && !claimed_before {
            $crate::audit::note::unclaim();
        }
        result?
    }};
}
pub(crate) use audited_in;

/// [`audited_in!`] on the store's writer, either driver's (the body is
/// compiled once per driver).
macro_rules! audited_tx {
    ($db:expr, |$tx:ident| $body:expr) => {
        match $db {
            $crate::Db::Sqlite(store) => $crate::audit::audited_in!(store.write, |$tx| $body),
            $crate::Db::Postgres(store) => $crate::audit::audited_in!(store.pool, |$tx| $body),
        }
    };
}
pub(crate) use audited_tx;

/// Inside [`audited_tx!`]: the change happened; writes the request's record
/// on `$conn` (a `&mut *tx`). `$resource` (an `Option<&str>`) names what a
/// create made when the request's path cannot.
macro_rules! stamp {
    ($conn:expr, $change:expr, $resource:expr) => {
        if let Some(record) = $crate::audit::note::claim($change, $resource) {
            $crate::audit::insert_on!($conn, record)?;
        }
    };
    ($conn:expr, $change:expr) => {
        $crate::audit::stamp!($conn, $change, None)
    };
}
pub(crate) use stamp;

pub(crate) async fn insert_pg(
    conn: &mut sqlx::PgConnection,
    record: &AuditRecord,
) -> Result<(), sqlx::Error> {
    insert_on!(conn, record)
}

pub(crate) async fn insert_sqlite(
    conn: &mut sqlx::SqliteConnection,
    record: &AuditRecord,
) -> Result<(), sqlx::Error> {
    insert_on!(conn, record)
}

/// A record as read back: chained (`seq` and `hash` set) or not yet.
#[derive(Clone, Debug, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub seq: Option<i64>,
    pub hash: Option<String>,
    #[serde(flatten)]
    pub record: AuditRecord,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    tenant: String,
    time: i64,
    actor_kind: String,
    actor: String,
    action: String,
    resource: String,
    request_id: String,
    source: String,
    outcome: String,
    rationale: Option<String>,
    seq: Option<i64>,
    prev_hash: Option<String>,
    hash: Option<String>,
}

impl Row {
    fn record(&self) -> AuditRecord {
        AuditRecord {
            time: self.time,
            tenant: self.tenant.clone(),
            actor_kind: self.actor_kind.clone(),
            actor: self.actor.clone(),
            action: self.action.clone(),
            resource: self.resource.clone(),
            request_id: self.request_id.clone(),
            source: self.source.clone(),
            outcome: self.outcome.clone(),
            rationale: self.rationale.clone(),
        }
    }
}

/// Filters of a read; every field narrows.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery<'a> {
    pub tenant: Option<&'a str>,
    pub actor: Option<&'a str>,
    /// Exact, or a prefix when it ends in `*`.
    pub action: Option<&'a str>,
    /// Exact, or a prefix when it ends in `*`.
    pub resource: Option<&'a str>,
    pub since: Option<Millis>,
    pub until: Option<Millis>,
    /// Records with a larger id (the cursor).
    pub after: i64,
    pub limit: i64,
}

/// What `kiln audit verify` found.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub tenants: u64,
    pub records: u64,
    /// Records not chained yet (the chainer is behind or down).
    pub unchained: u64,
    pub breaks: Vec<Break>,
    /// Each tenant's head, to be kept elsewhere: a trail rewritten whole
    /// from some record on verifies, but its head changes.
    pub heads: Vec<(String, i64, String)>,
}

fn like_or_exact(value: &str) -> (bool, String) {
    match value.strip_suffix('*') {
        Some(prefix) => {
            let escaped = prefix
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            (true, format!("{escaped}%"))
        }
        None => (false, value.to_string()),
    }
}

impl Db {
    /// Writes one record in a transaction of its own.
    pub async fn audit_insert(&self, record: &AuditRecord) -> DbResult<()> {
        match self {
            Db::Sqlite(s) => {
                let mut conn = s.write.acquire().await?;
                insert_sqlite(&mut conn, record).await?;
            }
            Db::Postgres(s) => {
                let mut conn = s.pool.acquire().await?;
                insert_pg(&mut conn, record).await?;
            }
        }
        Ok(())
    }

    /// Writes many records in one transaction (imports, benchmarks).
    pub async fn audit_insert_many(&self, records: &[AuditRecord]) -> DbResult<()> {
        let rows = serde_json::to_string(records).unwrap_or_else(|_| "[]".into());
        let columns = "tenant, time, actor_kind, actor, action, resource, request_id, source, \
                       outcome, rationale";
        match self {
            Db::Sqlite(s) => {
                let sql = format!(
                    "INSERT INTO audit ({columns}) SELECT value ->> 'tenant', value ->> 'time', \
                     value ->> 'actor_kind', value ->> 'actor', value ->> 'action', \
                     value ->> 'resource', value ->> 'request_id', value ->> 'source', \
                     value ->> 'outcome', value ->> 'rationale' FROM json_each($1) ORDER BY key"
                );
                sqlx::query(&sql).bind(&rows).execute(&s.write).await?;
            }
            Db::Postgres(s) => {
                let sql = format!(
                    "INSERT INTO audit ({columns}) SELECT {columns} FROM \
                     jsonb_to_recordset($1::jsonb) AS r(tenant TEXT, time BIGINT, \
                     actor_kind TEXT, actor TEXT, action TEXT, resource TEXT, request_id TEXT, \
                     source TEXT, outcome TEXT, rationale TEXT)"
                );
                sqlx::query(&sql).bind(&rows).execute(&s.pool).await?;
            }
        }
        Ok(())
    }

    /// Records matching `query`, oldest first, after the cursor.
    pub async fn audit_read(&self, query: &AuditQuery<'_>) -> DbResult<Vec<AuditEntry>> {
        let mut sql = format!("SELECT {COLUMNS} FROM {FROM_LINKED} WHERE a.id > $1");
        let mut n = 1;
        let mut binds: Vec<String> = Vec::new();
        let mut add = |sql: &mut String, column: &str, value: &str, allow_like: bool| {
            let (like, value) = if allow_like {
                like_or_exact(value)
            } else {
                (false, value.to_string())
            };
            n += 1;
            if like {
                sql.push_str(&format!(" AND a.{column} LIKE ${n} ESCAPE '\\'"));
            } else {
                sql.push_str(&format!(" AND a.{column} = ${n}"));
            }
            binds.push(value);
        };
        if let Some(tenant) = query.tenant {
            add(&mut sql, "tenant", tenant, false);
        }
        if let Some(actor) = query.actor {
            add(&mut sql, "actor", actor, false);
        }
        if let Some(action) = query.action {
            add(&mut sql, "action", action, true);
        }
        if let Some(resource) = query.resource {
            add(&mut sql, "resource", resource, true);
        }
        let mut times = Vec::new();
        if let Some(since) = query.since {
            n += 1;
            sql.push_str(&format!(" AND a.time >= ${n}"));
            times.push(since);
        }
        if let Some(until) = query.until {
            n += 1;
            sql.push_str(&format!(" AND a.time < ${n}"));
            times.push(until);
        }
        let limit = query.limit.clamp(1, AUDIT_PAGE_MAX);
        sql.push_str(&format!(" ORDER BY a.id LIMIT {limit}"));
        let rows: Vec<Row> = crate::with_pool!(self, read, |pool| {
            let mut q = sqlx::query_as(&sql).bind(query.after);
            for b in &binds {
                q = q.bind(b);
            }
            for t in &times {
                q = q.bind(*t);
            }
            q.fetch_all(pool).await?
        });
        Ok(rows
            .into_iter()
            .map(|r| AuditEntry {
                id: r.id,
                seq: r.seq,
                hash: r.hash.clone(),
                record: r.record(),
            })
            .collect())
    }

    /// Chains up to one batch of unchained records; returns how many. Only
    /// one pass runs at a time per database: a pass that finds another
    /// running does nothing.
    ///
    /// Ids are taken in insert order but may commit out of it, so the
    /// chainer keeps three marks in `audit_chainer`: `seen`, the newest id
    /// it has looked at (each pass reads only past it); `pending`, the
    /// `seen` of a grace period ago; and `low`, below which every record
    /// is chained. Once a grace period has passed, the records in
    /// `(low, pending]` still unchained (a transaction that committed late)
    /// are read once, and `low` moves to `pending`. A `sweep` reads every
    /// unchained record, for a transaction that stayed open longer still.
    pub async fn audit_chain_pass(&self, sweep: bool) -> DbResult<u64> {
        let fresh = format!(
            "SELECT {COLUMNS} FROM {FROM_LINKED} WHERE a.id > $1 AND l.id IS NULL \
             ORDER BY a.id LIMIT {CHAIN_BATCH}"
        );
        let late = format!(
            "SELECT {COLUMNS} FROM {FROM_LINKED} WHERE a.id > $1 AND a.id <= $2 \
             AND l.id IS NULL ORDER BY a.id LIMIT {CHAIN_BATCH}"
        );
        let now = note_now();
        macro_rules! pass {
            ($tx:ident, $link:expr, $upsert:expr) => {{
                let (low, seen, pending, pending_at): (i64, i64, i64, i64) = sqlx::query_as(
                    "SELECT low, seen, pending, pending_at FROM audit_chainer",
                )
                .fetch_one(&mut *$tx)
                .await?;
                let settle = pending_at <= now - CHAIN_GRACE_MS;
                let mut rows: Vec<Row> = if sweep || settle {
                    sqlx::query_as(&late)
                        .bind(if sweep { 0 } else { low })
                        .bind(if sweep { seen } else { pending })
                        .fetch_all(&mut *$tx)
                        .await?
                } else {
                    Vec::new()
                };
                let late_full = rows.len() as i64 >= CHAIN_BATCH;
                let news: Vec<Row> = sqlx::query_as(&fresh)
                    .bind(seen)
                    .fetch_all(&mut *$tx)
                    .await?;
                let news_full = news.len() as i64 >= CHAIN_BATCH;
                let newest = news.last().map(|r| r.id);
                rows.extend(news);
                let mut heads: HashMap<String, (i64, String)> = HashMap::new();
                let mut links = Vec::with_capacity(rows.len());
                for row in &rows {
                    if !heads.contains_key(&row.tenant) {
                        let head: Option<(i64, String)> =
                            sqlx::query_as("SELECT seq, hash FROM audit_heads WHERE tenant = $1")
                                .bind(&row.tenant)
                                .fetch_optional(&mut *$tx)
                                .await?;
                        heads.insert(
                            row.tenant.clone(),
                            head.unwrap_or_else(|| (0, GENESIS.to_string())),
                        );
                    }
                    let head = heads.get_mut(&row.tenant).expect("just inserted");
                    let seq = head.0 + 1;
                    let hash = chain_hash(&head.1, seq, &row.record());
                    links.push(serde_json::json!({
                        "id": row.id, "tenant": row.tenant, "seq": seq, "prev": head.1,
                        "hash": hash,
                    }));
                    *head = (seq, hash);
                }
                if !rows.is_empty() {
                    let heads: Vec<_> = heads
                        .into_iter()
                        .map(|(tenant, (seq, hash))| {
                            serde_json::json!({"tenant": tenant, "seq": seq, "hash": hash})
                        })
                        .collect();
                    sqlx::query($link)
                        .bind(serde_json::Value::Array(links).to_string())
                        .execute(&mut *$tx)
                        .await?;
                    sqlx::query($upsert)
                        .bind(serde_json::Value::Array(heads).to_string())
                        .execute(&mut *$tx)
                        .await?;
                }
                // Everything visible up to the newest id has been looked at,
                // unless the batch stopped short.
                let seen_now: i64 = if news_full {
                    newest.unwrap_or(seen)
                } else {
                    sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM audit")
                        .fetch_one(&mut *$tx)
                        .await?
                };
                let seen_now = seen_now.max(seen);
                let moves = pending > low || seen_now > pending;
                let marks = if settle && !sweep && !late_full && moves {
                    (pending.max(low), seen_now, seen_now, now)
                } else {
                    (low, seen_now, pending, pending_at)
                };
                // Only a change is written: an idle pass takes no write lock
                // (on SQLite one writer at a time, `kiln audit verify` beside
                // a running server included).
                if marks != (low, seen, pending, pending_at) {
                    sqlx::query(
                        "UPDATE audit_chainer SET low = $1, seen = $2, pending = $3, pending_at = $4",
                    )
                    .bind(marks.0)
                    .bind(marks.1)
                    .bind(marks.2)
                    .bind(marks.3)
                    .execute(&mut *$tx)
                    .await?;
                }
                rows.len() as u64
            }};
        }
        let chained = match self {
            Db::Sqlite(s) => {
                let mut tx = s.write.begin().await?;
                let n = pass!(
                    tx,
                    "INSERT INTO audit_links (id, tenant, seq, prev_hash, hash) \
                     SELECT value ->> 'id', value ->> 'tenant', value ->> 'seq', \
                     value ->> 'prev', value ->> 'hash' FROM json_each($1)",
                    "INSERT INTO audit_heads (tenant, seq, hash) \
                     SELECT value ->> 'tenant', value ->> 'seq', value ->> 'hash' \
                     FROM json_each($1) WHERE true \
                     ON CONFLICT (tenant) DO UPDATE SET seq = excluded.seq, hash = excluded.hash"
                );
                tx.commit().await?;
                n
            }
            Db::Postgres(s) => {
                let mut tx = s.pool.begin().await?;
                let mine: bool = sqlx::query_scalar(
                    "SELECT pg_try_advisory_xact_lock(4244, hashtext(current_schema()))",
                )
                .fetch_one(&mut *tx)
                .await?;
                if !mine {
                    return Ok(0);
                }
                let n = pass!(
                    tx,
                    "INSERT INTO audit_links (id, tenant, seq, prev_hash, hash) \
                     SELECT id, tenant, seq, prev, hash FROM jsonb_to_recordset($1::jsonb) \
                     AS u(id BIGINT, tenant TEXT, seq BIGINT, prev TEXT, hash TEXT)",
                    "INSERT INTO audit_heads (tenant, seq, hash) \
                     SELECT tenant, seq, hash FROM jsonb_to_recordset($1::jsonb) \
                     AS h(tenant TEXT, seq BIGINT, hash TEXT) \
                     ON CONFLICT (tenant) DO UPDATE SET seq = excluded.seq, hash = excluded.hash"
                );
                tx.commit().await?;
                n
            }
        };
        Ok(chained)
    }

    /// Checks every chain (or one tenant's) from its first record to its
    /// head, reading the records as a stream.
    pub async fn audit_verify(&self, tenant: Option<&str>) -> DbResult<VerifyReport> {
        let mut report = VerifyReport::default();
        let heads: Vec<(String, i64, String)> = crate::with_pool!(self, read, |pool| {
            let sql = "SELECT tenant, seq, hash FROM audit_heads \
                       WHERE (CAST($1 AS TEXT) IS NULL OR tenant = $1) ORDER BY tenant";
            sqlx::query_as(sql).bind(tenant).fetch_all(pool).await?
        });
        let mut heads_by: HashMap<String, (i64, String)> = heads
            .iter()
            .map(|(t, s, h)| (t.clone(), (*s, h.clone())))
            .collect();
        report.heads = heads;
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_links l JOIN audit a ON a.id = l.id \
             WHERE (CAST($1 AS TEXT) IS NULL OR l.tenant = $1) ORDER BY l.tenant, l.seq"
        );
        let mut finish = |check: ChainCheck, report: &mut VerifyReport| {
            let head = heads_by.remove(&check_tenant(&check));
            let done = check.finish(head.as_ref().map(|(s, h)| (*s, h.as_str())));
            report.tenants += 1;
            report.records += done.checked;
            report.breaks.extend(done.breaks);
        };
        crate::with_pool!(self, read, |pool| {
            let mut rows = sqlx::query_as::<_, Row>(&sql).bind(tenant).fetch(pool);
            let mut current: Option<ChainCheck> = None;
            while let Some(row) = rows.try_next().await? {
                if current.as_ref().map(check_tenant).as_deref() != Some(row.tenant.as_str()) {
                    if let Some(done) = current.take() {
                        finish(done, &mut report);
                    }
                    current = Some(ChainCheck::new(&row.tenant));
                }
                let record = row.record();
                let chained = ChainedRecord {
                    id: row.id,
                    seq: row.seq.unwrap_or_default(),
                    prev_hash: row.prev_hash.unwrap_or_default(),
                    hash: row.hash.unwrap_or_default(),
                    record,
                };
                current.as_mut().expect("set above").feed(&chained);
            }
            if let Some(done) = current.take() {
                finish(done, &mut report);
            }
        });
        // Heads whose tenant has no chained record left.
        let mut orphans: Vec<_> = heads_by.into_iter().collect();
        orphans.sort();
        for (tenant, (seq, _)) in orphans {
            report.tenants += 1;
            report.breaks.push(Break {
                tenant,
                seq,
                id: None,
                problem: format!("the head is at record {seq} but the chain is empty (deleted)"),
            });
        }
        report.unchained = crate::with_pool!(self, read, |pool| {
            let sql =
                "SELECT COUNT(*) FROM audit a WHERE (CAST($1 AS TEXT) IS NULL OR a.tenant = $1) \
                       AND NOT EXISTS (SELECT 1 FROM audit_links l WHERE l.id = a.id)";
            sqlx::query_scalar::<_, i64>(sql)
                .bind(tenant)
                .fetch_one(pool)
                .await?
        }) as u64;
        Ok(report)
    }

    /// Retention is not the audit trail's: records stay until an operator
    /// exports and removes them. The count, for `/metrics` and tests.
    pub async fn audit_count(&self, tenant: &str) -> DbResult<i64> {
        Ok(crate::with_pool!(self, read, |pool| sqlx::query_scalar(
            "SELECT COUNT(*) FROM audit WHERE tenant = $1"
        )
        .bind(tenant)
        .fetch_one(pool)
        .await?))
    }
}

fn note_now() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn check_tenant(check: &ChainCheck) -> String {
    check.tenant().to_string()
}

/// Keeps chaining, every `every` and whenever a pass found a full batch,
/// until the pool closes. Every process that writes records may run one:
/// only one pass runs at a time.
pub async fn chain_loop(db: Db, every: Duration) {
    const SWEEP_EVERY: Duration = Duration::from_secs(300);
    let mut last_sweep = std::time::Instant::now();
    loop {
        let sweep = last_sweep.elapsed() >= SWEEP_EVERY;
        if sweep {
            last_sweep = std::time::Instant::now();
        }
        match db.audit_chain_pass(sweep).await {
            Ok(n) if n as i64 >= CHAIN_BATCH => continue,
            Ok(_) => {}
            Err(error) => {
                if db.is_closed() {
                    return;
                }
                tracing::warn!(%error, "chaining audit records failed; retrying");
            }
        }
        if db.is_closed() {
            return;
        }
        tokio::time::sleep(every).await;
    }
}
