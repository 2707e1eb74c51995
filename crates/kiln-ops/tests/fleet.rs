//! The fleet on both databases, with real workers running real jobs: a node
//! registers with load from this host's `/proc`, a silent node is marked
//! lost and its job runs on another worker, it comes back online, and a
//! drain stops a worker's leasing while its running job finishes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{JobStatus, NewJob};
use kiln_db::events::EventQuery;
use kiln_db::nodes::{NodeInfo, NodeStatus};
use kiln_db::{on_both_databases, Db};
use kiln_ops::{DetectorConfig, NodeConfig, DEPLOYMENT_TENANT};
use kiln_worker::{now_millis, Handlers, NoopHandler, Worker, WorkerConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const BEAT: Duration = Duration::from_millis(100);

/// Polls `probe` until it answers, for at most 30 s.
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn node_in(db: &Db, id: &str, status: NodeStatus) -> NodeInfo {
    eventually(&format!("node {id} {}", status.as_str()), || async {
        db.node_get(id)
            .await
            .unwrap()
            .filter(|n| n.status == status)
    })
    .await
}

/// The types of the node's events, once `want` is among them (PostgreSQL
/// numbers events a moment after they commit).
async fn node_events(db: &Db, id: &str, want: &str) -> Vec<String> {
    eventually(&format!("{want} of {id}"), || async {
        let events = db
            .event_read(&EventQuery {
                tenant: Some(DEPLOYMENT_TENANT),
                types: &[],
                resource: Some(("node", id)),
                after: 0,
                limit: 1000,
            })
            .await
            .unwrap();
        let types: Vec<String> = events.into_iter().map(|e| e.kind).collect();
        types.iter().any(|t| t == want).then_some(types)
    })
    .await
}

async fn job_in(db: &Db, id: i64, status: JobStatus) -> kiln_core::Job {
    eventually(&format!("job {id} {status:?}"), || async {
        db.job_get("acme", id)
            .await
            .unwrap()
            .filter(|j| j.status == status)
    })
    .await
}

async fn noop_job(db: &Db, sleep_ms: u64) -> i64 {
    db.job_insert(
        &NewJob::new("acme", "noop", json!({"sleep_ms": sleep_ms})),
        now_millis(),
    )
    .await
    .unwrap()
    .0
    .id
}

/// A worker and the heartbeat of its node, both running until `stop`.
fn start_node(db: &Db, id: &str, stop: &CancellationToken) -> kiln_worker::WorkerControl {
    let mut config = WorkerConfig::new(id);
    config.slots = 4;
    config.lease = Duration::from_millis(1_500);
    config.heartbeat_every = Duration::from_millis(200);
    config.poll_every = Duration::from_millis(100);
    config.rescue_every = Some(Duration::from_millis(200));
    let worker = Worker::new(
        db.clone(),
        Handlers::new().with("noop", Arc::new(NoopHandler)),
        config,
    );
    let control = worker.control();
    let mut node = NodeConfig::new(id, &["worker"]);
    node.heartbeat_every = BEAT;
    node.worker = Some(control.clone());
    tokio::spawn(kiln_ops::heartbeat_loop(db.clone(), node, stop.clone()));
    tokio::spawn(worker.run(stop.clone()));
    control
}

async fn a_node_registers_and_heartbeats_with_load_from_proc(db: Db) {
    let stop = CancellationToken::new();
    let worker = Worker::new(
        db.clone(),
        Handlers::new().with("noop", Arc::new(NoopHandler)),
        WorkerConfig {
            slots: 3,
            ..WorkerConfig::new("n1")
        },
    );
    let mut config = NodeConfig::new("n1", &["api", "worker", "scheduler"]);
    config.heartbeat_every = BEAT;
    config.worker = Some(worker.control());
    config.accelerator = Some("tcg".into());
    config.vms_live = Some(Arc::new(|| 2));
    let beating = tokio::spawn(kiln_ops::heartbeat_loop(db.clone(), config, stop.clone()));
    let running = tokio::spawn(worker.run(stop.clone()));
    let job = noop_job(&db, 3_000).await;
    job_in(&db, job, JobStatus::Running).await;

    // The second beat has a CPU figure; the job holds one of three slots.
    let node = eventually("a node with every figure", || async {
        db.node_get("n1")
            .await
            .unwrap()
            .filter(|n| n.report.load.cpu.is_some() && n.report.slots_used == 1)
    })
    .await;
    let r = &node.report;
    assert_eq!(node.status, NodeStatus::Online);
    assert!(!node.drain);
    assert_eq!(r.roles, ["api", "worker", "scheduler"]);
    assert_eq!(r.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(r.kinds, ["noop"]);
    assert_eq!((r.slots_used, r.slots_total), (1, 3));
    assert_eq!(r.accelerator.as_deref(), Some("tcg"));
    assert_eq!(r.vms_live, 2);
    assert_eq!(r.host, kiln_worker::hostname());
    let load = &r.load;
    assert!(
        load.cpu.is_some_and(|c| (0.0..=1.0).contains(&c)),
        "{load:?}"
    );
    assert!(load.load1.is_some_and(|l| l >= 0.0), "{load:?}");
    assert!(
        load.mem_used.is_some_and(|m| m > 0.0 && m <= 1.0),
        "{load:?}"
    );
    assert!(
        load.mem_total_bytes.is_some_and(|m| m > 1 << 20),
        "{load:?}"
    );
    assert!(node.last_seen >= r.started_at && node.lost_at.is_none());

    let detail = eventually("a load series", || async {
        kiln_ops::get(&db, "n1")
            .await
            .unwrap()
            .filter(|d| d.load.len() >= 3)
    })
    .await;
    assert!(
        detail.load.windows(2).all(|w| w[0].time < w[1].time),
        "oldest first"
    );
    assert!(detail
        .load
        .iter()
        .any(|p| p.slots_used == 1 && p.vms_live == 2));
    assert!(detail
        .load
        .iter()
        .filter_map(|p| p.mem_used)
        .all(|m| m > 0.0 && m <= 1.0));
    assert_eq!(
        kiln_ops::list(&db, Some(NodeStatus::Online))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(kiln_ops::list(&db, Some(NodeStatus::Lost))
        .await
        .unwrap()
        .is_empty());
    assert!(kiln_ops::get(&db, "nobody").await.unwrap().is_none());
    assert_eq!(
        node_events(&db, "n1", "node.registered").await,
        ["node.registered"]
    );

    // Stopping gracefully removes the node, with its series.
    stop.cancel();
    beating.await.unwrap();
    running.await.unwrap();
    assert!(db.node_get("n1").await.unwrap().is_none());
    assert!(db.node_load_series("n1", 0).await.unwrap().is_empty());
    assert_eq!(
        node_events(&db, "n1", "node.stopped").await,
        ["node.registered", "node.stopped"]
    );
}

/// A node that leased a job and went silent (a killed process looks like
/// this to the database: its rows stop moving) is marked lost; its job runs
/// on another worker once the lease expires; it comes back online when it
/// heartbeats again, still draining if it was asked to drain meanwhile.
async fn a_silent_node_is_lost_its_job_runs_elsewhere_and_it_returns(db: Db) {
    let stop = CancellationToken::new();
    let mut silent = NodeConfig::new("silent", &["worker"]);
    silent.heartbeat_every = BEAT;
    let once = CancellationToken::new();
    let beat_once = tokio::spawn(kiln_ops::heartbeat_loop(
        db.clone(),
        silent.clone(),
        once.clone(),
    ));
    node_in(&db, "silent", NodeStatus::Online).await;
    let job = noop_job(&db, 0).await;
    let leased = db
        .job_lease("silent", &["noop".to_string()], 1, 1_500, now_millis())
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    // Silence without the graceful stop's delete: the task is aborted.
    beat_once.abort();
    let _ = beat_once.await;

    let detector = DetectorConfig {
        deadline: Duration::from_millis(1_000),
        every: Duration::from_millis(100),
        ..DetectorConfig::default()
    };
    tokio::spawn(kiln_ops::detector_loop(db.clone(), detector, stop.clone()));
    start_node(&db, "healthy", &stop);

    let lost = node_in(&db, "silent", NodeStatus::Lost).await;
    assert!(lost.lost_at.is_some_and(|at| at >= lost.last_seen));
    assert_eq!(
        node_events(&db, "silent", "node.lost").await,
        ["node.registered", "node.lost"]
    );
    let done = job_in(&db, job, JobStatus::Succeeded).await;
    assert_eq!(done.attempt, 2, "{done:?}");
    assert_eq!(done.history[0].outcome, "lost");
    assert_eq!(done.history[0].worker_id.as_deref(), Some("silent"));
    assert_eq!(done.history[1].worker_id.as_deref(), Some("healthy"));
    // The healthy node stayed online throughout.
    let healthy = db.node_get("healthy").await.unwrap().unwrap();
    assert_eq!(healthy.status, NodeStatus::Online);
    let listed: Vec<String> = kiln_ops::list(&db, Some(NodeStatus::Lost))
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.report.id)
        .collect();
    assert_eq!(listed, ["silent"]);

    // Drained while away: it stays lost, and returns draining.
    let drained = kiln_ops::drain(&db, "silent").await.unwrap().unwrap();
    assert_eq!((drained.status, drained.drain), (NodeStatus::Lost, true));
    let back = tokio::spawn(kiln_ops::heartbeat_loop(db.clone(), silent, stop.clone()));
    let returned = node_in(&db, "silent", NodeStatus::Draining).await;
    assert!(returned.lost_at.is_none());
    assert_eq!(
        node_events(&db, "silent", "node.online").await,
        [
            "node.registered",
            "node.lost",
            "node.draining",
            "node.online"
        ]
    );
    kiln_ops::resume(&db, "silent").await.unwrap().unwrap();
    node_in(&db, "silent", NodeStatus::Online).await;
    stop.cancel();
    back.await.unwrap();
}

async fn a_drained_worker_leases_nothing_new_and_finishes_its_job(db: Db) {
    let stop = CancellationToken::new();
    let control = start_node(&db, "w", &stop);
    node_in(&db, "w", NodeStatus::Online).await;
    let long = noop_job(&db, 1_500).await;
    job_in(&db, long, JobStatus::Running).await;

    let node = kiln_ops::drain(&db, "w").await.unwrap().unwrap();
    assert_eq!((node.status, node.drain), (NodeStatus::Draining, true));
    eventually("the worker to learn of the drain", || async {
        control.is_draining().then_some(())
    })
    .await;
    let waiting = noop_job(&db, 0).await;
    let finished = job_in(&db, long, JobStatus::Succeeded).await;
    assert_eq!(finished.attempt, 1, "the running job was not disturbed");
    // Several heartbeats and polls later, the new job is still waiting, and
    // heartbeats keep the node draining.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let still = db.job_get("acme", waiting).await.unwrap().unwrap();
    assert_eq!(still.status, JobStatus::Queued, "{still:?}");
    assert_eq!(
        db.node_get("w").await.unwrap().unwrap().status,
        NodeStatus::Draining
    );
    // Asking again changes nothing.
    kiln_ops::drain(&db, "w").await.unwrap().unwrap();

    let node = kiln_ops::resume(&db, "w").await.unwrap().unwrap();
    assert_eq!((node.status, node.drain), (NodeStatus::Online, false));
    job_in(&db, waiting, JobStatus::Succeeded).await;
    assert!(!control.is_draining());
    assert_eq!(
        node_events(&db, "w", "node.resumed").await,
        ["node.registered", "node.draining", "node.resumed"]
    );
    assert!(kiln_ops::drain(&db, "nobody").await.unwrap().is_none());
    assert!(kiln_ops::resume(&db, "nobody").await.unwrap().is_none());
    stop.cancel();
}

/// Retention keeps the series to its window and forgets nodes long lost,
/// without a `node.stopped` for them (they said `node.lost` already).
async fn retention_bounds_the_series_and_forgets_long_lost_nodes(db: Db) {
    let hour = 3_600_000;
    let t0 = now_millis() - 10 * hour;
    let report = kiln_db::nodes::NodeReport {
        id: "old".into(),
        host: "h".into(),
        roles: vec!["api".into()],
        version: "0".into(),
        kinds: vec![],
        slots_used: 0,
        slots_total: 0,
        accelerator: None,
        vms_live: 0,
        load: Default::default(),
        started_at: t0,
    };
    for i in 0..5 {
        // Each beat keeps the last two minutes of its own series.
        db.node_heartbeat(&report, t0 + i * 60_000, t0 + i * 60_000 - 120_000)
            .await
            .unwrap();
    }
    let kept = db.node_load_series("old", 0).await.unwrap();
    let times: Vec<i64> = kept.iter().map(|p| p.time - t0).collect();
    assert_eq!(times, [120_000, 180_000, 240_000]);
    assert!(kept.iter().all(|p| p.cpu.is_none() && p.load1.is_none()));

    let config = DetectorConfig {
        forget_after: Duration::from_secs(3600),
        ..DetectorConfig::default()
    };
    let now = now_millis();
    assert_eq!(
        kiln_ops::detect_lost(&db, &config, now - 2 * hour)
            .await
            .unwrap(),
        ["old"]
    );
    // Lost, so the detector's pass deleted the series outside the window.
    assert!(db.node_load_series("old", 0).await.unwrap().is_empty());
    assert!(kiln_ops::detect_lost(&db, &config, now - 2 * hour)
        .await
        .unwrap()
        .is_empty());
    assert!(db.node_get("old").await.unwrap().is_some(), "kept an hour");
    kiln_ops::detect_lost(&db, &config, now).await.unwrap();
    assert!(db.node_get("old").await.unwrap().is_none(), "forgotten");
    // A marker written after the delete: once it is readable, so is
    // anything the delete wrote before it.
    db.event_append(
        DEPLOYMENT_TENANT,
        "test.marker",
        ("node", "old"),
        &Default::default(),
        &json!({}),
        now,
    )
    .await
    .unwrap();
    let types = node_events(&db, "old", "test.marker").await;
    assert_eq!(types, ["node.registered", "node.lost", "test.marker"]);
}

on_both_databases!(
    a_node_registers_and_heartbeats_with_load_from_proc,
    a_silent_node_is_lost_its_job_runs_elsewhere_and_it_returns,
    a_drained_worker_leases_nothing_new_and_finishes_its_job,
    retention_bounds_the_series_and_forgets_long_lost_nodes,
);
