//! VMs across hosts. A VM lives in the process that booted it; an API node
//! (or any node whose manager does not hold the VM) forwards `/vms/{id}/…`
//! — plain requests and WebSocket upgrades alike — to the owner named in
//! the id, with the caller's tenant and scopes in a header signed with the
//! deployment's internal key. The owner serves only those forwarded
//! requests on its internal listener and checks the signature before
//! anything else, then the tenant as for any request.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{OriginalUri, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hmac::{Hmac, Mac};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use kiln_core::Scopes;
use kiln_db::Db;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::{now_millis, routes, AppState};

/// The header that carries who is asking, and the one that signs it.
pub const FORWARDED: &str = "x-kiln-forwarded";
pub const FORWARDED_MAC: &str = "x-kiln-forwarded-mac";
/// A signed forward is good for this long: long enough for a slow hop,
/// short enough that a captured one is soon worthless.
const FORWARD_VALID_MS: i64 = 30_000;
/// The name of the internal key in `internal_secrets`.
const KEY_NAME: &str = "vm-forwarding";
/// Bodies of creates are read whole to be resent to the next host when
/// one has no room; a create body is a small JSON document.
const CREATE_BODY_MAX: usize = 64 << 10;

/// What a forwarded request says of its caller.
#[derive(Debug, Serialize, Deserialize)]
struct Forwarded {
    tenant: String,
    key_id: String,
    scopes: String,
    /// The signed-in user, so the owner's records name them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    /// Milliseconds since the epoch after which the owner refuses it.
    expires: i64,
}

/// The deployment's key for signing forwards: stored once in the database,
/// made by the first process that needs it.
pub async fn internal_key(db: &Db) -> Result<Vec<u8>, kiln_db::DbError> {
    use rand::RngCore;
    let mut fresh = [0u8; 32];
    rand::rng().fill_bytes(&mut fresh);
    let stored = db
        .internal_secret(KEY_NAME, &hex::encode(fresh), now_millis())
        .await?;
    Ok(hex::decode(stored.trim()).unwrap_or_else(|_| stored.into_bytes()))
}

fn mac(key: &[u8], method: &Method, path: &str, forwarded: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"kiln-forward-v1\n");
    mac.update(method.as_str().as_bytes());
    mac.update(b"\n");
    mac.update(path.as_bytes());
    mac.update(b"\n");
    mac.update(forwarded.as_bytes());
    mac
}

fn sign(key: &[u8], method: &Method, path: &str, caller: &Caller, now: i64) -> (String, String) {
    let forwarded = serde_json::to_string(&Forwarded {
        tenant: caller.tenant.clone(),
        key_id: caller.key_id.clone(),
        scopes: caller.scopes.to_text(),
        user: caller.user.clone(),
        expires: now + FORWARD_VALID_MS,
    })
    .unwrap_or_default();
    let tag = hex::encode(mac(key, method, path, &forwarded).finalize().into_bytes());
    (forwarded, tag)
}

/// The caller of a forwarded request, if its signature holds: bound to
/// the method and path it was signed for, and fresh.
pub(crate) fn verify(
    key: &[u8],
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    now: i64,
) -> Result<Caller, ApiError> {
    let refuse = || ApiError::unauthorized("a forwarded request without a valid signature");
    let forwarded = headers
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(refuse)?;
    let tag = headers
        .get(FORWARDED_MAC)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| hex::decode(v).ok())
        .ok_or_else(refuse)?;
    mac(key, method, path, forwarded)
        .verify_slice(&tag)
        .map_err(|_| refuse())?;
    let forwarded: Forwarded = serde_json::from_str(forwarded).map_err(|_| refuse())?;
    if forwarded.expires < now {
        return Err(refuse());
    }
    Ok(Caller {
        tenant: forwarded.tenant,
        key_id: forwarded.key_id,
        scopes: Scopes::parse(&forwarded.scopes).ok_or_else(refuse)?,
        user: forwarded.user,
        session: None,
    })
}

