//! Self-healing rules. A rule of a tenant watches that tenant's events:
//!
//! ```json
//! {"trigger": {"events": ["job.dead"], "labels": {"team": "etl"}}   // or {"incident": "dead_letter_burst"}
//!  "condition": "event.data.queue == 'etl'",                         // the gate language, optional
//!  "actions": [{"action": "retry_dead_jobs", "queue": "${event.data.queue}"}],
//!  "cooldown_s": 60, "max_per_hour": 10, "active": true}
//! ```
//!
//! or, instead of `actions`, names a stored wasm module of the tenant
//! (`"module": {"id": "sha256:…"}`) that receives the context below as
//! JSON on stdin and prints `{"actions": [...]}`.
//!
//! The condition and every `${…}` template in an action's strings read
//! `{"event": {id, type, time, resource, labels, data}, "incident": {id,
//! kind, severity, title, fingerprint} | null}`. What is pure lives here:
//! checking a rule ([`Rule::parse`]), deciding whether an event fires it
//! ([`evaluate`]), the throttle ([`throttle`]) and rendering actions
//! ([`plan`]). [`engine`] runs it against the store; [`actions`] does what
//! the actions say, as the rule's tenant and only in it.

pub mod actions;
pub mod engine;

use std::collections::BTreeMap;

use kiln_core::names::{check_module_id, check_name, check_text};
use kiln_core::Millis;
use kiln_db::events::Event;
use kiln_db::rules::Throttle;
use kiln_flow::expr::Expr;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Most rules per tenant.
pub const RULES_MAX: i64 = 100;
/// Most actions a rule (or its module) may take per firing.
pub const ACTIONS_MAX: usize = 16;
/// Most dead jobs one `retry_dead_jobs` retries.
pub const RETRY_DEAD_MAX: i64 = 1_000;
/// Longest cooldown (a week).
pub const COOLDOWN_S_MAX: u64 = 7 * 86_400;
/// Highest hourly cap.
pub const PER_HOUR_MAX: u32 = 1_000;
/// Most event types and labels in a trigger.
pub const TRIGGER_MAX: usize = 16;
/// A module's limits: fuel, memory, wall time and output.
pub const MODULE_FUEL_MAX: u64 = 10_000_000_000;
pub const MODULE_FUEL_DEFAULT: u64 = 100_000_000;
pub const MODULE_MEMORY_MIB_MAX: u64 = 256;
pub const MODULE_MEMORY_MIB_DEFAULT: u64 = 32;
pub const MODULE_TIMEOUT_MS_MAX: u64 = 10_000;
pub const MODULE_TIMEOUT_MS_DEFAULT: u64 = 2_000;
pub const MODULE_OUTPUT_MAX: usize = 64 * 1024;

const COOLDOWN_S_DEFAULT: u64 = 60;
const PER_HOUR_DEFAULT: u32 = 10;

/// Why a rule was refused: the field at fault and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidRule {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> InvalidRule {
    InvalidRule {
        field: field.into(),
        message: message.to_string(),
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Trigger {
    /// Event types (exact, or prefixes ending in `.` from `job.*`; empty:
    /// every type) and labels that must all match.
    Events {
        types: Vec<String>,
        labels: BTreeMap<String, String>,
    },
    /// An incident of this kind opened.
    Incident(String),
}

/// A wasm module that decides the actions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleRef {
    pub id: String,
    #[serde(default)]
    pub fuel: Option<u64>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Decide {
    /// Actions as written, templates and all (checked when applied).
    Actions(Vec<Value>),
    Module(ModuleRef),
}

/// A checked rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: String,
    pub active: bool,
    pub trigger: Trigger,
    pub condition: Option<Expr>,
    pub decide: Decide,
    pub cooldown_s: u64,
    pub max_per_hour: u32,
}

/// What a job a rule runs looks like (`run_job`'s `job`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTemplate {
    pub kind: String,
    #[serde(default = "empty_object")]
    pub spec: Value,
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default)]
    pub max_attempts: Option<i32>,
    #[serde(default)]
    pub timeout_ms: Option<i64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn empty_object() -> Value {
    json!({})
}

