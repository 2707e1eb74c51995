//! `/api/v1/queues`: depth, running, pause, resume, concurrency limits.
//!
//! A queue is a name inside a tenant: each tenant's pause and limit apply to
//! its own jobs in a queue of that name, and a tenant sees only its own
//! queues. So a tenant's admin controls its queues, and no key of one
//! tenant can see, hold up or throttle another's.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use kiln_core::{Priority, Scope};
use kiln_db::QueueInfo;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{Caller, Json};
use crate::{now_millis, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/queues", get(list_queues))
        .route("/queues/{name}", get(get_queue).put(update_queue))
        .route("/queues/{name}/pause", post(pause_queue))
        .route("/queues/{name}/resume", post(resume_queue))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    pub name: String,
    pub paused: bool,
    /// Most of the caller's jobs in this queue running at once, across all
    /// workers.
    pub concurrency_limit: Option<i32>,
    /// The caller's jobs waiting to run, by priority.
    pub waiting: BTreeMap<String, i64>,
    /// The caller's jobs running now.
    pub running: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateQueue {
    pub paused: Option<bool>,
    /// null removes the limit.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<i32>)]
    pub concurrency_limit: Option<Option<i32>>,
}

/// Tells "absent" from "null" for fields where null means "remove".
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Option::<T>::deserialize(deserializer).map(Some)
    }
}

fn blank(name: &str) -> QueueView {
    QueueView {
        name: name.to_string(),
        paused: false,
        concurrency_limit: None,
        waiting: Priority::ALL
            .iter()
            .map(|p| (p.as_str().to_string(), 0))
            .collect(),
        running: 0,
    }
}

/// The tenant's queues: those with settings, with waiting or running jobs,
/// and `default`.
async fn views(state: &AppState, tenant: &str) -> ApiResult<Vec<QueueView>> {
    let mut views: BTreeMap<String, QueueView> = BTreeMap::new();
    for queue in state.db.queue_list(Some(tenant)).await? {
        let view = views
            .entry(queue.name.clone())
            .or_insert_with(|| blank(&queue.name));
        view.paused = queue.paused;
        view.concurrency_limit = queue.concurrency_limit;
    }
    for (name, priority, n) in state.db.queue_depths(Some(tenant)).await? {
        let view = views.entry(name.clone()).or_insert_with(|| blank(&name));
        view.waiting.insert(priority.as_str().to_string(), n);
    }
    for (name, n) in state.db.queue_running(Some(tenant)).await? {
        views
            .entry(name.clone())
            .or_insert_with(|| blank(&name))
            .running = n;
    }
    views
        .entry("default".into())
        .or_insert_with(|| blank("default"));
    Ok(views.into_values().collect())
}

async fn view(state: &AppState, tenant: &str, name: &str) -> ApiResult<QueueView> {
    Ok(views(state, tenant)
        .await?
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| blank(name)))
}

fn check_queue_name(name: &str) -> ApiResult<()> {
    kiln_core::validate_name("queue", name).map_err(|e| ApiError::invalid(e.to_string()))
}

/// The caller's queues with its waiting and running jobs.
#[utoipa::path(get, path = "/api/v1/queues", tag = "queues",
    responses((status = 200, body = QueueList)), security(("bearer" = [])))]
pub async fn list_queues(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> ApiResult<Json<QueueList>> {
    caller.require(Scope::Read)?;
    Ok(Json(QueueList {
        queues: views(&state, &caller.tenant).await?,
    }))
}

/// One of the caller's queues (any valid name: a queue without settings or
/// jobs is running, unlimited and empty).
#[utoipa::path(get, path = "/api/v1/queues/{name}", tag = "queues",
    responses((status = 200, body = QueueView), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_queue(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<QueueView>> {
    caller.require(Scope::Read)?;
    check_queue_name(&name)?;
    Ok(Json(view(&state, &caller.tenant, &name).await?))
}

async fn set(
    state: &AppState,
    caller: &Caller,
    name: &str,
    edit: UpdateQueue,
) -> ApiResult<QueueView> {
    caller.require(Scope::Admin)?;
    check_queue_name(name)?;
    let current = state.db.queue_get(&caller.tenant, name).await?;
    let wanted = QueueInfo {
        paused: edit.paused.unwrap_or(current.paused),
        concurrency_limit: edit.concurrency_limit.unwrap_or(current.concurrency_limit),
        ..current
    };
    if wanted.concurrency_limit.is_some_and(|n| n < 1) {
        return Err(ApiError::invalid("concurrency_limit must be at least 1"));
    }
    state.db.queue_upsert(&wanted, now_millis()).await?;
    view(state, &caller.tenant, name).await
}

/// Set the pause state or concurrency limit of one of the caller's queues (admin).
#[utoipa::path(put, path = "/api/v1/queues/{name}", tag = "queues", request_body = UpdateQueue,
    responses((status = 200, body = QueueView), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
pub async fn update_queue(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    Json(edit): Json<UpdateQueue>,
) -> ApiResult<Json<QueueView>> {
    Ok(Json(set(&state, &caller, &name, edit).await?))
}

/// Stop handing out the caller's jobs in this queue (admin).
#[utoipa::path(post, path = "/api/v1/queues/{name}/pause", tag = "queues",
    responses((status = 200, body = QueueView)), security(("bearer" = [])))]
pub async fn pause_queue(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<QueueView>> {
    let edit = UpdateQueue {
        paused: Some(true),
        concurrency_limit: None,
    };
    Ok(Json(set(&state, &caller, &name, edit).await?))
}

/// Hand out the caller's jobs in this queue again (admin).
#[utoipa::path(post, path = "/api/v1/queues/{name}/resume", tag = "queues",
    responses((status = 200, body = QueueView)), security(("bearer" = [])))]
pub async fn resume_queue(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<QueueView>> {
    let edit = UpdateQueue {
        paused: Some(false),
        concurrency_limit: None,
    };
    Ok(Json(set(&state, &caller, &name, edit).await?))
}
