//! `/api/v1/vms`: interactive microVM sandboxes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use kiln_core::Scope;
use kiln_vm::{Exec, VmInfo, VmManager, VmRequest};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{Caller, Json, Query};
use crate::{render_time, AppState};

/// The largest file moved in one request.
pub const FILE_BYTES_MAX: usize = 16 << 20;

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

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    #[serde(default = "default_image")]
    pub image: String,
    #[serde(default = "one")]
    pub vcpus: u8,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// Deleted this long after creation (default 600 s).
    pub ttl_s: Option<u64>,
    /// Deleted after this long without use.
    pub idle_timeout_s: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_image() -> String {
    "default".into()
}
fn one() -> u8 {
    1
}
fn default_memory() -> u32 {
    128
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

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    #[serde(default)]
    pub stdin: String,
    /// Killed after this long (default 60 s; none for a streamed exec).
    pub timeout_ms: Option<u64>,
}

impl ExecuteRequest {
    /// The agent's exec and its initial stdin; `stdin_open` keeps stdin
    /// open for more (streamed exec).
    fn into_exec(self, stdin_open: bool) -> Result<(Exec, String), ApiError> {
        if self.command.is_empty() {
            return Err(ApiError::invalid("command must not be empty"));
        }
        let exec = Exec {
            command: self.command,
            args: self.args,
            env: self.env,
            cwd: self.cwd,
            // A stream lives as long as its client unless a timeout is asked for.
            timeout_ms: match (self.timeout_ms, stdin_open) {
                (Some(ms), _) => Some(ms.clamp(1, 24 * 3600 * 1000)),
                (None, false) => Some(60_000),
                (None, true) => None,
            },
            stdin_open,
            ..Exec::default()
        };
        Ok((exec, self.stdin))
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecuteResult {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub truncated: bool,
    pub duration_ms: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FileParams {
    /// Absolute path inside the VM.
    pub path: String,
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

/// Boot a VM.
#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", request_body = CreateVm,
    responses((status = 201, body = VmView), (status = 422, body = ErrorBody)), security(("bearer" = [])))]
pub async fn create_vm(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Json(body): Json<CreateVm>,
) -> ApiResult<(StatusCode, Json<VmView>)> {
    caller.require(Scope::Write)?;
    let vms = manager(&state)?;
    if !(1..=8).contains(&body.vcpus) {
        return Err(ApiError::invalid("vcpus must be 1 to 8"));
    }
    if !(64..=4096).contains(&body.memory_mib) {
        return Err(ApiError::invalid("memory_mib must be 64 to 4096"));
    }
    kiln_core::validate_name("image", &body.image).map_err(|e| ApiError::invalid(e.to_string()))?;
    let request = VmRequest {
        tenant: caller.tenant.clone(),
        image: body.image,
        vcpus: body.vcpus,
        memory_mib: body.memory_mib,
        ttl: Some(Duration::from_secs(
            body.ttl_s.unwrap_or(600).clamp(1, 7 * 24 * 3600),
        )),
        idle_timeout: body.idle_timeout_s.map(Duration::from_secs),
        labels: body.labels,
    };
    let vm = vms.create(request).await.map_err(|e| match e {
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
    })?;
    Ok((StatusCode::CREATED, Json(vm.into())))
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
#[utoipa::path(get, path = "/api/v1/vms/{id}", tag = "vms",
    responses((status = 200, body = VmView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_vm(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<VmView>> {
    caller.require(Scope::Read)?;
    let vm = manager(&state)?
        .get(&caller.tenant, &id)
        .await
        .ok_or_else(|| ApiError::not_found("vm"))?;
    Ok(Json(vm.into()))
}

/// Stop a VM and remove everything it had.
#[utoipa::path(delete, path = "/api/v1/vms/{id}", tag = "vms",
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_vm(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Scope::Write)?;
    if !manager(&state)?.delete(&caller.tenant, &id).await {
        return Err(ApiError::not_found("vm"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Run a command in a VM and return its result.
#[utoipa::path(post, path = "/api/v1/vms/{id}/execute", tag = "vms", request_body = ExecuteRequest,
    responses((status = 200, body = ExecuteResult), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn execute(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<ExecuteRequest>,
) -> ApiResult<Json<ExecuteResult>> {
    caller.require(Scope::Write)?;
    let (exec, stdin) = body.into_exec(false)?;
    let agent = manager(&state)?
        .agent(&caller.tenant, &id)
        .await
        .ok_or_else(|| ApiError::not_found("vm"))?;
    let out = agent
        .exec(exec, stdin.as_bytes())
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "vm_error", e.to_string()))?;
    let (stdout, cut_out) = kiln_vm::job::cap(&out.stdout);
    let (stderr, cut_err) = kiln_vm::job::cap(&out.stderr);
    Ok(Json(ExecuteResult {
        exit_code: out.exit_code.unwrap_or(128 + out.signal.unwrap_or(0)),
        signal: out.signal,
        timed_out: out.timed_out,
        stdout,
        stderr,
        truncated: cut_out || cut_err,
        duration_ms: out.duration.as_millis() as u64,
    }))
}

/// Write a file into a VM (the raw request body).
#[utoipa::path(put, path = "/api/v1/vms/{id}/files", tag = "vms", params(FileParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn upload(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<FileParams>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<StatusCode> {
    caller.require(Scope::Write)?;
    let body = body.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("files are at most {FILE_BYTES_MAX} bytes"),
        )
    })?;
    if !params.path.starts_with('/') {
        return Err(ApiError::invalid("path must be absolute"));
    }
    let agent = manager(&state)?
        .agent(&caller.tenant, &id)
        .await
        .ok_or_else(|| ApiError::not_found("vm"))?;
    agent
        .write_file(&params.path, &body, None)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "file_error",
                e.to_string(),
            )
        })?;
    Ok(StatusCode::NO_CONTENT)
}

/// Read a file from a VM (the raw response body).
#[utoipa::path(get, path = "/api/v1/vms/{id}/files", tag = "vms", params(FileParams),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn download(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<FileParams>,
) -> ApiResult<Vec<u8>> {
    caller.require(Scope::Read)?;
    let agent = manager(&state)?
        .agent(&caller.tenant, &id)
        .await
        .ok_or_else(|| ApiError::not_found("vm"))?;
    agent
        .read_file(&params.path)
        .await
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()))
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

