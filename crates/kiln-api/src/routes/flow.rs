//! `/api/v1/pipelines`, `/api/v1/runs` and `/api/v1/schedules`.
//!
//! A pipeline is checked whole at apply (cycles, ids, templates, kinds,
//! specs) and refused with a 422 that names the path; every apply is a new
//! immutable version and a run pins the version it started on. Runs advance
//! in the store (see `kiln_db::flow`); these routes start, show, cancel,
//! retry and decide them.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use kiln_core::names::{check_name, check_text, json_has_nul};
use kiln_db::flow::{
    FireRecord, FlowError, InstanceRecord, NewRun, PipelineRecord, RunFilter, RunRecord, RunView,
    ScheduleRecord, StepView,
};
use kiln_flow::target::ScheduleDef;
use kiln_flow::{PipelineDef, RunStatus};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Json, Path, Query};
use crate::{now_millis, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/pipelines", post(apply_pipeline).get(list_pipelines))
        .route(
            "/pipelines/{name}",
            get(get_pipeline).delete(delete_pipeline),
        )
        .route("/pipelines/{name}/versions", get(pipeline_versions))
        .route("/pipelines/{name}/runs", post(start_run))
        .route("/pipelines/{name}/trigger", post(trigger_run))
        .route("/runs", get(list_runs))
        .route("/runs/{id}", get(get_run))
        .route("/runs/{id}/cancel", post(cancel_run))
        .route("/runs/{id}/retry", post(retry_run))
        .route("/runs/{id}/steps/{step}/approve", post(approve_step))
        .route("/runs/{id}/steps/{step}/reject", post(reject_step))
        .route("/schedules", post(put_schedule).get(list_schedules))
        .route(
            "/schedules/{name}",
            get(get_schedule).delete(delete_schedule),
        )
        .route("/schedules/{name}/pause", post(pause_schedule))
        .route("/schedules/{name}/resume", post(resume_schedule))
        .route("/schedules/{name}/fires", get(schedule_fires))
}

fn invalid_pipeline(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_pipeline",
        message,
    )
}

fn flow_error(error: FlowError) -> ApiError {
    match error {
        FlowError::NotFound(what) => ApiError::not_found(what),
        FlowError::Conflict(message) => ApiError::conflict(message),
        FlowError::Invalid(message) => ApiError::invalid(message),
        FlowError::Denied { policy, message } => crate::routes::policies::denied(&policy, message),
    }
}

fn name_of(what: &str, name: &str) -> ApiResult<()> {
    check_name(what, name).map_err(|_| ApiError::not_found(what))
}

pub(crate) fn run_id(id: &str) -> ApiResult<i64> {
    id.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::not_found("run"))
}

/// A JSON body that may be left out (an empty body is the default).
fn optional_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("the body is not JSON: {inner}"))
        } else {
            ApiError::invalid(format!("{}: {inner}", e.path()))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    Ok(value)
}

// ---- views ----

#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineView {
    pub name: String,
    pub version: i32,
    #[schema(value_type = Object)]
    pub definition: serde_json::Value,
    /// RFC 3339
    pub created_at: Option<String>,
}

