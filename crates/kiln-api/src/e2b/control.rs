//! E2B's control plane: sandboxes made, found, listed, timed and killed
//! with a kiln API key in `X-API-KEY`. Answers carry exactly the statuses
//! the SDK's generated client expects (create is 201, kill 204), and every
//! error is `{"code": <status>, "message"}`, which it parses before it
//! looks at the status.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use kiln_core::Scope;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{E2b, Sandbox, ENVD_VERSION, MEMORY_MIB, SANDBOXES_MAX};
use crate::error::ApiError;
use crate::extract::Caller;

pub(crate) fn router() -> Router<Arc<E2b>> {
    Router::new()
        .route("/v2/sandboxes", post(create).get(list))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(crate::JSON_BYTES_MAX))
}

/// The default sandbox lifetime, as E2B's.
const TIMEOUT_DEFAULT_S: u64 = 300;
const METADATA_MAX: usize = 64;
const ENV_MAX: usize = 256;
const LIST_LIMIT_MAX: usize = 1000;

/// A control-plane error as the SDK parses it.
#[derive(Debug)]
pub(crate) struct E2bError {
    status: StatusCode,
    message: String,
    retry_after_s: Option<u64>,
    /// `Should-Retry: false`: a failed create the SDK must not repeat.
    no_retry: bool,
}

impl E2bError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> E2bError {
        E2bError {
            status,
            message: kiln_core::names::sanitise_message(&message.into(), 1024),
            retry_after_s: None,
            no_retry: false,
        }
    }

    fn not_found(id: &str) -> E2bError {
        E2bError::new(StatusCode::NOT_FOUND, format!("sandbox {id} not found"))
    }

    fn bad(message: impl Into<String>) -> E2bError {
        E2bError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<ApiError> for E2bError {
    fn from(error: ApiError) -> E2bError {
        E2bError {
            retry_after_s: error.retry_after_s,
            ..E2bError::new(error.status, error.message)
        }
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(json!({"code": self.status.as_u16(), "message": self.message})),
        )
            .into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after_s {
            headers.insert("retry-after", HeaderValue::from(seconds));
            headers.insert("should-retry", HeaderValue::from_static("true"));
        } else if self.no_retry {
            headers.insert("should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

type E2bResult<T> = Result<T, E2bError>;

async fn not_found() -> E2bError {
    E2bError::new(StatusCode::NOT_FOUND, "no such route")
}

/// The caller of a control-plane request: a kiln API key (or session
/// token) in `X-API-KEY`, checked as the main API checks a bearer.
pub(crate) struct Tenant(pub Caller);

impl FromRequestParts<Arc<E2b>> for Tenant {
    type Rejection = E2bError;

    async fn from_request_parts(parts: &mut Parts, e2b: &Arc<E2b>) -> Result<Self, E2bError> {
        let key = parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                E2bError::new(StatusCode::UNAUTHORIZED, "send X-API-KEY: <kiln API key>")
            })?;
        let bearer = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| E2bError::new(StatusCode::UNAUTHORIZED, "unknown API key"))?;
        parts
            .headers
            .insert(axum::http::header::AUTHORIZATION, bearer);
        let caller = Caller::from_request_parts(parts, &e2b.state).await?;
        Ok(Tenant(caller))
    }
}

/// JSON bodies: an unparsable one is a 400 in E2B's shape.
pub(crate) struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = E2bError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, E2bError> {
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|r| E2bError::new(r.status(), r.body_text()))?;
        let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
        serde_json::from_slice(bytes)
            .map(Body)
            .map_err(|e| E2bError::bad(format!("bad request body: {e}")))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<u64>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
}

