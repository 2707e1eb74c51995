//! The flow statements on PostgreSQL: batched through `unnest` arrays, the
//! run row locked `FOR UPDATE`, the outbox taken `FOR UPDATE SKIP LOCKED` so
//! advancers on many hosts share it.

use kiln_core::{Millis, NewJob};
use std::sync::{Arc, LazyLock};

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::OwnedMutexGuard;

use super::schedules::{as_text, FireRow, ScheduleRow, FIRE_COLUMNS, SCHEDULE_COLUMNS};
use super::{
    instance_item, step_detail, storable, FlowTx, InstanceRecord, InstanceRow, NewRunRow,
    PipelineRecord, PipelineRow, RunEndedRow, RunFilter, RunRecord, RunRow, StepRecord, StepRow,
    ENDED_ELEMENTS, INSTANCE_COLUMNS, RUN_COLUMNS, STEP_COLUMNS,
};
use super::{FireRecord, ScheduleRecord};
use crate::audit::note::Change;
use crate::rows::{rows_to, EncodedJob};
use crate::{DbResult, PgStore};

pub(crate) struct PgFlowTx {
    conn: TxConn,
}

enum TxConn {
    Pooled(Transaction<'static, Postgres>),
    Lane(LaneTx),
}

/// A connection kept out of the pool for chained step ends, which come one
/// at a time from each worker's completer. The pool answers every release
/// with a ping (sqlx tests a returned connection with a round trip), which
/// on a chain is one trip more per step; a connection that is never
/// returned never pays it.
#[derive(Default)]
pub(crate) struct StepLane {
    conn: Option<PgConnection>,
}

impl StepLane {
    pub(crate) async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

pub(crate) type Lane = Arc<tokio::sync::Mutex<StepLane>>;

/// The lane's session plans every statement once, generic, and by index:
/// a step's statements look rows up by key (a job, its instance, the run,
/// its steps), which an index finds in a few pages however large the
/// tables grow. Left to its statistics, PostgreSQL plans a table it last
/// saw small (a new install, a run's first minute, a server without
/// autovacuum) as a sequential scan, and a cached plan keeps scanning as
/// the table grows: at a thousand jobs, four such scans were a third of a
/// step's time. Plans the connection cached in the pool are dropped, so
/// every plan of the lane is made under these settings.
const LANE_SESSION: &str =
    "SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan; DISCARD PLANS";

#[cfg(feature = "testing")]
pub(crate) async fn lane_pid(lane: &Lane) -> Option<i32> {
    let mut held = lane.lock().await;
    let conn = held.conn.as_mut()?;
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .ok()
}

struct LaneTx {
    lane: OwnedMutexGuard<StepLane>,
    committed: bool,
}

impl Drop for LaneTx {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Whatever left the transaction open (a stale end, an error, a
        // future dropped mid-statement), the connection goes: closing it
        // makes the server roll back, and no later step inherits its state.
        if let Some(conn) = self.lane.conn.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = sqlx::Connection::close(conn).await;
                });
            }
        }
    }
}

impl PgFlowTx {
    pub(crate) async fn begin(pool: &PgPool) -> DbResult<PgFlowTx> {
        Ok(PgFlowTx {
            conn: TxConn::Pooled(pool.begin().await?),
        })
    }

    /// Begins on the lane's connection when no other completer holds it,
    /// else on a pooled one. A lane connection that fails to begin (the
    /// server ended it) is dropped, and a fresh one from the pool takes its
    /// place.
    async fn begin_step(pool: &PgPool, lane: &Lane) -> DbResult<PgFlowTx> {
        let Ok(mut held) = lane.clone().try_lock_owned() else {
            return Self::begin(pool).await;
        };
        for last in [false, true] {
            let conn = match held.conn.as_mut() {
                Some(conn) => conn,
                None => {
                    let mut conn = pool.acquire().await?.detach();
                    sqlx::Executor::execute(&mut conn, LANE_SESSION).await?;
                    held.conn.insert(conn)
                }
            };
            match sqlx::Executor::execute(conn, "BEGIN").await {
                Ok(_) => {
                    return Ok(PgFlowTx {
                        conn: TxConn::Lane(LaneTx {
                            lane: held,
                            committed: false,
                        }),
                    })
                }
                Err(error) => {
                    held.conn = None;
                    if last {
                        return Err(error.into());
                    }
                }
            }
        }
        unreachable!("the last pass returns")
    }

    fn c(&mut self) -> &mut PgConnection {
        match &mut self.conn {
            TxConn::Pooled(tx) => tx,
            TxConn::Lane(tx) => tx
                .lane
                .conn
                .as_mut()
                .expect("a lane transaction holds its connection"),
        }
    }

    /// Begins a transaction that records one attempt's end and, if the job
    /// reached a final state as a step of a run no other transaction holds,
    /// locks that run and reads its ends of the job and the rows of `steps`
    /// as [`FlowTx::take_run_ends`] does, all in one statement. The read is
    /// `kiln_run_locked_read`'s (migration 0030): a VOLATILE function's
    /// query takes its snapshot when it runs, after the lock, where the
    /// statement's own would predate it (a run whose last holder committed
    /// while this statement waited for the job's row would be read as it
    /// was before that holder's writes).
    /// The end of a run taken so gets no outbox row (`kiln.outbox_taken`,
    /// read by the outbox trigger at the statement's end); a held run's end
    /// goes to the outbox as any other.
    pub(crate) async fn complete_one(
        pool: &PgPool,
        lane: &Lane,
        done: &crate::Completion,
        steps: &[String],
    ) -> DbResult<(
        PgFlowTx,
        Vec<(i64, Option<i64>, String)>,
        Option<super::RunEnds>,
    )> {
        let mut tx = Self::begin_step(pool, lane).await?;
        let one: CompletedOne = crate::postgres::bind_completions(
            sqlx::query_as(&COMPLETE_ONE),
            std::slice::from_ref(done),
        )
        .bind(steps)
        .fetch_one(tx.c())
        .await?;
        let written: Vec<(i64, Option<i64>, String)> = serde_json::from_str(&one.written)
            .map_err(|e| crate::DbError::Corrupt(format!("written ends: {e}")))?;
        let ends = match (one.locked, one.ends) {
            (Some(_), Some(row)) => Some(row.split()?),
            _ => None,
        };
        Ok((tx, written, ends))
    }

