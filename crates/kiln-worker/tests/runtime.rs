//! The worker runtime against both databases: results, retries, timeouts,
//! cancellation, unhandled kinds and graceful shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::{Backoff, Job, JobStatus, NewJob};
use kiln_db::Db;
use kiln_worker::{now_millis, Handlers, NoopHandler, Worker, WorkerConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

kiln_db::on_both_databases!(
    jobs_run_and_record_results,
    failures_retry_with_backoff_then_die,
    timeouts_kill_the_attempt,
    running_jobs_cancel_within_a_second,
    kinds_without_a_handler_stay_queued,
    shutdown_hands_unfinished_jobs_back,
);

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(db: &Db, configure: impl FnOnce(&mut WorkerConfig)) -> Running {
    let mut config = WorkerConfig::new(&kiln_db::testing::unique_name("w"));
    config.poll_every = Duration::from_millis(200);
    configure(&mut config);
    let handlers = Handlers::new().with("noop", Arc::new(NoopHandler));
    let stop = CancellationToken::new();
    let worker = Worker::new(db.clone(), handlers, config);
    let task = tokio::spawn(worker.run(stop.clone()));
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("worker stops")
            .unwrap();
    }
}

async fn submit(db: &Db, spec: serde_json::Value, edit: impl FnOnce(&mut NewJob)) -> i64 {
    let mut job = NewJob::new("acme", "noop", spec);
    edit(&mut job);
    db.job_insert(&job, now_millis()).await.unwrap().0.id
}

async fn wait_for(db: &Db, id: i64, done: impl Fn(&Job) -> bool) -> Job {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job = db.job_get("acme", id).await.unwrap().unwrap();
        if done(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} stuck in {:?}",
            job.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn terminal(job: &Job) -> bool {
    job.status.is_terminal()
}

async fn jobs_run_and_record_results(db: Db) {
    let worker = start(&db, |_| {});
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(submit(&db, json!({"stdout": format!("hello {i}")}), |_| {}).await);
    }
    for (i, id) in ids.iter().enumerate() {
        let job = wait_for(&db, *id, terminal).await;
        assert_eq!(job.status, JobStatus::Succeeded);
        let result = job.result.unwrap();
        assert_eq!(result.stdout, format!("hello {i}"));
        assert_eq!(job.history.len(), 1);
        assert_eq!(job.history[0].outcome, "succeeded");
        assert!(job.finished_at.is_some());
    }
    worker.stop().await;
}

async fn failures_retry_with_backoff_then_die(db: Db) {
    let worker = start(&db, |_| {});
    let id = submit(&db, json!({"exit_code": 3}), |job| {
        job.max_attempts = 3;
        job.backoff = Backoff {
            base_ms: 100,
            max_ms: 1_000,
            jitter: false,
        };
    })
    .await;
    let permanent = submit(&db, json!({"exit_code": 4}), |job| {
        job.max_attempts = 3;
        job.permanent_exit_codes = vec![4];
    })
    .await;
    let job = wait_for(&db, id, terminal).await;
    assert_eq!(job.status, JobStatus::Dead);
    assert_eq!(job.attempt, 3);
    assert_eq!(job.result.unwrap().exit_code, 3);
    let gaps: Vec<i64> = job
        .history
        .windows(2)
        .map(|w| w[1].started_at.unwrap() - w[0].finished_at)
        .collect();
    assert!(
        gaps[0] >= 100 && gaps[1] >= 200,
        "backoff doubles: {gaps:?}"
    );
    let permanent = wait_for(&db, permanent, terminal).await;
    assert_eq!(permanent.status, JobStatus::Failed);
    assert_eq!(permanent.attempt, 1);
    worker.stop().await;
}

async fn timeouts_kill_the_attempt(db: Db) {
    let worker = start(&db, |_| {});
    let submitted = Instant::now();
    let id = submit(&db, json!({"sleep_ms": 60_000}), |job| {
        job.timeout_ms = 300;
        job.max_attempts = 1;
    })
    .await;
    let job = wait_for(&db, id, terminal).await;
    assert!(submitted.elapsed() < Duration::from_secs(5));
    assert_eq!(job.status, JobStatus::Dead);
    assert_eq!(job.error.as_deref(), Some("timeout"));
    assert_eq!(job.history[0].outcome, "timeout");
    worker.stop().await;
}

async fn running_jobs_cancel_within_a_second(db: Db) {
    let worker = start(&db, |_| {});
    let id = submit(&db, json!({"sleep_ms": 60_000}), |_| {}).await;
    wait_for(&db, id, |j| j.status == JobStatus::Running).await;
    let asked = Instant::now();
    db.job_cancel("acme", id, now_millis()).await.unwrap();
    let job = wait_for(&db, id, terminal).await;
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(job.status, JobStatus::Cancelled);
    worker.stop().await;
}

async fn kinds_without_a_handler_stay_queued(db: Db) {
    let worker = start(&db, |_| {});
    let orphan = db
        .job_insert(&NewJob::new("acme", "quantum", json!({})), now_millis())
        .await
        .unwrap()
        .0
        .id;
    let id = submit(&db, json!({}), |_| {}).await;
    wait_for(&db, id, terminal).await;
    let job = db.job_get("acme", orphan).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempt, 0);
    worker.stop().await;
}

async fn shutdown_hands_unfinished_jobs_back(db: Db) {
    let worker = start(&db, |config| {
        config.shutdown_grace = Duration::from_millis(200)
    });
    let id = submit(&db, json!({"sleep_ms": 60_000}), |job| job.max_attempts = 1).await;
    wait_for(&db, id, |j| j.status == JobStatus::Running).await;
    worker.stop().await;
    let job = db.job_get("acme", id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(
        job.attempt - job.retry_from,
        0,
        "the hand-back cost no attempt"
    );
    // A new worker picks it up and the job keeps its single attempt.
    let next = start(&db, |_| {});
    wait_for(&db, id, |j| j.status == JobStatus::Running).await;
    db.job_cancel("acme", id, now_millis()).await.unwrap();
    wait_for(&db, id, terminal).await;
    next.stop().await;
}
