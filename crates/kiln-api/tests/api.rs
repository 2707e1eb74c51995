//! The HTTP API end to end, on SQLite and on PostgreSQL: requests go through
//! the real router, jobs through the real queue and worker, wasm jobs
//! through wasmtime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_api::AppState;
use kiln_blob::BlobStore;
use kiln_core::{Scope, Scopes};
use kiln_db::Db;
use kiln_wasm::{fixtures, WasmConfig, WasmHandler, WasmRuntime};
use kiln_worker::{Handlers, NoopHandler, Worker, WorkerConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

kiln_db::on_both_databases!(
    health_is_open_and_everything_else_needs_a_key,
    submit_get_and_idempotency,
    scopes_are_enforced,
    tenants_never_see_each_other,
    bad_input_gets_a_clear_4xx,
    wasm_modules_and_runs,
    wasm_limits_end_jobs_with_reasons,
    cancel_and_retry_through_the_api,
    list_filters_and_cursor,
    paused_queues_hold_jobs,
    a_thousand_concurrent_wasm_jobs,
    openapi_and_metrics,
    rate_limits_hold_each_key_apart,
);

struct Harness {
    app: Router,
    state: Arc<AppState>,
    admin: String,
    reader: String,
    other: String,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

async fn harness(db: Db) -> Harness {
    let root = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-api"));
    let blobs = BlobStore::local(&root.join("blobs")).unwrap();
    let wasm = WasmRuntime::new(
        WasmConfig {
            cache_dir: Some(root.join("cache")),
            scratch_dir: root.join("scratch"),
            max_instances: 128,
            ..WasmConfig::default()
        },
        blobs.clone(),
    )
    .unwrap();
    let key = |tenant: &'static str, scope: Scope| {
        let db = db.clone();
        async move {
            kiln_api::issue_key(&db, tenant, "test", Scopes(vec![scope]))
                .await
                .unwrap()
                .1
        }
    };
    let admin = key("acme", Scope::Admin).await;
    let reader = key("acme", Scope::Read).await;
    let other = key("globex", Scope::Admin).await;
    let mut config = WorkerConfig::new(&kiln_db::testing::unique_name("w"));
    config.slots = 32;
    config.poll_every = Duration::from_millis(200);
    let handlers = Handlers::new()
        .with("wasm", Arc::new(WasmHandler(wasm.clone())))
        .with("noop", Arc::new(NoopHandler));
    let stop = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(db.clone(), handlers, config).run(stop.clone()));
    let state = AppState::new(db, blobs, Some(wasm));
    let app = kiln_api::app(state.clone());
    Harness {
        app,
        state,
        admin,
        reader,
        other,
        stop,
        worker,
    }
}

impl Harness {
    async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, body)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {key}"));
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        self.send(request.body(body).unwrap()).await
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        content_type: &str,
        body: impl Into<Body>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", content_type);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        self.send(request.body(body.into()).unwrap()).await
    }

    async fn push(&self, wat: &str) -> String {
        let (status, body) = self
            .raw(
                "POST",
                "/api/v1/modules",
                Some(&self.admin),
                "text/plain",
                wat.to_string(),
            )
            .await;
        assert!(status.is_success(), "{status} {body}");
        body["id"].as_str().unwrap().to_string()
    }

    async fn submit(&self, body: Value) -> Value {
        let (status, job) = self
            .call("POST", "/api/v1/jobs", &self.admin, Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{job}");
        job
    }

    async fn wait(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, job) = self
                .call("GET", &format!("/api/v1/jobs/{id}"), &self.admin, None)
                .await;
            if done(&job) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} stuck: {job}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.worker.await.unwrap();
    }
}

fn finished(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled" | "dead")
    )
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

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
    assert_eq!(attempts["attempts"][0]["outcome"], "succeeded");
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

