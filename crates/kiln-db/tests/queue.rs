//! The queue test suite. Every test runs against SQLite and PostgreSQL; each
//! PostgreSQL test gets its own schema, each SQLite test its own file, so
//! they run in parallel.

use std::collections::{BTreeMap, HashSet};

use kiln_core::{AttemptRecord, JobResult, JobStatus, NewJob, Priority};
use kiln_db::{
    CancelOutcome, Completion, Db, DbError, JobFilter, LeaseRequest, QueueInfo, RetryOutcome,
};
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
    nul_in_any_text_is_refused_cleanly,
    completion_errors_with_nul_are_stored_sanitised,
    a_poison_result_is_quarantined_and_the_batch_written,
    an_undecodable_row_fails_alone,
    a_failed_lease_leaves_nothing_leased,
    cancel_never_loses_a_race_with_the_completer,
    tenants_queues_are_their_own,
    jobs_submitted_to_a_paused_queue_wait_for_resume,
    tenant_running_quota_caps_leases,
    the_running_count_follows_every_path,
    concurrent_leasers_respect_a_concurrency_limit,
    retention_deletes_old_finished_jobs_in_batches,
    an_attempt_without_a_result_shows_none,
    watchers_that_gave_up_are_pruned,
    limited_queues_compete_on_priority,
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
        .unwrap()
        .applied;
    assert!(stale.is_empty());
    let fresh = db
        .job_complete_many(&[done(created.id, 2, JobStatus::Succeeded, T0 + LEASE + 4)])
        .await
        .unwrap()
        .applied;
    assert_eq!(fresh, vec![created.id]);
    // A second write for the same attempt is refused as well.
    let again = db
        .job_complete_many(&[done(created.id, 2, JobStatus::Succeeded, T0 + LEASE + 5)])
        .await
        .unwrap()
        .applied;
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
        expires_at: None,
        last_used_at: None,
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

/// A change to a new job, named for the field it breaks.
type Edit = Box<dyn Fn(&mut NewJob)>;

fn is_invalid<T: std::fmt::Debug>(result: Result<T, DbError>) -> bool {
    matches!(result, Err(DbError::Invalid(_)))
}

async fn nul_in_any_text_is_refused_cleanly(db: Db) {
    let edits: Vec<(&str, Edit)> = vec![
        ("tenant", Box::new(|j| j.tenant = "ac\0me".into())),
        ("kind", Box::new(|j| j.kind = "no\0op".into())),
        ("queue", Box::new(|j| j.queue = "q\0".into())),
        (
            "label key",
            Box::new(|j| {
                j.labels.insert("k\0".into(), "v".into());
            }),
        ),
        (
            "label value",
            Box::new(|j| {
                j.labels.insert("k".into(), "v\0".into());
            }),
        ),
        (
            "idempotency key",
            Box::new(|j| j.idempotency_key = Some("k\0".into())),
        ),
        ("spec value", Box::new(|j| j.spec = json!({"a": "\u{0}"}))),
        ("spec key", Box::new(|j| j.spec = json!({"a\u{0}": 1}))),
    ];
    for (what, edit) in edits {
        let mut new = job("noop");
        edit(&mut new);
        assert!(is_invalid(db.job_insert(&new, T0).await), "{what}");
        assert!(
            is_invalid(db.job_insert_many(std::slice::from_ref(&new), T0).await),
            "{what} (many)"
        );
    }
    let (id, secret) = kiln_db::generate_key();
    let key = kiln_db::ApiKey {
        id,
        tenant: "acme".into(),
        name: "c\0i".into(),
        scopes: kiln_core::Scopes(vec![kiln_core::Scope::Read]),
        created_at: T0,
        revoked_at: None,
        expires_at: None,
        last_used_at: None,
    };
    assert!(is_invalid(
        db.key_insert(&key, &kiln_db::hash_key(&secret)).await
    ));
    db.job_insert(&job("noop"), T0).await.unwrap();
    for filter in [
        JobFilter {
            kind: Some("no\0op".into()),
            limit: 10,
            ..JobFilter::default()
        },
        JobFilter {
            queue: Some("q\0".into()),
            limit: 10,
            ..JobFilter::default()
        },
        JobFilter {
            label: Some(("k\0".into(), "v".into())),
            limit: 10,
            ..JobFilter::default()
        },
        JobFilter {
            label: Some(("k".into(), "v\0".into())),
            limit: 10,
            ..JobFilter::default()
        },
        JobFilter {
            label: Some(("a\"b".into(), "v".into())),
            limit: 10,
            ..JobFilter::default()
        },
    ] {
        assert_eq!(
            db.job_list("acme", &filter).await.unwrap(),
            vec![],
            "{filter:?}"
        );
    }
    assert_eq!(
        db.job_list(
            "ac\0me",
            &JobFilter {
                limit: 10,
                ..JobFilter::default()
            }
        )
        .await
        .unwrap(),
        vec![]
    );
    assert!(is_invalid(
        db.queue_upsert(&QueueInfo::open("acme", "q\0"), T0).await
    ));
    assert!(db.queue_list(Some("ac\0me")).await.unwrap().is_empty());
}

