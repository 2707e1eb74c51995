//! The HTTP API end to end, on SQLite and on PostgreSQL: requests go through
//! the real router, jobs through the real queue and worker, wasm jobs
//! through wasmtime. Hostile input, tenancy and the OpenAPI document have
//! their own suites (`edge.rs`, `openapi.rs`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{error_code, finished, harness};
use http_body_util::BodyExt;
use kiln_db::Db;
use kiln_wasm::{fixtures, WasmRuntime};
use serde_json::{json, Value};
use tower::ServiceExt;

kiln_db::on_both_databases!(
    health_is_open_and_everything_else_needs_a_key,
    submit_get_and_idempotency,
    scopes_are_enforced,
    keys_are_minted_within_the_callers_reach,
    wasm_modules_and_runs,
    wasm_limits_end_jobs_with_reasons,
    cancel_and_retry_through_the_api,
    list_filters_and_cursor,
    paused_queues_hold_jobs,
    a_thousand_concurrent_wasm_jobs,
    metrics_count_queues_and_requests,
    rate_limits_hold_each_key_apart,
);

async fn health_is_open_and_everything_else_needs_a_key(db: Db) {
    let h = harness(db).await;
    let (status, body) = h.raw("GET", "/health", None, "text/plain", "").await;
    assert_eq!((status, body), (StatusCode::OK, Value::String("OK".into())));
    for path in [
        "/api/v1/jobs",
        "/metrics",
        "/api/v1/queues",
        "/api/v1/openapi.json",
    ] {
        let (status, body) = h.raw("GET", path, None, "text/plain", "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(error_code(&body), "unauthorized");
        let (status, _) = h.call("GET", path, "kiln_nope_nope", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, _) = h.raw("GET", "/api/v1/jobs", None, "text/plain", "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    h.stop().await;
}

async fn submit_get_and_idempotency(db: Db) {
    let h = harness(db).await;
    let body = json!({"kind": "noop", "spec": {"stdout": "done"}, "idempotency_key": "k-1",
                      "labels": {"team": "red"}, "priority": "high", "max_attempts": 2});
    let job = h.submit(body.clone()).await;
    assert_eq!(job["status"], "queued");
    assert_eq!(job["priority"], "high");
    let id = job["id"].as_str().unwrap().to_string();
    let (status, again) = h.call("POST", "/api/v1/jobs", &h.admin, Some(body)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["id"], job["id"]);
    let done = h.wait(&id, finished).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["result"]["stdout"], "done");
    assert_eq!(done["result"]["exit_code"], 0);
    assert!(done["result"]["duration_ms"].is_number());
    let (status, attempts) = h
        .call(
            "GET",
            &format!("/api/v1/jobs/{id}/attempts"),
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let attempt = &attempts["attempts"][0];
    assert_eq!(attempt["outcome"], "succeeded");
    // Attempts speak RFC 3339 like the job itself, never epoch numbers.
    for field in ["started_at", "finished_at"] {
        let text = attempt[field]
            .as_str()
            .unwrap_or_else(|| panic!("{attempt}"));
        assert!(
            chrono::DateTime::parse_from_rfc3339(text).is_ok() && text.ends_with('Z'),
            "{field}: {text}"
        );
    }
    // Waiting in the request returns the finished job.
    let (status, waited) = h
        .call(
            "POST",
            "/api/v1/jobs?wait=true",
            &h.admin,
            Some(json!({"kind": "noop", "spec": {"stdout": "x"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(waited["status"], "succeeded");
    // Delayed jobs are scheduled.
    let delayed = h.submit(json!({"kind": "noop", "delay_ms": 60_000})).await;
    assert_eq!(delayed["status"], "scheduled");
    let at = h
        .submit(json!({"kind": "noop", "run_at": "2099-01-01T00:00:00Z"}))
        .await;
    assert_eq!(at["run_at"], "2099-01-01T00:00:00.000Z");
    h.stop().await;
}

async fn scopes_are_enforced(db: Db) {
    let h = harness(db).await;
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &h.reader,
            Some(json!({"kind": "noop"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&body), "forbidden");
    let (status, _) = h.call("GET", "/api/v1/jobs", &h.reader, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h
        .call("POST", "/api/v1/queues/default/pause", &h.reader, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.call("GET", "/api/v1/keys", &h.reader, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // An admin makes a key; revoking it shuts it out at once.
    let (status, created) = h
        .call(
            "POST",
            "/api/v1/keys",
            &h.admin,
            Some(json!({"name": "ci", "scopes": ["write"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let secret = created["secret"].as_str().unwrap().to_string();
    let (status, _) = h.call("GET", "/api/v1/jobs", &secret, None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, keys) = h.call("GET", "/api/v1/keys", &h.admin, None).await;
    assert!(keys["keys"].as_array().unwrap().len() >= 3);
    assert!(
        !keys.to_string().contains(&secret),
        "secrets are never listed"
    );
    let (status, _) = h
        .call(
            "DELETE",
            &format!("/api/v1/keys/{}", created["id"].as_str().unwrap()),
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = h.call("GET", "/api/v1/jobs", &secret, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    h.stop().await;
}

async fn keys_are_minted_within_the_callers_reach(db: Db) {
    let h = harness(db).await;
    let mint = |key: &str, body: Value| {
        let key = key.to_string();
        let h = &h;
        async move { h.call("POST", "/api/v1/keys", &key, Some(body)).await }
    };
    // Never above one's own scope, never for another tenant without system.
    let (status, body) = mint(&h.admin, json!({"name": "up", "scopes": ["system"]})).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let (status, body) = mint(
        &h.admin,
        json!({"name": "x", "scopes": ["read"], "tenant": "globex"}),
    )
    .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let (status, body) = mint(&h.reader, json!({"name": "x", "scopes": ["read"]})).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    // At one's own scope, for one's own tenant: fine.
    let (status, body) = mint(&h.admin, json!({"name": "peer", "scopes": ["admin"]})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["tenant"], "acme");
    // The system key mints for any tenant; the key acts there.
    let (status, body) = mint(
        &h.system,
        json!({"name": "for-globex", "scopes": ["write"], "tenant": "globex"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["tenant"], "globex");
    let globex = body["secret"].as_str().unwrap().to_string();
    let (status, job) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &globex,
            Some(json!({"kind": "noop"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = h
        .call(
            "GET",
            &format!("/api/v1/jobs/{}", job["id"].as_str().unwrap()),
            &h.other,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "the job is globex's");
    h.stop().await;
}

async fn wasm_modules_and_runs(db: Db) {
    let h = harness(db).await;
    let hello = h.push(&fixtures::hello()).await;
    assert!(hello.starts_with("sha256:"));
    // The same bytes give the same id; binary and text forms agree.
    let binary = WasmRuntime::to_binary(fixtures::hello().as_bytes()).unwrap();
    let (status, again) = h
        .raw(
            "POST",
            "/api/v1/modules",
            Some(&h.admin),
            "application/wasm",
            binary,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["id"], hello.as_str());
    let (_, list) = h.call("GET", "/api/v1/modules", &h.admin, None).await;
    assert_eq!(list["modules"].as_array().unwrap().len(), 1);

    let (status, job) = h
        .call(
            "POST",
            "/api/v1/run",
            &h.admin,
            Some(json!({"kind": "wasm", "spec": {"module": hello}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["stdout"], "hello world\n");

    let echo = h.push(&fixtures::echo()).await;
    let (_, job) = h
        .call(
            "POST",
            "/api/v1/run",
            &h.admin,
            Some(json!({"kind": "wasm", "spec": {"module": echo, "stdin": "ping"}})),
        )
        .await;
    assert_eq!(job["result"]["stdout"], "ping");

    let args = h.push(&fixtures::args_and_env()).await;
    let (_, job) = h
        .call(
            "POST",
            "/api/v1/run",
            &h.admin,
            Some(json!({"kind": "wasm",
            "spec": {"module": args, "args": ["x"], "env": {"A": "1"}}})),
        )
        .await;
    assert_eq!(job["result"]["stdout"], "main\u{0}x\u{0}A=1\u{0}");

    let exit3 = h.push(&fixtures::exit_with(3)).await;
    let (_, job) = h
        .call(
            "POST",
            "/api/v1/run",
            &h.admin,
            Some(json!({"kind": "wasm", "spec": {"module": exit3}})),
        )
        .await;
    assert_eq!(job["status"], "dead");
    assert_eq!(job["result"]["exit_code"], 3);
    assert_eq!(job["result"]["stderr"], "bye\n");

    let (status, _) = h
        .call(
            "DELETE",
            &format!("/api/v1/modules/{exit3}"),
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &h.admin,
            Some(json!({"kind": "wasm", "spec": {"module": exit3}})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    h.stop().await;
}

async fn wasm_limits_end_jobs_with_reasons(db: Db) {
    let h = harness(db).await;
    let spin = h.push(&fixtures::spin()).await;
    let job = h
        .submit(
            json!({"kind": "wasm", "spec": {"module": spin}, "timeout_ms": 500, "max_attempts": 1}),
        )
        .await;
    let done = h.wait(job["id"].as_str().unwrap(), finished).await;
    assert_eq!(done["error"], "timeout");
    let (_, attempts) = h
        .call(
            "GET",
            &format!("/api/v1/jobs/{}/attempts", done["id"].as_str().unwrap()),
            &h.admin,
            None,
        )
        .await;
    // Killed at its timeout, not before; how long after depends on the
    // machine's load, so only the outcome is asserted beyond that.
    let attempt = &attempts["attempts"][0];
    assert_eq!(attempt["outcome"], "timeout", "{attempt}");
    let took = attempt["duration_ms"].as_i64().unwrap();
    assert!(took >= 500, "killed after {took} ms, before its timeout");

    for (wat, spec, expect) in [
        (
            fixtures::memory_bomb(),
            json!({"memory_mib": 8}),
            "memory_limit",
        ),
        (
            fixtures::flood(),
            json!({"output_limit_bytes": 10_000}),
            "output_truncated",
        ),
        (fixtures::trap(), json!({}), "trap: "),
        (fixtures::stack_overflow(), json!({}), "trap: "),
    ] {
        let module = h.push(&wat).await;
        let mut spec = spec;
        spec["module"] = json!(module);
        let job = h
            .submit(json!({"kind": "wasm", "spec": spec, "max_attempts": 3}))
            .await;
        let done = h.wait(job["id"].as_str().unwrap(), finished).await;
        assert_eq!(done["status"], "failed", "{done}");
        assert_eq!(done["attempts"], 1, "limits are permanent: {done}");
        assert!(
            done["error"].as_str().unwrap().starts_with(expect),
            "{done}"
        );
    }
    h.stop().await;
}

async fn cancel_and_retry_through_the_api(db: Db) {
    let h = harness(db).await;
    let job = h
        .submit(json!({"kind": "noop", "spec": {"sleep_ms": 60_000}}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    h.wait(&id, |j| j["status"] == "running").await;
    let (status, _) = h
        .call("POST", &format!("/api/v1/jobs/{id}/cancel"), &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    // The sandbox was killed: the job ends long before its 60 s sleep (the
    // wait gives up after 30 s), and the attempt is recorded as cancelled.
    let done = h.wait(&id, finished).await;
    assert_eq!(done["status"], "cancelled");
    let (_, attempts) = h
        .call(
            "GET",
            &format!("/api/v1/jobs/{id}/attempts"),
            &h.admin,
            None,
        )
        .await;
    assert_eq!(
        attempts["attempts"][0]["outcome"], "cancelled",
        "{attempts}"
    );
    let (status, body) = h
        .call("POST", &format!("/api/v1/jobs/{id}/cancel"), &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, retried) = h
        .call("POST", &format!("/api/v1/jobs/{id}/retry"), &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(retried["status"], "queued");
    h.wait(&id, |j| j["status"] == "running").await;
    let (status, body) = h
        .call("POST", &format!("/api/v1/jobs/{id}/retry"), &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    h.call("POST", &format!("/api/v1/jobs/{id}/cancel"), &h.admin, None)
        .await;
    let queued = h.submit(json!({"kind": "noop", "delay_ms": 60_000})).await;
    let (status, cancelled) = h
        .call(
            "POST",
            &format!("/api/v1/jobs/{}/cancel", queued["id"].as_str().unwrap()),
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cancelled["status"], "cancelled");
    h.stop().await;
}

async fn list_filters_and_cursor(db: Db) {
    let h = harness(db).await;
    for i in 0..7 {
        h.submit(
            json!({"kind": "noop", "queue": if i % 2 == 0 { "even" } else { "odd" },
                        "labels": {"n": i.to_string()}, "delay_ms": 60_000}),
        )
        .await;
    }
    let mut seen = 0;
    let mut path = "/api/v1/jobs?limit=3".to_string();
    loop {
        let (status, page) = h.call("GET", &path, &h.admin, None).await;
        assert_eq!(status, StatusCode::OK);
        seen += page["jobs"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/jobs?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, 7);
    let (_, even) = h
        .call("GET", "/api/v1/jobs?queue=even", &h.admin, None)
        .await;
    assert_eq!(even["jobs"].as_array().unwrap().len(), 4);
    let (_, labelled) = h
        .call("GET", "/api/v1/jobs?label=n:3", &h.admin, None)
        .await;
    assert_eq!(labelled["jobs"].as_array().unwrap().len(), 1);
    let (_, scheduled) = h
        .call(
            "GET",
            "/api/v1/jobs?status=scheduled&kind=noop",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(scheduled["jobs"].as_array().unwrap().len(), 7);
    let (_, none) = h
        .call(
            "GET",
            "/api/v1/jobs?created_after=2099-01-01T00:00:00Z",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(none["jobs"], json!([]));
    h.stop().await;
}

async fn paused_queues_hold_jobs(db: Db) {
    let h = harness(db).await;
    let (status, queue) = h
        .call("POST", "/api/v1/queues/mail/pause", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(queue["paused"], true);
    let job = h.submit(json!({"kind": "noop", "queue": "mail"})).await;
    // A job the worker would take after the held one, were it not held:
    // once it has run, the worker has passed the held one over.
    let later = h.submit(json!({"kind": "noop", "priority": "low"})).await;
    h.wait(later["id"].as_str().unwrap(), finished).await;
    let (_, held) = h
        .call(
            "GET",
            &format!("/api/v1/jobs/{}", job["id"].as_str().unwrap()),
            &h.admin,
            None,
        )
        .await;
    assert_eq!(held["status"], "queued");
    let (_, queues) = h.call("GET", "/api/v1/queues", &h.admin, None).await;
    let mail = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "mail")
        .unwrap()
        .clone();
    assert_eq!(mail["waiting"]["default"], 1);
    h.call("POST", "/api/v1/queues/mail/resume", &h.admin, None)
        .await;
    let done = h.wait(job["id"].as_str().unwrap(), finished).await;
    assert_eq!(done["status"], "succeeded");
    let (status, limited) = h
        .call(
            "PUT",
            "/api/v1/queues/mail",
            &h.admin,
            Some(json!({"concurrency_limit": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(limited["concurrency_limit"], 2);
    assert_eq!(limited["paused"], false);
    h.stop().await;
}

async fn a_thousand_concurrent_wasm_jobs(db: Db) {
    let h = Arc::new(harness(db).await);
    let echo = h.push(&fixtures::echo()).await;
    let mut tasks = Vec::new();
    for i in 0..1_000 {
        let h = h.clone();
        let echo = echo.clone();
        tasks.push(tokio::spawn(async move {
            let (status, job) = h
                .call("POST", "/api/v1/jobs", &h.admin,
                      Some(json!({"kind": "wasm", "spec": {"module": echo, "stdin": format!("job {i}")}})))
                .await;
            assert_eq!(status, StatusCode::CREATED);
            (i, job["id"].as_str().unwrap().to_string())
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    for (i, id) in ids {
        let job = h.wait(&id, finished).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["result"]["stdout"], format!("job {i}"));
        assert_eq!(job["attempts"], 1);
    }
    Arc::into_inner(h).unwrap().stop().await;
}

async fn metrics_count_queues_and_requests(db: Db) {
    let h = harness(db).await;
    // Queue names are the gauge's label only for configured queues, and
    // this one is unique to the run: the recorder is shared by every test
    // in this process.
    let metered = format!("metered-{}", h.db.backend());
    let (status, _) = h
        .call(
            "PUT",
            &format!("/api/v1/queues/{metered}"),
            &h.system,
            Some(json!({"paused": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let job = h
        .submit(json!({"kind": "noop", "queue": metered, "delay_ms": 60_000, "priority": "low"}))
        .await;
    let unconfigured = format!("tenant-chosen-{}", h.db.backend());
    h.submit(json!({"kind": "noop", "queue": unconfigured, "delay_ms": 60_000}))
        .await;
    let gauge = format!(r#"kiln_queue_depth{{queue="{metered}",priority="low"}}"#);
    let (status, text) = h.call("GET", "/metrics", &h.system, None).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap().to_string();
    assert!(text.contains(&format!("{gauge} 1\n")), "{text}");
    assert!(text.contains("kiln_http_requests_total"));
    assert!(!text.contains(&unconfigured), "{text}");
    assert!(text.contains(r#"queue="other""#), "{text}");
    // Drained: the gauge says 0, not its last value.
    h.call(
        "POST",
        &format!("/api/v1/jobs/{}/cancel", job["id"].as_str().unwrap()),
        &h.admin,
        None,
    )
    .await;
    let (_, text) = h.call("GET", "/metrics", &h.system, None).await;
    let text = text.as_str().unwrap().to_string();
    assert!(text.contains(&format!("{gauge} 0\n")), "{text}");
    // Made-up methods are one label value, not one each.
    h.raw(
        "FROBNICATE",
        "/api/v1/jobs",
        Some(&h.admin),
        "text/plain",
        "",
    )
    .await;
    let (_, text) = h.call("GET", "/metrics", &h.system, None).await;
    let text = text.as_str().unwrap().to_string();
    assert!(!text.contains("FROBNICATE"), "{text}");
    let (_, workers) = h.call("GET", "/api/v1/workers", &h.system, None).await;
    assert!(workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["state"] == "online"));
    h.stop().await;
}

async fn rate_limits_hold_each_key_apart(db: Db) {
    let h = harness(db).await;
    // 5 a second, bursts of 5: the sixth request at once is refused.
    h.state.limit_rate(5, 5);
    for _ in 0..5 {
        let (status, _) = h.call("GET", "/api/v1/jobs", &h.admin, None).await;
        assert_eq!(status, StatusCode::OK);
    }
    let request = Request::builder()
        .uri("/api/v1/jobs")
        .header("authorization", format!("Bearer {}", h.admin))
        .body(Body::empty())
        .unwrap();
    let response = h.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(error_code(&body), "rate_limited");
    // Another key of the same tenant has its own allowance; a bad key is
    // still told it is bad, not that it is throttled.
    let (status, _) = h.call("GET", "/api/v1/jobs", &h.reader, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h.call("GET", "/api/v1/jobs", "kiln_nope_nope", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The allowance comes back at the rate (one request per 200 ms); the
    // deadline only guards against a hang.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = h.call("GET", "/api/v1/jobs", &h.admin, None).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(Instant::now() < deadline, "the allowance never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Made-up keys are looked up at the same rate per source, so a stream
    // of them is throttled too (each new one costs a hash and a query);
    // until then each is told it is unknown.
    let mut answers = Vec::new();
    for i in 0..50 {
        let (status, body) = h
            .call("GET", "/api/v1/jobs", &format!("kiln_made_up_{i}"), None)
            .await;
        answers.push((status, error_code(&body).to_string()));
    }
    assert!(
        answers
            .iter()
            .all(
                |(status, code)| (*status == StatusCode::UNAUTHORIZED && code == "unauthorized")
                    || (*status == StatusCode::TOO_MANY_REQUESTS && code == "rate_limited")
            ),
        "{answers:?}"
    );
    assert!(
        answers
            .iter()
            .any(|(status, _)| *status == StatusCode::TOO_MANY_REQUESTS),
        "unknown keys were never throttled: {answers:?}"
    );
    h.stop().await;
}
