//! `/api/v1/keys`: API keys of the caller's tenant (admin scope).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::Router;
use kiln_core::{Scope, Scopes};
use kiln_db::ApiKey;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{Caller, Json};
use crate::{now_millis, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/keys", get(list_keys).post(create_key))
        .route("/keys/{id}", delete(revoke_key))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub created_at: Option<String>,
    pub revoked_at: Option<String>,
}

impl From<ApiKey> for KeyView {
    fn from(key: ApiKey) -> KeyView {
        KeyView {
            id: key.id,
            tenant: key.tenant,
            name: key.name,
            scopes: key.scopes.0,
            created_at: render_time(key.created_at),
            revoked_at: key.revoked_at.and_then(render_time),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
    pub scopes: Vec<Scope>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: KeyView,
    /// The secret: shown once, stored only as a hash.
    pub secret: String,
}

/// Makes and stores a new key; returns it with its secret.
pub async fn issue_key(
    db: &kiln_db::Db,
    tenant: &str,
    name: &str,
    scopes: Scopes,
) -> Result<(ApiKey, String), kiln_db::DbError> {
    let (id, secret) = kiln_db::generate_key();
    let key = ApiKey {
        id,
        tenant: tenant.to_string(),
        name: name.to_string(),
        scopes,
        created_at: now_millis(),
        revoked_at: None,
    };
    db.key_insert(&key, &kiln_db::hash_key(&secret)).await?;
    Ok((key, secret))
}

/// The tenant's keys.
#[utoipa::path(get, path = "/api/v1/keys", tag = "keys",
    responses((status = 200, body = KeyList)), security(("bearer" = [])))]
pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> ApiResult<Json<KeyList>> {
    caller.require(Scope::Admin)?;
    let keys = state.db.key_list(Some(&caller.tenant)).await?;
    Ok(Json(KeyList {
        keys: keys.into_iter().map(KeyView::from).collect(),
    }))
}

/// A new key for the caller's tenant.
#[utoipa::path(post, path = "/api/v1/keys", tag = "keys", request_body = CreateKey,
    responses((status = 201, body = CreatedKey), (status = 422, body = ErrorBody)), security(("bearer" = [])))]
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Json(body): Json<CreateKey>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    caller.require(Scope::Admin)?;
    if body.name.is_empty() || body.name.len() > 128 {
        return Err(ApiError::invalid("name must be 1 to 128 bytes"));
    }
    if body.scopes.is_empty() {
        return Err(ApiError::invalid(
            "give at least one scope: read, write or admin",
        ));
    }
    let (key, secret) =
        issue_key(&state.db, &caller.tenant, &body.name, Scopes(body.scopes)).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key: key.into(),
            secret,
        }),
    ))
}

/// Revoke a key of the caller's tenant.
#[utoipa::path(delete, path = "/api/v1/keys/{id}", tag = "keys",
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Scope::Admin)?;
    if !state
        .db
        .key_revoke(Some(&caller.tenant), &id, now_millis())
        .await?
    {
        return Err(ApiError::not_found("key"));
    }
    state.keys.forget_key_id(&id);
    Ok(StatusCode::NO_CONTENT)
}
