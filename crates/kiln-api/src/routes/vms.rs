//! `/api/v1/vms`: interactive microVM sandboxes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use kiln_core::Scope;
use kiln_db::executions::Execution;
use kiln_vm::agent::{AgentError, ErrorKind, ExecStream};
use kiln_vm::history::{Recording, Source};
use kiln_vm::job::{CreateVmSpec, ExecRequest};
use kiln_vm::manager::AgentInUse;
use kiln_vm::{ExecEvent, SecretHold, VmInfo, VmManager};
use kiln_worker::secrets::{Opened, Recipient};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{Caller, Json, Query};
use crate::{render_time, AppState};

/// The largest file moved in one request.
pub const FILE_BYTES_MAX: usize = 16 << 20;
/// The largest WebSocket message a client may send (stdin comes in many).
pub const WS_MESSAGE_MAX: usize = 1 << 20;
/// How long a new WebSocket may wait before its exec request.
pub const WS_FIRST_MESSAGE_WITHIN: Duration = Duration::from_secs(10);
/// An `execute` without `timeout_ms` is killed after this long.
pub const EXECUTE_TIMEOUT_MS: u64 = 60_000;
/// Binary WebSocket messages from the server start with one of these.
pub const WS_STDOUT: u8 = 1;
pub const WS_STDERR: u8 = 2;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/vms", post(create_vm).get(list_vms))
        .route("/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/vms/{id}/execute", post(execute))
        .route("/vms/{id}/exec/ws", get(exec_ws))
        .route("/vms/{id}/executions", get(list_executions))
        .route("/vms/{id}/executions/{exec_id}", get(get_execution))
        .route(
            "/vms/{id}/files",
            get(download)
                .put(upload)
                .layer(DefaultBodyLimit::max(FILE_BYTES_MAX)),
        )
        .merge(crate::routes::vm_ports::router())
}

/// A VM id from the path, with kiln's error on any rejection. An id
/// outside the name grammar names no VM.
pub struct VmId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for VmId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(id) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|rejection: PathRejection| ApiError::bad_request(rejection.body_text()))?;
        if kiln_core::names::check_name("vm id", &id).is_err() {
            return Err(ApiError::not_found("vm"));
        }
        Ok(VmId(id))
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmView {
    pub id: String,
    pub status: String,
    pub image: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// `kvm` or `tcg`: what this host's probe found to work.
    pub accelerator: String,
    pub labels: BTreeMap<String, String>,
    pub created_at: Option<String>,
    pub expires_at: Option<String>,
    pub boot_ms: u64,
    /// Absent: the VM has no network (only `lo`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<VmNetworkView>,
}

/// A networked VM's address in kiln's VM network and what it may do.
#[derive(Debug, Serialize, ToSchema)]
pub struct VmNetworkView {
    pub address: String,
    pub mac: String,
    pub gateway: String,
    /// `none` or `allow`.
    pub egress: String,
    pub expose: Vec<u16>,
}

impl From<VmInfo> for VmView {
    fn from(vm: VmInfo) -> VmView {
        VmView {
            id: vm.id,
            status: "running".into(),
            image: vm.image,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            accelerator: vm.accelerator.as_str().into(),
            labels: vm.labels,
            created_at: render_time(vm.created_at_ms),
            expires_at: vm.expires_at_ms.and_then(render_time),
            boot_ms: vm.boot_ms,
            network: vm.network.map(|net| VmNetworkView {
                address: net.address.to_string(),
                mac: net.mac,
                gateway: net.gateway.to_string(),
                egress: match net.egress {
                    kiln_vm::net::Egress::None => "none",
                    kiln_vm::net::Egress::Allow => "allow",
                }
                .into(),
                expose: net.expose,
            }),
        }
    }
}

