//! `/api/v1/vms/{id}/ports`: a networked VM's exposed ports, and the
//! proxy that carries HTTP and WebSocket to them.
//!
//! The proxy connects from inside kiln's VM namespace (the VM's address is
//! reachable nowhere else) to an exposed port only; another tenant's VM,
//! or a port the VM does not expose, is not found. Bodies stream both ways
//! (nothing is buffered); a WebSocket upgrade is joined end to end once the
//! guest switched protocols. The caller's `Authorization` and kiln's cookies
//! never reach the guest, and what the guest answers runs sandboxed in an
//! origin of its own (see `forward`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::response::Response;
use axum::routing::{any, get};
use axum::Router;
use hyper_util::rt::TokioIo;
use kiln_core::Scope;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{Caller, Json, Path};
use crate::routes::vms::VmId;
use crate::AppState;

/// How long the guest may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to answer a request's head.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/vms/{id}/ports", get(list_ports))
        .route("/vms/{id}/ports/{port}", any(add_slash))
        .route("/vms/{id}/ports/{port}/", any(proxy_root))
        .route("/vms/{id}/ports/{port}/{*rest}", any(proxy))
}

/// `/ports/{port}` without its slash: a page served there would resolve
/// its relative links against `/ports/`, so the client is sent to the
/// slashed path (308 keeps the method and body), as HTTP servers do for a
/// directory.
#[utoipa::path(method(get, post, put, delete, patch), path = "/api/v1/vms/{id}/ports/{port}", tag = "vms",
    params(("id" = String, Path, description = "The VM's id"), ("port" = u16, Path, description = "An exposed guest port")),
    responses((status = 308, description = "To the same path with a trailing slash, query kept")),
    security(("bearer" = [])))]
