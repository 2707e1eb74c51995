//! The E2B-compatible API: E2B's control plane (`/v2/sandboxes`,
//! `/sandboxes/{id}`…) and its in-sandbox `envd` (Connect RPCs under
//! `/process.Process/` and `/filesystem.Filesystem/`, `/files`, `/health`)
//! on one plain-HTTP listener, so the unchanged `e2b` SDKs work against
//! kiln with `E2B_API_URL` and `E2B_SANDBOX_URL` both pointing here. The
//! wire contract is `e2b-compat.md`.
//!
//! A request that carries `E2b-Sandbox-Id` is envd traffic for that
//! sandbox, let in with the sandbox's `X-Access-Token`; the rest is the
//! control plane, let in with a kiln API key in `X-API-KEY`, whose tenant
//! owns the sandboxes it makes. A sandbox is a kiln VM: it is listed under
//! `/api/v1/vms`, counts against the tenant's quotas and ends with its
//! timeout. Its processes, kept here, outlive the streams that started
//! them.

mod connect;
mod control;
mod fs;
mod process;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use kiln_core::{Scope, Scopes};
use kiln_vm::VmManager;
use tower::ServiceExt;

use crate::extract::Caller;
use crate::AppState;

/// The envd version the SDK is told: it turns on the features served here
/// (default user semantics, `close_stdin`, octet-stream uploads) and makes
/// the SDK refuse newer ones on the client side.
pub const ENVD_VERSION: &str = "0.5.7";
const SANDBOX_HEADER: &str = "e2b-sandbox-id";
const TOKEN_HEADER: &str = "x-access-token";
/// A sandbox's shape: E2B's default memory (only the pages the guest
/// touches are resident), one vCPU. `kiln serve` keeps a warm pool of this
/// shape for the base image when it keeps one of the image at all.
pub const MEMORY_MIB: u32 = 512;
pub const VCPUS: u8 = 1;
/// Sandboxes one server keeps track of; past it, creates are refused.
const SANDBOXES_MAX: usize = 10_000;

/// The E2B front of one kiln process.
pub struct E2b {
    state: Arc<AppState>,
    /// The image `templateID: "base"` boots.
    base_image: String,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    /// (tenant, `Idempotency-Key`) → the sandbox it made, so a create the
    /// SDK retries after a lost answer makes no second VM.
    idempotent: Mutex<HashMap<(String, String), String>>,
}

/// What E2B knows of a sandbox beyond its VM.
pub(crate) struct Sandbox {
    pub id: String,
    pub tenant: String,
    pub template: String,
    pub metadata: BTreeMap<String, String>,
    /// Set at create; every command's environment starts from it.
    pub env: BTreeMap<String, String>,
    /// envd's `X-Access-Token`.
    pub token: String,
    pub started_ms: i64,
    /// Commands run as this user unless the request names one: E2B's
    /// `user` where the image has it, else root.
    pub default_user: String,
    pub procs: process::Table,
    pub watchers: fs::Watchers,
    /// Set while the sandbox is being paused or is paused: its processes'
    /// pumps stop without ending them.
    pub pausing: std::sync::atomic::AtomicBool,
}

/// An envd request's sandbox and user, resolved by [`envd_guard`].
#[derive(Clone)]
pub(crate) struct Envd {
    pub sandbox: Arc<Sandbox>,
    pub user: String,
    pub vms: Arc<VmManager>,
}

impl Envd {
    /// The sandbox's agent; a VM that has gone answers "was not found",
    /// which the SDK turns into `SandboxNotRunningException`.
    pub async fn agent(&self) -> Result<kiln_vm::AgentConn, connect::ConnectError> {
        self.vms
            .agent(&self.sandbox.tenant, &self.sandbox.id)
            .await
            .ok_or_else(|| {
                connect::ConnectError::new(
                    "unavailable",
                    format!("sandbox {} was not found", self.sandbox.id),
                )
            })
    }

    /// The user's home, where relative paths land.
    pub fn home(&self) -> String {
        home_of(&self.user)
    }
}

pub(crate) fn home_of(user: &str) -> String {
    if user == "root" {
        "/root".to_string()
    } else {
        format!("/home/{user}")
    }
}

impl E2b {
    pub fn new(state: Arc<AppState>, base_image: impl Into<String>) -> Arc<E2b> {
        let e2b = Arc::new(E2b {
            state,
            base_image: base_image.into(),
            sandboxes: Mutex::new(HashMap::new()),
            idempotent: Mutex::new(HashMap::new()),
        });
        // Sandboxes whose VMs expired are forgotten, with their processes
        // and watchers.
        let weak = Arc::downgrade(&e2b);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(e2b) = weak.upgrade() else { return };
                e2b.sweep().await;
            }
        });
        e2b
    }

    fn vms(&self) -> Option<&Arc<VmManager>> {
        self.state.vms.as_ref()
    }

    fn sandboxes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn idempotent(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.idempotent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A sandbox whose VM still runs, with its VM.
    async fn live(&self, id: &str) -> Option<(Arc<Sandbox>, kiln_vm::VmInfo)> {
        match self.find(id).await? {
            (sandbox, vm, false) => Some((sandbox, vm)),
            _ => None,
        }
    }

    /// A sandbox whose VM runs or is paused (true), with its VM; one whose
    /// VM has gone is forgotten.
    async fn find(&self, id: &str) -> Option<(Arc<Sandbox>, kiln_vm::VmInfo, bool)> {
        let sandbox = self.sandboxes().get(id).cloned()?;
        let vms = self.vms()?;
        if let Some(vm) = vms.get(&sandbox.tenant, id).await {
            return Some((sandbox, vm, false));
        }
        if let Some(vm) = vms.paused(&sandbox.tenant, id) {
            return Some((sandbox, vm, true));
        }
        self.forget(id);
        None
    }

    fn forget(&self, id: &str) {
        if let Some(sandbox) = self.sandboxes().remove(id) {
            self.idempotent().retain(|_, v| v != id);
            sandbox.watchers.clear();
        }
    }

    async fn sweep(&self) {
        let ids: Vec<String> = self.sandboxes().keys().cloned().collect();
        for id in ids {
            let _ = self.find(&id).await;
        }
    }
}

