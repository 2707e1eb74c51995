//! `/api/v1/modules`: WebAssembly modules stored by content hash.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use kiln_core::{QuotaExceeded, Scope, TenantQuotas};
use kiln_db::ModuleInfo;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{Caller, Json};
use crate::{now_millis, render_time, AppState};

/// The largest module accepted.
pub const MODULE_BYTES_MAX: usize = 64 << 20;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/modules",
            get(list_modules)
                .post(push_module)
                .layer(DefaultBodyLimit::max(MODULE_BYTES_MAX)),
        )
        .route("/modules/{id}", get(get_module).delete(delete_module))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModuleView {
    /// `sha256:<hex>` of the binary module.
    pub id: String,
    pub size: i64,
    pub created_at: Option<String>,
}

impl From<ModuleInfo> for ModuleView {
    fn from(m: ModuleInfo) -> ModuleView {
        ModuleView {
            id: m.id,
            size: m.size,
            created_at: render_time(m.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModuleList {
    pub modules: Vec<ModuleView>,
}

fn runtime(state: &AppState) -> ApiResult<&kiln_wasm::WasmRuntime> {
    state.wasm.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this server has no WebAssembly runtime",
        )
    })
}

/// Store a module: `application/wasm` bytes, or WAT text as `text/plain`.
///
/// The module is validated here without being compiled (workers compile it
/// on first use). Content is stored once for all tenants; a push of bytes
/// already stored skips the write, so its timing can tell a tenant that
/// someone holds the same module. The content itself is never shown.
#[utoipa::path(post, path = "/api/v1/modules", tag = "modules",
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses((status = 201, body = ModuleView), (status = 200, description = "Already stored", body = ModuleView),
              (status = 400, body = ErrorBody), (status = 403, description = "Scope missing or quota exceeded", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn push_module(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    request: Request,
) -> ApiResult<(StatusCode, Json<ModuleView>)> {
    // The caller's scope is checked before a byte of the body is read.
    caller.require(Scope::Write)?;
    let runtime = runtime(&state)?;
    let content_type = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/wasm")
        .to_string();
    let body = Bytes::from_request(request, &state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("modules are at most {MODULE_BYTES_MAX} bytes"),
            )
        } else {
            ApiError::bad_request(e.body_text())
        }
    })?;
    let binary = if content_type.starts_with("text/") {
        // Parsing up to 64 MiB of text is CPU work: off the async threads.
        let parsed = tokio::task::spawn_blocking(move || kiln_wasm::WasmRuntime::to_binary(&body))
            .await
            .map_err(ApiError::internal)?;
        Bytes::from(parsed.map_err(|e| ApiError::bad_request(e.to_string()))?)
    } else if content_type.starts_with("application/wasm")
        || content_type.starts_with("application/octet-stream")
    {
        body
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/wasm, or WAT as text/plain",
        ));
    };
    let id = kiln_blob::content_id(&binary);
    let key = kiln_wasm::module_blob_key(&id);
    if let Some(held) = state.db.module_get(&caller.tenant, &id).await? {
        store_bytes(&state, &key, binary).await?;
        return Ok((StatusCode::OK, Json(held.into())));
    }
    check_module_quotas(
        &state,
        runtime.quotas(),
        &caller.tenant,
        binary.len() as u64,
    )
    .await?;
    runtime
        .check_module(binary.clone())
        .await
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let info = ModuleInfo {
        id: id.clone(),
        size: binary.len() as i64,
        created_at: now_millis(),
    };
    store_bytes(&state, &key, binary.clone()).await?;
    let created = state.db.module_insert(&caller.tenant, &info).await?;
    // A delete by the last other holder may have removed the bytes between
    // the write and the insert; now that this tenant holds the module, put
    // them back.
    store_bytes(&state, &key, binary).await?;
    let stored = state
        .db
        .module_get(&caller.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::internal("module vanished after insert"))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(stored.into())))
}

/// Writes a module's bytes unless they are stored already.
async fn store_bytes(state: &AppState, key: &str, binary: Bytes) -> ApiResult<()> {
    if !state.blobs.exists(key).await.map_err(ApiError::internal)? {
        state
            .blobs
            .put(key, binary)
            .await
            .map_err(ApiError::internal)?;
    }
    Ok(())
}

/// Refuses a new module that would take the tenant past `modules_max` or
/// `modules_bytes_max`. Two pushes racing can each pass: the bound holds to
/// within the pushes in flight at once.
async fn check_module_quotas(
    state: &AppState,
    quotas: &TenantQuotas,
    tenant: &str,
    size: u64,
) -> ApiResult<()> {
    let (count, bytes) = state.db.module_usage(tenant).await?;
    let exceeded = if count >= u64::from(quotas.modules_max) {
        Some(QuotaExceeded {
            what: "modules stored",
            limit: u64::from(quotas.modules_max),
        })
    } else if bytes.saturating_add(size) > quotas.modules_bytes_max {
        Some(QuotaExceeded {
            what: "bytes of modules stored",
            limit: quotas.modules_bytes_max,
        })
    } else {
        None
    };
    match exceeded {
        Some(quota) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "quota_exceeded",
            quota.to_string(),
        )),
        None => Ok(()),
    }
}

/// The tenant's modules.
#[utoipa::path(get, path = "/api/v1/modules", tag = "modules",
    responses((status = 200, body = ModuleList)), security(("bearer" = [])))]
pub async fn list_modules(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> ApiResult<Json<ModuleList>> {
    caller.require(Scope::Read)?;
    let modules = state.db.module_list(&caller.tenant).await?;
    Ok(Json(ModuleList {
        modules: modules.into_iter().map(ModuleView::from).collect(),
    }))
}

/// One module.
#[utoipa::path(get, path = "/api/v1/modules/{id}", tag = "modules",
    responses((status = 200, body = ModuleView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_module(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ModuleView>> {
    caller.require(Scope::Read)?;
    let module = state
        .db
        .module_get(&caller.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("module"))?;
    Ok(Json(module.into()))
}

/// Forget a module for this tenant. Its bytes are shared by every tenant
/// that pushed the same content; they are deleted when no tenant holds the
/// module any more. (A push of the same content racing with that delete
/// writes the bytes again after its insert; pushing again repairs a module
/// whose bytes went missing all the same.)
#[utoipa::path(delete, path = "/api/v1/modules/{id}", tag = "modules",
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_module(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Scope::Write)?;
    if !state.db.module_delete(&caller.tenant, &id).await? {
        return Err(ApiError::not_found("module"));
    }
    if state.db.module_holders(&id).await? == 0 {
        // The tenant's module is gone either way; bytes that could not be
        // deleted now are only storage, and go at the next delete of the
        // same content.
        if let Err(error) = state.blobs.delete(&kiln_wasm::module_blob_key(&id)).await {
            tracing::warn!(module = %id, %error, "could not delete a module's bytes");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}
