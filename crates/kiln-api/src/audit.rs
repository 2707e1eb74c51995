//! The audit trail's HTTP side: one record per mutating request (and per
//! read that must be audited), written before the answer leaves, with who
//! (noted by the caller's extractor), what (method and route), which
//! resource, the request id, the source address and the outcome. Handlers
//! add what only they know (a created resource's path, an approval's
//! comment) through `note_*`, which reach the request's note through a
//! task-local: no handler signature carries it. A store method that makes
//! the request's change writes the record in the change's own transaction
//! (`kiln_db::audit::note`); this middleware writes it only for requests
//! that changed nothing (refusals, 404s) and for audited reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use kiln_core::audit::AuditRecord;

use crate::AppState;

/// The header a request id travels in, both ways.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the response's error was, for the record's outcome.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

pub use kiln_db::audit::note::{note_actor, note_audited_read, note_rationale, note_resource};
use kiln_db::audit::note::{RequestFacts, Slot};

/// Each documented route's success statuses, by method and path template:
/// the outcome of a record written in a change's transaction, before the
/// answer exists.
fn success_statuses() -> &'static HashMap<(String, String), Vec<u16>> {
    static TABLE: OnceLock<HashMap<(String, String), Vec<u16>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let doc = <crate::ApiDoc as utoipa::OpenApi>::openapi();
        let mut table = HashMap::new();
        for (path, item) in &doc.paths.paths {
            let ops = [
                ("POST", &item.post),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
                ("DELETE", &item.delete),
                ("GET", &item.get),
            ];
            for (method, op) in ops {
                let Some(op) = op else { continue };
                let codes: Vec<u16> = op
                    .responses
                    .responses
                    .keys()
                    .filter_map(|code| code.parse().ok())
                    .filter(|code| (200..300).contains(code))
                    .collect();
                table.insert((method.to_string(), path.clone()), codes);
            }
        }
        table
    })
}

/// Longest request id taken from a client; longer ones are replaced.
const REQUEST_ID_MAX: usize = 64;

fn request_id(request: &Request) -> String {
    request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= REQUEST_ID_MAX
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| {
            let bytes: [u8; 12] = rand::random();
            hex::encode(bytes)
        })
}

fn mutates(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// The middleware. Records only what has a tenant: a request no tenant
/// could be named for (no or an unknown key) changed nothing of anyone's.
pub async fn record(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let id = request_id(&request);
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        // A wildcard `{*rest}` is written `{rest}`, as in the OpenAPI
        // document, so an action names a documented route.
        .map(|p| p.as_str().replace("{*", "{"));
    let path = request.uri().path().to_string();
    // Behind a trusted proxy, the client it names (as logins count it).
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let source = state.auth.client_address(peer, request.headers());
    let audited = state.audit_enabled();
    let action = format!("{method} {}", route.as_deref().unwrap_or(&path));
    let slot = Slot::new(audited.then(|| {
        RequestFacts {
            action: action.clone(),
            request_id: id.clone(),
            source: source.clone(),
            path: path.clone(),
            success: route
                .as_deref()
                .and_then(|route| success_statuses().get(&(method.to_string(), route.to_string())))
                .cloned()
                .unwrap_or_default(),
        }
    }));
    let mut response = kiln_db::audit::note::scope(slot.clone(), next.run(request)).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID.clone(), value);
    }
    let note = slot.take();
    let Some(tenant) = note.tenant else {
        return response;
    };
    if !(mutates(&method) || note.force) || !audited || note.written {
        return response;
    }
    let status = response.status().as_u16();
    let outcome = match response.extensions().get::<ErrorCode>() {
        Some(code) => format!("{status} {}", code.0),
        None => status.to_string(),
    };
    let record = AuditRecord {
        time: crate::now_millis(),
        tenant,
        actor_kind: note.actor_kind.to_string(),
        actor: note.actor,
        action,
        resource: note.resource.unwrap_or(path),
        request_id: id,
        source,
        outcome,
        rationale: note.rationale,
    };
    if let Err(error) = state.db.audit_insert(&record).await {
        // The change stands; the answer says so. The gap is counted and
        // logged loudly, never hidden.
        metrics::counter!("kiln_audit_write_failures_total").increment(1);
        tracing::error!(%error, action = %record.action, tenant = %record.tenant,
            request_id = %record.request_id, "could not write an audit record");
    }
    response
}