    /// A run this transaction has locked, with its instances on these jobs
    /// (each with its job's end) and the rows of `steps`. A statement of its
    /// own, never the one that took the lock: a statement's snapshot is
    /// taken when it starts, so one that waited (for a job row, say) while
    /// the run's last holder committed would read the run's steps from
    /// before that holder's changes, and write over them.
    async fn run_ends_locked(
        &mut self,
        run_id: i64,
        job_ids: &[i64],
        steps: &[String],
    ) -> DbResult<Option<super::RunEnds>> {
        // One index probe per job and per step name, whatever the planner
        // believes of the tables: a generic plan (which the step's
        // transaction asks for) takes `= ANY($array)` for ten elements, and
        // on tables it last saw small it scanned every instance and step of
        // the run, a cost that grows with the run.
        let row: Option<RunEndedRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS}, COALESCE((SELECT json_agg(json_build_array({ENDED_ELEMENTS})) \
               FROM unnest($2::int8[]) AS want(job) \
               CROSS JOIN LATERAL (SELECT * FROM run_instances WHERE job_id = want.job OFFSET 0) i \
               JOIN jobs j ON j.id = i.job_id \
               WHERE i.run_id = runs.id AND j.run_id = runs.id), '[]')::text AS ended, \
             COALESCE((SELECT json_agg(json_build_array({STEP_COLUMNS})) \
               FROM unnest($3::text[]) AS want(name) \
               CROSS JOIN LATERAL (SELECT * FROM run_steps \
                 WHERE run_id = $1 AND step = want.name OFFSET 0) s), '[]')::text AS steps \
             FROM runs WHERE id = $1"
        ))
        .bind(run_id)
        .bind(job_ids)
        .bind(steps)
        .fetch_optional(self.c())
        .await?;
        row.map(RunEndedRow::split).transpose()
    }
}

/// [`PgFlowTx::complete_one`]'s statement, the first of every chained
/// step, built once. The rest of the transaction runs on generic plans:
/// with array parameters PostgreSQL estimates a custom plan cheaper and
/// then plans the run's read afresh on every step (0.2 ms, four times what
/// running it costs); the generic plans use the same indexes. `taken` is
/// the outer side of the join, so the settings, the end and the lock all
/// come before the read.
static COMPLETE_ONE: LazyLock<String> = LazyLock::new(|| {
    let run_columns: Vec<String> = RUN_COLUMNS
        .split(',')
        .map(|c| format!("(rr.run).{0} AS {0}", c.trim()))
        .collect();
    format!(
        "WITH {}, done AS ({} RETURNING j.id, j.run_id, j.status), \
         run AS (SELECT id FROM runs WHERE id = (SELECT d.run_id FROM done d \
           WHERE d.status IN ('succeeded','failed','cancelled','dead') LIMIT 1) \
           FOR UPDATE SKIP LOCKED), \
         taken AS (SELECT set_config('kiln.outbox_taken', COALESCE((SELECT \
           string_agg(d.id::text, ',') FROM done d JOIN run r ON r.id = d.run_id), ''), \
           true) AS ids, set_config('plan_cache_mode', 'force_generic_plan', true), \
           (SELECT id FROM run) AS locked) \
         SELECT (SELECT COALESCE(json_agg(json_build_array(d.id, d.run_id, d.status)), '[]') \
           FROM done d)::text AS written, t.locked, {}, rr.ended, rr.step_rows AS steps \
         FROM taken t LEFT JOIN LATERAL kiln_run_locked_read(t.locked, $1, $9) rr ON true",
        crate::postgres::lock_in_id_order("$1"),
        crate::postgres::complete_update(),
        run_columns.join(", "),
    )
});

/// [`FlowTx::put_rows_inserting`]'s statement, the second of every chained
/// step, built once: three tables in one statement, the jobs, then the
/// instances that point at them and the steps, as CTEs of one insert.
static PUT_ROWS_INSERTING: LazyLock<String> = LazyLock::new(|| {
    let returning = format!("{}, status, idempotency_key", crate::rows::LEASED_COLUMNS);
    format!(
        "WITH ins AS ({} RETURNING {returning}), i AS ({}), s AS ({}) \
         SELECT {returning} FROM ins ORDER BY id",
        crate::lease::renumber(&insert_leasing_sql(), '$', 2),
        instances_keyed_upsert(22),
        steps_upsert(34),
    )
});

