//! The worker runtime against both databases: results, retries, timeouts,
//! cancellation, unhandled kinds, graceful shutdown, handler panics and
//! retention; and on PostgreSQL, leases kept alive while a slow database
//! writes results.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::{AttemptEnd, LeasedJob};
use kiln_core::{Backoff, Job, JobStatus, NewJob};
use kiln_db::Db;
use kiln_worker::{now_millis, Handlers, JobHandler, NoopHandler, Retention, Worker, WorkerConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

kiln_db::on_both_databases!(
    jobs_run_and_record_results,
    failures_retry_with_backoff_then_die,
    timeouts_kill_the_attempt,
    running_jobs_are_cancelled,
    kinds_without_a_handler_stay_queued,
    shutdown_hands_unfinished_jobs_back,
    a_panicking_handler_fails_its_attempt_and_frees_the_lease,
    retention_keeps_recent_and_unfinished_jobs,
    retention_deletes_old_log_chunks_and_their_segments,
);

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A handler that panics, as a buggy sandbox might.
struct Panics;

#[async_trait::async_trait]
impl JobHandler for Panics {
    async fn run(&self, _job: &LeasedJob, _kill: CancellationToken) -> AttemptEnd {
        panic!("the sandbox fell over")
    }
}

fn start(db: &Db, configure: impl FnOnce(&mut WorkerConfig)) -> Running {
    let mut config = WorkerConfig::new(&kiln_db::testing::unique_name("w"));
    config.poll_every = Duration::from_millis(200);
    configure(&mut config);
    let handlers = Handlers::new()
        .with("noop", Arc::new(NoopHandler))
        .with("panics", Arc::new(Panics));
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

async fn running_jobs_are_cancelled(db: Db) {
    let worker = start(&db, |_| {});
    // The job would sleep far past the test's hang guard: only the cancel
    // can end it.
    let id = submit(&db, json!({"sleep_ms": 3_600_000}), |job| {
        job.timeout_ms = 3_600_000
    })
    .await;
    wait_for(&db, id, |j| j.status == JobStatus::Running).await;
    db.job_cancel("acme", id, now_millis()).await.unwrap();
    let job = wait_for(&db, id, terminal).await;
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.history.len(), 1);
    assert_eq!(job.history[0].outcome, "cancelled");
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
    let running = wait_for(&db, id, |j| j.status == JobStatus::Running).await;
    assert_eq!((running.attempt, running.retry_from), (2, 1));
    assert_eq!(
        running.attempt - running.retry_from,
        1,
        "this is its one attempt"
    );
    db.job_cancel("acme", id, now_millis()).await.unwrap();
    let job = wait_for(&db, id, terminal).await;
    assert_eq!(job.status, JobStatus::Cancelled);
    next.stop().await;
}

async fn a_panicking_handler_fails_its_attempt_and_frees_the_lease(db: Db) {
    let worker = start(&db, |config| config.slots = 1);
    let panics = db
        .job_insert(
            &{
                let mut job = NewJob::new("acme", "panics", json!({}));
                job.max_attempts = 2;
                job.backoff = Backoff {
                    base_ms: 10,
                    max_ms: 10,
                    jitter: false,
                };
                job
            },
            now_millis(),
        )
        .await
        .unwrap()
        .0
        .id;
    let job = wait_for(&db, panics, terminal).await;
    assert_eq!(job.status, JobStatus::Dead);
    assert_eq!(job.attempt, 2);
    assert!(job.lease_expires_at.is_none());
    for attempt in &job.history {
        assert_eq!(attempt.outcome, "failed");
        assert!(
            attempt
                .error
                .as_deref()
                .unwrap()
                .contains("the sandbox fell over"),
            "{attempt:?}"
        );
    }
    // With its only slot freed and no lease kept alive, the worker runs
    // the next job.
    let next = submit(&db, json!({"stdout": "after"}), |_| {}).await;
    let next = wait_for(&db, next, terminal).await;
    assert_eq!(next.status, JobStatus::Succeeded);
    worker.stop().await;
}

async fn retention_keeps_recent_and_unfinished_jobs(db: Db) {
    let worker = start(&db, |_| {});
    let mut finished = Vec::new();
    for i in 0..5 {
        finished.push(submit(&db, json!({"stdout": format!("{i}")}), |_| {}).await);
    }
    for id in &finished {
        wait_for(&db, *id, terminal).await;
    }
    worker.stop().await;
    let waiting = submit(&db, json!({}), |_| {}).await;
    let retention = Retention {
        finished_jobs: Duration::from_secs(3600),
        events: Duration::from_secs(3600),
        batch: 2,
        ..Retention::default()
    };
    // Five jobs' lives (queued, started, succeeded) and one queued job.
    let all_events = kiln_db::events::EventQuery {
        tenant: Some("acme"),
        limit: 1000,
        ..Default::default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while db.event_read(&all_events).await.unwrap().len() < 16 {
        assert!(
            std::time::Instant::now() < deadline,
            "events never numbered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop = CancellationToken::new();
    // An hour from now, nothing has been finished for an hour yet.
    let now = now_millis();
    // A VM execution goes with the jobs of its time.
    let run = kiln_db::executions::ExecutionStart {
        tenant: "acme".into(),
        vm_id: "vm1".into(),
        source: "api".into(),
        actor: "key".into(),
        command: "true".into(),
        started_at: now,
        ..Default::default()
    };
    db.execution_start(&run).await.unwrap();
    let pass = kiln_worker::collect_garbage(&db, &retention, now, &stop)
        .await
        .unwrap();
    assert_eq!((pass.jobs, pass.events, pass.executions), (0, 0, 0));
    let later = now + 3_600_000 + 60_000;
    let pass = kiln_worker::collect_garbage(&db, &retention, later, &stop)
        .await
        .unwrap();
    // PostgreSQL keeps the newest event: its sequencer numbers on from it.
    let kept = usize::from(db.backend() == "postgres");
    assert_eq!((pass.jobs, pass.batches), (5, 3));
    assert_eq!(pass.executions, 1);
    assert!(db
        .execution_list("acme", "vm1", None, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(pass.events as usize, 16 - kept);
    assert_eq!(db.event_read(&all_events).await.unwrap().len(), kept);
    for id in finished {
        assert!(db.job_get("acme", id).await.unwrap().is_none());
    }
    assert!(db.job_get("acme", waiting).await.unwrap().is_some());
}

/// A result write the database makes slow (a trigger sleeps on it) must not
/// let the leases of jobs that finish meanwhile lapse: they stay in the
/// heartbeat until their own results are written. Without that, the rescuer
/// takes them back and they run a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_outlive_a_slow_result_write() {
    let db = kiln_db::testing::postgres_schema().await;
    kiln_db::testing::execute(
        &db,
        "CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           PERFORM pg_sleep(6); RETURN NEW; END $$; \
         CREATE TRIGGER slow_write BEFORE UPDATE ON jobs FOR EACH ROW \
           WHEN (OLD.status = 'running' AND NEW.status <> 'running' AND NEW.spec LIKE '%slow%') \
           EXECUTE FUNCTION slow_write();",
    )
    .await
    .unwrap();
    let worker = start(&db, |config| {
        config.lease = Duration::from_secs(2);
        config.heartbeat_every = Duration::from_millis(100);
        config.rescue_every = Some(Duration::from_millis(100));
    });
    let slow = submit(&db, json!({"stdout": "slow"}), |_| {}).await;
    // Finishes while the slow result is being written, and waits behind it.
    let behind = submit(&db, json!({"sleep_ms": 500, "stdout": "behind"}), |_| {}).await;
    let slow = wait_for(&db, slow, terminal).await;
    assert_eq!(slow.status, JobStatus::Succeeded);
    let behind = wait_for(&db, behind, terminal).await;
    assert_eq!(behind.status, JobStatus::Succeeded);
    let outcomes: Vec<_> = behind.history.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["succeeded"], "the lease never lapsed");
    assert_eq!(behind.attempt, 1);
    worker.stop().await;
}

/// Live logs past `--log-retention-hours` go, their blob segments with
/// them; newer chunks stay.
async fn retention_deletes_old_log_chunks_and_their_segments(db: Db) {
    let dir = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-gc-logs"));
    let blobs = kiln_blob::BlobStore::local(&dir).unwrap();
    let now = now_millis();
    let hour = 3_600_000;
    let chunk = |seq: i64, ts: i64, blob_key: Option<&str>| kiln_db::logs::NewLogChunk {
        tenant: "acme".into(),
        source: "job".into(),
        job_id: Some(1),
        node: "n".into(),
        stream: "stdout".into(),
        seq,
        level: "info".into(),
        ts,
        bytes: 5,
        text: if blob_key.is_some() {
            String::new()
        } else {
            "line\n".into()
        },
        blob_key: blob_key.map(str::to_string),
        ..Default::default()
    };
    blobs
        .put("logs/acme/old/2", bytes::Bytes::from_static(b"old segment"))
        .await
        .unwrap();
    db.log_insert(&[
        chunk(1, now - 5 * hour, None),
        chunk(2, now - 5 * hour, Some("logs/acme/old/2")),
        chunk(3, now - 5 * hour, None),
        chunk(4, now - hour / 2, None),
    ])
    .await
    .unwrap();
    let retention = Retention {
        logs: Duration::from_secs(3600),
        log_blobs: Some(blobs.clone()),
        batch: 2,
        ..Retention::default()
    };
    let pass = kiln_worker::collect_garbage(&db, &retention, now, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(pass.log_chunks, 3);
    let left = db
        .log_read(&kiln_db::logs::LogQuery {
            tenant: Some("acme"),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(left.iter().map(|c| c.seq).collect::<Vec<_>>(), [4]);
    assert!(!blobs.exists("logs/acme/old/2").await.unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}