/// An action, once its templates are rendered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Retry one failed, dead or cancelled job (an id; `${event.resource.id}`).
    RetryJob {
        job: String,
    },
    /// Retry up to `limit` (≤ 1,000, default 100) dead jobs of a queue,
    /// kind and label (`key=value`), newest first.
    RetryDeadJobs {
        #[serde(default)]
        queue: Option<String>,
        #[serde(default)]
        kind: Option<String>,
        #[serde(default)]
        label: Option<String>,
        #[serde(default = "retry_dead_default")]
        limit: i64,
    },
    PauseQueue {
        queue: String,
    },
    ResumeQueue {
        queue: String,
    },
    /// `limit` null removes the queue's limit.
    SetQueueLimit {
        queue: String,
        #[serde(default)]
        limit: Option<i32>,
    },
    /// The deployment's own rules only.
    DrainNode {
        node: String,
    },
    /// Deletes the VM and creates one of the same image, size and labels,
    /// through `vm:delete` and `vm:create` jobs (the new VM has a new id).
    RestartVm {
        vm: String,
    },
    RunJob {
        job: JobTemplate,
    },
    RunPipeline {
        pipeline: String,
        #[serde(default)]
        params: Map<String, Value>,
    },
    /// The incident of the event, or the one named.
    ResolveIncident {
        #[serde(default)]
        incident: Option<String>,
        #[serde(default)]
        notes: Option<String>,
    },
    /// Deliver the event to one of the tenant's subscriptions.
    Notify {
        subscription: String,
    },
}

fn retry_dead_default() -> i64 {
    100
}

pub const ACTION_NAMES: [&str; 11] = [
    "retry_job",
    "retry_dead_jobs",
    "pause_queue",
    "resume_queue",
    "set_queue_limit",
    "drain_node",
    "restart_vm",
    "run_job",
    "run_pipeline",
    "resolve_incident",
    "notify",
];

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::RetryJob { .. } => "retry_job",
            Action::RetryDeadJobs { .. } => "retry_dead_jobs",
            Action::PauseQueue { .. } => "pause_queue",
            Action::ResumeQueue { .. } => "resume_queue",
            Action::SetQueueLimit { .. } => "set_queue_limit",
            Action::DrainNode { .. } => "drain_node",
            Action::RestartVm { .. } => "restart_vm",
            Action::RunJob { .. } => "run_job",
            Action::RunPipeline { .. } => "run_pipeline",
            Action::ResolveIncident { .. } => "resolve_incident",
            Action::Notify { .. } => "notify",
        }
    }

    /// Checks the values an action holds once rendered; `field` is where
    /// it sits (`actions[0]`).
    pub fn check(&self, field: &str) -> Result<(), InvalidRule> {
        let name = |what: &str, text: &str| {
            check_name(what, text).map_err(|e| invalid(format!("{field}.{what}"), e))
        };
        let text = |what: &str, text: &str, max: usize| {
            check_text(what, text, max).map_err(|e| invalid(format!("{field}.{what}"), e))
        };
        match self {
            Action::RetryJob { job } => id_of(job)
                .map(drop)
                .ok_or_else(|| invalid(format!("{field}.job"), format!("{job:?} is not a job id"))),
            Action::RetryDeadJobs {
                queue,
                kind,
                label,
                limit,
            } => {
                if let Some(q) = queue {
                    name("queue", q)?;
                }
                if let Some(k) = kind {
                    name("kind", k)?;
                }
                if let Some(l) = label {
                    let (key, value) = l
                        .split_once('=')
                        .ok_or_else(|| invalid(format!("{field}.label"), "must be key=value"))?;
                    name("label", key)?;
                    text("label", value, kiln_core::limits::LABEL_VALUE_MAX)?;
                }
                if !(1..=RETRY_DEAD_MAX).contains(limit) {
                    return Err(invalid(
                        format!("{field}.limit"),
                        format!("must be 1 to {RETRY_DEAD_MAX}"),
                    ));
                }
                Ok(())
            }
            Action::PauseQueue { queue } | Action::ResumeQueue { queue } => name("queue", queue),
            Action::SetQueueLimit { queue, limit } => {
                name("queue", queue)?;
                if limit.is_some_and(|n| n < 1) {
                    return Err(invalid(format!("{field}.limit"), "must be at least 1"));
                }
                Ok(())
            }
            Action::DrainNode { node } => text("node", node, 256),
            Action::RestartVm { vm } => text("vm", vm, 256),
            Action::RunJob { job } => {
                name("job.kind", &job.kind)?;
                if let Some(q) = &job.queue {
                    name("job.queue", q)?;
                }
                if job.labels.len() > kiln_core::limits::LABELS_MAX {
                    return Err(invalid(format!("{field}.job.labels"), "too many labels"));
                }
                for (key, value) in &job.labels {
                    name("job.labels", key)?;
                    text("job.labels", value, kiln_core::limits::LABEL_VALUE_MAX)?;
                }
                Ok(())
            }
            Action::RunPipeline { pipeline, .. } => name("pipeline", pipeline),
            Action::ResolveIncident { incident, notes } => {
                if let Some(id) = incident {
                    id_of(id).ok_or_else(|| {
                        invalid(format!("{field}.incident"), "is not an incident id")
                    })?;
                }
                if let Some(notes) = notes {
                    text("notes", notes, 4096)?;
                }
                Ok(())
            }
            Action::Notify { subscription } => text("subscription", subscription, 128),
        }
    }
}

