//! The harness the API suites share: the real router on a real store, a
//! real worker running `wasm` and `noop` jobs, and keys of two tenants.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_api::AppState;
use kiln_blob::BlobStore;
use kiln_core::{JobKinds, Scope, Scopes};
use kiln_db::Db;
use kiln_wasm::{WasmConfig, WasmHandler, WasmRuntime};
use kiln_worker::{Handlers, NoopHandler, Worker, WorkerConfig};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

pub struct Harness {
    pub app: Router,
    pub state: Arc<AppState>,
    pub db: Db,
    /// Tenant `acme`: admin, read-only.
    pub admin: String,
    pub reader: String,
    /// Tenant `globex`: admin.
    pub other: String,
    /// The deployment's key (tenant `default`, system scope).
    pub system: String,
    /// Live logs, once [`Harness::start_logs`] ran.
    pub logs: Option<kiln_logs::LogSink>,
    root: PathBuf,
    pub stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
    flow: Vec<tokio::task::JoinHandle<()>>,
}

/// Tests' notification receivers listen on 127.0.0.1.
pub fn loopback() -> kiln_events::notify::AllowList {
    kiln_events::notify::AllowList::parse("127.0.0.1").unwrap()
}

/// The kinds the API accepts.
pub fn kinds() -> JobKinds {
    kiln_api::builtin_kinds()
}

/// The detectors' defaults here: bursts of 3 dead jobs, quiet after 1 s.
pub fn detector_defaults() -> kiln_ops::detectors::DetectorSettings {
    let mut settings = kiln_ops::detectors::DetectorSettings::default();
    settings.dead_letter_burst.count = 3;
    settings.dead_letter_burst.quiet_s = 1;
    settings
}

pub async fn harness(db: Db) -> Harness {
    let root = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-api"));
    let blobs = BlobStore::local(&root.join("blobs")).unwrap();
    harness_with(db, root, blobs).await
}

/// The harness over a blob store of the test's choosing (S3, say).
pub async fn harness_with_blobs(db: Db, blobs: BlobStore) -> Harness {
    let root = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-api"));
    harness_with(db, root, blobs).await
}

async fn harness_with(db: Db, root: PathBuf, blobs: BlobStore) -> Harness {
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
    let system = key("default", Scope::System).await;
    let mut config = WorkerConfig::new(&kiln_db::testing::unique_name("w"));
    config.slots = 32;
    config.poll_every = Duration::from_millis(200);
    config.pipelines = Some(kiln_api::builtin_kinds());
    let handlers = Handlers::new()
        .with("wasm", Arc::new(WasmHandler(wasm.clone())))
        .with("noop", Arc::new(NoopHandler))
        .with(
            kiln_events::notify::KIND,
            Arc::new(kiln_events::notify::NotifyHandler {
                db: db.clone(),
                allow: loopback(),
            }),
        );
    let stop = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(db.clone(), handlers, config).run(stop.clone()));
    let flow = vec![
        tokio::spawn(kiln_worker::flow::advance_loop(
            db.clone(),
            kinds(),
            stop.clone(),
        )),
        tokio::spawn(kiln_worker::flow::schedule_loop(
            db.clone(),
            kinds(),
            stop.clone(),
        )),
        tokio::spawn(kiln_events::notify::match_loop(db.clone(), stop.clone())),
        tokio::spawn(kiln_ops::incidents::detect_loop(
            db.clone(),
            detector_defaults(),
            stop.clone(),
        )),
        tokio::spawn(kiln_ops::rules::engine::rules_loop(
            db.clone(),
            kiln_ops::rules::engine::RulesConfig {
                kinds: kinds(),
                wasm: Some(wasm.clone()),
            },
            stop.clone(),
        )),
    ];
    let state = AppState::with_kinds(db.clone(), blobs, Some(wasm.clone()), None, kinds());
    state.allow_notify(loopback());
    let app = kiln_api::app(state.clone());
    Harness {
        app,
        state,
        db,
        admin,
        reader,
        other,
        system,
        logs: None,
        root,
        stop,
        worker,
        flow,
    }
}

impl Harness {
    pub async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
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

    pub async fn call(
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

    pub async fn raw(
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

    pub async fn push(&self, wat: &str) -> String {
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

    pub async fn submit(&self, body: Value) -> Value {
        let (status, job) = self
            .call("POST", "/api/v1/jobs", &self.admin, Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{job}");
        job
    }

    /// Polls the job until `done` holds; 30 s is only a guard against a hang.
    pub async fn wait(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
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

    /// Starts the live logs' writer (draining every 20 ms) and streams the
    /// wasm jobs' output into it (and the VM worker's, if started after).
    pub fn start_logs(&mut self) -> kiln_logs::LogSink {
        self.start_logs_with(kiln_logs::LogConfig {
            flush_every: Duration::from_millis(20),
            ..kiln_logs::LogConfig::new("test-node")
        })
    }

    /// [`Harness::start_logs`] with settings of the test's choosing.
    pub fn start_logs_with(&mut self, config: kiln_logs::LogConfig) -> kiln_logs::LogSink {
        let (sink, writer) = kiln_logs::LogSink::start(
            self.db.clone(),
            Some(self.state.blobs.clone()),
            config,
            self.stop.clone(),
        );
        self.flow.push(writer);
        if let Some(wasm) = &self.state.wasm {
            wasm.attach_logs(sink.clone());
        }
        self.logs = Some(sink.clone());
        sink
    }

    /// Starts a second worker that runs the VM kinds on real microVMs (the
    /// image `.ci/run` builds), sharing the store and the blob store.
    pub async fn start_vm_worker(&mut self) -> Arc<kiln_vm::VmManager> {
        let image = kiln_vm::testing::test_image().await;
        let accelerator = kiln_vm::manager::probe_accelerator(
            image,
            &self.root,
            &kiln_vm::testing::images_dir().join("accelerator"),
        )
        .await;
        let vms = kiln_vm::VmManager::new(
            &kiln_vm::testing::images_dir(),
            &self.root.join("vms"),
            accelerator,
        )
        .unwrap();
        if let Some(logs) = &self.logs {
            vms.attach_logs(logs.clone());
        }
        let mut config = WorkerConfig::new(&kiln_db::testing::unique_name("vm-w"));
        config.slots = 4;
        config.poll_every = Duration::from_millis(200);
        config.pipelines = Some(kiln_api::builtin_kinds());
        let handlers = kiln_vm::job::register(Handlers::new(), &vms, &self.state.blobs);
        self.flow.push(tokio::spawn(
            Worker::new(self.db.clone(), handlers, config).run(self.stop.clone()),
        ));
        vms
    }

    /// Stops the worker and removes the harness's files.
    pub async fn stop(self) {
        self.stop.cancel();
        self.worker.await.unwrap();
        for task in self.flow {
            task.await.unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

pub fn finished(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled" | "dead")
    )
}

pub fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}
