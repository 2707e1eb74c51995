//! RabbitMQ intake: consumes a durable queue (default `jobs`) whose messages
//! are job submissions.
//!
//! - A message is acknowledged only after its job is committed. Deliveries
//!   are taken in batches (up to half the prefetch window, so the broker
//!   sends the next batch while one is stored) and stored with one
//!   statement per batch, then acknowledged with one `multiple` ack.
//! - A refused message (bad JSON, unknown kind, bad spec, too large, bad
//!   key) is republished, confirmed, to the dead-letter exchange with an
//!   `x-kiln-error` header (`<code>: <message>`) and then acknowledged, so it
//!   lands in `<queue>.dead` once and is never requeued.
//! - A message kiln cannot take now (rate limit, database down) is
//!   requeued after a pause.
//! - `message_id` stands in for `idempotency_key` when the body has none, so
//!   a message redelivered after a lost ack (a broker or kiln restart) finds
//!   its job instead of making a second one.
//! - With `reply_to`, the job's view (as `GET /api/v1/jobs/{id}` shows it)
//!   is published to that queue with the message's `correlation_id` when the
//!   job ends, from rows in `broker_replies` that outlive restarts.
//!
//! Memory is bounded by the prefetch window times the broker's
//! `max_message_size`: a delivery is read whole before its size is checked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kiln_core::NewJob;
use kiln_db::replies::BrokerReply;
use kiln_events::amqp::lapin::message::Delivery;
use kiln_events::amqp::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use kiln_events::amqp::lapin::types::AMQPValue;
use kiln_events::amqp::lapin::types::FieldTable;
use kiln_events::amqp::lapin::{BasicProperties, Channel, Connection};
use kiln_events::amqp::{self, Topology};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::routes::jobs::JobView;
use crate::{now_millis, AppState};

/// The `broker` of this intake's rows in `broker_replies`.
const BROKER: &str = "amqp";
/// How long a claimed reply is this process's before another may take it.
const REPLY_LEASE_MS: i64 = 30_000;
const REPLY_BATCH: i64 = 256;
/// Publishes of one result before it is given up.
const REPLY_TRIES: u32 = 3;
/// The pause before requeueing messages kiln could not take now.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// What `--amqp-url` and its companions configure.
#[derive(Clone)]
pub struct AmqpIntake {
    pub url: String,
    pub queue: String,
    /// Unacknowledged deliveries the broker may hand this process at once.
    pub prefetch: u16,
    /// The key messages without an `Authorization` header are submitted as.
    pub default_key: Option<String>,
}

impl std::fmt::Debug for AmqpIntake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpIntake")
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field(
                "default_key",
                &self.default_key.as_ref().map(|_| "<hidden>"),
            )
            .finish_non_exhaustive()
    }
}

/// Consumes until `stop`, reconnecting after a lost connection: the broker
/// redelivers what was not acknowledged, and `message_id` dedups it.
pub async fn amqp_intake(state: Arc<AppState>, config: AmqpIntake, stop: CancellationToken) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match serve(&state, &config, &stop, &mut failures).await {
            Ok(()) => return,
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, queue = %config.queue, "AMQP intake stopped; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100 << failures.min(5))) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn serve(
    state: &Arc<AppState>,
    config: &AmqpIntake,
    stop: &CancellationToken,
    failures: &mut u32,
) -> Result<(), BoxError> {
    let connection = amqp::connect(&config.url).await?;
    let topology = Topology::new(&config.queue);
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .basic_qos(config.prefetch.max(1), BasicQosOptions::default())
        .await?;
    let dead = amqp::confirmed_channel(&connection).await?;
    let consumer = channel
        .basic_consume(
            &config.queue,
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    *failures = 0;
    tracing::info!(queue = %config.queue, "AMQP intake consuming");
    let outcome = tokio::select! {
        result = consume(state, config, &topology, &channel, &dead, consumer, stop) => result,
        result = reply_loop(state, &connection) => result,
    };
    let _ = connection.close(200, "kiln stopping").await;
    outcome
}

async fn consume(
    state: &AppState,
    config: &AmqpIntake,
    topology: &Topology,
    channel: &Channel,
    dead: &Channel,
    mut consumer: amqp::lapin::Consumer,
    stop: &CancellationToken,
) -> Result<(), BoxError> {
    // Half the window per batch: while one half is being stored, the
    // broker is already sending the other.
    let batch_max = usize::from(config.prefetch.max(2) / 2);
    loop {
        // Stop only between batches: a batch once begun is stored and
        // acknowledged (or requeued) whole.
        let first = tokio::select! {
            next = consumer.next() => next,
            _ = stop.cancelled() => return Ok(()),
        };
        let first = first.ok_or("the broker ended the consumer")??;
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match consumer.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery?),
                _ => break,
            }
        }
        take_batch(state, config, topology, channel, dead, batch).await?;
    }
}

