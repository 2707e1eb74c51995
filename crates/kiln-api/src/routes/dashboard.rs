//! `/api/v1/dashboard/stats`: throughput, latency percentiles, failure
//! rates, queue depths and open incidents over the last hour, day or week,
//! from the rollups the store keeps (`kiln_ops::dashboard`).
//!
//! A tenant's key sees its own jobs only. The deployment's key (`system`)
//! sees every tenant's together, or one tenant's with `?tenant=`, and is
//! the only one shown deployment-wide figures (nodes online, live VMs).

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use kiln_core::{Scope, Scopes};
use kiln_db::dashboard::Counts;
use kiln_ops::dashboard::{Failures, Percentiles, QueueNow, Range, Stats, View};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Json, Query};
use crate::{now_millis, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/dashboard/stats", get(dashboard_stats))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// `1h` (default; one point a minute), `24h` or `7d` (one point an hour).
    pub range: Option<String>,
    /// The deployment's key only: one tenant's figures instead of every
    /// tenant's.
    pub tenant: Option<String>,
}

/// Jobs that changed state during one step (or the whole window).
#[derive(Debug, Serialize, ToSchema)]
pub struct CountsView {
    pub enqueued: i64,
    /// Attempts started.
    pub started: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub dead: i64,
    pub cancelled: i64,
    /// Went back to waiting: retries (automatic or by hand), lost leases,
    /// releases.
    pub retried: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PointView {
    /// The step's start.
    pub at: Option<String>,
    #[serde(flatten)]
    pub counts: CountsView,
}

/// Nearest-rank percentiles in ms, from log-scale buckets: within 12.3 %
/// of the true value or 1 ms, whichever is larger. Null without samples.
#[derive(Debug, Serialize, ToSchema)]
pub struct PercentilesView {
    pub count: i64,
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
    pub p99_ms: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LatencyView {
    /// From when a job was due (submitted, or its `run_at`) to its first
    /// start.
    pub enqueue_to_start: PercentilesView,
    /// Start to end of the attempt that ended each job.
    pub run_time: PercentilesView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FailureView {
    /// The kind or the queue.
    pub name: String,
    pub succeeded: i64,
    pub failed: i64,
    pub dead: i64,
    pub cancelled: i64,
    /// (failed + dead) / (succeeded + failed + dead); null when none ended.
    pub failure_rate: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FailuresView {
    pub by_kind: Vec<FailureView>,
    pub by_queue: Vec<FailureView>,
}

/// A queue's waiting jobs now.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueDepthView {
    pub tenant: String,
    pub queue: String,
    pub queued: i64,
    pub scheduled: i64,
    /// The earliest `run_at` among its waiting jobs.
    pub oldest_run_at: Option<String>,
    /// How long the oldest due job has waited; null when none is due yet.
    pub oldest_age_ms: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentView {
    pub nodes_online: i64,
    /// VMs on nodes that are not lost.
    pub vms_live: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatsView {
    /// `1h`, `24h` or `7d`.
    pub range: String,
    /// Whose jobs: a tenant, or null for every tenant (deployment key).
    pub tenant: Option<String>,
    /// The window's first millisecond: a whole minute (`1h`) or hour.
    pub from: Option<String>,
    pub to: Option<String>,
    pub step_seconds: i64,
    /// `queued`, `scheduled`, `running`: now; `succeeded`, `failed`,
    /// `dead`, `cancelled`: ended in the window.
    pub jobs_by_status: std::collections::BTreeMap<String, i64>,
    /// One point per step, oldest first.
    pub throughput: Vec<PointView>,
    pub totals: CountsView,
    pub latency: LatencyView,
    pub failures: FailuresView,
    /// The 20 queues with the most waiting jobs, most first.
    pub queues: Vec<QueueDepthView>,
    /// Incidents open or acknowledged now.
    pub incidents_open: i64,
    /// The deployment's key only.
    pub deployment: Option<DeploymentView>,
}

fn counts(c: &Counts) -> CountsView {
    CountsView {
        enqueued: c.enqueued,
        started: c.started,
        succeeded: c.succeeded,
        failed: c.failed,
        dead: c.dead,
        cancelled: c.cancelled,
        retried: c.retried,
    }
}

fn percentiles(p: Percentiles) -> PercentilesView {
    PercentilesView {
        count: p.count,
        p50_ms: p.p50,
        p95_ms: p.p95,
        p99_ms: p.p99,
    }
}

fn failure(f: Failures) -> FailureView {
    FailureView {
        name: f.name,
        succeeded: f.succeeded,
        failed: f.failed,
        dead: f.dead,
        cancelled: f.cancelled,
        failure_rate: f.failure_rate,
    }
}

fn queue(q: QueueNow, now: i64) -> QueueDepthView {
    QueueDepthView {
        oldest_run_at: q.oldest_run_at.and_then(render_time),
        oldest_age_ms: q.oldest_run_at.filter(|at| *at <= now).map(|at| now - at),
        tenant: q.tenant,
        queue: q.queue,
        queued: q.queued,
        scheduled: q.scheduled,
    }
}

fn view(stats: Stats) -> StatsView {
    let step = stats.step_ms;
    let now = stats.now;
    StatsView {
        range: stats.range.as_str().to_string(),
        tenant: stats.tenant,
        from: render_time(stats.from),
        to: render_time(now),
        step_seconds: step / 1000,
        jobs_by_status: stats.by_status,
        throughput: stats
            .series
            .iter()
            .enumerate()
            .map(|(i, c)| PointView {
                at: render_time(stats.from + i as i64 * step),
                counts: counts(c),
            })
            .collect(),
        totals: counts(&stats.totals),
        latency: LatencyView {
            enqueue_to_start: percentiles(stats.wait),
            run_time: percentiles(stats.run),
        },
        failures: FailuresView {
            by_kind: stats.by_kind.into_iter().map(failure).collect(),
            by_queue: stats.by_queue.into_iter().map(failure).collect(),
        },
        queues: stats.queues.into_iter().map(|q| queue(q, now)).collect(),
        incidents_open: stats.incidents_open,
        deployment: stats.fleet.map(|f| DeploymentView {
            nodes_online: f.nodes_online,
            vms_live: f.vms_live,
        }),
    }
}

/// Whose figures a caller asked for and may see.
fn scope_of<'a>(
    caller_tenant: &'a str,
    scopes: &Scopes,
    asked: Option<&'a str>,
) -> ApiResult<View<'a>> {
    let system = scopes.allows(Scope::System);
    match asked {
        _ if system => Ok(View {
            tenant: asked,
            deployment: true,
        }),
        Some(tenant) if tenant != caller_tenant => Err(ApiError::forbidden(
            "only the deployment's key may read another tenant's figures",
        )),
        _ => Ok(View {
            tenant: Some(caller_tenant),
            deployment: false,
        }),
    }
}

/// The dashboard's figures over the last hour, day or week.
#[utoipa::path(get, path = "/api/v1/dashboard/stats", tag = "dashboard", params(StatsParams),
    responses((status = 200, body = StatsView), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn dashboard_stats(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Query(params): Query<StatsParams>,
) -> ApiResult<Json<StatsView>> {
    let range = match params.range.as_deref() {
        None => Range::Hour,
        Some(text) => Range::parse(text)
            .ok_or_else(|| ApiError::bad_request("range must be one of 1h, 24h, 7d"))?,
    };
    if let Some(tenant) = &params.tenant {
        kiln_core::validate_name("tenant", tenant)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let view_of = scope_of(&caller.tenant, &caller.scopes, params.tenant.as_deref())?;
    let stats = kiln_ops::dashboard::stats(&state.db, view_of, range, now_millis()).await?;
    Ok(Json(view(stats)))
}
