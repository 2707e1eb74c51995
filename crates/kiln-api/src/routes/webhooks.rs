//! Webhooks in: `/api/v1/webhooks` manages a tenant's triggers (API keys,
//! like every route); `POST /api/v1/hooks/{id}` receives deliveries.
//!
//! The receiving route carries no API key (GitHub and Slack cannot send
//! one): the unguessable id names the trigger, and the signature made with
//! the trigger's secret is the only authentication. Nothing is read from the
//! payload, and nothing is claimed or started, before the signature matches.
//! A delivery then starts its target through the same functions as
//! `POST /jobs` and `POST /pipelines/{name}/runs`, as the trigger's tenant.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hmac::{Hmac, Mac};
use kiln_core::names::{check_name, json_has_nul};
use kiln_core::{Scope, Scopes};
use kiln_db::webhooks::{is_webhook_id, Claim, DeliveryRecord, NewWebhook, WebhookRecord};
use kiln_flow::target::{JobTemplate, Target};
use kiln_flow::webhook::{self, DeliveryFacts, Provider, WebhookDef, WebhookFilter};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Caller, Json, Path, Query};
use crate::routes::flow::{create_run, StartRun};
use crate::routes::jobs::{submit, SubmitJob, SubmitParams};
use crate::{now_millis, render_time, AppState};

/// Largest delivery accepted (GitHub may send more; such pushes get 413).
pub const BODY_MAX: usize = 1 << 20;
/// How far a signed timestamp (Slack, generic) may be from our clock.
pub const TIMESTAMP_WINDOW_S: i64 = 5 * 60;
/// How long a Slack command's follow-up waits for the job or run to end
/// (Slack takes answers on a `response_url` for 30 minutes).
pub const REPLY_WAIT: Duration = Duration::from_secs(29 * 60);
/// Follow-ups waiting at once in one process; past this, a command is
/// acknowledged without one.
pub const REPLIES_MAX: usize = 1000;
/// Where follow-ups may be sent unless the deployment says otherwise.
pub const SLACK_REPLY_PREFIX: &str = "https://hooks.slack.com/";

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

/// Lets follow-ups go to URLs starting with one of `prefixes` (each ending
/// in `/` or `:` so a host cannot be extended), instead of Slack's only.
/// Set once, at start-up; later calls change nothing.
pub fn allow_reply_urls(prefixes: Vec<String>) {
    let _ = REPLY_PREFIXES.set(prefixes);
}

static REPLY_PREFIXES: OnceLock<Vec<String>> = OnceLock::new();
static REPLIES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(REPLIES_MAX);

fn reply_allowed(url: &str) -> bool {
    match REPLY_PREFIXES.get() {
        Some(prefixes) => prefixes.iter().any(|p| url.starts_with(p.as_str())),
        None => url.starts_with(SLACK_REPLY_PREFIX),
    }
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
    crate::extract::throttle(&state, format!("webhook:{id}"))?;
    let hook = state
        .db
        .webhook_find(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook"))?;
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

const SIGNATURE_HEADERS: [&str; 3] = [
    "x-hub-signature-256",
    "x-slack-signature",
    "x-kiln-signature",
];

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("a delivery is at most {BODY_MAX} bytes"),
    )
}