/// A positive id from its text.
pub fn id_of(text: &str) -> Option<i64> {
    text.trim().parse::<i64>().ok().filter(|id| *id > 0)
}

fn get<'a>(body: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    body.get(key).filter(|v| !v.is_null())
}

fn typed<T: serde::de::DeserializeOwned>(field: &str, value: &Value) -> Result<T, InvalidRule> {
    serde_json::from_value(value.clone()).map_err(|e| invalid(field, e))
}

/// Checks one action as written: a known action with known fields, its
/// templates well formed, and the fields without a template valid.
fn check_written_action(field: &str, action: &Value) -> Result<(), InvalidRule> {
    let Some(object) = action.as_object() else {
        return Err(invalid(field, "an action is a JSON object"));
    };
    let Some(name) = object.get("action").and_then(Value::as_str) else {
        return Err(invalid(
            format!("{field}.action"),
            format!("must name an action: {}", ACTION_NAMES.join(", ")),
        ));
    };
    if !ACTION_NAMES.contains(&name) {
        return Err(invalid(
            format!("{field}.action"),
            format!(
                "unknown action {name:?}; the actions are {}",
                ACTION_NAMES.join(", ")
            ),
        ));
    }
    kiln_flow::template::templates_in(action)
        .map_err(|(path, e)| invalid(format!("{field}{path}"), e))?;
    let parsed: Action = typed(field, action)?;
    // Rendering with a context where every path is a placeholder string
    // would guess; instead, fields holding a template are checked when
    // rendered, and the others now.
    let mut literal = parsed.clone();
    blank_templates(&mut literal);
    literal.check(field)
}

/// Puts a valid stand-in in every string field that holds a template, so
/// the static check looks only at the literal fields.
fn blank_templates(action: &mut Action) {
    let fix = |s: &mut String, with: &str| {
        if s.contains("${") {
            *s = with.to_string();
        }
    };
    let fix_opt = |s: &mut Option<String>, with: &str| {
        if let Some(s) = s {
            if s.contains("${") {
                *s = with.to_string();
            }
        }
    };
    match action {
        Action::RetryJob { job } => fix(job, "1"),
        Action::RetryDeadJobs {
            queue, kind, label, ..
        } => {
            fix_opt(queue, "q");
            fix_opt(kind, "k");
            fix_opt(label, "k=v");
        }
        Action::PauseQueue { queue }
        | Action::ResumeQueue { queue }
        | Action::SetQueueLimit { queue, .. } => fix(queue, "q"),
        Action::DrainNode { node } => fix(node, "n"),
        Action::RestartVm { vm } => fix(vm, "v"),
        Action::RunJob { job } => {
            fix(&mut job.kind, "k");
            fix_opt(&mut job.queue, "q");
            job.labels = job
                .labels
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        if v.contains("${") {
                            "v".into()
                        } else {
                            v.clone()
                        },
                    )
                })
                .collect();
        }
        Action::RunPipeline { pipeline, .. } => fix(pipeline, "p"),
        Action::ResolveIncident { incident, notes } => {
            fix_opt(incident, "1");
            fix_opt(notes, "n");
        }
        Action::Notify { subscription } => fix(subscription, "s"),
    }
}

const FIELDS: [&str; 8] = [
    "name",
    "active",
    "trigger",
    "condition",
    "actions",
    "module",
    "cooldown_s",
    "max_per_hour",
];