async fn completion_errors_with_nul_are_stored_sanitised(db: Db) {
    let (created, _) = db.job_insert(&job("noop"), T0).await.unwrap();
    let leased = lease(&db, 1, T0).await.remove(0);
    let mut failed = done(created.id, leased.attempt, JobStatus::Failed, T0 + 1);
    failed.error = Some("bad \0 name \u{1b}[31m".into());
    failed.record.error = failed.error.clone();
    failed.record.worker_id = Some("w\0".into());
    failed.result.as_mut().unwrap().stdout = "out\0put".into();
    let written = db.job_complete_many(&[failed]).await.unwrap();
    assert_eq!(written.applied, vec![created.id]);
    let stored = db.job_get("acme", created.id).await.unwrap().unwrap();
    assert_eq!(stored.status, JobStatus::Failed);
    assert_eq!(
        stored.error.as_deref(),
        Some("bad \u{FFFD} name \u{FFFD}[31m")
    );
    assert_eq!(
        stored.history[0].error.as_deref(),
        Some("bad \u{FFFD} name \u{FFFD}[31m")
    );
    // Output is kept byte for byte: the result is stored as JSON text, where
    // NUL is an escape.
    assert_eq!(stored.result.unwrap().stdout, "out\0put");
}

async fn a_poison_result_is_quarantined_and_the_batch_written(db: Db) {
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(db.job_insert(&job("noop"), T0 + i).await.unwrap().0.id);
    }
    let leased = lease(&db, 4, T0 + 10).await;
    assert_eq!(leased.len(), 4);
    // ids[0] is taken back and leased again: its first attempt is fenced off.
    db.job_release("w1", &[(ids[0], 1)], T0 + 11).await.unwrap();
    let again = lease(&db, 1, T0 + 12).await.remove(0);
    assert_eq!((again.id, again.attempt), (ids[0], 2));
    // A result the database itself refuses, whatever the retry: "running"
    // without a lease breaks a CHECK constraint.
    let poison = done(ids[1], 1, JobStatus::Running, T0 + 13);
    let batch = vec![
        done(ids[0], 1, JobStatus::Succeeded, T0 + 13),
        poison,
        done(ids[2], 1, JobStatus::Succeeded, T0 + 13),
        done(ids[3], 1, JobStatus::Succeeded, T0 + 13),
    ];
    let written = db.job_complete_many(&batch).await.unwrap();
    assert_eq!(written.applied, vec![ids[2], ids[3]]);
    assert_eq!(written.quarantined, vec![ids[1]]);
    let quarantined = db.job_get("acme", ids[1]).await.unwrap().unwrap();
    assert_eq!(quarantined.status, JobStatus::Failed);
    assert!(quarantined
        .error
        .as_deref()
        .unwrap()
        .contains("could not be stored"));
    assert_eq!(quarantined.history.len(), 1);
    assert_eq!(quarantined.history[0].outcome, "failed");
    assert!(quarantined.lease_expires_at.is_none());
    for id in &ids[2..] {
        let job = db.job_get("acme", *id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Succeeded);
    }
    let fenced = db.job_get("acme", ids[0]).await.unwrap().unwrap();
    assert_eq!((fenced.status, fenced.attempt), (JobStatus::Running, 2));
}