/// The body, refused with 413 as soon as it passes [`BODY_MAX`], whether or
/// not a `Content-Length` said so.
async fn read_body(headers: &HeaderMap, body: Body) -> ApiResult<bytes::Bytes> {
    use futures::StreamExt;
    let declared = header(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_MAX as u64) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("could not read the body: {e}")))?;
        if out.len() + chunk.len() > BODY_MAX {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn content_type(headers: &HeaderMap) -> &str {
    header(headers, "content-type")
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or("")
}

/// HMAC-SHA256 of the parts with `secret`, compared in constant time with
/// the hex digest the sender gave.
fn signature_matches(secret: &str, parts: &[&[u8]], hex_digest: &str) -> bool {
    let Ok(given) = hex::decode(hex_digest) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    for part in parts {
        mac.update(part);
    }
    mac.verify_slice(&given).is_ok()
}

fn missing(what: &str) -> ApiError {
    ApiError::unauthorized(format!("missing or malformed {what}"))
}

fn bad_signature() -> ApiError {
    ApiError::unauthorized("the signature does not match")
}

/// A Unix-seconds timestamp header within the window of our clock.
fn fresh_timestamp<'a>(headers: &'a HeaderMap, name: &str) -> ApiResult<&'a str> {
    let text = header(headers, name).ok_or_else(|| missing(name))?;
    let seconds: i64 = text.parse().map_err(|_| missing(name))?;
    if (now_millis() / 1000 - seconds).abs() > TIMESTAMP_WINDOW_S {
        return Err(ApiError::unauthorized(format!(
            "{name} is more than {TIMESTAMP_WINDOW_S} s from the server's clock"
        )));
    }
    Ok(text)
}

/// An event type or delivery id from a sender, bounded like any name.
fn sender_name(what: &str, text: &str) -> ApiResult<String> {
    check_name(what, text).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(text.to_string())
}

fn parse_json(body: &[u8]) -> ApiResult<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the payload is not JSON: {e}")))?;
    if json_has_nul(&value) {
        return Err(ApiError::bad_request("the payload holds a NUL character"));
    }
    Ok(value)
}

fn parse_form(body: &[u8]) -> ApiResult<BTreeMap<String, String>> {
    let fields: BTreeMap<String, String> = serde_urlencoded::from_bytes(body)
        .map_err(|e| ApiError::bad_request(format!("the form does not parse: {e}")))?;
    if fields
        .iter()
        .any(|(k, v)| k.contains('\0') || v.contains('\0'))
    {
        return Err(ApiError::bad_request("the form holds a NUL character"));
    }
    Ok(fields)
}

/// What one delivery came to.
enum Delivered {
    Started {
        job_id: Option<i64>,
        run_id: Option<i64>,
    },
    Skipped(String),
    Answered,
    Duplicate(DeliveryRecord),
}

struct Delivering<'a> {
    state: &'a Arc<AppState>,
    hook: &'a WebhookRecord,
}

/// One delivery as the providers' parsers hand it on.
struct Incoming<'a> {
    delivery: Option<String>,
    event: String,
    facts: DeliveryFacts<'a>,
    payload: &'a Value,
}