/// [`PgFlowTx::complete_one`]'s row: the ends written, the run locked, and
/// that run's read when there is one.
struct CompletedOne {
    written: String,
    locked: Option<i64>,
    ends: Option<RunEndedRow>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for CompletedOne {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let read: Option<i64> = row.try_get("id")?;
        Ok(CompletedOne {
            written: row.try_get("written")?,
            locked: row.try_get("locked")?,
            ends: match read {
                Some(_) => Some(<RunEndedRow as sqlx::FromRow<_>>::from_row(row)?),
                None => None,
            },
        })
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// `$n::t1[], $n+1::t2[], …`: the arrays `unnest` takes, from parameter `n`.
fn arrays(n: u8, types: &[&str]) -> String {
    let list: Vec<String> = types
        .iter()
        .zip(n..)
        .map(|(t, k)| format!("${k}::{t}[]"))
        .collect();
    list.join(", ")
}

/// Upserts step rows from nine arrays from parameter `n` on, for the run in
/// parameter 1.
fn steps_upsert(n: u8) -> String {
    format!(
        "INSERT INTO run_steps (run_id, step, status, total, succeeded, failed, started_at, \
           finished_at, deadline_at, detail) \
         SELECT $1, * FROM unnest({}) \
         ON CONFLICT (run_id, step) DO UPDATE SET status = excluded.status, \
           total = excluded.total, succeeded = excluded.succeeded, failed = excluded.failed, \
           started_at = excluded.started_at, finished_at = excluded.finished_at, \
           deadline_at = excluded.deadline_at, detail = excluded.detail",
        arrays(
            n,
            &["text", "text", "int4", "int4", "int4", "int8", "int8", "int8", "text"]
        )
    )
}

fn bind_steps<'q>(query: PgQuery<'q>, steps: &[&StepRecord]) -> PgQuery<'q> {
    query
        .bind(steps.iter().map(|s| s.step.clone()).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.status.as_str()).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.total).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.succeeded).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.failed).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.started_at).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.finished_at).collect::<Vec<_>>())
        .bind(steps.iter().map(|s| s.deadline_at).collect::<Vec<_>>())
        .bind(
            steps
                .iter()
                .map(|s| storable(&step_detail(s)))
                .collect::<Vec<_>>(),
        )
}

const INSTANCES_INSERT: &str = "INSERT INTO run_instances (run_id, step, idx, attempt, \
     job_id, status, item, exit_code, stdout, error, started_at, finished_at)";
const INSTANCES_ON_CONFLICT: &str = "ON CONFLICT (run_id, step, idx) DO UPDATE SET \
     attempt = excluded.attempt, job_id = excluded.job_id, status = excluded.status, \
     item = excluded.item, exit_code = excluded.exit_code, stdout = excluded.stdout, \
     error = excluded.error, started_at = excluded.started_at, finished_at = excluded.finished_at";
/// The types of the arrays [`bind_instances`] binds, in order.
const INSTANCE_ARRAYS: [&str; 11] = [
    "text", "int4", "int4", "int8", "text", "text", "int4", "text", "text", "int8", "int8",
];

/// Upserts instance rows from eleven arrays from parameter `n` on, for the
/// run in parameter 1.
fn instances_upsert(n: u8) -> String {
    format!(
        "{INSTANCES_INSERT} SELECT $1, * FROM unnest({}) {INSTANCES_ON_CONFLICT}",
        arrays(n, &INSTANCE_ARRAYS)
    )
}

/// Binds the thirteen arrays and two values of [`FlowTx::insert_jobs`]'s
/// statement.
fn bind_new_jobs<'q>(
    query: PgQuery<'q>,
    encoded: &[EncodedJob],
    now: Millis,
    run_id: Option<i64>,
) -> PgQuery<'q> {
    let col = |f: fn(&EncodedJob) -> String| encoded.iter().map(f).collect::<Vec<String>>();
    query
        .bind(col(|e| e.job.tenant.clone()))
        .bind(col(|e| e.job.kind.clone()))
        .bind(col(|e| e.job.queue.clone()))
        .bind(
            encoded
                .iter()
                .map(|e| e.job.priority.rank())
                .collect::<Vec<i16>>(),
        )
        .bind(col(|e| e.status.to_string()))
        .bind(col(|e| e.spec.clone()))
        .bind(col(|e| e.labels.clone()))
        .bind(
            encoded
                .iter()
                .map(|e| e.job.max_attempts)
                .collect::<Vec<i32>>(),
        )
        .bind(
            encoded
                .iter()
                .map(|e| e.job.timeout_ms)
                .collect::<Vec<i64>>(),
        )
        .bind(col(|e| e.backoff.clone()))
        .bind(col(|e| e.permanent_exit_codes.clone()))
        .bind(encoded.iter().map(|e| e.run_at).collect::<Vec<i64>>())
        .bind(
            encoded
                .iter()
                .map(|e| e.job.idempotency_key.clone())
                .collect::<Vec<Option<String>>>(),
        )
        .bind(now)
        .bind(run_id)
}

fn bind_instances<'q>(query: PgQuery<'q>, rows: &[InstanceRecord]) -> PgQuery<'q> {
    query
        .bind(rows.iter().map(|r| r.step.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.index).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.attempt).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.job_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.status.clone()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| storable(&instance_item(r)))
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.exit_code).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| storable(&r.stdout)).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| storable(&r.error)).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.started_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.finished_at).collect::<Vec<_>>())
}

/// [`instances_upsert`] with a twelfth array, the idempotency key of the
/// step job of each instance whose `job_id` is unset: its job is the row of
/// that key the `ins` query of the same statement inserted.
fn instances_keyed_upsert(n: u8) -> String {
    let mut types = INSTANCE_ARRAYS.to_vec();
    types.push("text");
    format!(
        "{INSTANCES_INSERT} SELECT $1, u.step, u.idx, u.attempt, \
           COALESCE(u.job_id, (SELECT n.id FROM ins n WHERE n.idempotency_key = u.job_key)), \
           u.status, u.item, u.exit_code, u.stdout, u.error, u.started_at, u.finished_at \
         FROM unnest({}) AS u(step, idx, attempt, job_id, status, item, exit_code, stdout, error, \
           started_at, finished_at, job_key) {INSTANCES_ON_CONFLICT}",
        arrays(n, &types)
    )
}