async fn an_undecodable_row_fails_alone(db: Db) {
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(db.job_insert(&job("noop"), T0 + i).await.unwrap().0.id);
    }
    // A backoff a newer version wrote, with a field this one does not know.
    kiln_db::testing::execute(
        &db,
        &format!(
            "UPDATE jobs SET backoff = '{{\"base_ms\":1,\"shape\":\"fib\"}}' WHERE id = {}",
            ids[1]
        ),
    )
    .await
    .unwrap();
    let leased = lease(&db, 10, T0 + 10).await;
    assert_eq!(
        leased.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ids[0], ids[2]]
    );
    let bad = db
        .job_list(
            "acme",
            &JobFilter {
                status: Some(JobStatus::Failed),
                limit: 10,
                ..JobFilter::default()
            },
        )
        .await;
    // The row cannot be decoded as a whole job either, so it is read by status count.
    assert!(bad.is_err() || bad.unwrap().is_empty());
    let counts = db.job_count_by_status(Some("acme")).await.unwrap();
    assert_eq!(counts.get("failed"), Some(&1));
    assert_eq!(counts.get("running"), Some(&2));
    assert!(lease(&db, 10, T0 + 20).await.is_empty());
}

async fn a_failed_lease_leaves_nothing_leased(db: Db) {
    db.queue_upsert(
        &QueueInfo {
            concurrency_limit: Some(5),
            ..QueueInfo::open("acme", "narrow")
        },
        T0,
    )
    .await
    .unwrap();
    let (plain, _) = db.job_insert(&job("noop"), T0).await.unwrap();
    let mut narrow = job("noop");
    narrow.queue = "narrow".into();
    db.job_insert(&narrow, T0 + 1).await.unwrap();
    // The database refuses to lease the limited queue's job, after the
    // plain one was picked.
    let refuse = match db.backend() {
        "postgres" => {
            "CREATE FUNCTION refuse_narrow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               RAISE EXCEPTION 'refused'; END $$; \
             CREATE TRIGGER refuse_narrow BEFORE UPDATE ON jobs FOR EACH ROW \
               WHEN (NEW.status = 'running' AND NEW.queue = 'narrow') EXECUTE FUNCTION refuse_narrow();"
        }
        _ => {
            "CREATE TRIGGER refuse_narrow BEFORE UPDATE ON jobs FOR EACH ROW \
               WHEN NEW.status = 'running' AND NEW.queue = 'narrow' \
               BEGIN SELECT RAISE(ABORT, 'refused'); END;"
        }
    };
    kiln_db::testing::execute(&db, refuse).await.unwrap();
    assert!(db
        .job_lease("w1", &kinds(&["noop"]), 10, LEASE, T0 + 2)
        .await
        .is_err());
    let still = db.job_get("acme", plain.id).await.unwrap().unwrap();
    assert_eq!((still.status, still.attempt), (JobStatus::Queued, 0));
    assert!(still.worker_id.is_none());
}

async fn cancel_never_loses_a_race_with_the_completer(db: Db) {
    for round in 0..40 {
        let (created, _) = db.job_insert(&job("noop"), T0 + round).await.unwrap();
        let leased = lease(&db, 1, T0 + round).await.remove(0);
        let mut retry = done(
            created.id,
            leased.attempt,
            JobStatus::Scheduled,
            T0 + round + 1,
        );
        retry.run_at = Some(T0 + round + 60_000);
        let completer = {
            let db = db.clone();
            tokio::spawn(async move { db.job_complete_many(&[retry]).await.unwrap() })
        };
        let canceller = {
            let db = db.clone();
            tokio::spawn(async move {
                db.job_cancel("acme", created.id, T0 + round + 1)
                    .await
                    .unwrap()
            })
        };
        let outcome = canceller.await.unwrap();
        completer.await.unwrap();
        assert!(
            matches!(
                outcome,
                CancelOutcome::Cancelled(_) | CancelOutcome::Requested(_)
            ),
            "round {round}: {outcome:?}"
        );
        let after = db.job_get("acme", created.id).await.unwrap().unwrap();
        assert_eq!(after.status, JobStatus::Cancelled, "round {round}");
    }
}

