//! Extractors that turn every rejection into kiln's own error body, and the
//! authenticated caller.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_core::{Scope, Scopes};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;
use crate::AppState;

/// JSON body in, JSON body out, with kiln's error on any rejection.
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match &rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json",
        ),
        JsonRejection::JsonDataError(e) => ApiError::invalid(e.body_text()),
        JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(e.body_text()),
        JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body is too large",
            )
        }
        _ => ApiError::bad_request(rejection.body_text()),
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Query string, with kiln's error on any rejection.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::bad_request(rejection.body_text())
}

/// Path parameters, with kiln's error on any rejection (a segment that is
/// not valid UTF-8 once decoded, a number that does not parse).
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> ApiError {
    match rejection {
        PathRejection::FailedToDeserializePathParams(e) => ApiError::bad_request(e.body_text()),
        // A handler asking for parameters its route does not have is our bug.
        other => ApiError::internal(other.body_text()),
    }
}

/// A WebSocket handshake, with kiln's error when the request is not one.
pub struct WebSocketUpgrade(pub axum::extract::ws::WebSocketUpgrade);

impl<S> FromRequestParts<S> for WebSocketUpgrade
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::ws::WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map(WebSocketUpgrade)
            .map_err(upgrade_rejection)
    }
}

fn upgrade_rejection(rejection: WebSocketUpgradeRejection) -> ApiError {
    let status = rejection.status();
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        _ => "bad_request",
    };
    ApiError::new(
        status,
        code,
        format!("open a WebSocket here: {}", rejection.body_text()),
    )
}

/// Who is calling: resolved from `Authorization: Bearer <key or session
/// token>`, or from the session cookie.
#[derive(Clone, Debug)]
pub struct Caller {
    pub tenant: String,
    /// The API key's id; for a signed-in user `user:<tenant>/<name>`, so
    /// rate limits and histories keyed by it tell users apart.
    pub key_id: String,
    pub scopes: Scopes,
    /// The signed-in user (none for an API key).
    pub user: Option<String>,
    /// The user's session, which logout ends.
    pub session: Option<String>,
}

impl Caller {
    /// A caller holding an API key (or acting as one).
    pub fn key(tenant: impl Into<String>, key_id: impl Into<String>, scopes: Scopes) -> Caller {
        Caller {
            tenant: tenant.into(),
            key_id: key_id.into(),
            scopes,
            user: None,
            session: None,
        }
    }

    /// Who the audit trail names for this caller.
    pub fn actor(&self) -> (&'static str, &str) {
        match &self.user {
            Some(user) => ("user", user),
            None => ("key", &self.key_id),
        }
    }

    pub(crate) fn note(&self) {
        let (kind, actor) = self.actor();
        crate::audit::note_actor(&self.tenant, kind, actor);
    }

    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.allows(scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(match &self.user {
                Some(_) => format!("this user's role lacks the {} scope", scope.as_str()),
                None => format!("this key lacks the {} scope", scope.as_str()),
            }))
        }
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if let Some(caller) = parts.extensions.get::<Caller>() {
            caller.note();
            return Ok(caller.clone());
        }
        // A VM host's internal listener: the caller is whoever the API node
        // that forwarded the request vouched for, and nobody else.
        if let Some(key) = state.internal_key.get() {
            let path = parts
                .extensions
                .get::<axum::extract::OriginalUri>()
                .map(|uri| uri.0.clone())
                .unwrap_or_else(|| parts.uri.clone());
            let path = path
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            let caller = crate::vm_hosts::verify(
                key,
                &parts.method,
                &path,
                &parts.headers,
                crate::now_millis(),
            )?;
            parts.extensions.insert(caller.clone());
            return Ok(caller);
        }
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            // A browser's session: the cookie, with the CSRF header on writes.
            let Some(token) = crate::auth::cookie(&parts.headers, crate::auth::SESSION_COOKIE)
            else {
                return Err(ApiError::unauthorized("send Authorization: Bearer <key>"));
            };
            let token = token.to_string();
            return session_caller(parts, state, &token, true).await;
        };
        let key = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::unauthorized("send Authorization: Bearer <key>"))?;
        if crate::auth::is_token(key) {
            let key = key.to_string();
            return session_caller(parts, state, &key, false).await;
        }
        // Keys the cache does not know cost a hash and a query: those
        // look-ups are limited per source address, so a stream of made-up
        // keys is throttled like a stream of requests with a real one.
        let source = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip().to_string())
            .unwrap_or_else(|| "local".to_string());
        let may_look_up = || throttle(state, format!("source:{source}"));
        let caller = state
            .keys
            .resolve(&state.db, key, may_look_up)
            .await?
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked API key"))?;
        caller.note();
        throttle(state, format!("key:{}", caller.key_id))?;
        parts.extensions.insert(caller.clone());
        Ok(caller)
    }
}

