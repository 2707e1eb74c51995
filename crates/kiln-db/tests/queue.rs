//! The queue test suite. Every test runs against SQLite and PostgreSQL; each
//! PostgreSQL test gets its own schema, each SQLite test its own file, so
//! they run in parallel.

use std::collections::{BTreeMap, HashSet};

use kiln_core::{AttemptRecord, JobResult, JobStatus, NewJob, Priority};
use kiln_db::{CancelOutcome, Completion, Db, JobFilter, QueueInfo, RetryOutcome};
use serde_json::json;

const T0: i64 = 1_700_000_000_000;
const LEASE: i64 = 30_000;

kiln_db::on_both_databases!(
    insert_get_and_tenant_isolation,
    priorities_are_strict_and_fifo_within,
    idempotency_key_returns_the_same_job,
    delayed_jobs_wait_for_run_at,
    unhandled_kinds_stay_queued,
    fencing_rejects_stale_completions,
    expired_leases_are_rescued_then_dead,
    retry_waits_for_backoff,
    paused_queues_are_skipped,
    concurrency_limit_caps_running_jobs,
    cancel_queued_and_running,
    dead_jobs_retry_by_hand,
    list_filters_and_pages,
    concurrent_leasers_never_share_a_job,
    heartbeat_extends_the_lease,
    release_hands_back_without_spending_an_attempt,
    keys_are_found_by_hash_until_revoked,
);

fn job(kind: &str) -> NewJob {
    NewJob::new("acme", kind, json!({"n": 1}))
}

fn kinds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn done(id: i64, attempt: i32, status: JobStatus, now: i64) -> Completion {
    Completion {
        id,
        attempt,
        status,
        run_at: None,
        result: Some(JobResult {
            exit_code: 0,
            stdout: "ok".into(),
            ..JobResult::default()
        }),
        error: None,
        record: AttemptRecord {
            attempt,
            worker_id: Some("w1".into()),
            started_at: Some(now - 1),
            finished_at: now,
            outcome: status.as_str().into(),
            exit_code: Some(0),
            error: None,
            duration_ms: Some(1),
        },
    }
}

async fn lease(db: &Db, n: i64, now: i64) -> Vec<kiln_core::LeasedJob> {
    db.job_lease("w1", &kinds(&["noop"]), n, LEASE, now)
        .await
        .unwrap()
}

async fn insert_get_and_tenant_isolation(db: Db) {
    let mut new = job("noop");
    new.labels = BTreeMap::from([("team".to_string(), "red".to_string())]);
    let (created, fresh) = db.job_insert(&new, T0).await.unwrap();
    assert!(fresh);
    assert_eq!(created.status, JobStatus::Queued);
    assert_eq!(created.attempt, 0);
    let got = db.job_get("acme", created.id).await.unwrap().unwrap();
    assert_eq!(got, created);
    assert_eq!(got.labels["team"], "red");
    assert_eq!(got.spec, json!({"n": 1}));
    assert!(db.job_get("other", created.id).await.unwrap().is_none());
    assert!(db
        .job_get("acme", created.id + 1000)
        .await
        .unwrap()
        .is_none());
}

async fn priorities_are_strict_and_fifo_within(db: Db) {
    let mut ids = BTreeMap::new();
    for (i, priority) in [
        Priority::Low,
        Priority::Default,
        Priority::Critical,
        Priority::High,
        Priority::Critical,
        Priority::Low,
    ]
    .into_iter()
    .enumerate()
    {
        let mut new = job("noop");
        new.priority = priority;
        let (created, _) = db.job_insert(&new, T0 + i as i64).await.unwrap();
        ids.insert(created.id, (priority, i));
    }
    let mut order = Vec::new();
    for _ in 0..6 {
        let got = lease(&db, 1, T0 + 100).await;
        assert_eq!(got.len(), 1);
        order.push(ids[&got[0].id]);
    }
    let expect = vec![
        (Priority::Critical, 2),
        (Priority::Critical, 4),
        (Priority::High, 3),
        (Priority::Default, 1),
        (Priority::Low, 0),
        (Priority::Low, 5),
    ];
    assert_eq!(order, expect);
    assert!(lease(&db, 1, T0 + 100).await.is_empty());
}

