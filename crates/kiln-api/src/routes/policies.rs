//! `/api/v1/policies`: a tenant's admission policies, and [`admit`], the
//! check every submission path calls after authentication and before
//! anything is stored.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use kiln_core::NewJob;
use kiln_db::policies::{PolicyPut, StoredPolicy};
use kiln_flow::policy::{Denial, Policy, PolicyError, Subject, POLICIES_MAX};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Json, Path};
use crate::routes::jobs::SubmitJob;
use crate::{now_millis, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/policies", get(list_policies))
        .route("/policies/test", post(test_policies))
        .route(
            "/policies/{name}",
            get(get_policy).put(put_policy).delete(delete_policy),
        )
}

/// The refusal of a job by a policy: `403 policy_denied`, and the policy
/// named in the audit record's rationale.
pub(crate) fn denied(policy: &str, message: String) -> ApiError {
    crate::audit::note_rationale(format!("policy {policy}"));
    ApiError::new(StatusCode::FORBIDDEN, "policy_denied", message)
}

fn refusal(denial: Denial) -> ApiError {
    denied(&denial.policy, denial.to_string())
}

/// Judges a job about to be stored by its tenant's policies. `job.kind` is
/// the kind as submitted (before routing to a host).
pub(crate) async fn admit(state: &AppState, job: &NewJob) -> ApiResult<()> {
    let policies = state.db.policy_set(&job.tenant).await?;
    if policies.is_empty() {
        return Ok(());
    }
    let subject = Subject::of_job(job, state.kinds.describe(&job.kind, &job.spec));
    policies.admit(&subject).map_err(refusal)
}

/// Judges a VM about to boot through `POST /vms`: kind `vm`, its shape and
/// labels; no queue, priority, timeout or attempts.
pub(crate) async fn admit_vm(
    state: &AppState,
    tenant: &str,
    spec: &kiln_vm::job::CreateVmSpec,
) -> ApiResult<()> {
    let policies = state.db.policy_set(tenant).await?;
    if policies.is_empty() {
        return Ok(());
    }
    let shape = &spec.shape;
    let as_spec = serde_json::json!({
        "image": shape.image,
        "vcpus": shape.vcpus,
        "memory_mib": shape.memory_mib,
        "ttl_s": shape.ttl_s,
        "idle_timeout_s": shape.idle_timeout_s,
        "network": shape.network.as_ref().map(|n| n.describe()),
        "secrets": spec.secrets,
    });
    let mut described = kiln_vm::job::describe_shape(shape);
    described.insert("secrets".into(), serde_json::json!(spec.secrets));
    let subject = Subject {
        tenant,
        kind: "vm",
        queue: None,
        priority: None,
        labels: &spec.labels,
        timeout_ms: None,
        max_attempts: None,
        spec: &as_spec,
        shape: described,
    };
    policies.admit(&subject).map_err(refusal)
}

/// A policy to store.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutPolicy {
    /// An expression (the language of pipeline gates) that must be true
    /// for a job to be admitted. Reads `job.kind`, `job.queue`,
    /// `job.priority`, `job.image`, `job.memory_mib`, `job.vcpus`,
    /// `job.network`, `job.secrets`, `job.labels`, `job.timeout_ms`,
    /// `job.max_attempts`, `job.spec` and `tenant`.
    #[schema(
        max_length = 2048,
        example = "job.kind != \"vm\" || job.labels.team != null"
    )]
    pub rule: String,
    /// Said to the submitter when the rule refuses a job.
    #[schema(max_length = 512)]
    pub message: Option<String>,
    /// Kinds the policy judges; absent or empty: every kind.
    #[schema(max_items = 32)]
    pub applies_to: Option<Vec<String>>,
    /// Default true.
    pub enabled: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyView {
    pub name: String,
    pub rule: String,
    pub message: String,
    pub applies_to: Vec<String>,
    pub enabled: bool,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

impl From<StoredPolicy> for PolicyView {
    fn from(p: StoredPolicy) -> PolicyView {
        PolicyView {
            name: p.name,
            rule: p.rule,
            message: p.message,
            applies_to: p.applies_to,
            enabled: p.enabled,
            created_at: render_time(p.created_at),
            updated_at: render_time(p.updated_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyList {
    pub policies: Vec<PolicyView>,
}

/// Store a policy, replacing the one of the same name.
#[utoipa::path(put, path = "/api/v1/policies/{name}", tag = "policies", request_body = PutPolicy,
    params(("name" = String, Path, description = "The policy's name")),
    responses((status = 201, description = "Created", body = PolicyView),
              (status = 200, description = "Replaced", body = PolicyView),
              (status = 422, description = "A rule that does not parse (the message names the position), an unknown kind, or the tenant's 100th policy", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_policy(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Path(name): Path<String>,
    Json(body): Json<PutPolicy>,
) -> ApiResult<(StatusCode, Json<PolicyView>)> {
    let applies_to = body.applies_to.unwrap_or_default();
    let policy = Policy::new(
        &name,
        &body.rule,
        body.message.as_deref().unwrap_or_default(),
        applies_to,
        body.enabled.unwrap_or(true),
    )
    .map_err(|e| match e {
        PolicyError::Rule(e) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_rule",
            format!("rule: {e}"),
        ),
        PolicyError::Invalid(message) => ApiError::invalid(message),
    })?;
    let known: Vec<&str> = state.kinds.names().collect();
    if let Some(kind) = policy
        .applies_to
        .iter()
        .find(|k| !known.contains(&k.as_str()))
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_kind",
            format!(
                "applies_to: unknown kind {kind:?}; this deployment runs {}",
                known.join(", ")
            ),
        ));
    }
    let put = state
        .db
        .policy_put(
            &caller.tenant,
            &policy.name,
            policy.rule.source(),
            &policy.message,
            &policy.applies_to,
            policy.enabled,
            now_millis(),
        )
        .await?;
    match put {
        PolicyPut::Created(p) => Ok((StatusCode::CREATED, Json(p.into()))),
        PolicyPut::Replaced(p) => Ok((StatusCode::OK, Json(p.into()))),
        PolicyPut::Full => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many",
            format!("a tenant holds at most {POLICIES_MAX} policies; delete one first"),
        )),
    }
}

/// The tenant's policies, by name.
#[utoipa::path(get, path = "/api/v1/policies", tag = "policies",
    responses((status = 200, body = PolicyList)), security(("bearer" = [])))]