/// The E2B API's router: envd requests (those naming a sandbox) and the
/// control plane, told apart by the `E2b-Sandbox-Id` header.
pub fn router(e2b: Arc<E2b>) -> Router {
    let state = e2b.state.clone();
    let audited = |router: Router<Arc<E2b>>| {
        router.layer(middleware::from_fn_with_state(
            state.clone(),
            crate::audit::record,
        ))
    };
    let control = audited(control::router()).with_state(e2b.clone());
    let envd = Router::new()
        .merge(audited(process::writes().merge(fs::writes())))
        .merge(process::reads().merge(fs::reads()))
        .fallback(envd_not_found)
        .layer(middleware::from_fn_with_state(e2b.clone(), envd_guard))
        .with_state(e2b.clone());
    let dispatch = tower::service_fn(move |request: Request| {
        let to_envd = request.headers().contains_key(SANDBOX_HEADER);
        let (control, envd) = (control.clone(), envd.clone());
        async move {
            if to_envd {
                envd.oneshot(request).await
            } else {
                control.oneshot(request).await
            }
        }
    });
    Router::new()
        .fallback_service(dispatch)
        .layer(middleware::from_fn(crate::record_http))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send + 'static>| {
                control::E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, "a handler failed")
                    .into_response()
            },
        ))
}

/// Serves the E2B API on a bound listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    e2b: Arc<E2b>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let app = router(e2b).into_make_service_with_connect_info::<std::net::SocketAddr>();
    // Streams are flushed envelope by envelope: Nagle would hold each for
    // the client's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn envd_not_found() -> Response {
    connect::ConnectError::new("unimplemented", "no such envd method").into_response()
}

/// The answer the SDK reads as "the sandbox is not running" on every envd
/// route.
fn not_running(id: &str) -> Response {
    let shown: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect();
    (
        StatusCode::BAD_GATEWAY,
        axum::Json(serde_json::json!({
            "code": 502,
            "message": format!("The sandbox {shown} was not found"),
        })),
    )
        .into_response()
}

/// Resolves an envd request's sandbox (its VM must still run), checks its
/// access token, and takes the user from `Authorization: Basic`.
async fn envd_guard(State(e2b): State<Arc<E2b>>, mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(SANDBOX_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let (Some((sandbox, _)), Some(vms)) = (e2b.live(&id).await, e2b.vms().cloned()) else {
        return not_running(&id);
    };
    let token = request
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !crate::auth::same(token, &sandbox.token) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({
                "code": "unauthenticated",
                "message": "send the sandbox's X-Access-Token",
            })),
        )
            .into_response();
    }
    let user = match basic_user(request.headers()) {
        Ok(Some(user)) => user,
        Ok(None) => sandbox.default_user.clone(),
        Err(error) => return error.into_response(),
    };
    // Audited as the sandbox acting for its tenant.
    let caller = Caller::key(
        sandbox.tenant.clone(),
        format!("e2b:{}", sandbox.id),
        Scopes(vec![Scope::Write]),
    );
    caller.note();
    request.extensions_mut().insert(caller);
    request.extensions_mut().insert(Envd { sandbox, user, vms });
    next.run(request).await
}

/// A user name as Linux takes it, so it can only name an account.
pub(crate) fn check_user(user: &str) -> Result<(), connect::ConnectError> {
    let ok = (1..=32).contains(&user.len())
        && user
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(connect::ConnectError::invalid(format!(
            "{user:?} is not a user name"
        )))
    }
}

/// The user of `Authorization: Basic base64("<user>:")`.
fn basic_user(headers: &HeaderMap) -> Result<Option<String>, connect::ConnectError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || connect::ConnectError::new("unauthenticated", "bad Authorization header");
    let encoded = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Basic "))
        .ok_or_else(bad)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let user = text.split(':').next().unwrap_or_default();
    if user.is_empty() {
        return Ok(None);
    }
    check_user(user)?;
    Ok(Some(user.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_come_from_basic_auth() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_user(&headers).unwrap(), None);
        headers.insert("authorization", "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(basic_user(&headers).unwrap().as_deref(), Some("root"));
        headers.insert("authorization", "Basic dXNlcjo=".parse().unwrap());
        assert_eq!(basic_user(&headers).unwrap().as_deref(), Some("user"));
        // A name that could be a path or an option is refused.
        let hostile = base64::engine::general_purpose::STANDARD.encode("../etc:");
        headers.insert("authorization", format!("Basic {hostile}").parse().unwrap());
        assert!(basic_user(&headers).is_err());
        headers.insert("authorization", "Bearer x".parse().unwrap());
        assert!(basic_user(&headers).is_err());
    }

    #[test]
    fn homes() {
        assert_eq!(home_of("root"), "/root");
        assert_eq!(home_of("user"), "/home/user");
    }
}