/// Step jobs inserted unannounced, the first `$16` of them written leased
/// (to worker `$19`, until `$20`) where [`FlowTx::lease_ready`] would lease
/// them, by the same tests made on the row before it exists: its queue has
/// no settings, it is due, its kind is one of the worker's (`$17`), and no
/// job of those kinds waits at the same or a more urgent priority since
/// before now (`$18`). The thirteen arrays, creation time and run are
/// [`FlowTx::insert_jobs`]'s. The insert trigger writes a leased row's
/// start with its creation (migration 0029).
fn insert_leasing_sql() -> String {
    // No ON CONFLICT: a step job made twice is a broken invariant, and
    // the unique key refuses it by aborting the whole advance.
    format!(
        "INSERT INTO jobs (tenant, kind, queue, priority, status, spec, labels, max_attempts, \
           timeout_ms, backoff, permanent_exit_codes, run_at, idempotency_key, created_at, run_id, \
           held, attempt, worker_id, started_at, lease_expires_at) \
         SELECT t.tenant, t.kind, t.queue, t.priority, \
           CASE WHEN t.lease THEN 'running' ELSE t.status END, t.spec, t.labels, \
           t.max_attempts, t.timeout_ms, t.backoff, t.permanent_exit_codes, t.run_at, \
           t.idempotency_key, $14, $15, t.held, CASE WHEN t.lease THEN 1 ELSE 0 END, \
           CASE WHEN t.lease THEN $19 END, CASE WHEN t.lease THEN $18 END, \
           CASE WHEN t.lease THEN $20::int8 END \
         FROM (SELECT h.*, h.ord <= $16 AND h.status = 'queued' AND NOT h.held \
             AND h.run_at <= $18 AND h.kind = ANY($17) \
             AND {} AS lease \
           FROM (SELECT u.*, {} AS held FROM unnest({}) WITH ORDINALITY \
               AS u(tenant, kind, queue, priority, status, spec, labels, max_attempts, timeout_ms, \
                    backoff, permanent_exit_codes, run_at, idempotency_key, ord) \
             OFFSET 0) h) t \
         WHERE set_config('kiln.quiet_insert', 'on', true) = 'on' \
         ORDER BY t.ord",
        nothing_waits_ahead("h.priority", "$17", "$18"),
        crate::postgres::held_expr("u.tenant", "u.queue"),
        arrays(1, &NEW_JOB_ARRAYS)
    )
}

/// The types of the arrays [`bind_new_jobs`] binds, in order.
const NEW_JOB_ARRAYS: [&str; 13] = [
    "text", "text", "text", "int2", "text", "text", "text", "int4", "int8", "text", "text", "int8",
    "text",
];

/// True when no job of the kinds in array `kinds` has waited since before
/// `now` at `priority` or a more urgent one: one probe of the fetch index
/// per (kind, priority), its first entry older than now. A job passed to
/// its worker never jumps the queue.
fn nothing_waits_ahead(priority: &str, kinds: &str, now: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM unnest({kinds}::text[]) AS k(kind) \
           CROSS JOIN generate_series(0, {priority}) AS p(priority) \
           CROSS JOIN LATERAL (SELECT 1 FROM jobs w WHERE w.kind = k.kind \
             AND w.priority = p.priority AND w.status IN ('queued','scheduled') \
             AND NOT w.held AND w.run_at < {now} LIMIT 1) x)"
    )
}

/// [`FlowTx::lease_ready`]'s statement, its five parameters (worker, now,
/// lease end, ids, kinds) from `n` on. "Waiting ahead" is probed per
/// (kind, priority) on the fetch index: its first entry older than now, one
/// index descent each.
fn lease_ready_sql(n: usize) -> String {
    crate::lease::renumber(
        &format!(
            "UPDATE jobs SET {} WHERE id = ANY($4) AND status = 'queued' AND NOT held \
             AND run_at <= $2 AND kind = ANY($5) \
             AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.tenant = jobs.tenant \
               AND q.name = jobs.queue AND (q.paused OR q.concurrency_limit IS NOT NULL)) \
             AND {} RETURNING {}",
            crate::lease::LEASE_SET,
            nothing_waits_ahead("jobs.priority", "$5", "$2"),
            crate::rows::LEASED_COLUMNS
        ),
        '$',
        n,
    )
}

fn bind_lease<'q>(
    query: PgQuery<'q>,
    ids: &'q [i64],
    request: &crate::lease::LeaseRequest<'q>,
) -> PgQuery<'q> {
    query
        .bind(request.worker_id)
        .bind(request.now)
        .bind(request.lease_until())
        .bind(ids)
        .bind(request.kinds)
}

impl PgFlowTx {
    /// Leased rows decoded; a row that cannot be read fails its job.
    async fn leased(
        &mut self,
        rows: Vec<sqlx::postgres::PgRow>,
        now: Millis,
    ) -> DbResult<Vec<kiln_core::LeasedJob>> {
        let rows = rows
            .iter()
            .map(<crate::rows::LeasedRow as sqlx::FromRow<_>>::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let (jobs, unreadable) = crate::lease::decode(rows);
        for (id, error) in unreadable {
            sqlx::query(crate::lease::FAIL_UNREADABLE)
                .bind(now)
                .bind(error)
                .bind(id)
                .execute(self.c())
                .await?;
        }
        Ok(jobs)
    }
}

#[async_trait::async_trait]
impl FlowTx for PgFlowTx {
    async fn audit_insert(&mut self, record: &kiln_core::audit::AuditRecord) -> DbResult<()> {
        crate::audit::insert_pg(self.c(), record).await?;
        Ok(())
    }