fn check_text(what: &str, text: &str, max: usize) -> E2bResult<()> {
    if text.len() > max || text.contains('\0') {
        return Err(E2bError::bad(format!(
            "{what} must be at most {max} bytes, without NUL"
        )));
    }
    Ok(())
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> E2bResult<()> {
    if metadata.len() > METADATA_MAX {
        return Err(E2bError::bad(format!(
            "at most {METADATA_MAX} metadata entries"
        )));
    }
    for (key, value) in metadata {
        if key.is_empty() {
            return Err(E2bError::bad("a metadata key is empty"));
        }
        check_text("a metadata key", key, 256)?;
        check_text("a metadata value", value, 4096)?;
    }
    Ok(())
}

fn check_env(env: &BTreeMap<String, String>) -> E2bResult<()> {
    if env.len() > ENV_MAX {
        return Err(E2bError::bad(format!(
            "at most {ENV_MAX} environment variables"
        )));
    }
    for (name, value) in env {
        process_env_name(name).map_err(|e| E2bError::bad(e.message))?;
        check_text("an environment value", value, 32 << 10)?;
    }
    Ok(())
}

/// A variable name a process environment can hold.
pub(crate) fn process_env_name(name: &str) -> Result<(), super::connect::ConnectError> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(super::connect::ConnectError::invalid(format!(
            "{name:?} is not an environment variable name"
        )))
    }
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn sandbox_json(sandbox: &Sandbox) -> Value {
    json!({
        "templateID": sandbox.template,
        "sandboxID": sandbox.id,
        "alias": sandbox.template,
        "clientID": "kiln",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": sandbox.token,
        "trafficAccessToken": null,
        "domain": null,
    })
}

fn iso(ms: i64) -> String {
    crate::render_time(ms).unwrap_or_default()
}

fn listed_json(sandbox: &Sandbox, vm: &kiln_vm::VmInfo, paused: bool) -> Value {
    json!({
        "templateID": sandbox.template,
        "alias": sandbox.template,
        "sandboxID": sandbox.id,
        "clientID": "kiln",
        "startedAt": iso(sandbox.started_ms),
        "endAt": iso(vm.expires_at_ms.unwrap_or(i64::MAX / 2)),
        "cpuCount": vm.vcpus,
        "memoryMB": vm.memory_mib,
        "diskSizeMB": 0,
        "state": if paused { "paused" } else { "running" },
        "envdVersion": ENVD_VERSION,
        "metadata": sandbox.metadata,
    })
}

fn image_of(e2b: &E2b, template: &str) -> String {
    if template == "base" {
        e2b.base_image.clone()
    } else {
        template.to_string()
    }
}

/// `POST /v2/sandboxes`: boots the VM and answers 201 only once its agent
/// answers, so the SDK's first envd call (made at once) succeeds.
async fn create(
    State(e2b): State<Arc<E2b>>,
    Tenant(caller): Tenant,
    headers: HeaderMap,
    Body(body): Body<NewSandbox>,
) -> Response {
    match create_inner(&e2b, &caller, &headers, body).await {
        Ok(response) => response,
        Err(mut error) => {
            error.no_retry = error.retry_after_s.is_none();
            error.into_response()
        }
    }
}

