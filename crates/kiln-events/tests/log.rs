//! The event log on both databases: what the triggers write, in what order
//! readers see it, and how subscriptions resume and end.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kiln_core::{JobStatus, NewJob};
use kiln_db::{Completion, Db, LeaseRequest};
use kiln_events::{Ended, EventFilter, EventHub};
use serde_json::json;

kiln_db::on_both_databases!(
    a_job_s_life_is_in_its_tenant_s_log,
    a_rolled_back_change_writes_no_event,
    a_late_commit_is_never_skipped,
    a_subscription_resumes_without_gap_or_duplicate,
    a_slow_reader_is_dropped_with_the_reason,
);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn read_all(db: &Db, tenant: &str, filter: &EventFilter) -> Vec<kiln_db::events::Event> {
    kiln_events::page(db, tenant, filter, 0, 1000)
        .await
        .unwrap()
        .events
}

/// Polls the log until `tenant` has `n` events passing `filter` (the
/// sequencer numbers PostgreSQL's a moment after commit).
async fn until_events(
    db: &Db,
    tenant: &str,
    filter: &EventFilter,
    n: usize,
) -> Vec<kiln_db::events::Event> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events = read_all(db, tenant, filter).await;
        if events.len() >= n {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} events: {events:?}",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_job_s_life_is_in_its_tenant_s_log(db: Db) {
    let mut job = NewJob::new("acme", "noop", json!({}));
    job.labels.insert("team".into(), "blue".into());
    let (job, _) = db.job_insert(&job, now()).await.unwrap();
    db.job_insert(&NewJob::new("globex", "noop", json!({})), now())
        .await
        .unwrap();
    let kinds = vec!["noop".to_string()];
    let leased = db
        .job_lease_with(&LeaseRequest {
            worker_id: "w",
            kinds: &kinds,
            limit: 10,
            lease_ms: 30_000,
            now: now(),
            tenant_running_max: None,
        })
        .await
        .unwrap();
    assert_eq!(leased.len(), 2);
    let completions: Vec<Completion> = leased
        .iter()
        .map(|l| Completion {
            id: l.id,
            attempt: l.attempt,
            status: JobStatus::Succeeded,
            run_at: None,
            result: None,
            error: None,
            record: kiln_core::AttemptRecord {
                attempt: l.attempt,
                worker_id: Some("w".into()),
                started_at: Some(now()),
                finished_at: now(),
                outcome: "succeeded".into(),
                exit_code: Some(0),
                error: None,
                duration_ms: Some(0),
            },
        })
        .collect();
    db.job_complete_many(&completions).await.unwrap();

    let all = EventFilter::default();
    let events = until_events(&db, "acme", &all, 3).await;
    let types: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(types, ["job.queued", "job.started", "job.succeeded"]);
    assert!(events.windows(2).all(|w| w[0].id < w[1].id), "{events:?}");
    for event in &events {
        assert_eq!(event.tenant, "acme");
        assert_eq!(event.resource.kind, "job");
        assert_eq!(event.resource.id, job.id.to_string());
        assert_eq!(event.labels.get("team").map(String::as_str), Some("blue"));
        assert_eq!(event.data["kind"], "noop");
    }
    assert_eq!(events[2].data["attempt"], 1);
    assert_eq!(until_events(&db, "globex", &all, 3).await.len(), 3);

    let only = |types: &str, resource: Option<&str>, labels: Option<&str>| {
        EventFilter::parse(Some(types), resource, labels).unwrap()
    };
    let done = read_all(&db, "acme", &only("job.succeeded", None, None)).await;
    assert_eq!(done.len(), 1);
    let mine = format!("job:{}", job.id);
    assert_eq!(
        read_all(&db, "acme", &only("job.*", Some(&mine), None))
            .await
            .len(),
        3
    );
    assert_eq!(
        read_all(&db, "acme", &only("run.*", None, None))
            .await
            .len(),
        0
    );
    assert_eq!(
        read_all(&db, "acme", &only("*", None, Some("team=red")))
            .await
            .len(),
        0
    );
    assert_eq!(
        read_all(&db, "acme", &only("*", None, Some("team=blue")))
            .await
            .len(),
        3
    );
    for bad in [
        ("job.*.x", None, None),
        ("job", Some("nokind"), None),
        ("job", None, Some("x")),
    ] {
        assert!(
            EventFilter::parse(Some(bad.0), bad.1, bad.2).is_err(),
            "{bad:?}"
        );
    }
}