async fn tenants_queues_are_their_own(db: Db) {
    for tenant in ["acme", "globex"] {
        let mut new = NewJob::new(tenant, "noop", json!({}));
        new.queue = "emails".into();
        db.job_insert(&new, T0).await.unwrap();
    }
    db.queue_upsert(
        &QueueInfo {
            paused: true,
            ..QueueInfo::open("acme", "emails")
        },
        T0,
    )
    .await
    .unwrap();
    // acme's pause holds only acme's jobs.
    let got = lease(&db, 10, T0 + 1).await;
    assert_eq!(
        got.iter().map(|j| j.tenant.as_str()).collect::<Vec<_>>(),
        vec!["globex"]
    );
    assert_eq!(db.queue_list(Some("globex")).await.unwrap(), vec![]);
    assert!(!db.queue_get("globex", "emails").await.unwrap().paused);
    assert!(db.queue_get("acme", "emails").await.unwrap().paused);
    // globex resuming its own queue of that name changes nothing for acme.
    db.queue_upsert(&QueueInfo::open("globex", "emails"), T0 + 2)
        .await
        .unwrap();
    assert!(lease(&db, 10, T0 + 3).await.is_empty());
    // Nor does a limit globex sets.
    db.queue_upsert(
        &QueueInfo {
            concurrency_limit: Some(1),
            ..QueueInfo::open("globex", "emails")
        },
        T0 + 4,
    )
    .await
    .unwrap();
    db.queue_upsert(&QueueInfo::open("acme", "emails"), T0 + 5)
        .await
        .unwrap();
    for i in 0..3 {
        let mut new = job("noop");
        new.queue = "emails".into();
        db.job_insert(&new, T0 + 6 + i).await.unwrap();
    }
    assert_eq!(lease(&db, 10, T0 + 10).await.len(), 4);
    let all = db.queue_list(None).await.unwrap();
    assert_eq!(all.len(), 2);
}

async fn jobs_submitted_to_a_paused_queue_wait_for_resume(db: Db) {
    db.queue_upsert(
        &QueueInfo {
            paused: true,
            ..QueueInfo::open("acme", "emails")
        },
        T0,
    )
    .await
    .unwrap();
    let mut new = job("noop");
    new.queue = "emails".into();
    new.max_attempts = 1;
    let (created, _) = db.job_insert(&new, T0 + 1).await.unwrap();
    let other = db.job_insert(&job("noop"), T0 + 2).await.unwrap().0;
    assert_eq!(
        lease(&db, 10, T0 + 3)
            .await
            .iter()
            .map(|j| j.id)
            .collect::<Vec<_>>(),
        vec![other.id]
    );
    assert_eq!(db.job_next_run_at(&kinds(&["noop"])).await.unwrap(), None);
    db.queue_upsert(&QueueInfo::open("acme", "emails"), T0 + 4)
        .await
        .unwrap();
    let got = lease(&db, 10, T0 + 5).await;
    assert_eq!(
        got.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![created.id]
    );
    // Paused again while it runs; it dies; retried by hand after the queue
    // resumed, it is leased again.
    db.queue_upsert(
        &QueueInfo {
            paused: true,
            ..QueueInfo::open("acme", "emails")
        },
        T0 + 6,
    )
    .await
    .unwrap();
    db.job_complete_many(&[done(created.id, 1, JobStatus::Dead, T0 + 7)])
        .await
        .unwrap();
    db.queue_upsert(&QueueInfo::open("acme", "emails"), T0 + 8)
        .await
        .unwrap();
    db.job_retry("acme", created.id, T0 + 9).await.unwrap();
    assert_eq!(lease(&db, 10, T0 + 10).await.len(), 1);
}

