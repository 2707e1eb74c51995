//! `kiln bench events`: how long an event takes from the commit of its
//! change to a Server-Sent Events client, and how long one event takes to
//! reach many clients at once, through the real API on a socket, on SQLite
//! or PostgreSQL.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use kiln_blob::BlobStore;
use kiln_core::{NewJob, Scope, Scopes};
use kiln_worker::now_millis;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct EventsArgs {
    /// postgres://... (a fresh schema is used) or omit for a fresh SQLite file.
    #[arg(long, env = "KILN_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Events timed one at a time, commit → client.
    #[arg(long, default_value_t = 500)]
    samples: usize,
    /// Clients streaming at once.
    #[arg(long, default_value_t = 1_000)]
    clients: usize,
    /// Events each of them must receive.
    #[arg(long, default_value_t = 100)]
    fan_events: usize,
    /// A NATS server of the bench's own (its stream KILN is deleted first):
    /// times the bridge publishing the log to JetStream.
    #[arg(long)]
    nats_url: Option<String>,
    /// Events the bridge publishes.
    #[arg(long, default_value_t = 100_000)]
    nats_events: usize,
    /// A RabbitMQ broker: times the AMQP intake storing job messages (on a
    /// queue of the bench's own, deleted afterwards).
    #[arg(long)]
    amqp_url: Option<String>,
    /// Messages published for each AMQP phase.
    #[arg(long, default_value_t = 50_000)]
    amqp_messages: usize,
    /// The intake's prefetch window.
    #[arg(long, default_value_t = 1_024)]
    amqp_prefetch: u16,
}

/// One SSE connection, read frame by frame.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(http: &reqwest::Client, base: &str, key: &str) -> anyhow::Result<Stream> {
        let response = http
            .get(format!("{base}/api/v1/events?type=job.queued"))
            .bearer_auth(key)
            .header("accept", "text/event-stream")
            .send()
            .await?
            .error_for_status()?;
        Ok(Stream {
            response,
            buffer: String::new(),
        })
    }

    /// The next event's id.
    async fn next(&mut self) -> anyhow::Result<i64> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                if let Some(id) = frame
                    .lines()
                    .find_map(|l| l.strip_prefix("id:"))
                    .and_then(|v| v.trim().parse().ok())
                {
                    return Ok(id);
                }
                continue;
            }
            let chunk = self.response.chunk().await?.context("the stream ended")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

