//! The PostgreSQL driver: `FOR UPDATE SKIP LOCKED` leasing, batched writes
//! through `unnest` arrays, and LISTEN/NOTIFY wake-ups.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{Job, LeasedJob, Millis, NewJob, Priority};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Connection, PgPool};
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
pub struct PgStore {
    pub(crate) pool: PgPool,
    pub(crate) wakeup: Arc<Notify>,
    pub(crate) waiters: Arc<crate::Waiters>,
    pub(crate) flow_wakeup: Arc<Notify>,
    pub(crate) defs: Arc<crate::flow::DefCache>,
    /// Wakes the sequencer (see `events.rs`).
    pub(crate) events_kick: Arc<Notify>,
    /// Fires when events were numbered, here or in another process.
    pub(crate) events_ready: Arc<Notify>,
    /// Fires when log chunks were stored, here or in another process.
    pub(crate) logs_ready: Arc<Notify>,
    /// The connection chained step ends are written on, outside the pool.
    pub(crate) step_lane: crate::flow::pg::Lane,
}

/// Appends one attempt record (JSON text) to a job's history with jsonb's
/// own functions, so any valid JSON a writer stored stays readable.
const HISTORY_APPEND: &str = "(j.history::jsonb || jsonb_build_array(u.record::jsonb))::text";

/// Whether the queue `tenant`/`queue` is paused or limited, read under a
/// share lock: a concurrent change of the queue's settings waits for this
/// statement, or this statement sees the change, so `held` never misses one.
pub(crate) fn held_expr(tenant: &str, queue: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM queues q WHERE q.tenant = {tenant} AND q.name = {queue} \
         AND (q.paused OR q.concurrency_limit IS NOT NULL) FOR SHARE)"
    )
}

/// A pooled connection idle this long is pinged before it is handed out.
const IDLE_PING: Duration = Duration::from_secs(1);

impl PgStore {
    pub async fn connect(url: &str, schema: Option<&str>) -> DbResult<PgStore> {
        let mut options = PgConnectOptions::from_str(url)?;
        if let Some(schema) = schema {
            let mut conn = sqlx::PgConnection::connect_with(&options).await?;
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .execute(&mut conn)
                .await?;
            conn.close().await?;
            options = options.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            // sqlx pings every connection it hands out by default: a round
            // trip before each transaction (a pipeline step has one). Only a
            // connection idle for a while is worth checking: the server may
            // have restarted or a proxy dropped it; one in use a moment ago
            // fails its query instead, which callers already handle.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_PING {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await?;
        // Concurrent first starts (several API hosts) serialise on this lock.
        let mut conn = pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock(4242)")
            .execute(&mut *conn)
            .await?;
        let migrated = sqlx::migrate!("./migrations/postgres")
            .run(&mut *conn)
            .await;
        sqlx::query("SELECT pg_advisory_unlock(4242)")
            .execute(&mut *conn)
            .await?;
        migrated?;
        drop(conn);
        let wakeup = Arc::new(Notify::new());
        let flow_wakeup = Arc::new(Notify::new());
        let events_kick = Arc::new(Notify::new());
        let events_ready = Arc::new(Notify::new());
        let logs_ready = Arc::new(Notify::new());
        tokio::spawn(listen(
            pool.clone(),
            Wakeups {
                jobs: wakeup.clone(),
                flow: flow_wakeup.clone(),
                events_kick: events_kick.clone(),
                events_ready: events_ready.clone(),
                logs: logs_ready.clone(),
            },
        ));
        tokio::spawn(crate::events::sequence_loop(
            pool.clone(),
            events_kick.clone(),
            events_ready.clone(),
        ));
        Ok(PgStore {
            pool,
            wakeup,
            waiters: Arc::default(),
            flow_wakeup,
            defs: Arc::default(),
            events_kick,
            events_ready,
            logs_ready,
            step_lane: Arc::default(),
        })
    }

    #[cfg(feature = "testing")]
    pub(crate) async fn execute_raw(&self, sql: &str) -> DbResult<()> {
        sqlx::raw_sql(sql).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.step_lane.lock().await.close().await;
        self.pool.close().await;
    }

    async fn job_by_id(&self, tenant: Option<&str>, id: i64) -> DbResult<Option<Job>> {
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Job::try_from).transpose()
    }

