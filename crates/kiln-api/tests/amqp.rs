//! The RabbitMQ intake against real brokers: the machine's RabbitMQ for
//! storing, dead-lettering and replying (both databases), and a private
//! RabbitMQ node this test starts, stops and starts again under load.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::harness;
use futures::StreamExt;
use kiln_api::intake::amqp::{amqp_intake, AmqpIntake};
use kiln_events::amqp::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use kiln_events::amqp::lapin::types::{AMQPValue, FieldTable};
use kiln_events::amqp::lapin::{BasicProperties, Channel, Connection};
use kiln_events::amqp::{self, header_text};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

kiln_db::on_both_databases!(stores_acknowledges_dead_letters_and_replies,);

fn intake(url: &str, queue: &str) -> AmqpIntake {
    AmqpIntake {
        url: url.to_string(),
        queue: queue.to_string(),
        prefetch: 64,
        default_key: None,
    }
}

fn auth(key: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        "Authorization".into(),
        AMQPValue::LongString(format!("Bearer {key}").into()),
    );
    headers
}

/// Messages ready in `queue`, or `None` while it does not exist.
async fn depth(connection: &Connection, queue: &str) -> Option<u32> {
    // A passive declare of a missing queue closes its channel: use a fresh one.
    let channel = connection.create_channel().await.ok()?;
    let declared = channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = channel.close(200, "").await;
    Some(declared.message_count())
}

