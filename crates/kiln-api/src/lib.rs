//! kiln's HTTP API. Only this crate knows HTTP: it turns requests into calls
//! on the store and the sandboxes' validators, and every error into the one
//! error body.

pub mod audit;
pub mod auth;
pub mod e2b;
pub mod error;
pub mod extract;
pub mod intake;
mod keys;
pub mod routes;
pub mod vm_hosts;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use kiln_blob::BlobStore;
use kiln_core::JobKinds;
use kiln_db::Db;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

pub use keys::KeyCache;
pub use routes::keys::{issue_key, issue_key_until};
pub use routes::system::prometheus;

/// The largest JSON body accepted.
pub const JSON_BYTES_MAX: usize = 1 << 20;

pub struct AppState {
    pub db: Db,
    pub blobs: BlobStore,
    pub wasm: Option<Arc<kiln_wasm::WasmRuntime>>,
    pub vms: Option<Arc<kiln_vm::VmManager>>,
    /// The job kinds this deployment runs, each with the check of its spec:
    /// a job of another kind, or with a spec its kind refuses, is refused at
    /// submit.
    pub kinds: JobKinds,
    pub keys: KeyCache,
    /// Users' sessions: token keys, live sessions, login settings.
    pub auth: auth::Auth,
    /// Requests per API key, and key look-ups per source address (GCRA, per
    /// process); unset: no limit.
    pub rate_limit: std::sync::OnceLock<governor::DefaultKeyedRateLimiter<String>>,
    /// Gauge label sets `/metrics` set last time, so groups that drained
    /// are set to zero instead of keeping their last value.
    pub(crate) gauges: std::sync::Mutex<routes::system::GaugeLabels>,
    /// The process's one tail of the event log, started by the first
    /// reader.
    events: tokio::sync::OnceCell<Arc<kiln_events::EventHub>>,
    /// Non-public networks notification destinations may reach.
    notify_allow: std::sync::OnceLock<kiln_events::notify::AllowList>,
    /// The key secrets are sealed under; unset: this node keeps no secrets.
    pub master_key: std::sync::OnceLock<kiln_core::secrets::MasterKey>,
    /// Set where VMs may live on other hosts: requests for them are
    /// forwarded (see `vm_hosts`).
    pub fleet: std::sync::OnceLock<vm_hosts::VmFleet>,
    /// Set on a VM host's internal listener: callers come from the signed
    /// forwarding header, never from API keys.
    pub internal_key: std::sync::OnceLock<Vec<u8>>,
    /// Set to stop writing the audit trail (benchmarks measure its cost).
    audit_off: std::sync::atomic::AtomicBool,
}

impl AppState {
    /// An API that accepts the kinds of [`builtin_kinds`].
    pub fn new(
        db: Db,
        blobs: BlobStore,
        wasm: Option<Arc<kiln_wasm::WasmRuntime>>,
    ) -> Arc<AppState> {
        AppState::with_kinds(db, blobs, wasm, None, builtin_kinds())
    }

    /// An API with microVMs that accepts the kinds of [`builtin_kinds`].
    pub fn with_vms(
        db: Db,
        blobs: BlobStore,
        wasm: Option<Arc<kiln_wasm::WasmRuntime>>,
        vms: Option<Arc<kiln_vm::VmManager>>,
    ) -> Arc<AppState> {
        AppState::with_kinds(db, blobs, wasm, vms, builtin_kinds())
    }

