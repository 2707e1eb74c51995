//! `/api/v1/dashboard/stats` on both databases: after a mix of jobs (two
//! kinds, several queues; succeeded, failed, dead, retried, cancelled,
//! waiting, scheduled) has run, every figure equals the same figure
//! computed by SQL straight from the jobs table (counts exactly,
//! percentiles in the same latency bucket); another tenant's jobs never
//! count; folding minutes into hours changes no count; bad parameters
//! answer the JSON error; an empty database answers zeros.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{error_code, finished, harness, Harness};
use kiln_db::dashboard::latency_bucket;
use kiln_db::testing::{column_i64, scalar_i64};
use kiln_db::Db;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

kiln_db::on_both_databases!(
    figures_equal_the_truth_from_the_jobs_table,
    an_empty_database_answers_zeros,
    bad_parameters_are_refused
);

async fn stats(h: &Harness, key: &str, query: &str) -> Value {
    let (status, body) = h
        .call("GET", &format!("/api/v1/dashboard/stats{query}"), key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    body
}

fn millis(text: &Value) -> i64 {
    kiln_api::parse_time(text.as_str().unwrap()).unwrap()
}

/// `history[0].started_at` (the first attempt's start) as SQL.
fn first_start(db: &Db) -> &'static str {
    match db {
        Db::Sqlite(_) => "json_extract(history, '$[0].started_at')",
        Db::Postgres(_) => "CAST(history::jsonb -> 0 ->> 'started_at' AS BIGINT)",
    }
}

async fn n(db: &Db, sql: &str) -> i64 {
    scalar_i64(db, sql).await.unwrap()
}