pub async fn add_slash(
    caller: Caller,
    method: axum::http::Method,
    uri: axum::extract::OriginalUri,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    // The caller is checked as the proxy checks it, so the answer (and its
    // audit record) is the caller's.
    let needed = if matches!(method, axum::http::Method::GET | axum::http::Method::HEAD) {
        Scope::Read
    } else {
        Scope::Write
    };
    if let Err(error) = caller.require(needed) {
        return error.into_response();
    }
    let path = uri.0.path();
    let target = match uri.0.query() {
        Some(query) => format!("{path}/?{query}"),
        None => format!("{path}/"),
    };
    match axum::http::HeaderValue::from_str(&target) {
        Ok(location) => (
            StatusCode::PERMANENT_REDIRECT,
            [(axum::http::header::LOCATION, location)],
        )
            .into_response(),
        Err(_) => ApiError::bad_request("a path that cannot be redirected").into_response(),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PortView {
    pub port: u16,
    /// Where kiln serves it: `/api/v1/vms/{id}/ports/{port}/`.
    pub url: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PortList {
    /// The VM's address in kiln's VM network.
    pub address: String,
    pub ports: Vec<PortView>,
}

/// A networked VM's exposed ports.
#[utoipa::path(get, path = "/api/v1/vms/{id}/ports", tag = "vms",
    params(("id" = String, Path, description = "The VM's id")),
    responses((status = 200, body = PortList),
              (status = 404, description = "No such VM for the caller, or a VM without network", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_ports(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    VmId(id): VmId,
) -> ApiResult<Json<PortList>> {
    caller.require(Scope::Read)?;
    let vms = state
        .vms
        .as_ref()
        .ok_or_else(|| ApiError::not_found("vm"))?;
    let vm = vms
        .get(&caller.tenant, &id)
        .await
        .ok_or_else(|| ApiError::not_found("vm"))?;
    let Some(network) = vm.network else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the VM has no network",
        ));
    };
    Ok(Json(PortList {
        address: network.address.to_string(),
        ports: network
            .expose
            .iter()
            .map(|port| PortView {
                port: *port,
                url: format!("/api/v1/vms/{id}/ports/{port}/"),
            })
            .collect(),
    }))
}

/// `/ports/{port}/`: the guest's `/`. Any method; a WebSocket upgrade is
/// carried too.
#[utoipa::path(method(get, post, put, delete, patch), path = "/api/v1/vms/{id}/ports/{port}/", tag = "vms",
    params(("id" = String, Path, description = "The VM's id"), ("port" = u16, Path, description = "An exposed guest port")),
    responses((status = 200, description = "Whatever the guest answers (any method; WebSocket upgrades too)"),
              (status = 404, body = ErrorBody), (status = 502, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn proxy_root(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((id, port)): Path<(String, String)>,
    request: Request,
) -> ApiResult<Response> {
    forward(&state, &caller, &id, &port, "", request).await
}

/// `/ports/{port}/{rest}`: the guest's `/{rest}` (the query goes along).
#[utoipa::path(method(get, post, put, delete, patch), path = "/api/v1/vms/{id}/ports/{port}/{rest}", tag = "vms",
    params(("id" = String, Path, description = "The VM's id"), ("port" = u16, Path, description = "An exposed guest port"),
           ("rest" = String, Path, description = "The path in the guest")),
    responses((status = 200, description = "Whatever the guest answers (WebSocket upgrades too)"),
              (status = 404, body = ErrorBody), (status = 502, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn proxy(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((id, port, rest)): Path<(String, String, String)>,
    request: Request,
) -> ApiResult<Response> {
    forward(&state, &caller, &id, &port, &rest, request).await
}

/// Headers of one hop, and kiln's own credentials: never passed on.
fn dropped(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "authorization"
            | "cookie"
            | "x-csrf-token"
    ) || name.as_str().starts_with("x-kiln-")
}

fn unreachable(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "guest_unreachable", message)
}

async fn forward(
    state: &AppState,
    caller: &Caller,
    id: &str,
    port: &str,
    rest: &str,
    mut request: Request,
) -> ApiResult<Response> {
    // Reading the guest's pages is reading; anything else writes.
    let scope = match *request.method() {
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS => {
            Scope::Read
        }
        _ => Scope::Write,
    };
    caller.require(scope)?;
    if kiln_core::names::check_name("vm id", id).is_err() {
        return Err(ApiError::not_found("vm"));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::not_found("port"))?;
    let vms = state
        .vms
        .as_ref()
        .ok_or_else(|| ApiError::not_found("vm"))?;
    let stream = vms
        .connect_port(&caller.tenant, id, port, CONNECT_TIMEOUT)
        .await
        .ok_or_else(|| ApiError::not_found("port"))?
        .map_err(|e| unreachable(format!("the guest's port {port} did not accept: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(format!("the guest's port {port}: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });

    let upgrade = crate::vm_hosts::is_upgrade(request.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut request));
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let (parts, body) = request.into_parts();
    let mut out = axum::http::Request::builder()
        .method(parts.method)
        .uri(format!("/{rest}{query}"));
    for (name, value) in &parts.headers {
        if !dropped(name) {
            out = out.header(name, value);
        }
    }
    if upgrade {
        out = out
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket");
    }
    let out = out
        .body(if upgrade { Body::empty() } else { body })
        .map_err(|_| ApiError::bad_request("the request cannot be passed on"))?;
    let response = tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(out))
        .await
        .map_err(|_| unreachable(format!("the guest's port {port} did not answer in time")))?
        .map_err(|e| unreachable(format!("the guest's port {port}: {e}")))?;
    let mut back = crate::vm_hosts::relay_answer(client_side, response);
    // A guest's page is served from kiln's origin: it may set no cookie
    // there, and runs in an opaque origin of its own (CSP sandbox), so its
    // scripts can neither read kiln's cookies nor call kiln as the user.
    back.headers_mut().remove(header::SET_COOKIE);
    back.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        axum::http::HeaderValue::from_static("sandbox allow-scripts allow-forms allow-popups"),
    );
    Ok(back)
}
