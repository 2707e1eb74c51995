//! `/api/v1/incidents`: what the detectors (`kiln_ops::incidents`) opened,
//! per tenant; acknowledged and resolved by hand here. The detectors'
//! settings for the tenant are at `/api/v1/incidents/detectors`.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::Router;
use kiln_db::incidents::{Incident, TimelineEntry};
use kiln_ops::detectors::{merge, DetectorSettings};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Json, Path};
use crate::{now_millis, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/incidents", get(list_incidents))
        .route(
            "/incidents/detectors",
            get(get_detectors).put(put_detectors),
        )
        .route("/incidents/{id}", get(get_incident))
        .route("/incidents/{id}/ack", post(ack_incident))
        .route("/incidents/{id}/resolve", post(resolve_incident))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IncidentView {
    pub id: String,
    /// `node_lost`, `dead_letter_burst`, `failure_rate`, `backlog_age`,
    /// `vm_boot_failures`, `run_failed`.
    pub kind: String,
    /// One open incident per fingerprint; repeats add to its timeline.
    pub fingerprint: String,
    pub severity: String,
    pub title: String,
    /// `open`, `acknowledged`, `resolved`.
    pub status: String,
    pub occurrences: i32,
    pub opened_at: Option<String>,
    pub updated_at: Option<String>,
    pub resolved_at: Option<String>,
    /// `manual` or `automatic` (its condition cleared).
    pub resolved_by: Option<String>,
    pub notes: Option<String>,
}

impl From<Incident> for IncidentView {
    fn from(i: Incident) -> IncidentView {
        IncidentView {
            id: i.id.to_string(),
            kind: i.kind,
            fingerprint: i.fingerprint,
            severity: i.severity,
            title: i.title,
            status: i.status,
            occurrences: i.occurrences,
            opened_at: render_time(i.opened_at),
            updated_at: render_time(i.updated_at),
            resolved_at: i.resolved_at.and_then(render_time),
            resolved_by: i.resolved_by,
            notes: i.notes,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TimelineView {
    pub time: Option<String>,
    /// The event that made this entry, when one did.
    pub event_id: Option<i64>,
    pub entry: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IncidentDetail {
    #[serde(flatten)]
    pub incident: IncidentView,
    /// Oldest first; the newest 200.
    pub timeline: Vec<TimelineView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IncidentList {
    pub incidents: Vec<IncidentView>,
    /// Pass as `before` for the next page.
    pub next_before: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct IncidentParams {
    /// `open`, `acknowledged` or `resolved`.
    pub status: Option<String>,
    /// Incidents older than this id.
    pub before: Option<String>,
    /// At most 500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

const STATUSES: [&str; 3] = ["open", "acknowledged", "resolved"];

fn parse_id(id: &str) -> ApiResult<i64> {
    id.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::not_found("incident"))
}

/// The tenant's incidents, newest first.
#[utoipa::path(get, path = "/api/v1/incidents", tag = "incidents", params(IncidentParams),
    responses((status = 200, body = IncidentList), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_incidents(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Query(params): Query<IncidentParams>,
) -> ApiResult<Json<IncidentList>> {
    if let Some(status) = &params.status {
        if !STATUSES.contains(&status.as_str()) {
            return Err(ApiError::bad_request(
                "status must be open, acknowledged or resolved",
            ));
        }
    }
    let before = match &params.before {
        Some(before) => Some(
            before
                .parse::<i64>()
                .map_err(|_| ApiError::bad_request("before must be an incident id"))?,
        ),
        None => None,
    };
    let limit = params.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 500"));
    }
    let incidents = state
        .db
        .incident_list(&caller.tenant, params.status.as_deref(), before, limit)
        .await?;
    let next_before = (incidents.len() as i64 == limit)
        .then(|| incidents.last().map(|i| i.id.to_string()))
        .flatten();
    Ok(Json(IncidentList {
        incidents: incidents.into_iter().map(Into::into).collect(),
        next_before,
    }))
}

async fn detail(state: &AppState, tenant: &str, id: i64) -> ApiResult<IncidentDetail> {
    let (incident, timeline) = state
        .db
        .incident_get(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found("incident"))?;
    Ok(IncidentDetail {
        incident: incident.into(),
        timeline: timeline
            .into_iter()
            .map(|t: TimelineEntry| TimelineView {
                time: render_time(t.time),
                event_id: t.event_id,
                entry: t.entry,
            })
            .collect(),
    })
}

/// One incident with its timeline.
#[utoipa::path(get, path = "/api/v1/incidents/{id}", tag = "incidents",
    params(("id" = String, Path)),
    responses((status = 200, body = IncidentDetail), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_incident(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(id): Path<String>,
) -> ApiResult<Json<IncidentDetail>> {
    let id = parse_id(&id)?;
    Ok(Json(detail(&state, &caller.tenant, id).await?))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveIncident {
    /// How it was resolved (`restart`, `rollback`, …; at most 64 bytes).
    pub method: Option<String>,
    /// Why, in the operator's words (at most 4,096 bytes).
    pub notes: Option<String>,
}

async fn set(
    state: &AppState,
    tenant: &str,
    id: &str,
    status: &str,
    notes: Option<&str>,
) -> ApiResult<Json<IncidentDetail>> {
    let id = parse_id(id)?;
    if let Some(notes) = notes {
        kiln_core::names::check_text("notes", notes, 4096 + 80)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    match state
        .db
        .incident_set(tenant, id, status, notes, now_millis())
        .await?
    {
        None => Err(ApiError::not_found("incident")),
        Some(false) => Err(ApiError::conflict(format!(
            "the incident cannot become {status} from where it is"
        ))),
        Some(true) => Ok(Json(detail(state, tenant, id).await?)),
    }
}

/// Acknowledge an open incident.
#[utoipa::path(post, path = "/api/v1/incidents/{id}/ack", tag = "incidents",
    params(("id" = String, Path)),
    responses((status = 200, body = IncidentDetail), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn ack_incident(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(id): Path<String>,
) -> ApiResult<Json<IncidentDetail>> {
    set(&state, &caller.tenant, &id, "acknowledged", None).await
}

/// Resolve an incident by hand.
#[utoipa::path(post, path = "/api/v1/incidents/{id}/resolve", tag = "incidents",
    params(("id" = String, Path)), request_body = ResolveIncident,
    responses((status = 200, body = IncidentDetail), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resolve_incident(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(id): Path<String>,
    Json(body): Json<ResolveIncident>,
) -> ApiResult<Json<IncidentDetail>> {
    let notes = match (body.method, body.notes) {
        (Some(method), notes) => {
            kiln_core::names::check_text("method", &method, 64)
                .map_err(|e| ApiError::invalid(e.to_string()))?;
            Some(format!("[{method}] {}", notes.unwrap_or_default()))
        }
        (None, notes) => notes,
    };
    set(&state, &caller.tenant, &id, "resolved", notes.as_deref()).await
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DetectorsView {
    /// Each detector's settings as they apply to the tenant: `enabled`,
    /// `severity`, `auto_resolve` and its thresholds.
    #[schema(value_type = Object)]
    pub settings: DetectorSettings,
    /// What the tenant set itself; the rest are the defaults.
    #[schema(value_type = Object)]
    pub overrides: serde_json::Value,
}

async fn detectors(state: &AppState, tenant: &str) -> ApiResult<DetectorsView> {
    let overrides = state
        .db
        .detector_settings_get(tenant)
        .await?
        .unwrap_or_else(|| serde_json::json!({}));
    let settings = DetectorSettings::default()
        .with_overrides(&overrides)
        .unwrap_or_default();
    Ok(DetectorsView {
        settings,
        overrides,
    })
}

/// The detectors' settings for the tenant.
#[utoipa::path(get, path = "/api/v1/incidents/detectors", tag = "incidents",
    responses((status = 200, body = DetectorsView)), security(("bearer" = [])))]
pub async fn get_detectors(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
) -> ApiResult<Json<DetectorsView>> {
    Ok(Json(detectors(&state, &caller.tenant).await?))
}

/// Change detector settings for the tenant (admin): a JSON merge patch,
/// `{"dead_letter_burst": {"count": 10}, "backlog_age": {"enabled": false}}`;
/// null returns a field to its default.
#[utoipa::path(put, path = "/api/v1/incidents/detectors", tag = "incidents",
    request_body(content = Object, description = "the fields to change"),
    responses((status = 200, body = DetectorsView), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_detectors(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Json(patch): Json<serde_json::Value>,
) -> ApiResult<Json<DetectorsView>> {
    if !patch.is_object() {
        return Err(ApiError::invalid("settings: must be a JSON object"));
    }
    let mut overrides = state
        .db
        .detector_settings_get(&caller.tenant)
        .await?
        .unwrap_or_else(|| serde_json::json!({}));
    merge(&mut overrides, &patch);
    DetectorSettings::default()
        .with_overrides(&overrides)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    // Detectors left with no field of their own go.
    if let Some(map) = overrides.as_object_mut() {
        map.retain(|_, fields| fields.as_object().is_none_or(|f| !f.is_empty()));
    }
    state
        .db
        .detector_settings_put(&caller.tenant, &overrides, now_millis())
        .await?;
    Ok(Json(detectors(&state, &caller.tenant).await?))
}