pub async fn events(args: EventsArgs) -> anyhow::Result<()> {
    let (db, _) = super::fresh_db(args.database_url.as_deref()).await?;
    let backend = db.backend();
    let root = std::env::temp_dir().join(format!("{}-events", super::bench_schema()));
    let blobs = BlobStore::local(&root.join("blobs"))?;
    let state = kiln_api::AppState::new(db.clone(), blobs, None);
    let state_for_amqp = state.clone();
    let (_, key) = kiln_api::issue_key(&db, "bench", "bench", Scopes(vec![Scope::Admin])).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let done = stop.clone();
    let server = tokio::spawn(kiln_api::serve(listener, state, async move {
        done.cancelled().await
    }));
    let http = reqwest::Client::new();
    println!("| kiln {backend}, events | value |\n|---|---|");

    let mut stream = Stream::open(&http, &base, &key).await?;
    let mut samples = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let sent = Instant::now();
        db.job_insert(&NewJob::new("bench", "nobody", json!({})), now_millis())
            .await?;
        tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .context("an event did not arrive within 10 s")??;
        samples.push(sent.elapsed());
    }
    samples.sort();
    println!(
        "| job insert commit → SSE client, {} samples | p50 {:.2} ms, p99 {:.2} ms |",
        args.samples,
        ms(super::percentile(&samples, 0.5)),
        ms(super::percentile(&samples, 0.99))
    );
    drop(stream);

    let mut clients = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        clients.push(Stream::open(&http, &base, &key).await?);
    }
    // Every stream is registered once its response headers came back.
    let started = Instant::now();
    let jobs: Vec<NewJob> = (0..args.fan_events)
        .map(|_| NewJob::new("bench", "nobody", json!({})))
        .collect();
    db.job_insert_many(&jobs, now_millis()).await?;
    let fan_events = args.fan_events;
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                for _ in 0..fan_events {
                    stream.next().await?;
                }
                anyhow::Ok(Instant::now())
            })
        })
        .collect();
    let mut last = started;
    for reader in readers {
        let at = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .context("a client did not get every event within 60 s")???;
        last = last.max(at);
    }
    let took = last.duration_since(started);
    println!(
        "| {} events to each of {} SSE clients | all delivered in {:.0} ms ({:.0} deliveries/s) |",
        args.fan_events,
        args.clients,
        ms(took),
        (args.fan_events * args.clients) as f64 / took.as_secs_f64()
    );
    if let Some(url) = &args.nats_url {
        nats(&db, url, args.nats_events).await?;
    }
    if let Some(url) = &args.amqp_url {
        amqp(
            &db,
            &state_for_amqp,
            url,
            args.amqp_messages,
            args.amqp_prefetch,
        )
        .await?;
    }
    stop.cancel();
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// The bridge from a cursor at 0 over a log of `n` more events: time until
/// JetStream acknowledged every one.
async fn nats(db: &kiln_db::Db, url: &str, n: usize) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let _ = js.delete_stream(kiln_events::nats::STREAM).await;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let jobs: Vec<NewJob> = chunk
            .iter()
            .map(|_| NewJob::new("bench", "nobody", json!({})))
            .collect();
        db.job_insert_many(&jobs, now_millis()).await?;
    }
    // Wait until the log (numbered, on PostgreSQL) holds every event.
    let expected = loop {
        let last = db.event_last().await?;
        let first_page = db
            .event_read(&kiln_db::events::EventQuery {
                after: last,
                limit: 1,
                ..Default::default()
            })
            .await?;
        if first_page.is_empty() && last as usize >= n {
            break last as u64;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stop = CancellationToken::new();
    let started = Instant::now();
    let bridge = tokio::spawn(kiln_events::nats::bridge(
        db.clone(),
        url.to_string(),
        stop.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(mut stream) = js.get_stream(kiln_events::nats::STREAM).await {
            if stream.info().await?.state.messages >= expected {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the bridge did not finish in 600 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    stop.cancel();
    bridge.await?;
    println!(
        "| NATS bridge: {expected} events to JetStream, each acknowledged | {:.0} events/s ({:.2} s) |",
        expected as f64 / took.as_secs_f64(),
        took.as_secs_f64()
    );
    Ok(())
}

/// Publishes `n` no-op jobs to `queue` with confirms, pipelined.
async fn amqp_publish(
    channel: &kiln_events::amqp::lapin::Channel,
    queue: &str,
    key: &str,
    n: usize,
) -> anyhow::Result<()> {
    use kiln_events::amqp::lapin::types::{AMQPValue, FieldTable};
    let mut headers = FieldTable::default();
    headers.insert(
        "Authorization".into(),
        AMQPValue::LongString(format!("Bearer {key}").into()),
    );
    let properties = kiln_events::amqp::lapin::BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    let body = json!({"kind": "noop", "spec": {}}).to_string();
    let mut sent = 0;
    while sent < n {
        let window = (n - sent).min(1_000);
        let mut confirms = Vec::with_capacity(window);
        for _ in 0..window {
            confirms.push(
                channel
                    .basic_publish(
                        "",
                        queue,
                        Default::default(),
                        body.as_bytes(),
                        properties.clone(),
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a message");
        }
        sent += window;
    }
    Ok(())
}

/// The AMQP intake: a backlog of `n` messages taken into durable jobs, then
/// `n` more taken while they are being published.
async fn amqp(
    db: &kiln_db::Db,
    state: &std::sync::Arc<kiln_api::AppState>,
    url: &str,
    n: usize,
    prefetch: u16,
) -> anyhow::Result<()> {
    use kiln_events::amqp;
    let tenant = "amqp-bench";
    let (_, key) = kiln_api::issue_key(db, tenant, "bench", Scopes(vec![Scope::Write])).await?;
    let queue = format!("kiln-bench-{}", super::bench_schema());
    let connection = amqp::connect(url).await?;
    let channel = amqp::confirmed_channel(&connection).await?;
    let topology = amqp::Topology::new(&queue);
    topology.declare(&channel).await?;
    let count = || async {
        anyhow::Ok(
            db.job_count_by_status(Some(tenant))
                .await?
                .values()
                .sum::<i64>() as usize,
        )
    };
    let wait_for = |target: usize| async move {
        let deadline = Instant::now() + Duration::from_secs(600);
        while count().await? < target {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the intake did not finish in 600 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(Instant::now())
    };

    let started = Instant::now();
    amqp_publish(&channel, &queue, &key, n).await?;
    let published = started.elapsed();
    let stop = CancellationToken::new();
    let config = kiln_api::intake::amqp::AmqpIntake {
        url: url.to_string(),
        queue: queue.clone(),
        prefetch,
        default_key: None,
    };
    let started = Instant::now();
    let intake = tokio::spawn(kiln_api::intake::amqp::amqp_intake(
        state.clone(),
        config,
        stop.clone(),
    ));
    let backlog = wait_for(n).await?.duration_since(started);

    let started = Instant::now();
    amqp_publish(&channel, &queue, &key, n).await?;
    let live = wait_for(2 * n).await?.duration_since(started);
    stop.cancel();
    intake.await?;
    for name in [&topology.queue, &topology.dead_queue] {
        channel.queue_delete(name, Default::default()).await?;
    }
    channel
        .exchange_delete(&topology.dead_exchange, Default::default())
        .await?;
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "| RabbitMQ: {n} persistent messages published, each confirmed | {:.0} msgs/s |",
        rate(published)
    );
    println!(
        "| AMQP intake: backlog of {n} messages → durable jobs, acknowledged | {:.0} msgs/s ({:.2} s) |",
        rate(backlog),
        backlog.as_secs_f64()
    );
    println!(
        "| AMQP intake: {n} messages published and taken at once | {:.0} msgs/s end to end ({:.2} s) |",
        rate(live),
        live.as_secs_f64()
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