impl From<PipelineRecord> for PipelineView {
    fn from(p: PipelineRecord) -> PipelineView {
        PipelineView {
            name: p.name,
            version: p.version,
            definition: p.definition,
            created_at: render_time(p.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineList {
    pub pipelines: Vec<PipelineView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VersionView {
    pub version: i32,
    pub created_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VersionList {
    pub versions: Vec<VersionView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunJson {
    pub id: String,
    pub pipeline: String,
    pub version: i32,
    /// queued, running, succeeded, failed or cancelled.
    pub status: String,
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// `api`, `schedule:<name>` or `webhook:<name>`.
    pub trigger: String,
    /// 1, plus one per retry of the run.
    pub attempt: i32,
    /// Why it failed or stopped: `policy` for a gate, `cancelled`, a step.
    pub reason: Option<String>,
    /// A gate's condition and the values it saw.
    #[schema(value_type = Option<Object>)]
    pub detail: Option<serde_json::Value>,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepJson>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StepJson {
    pub step: String,
    /// pending, running, waiting, succeeded, failed, skipped or cancelled.
    pub status: String,
    pub total: i32,
    pub succeeded: i32,
    pub failed: i32,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<String>,
    /// A gate's condition and values, an approval's decision, an error.
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    pub instances: Vec<InstanceJson>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceJson {
    pub index: i32,
    pub attempt: i32,
    pub job_id: Option<String>,
    pub status: String,
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

fn time(ms: Option<i64>) -> Option<String> {
    ms.and_then(render_time)
}

fn run_json(run: RunRecord, steps: Option<Vec<StepView>>) -> RunJson {
    RunJson {
        id: run.id.to_string(),
        pipeline: run.pipeline,
        version: run.version,
        status: run.status.as_str().to_string(),
        params: run.params,
        labels: run.labels,
        idempotency_key: run.idempotency_key,
        trigger: run.trigger,
        attempt: run.attempt,
        reason: run.reason,
        detail: run.detail,
        created_at: render_time(run.created_at),
        started_at: time(run.started_at),
        finished_at: time(run.finished_at),
        steps: steps.map(|steps| steps.into_iter().map(step_json).collect()),
    }
}

fn step_json(view: StepView) -> StepJson {
    let s = view.step;
    StepJson {
        step: s.step,
        status: s.status.as_str().to_string(),
        total: s.total,
        succeeded: s.succeeded,
        failed: s.failed,
        started_at: time(s.started_at),
        finished_at: time(s.finished_at),
        deadline_at: time(s.deadline_at),
        detail: s.detail,
        instances: view.instances.into_iter().map(instance_json).collect(),
    }
}

fn instance_json(i: InstanceRecord) -> InstanceJson {
    InstanceJson {
        index: i.index,
        attempt: i.attempt,
        job_id: i.job_id.map(|id| id.to_string()),
        status: i.status,
        item: i.item,
        exit_code: i.exit_code,
        error: i.error,
        started_at: time(i.started_at),
        finished_at: time(i.finished_at),
    }
}

pub(crate) fn view_json(view: RunView) -> RunJson {
    run_json(view.run, Some(view.steps))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunList {
    pub runs: Vec<RunJson>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

// ---- pipelines ----

/// Applies a pipeline: a new version of it, checked whole.
#[utoipa::path(post, path = "/api/v1/pipelines", tag = "pipelines",
    request_body(content = Object, description = "A pipeline definition"),
    responses((status = 201, body = PipelineView), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn apply_pipeline(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Json(body): Json<serde_json::Value>,
) -> ApiResult<(StatusCode, axum::Json<PipelineView>)> {
    if json_has_nul(&body) {
        return Err(invalid_pipeline(
            "definition: a string or key holds a NUL character",
        ));
    }
    let checked =
        PipelineDef::from_json(body, &state.kinds).map_err(|e| invalid_pipeline(e.to_string()))?;
    for step in &checked.def.steps {
        crate::routes::secrets::check_exist(&state, &caller.tenant, &step.secrets).await?;
    }
    let record = state
        .db
        .pipeline_put(&caller.tenant, &checked.def, now_millis())
        .await?;
    Ok((StatusCode::CREATED, axum::Json(record.into())))
}

#[utoipa::path(get, path = "/api/v1/pipelines", tag = "pipelines",
    responses((status = 200, body = PipelineList)), security(("bearer" = [])))]
pub async fn list_pipelines(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
) -> ApiResult<axum::Json<PipelineList>> {
    let pipelines = state.db.pipeline_list(&caller.tenant).await?;
    Ok(axum::Json(PipelineList {
        pipelines: pipelines.into_iter().map(PipelineView::from).collect(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct VersionParam {
    /// A version other than the newest (deleted pipelines only by version).
    #[param(minimum = 1)]
    pub version: Option<i32>,
}

#[utoipa::path(get, path = "/api/v1/pipelines/{name}", tag = "pipelines",
    params(("name" = String, Path), VersionParam),
    responses((status = 200, body = PipelineView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_pipeline(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(name): Path<String>,
    Query(params): Query<VersionParam>,
) -> ApiResult<axum::Json<PipelineView>> {
    name_of("pipeline", &name)?;
    let found = state
        .db
        .pipeline_get(&caller.tenant, &name, params.version)
        .await?
        .ok_or_else(|| ApiError::not_found("pipeline"))?;
    Ok(axum::Json(found.into()))
}

#[utoipa::path(get, path = "/api/v1/pipelines/{name}/versions", tag = "pipelines",
    params(("name" = String, Path)),
    responses((status = 200, body = VersionList), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn pipeline_versions(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<VersionList>> {
    name_of("pipeline", &name)?;
    let versions = state.db.pipeline_versions(&caller.tenant, &name).await?;
    if versions.is_empty() {
        return Err(ApiError::not_found("pipeline"));
    }
    Ok(axum::Json(VersionList {
        versions: versions
            .into_iter()
            .map(|(version, at)| VersionView {
                version,
                created_at: render_time(at),
            })
            .collect(),
    }))
}

/// Deletes a pipeline: no new runs start; its runs keep their version.
#[utoipa::path(delete, path = "/api/v1/pipelines/{name}", tag = "pipelines",
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_pipeline(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    name_of("pipeline", &name)?;
    if state.db.pipeline_delete(&caller.tenant, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("pipeline"))
    }
}

// ---- runs ----

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// Values for the pipeline's params; the rest take their defaults.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Starting again with the same key returns the first run.
    #[schema(min_length = 1, max_length = 256)]
    pub idempotency_key: Option<String>,
}

/// Starts a run of the pipeline's newest version.
#[utoipa::path(post, path = "/api/v1/pipelines/{name}/runs", tag = "runs",
    params(("name" = String, Path)), request_body = StartRun,
    responses((status = 201, body = RunJson), (status = 200, body = RunJson),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn start_run(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, axum::Json<RunJson>)> {
    name_of("pipeline", &name)?;
    let body: StartRun = optional_json(&body)?;
    let (view, fresh) = create_run(&state, &caller.tenant, name, body, "api".into()).await?;
    let status = if fresh {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(view_json(view))))
}

/// Starts a run of `pipeline` for `tenant` with the checks every way of
/// starting one shares (this API, webhooks); the flag says whether it is new.
pub(crate) async fn create_run(
    state: &AppState,
    tenant: &str,
    pipeline: String,
    body: StartRun,
    trigger: String,
) -> ApiResult<(RunView, bool)> {
    if json_has_nul(&serde_json::Value::Object(body.params.clone())) {
        return Err(ApiError::invalid(
            "params: a string or key holds a NUL character",
        ));
    }
    if body.labels.len() > kiln_core::limits::LABELS_MAX {
        return Err(ApiError::invalid(format!(
            "at most {} labels",
            kiln_core::limits::LABELS_MAX
        )));
    }
    for (key, value) in &body.labels {
        check_name("label key", key).map_err(|e| ApiError::invalid(e.to_string()))?;
        check_text("label value", value, kiln_core::limits::LABEL_VALUE_MAX)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    if let Some(key) = &body.idempotency_key {
        check_text(
            "idempotency_key",
            key,
            kiln_core::limits::IDEMPOTENCY_KEY_MAX,
        )
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    let new = NewRun {
        tenant: tenant.to_string(),
        pipeline,
        params: body.params,
        labels: body.labels,
        idempotency_key: body.idempotency_key,
        trigger,
    };
    let made = state
        .db
        .run_create(&new, &state.kinds, now_millis())
        .await?
        .map_err(flow_error)?;
    crate::audit::note_resource(format!("/api/v1/runs/{}", made.0.run.id));
    Ok(made)
}

/// The same as `POST /pipelines/{name}/runs`.
#[utoipa::path(post, path = "/api/v1/pipelines/{name}/trigger", tag = "runs",
    params(("name" = String, Path)), request_body = StartRun,
    responses((status = 201, body = RunJson), (status = 200, body = RunJson),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn trigger_run(
    state: State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    name: Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, axum::Json<RunJson>)> {
    start_run(state, caller, name, body).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RunListParams {
    pub pipeline: Option<String>,
    /// queued, running, succeeded, failed or cancelled.
    pub status: Option<String>,
    /// `key:value`
    pub label: Option<String>,
    pub cursor: Option<String>,
    /// 1 to 1000, default 100.
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/runs", tag = "runs", params(RunListParams),
    responses((status = 200, body = RunList), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_runs(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Query(params): Query<RunListParams>,
) -> ApiResult<axum::Json<RunList>> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be 1 to 1000"));
    }
    if let Some(p) = &params.pipeline {
        check_name("pipeline", p).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    let status = match &params.status {
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            ApiError::invalid("status must be queued, running, succeeded, failed or cancelled")
        })?),
        None => None,
    };
    let label = match &params.label {
        Some(text) => {
            let (key, value) = text
                .split_once(':')
                .ok_or_else(|| ApiError::invalid("label must be key:value"))?;
            check_name("label key", key).map_err(|e| ApiError::invalid(e.to_string()))?;
            check_text("label value", value, kiln_core::limits::LABEL_VALUE_MAX)
                .map_err(|e| ApiError::invalid(e.to_string()))?;
            Some((key.to_string(), value.to_string()))
        }
        None => None,
    };
    let before_id = match &params.cursor {
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| ApiError::invalid("cursor is not one this API gave"))?,
        ),
        None => None,
    };
    let runs = state
        .db
        .run_list(
            &caller.tenant,
            &RunFilter {
                pipeline: params.pipeline,
                status,
                label,
                before_id,
                limit,
            },
        )
        .await?;
    let next_cursor = (runs.len() as i64 == limit)
        .then(|| runs.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(axum::Json(RunList {
        runs: runs.into_iter().map(|r| run_json(r, None)).collect(),
        next_cursor,
    }))
}

/// A run with every step, its instances, their jobs and timings.
#[utoipa::path(get, path = "/api/v1/runs/{id}", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, body = RunJson), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_run(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<RunJson>> {
    let view = state
        .db
        .run_get(&caller.tenant, run_id(&id)?)
        .await?
        .ok_or_else(|| ApiError::not_found("run"))?;
    Ok(axum::Json(view_json(view)))
}

/// Cancels a run: running steps are cancelled, pending ones skipped.
#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, body = RunJson), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel_run(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<RunJson>> {
    let view = state
        .db
        .run_cancel(&caller.tenant, run_id(&id)?, now_millis())
        .await?
        .map_err(flow_error)?;
    Ok(axum::Json(view_json(view)))
}

/// Runs a failed or cancelled run again from the steps that did not succeed.
#[utoipa::path(post, path = "/api/v1/runs/{id}/retry", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, body = RunJson), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn retry_run(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<RunJson>> {
    let view = state
        .db
        .run_retry(&caller.tenant, run_id(&id)?, &state.kinds, now_millis())
        .await?
        .map_err(flow_error)?;
    Ok(axum::Json(view_json(view)))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Why; kept on the run with who decided.
    #[schema(max_length = 4096)]
    pub comment: Option<String>,
}

async fn decide(
    state: &AppState,
    caller: &crate::extract::Caller,
    id: &str,
    step: &str,
    approve: bool,
    body: &[u8],
) -> ApiResult<axum::Json<RunJson>> {
    let id = run_id(id)?;
    kiln_flow::def::check_identifier("step", step).map_err(|_| ApiError::not_found("step"))?;
    let comment = optional_json::<Decision>(body)?.comment;
    if let Some(c) = &comment {
        check_text("comment", c, 4096).map_err(|e| ApiError::invalid(e.to_string()))?;
        crate::audit::note_rationale(c.clone());
    }
    let (kind, actor) = caller.actor();
    let by = format!("{kind}:{actor}");
    let view = state
        .db
        .run_decide(
            &caller.tenant,
            id,
            step,
            approve,
            &by,
            comment.as_deref(),
            &state.kinds,
            now_millis(),
        )
        .await?
        .map_err(flow_error)?;
    Ok(axum::Json(view_json(view)))
}

/// Approves a waiting approval step; needs the `approve` scope.
#[utoipa::path(post, path = "/api/v1/runs/{id}/steps/{step}/approve", tag = "runs",
    params(("id" = String, Path), ("step" = String, Path)), request_body = Decision,
    responses((status = 200, body = RunJson), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn approve_step(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Approve>,
    Path((id, step)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<axum::Json<RunJson>> {
    decide(&state, &caller, &id, &step, true, &body).await
}

/// Rejects a waiting approval step (the run fails); needs the `approve` scope.
#[utoipa::path(post, path = "/api/v1/runs/{id}/steps/{step}/reject", tag = "runs",
    params(("id" = String, Path), ("step" = String, Path)), request_body = Decision,
    responses((status = 200, body = RunJson), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn reject_step(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Approve>,
    Path((id, step)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<axum::Json<RunJson>> {
    decide(&state, &caller, &id, &step, false, &body).await
}

// ---- schedules ----

#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleJson {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    #[schema(value_type = Object)]
    pub target: serde_json::Value,
    /// skip, queue or allow.
    pub overlap: String,
    /// none, latest or all.
    pub catch_up: String,
    pub paused: bool,
    pub next_fire_at: Option<String>,
    pub last_fire_at: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fires: Option<Vec<FireJson>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FireJson {
    pub tick: Option<String>,
    pub fired_at: Option<String>,
    /// fired, skipped (the previous fire still ran) or error.
    pub outcome: String,
    pub job_id: Option<String>,
    pub run_id: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleJson>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FireList {
    pub fires: Vec<FireJson>,
}

fn text_of<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn schedule_json(s: ScheduleRecord, fires: Option<Vec<FireRecord>>) -> ScheduleJson {
    ScheduleJson {
        name: s.name,
        cron: s.cron,
        timezone: s.timezone,
        target: s.target,
        overlap: text_of(&s.overlap),
        catch_up: text_of(&s.catch_up),
        paused: s.paused,
        next_fire_at: time(s.next_fire_at),
        last_fire_at: time(s.last_fire_at),
        created_at: render_time(s.created_at),
        updated_at: render_time(s.updated_at),
        fires: fires.map(|f| f.into_iter().map(fire_json).collect()),
    }
}

fn fire_json(f: FireRecord) -> FireJson {
    FireJson {
        tick: render_time(f.tick),
        fired_at: render_time(f.fired_at),
        outcome: f.outcome,
        job_id: f.job_id.map(|id| id.to_string()),
        run_id: f.run_id.map(|id| id.to_string()),
        error: f.error,
    }
}

/// Creates or replaces a schedule.
#[utoipa::path(post, path = "/api/v1/schedules", tag = "schedules",
    request_body(content = Object, description = "{name, cron, timezone, target, overlap, catch_up, paused}"),
    responses((status = 201, body = ScheduleJson), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_schedule(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Json(body): Json<serde_json::Value>,
) -> ApiResult<(StatusCode, axum::Json<ScheduleJson>)> {
    if json_has_nul(&body) {
        return Err(ApiError::invalid("a string or key holds a NUL character"));
    }
    let def: ScheduleDef = serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(format!("{path}: {}", e.into_inner()))
    })?;
    let spec = def.check(&state.kinds).map_err(ApiError::invalid)?;
    if let kiln_flow::target::Target::Job(job) = &def.target {
        if state.kinds.takes_secrets(&job.kind) {
            let names = kiln_core::secrets::requested(&job.spec);
            crate::routes::secrets::check_exist(&state, &caller.tenant, &names).await?;
        }
    }
    let record = state
        .db
        .schedule_put(&caller.tenant, &def, &spec, now_millis())
        .await?;
    Ok((StatusCode::CREATED, axum::Json(schedule_json(record, None))))
}

#[utoipa::path(get, path = "/api/v1/schedules", tag = "schedules",
    responses((status = 200, body = ScheduleList)), security(("bearer" = [])))]
pub async fn list_schedules(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
) -> ApiResult<axum::Json<ScheduleList>> {
    let list = state.db.schedule_list(&caller.tenant).await?;
    Ok(axum::Json(ScheduleList {
        schedules: list.into_iter().map(|s| schedule_json(s, None)).collect(),
    }))
}

/// A schedule with its twenty most recent fires.
#[utoipa::path(get, path = "/api/v1/schedules/{name}", tag = "schedules",
    params(("name" = String, Path)),
    responses((status = 200, body = ScheduleJson), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_schedule(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<ScheduleJson>> {
    name_of("schedule", &name)?;
    let record = state
        .db
        .schedule_get(&caller.tenant, &name)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule"))?;
    let fires = state.db.schedule_fires(&caller.tenant, &name, 20).await?;
    Ok(axum::Json(schedule_json(record, Some(fires))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FireParams {
    /// 1 to 1000, default 100.
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/schedules/{name}/fires", tag = "schedules",
    params(("name" = String, Path), FireParams),
    responses((status = 200, body = FireList), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn schedule_fires(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(name): Path<String>,
    Query(params): Query<FireParams>,
) -> ApiResult<axum::Json<FireList>> {
    name_of("schedule", &name)?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be 1 to 1000"));
    }
    if state
        .db
        .schedule_get(&caller.tenant, &name)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found("schedule"));
    }
    let fires = state
        .db
        .schedule_fires(&caller.tenant, &name, limit)
        .await?;
    Ok(axum::Json(FireList {
        fires: fires.into_iter().map(fire_json).collect(),
    }))
}

async fn set_paused(
    state: &AppState,
    tenant: &str,
    name: &str,
    paused: bool,
) -> ApiResult<axum::Json<ScheduleJson>> {
    name_of("schedule", name)?;
    let record = state
        .db
        .schedule_set_paused(tenant, name, paused, now_millis())
        .await?
        .ok_or_else(|| ApiError::not_found("schedule"))?;
    Ok(axum::Json(schedule_json(record, None)))
}

#[utoipa::path(post, path = "/api/v1/schedules/{name}/pause", tag = "schedules",
    params(("name" = String, Path)),
    responses((status = 200, body = ScheduleJson), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn pause_schedule(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<ScheduleJson>> {
    set_paused(&state, &caller.tenant, &name, true).await
}

/// Resumes; the next tick is counted from now (paused ticks are not caught up).
#[utoipa::path(post, path = "/api/v1/schedules/{name}/resume", tag = "schedules",
    params(("name" = String, Path)),
    responses((status = 200, body = ScheduleJson), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume_schedule(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<ScheduleJson>> {
    set_paused(&state, &caller.tenant, &name, false).await
}

#[utoipa::path(delete, path = "/api/v1/schedules/{name}", tag = "schedules",
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_schedule(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    name_of("schedule", &name)?;
    if state.db.schedule_delete(&caller.tenant, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("schedule"))
    }
}