async fn idempotency_key_returns_the_same_job(db: Db) {
    let mut new = job("noop");
    new.idempotency_key = Some("order-17".into());
    let (first, created) = db.job_insert(&new, T0).await.unwrap();
    assert!(created);
    let (second, created) = db.job_insert(&new, T0 + 5).await.unwrap();
    assert!(!created);
    assert_eq!(first.id, second.id);
    // The same key in another tenant is another job.
    new.tenant = "globex".into();
    let (third, created) = db.job_insert(&new, T0).await.unwrap();
    assert!(created);
    assert_ne!(third.id, first.id);
    let counts = db.job_count_by_status(Some("acme")).await.unwrap();
    assert_eq!(counts.get("queued"), Some(&1));
}

async fn delayed_jobs_wait_for_run_at(db: Db) {
    let mut new = job("noop");
    new.run_at = Some(T0 + 5_000);
    let (created, _) = db.job_insert(&new, T0).await.unwrap();
    assert_eq!(created.status, JobStatus::Scheduled);
    assert_eq!(created.visible_status(T0), JobStatus::Scheduled);
    assert_eq!(created.visible_status(T0 + 5_000), JobStatus::Queued);
    assert!(lease(&db, 10, T0 + 4_999).await.is_empty());
    assert_eq!(
        db.job_next_run_at(&kinds(&["noop"])).await.unwrap(),
        Some(T0 + 5_000)
    );
    let got = lease(&db, 10, T0 + 5_000).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, created.id);
}

async fn unhandled_kinds_stay_queued(db: Db) {
    let (other, _) = db.job_insert(&job("mystery"), T0).await.unwrap();
    let (mine, _) = db.job_insert(&job("noop"), T0 + 1).await.unwrap();
    let got = lease(&db, 10, T0 + 10).await;
    assert_eq!(got.iter().map(|j| j.id).collect::<Vec<_>>(), vec![mine.id]);
    let still = db.job_get("acme", other.id).await.unwrap().unwrap();
    assert_eq!(still.status, JobStatus::Queued);
}

async fn fencing_rejects_stale_completions(db: Db) {
    let mut new = job("noop");
    new.max_attempts = 5;
    let (created, _) = db.job_insert(&new, T0).await.unwrap();
    let first = lease(&db, 1, T0).await.remove(0);
    assert_eq!(first.attempt, 1);
    // The lease expires; another worker takes the job over.
    assert_eq!(db.job_rescue_expired(T0 + LEASE + 1).await.unwrap(), 1);
    let second = lease(&db, 1, T0 + LEASE + 2).await.remove(0);
    assert_eq!(second.attempt, 2);
    // The first worker's late result is refused.
    let stale = db
        .job_complete_many(&[done(created.id, 1, JobStatus::Succeeded, T0 + LEASE + 3)])
        .await
        .unwrap();
    assert!(stale.is_empty());
    let fresh = db
        .job_complete_many(&[done(created.id, 2, JobStatus::Succeeded, T0 + LEASE + 4)])
        .await
        .unwrap();
    assert_eq!(fresh, vec![created.id]);
    // A second write for the same attempt is refused as well.
    let again = db
        .job_complete_many(&[done(created.id, 2, JobStatus::Succeeded, T0 + LEASE + 5)])
        .await
        .unwrap();
    assert!(again.is_empty());
    let finished = db.job_get("acme", created.id).await.unwrap().unwrap();
    assert_eq!(finished.status, JobStatus::Succeeded);
    assert_eq!(finished.result.unwrap().stdout, "ok");
    let outcomes: Vec<_> = finished
        .history
        .iter()
        .map(|a| a.outcome.as_str())
        .collect();
    assert_eq!(outcomes, vec!["lost", "succeeded"]);
    assert_eq!(finished.history[0].worker_id.as_deref(), Some("w1"));
}

