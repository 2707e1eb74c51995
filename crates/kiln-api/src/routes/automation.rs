//! `/api/v1/automation`: a tenant's self-healing rules (`kiln_ops::rules`),
//! what they did, and dry runs that change nothing.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use kiln_core::Scope;
use kiln_db::events::{Event, EventQuery, Resource};
use kiln_db::rules::{ActionRecord, StoredRule};
use kiln_ops::rules::{engine, Decide, Rule, RULES_MAX};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{needs, Authorized, Caller, Json, Path, Query};
use crate::{now_millis, render_time, AppState};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/automation/rules", get(list_rules))
        .route(
            "/automation/rules/{name}",
            get(get_rule).put(put_rule).delete(delete_rule),
        )
        .route("/automation/rules/{name}/actions", get(rule_actions))
        .route("/automation/actions", get(list_actions))
        .route("/automation/dry-run", post(dry_run))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RuleView {
    /// The rule as checked: `name`, `active`, `trigger`, `condition`,
    /// `actions` or `module`, `cooldown_s`, `max_per_hour`.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub rule: Value,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

impl From<StoredRule> for RuleView {
    fn from(r: StoredRule) -> RuleView {
        RuleView {
            rule: r.body,
            created_at: render_time(r.created_at),
            updated_at: render_time(r.updated_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RuleList {
    pub rules: Vec<RuleView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActionView {
    pub id: String,
    pub rule: String,
    /// The firing this action belongs to.
    pub fire_id: String,
    /// The event that fired the rule.
    pub event_id: i64,
    /// `retry_job`, `pause_queue`, … (`module` when the module failed).
    pub action: String,
    /// The action as it ran and what it did.
    #[schema(value_type = Object)]
    pub detail: Value,
    /// `ok` or `error`.
    pub outcome: String,
    pub message: Option<String>,
    pub time: Option<String>,
}

impl From<ActionRecord> for ActionView {
    fn from(a: ActionRecord) -> ActionView {
        ActionView {
            id: a.id.to_string(),
            rule: a.rule,
            fire_id: a.fire_id.to_string(),
            event_id: a.event_id,
            action: a.action,
            detail: a.detail,
            outcome: a.outcome,
            message: a.message,
            time: render_time(a.time),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActionList {
    pub actions: Vec<ActionView>,
    /// Pass as `before` for the next page.
    pub next_before: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ActionParams {
    /// Only this rule's actions.
    pub rule: Option<String>,
    /// Actions older than this id.
    pub before: Option<String>,
    /// At most 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

fn check_rule_name(name: &str) -> ApiResult<()> {
    kiln_core::names::check_name("rule", name).map_err(|_| ApiError::not_found("rule"))
}

/// A rule's body checked as the caller may apply it.
async fn checked(state: &AppState, caller: &Caller, name: &str, body: &Value) -> ApiResult<Rule> {
    let rule = Rule::parse(name, body).map_err(|e| ApiError::invalid(e.to_string()))?;
    let deployment =
        caller.tenant == kiln_ops::DEPLOYMENT_TENANT && caller.scopes.allows(Scope::System);
    rule.check_for_tenant(deployment)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Decide::Module(module) = &rule.decide {
        if state
            .db
            .module_get(&caller.tenant, &module.id)
            .await?
            .is_none()
        {
            return Err(ApiError::invalid(format!(
                "module.id: module {} is not stored; push it with POST /api/v1/modules",
                module.id
            )));
        }
    }
    Ok(rule)
}

/// Apply a rule: create it, or replace the one of this name (admin).
#[utoipa::path(put, path = "/api/v1/automation/rules/{name}", tag = "automation",
    params(("name" = String, Path)), request_body(content = Object, description = "the rule"),
    responses((status = 201, body = RuleView), (status = 200, body = RuleView),
              (status = 422, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_rule(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> ApiResult<(StatusCode, Json<RuleView>)> {
    kiln_core::names::check_name("name", &name).map_err(|e| ApiError::invalid(e.to_string()))?;
    let rule = checked(&state, &caller, &name, &body).await?;
    let exists = state.db.rule_get(&caller.tenant, &name).await?.is_some();
    if !exists && state.db.rule_count(&caller.tenant).await? >= RULES_MAX {
        return Err(ApiError::conflict(format!(
            "a tenant holds at most {RULES_MAX} rules"
        )));
    }
    let created = state
        .db
        .rule_put(
            &caller.tenant,
            &name,
            rule.active,
            &rule.to_json(),
            now_millis(),
        )
        .await?;
    let stored = state
        .db
        .rule_get(&caller.tenant, &name)
        .await?
        .ok_or_else(|| ApiError::internal("a rule vanished as it was written"))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(stored.into())))
}

/// The tenant's rules.
#[utoipa::path(get, path = "/api/v1/automation/rules", tag = "automation",
    responses((status = 200, body = RuleList)), security(("bearer" = [])))]
pub async fn list_rules(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
) -> ApiResult<Json<RuleList>> {
    let rules = state.db.rule_list(&caller.tenant).await?;
    Ok(Json(RuleList {
        rules: rules.into_iter().map(Into::into).collect(),
    }))
}

/// One rule.
#[utoipa::path(get, path = "/api/v1/automation/rules/{name}", tag = "automation",
    params(("name" = String, Path)),
    responses((status = 200, body = RuleView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_rule(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(name): Path<String>,
) -> ApiResult<Json<RuleView>> {
    check_rule_name(&name)?;
    let rule = state
        .db
        .rule_get(&caller.tenant, &name)
        .await?
        .ok_or_else(|| ApiError::not_found("rule"))?;
    Ok(Json(rule.into()))
}

/// Delete a rule (admin); what it did stays on record.
#[utoipa::path(delete, path = "/api/v1/automation/rules/{name}", tag = "automation",
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_rule(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Admin>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    check_rule_name(&name)?;
    if state.db.rule_delete(&caller.tenant, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("rule"))
    }
}

async fn actions(
    state: &AppState,
    tenant: &str,
    rule: Option<&str>,
    params: &ActionParams,
) -> ApiResult<ActionList> {
    let before = match &params.before {
        Some(before) => Some(
            before
                .parse::<i64>()
                .map_err(|_| ApiError::bad_request("before must be an action id"))?,
        ),
        None => None,
    };
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    let records = state.db.rule_actions(tenant, rule, before, limit).await?;
    let next_before = (records.len() as i64 == limit)
        .then(|| records.last().map(|a| a.id.to_string()))
        .flatten();
    Ok(ActionList {
        actions: records.into_iter().map(Into::into).collect(),
        next_before,
    })
}

/// What the tenant's rules did, newest first (`?rule=` for one rule).
#[utoipa::path(get, path = "/api/v1/automation/actions", tag = "automation", params(ActionParams),
    responses((status = 200, body = ActionList), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_actions(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Query(params): Query<ActionParams>,
) -> ApiResult<Json<ActionList>> {
    if let Some(rule) = &params.rule {
        kiln_core::names::check_name("rule", rule)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let rule = params.rule.clone();
    Ok(Json(
        actions(&state, &caller.tenant, rule.as_deref(), &params).await?,
    ))
}

/// What one rule did, newest first.
#[utoipa::path(get, path = "/api/v1/automation/rules/{name}/actions", tag = "automation",
    params(("name" = String, Path), ActionParams),
    responses((status = 200, body = ActionList), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rule_actions(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Read>,
    Path(name): Path<String>,
    Query(params): Query<ActionParams>,
) -> ApiResult<Json<ActionList>> {
    check_rule_name(&name)?;
    if params.rule.is_some() {
        return Err(ApiError::bad_request("the rule is in the path"));
    }
    Ok(Json(
        actions(&state, &caller.tenant, Some(&name), &params).await?,
    ))
}

/// A dry run: a rule (its name, or a body not yet applied) and an event
/// (an id of the caller's log, or one written out).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DryRunRequest {
    /// A rule's name, or a rule's body.
    #[schema(value_type = Object)]
    pub rule: Value,
    /// An event of the caller's log.
    #[schema(value_type = Option<String>)]
    pub event_id: Option<Value>,
    /// An event written out: `{type, resource: {kind, id}, labels, data}`.
    #[schema(value_type = Option<Object>)]
    pub event: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    resource: Option<ResourceBody>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    data: Value,
    /// Ignored: an event written out is the caller's, now.
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    time: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    tenant: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceBody {
    kind: String,
    id: String,
}

async fn dry_run_event(state: &AppState, tenant: &str, body: &DryRunRequest) -> ApiResult<Event> {
    match (&body.event_id, &body.event) {
        (Some(_), Some(_)) => Err(ApiError::invalid("give event_id or event, not both")),
        (None, None) => Err(ApiError::invalid("event: give event_id or event")),
        (Some(id), None) => {
            let id = match id {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            }
            .filter(|id| *id > 0)
            .ok_or_else(|| ApiError::invalid("event_id: must be an event id"))?;
            let found = state
                .db
                .event_read(&EventQuery {
                    tenant: Some(tenant),
                    after: id - 1,
                    limit: 1,
                    ..Default::default()
                })
                .await?;
            found
                .into_iter()
                .find(|e| e.id == id)
                .ok_or_else(|| ApiError::not_found("event"))
        }
        (None, Some(event)) => {
            let written: EventBody = serde_json::from_value(event.clone())
                .map_err(|e| ApiError::invalid(format!("event: {e}")))?;
            let check = |what: &str, text: &str| {
                kiln_core::names::check_name(what, text)
                    .map_err(|e| ApiError::invalid(format!("event: {e}")))
            };
            check("type", &written.kind)?;
            let resource = written.resource.unwrap_or(ResourceBody {
                kind: "event".into(),
                id: "0".into(),
            });
            check("resource kind", &resource.kind)?;
            kiln_core::names::check_text("resource id", &resource.id, 256)
                .map_err(|e| ApiError::invalid(format!("event: {e}")))?;
            if written.data.to_string().len() > 64 * 1024 {
                return Err(ApiError::invalid("event: data is over 64 KiB"));
            }
            Ok(Event {
                id: 0,
                time: now_millis(),
                tenant: tenant.to_string(),
                kind: written.kind,
                resource: Resource {
                    kind: resource.kind,
                    id: resource.id,
                },
                labels: written.labels,
                data: written.data,
            })
        }
    }
}

/// What a rule would do with an event and why: whether it is triggered,
/// the condition's result and the values it read, the cooldown and cap,
/// a module's answer, and each action rendered. Nothing is written, no job
/// is made; a module runs in this API process.
#[utoipa::path(post, path = "/api/v1/automation/dry-run", tag = "automation",
    request_body = DryRunRequest,
    responses((status = 200, body = Object), (status = 404, body = ErrorBody),
              (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn dry_run(
    State(state): State<Arc<AppState>>,
    caller: Authorized<needs::Write>,
    Json(body): Json<DryRunRequest>,
) -> ApiResult<Json<Value>> {
    let rule = match &body.rule {
        Value::String(name) => {
            check_rule_name(name)?;
            let stored = state
                .db
                .rule_get(&caller.tenant, name)
                .await?
                .ok_or_else(|| ApiError::not_found("rule"))?;
            Rule::parse(name, &stored.body).map_err(|e| ApiError::invalid(e.to_string()))?
        }
        Value::Object(object) => {
            let name = object
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("dry-run")
                .to_string();
            checked(&state, &caller, &name, &body.rule)
                .await
                .map_err(|mut e| {
                    e.message = format!("rule.{}", e.message);
                    e
                })?
        }
        _ => {
            return Err(ApiError::invalid(
                "rule: give a rule's name or a rule's body",
            ))
        }
    };
    let event = dry_run_event(&state, &caller.tenant, &body).await?;
    let report = engine::dry_run(
        &state.db,
        state.wasm.as_deref(),
        &rule,
        &event,
        now_millis(),
    )
    .await?;
    Ok(Json(report))
}
