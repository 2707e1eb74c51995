//! `/api/v1/jobs` and `/api/v1/run`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use kiln_core::{AttemptRecord, Backoff, Job, JobResult, JobStatus, NewJob, Priority, Scope};
use kiln_db::{CancelOutcome, JobFilter, RetryOutcome};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{Caller, Json, Query};
use crate::{now_millis, parse_time, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/jobs", post(submit_job).get(list_jobs))
        .route("/jobs/{id}", get(get_job))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/jobs/{id}/retry", post(retry_job))
        .route("/jobs/{id}/attempts", get(job_attempts))
        .route("/run", post(run_job))
}

/// A job to enqueue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// `wasm`, `vm`, `noop`, ...: which sandbox runs it.
    pub kind: String,
    /// What to run; its shape depends on the kind.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    pub queue: Option<String>,
    pub priority: Option<Priority>,
    pub max_attempts: Option<i32>,
    pub timeout_ms: Option<i64>,
    pub backoff: Option<Backoff>,
    /// Exit codes that fail the job at once, without retries.
    pub permanent_exit_codes: Option<Vec<i32>>,
    /// RFC 3339 time before which the job does not start.
    pub run_at: Option<String>,
    /// Alternative to `run_at`: start no sooner than this many ms from now.
    pub delay_ms: Option<i64>,
    /// Submitting the same key again returns the first job.
    pub idempotency_key: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SubmitParams {
    /// Wait for the job to finish (up to `wait_ms`) and answer with its result.
    #[serde(default)]
    pub wait: bool,
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub kind: String,
    pub queue: String,
    pub priority: Priority,
    pub status: JobStatus,
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    pub labels: BTreeMap<String, String>,
    /// Attempts started so far.
    pub attempts: i32,
    pub max_attempts: i32,
    pub timeout_ms: i64,
    pub backoff: Backoff,
    pub permanent_exit_codes: Vec<i32>,
    pub idempotency_key: Option<String>,
    pub run_at: Option<String>,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub worker_id: Option<String>,
    pub cancel_requested: bool,
    pub result: Option<JobResult>,
    pub error: Option<String>,
}

impl JobView {
    pub fn from_job(job: Job, now: i64) -> JobView {
        JobView {
            id: job.id.to_string(),
            status: job.visible_status(now),
            kind: job.kind,
            queue: job.queue,
            priority: job.priority,
            spec: job.spec,
            labels: job.labels,
            attempts: job.attempt,
            max_attempts: job.max_attempts + job.retry_from,
            timeout_ms: job.timeout_ms,
            backoff: job.backoff,
            permanent_exit_codes: job.permanent_exit_codes,
            idempotency_key: job.idempotency_key,
            run_at: render_time(job.run_at),
            created_at: render_time(job.created_at),
            started_at: job.started_at.and_then(render_time),
            finished_at: job.finished_at.and_then(render_time),
            worker_id: job.worker_id,
            cancel_requested: job.cancel_requested,
            result: job.result,
            error: job.error,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptList {
    pub attempts: Vec<AttemptRecord>,
}

pub(crate) fn parse_id(id: &str) -> ApiResult<i64> {
    id.parse::<i64>().map_err(|_| ApiError::not_found("job"))
}

impl SubmitJob {
    /// Checks the request and turns it into a job for this tenant.
    fn into_new_job(self, tenant: &str, now: i64, default_attempts: i32) -> ApiResult<NewJob> {
        let mut job = NewJob::new(tenant, &self.kind, self.spec);
        job.queue = self.queue.unwrap_or_else(|| "default".to_string());
        job.priority = self.priority.unwrap_or_default();
        job.max_attempts = self.max_attempts.unwrap_or(default_attempts);
        if let Some(timeout_ms) = self.timeout_ms {
            job.timeout_ms = timeout_ms;
        }
        if let Some(backoff) = self.backoff {
            job.backoff = backoff;
        }
        job.permanent_exit_codes = self.permanent_exit_codes.unwrap_or_default();
        job.idempotency_key = self.idempotency_key;
        job.labels = self.labels.unwrap_or_default();
        job.run_at = match (self.run_at, self.delay_ms) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid("give run_at or delay_ms, not both"))
            }
            (Some(at), None) => Some(parse_time(&at).ok_or_else(|| {
                ApiError::invalid("run_at must be an RFC 3339 time such as 2026-01-01T00:00:00Z")
            })?),
            (None, Some(delay)) => Some(
                kiln_core::run_at_after(now, delay)
                    .map_err(|e| ApiError::invalid(e.to_string()))?,
            ),
            (None, None) => None,
        };
        job.validate()
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok(job)
    }
}