impl Rule {
    /// Checks a rule's body (`name` in the body, if any, must be `name`).
    /// The error names the field at fault.
    pub fn parse(name: &str, body: &Value) -> Result<Rule, InvalidRule> {
        check_name("name", name).map_err(|e| invalid("name", e))?;
        let Some(body) = body.as_object() else {
            return Err(invalid("rule", "a rule is a JSON object"));
        };
        if let Some(field) = body.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(invalid(
                field.as_str(),
                format!("unknown field; a rule has {}", FIELDS.join(", ")),
            ));
        }
        if let Some(given) = get(body, "name") {
            if given.as_str() != Some(name) {
                return Err(invalid("name", format!("must be {name:?}, as in the path")));
            }
        }
        let active = match get(body, "active") {
            Some(v) => typed("active", v)?,
            None => true,
        };
        let trigger = parse_trigger(get(body, "trigger"))?;
        let condition = match get(body, "condition") {
            Some(Value::String(text)) => {
                Some(Expr::parse(text).map_err(|e| invalid("condition", e))?)
            }
            Some(_) => return Err(invalid("condition", "must be an expression in a string")),
            None => None,
        };
        let decide = match (get(body, "actions"), get(body, "module")) {
            (Some(_), Some(_)) => {
                return Err(invalid("module", "give actions or a module, not both"))
            }
            (None, None) => return Err(invalid("actions", "give actions or a module")),
            (Some(actions), None) => {
                let Some(actions) = actions.as_array() else {
                    return Err(invalid("actions", "must be a list"));
                };
                if actions.is_empty() || actions.len() > ACTIONS_MAX {
                    return Err(invalid("actions", format!("1 to {ACTIONS_MAX} actions")));
                }
                for (i, action) in actions.iter().enumerate() {
                    check_written_action(&format!("actions[{i}]"), action)?;
                }
                Decide::Actions(actions.clone())
            }
            (None, Some(module)) => {
                let module: ModuleRef = typed("module", module)?;
                check_module_id("module.id", &module.id).map_err(|e| invalid("module.id", e))?;
                if module
                    .fuel
                    .is_some_and(|f| !(1..=MODULE_FUEL_MAX).contains(&f))
                {
                    return Err(invalid(
                        "module.fuel",
                        format!("must be 1 to {MODULE_FUEL_MAX}"),
                    ));
                }
                if module
                    .memory_mib
                    .is_some_and(|m| !(1..=MODULE_MEMORY_MIB_MAX).contains(&m))
                {
                    return Err(invalid(
                        "module.memory_mib",
                        format!("must be 1 to {MODULE_MEMORY_MIB_MAX}"),
                    ));
                }
                if module
                    .timeout_ms
                    .is_some_and(|t| !(1..=MODULE_TIMEOUT_MS_MAX).contains(&t))
                {
                    return Err(invalid(
                        "module.timeout_ms",
                        format!("must be 1 to {MODULE_TIMEOUT_MS_MAX}"),
                    ));
                }
                Decide::Module(module)
            }
        };
        let cooldown_s = match get(body, "cooldown_s") {
            Some(v) => typed::<u64>("cooldown_s", v)?,
            None => COOLDOWN_S_DEFAULT,
        };
        if cooldown_s > COOLDOWN_S_MAX {
            return Err(invalid(
                "cooldown_s",
                format!("must be 0 to {COOLDOWN_S_MAX}"),
            ));
        }
        let max_per_hour = match get(body, "max_per_hour") {
            Some(v) => typed::<u32>("max_per_hour", v)?,
            None => PER_HOUR_DEFAULT,
        };
        if !(1..=PER_HOUR_MAX).contains(&max_per_hour) {
            return Err(invalid(
                "max_per_hour",
                format!("must be 1 to {PER_HOUR_MAX}"),
            ));
        }
        Ok(Rule {
            name: name.to_string(),
            active,
            trigger,
            condition,
            decide,
            cooldown_s,
            max_per_hour,
        })
    }

    /// The rule as stored and shown, defaults filled in.
    pub fn to_json(&self) -> Value {
        let trigger = match &self.trigger {
            Trigger::Events { types, labels } => json!({
                "events": types.iter().map(|t| if t.ends_with('.') { format!("{t}*") } else { t.clone() }).collect::<Vec<_>>(),
                "labels": labels,
            }),
            Trigger::Incident(kind) => json!({"incident": kind}),
        };
        let mut out = json!({
            "name": self.name,
            "active": self.active,
            "trigger": trigger,
            "condition": self.condition.as_ref().map(|c| c.source().to_string()),
            "cooldown_s": self.cooldown_s,
            "max_per_hour": self.max_per_hour,
        });
        match &self.decide {
            Decide::Actions(actions) => out["actions"] = Value::Array(actions.clone()),
            Decide::Module(module) => out["module"] = json!(module),
        }
        out
    }

    /// The actions that name other tenants' things are impossible (every
    /// action runs in the rule's tenant); those that only the deployment
    /// may take are refused for the others here.
    pub fn check_for_tenant(&self, deployment: bool) -> Result<(), InvalidRule> {
        if let Decide::Actions(actions) = &self.decide {
            for (i, action) in actions.iter().enumerate() {
                if action.get("action").and_then(Value::as_str) == Some("drain_node") && !deployment
                {
                    return Err(invalid(
                        format!("actions[{i}].action"),
                        "drain_node is for the deployment's own rules (a system key)",
                    ));
                }
            }
        }
        Ok(())
    }
}