impl From<kiln_db::vms::VmRecord> for VmView {
    fn from(vm: kiln_db::vms::VmRecord) -> VmView {
        VmView {
            id: vm.id,
            status: vm.status,
            image: vm.image,
            vcpus: u8::try_from(vm.vcpus).unwrap_or(u8::MAX),
            memory_mib: u32::try_from(vm.memory_mib).unwrap_or(u32::MAX),
            accelerator: vm.accelerator,
            labels: vm.labels,
            created_at: render_time(vm.created_at),
            expires_at: vm.expires_at.and_then(render_time),
            boot_ms: u64::try_from(vm.boot_ms).unwrap_or(0),
            network: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmList {
    pub vms: Vec<VmView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecuteResult {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    /// Output past 1 MiB on either stream was dropped.
    pub truncated: bool,
    pub duration_ms: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FileParams {
    /// Absolute path inside the VM.
    pub path: String,
}

impl FileParams {
    fn checked(&self) -> ApiResult<&str> {
        kiln_core::names::check_guest_path("path", &self.path)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok(&self.path)
    }
}

fn manager(state: &AppState) -> ApiResult<&Arc<VmManager>> {
    state.vms.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this server runs no microVMs (no guest image: run `kiln image build`)",
        )
    })
}

/// The agent of the caller's VM, held as in use (idle expiry spares the
/// VM while a request or a stream holds it); another tenant's VM is not
/// found.
async fn agent_of(state: &AppState, caller: &Caller, id: &str) -> ApiResult<AgentInUse> {
    manager(state)?
        .use_agent(&caller.tenant, id)
        .await
        .ok_or_else(|| ApiError::not_found("vm"))
}

/// What a failed agent request means to a client: the guest's own refusal
/// is the client's to fix (4xx); a guest that broke, stalled or vanished is
/// a bad gateway.
fn agent_error(error: AgentError) -> ApiError {
    let message = kiln_core::names::sanitise_message(&error.to_string(), 1024);
    match &error {
        AgentError::Guest {
            kind: ErrorKind::NotFound,
            ..
        } => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
        AgentError::Guest {
            kind: ErrorKind::TooLarge,
            ..
        }
        | AgentError::TooLarge(_) => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
        }
        AgentError::Guest { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "file_error", message)
        }
        AgentError::Timeout => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "vm_timeout", message),
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "vm_error", message),
    }
}

/// Boot a VM.
#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", request_body = CreateVmSpec,
    responses((status = 201, body = VmView),
              (status = 403, description = "An admission policy refused the VM (`policy_denied`)", body = ErrorBody),
              (status = 422, body = ErrorBody)), security(("bearer" = [])))]
pub async fn create_vm(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Json(body): Json<CreateVmSpec>,
) -> ApiResult<(StatusCode, Json<VmView>)> {
    caller.require(Scope::Write)?;
    crate::routes::policies::admit_vm(&state, &caller.tenant, &body).await?;
    let vms = manager(&state)?;
    crate::routes::secrets::check_exist(&state, &caller.tenant, &body.secrets).await?;
    let request = body.shape.request(&caller.tenant, body.labels);
    let vm = vms.create(request).await.map_err(create_error)?;
    crate::audit::note_resource(format!("/api/v1/vms/{}", vm.id));
    if !body.secrets.is_empty() {
        let given = async {
            let opened = open_secrets(&state, &caller, &vm.id, &body.secrets).await?;
            let agent = vms
                .agent(&caller.tenant, &vm.id)
                .await
                .ok_or_else(|| ApiError::not_found("vm"))?;
            agent
                .keep_secrets(&opened.values)
                .await
                .map_err(agent_error)
        };
        if let Err(error) = given.await {
            vms.delete(&caller.tenant, &vm.id).await;
            return Err(error);
        }
    }
    // One host of many: the VM is listed everywhere before its id is
    // handed out.
    if let Some(host) = vms.host_tag() {
        if let Err(error) = state.db.vm_insert(&crate::vm_record(&vm, host)).await {
            tracing::warn!(%error, vm = %vm.id, "could not list a new VM");
        }
    }
    Ok((StatusCode::CREATED, Json(vm.into())))
}

/// A command's (or a new VM's) secrets, opened for the VM `vm_id` and
/// audited as read by it.
async fn open_secrets(
    state: &AppState,
    caller: &Caller,
    vm_id: &str,
    names: &[String],
) -> ApiResult<Opened> {
    crate::routes::secrets::keeper(state)
        .open(&caller.tenant, names, &Recipient::vm(vm_id))
        .await
        .map_err(|message| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "secrets_unavailable",
                message,
            )
        })
}

