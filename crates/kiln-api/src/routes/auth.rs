//! `/api/v1/auth`: users sign in for a short-lived session token (and a
//! session cookie with its CSRF value, for the web console), sign out,
//! and ask who they are. Failed logins slow down, then lock, per account
//! and per source address; an unknown user is answered exactly as a wrong
//! password is.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kiln_core::names::check_name;
use kiln_core::users::{
    before_attempt, lock_after, within_allowance, Role, Verdict, PASSWORD_MAX_BYTES,
};
use kiln_core::Scope;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{random_id, Claims, CSRF_COOKIE, SESSION_COOKIE};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{Caller, Json, Peer};
use crate::{now_millis, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/auth/login", post(login))
        .route("/auth/logout", post(logout))
        .route("/auth/me", get(me))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[schema(min_length = 1, max_length = 64)]
    pub tenant: String,
    #[schema(min_length = 1, max_length = 64)]
    pub username: String,
    #[schema(max_length = 1024)]
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginAnswer {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    pub token_type: &'static str,
    pub expires_at: Option<String>,
    pub expires_in_s: u64,
    /// Send as `X-CSRF-Token` on writes authenticated by the cookie.
    pub csrf_token: String,
    pub session: String,
    pub tenant: String,
    pub username: String,
    pub role: Role,
}

/// The answer to credentials that do not match, whatever did not.
fn invalid_credentials() -> ApiError {
    ApiError::unauthorized("invalid tenant, username or password")
}

fn refuse(verdict: Verdict) -> ApiError {
    let (code, wait, message) = match verdict {
        Verdict::Locked(ms) => ("locked", ms, "too many failed logins: locked"),
        // Only refusals are rendered; a `Proceed` here would be a bug, and
        // is answered as the mildest refusal rather than a panic.
        Verdict::SlowDown(ms) => ("rate_limited", ms, "failed logins: slow down"),
        Verdict::Proceed => ("rate_limited", 0, "failed logins: slow down"),
    };
    let seconds = ((wait + 999) / 1000).max(1) as u64;
    let mut error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        code,
        format!("{message}; try again in {seconds} s"),
    );
    error.retry_after_s = Some(seconds);
    error
}

/// Checks `password` for the user under the login throttle: refused at
/// once while the account or the source address is locked or must wait;
/// the attempt is counted as a failure before the check (so attempts made
/// at once are all counted) and taken back if it succeeds. `None` when no
/// such user has this password.
pub(crate) async fn verify_throttled(
    state: &AppState,
    tenant: &str,
    username: &str,
    source: &str,
    password: String,
) -> ApiResult<Option<kiln_db::users::User>> {
    let settings = state.auth.settings();
    let account_key = format!("account:{tenant}/{username}");
    let source_key = format!("source:{source}");
    let now = now_millis();
    let counts = state
        .db
        .login_failures(&[account_key.clone(), source_key.clone()])
        .await?;
    let count_of = |key: &str| counts.iter().find(|(k, _)| k == key).map(|(_, c)| c);
    let verdict = before_attempt(&settings.account, count_of(&account_key), now)
        .and(before_attempt(&settings.source, count_of(&source_key), now));
    if verdict != Verdict::Proceed {
        return Err(refuse(verdict));
    }
    let account = state
        .db
        .login_failure_add(&account_key, now, settings.account.window_ms)
        .await?;
    let from_source = state
        .db
        .login_failure_add(&source_key, now, settings.source.window_ms)
        .await?;
    for (key, policy, count) in [
        (&account_key, &settings.account, &account),
        (&source_key, &settings.source, &from_source),
    ] {
        let locked = count.locked_until.filter(|until| *until > now);
        if let Some(until) = locked {
            return Err(refuse(Verdict::Locked(until - now)));
        }
        if !within_allowance(policy, count.failures) {
            state.db.login_lock(key, now, now + policy.lock_ms).await?;
            return Err(refuse(Verdict::Locked(policy.lock_ms)));
        }
    }
    let found = state.db.user_credentials(tenant, username).await?;
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), Some(hash)),
        None => (None, None),
    };
    if state.auth.verify_password(password, hash).await? {
        state.db.login_failures_clear(&account_key).await?;
        state.db.login_failure_forgive(&source_key).await?;
        return Ok(user);
    }
    let mut locked = Vec::new();
    for (key, policy, count, what) in [
        (&account_key, &settings.account, &account, "account"),
        (
            &source_key,
            &settings.source,
            &from_source,
            "source address",
        ),
    ] {
        if let Some(until) = lock_after(policy, count.failures, now) {
            state.db.login_lock(key, now, until).await?;
            locked.push(format!(
                "{what} locked for {} s after {} failed logins",
                policy.lock_ms / 1000,
                count.failures
            ));
        }
    }
    if locked.is_empty() {
        crate::audit::note_rationale("failed login");
    } else {
        tracing::warn!(%tenant, %username, %source, "login locked: {}", locked.join("; "));
        crate::audit::note_rationale(locked.join("; "));
    }
    Ok(None)
}

