//! The SQLite driver: the embedded default. One write connection serialises
//! writers inside the process (SQLite allows one writer anyway, and a single
//! connection never meets SQLITE_BUSY on a read-to-write upgrade); reads go
//! through a small pool of their own, concurrent thanks to WAL.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{Job, LeasedJob, Millis, NewJob, Priority};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use tokio::sync::Notify;

use crate::audit::note::Change;
use crate::lease::{self, Candidate, LeaseRequest};
use crate::rows::{
    record_json, result_json, rows_to, storable_error, EncodedJob, JobRow, KeyRow, LeasedRow,
    ModuleRow, QueueRow, WorkerRow, JOB_COLUMNS, LEASED_COLUMNS, QUEUE_COLUMNS,
};
use crate::{
    ApiKey, CancelOutcome, Completion, DbResult, JobFilter, ModuleInfo, QueueDepths, QueueInfo,
    RetryOutcome, WorkerInfo,
};

#[derive(Clone)]
pub struct SqliteStore {
    pub(crate) write: SqlitePool,
    pub(crate) read: SqlitePool,
    pub(crate) wakeup: Arc<Notify>,
    pub(crate) waiters: Arc<crate::Waiters>,
    pub(crate) flow_wakeup: Arc<Notify>,
    pub(crate) defs: Arc<crate::flow::DefCache>,
    /// Fires after a write that may have appended events.
    pub(crate) events_ready: Arc<Notify>,
    /// Fires after log chunks were stored.
    pub(crate) logs_ready: Arc<Notify>,
    /// The connection that checkpoints the WAL off the writer's path.
    checkpoint: SqlitePool,
    checkpoint_kick: Arc<Notify>,
}

/// How long writes gather in the WAL before the background checkpoint.
const CHECKPOINT_GAP: Duration = Duration::from_millis(10);

/// Copies committed WAL frames into the database file after writes, on a
/// connection of its own (`PRAGMA wal_checkpoint(PASSIVE)`: it waits for
/// no reader or writer). SQLite would otherwise checkpoint inside a commit
/// once the WAL reaches `wal_autocheckpoint` pages, on the writer's path:
/// a pipeline's chained step paid 60-80 us for it. The writer keeps that
/// threshold, raised, for when this falls behind.
async fn checkpoint_loop(pool: SqlitePool, kick: Arc<Notify>) {
    loop {
        let notified = kick.notified();
        tokio::select! {
            _ = notified => {}
            // The store was dropped without `close`: nothing kicks any more.
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                if Arc::strong_count(&kick) == 1 {
                    pool.close().await;
                    return;
                }
                continue;
            }
        }
        if pool.is_closed() {
            return;
        }
        tokio::time::sleep(CHECKPOINT_GAP).await;
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            if pool.is_closed() {
                return;
            }
            tracing::debug!(%error, "background checkpoint failed; the writer's own takes over");
        }
    }
}

/// One writer connection serialises every write, so `held` read here cannot
/// race a change of the queue's settings.
const INSERT_JOB: &str = "INSERT INTO jobs (tenant, kind, queue, priority, status, spec, labels, \
    max_attempts, timeout_ms, backoff, permanent_exit_codes, idempotency_key, run_at, created_at, \
    held) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, EXISTS (SELECT 1 \
    FROM queues q WHERE q.tenant = ?1 AND q.name = ?3 AND (q.paused OR q.concurrency_limit IS NOT NULL)))";

/// PostgreSQL-numbered SQL shared with that driver (`$1`), for SQLite (`?1`).
fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

fn bind_new<'q>(
    query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    e: &'q EncodedJob<'q>,
    now: Millis,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    query
        .bind(&e.job.tenant)
        .bind(&e.job.kind)
        .bind(&e.job.queue)
        .bind(e.job.priority.rank())
        .bind(e.status)
        .bind(&e.spec)
        .bind(&e.labels)
        .bind(e.job.max_attempts)
        .bind(e.job.timeout_ms)
        .bind(&e.backoff)
        .bind(&e.permanent_exit_codes)
        .bind(&e.job.idempotency_key)
        .bind(e.run_at)
        .bind(now)
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".into())
}