async fn create_inner(
    e2b: &Arc<E2b>,
    caller: &Caller,
    headers: &HeaderMap,
    body: NewSandbox,
) -> E2bResult<Response> {
    caller.require(Scope::Write)?;
    let idempotency = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 256)
        .map(|k| (caller.tenant.clone(), k.to_string()));
    if let Some(key) = &idempotency {
        let made = e2b.idempotent().get(key).cloned();
        if let Some((sandbox, _)) = match made {
            Some(id) => e2b.live(&id).await,
            None => None,
        } {
            return Ok((StatusCode::CREATED, axum::Json(sandbox_json(&sandbox))).into_response());
        }
    }
    let template = body.template_id.unwrap_or_else(|| "base".to_string());
    let metadata = body.metadata.unwrap_or_default();
    let env = body.env_vars.unwrap_or_default();
    check_metadata(&metadata)?;
    check_env(&env)?;
    let timeout_s = body.timeout.unwrap_or(TIMEOUT_DEFAULT_S);
    let image = image_of(e2b, &template);
    // The main API's checks: image name, lifetime, admission policies.
    let spec = kiln_vm::job::CreateVmSpec::try_from(json!({
        "image": image,
        "memory_mib": MEMORY_MIB,
        "vcpus": super::VCPUS,
        "ttl_s": timeout_s,
        "labels": {"e2b": "sandbox"},
    }))
    .map_err(|e| E2bError::bad(format!("templateID {template:?} or timeout: {e}")))?;
    crate::routes::policies::admit_vm(&e2b.state, &caller.tenant, &spec).await?;
    let Some(vms) = e2b.vms() else {
        return Err(E2bError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server runs no microVMs (no guest image: run `kiln image build python`)",
        ));
    };
    if e2b.sandboxes().len() >= SANDBOXES_MAX {
        return Err(E2bError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many sandboxes on this server",
        ));
    }
    let request = spec.shape.request(&caller.tenant, spec.labels.clone());
    let vm = vms.create(request).await.map_err(|error| match error {
        kiln_vm::VmError::Image(error) => E2bError::bad(format!(
            "template {template:?}: {error} (build it: kiln image build)"
        )),
        other => E2bError::from(crate::routes::vms::create_error(other)),
    })?;
    crate::audit::note_resource(format!("/sandboxes/{}", vm.id));
    // E2B's default user where the image has one.
    let default_user = match vms.agent(&caller.tenant, &vm.id).await {
        Some(agent) => match agent.read_file("/etc/passwd").await {
            Ok(passwd) if has_account(&passwd, kiln_vm::rootfs::USER.0) => {
                kiln_vm::rootfs::USER.0.to_string()
            }
            _ => "root".to_string(),
        },
        None => "root".to_string(),
    };
    if let Some(host) = vms.host_tag() {
        if let Err(error) = e2b.state.db.vm_insert(&crate::vm_record(&vm, host)).await {
            tracing::warn!(%error, vm = %vm.id, "could not list a new VM");
        }
    }
    let sandbox = Arc::new(Sandbox {
        id: vm.id.clone(),
        tenant: caller.tenant.clone(),
        template,
        metadata,
        env,
        token: random_token(),
        started_ms: vm.created_at_ms,
        default_user,
        procs: Default::default(),
        watchers: Default::default(),
        pausing: Default::default(),
    });
    e2b.sandboxes().insert(vm.id.clone(), sandbox.clone());
    if let Some(key) = idempotency {
        e2b.idempotent().insert(key, vm.id.clone());
    }
    Ok((StatusCode::CREATED, axum::Json(sandbox_json(&sandbox))).into_response())
}

fn has_account(passwd: &[u8], name: &str) -> bool {
    String::from_utf8_lossy(passwd)
        .lines()
        .any(|line| line.split(':').next() == Some(name))
}

/// The caller's sandbox (running, or paused: true), or 404: another
/// tenant's is not found.
async fn own(
    e2b: &E2b,
    caller: &Caller,
    id: &str,
) -> E2bResult<(Arc<Sandbox>, kiln_vm::VmInfo, bool)> {
    match e2b.find(id).await {
        Some(found) if found.0.tenant == caller.tenant => Ok(found),
        _ => Err(E2bError::not_found(id)),
    }
}

/// The caller's running sandbox, or 404.
async fn running(
    e2b: &E2b,
    caller: &Caller,
    id: &str,
) -> E2bResult<(Arc<Sandbox>, kiln_vm::VmInfo)> {
    match own(e2b, caller, id).await? {
        (sandbox, vm, false) => Ok((sandbox, vm)),
        _ => Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is paused; connect to resume it"),
        )),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Timeout {
    timeout: Option<u64>,
}

fn ttl(seconds: u64) -> E2bResult<Duration> {
    if seconds == 0 || seconds > kiln_vm::job::LIFETIME_S_MAX {
        return Err(E2bError::bad(format!(
            "timeout must be 1 to {} seconds",
            kiln_vm::job::LIFETIME_S_MAX
        )));
    }
    Ok(Duration::from_secs(seconds))
}