/// Nearest-rank percentile of the true durations.
fn nearest_rank(sorted: &[i64], p: f64) -> i64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Every figure of one tenant's view against SQL over `jobs`.
async fn check_against_jobs(db: &Db, tenant: &str, body: &Value) {
    let from = millis(&body["from"]);
    let mine = format!("tenant = '{tenant}'");
    let by_status = &body["jobs_by_status"];
    for status in ["queued", "scheduled", "running"] {
        let truth = n(
            db,
            &format!("SELECT COUNT(*) FROM jobs WHERE {mine} AND status = '{status}'"),
        )
        .await;
        assert_eq!(by_status[status], truth, "{tenant} {status} now");
    }
    for status in ["succeeded", "failed", "dead", "cancelled"] {
        let truth = n(
            db,
            &format!(
                "SELECT COUNT(*) FROM jobs WHERE {mine} AND status = '{status}' AND finished_at >= {from}"
            ),
        )
        .await;
        assert_eq!(by_status[status], truth, "{tenant} {status} in the window");
        assert_eq!(body["totals"][status], truth, "{tenant} total {status}");
    }
    let totals = &body["totals"];
    let enqueued = n(
        db,
        &format!("SELECT COUNT(*) FROM jobs WHERE {mine} AND created_at >= {from}"),
    )
    .await;
    assert_eq!(totals["enqueued"], enqueued, "{tenant} enqueued");
    let attempts = n(
        db,
        &format!("SELECT CAST(COALESCE(SUM(attempt), 0) AS BIGINT) FROM jobs WHERE {mine}"),
    )
    .await;
    assert_eq!(totals["started"], attempts, "{tenant} started");
    // Each attempt either ended its job or sent it back to wait.
    let ended_after_running = n(
        db,
        &format!(
            "SELECT COUNT(*) FROM jobs WHERE {mine} AND attempt > 0 \
             AND status IN ('succeeded','failed','dead','cancelled','running')"
        ),
    )
    .await;
    assert_eq!(
        totals["retried"],
        attempts - ended_after_running,
        "{tenant} retried"
    );

    // The series, minute by minute.
    let points = body["throughput"].as_array().unwrap();
    assert_eq!(points.len(), 60);
    for (field, column) in [("enqueued", "created_at"), ("succeeded", "finished_at")] {
        let filter = if field == "succeeded" {
            " AND status = 'succeeded'"
        } else {
            ""
        };
        let mut truth = vec![0_i64; 60];
        for at in column_i64(
            db,
            &format!("SELECT {column} FROM jobs WHERE {mine}{filter} AND {column} >= {from}"),
        )
        .await
        .unwrap()
        {
            truth[((at - from) / 60_000).min(59) as usize] += 1;
        }
        let got: Vec<i64> = points.iter().map(|p| p[field].as_i64().unwrap()).collect();
        assert_eq!(got, truth, "{tenant} {field} per minute");
        assert_eq!(millis(&points[1]["at"]) - millis(&points[0]["at"]), 60_000);
    }

    // Percentiles: in the bucket of the true nearest-rank value.
    let waits = format!(
        "SELECT {} - created_at FROM jobs WHERE {mine} AND attempt > 0 ORDER BY 1",
        first_start(db)
    );
    let runs = format!(
        "SELECT finished_at - started_at FROM jobs WHERE {mine} AND attempt > 0 \
         AND status IN ('succeeded','failed','dead','cancelled') ORDER BY 1"
    );
    for (name, sql) in [("enqueue_to_start", waits), ("run_time", runs)] {
        let truth = column_i64(db, &sql).await.unwrap();
        let got = &body["latency"][name];
        assert_eq!(got["count"], truth.len() as i64, "{tenant} {name} samples");
        for (p, field) in [(0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")] {
            let expect = nearest_rank(&truth, p);
            let value = got[field].as_i64().unwrap();
            assert_eq!(
                latency_bucket(value),
                latency_bucket(expect),
                "{tenant} {name} {field}: {value} ms read, {expect} ms true ({truth:?})"
            );
        }
    }

    // Failure rates by kind and by queue.
    for (list, column) in [("by_kind", "kind"), ("by_queue", "queue")] {
        let rows = body["failures"][list].as_array().unwrap();
        let names = n(
            db,
            &format!(
                "SELECT COUNT(DISTINCT {column}) FROM jobs WHERE {mine} AND finished_at >= {from}"
            ),
        )
        .await;
        assert_eq!(rows.len() as i64, names, "{tenant} {list}: {rows:?}");
        for row in rows {
            let name = row["name"].as_str().unwrap();
            let count = |status: &'static str| {
                let sql = format!(
                    "SELECT COUNT(*) FROM jobs WHERE {mine} AND {column} = '{name}' \
                     AND status = '{status}' AND finished_at >= {from}"
                );
                async move { n(db, &sql).await }
            };
            let (ok, failed, dead, cancelled) = (
                count("succeeded").await,
                count("failed").await,
                count("dead").await,
                count("cancelled").await,
            );
            assert_eq!(
                (
                    &row["succeeded"],
                    &row["failed"],
                    &row["dead"],
                    &row["cancelled"]
                ),
                (&json!(ok), &json!(failed), &json!(dead), &json!(cancelled)),
                "{tenant} {list} {name}"
            );
            let ended = ok + failed + dead;
            match row["failure_rate"].as_f64() {
                Some(rate) => {
                    assert!((rate - (failed + dead) as f64 / ended as f64).abs() < 1e-9)
                }
                None => assert_eq!(ended, 0, "{row}"),
            }
        }
    }

    // Queue depths and the oldest waiting job.
    let queues = body["queues"].as_array().unwrap();
    let waiting_queues = n(
        db,
        &format!(
            "SELECT COUNT(DISTINCT queue) FROM jobs WHERE {mine} AND status IN ('queued','scheduled')"
        ),
    )
    .await;
    assert_eq!(
        queues.len() as i64,
        waiting_queues,
        "{tenant} queues: {queues:?}"
    );
    for q in queues {
        assert_eq!(q["tenant"], tenant);
        let queue = q["queue"].as_str().unwrap();
        for status in ["queued", "scheduled"] {
            let truth = n(
                db,
                &format!(
                    "SELECT COUNT(*) FROM jobs WHERE {mine} AND queue = '{queue}' AND status = '{status}'"
                ),
            )
            .await;
            assert_eq!(q[status], truth, "{tenant} {queue} {status}");
        }
        let oldest = n(
            db,
            &format!(
                "SELECT MIN(run_at) FROM jobs WHERE {mine} AND queue = '{queue}' \
                 AND status IN ('queued','scheduled')"
            ),
        )
        .await;
        assert_eq!(
            millis(&q["oldest_run_at"]),
            oldest,
            "{tenant} {queue} oldest"
        );
        let now = millis(&body["to"]);
        assert_eq!(
            q["oldest_age_ms"].as_i64(),
            (oldest <= now).then_some(now - oldest),
            "{q}"
        );
    }
}