impl Delivering<'_> {
    async fn github(&self, headers: &HeaderMap, body: &[u8]) -> ApiResult<Response> {
        let signature = header(headers, "x-hub-signature-256")
            .and_then(|s| s.strip_prefix("sha256="))
            .ok_or_else(|| missing("X-Hub-Signature-256"))?;
        if !signature_matches(&self.hook.secret, &[body], signature) {
            return Err(bad_signature());
        }
        let event = sender_name(
            "X-GitHub-Event",
            header(headers, "x-github-event").unwrap_or_default(),
        )?;
        let delivery = header(headers, "x-github-delivery")
            .map(|d| sender_name("X-GitHub-Delivery", d))
            .transpose()?;
        // GitHub sends JSON, or a form with the JSON in `payload`.
        let payload = if content_type(headers) == "application/x-www-form-urlencoded" {
            let fields = parse_form(body)?;
            parse_json(fields.get("payload").map(String::as_bytes).unwrap_or(b""))?
        } else {
            parse_json(body)?
        };
        let facts = DeliveryFacts {
            event: &event,
            branch: webhook::branch_of(&payload),
            command: None,
        };
        let incoming = Incoming {
            delivery: delivery.clone(),
            event: event.clone(),
            facts,
            payload: &payload,
        };
        let delivered = if event == "ping" {
            self.answer_only(&incoming).await?
        } else {
            self.deliver(&incoming).await?
        };
        Ok(answer(delivered, delivery))
    }

    async fn generic(&self, headers: &HeaderMap, body: &[u8]) -> ApiResult<Response> {
        let timestamp = fresh_timestamp(headers, "X-Kiln-Timestamp")?;
        let signature = header(headers, "x-kiln-signature")
            .and_then(|s| s.strip_prefix("sha256="))
            .ok_or_else(|| missing("X-Kiln-Signature"))?;
        if !signature_matches(
            &self.hook.secret,
            &[timestamp.as_bytes(), b".", body],
            signature,
        ) {
            return Err(bad_signature());
        }
        let event = sender_name(
            "X-Kiln-Event",
            header(headers, "x-kiln-event").unwrap_or("generic"),
        )?;
        let delivery = header(headers, "x-kiln-delivery")
            .map(|d| sender_name("X-Kiln-Delivery", d))
            .transpose()?;
        let payload = parse_json(body)?;
        let incoming = Incoming {
            delivery: delivery.clone(),
            event: event.clone(),
            facts: DeliveryFacts {
                event: &event,
                branch: webhook::branch_of(&payload),
                command: None,
            },
            payload: &payload,
        };
        let delivered = self.deliver(&incoming).await?;
        Ok(answer(delivered, delivery))
    }

    async fn slack(&self, headers: &HeaderMap, body: &[u8]) -> ApiResult<Response> {
        let timestamp = fresh_timestamp(headers, "X-Slack-Request-Timestamp")?;
        let signature = header(headers, "x-slack-signature")
            .and_then(|s| s.strip_prefix("v0="))
            .ok_or_else(|| missing("X-Slack-Signature"))?;
        if !signature_matches(
            &self.hook.secret,
            &[b"v0:", timestamp.as_bytes(), b":", body],
            signature,
        ) {
            return Err(bad_signature());
        }
        if content_type(headers) == "application/x-www-form-urlencoded" {
            return self.slack_command(body).await;
        }
        let payload = parse_json(body)?;
        match payload.get("type").and_then(Value::as_str) {
            Some("url_verification") => {
                let challenge = payload
                    .get("challenge")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::bad_request("url_verification without a challenge"))?;
                Ok(axum::Json(json!({ "challenge": challenge })).into_response())
            }
            Some("event_callback") => {
                let event = sender_name(
                    "event.type",
                    payload
                        .pointer("/event/type")
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                )?;
                // Slack retries an event with the same event_id.
                let delivery = payload
                    .get("event_id")
                    .and_then(Value::as_str)
                    .map(|d| sender_name("event_id", d))
                    .transpose()?;
                let incoming = Incoming {
                    delivery: delivery.clone(),
                    event: event.clone(),
                    facts: DeliveryFacts {
                        event: &event,
                        branch: None,
                        command: None,
                    },
                    payload: &payload,
                };
                let delivered = self.deliver(&incoming).await?;
                Ok(answer(delivered, delivery))
            }
            _ => Err(ApiError::bad_request(
                "a Slack request of a type this trigger does not take",
            )),
        }
    }

    /// A slash command: answered at once (Slack waits 3 s), with the end
    /// of what it started posted later to its `response_url`.
    async fn slack_command(&self, body: &[u8]) -> ApiResult<Response> {
        let fields = parse_form(body)?;
        let command = fields
            .get("command")
            .cloned()
            .ok_or_else(|| ApiError::bad_request("a Slack form without a command"))?;
        let delivery = fields
            .get("trigger_id")
            .map(|d| sender_name("trigger_id", d))
            .transpose()?;
        let payload = serde_json::to_value(&fields).map_err(ApiError::internal)?;
        let event = "slash_command".to_string();
        let incoming = Incoming {
            delivery,
            event: event.clone(),
            facts: DeliveryFacts {
                event: &event,
                branch: None,
                command: Some(&command),
            },
            payload: &payload,
        };
        let text = match self.deliver(&incoming).await {
            Ok(Delivered::Started { job_id, run_id }) => {
                let what = started_text(job_id, run_id);
                match fields.get("response_url") {
                    Some(url) if reply_allowed(url) => match REPLIES.try_acquire() {
                        Ok(permit) => {
                            tokio::spawn(follow_up(
                                permit,
                                self.state.clone(),
                                self.hook.tenant.clone(),
                                job_id,
                                run_id,
                                url.clone(),
                            ));
                            format!("{command}: started {what}; the result follows here.")
                        }
                        Err(_) => format!("{command}: started {what}."),
                    },
                    _ => format!("{command}: started {what}."),
                }
            }
            Ok(Delivered::Skipped(reason)) => format!("{command}: nothing started ({reason})."),
            Ok(Delivered::Duplicate(_)) => format!("{command}: already received."),
            Ok(Delivered::Answered) => format!("{command}: received."),
            // The user typed the command: tell them why, in Slack.
            Err(error) if error.status.is_client_error() => {
                format!("{command}: could not start: {}", error.message)
            }
            Err(error) => return Err(error),
        };
        Ok(axum::Json(json!({"response_type": "ephemeral", "text": text})).into_response())
    }

    /// Logs a delivery that starts nothing (a ping).
    async fn answer_only(&self, incoming: &Incoming<'_>) -> ApiResult<Delivered> {
        match self.claim(incoming).await? {
            Claim::Seen(first) => Ok(Delivered::Duplicate(first)),
            Claim::Fresh(seq) => {
                self.state
                    .db
                    .webhook_delivery_finish(seq, "answered", None, None, None)
                    .await?;
                Ok(Delivered::Answered)
            }
        }
    }

    async fn claim(&self, incoming: &Incoming<'_>) -> ApiResult<Claim> {
        Ok(self
            .state
            .db
            .webhook_delivery_claim(
                &self.hook.id,
                incoming.delivery.as_deref(),
                &incoming.event,
                now_millis(),
            )
            .await?)
    }

    /// Claims the delivery, applies the filter and starts the target.
    async fn deliver(&self, incoming: &Incoming<'_>) -> ApiResult<Delivered> {
        let seq = match self.claim(incoming).await? {
            Claim::Seen(first) => return Ok(Delivered::Duplicate(first)),
            Claim::Fresh(seq) => seq,
        };
        let db = &self.state.db;
        let filter: WebhookFilter = serde_json::from_value(self.hook.filter.clone())
            .map_err(|e| ApiError::internal(format!("stored webhook filter: {e}")))?;
        if let Err(reason) = filter.accepts(&incoming.facts) {
            db.webhook_delivery_finish(seq, "skipped", None, None, Some(&reason))
                .await?;
            return Ok(Delivered::Skipped(reason));
        }
        match self.start(incoming).await {
            Ok((job_id, run_id)) => {
                db.webhook_delivery_finish(seq, "started", job_id, run_id, None)
                    .await?;
                Ok(Delivered::Started { job_id, run_id })
            }
            Err(error) => {
                db.webhook_delivery_finish(seq, "error", None, None, Some(&error.message))
                    .await?;
                Err(error)
            }
        }
    }

    /// Starts the target as the trigger's tenant, with the checks and
    /// quotas of the API routes.
    async fn start(&self, incoming: &Incoming<'_>) -> ApiResult<(Option<i64>, Option<i64>)> {
        let hook = self.hook;
        let target: Target = serde_json::from_value(hook.target.clone())
            .map_err(|e| ApiError::internal(format!("stored webhook target: {e}")))?;
        let context = webhook::context(
            incoming.payload.clone(),
            &incoming.event,
            incoming.delivery.as_deref(),
            &hook.name,
        );
        let target = webhook::render_target(&target, &context).map_err(ApiError::invalid)?;
        let mut labels = BTreeMap::from([("kiln.webhook".to_string(), hook.name.clone())]);
        if let Some(delivery) = &incoming.delivery {
            labels.insert("kiln.delivery".into(), delivery.clone());
        }
        let idempotency_key = incoming
            .delivery
            .as_ref()
            .map(|d| format!("webhook:{}:{d}", hook.id));
        match target {
            Target::Job(template) => {
                let caller = Caller {
                    tenant: hook.tenant.clone(),
                    key_id: format!("webhook:{}", hook.name),
                    scopes: Scopes(vec![Scope::Write]),
                };
                let job = submit_body(template, labels, idempotency_key);
                let params = SubmitParams {
                    wait: false,
                    wait_ms: None,
                };
                let (_, view) = submit(
                    self.state,
                    &caller,
                    job,
                    &params,
                    kiln_core::limits::DEFAULT_MAX_ATTEMPTS,
                )
                .await?;
                let id = view.0.id.parse().map_err(ApiError::internal)?;
                Ok((Some(id), None))
            }
            Target::Pipeline(pipeline) => {
                let body = StartRun {
                    params: pipeline.params,
                    labels,
                    idempotency_key,
                };
                let trigger = format!("webhook:{}", hook.name);
                let (view, _) = create_run(self.state, &hook.tenant, pipeline.name, body, trigger)
                    .await
                    .map_err(|e| {
                        // The sender should not read "not found" as "no
                        // such webhook".
                        if e.status == StatusCode::NOT_FOUND {
                            ApiError::invalid(format!("target: {}", e.message))
                        } else {
                            e
                        }
                    })?;
                Ok((None, Some(view.run.id)))
            }
        }
    }
}

