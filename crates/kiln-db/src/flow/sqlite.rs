//! The flow statements on SQLite. Writes go through the one writer
//! connection, so a transaction there already excludes every other writer:
//! locking the run row is reading it.

use kiln_core::{Millis, NewJob};
use sqlx::pool::PoolConnection;
use sqlx::{Sqlite, SqliteConnection, SqlitePool};

use super::schedules::{as_text, FireRow, ScheduleRow, FIRE_COLUMNS, SCHEDULE_COLUMNS};
use super::{
    instance_item, step_detail, FlowTx, InstanceRecord, InstanceRow, NewRunRow, PipelineRecord,
    PipelineRow, RunEndedRow, RunFilter, RunRecord, RunRow, StepRecord, StepRow, ENDED_ELEMENTS,
    INSTANCE_COLUMNS, RUN_COLUMNS, STEP_COLUMNS,
};
use super::{FireRecord, ScheduleRecord};
use crate::audit::note::Change;
use crate::rows::{rows_to, EncodedJob};
use crate::{DbResult, SqliteStore};

/// [`FlowTx::lease_ready`]'s statement, its five parameters (worker, now,
/// lease end, ids, kinds) from `n` on. "Waiting ahead" is probed per
/// (kind, priority) on the fetch index, so it costs one index descent each,
/// never a scan.
fn lease_ready_sql(n: usize) -> String {
    crate::lease::renumber(
        &format!(
            "UPDATE jobs SET {} WHERE id IN (SELECT value FROM json_each($4)) \
             AND status = 'queued' AND NOT held AND run_at <= $2 \
             AND kind IN (SELECT value FROM json_each($5)) \
             AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.tenant = jobs.tenant \
               AND q.name = jobs.queue AND (q.paused OR q.concurrency_limit IS NOT NULL)) \
             AND NOT EXISTS (SELECT 1 FROM json_each($5) k, \
               (SELECT 0 AS pr UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3) p \
               WHERE p.pr <= jobs.priority AND EXISTS (SELECT 1 FROM jobs w INDEXED BY jobs_fetch \
                 WHERE w.kind = k.value AND w.priority = p.pr \
                 AND w.status IN ('queued','scheduled') AND NOT w.held AND w.run_at < $2)) \
             RETURNING {}",
            crate::lease::LEASE_SET,
            crate::rows::LEASED_COLUMNS
        ),
        '?',
        n,
    )
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

fn bind_lease<'q>(
    query: SqliteQuery<'q>,
    ids: &[i64],
    request: &crate::lease::LeaseRequest<'q>,
) -> SqliteQuery<'q> {
    query
        .bind(request.worker_id)
        .bind(request.now)
        .bind(request.lease_until())
        .bind(ids_json(ids))
        .bind(serde_json::to_string(request.kinds).unwrap_or_else(|_| "[]".into()))
}

impl SqliteFlowTx {
    /// Leased rows decoded; a row that cannot be read fails its job.
    async fn leased(
        &mut self,
        rows: Vec<sqlx::sqlite::SqliteRow>,
        now: Millis,
    ) -> DbResult<Vec<kiln_core::LeasedJob>> {
        let rows = rows
            .iter()
            .map(<crate::rows::LeasedRow as sqlx::FromRow<_>>::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let (jobs, unreadable) = crate::lease::decode(rows);
        for (id, error) in unreadable {
            sqlx::query(&crate::lease::FAIL_UNREADABLE.replace('$', "?"))
                .bind(now)
                .bind(error)
                .bind(id)
                .execute(&mut *self.tx)
                .await?;
        }
        Ok(jobs)
    }
}

pub(crate) struct SqliteFlowTx {
    tx: TxConn,
}

/// A pooled connection in a transaction kiln began itself, so that `BEGIN`
/// can travel with the first statement (each statement is a trip to the
/// connection's thread). Dropped before [`TxConn::commit`], its transaction
/// is rolled back before the connection goes back to the pool.
struct TxConn {
    conn: Option<PoolConnection<Sqlite>>,
}

impl TxConn {
    async fn commit(mut self) -> Result<(), sqlx::Error> {
        if let Some(conn) = self.conn.as_mut() {
            sqlx::query("COMMIT").execute(&mut **conn).await?;
        }
        self.conn = None;
        Ok(())
    }
}

impl std::ops::Deref for TxConn {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.conn
            .as_deref()
            .expect("a transaction's connection is held until it ends")
    }
}

