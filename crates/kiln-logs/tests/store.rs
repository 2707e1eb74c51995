//! The log writer on both databases: taps cut at line ends and stored in
//! order, caps with their marker, large volumes in the blob store, a
//! stalled store that never stalls the writer of output for long, and the
//! Loki pusher against a receiver on 127.0.0.1 that goes down for a while.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_blob::BlobStore;
use kiln_db::logs::{LogChunk, LogQuery};
use kiln_db::Db;
use kiln_logs::{LogConfig, LogSink, LokiConfig, Origin, Stream, Written};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

kiln_db::on_both_databases!(
    taps_are_stored_in_order_at_line_ends,
    a_source_keeps_its_cap_and_says_so,
    large_output_goes_to_the_blob_store,
    a_stalled_store_costs_a_writer_at_most_the_stall,
    loki_gets_every_line_across_an_outage,
);

fn blobs() -> BlobStore {
    let dir = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-logs"));
    BlobStore::local(&dir).unwrap()
}

fn config() -> LogConfig {
    LogConfig {
        flush_every: Duration::from_millis(10),
        ..LogConfig::new("node-1")
    }
}

async fn all(db: &Db, tenant: &str) -> Vec<LogChunk> {
    db.log_read(&LogQuery {
        tenant: Some(tenant),
        limit: 10_000,
        ..LogQuery::default()
    })
    .await
    .unwrap()
}

