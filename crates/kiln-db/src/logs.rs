//! Live logs (migration 0013): chunks of job and VM output and the nodes'
//! own lines, written in batches by `kiln-logs`, read by cursor (the
//! chunk id), deleted by age. See ARCHITECTURE.md, "Live logs".

use std::sync::Arc;

use kiln_core::Millis;
use tokio::sync::Notify;

use crate::{Db, DbResult};

/// Rows one INSERT statement carries (14 parameters each, well under
/// both databases' limits).
const INSERT_ROWS_MAX: usize = 500;

/// A chunk to store.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewLogChunk {
    /// '' for node lines.
    pub tenant: String,
    /// `job`, `vm` or `node`.
    pub source: String,
    pub job_id: Option<i64>,
    pub attempt: Option<i32>,
    pub vm_id: Option<String>,
    pub exec_id: Option<i64>,
    /// The node that wrote it.
    pub node: String,
    /// `stdout`, `stderr` or `log` (a node line, a marker).
    pub stream: String,
    /// Increasing per writer (a job attempt, an exec, a node).
    pub seq: i64,
    /// `error`, `warn`, `info` or `debug`.
    pub level: String,
    pub ts: Millis,
    /// The chunk's size as produced (its text may be in the blob store).
    pub bytes: i64,
    /// Empty when the text is in the blob store under `blob_key`.
    pub text: String,
    pub blob_key: Option<String>,
}

/// A stored chunk.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct LogChunk {
    pub id: i64,
    pub tenant: String,
    pub source: String,
    pub job_id: Option<i64>,
    pub attempt: Option<i32>,
    pub vm_id: Option<String>,
    pub exec_id: Option<i64>,
    pub node: String,
    pub stream: String,
    pub seq: i64,
    pub level: String,
    pub ts: i64,
    pub bytes: i64,
    pub text: String,
    pub blob_key: Option<String>,
}

/// What a reader asks for. `tenant` always applies to job and VM lines;
/// node lines are read only with `node_lines`.
#[derive(Clone, Debug, Default)]
pub struct LogQuery<'a> {
    /// `None` reads every tenant (the Loki pusher).
    pub tenant: Option<&'a str>,
    pub node_lines: bool,
    pub source: Option<&'a str>,
    pub job_id: Option<i64>,
    pub vm_id: Option<&'a str>,
    /// The lowest level wanted (`warn`: warn and error).
    pub min_level: Option<&'a str>,
    /// Text the chunk contains (chunks kept in the blob store never match).
    pub contains: Option<&'a str>,
    pub since: Option<Millis>,
    pub until: Option<Millis>,
    /// Chunks after this id.
    pub after: i64,
    pub limit: i64,
}

/// A level's rank, highest most severe; `None` for a name that is no level.
pub fn level_rank(level: &str) -> Option<i64> {
    match level {
        "error" => Some(4),
        "warn" => Some(3),
        "info" => Some(2),
        "debug" => Some(1),
        _ => None,
    }
}

const COLUMNS: &str = "id, tenant, source, job_id, attempt, vm_id, exec_id, node, stream, seq, \
    level, ts, bytes, text, blob_key";

const RANK: &str =
    "CASE level WHEN 'error' THEN 4 WHEN 'warn' THEN 3 WHEN 'info' THEN 2 ELSE 1 END";

/// PostgreSQL refuses NUL in text; output may hold any byte.
fn text(value: &str) -> String {
    if value.contains('\0') {
        value.replace('\0', "\u{FFFD}")
    } else {
        value.to_string()
    }
}

macro_rules! push_chunks {
    ($builder:expr, $rows:expr) => {
        $builder.push_values($rows, |mut b, c| {
            b.push_bind(c.tenant.clone())
                .push_bind(c.source.clone())
                .push_bind(c.job_id)
                .push_bind(c.attempt)
                .push_bind(c.vm_id.clone())
                .push_bind(c.exec_id)
                .push_bind(c.node.clone())
                .push_bind(c.stream.clone())
                .push_bind(c.seq)
                .push_bind(c.level.clone())
                .push_bind(c.ts)
                .push_bind(c.bytes)
                .push_bind(text(&c.text))
                .push_bind(c.blob_key.clone());
        })
    };
}

const INSERT: &str = "INSERT INTO log_chunks (tenant, source, job_id, attempt, vm_id, exec_id, \
    node, stream, seq, level, ts, bytes, text, blob_key) ";

impl Db {
    /// Stores chunks in one transaction, a few statements of many rows. On
    /// PostgreSQL the transaction first takes an advisory lock, so ids are
    /// given in commit order (a follower's `id > cursor` skips nothing),
    /// and NOTIFYs `kiln_logs`; the server ends it if it idles 5 s, so a
    /// writer that froze mid-way cannot hold the lock for long.
    pub async fn log_insert(&self, chunks: &[NewLogChunk]) -> DbResult<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        match self {
            Db::Sqlite(s) => {
                let mut tx = s.write.begin().await?;
                for rows in chunks.chunks(INSERT_ROWS_MAX) {
                    let mut builder = sqlx::QueryBuilder::<sqlx::Sqlite>::new(INSERT);
                    push_chunks!(builder, rows);
                    builder.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                s.logs_ready.notify_waiters();
            }
            Db::Postgres(s) => {
                let mut tx = s.pool.begin().await?;
                // A writer frozen inside this transaction (a stopped
                // process) would hold the lock, and every other writer,
                // and the event sequencer's horizon: the server ends it.
                sqlx::query("SET LOCAL idle_in_transaction_session_timeout = '5s'")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("SELECT pg_advisory_xact_lock(4244)")
                    .execute(&mut *tx)
                    .await?;
                for rows in chunks.chunks(INSERT_ROWS_MAX) {
                    let mut builder = sqlx::QueryBuilder::<sqlx::Postgres>::new(INSERT);
                    push_chunks!(builder, rows);
                    builder.build().execute(&mut *tx).await?;
                }
                sqlx::query("SELECT pg_notify('kiln_logs', '')")
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                s.logs_ready.notify_waiters();
            }
        }
        Ok(())
    }