/// An API node's view of the VM hosts: the key it signs with and the
/// client it forwards through.
pub struct VmFleet {
    key: Vec<u8>,
    client: Client<HttpConnector, Body>,
    /// A host not heard from for this long is not forwarded to.
    host_deadline: Duration,
    /// This process's own tag, when it hosts VMs itself.
    own: Option<String>,
}

impl VmFleet {
    pub fn new(key: Vec<u8>, host_deadline: Duration, own: Option<String>) -> VmFleet {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        VmFleet {
            key,
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector),
            host_deadline,
            own,
        }
    }
}

/// The path (and query) a request was made to, before any nesting.
fn original_path(request: &Request) -> String {
    let uri = request
        .extensions()
        .get::<OriginalUri>()
        .map(|uri| uri.0.clone())
        .unwrap_or_else(|| request.uri().clone());
    uri.path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| uri.path().to_string())
}

/// The VM id a `/api/v1/vms/{id}…` path names.
fn vm_id_of(path: &str) -> Option<&str> {
    let path = path.split('?').next().unwrap_or(path);
    let rest = path.strip_prefix("/api/v1/vms/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// The layer in front of the VM routes: requests for a VM another host
/// owns, and creates on a node that hosts no VMs, go to the host that can
/// serve them; the rest are served here.
pub async fn route(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(fleet) = state.fleet.get() else {
        return next.run(request).await;
    };
    let path = original_path(&request);
    let result = match vm_id_of(&path) {
        Some(id) => match kiln_vm::manager::owner_of(id) {
            Some(owner) if Some(owner) != fleet.own.as_deref() => {
                let id = id.to_string();
                let owner = owner.to_string();
                forward_to_owner(&state, fleet, request, &path, &id, &owner).await
            }
            _ => return next.run(request).await,
        },
        None if request.method() == Method::POST
            && path.split('?').next() == Some("/api/v1/vms")
            && state.vms.is_none() =>
        {
            place(&state, fleet, request, &path).await
        }
        None => return next.run(request).await,
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn caller_of(state: &Arc<AppState>, request: Request) -> ApiResult<(Caller, Request)> {
    use axum::extract::FromRequestParts;
    let (mut parts, body) = request.into_parts();
    let caller = Caller::from_request_parts(&mut parts, state).await?;
    Ok((caller, Request::from_parts(parts, body)))
}

async fn forward_to_owner(
    state: &Arc<AppState>,
    fleet: &VmFleet,
    request: Request,
    path: &str,
    id: &str,
    owner: &str,
) -> ApiResult<Response> {
    let (caller, request) = caller_of(state, request).await?;
    let host = state.db.vm_host_get(owner).await?;
    let fresh_since = now_millis() - fleet.host_deadline.as_millis() as i64;
    let host = match host {
        Some(host)
            if host.node_status.as_deref() != Some("lost") && host.last_seen >= fresh_since =>
        {
            host
        }
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "vm_host_lost",
                "the host of this VM has stopped answering",
            ))
        }
        // No host row: the host is gone, and its VMs with it.
        None => {
            return match state.db.vm_get(&caller.tenant, id).await? {
                Some(vm) if vm.status == "lost" => Err(ApiError::new(
                    StatusCode::GONE,
                    "vm_lost",
                    "this VM was lost with its host",
                )),
                _ => Err(ApiError::not_found("vm")),
            };
        }
    };
    forward(fleet, &host.url, request, path, &caller).await
}

/// A create on a node with no VMs of its own: the roomiest live host takes
/// it; a host that answers "no room" passes it to the next.
async fn place(
    state: &Arc<AppState>,
    fleet: &VmFleet,
    request: Request,
    path: &str,
) -> ApiResult<Response> {
    let (caller, request) = caller_of(state, request).await?;
    caller.require(kiln_core::Scope::Write)?;
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, CREATE_BODY_MAX)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the body is too large",
            )
        })?;
    let memory_mib = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("memory_mib").and_then(|m| m.as_i64()))
        .unwrap_or(0);
    let fresh_since = now_millis() - fleet.host_deadline.as_millis() as i64;
    let hosts = state.db.vm_host_candidates(memory_mib, fresh_since).await?;
    let mut last = None;
    for host in hosts {
        let mut again = Request::from_parts(parts.clone(), Body::from(body.clone()));
        *again.extensions_mut() = parts.extensions.clone();
        let response = forward(fleet, &host.url, again, path, &caller).await;
        match response {
            Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                last = Some(response);
            }
            Ok(response) => return Ok(response),
            Err(error) => {
                tracing::warn!(host = %host.tag, error = %error.message, "a VM host did not take a create");
            }
        }
    }
    last.ok_or_else(|| ApiError {
        retry_after_s: Some(5),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_capacity",
            "no VM host has room for this VM now",
        )
    })
}