/// `POST /v2/sandboxes/{id}/connect`: 200 for a running sandbox; a
/// timeout given moves its end later, never earlier.
async fn connect(
    State(e2b): State<Arc<E2b>>,
    Tenant(caller): Tenant,
    Path(id): Path<String>,
    Body(body): Body<Timeout>,
) -> E2bResult<Response> {
    caller.require(Scope::Write)?;
    let (sandbox, vm, paused) = own(&e2b, &caller, &id).await?;
    if paused {
        // Resumed from its saved state: 201, as E2B answers a resume.
        wake(&e2b, &caller, &sandbox, body.timeout).await?;
        return Ok((StatusCode::CREATED, axum::Json(sandbox_json(&sandbox))).into_response());
    }
    if let (Some(seconds), Some(vms)) = (body.timeout, e2b.vms()) {
        let wanted = ttl(seconds)?;
        let end = crate::now_millis().saturating_add(wanted.as_millis() as i64);
        if vm.expires_at_ms.is_some_and(|at| at < end) {
            vms.set_ttl(&caller.tenant, &id, wanted).await;
        }
    }
    Ok((StatusCode::OK, axum::Json(sandbox_json(&sandbox))).into_response())
}

/// `DELETE /sandboxes/{id}`: 204, or 404 (the SDK's `False`).
async fn kill(
    State(e2b): State<Arc<E2b>>,
    Tenant(caller): Tenant,
    Path(id): Path<String>,
) -> E2bResult<StatusCode> {
    caller.require(Scope::Write)?;
    own(&e2b, &caller, &id).await?;
    let deleted = match e2b.vms() {
        Some(vms) => vms.delete(&caller.tenant, &id).await,
        None => false,
    };
    e2b.forget(&id);
    if !deleted {
        return Err(E2bError::not_found(&id));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/timeout`: the sandbox ends that many seconds
/// from now.
async fn set_timeout(
    State(e2b): State<Arc<E2b>>,
    Tenant(caller): Tenant,
    Path(id): Path<String>,
    Body(body): Body<Timeout>,
) -> E2bResult<StatusCode> {
    caller.require(Scope::Write)?;
    running(&e2b, &caller, &id).await?;
    let wanted = ttl(body
        .timeout
        .ok_or_else(|| E2bError::bad("timeout is required"))?)?;
    let set = match e2b.vms() {
        Some(vms) => vms.set_ttl(&caller.tenant, &id, wanted).await,
        None => None,
    };
    set.ok_or_else(|| E2bError::not_found(&id))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /sandboxes/{id}`.
async fn detail(
    State(e2b): State<Arc<E2b>>,
    Tenant(caller): Tenant,
    Path(id): Path<String>,
) -> E2bResult<axum::Json<Value>> {
    caller.require(Scope::Read)?;
    let (sandbox, vm, paused) = own(&e2b, &caller, &id).await?;
    let mut view = listed_json(&sandbox, &vm, paused);
    view["envdAccessToken"] = json!(sandbox.token);
    view["domain"] = Value::Null;
    view["allowInternetAccess"] = json!(vm.network.is_some());
    Ok(axum::Json(view))
}

/// `POST /sandboxes/{id}/pause`: the VM's whole state (memory, and so
/// its files, which live in a tmpfs overlay) is saved to disk and its
/// process stops; `connect` resumes it. 409 if it is paused already.
async fn pause(
    State(e2b): State<Arc<E2b>>,
    Tenant(caller): Tenant,
    Path(id): Path<String>,
) -> E2bResult<StatusCode> {
    caller.require(Scope::Write)?;
    let (sandbox, _, paused) = own(&e2b, &caller, &id).await?;
    if paused {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already paused"),
        ));
    }
    let vms = e2b.vms().ok_or_else(|| E2bError::not_found(&id))?;
    sandbox.pausing.store(true, Ordering::SeqCst);
    // Watchers poll a VM that is about to stop.
    sandbox.watchers.clear();
    let paused = vms.pause(&caller.tenant, &id).await;
    if !matches!(paused, Ok(Some(_))) {
        sandbox.pausing.store(false, Ordering::SeqCst);
    }
    match paused {
        Ok(Some(_)) => Ok(StatusCode::NO_CONTENT),
        Ok(None) => Err(E2bError::not_found(&id)),
        Err(kiln_vm::VmError::Refused(message)) => Err(E2bError::bad(message)),
        Err(error) => Err(E2bError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("pausing sandbox {id}: {error}"),
        )),
    }
}

