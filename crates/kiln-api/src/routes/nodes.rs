//! `/api/v1/nodes`: the fleet (every `serve`, `api`, `worker` and
//! `scheduler` process), its load, and drain/resume. Deployment scope only
//! (`system`): hosts and load are the deployment's, not a tenant's.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use kiln_db::nodes::{LoadSample, NodeInfo, NodeStatus};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Json, Path, Query};
use crate::{render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/nodes", get(list_nodes))
        .route("/nodes/{id}", get(get_node))
        .route("/nodes/{id}/drain", post(drain_node))
        .route("/nodes/{id}/resume", post(resume_node))
}

/// Load figures from the node's `/proc`; null where the host does not tell.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoadView {
    /// Share of all CPUs busy since the previous heartbeat, 0 to 1.
    pub cpu: Option<f64>,
    /// The 1-minute load average.
    pub load1: Option<f64>,
    /// Share of memory in use (1 - MemAvailable / MemTotal), 0 to 1.
    pub mem_used: Option<f64>,
    pub mem_total_bytes: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    /// `<host>-<pid>`: a restarted process is a new node. A worker leases
    /// under this id.
    pub id: String,
    pub host: String,
    /// `api`, `worker`, `scheduler`.
    pub roles: Vec<String>,
    pub version: String,
    /// Job kinds its worker runs (none without the worker role).
    pub kinds: Vec<String>,
    pub slots_used: i32,
    pub slots_total: i32,
    /// `kvm` or `tcg` when the node runs microVMs.
    pub accelerator: Option<String>,
    pub vms_live: i32,
    pub load: LoadView,
    /// `online`, `draining` (leases nothing new) or `lost` (silent past the
    /// deadline).
    pub status: String,
    /// Whether an operator asked it to drain; kept while it is lost.
    pub drain: bool,
    pub started_at: Option<String>,
    pub last_seen: Option<String>,
    pub lost_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

/// One heartbeat's figures.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoadPoint {
    pub time: Option<String>,
    pub cpu: Option<f64>,
    pub load1: Option<f64>,
    pub mem_used: Option<f64>,
    pub slots_used: i32,
    pub vms_live: i32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeDetailView {
    #[serde(flatten)]
    pub node: NodeView,
    /// The last 15 minutes, oldest first, a point per heartbeat.
    pub series: Vec<LoadPoint>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NodeQuery {
    /// `online`, `draining` or `lost`.
    pub status: Option<String>,
}

fn view(node: NodeInfo) -> NodeView {
    let r = node.report;
    NodeView {
        id: r.id,
        host: r.host,
        roles: r.roles,
        version: r.version,
        kinds: r.kinds,
        slots_used: r.slots_used,
        slots_total: r.slots_total,
        accelerator: r.accelerator,
        vms_live: r.vms_live,
        load: LoadView {
            cpu: r.load.cpu,
            load1: r.load.load1,
            mem_used: r.load.mem_used,
            mem_total_bytes: r.load.mem_total_bytes,
        },
        status: node.status.as_str().to_string(),
        drain: node.drain,
        started_at: render_time(r.started_at),
        last_seen: render_time(node.last_seen),
        lost_at: node.lost_at.and_then(render_time),
    }
}

fn point(sample: LoadSample) -> LoadPoint {
    LoadPoint {
        time: render_time(sample.time),
        cpu: sample.cpu,
        load1: sample.load1,
        mem_used: sample.mem_used,
        slots_used: sample.slots_used,
        vms_live: sample.vms_live,
    }
}

/// Every node, or those in one status.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes", params(NodeQuery),
    responses((status = 200, body = NodeList), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_nodes(
    State(state): State<Arc<AppState>>,
    _caller: Authorized<needs::System>,
    Query(query): Query<NodeQuery>,
) -> ApiResult<Json<NodeList>> {
    let status = match query.status.as_deref() {
        None => None,
        Some(text) => Some(NodeStatus::parse(text).ok_or_else(|| {
            ApiError::bad_request("status must be one of online, draining, lost")
        })?),
    };
    let nodes = kiln_ops::list(&state.db, status).await?;
    Ok(Json(NodeList {
        nodes: nodes.into_iter().map(view).collect(),
    }))
}

/// One node with its recent load series.
#[utoipa::path(get, path = "/api/v1/nodes/{id}", tag = "nodes",
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, body = NodeDetailView), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_node(
    State(state): State<Arc<AppState>>,
    _caller: Authorized<needs::System>,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeDetailView>> {
    let detail = kiln_ops::get(&state.db, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("node"))?;
    Ok(Json(NodeDetailView {
        node: view(detail.node),
        series: detail.load.into_iter().map(point).collect(),
    }))
}

/// Stops the node's worker leasing new jobs; running jobs finish. It
/// takes effect at the node's next heartbeat; asking twice is harmless.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/drain", tag = "nodes",
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, body = NodeView), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn drain_node(
    State(state): State<Arc<AppState>>,
    _caller: Authorized<needs::System>,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeView>> {
    let node = kiln_ops::drain(&state.db, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("node"))?;
    Ok(Json(view(node)))
}

/// Lets a drained node lease again.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/resume", tag = "nodes",
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, body = NodeView), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume_node(
    State(state): State<Arc<AppState>>,
    _caller: Authorized<needs::System>,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeView>> {
    let node = kiln_ops::resume(&state.db, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("node"))?;
    Ok(Json(view(node)))
}