impl std::ops::DerefMut for TxConn {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_deref_mut()
            .expect("a transaction's connection is held until it ends")
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            // The connection returns to the pool once the rollback is done;
            // one whose rollback failed is closed instead (closing a SQLite
            // connection rolls its transaction back), never pooled mid-way.
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(error) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
                        tracing::warn!(%error, "a dropped transaction did not roll back; closing its connection");
                        conn.close_on_drop();
                    }
                });
            }
            // Closed, as above (sqlx needs the runtime to drop a pooled
            // connection at all; there is none only as the process ends).
            Err(_) => conn.close_on_drop(),
        }
    }
}

impl SqliteFlowTx {
    pub(crate) async fn begin(pool: &SqlitePool) -> DbResult<SqliteFlowTx> {
        let mut tx = TxConn {
            conn: Some(pool.acquire().await?),
        };
        sqlx::query("BEGIN").execute(&mut *tx).await?;
        Ok(SqliteFlowTx { tx })
    }

    /// Begins a transaction with one attempt's end in it, and, if the job
    /// is a step of a run, takes that run's ends of the job as
    /// [`FlowTx::take_run_ends`] does, `steps` included: one trip for what
    /// a chained step's completion reads first. The ends come back whatever
    /// the job's status (a retry is not an end: the caller looks).
    pub(crate) async fn complete_one(
        pool: &SqlitePool,
        done: &crate::Completion,
        steps: &[String],
    ) -> DbResult<(
        SqliteFlowTx,
        Vec<(i64, Option<i64>, String)>,
        Option<super::RunEnds>,
    )> {
        let mut tx = TxConn {
            conn: Some(pool.acquire().await?),
        };
        let run = "(SELECT run_id FROM jobs WHERE id = ?1)";
        let sql = format!(
            "BEGIN; {} RETURNING id, run_id, status; {}",
            crate::sqlite::COMPLETE_ONE,
            run_ends_sql(run, "json_array(?1)", "?2")
        );
        let steps = serde_json::to_string(steps).unwrap_or_else(|_| "[]".into());
        let rows = crate::sqlite::bind_completion(sqlx::query(&sql), done, Some(steps))
            .fetch_all(&mut *tx)
            .await?;
        let mut written = Vec::new();
        let mut ends = None;
        for row in rows {
            if sqlx::Row::columns(&row).len() == 3 {
                written.push(sqlx::FromRow::from_row(&row)?);
            } else {
                let row: RunEndedRow = sqlx::FromRow::from_row(&row)?;
                ends = Some(row.split()?);
            }
        }
        Ok((SqliteFlowTx { tx }, written, ends))
    }
}

/// [`FlowTx::take_run_ends`]'s statements, over SQL expressions for the
/// run's id, the jobs (a JSON array) and the steps (a JSON array). One
/// writer: the run is this transaction's.
fn run_ends_sql(run: &str, jobs: &str, steps: &str) -> String {
    format!(
        "DELETE FROM flow_outbox WHERE run_id = {run} \
           AND job_id IN (SELECT value FROM json_each({jobs})); \
         SELECT {RUN_COLUMNS}, (SELECT json_group_array(json_array({ENDED_ELEMENTS})) \
           FROM run_instances i JOIN jobs j ON j.id = i.job_id \
           WHERE i.run_id = runs.id AND j.run_id = runs.id \
           AND i.job_id IN (SELECT value FROM json_each({jobs}))) AS ended, \
           (SELECT json_group_array(json_array({STEP_COLUMNS})) FROM run_steps \
           WHERE run_id = runs.id AND step IN (SELECT value FROM json_each({steps}))) AS steps \
         FROM runs WHERE id = {run}"
    )
}

