//! `kiln serve --amqp-url` against the machine's RabbitMQ: a message on the
//! intake queue becomes a job whose result comes back on `reply_to`, a bad
//! one lands in the dead-letter queue; and `--notify-allow` lets a
//! subscription deliver to a receiver on 127.0.0.1, through the real binary.

mod common;

use std::time::Duration;

use common::{free_port, kiln, read_key, until_up, TempDir};
use futures::StreamExt;
use kiln_events::amqp::lapin::options::{
    BasicConsumeOptions, BasicGetOptions, QueueDeclareOptions,
};
use kiln_events::amqp::lapin::types::{AMQPValue, FieldTable};
use kiln_events::amqp::lapin::BasicProperties;
use kiln_events::amqp::{self, header_text};
use serde_json::{json, Value};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[tokio::test]
async fn serve_takes_jobs_from_rabbitmq_and_notifies() {
    let dir = TempDir::new("kiln-serve-amqp");
    let data = dir.join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let queue = format!("kiln-serve-{}", std::process::id());
    let _serve = kiln(
        &[
            "serve",
            "--listen",
            &listen,
            "--vm-warm",
            "0",
            "--amqp-url",
            BROKER,
            "--amqp-queue",
            &queue,
            "--notify-allow",
            "127.0.0.1",
        ],
        &data,
        dir.path(),
        "serve.log",
    );
    until_up(&base, Duration::from_secs(60)).await;
    let key = read_key(&data);
    let http = reqwest::Client::new();

    // A subscription to a receiver on 127.0.0.1 (allowed by --notify-allow).
    let (hook_tx, mut hooks) = tokio::sync::mpsc::channel::<Value>(16);
    let receiver = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let tx = hook_tx.clone();
        async move {
            let _ = tx
                .send(serde_json::from_slice(&body).unwrap_or(Value::Null))
                .await;
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let created = http
        .post(format!("{base}/api/v1/subscriptions"))
        .bearer_auth(&key)
        .json(
            &json!({"name": "done", "events": {"types": ["job.succeeded"]},
                      "destination": {"kind": "webhook", "url": hook_url, "secret": "k"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());

    let connection = amqp::connect(BROKER).await.unwrap();
    let channel = amqp::confirmed_channel(&connection).await.unwrap();
    // The intake declares its queue; wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let probe = connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        if probe
            .queue_declare(&queue, passive, FieldTable::default())
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the intake never declared {queue}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replies = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "Authorization".into(),
        AMQPValue::LongString(format!("Bearer {key}").into()),
    );
    let properties = BasicProperties::default()
        .with_headers(headers.clone())
        .with_reply_to(replies.name().clone())
        .with_correlation_id("r-1".into());
    let body = json!({"kind": "noop", "spec": {}, "labels": {"via": "rabbitmq"}}).to_string();
    amqp::publish_confirmed(&channel, "", &queue, body.as_bytes(), properties)
        .await
        .unwrap();
    amqp::publish_confirmed(
        &channel,
        "",
        &queue,
        b"[]",
        BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap();

    let mut consumer = channel
        .basic_consume(
            replies.name().as_str(),
            "",
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("a reply within 30 s")
        .unwrap()
        .unwrap();
    let view: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(view["status"], "succeeded", "{view}");
    assert_eq!(view["labels"]["via"], "rabbitmq");
    let id = view["id"].as_str().unwrap().to_string();
    let fetched: Value = http
        .get(format!("{base}/api/v1/jobs/{id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["status"], "succeeded");

    let dead = format!("{queue}.dead");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let message = loop {
        if let Some(message) = channel
            .basic_get(&dead, BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            break message;
        }
        assert!(std::time::Instant::now() < deadline, "nothing in {dead}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let error = header_text(message.properties.headers().as_ref(), "x-kiln-error").unwrap();
    assert!(error.starts_with("bad_request:"), "{error}");

    let event = tokio::time::timeout(Duration::from_secs(30), hooks.recv())
        .await
        .expect("a notification within 30 s")
        .unwrap();
    assert_eq!(event["type"], "job.succeeded");
    assert_eq!(event["resource"]["id"], id);

    for name in [queue.clone(), dead] {
        let _ = channel.queue_delete(&name, Default::default()).await;
    }
    let _ = channel
        .exchange_delete(&format!("{queue}.dlx"), Default::default())
        .await;
}
