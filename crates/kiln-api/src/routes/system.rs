//! `/health`, `/metrics`, `/api/v1/openapi.json`, `/api/v1/workers`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use kiln_core::Priority;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Json};
use crate::{now_millis, render_time, AppState};

/// The queue label of every queue not configured through `/queues`: queue
/// names are chosen by tenants, so each may not become a label value.
const OTHER_QUEUES: &str = "other";
/// Most queues with a label of their own (`default` and configured queues,
/// by name); the rest count under `other`.
const QUEUE_LABELS_MAX: usize = 64;

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
#[utoipa::path(get, path = "/health", tag = "system",
    responses((status = 200, description = "The process is serving", body = String, content_type = "text/plain")))]
pub async fn health() -> &'static str {
    "OK"
}

/// The queue gauges' label sets last set, so the next scrape can zero the
/// ones that drained.
#[derive(Default)]
pub struct GaugeLabels {
    depth: BTreeSet<(String, Priority)>,
    running: BTreeSet<String>,
}

/// Queue depths and running jobs by queue, across tenants; queues not
/// configured through `/queues` are summed under `other`. Groups seen last
/// time and empty now are set to zero.
async fn queue_gauges(state: &AppState) -> ApiResult<()> {
    let mut configured: BTreeSet<String> = state
        .db
        .queue_list(None)
        .await?
        .into_iter()
        .map(|q| q.name)
        .filter(|name| name != "default")
        .take(QUEUE_LABELS_MAX - 1)
        .collect();
    configured.insert("default".to_string());
    let label = |queue: String| {
        if configured.contains(&queue) {
            queue
        } else {
            OTHER_QUEUES.to_string()
        }
    };
    let mut depth: BTreeMap<(String, Priority), i64> = BTreeMap::new();
    for (queue, priority, n) in state.db.queue_depths(None).await? {
        *depth.entry((label(queue), priority)).or_default() += n;
    }
    let mut running: BTreeMap<String, i64> = BTreeMap::new();
    for (queue, n) in state.db.queue_running(None).await? {
        *running.entry(label(queue)).or_default() += n;
    }
    let mut last = state
        .gauges
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (queue, priority) in &last.depth {
        if !depth.contains_key(&(queue.clone(), *priority)) {
            metrics::gauge!("kiln_queue_depth", "queue" => queue.clone(), "priority" => priority.as_str())
                .set(0.0);
        }
    }
    for queue in &last.running {
        if !running.contains_key(queue) {
            metrics::gauge!("kiln_jobs_running", "queue" => queue.clone()).set(0.0);
        }
    }
    for ((queue, priority), n) in &depth {
        metrics::gauge!("kiln_queue_depth", "queue" => queue.clone(), "priority" => priority.as_str())
            .set(*n as f64);
    }
    for (queue, n) in &running {
        metrics::gauge!("kiln_jobs_running", "queue" => queue.clone()).set(*n as f64);
    }
    last.depth = depth.into_keys().collect();
    last.running = running.into_keys().collect();
    Ok(())
}

/// Prometheus text format, for the whole deployment (system scope).
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn metrics_text(
    State(state): State<Arc<AppState>>,
    _caller: Authorized<needs::System>,
) -> ApiResult<impl IntoResponse> {
    queue_gauges(&state).await?;
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

/// Registered workers and the kinds they run (system scope: host names are
/// the deployment's, not a tenant's).
#[utoipa::path(get, path = "/api/v1/workers", tag = "workers",
    responses((status = 200, body = WorkerList), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_workers(
    State(state): State<Arc<AppState>>,
    _caller: Authorized<needs::System>,
) -> ApiResult<Json<WorkerList>> {
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
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "system",
    responses((status = 200, description = "OpenAPI 3 document", body = Object)),
    security(("bearer" = [])))]
pub async fn openapi(_caller: Authorized<needs::Read>) -> Json<utoipa::openapi::OpenApi> {
    Json(crate::ApiDoc::openapi())
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