const RAW_INSERT: &str = "INSERT INTO jobs (tenant, kind, queue, priority, status, spec, \
    max_attempts, timeout_ms, backoff, run_at, created_at) \
    VALUES ('acme', 'late', 'default', 2, 'queued', '{}', 1, 1000, '{}', 0, 0)";

async fn a_rolled_back_change_writes_no_event(db: Db) {
    kiln_db::testing::execute(&db, &format!("BEGIN; {RAW_INSERT}; ROLLBACK;"))
        .await
        .unwrap();
    db.job_insert(&NewJob::new("acme", "noop", json!({})), now())
        .await
        .unwrap();
    let events = until_events(&db, "acme", &EventFilter::default(), 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events_later = read_all(&db, "acme", &EventFilter::default()).await;
    assert_eq!(events_later, events);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].data["kind"], "noop");
}

/// A transaction that inserted its event first but commits last (held open
/// on PostgreSQL while others commit) is seen after theirs, by a reader
/// that started before it committed and resumes from its cursor: never
/// skipped, never twice.
async fn a_late_commit_is_never_skipped(db: Db) {
    let hub = EventHub::start(db.clone()).await.unwrap();
    let mut sub = hub.subscribe("acme", EventFilter::default(), Some(0));
    let late = {
        let db = db.clone();
        let sql = if db.backend() == "postgres" {
            format!("BEGIN; {RAW_INSERT}; SELECT pg_sleep(0.5); COMMIT;")
        } else {
            format!("BEGIN; {RAW_INSERT}; COMMIT;")
        };
        tokio::spawn(async move { kiln_db::testing::execute(&db, &sql).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        db.job_insert(&NewJob::new("acme", "noop", json!({})), now())
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 21 {
        let event = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("the late event never came")
            .unwrap();
        seen.push(event);
    }
    late.await.unwrap();
    let ids: Vec<i64> = seen.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(seen.iter().filter(|e| e.data["kind"] == "late").count(), 1);
    let all = read_all(&db, "acme", &EventFilter::default()).await;
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
}

async fn a_subscription_resumes_without_gap_or_duplicate(db: Db) {
    let jobs: Vec<NewJob> = (0..30)
        .map(|i| NewJob::new("acme", "noop", json!({"i": i})))
        .collect();
    db.job_insert_many(&jobs, now()).await.unwrap();
    until_events(&db, "acme", &EventFilter::default(), 30).await;
    let hub = EventHub::start(db.clone()).await.unwrap();
    let mut first = hub.subscribe("acme", EventFilter::default(), Some(0));
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(first.next().await.unwrap().id);
    }
    let cursor = first.cursor();
    drop(first);
    drop(hub);
    // A new hub, as after a restart; ten more arrive meanwhile.
    let more: Vec<NewJob> = (0..10)
        .map(|i| NewJob::new("acme", "noop", json!({"more": i})))
        .collect();
    db.job_insert_many(&more, now()).await.unwrap();
    let hub = EventHub::start(db.clone()).await.unwrap();
    let mut second = hub.subscribe("acme", EventFilter::default(), Some(cursor));
    while got.len() < 40 {
        let next = tokio::time::timeout(Duration::from_secs(20), second.next())
            .await
            .expect("stuck")
            .unwrap();
        got.push(next.id);
    }
    let unique: BTreeSet<i64> = got.iter().copied().collect();
    assert_eq!(unique.len(), 40, "{got:?}");
    let all: Vec<i64> = read_all(&db, "acme", &EventFilter::default())
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(got, all);
}

async fn a_slow_reader_is_dropped_with_the_reason(db: Db) {
    let hub = EventHub::start(db.clone()).await.unwrap();
    let mut slow = hub.subscribe("acme", EventFilter::default(), None);
    let jobs: Vec<NewJob> = (0..kiln_events::BUFFER + 500)
        .map(|_| NewJob::new("acme", "noop", json!({})))
        .collect();
    for chunk in jobs.chunks(500) {
        db.job_insert_many(chunk, now()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let last = db.event_last().await.unwrap();
        if last as usize >= jobs.len() && hub.position() >= last {
            break last;
        }
        assert!(Instant::now() < deadline, "the hub did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(last > 0);
    match slow.next().await {
        Err(Ended::Slow(cursor)) => {
            assert!(Ended::Slow(cursor).to_string().contains("Last-Event-ID"));
        }
        other => panic!("expected the slow reader dropped, got {other:?}"),
    }
}