fn submit_body(
    template: JobTemplate,
    mut labels: BTreeMap<String, String>,
    idempotency_key: Option<String>,
) -> SubmitJob {
    let mut all = template.labels;
    all.append(&mut labels);
    SubmitJob {
        kind: template.kind,
        spec: template.spec,
        queue: template.queue,
        priority: template.priority,
        max_attempts: template.max_attempts,
        timeout_ms: template.timeout_ms,
        backoff: template.backoff,
        permanent_exit_codes: None,
        run_at: None,
        delay_ms: None,
        idempotency_key,
        labels: Some(all),
    }
}

fn answer(delivered: Delivered, delivery: Option<String>) -> Response {
    let id = |n: Option<i64>| n.map(|n| n.to_string());
    let (status, body) = match delivered {
        Delivered::Started { job_id, run_id } => (
            StatusCode::CREATED,
            DeliveryAnswer {
                outcome: "started".into(),
                delivery,
                job_id: id(job_id),
                run_id: id(run_id),
                detail: None,
            },
        ),
        Delivered::Skipped(reason) => (
            StatusCode::OK,
            DeliveryAnswer {
                outcome: "skipped".into(),
                delivery,
                job_id: None,
                run_id: None,
                detail: Some(reason),
            },
        ),
        Delivered::Answered => (
            StatusCode::OK,
            DeliveryAnswer {
                outcome: "answered".into(),
                delivery,
                job_id: None,
                run_id: None,
                detail: None,
            },
        ),
        Delivered::Duplicate(first) => (
            StatusCode::OK,
            DeliveryAnswer {
                outcome: "duplicate".into(),
                delivery,
                job_id: id(first.job_id),
                run_id: id(first.run_id),
                detail: Some(format!("first received: {}", first.outcome)),
            },
        ),
    };
    (status, axum::Json(body)).into_response()
}