/// What became of one delivery.
enum Fate {
    Store(Box<NewJob>, Reply),
    Refuse(ApiError),
    Retry,
    /// The database refused it (not merely unreachable): retried once.
    Unstored,
}

async fn take_batch(
    state: &AppState,
    config: &AmqpIntake,
    topology: &Topology,
    channel: &Channel,
    dead: &Channel,
    batch: Vec<Delivery>,
) -> Result<(), BoxError> {
    let now = now_millis();
    let mut fates = Vec::with_capacity(batch.len());
    for delivery in &batch {
        let fate = match check(state, config, delivery, now).await {
            Ok((job, reply)) => Fate::Store(Box::new(job), reply),
            Err(error) if transient(&error, delivery.redelivered) => Fate::Retry,
            Err(error) => Fate::Refuse(error),
        };
        fates.push(fate);
    }
    let stored = store(state, &mut fates, now).await;
    // A message that could not be stored twice is not retried a third
    // time: whatever refuses it (a value the database will not take) would
    // refuse it forever, and a keyless one would make a job each round.
    for (delivery, fate) in batch.iter().zip(fates.iter_mut()) {
        if matches!(fate, Fate::Unstored) {
            *fate = if delivery.redelivered {
                Fate::Refuse(ApiError::internal("the job could not be stored"))
            } else {
                Fate::Retry
            };
        }
    }
    let all_stored = fates.iter().all(|f| matches!(f, Fate::Store(..)));
    let last = batch.last().map(|d| d.delivery_tag).unwrap_or_default();
    if all_stored {
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await?;
    } else {
        // Stored ones first: nothing below may lose their acknowledgement.
        for (delivery, fate) in batch.iter().zip(&fates) {
            if matches!(fate, Fate::Store(..)) {
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
        }
        for (delivery, fate) in batch.iter().zip(&fates) {
            if let Fate::Refuse(error) = fate {
                dead_letter(topology, dead, delivery, error).await?;
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
        }
        if fates
            .iter()
            .any(|f| matches!(f, Fate::Retry | Fate::Unstored))
        {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        for (delivery, fate) in batch.iter().zip(&fates) {
            if matches!(fate, Fate::Retry | Fate::Unstored) {
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await?;
            }
        }
    }
    metrics::counter!("kiln_amqp_intake_messages_total", "outcome" => "stored")
        .increment(stored as u64);
    Ok(())
}

/// Stores the batch's accepted jobs (keyless ones in one statement) and
/// their reply addresses; jobs that could not be stored become retries.
/// How many were stored.
async fn store(state: &AppState, fates: &mut [Fate], now: i64) -> usize {
    // Per delivery: its job id, or whether the failure was the database
    // being away (retry) rather than refusing this job (retry once).
    let mut ids: Vec<Result<i64, bool>> = vec![Err(true); fates.len()];
    let insert_one = async |job: &NewJob| match state.db.job_insert(job, now).await {
        Ok((stored, _)) => Ok(stored.id),
        Err(error) => {
            tracing::warn!(%error, "AMQP intake could not store a job");
            Err(error.is_unavailable())
        }
    };
    let mut keyless = Vec::new();
    let mut keyless_at = Vec::new();
    for (i, fate) in fates.iter().enumerate() {
        if let Fate::Store(job, _) = fate {
            if job.idempotency_key.is_none() {
                keyless.push((**job).clone());
                keyless_at.push(i);
            } else {
                ids[i] = insert_one(job).await;
            }
        }
    }
    if !keyless.is_empty() {
        match state.db.job_insert_many(&keyless, now).await {
            Ok(new) => {
                for (i, id) in keyless_at.into_iter().zip(new) {
                    ids[i] = Ok(id);
                }
            }
            Err(error) if error.is_unavailable() => {
                tracing::warn!(%error, "AMQP intake could not store jobs");
            }
            // One job the database refuses must not hold back the rest.
            Err(_) => {
                for (i, job) in keyless_at.into_iter().zip(&keyless) {
                    ids[i] = insert_one(job).await;
                }
            }
        }
    }
    let mut stored = 0;
    for (fate, id) in fates.iter_mut().zip(ids) {
        let Fate::Store(job, reply) = fate else {
            continue;
        };
        let id = match id {
            Ok(id) => id,
            Err(unavailable) => {
                *fate = if unavailable {
                    Fate::Retry
                } else {
                    Fate::Unstored
                };
                continue;
            }
        };
        if let Some((reply_to, correlation_id)) = reply {
            let row = BrokerReply {
                job_id: id,
                tenant: job.tenant.clone(),
                reply_to: reply_to.clone(),
                correlation_id: correlation_id.clone(),
            };
            if let Err(error) = state.db.broker_reply_put(BROKER, &row, now).await {
                // The job is stored; redelivery finds it by message_id and
                // writes the reply row then.
                tracing::warn!(%error, "AMQP intake could not keep a reply address");
                *fate = if error.is_unavailable() {
                    Fate::Retry
                } else {
                    Fate::Unstored
                };
                continue;
            }
        }
        stored += 1;
    }
    stored
}

/// Where a stored job's result goes: `reply_to` and `correlation_id`.
type Reply = Option<(String, Option<String>)>;

/// `reply_to` must name a queue only its sender can read: RabbitMQ's direct
/// reply-to, a server-named (exclusive) queue, or one under the tenant's
/// own prefix. Otherwise kiln, with its broker rights, would publish into
/// whatever queue a sender named (another tenant's results queue).
fn reply_of(delivery: &Delivery, tenant: &str) -> Result<Reply, ApiError> {
    let Some(to) = delivery.properties.reply_to().as_ref() else {
        return Ok(None);
    };
    let to = to.as_str();
    let plain =
        |s: &str| !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic());
    let owned = to.starts_with("amq.rabbitmq.reply-to")
        || to.starts_with("amq.gen-")
        || to
            .strip_prefix(tenant)
            .is_some_and(|rest| rest.starts_with('.'));
    if !plain(to) || !owned {
        return Err(ApiError::invalid(format!(
            "reply_to must be amq.rabbitmq.reply-to, a server-named queue (amq.gen-…) or \
             a queue named {tenant}.<name>"
        )));
    }
    let correlation = match delivery.properties.correlation_id().as_ref() {
        Some(id) if !plain(id.as_str()) => {
            return Err(ApiError::invalid(
                "correlation_id must be 1 to 255 printable ASCII characters",
            ))
        }
        id => id.map(|id| id.as_str().to_string()),
    };
    Ok(Some((to.to_string(), correlation)))
}

async fn check(
    state: &AppState,
    config: &AmqpIntake,
    delivery: &Delivery,
    now: i64,
) -> Result<(NewJob, Reply), ApiError> {
    let headers = delivery.properties.headers().as_ref();
    let authorization = amqp::header_text(headers, "authorization").or_else(|| {
        config
            .default_key
            .as_ref()
            .map(|key| format!("Bearer {key}"))
    });
    let caller = super::caller_of(state, authorization.as_deref(), false).await?;
    let reply = reply_of(delivery, &caller.tenant)?;
    let mut job = super::parse_job(&delivery.data)?;
    if job.idempotency_key.is_none() {
        job.idempotency_key = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_string());
    }
    let job = crate::routes::jobs::prepare(
        state,
        &caller,
        job,
        kiln_core::limits::DEFAULT_MAX_ATTEMPTS,
        now,
    )
    .await?;
    Ok((job, reply))
}

/// Refusals that say "not now" rather than "never". An internal error is
/// given one more delivery, then dead-lettered, so one poison message cannot
/// circle forever.
fn transient(error: &ApiError, redelivered: bool) -> bool {
    use axum::http::StatusCode;
    match error.status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => true,
        status => status.is_server_error() && !redelivered,
    }
}