    /// An API that accepts exactly `kinds`, for a deployment that runs a
    /// different set than [`builtin_kinds`].
    pub fn with_kinds(
        db: Db,
        blobs: BlobStore,
        wasm: Option<Arc<kiln_wasm::WasmRuntime>>,
        vms: Option<Arc<kiln_vm::VmManager>>,
        kinds: JobKinds,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            db,
            blobs,
            wasm,
            vms,
            kinds,
            keys: KeyCache::default(),
            auth: auth::Auth::default(),
            rate_limit: std::sync::OnceLock::new(),
            gauges: Default::default(),
            events: tokio::sync::OnceCell::new(),
            notify_allow: std::sync::OnceLock::new(),
            master_key: std::sync::OnceLock::new(),
            fleet: std::sync::OnceLock::new(),
            internal_key: std::sync::OnceLock::new(),
            audit_off: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether requests write the audit trail (on unless turned off).
    pub fn audit_enabled(&self) -> bool {
        !self.audit_off.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns the audit trail off or on; off is for measuring its cost.
    pub fn set_audit(&self, on: bool) {
        self.audit_off
            .store(!on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The event hub, started on first use.
    pub async fn event_hub(&self) -> Result<Arc<kiln_events::EventHub>, kiln_db::DbError> {
        self.events
            .get_or_try_init(|| kiln_events::EventHub::start(self.db.clone()))
            .await
            .cloned()
    }

    /// Limits every API key to `per_second` requests a second on average,
    /// with bursts of up to `burst` (0: twice the rate); a rate of 0 leaves
    /// requests unlimited. Set once, at start-up.
    pub fn allow_notify(&self, allow: kiln_events::notify::AllowList) {
        let _ = self.notify_allow.set(allow);
    }

    /// Where notifications may go besides public addresses (none unless set).
    pub fn notify_allow(&self) -> kiln_events::notify::AllowList {
        self.notify_allow.get().cloned().unwrap_or_default()
    }

    pub fn limit_rate(&self, per_second: u32, burst: u32) {
        let burst = if burst == 0 {
            per_second.saturating_mul(2)
        } else {
            burst
        };
        let (Some(rate), Some(burst)) = (
            std::num::NonZeroU32::new(per_second),
            std::num::NonZeroU32::new(burst),
        ) else {
            return;
        };
        let quota = governor::Quota::per_second(rate).allow_burst(burst);
        let _ = self.rate_limit.set(governor::RateLimiter::keyed(quota));
    }
}

/// Records the VMs' lifecycle (`vm.created`, `vm.deleted`, `vm.expired`) in
/// the event log, in the order the manager reports it, for as long as the
/// manager lives; the manager's jobs record their commands' execution
/// history in `db` too.
pub fn record_vm_lifecycle(db: Db, vms: &Arc<kiln_vm::VmManager>) -> tokio::task::JoinHandle<()> {
    // The same database keeps the commands its jobs run (the API records
    // its own).
    vms.record_executions(db.clone());
    let mut changes = vms.lifecycle();
    let host = vms.host_tag().unwrap_or_default().to_string();
    tokio::spawn(async move {
        while let Some(change) = changes.recv().await {
            let info = &change.info;
            let data = serde_json::json!({
                "image": info.image,
                "vcpus": info.vcpus,
                "memory_mib": info.memory_mib,
                "accelerator": info.accelerator.as_str(),
                "expires_at_ms": info.expires_at_ms,
                "reason": change.reason,
            });
            let written = db
                .vm_record(change.kind, &vm_record(info, &host), &data, now_millis())
                .await;
            if let Err(error) = written {
                tracing::warn!(%error, vm = %info.id, "could not record a VM event");
            }
        }
    })
}

/// A live VM as the `vms` table keeps it.
pub(crate) fn vm_record(info: &kiln_vm::VmInfo, host: &str) -> kiln_db::vms::VmRecord {
    kiln_db::vms::VmRecord {
        id: info.id.clone(),
        tenant: info.tenant.clone(),
        host: host.to_string(),
        status: "running".into(),
        image: info.image.clone(),
        vcpus: i32::from(info.vcpus),
        memory_mib: i64::from(info.memory_mib),
        accelerator: info.accelerator.as_str().to_string(),
        labels: info.labels.clone(),
        created_at: info.created_at_ms,
        expires_at: info.expires_at_ms,
        ended_at: None,
        boot_ms: i64::try_from(info.boot_ms).unwrap_or(i64::MAX),
    }
}

/// Every kind kiln ships, each with its spec check: `wasm`, the microVM
/// kinds and the diagnostic `noop`. An API node checks specs without a
/// runtime: the checks are pure.
pub fn builtin_kinds() -> JobKinds {
    let mut kinds = JobKinds::new();
    kinds.add("noop", kiln_worker::noop::check_spec);
    kinds
        .add_with_files("wasm", kiln_wasm::check_spec)
        .with_secrets("wasm");
    kiln_vm::job::job_kinds(&mut kinds);
    kinds
}

#[derive(OpenApi)]
#[openapi(
    info(title = "kiln", description = "Run untrusted code in microVMs and WebAssembly sandboxes, durably."),
    paths(
        routes::jobs::submit_job, routes::jobs::run_job, routes::jobs::get_job, routes::jobs::list_jobs,
        routes::jobs::cancel_job, routes::jobs::retry_job, routes::jobs::job_attempts,
        routes::queues::list_queues, routes::queues::get_queue, routes::queues::update_queue, routes::queues::pause_queue,
        routes::queues::resume_queue,
        routes::keys::list_keys, routes::keys::create_key, routes::keys::revoke_key,
        routes::auth::login, routes::auth::logout, routes::auth::me,
        routes::users::create_user, routes::users::list_users, routes::users::get_user,
        routes::users::delete_user, routes::users::set_role, routes::users::set_password,
        routes::modules::push_module, routes::modules::list_modules, routes::modules::get_module,
        routes::modules::delete_module,
        routes::system::list_workers, routes::nodes::list_nodes, routes::nodes::get_node,
        routes::nodes::drain_node, routes::nodes::resume_node, routes::system::health, routes::system::metrics_text,
        routes::system::openapi,
        routes::vms::create_vm, routes::vms::list_vms, routes::vms::get_vm, routes::vms::delete_vm,
        routes::vms::execute, routes::vms::exec_ws, routes::vms::upload, routes::vms::download,
        routes::vms::list_executions, routes::vms::get_execution,
        routes::vm_ports::list_ports, routes::vm_ports::add_slash, routes::vm_ports::proxy_root, routes::vm_ports::proxy,
        routes::flow::apply_pipeline, routes::flow::list_pipelines, routes::flow::get_pipeline,
        routes::flow::pipeline_versions, routes::flow::delete_pipeline, routes::flow::start_run,
        routes::flow::trigger_run,
        routes::flow::list_runs, routes::flow::get_run, routes::flow::cancel_run, routes::flow::retry_run,
        routes::flow::approve_step, routes::flow::reject_step,
        routes::flow::put_schedule, routes::flow::list_schedules, routes::flow::get_schedule,
        routes::flow::schedule_fires, routes::flow::pause_schedule, routes::flow::resume_schedule,
        routes::flow::delete_schedule,
        routes::files::list_run_artifacts, routes::files::get_run_artifact,
        routes::files::list_job_files, routes::files::get_job_file,
        routes::events::events, routes::events::events_ws, routes::events::job_events,
        routes::logs::logs, routes::logs::job_logs,
        routes::subscriptions::create_subscription, routes::subscriptions::list_subscriptions,
        routes::subscriptions::get_subscription, routes::subscriptions::delete_subscription,
        routes::subscriptions::list_deliveries,
        routes::secrets::put_secret, routes::secrets::list_secrets, routes::secrets::get_secret,
        routes::secrets::delete_secret,
        routes::policies::put_policy, routes::policies::list_policies, routes::policies::get_policy,
        routes::policies::delete_policy, routes::policies::test_policies,
        routes::incidents::list_incidents, routes::incidents::get_incident,
        routes::incidents::ack_incident, routes::incidents::resolve_incident,
        routes::incidents::get_detectors, routes::incidents::put_detectors,
        routes::automation::put_rule, routes::automation::list_rules, routes::automation::get_rule,
        routes::automation::delete_rule, routes::automation::rule_actions,
        routes::automation::list_actions, routes::automation::dry_run,
        routes::dashboard::dashboard_stats,
        routes::audit::list_audit, routes::audit::export_audit, routes::audit::verify_audit,
        routes::webhooks::put_webhook, routes::webhooks::list_webhooks, routes::webhooks::get_webhook,
        routes::webhooks::delete_webhook, routes::webhooks::webhook_deliveries, routes::webhooks::receive,
    ),
    components(schemas(kiln_wasm::WasmSpec, kiln_vm::job::VmJobSpec)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole HTTP surface; tests drive it without a socket.
pub fn app(state: Arc<AppState>) -> Router {
    prometheus();
    let api = Router::new()
        .merge(routes::jobs::router())
        .merge(routes::queues::router())
        .merge(routes::keys::router())
        .merge(routes::auth::router())
        .merge(routes::users::router())
        .merge(routes::modules::router())
        .merge(routes::system::router())
        .merge(routes::nodes::router())
        .merge(routes::vms::router().layer(middleware::from_fn_with_state(
            state.clone(),
            vm_hosts::route,
        )))
        .merge(routes::flow::router())
        .merge(routes::files::router())
        .merge(routes::events::router())
        .merge(routes::logs::router())
        .merge(routes::subscriptions::router())
        .merge(routes::secrets::router())
        .merge(routes::policies::router())
        .merge(routes::incidents::router())
        .merge(routes::automation::router())
        .merge(routes::dashboard::router())
        .merge(routes::audit::router())
        .merge(routes::webhooks::router());
    Router::new()
        .route("/health", get(routes::system::health))
        .route("/metrics", get(routes::system::metrics_text))
        .nest("/api/v1", api)
        .fallback(routes::system::not_found)
        .method_not_allowed_fallback(routes::system::method_not_allowed)
        .layer(DefaultBodyLimit::max(JSON_BYTES_MAX))
        .layer(middleware::from_fn_with_state(state.clone(), audit::record))
        .layer(middleware::from_fn(record_http))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .with_state(state)
}

pub(crate) async fn record_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    // Methods outside the standard set would each be a new label value.
    let method = match *request.method() {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::PATCH
        | Method::HEAD
        | Method::OPTIONS => request.method().to_string(),
        _ => "other".to_string(),
    };
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("kiln_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("kiln_http_request_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    error::ApiError::internal("a request handler panicked").into_response()
}

pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the epoch as RFC 3339 (UTC, milliseconds).
pub fn render_time(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

pub fn parse_time(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Serves the API on a bound listener until `shutdown` resolves, letting
/// requests in flight finish. Each request knows its peer's address, which
/// limits key look-ups per source.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let app = app(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    // Streamed answers (a guest's page through the port proxy, logs) are
    // written head first and body after: with Nagle on, the body would wait
    // for the client's delayed ACK (40 ms).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