fn ids_json(ids: &[i64]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".into())
}

/// Upserts the step rows of the JSON array in parameter `n` for the run in
/// parameter 1.
fn steps_upsert(n: u8) -> String {
    format!(
        "INSERT INTO run_steps (run_id, step, status, total, succeeded, failed, started_at, \
           finished_at, deadline_at, detail) \
         SELECT ?1, value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
           value ->> 5, value ->> 6, value ->> 7, value ->> 8 FROM json_each(?{n}) WHERE true \
         ON CONFLICT (run_id, step) DO UPDATE SET status = excluded.status, \
           total = excluded.total, succeeded = excluded.succeeded, failed = excluded.failed, \
           started_at = excluded.started_at, finished_at = excluded.finished_at, \
           deadline_at = excluded.deadline_at, detail = excluded.detail"
    )
}

fn step_rows(steps: &[&StepRecord]) -> String {
    let rows: Vec<serde_json::Value> = steps
        .iter()
        .map(|s| {
            serde_json::json!([
                s.step,
                s.status.as_str(),
                s.total,
                s.succeeded,
                s.failed,
                s.started_at,
                s.finished_at,
                s.deadline_at,
                step_detail(s),
            ])
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// Upserts the instance rows of the JSON array in parameter `n` for the run
/// in parameter 1.
fn instances_upsert(n: u8) -> String {
    format!(
        "INSERT INTO run_instances (run_id, step, idx, attempt, job_id, status, item, \
           exit_code, stdout, error, started_at, finished_at) \
         SELECT ?1, value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
           value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10 \
         FROM json_each(?{n}) WHERE true \
         ON CONFLICT (run_id, step, idx) DO UPDATE SET attempt = excluded.attempt, \
           job_id = excluded.job_id, status = excluded.status, item = excluded.item, \
           exit_code = excluded.exit_code, stdout = excluded.stdout, error = excluded.error, \
           started_at = excluded.started_at, finished_at = excluded.finished_at"
    )
}

fn instance_rows(rows: &[InstanceRecord]) -> String {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!([
                r.step,
                r.index,
                r.attempt,
                r.job_id,
                r.status,
                instance_item(r),
                r.exit_code,
                r.stdout,
                r.error,
                r.started_at,
                r.finished_at,
            ])
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

#[async_trait::async_trait]
impl FlowTx for SqliteFlowTx {
    async fn audit_insert(&mut self, record: &kiln_core::audit::AuditRecord) -> DbResult<()> {
        crate::audit::insert_sqlite(&mut self.tx, record).await?;
        Ok(())
    }

    async fn policy_version(&mut self, tenant: &str) -> DbResult<i64> {
        Ok(crate::policies::load_on!(version, &mut *self.tx, tenant)?)
    }

    async fn policy_rows(&mut self, tenant: &str) -> DbResult<Vec<crate::policies::PolicyRow>> {
        Ok(crate::policies::load_on!(rows, &mut *self.tx, tenant)?)
    }

    async fn lock_run(&mut self, id: i64) -> DbResult<Option<RunRecord>> {
        let row: Option<RunRow> =
            sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))
                .bind(id)
                .fetch_optional(&mut *self.tx)
                .await?;
        row.map(RunRecord::try_from).transpose()
    }

    async fn get_run(&mut self, tenant: &str, id: i64) -> DbResult<Option<RunRecord>> {
        let row: Option<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE id = ? AND tenant = ?"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(RunRecord::try_from).transpose()
    }

    async fn insert_run(&mut self, run: &NewRunRow<'_>) -> DbResult<Option<i64>> {
        let started = (run.status == kiln_flow::RunStatus::Running).then_some(run.now);
        Ok(sqlx::query_scalar(
            "INSERT INTO runs (tenant, pipeline, version, status, params, labels, idempotency_key, \
             trigger, created_at, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (tenant, pipeline, idempotency_key) WHERE idempotency_key IS NOT NULL \
             DO NOTHING RETURNING id",
        )
        .bind(run.tenant)
        .bind(run.pipeline)
        .bind(run.version)
        .bind(run.status.as_str())
        .bind(&run.params)
        .bind(&run.labels)
        .bind(run.idempotency_key)
        .bind(run.trigger)
        .bind(run.now)
        .bind(started)
        .fetch_optional(&mut *self.tx)
        .await?)
    }

    async fn run_by_key(
        &mut self,
        tenant: &str,
        pipeline: &str,
        key: &str,
    ) -> DbResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM runs WHERE tenant = ? AND pipeline = ? AND idempotency_key = ?",
        )
        .bind(tenant)
        .bind(pipeline)
        .bind(key)
        .fetch_optional(&mut *self.tx)
        .await?)
    }

    async fn update_run(&mut self, run: &RunRecord) -> DbResult<()> {
        sqlx::query(
            "UPDATE runs SET status = ?2, mode = ?3, attempt = ?4, reason = ?5, detail = ?6, \
             started_at = ?7, finished_at = ?8 WHERE id = ?1",
        )
        .bind(run.id)
        .bind(run.status.as_str())
        .bind(run.mode.as_str())
        .bind(run.attempt)
        .bind(&run.reason)
        .bind(run.detail.as_ref().map(|d| d.to_string()))
        .bind(run.started_at)
        .bind(run.finished_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn active_runs(&mut self, tenant: &str, pipeline: &str) -> DbResult<(i64, Option<i64>)> {
        Ok(sqlx::query_as(
            "SELECT COALESCE(SUM(status = 'running'), 0), MIN(CASE WHEN status = 'queued' THEN id END) \
             FROM runs WHERE tenant = ? AND pipeline = ? AND status IN ('queued', 'running')",
        )
        .bind(tenant)
        .bind(pipeline)
        .fetch_one(&mut *self.tx)
        .await?)
    }

    async fn steps(&mut self, run_id: i64) -> DbResult<Vec<StepRecord>> {
        let rows: Vec<StepRow> = sqlx::query_as(&format!(
            "SELECT {STEP_COLUMNS} FROM run_steps WHERE run_id = ?"
        ))
        .bind(run_id)
        .fetch_all(&mut *self.tx)
        .await?;
        rows_to(rows)
    }

    async fn steps_named(&mut self, run_id: i64, names: &[String]) -> DbResult<Vec<StepRecord>> {
        let rows: Vec<StepRow> = sqlx::query_as(&format!(
            "SELECT {STEP_COLUMNS} FROM run_steps WHERE run_id = ? \
             AND step IN (SELECT value FROM json_each(?))"
        ))
        .bind(run_id)
        .bind(serde_json::to_string(names).unwrap_or_else(|_| "[]".into()))
        .fetch_all(&mut *self.tx)
        .await?;
        rows_to(rows)
    }

    async fn step_counts(&mut self, run_id: i64) -> DbResult<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT COALESCE(SUM(status IN ('succeeded','failed','skipped','cancelled')), 0), \
             COALESCE(SUM(status IN ('failed','cancelled')), 0) FROM run_steps WHERE run_id = ?",
        )
        .bind(run_id)
        .fetch_one(&mut *self.tx)
        .await?)
    }

    async fn put_steps(&mut self, run_id: i64, steps: &[&StepRecord]) -> DbResult<()> {
        // All rows in one statement, as a JSON array of rows: one trip to
        // the connection's thread whatever the count.
        sqlx::query(&steps_upsert(2))
            .bind(run_id)
            .bind(step_rows(steps))
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn put_rows(
        &mut self,
        run_id: i64,
        instances: &[InstanceRecord],
        steps: &[&StepRecord],
    ) -> DbResult<()> {
        sqlx::query(&format!("{}; {}", instances_upsert(2), steps_upsert(3)))
            .bind(run_id)
            .bind(instance_rows(instances))
            .bind(step_rows(steps))
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn instances(
        &mut self,
        run_id: i64,
        steps: Option<&[String]>,
    ) -> DbResult<Vec<InstanceRecord>> {
        let steps = steps.map(|s| serde_json::to_string(s).unwrap_or_else(|_| "[]".into()));
        let rows: Vec<InstanceRow> = sqlx::query_as(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM run_instances WHERE run_id = ?1 \
             AND (?2 IS NULL OR step IN (SELECT value FROM json_each(?2))) ORDER BY step, idx"
        ))
        .bind(run_id)
        .bind(steps)
        .fetch_all(&mut *self.tx)
        .await?;
        rows_to(rows)
    }

    async fn put_instances(&mut self, run_id: i64, rows: &[InstanceRecord]) -> DbResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        sqlx::query(&instances_upsert(2))
            .bind(run_id)
            .bind(instance_rows(rows))
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn job_files(&mut self, run_id: i64, job_ids: &[i64]) -> DbResult<Vec<(i64, String)>> {
        Ok(sqlx::query_as(
            "SELECT id, COALESCE(json_extract(result, '$.files'), '[]') FROM jobs \
             WHERE id IN (SELECT value FROM json_each(?)) AND run_id = ?",
        )
        .bind(ids_json(job_ids))
        .bind(run_id)
        .fetch_all(&mut *self.tx)
        .await?)
    }

    async fn insert_jobs(
        &mut self,
        jobs: &[NewJob],
        run_id: Option<i64>,
        now: Millis,
        _quiet: bool,
    ) -> DbResult<Vec<i64>> {
        let mut ids = Vec::with_capacity(jobs.len());
        for job in jobs {
            crate::storable_job(job)?;
            let e = EncodedJob::new(job, now);
            // No ON CONFLICT: a step job made twice is a broken invariant,
            // and the unique key refuses it by aborting the whole advance.
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO jobs (tenant, kind, queue, priority, status, spec, labels, \
                 max_attempts, timeout_ms, backoff, permanent_exit_codes, idempotency_key, run_at, \
                 created_at, run_id, held) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, \
                 ?12, ?13, ?14, ?15, EXISTS (SELECT 1 FROM queues q WHERE q.tenant = ?1 \
                 AND q.name = ?3 AND (q.paused OR q.concurrency_limit IS NOT NULL))) RETURNING id",
            )
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
            .bind(run_id)
            .fetch_one(&mut *self.tx)
            .await?;
            ids.push(id);
        }
        Ok(ids)
    }

    async fn notify_jobs(&mut self) -> DbResult<()> {
        // One process: its callers wake its own workers.
        Ok(())
    }

    async fn cancel_jobs(&mut self, ids: &[i64], now: Millis) -> DbResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(&format!(
            "UPDATE jobs SET {} WHERE id IN (SELECT value FROM json_each(?2)) \
             AND status IN ('queued','scheduled','running')",
            crate::rows::CANCEL_SET.replace('$', "?")
        ))
        .bind(now)
        .bind(ids_json(ids))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn take_outbox(
        &mut self,
        run: Option<i64>,
        limit: i64,
    ) -> DbResult<Vec<(i64, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT id, run_id, job_id FROM flow_outbox WHERE (?1 IS NULL OR run_id = ?1) \
             ORDER BY id LIMIT ?2",
        )
        .bind(run)
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?)
    }

    async fn delete_outbox(&mut self, ids: &[i64]) -> DbResult<()> {
        sqlx::query("DELETE FROM flow_outbox WHERE id IN (SELECT value FROM json_each(?))")
            .bind(ids_json(ids))
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn complete_jobs(
        &mut self,
        done: &[crate::Completion],
    ) -> DbResult<Vec<(i64, Option<i64>, String)>> {
        Ok(crate::sqlite::complete_rows(&mut self.tx, done).await?)
    }

    async fn take_run_ends(
        &mut self,
        run_id: i64,
        job_ids: &[i64],
        steps: &[String],
    ) -> DbResult<Option<super::RunEnds>> {
        // One trip for both statements; only the SELECT returns a row.
        let row: Option<RunEndedRow> = sqlx::query_as(&run_ends_sql("?1", "?2", "?3"))
            .bind(run_id)
            .bind(ids_json(job_ids))
            .bind(serde_json::to_string(steps).unwrap_or_else(|_| "[]".into()))
            .fetch_optional(&mut *self.tx)
            .await?;
        row.map(RunEndedRow::split).transpose()
    }

    async fn lease_ready(
        &mut self,
        ids: &[i64],
        request: &crate::lease::LeaseRequest<'_>,
    ) -> DbResult<Vec<kiln_core::LeasedJob>> {
        let rows = bind_lease(sqlx::query(&lease_ready_sql(1)), ids, request)
            .fetch_all(&mut *self.tx)
            .await?;
        self.leased(rows, request.now).await
    }

    async fn put_rows_leasing(
        &mut self,
        run_id: i64,
        instances: &[InstanceRecord],
        steps: &[&StepRecord],
        ids: &[i64],
        request: &crate::lease::LeaseRequest<'_>,
    ) -> DbResult<Vec<kiln_core::LeasedJob>> {
        // One trip to the connection's thread; only the lease returns rows.
        let sql = format!(
            "{}; {}; {}",
            instances_upsert(2),
            steps_upsert(3),
            lease_ready_sql(4)
        );
        let query = sqlx::query(&sql)
            .bind(run_id)
            .bind(instance_rows(instances))
            .bind(step_rows(steps));
        let rows = bind_lease(query, ids, request)
            .fetch_all(&mut *self.tx)
            .await?;
        self.leased(rows, request.now).await
    }

    async fn definition(
        &mut self,
        tenant: &str,
        name: &str,
        version: Option<i32>,
    ) -> DbResult<Option<PipelineRecord>> {
        let row: Option<PipelineRow> = sqlx::query_as(
            "SELECT name, version, definition, created_at FROM pipelines \
             WHERE tenant = ?1 AND name = ?2 AND (?3 IS NULL OR version = ?3) \
             AND (?3 IS NOT NULL OR NOT deleted) ORDER BY version DESC LIMIT 1",
        )
        .bind(tenant)
        .bind(name)
        .bind(version)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(PipelineRecord::try_from).transpose()
    }

    async fn waiting_past(&mut self, now: Millis, limit: i64) -> DbResult<Vec<(i64, String)>> {
        Ok(sqlx::query_as(
            "SELECT run_id, step FROM run_steps WHERE status = 'waiting' AND deadline_at < ? \
             ORDER BY deadline_at LIMIT ?",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?)
    }

    async fn schedule_put(&mut self, s: &ScheduleRecord) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO schedules (tenant, name, cron, timezone, target, overlap, catch_up, paused, \
               next_fire_at, last_fire_at, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
             ON CONFLICT (tenant, name) DO UPDATE SET cron = excluded.cron, \
               timezone = excluded.timezone, target = excluded.target, overlap = excluded.overlap, \
               catch_up = excluded.catch_up, paused = excluded.paused, \
               next_fire_at = excluded.next_fire_at, updated_at = excluded.updated_at",
        )
        .bind(&s.tenant)
        .bind(&s.name)
        .bind(&s.cron)
        .bind(&s.timezone)
        .bind(s.target.to_string())
        .bind(as_text(&s.overlap))
        .bind(as_text(&s.catch_up))
        .bind(s.paused)
        .bind(s.next_fire_at)
        .bind(s.last_fire_at)
        .bind(s.created_at)
        .bind(s.updated_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn schedule_get(&mut self, tenant: &str, name: &str) -> DbResult<Option<ScheduleRecord>> {
        let row: Option<ScheduleRow> = sqlx::query_as(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE tenant = ?1 AND name = ?2"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(ScheduleRecord::try_from).transpose()
    }

    async fn schedule_list(&mut self, tenant: &str) -> DbResult<Vec<ScheduleRecord>> {
        let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE tenant = ?1 ORDER BY name"
        ))
        .bind(tenant)
        .fetch_all(&mut *self.tx)
        .await?;
        rows_to(rows)
    }

    async fn schedule_delete(&mut self, tenant: &str, name: &str) -> DbResult<bool> {
        let done = sqlx::query("DELETE FROM schedules WHERE tenant = ?1 AND name = ?2")
            .bind(tenant)
            .bind(name)
            .execute(&mut *self.tx)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn schedules_due(&mut self, now: Millis, limit: i64) -> DbResult<Vec<ScheduleRecord>> {
        let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE NOT paused AND next_fire_at <= ?1 \
             ORDER BY next_fire_at LIMIT ?2"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?;
        rows_to(rows)
    }

    async fn schedule_moved(&mut self, s: &ScheduleRecord) -> DbResult<()> {
        sqlx::query(
            "UPDATE schedules SET paused = ?3, next_fire_at = ?4, last_fire_at = ?5, updated_at = ?6 \
             WHERE tenant = ?1 AND name = ?2",
        )
        .bind(&s.tenant)
        .bind(&s.name)
        .bind(s.paused)
        .bind(s.next_fire_at)
        .bind(s.last_fire_at)
        .bind(s.updated_at)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn fire_insert(&mut self, f: &FireRecord) -> DbResult<bool> {
        let done = sqlx::query(
            "INSERT INTO schedule_fires (tenant, schedule, tick, fired_at, outcome) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (tenant, schedule, tick) DO NOTHING",
        )
        .bind(&f.tenant)
        .bind(&f.schedule)
        .bind(f.tick)
        .bind(f.fired_at)
        .bind(&f.outcome)
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn fire_update(&mut self, f: &FireRecord) -> DbResult<()> {
        sqlx::query(
            "UPDATE schedule_fires SET outcome = ?4, job_id = ?5, run_id = ?6, error = ?7 \
             WHERE tenant = ?1 AND schedule = ?2 AND tick = ?3",
        )
        .bind(&f.tenant)
        .bind(&f.schedule)
        .bind(f.tick)
        .bind(&f.outcome)
        .bind(f.job_id)
        .bind(f.run_id)
        .bind(f.error.as_deref().map(|e| e.replace('\0', "\u{FFFD}")))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn fires(&mut self, tenant: &str, name: &str, limit: i64) -> DbResult<Vec<FireRecord>> {
        let rows: Vec<FireRow> = sqlx::query_as(&format!(
            "SELECT {FIRE_COLUMNS} FROM schedule_fires WHERE tenant = ?1 AND schedule = ?2 \
             ORDER BY tick DESC LIMIT ?3"
        ))
        .bind(tenant)
        .bind(name)
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows.into_iter().map(FireRecord::from).collect())
    }

    async fn last_fire(&mut self, tenant: &str, name: &str) -> DbResult<Option<FireRecord>> {
        let row: Option<FireRow> = sqlx::query_as(&format!(
            "SELECT {FIRE_COLUMNS} FROM schedule_fires WHERE tenant = ?1 AND schedule = ?2 \
             AND (job_id IS NOT NULL OR run_id IS NOT NULL) ORDER BY tick DESC LIMIT 1"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_optional(&mut *self.tx)
        .await?;
        Ok(row.map(FireRecord::from))
    }

    async fn job_active(&mut self, id: i64) -> DbResult<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE id = ?1 \
             AND status IN ('queued','scheduled','running'))",
        )
        .bind(id)
        .fetch_one(&mut *self.tx)
        .await?)
    }

    async fn run_exists(&mut self, id: i64) -> DbResult<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM runs WHERE id = ?)")
                .bind(id)
                .fetch_one(&mut *self.tx)
                .await?,
        )
    }

    async fn run_active(&mut self, id: i64) -> DbResult<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM runs WHERE id = ?1 AND status IN ('queued','running'))",
        )
        .bind(id)
        .fetch_one(&mut *self.tx)
        .await?)
    }

    async fn queue_serial(&mut self, tenant: &str, name: &str, now: Millis) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO queues (tenant, name, paused, concurrency_limit, updated_at) \
             VALUES (?1, ?2, FALSE, 1, ?3) ON CONFLICT (tenant, name) DO NOTHING",
        )
        .bind(tenant)
        .bind(name)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> DbResult<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