/// Resumes a paused sandbox for `timeout` seconds (default 300), with its
/// processes.
async fn wake(
    e2b: &E2b,
    caller: &Caller,
    sandbox: &Arc<Sandbox>,
    timeout: Option<u64>,
) -> E2bResult<()> {
    let id = &sandbox.id;
    let ttl = ttl(timeout.unwrap_or(TIMEOUT_DEFAULT_S))?;
    let vms = e2b.vms().ok_or_else(|| E2bError::not_found(id))?;
    vms.resume(&caller.tenant, id, Some(ttl))
        .await
        .map_err(|error| E2bError::from(crate::routes::vms::create_error(error)))?
        .ok_or_else(|| E2bError::not_found(id))?;
    if let Some(agent) = vms.agent(&caller.tenant, id).await {
        super::process::adopt_all(sandbox, &agent);
    }
    sandbox.pausing.store(false, Ordering::SeqCst);
    Ok(())
}

/// `POST /sandboxes/{id}/resume` (older clients; the SDK resumes through
/// `connect`).
async fn resume(
    State(e2b): State<Arc<E2b>>,
    Tenant(caller): Tenant,
    Path(id): Path<String>,
    Body(body): Body<Timeout>,
) -> E2bResult<Response> {
    caller.require(Scope::Write)?;
    let (sandbox, _, paused) = own(&e2b, &caller, &id).await?;
    if !paused {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is not paused"),
        ));
    }
    wake(&e2b, &caller, &sandbox, body.timeout).await?;
    Ok((StatusCode::CREATED, axum::Json(sandbox_json(&sandbox))).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
    order: Option<String>,
    template: Option<String>,
}

/// `GET /v2/sandboxes`: the tenant's sandboxes, oldest first, filtered by
/// metadata and state, a page at a time (`x-next-token` names the next).
async fn list(
    State(e2b): State<Arc<E2b>>,
    Tenant(caller): Tenant,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> E2bResult<Response> {
    caller.require(Scope::Read)?;
    let Query(query) = query.map_err(|r| E2bError::bad(r.body_text()))?;
    let wanted: Vec<(String, String)> = match &query.metadata {
        Some(text) => {
            serde_urlencoded::from_str(text).map_err(|e| E2bError::bad(format!("metadata: {e}")))?
        }
        None => Vec::new(),
    };
    let states: Vec<String> = match &query.state {
        Some(states) => states.split(',').map(|s| s.trim().to_string()).collect(),
        None => vec!["running".into(), "paused".into()],
    };
    let limit = query.limit.unwrap_or(100).clamp(1, LIST_LIMIT_MAX);
    let descending = match query.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => return Err(E2bError::bad(format!("order {other:?} is asc or desc"))),
    };
    let after = match &query.next_token {
        Some(token) => Some(parse_token(token)?),
        None => None,
    };
    let mut mine: Vec<Arc<Sandbox>> = e2b
        .sandboxes()
        .values()
        .filter(|s| s.tenant == caller.tenant)
        .filter(|s| wanted.iter().all(|(k, v)| s.metadata.get(k) == Some(v)))
        .filter(|s| query.template.as_ref().is_none_or(|t| &s.template == t))
        .filter(|s| {
            after.as_ref().is_none_or(|(ms, id)| {
                let here = (s.started_ms, s.id.as_str());
                if descending {
                    here < (*ms, id.as_str())
                } else {
                    here > (*ms, id.as_str())
                }
            })
        })
        .cloned()
        .collect();
    mine.sort_by(|a, b| (a.started_ms, &a.id).cmp(&(b.started_ms, &b.id)));
    if descending {
        mine.reverse();
    }
    let mut page = Vec::new();
    for sandbox in mine {
        if let Some((sandbox, vm, paused)) = e2b.find(&sandbox.id).await {
            let state = if paused { "paused" } else { "running" };
            if states.iter().any(|s| s == state) {
                page.push((sandbox, vm, paused));
            }
        }
    }
    let more = page.len() > limit;
    page.truncate(limit);
    let body: Vec<Value> = page
        .iter()
        .map(|(s, vm, paused)| listed_json(s, vm, *paused))
        .collect();
    let mut response = axum::Json(body).into_response();
    if more {
        if let Some((last, _, _)) = page.last() {
            let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!("{}:{}", last.started_ms, last.id));
            if let Ok(value) = HeaderValue::from_str(&token) {
                response.headers_mut().insert("x-next-token", value);
            }
        }
    }
    Ok(response)
}

