//! The NATS bridge against a real `nats-server` with JetStream, started by
//! the test on a port of its own so it can be killed and started again.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use kiln_core::NewJob;
use kiln_db::events::EventQuery;
use kiln_db::Db;
use serde_json::json;
use tokio_util::sync::CancellationToken;

kiln_db::on_both_databases!(a_nats_outage_loses_and_duplicates_nothing);

struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Server {
    async fn start(port: u16, dir: PathBuf) -> Server {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (from Debian's nats-server package; .ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Server { child, port, dir }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(mut self) -> (u16, PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.port, self.dir.clone())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn insert(db: &Db, n: usize) {
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob::new("acme", "noop", json!({"i": i})))
        .collect();
    db.job_insert_many(&jobs, now()).await.unwrap();
}

/// Waits until the stream holds `n` messages; returns their Nats-Msg-Ids
/// in stream order.
async fn stream_ids(url: &str, n: u64) -> Vec<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(client) = async_nats::connect(url).await {
            let js = jetstream::new(client);
            if let Ok(mut stream) = js.get_stream(kiln_events::nats::STREAM).await {
                let messages = stream.info().await.map(|i| i.state.messages).unwrap_or(0);
                assert!(messages <= n, "{messages} messages, more than {n}");
                if messages == n {
                    let mut ids = Vec::new();
                    for seq in 1..=n {
                        let message = stream.get_raw_message(seq).await.unwrap();
                        let id = message
                            .headers
                            .get(async_nats::header::NATS_MESSAGE_ID)
                            .map(|v| v.as_str().parse::<i64>().unwrap())
                            .unwrap();
                        assert!(message.subject.starts_with("kiln.events.acme.job."));
                        ids.push(id);
                    }
                    return ids;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the stream never held {n} messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn log_ids(db: &Db) -> Vec<i64> {
    db.event_read(&EventQuery {
        limit: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .iter()
    .map(|e| e.id)
    .collect()
}

async fn a_nats_outage_loses_and_duplicates_nothing(db: Db) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-nats"));
    let server = Server::start(port, dir).await;
    let url = server.url();
    insert(&db, 50).await;
    let stop = CancellationToken::new();
    let bridge = tokio::spawn(kiln_events::nats::bridge(
        db.clone(),
        url.clone(),
        stop.clone(),
    ));
    stream_ids(&url, 50).await;

    // NATS goes away while jobs keep coming, then comes back.
    let (port, dir) = server.kill();
    insert(&db, 100).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = Server::start(port, dir).await;
    let ids = stream_ids(&url, 150).await;
    assert_eq!(ids, log_ids(&db).await, "every event once, in order");

    // The bridge restarts (as kiln does) and resumes from its cursor.
    stop.cancel();
    bridge.await.unwrap();
    let stop = CancellationToken::new();
    let bridge = tokio::spawn(kiln_events::nats::bridge(
        db.clone(),
        url.clone(),
        stop.clone(),
    ));
    insert(&db, 10).await;
    let ids = stream_ids(&url, 160).await;
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 160);
    assert_eq!(ids, log_ids(&db).await);
    assert_eq!(
        db.event_cursor(kiln_events::nats::CURSOR).await.unwrap(),
        ids[159]
    );
    stop.cancel();
    bridge.await.unwrap();
    let dir = server.dir.clone();
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}