/// Writes a command's secrets into its VM, held until it ends.
async fn hold_secrets(agent: &AgentInUse, opened: &Opened) -> ApiResult<SecretHold> {
    if opened.values.is_empty() {
        return Ok(SecretHold::none());
    }
    agent
        .hold_secrets(&opened.values)
        .await
        .map_err(agent_error)
}

/// A refused image is the caller's to fix; a quota is the tenant's; no
/// room on the host may pass, so the answer says when to try again.
pub(crate) fn create_error(error: kiln_vm::VmError) -> ApiError {
    match error {
        kiln_vm::VmError::Image(error) => ApiError::invalid(error.to_string()),
        kiln_vm::VmError::NetworkRefused(message) => ApiError::invalid(message),
        kiln_vm::VmError::QuotaExceeded(quota) => {
            ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", quota.to_string())
        }
        error @ kiln_vm::VmError::NoCapacity { retry_after_s, .. } => ApiError {
            retry_after_s: Some(retry_after_s),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_capacity",
                error.to_string(),
            )
        },
        other => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "boot_failed",
            other.to_string(),
        ),
    }
}

/// The tenant's VMs on this server.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms", responses((status = 200, body = VmList)), security(("bearer" = [])))]
pub async fn list_vms(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> ApiResult<Json<VmList>> {
    caller.require(Scope::Read)?;
    // VMs may live on other hosts: the database lists them all.
    if state.fleet.get().is_some() {
        let vms = state
            .db
            .vm_list(&caller.tenant, false, kiln_db::vms::VM_LIST_MAX)
            .await?;
        return Ok(Json(VmList {
            vms: vms.into_iter().map(VmView::from).collect(),
        }));
    }
    let vms = manager(&state)?;
    Ok(Json(VmList {
        vms: vms
            .list(&caller.tenant)
            .await
            .into_iter()
            .map(VmView::from)
            .collect(),
    }))
}

/// One VM.
#[utoipa::path(get, path = "/api/v1/vms/{id}", tag = "vms", params(("id" = String, Path, description = "The VM's id")),
    responses((status = 200, body = VmView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_vm(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    VmId(id): VmId,
) -> ApiResult<Json<VmView>> {
    caller.require(Scope::Read)?;
    let vm = manager(&state)?
        .get(&caller.tenant, &id)
        .await
        .ok_or_else(|| ApiError::not_found("vm"))?;
    Ok(Json(vm.into()))
}

/// Stop a VM and remove everything it had.
#[utoipa::path(delete, path = "/api/v1/vms/{id}", tag = "vms", params(("id" = String, Path, description = "The VM's id")),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_vm(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    VmId(id): VmId,
) -> ApiResult<StatusCode> {
    caller.require(Scope::Write)?;
    if !manager(&state)?.delete(&caller.tenant, &id).await {
        return Err(ApiError::not_found("vm"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Run a command in a VM and return its result (output capped at 1 MiB
/// per stream; `truncated` says so). A client that leaves before the end
/// takes the command with it.
#[utoipa::path(post, path = "/api/v1/vms/{id}/execute", tag = "vms", params(("id" = String, Path, description = "The VM's id")), request_body = ExecRequest,
    responses((status = 200, body = ExecuteResult), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn execute(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    VmId(id): VmId,
    Json(body): Json<ExecRequest>,
) -> ApiResult<Json<ExecuteResult>> {
    caller.require(Scope::Write)?;
    let agent = agent_of(&state, &caller, &id).await?;
    crate::routes::secrets::check_exist(&state, &caller.tenant, &body.secrets).await?;
    let opened = open_secrets(&state, &caller, &id, &body.secrets).await?;
    let redactor = agent.redactor_with(&opened.values).map_err(|message| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "secrets_unavailable",
            message,
        )
    })?;
    let hold = hold_secrets(&agent, &opened).await?;
    let source = Source::Api {
        key_id: caller.key_id.clone(),
    };
    let recording =
        Recording::start(Some(state.db.clone()), &caller.tenant, &id, source, &body).await;
    let tap = vm_tap(state.vms.as_ref(), &caller.tenant, &id, recording.id());
    // Dropped with this future when the client disconnects: the stream's
    // drop kills the command, the recording's marks it abandoned.
    let out = agent
        .exec_tapped(
            body.exec(Some(EXECUTE_TIMEOUT_MS), false),
            body.stdin.as_bytes(),
            tap.as_ref(),
            redactor.as_ref(),
        )
        .await;
    if let Err(error) = hold.release().await {
        tracing::warn!(%error, vm = %id, "a command's secret files could not be removed");
    }
    if let Some(tap) = &tap {
        tap.finish().await;
    }
    let out = match out {
        Ok(out) => out,
        Err(error) => {
            let answer = agent_error(error);
            recording.failed(&answer.message).await;
            return Err(answer);
        }
    };
    recording.exited(&out).await;
    Ok(Json(ExecuteResult {
        exit_code: out.status(),
        signal: out.signal,
        timed_out: out.timed_out,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        truncated: out.truncated,
        duration_ms: out.duration.as_millis().min(u64::MAX as u128) as u64,
    }))
}

/// Write a file into a VM (the raw request body, at most 16 MiB).
#[utoipa::path(put, path = "/api/v1/vms/{id}/files", tag = "vms", params(("id" = String, Path, description = "The VM's id"), FileParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)), security(("bearer" = [])))]
pub async fn upload(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    VmId(id): VmId,
    Query(params): Query<FileParams>,
    request: Request,
) -> ApiResult<StatusCode> {
    // The scope, the path and the VM first: a caller that may not write
    // gets its answer before a byte of the body is read.
    caller.require(Scope::Write)?;
    let path = params.checked()?;
    let agent = agent_of(&state, &caller, &id).await?;
    let body = Bytes::from_request(request, &())
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("files are at most {FILE_BYTES_MAX} bytes"),
                )
            } else {
                ApiError::bad_request(format!("reading the body: {}", rejection.body_text()))
            }
        })?;
    agent
        .write_file(path, &body, None)
        .await
        .map_err(agent_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Read a file from a VM (the raw response body).
#[utoipa::path(get, path = "/api/v1/vms/{id}/files", tag = "vms", params(("id" = String, Path, description = "The VM's id"), FileParams),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn download(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    VmId(id): VmId,
    Query(params): Query<FileParams>,
) -> ApiResult<Vec<u8>> {
    caller.require(Scope::Read)?;
    let path = params.checked()?;
    let agent = agent_of(&state, &caller, &id).await?;
    agent.read_file(path).await.map_err(agent_error)
}

/// Later client messages: stdin (text or binary), end of stdin, or a signal.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WsInput {
    stdin: Option<String>,
    #[serde(default)]
    eof: bool,
    signal: Option<i32>,
}

/// Streamed exec over a WebSocket. Send an [`ExecRequest`] as the first
/// text message (within 10 s), then stdin as binary messages or
/// `{"stdin": "..."}` text messages, `{"eof": true}` and `{"signal": n}`;
/// messages are at most 1 MiB. Output comes as binary messages whose first
/// byte says the stream (1 stdout, 2 stderr) and whose rest is the bytes as
/// the command wrote them; the end is a text message `{"type": "exit",
/// "exit_code", "signal", "timed_out"}`, or `{"type": "error", "message"}`
/// once, then the socket closes. A client that leaves kills the command.
#[utoipa::path(get, path = "/api/v1/vms/{id}/exec/ws", tag = "vms", params(("id" = String, Path, description = "The VM's id")),
    responses((status = 101, description = "switched to the WebSocket exec protocol"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn exec_ws(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    VmId(id): VmId,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<axum::response::Response> {
    caller.require(Scope::Write)?;
    // A session of commands, opened by a GET: audited like a write.
    crate::audit::note_audited_read();
    let agent = agent_of(&state, &caller, &id).await?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            "websocket_required",
            rejection.body_text(),
        )
    })?;
    Ok(upgrade
        .max_message_size(WS_MESSAGE_MAX)
        .max_frame_size(WS_MESSAGE_MAX)
        .on_upgrade(move |socket| async move {
            let who = Who {
                keeper: crate::routes::secrets::keeper(&state),
                db: state.db.clone(),
                vms: state.vms.clone(),
                tenant: caller.tenant,
                key_id: caller.key_id,
                vm_id: id,
            };
            stream_exec(socket, agent, who).await
        }))
}

fn text(value: serde_json::Value) -> Message {
    Message::Text(value.to_string().into())
}

/// Says why the exec ends, once, and closes.
async fn end_with_error(socket: &mut WebSocket, message: impl std::fmt::Display) {
    let message = kiln_core::names::sanitise_message(&message.to_string(), 1024);
    let _ = socket
        .send(text(
            serde_json::json!({"type": "error", "message": message}),
        ))
        .await;
    let _ = socket.send(Message::Close(None)).await;
}

/// Whose WebSocket exec this is, for its execution record.
struct Who {
    keeper: kiln_worker::secrets::SecretKeeper,
    db: kiln_db::Db,
    vms: Option<Arc<kiln_vm::VmManager>>,
    tenant: String,
    key_id: String,
    vm_id: String,
}

async fn stream_exec(mut socket: WebSocket, agent: AgentInUse, who: Who) {
    let first = tokio::time::timeout(WS_FIRST_MESSAGE_WITHIN, socket.recv()).await;
    let request = match first {
        Err(_) => {
            return end_with_error(&mut socket, "no exec request within 10 s").await;
        }
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<ExecRequest>(&text),
        Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => return,
        Ok(Some(Ok(_))) => {
            return end_with_error(
                &mut socket,
                "the first message is the exec request, as JSON text",
            )
            .await;
        }
    };
    let request = match request {
        Ok(request) => request,
        Err(error) => return end_with_error(&mut socket, error).await,
    };
    let opened = match who
        .keeper
        .open(&who.tenant, &request.secrets, &Recipient::vm(&who.vm_id))
        .await
    {
        Ok(opened) => opened,
        Err(error) => return end_with_error(&mut socket, error).await,
    };
    let redactor = match agent.redactor_with(&opened.values) {
        Ok(redactor) => redactor,
        Err(error) => return end_with_error(&mut socket, error).await,
    };
    let hold = match hold_secrets(&agent, &opened).await {
        Ok(hold) => hold,
        Err(error) => return end_with_error(&mut socket, error.message).await,
    };
    // Written at the start so a long session shows up while it runs.
    let source = Source::WebSocket { key_id: who.key_id };
    let mut recording =
        Recording::start(Some(who.db), &who.tenant, &who.vm_id, source, &request).await;
    let stream = match agent
        .exec_stream(request.exec(None, true), request.stdin.as_bytes())
        .await
    {
        Ok(mut stream) => {
            if let Some(redactor) = &redactor {
                stream.redact_with(redactor);
            }
            stream
        }
        Err(error) => {
            recording.failed(&error).await;
            return end_with_error(&mut socket, error).await;
        }
    };
    let tap = vm_tap(who.vms.as_ref(), &who.tenant, &who.vm_id, recording.id());
    let mut hold = Some(hold);
    let end = pump(
        socket,
        stream,
        &mut recording,
        tap.as_ref(),
        (&mut hold, &who.vm_id),
    )
    .await;
    if let Some(hold) = hold {
        release_hold(hold, &who.vm_id).await;
    }
    if let Some(tap) = &tap {
        tap.finish().await;
    }
    match end {
        PumpEnd::Exited(out) => recording.exited(&out).await,
        PumpEnd::Failed(error) => recording.failed(error).await,
        PumpEnd::Left => {
            recording
                .abandoned("the client left; the command was killed")
                .await
        }
    }
}

async fn release_hold(hold: SecretHold, vm_id: &str) {
    if let Err(error) = hold.release().await {
        tracing::warn!(%error, vm = %vm_id, "a command's secret files could not be removed");
    }
}

/// A tap for a command run through the API, once the VM manager has logs.
fn vm_tap(
    vms: Option<&Arc<kiln_vm::VmManager>>,
    tenant: &str,
    vm_id: &str,
    exec_id: Option<i64>,
) -> Option<kiln_logs::LogTap> {
    vms?.log_tap(kiln_logs::Origin {
        exec_id,
        ..kiln_logs::Origin::vm(tenant, vm_id)
    })
}

/// How a streamed exec ended.
enum PumpEnd {
    Exited(kiln_vm::ExecOutput),
    Failed(String),
    Left,
}

/// Output out, input in, until the command ends or either side goes. The
/// stream is dropped on every way out, which kills a command still running.
async fn pump(
    mut socket: WebSocket,
    mut stream: ExecStream,
    seen: &mut Recording,
    tap: Option<&kiln_logs::LogTap>,
    (hold, vm_id): (&mut Option<SecretHold>, &str),
) -> PumpEnd {
    loop {
        tokio::select! {
            event = stream.next() => {
                let message = match event {
                    Ok(ExecEvent::Stdout(data)) => {
                        seen.stdout(&data);
                        if let Some(tap) = tap {
                            tap.write_paced(kiln_logs::Stream::Stdout, &data).await;
                        }
                        tagged(WS_STDOUT, &data)
                    }
                    Ok(ExecEvent::Stderr(data)) => {
                        seen.stderr(&data);
                        if let Some(tap) = tap {
                            tap.write_paced(kiln_logs::Stream::Stderr, &data).await;
                        }
                        tagged(WS_STDERR, &data)
                    }
                    Ok(ExecEvent::Exited(out)) => {
                        // The secret files go before the client hears of
                        // the end: its next command must not find them.
                        if let Some(hold) = hold.take() {
                            release_hold(hold, vm_id).await;
                        }
                        let exit = serde_json::json!({"type": "exit", "exit_code": out.status(),
                            "signal": out.signal, "timed_out": out.timed_out});
                        let _ = socket.send(text(exit)).await;
                        let _ = socket.send(Message::Close(None)).await;
                        return PumpEnd::Exited(out);
                    }
                    // The VM went away, or its agent broke: say so once.
                    Err(error) => {
                        let failed = PumpEnd::Failed(error.to_string());
                        end_with_error(&mut socket, error).await;
                        return failed;
                    }
                };
                if socket.send(message).await.is_err() {
                    return PumpEnd::Left;
                }
            }
            incoming = socket.recv() => {
                let sent = match incoming {
                    Some(Ok(Message::Binary(data))) => stream.send_stdin(&data, false).await,
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<WsInput>(&text) {
                        Ok(input) => forward(&stream, input).await,
                        Err(error) => {
                            let failed = PumpEnd::Failed(format!("bad client message: {error}"));
                            end_with_error(&mut socket, error).await;
                            return failed;
                        }
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
                    // The client left (or sent more than a message may
                    // hold): the command must not outlive it.
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return PumpEnd::Left,
                };
                if let Err(error) = sent {
                    let failed = PumpEnd::Failed(error.to_string());
                    end_with_error(&mut socket, error).await;
                    return failed;
                }
            }
        }
    }
}

fn tagged(stream: u8, data: &[u8]) -> Message {
    let mut message = Vec::with_capacity(data.len() + 1);
    message.push(stream);
    message.extend_from_slice(data);
    Message::Binary(message.into())
}

/// A client's text message: a signal, stdin, the end of stdin.
async fn forward(stream: &ExecStream, input: WsInput) -> Result<(), AgentError> {
    if let Some(signal) = input.signal {
        if !(1..=64).contains(&signal) {
            return Err(AgentError::Guest {
                kind: ErrorKind::Invalid,
                message: format!("signal must be 1 to 64, not {signal}"),
            });
        }
        stream.kill(signal).await?;
    }
    let data = input.stdin.unwrap_or_default();
    if !data.is_empty() || input.eof {
        stream.send_stdin(data.as_bytes(), input.eof).await?;
    }
    Ok(())
}

/// One command run in a VM, as the execution history keeps it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutionView {
    pub id: String,
    pub vm_id: String,
    /// `api`, `websocket` or `job`.
    pub source: String,
    pub job_id: Option<String>,
    /// The API key id, or `job:<id>`.
    pub actor: String,
    pub command: String,
    pub args: Vec<String>,
    /// Env variable names; their values are never kept.
    pub env_names: Vec<String>,
    pub cwd: Option<String>,
    /// `running`, `exited`, `error` (the VM or its agent failed) or
    /// `abandoned` (the caller left or the job was killed, and the command
    /// with it).
    pub status: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
    /// The exit code, or 128 + the signal.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Bytes of output kiln received (up to the caller's cap).
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    /// Output past the caller's cap was dropped.
    pub truncated: bool,
    /// The first 16 KiB of each stream; only on a single execution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_head: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_head: Option<String>,
    /// Where the whole output is: `job:<id>` (that job's result); none
    /// when it went only to the caller.
    pub output_ref: Option<String>,
    pub error: Option<String>,
}

impl ExecutionView {
    fn from_row(row: Execution, with_output: bool) -> ExecutionView {
        let start = row.start;
        let end = row.end.unwrap_or_default();
        let finished = end.finished_at > 0;
        ExecutionView {
            id: row.id.to_string(),
            vm_id: start.vm_id,
            source: start.source,
            job_id: start.job_id.map(|id| id.to_string()),
            actor: start.actor,
            command: start.command,
            args: start.args,
            env_names: start.env_names,
            cwd: start.cwd,
            status: row.status,
            started_at: render_time(start.started_at),
            finished_at: finished.then(|| render_time(end.finished_at)).flatten(),
            duration_ms: finished.then_some(end.duration_ms),
            exit_code: end.exit_code,
            signal: end.signal,
            timed_out: end.timed_out,
            stdout_bytes: end.stdout_bytes,
            stderr_bytes: end.stderr_bytes,
            truncated: end.truncated,
            stdout_head: with_output.then_some(end.stdout_head),
            stderr_head: with_output.then_some(end.stderr_head),
            output_ref: end.output_ref,
            error: end.error,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutionList {
    pub executions: Vec<ExecutionView>,
    /// Pass as `before` for the next page; none on the last.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ExecutionParams {
    /// A `next_cursor` from the page before.
    pub before: Option<String>,
    /// 1 to 100, default 20.
    pub limit: Option<i64>,
}

/// The commands run in a VM, newest first. The history outlives the VM:
/// a deleted VM's executions stay listed until retention removes them.
#[utoipa::path(get, path = "/api/v1/vms/{id}/executions", tag = "vms",
    params(("id" = String, Path, description = "The VM's id"), ExecutionParams),
    responses((status = 200, body = ExecutionList), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_executions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    VmId(id): VmId,
    Query(params): Query<ExecutionParams>,
) -> ApiResult<Json<ExecutionList>> {
    caller.require(Scope::Read)?;
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("limit must be 1 to 100"));
    }
    let before = params
        .before
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::invalid("before is not a cursor kiln gave"))
        })
        .transpose()?;
    let rows = state
        .db
        .execution_list(&caller.tenant, &id, before, limit)
        .await?;
    // A VM is known by its history, or by being live here: another
    // tenant's, or none, is not found.
    let known = !rows.is_empty()
        || state.db.execution_any(&caller.tenant, &id).await?
        || match &state.vms {
            Some(vms) => vms.get(&caller.tenant, &id).await.is_some(),
            None => false,
        };
    if !known {
        return Err(ApiError::not_found("vm"));
    }
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(Json(ExecutionList {
        executions: rows
            .into_iter()
            .map(|row| ExecutionView::from_row(row, false))
            .collect(),
        next_cursor,
    }))
}

/// One command run in a VM, with the head of its output.
#[utoipa::path(get, path = "/api/v1/vms/{id}/executions/{exec_id}", tag = "vms",
    params(("id" = String, Path, description = "The VM's id"), ("exec_id" = String, Path, description = "The execution's id")),
    responses((status = 200, body = ExecutionView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_execution(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    path: Result<axum::extract::Path<(String, String)>, PathRejection>,
) -> ApiResult<Json<ExecutionView>> {
    caller.require(Scope::Read)?;
    let axum::extract::Path((id, exec_id)) =
        path.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let not_found = || ApiError::not_found("execution");
    if kiln_core::names::check_name("vm id", &id).is_err() {
        return Err(not_found());
    }
    let exec_id = exec_id.parse::<i64>().map_err(|_| not_found())?;
    let row = state
        .db
        .execution_get(&caller.tenant, &id, exec_id)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(ExecutionView::from_row(row, true)))
}