/// Headers that belong to one hop and are not passed on (the upgrade pair
/// is put back for WebSockets).
fn hop_by_hop(name: &HeaderName) -> bool {
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
            | "host"
            | "authorization"
            | FORWARDED
            | FORWARDED_MAC
    )
}

/// Whether the request asks to become a WebSocket.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Sends `request` to `base` + `path` as `caller`, signed; a WebSocket
/// upgrade is joined end to end once both sides switched protocols.
async fn forward(
    fleet: &VmFleet,
    base: &str,
    mut request: Request,
    path: &str,
    caller: &Caller,
) -> ApiResult<Response> {
    let upgrade = is_upgrade(request.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut request));
    let uri: axum::http::Uri = format!("{}{path}", base.trim_end_matches('/'))
        .parse()
        .map_err(|_| ApiError::internal("a VM host's address is not a URL"))?;
    let (forwarded, tag) = sign(&fleet.key, request.method(), path, caller, now_millis());
    let (parts, body) = request.into_parts();
    let mut out = axum::http::Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            out = out.header(name, value);
        }
    }
    if upgrade {
        out = out
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket");
    }
    let out = out
        .header(
            FORWARDED,
            HeaderValue::from_str(&forwarded)
                .map_err(|_| ApiError::internal("unsignable caller"))?,
        )
        .header(FORWARDED_MAC, tag)
        .body(if upgrade { Body::empty() } else { body })
        .map_err(|e| ApiError::internal(format!("forwarding: {e}")))?;
    let response = fleet.client.request(out).await.map_err(|error| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "vm_host_unreachable",
            format!("the VM's host did not answer: {error}"),
        )
    })?;
    Ok(relay_answer(client_side, response))
}

/// The answer of a relayed request, as the client's: an upgrade (a
/// WebSocket) is spliced to the client's side of it, byte for byte.
pub(crate) fn relay_answer(
    client_side: Option<hyper::upgrade::OnUpgrade>,
    mut response: hyper::Response<hyper::body::Incoming>,
) -> Response {
    if let (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) = (client_side, response.status()) {
        let far_side = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let (Ok(client), Ok(far)) = (client_side.await, far_side.await) else {
                return;
            };
            let (mut client, mut far) = (TokioIo::new(client), TokioIo::new(far));
            let _ = tokio::io::copy_bidirectional(&mut client, &mut far).await;
        });
    }
    let (parts, body) = response.into_parts();
    let mut back = Response::from_parts(parts, Body::new(body));
    if back.status() != StatusCode::SWITCHING_PROTOCOLS {
        back.headers_mut().remove(header::CONNECTION);
    }
    back
}

/// The owner's side: the VM routes alone, for forwarded requests only
/// (`state` carries the internal key, so its callers come from the signed
/// header and never from an API key).
pub fn internal_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(routes::system::health))
        .nest("/api/v1", routes::vms::router())
        .fallback(routes::system::not_found)
        .with_state(state)
}

