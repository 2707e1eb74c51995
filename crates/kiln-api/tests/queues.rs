//! Queues through the API with two tenants, on SQLite and PostgreSQL: each
//! tenant sees and controls only its own queues, and one tenant's pause or
//! limit never holds up another's jobs.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_api::AppState;
use kiln_blob::BlobStore;
use kiln_core::{Scope, Scopes};
use kiln_db::Db;
use serde_json::{json, Value};
use tower::ServiceExt;

kiln_db::on_both_databases!(
    list_shows_only_the_callers_queues,
    get_shows_the_callers_settings,
    pause_holds_only_the_callers_jobs,
    resume_frees_only_the_callers_jobs,
    limit_caps_only_the_callers_jobs,
    queue_names_are_checked,
);

struct Harness {
    app: Router,
    db: Db,
    acme: String,
    globex: String,
}

async fn harness(db: Db) -> Harness {
    let root = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-api-queues"));
    let blobs = BlobStore::local(&root.join("blobs")).unwrap();
    let key = |tenant: &'static str| {
        let db = db.clone();
        async move {
            kiln_api::issue_key(&db, tenant, "test", Scopes(vec![Scope::Admin]))
                .await
                .unwrap()
                .1
        }
    };
    let acme = key("acme").await;
    let globex = key("globex").await;
    let app = kiln_api::app(AppState::new(db.clone(), blobs, None));
    Harness {
        app,
        db,
        acme,
        globex,
    }
}

impl Harness {
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
        let response = self
            .app
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn ok(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> Value {
        let (status, body) = self.call(method, path, key, body).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {body}");
        body
    }

    async fn submit(&self, key: &str, queue: &str) -> i64 {
        let (status, job) = self
            .call(
                "POST",
                "/api/v1/jobs",
                key,
                Some(json!({"kind": "noop", "queue": queue})),
            )
            .await;
        assert!(status.is_success(), "{status} {job}");
        job["id"].as_str().unwrap().parse().unwrap()
    }

    /// The tenants whose jobs a worker would be given now.
    async fn leased_tenants(&self) -> Vec<String> {
        let now = kiln_worker::now_millis();
        let mut tenants: Vec<String> = self
            .db
            .job_lease("w", &["noop".to_string()], 100, 30_000, now)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.tenant)
            .collect();
        tenants.sort();
        tenants
    }
}

fn names(list: &Value) -> Vec<String> {
    list["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap().to_string())
        .collect()
}

async fn list_shows_only_the_callers_queues(db: Db) {
    let h = harness(db).await;
    h.ok(
        "PUT",
        "/api/v1/queues/acme-secret-plans",
        &h.acme,
        Some(json!({"concurrency_limit": 3})),
    )
    .await;
    h.ok("POST", "/api/v1/queues/acme-paused/pause", &h.acme, None)
        .await;
    h.submit(&h.acme, "acme-busy").await;
    let theirs = h.ok("GET", "/api/v1/queues", &h.globex, None).await;
    assert_eq!(names(&theirs), vec!["default"]);
    let mine = h.ok("GET", "/api/v1/queues", &h.acme, None).await;
    assert_eq!(
        names(&mine),
        vec!["acme-busy", "acme-paused", "acme-secret-plans", "default"]
    );
}

async fn get_shows_the_callers_settings(db: Db) {
    let h = harness(db).await;
    h.ok(
        "PUT",
        "/api/v1/queues/mail",
        &h.acme,
        Some(json!({"paused": true, "concurrency_limit": 2})),
    )
    .await;
    h.submit(&h.acme, "mail").await;
    let mine = h.ok("GET", "/api/v1/queues/mail", &h.acme, None).await;
    assert_eq!(
        (mine["paused"].clone(), mine["concurrency_limit"].clone()),
        (json!(true), json!(2))
    );
    assert_eq!(mine["waiting"]["default"], 1);
    let theirs = h.ok("GET", "/api/v1/queues/mail", &h.globex, None).await;
    assert_eq!(theirs["paused"], false);
    assert_eq!(theirs["concurrency_limit"], Value::Null);
    assert_eq!(theirs["waiting"]["default"], 0);
}

async fn pause_holds_only_the_callers_jobs(db: Db) {
    let h = harness(db).await;
    let paused = h
        .ok("POST", "/api/v1/queues/mail/pause", &h.globex, None)
        .await;
    assert_eq!(paused["paused"], true);
    h.submit(&h.acme, "mail").await;
    h.submit(&h.globex, "mail").await;
    assert_eq!(h.leased_tenants().await, vec!["acme"]);
    let acme = h.ok("GET", "/api/v1/queues/mail", &h.acme, None).await;
    assert_eq!(acme["paused"], false);
}

async fn resume_frees_only_the_callers_jobs(db: Db) {
    let h = harness(db).await;
    h.ok("POST", "/api/v1/queues/mail/pause", &h.acme, None)
        .await;
    h.submit(&h.acme, "mail").await;
    let resumed = h
        .ok("POST", "/api/v1/queues/mail/resume", &h.globex, None)
        .await;
    assert_eq!(resumed["paused"], false);
    assert_eq!(h.leased_tenants().await, Vec::<String>::new());
    let acme = h.ok("GET", "/api/v1/queues/mail", &h.acme, None).await;
    assert_eq!(acme["paused"], true);
    h.ok("POST", "/api/v1/queues/mail/resume", &h.acme, None)
        .await;
    assert_eq!(h.leased_tenants().await, vec!["acme"]);
}

async fn limit_caps_only_the_callers_jobs(db: Db) {
    let h = harness(db).await;
    let limited = h
        .ok(
            "PUT",
            "/api/v1/queues/mail",
            &h.globex,
            Some(json!({"concurrency_limit": 1})),
        )
        .await;
    assert_eq!(limited["concurrency_limit"], 1);
    for _ in 0..3 {
        h.submit(&h.acme, "mail").await;
        h.submit(&h.globex, "mail").await;
    }
    assert_eq!(
        h.leased_tenants().await,
        vec!["acme", "acme", "acme", "globex"]
    );
    let acme = h.ok("GET", "/api/v1/queues/mail", &h.acme, None).await;
    assert_eq!(acme["concurrency_limit"], Value::Null);
    assert_eq!(acme["running"], 3);
    let globex = h.ok("GET", "/api/v1/queues/mail", &h.globex, None).await;
    assert_eq!(
        (
            globex["running"].clone(),
            globex["waiting"]["default"].clone()
        ),
        (json!(1), json!(2))
    );
    // Removing the limit is the caller's own business too.
    h.ok(
        "PUT",
        "/api/v1/queues/mail",
        &h.acme,
        Some(json!({"concurrency_limit": null})),
    )
    .await;
    assert_eq!(h.leased_tenants().await, Vec::<String>::new());
}

async fn queue_names_are_checked(db: Db) {
    let h = harness(db).await;
    for path in [
        "/api/v1/queues/a%00b",
        "/api/v1/queues/a%20b",
        "/api/v1/queues/.hidden/pause",
    ] {
        for method in ["GET", "POST"] {
            let (status, body) = h.call(method, path, &h.acme, None).await;
            assert!(status.is_client_error(), "{method} {path}: {status} {body}");
        }
    }
    let (status, body) = h
        .call(
            "PUT",
            "/api/v1/queues/mail",
            &h.acme,
            Some(json!({"concurrency_limit": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
}