async fn tenant_running_quota_caps_leases(db: Db) {
    for tenant in ["acme", "globex"] {
        let jobs: Vec<NewJob> = (0..5)
            .map(|_| NewJob::new(tenant, "noop", json!({})))
            .collect();
        db.job_insert_many(&jobs, T0).await.unwrap();
    }
    let kinds = kinds(&["noop"]);
    let request = |limit: i64, now: i64| LeaseRequest {
        worker_id: "w1",
        kinds: &kinds,
        limit,
        lease_ms: LEASE,
        now,
        tenant_running_max: Some(3),
    };
    // The oldest four are acme's; it may start only three of them, and the
    // round takes no more (globex's turn comes next round).
    let first = db.job_lease_with(&request(4, T0 + 1)).await.unwrap();
    assert_eq!(first.len(), 3);
    let second = db.job_lease_with(&request(10, T0 + 2)).await.unwrap();
    let mut per_tenant = BTreeMap::new();
    for j in first.iter().chain(&second) {
        *per_tenant.entry(j.tenant.clone()).or_insert(0) += 1;
    }
    assert_eq!(
        per_tenant,
        BTreeMap::from([("acme".to_string(), 3), ("globex".to_string(), 3)])
    );
    assert!(db
        .job_lease_with(&request(10, T0 + 3))
        .await
        .unwrap()
        .is_empty());
    db.job_complete_many(&[done(first[0].id, 1, JobStatus::Succeeded, T0 + 4)])
        .await
        .unwrap();
    let next = db.job_lease_with(&request(10, T0 + 5)).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].tenant, first[0].tenant);
}

/// The per-tenant running count the quota reads is kept by triggers; every
/// way a job enters or leaves `running` must move it, and a heartbeat must not.
async fn the_running_count_follows_every_path(db: Db) {
    for tenant in ["acme", "globex"] {
        let jobs: Vec<NewJob> = (0..6)
            .map(|_| NewJob::new(tenant, "noop", json!({})))
            .collect();
        db.job_insert_many(&jobs, T0).await.unwrap();
    }
    let actual = |db: Db| async move {
        let mut counts = BTreeMap::new();
        for tenant in ["acme", "globex"] {
            let filter = JobFilter {
                status: Some(JobStatus::Running),
                limit: 100,
                ..JobFilter::default()
            };
            let n = db.job_list(tenant, &filter).await.unwrap().len() as i64;
            if n > 0 {
                counts.insert(tenant.to_string(), n);
            }
        }
        counts
    };
    let leased = lease(&db, 12, T0 + 1).await;
    assert_eq!(leased.len(), 12);
    assert_eq!(db.tenant_running().await.unwrap(), actual(db.clone()).await);
    assert_eq!(db.tenant_running().await.unwrap()["acme"], 6);
    let held: Vec<(i64, i32)> = leased.iter().map(|j| (j.id, j.attempt)).collect();
    db.job_heartbeat("w1", &held, T0 + 2 + LEASE).await.unwrap();
    assert_eq!(db.tenant_running().await.unwrap()["acme"], 6);
    // Completion (success and retry), release, cancel-then-complete, rescue.
    let mut retry = done(leased[1].id, 1, JobStatus::Scheduled, T0 + 3);
    retry.run_at = Some(T0 + 1_000_000);
    db.job_complete_many(&[done(leased[0].id, 1, JobStatus::Succeeded, T0 + 3), retry])
        .await
        .unwrap();
    db.job_release("w1", &[(leased[2].id, 1)], T0 + 4)
        .await
        .unwrap();
    db.job_cancel(&leased[3].tenant, leased[3].id, T0 + 5)
        .await
        .unwrap();
    assert_eq!(db.tenant_running().await.unwrap(), actual(db.clone()).await);
    db.job_complete_many(&[done(leased[3].id, 1, JobStatus::Cancelled, T0 + 6)])
        .await
        .unwrap();
    assert_eq!(db.tenant_running().await.unwrap(), actual(db.clone()).await);
    assert_eq!(db.job_rescue_expired(T0 + 3 * LEASE).await.unwrap(), 8);
    assert_eq!(db.tenant_running().await.unwrap(), BTreeMap::new());
    // Rescued jobs lease again and count again.
    let again = lease(&db, 20, T0 + 3 * LEASE + 1).await;
    assert!(!again.is_empty());
    assert_eq!(db.tenant_running().await.unwrap(), actual(db.clone()).await);
}