impl SqliteStore {
    pub async fn open(path: &str) -> DbResult<SqliteStore> {
        if let Some(parent) = Path::new(path).parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(sqlx::Error::Io)?;
            }
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL survives a crash of kiln; only an OS crash or power
            // loss can lose the last commits.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-65536")
            .pragma("temp_store", "memory")
            // 16 MiB of WAL before a commit checkpoints by itself; the
            // background checkpoint normally runs long before that.
            .pragma("wal_autocheckpoint", "4000");
        let checkpoint_kick = Arc::new(Notify::new());
        // No ping before each acquire (sqlx's default) in any of the pools:
        // an in-process connection cannot drop, and each ping is a trip to
        // its thread.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .after_release({
                let kick = checkpoint_kick.clone();
                move |_, _| {
                    kick.notify_one();
                    Box::pin(async { Ok(true) })
                }
            })
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.clone().read_only(true))
            .await?;
        let checkpoint = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        tokio::spawn(checkpoint_loop(checkpoint.clone(), checkpoint_kick.clone()));
        Ok(SqliteStore {
            write,
            read,
            wakeup: Arc::new(Notify::new()),
            waiters: Arc::default(),
            flow_wakeup: Arc::new(Notify::new()),
            events_ready: Arc::new(Notify::new()),
            logs_ready: Arc::new(Notify::new()),
            defs: Arc::default(),
            checkpoint,
            checkpoint_kick,
        })
    }

    #[cfg(feature = "testing")]
    pub(crate) async fn execute_raw(&self, sql: &str) -> DbResult<()> {
        sqlx::raw_sql(sql).execute(&self.write).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.checkpoint.close().await;
        self.checkpoint_kick.notify_one();
        self.read.close().await;
        self.write.close().await;
    }

    async fn job_by_id(
        &self,
        tenant: Option<&str>,
        id: i64,
        pool: &SqlitePool,
    ) -> DbResult<Option<Job>> {
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ? AND (? IS NULL OR tenant = ?)"
        ))
        .bind(id)
        .bind(tenant)
        .bind(tenant)
        .fetch_optional(pool)
        .await?;
        row.map(Job::try_from).transpose()
    }

    pub async fn job_insert(
        &self,
        job: &NewJob,
        now: Millis,
        audit: Option<&kiln_core::audit::AuditRecord>,
    ) -> DbResult<(Job, bool)> {
        // In a task of its own: a caller that goes away mid-way (a client
        // that disconnects) must not stop the writer between BEGIN and
        // COMMIT, which would leave the connection inside a transaction.
        let write = self.write.clone();
        let (job, audit) = (job.clone(), audit.cloned());
        tokio::spawn(async move { insert_job(&write, &job, now, audit.as_ref()).await })
            .await
            .map_err(|e| crate::DbError::Corrupt(format!("the job insert stopped: {e}")))?
    }

    pub async fn job_insert_many(&self, jobs: &[NewJob], now: Millis) -> DbResult<Vec<i64>> {
        let encoded: Vec<EncodedJob> = jobs.iter().map(|j| EncodedJob::new(j, now)).collect();
        let sql = format!("{INSERT_JOB} RETURNING id");
        let mut tx = self.write.begin().await?;
        let mut ids = Vec::with_capacity(jobs.len());
        for e in &encoded {
            let id: i64 = bind_new(sqlx::query(&sql), e, now)
                .try_map(|row: sqlx::sqlite::SqliteRow| sqlx::Row::try_get(&row, 0))
                .fetch_one(&mut *tx)
                .await?;
            ids.push(id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    pub async fn job_get(&self, tenant: Option<&str>, id: i64) -> DbResult<Option<Job>> {
        self.job_by_id(tenant, id, &self.read).await
    }

    pub async fn job_list(&self, tenant: &str, f: &JobFilter) -> DbResult<Vec<Job>> {
        let (label_key, label_value) = match &f.label {
            Some((k, v)) => (Some(format!("$.\"{k}\"")), Some(v.as_str())),
            None => (None, None),
        };
        let rows: Vec<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = ? \
             AND (? IS NULL OR status = ?) AND (? IS NULL OR kind = ?) AND (? IS NULL OR queue = ?) \
             AND (? IS NULL OR json_extract(labels, ?) = ?) \
             AND (? IS NULL OR created_at >= ?) AND (? IS NULL OR created_at < ?) \
             AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?"
        ))
        .bind(tenant)
        .bind(f.status.map(|s| s.as_str()))
        .bind(f.status.map(|s| s.as_str()))
        .bind(&f.kind)
        .bind(&f.kind)
        .bind(&f.queue)
        .bind(&f.queue)
        .bind(&label_key)
        .bind(&label_key)
        .bind(label_value)
        .bind(f.created_after)
        .bind(f.created_after)
        .bind(f.created_before)
        .bind(f.created_before)
        .bind(f.before_id)
        .bind(f.before_id)
        .bind(f.limit)
        .fetch_all(&self.read)
        .await?;
        rows_to(rows)
    }

    pub async fn job_count_by_status(
        &self,
        tenant: Option<&str>,
    ) -> DbResult<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, COUNT(*) FROM jobs WHERE (? IS NULL OR tenant = ?) GROUP BY status",
        )
        .bind(tenant)
        .bind(tenant)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().collect())
    }

    pub async fn job_attempts_total(&self) -> DbResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(SUM(attempt), 0) FROM jobs")
                .fetch_one(&self.read)
                .await?,
        )
    }

    pub async fn job_count_unfinished(&self) -> DbResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM jobs WHERE status IN ('queued','scheduled')) \
             + (SELECT COUNT(*) FROM jobs WHERE status = 'running')",
        )
        .fetch_one(&self.read)
        .await?)
    }

    pub async fn job_last_finished_at(&self) -> DbResult<Option<Millis>> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT MAX(finished_at) FROM jobs WHERE {}",
            crate::rows::FINISHED
        ))
        .fetch_one(&self.read)
        .await?)
    }

    pub async fn job_delete_finished(&self, before: Millis, batch: i64) -> DbResult<u64> {
        let done = sqlx::query(&format!(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {} AND finished_at < ?1 \
             ORDER BY finished_at LIMIT ?2)",
            crate::rows::FINISHED
        ))
        .bind(before)
        .bind(batch)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn worker_delete_stale(&self, before: Millis) -> DbResult<u64> {
        let done = sqlx::query("DELETE FROM workers WHERE last_seen < ?")
            .bind(before)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }

    pub async fn tenant_running(&self) -> DbResult<std::collections::BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT tenant, n FROM tenant_running WHERE n <> 0 ORDER BY tenant")
                .fetch_all(&self.read)
                .await?;
        Ok(rows.into_iter().collect())
    }

    pub async fn job_lease(&self, request: &LeaseRequest<'_>) -> DbResult<Vec<LeasedJob>> {
        let mut tx = self.write.begin().await?;
        let rooms = match request.quota_floor() {
            Some(floor) => lease::rooms(
                request.tenant_running_max,
                sqlx::query_as("SELECT tenant, n FROM tenant_running WHERE n > ?")
                    .bind(floor)
                    .fetch_all(&mut *tx)
                    .await?,
            ),
            None => Default::default(),
        };
        let full = json_list(&lease::full_tenants(&rooms));
        // Running jobs are counted through `jobs_running` only (named, as
        // SQLite's planner would rather walk a tenant's whole history in
        // `jobs_tenant_id` to save a sort). One arm per kind, each walking
        // the fetch index in order and
        // stopping at the limit: SQLite would otherwise collect and sort
        // every waiting job of the listed kinds.
        let arm = "SELECT * FROM (SELECT j.id, j.tenant, j.priority, j.run_at FROM jobs j \
             WHERE j.kind = ?{k} AND j.status IN ('queued','scheduled') AND NOT held \
             AND j.run_at <= ?1 AND j.tenant NOT IN (SELECT value FROM json_each(?2)) \
             AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.tenant = j.tenant AND q.name = j.queue \
               AND (q.paused OR q.concurrency_limit IS NOT NULL)) \
             ORDER BY j.priority, j.run_at, j.id LIMIT ?3)";
        let sql = (0..request.kinds.len())
            .map(|i| arm.replace("{k}", &(i + 4).to_string()))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let mut query = sqlx::query_as::<_, Candidate>(&sql)
            .bind(request.now)
            .bind(&full)
            .bind(request.limit);
        for kind in request.kinds {
            query = query.bind(kind);
        }
        let mut candidates = query.fetch_all(&mut *tx).await?;
        let limited: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT q.tenant, q.name, q.concurrency_limit, (SELECT COUNT(*) FROM jobs r \
               INDEXED BY jobs_running \
               WHERE r.tenant = q.tenant AND r.queue = q.name AND r.status = 'running') \
             FROM queues q WHERE NOT q.paused AND q.concurrency_limit IS NOT NULL \
             AND q.tenant NOT IN (SELECT value FROM json_each(?2)) \
             AND EXISTS (SELECT 1 FROM jobs w WHERE w.tenant = q.tenant AND w.queue = q.name \
               AND w.status IN ('queued','scheduled') AND w.run_at <= ?1)",
        )
        .bind(request.now)
        .bind(&full)
        .fetch_all(&mut *tx)
        .await?;
        let kinds_json = json_list(request.kinds);
        for (tenant, name, cap, running) in limited {
            let take = (cap - running).min(request.limit);
            if take <= 0 {
                continue;
            }
            let more: Vec<Candidate> = sqlx::query_as(
                "SELECT id, tenant, priority, run_at FROM jobs WHERE tenant = ?1 AND queue = ?2 \
                 AND status IN ('queued','scheduled') AND run_at <= ?3 \
                 AND kind IN (SELECT value FROM json_each(?4)) \
                 ORDER BY priority, run_at, id LIMIT ?5",
            )
            .bind(&tenant)
            .bind(&name)
            .bind(request.now)
            .bind(&kinds_json)
            .bind(take)
            .fetch_all(&mut *tx)
            .await?;
            candidates.extend(more);
        }
        let chosen = lease::choose(candidates, request.limit, &rooms);
        if chosen.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let rows: Vec<LeasedRow> = sqlx::query_as(&numbered(&format!(
            "UPDATE jobs SET {} WHERE id IN (SELECT value FROM json_each($4)) \
             AND status IN ('queued','scheduled') RETURNING {LEASED_COLUMNS}",
            lease::LEASE_SET
        )))
        .bind(request.worker_id)
        .bind(request.now)
        .bind(request.lease_until())
        .bind(serde_json::to_string(&chosen).unwrap_or_else(|_| "[]".into()))
        .fetch_all(&mut *tx)
        .await?;
        let (jobs, unreadable) = lease::decode(rows);
        for (id, error) in unreadable {
            sqlx::query(&numbered(lease::FAIL_UNREADABLE))
                .bind(request.now)
                .bind(error)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(jobs)
    }

    pub async fn job_next_run_at(&self, kinds: &[String]) -> DbResult<Option<Millis>> {
        // One index probe per (kind, priority): MIN(run_at) over a whole
        // kind is not an index prefix.
        let arm = "SELECT MIN(run_at) AS at FROM jobs WHERE kind = ?{k} AND priority = {p} \
             AND status IN ('queued','scheduled') AND NOT held";
        let arms: Vec<String> = (0..kinds.len())
            .flat_map(|i| {
                kiln_core::Priority::ALL.map(|p| {
                    arm.replace("{k}", &(i + 1).to_string())
                        .replace("{p}", &p.rank().to_string())
                })
            })
            .collect();
        let sql = format!("SELECT MIN(at) FROM ({})", arms.join(" UNION ALL "));
        let mut query = sqlx::query_scalar(&sql);
        for kind in kinds {
            query = query.bind(kind);
        }
        Ok(query.fetch_one(&self.read).await?)
    }

    pub async fn job_heartbeat(
        &self,
        worker_id: &str,
        held: &[(i64, i32)],
        lease_until: Millis,
    ) -> DbResult<Vec<(i64, bool)>> {
        let mut tx = self.write.begin().await?;
        let mut alive = Vec::with_capacity(held.len());
        for (id, attempt) in held {
            let row: Option<(i64, bool)> = sqlx::query_as(
                "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND attempt = ? \
                 AND status = 'running' AND worker_id = ? RETURNING id, cancel_requested",
            )
            .bind(lease_until)
            .bind(id)
            .bind(attempt)
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await?;
            alive.extend(row);
        }
        tx.commit().await?;
        Ok(alive)
    }

    pub async fn job_complete_many(&self, done: &[Completion]) -> DbResult<Vec<i64>> {
        let mut tx = self.write.begin().await?;
        let applied = complete_on(&mut tx, done).await?;
        tx.commit().await?;
        Ok(applied)
    }

    pub async fn job_cancel(&self, tenant: &str, id: i64, now: Millis) -> DbResult<CancelOutcome> {
        // One statement decides by the status it finds; the writer
        // connection serialises it with every completion.
        let row: Option<JobRow> = crate::audit::audited_in!(self.write, |tx| {
            let row: Option<JobRow> = sqlx::query_as(&numbered(&format!(
                "UPDATE jobs SET {} WHERE tenant = $2 AND id = $3 \
                 AND status IN ('queued','scheduled','running') RETURNING {JOB_COLUMNS}",
                crate::rows::CANCEL_SET
            )))
            .bind(now)
            .bind(tenant)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if row.is_some() {
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            row
        });
        if let Some(row) = row {
            return crate::rows::cancel_outcome(row.try_into()?);
        }
        Ok(match self.job_by_id(Some(tenant), id, &self.write).await? {
            Some(job) => CancelOutcome::AlreadyFinished(job),
            None => CancelOutcome::NotFound,
        })
    }

    pub async fn job_retry(&self, tenant: &str, id: i64, now: Millis) -> DbResult<RetryOutcome> {
        let sql = format!(
            "UPDATE jobs SET status = 'queued', run_at = ?, retry_from = attempt, \
             cancel_requested = FALSE, finished_at = NULL, error = NULL, result = NULL, \
             held = EXISTS (SELECT 1 FROM queues q WHERE q.tenant = jobs.tenant AND q.name = jobs.queue \
               AND (q.paused OR q.concurrency_limit IS NOT NULL)) \
             WHERE tenant = ? AND id = ? AND status IN ('failed','dead','cancelled') RETURNING {JOB_COLUMNS}"
        );
        let row: Option<JobRow> = crate::audit::audited_in!(self.write, |tx| {
            let row: Option<JobRow> = sqlx::query_as(&sql)
                .bind(now)
                .bind(tenant)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            if row.is_some() {
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            row
        });
        if let Some(row) = row {
            return Ok(RetryOutcome::Requeued(row.try_into()?));
        }
        Ok(match self.job_by_id(Some(tenant), id, &self.write).await? {
            Some(job) => RetryOutcome::NotRetryable(job),
            None => RetryOutcome::NotFound,
        })
    }

    pub async fn job_rescue_expired(&self, now: Millis) -> DbResult<u64> {
        let lost = lease::LOST_STATUS;
        let done = sqlx::query(&format!(
            "UPDATE jobs SET status = {lost}, \
               finished_at = CASE WHEN {lost} = 'queued' THEN NULL ELSE ?1 END, \
               run_at = ?1, error = 'lease expired: worker lost', lease_expires_at = NULL, \
               history = json_insert(history, '$[#]', json_object('attempt', attempt, \
                 'worker_id', worker_id, 'started_at', started_at, 'finished_at', ?1, \
                 'outcome', 'lost', 'exit_code', NULL, 'error', 'lease expired', 'duration_ms', NULL)) \
             WHERE status = 'running' AND lease_expires_at < ?1",
        ))
        .bind(now)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn job_release(
        &self,
        worker_id: &str,
        held: &[(i64, i32)],
        now: Millis,
    ) -> DbResult<u64> {
        let mut tx = self.write.begin().await?;
        let mut n = 0;
        for (id, attempt) in held {
            // The attempt number stays (fencing must never go backwards);
            // retry_from moves so the hand-back costs no attempt.
            n += sqlx::query(
                "UPDATE jobs SET status = 'queued', run_at = ?, lease_expires_at = NULL, \
                 retry_from = retry_from + 1 \
                 WHERE id = ? AND attempt = ? AND status = 'running' AND worker_id = ?",
            )
            .bind(now)
            .bind(id)
            .bind(attempt)
            .bind(worker_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    pub async fn queue_list(&self, tenant: Option<&str>) -> DbResult<Vec<QueueInfo>> {
        let rows: Vec<QueueRow> = sqlx::query_as(&format!(
            "SELECT {QUEUE_COLUMNS} FROM queues WHERE (?1 IS NULL OR tenant = ?1) ORDER BY tenant, name"
        ))
        .bind(tenant)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(QueueInfo::from).collect())
    }

    pub async fn queue_upsert(&self, q: &QueueInfo, now: Millis) -> DbResult<QueueInfo> {
        let info = crate::audit::audited_in!(self.write, |tx| {
            let row: QueueRow = sqlx::query_as(&format!(
                "INSERT INTO queues (tenant, name, paused, concurrency_limit, updated_at) \
             VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (tenant, name) DO UPDATE SET paused = excluded.paused, \
             concurrency_limit = excluded.concurrency_limit, updated_at = excluded.updated_at \
             RETURNING {QUEUE_COLUMNS}"
            ))
            .bind(&q.tenant)
            .bind(&q.name)
            .bind(q.paused)
            .bind(q.concurrency_limit)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let info = QueueInfo::from(row);
            sqlx::query(
                "UPDATE jobs SET held = ?3 WHERE tenant = ?1 AND queue = ?2 \
             AND status IN ('queued','scheduled','running') AND held <> ?3",
            )
            .bind(&info.tenant)
            .bind(&info.name)
            .bind(info.is_held())
            .execute(&mut *tx)
            .await?;
            crate::audit::stamp!(&mut *tx, Change::Changed);
            info
        });
        Ok(info)
    }

    pub async fn queue_depths(&self, tenant: Option<&str>) -> DbResult<QueueDepths> {
        let rows: Vec<(String, i16, i64)> = sqlx::query_as(
            "SELECT queue, priority, COUNT(*) FROM jobs WHERE status IN ('queued','scheduled') \
             AND (? IS NULL OR tenant = ?) GROUP BY queue, priority ORDER BY queue, priority",
        )
        .bind(tenant)
        .bind(tenant)
        .fetch_all(&self.read)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(q, p, n)| (q, Priority::from_rank(p), n))
            .collect())
    }

    pub async fn queue_running(&self, tenant: Option<&str>) -> DbResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT queue, COUNT(*) FROM jobs WHERE status = 'running' \
             AND (? IS NULL OR tenant = ?) GROUP BY queue ORDER BY queue",
        )
        .bind(tenant)
        .bind(tenant)
        .fetch_all(&self.read)
        .await?)
    }

    pub async fn key_insert(&self, key: &ApiKey, hash: &str) -> DbResult<()> {
        let resource = format!("/api/v1/keys/{}", key.id);
        crate::audit::audited_in!(self.write, |tx| {
            sqlx::query(
                "INSERT INTO api_keys (id, tenant, name, hash, scopes, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&key.id)
            .bind(&key.tenant)
            .bind(&key.name)
            .bind(hash)
            .bind(key.scopes.to_text())
            .bind(key.created_at)
            .bind(key.expires_at)
            .execute(&mut *tx)
            .await?;
            crate::audit::stamp!(&mut *tx, Change::Created, Some(&resource));
        });
        Ok(())
    }

    pub async fn key_find_by_hash(&self, hash: &str) -> DbResult<Option<ApiKey>> {
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT id, tenant, name, scopes, created_at, revoked_at, expires_at, last_used_at FROM api_keys \
             WHERE hash = ? AND revoked_at IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.read)
        .await?;
        row.map(ApiKey::try_from).transpose()
    }

    pub async fn key_list(&self, tenant: Option<&str>) -> DbResult<Vec<ApiKey>> {
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT id, tenant, name, scopes, created_at, revoked_at, expires_at, last_used_at FROM api_keys \
             WHERE (? IS NULL OR tenant = ?) ORDER BY created_at, id",
        )
        .bind(tenant)
        .bind(tenant)
        .fetch_all(&self.read)
        .await?;
        rows_to(rows)
    }

    pub async fn key_revoke(&self, tenant: Option<&str>, id: &str, now: Millis) -> DbResult<bool> {
        let done = crate::audit::audited_in!(self.write, |tx| {
            let done = sqlx::query(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL \
             AND (? IS NULL OR tenant = ?)",
            )
            .bind(now)
            .bind(id)
            .bind(tenant)
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() > 0 {
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            done
        });
        Ok(done.rows_affected() > 0)
    }

    pub async fn key_count(&self) -> DbResult<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.write)
            .await?)
    }

    pub async fn module_insert(&self, tenant: &str, m: &ModuleInfo) -> DbResult<bool> {
        let resource = format!("/api/v1/modules/{}", m.id);
        let done = crate::audit::audited_in!(self.write, |tx| {
            let done = sqlx::query(
                "INSERT INTO modules (tenant, id, size, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (tenant, id) DO NOTHING",
            )
            .bind(tenant)
            .bind(&m.id)
            .bind(m.size)
            .bind(m.created_at)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() > 0 {
                crate::audit::stamp!(&mut *tx, Change::Created, Some(&resource));
            }
            done
        });
        Ok(done.rows_affected() > 0)
    }

    pub async fn module_get(&self, tenant: &str, id: &str) -> DbResult<Option<ModuleInfo>> {
        let row: Option<ModuleRow> =
            sqlx::query_as("SELECT id, size, created_at FROM modules WHERE tenant = ? AND id = ?")
                .bind(tenant)
                .bind(id)
                .fetch_optional(&self.read)
                .await?;
        Ok(row.map(ModuleInfo::from))
    }

    pub async fn module_list(&self, tenant: &str) -> DbResult<Vec<ModuleInfo>> {
        let rows: Vec<ModuleRow> = sqlx::query_as(
            "SELECT id, size, created_at FROM modules WHERE tenant = ? ORDER BY created_at, id",
        )
        .bind(tenant)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(ModuleInfo::from).collect())
    }

    pub async fn module_delete(&self, tenant: &str, id: &str) -> DbResult<bool> {
        let done = crate::audit::audited_in!(self.write, |tx| {
            let done = sqlx::query("DELETE FROM modules WHERE tenant = ? AND id = ?")
                .bind(tenant)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() > 0 {
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            done
        });
        Ok(done.rows_affected() > 0)
    }

    pub async fn worker_upsert(&self, w: &WorkerInfo) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO workers (id, host, kinds, slots, started_at, last_seen) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET kinds = excluded.kinds, slots = excluded.slots, \
             last_seen = excluded.last_seen",
        )
        .bind(&w.id)
        .bind(&w.host)
        .bind(json_list(&w.kinds))
        .bind(w.slots)
        .bind(w.started_at)
        .bind(w.last_seen)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    pub async fn worker_list(&self) -> DbResult<Vec<WorkerInfo>> {
        let rows: Vec<WorkerRow> = sqlx::query_as(
            "SELECT id, host, kinds, slots, started_at, last_seen FROM workers ORDER BY started_at, id",
        )
        .fetch_all(&self.read)
        .await?;
        rows_to(rows)
    }

    pub async fn worker_delete(&self, id: &str) -> DbResult<()> {
        sqlx::query("DELETE FROM workers WHERE id = ?")
            .bind(id)
            .execute(&self.write)
            .await?;
        Ok(())
    }
}