/// Serves [`internal_app`] until `shutdown`.
pub async fn serve_internal(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, internal_app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A VM host's heartbeat: its room and address for placement, every
/// `every`; VMs the fleet marked lost while it was silent are stopped, so
/// a host that comes back never serves a VM the others gave up.
pub async fn host_loop(
    db: Db,
    vms: Arc<kiln_vm::VmManager>,
    node_id: String,
    url: String,
    every: Duration,
    stop: CancellationToken,
) {
    let Some(tag) = vms.host_tag().map(str::to_string) else {
        return;
    };
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        let (vms_free, memory_free_mib) = vms.room();
        let report = kiln_db::vms::VmHostReport {
            tag: tag.clone(),
            node_id: node_id.clone(),
            url: url.clone(),
            accelerator: vms.accelerator().as_str().to_string(),
            vms_free: i64::try_from(vms_free).unwrap_or(i64::MAX),
            memory_free_mib: i64::try_from(memory_free_mib).unwrap_or(i64::MAX),
            vms_live: i32::try_from(vms.live_count()).unwrap_or(i32::MAX),
        };
        match db.vm_host_beat(&report, now_millis()).await {
            Ok(given_up) => {
                for (tenant, id) in given_up {
                    if vms.delete(&tenant, &id).await {
                        tracing::warn!(vm = %id, "stopped a VM the fleet marked lost");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "VM host heartbeat failed"),
        }
    }
    if let Err(error) = db.vm_host_remove(&tag).await {
        tracing::warn!(%error, "could not remove this VM host's row");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> Caller {
        Caller::key("acme", "k1", Scopes::parse("write").unwrap())
    }

    fn headers(forwarded: &str, tag: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(FORWARDED, HeaderValue::from_str(forwarded).unwrap());
        headers.insert(FORWARDED_MAC, HeaderValue::from_str(tag).unwrap());
        headers
    }

    #[test]
    fn a_forward_is_good_only_as_signed_and_while_fresh() {
        let key = b"k".repeat(32);
        let path = "/api/v1/vms/vm-1@h/execute";
        let (forwarded, tag) = sign(&key, &Method::POST, path, &caller(), 1_000);
        let good = verify(&key, &Method::POST, path, &headers(&forwarded, &tag), 1_000).unwrap();
        assert_eq!((good.tenant.as_str(), good.key_id.as_str()), ("acme", "k1"));
        assert!(good.scopes.allows(kiln_core::Scope::Write));
        // Another path, method, key or tenant, or too late: refused.
        for (method, path, key2, now) in [
            (
                Method::POST,
                "/api/v1/vms/vm-2@h/execute",
                key.clone(),
                1_000,
            ),
            (Method::DELETE, path, key.clone(), 1_000),
            (Method::POST, path, b"x".repeat(32), 1_000),
            (
                Method::POST,
                path,
                key.clone(),
                1_000 + FORWARD_VALID_MS + 1,
            ),
        ] {
            assert!(verify(&key2, &method, path, &headers(&forwarded, &tag), now).is_err());
        }
        let other = forwarded.replace("acme", "evil");
        assert!(verify(&key, &Method::POST, path, &headers(&other, &tag), 1_000).is_err());
        assert!(verify(&key, &Method::POST, path, &HeaderMap::new(), 1_000).is_err());
    }

    #[test]
    fn vm_ids_are_read_from_vm_paths_only() {
        assert_eq!(vm_id_of("/api/v1/vms/vm-1@h/execute"), Some("vm-1@h"));
        assert_eq!(vm_id_of("/api/v1/vms/vm-1@h?x=1"), Some("vm-1@h"));
        assert_eq!(vm_id_of("/api/v1/vms"), None);
        assert_eq!(vm_id_of("/api/v1/vms/"), None);
        assert_eq!(vm_id_of("/api/v1/jobs/1"), None);
    }
}
