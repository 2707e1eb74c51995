//! RabbitMQ plumbing for the AMQP intake: connecting on tokio, declaring
//! the intake queue with its dead-letter exchange and queue, and publishing
//! with confirms. What a message means (a job submission) is the API's
//! business (`kiln_api::intake::amqp`).
//!
//! Topology for an intake queue `Q` (all durable):
//! - queue `Q`, with `x-dead-letter-exchange = Q.dlx` and
//!   `x-dead-letter-routing-key = Q`, so anything the broker itself
//!   dead-letters (a TTL, a length limit) lands beside kiln's refusals;
//! - direct exchange `Q.dlx`, and queue `Q.dead` bound to it with key `Q`.

pub use lapin;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// The names beside an intake queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub queue: String,
    pub dead_exchange: String,
    pub dead_queue: String,
}

impl Topology {
    pub fn new(queue: &str) -> Topology {
        Topology {
            queue: queue.to_string(),
            dead_exchange: format!("{queue}.dlx"),
            dead_queue: format!("{queue}.dead"),
        }
    }

    /// Declares all three (idempotent). A queue that already exists with
    /// other arguments makes the broker close the channel: the error says so.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .exchange_declare(
                &self.dead_exchange,
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(&self.dead_queue, durable, FieldTable::default())
            .await?;
        channel
            .queue_bind(
                &self.dead_queue,
                &self.dead_exchange,
                &self.queue,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_exchange.clone().into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.queue.clone().into()),
        );
        channel
            .queue_declare(&self.queue, durable, arguments)
            .await?;
        Ok(())
    }
}

/// A connection whose I/O runs on the caller's tokio runtime.
pub async fn connect(url: &str) -> lapin::Result<Connection> {
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name("kiln".into());
    Connection::connect(url, properties).await
}

/// A channel in confirm mode: every publish on it is answered by the broker.
pub async fn confirmed_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Why a publish did not land.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
}

/// Publishes persistently and waits for the broker's confirm.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let confirm = channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions::default(),
            body,
            properties.with_delivery_mode(2),
        )
        .await?
        .await?;
    if confirm.is_nack() {
        return Err(PublishError::Nacked);
    }
    Ok(())
}

/// A header value as text (AMQP clients send strings as long or short
/// strings, some as bytes).
pub fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    let headers = headers?;
    let value = headers
        .inner()
        .iter()
        .find(|(key, _)| key.as_str().eq_ignore_ascii_case(name))
        .map(|(_, value)| value)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::ByteArray(b) => Some(String::from_utf8_lossy(b.as_slice()).into_owned()),
        _ => None,
    }
}

/// `headers` with `name` set to `value`.
pub fn with_header(headers: Option<&FieldTable>, name: &str, value: &str) -> FieldTable {
    let mut out = headers.cloned().unwrap_or_default();
    out.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    out
}
