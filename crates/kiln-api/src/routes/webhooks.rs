//! Webhooks in: `/api/v1/webhooks` manages a tenant's triggers (API keys,
//! like every route); `POST /api/v1/hooks/{id}` receives deliveries.
//!
//! The receiving route carries no API key (GitHub and Slack cannot send
//! one): the unguessable id names the trigger, and the signature made with
//! the trigger's secret is the only authentication. Nothing is read from the
//! payload, and nothing is claimed or started, before the signature matches.
//! A delivery then starts its target through the same functions as
//! `POST /jobs` and `POST /pipelines/{name}/runs`, as the trigger's tenant.

mod deliver;
mod reply;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use kiln_core::names::{check_name, json_has_nul};
use kiln_db::webhooks::{is_webhook_id, DeliveryRecord, NewWebhook, WebhookRecord};
use kiln_flow::webhook::{Provider, WebhookDef};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Json, Path, Query};
use crate::{now_millis, render_time, AppState};
use deliver::{read_body, Delivering, SIGNATURE_HEADERS};
pub use reply::{allow_reply_urls, REPLIES_MAX, REPLY_WAIT, SLACK_REPLY_PREFIX};

/// Largest delivery accepted (GitHub may send more; such pushes get 413).
pub const BODY_MAX: usize = 1 << 20;
/// How far a signed timestamp (Slack, generic) may be from our clock.
pub const TIMESTAMP_WINDOW_S: i64 = 5 * 60;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/webhooks", get(list_webhooks))
        .route(
            "/webhooks/{name}",
            get(get_webhook).put(put_webhook).delete(delete_webhook),
        )
        .route("/webhooks/{name}/deliveries", get(webhook_deliveries))
        .route("/hooks/{id}", post(receive))
}