async fn taps_are_stored_in_order_at_line_ends(db: Db) {
    let stop = CancellationToken::new();
    let (sink, writer) = LogSink::start(db.clone(), Some(blobs()), config(), stop.clone());
    let tap = sink.tap(Origin::job("acme", 7, 1));
    assert_eq!(tap.write(Stream::Stdout, b"one\ntw"), Written::Kept);
    tap.write(Stream::Stderr, b"oops\n");
    // A whole line is stored without waiting for the rest of the next.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stored = all(&db, "acme").await;
        let texts: Vec<(&str, &str, &str)> = stored
            .iter()
            .map(|c| (c.stream.as_str(), c.level.as_str(), c.text.as_str()))
            .collect();
        if texts.contains(&("stdout", "info", "one\n"))
            && texts.contains(&("stderr", "warn", "oops\n"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{stored:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tap.write(Stream::Stdout, "o\nthree é".as_bytes());
    tap.finish().await;
    // Everything is stored once `finish` returns, the partial line too.
    let stored = all(&db, "acme").await;
    let stdout: String = stored
        .iter()
        .filter(|c| c.stream == "stdout")
        .map(|c| c.text.as_str())
        .collect();
    assert_eq!(stdout, "one\ntwo\nthree é");
    assert!(stored.windows(2).all(|w| w[0].id < w[1].id));
    assert!(stored.iter().all(|c| c.source == "job"
        && c.job_id == Some(7)
        && c.attempt == Some(1)
        && c.node == "node-1"));
    let seqs: Vec<i64> = stored.iter().map(|c| c.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // Another tenant reads none of it.
    assert!(all(&db, "globex").await.is_empty());
    stop.cancel();
    writer.await.unwrap();
}

async fn a_source_keeps_its_cap_and_says_so(db: Db) {
    let stop = CancellationToken::new();
    let config = LogConfig {
        source_bytes_max: 100,
        ..config()
    };
    let (sink, writer) = LogSink::start(db.clone(), None, config, stop.clone());
    let tap = sink.tap(Origin::vm("acme", "vm-1"));
    let line = [b'x'; 59];
    assert_eq!(
        tap.write(Stream::Stdout, &[&line[..], b"\n"].concat()),
        Written::Kept
    );
    assert_eq!(
        tap.write(Stream::Stdout, &[&line[..], b"\n"].concat()),
        Written::Capped
    );
    assert_eq!(tap.write(Stream::Stdout, b"more\n"), Written::Capped);
    assert!(tap.capped());
    tap.finish().await;
    let stored = all(&db, "acme").await;
    let text: String = stored.iter().map(|c| c.text.as_str()).collect();
    assert!(
        text.starts_with(&format!("{}\n{}", "x".repeat(59), "x".repeat(40))),
        "{text}"
    );
    assert!(
        text.ends_with("[kiln: output past 100 bytes is not kept]\n"),
        "{text}"
    );
    assert_eq!(stored.last().unwrap().stream, "log");
    assert!(stored
        .iter()
        .all(|c| c.source == "vm" && c.vm_id.as_deref() == Some("vm-1")));
    stop.cancel();
    writer.await.unwrap();
}

async fn large_output_goes_to_the_blob_store(db: Db) {
    let stop = CancellationToken::new();
    let blobs = blobs();
    let config = LogConfig {
        db_bytes_per_source: 1000,
        tap_buffer_bytes: 64 << 10,
        ..config()
    };
    let (sink, writer) = LogSink::start(db.clone(), Some(blobs.clone()), config, stop.clone());
    let tap = sink.tap(Origin::job("acme", 9, 1));
    let mut expect = String::new();
    for i in 0..20_000 {
        let line = format!("line {i}\n");
        if tap.room() < line.len() {
            tap.wait_room(line.len()).await;
        }
        tap.write(Stream::Stdout, line.as_bytes());
        expect.push_str(&line);
    }
    tap.finish().await;
    let stored = all(&db, "acme").await;
    let mut text = String::new();
    for chunk in &stored {
        text.push_str(&kiln_logs::chunk_text(&blobs, chunk).await);
    }
    let differ = text.bytes().zip(expect.bytes()).position(|(a, b)| a != b);
    assert!(
        text == expect,
        "{} bytes stored of {}; first difference at {differ:?}: {:?}",
        text.len(),
        expect.len(),
        differ.map(|at| &text[at.saturating_sub(20)..(at + 40).min(text.len())])
    );
    let in_db: i64 = stored
        .iter()
        .filter(|c| c.blob_key.is_none())
        .map(|c| c.bytes)
        .sum();
    assert!(in_db < 2000, "{in_db} bytes in rows");
    assert!(stored.iter().any(|c| c.blob_key.is_some()));
    assert!(sink.stats().segments > 0);
    assert_eq!(sink.stats().dropped_bytes, 0);
    // Retention's half: deleting a row hands back its segment's key.
    let (deleted, keys) = db.log_delete_before(i64::MAX, 100_000).await.unwrap();
    assert_eq!(deleted as usize, stored.len());
    assert_eq!(
        keys.len(),
        stored.iter().filter(|c| c.blob_key.is_some()).count()
    );
    kiln_logs::delete_segments(&blobs, &keys).await;
    assert!(!blobs.exists(&keys[0]).await.unwrap());
    stop.cancel();
    writer.await.unwrap();
}

async fn a_stalled_store_costs_a_writer_at_most_the_stall(db: Db) {
    let stop = CancellationToken::new();
    let config = LogConfig {
        tap_buffer_bytes: 1024,
        stall: Duration::from_millis(300),
        ..config()
    };
    let (sink, writer) = LogSink::start(db.clone(), None, config, stop.clone());
    let tap = sink.tap(Origin::job("acme", 3, 1));
    // The store stops answering: every insert fails.
    db.close().await;
    let started = Instant::now();
    let mut written = 0usize;
    while written < 64 << 10 {
        if tap.room() < 128 {
            tap.wait_room(128).await;
        }
        tap.write(Stream::Stdout, &[b'y'; 128]);
        written += 128;
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "the writer waited {took:?}");
    tap.finish().await;
    // Counted once the writer gave up on the store.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.stats().dropped_bytes < (60 << 10) {
        assert!(Instant::now() < deadline, "{:?}", sink.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    writer.await.unwrap();
}

/// A Loki stand-in: records every push; answers 503 while `down`.
#[derive(Clone, Default)]
struct Receiver {
    pushes: Arc<Mutex<Vec<Value>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

async fn receive(
    axum::extract::State(receiver): axum::extract::State<Receiver>,
    axum::Json(body): axum::Json<Value>,
) -> axum::http::StatusCode {
    if receiver.down.load(std::sync::atomic::Ordering::SeqCst) {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
    }
    receiver.pushes.lock().unwrap().push(body);
    axum::http::StatusCode::NO_CONTENT
}

/// Every line Loki got, as (labels, line).
fn received(receiver: &Receiver) -> Vec<(Value, String)> {
    let mut lines = Vec::new();
    for push in receiver.pushes.lock().unwrap().iter() {
        for stream in push["streams"].as_array().unwrap() {
            for value in stream["values"].as_array().unwrap() {
                assert!(value[0].as_str().unwrap().parse::<u128>().is_ok());
                lines.push((
                    stream["stream"].clone(),
                    value[1].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    lines
}

async fn loki_gets_every_line_across_an_outage(db: Db) {
    let receiver = Receiver::default();
    let app = axum::Router::new()
        .route("/loki/api/v1/push", axum::routing::post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let stop = CancellationToken::new();
    let blobs = blobs();
    let (sink, writer) = LogSink::start(db.clone(), Some(blobs.clone()), config(), stop.clone());
    let push = tokio::spawn(kiln_logs::push_loop(
        db.clone(),
        blobs,
        LokiConfig::new(&format!("http://{address}")),
        stop.clone(),
    ));
    let tap = sink.tap(Origin::job("acme", 11, 1));
    tap.write(Stream::Stdout, b"first\n");
    tap.write(Stream::Stderr, b"second\n");
    tap.finish().await;
    let wait_for = |n: usize| {
        let receiver = receiver.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while received(&receiver).len() < n {
                assert!(Instant::now() < deadline, "{:?}", received(&receiver));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(2).await;
    let lines = received(&receiver);
    assert!(
        lines.contains(&(
            serde_json::json!({"tenant": "acme", "source": "job", "job": "11", "level": "info"}),
            "first".to_string()
        )),
        "{lines:?}"
    );
    assert!(lines
        .iter()
        .any(|(labels, line)| labels["level"] == "warn" && line == "second"));
    // Loki goes down; lines written meanwhile arrive once it is back.
    receiver
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let tap = sink.tap(Origin::job("acme", 12, 1));
    tap.write(Stream::Stdout, b"during the outage\n");
    tap.finish().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(received(&receiver).len(), 2);
    receiver
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for(3).await;
    let lines = received(&receiver);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[2].1, "during the outage");
    assert_eq!(lines[2].0["job"], "12");
    // Retention keeps what the cursor has not passed, and then deletes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut deleted = 0;
    while deleted < 3 {
        assert!(Instant::now() < deadline, "{deleted} deleted");
        deleted += db.log_delete_before(i64::MAX, 100).await.unwrap().0;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(deleted, 3);
    stop.cancel();
    writer.await.unwrap();
    push.await.unwrap();
}