    async fn policy_version(&mut self, tenant: &str) -> DbResult<i64> {
        Ok(crate::policies::load_on!(version, self.c(), tenant)?)
    }

    async fn policy_rows(&mut self, tenant: &str) -> DbResult<Vec<crate::policies::PolicyRow>> {
        Ok(crate::policies::load_on!(rows, self.c(), tenant)?)
    }

    async fn lock_run(&mut self, id: i64) -> DbResult<Option<RunRecord>> {
        let row: Option<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(self.c())
        .await?;
        row.map(RunRecord::try_from).transpose()
    }

    async fn get_run(&mut self, tenant: &str, id: i64) -> DbResult<Option<RunRecord>> {
        let row: Option<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 AND tenant = $2"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(self.c())
        .await?;
        row.map(RunRecord::try_from).transpose()
    }

    async fn insert_run(&mut self, run: &NewRunRow<'_>) -> DbResult<Option<i64>> {
        let started = (run.status == kiln_flow::RunStatus::Running).then_some(run.now);
        Ok(sqlx::query_scalar(
            "INSERT INTO runs (tenant, pipeline, version, status, params, labels, idempotency_key, \
             trigger, created_at, started_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
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
        .fetch_optional(self.c())
        .await?)
    }

    async fn run_by_key(
        &mut self,
        tenant: &str,
        pipeline: &str,
        key: &str,
    ) -> DbResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM runs WHERE tenant = $1 AND pipeline = $2 AND idempotency_key = $3",
        )
        .bind(tenant)
        .bind(pipeline)
        .bind(key)
        .fetch_optional(self.c())
        .await?)
    }

    async fn update_run(&mut self, run: &RunRecord) -> DbResult<()> {
        sqlx::query(
            "UPDATE runs SET status = $2, mode = $3, attempt = $4, reason = $5, detail = $6, \
             started_at = $7, finished_at = $8 WHERE id = $1",
        )
        .bind(run.id)
        .bind(run.status.as_str())
        .bind(run.mode.as_str())
        .bind(run.attempt)
        .bind(&run.reason)
        .bind(run.detail.as_ref().map(|d| d.to_string()))
        .bind(run.started_at)
        .bind(run.finished_at)
        .execute(self.c())
        .await?;
        Ok(())
    }

    async fn active_runs(&mut self, tenant: &str, pipeline: &str) -> DbResult<(i64, Option<i64>)> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE status = 'running'), MIN(id) FILTER (WHERE status = 'queued') \
             FROM runs WHERE tenant = $1 AND pipeline = $2 AND status IN ('queued', 'running')",
        )
        .bind(tenant)
        .bind(pipeline)
        .fetch_one(self.c())
        .await?)
    }

    async fn steps(&mut self, run_id: i64) -> DbResult<Vec<StepRecord>> {
        let rows: Vec<StepRow> = sqlx::query_as(&format!(
            "SELECT {STEP_COLUMNS} FROM run_steps WHERE run_id = $1"
        ))
        .bind(run_id)
        .fetch_all(self.c())
        .await?;
        rows_to(rows)
    }

    async fn steps_named(&mut self, run_id: i64, names: &[String]) -> DbResult<Vec<StepRecord>> {
        let rows: Vec<StepRow> = sqlx::query_as(&format!(
            "SELECT {STEP_COLUMNS} FROM run_steps WHERE run_id = $1 AND step = ANY($2)"
        ))
        .bind(run_id)
        .bind(names)
        .fetch_all(self.c())
        .await?;
        rows_to(rows)
    }

    async fn step_counts(&mut self, run_id: i64) -> DbResult<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE status IN ('succeeded','failed','skipped','cancelled')), \
             COUNT(*) FILTER (WHERE status IN ('failed','cancelled')) FROM run_steps WHERE run_id = $1",
        )
        .bind(run_id)
        .fetch_one(self.c())
        .await?)
    }

    async fn put_steps(&mut self, run_id: i64, steps: &[&StepRecord]) -> DbResult<()> {
        bind_steps(sqlx::query(&steps_upsert(2)).bind(run_id), steps)
            .execute(self.c())
            .await?;
        Ok(())
    }

    async fn put_rows(
        &mut self,
        run_id: i64,
        instances: &[InstanceRecord],
        steps: &[&StepRecord],
    ) -> DbResult<()> {
        let sql = format!("WITH i AS ({}) {}", instances_upsert(2), steps_upsert(13));
        let query = bind_instances(sqlx::query(&sql).bind(run_id), instances);
        bind_steps(query, steps).execute(self.c()).await?;
        Ok(())
    }

    async fn instances(
        &mut self,
        run_id: i64,
        steps: Option<&[String]>,
    ) -> DbResult<Vec<InstanceRecord>> {
        let rows: Vec<InstanceRow> = sqlx::query_as(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM run_instances WHERE run_id = $1 \
             AND ($2::text[] IS NULL OR step = ANY($2)) ORDER BY step, idx"
        ))
        .bind(run_id)
        .bind(steps)
        .fetch_all(self.c())
        .await?;
        rows_to(rows)
    }

    async fn put_instances(&mut self, run_id: i64, rows: &[InstanceRecord]) -> DbResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        bind_instances(sqlx::query(&instances_upsert(2)).bind(run_id), rows)
            .execute(self.c())
            .await?;
        Ok(())
    }

    async fn job_files(&mut self, run_id: i64, job_ids: &[i64]) -> DbResult<Vec<(i64, String)>> {
        Ok(sqlx::query_as(
            "SELECT id, COALESCE((result::jsonb -> 'files')::text, '[]') FROM jobs \
             WHERE id = ANY($1) AND run_id = $2",
        )
        .bind(job_ids)
        .bind(run_id)
        .fetch_all(self.c())
        .await?)
    }

    async fn insert_jobs(
        &mut self,
        jobs: &[NewJob],
        run_id: Option<i64>,
        now: Millis,
        quiet: bool,
    ) -> DbResult<Vec<i64>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        for job in jobs {
            crate::storable_job(job)?;
        }
        let encoded: Vec<EncodedJob> = jobs.iter().map(|j| EncodedJob::new(j, now)).collect();
        // No ON CONFLICT: a step job made twice is a broken invariant, and
        // the unique key refuses it by aborting the whole advance.
        // The insert trigger's NOTIFY reads `kiln.quiet_insert`, set for
        // the rest of the transaction by the statement itself.
        let sql = format!(
            "INSERT INTO jobs (tenant, kind, queue, priority, status, spec, labels, max_attempts, \
             timeout_ms, backoff, permanent_exit_codes, run_at, idempotency_key, created_at, run_id, held) \
             SELECT t.*, $14, $15, {} FROM unnest({}) \
               AS t(tenant, kind, queue, priority, status, spec, labels, max_attempts, timeout_ms, \
                    backoff, permanent_exit_codes, run_at, idempotency_key) \
             WHERE set_config('kiln.quiet_insert', '{q}', true) = '{q}' \
             RETURNING id",
            crate::postgres::held_expr("t.tenant", "t.queue"),
            arrays(1, &NEW_JOB_ARRAYS),
            q = if quiet { "on" } else { "off" }
        );
        Ok(bind_new_jobs(sqlx::query(&sql), &encoded, now, run_id)
            .fetch_all(self.c())
            .await?
            .iter()
            .map(|row| sqlx::Row::try_get::<i64, _>(row, 0))
            .collect::<Result<_, _>>()?)
    }

    async fn notify_jobs(&mut self) -> DbResult<()> {
        sqlx::query("SELECT pg_notify('kiln_jobs', '')")
            .execute(self.c())
            .await?;
        Ok(())
    }

    async fn cancel_jobs(&mut self, ids: &[i64], now: Millis) -> DbResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        sqlx::query(&format!(
            "UPDATE jobs SET {} WHERE id IN (SELECT id FROM jobs WHERE id = ANY($2) \
             AND status IN ('queued','scheduled','running') ORDER BY id FOR UPDATE)",
            crate::rows::CANCEL_SET
        ))
        .bind(now)
        .bind(&sorted)
        .execute(self.c())
        .await?;
        Ok(())
    }

    async fn take_outbox(
        &mut self,
        run: Option<i64>,
        limit: i64,
    ) -> DbResult<Vec<(i64, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT id, run_id, job_id FROM flow_outbox WHERE ($1::int8 IS NULL OR run_id = $1) \
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(run)
        .bind(limit)
        .fetch_all(self.c())
        .await?)
    }

    async fn delete_outbox(&mut self, ids: &[i64]) -> DbResult<()> {
        sqlx::query("DELETE FROM flow_outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(self.c())
            .await?;
        Ok(())
    }

    async fn complete_jobs(
        &mut self,
        done: &[crate::Completion],
    ) -> DbResult<Vec<(i64, Option<i64>, String)>> {
        Ok(crate::postgres::complete_rows(self.c(), done).await?)
    }

    async fn take_run_ends(
        &mut self,
        run_id: i64,
        job_ids: &[i64],
        steps: &[String],
    ) -> DbResult<Option<super::RunEnds>> {
        // The outbox rows go only if the run was locked, and only those no
        // other advancer holds (a second end of a job retried by hand: it
        // deletes its own, and waiting for it could close a cycle); what
        // the advance reads comes after, in a statement of its own.
        let locked: bool = sqlx::query_scalar(
            "WITH l AS (SELECT id FROM runs WHERE id = $1 FOR UPDATE SKIP LOCKED), \
             gone AS (DELETE FROM flow_outbox WHERE id IN (SELECT id FROM flow_outbox \
               WHERE run_id = $1 AND job_id = ANY($2) FOR UPDATE SKIP LOCKED) \
               AND EXISTS (SELECT 1 FROM l)) \
             SELECT EXISTS (SELECT 1 FROM l)",
        )
        .bind(run_id)
        .bind(job_ids)
        .fetch_one(self.c())
        .await?;
        if !locked {
            return Ok(None);
        }
        self.run_ends_locked(run_id, job_ids, steps).await
    }

    async fn lease_ready(
        &mut self,
        ids: &[i64],
        request: &crate::lease::LeaseRequest<'_>,
    ) -> DbResult<Vec<kiln_core::LeasedJob>> {
        let rows = bind_lease(sqlx::query(&lease_ready_sql(1)), ids, request)
            .fetch_all(self.c())
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
        // Three tables, no row read twice: the upserts as CTEs of the lease.
        let sql = format!(
            "WITH i AS ({}), s AS ({}) {}",
            instances_upsert(2),
            steps_upsert(13),
            lease_ready_sql(22)
        );
        let query = bind_steps(
            bind_instances(sqlx::query(&sql).bind(run_id), instances),
            steps,
        );
        let rows = bind_lease(query, ids, request).fetch_all(self.c()).await?;
        self.leased(rows, request.now).await
    }

    async fn put_rows_inserting(
        &mut self,
        run_id: i64,
        jobs: &[NewJob],
        offered: usize,
        instances: &mut [InstanceRecord],
        steps: &[&StepRecord],
        request: &crate::lease::LeaseRequest<'_>,
        now: Millis,
    ) -> DbResult<(Vec<i64>, Vec<kiln_core::LeasedJob>)> {
        for job in jobs {
            crate::storable_job(job)?;
        }
        let encoded: Vec<EncodedJob> = jobs.iter().map(|j| EncodedJob::new(j, now)).collect();
        let keys: Vec<Option<String>> = instances
            .iter()
            .map(|r| {
                r.job_id
                    .is_none()
                    .then(|| super::step_job_key(run_id, &r.step, r.index, r.attempt))
            })
            .collect();
        let query = bind_new_jobs(
            sqlx::query(&PUT_ROWS_INSERTING).bind(run_id),
            &encoded,
            now,
            Some(run_id),
        )
        .bind(i64::try_from(offered).unwrap_or(i64::MAX))
        .bind(request.kinds)
        .bind(request.now)
        .bind(request.worker_id)
        .bind(request.lease_until());
        let query = bind_instances(query, instances).bind(keys);
        let rows = bind_steps(query, steps).fetch_all(self.c()).await?;
        let mut by_key = std::collections::HashMap::with_capacity(rows.len());
        let mut running = Vec::new();
        for row in rows {
            use sqlx::Row;
            let key: Option<String> = row.try_get("idempotency_key")?;
            by_key.insert(key, row.try_get::<i64, _>("id")?);
            if row.try_get::<String, _>("status")? == "running" {
                running.push(row);
            }
        }
        let ids = jobs
            .iter()
            .map(|job| {
                by_key.get(&job.idempotency_key).copied().ok_or_else(|| {
                    crate::DbError::Corrupt("a step job's insert returned no row".into())
                })
            })
            .collect::<DbResult<Vec<i64>>>()?;
        let leased = self.leased(running, request.now).await?;
        Ok((ids, leased))
    }

    async fn definition(
        &mut self,
        tenant: &str,
        name: &str,
        version: Option<i32>,
    ) -> DbResult<Option<PipelineRecord>> {
        let row: Option<PipelineRow> = sqlx::query_as(
            "SELECT name, version, definition, created_at FROM pipelines \
             WHERE tenant = $1 AND name = $2 AND ($3::int4 IS NULL OR version = $3) \
             AND ($3::int4 IS NOT NULL OR NOT deleted) ORDER BY version DESC LIMIT 1",
        )
        .bind(tenant)
        .bind(name)
        .bind(version)
        .fetch_optional(self.c())
        .await?;
        row.map(PipelineRecord::try_from).transpose()
    }

    async fn waiting_past(&mut self, now: Millis, limit: i64) -> DbResult<Vec<(i64, String)>> {
        Ok(sqlx::query_as(
            "SELECT run_id, step FROM run_steps WHERE status = 'waiting' AND deadline_at < $1 \
             ORDER BY deadline_at LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(self.c())
        .await?)
    }

    async fn schedule_put(&mut self, s: &ScheduleRecord) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO schedules (tenant, name, cron, timezone, target, overlap, catch_up, paused, \
               next_fire_at, last_fire_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
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
        .execute(self.c())
        .await?;
        Ok(())
    }

    async fn schedule_get(&mut self, tenant: &str, name: &str) -> DbResult<Option<ScheduleRecord>> {
        let row: Option<ScheduleRow> = sqlx::query_as(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE tenant = $1 AND name = $2"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_optional(self.c())
        .await?;
        row.map(ScheduleRecord::try_from).transpose()
    }

    async fn schedule_list(&mut self, tenant: &str) -> DbResult<Vec<ScheduleRecord>> {
        let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE tenant = $1 ORDER BY name"
        ))
        .bind(tenant)
        .fetch_all(self.c())
        .await?;
        rows_to(rows)
    }

    async fn schedule_delete(&mut self, tenant: &str, name: &str) -> DbResult<bool> {
        let done = sqlx::query("DELETE FROM schedules WHERE tenant = $1 AND name = $2")
            .bind(tenant)
            .bind(name)
            .execute(self.c())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn schedules_due(&mut self, now: Millis, limit: i64) -> DbResult<Vec<ScheduleRecord>> {
        let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE NOT paused AND next_fire_at <= $1 \
             ORDER BY next_fire_at LIMIT $2 FOR UPDATE SKIP LOCKED"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(self.c())
        .await?;
        rows_to(rows)
    }

    async fn schedule_moved(&mut self, s: &ScheduleRecord) -> DbResult<()> {
        sqlx::query(
            "UPDATE schedules SET paused = $3, next_fire_at = $4, last_fire_at = $5, updated_at = $6 \
             WHERE tenant = $1 AND name = $2",
        )
        .bind(&s.tenant)
        .bind(&s.name)
        .bind(s.paused)
        .bind(s.next_fire_at)
        .bind(s.last_fire_at)
        .bind(s.updated_at)
        .execute(self.c())
        .await?;
        Ok(())
    }

    async fn fire_insert(&mut self, f: &FireRecord) -> DbResult<bool> {
        let done = sqlx::query(
            "INSERT INTO schedule_fires (tenant, schedule, tick, fired_at, outcome) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, schedule, tick) DO NOTHING",
        )
        .bind(&f.tenant)
        .bind(&f.schedule)
        .bind(f.tick)
        .bind(f.fired_at)
        .bind(&f.outcome)
        .execute(self.c())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn fire_update(&mut self, f: &FireRecord) -> DbResult<()> {
        sqlx::query(
            "UPDATE schedule_fires SET outcome = $4, job_id = $5, run_id = $6, error = $7 \
             WHERE tenant = $1 AND schedule = $2 AND tick = $3",
        )
        .bind(&f.tenant)
        .bind(&f.schedule)
        .bind(f.tick)
        .bind(&f.outcome)
        .bind(f.job_id)
        .bind(f.run_id)
        .bind(f.error.as_deref().map(|e| e.replace('\0', "\u{FFFD}")))
        .execute(self.c())
        .await?;
        Ok(())
    }

    async fn fires(&mut self, tenant: &str, name: &str, limit: i64) -> DbResult<Vec<FireRecord>> {
        let rows: Vec<FireRow> = sqlx::query_as(&format!(
            "SELECT {FIRE_COLUMNS} FROM schedule_fires WHERE tenant = $1 AND schedule = $2 \
             ORDER BY tick DESC LIMIT $3"
        ))
        .bind(tenant)
        .bind(name)
        .bind(limit)
        .fetch_all(self.c())
        .await?;
        Ok(rows.into_iter().map(FireRecord::from).collect())
    }

    async fn last_fire(&mut self, tenant: &str, name: &str) -> DbResult<Option<FireRecord>> {
        let row: Option<FireRow> = sqlx::query_as(&format!(
            "SELECT {FIRE_COLUMNS} FROM schedule_fires WHERE tenant = $1 AND schedule = $2 \
             AND (job_id IS NOT NULL OR run_id IS NOT NULL) ORDER BY tick DESC LIMIT 1"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_optional(self.c())
        .await?;
        Ok(row.map(FireRecord::from))
    }

    async fn job_active(&mut self, id: i64) -> DbResult<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE id = $1 \
             AND status IN ('queued','scheduled','running'))",
        )
        .bind(id)
        .fetch_one(self.c())
        .await?)
    }

    async fn run_exists(&mut self, id: i64) -> DbResult<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM runs WHERE id = $1)")
                .bind(id)
                .fetch_one(self.c())
                .await?,
        )
    }

    async fn run_active(&mut self, id: i64) -> DbResult<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM runs WHERE id = $1 AND status IN ('queued','running'))",
        )
        .bind(id)
        .fetch_one(self.c())
        .await?)
    }

    async fn queue_serial(&mut self, tenant: &str, name: &str, now: Millis) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO queues (tenant, name, paused, concurrency_limit, updated_at) \
             VALUES ($1, $2, FALSE, 1, $3) ON CONFLICT (tenant, name) DO NOTHING",
        )
        .bind(tenant)
        .bind(name)
        .bind(now)
        .execute(self.c())
        .await?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> DbResult<()> {
        match self.conn {
            TxConn::Pooled(tx) => tx.commit().await?,
            TxConn::Lane(mut tx) => {
                let conn = tx
                    .lane
                    .conn
                    .as_mut()
                    .expect("a lane transaction holds its connection");
                sqlx::Executor::execute(conn, "COMMIT").await?;
                tx.committed = true;
            }
        }
        Ok(())
    }
}

