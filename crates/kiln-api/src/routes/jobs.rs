//! `/api/v1/jobs` and `/api/v1/run`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use kiln_core::names::{check_name, check_text, json_has_nul};
use kiln_core::{AttemptRecord, Backoff, Job, JobResult, JobStatus, NewJob, Priority, SpecError};
use kiln_db::{CancelOutcome, JobFilter, RetryOutcome};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Caller, Json, Path, Query};
use crate::{now_millis, parse_time, render_time, AppState};

/// Most exit codes a job may list as permanent.
pub const PERMANENT_EXIT_CODES_MAX: usize = 256;
/// Longest backoff delay a job may ask for.
pub const BACKOFF_MS_MAX: i64 = 24 * 3600 * 1000;
/// A page of `GET /jobs` stops growing past this many bytes of JSON; its
/// `next_cursor` then continues where it stopped.
pub const PAGE_BYTES_MAX: usize = 4 << 20;
/// Jobs read from the store at a time while filling a page, so a page of
/// large jobs never holds more than this many beyond its byte budget.
const PAGE_FETCH: i64 = 50;

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
    /// `wasm`, `vm`, `noop`, ...: which sandbox runs it. A kind this
    /// deployment does not run is refused (`unknown_kind`), and so is a spec
    /// its kind refuses (`invalid_spec`).
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")]
    pub kind: String,
    /// What to run; its shape depends on the kind.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")]
    pub queue: Option<String>,
    pub priority: Option<Priority>,
    #[schema(minimum = 1, maximum = 100)]
    pub max_attempts: Option<i32>,
    #[schema(minimum = 1, maximum = 86_400_000)]
    pub timeout_ms: Option<i64>,
    pub backoff: Option<Backoff>,
    /// Exit codes that fail the job at once, without retries.
    #[schema(max_items = 256)]
    pub permanent_exit_codes: Option<Vec<i32>>,
    /// RFC 3339 time before which the job does not start.
    pub run_at: Option<String>,
    /// Alternative to `run_at`: start no sooner than this many ms from now.
    #[schema(minimum = 0)]
    pub delay_ms: Option<i64>,
    /// Submitting the same key again returns the first job.
    #[schema(min_length = 1, max_length = 256)]
    pub idempotency_key: Option<String>,
    /// At most 32; keys are names like `kind`, values at most 256 bytes.
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
    /// The attempt number the job may reach: attempts allowed, plus the
    /// attempts already used when it was last retried by hand (a manual
    /// retry grants a fresh allowance). `attempts` never passes it.
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

/// One finished attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    pub attempt: i32,
    pub worker_id: Option<String>,
    /// RFC 3339
    pub started_at: Option<String>,
    /// RFC 3339
    pub finished_at: Option<String>,
    /// `succeeded`, `failed`, `timeout`, `cancelled` or `lost` (the lease expired).
    pub outcome: String,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: Option<i64>,
}

impl From<AttemptRecord> for AttemptView {
    fn from(record: AttemptRecord) -> AttemptView {
        AttemptView {
            attempt: record.attempt,
            worker_id: record.worker_id,
            started_at: record.started_at.and_then(render_time),
            finished_at: render_time(record.finished_at),
            outcome: record.outcome,
            exit_code: record.exit_code,
            error: record.error,
            duration_ms: record.duration_ms,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptList {
    pub attempts: Vec<AttemptView>,
}

pub(crate) fn parse_id(id: &str) -> ApiResult<i64> {
    id.parse::<i64>().map_err(|_| ApiError::not_found("job"))
}

fn invalid(error: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(error.to_string())
}

impl SubmitJob {
    /// Refuses text PostgreSQL could not store (NUL) and lists without a
    /// bound, before anything else looks at them.
    fn check_text_fields(&self) -> ApiResult<()> {
        check_name("kind", &self.kind).map_err(invalid)?;
        if json_has_nul(&self.spec) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_spec",
                "invalid spec: a string or key holds a NUL character",
            ));
        }
        if let Some(queue) = &self.queue {
            check_name("queue", queue).map_err(invalid)?;
        }
        if let Some(key) = &self.idempotency_key {
            if key.starts_with("kiln:") {
                return Err(ApiError::invalid(
                    "idempotency keys starting with kiln: are kiln's own",
                ));
            }
            check_text(
                "idempotency_key",
                key,
                kiln_core::limits::IDEMPOTENCY_KEY_MAX,
            )
            .map_err(invalid)?;
        }
        for (key, value) in self.labels.iter().flatten() {
            check_name("label key", key).map_err(invalid)?;
            check_text("label value", value, kiln_core::limits::LABEL_VALUE_MAX)
                .map_err(invalid)?;
        }
        if let Some(run_at) = &self.run_at {
            check_text("run_at", run_at, 64).map_err(invalid)?;
        }
        if self
            .permanent_exit_codes
            .as_ref()
            .is_some_and(|codes| codes.len() > PERMANENT_EXIT_CODES_MAX)
        {
            return Err(ApiError::invalid(format!(
                "at most {PERMANENT_EXIT_CODES_MAX} permanent_exit_codes"
            )));
        }
        if self
            .backoff
            .is_some_and(|backoff| backoff.max_ms > BACKOFF_MS_MAX)
        {
            return Err(ApiError::invalid(format!(
                "backoff.max_ms must be at most {BACKOFF_MS_MAX}"
            )));
        }
        Ok(())
    }

