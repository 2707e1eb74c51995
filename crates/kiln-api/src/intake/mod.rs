//! Job submissions that arrive through a broker instead of HTTP. A message
//! is the body of `POST /api/v1/jobs`, with the sender's kiln API key in an
//! `Authorization: Bearer <key>` header; it goes through the same key, scope,
//! rate, kind and spec checks and gets the same errors.
//!
//! - NATS (`nats.rs`): requests on `kiln.submit.<queue>`, answered at once.
//! - RabbitMQ (`amqp.rs`): a durable queue, acknowledged once stored, with
//!   refusals dead-lettered and results published to `reply_to`.

use kiln_core::Scope;

use crate::error::ApiError;
use crate::extract::Caller;
use crate::routes::jobs::{SubmitJob, SubmitParams};
use crate::{AppState, JSON_BYTES_MAX};

pub mod amqp;
mod nats;

pub use nats::nats_intake;

/// The caller a broker message's `Authorization` header names, with its
/// scope checked as the API checks it, and its rate when `throttle` (NATS
/// requests; a durable queue is its own buffer and is taken at the
/// database's pace, so requeueing throttled messages would only spin).
pub(crate) async fn caller_of(
    state: &AppState,
    authorization: Option<&str>,
    throttle: bool,
) -> Result<Caller, ApiError> {
    let key = authorization
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::unauthorized("send an Authorization: Bearer <key> header"))?;
    let caller = state
        .keys
        .resolve(&state.db, key, || {
            if throttle {
                crate::extract::throttle(state, "source:broker".into())
            } else {
                Ok(())
            }
        })
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown or revoked API key"))?;
    if throttle {
        crate::extract::throttle(state, format!("key:{}", caller.key_id))?;
    }
    caller.require(Scope::Write)?;
    Ok(caller)
}

/// A message body as a job submission, refused as `POST /api/v1/jobs`
/// refuses it.
pub(crate) fn parse_job(body: &[u8]) -> Result<SubmitJob, ApiError> {
    if body.len() > JSON_BYTES_MAX {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a job is at most {JSON_BYTES_MAX} bytes of JSON"),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the message is not a job: {e}")))
}

/// Submits one message's job as the holder of `authorization` would through
/// the API; the job's id and whether it was made now.
pub async fn submit_message(
    state: &AppState,
    authorization: Option<&str>,
    queue: Option<&str>,
    body: &[u8],
) -> Result<(String, bool), ApiError> {
    let caller = caller_of(state, authorization, true).await?;
    let submitted = submit_as(state, &caller, queue, body).await;
    if state.audit_enabled() {
        let (resource, outcome) = match &submitted {
            Ok((id, made)) => (
                format!("/api/v1/jobs/{id}"),
                if *made { "201" } else { "200" }.to_string(),
            ),
            Err(e) => (
                "/api/v1/jobs".into(),
                format!("{} {}", e.status.as_u16(), e.code),
            ),
        };
        let (actor_kind, actor) = caller.actor();
        let record = kiln_core::audit::AuditRecord {
            time: crate::now_millis(),
            tenant: caller.tenant.clone(),
            actor_kind: actor_kind.into(),
            actor: actor.into(),
            action: "broker.submit".into(),
            resource,
            request_id: hex::encode(rand::random::<[u8; 12]>()),
            source: "broker".into(),
            outcome,
            rationale: None,
        };
        if let Err(error) = state.db.audit_insert(&record).await {
            metrics::counter!("kiln_audit_write_failures_total").increment(1);
            tracing::error!(%error, "could not write an audit record");
        }
    }
    submitted
}

async fn submit_as(
    state: &AppState,
    caller: &Caller,
    queue: Option<&str>,
    body: &[u8],
) -> Result<(String, bool), ApiError> {
    let mut job = parse_job(body)?;
    if let Some(queue) = queue {
        match &job.queue {
            Some(named) if named != queue => {
                return Err(ApiError::invalid(format!(
                    "the message names queue {named:?} but was sent to {queue:?}"
                )))
            }
            _ => job.queue = Some(queue.to_string()),
        }
    }
    let params = SubmitParams {
        wait: false,
        wait_ms: None,
    };
    let (status, view) = crate::routes::jobs::submit(
        state,
        caller,
        job,
        &params,
        kiln_core::limits::DEFAULT_MAX_ATTEMPTS,
    )
    .await?;
    Ok((view.0.id.clone(), status == axum::http::StatusCode::CREATED))
}
