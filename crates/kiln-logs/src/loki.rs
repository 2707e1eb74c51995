//! Push to Loki: a background task reads the store from its cursor (`loki`
//! in `log_cursors`), posts a page to Loki's JSON push API
//! (`POST /loki/api/v1/push`, one stream per tenant, source, job and
//! level), and moves the cursor only once Loki said 2xx. An outage delays
//! the push and loses nothing: retention keeps what the cursor has not
//! passed.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_blob::BlobStore;
use kiln_db::logs::{LogChunk, LogQuery};
use kiln_db::Db;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const CURSOR: &str = "loki";

#[derive(Clone, Debug)]
pub struct LokiConfig {
    /// Loki's base URL (`http://loki:3100`); the push path is appended.
    pub url: String,
    /// Chunks per push.
    pub batch: i64,
}

impl LokiConfig {
    pub fn new(url: &str) -> LokiConfig {
        LokiConfig {
            url: url.trim_end_matches('/').to_string(),
            batch: 1_000,
        }
    }
}

/// A chunk's labels.
fn labels(chunk: &LogChunk) -> BTreeMap<&'static str, String> {
    let mut labels = BTreeMap::from([
        (
            "tenant",
            if chunk.tenant.is_empty() {
                "deployment".to_string()
            } else {
                chunk.tenant.clone()
            },
        ),
        ("source", chunk.source.clone()),
        ("level", chunk.level.clone()),
    ]);
    if let Some(job) = chunk.job_id {
        labels.insert("job", job.to_string());
    }
    labels
}

/// The push body for a page: chunks grouped into streams by labels, each
/// line stamped with its chunk's time in nanoseconds.
pub(crate) fn push_body(page: &[(LogChunk, String)]) -> Value {
    let mut streams: BTreeMap<BTreeMap<&'static str, String>, Vec<Value>> = BTreeMap::new();
    for (chunk, text) in page {
        let ns = (chunk.ts.max(0) as i128 * 1_000_000).to_string();
        streams
            .entry(labels(chunk))
            .or_default()
            .push(json!([ns, text.trim_end_matches('\n')]));
    }
    let streams: Vec<Value> = streams
        .into_iter()
        .map(|(labels, values)| json!({"stream": labels, "values": values}))
        .collect();
    json!({ "streams": streams })
}

/// Pushes until `stop` fires.
pub async fn push_loop(db: Db, blobs: BlobStore, config: LokiConfig, stop: CancellationToken) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "the Loki client could not be built");
            return;
        }
    };
    let url = format!("{}/loki/api/v1/push", config.url);
    let ready = db.logs_ready();
    let mut backoff = Duration::from_millis(500);
    while !stop.is_cancelled() {
        let notified = ready.notified();
        let cursor = match db.log_cursor(CURSOR).await {
            Ok(cursor) => cursor,
            Err(_) => {
                if sleep_or_stop(&stop, backoff).await {
                    return;
                }
                continue;
            }
        };
        let query = LogQuery {
            node_lines: true,
            after: cursor,
            limit: config.batch.max(1),
            ..LogQuery::default()
        };
        let chunks = db.log_read(&query).await.unwrap_or_default();
        let Some(last) = chunks.last().map(|c| c.id) else {
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
            continue;
        };
        let mut page = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let text = crate::chunk_text(&blobs, &chunk).await;
            page.push((chunk, text));
        }
        let pushed = client.post(&url).json(&push_body(&page)).send().await;
        match pushed {
            Ok(response) if response.status().is_success() => {
                backoff = Duration::from_millis(500);
                if let Err(error) = db.log_cursor_put(CURSOR, last, crate::now_millis()).await {
                    tracing::debug!(%error, "the Loki cursor was not moved; the page will be pushed again");
                }
            }
            outcome => {
                let why = match outcome {
                    Ok(response) => format!("status {}", response.status()),
                    Err(error) => error.to_string(),
                };
                tracing::debug!(%why, "Loki refused a push; retrying");
                if sleep_or_stop(&stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Sleeps; true if `stop` fired first.
async fn sleep_or_stop(stop: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = stop.cancelled() => true,
    }
}
