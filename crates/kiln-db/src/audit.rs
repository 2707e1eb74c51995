//! The audit trail as stored (migration 0018). Records are inserted
//! unchained, in the transaction of the change where the change is the
//! store's own (schedule fires, rule actions) and right after it otherwise;
//! the chainer numbers and hashes them per tenant (`kiln_core::audit`), one
//! chainer at a time per database.

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

const COLUMNS: &str = "id, tenant, time, actor_kind, actor, action, resource, request_id, \
     source, outcome, rationale, seq, prev_hash, hash";

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
        let mut sql = format!("SELECT {COLUMNS} FROM audit WHERE id > $1");
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
                sql.push_str(&format!(" AND {column} LIKE ${n} ESCAPE '\\'"));
            } else {
                sql.push_str(&format!(" AND {column} = ${n}"));
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
            sql.push_str(&format!(" AND time >= ${n}"));
            times.push(since);
        }
        if let Some(until) = query.until {
            n += 1;
            sql.push_str(&format!(" AND time < ${n}"));
            times.push(until);
        }
        let limit = query.limit.clamp(1, AUDIT_PAGE_MAX);
        sql.push_str(&format!(" ORDER BY id LIMIT {limit}"));
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
    pub async fn audit_chain_pass(&self) -> DbResult<u64> {
        let select = format!(
            "SELECT {COLUMNS} FROM audit WHERE seq IS NULL ORDER BY id LIMIT {CHAIN_BATCH}"
        );
        macro_rules! pass {
            ($tx:ident, $update:expr, $upsert:expr) => {{
                let rows: Vec<Row> = sqlx::query_as(&select).fetch_all(&mut *$tx).await?;
                if rows.is_empty() {
                    return Ok(0);
                }
                let mut heads: HashMap<String, (i64, String)> = HashMap::new();
                let mut updates = Vec::with_capacity(rows.len());
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
                    updates.push(serde_json::json!({
                        "id": row.id, "seq": seq, "prev": head.1, "hash": hash,
                    }));
                    *head = (seq, hash);
                }
                let heads: Vec<_> = heads
                    .into_iter()
                    .map(|(tenant, (seq, hash))| {
                        serde_json::json!({"tenant": tenant, "seq": seq, "hash": hash})
                    })
                    .collect();
                sqlx::query($update)
                    .bind(serde_json::Value::Array(updates).to_string())
                    .execute(&mut *$tx)
                    .await?;
                sqlx::query($upsert)
                    .bind(serde_json::Value::Array(heads).to_string())
                    .execute(&mut *$tx)
                    .await?;
                rows.len() as u64
            }};
        }
        let chained = match self {
            Db::Sqlite(s) => {
                let mut tx = s.write.begin().await?;
                let n = pass!(
                    tx,
                    "UPDATE audit SET seq = u.seq, prev_hash = u.prev, hash = u.hash FROM ( \
                     SELECT value ->> 'id' AS id, value ->> 'seq' AS seq, \
                     value ->> 'prev' AS prev, value ->> 'hash' AS hash FROM json_each($1)) u \
                     WHERE audit.id = u.id",
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
                    "UPDATE audit a SET seq = u.seq, prev_hash = u.prev, hash = u.hash \
                     FROM jsonb_to_recordset($1::jsonb) AS u(id BIGINT, seq BIGINT, prev TEXT, \
                     hash TEXT) WHERE a.id = u.id",
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
            "SELECT {COLUMNS} FROM audit WHERE seq IS NOT NULL AND (CAST($1 AS TEXT) IS NULL OR tenant = $1) \
             ORDER BY tenant, seq"
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
            let sql = "SELECT COUNT(*) FROM audit WHERE seq IS NULL AND (CAST($1 AS TEXT) IS NULL OR tenant = $1)";
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

fn check_tenant(check: &ChainCheck) -> String {
    check.tenant().to_string()
}

/// Keeps chaining, every `every` and whenever a pass found a full batch,
/// until the pool closes. Every process that writes records may run one:
/// only one pass runs at a time.
pub async fn chain_loop(db: Db, every: Duration) {
    loop {
        match db.audit_chain_pass().await {
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
