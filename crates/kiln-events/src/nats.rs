//! The NATS bridge: every event published to JetStream on
//! `kiln.events.<tenant>.<family>.<action>` (the type's two parts; a `.` in
//! the tenant's name written `%2E`, so the tenant is one token), with
//! `Nats-Msg-Id` set to the event's id, from a cursor kept in the database.
//! The cursor moves only once JetStream acknowledged everything before it,
//! so a kiln restart or a NATS outage resumes from the last acknowledged
//! event: nothing is lost, and what is sent twice JetStream drops as a
//! duplicate within its window (two minutes by default).

use std::time::Duration;

use async_nats::jetstream;
use kiln_db::events::{EventQuery, PAGE_MAX};
use kiln_db::Db;
use tokio_util::sync::CancellationToken;

/// The stream kiln publishes to, made if missing. Its subjects have a root
/// of their own, so `kiln.submit.>` requests (and the keys in their
/// headers) are never captured by it.
pub const STREAM: &str = "KILN";
pub const SUBJECTS: &str = "kiln.events.>";
/// The cursor's name in `event_cursors`.
pub const CURSOR: &str = "nats";

/// The subject of one event; `None` only for a type that is not two plain
/// names (the triggers write none such).
pub fn subject(tenant: &str, kind: &str) -> Option<String> {
    let (family, action) = kind.split_once('.')?;
    let plain = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    // Tenant names are `[A-Za-z0-9][A-Za-z0-9_.:@-]*`: only `.` needs writing
    // differently to stay one token.
    let tenant_ok = !tenant.is_empty()
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b));
    (tenant_ok && plain(family) && plain(action)).then(|| {
        format!(
            "kiln.events.{}.{family}.{action}",
            tenant.replace('.', "%2E")
        )
    })
}

/// Publishes the log until `stop`, reconnecting with a growing pause.
pub async fn bridge(db: Db, url: String, stop: CancellationToken) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match publish_from_cursor(&db, &url, &stop).await {
            Ok(()) => return,
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "the NATS bridge stopped; resuming from its cursor");
                let pause = Duration::from_millis(200 << failures.min(5));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

async fn publish_from_cursor(
    db: &Db,
    url: &str,
    stop: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await?;
    let js = jetstream::new(client);
    js.get_or_create_stream(jetstream::stream::Config {
        name: STREAM.to_string(),
        subjects: vec![SUBJECTS.to_string()],
        ..Default::default()
    })
    .await?;
    let ready = db.events_ready();
    let mut cursor = db.event_cursor(CURSOR).await?;
    tracing::info!(cursor, "NATS bridge publishing");
    loop {
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let events = db
            .event_read(&EventQuery {
                after: cursor,
                limit: PAGE_MAX,
                ..Default::default()
            })
            .await?;
        if let Some(last) = events.last().map(|e| e.id) {
            // Published as a window of unacknowledged messages, then all
            // acknowledgements awaited: the cursor moves past a page only
            // once JetStream holds all of it.
            let mut acks = Vec::with_capacity(events.len());
            for event in &events {
                let Some(subject) = subject(&event.tenant, &event.kind) else {
                    tracing::warn!(id = event.id, kind = %event.kind, "an event without a subject was not published");
                    continue;
                };
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(
                    async_nats::header::NATS_MESSAGE_ID,
                    event.id.to_string().as_str(),
                );
                let body = serde_json::json!({
                    "id": event.id.to_string(), "time": event.time, "tenant": event.tenant,
                    "type": event.kind, "resource": {"kind": event.resource.kind, "id": event.resource.id},
                    "labels": event.labels, "data": event.data,
                });
                acks.push(
                    js.publish_with_headers(subject, headers, body.to_string().into())
                        .await?,
                );
            }
            for ack in acks {
                ack.await?;
            }
            cursor = last;
            db.event_cursor_put(CURSOR, cursor, crate::now_millis())
                .await?;
            if events.len() as i64 == PAGE_MAX {
                continue;
            }
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_have_four_plain_tokens() {
        assert_eq!(
            subject("acme", "job.succeeded").as_deref(),
            Some("kiln.events.acme.job.succeeded")
        );
        assert_eq!(
            subject("acme.eu", "job.queued").as_deref(),
            Some("kiln.events.acme%2Eeu.job.queued")
        );
        assert_eq!(subject("acme", "job"), None);
        assert_eq!(subject("a b", "job.queued"), None);
        assert_eq!(subject("acme", "job.*"), None);
        assert_eq!(subject("acme", "job.a.b"), None);
    }
}