pub async fn list_policies(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
) -> ApiResult<Json<PolicyList>> {
    let policies = state.db.policy_list(&caller.tenant).await?;
    Ok(Json(PolicyList {
        policies: policies.into_iter().map(PolicyView::from).collect(),
    }))
}

/// One policy.
#[utoipa::path(get, path = "/api/v1/policies/{name}", tag = "policies",
    params(("name" = String, Path, description = "The policy's name")),
    responses((status = 200, body = PolicyView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_policy(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(name): Path<String>,
) -> ApiResult<Json<PolicyView>> {
    let policy = state
        .db
        .policy_get(&caller.tenant, &name)
        .await?
        .ok_or_else(|| ApiError::not_found("policy"))?;
    Ok(Json(policy.into()))
}

/// Delete a policy.
#[utoipa::path(delete, path = "/api/v1/policies/{name}", tag = "policies",
    params(("name" = String, Path, description = "The policy's name")),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_policy(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    if !state.db.policy_delete(&caller.tenant, &name).await? {
        return Err(ApiError::not_found("policy"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// One policy's verdict in a dry run.
#[derive(Debug, Serialize, ToSchema)]
pub struct Verdict {
    pub policy: String,
    /// Whether the policy judges this job (enabled, and its kind listed).
    pub applies: bool,
    pub admitted: bool,
    /// Why it refused, as a submission would be told.
    pub message: Option<String>,
    /// The rule failed to evaluate (and so refuses).
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TestResult {
    /// Whether `POST /jobs` would admit the job (as far as policies go).
    pub admitted: bool,
    /// The refusal a submission would get: the first refusing policy by
    /// name.
    pub message: Option<String>,
    pub verdicts: Vec<Verdict>,
}

/// Judge a job by the tenant's policies without submitting it. The body
/// is a job as `POST /api/v1/jobs` takes it, checked the same way.
#[utoipa::path(post, path = "/api/v1/policies/test", tag = "policies", request_body = SubmitJob,
    responses((status = 200, body = TestResult), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn test_policies(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Json(body): Json<SubmitJob>,
) -> ApiResult<Json<TestResult>> {
    let job = crate::routes::jobs::checked_job(
        &state,
        &caller,
        body,
        kiln_core::limits::DEFAULT_MAX_ATTEMPTS,
        now_millis(),
    )
    .await?;
    let policies = state.db.policy_set(&caller.tenant).await?;
    let subject = Subject::of_job(&job, state.kinds.describe(&job.kind, &job.spec));
    let message = policies.admit(&subject).err().map(|d| d.to_string());
    let verdicts = policies
        .verdicts(&subject)
        .into_iter()
        .map(|(policy, applies, denial)| Verdict {
            policy,
            applies,
            admitted: denial.is_none(),
            error: denial.as_ref().and_then(|d| d.error.clone()),
            message: denial.map(|d| d.to_string()),
        })
        .collect();
    Ok(Json(TestResult {
        admitted: message.is_none(),
        message,
        verdicts,
    }))
}