async fn expired_leases_are_rescued_then_dead(db: Db) {
    let mut new = job("noop");
    new.max_attempts = 2;
    let (created, _) = db.job_insert(&new, T0).await.unwrap();
    lease(&db, 1, T0).await;
    assert_eq!(db.job_rescue_expired(T0 + LEASE - 1).await.unwrap(), 0);
    assert_eq!(db.job_rescue_expired(T0 + LEASE + 1).await.unwrap(), 1);
    let job1 = db.job_get("acme", created.id).await.unwrap().unwrap();
    assert_eq!(job1.status, JobStatus::Queued);
    lease(&db, 1, T0 + LEASE + 2).await;
    assert_eq!(db.job_rescue_expired(T0 + 2 * LEASE + 3).await.unwrap(), 1);
    let job2 = db.job_get("acme", created.id).await.unwrap().unwrap();
    assert_eq!(job2.status, JobStatus::Dead);
    assert!(job2.error.unwrap().contains("lease expired"));
    assert_eq!(job2.history.len(), 2);
    assert!(job2.finished_at.is_some());
}

async fn retry_waits_for_backoff(db: Db) {
    let (created, _) = db.job_insert(&job("noop"), T0).await.unwrap();
    let leased = lease(&db, 1, T0).await.remove(0);
    let mut failed = done(created.id, leased.attempt, JobStatus::Scheduled, T0 + 10);
    failed.run_at = Some(T0 + 1_000);
    failed.error = Some("exit 1".into());
    db.job_complete_many(&[failed]).await.unwrap();
    let waiting = db.job_get("acme", created.id).await.unwrap().unwrap();
    assert_eq!(waiting.status, JobStatus::Scheduled);
    assert_eq!(waiting.error.as_deref(), Some("exit 1"));
    assert!(waiting.finished_at.is_none());
    assert!(lease(&db, 1, T0 + 999).await.is_empty());
    let again = lease(&db, 1, T0 + 1_000).await;
    assert_eq!(again[0].attempt, 2);
}

async fn paused_queues_are_skipped(db: Db) {
    let mut new = job("noop");
    new.queue = "emails".into();
    db.job_insert(&new, T0).await.unwrap();
    let paused = QueueInfo {
        tenant: "acme".into(),
        name: "emails".into(),
        paused: true,
        concurrency_limit: None,
    };
    db.queue_upsert(&paused, T0).await.unwrap();
    assert!(lease(&db, 10, T0 + 1).await.is_empty());
    let depths = db.queue_depths(None).await.unwrap();
    assert_eq!(depths, vec![("emails".to_string(), Priority::Default, 1)]);
    db.queue_upsert(
        &QueueInfo {
            paused: false,
            ..paused
        },
        T0 + 2,
    )
    .await
    .unwrap();
    assert_eq!(lease(&db, 10, T0 + 3).await.len(), 1);
    assert_eq!(db.queue_list(Some("acme")).await.unwrap().len(), 1);
}

async fn concurrency_limit_caps_running_jobs(db: Db) {
    db.queue_upsert(
        &QueueInfo {
            tenant: "acme".into(),
            name: "narrow".into(),
            paused: false,
            concurrency_limit: Some(2),
        },
        T0,
    )
    .await
    .unwrap();
    for i in 0..5 {
        let mut new = job("noop");
        new.queue = "narrow".into();
        db.job_insert(&new, T0 + i).await.unwrap();
    }
    db.job_insert(&job("noop"), T0 + 10).await.unwrap();
    let first = lease(&db, 10, T0 + 20).await;
    let narrow: Vec<_> = first.iter().filter(|j| j.queue == "narrow").collect();
    assert_eq!(narrow.len(), 2);
    assert_eq!(first.len(), 3);
    assert!(lease(&db, 10, T0 + 21).await.is_empty());
    db.job_complete_many(&[done(narrow[0].id, 1, JobStatus::Succeeded, T0 + 22)])
        .await
        .unwrap();
    let next = lease(&db, 10, T0 + 23).await;
    assert_eq!(next.len(), 1);
    assert_eq!(
        db.queue_running(None).await.unwrap(),
        vec![("default".to_string(), 1), ("narrow".to_string(), 2)]
    );
}