/// Streamed exec: send an [`ExecuteRequest`] as the first text message, then
/// stdin as binary or `{"stdin": "..."}` text messages and `{"eof": true}`;
/// receive `{"type": "stdout"|"stderr", "data"}` and a final
/// `{"type": "exit", "exit_code", "signal", "timed_out"}` (or `{"type": "error"}`).
pub async fn exec_ws(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> ApiResult<axum::response::Response> {
    caller.require(Scope::Write)?;
    let agent = manager(&state)?
        .agent(&caller.tenant, &id)
        .await
        .ok_or_else(|| ApiError::not_found("vm"))?;
    Ok(upgrade.on_upgrade(move |socket| stream_exec(socket, agent)))
}

async fn stream_exec(mut socket: axum::extract::ws::WebSocket, agent: kiln_vm::AgentConn) {
    use axum::extract::ws::Message;
    let send_json = |value: serde_json::Value| Message::Text(value.to_string().into());
    let start = match socket.recv().await {
        Some(Ok(Message::Text(text))) => serde_json::from_str::<ExecuteRequest>(&text)
            .map_err(|e| e.to_string())
            .and_then(|request| request.into_exec(true).map_err(|e| e.message)),
        _ => return,
    };
    let (exec, stdin) = match start {
        Ok(start) => start,
        Err(message) => {
            let _ = socket
                .send(send_json(
                    serde_json::json!({"type": "error", "message": message}),
                ))
                .await;
            return;
        }
    };
    let (exec_id, mut events) = match agent.exec_stream(exec, stdin.as_bytes()).await {
        Ok(started) => started,
        Err(error) => {
            let _ = socket
                .send(send_json(
                    serde_json::json!({"type": "error", "message": error.to_string()}),
                ))
                .await;
            return;
        }
    };
    loop {
        tokio::select! {
            event = events.recv() => {
                let message = match event {
                    Some(kiln_vm::ExecEvent::Stdout(data)) => serde_json::json!({"type": "stdout", "data": String::from_utf8_lossy(&data)}),
                    Some(kiln_vm::ExecEvent::Stderr(data)) => serde_json::json!({"type": "stderr", "data": String::from_utf8_lossy(&data)}),
                    Some(kiln_vm::ExecEvent::Exited(out)) => {
                        let exit = serde_json::json!({"type": "exit", "exit_code": out.exit_code.unwrap_or(128 + out.signal.unwrap_or(0)),
                            "signal": out.signal, "timed_out": out.timed_out});
                        let _ = socket.send(send_json(exit)).await;
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                    None => serde_json::json!({"type": "error", "message": "the VM went away"}),
                };
                if socket.send(send_json(message)).await.is_err() {
                    let _ = agent.kill(exec_id, 9).await;
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Binary(data))) => {
                    let _ = agent.send_stdin(exec_id, &data, false).await;
                }
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<WsInput>(&text) {
                    Ok(input) => {
                        if let Some(signal) = input.signal {
                            let _ = agent.kill(exec_id, signal).await;
                        }
                        let data = input.stdin.unwrap_or_default();
                        if !data.is_empty() || input.eof {
                            let _ = agent.send_stdin(exec_id, data.as_bytes(), input.eof).await;
                        }
                    }
                    Err(error) => {
                        let _ = socket.send(send_json(serde_json::json!({"type": "error", "message": error.to_string()}))).await;
                    }
                },
                Some(Ok(_)) => {}
                // The client left: the command must not outlive it.
                Some(Err(_)) | None => {
                    let _ = agent.kill(exec_id, 9).await;
                    return;
                }
            },
        }
    }
}