fn cookie(name: &str, value: &str, max_age_s: u64, http_only: bool, secure: bool) -> HeaderValue {
    let mut text = format!("{name}={value}; Path=/; Max-Age={max_age_s}; SameSite=Strict");
    if http_only {
        text.push_str("; HttpOnly");
    }
    if secure {
        text.push_str("; Secure");
    }
    HeaderValue::from_str(&text).expect("cookie values are hex and base64url")
}

/// Sign in: a session token, the session cookie and its CSRF value.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = LoginAnswer,
               description = "Also sets the kiln_session (HttpOnly) and kiln_csrf cookies"),
              (status = 401, body = ErrorBody, description = "Unknown user or wrong password, alike"),
              (status = 429, body = ErrorBody, description = "Too many failures: wait (Retry-After)"),
              (status = 422, body = ErrorBody)))]
pub async fn login(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Json(body): Json<LoginRequest>,
) -> ApiResult<Response> {
    check_name("tenant", &body.tenant).map_err(|e| ApiError::invalid(e.to_string()))?;
    check_name("username", &body.username).map_err(|e| ApiError::invalid(e.to_string()))?;
    if body.password.len() > PASSWORD_MAX_BYTES {
        return Err(ApiError::invalid(format!(
            "a password holds at most {PASSWORD_MAX_BYTES} bytes"
        )));
    }
    crate::audit::note_actor(&body.tenant, "user", &body.username);
    let settings = state.auth.settings();
    let source = settings.client_address(peer, &headers);
    let user = verify_throttled(&state, &body.tenant, &body.username, &source, body.password)
        .await?
        .ok_or_else(invalid_credentials)?;
    let now = now_millis();
    let ttl_s = settings.token_ttl_s;
    let iat = now / 1000;
    let exp = iat + ttl_s as i64;
    let session = kiln_db::users::Session {
        id: random_id(),
        tenant: user.tenant.clone(),
        username: user.username.clone(),
        created_at: now,
        expires_at: exp * 1000,
        source,
    };
    state.db.session_insert(&session).await?;
    // Sessions long over and counters long quiet go now and then.
    if rand::random::<u8>() < 8 {
        if let Err(error) = state.db.session_prune(now - 24 * 3_600_000).await {
            tracing::debug!(%error, "could not prune sessions");
        }
    }
    let csrf = random_id();
    let token = state.auth.keys().sign(&Claims {
        iss: "kiln".into(),
        sub: user.username.clone(),
        tenant: user.tenant.clone(),
        role: user.role.as_str().into(),
        sid: session.id.clone(),
        csrf: csrf.clone(),
        iat,
        exp,
    })?;
    crate::audit::note_resource(format!("/api/v1/auth/sessions/{}", session.id));
    let secure = settings.secure(peer, &headers);
    let answer = LoginAnswer {
        token: token.clone(),
        token_type: "Bearer",
        expires_at: render_time(exp * 1000),
        expires_in_s: ttl_s,
        csrf_token: csrf.clone(),
        session: session.id,
        tenant: user.tenant,
        username: user.username,
        role: user.role,
    };
    let mut response = Json(answer).into_response();
    let cookies = response.headers_mut();
    cookies.append(
        header::SET_COOKIE,
        cookie(SESSION_COOKIE, &token, ttl_s, true, secure),
    );
    cookies.append(
        header::SET_COOKIE,
        cookie(CSRF_COOKIE, &csrf, ttl_s, false, secure),
    );
    Ok(response)
}

/// Sign out: the session ends at once, for every process within seconds.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth",
    responses((status = 204, description = "The session ended; the cookies are cleared"),
              (status = 400, body = ErrorBody, description = "Not a session (an API key)")),
    security(("bearer" = [])))]
pub async fn logout(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    caller: Caller,
) -> ApiResult<Response> {
    let Some(session) = &caller.session else {
        return Err(ApiError::bad_request(
            "logout ends a user's session; this request used an API key",
        ));
    };
    state
        .db
        .session_revoke(&caller.tenant, session, now_millis())
        .await?;
    state.auth.sessions.forget(session);
    let secure = state.auth.settings().secure(peer, &headers);
    let mut response = StatusCode::NO_CONTENT.into_response();
    let cookies = response.headers_mut();
    cookies.append(
        header::SET_COOKIE,
        cookie(SESSION_COOKIE, "", 0, true, secure),
    );
    cookies.append(
        header::SET_COOKIE,
        cookie(CSRF_COOKIE, "", 0, false, secure),
    );
    Ok(response)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub tenant: String,
    /// `user` or `key`.
    pub kind: &'static str,
    pub username: Option<String>,
    pub role: Option<Role>,
    pub key_id: Option<String>,
    pub scopes: Vec<Scope>,
}

/// Who the credentials sent belong to.
#[utoipa::path(get, path = "/api/v1/auth/me", tag = "auth",
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn me(State(state): State<Arc<AppState>>, caller: Caller) -> ApiResult<Json<Me>> {
    let role = match &caller.user {
        Some(user) => state
            .db
            .user_get(&caller.tenant, user)
            .await?
            .map(|u| u.role),
        None => None,
    };
    Ok(Json(Me {
        kind: if caller.user.is_some() { "user" } else { "key" },
        key_id: caller.user.is_none().then(|| caller.key_id.clone()),
        username: caller.user.clone(),
        role,
        scopes: caller.scopes.0.clone(),
        tenant: caller.tenant,
    }))
}