impl SqliteStore {
    pub async fn module_usage(&self, tenant: &str) -> DbResult<(u64, u64)> {
        let (count, bytes): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM modules WHERE tenant = ?")
                .bind(tenant)
                .fetch_one(&self.read)
                .await?;
        Ok((count.max(0) as u64, bytes.max(0) as u64))
    }

    pub async fn module_holders(&self, id: &str) -> DbResult<u64> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM modules WHERE id = ?")
            .bind(id)
            .fetch_one(&self.write)
            .await?;
        Ok(count.max(0) as u64)
    }
}

/// Writes attempt ends inside the caller's transaction (the fence: a row
/// only moves while it is running on that attempt).
pub(crate) async fn complete_on(
    conn: &mut sqlx::SqliteConnection,
    done: &[Completion],
) -> Result<Vec<i64>, sqlx::Error> {
    Ok(complete_rows(conn, done)
        .await?
        .into_iter()
        .map(|(id, _, _)| id)
        .collect())
}

/// One attempt's end, applied only while the job is still on that attempt:
/// `?1` the job, `?3` … `?9` as [`bind_completion`] binds them. `?2` is
/// left to a statement that follows in the same query: sqlx binds the
/// unnumbered slots below a statement's highest number from a running
/// count across the query's statements, so statements after the first use
/// the lowest numbers, without gaps, or run out of values.
pub(crate) const COMPLETE_ONE: &str = "UPDATE jobs SET \
     status = CASE WHEN cancel_requested AND ?3 = 'scheduled' THEN 'cancelled' ELSE ?3 END, \
     finished_at = CASE WHEN ?3 = 'scheduled' AND NOT cancel_requested THEN NULL ELSE ?4 END, \
     run_at = COALESCE(?5, run_at), result = ?6, error = ?7, \
     lease_expires_at = NULL, history = json_insert(history, '$[#]', json(?8)) \
     WHERE id = ?1 AND attempt = ?9 AND status = 'running'";