fn parse_trigger(trigger: Option<&Value>) -> Result<Trigger, InvalidRule> {
    let Some(Value::Object(trigger)) = trigger else {
        return Err(invalid(
            "trigger",
            "must be {\"events\": [types], \"labels\": {..}} or {\"incident\": kind}",
        ));
    };
    if let Some(field) = trigger
        .keys()
        .find(|k| !["events", "labels", "incident"].contains(&k.as_str()))
    {
        return Err(invalid(format!("trigger.{field}"), "unknown field"));
    }
    match (get(trigger, "events"), get(trigger, "incident")) {
        (Some(_), Some(_)) => Err(invalid("trigger", "give events or incident, not both")),
        (None, Some(kind)) => {
            if get(trigger, "labels").is_some() {
                return Err(invalid("trigger.labels", "only with events"));
            }
            let kind: String = typed("trigger.incident", kind)?;
            check_name("incident", &kind).map_err(|e| invalid("trigger.incident", e))?;
            Ok(Trigger::Incident(kind))
        }
        (events, None) => {
            let patterns: Vec<String> = match events {
                Some(v) => typed("trigger.events", v)?,
                None => Vec::new(),
            };
            if patterns.iter().any(|p| p.contains(',')) {
                return Err(invalid("trigger.events", "a type holds no comma"));
            }
            let filter = kiln_events::EventFilter::parse(Some(&patterns.join(",")), None, None)
                .map_err(|e| invalid("trigger.events", e))?;
            let labels: BTreeMap<String, String> = match get(trigger, "labels") {
                Some(v) => typed("trigger.labels", v)?,
                None => BTreeMap::new(),
            };
            if labels.len() > TRIGGER_MAX {
                return Err(invalid("trigger.labels", format!("at most {TRIGGER_MAX}")));
            }
            for (key, value) in &labels {
                check_name("label key", key).map_err(|e| invalid("trigger.labels", e))?;
                check_text("label value", value, kiln_core::limits::LABEL_VALUE_MAX)
                    .map_err(|e| invalid("trigger.labels", e))?;
            }
            Ok(Trigger::Events {
                types: filter.types,
                labels,
            })
        }
    }
}

/// What conditions and templates read for an event.
pub fn context(event: &Event) -> Value {
    let incident = (event.resource.kind == "incident").then(|| {
        let field = |key: &str| event.data.get(key).cloned().unwrap_or(Value::Null);
        json!({
            "id": event.resource.id,
            "kind": field("kind"),
            "severity": field("severity"),
            "title": field("title"),
            "fingerprint": field("fingerprint"),
            "status": event.kind.strip_prefix("incident.").unwrap_or(""),
        })
    });
    json!({
        "event": {
            "id": event.id,
            "type": event.kind,
            "time": event.time,
            "resource": {"kind": event.resource.kind, "id": event.resource.id},
            "labels": event.labels,
            "data": event.data,
        },
        "incident": incident,
    })
}

/// Whether the trigger matches an event (of the rule's tenant).
pub fn triggered(trigger: &Trigger, event: &Event) -> bool {
    match trigger {
        Trigger::Incident(kind) => {
            event.kind == "incident.opened"
                && event.data.get("kind").and_then(Value::as_str) == Some(kind.as_str())
        }
        Trigger::Events { types, labels } => {
            let filter = kiln_events::EventFilter {
                types: types.clone(),
                resource: None,
                labels: labels.clone(),
            };
            filter.matches(&event.tenant, event)
        }
    }
}

