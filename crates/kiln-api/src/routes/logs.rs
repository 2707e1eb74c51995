//! `/api/v1/logs`: live logs (the output of jobs and VM commands as it was
//! produced, and the nodes' own lines for the deployment's key), as pages
//! by cursor or, with `follow=true`, as Server-Sent Events resumed after
//! `Last-Event-ID`; `/api/v1/jobs/{id}/logs` for one job, whose follow
//! ends once the job ended and all its output was sent. Followers wake on
//! the store's notice of new chunks (`Db::logs_ready`), and look again at
//! least every second.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use kiln_core::Scope;
use kiln_db::logs::{LogChunk, LogQuery};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Path, Query};
use crate::{parse_time, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/logs", get(logs))
        .route("/jobs/{id}/logs", get(job_logs))
}

const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A follower looks again at least this often, notice or not.
const FOLLOW_POLL: Duration = Duration::from_secs(1);
const PAGE_DEFAULT: i64 = 100;
const PAGE_MAX: i64 = 1000;
/// A page stops growing past this much text (it holds one chunk at least).
const PAGE_TEXT_MAX: usize = 4 << 20;
const QUERY_TEXT_MAX: usize = 256;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogParams {
    /// The lowest level: `error`, `warn`, `info` or `debug` (stdout is
    /// `info`, stderr `warn`).
    level: Option<String>,
    /// `job`, `vm` or `node` (the nodes' own lines: the `system` scope only).
    source: Option<String>,
    /// One job's output.
    job: Option<i64>,
    /// One VM's commands (and the `vm` jobs that ran in it).
    vm: Option<String>,
    /// Text the chunk contains (at most 256 bytes).
    q: Option<String>,
    /// From this time (RFC 3339, or milliseconds since the epoch).
    since: Option<String>,
    /// Before this time.
    until: Option<String>,
    /// Chunks after this id (a stream also takes `Last-Event-ID`); a
    /// stream without one starts with new lines, a page at the oldest.
    cursor: Option<i64>,
    /// Page size (1 to 1000, default 100).
    limit: Option<i64>,
    /// Stream new lines as Server-Sent Events.
    follow: Option<bool>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobLogParams {
    /// Chunks after this id (a stream also takes `Last-Event-ID`).
    cursor: Option<i64>,
    /// Page size (1 to 1000, default 100).
    limit: Option<i64>,
    /// Stream the output as Server-Sent Events until the job ended and
    /// all of it was sent (then an `end` event with its status).
    follow: Option<bool>,
}

/// A chunk of output as the API shows it: one or more lines of one stream.
#[derive(Serialize, ToSchema)]
pub struct LogLine {
    /// Its place in the store: increasing, never reused; the cursor.
    id: String,
    time: Option<String>,
    /// `job`, `vm` or `node`.
    source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vm: Option<String>,
    /// The command's id in the VM's execution history.
    #[serde(skip_serializing_if = "Option::is_none")]
    exec: Option<String>,
    node: String,
    /// `stdout`, `stderr` or `log` (a node line, or kiln's own marker).
    stream: String,
    level: String,
    /// The chunk's size as produced.
    bytes: i64,
    text: String,
}

impl LogLine {
    fn new(chunk: LogChunk, text: String) -> LogLine {
        LogLine {
            id: chunk.id.to_string(),
            time: render_time(chunk.ts),
            source: chunk.source,
            job: chunk.job_id.map(|id| id.to_string()),
            attempt: chunk.attempt,
            vm: chunk.vm_id,
            exec: chunk.exec_id.map(|id| id.to_string()),
            node: chunk.node,
            stream: chunk.stream,
            level: chunk.level,
            bytes: chunk.bytes,
            text,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct LogPage {
    lines: Vec<LogLine>,
    /// Pass as `cursor` for the next page.
    next_cursor: String,
}

/// A checked query, owned, for pages and followers alike.
#[derive(Clone, Debug, Default)]
struct Filter {
    tenant: String,
    node_lines: bool,
    source: Option<String>,
    job: Option<i64>,
    vm: Option<String>,
    level: Option<String>,
    q: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
}

impl Filter {
    fn query(&self, after: i64, limit: i64) -> LogQuery<'_> {
        LogQuery {
            tenant: Some(&self.tenant),
            node_lines: self.node_lines,
            source: self.source.as_deref(),
            job_id: self.job,
            vm_id: self.vm.as_deref(),
            min_level: self.level.as_deref(),
            contains: self.q.as_deref(),
            since: self.since,
            until: self.until,
            after,
            limit,
        }
    }
}

fn time_of(name: &str, value: Option<&str>) -> ApiResult<Option<i64>> {
    let Some(value) = value else {
        return Ok(None);
    };
    let ms = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value.parse::<i64>().ok()
    } else {
        parse_time(value)
    };
    ms.map(Some).ok_or_else(|| {
        ApiError::invalid(format!(
            "{name} must be an RFC 3339 time or milliseconds since the epoch"
        ))
    })
}

fn filter_of(caller: &crate::extract::Caller, params: &LogParams) -> ApiResult<Filter> {
    let system = caller.scopes.allows(Scope::System);
    if let Some(level) = &params.level {
        if kiln_db::logs::level_rank(level).is_none() {
            return Err(ApiError::invalid(
                "level must be error, warn, info or debug",
            ));
        }
    }
    match params.source.as_deref() {
        None | Some("job" | "vm") => {}
        Some("node") if system => {}
        Some("node") => {
            return Err(ApiError::forbidden(
                "the nodes' lines need the system scope",
            ))
        }
        Some(_) => return Err(ApiError::invalid("source must be job, vm or node")),
    }
    if params.job.is_some_and(|job| job <= 0) {
        return Err(ApiError::invalid("job must be a job id"));
    }
    if let Some(vm) = &params.vm {
        kiln_core::names::check_ident("vm", vm).map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    if let Some(q) = &params.q {
        if q.is_empty() || q.len() > QUERY_TEXT_MAX {
            return Err(ApiError::invalid(format!(
                "q must be 1 to {QUERY_TEXT_MAX} bytes"
            )));
        }
        kiln_core::names::check_text("q", q, QUERY_TEXT_MAX)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    let since = time_of("since", params.since.as_deref())?;
    let until = time_of("until", params.until.as_deref())?;
    if let (Some(since), Some(until)) = (since, until) {
        if since > until {
            return Err(ApiError::invalid("since must not be after until"));
        }
    }
    Ok(Filter {
        tenant: caller.tenant.clone(),
        node_lines: system,
        source: params.source.clone(),
        job: params.job,
        vm: params.vm.clone(),
        level: params.level.clone(),
        q: params.q.clone(),
        since,
        until,
    })
}

fn limit_of(limit: Option<i64>) -> ApiResult<i64> {
    let limit = limit.unwrap_or(PAGE_DEFAULT);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::invalid(format!("limit must be 1 to {PAGE_MAX}")));
    }
    Ok(limit)
}

fn cursor_of(cursor: Option<i64>, headers: &HeaderMap) -> ApiResult<Option<i64>> {
    let header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID must be a log cursor"))
        })
        .transpose()?;
    let cursor = header.or(cursor);
    if cursor.is_some_and(|c| c < 0) {
        return Err(ApiError::invalid("cursor must be 0 or more"));
    }
    Ok(cursor)
}