/// Binds [`COMPLETE_ONE`]'s parameters, `second` as `?2`.
pub(crate) fn bind_completion<'q>(
    query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    c: &Completion,
    second: Option<String>,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    query
        .bind(c.id)
        .bind(second)
        .bind(c.status.as_str())
        .bind(c.record.finished_at)
        .bind(c.run_at)
        .bind(result_json(&c.result))
        .bind(storable_error(c.error.as_deref()))
        .bind(record_json(&c.record))
        .bind(c.attempt)
}

/// [`complete_on`], with each written job's run and the status it took.
pub(crate) async fn complete_rows(
    conn: &mut sqlx::SqliteConnection,
    done: &[Completion],
) -> Result<Vec<(i64, Option<i64>, String)>, sqlx::Error> {
    let mut applied = Vec::with_capacity(done.len());
    let sql = format!("{COMPLETE_ONE} RETURNING id, run_id, status");
    for c in done {
        let row = bind_completion(sqlx::query(&sql), c, None)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = row {
            applied.push(sqlx::FromRow::from_row(&row)?);
        }
    }
    Ok(applied)
}

/// [`SqliteStore::job_insert`]'s one trip to the writer.
async fn insert_job(
    write: &SqlitePool,
    job: &NewJob,
    now: Millis,
    audit: Option<&kiln_core::audit::AuditRecord>,
) -> DbResult<(Job, bool)> {
    let encoded = EncodedJob::new(job, now);
    // One trip to the writer's thread for the whole transaction: the
    // job, its audit record (only if the job was inserted: `changes()`
    // counts the insert, not its triggers; `last_insert_rowid()` is the
    // job's) and the commit. Every statement is a message to the
    // connection's worker, and the single writer is the queue's
    // bottleneck here.
    let mut sql = format!(
        "BEGIN; {INSERT_JOB} ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL \
         DO NOTHING RETURNING {JOB_COLUMNS};"
    );
    if audit.is_some() {
        sql.push_str(
            " INSERT INTO audit (tenant, time, actor_kind, actor, action, resource, request_id, \
             source, outcome, rationale) SELECT ?15, ?16, ?17, ?18, ?19, \
             '/api/v1/jobs/' || last_insert_rowid(), ?20, ?21, ?22, ?23 WHERE changes() = 1;",
        );
    }
    sql.push_str(" COMMIT;");
    let mut query = bind_new(sqlx::query(&sql), &encoded, now);
    if let Some(r) = audit {
        query = query
            .bind(&r.tenant)
            .bind(r.time)
            .bind(&r.actor_kind)
            .bind(&r.actor)
            .bind(&r.action)
            .bind(&r.request_id)
            .bind(&r.source)
            .bind(&r.outcome)
            .bind(&r.rationale);
    }
    let mut conn = write.acquire().await?;
    let rows = match query.fetch_all(&mut *conn).await {
        Ok(rows) => rows,
        Err(error) => {
            // A statement failed inside the transaction: end it before
            // the connection goes back to the pool.
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            return Err(error.into());
        }
    };
    if let Some(row) = rows.first() {
        let row: JobRow = sqlx::FromRow::from_row(row)?;
        return Ok((Job::try_from(row)?, true));
    }
    let existing: JobRow = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = ? AND idempotency_key = ?"
    ))
    .bind(&job.tenant)
    .bind(&job.idempotency_key)
    .fetch_one(&mut *conn)
    .await?;
    Ok((Job::try_from(existing)?, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::ConnectOptions;

    /// Jobs in the database file itself, the WAL ignored: what a checkpoint
    /// has copied there.
    async fn jobs_in_file(path: &std::path::Path) -> i64 {
        let mut conn = SqliteConnectOptions::new()
            .filename(path)
            .immutable(true)
            .read_only(true)
            .connect()
            .await
            .unwrap();
        // Before the first checkpoint even the schema is only in the WAL.
        sqlx::query_scalar("SELECT COUNT(*) FROM jobs")
            .fetch_one(&mut conn)
            .await
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_reach_the_database_file_without_a_commit_checkpointing() {
        let path = std::env::temp_dir().join(format!(
            "kiln_ckpt_{}_{}.db",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        // Far below the writer's own threshold (4,000 pages): only the
        // background checkpoint can copy these into the file.
        for _ in 0..5 {
            store
                .job_insert(&NewJob::new("acme", "noop", serde_json::json!({})), 1, None)
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while jobs_in_file(&path).await < 5 {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was not checkpointed into the file"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store.close().await;
        assert!(store.checkpoint.is_closed());
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