    pub async fn job_insert(
        &self,
        job: &NewJob,
        now: Millis,
        audit: Option<&kiln_core::audit::AuditRecord>,
    ) -> DbResult<(Job, bool)> {
        let e = EncodedJob::new(job, now);
        let insert = format!(
            "INSERT INTO jobs (tenant, kind, queue, priority, status, spec, labels, max_attempts, \
             timeout_ms, backoff, permanent_exit_codes, idempotency_key, run_at, created_at, held) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, {}) \
             ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
             RETURNING {JOB_COLUMNS}",
            held_expr("$1", "$3")
        );
        // The audit record rides in the same statement: one round trip,
        // written only when the job is.
        let sql = if audit.is_some() {
            format!(
                "WITH j AS ({insert}), a AS (INSERT INTO audit (tenant, time, actor_kind, actor, \
                 action, resource, request_id, source, outcome, rationale) \
                 SELECT j.tenant, $15, $16, $17, $18, '/api/v1/jobs/' || j.id, $19, $20, $21, $22 \
                 FROM j) SELECT * FROM j"
            )
        } else {
            insert
        };
        let mut query = sqlx::query_as(&sql)
            .bind(&job.tenant)
            .bind(&job.kind)
            .bind(&job.queue)
            .bind(job.priority.rank())
            .bind(e.status)
            .bind(&e.spec)
            .bind(&e.labels)
            .bind(job.max_attempts)
            .bind(job.timeout_ms)
            .bind(&e.backoff)
            .bind(&e.permanent_exit_codes)
            .bind(&job.idempotency_key)
            .bind(e.run_at)
            .bind(now);
        if let Some(a) = audit {
            query = query
                .bind(a.time)
                .bind(&a.actor_kind)
                .bind(&a.actor)
                .bind(&a.action)
                .bind(&a.request_id)
                .bind(&a.source)
                .bind(&a.outcome)
                .bind(&a.rationale);
        }
        let inserted: Option<JobRow> = query.fetch_optional(&self.pool).await?;
        if let Some(row) = inserted {
            return Ok((Job::try_from(row)?, true));
        }
        let existing: JobRow = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = $1 AND idempotency_key = $2"
        ))
        .bind(&job.tenant)
        .bind(&job.idempotency_key)
        .fetch_one(&self.pool)
        .await?;
        Ok((Job::try_from(existing)?, false))
    }

    pub async fn job_insert_many(&self, jobs: &[NewJob], now: Millis) -> DbResult<Vec<i64>> {
        let encoded: Vec<EncodedJob> = jobs.iter().map(|j| EncodedJob::new(j, now)).collect();
        let col = |f: fn(&EncodedJob) -> String| encoded.iter().map(f).collect::<Vec<String>>();
        let ids: Vec<i64> = sqlx::query_scalar(&format!(
            "INSERT INTO jobs (tenant, kind, queue, priority, status, spec, labels, max_attempts, \
             timeout_ms, backoff, permanent_exit_codes, run_at, created_at, held) \
             SELECT t.*, $13, {} FROM unnest($1::text[], $2::text[], $3::text[], $4::int2[], $5::text[], \
               $6::text[], $7::text[], $8::int4[], $9::int8[], $10::text[], $11::text[], $12::int8[]) \
               AS t(tenant, kind, queue, priority, status, spec, labels, max_attempts, timeout_ms, \
                    backoff, permanent_exit_codes, run_at) \
             RETURNING id",
            held_expr("t.tenant", "t.queue")
        ))
        .bind(col(|e| e.job.tenant.clone()))
        .bind(col(|e| e.job.kind.clone()))
        .bind(col(|e| e.job.queue.clone()))
        .bind(encoded.iter().map(|e| e.job.priority.rank()).collect::<Vec<i16>>())
        .bind(col(|e| e.status.to_string()))
        .bind(col(|e| e.spec.clone()))
        .bind(col(|e| e.labels.clone()))
        .bind(encoded.iter().map(|e| e.job.max_attempts).collect::<Vec<i32>>())
        .bind(encoded.iter().map(|e| e.job.timeout_ms).collect::<Vec<i64>>())
        .bind(col(|e| e.backoff.clone()))
        .bind(col(|e| e.permanent_exit_codes.clone()))
        .bind(encoded.iter().map(|e| e.run_at).collect::<Vec<i64>>())
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }

    pub async fn job_get(&self, tenant: Option<&str>, id: i64) -> DbResult<Option<Job>> {
        self.job_by_id(tenant, id).await
    }

    pub async fn job_list(&self, tenant: &str, f: &JobFilter) -> DbResult<Vec<Job>> {
        let (label_key, label_value) = match &f.label {
            Some((k, v)) => (Some(k.as_str()), Some(v.as_str())),
            None => (None, None),
        };
        let rows: Vec<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant = $1 \
             AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR kind = $3) \
             AND ($4::text IS NULL OR queue = $4) \
             AND ($5::text IS NULL OR (labels::jsonb ->> $5::text) = $6::text) \
             AND ($7::int8 IS NULL OR created_at >= $7) AND ($8::int8 IS NULL OR created_at < $8) \
             AND ($9::int8 IS NULL OR id < $9) ORDER BY id DESC LIMIT $10"
        ))
        .bind(tenant)
        .bind(f.status.map(|s| s.as_str()))
        .bind(&f.kind)
        .bind(&f.queue)
        .bind(label_key)
        .bind(label_value)
        .bind(f.created_after)
        .bind(f.created_before)
        .bind(f.before_id)
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        rows_to(rows)
    }

    pub async fn job_count_by_status(
        &self,
        tenant: Option<&str>,
    ) -> DbResult<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, COUNT(*) FROM jobs WHERE ($1::text IS NULL OR tenant = $1) GROUP BY status",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    pub async fn job_attempts_total(&self) -> DbResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(SUM(attempt), 0)::int8 FROM jobs")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn job_count_unfinished(&self) -> DbResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM jobs WHERE status IN ('queued','scheduled')) \
             + (SELECT COUNT(*) FROM jobs WHERE status = 'running')",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn job_last_finished_at(&self) -> DbResult<Option<Millis>> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT MAX(finished_at) FROM jobs WHERE {}",
            crate::rows::FINISHED
        ))
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn job_delete_finished(&self, before: Millis, batch: i64) -> DbResult<u64> {
        let done = sqlx::query(&format!(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {} AND finished_at < $1 \
             ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
            crate::rows::FINISHED
        ))
        .bind(before)
        .bind(batch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn worker_delete_stale(&self, before: Millis) -> DbResult<u64> {
        let done = sqlx::query("DELETE FROM workers WHERE last_seen < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    pub async fn tenant_running(&self) -> DbResult<std::collections::BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT tenant, SUM(n)::int8 FROM tenant_running GROUP BY tenant HAVING SUM(n) <> 0 ORDER BY tenant")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().collect())
    }

    pub async fn job_lease(&self, request: &LeaseRequest<'_>) -> DbResult<Vec<LeasedJob>> {
        let mut tx = self.pool.begin().await?;
        let rooms = match request.quota_floor() {
            Some(floor) => lease::rooms(
                request.tenant_running_max,
                sqlx::query_as(
                    "SELECT tenant, SUM(n)::int8 FROM tenant_running GROUP BY tenant HAVING SUM(n) > $1",
                )
                    .bind(floor)
                    .fetch_all(&mut *tx)
                    .await?,
            ),
            None => Default::default(),
        };
        let full = lease::full_tenants(&rooms);
        // Per kind, the fetch index gives the best jobs in order; jobs of
        // queues that are paused or limited are not in it (`held`), and the
        // check on `queues` catches any whose flag a concurrent change has
        // not reached yet.
        let mut candidates: Vec<Candidate> = sqlx::query_as(
            "SELECT c.id, c.tenant, c.priority, c.run_at FROM unnest($1::text[]) AS k(kind) \
             CROSS JOIN LATERAL (SELECT j.id, j.tenant, j.priority, j.run_at FROM jobs j \
               WHERE j.kind = k.kind AND j.status IN ('queued','scheduled') AND NOT j.held \
               AND j.run_at <= $2 AND NOT (j.tenant = ANY($3)) \
               AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.tenant = j.tenant AND q.name = j.queue \
                 AND (q.paused OR q.concurrency_limit IS NOT NULL)) \
               ORDER BY j.priority, j.run_at, j.id LIMIT $4 FOR UPDATE OF j SKIP LOCKED) c",
        )
        .bind(request.kinds)
        .bind(request.now)
        .bind(&full)
        .bind(request.limit)
        .fetch_all(&mut *tx)
        .await?;
        // Each limited queue with work is locked for the rest of the
        // transaction, so counting its running jobs and leasing more is
        // atomic across workers. The count is a statement of its own: under
        // READ COMMITTED only a statement that starts after the lock is
        // granted sees the jobs the previous holder leased.
        let limited: Vec<(String, String, i32)> = sqlx::query_as(
            "SELECT tenant, name, concurrency_limit FROM queues qq \
             WHERE NOT paused AND concurrency_limit IS NOT NULL AND NOT (tenant = ANY($2)) \
             AND EXISTS (SELECT 1 FROM jobs w WHERE w.tenant = qq.tenant AND w.queue = qq.name \
               AND w.status IN ('queued','scheduled') AND w.run_at <= $1) \
             ORDER BY tenant, name FOR UPDATE",
        )
        .bind(request.now)
        .bind(&full)
        .fetch_all(&mut *tx)
        .await?;
        if !limited.is_empty() {
            let (tenants, names, caps): (Vec<String>, Vec<String>, Vec<i32>) = limited
                .into_iter()
                .fold(Default::default(), |mut acc, (t, n, c)| {
                    acc.0.push(t);
                    acc.1.push(n);
                    acc.2.push(c);
                    acc
                });
            let more: Vec<Candidate> = sqlx::query_as(
                "SELECT c.id, c.tenant, c.priority, c.run_at \
                 FROM unnest($3::text[], $4::text[], $5::int4[]) AS q(tenant, name, cap) \
                 CROSS JOIN LATERAL (SELECT COUNT(*) AS n FROM jobs r WHERE r.tenant = q.tenant \
                   AND r.queue = q.name AND r.status = 'running') r \
                 CROSS JOIN LATERAL (SELECT j.id, j.tenant, j.priority, j.run_at FROM jobs j \
                   WHERE j.tenant = q.tenant AND j.queue = q.name AND j.status IN ('queued','scheduled') \
                   AND j.run_at <= $2 AND j.kind = ANY($1) \
                   ORDER BY j.priority, j.run_at, j.id \
                   LIMIT GREATEST(0, LEAST(q.cap - r.n, $6)) FOR UPDATE OF j SKIP LOCKED) c",
            )
            .bind(request.kinds)
            .bind(request.now)
            .bind(&tenants)
            .bind(&names)
            .bind(&caps)
            .bind(request.limit)
            .fetch_all(&mut *tx)
            .await?;
            candidates.extend(more);
        }
        let chosen = lease::choose(candidates, request.limit, &rooms);
        if chosen.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let rows: Vec<LeasedRow> = sqlx::query_as(&format!(
            "UPDATE jobs SET {} WHERE id = ANY($4) AND status IN ('queued','scheduled') RETURNING {LEASED_COLUMNS}",
            lease::LEASE_SET
        ))
        .bind(request.worker_id)
        .bind(request.now)
        .bind(request.lease_until())
        .bind(&chosen)
        .fetch_all(&mut *tx)
        .await?;
        let (jobs, unreadable) = lease::decode(rows);
        for (id, error) in unreadable {
            sqlx::query(lease::FAIL_UNREADABLE)
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
        Ok(sqlx::query_scalar(
            "SELECT MIN(x.run_at) FROM unnest($1::text[]) AS k(kind) \
             CROSS JOIN unnest(ARRAY[0, 1, 2, 3]::int2[]) AS p(priority) \
             CROSS JOIN LATERAL (SELECT run_at FROM jobs WHERE kind = k.kind AND priority = p.priority \
               AND status IN ('queued','scheduled') AND NOT held ORDER BY run_at LIMIT 1) x",
        )
        .bind(kinds)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn job_heartbeat(
        &self,
        worker_id: &str,
        held: &[(i64, i32)],
        lease_until: Millis,
    ) -> DbResult<Vec<(i64, bool)>> {
        let (ids, attempts): (Vec<i64>, Vec<i32>) = held.iter().copied().unzip();
        // A row another statement holds (the completer writing its result,
        // the rescuer looking at it) is skipped rather than waited for: it
        // is still this worker's while it reads as running on this attempt,
        // and the next beat extends it. So a slow result write never holds
        // up the leases of the other jobs.
        Ok(sqlx::query_as(
            "WITH locked AS (SELECT id FROM jobs WHERE id = ANY($2) ORDER BY id FOR UPDATE SKIP LOCKED), \
             extended AS (UPDATE jobs j SET lease_expires_at = $1 \
               FROM unnest($2::int8[], $3::int4[]) AS u(id, attempt), locked l \
               WHERE j.id = u.id AND l.id = u.id AND j.attempt = u.attempt AND j.status = 'running' \
               AND j.worker_id = $4 RETURNING j.id, j.cancel_requested) \
             SELECT id, cancel_requested FROM extended UNION ALL \
             SELECT j.id, j.cancel_requested FROM jobs j, unnest($2::int8[], $3::int4[]) AS u(id, attempt) \
             WHERE j.id = u.id AND j.attempt = u.attempt AND j.status = 'running' AND j.worker_id = $4 \
             AND j.id NOT IN (SELECT id FROM locked)",
        )
        .bind(lease_until)
        .bind(ids)
        .bind(attempts)
        .bind(worker_id)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn job_complete_many(&self, done: &[Completion]) -> DbResult<Vec<i64>> {
        Ok(complete_on(&self.pool, done).await?)
    }

    pub async fn job_cancel(&self, tenant: &str, id: i64, now: Millis) -> DbResult<CancelOutcome> {
        // One guarded statement decides by the status it finds, so a job
        // that moves between running and scheduled meanwhile is still
        // cancelled; only a job found finished is read again (it may have
        // been retried by hand in between, so that is looped on).
        for _ in 0..8 {
            let row: Option<JobRow> = crate::audit::audited_in!(self.pool, |tx| {
                let row: Option<JobRow> = sqlx::query_as(&format!(
                    "UPDATE jobs SET {} WHERE tenant = $2 AND id = $3 \
                     AND status IN ('queued','scheduled','running') RETURNING {JOB_COLUMNS}",
                    crate::rows::CANCEL_SET
                ))
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
            match self.job_by_id(Some(tenant), id).await? {
                None => return Ok(CancelOutcome::NotFound),
                Some(job) if job.status.is_terminal() => {
                    return Ok(CancelOutcome::AlreadyFinished(job))
                }
                Some(_) => continue,
            }
        }
        Err(crate::DbError::Corrupt(format!(
            "job {id} kept changing under cancel"
        )))
    }

    pub async fn job_retry(&self, tenant: &str, id: i64, now: Millis) -> DbResult<RetryOutcome> {
        let row: Option<JobRow> = crate::audit::audited_in!(self.pool, |tx| {
            let row: Option<JobRow> = sqlx::query_as(&format!(
                "UPDATE jobs SET status = 'queued', run_at = $1, retry_from = attempt, \
                 cancel_requested = FALSE, finished_at = NULL, error = NULL, result = NULL, held = {} \
                 WHERE tenant = $2 AND id = $3 AND status IN ('failed','dead','cancelled') RETURNING {JOB_COLUMNS}",
                held_expr("jobs.tenant", "jobs.queue")
            ))
            .bind(now)
            .bind(tenant)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if row.is_some() {
                sqlx::query("SELECT pg_notify('kiln_jobs', '')")
                    .execute(&mut *tx)
                    .await?;
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            row
        });
        if let Some(row) = row {
            return Ok(RetryOutcome::Requeued(row.try_into()?));
        }
        Ok(match self.job_by_id(Some(tenant), id).await? {
            Some(job) => RetryOutcome::NotRetryable(job),
            None => RetryOutcome::NotFound,
        })
    }

    pub async fn job_rescue_expired(&self, now: Millis) -> DbResult<u64> {
        let lost = lease::LOST_STATUS;
        let done = sqlx::query(&format!(
            "UPDATE jobs j SET status = {lost}, \
               finished_at = CASE WHEN {lost} = 'queued' THEN NULL ELSE $1 END, \
               run_at = $1, error = 'lease expired: worker lost', lease_expires_at = NULL, \
               history = {HISTORY_APPEND} \
             FROM (SELECT id, json_build_object('attempt', attempt, 'worker_id', worker_id, \
                     'started_at', started_at, 'finished_at', $1::int8, 'outcome', 'lost', \
                     'exit_code', NULL, 'error', 'lease expired', 'duration_ms', NULL)::text AS record \
                   FROM jobs WHERE status = 'running' AND lease_expires_at < $1 FOR UPDATE SKIP LOCKED) AS u \
             WHERE j.id = u.id"
        ))
        .bind(now)
        .execute(&self.pool)
        .await?;
        let n = done.rows_affected();
        if n > 0 {
            sqlx::query("SELECT pg_notify('kiln_jobs', '')")
                .execute(&self.pool)
                .await?;
        }
        Ok(n)
    }

    pub async fn job_release(
        &self,
        worker_id: &str,
        held: &[(i64, i32)],
        now: Millis,
    ) -> DbResult<u64> {
        let (ids, attempts): (Vec<i64>, Vec<i32>) = held.iter().copied().unzip();
        let done = sqlx::query(&format!(
            "WITH {} UPDATE jobs j SET status = 'queued', run_at = $1, \
             lease_expires_at = NULL, retry_from = j.retry_from + 1 \
             FROM unnest($2::int8[], $3::int4[]) AS u(id, attempt), locked l \
             WHERE j.id = u.id AND l.id = u.id AND j.attempt = u.attempt AND j.status = 'running' \
             AND j.worker_id = $4",
            lock_in_id_order("$2")
        ))
        .bind(now)
        .bind(ids)
        .bind(attempts)
        .bind(worker_id)
        .execute(&self.pool)
        .await?;
        sqlx::query("SELECT pg_notify('kiln_jobs', '')")
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    pub async fn queue_list(&self, tenant: Option<&str>) -> DbResult<Vec<QueueInfo>> {
        let rows: Vec<QueueRow> = sqlx::query_as(&format!(
            "SELECT {QUEUE_COLUMNS} FROM queues WHERE ($1::text IS NULL OR tenant = $1) \
             ORDER BY tenant, name"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(QueueInfo::from).collect())
    }

    pub async fn queue_upsert(&self, q: &QueueInfo, now: Millis) -> DbResult<QueueInfo> {
        let info = crate::audit::audited_in!(self.pool, |tx| {
            let row: QueueRow = sqlx::query_as(&format!(
                "INSERT INTO queues (tenant, name, paused, concurrency_limit, updated_at) \
             VALUES ($1, $2, $3, $4, $5) \
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
            // Rows are locked in id order, as every batched writer does.
            sqlx::query(
                "UPDATE jobs SET held = $3 WHERE id IN (SELECT id FROM jobs WHERE tenant = $1 \
             AND queue = $2 AND status IN ('queued','scheduled','running') AND held <> $3 \
             ORDER BY id FOR UPDATE)",
            )
            .bind(&info.tenant)
            .bind(&info.name)
            .bind(info.is_held())
            .execute(&mut *tx)
            .await?;
            sqlx::query("SELECT pg_notify('kiln_jobs', '')")
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
             AND ($1::text IS NULL OR tenant = $1) GROUP BY queue, priority ORDER BY queue, priority",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(q, p, n)| (q, Priority::from_rank(p), n))
            .collect())
    }

    pub async fn queue_running(&self, tenant: Option<&str>) -> DbResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT queue, COUNT(*) FROM jobs WHERE status = 'running' \
             AND ($1::text IS NULL OR tenant = $1) GROUP BY queue ORDER BY queue",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn key_insert(&self, key: &ApiKey, hash: &str) -> DbResult<()> {
        let resource = format!("/api/v1/keys/{}", key.id);
        crate::audit::audited_in!(self.pool, |tx| {
            sqlx::query(
                "INSERT INTO api_keys (id, tenant, name, hash, scopes, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
             WHERE hash = $1 AND revoked_at IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(ApiKey::try_from).transpose()
    }

    pub async fn key_list(&self, tenant: Option<&str>) -> DbResult<Vec<ApiKey>> {
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT id, tenant, name, scopes, created_at, revoked_at, expires_at, last_used_at FROM api_keys \
             WHERE ($1::text IS NULL OR tenant = $1) ORDER BY created_at, id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows_to(rows)
    }

    pub async fn key_revoke(&self, tenant: Option<&str>, id: &str, now: Millis) -> DbResult<bool> {
        let done = crate::audit::audited_in!(self.pool, |tx| {
            let done = sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL \
             AND ($3::text IS NULL OR tenant = $3)",
            )
            .bind(now)
            .bind(id)
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
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn module_insert(&self, tenant: &str, m: &ModuleInfo) -> DbResult<bool> {
        let resource = format!("/api/v1/modules/{}", m.id);
        let done = crate::audit::audited_in!(self.pool, |tx| {
            let done = sqlx::query(
                "INSERT INTO modules (tenant, id, size, created_at) VALUES ($1, $2, $3, $4) \
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
        let row: Option<ModuleRow> = sqlx::query_as(
            "SELECT id, size, created_at FROM modules WHERE tenant = $1 AND id = $2",
        )
        .bind(tenant)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(ModuleInfo::from))
    }

    pub async fn module_list(&self, tenant: &str) -> DbResult<Vec<ModuleInfo>> {
        let rows: Vec<ModuleRow> = sqlx::query_as(
            "SELECT id, size, created_at FROM modules WHERE tenant = $1 ORDER BY created_at, id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(ModuleInfo::from).collect())
    }

    pub async fn module_delete(&self, tenant: &str, id: &str) -> DbResult<bool> {
        let done = crate::audit::audited_in!(self.pool, |tx| {
            let done = sqlx::query("DELETE FROM modules WHERE tenant = $1 AND id = $2")
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
            "INSERT INTO workers (id, host, kinds, slots, started_at, last_seen) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET kinds = excluded.kinds, slots = excluded.slots, \
             last_seen = excluded.last_seen",
        )
        .bind(&w.id)
        .bind(&w.host)
        .bind(serde_json::to_string(&w.kinds).unwrap_or_else(|_| "[]".into()))
        .bind(w.slots)
        .bind(w.started_at)
        .bind(w.last_seen)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn worker_list(&self) -> DbResult<Vec<WorkerInfo>> {
        let rows: Vec<WorkerRow> = sqlx::query_as(
            "SELECT id, host, kinds, slots, started_at, last_seen FROM workers ORDER BY started_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows_to(rows)
    }

    pub async fn worker_delete(&self, id: &str) -> DbResult<()> {
        sqlx::query("DELETE FROM workers WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Locks the rows of a batched write (ids in the parameter `ids`) in id order before the
/// write touches them, so two batches over overlapping rows (a heartbeat and
/// a completion) wait for each other instead of deadlocking.
pub(crate) fn lock_in_id_order(ids: &str) -> String {
    format!("locked AS (SELECT id FROM jobs WHERE id = ANY({ids}) ORDER BY id FOR UPDATE)")
}

/// The in-process wake-ups NOTIFYs are forwarded to.
struct Wakeups {
    jobs: Arc<Notify>,
    flow: Arc<Notify>,
    events_kick: Arc<Notify>,
    events_ready: Arc<Notify>,
    logs: Arc<Notify>,
}

/// Forwards NOTIFYs to the in-process wake-ups. When the connection drops,
/// everyone is woken anyway so that they poll while it reconnects.
async fn listen(pool: PgPool, wakeups: Wakeups) {
    let wake_all = || {
        wakeups.jobs.notify_waiters();
        wakeups.flow.notify_waiters();
        wakeups.events_kick.notify_one();
        wakeups.events_ready.notify_waiters();
        wakeups.logs.notify_waiters();
    };
    loop {
        if pool.is_closed() {
            return;
        }
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::debug!(%error, "LISTEN connection failed; retrying");
                wake_all();
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if listener
            .listen_all([
                "kiln_jobs",
                "kiln_flow",
                "kiln_events",
                "kiln_events_ready",
                "kiln_logs",
            ])
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        loop {
            let received = tokio::select! {
                received = listener.try_recv() => received,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if pool.is_closed() {
                        return;
                    }
                    continue;
                }
            };
            match received {
                Ok(Some(n)) => match n.channel() {
                    "kiln_flow" => wakeups.flow.notify_waiters(),
                    "kiln_events" => wakeups.events_kick.notify_one(),
                    "kiln_events_ready" => wakeups.events_ready.notify_waiters(),
                    "kiln_logs" => wakeups.logs.notify_waiters(),
                    _ => wakeups.jobs.notify_waiters(),
                },
                Ok(None) => {
                    // The connection was lost and will be re-established.
                    wake_all();
                    if pool.is_closed() {
                        return;
                    }
                }
                Err(_) => {
                    wake_all();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

impl PgStore {
    pub async fn module_usage(&self, tenant: &str) -> DbResult<(u64, u64)> {
        let (count, bytes): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(size), 0)::BIGINT FROM modules WHERE tenant = $1",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?;
        Ok((count.max(0) as u64, bytes.max(0) as u64))
    }

    pub async fn module_holders(&self, id: &str) -> DbResult<u64> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM modules WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(count.max(0) as u64)
    }
}

/// Writes attempt ends in one statement (the fence: a row only moves while
/// it is running on that attempt); on a pool or inside a transaction.
pub(crate) async fn complete_on<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    done: &[Completion],
) -> Result<Vec<i64>, sqlx::Error> {
    Ok(complete_rows(executor, done)
        .await?
        .into_iter()
        .map(|(id, _, _)| id)
        .collect())
}

/// [`complete_on`], with each written job's run and the status it took.
pub(crate) async fn complete_rows<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    done: &[Completion],
) -> Result<Vec<(i64, Option<i64>, String)>, sqlx::Error> {
    let sql = format!(
        "WITH {} {} RETURNING j.id, j.run_id, j.status",
        lock_in_id_order("$1"),
        complete_update()
    );
    bind_completions(sqlx::query_as(&sql), done)
        .fetch_all(executor)
        .await
}

/// Attempt ends from eight arrays ([`bind_completions`]), each applied only
/// while its job is still on that attempt; needs the `locked` CTE of
/// `lock_in_id_order("$1")` before it.
pub(crate) fn complete_update() -> String {
    format!(
        "UPDATE jobs j SET \
     status = CASE WHEN j.cancel_requested AND u.status = 'scheduled' THEN 'cancelled' ELSE u.status END, \
     finished_at = CASE WHEN u.status = 'scheduled' AND NOT j.cancel_requested THEN NULL ELSE u.finished_at END, \
     run_at = COALESCE(u.run_at, j.run_at), result = u.result, \
     error = u.error, lease_expires_at = NULL, history = {HISTORY_APPEND} \
     FROM unnest($1::int8[], $2::int4[], $3::text[], $4::int8[], $5::int8[], $6::text[], \
       $7::text[], $8::text[]) AS u(id, attempt, status, finished_at, run_at, result, error, record), \
       locked l \
     WHERE j.id = u.id AND l.id = u.id AND j.attempt = u.attempt AND j.status = 'running'"
    )
}

pub(crate) fn bind_completions<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    done: &[Completion],
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(done.iter().map(|c| c.id).collect::<Vec<i64>>())
        .bind(done.iter().map(|c| c.attempt).collect::<Vec<i32>>())
        .bind(
            done.iter()
                .map(|c| c.status.as_str().to_string())
                .collect::<Vec<String>>(),
        )
        .bind(
            done.iter()
                .map(|c| c.record.finished_at)
                .collect::<Vec<i64>>(),
        )
        .bind(done.iter().map(|c| c.run_at).collect::<Vec<Option<i64>>>())
        .bind(
            done.iter()
                .map(|c| result_json(&c.result))
                .collect::<Vec<Option<String>>>(),
        )
        .bind(
            done.iter()
                .map(|c| storable_error(c.error.as_deref()))
                .collect::<Vec<Option<String>>>(),
        )
        .bind(
            done.iter()
                .map(|c| record_json(&c.record))
                .collect::<Vec<String>>(),
        )
}