fn parse_token(token: &str) -> E2bResult<(i64, String)> {
    let bad = || E2bError::bad("nextToken is not one this server gave");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (ms, id) = text.split_once(':').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, id.to_string()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MetricsQuery {
    start: Option<i64>,
    end: Option<i64>,
}

/// `GET /sandboxes/{id}/metrics`: one sample read now from the guest's
/// `/proc` (kiln keeps no series of guest metrics).
async fn metrics(
    State(e2b): State<Arc<E2b>>,
    Tenant(caller): Tenant,
    Path(id): Path<String>,
    query: Result<Query<MetricsQuery>, axum::extract::rejection::QueryRejection>,
) -> E2bResult<axum::Json<Value>> {
    caller.require(Scope::Read)?;
    let Query(query) = query.map_err(|r| E2bError::bad(r.body_text()))?;
    let (_, vm, paused) = own(&e2b, &caller, &id).await?;
    if paused {
        return Ok(axum::Json(json!([])));
    }
    let now_ms = crate::now_millis();
    let now_s = now_ms / 1000;
    if query.start.is_some_and(|s| s > now_s) || query.end.is_some_and(|e| e < now_s - 60) {
        return Ok(axum::Json(json!([])));
    }
    let agent = match e2b.vms() {
        Some(vms) => vms.agent(&caller.tenant, &id).await,
        None => None,
    }
    .ok_or_else(|| E2bError::not_found(&id))?;
    let read = |path: &'static str| {
        let agent = agent.clone();
        async move {
            agent
                .read_file(path)
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        }
    };
    let (meminfo, loadavg) = tokio::join!(read("/proc/meminfo"), read("/proc/loadavg"));
    let mem = |key: &str| -> i64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<i64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    let total = mem("MemTotal:");
    let available = mem("MemAvailable:");
    let cache = mem("Cached:");
    let load: f64 = loadavg
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    let cpu_pct = (load / f64::from(vm.vcpus.max(1)) * 100.0).min(100.0);
    Ok(axum::Json(json!([{
        "timestamp": iso(now_ms),
        "timestampUnix": now_s,
        "cpuCount": vm.vcpus,
        "cpuUsedPct": cpu_pct,
        "memUsed": (total - available).max(0),
        "memTotal": total,
        "memCache": cache,
        "diskUsed": 0,
        "diskTotal": 0,
    }])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_forgeries() {
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("1700:vm-abc");
        assert_eq!(parse_token(&token).unwrap(), (1700, "vm-abc".to_string()));
        assert!(parse_token("!!").is_err());
        let no_colon = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("17");
        assert!(parse_token(&no_colon).is_err());
    }

    #[test]
    fn environment_names_and_metadata_are_bounded() {
        assert!(process_env_name("FOO_1").is_ok());
        for bad in ["", "1A", "A=B", "A B", "Ä"] {
            assert!(process_env_name(bad).is_err(), "{bad}");
        }
        let mut metadata = BTreeMap::new();
        metadata.insert("k".to_string(), "v\0".to_string());
        assert!(check_metadata(&metadata).is_err());
        let many: BTreeMap<String, String> = (0..=METADATA_MAX)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(check_metadata(&many).is_err());
    }

    #[test]
    fn only_listed_accounts_count() {
        let passwd = b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/bash\n";
        assert!(has_account(passwd, "user"));
        assert!(!has_account(
            b"root:x:0:0::/root:/bin/sh\nusers:x:1:1::/:/\n",
            "user"
        ));
    }
}