/// Live logs: the tenant's job and VM output, and, for the deployment's
/// key, the nodes' own lines; a page, or with `follow=true` a
/// text/event-stream of `log` events whose ids are cursors.
#[utoipa::path(get, path = "/api/v1/logs", tag = "logs", params(LogParams),
    responses((status = 200, body = LogPage, description = "A page, or a text/event-stream"),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn logs(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Query(params): Query<LogParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let filter = filter_of(&caller, &params)?;
    let limit = limit_of(params.limit)?;
    let cursor = cursor_of(params.cursor, &headers)?;
    if params.follow == Some(true) {
        let after = match cursor {
            Some(cursor) => cursor,
            None => state.db.log_last_id().await?,
        };
        return Ok(follow(state, filter, after, None).into_response());
    }
    Ok(axum::Json(page(&state, &filter, cursor.unwrap_or(0), limit).await?).into_response())
}

/// One job's output, every attempt, in order: a page, or with
/// `follow=true` a text/event-stream that ends with an `end` event once
/// the job ended and all its output was sent.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/logs", tag = "jobs",
    params(("id" = String, Path), JobLogParams),
    responses((status = 200, body = LogPage, description = "A page, or a text/event-stream"),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn job_logs(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(id): Path<String>,
    Query(params): Query<JobLogParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = crate::routes::jobs::parse_id(&id)?;
    if state.db.job_get(&caller.tenant, job).await?.is_none() {
        return Err(ApiError::not_found("job"));
    }
    let limit = limit_of(params.limit)?;
    let cursor = cursor_of(params.cursor, &headers)?.unwrap_or(0);
    let filter = Filter {
        tenant: caller.tenant.clone(),
        job: Some(job),
        ..Filter::default()
    };
    if params.follow == Some(true) {
        return Ok(follow(state, filter, cursor, Some(job)).into_response());
    }
    Ok(axum::Json(page(&state, &filter, cursor, limit).await?).into_response())
}

/// Reads chunks after `after` with their text (from the blob store for
/// large volumes), up to `limit` and about [`PAGE_TEXT_MAX`] of text.
async fn read(
    state: &AppState,
    filter: &Filter,
    after: i64,
    limit: i64,
) -> ApiResult<(Vec<LogLine>, i64)> {
    let chunks = state.db.log_read(&filter.query(after, limit)).await?;
    let mut lines = Vec::with_capacity(chunks.len());
    let mut cursor = after;
    let mut size = 0usize;
    for chunk in chunks {
        if size >= PAGE_TEXT_MAX {
            break;
        }
        cursor = chunk.id;
        let text = kiln_logs::chunk_text(&state.blobs, &chunk).await;
        size += text.len();
        lines.push(LogLine::new(chunk, text));
    }
    Ok((lines, cursor))
}

async fn page(state: &AppState, filter: &Filter, after: i64, limit: i64) -> ApiResult<LogPage> {
    let (lines, cursor) = read(state, filter, after, limit).await?;
    Ok(LogPage {
        lines,
        next_cursor: cursor.to_string(),
    })
}

struct Follower {
    state: Arc<AppState>,
    filter: Filter,
    cursor: i64,
    /// Set when following one job: the stream ends after it.
    job: Option<i64>,
    queued: VecDeque<SseEvent>,
    done: bool,
}

impl Follower {
    /// The next event: queued lines first, then new ones, waiting for the
    /// store's notice; `None` once the followed job ended and all was sent.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            let ready = self.state.db.logs_ready();
            let notified = ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // The status is read before the chunks: a job that had ended
            // had its output stored before its end was written.
            let ended = match self.job {
                Some(job) => match self.state.db.job_get(&self.filter.tenant, job).await {
                    Ok(Some(job)) if job.status.is_terminal() => {
                        Some(job.status.as_str().to_string())
                    }
                    Ok(Some(_)) => None,
                    Ok(None) => Some("deleted".to_string()),
                    Err(_) => None,
                },
                None => None,
            };
            match read(&self.state, &self.filter, self.cursor, PAGE_MAX).await {
                Ok((lines, cursor)) if !lines.is_empty() => {
                    self.cursor = cursor;
                    for line in lines {
                        let id = line.id.clone();
                        let body = serde_json::to_string(&line).unwrap_or_default();
                        self.queued
                            .push_back(SseEvent::default().id(id).event("log").data(body));
                    }
                    continue;
                }
                Ok(_) => {}
                Err(error) => {
                    self.done = true;
                    let body = serde_json::json!({"reason": error.message, "cursor": self.cursor.to_string()});
                    return Some(SseEvent::default().event("error").data(body.to_string()));
                }
            }
            if let Some(status) = ended {
                self.done = true;
                let body = serde_json::json!({"status": status, "cursor": self.cursor.to_string()});
                return Some(SseEvent::default().event("end").data(body.to_string()));
            }
            let _ = tokio::time::timeout(FOLLOW_POLL, notified).await;
        }
    }
}

fn follow(state: Arc<AppState>, filter: Filter, after: i64, job: Option<i64>) -> Response {
    let follower = Follower {
        state,
        filter,
        cursor: after,
        job,
        queued: VecDeque::new(),
        done: false,
    };
    let stream = futures::stream::unfold(follower, |mut follower| async move {
        let event = follower.next().await?;
        Some((Ok::<_, Infallible>(event), follower))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}