impl PgStore {
    pub(crate) async fn pipeline_put(
        &self,
        tenant: &str,
        name: &str,
        definition: &serde_json::Value,
        now: Millis,
    ) -> DbResult<PipelineRecord> {
        let row: PipelineRow = crate::audit::audited_in!(self.pool, |tx| {
            // Applies of one pipeline take turns, so versions never collide.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))")
                .bind(tenant)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let row: PipelineRow = sqlx::query_as(
                "INSERT INTO pipelines (tenant, name, version, definition, created_at) \
             SELECT $1, $2, COALESCE(MAX(version), 0) + 1, $3, $4 FROM pipelines \
             WHERE tenant = $1 AND name = $2 \
             RETURNING name, version, definition, created_at",
            )
            .bind(tenant)
            .bind(name)
            .bind(definition.to_string())
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            crate::audit::stamp!(
                &mut *tx,
                Change::Created,
                Some(&format!("/api/v1/pipelines/{name}"))
            );
            row
        });
        PipelineRecord::try_from(row)
    }

    pub(crate) async fn schedule_next_due(&self) -> DbResult<Option<Millis>> {
        Ok(
            sqlx::query_scalar("SELECT MIN(next_fire_at) FROM schedules WHERE NOT paused")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub(crate) async fn pipeline_list(&self, tenant: &str) -> DbResult<Vec<PipelineRecord>> {
        let rows: Vec<PipelineRow> = sqlx::query_as(
            "SELECT DISTINCT ON (name) name, version, definition, created_at FROM pipelines \
             WHERE tenant = $1 AND NOT deleted ORDER BY name, version DESC",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows_to(rows)
    }

    pub(crate) async fn pipeline_versions(
        &self,
        tenant: &str,
        name: &str,
    ) -> DbResult<Vec<(i32, Millis)>> {
        Ok(sqlx::query_as(
            "SELECT version, created_at FROM pipelines WHERE tenant = $1 AND name = $2 ORDER BY version",
        )
        .bind(tenant)
        .bind(name)
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn pipeline_delete(&self, tenant: &str, name: &str) -> DbResult<bool> {
        let done = crate::audit::audited_in!(self.pool, |tx| {
            let done = sqlx::query(
                "UPDATE pipelines SET deleted = TRUE WHERE tenant = $1 AND name = $2 AND NOT deleted",
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
            Some((k, v)) => (Some(k.as_str()), Some(v.as_str())),
            None => (None, None),
        };
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE tenant = $1 \
             AND ($2::text IS NULL OR pipeline = $2) AND ($3::text IS NULL OR status = $3) \
             AND ($4::text IS NULL OR (labels::jsonb ->> $4::text) = $5::text) \
             AND ($6::int8 IS NULL OR id < $6) ORDER BY id DESC LIMIT $7"
        ))
        .bind(tenant)
        .bind(&f.pipeline)
        .bind(f.status.map(|s| s.as_str()))
        .bind(label_key)
        .bind(label_value)
        .bind(f.before_id)
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        rows_to(rows)
    }
}