async fn concurrent_leasers_respect_a_concurrency_limit(db: Db) {
    db.queue_upsert(
        &QueueInfo {
            concurrency_limit: Some(3),
            ..QueueInfo::open("acme", "narrow")
        },
        T0,
    )
    .await
    .unwrap();
    let jobs: Vec<NewJob> = (0..200)
        .map(|i| {
            let mut new = job("noop");
            if i % 2 == 0 {
                new.queue = "narrow".into();
            }
            new
        })
        .collect();
    db.job_insert_many(&jobs, T0).await.unwrap();
    // Eight leasers at once, each leasing until nothing is left for it;
    // on PostgreSQL they run in parallel on separate connections.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let db = db.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut mine = Vec::new();
            loop {
                let got = db
                    .job_lease(&format!("w{w}"), &kinds(&["noop"]), 7, LEASE, T0 + 1)
                    .await
                    .unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|j| (j.id, j.queue)));
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(unique.len(), all.len(), "no job leased twice");
    assert_eq!(all.iter().filter(|(_, q)| q == "narrow").count(), 3);
    assert_eq!(all.len(), 103);
}

async fn retention_deletes_old_finished_jobs_in_batches(db: Db) {
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(db.job_insert(&job("noop"), T0 + i).await.unwrap().0.id);
    }
    let leased = lease(&db, 7, T0 + 10).await;
    // Five finish early, one late, one is still running; one more waits.
    let mut batch = Vec::new();
    for j in &leased[..5] {
        batch.push(done(j.id, 1, JobStatus::Succeeded, T0 + 100));
    }
    batch.push(done(leased[5].id, 1, JobStatus::Dead, T0 + 10_000));
    db.job_complete_many(&batch).await.unwrap();
    let waiting = db.job_insert(&job("noop"), T0).await.unwrap().0;
    assert_eq!(db.job_delete_finished(T0 + 5_000, 2).await.unwrap(), 2);
    assert_eq!(db.job_delete_finished(T0 + 5_000, 2).await.unwrap(), 2);
    assert_eq!(db.job_delete_finished(T0 + 5_000, 2).await.unwrap(), 1);
    assert_eq!(db.job_delete_finished(T0 + 5_000, 2).await.unwrap(), 0);
    let counts = db.job_count_by_status(None).await.unwrap();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("dead".to_string(), 1),
            ("queued".to_string(), 1),
            ("running".to_string(), 1),
        ])
    );
    assert!(db.job_get("acme", waiting.id).await.unwrap().is_some());
    assert_eq!(db.job_last_finished_at().await.unwrap(), Some(T0 + 10_000));
}

async fn an_attempt_without_a_result_shows_none(db: Db) {
    let mut new = job("noop");
    new.max_attempts = 2;
    let (created, _) = db.job_insert(&new, T0).await.unwrap();
    lease(&db, 1, T0).await;
    let mut failed = done(created.id, 1, JobStatus::Scheduled, T0 + 1);
    failed.run_at = Some(T0 + 2);
    db.job_complete_many(&[failed]).await.unwrap();
    lease(&db, 1, T0 + 2).await;
    let mut timed_out = done(created.id, 2, JobStatus::Dead, T0 + 3);
    timed_out.result = None;
    timed_out.error = Some("timeout".into());
    db.job_complete_many(&[timed_out]).await.unwrap();
    let job = db.job_get("acme", created.id).await.unwrap().unwrap();
    assert_eq!(
        job.result, None,
        "the first attempt's output is not shown as the last's"
    );
}

