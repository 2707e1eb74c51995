//! `/api/v1/events`: the tenant's event log as Server-Sent Events (when
//! asked for with `Accept: text/event-stream`), as JSON pages for polling
//! clients, and over a WebSocket; `/api/v1/jobs/{id}/events` for one job.
//! Streams resume after `Last-Event-ID` or `?after=` with no gap and no
//! duplicate; a reader too slow for the process's bounded buffer is told
//! why and closed (see `kiln_events`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use kiln_db::events::Event;
use kiln_events::{EventFilter, Subscription};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Path, Query};
use crate::{render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/events", get(events))
        .route("/events/ws", get(events_ws))
        .route("/jobs/{id}/events", get(job_events))
}

/// How often an idle stream sends a keep-alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The default and largest page.
const PAGE_DEFAULT: i64 = 100;
const PAGE_MAX: i64 = 1000;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Types, comma-separated: `job.succeeded`, `job.*`, `*`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    kind: Option<String>,
    /// `kind:id`, e.g. `job:42`, `run:7`, `step:7/build`.
    resource: Option<String>,
    /// `key=value`, comma-separated; all must match.
    label: Option<String>,
    /// Events after this id (a stream also takes `Last-Event-ID`); a stream
    /// without one starts at the newest event, a page at the oldest.
    after: Option<i64>,
    /// Page size (1 to 1000, default 100).
    limit: Option<i64>,
}

/// An event as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct EventJson {
    /// Its position in the log: increasing, never reused.
    id: String,
    time: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[schema(value_type = Object)]
    resource: serde_json::Value,
    labels: std::collections::BTreeMap<String, String>,
    #[schema(value_type = Object)]
    data: serde_json::Value,
}

impl From<Event> for EventJson {
    fn from(e: Event) -> EventJson {
        EventJson {
            id: e.id.to_string(),
            time: render_time(e.time),
            kind: e.kind,
            resource: serde_json::json!({"kind": e.resource.kind, "id": e.resource.id}),
            labels: e.labels,
            data: e.data,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct EventPage {
    events: Vec<EventJson>,
    /// Pass as `after` for the next page (it moves past events the filter
    /// left out too).
    next_after: String,
}

fn filter_of(params: &EventParams) -> ApiResult<EventFilter> {
    EventFilter::parse(
        params.kind.as_deref(),
        params.resource.as_deref(),
        params.label.as_deref(),
    )
    .map_err(|e| ApiError::invalid(e.to_string()))
}

fn after_of(params: &EventParams, headers: &HeaderMap) -> ApiResult<Option<i64>> {
    let header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID must be an event id"))
        })
        .transpose()?;
    let after = header.or(params.after);
    if after.is_some_and(|a| a < 0) {
        return Err(ApiError::invalid("after must be an event id (0 or more)"));
    }
    Ok(after)
}

async fn subscribe(
    state: &AppState,
    tenant: &str,
    filter: EventFilter,
    after: Option<i64>,
) -> ApiResult<Subscription> {
    let hub = state.event_hub().await?;
    Ok(hub.subscribe(tenant, filter, after))
}

/// The tenant's events: a Server-Sent Events stream when the request
/// accepts `text/event-stream` (each event's `id` is its position;
/// keep-alive comments every 15 s; a reader too slow is sent an `error`
/// event with the reason and closed), else one page of JSON.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventParams),
    responses((status = 200, body = EventPage, description = "A page, or a text/event-stream"),
        (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Query(params): Query<EventParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let filter = filter_of(&params)?;
    let after = after_of(&params, &headers)?;
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        return Ok(page(&state, &caller.tenant, &filter, &params, after)
            .await?
            .into_response());
    }
    let subscription = subscribe(&state, &caller.tenant, filter, after).await?;
    let stream = futures::stream::unfold(Some(subscription), |sub| async move {
        let mut sub = sub?;
        let item = match sub.next().await {
            Ok(event) => {
                let id = event.id;
                let kind = event.kind.clone();
                let body = serde_json::to_string(&EventJson::from(event)).unwrap_or_default();
                SseEvent::default()
                    .id(id.to_string())
                    .event(kind)
                    .data(body)
            }
            Err(ended) => {
                let body = serde_json::json!({"reason": ended.to_string(), "last_event_id": sub.cursor().to_string()});
                let event = SseEvent::default().event("error").data(body.to_string());
                return Some((Ok::<_, Infallible>(event), None));
            }
        };
        Some((Ok(item), Some(sub)))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

async fn page(
    state: &AppState,
    tenant: &str,
    filter: &EventFilter,
    params: &EventParams,
    after: Option<i64>,
) -> ApiResult<axum::Json<EventPage>> {
    let limit = params.limit.unwrap_or(PAGE_DEFAULT);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::invalid(format!("limit must be 1 to {PAGE_MAX}")));
    }
    let page = kiln_events::page(&state.db, tenant, filter, after.unwrap_or(0), limit).await?;
    Ok(axum::Json(EventPage {
        events: page.events.into_iter().map(EventJson::from).collect(),
        next_after: page.next_after.to_string(),
    }))
}

/// The same stream over a WebSocket: one JSON text message per event, and
/// `{"type": "error", "reason", "last_event_id"}` before a close.
#[utoipa::path(get, path = "/api/v1/events/ws", tag = "events", params(EventParams),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
        (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn events_ws(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Query(params): Query<EventParams>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let filter = filter_of(&params)?;
    let after = after_of(&params, &headers)?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            "websocket_required",
            rejection.body_text(),
        )
    })?;
    let subscription = subscribe(&state, &caller.tenant, filter, after).await?;
    // Readers send nothing but pings and a close.
    Ok(upgrade
        .max_message_size(4096)
        .max_frame_size(4096)
        .on_upgrade(move |socket| feed(socket, subscription)))
}

async fn feed(mut socket: WebSocket, mut subscription: Subscription) {
    let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
    keep_alive.tick().await;
    loop {
        tokio::select! {
            next = subscription.next() => match next {
                Ok(event) => {
                    let text = serde_json::to_string(&EventJson::from(event)).unwrap_or_default();
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Err(ended) => {
                    let body = serde_json::json!({"type": "error", "reason": ended.to_string(),
                        "last_event_id": subscription.cursor().to_string()});
                    let _ = socket.send(Message::Text(body.to_string().into())).await;
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
            _ = keep_alive.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobEventParams {
    after: Option<i64>,
    limit: Option<i64>,
}

/// One job's events, oldest first.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path), JobEventParams),
    responses((status = 200, body = EventPage), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn job_events(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(id): Path<String>,
    Query(params): Query<JobEventParams>,
) -> ApiResult<axum::Json<EventPage>> {
    let job = crate::routes::jobs::parse_id(&id)?;
    if state.db.job_get(&caller.tenant, job).await?.is_none() {
        return Err(ApiError::not_found("job"));
    }
    let filter = EventFilter {
        resource: Some(("job".into(), job.to_string())),
        ..EventFilter::default()
    };
    let params = EventParams {
        after: params.after,
        limit: params.limit,
        ..EventParams::default()
    };
    if params.after.is_some_and(|a| a < 0) {
        return Err(ApiError::invalid("after must be an event id (0 or more)"));
    }
    page(&state, &caller.tenant, &filter, &params, params.after).await
}
