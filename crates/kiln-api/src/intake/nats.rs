//! NATS intake: a request on `kiln.submit.<queue>` (the queue may hold
//! dots; queue group `kiln-intake`, so each request is taken by one kiln) is
//! answered with `{"id", "created"}` or `{"error": {"code", "message"}}`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::submit_message;
use crate::error::ApiError;
use crate::AppState;

/// Requests handled at once by one process.
const CONCURRENCY: usize = 64;

fn answer(result: Result<(String, bool), ApiError>) -> serde_json::Value {
    match result {
        Ok((id, created)) => serde_json::json!({"id": id, "created": created}),
        Err(error) => {
            serde_json::json!({"error": {"code": error.code, "message": error.message}})
        }
    }
}

/// Takes `kiln.submit.<queue>` requests until `stop`, reconnecting after a
/// lost connection (requests sent meanwhile get no answer: NATS requests
/// are not durable, and the sender's timeout tells it to send again).
pub async fn nats_intake(
    state: Arc<AppState>,
    url: String,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match serve_nats(&state, &url, &stop).await {
            Ok(()) => return,
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "NATS intake stopped; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200 << failures.min(5))) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

async fn serve_nats(
    state: &Arc<AppState>,
    url: &str,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<(), async_nats::Error> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await?;
    let requests = client
        .queue_subscribe("kiln.submit.>", "kiln-intake".to_string())
        .await?;
    tracing::info!("NATS intake taking kiln.submit.<queue>");
    let handled =
        requests
            .take_until(stop.cancelled())
            .for_each_concurrent(CONCURRENCY, |message| {
                let client = client.clone();
                async move {
                    let queue = message.subject.as_str().strip_prefix("kiln.submit.");
                    let authorization = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Authorization"))
                        .map(|v| v.as_str().to_string());
                    let result =
                        submit_message(state, authorization.as_deref(), queue, &message.payload)
                            .await;
                    if let Err(error) = &result {
                        tracing::debug!(code = error.code, "a NATS submission was refused");
                    }
                    if let Some(reply) = message.reply {
                        let body = answer(result).to_string();
                        if let Err(error) = client.publish(reply, body.into()).await {
                            tracing::warn!(%error, "could not answer a NATS submission");
                        }
                    }
                }
            });
    handled.await;
    if stop.is_cancelled() {
        Ok(())
    } else {
        Err("the subscription ended".into())
    }
}
