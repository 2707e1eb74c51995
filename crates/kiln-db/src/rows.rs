//! Row types shared by both drivers: the column types are chosen so that one
//! `FromRow` derive decodes SQLite and PostgreSQL alike.

use kiln_core::{Backoff, Job, JobResult, JobStatus, LeasedJob, NewJob, Priority};

use crate::{ApiKey, DbError, DbResult, ModuleInfo, QueueInfo, WorkerInfo};

pub const JOB_COLUMNS: &str = "id, tenant, kind, queue, priority, status, spec, labels, attempt, \
     max_attempts, retry_from, timeout_ms, backoff, permanent_exit_codes, idempotency_key, run_at, \
     created_at, started_at, finished_at, lease_expires_at, worker_id, cancel_requested, result, \
     error, history";

pub const QUEUE_COLUMNS: &str = "tenant, name, paused, concurrency_limit";

/// Jobs in a final state (the `jobs_finished` index's predicate).
pub const FINISHED: &str = "status IN ('succeeded','failed','cancelled','dead')";

/// Cancel by the status found (`$1` now): a waiting job is cancelled, a
/// running one is asked to stop. SET expressions all read the old row.
pub const CANCEL_SET: &str = "\
    cancel_requested = (status = 'running') OR cancel_requested, \
    finished_at = CASE WHEN status = 'running' THEN finished_at ELSE $1 END, \
    error = CASE WHEN status = 'running' THEN error ELSE 'cancelled' END, \
    status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END";

/// What a cancel statement's returned row means.
pub fn cancel_outcome(job: Job) -> DbResult<crate::CancelOutcome> {
    Ok(if job.status == JobStatus::Running {
        crate::CancelOutcome::Requested(job)
    } else {
        crate::CancelOutcome::Cancelled(job)
    })
}

pub const LEASED_COLUMNS: &str = "id, tenant, kind, queue, priority, spec, attempt, max_attempts, \
     retry_from, timeout_ms, backoff, permanent_exit_codes, run_at, created_at, started_at, run_id";

#[derive(sqlx::FromRow)]
pub struct JobRow {
    pub(crate) id: i64,
    tenant: String,
    kind: String,
    queue: String,
    priority: i16,
    status: String,
    spec: String,
    labels: String,
    attempt: i32,
    max_attempts: i32,
    retry_from: i32,
    timeout_ms: i64,
    backoff: String,
    permanent_exit_codes: String,
    idempotency_key: Option<String>,
    run_at: i64,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    lease_expires_at: Option<i64>,
    worker_id: Option<String>,
    cancel_requested: bool,
    result: Option<String>,
    error: Option<String>,
    history: String,
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> DbResult<T> {
    serde_json::from_str(text).map_err(|e| DbError::Corrupt(format!("{what}: {e}")))
}

impl TryFrom<JobRow> for Job {
    type Error = DbError;

