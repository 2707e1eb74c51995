//! The audit trail's HTTP side: one record per mutating request (and per
//! read that must be audited), written before the answer leaves, with who
//! (noted by the caller's extractor), what (method and route), which
//! resource, the request id, the source address and the outcome. Handlers
//! add what only they know (a created resource's path, an approval's
//! comment) through `note_*`, which reach the request's note through a
//! task-local: no handler signature carries it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

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

#[derive(Default)]
struct Note {
    /// The request, as the middleware saw it before the handler ran.
    request: Option<RequestFacts>,
    /// Written by the handler in its change's transaction.
    written: bool,
    tenant: Option<String>,
    actor_kind: &'static str,
    actor: String,
    resource: Option<String>,
    rationale: Option<String>,
    /// A read that is audited all the same.
    force: bool,
}

#[derive(Clone)]
struct RequestFacts {
    action: String,
    request_id: String,
    source: String,
}

#[derive(Clone, Default)]
struct Slot(Arc<Mutex<Note>>);

tokio::task_local! {
    static NOTE: Slot;
}

fn with_note(f: impl FnOnce(&mut Note)) {
    let _ = NOTE.try_with(|slot| f(&mut slot.0.lock().unwrap_or_else(PoisonError::into_inner)));
}

/// Who is acting, in which tenant (set when the caller is known).
pub fn note_actor(tenant: &str, kind: &'static str, actor: &str) {
    with_note(|n| {
        n.tenant = Some(tenant.to_string());
        n.actor_kind = kind;
        n.actor = actor.to_string();
    });
}

/// The resource acted on, where the request's path does not name it (a
/// create names what it made).
pub fn note_resource(resource: impl Into<String>) {
    let resource = resource.into();
    with_note(|n| n.resource = Some(resource));
}

/// Why: an approval's comment, a rejection's reason.
pub fn note_rationale(rationale: impl Into<String>) {
    let rationale = rationale.into();
    with_note(|n| n.rationale = Some(rationale));
}

/// Audits this request even though its method reads.
pub fn note_audited_read() {
    with_note(|n| n.force = true);
}

/// The record this request will leave when it succeeds with `outcome`,
/// for a handler that writes it in its change's own transaction (then
/// [`note_written`]); `None` when nothing would be recorded.
pub fn pending(outcome: &str) -> Option<AuditRecord> {
    NOTE.try_with(|slot| {
        let n = slot.0.lock().unwrap_or_else(PoisonError::into_inner);
        let facts = n.request.as_ref()?;
        Some(AuditRecord {
            time: crate::now_millis(),
            tenant: n.tenant.clone()?,
            actor_kind: n.actor_kind.to_string(),
            actor: n.actor.clone(),
            action: facts.action.clone(),
            resource: n.resource.clone().unwrap_or_default(),
            request_id: facts.request_id.clone(),
            source: facts.source.clone(),
            outcome: outcome.to_string(),
            rationale: n.rationale.clone(),
        })
    })
    .ok()
    .flatten()
}

/// The handler wrote this request's record with its change.
pub fn note_written() {
    with_note(|n| n.written = true);
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
        .map(|p| p.as_str().to_string());
    let path = request.uri().path().to_string();
    let source = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip().to_string())
        .unwrap_or_default();
    let audited = state.audit_enabled();
    let slot = Slot::default();
    if audited {
        slot.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .request = Some(RequestFacts {
            action: format!("{method} {}", route.as_deref().unwrap_or(&path)),
            request_id: id.clone(),
            source: source.clone(),
        });
    }
    let mut response = NOTE.scope(slot.clone(), next.run(request)).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID.clone(), value);
    }
    let note = std::mem::take(&mut *slot.0.lock().unwrap_or_else(PoisonError::into_inner));
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
        action: format!("{method} {}", route.as_deref().unwrap_or(&path)),
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