    /// Checks the request and turns it into a job for this tenant.
    fn into_new_job(self, tenant: &str, now: i64, default_attempts: i32) -> ApiResult<NewJob> {
        self.check_text_fields()?;
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

/// Rejects jobs no worker of this deployment could run, at submit time:
/// unknown kinds, specs the kind refuses, and `wasm` jobs whose module the
/// tenant has not stored.
async fn check_spec(state: &AppState, job: &NewJob) -> ApiResult<()> {
    let unprocessable =
        |code, message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message);
    match state.kinds.check(&job.kind, &job.spec) {
        Ok(()) => {}
        Err(error @ SpecError::UnknownKind(_)) => {
            let known = state.kinds.names().collect::<Vec<_>>().join(", ");
            return Err(unprocessable(
                "unknown_kind",
                format!("{error}; this deployment runs {known}"),
            ));
        }
        Err(error @ SpecError::Invalid(_)) => {
            let message = kiln_core::names::sanitise_message(&error.to_string(), 1024);
            return Err(unprocessable("invalid_spec", message));
        }
    }
    if state.kinds.takes_secrets(&job.kind) {
        let names = kiln_core::secrets::requested(&job.spec);
        crate::routes::secrets::check_exist(state, &job.tenant, &names).await?;
    }
    if job.kind == "wasm" {
        let spec = kiln_wasm::WasmSpec::parse(&job.spec)
            .map_err(|e| unprocessable("invalid_spec", format!("invalid spec: {e}")))?;
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
    Ok(())
}

/// A submission checked as `POST /api/v1/jobs` checks it (fields, kind,
/// spec), before admission policies; its kind as submitted.
pub(crate) async fn checked_job(
    state: &AppState,
    caller: &Caller,
    body: SubmitJob,
    default_attempts: i32,
    now: i64,
) -> ApiResult<NewJob> {
    let new = body.into_new_job(&caller.tenant, now, default_attempts)?;
    check_spec(state, &new).await?;
    Ok(new)
}

/// Checks a submission as `POST /api/v1/jobs` does, admission policies
/// included, and makes its row, for paths that store jobs in batches
/// (broker intake).
pub(crate) async fn prepare(
    state: &AppState,
    caller: &Caller,
    body: SubmitJob,
    default_attempts: i32,
    now: i64,
) -> ApiResult<NewJob> {
    let mut new = checked_job(state, caller, body, default_attempts, now).await?;
    // Judged by the kind as submitted, before it is routed to a host.
    crate::routes::policies::admit(state, &new).await?;
    new.kind = state.kinds.stored_kind(&new.kind, &new.spec);
    Ok(new)
}

pub(crate) async fn submit(
    state: &AppState,
    caller: &Caller,
    body: SubmitJob,
    params: &SubmitParams,
    default_attempts: i32,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let now = now_millis();
    let new = prepare(state, caller, body, default_attempts, now).await?;
    // The record goes in the job's own transaction: a job is never stored
    // without it. A repeat of an idempotent submit stores nothing and is
    // recorded afterwards.
    use kiln_db::audit::note;
    let audit = note::claim(note::Change::Created, None);
    let inserted = state.db.job_insert_audited(&new, now, audit.as_ref()).await;
    if audit.is_some() && !matches!(inserted, Ok((_, true))) {
        note::unclaim();
    }
    let (mut job, created) = inserted?;
    crate::audit::note_resource(format!("/api/v1/jobs/{}", job.id));
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
    // One watch at a time: a new one only after the last has fired, so a
    // long wait leaves no pile of watches behind on nodes that never fire
    // them (an API node without a worker).
    let mut finished = Some(state.db.watch_job(job.id));
    loop {
        if let Some(fresh) = state.db.job_get(tenant, job.id).await? {
            job = fresh;
        }
        if job.status.is_terminal() || tokio::time::Instant::now() >= deadline {
            return Ok(job);
        }
        let fired = async {
            match finished.as_mut() {
                Some(watch) => watch.await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            fired = fired => {
                finished = fired.then(|| state.db.watch_job(job.id));
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Enqueue a job.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", request_body = SubmitJob, params(SubmitParams),
    responses((status = 201, description = "Created", body = JobView),
              (status = 200, description = "A job with this idempotency key already existed", body = JobView),
              (status = 403, description = "An admission policy refused the job (`policy_denied`)", body = ErrorBody),
              (status = 422, description = "Invalid job", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn submit_job(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Query(params): Query<SubmitParams>,
    Json(body): Json<SubmitJob>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    submit(
        &state,
        &caller.0,
        body,
        &params,
        kiln_core::limits::DEFAULT_MAX_ATTEMPTS,
    )
    .await
}

/// Enqueue a job and wait for its result in the same request (one attempt
/// unless `max_attempts` says otherwise).
#[utoipa::path(post, path = "/api/v1/run", tag = "jobs", request_body = SubmitJob, params(SubmitParams),
    responses((status = 201, description = "Finished, or still running when the wait ran out", body = JobView),
              (status = 200, description = "A job with this idempotency key already existed", body = JobView),
              (status = 403, description = "An admission policy refused the job (`policy_denied`)", body = ErrorBody),
              (status = 422, description = "Invalid job", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn run_job(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Query(params): Query<SubmitParams>,
    Json(body): Json<SubmitJob>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let params = SubmitParams {
        wait: true,
        wait_ms: params.wait_ms,
    };
    submit(&state, &caller.0, body, &params, 1).await
}

/// One job.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_job(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
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
    /// 1 to 1000, default 100. A page also ends once it holds about 4 MiB
    /// of JSON; follow `next_cursor` for the rest.
    pub limit: Option<i64>,
}

impl ListParams {
    /// Checks every filter at the edge: names in their grammar, text
    /// without NUL, times in RFC 3339.
    fn into_filter(self) -> ApiResult<JobFilter> {
        let limit = self.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid("limit must be 1 to 1000"));
        }
        let time = |field: &str, value: Option<String>| -> ApiResult<Option<i64>> {
            value
                .map(|v| {
                    parse_time(&v).ok_or_else(|| {
                        ApiError::invalid(format!("{field} must be an RFC 3339 time"))
                    })
                })
                .transpose()
        };
        if let Some(kind) = &self.kind {
            check_name("kind", kind).map_err(invalid)?;
        }
        if let Some(queue) = &self.queue {
            check_name("queue", queue).map_err(invalid)?;
        }
        let label = match self.label {
            Some(label) => {
                let (key, value) = label
                    .split_once(':')
                    .or_else(|| label.split_once('='))
                    .ok_or_else(|| ApiError::invalid("label must be key:value"))?;
                check_name("label key", key).map_err(invalid)?;
                check_text("label value", value, kiln_core::limits::LABEL_VALUE_MAX)
                    .map_err(invalid)?;
                Some((key.to_string(), value.to_string()))
            }
            None => None,
        };
        let before_id = self
            .cursor
            .map(|c| {
                c.parse::<i64>()
                    .map_err(|_| ApiError::invalid("cursor is not one kiln gave"))
            })
            .transpose()?;
        Ok(JobFilter {
            status: self.status,
            kind: self.kind,
            queue: self.queue,
            label,
            created_after: time("created_after", self.created_after)?,
            created_before: time("created_before", self.created_before)?,
            before_id,
            limit,
        })
    }
}

/// Jobs, newest first.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(ListParams),
    responses((status = 200, body = JobList), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_jobs(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Query(params): Query<ListParams>,
) -> ApiResult<Json<JobList>> {
    let filter = params.into_filter()?;
    Ok(Json(page(&state, &caller.tenant, filter).await?))
}

/// Fills one page from the store a few jobs at a time, until it has
/// `filter.limit` jobs or [`PAGE_BYTES_MAX`] bytes, so large specs and
/// results cannot make one answer (or the memory behind it) unbounded.
async fn page(state: &AppState, tenant: &str, mut filter: JobFilter) -> ApiResult<JobList> {
    let limit = filter.limit;
    let now = now_millis();
    let mut jobs = Vec::new();
    let mut bytes = 0;
    loop {
        filter.limit = PAGE_FETCH.min(limit - jobs.len() as i64);
        let fetched = state.db.job_list(tenant, &filter).await?;
        let exhausted = (fetched.len() as i64) < filter.limit;
        for job in fetched {
            filter.before_id = Some(job.id);
            let view = JobView::from_job(job, now);
            bytes += serde_json::to_vec(&view).map_or(0, |json| json.len());
            jobs.push(view);
            if bytes >= PAGE_BYTES_MAX {
                break;
            }
        }
        let full = jobs.len() as i64 >= limit || bytes >= PAGE_BYTES_MAX;
        if full || exhausted {
            let next_cursor = full.then(|| jobs.last().map(|j| j.id.clone())).flatten();
            return Ok(JobList { jobs, next_cursor });
        }
    }
}

/// Cancel: a queued job at once, a running one's sandbox is killed.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
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
    caller: Authorized<needs::Write>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
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
    caller: Authorized<needs::Read>,
    Path(id): Path<String>,
) -> ApiResult<Json<AttemptList>> {
    let job = state
        .db
        .job_get(&caller.tenant, parse_id(&id)?)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    Ok(Json(AttemptList {
        attempts: job.history.into_iter().map(AttemptView::from).collect(),
    }))
}