async fn wait_for<T>(what: &str, secs: u64, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish(channel: &Channel, queue: &str, body: &[u8], properties: BasicProperties) {
    amqp::publish_confirmed(channel, "", queue, body, properties)
        .await
        .unwrap();
}

async fn total_jobs(db: &kiln_db::Db, tenant: &str) -> i64 {
    db.job_count_by_status(Some(tenant))
        .await
        .unwrap()
        .values()
        .sum()
}

async fn stores_acknowledges_dead_letters_and_replies(db: kiln_db::Db) {
    let h = harness(db).await;
    let queue = kiln_db::testing::unique_name("kiln-amqp");
    let stop = CancellationToken::new();
    let task = tokio::spawn(amqp_intake(
        h.state.clone(),
        intake(BROKER, &queue),
        stop.clone(),
    ));
    let connection = amqp::connect(BROKER).await.unwrap();
    wait_for("the intake's queue", 20, async || {
        depth(&connection, &queue).await
    })
    .await;
    let channel = amqp::confirmed_channel(&connection).await.unwrap();
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
    let reply_queue = replies.name().as_str().to_string();

    let good = json!({"kind": "noop", "spec": {}, "labels": {"via": "amqp"}}).to_string();
    let asking = BasicProperties::default()
        .with_headers(auth(&h.admin))
        .with_message_id("order-1".into())
        .with_reply_to(reply_queue.clone().into())
        .with_correlation_id("c-1".into());
    publish(&channel, &queue, good.as_bytes(), asking.clone()).await;
    // The same message again, as a broker redelivers it after a lost ack.
    publish(&channel, &queue, good.as_bytes(), asking).await;

    let refused: [(&str, Vec<u8>, FieldTable); 6] = [
        ("bad_request", b"{not json".to_vec(), auth(&h.admin)),
        (
            "unknown_kind",
            json!({"kind": "nope", "spec": {}}).to_string().into_bytes(),
            auth(&h.admin),
        ),
        (
            "unauthorized",
            good.clone().into_bytes(),
            FieldTable::default(),
        ),
        ("forbidden", good.clone().into_bytes(), auth(&h.reader)),
        // A reply_to naming another tenant's queue.
        ("invalid", good.clone().into_bytes(), auth(&h.admin)),
        (
            "too_large",
            format!(
                "{{\"kind\":\"noop\",\"spec\":{{\"pad\":\"{}\"}}}}",
                "x".repeat(1 << 20)
            )
            .into_bytes(),
            auth(&h.admin),
        ),
    ];
    for (code, body, headers) in &refused {
        let mut properties = BasicProperties::default().with_headers(headers.clone());
        if *code == "invalid" {
            properties = properties.with_reply_to("globex.results".into());
        }
        publish(&channel, &queue, body, properties).await;
    }

    // The job's result comes back to reply_to with the correlation id.
    let mut consumer = channel
        .basic_consume(
            &reply_queue,
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
    assert_eq!(
        reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("c-1")
    );
    let view: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(view["status"], "succeeded", "{view}");
    assert_eq!(view["labels"]["via"], "amqp", "{view}");
    let filter = kiln_db::JobFilter {
        limit: 10,
        ..Default::default()
    };
    let stored = h.db.job_list("acme", &filter).await.unwrap();
    assert_eq!(stored.len(), 1, "one job for the message sent twice");
    assert_eq!(view["id"], stored[0].id.to_string());
    assert_eq!(stored[0].idempotency_key.as_deref(), Some("order-1"));

    // Every refusal lands in the dead-letter queue, once, with its reason
    // and without the key it was sent with.
    let dead_queue = format!("{queue}.dead");
    wait_for("six dead letters", 20, async || {
        (depth(&connection, &dead_queue).await? == 6).then_some(())
    })
    .await;
    let mut reasons = BTreeMap::new();
    for _ in 0..6 {
        let message = channel
            .basic_get(&dead_queue, BasicGetOptions::default())
            .await
            .unwrap()
            .expect("a dead letter");
        let headers = message.properties.headers().as_ref();
        let error = header_text(headers, "x-kiln-error").expect("x-kiln-error");
        assert!(header_text(headers, "authorization").is_none(), "{error}");
        let code = error.split(':').next().unwrap().to_string();
        reasons.insert(code, message.data.len());
        message.ack(BasicAckOptions::default()).await.unwrap();
    }
    let expected: Vec<&str> = {
        let mut codes: Vec<&str> = refused.iter().map(|(code, _, _)| *code).collect();
        codes.sort();
        codes
    };
    assert_eq!(
        reasons.keys().map(String::as_str).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(depth(&connection, &queue).await, Some(0));
    assert_eq!(total_jobs(&h.db, "acme").await, 1);

    stop.cancel();
    task.await.unwrap();
    for name in [queue.clone(), dead_queue] {
        channel
            .queue_delete(&name, QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    channel
        .exchange_delete(&format!("{queue}.dlx"), Default::default())
        .await
        .unwrap();
    h.stop().await;
}

/// A RabbitMQ node of the test's own, on its own ports and data directory,
/// so stopping it disturbs no one else.
struct PrivateBroker {
    dir: PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rabbitmq_server() -> PathBuf {
    let packaged = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    assert!(
        packaged.exists(),
        "rabbitmq-server is not installed (.ci/run installs Debian's rabbitmq-server)"
    );
    packaged.to_path_buf()
}

impl PrivateBroker {
    fn new() -> PrivateBroker {
        let dir = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-rabbit"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("plugins"), "[].\n").unwrap();
        PrivateBroker {
            node: format!("kiln{}@localhost", std::process::id()),
            port: free_port(),
            dist_port: free_port(),
            dir,
            child: None,
        }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    async fn start(&mut self) {
        let dir = &self.dir;
        let child = Command::new(rabbitmq_server())
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("none"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("plugins"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", dir.join("plugins-expand"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let url = self.url();
        wait_for("the private broker", 90, async || {
            amqp::connect(&url).await.ok().map(drop)
        })
        .await;
    }

    /// A graceful stop (SIGTERM), as an operator's restart does.
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            tokio::task::spawn_blocking(move || child.wait())
                .await
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Publishes `count` jobs with ids `m-<n>`, each confirmed by the broker;
/// after a lost connection it reconnects and sends again what was not
/// confirmed. Returns once all are confirmed.
async fn publish_through_outages(url: String, queue: String, key: String, count: usize) {
    let mut next = 0;
    while next < count {
        let Ok(connection) = amqp::connect(&url).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(channel) = amqp::confirmed_channel(&connection).await else {
            continue;
        };
        while next < count {
            let window: Vec<usize> = (next..(next + 50).min(count)).collect();
            let mut confirms = Vec::new();
            let mut ok = true;
            for n in &window {
                let body = json!({"kind": "noop", "spec": {}, "labels": {"n": n.to_string()}});
                let properties = BasicProperties::default()
                    .with_headers(auth(&key))
                    .with_message_id(format!("m-{n}").into())
                    .with_delivery_mode(2);
                let sent = channel
                    .basic_publish(
                        "",
                        &queue,
                        Default::default(),
                        body.to_string().as_bytes(),
                        properties,
                    )
                    .await;
                match sent {
                    Ok(confirm) => confirms.push(confirm),
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            for confirm in confirms {
                match confirm.await {
                    Ok(c) if c.is_ack() => {}
                    _ => ok = false,
                }
            }
            if !ok {
                break;
            }
            next = window.last().unwrap() + 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_under_load_loses_and_duplicates_nothing() {
    let mut broker = PrivateBroker::new();
    broker.start().await;
    let h = harness(kiln_db::testing::postgres_schema().await).await;
    let queue = "jobs".to_string();
    let stop = CancellationToken::new();
    let task = tokio::spawn(amqp_intake(
        h.state.clone(),
        intake(&broker.url(), &queue),
        stop.clone(),
    ));
    let connection = amqp::connect(&broker.url()).await.unwrap();
    wait_for("the intake's queue", 20, async || {
        depth(&connection, &queue).await
    })
    .await;
    drop(connection);

    const COUNT: usize = 3_000;
    let publisher = tokio::spawn(publish_through_outages(
        broker.url(),
        queue.clone(),
        h.admin.clone(),
        COUNT,
    ));
    // Restart the broker once some but not all messages are in.
    wait_for("the first jobs", 60, async || {
        (total_jobs(&h.db, "acme").await >= 300).then_some(())
    })
    .await;
    broker.stop().await;
    let during = total_jobs(&h.db, "acme").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.start().await;
    tokio::time::timeout(Duration::from_secs(180), publisher)
        .await
        .expect("every message confirmed within 180 s")
        .unwrap();

    wait_for("every message stored", 120, async || {
        (total_jobs(&h.db, "acme").await == COUNT as i64).then_some(())
    })
    .await;
    // Nothing stored twice, now or after redeliveries settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(total_jobs(&h.db, "acme").await, COUNT as i64);
    assert!(
        during < COUNT as i64,
        "the restart came before all messages were in ({during})"
    );
    let connection = amqp::connect(&broker.url()).await.unwrap();
    assert_eq!(depth(&connection, &queue).await, Some(0));

    stop.cancel();
    task.await.unwrap();
    h.stop().await;
    broker.stop().await;
}