/// The caller a session token names, if its signature holds, it has not
/// expired and its session is live. Writes the cookie authenticates must
/// carry the token's CSRF value in `X-CSRF-Token`: another site can make a
/// browser send the cookie, but cannot read the value.
async fn session_caller(
    parts: &mut Parts,
    state: &Arc<AppState>,
    token: &str,
    via_cookie: bool,
) -> Result<Caller, ApiError> {
    use crate::auth::TokenError;
    let claims = state
        .auth
        .keys()
        .verify(token)
        .map_err(|error| match error {
            TokenError::Expired => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "expired",
                "the session token has expired; sign in again",
            ),
            TokenError::Invalid => ApiError::unauthorized("invalid session token"),
        })?;
    let role = kiln_core::users::Role::parse(&claims.role)
        .ok_or_else(|| ApiError::unauthorized("invalid session token"))?;
    if via_cookie && !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
        let sent = parts
            .headers
            .get(crate::auth::CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !crate::auth::same(sent, &claims.csrf) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "a write with the session cookie needs the X-CSRF-Token header the login returned",
            ));
        }
    }
    if !state.auth.sessions.live(&state.db, &claims).await? {
        return Err(ApiError::unauthorized(
            "the session has ended (signed out, or the user was changed); sign in again",
        ));
    }
    let caller = Caller {
        key_id: format!("user:{}/{}", claims.tenant, claims.sub),
        tenant: claims.tenant,
        scopes: role.scopes(),
        user: Some(claims.sub),
        session: Some(claims.sid),
    };
    caller.note();
    throttle(state, format!("key:{}", caller.key_id))?;
    parts.extensions.insert(caller.clone());
    Ok(caller)
}

/// The address the request came from (none when served without a socket,
/// as tests do).
pub struct Peer(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|info| info.0.ip()),
        ))
    }
}

/// Takes one request from `bucket`'s allowance, or says when to come back.
pub(crate) fn throttle(state: &AppState, bucket: String) -> Result<(), ApiError> {
    let Some(limiter) = state.rate_limit.get() else {
        return Ok(());
    };
    limiter.check_key(&bucket).map_err(|not_until| {
        use governor::clock::Clock;
        let now = governor::clock::DefaultClock::default().now();
        ApiError::rate_limited(not_until.wait_time_from(now))
    })
}

/// The scope a route needs, as a type, so the check runs while the request
/// is extracted: before any body is read.
pub trait NeededScope {
    const SCOPE: Scope;
}

/// The scope markers for [`Authorized`].
pub mod needs {
    use super::{NeededScope, Scope};

    pub struct Read;
    pub struct Write;
    pub struct Approve;
    pub struct Admin;
    pub struct System;

    impl NeededScope for Read {
        const SCOPE: Scope = Scope::Read;
    }
    impl NeededScope for Write {
        const SCOPE: Scope = Scope::Write;
    }
    impl NeededScope for Approve {
        const SCOPE: Scope = Scope::Approve;
    }
    impl NeededScope for Admin {
        const SCOPE: Scope = Scope::Admin;
    }
    impl NeededScope for System {
        const SCOPE: Scope = Scope::System;
    }
}

/// A caller whose key holds scope `S`. Put it before the body extractor:
/// a key without the scope is refused before a byte of the body is read.
pub struct Authorized<S>(pub Caller, PhantomData<S>);

impl<S> Deref for Authorized<S> {
    type Target = Caller;

    fn deref(&self) -> &Caller {
        &self.0
    }
}

impl<S: NeededScope> FromRequestParts<Arc<AppState>> for Authorized<S> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(S::SCOPE)?;
        Ok(Authorized(caller, PhantomData))
    }
}