fn started_text(job_id: Option<i64>, run_id: Option<i64>) -> String {
    match (job_id, run_id) {
        (Some(id), _) => format!("job {id}"),
        (_, Some(id)) => format!("run {id}"),
        _ => "nothing".into(),
    }
}

fn reply_client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            // A redirect could lead anywhere the allowed prefixes do not.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    })
}

/// Waits (bounded) for the end of what a command started and posts it to
/// the command's `response_url`. Held in this process only: a restart
/// loses the follow-ups waiting in it.
async fn follow_up(
    _slot: tokio::sync::SemaphorePermit<'static>,
    state: Arc<AppState>,
    tenant: String,
    job_id: Option<i64>,
    run_id: Option<i64>,
    url: String,
) {
    let text = match (job_id, run_id) {
        (Some(id), _) => job_end(&state, &tenant, id).await,
        (_, Some(id)) => run_end(&state, &tenant, id).await,
        _ => None,
    }
    .unwrap_or_else(|| format!("{} is still going; see kiln.", started_text(job_id, run_id)));
    let body = json!({"response_type": "ephemeral", "replace_original": false, "text": text});
    // The URL is a credential of Slack's: it stays out of the log.
    match reply_client().post(&url).json(&body).send().await {
        Ok(response) if response.status().is_success() => {}
        Ok(response) => {
            tracing::warn!(status = %response.status(), "a Slack follow-up was refused")
        }
        Err(error) => tracing::warn!(
            error = %error.without_url(),
            "a Slack follow-up could not be sent"
        ),
    }
}

