//! `/health`, `/metrics`, `/api/v1/openapi.json`, `/api/v1/workers`.

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use kiln_core::Scope;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::error::{ApiError, ApiResult};
use crate::extract::{Caller, Json};
use crate::{now_millis, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/workers", get(list_workers))
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ])
            .expect("static buckets")
            .build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Liveness: answers `OK` without a key.
pub async fn health() -> &'static str {
    "OK"
}

/// Prometheus text format.
pub async fn metrics_text(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> ApiResult<impl IntoResponse> {
    caller.require(Scope::Read)?;
    let depths = state.db.queue_depths(None).await?;
    for (queue, priority, n) in &depths {
        metrics::gauge!("kiln_queue_depth", "queue" => queue.clone(), "priority" => priority.as_str())
            .set(*n as f64);
    }
    for (queue, n) in state.db.queue_running(None).await? {
        metrics::gauge!("kiln_jobs_running", "queue" => queue).set(n as f64);
    }
    let now = now_millis();
    let online = state
        .db
        .worker_list()
        .await?
        .iter()
        .filter(|w| now - w.last_seen < 30_000)
        .count();
    metrics::gauge!("kiln_workers_online").set(online as f64);
    if let Some(vms) = &state.vms {
        metrics::gauge!("kiln_vm_accelerator", "accelerator" => vms.accelerator().as_str())
            .set(1.0);
        metrics::gauge!("kiln_vms_live").set(vms.live_count() as f64);
        metrics::gauge!("kiln_vms_warm").set(vms.warm_count() as f64);
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus().render(),
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerView {
    pub id: String,
    pub host: String,
    pub kinds: Vec<String>,
    pub slots: i32,
    pub started_at: Option<String>,
    pub last_seen: Option<String>,
    /// `online`, or `lost` when silent for 30 s.
    pub state: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerList {
    pub workers: Vec<WorkerView>,
}

/// Registered workers and the kinds they run.
#[utoipa::path(get, path = "/api/v1/workers", tag = "workers",
    responses((status = 200, body = WorkerList)), security(("bearer" = [])))]
pub async fn list_workers(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> ApiResult<Json<WorkerList>> {
    caller.require(Scope::Read)?;
    let now = now_millis();
    let workers = state.db.worker_list().await?;
    Ok(Json(WorkerList {
        workers: workers
            .into_iter()
            .map(|w| WorkerView {
                state: if now - w.last_seen < 30_000 {
                    "online"
                } else {
                    "lost"
                }
                .to_string(),
                id: w.id,
                host: w.host,
                kinds: w.kinds,
                slots: w.slots,
                started_at: render_time(w.started_at),
                last_seen: render_time(w.last_seen),
            })
            .collect(),
    }))
}

/// This API's OpenAPI 3 document, generated from the code.
pub async fn openapi(caller: Caller) -> ApiResult<Json<utoipa::openapi::OpenApi>> {
    caller.require(Scope::Read)?;
    Ok(Json(crate::ApiDoc::openapi()))
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}
