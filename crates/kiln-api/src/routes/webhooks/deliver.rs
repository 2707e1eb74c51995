//! A delivery from signature to start: each provider's headers and
//! payload, the claim that deduplicates it, the filter, and the target
//! started as the trigger's tenant.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use kiln_core::names::{check_name, json_has_nul};
use kiln_core::{Scope, Scopes};
use kiln_db::webhooks::{Claim, DeliveryRecord, WebhookRecord};
use kiln_flow::target::{JobTemplate, Target};
use kiln_flow::webhook::{self, DeliveryFacts, WebhookFilter};
use serde_json::{json, Value};
use sha2::Sha256;

use super::reply::{follow_up, reply_allowed, started_text, REPLIES};
use super::{DeliveryAnswer, BODY_MAX, TIMESTAMP_WINDOW_S};
use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::routes::flow::{create_run, StartRun};
use crate::routes::jobs::{submit, SubmitJob, SubmitParams};
use crate::{now_millis, AppState};

pub(super) const SIGNATURE_HEADERS: [&str; 3] = [
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
pub(super) async fn read_body(headers: &HeaderMap, body: Body) -> ApiResult<bytes::Bytes> {
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
    if (now_millis() / 1000).abs_diff(seconds) > TIMESTAMP_WINDOW_S.unsigned_abs() {
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

pub(super) struct Delivering<'a> {
    pub state: &'a Arc<AppState>,
    pub hook: &'a WebhookRecord,
}

/// One delivery as the providers' parsers hand it on.
struct Incoming<'a> {
    delivery: Option<String>,
    event: String,
    facts: DeliveryFacts<'a>,
    payload: &'a Value,
}

impl Delivering<'_> {
    pub(super) async fn github(&self, headers: &HeaderMap, body: &[u8]) -> ApiResult<Response> {
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

    pub(super) async fn generic(&self, headers: &HeaderMap, body: &[u8]) -> ApiResult<Response> {
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

    pub(super) async fn slack(&self, headers: &HeaderMap, body: &[u8]) -> ApiResult<Response> {
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
                let caller = Caller::key(
                    hook.tenant.clone(),
                    format!("webhook:{}", hook.name),
                    Scopes(vec![Scope::Write]),
                );
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
}
