//! Row types of the flow tables, shared by both drivers (column types chosen
//! so one `FromRow` derive fits both), and their conversions.

use kiln_core::JobStatus;
use kiln_flow::{RunStatus, StepStatus};
use serde_json::Value;

use super::{InstanceRecord, JobEnd, PipelineRecord, RunMode, RunRecord, StepRecord};
use crate::{DbError, DbResult};

pub(crate) const RUN_COLUMNS: &str =
    "id, tenant, pipeline, version, status, mode, params, labels, \
     idempotency_key, trigger, attempt, reason, detail, created_at, started_at, finished_at";
pub(crate) const STEP_COLUMNS: &str =
    "step, status, total, succeeded, failed, started_at, finished_at, deadline_at, detail";
pub(crate) const INSTANCE_COLUMNS: &str = "step, idx, attempt, job_id, status, item, exit_code, \
     stdout, error, started_at, finished_at";

#[derive(sqlx::FromRow)]
pub(crate) struct RunRow {
    id: i64,
    tenant: String,
    pipeline: String,
    version: i32,
    status: String,
    mode: String,
    params: String,
    labels: String,
    idempotency_key: Option<String>,
    trigger: String,
    attempt: i32,
    reason: Option<String>,
    detail: Option<String>,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
}

fn json_column(what: &str, text: &str) -> DbResult<Value> {
    serde_json::from_str(text).map_err(|e| DbError::Corrupt(format!("{what}: {e}")))
}