    fn try_from(row: JobRow) -> DbResult<Job> {
        Ok(Job {
            id: row.id,
            status: JobStatus::parse(&row.status)
                .ok_or_else(|| DbError::Corrupt(format!("status {}", row.status)))?,
            spec: parse("spec", &row.spec)?,
            labels: parse("labels", &row.labels)?,
            backoff: parse::<Backoff>("backoff", &row.backoff)?,
            permanent_exit_codes: parse("permanent_exit_codes", &row.permanent_exit_codes)?,
            result: row
                .result
                .as_deref()
                .map(|r| parse::<JobResult>("result", r))
                .transpose()?,
            history: parse("history", &row.history)?,
            tenant: row.tenant,
            kind: row.kind,
            queue: row.queue,
            priority: Priority::from_rank(row.priority),
            attempt: row.attempt,
            max_attempts: row.max_attempts,
            retry_from: row.retry_from,
            timeout_ms: row.timeout_ms,
            idempotency_key: row.idempotency_key,
            run_at: row.run_at,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            lease_expires_at: row.lease_expires_at,
            worker_id: row.worker_id,
            cancel_requested: row.cancel_requested,
            error: row.error,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct LeasedRow {
    id: i64,
    tenant: String,
    kind: String,
    queue: String,
    priority: i16,
    spec: String,
    attempt: i32,
    max_attempts: i32,
    retry_from: i32,
    timeout_ms: i64,
    backoff: String,
    permanent_exit_codes: String,
    run_at: i64,
    created_at: i64,
    started_at: Option<i64>,
    run_id: Option<i64>,
}

impl LeasedRow {
    pub fn id(&self) -> i64 {
        self.id
    }
}

impl TryFrom<LeasedRow> for LeasedJob {
    type Error = DbError;

    fn try_from(row: LeasedRow) -> DbResult<LeasedJob> {
        Ok(LeasedJob {
            id: row.id,
            spec: parse("spec", &row.spec)?,
            backoff: parse("backoff", &row.backoff)?,
            permanent_exit_codes: parse("permanent_exit_codes", &row.permanent_exit_codes)?,
            tenant: row.tenant,
            kind: row.kind,
            queue: row.queue,
            priority: Priority::from_rank(row.priority),
            attempt: row.attempt,
            max_attempts: row.max_attempts,
            retry_from: row.retry_from,
            timeout_ms: row.timeout_ms,
            run_at: row.run_at,
            created_at: row.created_at,
            started_at: row.started_at.unwrap_or(row.run_at),
            run_id: row.run_id,
        })
    }
}

pub fn rows_to<R, T>(rows: Vec<R>) -> DbResult<Vec<T>>
where
    T: TryFrom<R, Error = DbError>,
{
    rows.into_iter().map(T::try_from).collect()
}

/// The text columns of a new job, encoded once.
pub struct EncodedJob<'a> {
    pub job: &'a NewJob,
    pub spec: String,
    pub labels: String,
    pub backoff: String,
    pub permanent_exit_codes: String,
    pub status: &'static str,
    pub run_at: i64,
}

impl<'a> EncodedJob<'a> {
    pub fn new(job: &'a NewJob, now: i64) -> EncodedJob<'a> {
        let run_at = job.run_at.unwrap_or(now);
        EncodedJob {
            job,
            spec: job.spec.to_string(),
            labels: serde_json::to_string(&job.labels).unwrap_or_else(|_| "{}".into()),
            backoff: serde_json::to_string(&job.backoff).unwrap_or_else(|_| "{}".into()),
            permanent_exit_codes: serde_json::to_string(&job.permanent_exit_codes)
                .unwrap_or_else(|_| "[]".into()),
            status: if run_at > now { "scheduled" } else { "queued" },
            run_at,
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct QueueRow {
    tenant: String,
    name: String,
    paused: bool,
    concurrency_limit: Option<i32>,
}

impl From<QueueRow> for QueueInfo {
    fn from(row: QueueRow) -> QueueInfo {
        QueueInfo {
            tenant: row.tenant,
            name: row.name,
            paused: row.paused,
            concurrency_limit: row.concurrency_limit,
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct KeyRow {
    id: String,
    tenant: String,
    name: String,
    scopes: String,
    created_at: i64,
    revoked_at: Option<i64>,
    expires_at: Option<i64>,
    last_used_at: Option<i64>,
}

impl TryFrom<KeyRow> for ApiKey {
    type Error = DbError;

    fn try_from(row: KeyRow) -> DbResult<ApiKey> {
        Ok(ApiKey {
            scopes: kiln_core::Scopes::parse(&row.scopes)
                .ok_or_else(|| DbError::Corrupt(format!("scopes {}", row.scopes)))?,
            id: row.id,
            tenant: row.tenant,
            name: row.name,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
            expires_at: row.expires_at,
            last_used_at: row.last_used_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct ModuleRow {
    id: String,
    size: i64,
    created_at: i64,
}

impl From<ModuleRow> for ModuleInfo {
    fn from(row: ModuleRow) -> ModuleInfo {
        ModuleInfo {
            id: row.id,
            size: row.size,
            created_at: row.created_at,
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct WorkerRow {
    id: String,
    host: String,
    kinds: String,
    slots: i32,
    started_at: i64,
    last_seen: i64,
}

impl TryFrom<WorkerRow> for WorkerInfo {
    type Error = DbError;

    fn try_from(row: WorkerRow) -> DbResult<WorkerInfo> {
        Ok(WorkerInfo {
            kinds: parse("kinds", &row.kinds)?,
            id: row.id,
            host: row.host,
            slots: row.slots,
            started_at: row.started_at,
            last_seen: row.last_seen,
        })
    }
}

/// Error text as the store writes it: control characters (NUL above all,
/// which PostgreSQL refuses) replaced and the length bounded, so no message
/// built from input can make a write fail.
pub fn storable_error(error: Option<&str>) -> Option<String> {
    error.map(|e| kiln_core::names::sanitise_message(e, crate::lease::ERROR_MAX))
}

/// An attempt record as the JSON text appended to a job's history; its
/// text fields made storable (the history is read as `jsonb`, which refuses
/// `\u0000`).
pub fn record_json(record: &kiln_core::AttemptRecord) -> String {
    let clean = |text: &str| kiln_core::names::sanitise_message(text, crate::lease::ERROR_MAX);
    let record = kiln_core::AttemptRecord {
        worker_id: record.worker_id.as_deref().map(clean),
        outcome: clean(&record.outcome),
        error: storable_error(record.error.as_deref()),
        ..record.clone()
    };
    serde_json::to_string(&record).unwrap_or_else(|_| "{}".into())
}

pub fn result_json(result: &Option<JobResult>) -> Option<String> {
    result
        .as_ref()
        .map(|r| serde_json::to_string(r).unwrap_or_else(|_| "{}".into()))
}