/// Reads at most this often per waiting follow-up, however busy the log.
const REPLY_READ_EVERY: Duration = Duration::from_millis(250);
/// And at least this often, in case a wake-up was missed.
const REPLY_POLL_EVERY: Duration = Duration::from_secs(2);

/// Calls `read` until it breaks (the end as text; `None` when the job or
/// run is gone or the store fails) or [`REPLY_WAIT`] passes. Woken by the
/// event log, which every end of a job or run writes to; polled as a guard.
async fn wait_end<F, Fut>(state: &AppState, mut read: F) -> Option<String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ControlFlow<Option<String>>>,
{
    let deadline = tokio::time::Instant::now() + REPLY_WAIT;
    let ready = state.db.events_ready();
    loop {
        // Registered before the read, so an end written meanwhile wakes us.
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let ControlFlow::Break(end) = read().await {
            return end;
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::select! {
            _ = notified => tokio::time::sleep(REPLY_READ_EVERY).await,
            _ = tokio::time::sleep(REPLY_POLL_EVERY) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// How a job ended, or `None` if it has not within [`REPLY_WAIT`].
async fn job_end(state: &AppState, tenant: &str, id: i64) -> Option<String> {
    wait_end(state, || async move {
        let job = match state.db.job_get(tenant, id).await {
            Ok(Some(job)) => job,
            _ => return ControlFlow::Break(None),
        };
        if !job.status.is_terminal() {
            return ControlFlow::Continue(());
        }
        let mut text = format!("job {id} {}", job.status.as_str());
        if let Some(result) = &job.result {
            text.push_str(&format!(" (exit code {})", result.exit_code));
            let stdout: String = result.stdout.chars().take(2000).collect();
            if !stdout.trim().is_empty() {
                text.push_str(&format!("\n```{stdout}```"));
            }
        } else if let Some(error) = &job.error {
            text.push_str(&format!(": {error}"));
        }
        ControlFlow::Break(Some(text))
    })
    .await
}

/// How a run ended, or `None` if it has not within [`REPLY_WAIT`].
async fn run_end(state: &AppState, tenant: &str, id: i64) -> Option<String> {
    wait_end(state, || async move {
        let view = match state.db.run_get(tenant, id).await {
            Ok(Some(view)) => view,
            _ => return ControlFlow::Break(None),
        };
        if !view.run.status.is_terminal() {
            return ControlFlow::Continue(());
        }
        let mut text = format!("run {id} {}", view.run.status.as_str());
        if let Some(reason) = &view.run.reason {
            text.push_str(&format!(" ({reason})"));
        }
        ControlFlow::Break(Some(text))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, parts: &[&[u8]]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        for part in parts {
            mac.update(part);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn signatures_match_only_the_same_secret_and_bytes() {
        let good = sign("secret", &[b"v0:", b"1:", b"body"]);
        assert!(signature_matches("secret", &[b"v0:1:body"], &good));
        assert!(!signature_matches("secret", &[b"v0:1:bodY"], &good));
        assert!(!signature_matches("other", &[b"v0:1:body"], &good));
        assert!(!signature_matches("secret", &[b"v0:1:body"], "zz"));
        assert!(!signature_matches("secret", &[b"v0:1:body"], ""));
        assert!(!signature_matches("secret", &[b"v0:1:body"], &good[..62]));
    }

    #[test]
    fn follow_ups_go_only_to_slack_by_default() {
        assert!(reply_allowed("https://hooks.slack.com/commands/T1/2/x"));
        assert!(!reply_allowed("https://hooks.slack.com.evil.example/x"));
        assert!(!reply_allowed("http://169.254.169.254/latest"));
    }
}