/// Rejects specs the kind's sandbox could never run, at submit time.
async fn check_spec(state: &AppState, job: &NewJob) -> ApiResult<()> {
    if job.kind == "wasm" {
        let spec = kiln_wasm::WasmSpec::parse(&job.spec)
            .map_err(|e| ApiError::invalid(format!("invalid wasm spec: {e}")))?;
        if state
            .db
            .module_get(&job.tenant, &spec.module)
            .await?
            .is_none()
        {
            return Err(ApiError::invalid(format!(
                "module {} is not stored; push it with POST /api/v1/modules",
                spec.module
            )));
        }
    }
    if job.kind == "vm" {
        kiln_vm::job::VmJobSpec::parse(&job.spec)
            .map_err(|e| ApiError::invalid(format!("invalid vm spec: {e}")))?;
    }
    Ok(())
}

async fn submit(
    state: &AppState,
    caller: &Caller,
    body: SubmitJob,
    params: &SubmitParams,
    default_attempts: i32,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    caller.require(Scope::Write)?;
    let now = now_millis();
    let new = body.into_new_job(&caller.tenant, now, default_attempts)?;
    check_spec(state, &new).await?;
    let (mut job, created) = state.db.job_insert(&new, now).await?;
    metrics::counter!("kiln_jobs_submitted_total", "kind" => job.kind.clone()).increment(1);
    if params.wait {
        let limit = params.wait_ms.unwrap_or(60_000).min(600_000);
        job = wait_for_end(state, &caller.tenant, job, Duration::from_millis(limit)).await?;
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(JobView::from_job(job, now_millis()))))
}

/// Waits until the job reaches a final state or the time runs out. Woken at
/// once by completions in this process; polls for other processes'.
pub(crate) async fn wait_for_end(
    state: &AppState,
    tenant: &str,
    mut job: Job,
    limit: Duration,
) -> ApiResult<Job> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let finished = state.db.watch_job(job.id);
        if let Some(fresh) = state.db.job_get(tenant, job.id).await? {
            job = fresh;
        }
        if job.status.is_terminal() || tokio::time::Instant::now() >= deadline {
            return Ok(job);
        }
        tokio::select! {
            _ = finished => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Enqueue a job.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", request_body = SubmitJob, params(SubmitParams),
    responses((status = 201, description = "Created", body = JobView),
              (status = 200, description = "A job with this idempotency key already existed", body = JobView),
              (status = 422, description = "Invalid job", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn submit_job(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<SubmitParams>,
    Json(body): Json<SubmitJob>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    submit(
        &state,
        &caller,
        body,
        &params,
        kiln_core::limits::DEFAULT_MAX_ATTEMPTS,
    )
    .await
}

/// Enqueue a job and wait for its result in the same request (one attempt
/// unless `max_attempts` says otherwise).
#[utoipa::path(post, path = "/api/v1/run", tag = "jobs", request_body = SubmitJob,
    responses((status = 201, description = "Finished, or still running when the wait ran out", body = JobView)),
    security(("bearer" = [])))]
pub async fn run_job(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<SubmitParams>,
    Json(body): Json<SubmitJob>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let params = SubmitParams {
        wait: true,
        wait_ms: params.wait_ms,
    };
    submit(&state, &caller, body, &params, 1).await
}

/// One job.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_job(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    caller.require(Scope::Read)?;
    let job = state
        .db
        .job_get(&caller.tenant, parse_id(&id)?)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    Ok(Json(JobView::from_job(job, now_millis())))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub status: Option<JobStatus>,
    pub kind: Option<String>,
    pub queue: Option<String>,
    /// `key:value`
    pub label: Option<String>,
    /// RFC 3339
    pub created_after: Option<String>,
    /// RFC 3339
    pub created_before: Option<String>,
    pub cursor: Option<String>,
    /// 1 to 1000, default 100.
    pub limit: Option<i64>,
}

