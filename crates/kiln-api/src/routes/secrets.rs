//! `/api/v1/secrets`: a tenant's secrets. A value goes in with `PUT` and
//! never comes out of any route: reads show metadata only. Values are
//! sealed (`kiln_core::secrets`) before they reach the database.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use kiln_core::secrets::{self, Fresh, MasterKey, VALUE_MAX};
use kiln_db::secrets::SecretMeta;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Json, Path};
use crate::{now_millis, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/secrets", get(list_secrets)).route(
        "/secrets/{name}",
        get(get_secret)
            .put(put_secret)
            .delete(delete_secret)
            .layer(DefaultBodyLimit::max(VALUE_MAX)),
    )
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SecretView {
    pub name: String,
    /// Each `PUT` makes a new version; jobs get the newest.
    pub version: i64,
    /// The value's length.
    pub bytes: i64,
    pub created_at: Option<String>,
    pub last_used_at: Option<String>,
}

impl From<SecretMeta> for SecretView {
    fn from(m: SecretMeta) -> SecretView {
        SecretView {
            name: m.name,
            version: m.version,
            bytes: m.bytes,
            created_at: render_time(m.created_at),
            last_used_at: m.last_used_at.and_then(render_time),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SecretList {
    pub secrets: Vec<SecretView>,
}

pub(crate) fn master(state: &AppState) -> ApiResult<&MasterKey> {
    state.master_key.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this node holds no master key, so it keeps no secrets",
        )
    })
}

/// Refuses (422 `unknown_secret`, naming it) a request for a secret the
/// tenant does not have: a job that could never get its secrets is
/// refused at submit, not failed at run time. Only the caller's own
/// tenant is looked in.
pub(crate) async fn check_exist(state: &AppState, tenant: &str, names: &[String]) -> ApiResult<()> {
    for name in names {
        if state.db.secret_get(tenant, name).await?.is_none() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_secret",
                format!("secret {name} does not exist; store it with PUT /api/v1/secrets/{name}"),
            ));
        }
    }
    Ok(())
}

/// The keeper that opens secrets for commands this node runs (API
/// execute): with this node's master key, if it holds one.
pub(crate) fn keeper(state: &AppState) -> kiln_worker::secrets::SecretKeeper {
    kiln_worker::secrets::SecretKeeper::new(state.db.clone(), state.master_key.get().cloned())
}

/// A secret's name becomes a file name in sandboxes (`/run/secrets/<name>`).
fn checked(name: &str) -> ApiResult<&str> {
    secrets::check_name(name).map_err(ApiError::invalid)?;
    Ok(name)
}

pub(crate) fn fresh() -> Fresh {
    use rand::RngCore;
    let mut fresh = Fresh {
        data_key: [0; secrets::KEY_BYTES],
        nonce: [0; secrets::NONCE_BYTES],
        wrap_nonce: [0; secrets::NONCE_BYTES],
    };
    let mut rng = rand::rng();
    rng.fill_bytes(&mut fresh.data_key);
    rng.fill_bytes(&mut fresh.nonce);
    rng.fill_bytes(&mut fresh.wrap_nonce);
    fresh
}

/// Store a new version of a secret (the body is the value, up to 64 KiB).
#[utoipa::path(put, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "The secret's name")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = SecretView), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_secret(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(name): Path<String>,
    value: Bytes,
) -> ApiResult<(StatusCode, Json<SecretView>)> {
    let name = checked(&name)?;
    let master = master(&state)?;
    if value.is_empty() {
        return Err(ApiError::invalid("a secret's value must not be empty"));
    }
    let tenant = caller.tenant.clone();
    let meta = state
        .db
        .secret_put(&tenant, name, value.len(), now_millis(), |version| {
            secrets::seal(master, (&tenant, name, version), &value, fresh())
        })
        .await?;
    Ok((StatusCode::CREATED, Json(meta.into())))
}

/// The tenant's secrets: names and versions, never values.
#[utoipa::path(get, path = "/api/v1/secrets", tag = "secrets",
    responses((status = 200, body = SecretList)), security(("bearer" = [])))]
pub async fn list_secrets(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
) -> ApiResult<Json<SecretList>> {
    crate::audit::note_audited_read();
    let secrets = state.db.secret_list(&caller.tenant).await?;
    Ok(Json(SecretList {
        secrets: secrets.into_iter().map(SecretView::from).collect(),
    }))
}

/// One secret's metadata (never its value).
#[utoipa::path(get, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "The secret's name")),
    responses((status = 200, body = SecretView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_secret(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(name): Path<String>,
) -> ApiResult<Json<SecretView>> {
    crate::audit::note_audited_read();
    let meta = state
        .db
        .secret_get(&caller.tenant, &name)
        .await?
        .ok_or_else(|| ApiError::not_found("secret"))?;
    Ok(Json(meta.into()))
}

/// Delete a secret, every version of it.
#[utoipa::path(delete, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "The secret's name")),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_secret(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    if !state.db.secret_delete(&caller.tenant, &name).await? {
        return Err(ApiError::not_found("secret"));
    }
    Ok(StatusCode::NO_CONTENT)
}
