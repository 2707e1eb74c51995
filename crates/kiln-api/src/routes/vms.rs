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
use kiln_vm::agent::{AgentError, ErrorKind, ExecStream};
use kiln_vm::job::{CreateVmSpec, ExecRequest};
use kiln_vm::manager::AgentInUse;
use kiln_vm::{ExecEvent, VmInfo, VmManager};
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
        .route(
            "/vms/{id}/files",
            get(download)
                .put(upload)
                .layer(DefaultBodyLimit::max(FILE_BYTES_MAX)),
        )
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
    responses((status = 201, body = VmView), (status = 422, body = ErrorBody)), security(("bearer" = [])))]
pub async fn create_vm(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Json(body): Json<CreateVmSpec>,
) -> ApiResult<(StatusCode, Json<VmView>)> {
    caller.require(Scope::Write)?;
    let vms = manager(&state)?;
    let request = body.shape.request(&caller.tenant, body.labels);
    let vm = vms.create(request).await.map_err(create_error)?;
    Ok((StatusCode::CREATED, Json(vm.into())))
}

/// A refused image is the caller's to fix; a quota is the tenant's; no
/// room on the host may pass, so the answer says when to try again.
fn create_error(error: kiln_vm::VmError) -> ApiError {
    match error {
        kiln_vm::VmError::Image(error) => ApiError::invalid(error.to_string()),
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
    // Dropped with this future when the client disconnects: the stream's
    // drop kills the command.
    let out = agent
        .exec(
            body.exec(Some(EXECUTE_TIMEOUT_MS), false),
            body.stdin.as_bytes(),
        )
        .await
        .map_err(agent_error)?;
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
        .on_upgrade(move |socket| stream_exec(socket, agent)))
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

async fn stream_exec(mut socket: WebSocket, agent: AgentInUse) {
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
    let stream = match agent
        .exec_stream(request.exec(None, true), request.stdin.as_bytes())
        .await
    {
        Ok(stream) => stream,
        Err(error) => return end_with_error(&mut socket, error).await,
    };
    pump(socket, stream).await;
}

/// Output out, input in, until the command ends or either side goes. The
/// stream is dropped on every way out, which kills a command still running.
async fn pump(mut socket: WebSocket, mut stream: ExecStream) {
    loop {
        tokio::select! {
            event = stream.next() => {
                let message = match event {
                    Ok(ExecEvent::Stdout(data)) => tagged(WS_STDOUT, &data),
                    Ok(ExecEvent::Stderr(data)) => tagged(WS_STDERR, &data),
                    Ok(ExecEvent::Exited(out)) => {
                        let exit = serde_json::json!({"type": "exit", "exit_code": out.status(),
                            "signal": out.signal, "timed_out": out.timed_out});
                        let _ = socket.send(text(exit)).await;
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                    // The VM went away, or its agent broke: say so once.
                    Err(error) => return end_with_error(&mut socket, error).await,
                };
                if socket.send(message).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => {
                let sent = match incoming {
                    Some(Ok(Message::Binary(data))) => stream.send_stdin(&data, false).await,
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<WsInput>(&text) {
                        Ok(input) => forward(&stream, input).await,
                        Err(error) => return end_with_error(&mut socket, error).await,
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
                    // The client left (or sent more than a message may
                    // hold): the command must not outlive it.
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                };
                if let Err(error) = sent {
                    return end_with_error(&mut socket, error).await;
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
