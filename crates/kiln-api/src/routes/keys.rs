//! `/api/v1/keys`: API keys of the caller's tenant (admin scope). A key
//! never mints one above its own scopes, and only a `system` key mints
//! keys for another tenant.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::Router;
use kiln_core::names::{check_name, check_text};
use kiln_core::{Millis, Scope, Scopes};
use kiln_db::ApiKey;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Caller, Json, Path};
use crate::{now_millis, parse_time, render_time, AppState};

/// Longest key name.
pub const KEY_NAME_MAX: usize = 128;

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
    /// After this the key is refused (401 `expired`); none: never.
    pub expires_at: Option<String>,
    /// Within about a minute.
    pub last_used_at: Option<String>,
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
            expires_at: key.expires_at.and_then(render_time),
            last_used_at: key.last_used_at.and_then(render_time),
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
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
    /// None above the caller's own.
    #[schema(min_items = 1)]
    pub scopes: Vec<Scope>,
    /// The tenant the key acts for; another tenant than the caller's needs
    /// the system scope. Default: the caller's.
    pub tenant: Option<String>,
    /// When the key stops working (RFC 3339, in the future).
    pub expires_at: Option<String>,
    /// Or: how many seconds from now it stops working.
    #[schema(minimum = 1)]
    pub expires_in_s: Option<u64>,
}

impl CreateKey {
    /// When the new key expires, if it does.
    fn expiry(&self, now: Millis) -> ApiResult<Option<Millis>> {
        let at = match (&self.expires_at, self.expires_in_s) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "give expires_at or expires_in_s, not both",
                ))
            }
            (Some(text), None) => Some(
                parse_time(text)
                    .ok_or_else(|| ApiError::invalid("expires_at must be an RFC 3339 time"))?,
            ),
            (None, Some(0)) => return Err(ApiError::invalid("expires_in_s must be at least 1")),
            (None, Some(seconds)) => Some(
                i64::try_from(seconds)
                    .ok()
                    .and_then(|s| s.checked_mul(1000))
                    .and_then(|ms| now.checked_add(ms))
                    .ok_or_else(|| ApiError::invalid("expires_in_s is too large"))?,
            ),
            (None, None) => None,
        };
        if at.is_some_and(|at| at <= now) {
            return Err(ApiError::invalid("expires_at must be in the future"));
        }
        Ok(at)
    }

    /// Checks the request against the caller's own key; the tenant the new
    /// key belongs to.
    fn check(&self, caller: &Caller) -> ApiResult<String> {
        if self.name.is_empty() {
            return Err(ApiError::invalid(format!(
                "name must be 1 to {KEY_NAME_MAX} bytes"
            )));
        }
        check_text("name", &self.name, KEY_NAME_MAX)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        if self.scopes.is_empty() {
            return Err(ApiError::invalid(
                "give at least one scope: read, write or admin",
            ));
        }
        if let Some(above) = self.scopes.iter().find(|s| !caller.scopes.allows(**s)) {
            return Err(ApiError::forbidden(format!(
                "a key cannot mint a key with the {} scope, which it lacks",
                above.as_str()
            )));
        }
        let tenant = match &self.tenant {
            Some(tenant) => {
                check_name("tenant", tenant).map_err(|e| ApiError::invalid(e.to_string()))?;
                tenant.clone()
            }
            None => caller.tenant.clone(),
        };
        if tenant != caller.tenant {
            caller.require(Scope::System)?;
        }
        Ok(tenant)
    }
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
    issue_key_until(db, tenant, name, scopes, None).await
}

/// [`issue_key`] for a key that expires at `expires_at`.
pub async fn issue_key_until(
    db: &kiln_db::Db,
    tenant: &str,
    name: &str,
    scopes: Scopes,
    expires_at: Option<Millis>,
) -> Result<(ApiKey, String), kiln_db::DbError> {
    let (id, secret) = kiln_db::generate_key();
    let key = ApiKey {
        id,
        tenant: tenant.to_string(),
        name: name.to_string(),
        scopes,
        created_at: now_millis(),
        revoked_at: None,
        expires_at,
        last_used_at: None,
    };
    db.key_insert(&key, &kiln_db::hash_key(&secret)).await?;
    Ok((key, secret))
}

/// The tenant's keys.
#[utoipa::path(get, path = "/api/v1/keys", tag = "keys",
    responses((status = 200, body = KeyList)), security(("bearer" = [])))]
pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
) -> ApiResult<Json<KeyList>> {
    let keys = state.db.key_list(Some(&caller.tenant)).await?;
    Ok(Json(KeyList {
        keys: keys.into_iter().map(KeyView::from).collect(),
    }))
}

/// A new key, for the caller's tenant unless a system key names another.
#[utoipa::path(post, path = "/api/v1/keys", tag = "keys", request_body = CreateKey,
    responses((status = 201, body = CreatedKey), (status = 403, body = ErrorBody),
              (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Json(body): Json<CreateKey>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    let tenant = body.check(&caller)?;
    let expires_at = body.expiry(now_millis())?;
    let (key, secret) = issue_key_until(
        &state.db,
        &tenant,
        &body.name,
        Scopes(body.scopes),
        expires_at,
    )
    .await?;
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
    caller: Authorized<needs::Admin>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    // Key ids are letters and digits; anything else names no key.
    if check_name("key id", &id).is_err() {
        return Err(ApiError::not_found("key"));
    }
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
