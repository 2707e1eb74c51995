//! `/api/v1/subscriptions`: notifications out. A subscription's matching
//! events become `notify` jobs (`kiln_events::notify`); its deliveries are
//! those jobs, listed with their attempts. Secrets (a webhook's HMAC key, a
//! Slack URL, a GitHub token) go in and never come out.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use kiln_core::names::{check_name, check_text};
use kiln_db::subscriptions::Subscription;
use kiln_events::notify::{self, Destination};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Json, Path};
use crate::{now_millis, render_time, AppState};

/// Subscriptions one tenant may hold.
pub const SUBSCRIPTIONS_MAX: usize = 100;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/subscriptions",
            get(list_subscriptions).post(create_subscription),
        )
        .route(
            "/subscriptions/{id}",
            get(get_subscription).delete(delete_subscription),
        )
        .route("/subscriptions/{id}/deliveries", get(list_deliveries))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
    /// `{"types": ["job.failed", "run.*"], "resource": "run:7", "labels": {"team": "blue"}}`;
    /// every part optional.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub events: Value,
    /// `{"kind": "webhook", "url", "secret"}`, `{"kind": "slack", "url"}` or
    /// `{"kind": "github_status", "token", "url"?, "repo_label"?, "sha_label"?, "context"?}`.
    #[schema(value_type = Object)]
    pub destination: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    pub id: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub events: Value,
    /// The destination without its secret.
    #[schema(value_type = Object)]
    pub destination: Value,
    pub created_at: Option<String>,
}

impl From<Subscription> for SubscriptionView {
    fn from(s: Subscription) -> SubscriptionView {
        SubscriptionView {
            id: s.id,
            name: s.name,
            events: s.filter,
            destination: s.destination,
            created_at: render_time(s.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionList {
    pub subscriptions: Vec<SubscriptionView>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::invalid(message)
}

/// Subscribe to events.
#[utoipa::path(post, path = "/api/v1/subscriptions", tag = "events", request_body = CreateSubscription,
    responses((status = 201, body = SubscriptionView), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_subscription(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Json(body): Json<CreateSubscription>,
) -> ApiResult<(StatusCode, Json<SubscriptionView>)> {
    if body.name.is_empty() {
        return Err(invalid("name must be 1 to 128 bytes"));
    }
    check_text("name", &body.name, 128).map_err(|e| invalid(e.to_string()))?;
    let events = match body.events {
        Value::Null => Value::Object(Default::default()),
        Value::Object(map) => {
            if let Some(key) = map
                .keys()
                .find(|k| !["types", "resource", "labels"].contains(&k.as_str()))
            {
                return Err(invalid(format!(
                    "events.{key}: unknown; give types, resource, labels"
                )));
            }
            Value::Object(map)
        }
        _ => return Err(invalid("events must be an object")),
    };
    notify::filter_of(&events).map_err(|e| invalid(format!("events: {e}")))?;
    let destination: Destination = serde_json::from_value(body.destination)
        .map_err(|e| invalid(format!("destination: {e}")))?;
    let (destination, secret) = destination
        .split(&state.notify_allow())
        .map_err(|e| invalid(format!("destination: {e}")))?;
    let held = state.db.subscription_list(Some(&caller.tenant)).await?;
    if held.len() >= SUBSCRIPTIONS_MAX {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            format!("a tenant holds at most {SUBSCRIPTIONS_MAX} subscriptions"),
        ));
    }
    let subscription = Subscription {
        id: format!("sub_{:016x}", rand::random::<u64>()),
        tenant: caller.tenant.clone(),
        name: body.name,
        filter: events,
        destination,
        secret: Some(secret),
        created_at: now_millis(),
    };
    state.db.subscription_insert(&subscription).await?;
    Ok((StatusCode::CREATED, Json(subscription.into())))
}

/// The tenant's subscriptions.
#[utoipa::path(get, path = "/api/v1/subscriptions", tag = "events",
    responses((status = 200, body = SubscriptionList)), security(("bearer" = [])))]
pub async fn list_subscriptions(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
) -> ApiResult<Json<SubscriptionList>> {
    let held = state.db.subscription_list(Some(&caller.tenant)).await?;
    Ok(Json(SubscriptionList {
        subscriptions: held.into_iter().map(Into::into).collect(),
    }))
}

async fn find(state: &AppState, tenant: &str, id: &str) -> ApiResult<Subscription> {
    check_name("subscription", id).map_err(|_| ApiError::not_found("subscription"))?;
    state
        .db
        .subscription_get(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found("subscription"))
}

/// One subscription.
#[utoipa::path(get, path = "/api/v1/subscriptions/{id}", tag = "events",
    params(("id" = String, Path)),
    responses((status = 200, body = SubscriptionView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_subscription(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(id): Path<String>,
) -> ApiResult<Json<SubscriptionView>> {
    Ok(Json(find(&state, &caller.tenant, &id).await?.into()))
}

/// Stop delivering; deliveries already queued fail without sending.
#[utoipa::path(delete, path = "/api/v1/subscriptions/{id}", tag = "events",
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_subscription(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    check_name("subscription", &id).map_err(|_| ApiError::not_found("subscription"))?;
    if state.db.subscription_delete(&caller.tenant, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("subscription"))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveryParams {
    /// At most 500 (default 50), newest first.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Delivery {
    /// The `notify` job that delivers it (its attempts: `GET /api/v1/jobs/{id}/attempts`).
    pub job_id: String,
    pub event_id: Option<i64>,
    pub event_type: Option<String>,
    pub status: kiln_core::JobStatus,
    pub attempts: i32,
    pub error: Option<String>,
    /// What the destination answered last (status line and the start of its body).
    pub answer: Option<String>,
    pub created_at: Option<String>,
    pub finished_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<Delivery>,
}

/// The subscription's delivery log.
#[utoipa::path(get, path = "/api/v1/subscriptions/{id}/deliveries", tag = "events",
    params(("id" = String, Path), DeliveryParams),
    responses((status = 200, body = DeliveryList), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_deliveries(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(id): Path<String>,
    Query(params): Query<DeliveryParams>,
) -> ApiResult<Json<DeliveryList>> {
    let subscription = find(&state, &caller.tenant, &id).await?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 500"));
    }
    let filter = kiln_db::JobFilter {
        kind: Some(notify::KIND.to_string()),
        label: Some(("subscription".to_string(), subscription.id)),
        limit,
        ..Default::default()
    };
    let jobs = state.db.job_list(&caller.tenant, &filter).await?;
    let now = now_millis();
    let deliveries = jobs
        .into_iter()
        .map(|job| {
            let status = job.visible_status(now);
            let labels: &BTreeMap<String, String> = &job.labels;
            Delivery {
                job_id: job.id.to_string(),
                event_id: job.spec["event"]["id"].as_i64(),
                event_type: labels.get("event_type").cloned(),
                status,
                attempts: job.attempt,
                error: job.error.clone(),
                answer: job.result.as_ref().map(|r| r.stdout.clone()),
                created_at: render_time(job.created_at),
                finished_at: job.finished_at.and_then(render_time),
            }
        })
        .collect();
    Ok(Json(DeliveryList { deliveries }))
}