async fn dead_letter(
    topology: &Topology,
    dead: &Channel,
    delivery: &Delivery,
    error: &ApiError,
) -> Result<(), BoxError> {
    let message = kiln_core::names::sanitise_message(&error.message, 512);
    // The API key stays behind: the dead-letter queue may be read by others.
    let mut headers = FieldTable::default();
    for (name, value) in delivery.properties.headers().iter().flat_map(|h| h.inner()) {
        if !name.as_str().eq_ignore_ascii_case("authorization") {
            headers.insert(name.clone(), value.clone());
        }
    }
    let headers = amqp::with_header(
        Some(&headers),
        "x-kiln-error",
        &format!("{}: {message}", error.code),
    );
    let properties = delivery.properties.clone().with_headers(headers);
    amqp::publish_confirmed(
        dead,
        &topology.dead_exchange,
        &topology.queue,
        &delivery.data,
        properties,
    )
    .await?;
    metrics::counter!("kiln_amqp_intake_messages_total", "outcome" => "dead_lettered").increment(1);
    tracing::debug!(code = error.code, "an AMQP submission was dead-lettered");
    Ok(())
}

/// Publishes the results of ended jobs to their `reply_to`, woken by new
/// events and at least twice a second. A result the broker will not take
/// (a nack, a channel it closes) is tried again after its lease, three
/// times in all, then given up with a warning; it never stops the others.
async fn reply_loop(state: &AppState, connection: &Connection) -> Result<(), BoxError> {
    let ready = state.db.events_ready();
    let mut channel: Option<Channel> = None;
    let mut failures: HashMap<i64, u32> = HashMap::new();
    loop {
        let wake = ready.notified();
        let due = state
            .db
            .broker_replies_claim(BROKER, now_millis(), REPLY_LEASE_MS, REPLY_BATCH)
            .await;
        let due = match due {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(%error, "could not read AMQP replies");
                Vec::new()
            }
        };
        let full = due.len() as i64 == REPLY_BATCH;
        for reply in due {
            let open = match &channel {
                Some(open) if open.status().connected() => open,
                _ => channel.insert(amqp::confirmed_channel(connection).await?),
            };
            match publish_reply(state, open, &reply).await {
                Ok(()) => {
                    failures.remove(&reply.job_id);
                }
                Err(error) => {
                    let tries = failures.entry(reply.job_id).or_default();
                    *tries += 1;
                    tracing::warn!(%error, job = reply.job_id, tries = *tries, "could not publish a job's result");
                    if *tries >= REPLY_TRIES {
                        failures.remove(&reply.job_id);
                        let _ = state.db.broker_reply_done(reply.job_id).await;
                    }
                    channel = None;
                }
            }
        }
        if failures.len() > 10_000 {
            failures.clear();
        }
        if !full {
            tokio::select! {
                _ = wake => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

async fn publish_reply(
    state: &AppState,
    channel: &Channel,
    reply: &BrokerReply,
) -> Result<(), BoxError> {
    let job = match state.db.job_get(&reply.tenant, reply.job_id).await {
        Ok(job) => job,
        Err(error) => {
            tracing::warn!(%error, "could not read a job to answer");
            return Ok(());
        }
    };
    if let Some(job) = job {
        let body = serde_json::to_vec(&JobView::from_job(job, now_millis()))?;
        let mut headers = FieldTable::default();
        headers.insert(
            "x-kiln-tenant".into(),
            AMQPValue::LongString(reply.tenant.clone().into()),
        );
        headers.insert(
            "x-kiln-job".into(),
            AMQPValue::LongString(reply.job_id.to_string().into()),
        );
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type("kiln.job.result".into())
            .with_headers(headers);
        if let Some(id) = &reply.correlation_id {
            properties = properties.with_correlation_id(id.as_str().into());
        }
        amqp::publish_confirmed(channel, "", &reply.reply_to, &body, properties).await?;
    }
    if let Err(error) = state.db.broker_reply_done(reply.job_id).await {
        tracing::warn!(%error, "could not mark an AMQP reply sent; it will be sent again");
    }
    Ok(())
}