impl SqliteStore {
    pub(crate) async fn pipeline_put(
        &self,
        tenant: &str,
        name: &str,
        definition: &serde_json::Value,
        now: Millis,
    ) -> DbResult<PipelineRecord> {
        let resource = format!("/api/v1/pipelines/{name}");
        let row: PipelineRow = crate::audit::audited_in!(self.write, |tx| {
            let row: PipelineRow = sqlx::query_as(
                "INSERT INTO pipelines (tenant, name, version, definition, created_at) \
                 SELECT ?1, ?2, COALESCE(MAX(version), 0) + 1, ?3, ?4 FROM pipelines \
                 WHERE tenant = ?1 AND name = ?2 \
                 RETURNING name, version, definition, created_at",
            )
            .bind(tenant)
            .bind(name)
            .bind(definition.to_string())
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            crate::audit::stamp!(&mut *tx, Change::Created, Some(&resource));
            row
        });
        PipelineRecord::try_from(row)
    }

    pub(crate) async fn schedule_next_due(&self) -> DbResult<Option<Millis>> {
        Ok(
            sqlx::query_scalar("SELECT MIN(next_fire_at) FROM schedules WHERE NOT paused")
                .fetch_one(&self.read)
                .await?,
        )
    }

    pub(crate) async fn pipeline_list(&self, tenant: &str) -> DbResult<Vec<PipelineRecord>> {
        let rows: Vec<PipelineRow> = sqlx::query_as(
            "SELECT name, version, definition, created_at FROM pipelines p \
             WHERE tenant = ?1 AND NOT deleted AND version = (SELECT MAX(version) FROM pipelines q \
               WHERE q.tenant = p.tenant AND q.name = p.name) ORDER BY name",
        )
        .bind(tenant)
        .fetch_all(&self.read)
        .await?;
        rows_to(rows)
    }