// ---- views ----

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookView {
    pub name: String,
    /// github, slack or generic.
    pub provider: String,
    /// The public id: senders POST to `url`.
    pub id: String,
    /// `/api/v1/hooks/{id}`, to give the sender with the secret.
    pub url: String,
    #[schema(value_type = Object)]
    pub filter: Value,
    #[schema(value_type = Object)]
    pub target: Value,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

impl From<WebhookRecord> for WebhookView {
    fn from(w: WebhookRecord) -> WebhookView {
        WebhookView {
            url: format!("/api/v1/hooks/{}", w.id),
            name: w.name,
            provider: w.provider,
            id: w.id,
            filter: w.filter,
            target: w.target,
            created_at: render_time(w.created_at),
            updated_at: render_time(w.updated_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<WebhookView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryJson {
    pub received_at: Option<String>,
    /// The sender's delivery id (`X-GitHub-Delivery`, Slack's `event_id` or
    /// `trigger_id`, `X-Kiln-Delivery`).
    pub delivery: Option<String>,
    pub event: String,
    /// received, started, skipped, answered or error.
    pub outcome: String,
    pub job_id: Option<String>,
    pub run_id: Option<String>,
    /// Why it was skipped or failed.
    pub detail: Option<String>,
}

impl From<DeliveryRecord> for DeliveryJson {
    fn from(d: DeliveryRecord) -> DeliveryJson {
        DeliveryJson {
            received_at: render_time(d.received_at),
            delivery: d.delivery,
            event: d.event,
            outcome: d.outcome,
            job_id: d.job_id.map(|id| id.to_string()),
            run_id: d.run_id.map(|id| id.to_string()),
            detail: d.detail,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryJson>,
}

/// What a sender is told.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryAnswer {
    /// started, skipped, answered (a ping) or duplicate (the delivery id was
    /// seen before; the ids are those of the first).
    pub outcome: String,
    pub delivery: Option<String>,
    pub job_id: Option<String>,
    pub run_id: Option<String>,
    pub detail: Option<String>,
}

// ---- management ----

fn name_of(name: &str) -> ApiResult<()> {
    check_name("webhook", name).map_err(|_| ApiError::not_found("webhook"))
}

/// Creates or replaces a trigger. The secret is kept to verify signatures
/// and never shown again; the answer's `url` is where the sender posts.
#[utoipa::path(put, path = "/api/v1/webhooks/{name}", tag = "webhooks",
    params(("name" = String, Path)),
    request_body(content = Object, description = "{provider: github|slack|generic, secret, filter: {events, branches, commands}, target: {job: {...}} | {pipeline: {name, params}}}"),
    responses((status = 201, body = WebhookView), (status = 200, body = WebhookView),
        (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_webhook(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> ApiResult<(StatusCode, axum::Json<WebhookView>)> {
    check_name("name", &name).map_err(|e| ApiError::invalid(e.to_string()))?;
    if json_has_nul(&body) {
        return Err(ApiError::invalid("a string or key holds a NUL character"));
    }
    let def: WebhookDef = serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(format!("{path}: {}", e.into_inner()))
    })?;
    if def.name.as_ref().is_some_and(|n| *n != name) {
        return Err(ApiError::invalid("name: differs from the name in the URL"));
    }
    def.check(&state.kinds).map_err(ApiError::invalid)?;
    let filter = serde_json::to_value(&def.filter).map_err(ApiError::internal)?;
    let target = serde_json::to_value(&def.target).map_err(ApiError::internal)?;
    let (record, created) = state
        .db
        .webhook_put(
            &caller.tenant,
            &NewWebhook {
                name: &name,
                provider: def.provider.as_str(),
                secret: &def.secret,
                filter: &filter,
                target: &target,
            },
            now_millis(),
        )
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(record.into())))
}

#[utoipa::path(get, path = "/api/v1/webhooks", tag = "webhooks",
    responses((status = 200, body = WebhookList)), security(("bearer" = [])))]
pub async fn list_webhooks(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
) -> ApiResult<axum::Json<WebhookList>> {
    let list = state.db.webhook_list(&caller.tenant).await?;
    Ok(axum::Json(WebhookList {
        webhooks: list.into_iter().map(WebhookView::from).collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/webhooks/{name}", tag = "webhooks",
    params(("name" = String, Path)),
    responses((status = 200, body = WebhookView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_webhook(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<WebhookView>> {
    name_of(&name)?;
    let record = state
        .db
        .webhook_get(&caller.tenant, &name)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook"))?;
    Ok(axum::Json(record.into()))
}

/// Deletes a trigger and its delivery log; its URL answers 404 from now.
#[utoipa::path(delete, path = "/api/v1/webhooks/{name}", tag = "webhooks",
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_webhook(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    name_of(&name)?;
    if state.db.webhook_delete(&caller.tenant, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("webhook"))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveryParams {
    /// 1 to 1000, default 100.
    pub limit: Option<i64>,
}

/// A trigger's deliveries, newest first (kept seven days).
#[utoipa::path(get, path = "/api/v1/webhooks/{name}/deliveries", tag = "webhooks",
    params(("name" = String, Path), DeliveryParams),
    responses((status = 200, body = DeliveryList), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn webhook_deliveries(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(name): Path<String>,
    Query(params): Query<DeliveryParams>,
) -> ApiResult<axum::Json<DeliveryList>> {
    name_of(&name)?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be 1 to 1000"));
    }
    if state.db.webhook_get(&caller.tenant, &name).await?.is_none() {
        return Err(ApiError::not_found("webhook"));
    }
    let found = state
        .db
        .webhook_deliveries(&caller.tenant, &name, limit)
        .await?;
    Ok(axum::Json(DeliveryList {
        deliveries: found.into_iter().map(DeliveryJson::from).collect(),
    }))
}

// ---- receiving ----

/// Receives a delivery for the trigger with this public id. GitHub:
/// `X-Hub-Signature-256: sha256=<hex>` over the body. Slack:
/// `X-Slack-Signature: v0=<hex>` over `v0:<X-Slack-Request-Timestamp>:<body>`.
/// Generic: `X-Kiln-Signature: sha256=<hex>` over `<X-Kiln-Timestamp>.<body>`,
/// with `X-Kiln-Event` and `X-Kiln-Delivery` optional. HMAC-SHA256 with the
/// trigger's secret; timestamps are Unix seconds, at most 5 minutes off.
#[utoipa::path(post, path = "/api/v1/hooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "The trigger's public id"),
        ("X-Hub-Signature-256" = Option<String>, Header), ("X-GitHub-Event" = Option<String>, Header),
        ("X-GitHub-Delivery" = Option<String>, Header),
        ("X-Slack-Signature" = Option<String>, Header), ("X-Slack-Request-Timestamp" = Option<String>, Header),
        ("X-Kiln-Signature" = Option<String>, Header), ("X-Kiln-Timestamp" = Option<String>, Header),
        ("X-Kiln-Event" = Option<String>, Header), ("X-Kiln-Delivery" = Option<String>, Header)),
    request_body(content = Object, description = "The sender's payload: JSON, or a form (Slack commands, GitHub's form encoding)"),
    responses((status = 201, body = DeliveryAnswer), (status = 200, body = DeliveryAnswer),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(()))]
pub async fn receive(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    // Unsigned requests are refused before any look-up, so they learn
    // nothing of which ids exist and cost no query.
    if !SIGNATURE_HEADERS.iter().any(|h| headers.contains_key(*h)) {
        return Err(ApiError::unauthorized(
            "sign the request: X-Hub-Signature-256, X-Slack-Signature or X-Kiln-Signature",
        ));
    }
    if !is_webhook_id(&id) {
        return Err(ApiError::not_found("webhook"));
    }
    let hook = state
        .db
        .webhook_find(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook"))?;
    crate::audit::note_actor(&hook.tenant, "webhook", &hook.name);
    // Only triggers that exist get a bucket: random ids cannot grow the map.
    crate::extract::throttle(&state, format!("webhook:{id}"))?;
    let body = read_body(&headers, body).await?;
    let provider = Provider::parse(&hook.provider).ok_or_else(|| {
        ApiError::internal(format!("webhook {id} has provider {:?}", hook.provider))
    })?;
    let delivery = Delivering {
        state: &state,
        hook: &hook,
    };
    match provider {
        Provider::Github => delivery.github(&headers, &body).await,
        Provider::Slack => delivery.slack(&headers, &body).await,
        Provider::Generic => delivery.generic(&headers, &body).await,
    }
}