impl TryFrom<RunRow> for RunRecord {
    type Error = DbError;
    fn try_from(r: RunRow) -> DbResult<RunRecord> {
        Ok(RunRecord {
            id: r.id,
            status: RunStatus::parse(&r.status)
                .ok_or_else(|| DbError::Corrupt(format!("run {} status {:?}", r.id, r.status)))?,
            mode: RunMode::parse(&r.mode),
            params: json_column("run params", &r.params)?,
            labels: serde_json::from_str(&r.labels)
                .map_err(|e| DbError::Corrupt(format!("run labels: {e}")))?,
            detail: r
                .detail
                .as_deref()
                .map(|d| json_column("run detail", d))
                .transpose()?,
            tenant: r.tenant,
            pipeline: r.pipeline,
            version: r.version,
            idempotency_key: r.idempotency_key,
            trigger: r.trigger,
            attempt: r.attempt,
            reason: r.reason,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct StepRow {
    step: String,
    status: String,
    total: i32,
    succeeded: i32,
    failed: i32,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    deadline_at: Option<i64>,
    detail: Option<String>,
}

impl TryFrom<StepRow> for StepRecord {
    type Error = DbError;
    fn try_from(r: StepRow) -> DbResult<StepRecord> {
        Ok(StepRecord {
            status: StepStatus::parse(&r.status).ok_or_else(|| {
                DbError::Corrupt(format!("step {} status {:?}", r.step, r.status))
            })?,
            detail: r
                .detail
                .as_deref()
                .map(|d| json_column("step detail", d))
                .transpose()?,
            step: r.step,
            total: r.total,
            succeeded: r.succeeded,
            failed: r.failed,
            started_at: r.started_at,
            finished_at: r.finished_at,
            deadline_at: r.deadline_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct InstanceRow {
    step: String,
    idx: i32,
    attempt: i32,
    job_id: Option<i64>,
    status: String,
    item: Option<String>,
    exit_code: Option<i32>,
    stdout: Option<String>,
    error: Option<String>,
    started_at: Option<i64>,
    finished_at: Option<i64>,
}

impl TryFrom<InstanceRow> for InstanceRecord {
    type Error = DbError;
    fn try_from(r: InstanceRow) -> DbResult<InstanceRecord> {
        Ok(InstanceRecord {
            item: r
                .item
                .as_deref()
                .map(|d| json_column("instance item", d))
                .transpose()?,
            step: r.step,
            index: r.idx,
            attempt: r.attempt,
            job_id: r.job_id,
            status: r.status,
            exit_code: r.exit_code,
            stdout: r.stdout,
            error: r.error,
            started_at: r.started_at,
            finished_at: r.finished_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct PipelineRow {
    name: String,
    version: i32,
    definition: String,
    created_at: i64,
}

impl TryFrom<PipelineRow> for PipelineRecord {
    type Error = DbError;
    fn try_from(r: PipelineRow) -> DbResult<PipelineRecord> {
        Ok(PipelineRecord {
            definition: json_column("pipeline definition", &r.definition)?,
            name: r.name,
            version: r.version,
            created_at: r.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct JobEndRow {
    id: i64,
    status: String,
    result: Option<String>,
    error: Option<String>,
    finished_at: Option<i64>,
}

impl From<JobEndRow> for JobEnd {
    fn from(r: JobEndRow) -> JobEnd {
        let result: Option<kiln_core::JobResult> = r
            .result
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok());
        JobEnd {
            job_id: r.id,
            status: JobStatus::parse(&r.status).unwrap_or(JobStatus::Failed),
            exit_code: result.as_ref().map(|r| r.exit_code),
            stdout: result.map(|r| r.stdout),
            error: r.error,
            finished_at: r.finished_at,
        }
    }
}

/// A run row with its ended instances as a JSON array of arrays (one
/// statement locks the run and reads them): the instance's columns, then
/// its job's status, result, error and end.
#[derive(sqlx::FromRow)]
pub(crate) struct RunEndedRow {
    #[sqlx(flatten)]
    run: RunRow,
    ended: String,
    /// Step rows asked for, as a JSON array of arrays of [`STEP_COLUMNS`].
    steps: String,
}

/// The elements of one ended instance in [`RunEndedRow::ended`], in order.
/// PostgreSQL's `kiln_run_locked_read` (migration 0030) writes the same
/// elements, and [`STEP_COLUMNS`] for the steps: a change here is made
/// there too, by a migration that replaces the function.
pub(crate) const ENDED_ELEMENTS: &str = "i.step, i.idx, i.attempt, i.job_id, i.status, i.item, \
     i.exit_code, i.stdout, i.error, i.started_at, i.finished_at, j.status, j.result, j.error, \
     j.finished_at";

type EndedElements = (
    String,
    i32,
    i32,
    Option<i64>,
    String,
    Option<String>,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
);

type StepElements = (
    String,
    String,
    i32,
    i32,
    i32,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

impl RunEndedRow {
    pub(crate) fn split(self) -> DbResult<super::RunEnds> {
        let steps: Vec<StepElements> = serde_json::from_str(&self.steps)
            .map_err(|e| DbError::Corrupt(format!("run steps: {e}")))?;
        let steps = steps
            .into_iter()
            .map(|e| {
                StepRecord::try_from(StepRow {
                    step: e.0,
                    status: e.1,
                    total: e.2,
                    succeeded: e.3,
                    failed: e.4,
                    started_at: e.5,
                    finished_at: e.6,
                    deadline_at: e.7,
                    detail: e.8,
                })
            })
            .collect::<DbResult<Vec<_>>>()?;
        let elements: Vec<EndedElements> = serde_json::from_str(&self.ended)
            .map_err(|e| DbError::Corrupt(format!("ended instances: {e}")))?;
        let ended = elements
            .into_iter()
            .map(|e| {
                let end = JobEnd::from(JobEndRow {
                    id: e.3.unwrap_or_default(),
                    status: e.11,
                    result: e.12,
                    error: e.13,
                    finished_at: e.14,
                });
                let instance = InstanceRecord::try_from(InstanceRow {
                    step: e.0,
                    idx: e.1,
                    attempt: e.2,
                    job_id: e.3,
                    status: e.4,
                    item: e.5,
                    exit_code: e.6,
                    stdout: e.7,
                    error: e.8,
                    started_at: e.9,
                    finished_at: e.10,
                })?;
                Ok((instance, end))
            })
            .collect::<DbResult<Vec<_>>>()?;
        Ok(super::RunEnds {
            run: RunRecord::try_from(self.run)?,
            ended,
            steps,
        })
    }
}

/// Text columns of a step row as written.
pub(crate) fn step_detail(step: &StepRecord) -> Option<String> {
    step.detail.as_ref().map(Value::to_string)
}

pub(crate) fn instance_item(row: &InstanceRecord) -> Option<String> {
    row.item.as_ref().map(Value::to_string)
}

/// Stored text cannot hold NUL on PostgreSQL; output copied from a job
/// is made storable the same way results are.
pub(crate) fn storable(text: &Option<String>) -> Option<String> {
    text.as_ref().map(|t| t.replace('\0', "\u{FFFD}"))
}
