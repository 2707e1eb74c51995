//! `/api/v1/users`: the users of the caller's tenant (admin scope; a user
//! of another tenant is not found). A user changes their own password with
//! the old one. Deleting a user, or changing their role or password, ends
//! their sessions.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};
use axum::Router;
use kiln_core::names::check_name;
use kiln_core::users::{check_password, Role};
use kiln_core::Scope;
use kiln_db::users::User;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Caller, Json, Path, Peer};
use crate::{now_millis, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/users", get(list_users).post(create_user))
        .route("/users/{name}", get(get_user).delete(delete_user))
        .route("/users/{name}/role", put(set_role))
        .route("/users/{name}/password", put(set_password))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub tenant: String,
    pub username: String,
    pub role: Role,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

impl From<User> for UserView {
    fn from(user: User) -> UserView {
        UserView {
            tenant: user.tenant,
            username: user.username,
            role: user.role,
            created_at: render_time(user.created_at),
            updated_at: render_time(user.updated_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserList {
    pub users: Vec<UserView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// Letters, digits and `_ - . : @`.
    #[schema(min_length = 1, max_length = 64)]
    pub username: String,
    pub role: Role,
    /// At least 12 characters; stored only as an argon2id hash.
    #[schema(min_length = 12, max_length = 1024)]
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRole {
    pub role: Role,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPassword {
    #[schema(min_length = 12, max_length = 1024)]
    pub password: String,
    /// Needed when users change their own password without the admin scope.
    pub old_password: Option<String>,
}

/// A username from the path: anything that is not a name names no user.
fn username(name: &str) -> ApiResult<&str> {
    check_name("username", name).map_err(|_| ApiError::not_found("user"))?;
    Ok(name)
}

fn checked_password(password: &str) -> ApiResult<()> {
    check_password(password).map_err(ApiError::invalid)
}

/// A new user of the caller's tenant.
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = CreateUser,
    responses((status = 201, body = UserView), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_user(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Json(body): Json<CreateUser>,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    check_name("username", &body.username).map_err(|e| ApiError::invalid(e.to_string()))?;
    checked_password(&body.password)?;
    let hash = state.auth.hash_password(body.password).await?;
    let now = now_millis();
    let user = User {
        tenant: caller.tenant.clone(),
        username: body.username,
        role: body.role,
        created_at: now,
        updated_at: now,
    };
    if !state.db.user_insert(&user, &hash).await? {
        return Err(ApiError::conflict(format!(
            "user {} already exists",
            user.username
        )));
    }
    crate::audit::note_resource(format!("/api/v1/users/{}", user.username));
    Ok((StatusCode::CREATED, Json(user.into())))
}

/// The tenant's users.
#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses((status = 200, body = UserList)), security(("bearer" = [])))]
pub async fn list_users(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
) -> ApiResult<Json<UserList>> {
    let users = state.db.user_list(&caller.tenant).await?;
    Ok(Json(UserList {
        users: users.into_iter().map(UserView::from).collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/users/{name}", tag = "users",
    responses((status = 200, body = UserView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_user(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Path(name): Path<String>,
) -> ApiResult<Json<UserView>> {
    let user = state
        .db
        .user_get(&caller.tenant, username(&name)?)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    Ok(Json(user.into()))
}

/// Delete a user; their sessions end.
#[utoipa::path(delete, path = "/api/v1/users/{name}", tag = "users",
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_user(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let name = username(&name)?;
    if !state
        .db
        .user_delete(&caller.tenant, name, now_millis())
        .await?
    {
        return Err(ApiError::not_found("user"));
    }
    state.auth.sessions.forget_user(&caller.tenant, name);
    Ok(StatusCode::NO_CONTENT)
}

/// Give a user another role; their sessions end (their tokens name the
/// old one).
#[utoipa::path(put, path = "/api/v1/users/{name}/role", tag = "users", request_body = SetRole,
    responses((status = 200, body = UserView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_role(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Path(name): Path<String>,
    Json(body): Json<SetRole>,
) -> ApiResult<Json<UserView>> {
    let name = username(&name)?;
    if !state
        .db
        .user_set_role(&caller.tenant, name, body.role, now_millis())
        .await?
    {
        return Err(ApiError::not_found("user"));
    }
    state.auth.sessions.forget_user(&caller.tenant, name);
    let user = state
        .db
        .user_get(&caller.tenant, name)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    Ok(Json(user.into()))
}

/// Set a user's password: an admin sets anyone's in the tenant; users set
/// their own with the old one. Their sessions end.
#[utoipa::path(put, path = "/api/v1/users/{name}/password", tag = "users",
    request_body = SetPassword,
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_password(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    caller: Caller,
    Path(name): Path<String>,
    Json(body): Json<SetPassword>,
) -> ApiResult<StatusCode> {
    let own = caller.user.as_deref() == Some(name.as_str());
    if !(own || caller.scopes.allows(Scope::Admin)) {
        caller.require(Scope::Admin)?;
    }
    let name = username(&name)?;
    checked_password(&body.password)?;
    if !caller.scopes.allows(Scope::Admin) {
        // Without the admin scope, a stolen session alone cannot take over
        // the account: the old password is checked, under the throttle.
        let old = body
            .old_password
            .ok_or_else(|| ApiError::forbidden("give old_password to change your own password"))?;
        let source = state.auth.settings().client_address(peer, &headers);
        let checked =
            super::auth::verify_throttled(&state, &caller.tenant, name, &source, old).await?;
        if checked.is_none() {
            return Err(ApiError::forbidden("the old password does not match"));
        }
    }
    let hash = state.auth.hash_password(body.password).await?;
    if !state
        .db
        .user_set_password(&caller.tenant, name, &hash, now_millis())
        .await?
    {
        return Err(ApiError::not_found("user"));
    }
    state.auth.sessions.forget_user(&caller.tenant, name);
    Ok(StatusCode::NO_CONTENT)
}