async fn cancel_queued_and_running(db: Db) {
    let (queued, _) = db.job_insert(&job("noop"), T0).await.unwrap();
    match db.job_cancel("acme", queued.id, T0 + 1).await.unwrap() {
        CancelOutcome::Cancelled(j) => assert_eq!(j.status, JobStatus::Cancelled),
        other => panic!("{other:?}"),
    }
    assert!(lease(&db, 10, T0 + 2).await.is_empty());
    let (running, _) = db.job_insert(&job("noop"), T0 + 3).await.unwrap();
    let leased = lease(&db, 1, T0 + 4).await.remove(0);
    assert!(matches!(
        db.job_cancel("other", running.id, T0 + 5).await.unwrap(),
        CancelOutcome::NotFound
    ));
    match db.job_cancel("acme", running.id, T0 + 5).await.unwrap() {
        CancelOutcome::Requested(j) => assert!(j.cancel_requested),
        other => panic!("{other:?}"),
    }
    let beat = db
        .job_heartbeat("w1", &[(running.id, leased.attempt)], T0 + 6 + LEASE)
        .await
        .unwrap();
    assert_eq!(beat, vec![(running.id, true)]);
    // A retry decided after the cancel request ends as cancelled instead.
    let mut retry = done(running.id, leased.attempt, JobStatus::Scheduled, T0 + 7);
    retry.run_at = Some(T0 + 8);
    db.job_complete_many(&[retry]).await.unwrap();
    let after = db.job_get("acme", running.id).await.unwrap().unwrap();
    assert_eq!(after.status, JobStatus::Cancelled);
    assert!(matches!(
        db.job_cancel("acme", running.id, T0 + 9).await.unwrap(),
        CancelOutcome::AlreadyFinished(_)
    ));
}

async fn dead_jobs_retry_by_hand(db: Db) {
    let mut new = job("noop");
    new.max_attempts = 1;
    let (created, _) = db.job_insert(&new, T0).await.unwrap();
    let leased = lease(&db, 1, T0).await.remove(0);
    assert!(matches!(
        db.job_retry("acme", created.id, T0).await.unwrap(),
        RetryOutcome::NotRetryable(_)
    ));
    db.job_complete_many(&[done(created.id, leased.attempt, JobStatus::Dead, T0 + 1)])
        .await
        .unwrap();
    match db.job_retry("acme", created.id, T0 + 2).await.unwrap() {
        RetryOutcome::Requeued(j) => {
            assert_eq!(j.status, JobStatus::Queued);
            assert_eq!(j.retry_from, 1);
            assert!(j.finished_at.is_none());
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        db.job_retry("other", created.id, T0 + 2).await.unwrap(),
        RetryOutcome::NotFound
    ));
    let again = lease(&db, 1, T0 + 3).await.remove(0);
    assert_eq!(again.attempt, 2);
    assert_eq!(again.retry_from, 1);
}