async fn watchers_that_gave_up_are_pruned(db: Db) {
    for _ in 0..1_000 {
        drop(db.watch_job(7));
    }
    assert_eq!(db.watched_jobs(), 1);
    for id in 0..1_000 {
        drop(db.watch_job(id));
    }
    assert!(db.watched_jobs() <= 300, "{}", db.watched_jobs());
    let live = db.watch_job(1);
    assert!(db.watched_jobs() >= 1);
    drop(live);
}

async fn limited_queues_compete_on_priority(db: Db) {
    db.queue_upsert(
        &QueueInfo {
            concurrency_limit: Some(5),
            ..QueueInfo::open("acme", "narrow")
        },
        T0,
    )
    .await
    .unwrap();
    let backlog: Vec<NewJob> = (0..10).map(|_| job("noop")).collect();
    db.job_insert_many(&backlog, T0).await.unwrap();
    let mut urgent = job("noop");
    urgent.queue = "narrow".into();
    urgent.priority = Priority::Critical;
    let (urgent, _) = db.job_insert(&urgent, T0 + 1).await.unwrap();
    // A batch the plain backlog alone could fill still starts with the
    // critical job of the limited queue.
    let got = lease(&db, 3, T0 + 2).await;
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].id, urgent.id);
}

/// Two transactions on connections of one counter shard, each writing a
/// job's end and then inserting a job, with a plain insert of the other in
/// between: before the shard lock the end took the rollup row and then
/// wanted the waiting count, the insert the other way round, and
/// PostgreSQL aborted one of them as a deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_shards_never_deadlock_across_statements() {
    use sqlx::{Connection, Executor};
    let schema = kiln_db::testing::unique_name("kiln_test");
    let url = kiln_db::testing::postgres_url();
    let db = Db::connect_postgres_schema(&url, &schema).await.unwrap();
    let (running, _) = db.job_insert(&job("noop"), T0).await.unwrap();
    assert_eq!(lease(&db, 1, T0 + 1).await.len(), 1);
    let connect = || async {
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        conn.execute(format!("SET search_path TO \"{schema}\"").as_str())
            .await
            .unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        (conn, pid % 16)
    };
    let (mut a, shard) = connect().await;
    let mut b = None;
    let mut spare = Vec::new();
    for _ in 0..200 {
        let (conn, s) = connect().await;
        if s == shard {
            b = Some(conn);
            break;
        }
        spare.push(conn);
    }
    let mut b = b.expect("a second connection on the same counter shard");
    drop(spare);
    // Created in the minute the end is written in: the same rollup row.
    let insert = format!(
        "INSERT INTO jobs (tenant, kind, queue, priority, status, spec, max_attempts, \
         timeout_ms, backoff, run_at, created_at) VALUES ('acme', 'noop', 'default', 2, \
         'queued', '{{}}', 1, 1000, '{{}}', 1, {})",
        T0 + 2
    );
    let insert_b = insert.clone();
    a.execute("BEGIN").await.unwrap();
    let ended = format!(
        "UPDATE jobs SET status = 'succeeded', finished_at = {}, lease_expires_at = NULL \
         WHERE id = {}",
        T0 + 2,
        running.id
    );
    a.execute(ended.as_str()).await.unwrap();
    let other = tokio::spawn(async move {
        b.execute("BEGIN").await?;
        b.execute(insert_b.as_str()).await?;
        b.execute("COMMIT").await?;
        Ok::<_, sqlx::Error>(())
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mine = async {
        a.execute(insert.as_str()).await?;
        a.execute("COMMIT").await?;
        Ok::<_, sqlx::Error>(())
    }
    .await;
    assert!(mine.is_ok(), "the end and insert failed: {mine:?}");
    let theirs = other.await.unwrap();
    assert!(theirs.is_ok(), "the other insert failed: {theirs:?}");
    db.close().await;
    kiln_db::testing::drop_postgres_schema(&url, &schema)
        .await
        .ok();
}