    /// Chunks matching `q` after `q.after`, oldest first.
    pub async fn log_read(&self, q: &LogQuery<'_>) -> DbResult<Vec<LogChunk>> {
        let texts = [q.tenant, q.source, q.vm_id, q.contains];
        if texts.iter().flatten().any(|t| t.contains('\0')) {
            return Ok(Vec::new());
        }
        let min_rank = q
            .min_level
            .map(|level| level_rank(level).unwrap_or(i64::MAX));
        let contains = match self {
            Db::Sqlite(_) => "instr(text, $7) > 0",
            Db::Postgres(_) => "strpos(text, $7) > 0",
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM log_chunks WHERE id > $10 \
             AND (($1 IS NULL AND ($2 OR source <> 'node')) \
                  OR (source <> 'node' AND tenant = $1) OR ($2 AND tenant = '' AND source = 'node')) \
             AND ($3 IS NULL OR source = $3) AND ($4 IS NULL OR job_id = $4) \
             AND ($5 IS NULL OR vm_id = $5) AND ($6 IS NULL OR {RANK} >= $6) \
             AND ($7 IS NULL OR {contains}) AND ($8 IS NULL OR ts >= $8) \
             AND ($9 IS NULL OR ts < $9) ORDER BY id LIMIT $11"
        );
        Ok(crate::with_pool!(self, read, |pool| {
            sqlx::query_as::<_, LogChunk>(&sql)
                .bind(q.tenant)
                .bind(q.node_lines)
                .bind(q.source)
                .bind(q.job_id)
                .bind(q.vm_id)
                .bind(min_rank)
                .bind(q.contains)
                .bind(q.since)
                .bind(q.until)
                .bind(q.after)
                .bind(q.limit)
                .fetch_all(pool)
                .await?
        }))
    }

    /// The newest chunk id (0 for an empty store): where a follower that
    /// wants only new lines starts.
    pub async fn log_last_id(&self) -> DbResult<i64> {
        let id: Option<i64> = crate::with_pool!(self, read, |pool| {
            sqlx::query_scalar("SELECT MAX(id) FROM log_chunks")
                .fetch_one(pool)
                .await?
        });
        Ok(id.unwrap_or(0))
    }

    /// Fires after chunks were stored, here or (on PostgreSQL) anywhere.
    pub fn logs_ready(&self) -> Arc<Notify> {
        match self {
            Db::Sqlite(s) => s.logs_ready.clone(),
            Db::Postgres(s) => s.logs_ready.clone(),
        }
    }

    /// Retention: at most `batch` chunks written before `before` that no
    /// cursor still needs; returns how many went and the blob keys of
    /// those whose text is in the blob store (the caller deletes them).
    pub async fn log_delete_before(
        &self,
        before: Millis,
        batch: i64,
    ) -> DbResult<(u64, Vec<String>)> {
        let sql = "DELETE FROM log_chunks WHERE id IN (SELECT id FROM log_chunks l \
                   WHERE ts < $1 AND NOT EXISTS (SELECT 1 FROM log_cursors c WHERE c.position < l.id) \
                   ORDER BY id LIMIT $2) RETURNING blob_key";
        let keys: Vec<Option<String>> = crate::with_pool!(self, write, |pool| {
            sqlx::query_scalar(sql)
                .bind(before)
                .bind(batch)
                .fetch_all(pool)
                .await?
        });
        let deleted = keys.len() as u64;
        Ok((deleted, keys.into_iter().flatten().collect()))
    }

    /// Where the reader `name` stands in the store (0 before its first).
    pub async fn log_cursor(&self, name: &str) -> DbResult<i64> {
        let found: Option<i64> = crate::with_pool!(self, read, |pool| {
            sqlx::query_scalar("SELECT position FROM log_cursors WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?
        });
        Ok(found.unwrap_or(0))
    }

    /// Moves the reader `name` forward to `position` (never back).
    pub async fn log_cursor_put(&self, name: &str, position: i64, now: Millis) -> DbResult<()> {
        let greatest = match self {
            Db::Sqlite(_) => "max",
            Db::Postgres(_) => "GREATEST",
        };
        let sql = format!(
            "INSERT INTO log_cursors AS c (name, position, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET position = {greatest}(c.position, excluded.position), \
             updated_at = excluded.updated_at"
        );
        crate::with_pool!(self, write, |pool| {
            sqlx::query(&sql)
                .bind(name)
                .bind(position)
                .bind(now)
                .execute(pool)
                .await
                .map(drop)?
        });
        Ok(())
    }
}