async fn figures_equal_the_truth_from_the_jobs_table(db: Db) {
    let h = harness(db.clone()).await;
    let stop = CancellationToken::new();
    let mut node = kiln_ops::NodeConfig::new("dash-node", &["api"]);
    node.heartbeat_every = Duration::from_millis(100);
    tokio::spawn(kiln_ops::heartbeat_loop(db.clone(), node, stop.clone()));
    let module = h.push(&kiln_wasm::fixtures::hello()).await;
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/queues/parked/pause",
            &h.admin,
            Some(json!({})),
        )
        .await;
    assert!(status.is_success(), "{body}");

    let noop = |spec: Value, queue: &str| json!({"kind": "noop", "spec": spec, "queue": queue});
    let mut jobs = Vec::new();
    for i in 0..6 {
        jobs.push(noop(json!({"sleep_ms": i * 7}), "alpha"));
    }
    for _ in 0..3 {
        jobs.push(noop(json!({"sleep_ms": 40}), "beta"));
    }
    for _ in 0..3 {
        jobs.push(json!({"kind": "wasm", "spec": {"module": module}, "queue": "alpha"}));
    }
    for _ in 0..2 {
        let mut failed = noop(json!({"exit_code": 3}), "beta");
        failed["permanent_exit_codes"] = json!([3]);
        jobs.push(failed);
        let mut dead = noop(json!({"exit_code": 1}), "beta");
        dead["max_attempts"] = json!(1);
        jobs.push(dead);
        let mut retried = noop(json!({"exit_code": 1, "sleep_ms": 5}), "gamma");
        retried["max_attempts"] = json!(2);
        retried["backoff"] = json!({"base_ms": 1, "max_ms": 1, "jitter": false});
        jobs.push(retried);
    }
    let mut ids = Vec::new();
    for job in jobs {
        ids.push(h.submit(job).await["id"].as_str().unwrap().to_string());
    }
    let mut parked = Vec::new();
    for _ in 0..4 {
        parked.push(h.submit(noop(json!({}), "parked")).await["id"].clone());
    }
    let mut later = noop(json!({}), "later");
    later["run_at"] = json!("2099-01-01T00:00:00Z");
    h.submit(later).await;
    for id in &parked[..2] {
        let (status, body) = h
            .call(
                "POST",
                &format!("/api/v1/jobs/{}/cancel", id.as_str().unwrap()),
                &h.admin,
                None,
            )
            .await;
        assert!(status.is_success(), "{body}");
    }
    // Another tenant's jobs, which acme's figures must never count.
    for spec in [json!({}), json!({}), json!({"exit_code": 1})] {
        let mut job = noop(spec, "alpha");
        job["max_attempts"] = json!(1);
        let (status, body) = h.call("POST", "/api/v1/jobs", &h.other, Some(job)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        common_wait(&h, &h.other, &id).await;
    }
    for id in &ids {
        h.wait(id, finished).await;
    }

    let acme = stats(&h, &h.reader, "?range=1h").await;
    assert_eq!(acme["tenant"], "acme");
    assert_eq!(acme["range"], "1h");
    assert_eq!(acme["step_seconds"], 60);
    assert!(acme["deployment"].is_null(), "{acme}");
    check_against_jobs(&db, "acme", &acme).await;
    // The mix covered every outcome.
    for (status, least) in [
        ("succeeded", 12),
        ("failed", 2),
        ("dead", 4),
        ("cancelled", 2),
        ("queued", 2),
        ("scheduled", 1),
    ] {
        assert!(
            acme["jobs_by_status"][status].as_i64().unwrap() >= least,
            "{status}: {acme}"
        );
    }
    assert_eq!(acme["totals"]["retried"], 2, "{acme}");
    assert_eq!(acme["failures"]["by_kind"].as_array().unwrap().len(), 2);

    let globex = stats(&h, &h.other, "").await;
    check_against_jobs(&db, "globex", &globex).await;
    assert_eq!(globex["totals"]["enqueued"], 3);

    // The deployment's key: one tenant on asking, or every tenant, and the
    // fleet.
    let system_acme = stats(&h, &h.system, "?range=1h&tenant=acme").await;
    assert_eq!(system_acme["totals"], acme["totals"]);
    assert_eq!(system_acme["failures"], acme["failures"]);
    let everyone = stats(&h, &h.system, "?range=1h").await;
    assert!(everyone["tenant"].is_null());
    for field in [
        "enqueued",
        "started",
        "succeeded",
        "failed",
        "dead",
        "cancelled",
    ] {
        let sum =
            acme["totals"][field].as_i64().unwrap() + globex["totals"][field].as_i64().unwrap();
        assert_eq!(everyone["totals"][field], sum, "{field}");
    }
    let deployment = &everyone["deployment"];
    assert_eq!(
        deployment["nodes_online"],
        n(&db, "SELECT COUNT(*) FROM nodes WHERE status = 'online'").await
    );
    assert_eq!(deployment["nodes_online"], 1, "{deployment}");
    assert_eq!(deployment["vms_live"], 0);
    // A tenant's key may not look at another tenant.
    let (status, body) = h
        .call(
            "GET",
            "/api/v1/dashboard/stats?tenant=globex",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "forbidden");

    // Open incidents (the dead-letter detector may open one for acme).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let truth = n(
            &db,
            "SELECT COUNT(*) FROM incidents WHERE tenant = 'acme' AND status <> 'resolved'",
        )
        .await;
        let got = stats(&h, &h.admin, "").await["incidents_open"].clone();
        if got == truth {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "incidents: {got} against {truth}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Folding every minute into its hour (as retention does to minutes
    // past the last hour) changes no count of the day's and week's views.
    let day_before = stats(&h, &h.admin, "?range=24h").await;
    let week_before = stats(&h, &h.admin, "?range=7d").await;
    assert_eq!(day_before["throughput"].as_array().unwrap().len(), 24);
    assert_eq!(week_before["throughput"].as_array().unwrap().len(), 168);
    assert_eq!(day_before["totals"], acme["totals"]);
    let future = kiln_api::now_millis() + 3 * 3_600_000;
    let mut folded = 0;
    while db.rollup_fold_hour(future).await.unwrap().is_some() {
        folded += 1;
    }
    assert!(folded >= 1);
    assert_eq!(
        n(
            &db,
            "SELECT COUNT(*) FROM job_rollups WHERE shard <> 0 OR minute % 3600000 <> 0"
        )
        .await,
        0
    );
    for (range, before) in [("24h", &day_before), ("7d", &week_before)] {
        let after = stats(&h, &h.admin, &format!("?range={range}")).await;
        assert_eq!(after["totals"], before["totals"], "{range}");
        assert_eq!(after["latency"], before["latency"], "{range}");
        assert_eq!(after["failures"], before["failures"], "{range}");
    }
    // Retention deletes rollups past theirs.
    assert!(db.rollup_delete_before(future, 1_000).await.unwrap() > 0);
    let gone = stats(&h, &h.admin, "?range=7d").await;
    assert_eq!(gone["totals"]["enqueued"], 0, "{gone}");
    assert_eq!(
        gone["jobs_by_status"]["queued"], 2,
        "waiting counts are not rollups"
    );
    stop.cancel();
    h.stop().await;
}