    pub(crate) async fn pipeline_versions(
        &self,
        tenant: &str,
        name: &str,
    ) -> DbResult<Vec<(i32, Millis)>> {
        Ok(sqlx::query_as(
            "SELECT version, created_at FROM pipelines WHERE tenant = ? AND name = ? ORDER BY version",
        )
        .bind(tenant)
        .bind(name)
        .fetch_all(&self.read)
        .await?)
    }

    pub(crate) async fn pipeline_delete(&self, tenant: &str, name: &str) -> DbResult<bool> {
        let done = crate::audit::audited_in!(self.write, |tx| {
            let done = sqlx::query(
                "UPDATE pipelines SET deleted = TRUE WHERE tenant = ? AND name = ? AND NOT deleted",
            )
            .bind(tenant)
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done > 0 {
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            done
        });
        Ok(done > 0)
    }

    pub(crate) async fn run_list(&self, tenant: &str, f: &RunFilter) -> DbResult<Vec<RunRecord>> {
        let (label_key, label_value) = match &f.label {
            Some((k, v)) => (Some(format!("$.\"{k}\"")), Some(v.as_str())),
            None => (None, None),
        };
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE tenant = ?1 \
             AND (?2 IS NULL OR pipeline = ?2) AND (?3 IS NULL OR status = ?3) \
             AND (?4 IS NULL OR json_extract(labels, ?4) = ?5) \
             AND (?6 IS NULL OR id < ?6) ORDER BY id DESC LIMIT ?7"
        ))
        .bind(tenant)
        .bind(&f.pipeline)
        .bind(f.status.map(|s| s.as_str()))
        .bind(label_key)
        .bind(label_value)
        .bind(f.before_id)
        .bind(f.limit)
        .fetch_all(&self.read)
        .await?;
        rows_to(rows)
    }
}
