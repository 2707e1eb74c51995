//! Files jobs kept: a pipeline run's artefacts (`/api/v1/runs/{id}/artifacts`)
//! and any job's files (`/api/v1/jobs/{id}/files`). Lists come from the jobs'
//! results; content is streamed from the blob store under keys built from
//! the caller's tenant, so a name can only ever reach the caller's own files.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::TryStreamExt;
use kiln_core::files::FileRef;
use kiln_db::flow::RunFile;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Path};
use crate::AppState;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/runs/{id}/artifacts", get(list_run_artifacts))
        .route("/runs/{id}/artifacts/{*name}", get(get_run_artifact))
        .route("/jobs/{id}/files", get(list_job_files))
        .route("/jobs/{id}/files/{*path}", get(get_job_file))
}

/// One artefact of a run.
#[derive(Serialize, ToSchema)]
pub struct ArtifactJson {
    /// Its place under the run: `<step>/<path>`, or `<step>/<index>/<path>`
    /// for an instance of a fanned-out step. Dependants that take it as an
    /// input find it at `<path>`, or at this place for a fanned-out step.
    name: String,
    step: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<i32>,
    /// The path the step declared.
    path: String,
    size: u64,
    /// `sha256:<hex>` of the content.
    digest: String,
    /// The job that produced it.
    job_id: String,
    /// Where to download it.
    url: String,
}

#[derive(Serialize, ToSchema)]
pub struct ArtifactList {
    artifacts: Vec<ArtifactJson>,
}

#[derive(Serialize, ToSchema)]
pub struct FileList {
    files: Vec<FileRef>,
}

async fn run_files(state: &AppState, tenant: &str, id: &str) -> ApiResult<Vec<RunFile>> {
    state
        .db
        .run_files(tenant, crate::routes::flow::run_id(id)?)
        .await?
        .ok_or_else(|| ApiError::not_found("run"))
}

/// The files a run's steps kept (the `artifacts` they declared).
#[utoipa::path(get, path = "/api/v1/runs/{id}/artifacts", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, body = ArtifactList), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_run_artifacts(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<ArtifactList>> {
    let files = run_files(&state, &caller.tenant, &id).await?;
    let artifacts = files
        .into_iter()
        .map(|f| ArtifactJson {
            url: format!("/api/v1/runs/{id}/artifacts/{}", f.name),
            name: f.name,
            step: f.step,
            index: f.index,
            path: f.path,
            size: f.size,
            digest: f.digest,
            job_id: f.job_id.to_string(),
        })
        .collect();
    Ok(axum::Json(ArtifactList { artifacts }))
}

/// One artefact's content, by its name in the list.
#[utoipa::path(get, path = "/api/v1/runs/{id}/artifacts/{name}", tag = "runs",
    params(("id" = String, Path), ("name" = String, Path, description = "`<step>/<path>` or `<step>/<index>/<path>`")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_run_artifact(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let file = run_files(&state, &caller.tenant, &id)
        .await?
        .into_iter()
        .find(|f| f.name == name)
        .ok_or_else(|| ApiError::not_found("artifact"))?;
    serve(
        &state,
        &caller.tenant,
        file.job_id,
        &file.path,
        &file.digest,
    )
    .await
}

async fn job_files(state: &AppState, tenant: &str, id: &str) -> ApiResult<(i64, Vec<FileRef>)> {
    let id = crate::routes::jobs::parse_id(id)?;
    let job = state
        .db
        .job_get(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    Ok((id, job.result.map(|r| r.files).unwrap_or_default()))
}

/// The files a job kept (its spec's `outputs`, once an attempt succeeded).
#[utoipa::path(get, path = "/api/v1/jobs/{id}/files", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = FileList), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_job_files(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<FileList>> {
    let (_, files) = job_files(&state, &caller.tenant, &id).await?;
    Ok(axum::Json(FileList { files }))
}

/// One file a job kept.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/files/{path}", tag = "jobs",
    params(("id" = String, Path), ("path" = String, Path, description = "The path among the job's outputs")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_job_file(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path((id, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (job, files) = job_files(&state, &caller.tenant, &id).await?;
    let file = files
        .into_iter()
        .find(|f| f.path == path)
        .ok_or_else(|| ApiError::not_found("file"))?;
    serve(&state, &caller.tenant, job, &file.path, &file.digest).await
}

/// Streams a kept file; only names found in the job's own result get here.
async fn serve(
    state: &AppState,
    tenant: &str,
    job: i64,
    path: &str,
    digest: &str,
) -> ApiResult<Response> {
    let key = kiln_core::files::blob_key(tenant, job, path);
    let stream = match state.blobs.stream(&key).await {
        Ok(stream) => stream,
        Err(kiln_blob::BlobError::NotFound(_)) => return Err(ApiError::not_found("file")),
        Err(error) => return Err(ApiError::internal(error)),
    };
    let body = Body::from_stream(stream.map_err(std::io::Error::other));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::ETAG, format!("\"{digest}\"")),
        ],
        body,
    )
        .into_response())
}