async fn common_wait(h: &Harness, key: &str, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, job) = h
            .call("GET", &format!("/api/v1/jobs/{id}"), key, None)
            .await;
        if finished(&job) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn an_empty_database_answers_zeros(db: Db) {
    let h = harness(db).await;
    for (range, points) in [("1h", 60), ("24h", 24), ("7d", 168)] {
        for key in [&h.admin, &h.system] {
            let body = stats(&h, key, &format!("?range={range}")).await;
            assert_eq!(body["throughput"].as_array().unwrap().len(), points);
            assert!(body["throughput"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["enqueued"] == 0 && p["succeeded"] == 0));
            assert_eq!(body["totals"]["enqueued"], 0);
            for status in ["queued", "running", "succeeded", "dead"] {
                assert_eq!(body["jobs_by_status"][status], 0, "{body}");
            }
            assert_eq!(body["latency"]["run_time"]["count"], 0);
            assert!(body["latency"]["run_time"]["p50_ms"].is_null());
            assert_eq!(body["queues"], json!([]));
            assert_eq!(body["failures"]["by_kind"], json!([]));
            assert_eq!(body["incidents_open"], 0);
            assert_eq!(body["deployment"].is_null(), key == &h.admin, "{body}");
        }
    }
    h.stop().await;
}

async fn bad_parameters_are_refused(db: Db) {
    let h = harness(db).await;
    for query in [
        "?range=2h",
        "?range=",
        "?range=1H",
        "?range=1h&extra=1",
        "?tenant=%00",
    ] {
        let (status, body) = h
            .call(
                "GET",
                &format!("/api/v1/dashboard/stats{query}"),
                &h.system,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(error_code(&body), "bad_request", "{query}");
        assert!(body["error"]["message"].is_string());
    }
    let (status, body) = h
        .call("GET", "/api/v1/dashboard/stats", "kiln_nobody_x", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    h.stop().await;
}
