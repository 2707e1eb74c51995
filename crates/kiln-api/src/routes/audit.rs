//! `/api/v1/audit`: a tenant's audit trail (admin scope): filtered pages
//! with a cursor, the whole of it as JSON lines, and a check of its chain.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use kiln_db::audit::{AuditEntry, AuditQuery, AUDIT_PAGE_MAX};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Json, Query};
use crate::{parse_time, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/audit", get(list_audit))
        .route("/audit/export", get(export_audit))
        .route("/audit/verify", get(verify_audit))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// A key id, user name, rule, schedule or trigger.
    pub actor: Option<String>,
    /// Exact (`POST /api/v1/jobs`), or a prefix ending in `*`.
    pub action: Option<String>,
    /// Exact (`/api/v1/jobs/7`), or a prefix ending in `*`.
    pub resource: Option<String>,
    /// RFC 3339; records at or after.
    pub since: Option<String>,
    /// RFC 3339; records before.
    pub until: Option<String>,
    /// The `next` of the previous page.
    pub after: Option<i64>,
    /// Up to 1000 (default 100).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    pub id: i64,
    /// The record's number in the tenant's chain; unset for a moment after
    /// it is written, until it is chained.
    pub seq: Option<i64>,
    pub hash: Option<String>,
    pub time: Option<String>,
    pub actor_kind: String,
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub request_id: String,
    pub source: String,
    pub outcome: String,
    pub rationale: Option<String>,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> AuditView {
        let r = e.record;
        AuditView {
            id: e.id,
            seq: e.seq,
            hash: e.hash,
            time: render_time(r.time),
            actor_kind: r.actor_kind,
            actor: r.actor,
            action: r.action,
            resource: r.resource,
            request_id: r.request_id,
            source: r.source,
            outcome: r.outcome,
            rationale: r.rationale,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub records: Vec<AuditView>,
    /// Pass as `after` for the next page; unset on the last.
    pub next: Option<i64>,
}

fn time(text: Option<&str>, what: &str) -> ApiResult<Option<i64>> {
    text.map(|t| {
        parse_time(t).ok_or_else(|| ApiError::bad_request(format!("{what} must be RFC 3339")))
    })
    .transpose()
}

fn query<'a>(tenant: &'a str, p: &'a AuditParams, limit: i64) -> ApiResult<AuditQuery<'a>> {
    for (name, value) in [
        ("actor", &p.actor),
        ("action", &p.action),
        ("resource", &p.resource),
    ] {
        if value.as_ref().is_some_and(|v| v.len() > 512) {
            return Err(ApiError::bad_request(format!("{name} is too long")));
        }
    }
    Ok(AuditQuery {
        tenant: Some(tenant),
        actor: p.actor.as_deref(),
        action: p.action.as_deref(),
        resource: p.resource.as_deref(),
        since: time(p.since.as_deref(), "since")?,
        until: time(p.until.as_deref(), "until")?,
        after: p.after.unwrap_or(0).max(0),
        limit,
    })
}

/// The tenant's audit records, oldest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditParams),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_audit(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Query(params): Query<AuditParams>,
) -> ApiResult<Json<AuditPage>> {
    let limit = params.limit.unwrap_or(100).clamp(1, AUDIT_PAGE_MAX);
    let q = query(&caller.tenant, &params, limit)?;
    let records = state.db.audit_read(&q).await?;
    let next = (records.len() as i64 == limit)
        .then(|| records.last().map(|r| r.id))
        .flatten();
    Ok(Json(AuditPage {
        records: records.into_iter().map(AuditView::from).collect(),
        next,
    }))
}

/// The tenant's audit records matching the filters, all of them, as JSON
/// lines (one record a line, oldest first), read a page at a time.
#[utoipa::path(get, path = "/api/v1/audit/export", tag = "audit", params(AuditParams),
    responses((status = 200, content_type = "application/x-ndjson", body = String),
        (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn export_audit(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Query(params): Query<AuditParams>,
) -> ApiResult<Response> {
    // Refuse bad filters before the answer starts.
    query(&caller.tenant, &params, AUDIT_PAGE_MAX)?;
    let tenant = caller.tenant.clone();
    let stream = futures::stream::unfold(
        (state, tenant, params, false),
        |(state, tenant, mut params, done)| async move {
            if done {
                return None;
            }
            let page = match query(&tenant, &params, AUDIT_PAGE_MAX) {
                Ok(q) => state.db.audit_read(&q).await,
                Err(_) => return None,
            };
            let records = match page {
                Ok(records) => records,
                Err(error) => {
                    tracing::warn!(%error, "audit export stopped");
                    return Some((
                        Err(std::io::Error::other("the export stopped early")),
                        (state, tenant, params, true),
                    ));
                }
            };
            if records.is_empty() {
                return None;
            }
            let last = records.len() as i64 != AUDIT_PAGE_MAX;
            params.after = records.last().map(|r| r.id);
            let mut chunk = Vec::with_capacity(records.len() * 256);
            for record in records {
                if serde_json::to_writer(&mut chunk, &AuditView::from(record)).is_ok() {
                    chunk.push(b'\n');
                }
            }
            Some((Ok(chunk), (state, tenant, params, last)))
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyView {
    /// True when the chain is whole from its first record to its head.
    pub ok: bool,
    pub records: u64,
    /// Records written but not chained yet.
    pub unchained: u64,
    /// The last record's number and hash: keep them elsewhere to detect a
    /// trail rewritten whole.
    pub head_seq: Option<i64>,
    pub head_hash: Option<String>,
    pub breaks: Vec<BreakView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BreakView {
    pub seq: i64,
    pub id: Option<i64>,
    pub problem: String,
}

/// Checks the tenant's chain: a modified, inserted or deleted record is
/// named.
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit",
    responses((status = 200, body = VerifyView)), security(("bearer" = [])))]
pub async fn verify_audit(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
) -> ApiResult<Json<VerifyView>> {
    let report = state.db.audit_verify(Some(&caller.tenant)).await?;
    let head = report.heads.into_iter().next();
    Ok(Json(VerifyView {
        ok: report.breaks.is_empty(),
        records: report.records,
        unchained: report.unchained,
        head_seq: head.as_ref().map(|h| h.1),
        head_hash: head.map(|h| h.2),
        breaks: report
            .breaks
            .into_iter()
            .map(|b| BreakView {
                seq: b.seq,
                id: b.id,
                problem: b.problem,
            })
            .collect(),
    }))
}