async fn tenants_never_see_each_other(db: Db) {
    let h = harness(db).await;
    let job = h
        .submit(json!({"kind": "noop", "spec": {"sleep_ms": 60_000}}))
        .await;
    let id = job["id"].as_str().unwrap();
    for (method, path) in [
        ("GET", format!("/api/v1/jobs/{id}")),
        ("GET", format!("/api/v1/jobs/{id}/attempts")),
        ("POST", format!("/api/v1/jobs/{id}/cancel")),
        ("POST", format!("/api/v1/jobs/{id}/retry")),
    ] {
        let (status, body) = h.call(method, &path, &h.other, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(error_code(&body), "not_found");
    }
    let (_, list) = h.call("GET", "/api/v1/jobs", &h.other, None).await;
    assert_eq!(list["jobs"], json!([]));
    let module = h.push(&fixtures::hello()).await;
    let (status, _) = h
        .call("GET", &format!("/api/v1/modules/{module}"), &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &h.other,
            Some(json!({"kind": "wasm", "spec": {"module": module}})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    h.call("POST", &format!("/api/v1/jobs/{id}/cancel"), &h.admin, None)
        .await;
    h.stop().await;
}

async fn bad_input_gets_a_clear_4xx(db: Db) {
    let h = harness(db).await;
    let key = Some(h.admin.as_str());
    let cases: Vec<(&str, &str, &str, String, StatusCode)> = vec![
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            "{bad".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            "[]".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            r#"{"kind":"noop","zzz":1}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            r#"{"kind":"noop","priority":"urgent"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            r#"{"kind":"noop","max_attempts":0}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            r#"{"kind":"noop","timeout_ms":-5}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            r#"{"kind":"no such kind!"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            r#"{"kind":"noop","run_at":"tomorrow"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            r#"{"kind":"noop","run_at":"2030-01-01T00:00:00Z","delay_ms":5}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            r#"{"kind":"noop","spec":"text"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            r#"{"kind":"wasm","spec":{"module":"nope"}}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            r#"{"kind":"noop","max_attempts":99999999999}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "text/plain",
            r#"{"kind":"noop"}"#.into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "POST",
            "/api/v1/jobs",
            "application/json",
            format!(
                r#"{{"kind":"noop","spec":{{"x":"{}"}}}}"#,
                "a".repeat(2 << 20)
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "GET",
            "/api/v1/jobs/abc",
            "application/json",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/api/v1/jobs/99999999",
            "application/json",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/api/v1/jobs?status=bogus",
            "application/json",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/api/v1/jobs?limit=0",
            "application/json",
            String::new(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "GET",
            "/api/v1/jobs?label=nocolon",
            "application/json",
            String::new(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "GET",
            "/api/v1/jobs?cursor=zz",
            "application/json",
            String::new(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "GET",
            "/api/v1/nowhere",
            "application/json",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            "DELETE",
            "/api/v1/jobs",
            "application/json",
            String::new(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "PUT",
            "/api/v1/queues/default",
            "application/json",
            r#"{"concurrency_limit":0}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "PUT",
            "/api/v1/queues/bad%20name",
            "application/json",
            r#"{"paused":true}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/modules",
            "application/wasm",
            "not wasm".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/api/v1/modules",
            "text/plain",
            "(module (func".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/api/v1/modules",
            "image/png",
            "x".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "POST",
            "/api/v1/keys",
            "application/json",
            r#"{"name":"x","scopes":["root"]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/v1/keys",
            "application/json",
            r#"{"name":"x","scopes":[]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (method, path, content_type, body, expect) in cases {
        let (status, answer) = h.raw(method, path, key, content_type, body.clone()).await;
        assert_eq!(
            status,
            expect,
            "{method} {path} {}: {answer}",
            &body[..body.len().min(80)]
        );
        assert!(
            answer["error"]["code"].is_string(),
            "{method} {path}: {answer}"
        );
        assert!(
            answer["error"]["message"].is_string(),
            "{method} {path}: {answer}"
        );
    }
    // Nothing accepted was lost along the way, and the server still answers.
    let (status, list) = h.call("GET", "/api/v1/jobs", &h.admin, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["jobs"], json!([]));
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
    let took = attempts["attempts"][0]["duration_ms"].as_i64().unwrap();
    assert!((500..=600).contains(&took), "killed after {took} ms");

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
    let asked = Instant::now();
    let (status, _) = h
        .call("POST", &format!("/api/v1/jobs/{id}/cancel"), &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let done = h.wait(&id, finished).await;
    assert!(asked.elapsed() < Duration::from_secs(1));
    assert_eq!(done["status"], "cancelled");
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
    tokio::time::sleep(Duration::from_millis(500)).await;
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

async fn openapi_and_metrics(db: Db) {
    let h = harness(db).await;
    let (status, doc) = h.call("GET", "/api/v1/openapi.json", &h.reader, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/jobs",
        "/api/v1/jobs/{id}",
        "/api/v1/run",
        "/api/v1/modules",
        "/api/v1/queues",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    h.submit(json!({"kind": "noop", "queue": "metered", "delay_ms": 60_000, "priority": "low"}))
        .await;
    let (status, text) = h.call("GET", "/metrics", &h.reader, None).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap().to_string();
    assert!(
        text.contains(r#"kiln_queue_depth{queue="metered",priority="low"} 1"#),
        "{text}"
    );
    assert!(text.contains("kiln_http_requests_total"));
    let (_, workers) = h.call("GET", "/api/v1/workers", &h.reader, None).await;
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
    // The allowance comes back at the rate: one request per 200 ms.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let (status, _) = h.call("GET", "/api/v1/jobs", &h.admin, None).await;
    assert_eq!(status, StatusCode::OK);
    h.stop().await;
}