/// Jobs, newest first.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(ListParams),
    responses((status = 200, body = JobList)), security(("bearer" = [])))]
pub async fn list_jobs(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<ListParams>,
) -> ApiResult<Json<JobList>> {
    caller.require(Scope::Read)?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be 1 to 1000"));
    }
    let time = |field: &str, value: Option<String>| -> ApiResult<Option<i64>> {
        value
            .map(|v| {
                parse_time(&v)
                    .ok_or_else(|| ApiError::invalid(format!("{field} must be an RFC 3339 time")))
            })
            .transpose()
    };
    let label = match params.label {
        Some(label) => {
            let (key, value) = label
                .split_once(':')
                .or_else(|| label.split_once('='))
                .ok_or_else(|| ApiError::invalid("label must be key:value"))?;
            kiln_core::validate_name("label key", key)
                .map_err(|e| ApiError::invalid(e.to_string()))?;
            Some((key.to_string(), value.to_string()))
        }
        None => None,
    };
    let before_id = params
        .cursor
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::invalid("cursor is not one kiln gave"))
        })
        .transpose()?;
    let filter = JobFilter {
        status: params.status,
        kind: params.kind,
        queue: params.queue,
        label,
        created_after: time("created_after", params.created_after)?,
        created_before: time("created_before", params.created_before)?,
        before_id,
        limit,
    };
    let jobs = state.db.job_list(&caller.tenant, &filter).await?;
    let next_cursor = if jobs.len() as i64 == limit {
        jobs.last().map(|j| j.id.to_string())
    } else {
        None
    };
    let now = now_millis();
    Ok(Json(JobList {
        jobs: jobs
            .into_iter()
            .map(|j| JobView::from_job(j, now))
            .collect(),
        next_cursor,
    }))
}

/// Cancel: a queued job at once, a running one's sandbox is killed.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    caller.require(Scope::Write)?;
    let now = now_millis();
    match state
        .db
        .job_cancel(&caller.tenant, parse_id(&id)?, now)
        .await?
    {
        CancelOutcome::NotFound => Err(ApiError::not_found("job")),
        CancelOutcome::Cancelled(job) | CancelOutcome::Requested(job) => {
            Ok(Json(JobView::from_job(job, now)))
        }
        CancelOutcome::AlreadyFinished(job) => Err(ApiError::conflict(format!(
            "job already {}",
            job.status.as_str()
        ))),
    }
}

/// Run a failed, dead or cancelled job again.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/retry", tag = "jobs",
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn retry_job(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    caller.require(Scope::Write)?;
    let now = now_millis();
    match state
        .db
        .job_retry(&caller.tenant, parse_id(&id)?, now)
        .await?
    {
        RetryOutcome::NotFound => Err(ApiError::not_found("job")),
        RetryOutcome::Requeued(job) => Ok(Json(JobView::from_job(job, now))),
        RetryOutcome::NotRetryable(job) => Err(ApiError::conflict(format!(
            "only failed, dead or cancelled jobs can be retried; this one is {}",
            job.visible_status(now).as_str()
        ))),
    }
}

/// The job's finished attempts, oldest first.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/attempts", tag = "jobs",
    responses((status = 200, body = AttemptList), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn job_attempts(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<AttemptList>> {
    caller.require(Scope::Read)?;
    let job = state
        .db
        .job_get(&caller.tenant, parse_id(&id)?)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    Ok(Json(AttemptList {
        attempts: job.history,
    }))
}