async fn list_filters_and_pages(db: Db) {
    for i in 0..25 {
        let mut new = job(if i % 2 == 0 { "noop" } else { "wasm" });
        if i % 5 == 0 {
            new.labels.insert("batch".into(), "five".into());
        }
        db.job_insert(&new, T0 + i).await.unwrap();
    }
    db.job_insert(&NewJob::new("globex", "noop", json!({})), T0)
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut filter = JobFilter {
        limit: 10,
        ..JobFilter::default()
    };
    loop {
        let page = db.job_list("acme", &filter).await.unwrap();
        if page.is_empty() {
            break;
        }
        filter.before_id = Some(page.last().unwrap().id);
        seen.extend(page.into_iter().map(|j| j.id));
    }
    assert_eq!(seen.len(), 25);
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first");
    let wasm = JobFilter {
        kind: Some("wasm".into()),
        limit: 100,
        ..JobFilter::default()
    };
    assert_eq!(db.job_list("acme", &wasm).await.unwrap().len(), 12);
    let labelled = JobFilter {
        label: Some(("batch".into(), "five".into())),
        limit: 100,
        ..JobFilter::default()
    };
    assert_eq!(db.job_list("acme", &labelled).await.unwrap().len(), 5);
    let recent = JobFilter {
        created_after: Some(T0 + 20),
        status: Some(JobStatus::Queued),
        limit: 100,
        ..JobFilter::default()
    };
    assert_eq!(db.job_list("acme", &recent).await.unwrap().len(), 5);
}

async fn concurrent_leasers_never_share_a_job(db: Db) {
    let jobs: Vec<NewJob> = (0..2_000).map(|_| job("noop")).collect();
    let ids = db.job_insert_many(&jobs, T0).await.unwrap();
    assert_eq!(ids.len(), 2_000);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = db
                    .job_lease(&format!("w{w}"), &kinds(&["noop"]), 50, LEASE, T0 + 1)
                    .await
                    .unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|j| j.id));
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 2_000);
    assert_eq!(unique.len(), 2_000);
}

async fn heartbeat_extends_the_lease(db: Db) {
    let (created, _) = db.job_insert(&job("noop"), T0).await.unwrap();
    let leased = lease(&db, 1, T0).await.remove(0);
    let beat = db
        .job_heartbeat("w1", &[(created.id, leased.attempt)], T0 + 2 * LEASE)
        .await
        .unwrap();
    assert_eq!(beat, vec![(created.id, false)]);
    assert_eq!(db.job_rescue_expired(T0 + LEASE + 1).await.unwrap(), 0);
    // Another worker's heartbeat for the job is not honoured.
    let foreign = db
        .job_heartbeat("w2", &[(created.id, leased.attempt)], T0 + 3 * LEASE)
        .await
        .unwrap();
    assert!(foreign.is_empty());
}

async fn release_hands_back_without_spending_an_attempt(db: Db) {
    let mut new = job("noop");
    new.max_attempts = 1;
    let (created, _) = db.job_insert(&new, T0).await.unwrap();
    let leased = lease(&db, 1, T0).await.remove(0);
    assert_eq!(
        db.job_release("w1", &[(created.id, leased.attempt)], T0 + 1)
            .await
            .unwrap(),
        1
    );
    let again = lease(&db, 1, T0 + 2).await.remove(0);
    assert_eq!(again.attempt, 2);
    // The hand-back did not count: the job still has its one attempt.
    assert_eq!(again.attempt - again.retry_from, 1);
}

async fn keys_are_found_by_hash_until_revoked(db: Db) {
    let (id, secret) = kiln_db::generate_key();
    let key = kiln_db::ApiKey {
        id: id.clone(),
        tenant: "acme".into(),
        name: "ci".into(),
        scopes: kiln_core::Scopes(vec![kiln_core::Scope::Write]),
        created_at: T0,
        revoked_at: None,
    };
    db.key_insert(&key, &kiln_db::hash_key(&secret))
        .await
        .unwrap();
    let found = db
        .key_find_by_hash(&kiln_db::hash_key(&secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, key);
    assert!(db.key_find_by_hash("nope").await.unwrap().is_none());
    assert!(!db.key_revoke(Some("globex"), &id, T0 + 1).await.unwrap());
    assert!(db.key_revoke(Some("acme"), &id, T0 + 1).await.unwrap());
    assert!(db
        .key_find_by_hash(&kiln_db::hash_key(&secret))
        .await
        .unwrap()
        .is_none());
    assert_eq!(db.key_count().await.unwrap(), 1);
}