/// How a rule judged an event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    pub triggered: bool,
    /// The condition's value (`None`: no condition, or it failed).
    pub condition: Option<bool>,
    /// Why the condition could not be decided.
    pub condition_error: Option<String>,
    /// The values the condition read.
    pub bindings: BTreeMap<String, Value>,
    /// Whether the rule fires, throttle aside.
    pub fires: bool,
}

/// Decides whether an event fires a rule (its throttle aside). Events of
/// the rules themselves (`rule.*`) never do, so rules cannot feed on each
/// other.
pub fn evaluate(rule: &Rule, event: &Event) -> Evaluation {
    let triggered =
        rule.active && !event.kind.starts_with("rule.") && triggered(&rule.trigger, event);
    let mut out = Evaluation {
        triggered,
        condition: None,
        condition_error: None,
        bindings: BTreeMap::new(),
        fires: triggered,
    };
    if let (true, Some(condition)) = (triggered, &rule.condition) {
        let context = context(event);
        out.bindings = condition.bindings(&context);
        match condition.eval_bool(&context) {
            Ok(value) => {
                out.condition = Some(value);
                out.fires = value;
            }
            Err(error) => {
                out.condition_error = Some(error.to_string());
                out.fires = false;
            }
        }
    }
    out
}

/// Why the throttle holds a rule back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "held", rename_all = "snake_case")]
pub enum Held {
    Cooldown { remaining_ms: i64 },
    HourlyCap { fires_last_hour: i64 },
}

/// Whether a rule may fire now: its cooldown has passed since the last
/// fire, and it fired fewer than `max_per_hour` times in the hour before.
pub fn throttle(
    state: &Throttle,
    now: Millis,
    cooldown_s: u64,
    max_per_hour: u32,
) -> Result<(), Held> {
    let cooldown = i64::try_from(cooldown_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    if let Some(last) = state.last_fired_at {
        let since = now.saturating_sub(last);
        if since < cooldown {
            return Err(Held::Cooldown {
                remaining_ms: cooldown - since,
            });
        }
    }
    if state.fires_last_hour >= i64::from(max_per_hour) {
        return Err(Held::HourlyCap {
            fires_last_hour: state.fires_last_hour,
        });
    }
    Ok(())
}

/// One action as it would run: rendered and checked, or why not.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub name: String,
    pub action: Result<Action, String>,
}

/// Renders each action's templates against the event's context and checks
/// the result. A module's actions come through here too.
pub fn plan(actions: &[Value], event: &Event) -> Vec<Planned> {
    let context = context(event);
    actions
        .iter()
        .take(ACTIONS_MAX)
        .enumerate()
        .map(|(i, raw)| {
            let field = format!("actions[{i}]");
            let name = raw
                .get("action")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .chars()
                .take(64)
                .collect::<String>();
            let action = check_written_action(&field, raw)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    kiln_flow::template::render_value(raw, &context)
                        .map_err(|e| format!("{field}: {e}"))
                })
                .and_then(|rendered| {
                    let action: Action =
                        serde_json::from_value(rendered).map_err(|e| format!("{field}: {e}"))?;
                    action.check(&field).map_err(|e| e.to_string())?;
                    Ok(action)
                });
            Planned { name, action }
        })
        .collect()
}

/// A module's output as actions: `{"actions": [...], "note": any}` or a
/// bare list; the note (a module's own account of its decision) comes back
/// too.
pub fn module_actions(stdout: &str) -> Result<(Vec<Value>, Option<Value>), String> {
    let value: Value = serde_json::from_str(stdout.trim())
        .map_err(|e| format!("the module printed no JSON: {e}"))?;
    let (actions, note) = match value {
        Value::Array(actions) => (actions, None),
        Value::Object(mut object) => {
            let note = object.remove("note");
            if let Some(field) = object.keys().find(|k| *k != "actions") {
                return Err(format!("the module printed an unknown field {field:?}"));
            }
            match object.remove("actions") {
                Some(Value::Array(actions)) => (actions, note),
                Some(Value::Null) | None => (Vec::new(), note),
                Some(_) => return Err("the module's actions must be a list".into()),
            }
        }
        _ => return Err("the module must print {\"actions\": [...]}".into()),
    };
    if actions.len() > ACTIONS_MAX {
        return Err(format!(
            "the module asked for more than {ACTIONS_MAX} actions"
        ));
    }
    Ok((actions, note))
}

#[cfg(test)]
mod tests;
