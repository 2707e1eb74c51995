//! What a pipeline definition may say, and the checks that refuse a bad one
//! at creation with the path of what is wrong: cycles (named), unknown or
//! duplicate step ids, unknown template references, bad kinds and specs.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_core::files::JobFiles;
use kiln_core::{Backoff, JobKinds, Priority, SpecError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::expr::Expr;
use crate::template::{templates_in, Template};

/// Most steps in one pipeline.
pub const STEPS_MAX: usize = 1_000;
/// Most params in one pipeline.
pub const PARAMS_MAX: usize = 100;
/// Most instances a `for_each` may make of one step.
pub const FOR_EACH_MAX: usize = 10_000;
/// Longest approval deadline.
pub const APPROVAL_DEADLINE_MAX_S: i64 = 30 * 24 * 3600;
/// Largest definition, as JSON.
pub const DEFINITION_BYTES_MAX: usize = 1024 * 1024;

/// Step kinds that are not jobs: kiln decides them itself.
pub const GATE: &str = "gate";
pub const APPROVAL: &str = "approval";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<ParamDef>,
    pub steps: Vec<StepDef>,
    /// Most runs of this pipeline in flight at once; more wait, queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    #[default]
    String,
    Int,
    Number,
    Bool,
    List,
    Object,
    Any,
}

impl ParamType {
    pub fn accepts(self, value: &Value) -> bool {
        match self {
            ParamType::String => value.is_string(),
            ParamType::Int => value.is_i64(),
            ParamType::Number => value.is_number(),
            ParamType::Bool => value.is_boolean(),
            ParamType::List => value.is_array(),
            ParamType::Object => value.is_object(),
            ParamType::Any => true,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Int => "int",
            ParamType::Number => "number",
            ParamType::Bool => "bool",
            ParamType::List => "list",
            ParamType::Object => "object",
            ParamType::Any => "any",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamDef {
    pub name: String,
    #[serde(rename = "type", default)]
    pub ty: ParamType,
    /// A param without a default must be given to every run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// When a step runs, given how its dependencies ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum When {
    /// Every dependency succeeded.
    #[default]
    Success,
    /// At least one dependency failed or was skipped: a step that handles failure.
    Failure,
    /// Whatever happened upstream: cleanup.
    Always,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    pub max_attempts: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
}

/// An artefact of an upstream step, placed at the same path in this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputRef {
    pub step: String,
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSpec {
    /// Seconds the step waits for a decision before it ends rejected.
    #[serde(default = "default_deadline")]
    pub deadline_s: i64,
}

fn default_deadline() -> i64 {
    24 * 3600
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    pub id: String,
    /// A job kind (`wasm`, `vm`, `noop`, …), or `gate` or `approval`.
    pub kind: String,
    #[serde(default = "empty_object")]
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub when: When,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// A template whose value is a list: one instance of the step per item,
    /// each seeing `item` and `item_index`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// Paths the step produces, kept under the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// For a `gate`: the condition that lets the run go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<Expr>,
    /// For an `approval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl StepDef {
    pub fn is_job(&self) -> bool {
        self.kind != GATE && self.kind != APPROVAL
    }
}

/// A definition refused, with the path of the offending part
/// (`steps[2].depends_on[0]`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DefError {
    pub path: String,
    pub message: String,
}

fn refuse(path: impl Into<String>, message: impl Into<String>) -> DefError {
    DefError {
        path: path.into(),
        message: message.into(),
    }
}

/// Step ids and param names are paths in templates and expressions, so they
/// are identifiers: `[a-z_][a-z0-9_]*`, at most 64 bytes.
pub fn check_identifier(path: &str, name: &str) -> Result<(), DefError> {
    let ok = !name.is_empty()
        && name.len() <= kiln_core::names::NAME_MAX
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(refuse(
            path,
            format!("{name:?} must be 1 to 64 of a-z, 0-9 and _, not starting with a digit"),
        ))
    }
}

/// A checked definition: the graph in the order steps may start, with each
/// step's ancestors known.
#[derive(Clone, Debug)]
pub struct Checked {
    pub def: PipelineDef,
    /// Step indices, each after all of its dependencies.
    pub order: Vec<usize>,
    /// Step index by id.
    pub index: HashMap<String, usize>,
    /// Each step's dependencies and dependants, by index.
    pub parents: Vec<Vec<usize>>,
    pub children: Vec<Vec<usize>>,
}

impl Checked {
    pub fn position(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }
}

impl PipelineDef {
    /// Where an input lands in the step that takes it: at its path, or,
    /// from a fanned-out step, at `<step>/<index>/<path>` for each instance
    /// (`*` standing for the index).
    pub fn input_place(&self, input: &InputRef) -> String {
        match self.step(&input.step) {
            Some(s) if s.for_each.is_some() => format!("{}/*/{}", input.step, input.path),
            _ => input.path.clone(),
        }
    }

    pub fn step(&self, id: &str) -> Option<&StepDef> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// Parses and checks a definition from JSON.
    pub fn from_json(value: Value, kinds: &JobKinds) -> Result<Checked, DefError> {
        let def: PipelineDef = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                "definition".to_string()
            } else {
                path
            };
            refuse(path, e.into_inner().to_string())
        })?;
        def.check(kinds)
    }

    /// Every rule a definition must keep; the first broken one is returned.
    pub fn check(self, kinds: &JobKinds) -> Result<Checked, DefError> {
        kiln_core::names::check_name("name", &self.name)
            .map_err(|e| refuse("name", e.to_string()))?;
        if let Some(text) = &self.description {
            kiln_core::names::check_text("description", text, 4096)
                .map_err(|e| refuse("description", e.to_string()))?;
        }
        for (key, value) in &self.labels {
            kiln_core::names::check_name("label key", key)
                .map_err(|e| refuse("labels", e.to_string()))?;
            kiln_core::names::check_text("label value", value, 256)
                .map_err(|e| refuse(format!("labels.{key}"), e.to_string()))?;
        }
        if self.concurrency == Some(0) {
            return Err(refuse("concurrency", "must be at least 1"));
        }
        if self.params.len() > PARAMS_MAX {
            return Err(refuse("params", format!("at most {PARAMS_MAX} params")));
        }
        let mut params = BTreeSet::new();
        for (i, p) in self.params.iter().enumerate() {
            let path = format!("params[{i}]");
            check_identifier(&format!("{path}.name"), &p.name)?;
            if !params.insert(p.name.as_str()) {
                return Err(refuse(
                    format!("{path}.name"),
                    format!("duplicate param {:?}", p.name),
                ));
            }
            if let Some(default) = &p.default {
                if !p.ty.accepts(default) {
                    return Err(refuse(
                        format!("{path}.default"),
                        format!("is not of type {}", p.ty.as_str()),
                    ));
                }
            }
        }
        if self.steps.is_empty() {
            return Err(refuse("steps", "a pipeline needs at least one step"));
        }
        if self.steps.len() > STEPS_MAX {
            return Err(refuse("steps", format!("at most {STEPS_MAX} steps")));
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            check_identifier(&format!("steps[{i}].id"), &step.id)?;
            if index.insert(step.id.as_str(), i).is_some() {
                return Err(refuse(
                    format!("steps[{i}].id"),
                    format!("duplicate step id {:?}", step.id),
                ));
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            let mut seen = BTreeSet::new();
            for (j, dep) in step.depends_on.iter().enumerate() {
                let path = format!("steps[{i}].depends_on[{j}]");
                if !index.contains_key(dep.as_str()) {
                    return Err(refuse(path, format!("unknown step {dep:?}")));
                }
                if dep == &step.id {
                    return Err(refuse(path, format!("step {dep:?} depends on itself")));
                }
                if !seen.insert(dep.as_str()) {
                    return Err(refuse(path, format!("{dep:?} is listed twice")));
                }
            }
        }
        let order = topological_order(&self.steps, &index)?;
        let ancestors = ancestors(&self.steps, &index, &order);
        for (i, step) in self.steps.iter().enumerate() {
            self.check_step(i, step, kinds, &params, &ancestors[i])?;
        }
        let parents: Vec<Vec<usize>> = self
            .steps
            .iter()
            .map(|s| s.depends_on.iter().map(|d| index[d.as_str()]).collect())
            .collect();
        let mut children = vec![Vec::new(); self.steps.len()];
        for (i, ps) in parents.iter().enumerate() {
            for &p in ps {
                children[p].push(i);
            }
        }
        let index = index.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Ok(Checked {
            def: self,
            order,
            index,
            parents,
            children,
        })
    }

    fn check_step(
        &self,
        i: usize,
        step: &StepDef,
        kinds: &JobKinds,
        params: &BTreeSet<&str>,
        ancestors: &BTreeSet<&str>,
    ) -> Result<(), DefError> {
        let at = |field: &str| format!("steps[{i}].{field}");
        let scope = Scope {
            params,
            ancestors,
            steps: &self.steps,
            in_for_each: step.for_each.is_some(),
        };
        match step.kind.as_str() {
            GATE => {
                let condition = step
                    .condition
                    .as_ref()
                    .ok_or_else(|| refuse(at("condition"), "a gate needs a condition"))?;
                scope.check_expr(&at("condition"), condition)?;
            }
            APPROVAL => {
                let deadline = step
                    .approval
                    .as_ref()
                    .map_or(default_deadline(), |a| a.deadline_s);
                if !(1..=APPROVAL_DEADLINE_MAX_S).contains(&deadline) {
                    return Err(refuse(
                        at("approval.deadline_s"),
                        format!("must be 1 to {APPROVAL_DEADLINE_MAX_S}"),
                    ));
                }
            }
            kind => {
                kiln_core::names::check_name("kind", kind)
                    .map_err(|e| refuse(at("kind"), e.to_string()))?;
                if step.condition.is_some() {
                    return Err(refuse(at("condition"), "only a gate has a condition"));
                }
                if step.approval.is_some() {
                    return Err(refuse(at("approval"), "only an approval step has one"));
                }
                if let Some(field) = JobFiles::FIELDS
                    .iter()
                    .find(|f| step.spec.get(**f).is_some())
                {
                    return Err(refuse(
                        at(&format!("spec.{field}")),
                        "a step names its files as the step's artifacts and inputs",
                    ));
                }
                if step.spec.get("secrets").is_some() {
                    return Err(refuse(
                        at("spec.secrets"),
                        "a step names its secrets as the step's secrets",
                    ));
                }
                let templates = templates_in(&step.spec)
                    .map_err(|(path, e)| refuse(format!("steps[{i}].spec{path}"), e))?;
                for (path, template) in &templates {
                    scope.check_template(&format!("steps[{i}].spec{path}"), template)?;
                }
                // A spec with templates is checked again once rendered: a
                // templated field may be a number or a module id only then.
                match kinds.check(kind, &step.spec) {
                    Ok(()) => {}
                    Err(SpecError::UnknownKind(_)) => {
                        return Err(refuse(at("kind"), format!("unknown kind {kind:?}")))
                    }
                    Err(SpecError::Invalid(message)) if templates.is_empty() => {
                        return Err(refuse(at("spec"), message))
                    }
                    Err(SpecError::Invalid(_)) => {}
                }
                for (field, set) in [
                    ("artifacts", !step.artifacts.is_empty()),
                    ("inputs", !step.inputs.is_empty()),
                ] {
                    if set && !kinds.takes_files(kind) {
                        return Err(refuse(
                            at(field),
                            format!("a {kind} step keeps and takes no files"),
                        ));
                    }
                }
                if !step.secrets.is_empty() && !kinds.takes_secrets(kind) {
                    return Err(refuse(
                        at("secrets"),
                        format!("a {kind} step is given no secrets"),
                    ));
                }
            }
        }
        if !step.is_job() {
            for (field, set) in [
                ("for_each", step.for_each.is_some()),
                ("artifacts", !step.artifacts.is_empty()),
                ("inputs", !step.inputs.is_empty()),
                ("secrets", !step.secrets.is_empty()),
                ("retry", step.retry.is_some()),
            ] {
                if set {
                    return Err(refuse(
                        at(field),
                        format!("a {} step has no {field}", step.kind),
                    ));
                }
            }
        }
        if let Some(for_each) = &step.for_each {
            let template = Template::parse(for_each)
                .map_err(|e| refuse(at("for_each"), e))?
                .filter(Template::is_whole)
                .ok_or_else(|| {
                    refuse(
                        at("for_each"),
                        "must be one template, as in ${params.files}",
                    )
                })?;
            // `item` is what the for_each makes; it cannot feed itself.
            let outer = Scope {
                in_for_each: false,
                ..scope
            };
            outer.check_template(&at("for_each"), &template)?;
        }
        if let Some(retry) = &step.retry {
            if !(1..=kiln_core::limits::MAX_ATTEMPTS_MAX).contains(&retry.max_attempts) {
                return Err(refuse(
                    at("retry.max_attempts"),
                    format!("must be 1 to {}", kiln_core::limits::MAX_ATTEMPTS_MAX),
                ));
            }
            if let Some(backoff) = &retry.backoff {
                if backoff.base_ms < 0 || backoff.max_ms < backoff.base_ms {
                    return Err(refuse(at("retry.backoff"), "needs 0 <= base_ms <= max_ms"));
                }
            }
        }
        if let Some(timeout) = step.timeout_ms {
            if !(1..=kiln_core::limits::TIMEOUT_MS_MAX).contains(&timeout) {
                return Err(refuse(
                    at("timeout_ms"),
                    format!("must be 1 to {}", kiln_core::limits::TIMEOUT_MS_MAX),
                ));
            }
        }
        if let Some(queue) = &step.queue {
            kiln_core::names::check_name("queue", queue)
                .map_err(|e| refuse(at("queue"), e.to_string()))?;
        }
        if step.artifacts.len() > kiln_core::files::OUTPUTS_MAX {
            return Err(refuse(
                at("artifacts"),
                format!("at most {} artifacts", kiln_core::files::OUTPUTS_MAX),
            ));
        }
        for (j, path) in step.artifacts.iter().enumerate() {
            check_artifact_path(&at(&format!("artifacts[{j}]")), path)?;
            if step.artifacts[..j].contains(path) {
                return Err(refuse(
                    at(&format!("artifacts[{j}]")),
                    format!("{path:?} is named twice"),
                ));
            }
        }
        let mut placed = BTreeSet::new();
        for (j, input) in step.inputs.iter().enumerate() {
            let path = at(&format!("inputs[{j}]"));
            if !placed.insert(self.input_place(input)) {
                return Err(refuse(
                    path,
                    format!("another input is placed at {:?}", self.input_place(input)),
                ));
            }
            if !ancestors.contains(input.step.as_str()) {
                return Err(refuse(
                    format!("{path}.step"),
                    format!("{:?} is not a step this one depends on", input.step),
                ));
            }
            let declared = self
                .step(&input.step)
                .is_some_and(|s| s.artifacts.contains(&input.path));
            if !declared {
                return Err(refuse(
                    format!("{path}.path"),
                    format!(
                        "step {:?} declares no artifact {:?}",
                        input.step, input.path
                    ),
                ));
            }
        }
        kiln_core::secrets::check_requested(&step.secrets).map_err(|e| refuse(at("secrets"), e))?;
        for (key, value) in &step.labels {
            kiln_core::names::check_name("label key", key)
                .map_err(|e| refuse(at("labels"), e.to_string()))?;
            kiln_core::names::check_text("label value", value, 256)
                .map_err(|e| refuse(at(&format!("labels.{key}")), e.to_string()))?;
        }
        Ok(())
    }
}

/// Artefact paths are relative, normal and bounded: they become object keys
/// under the run and paths inside a sandbox, never a way out of either.
pub fn check_artifact_path(at: &str, path: &str) -> Result<(), DefError> {
    kiln_core::files::check_path("the path", path).map_err(|e| refuse(at, e.0))
}

/// What a template or condition of one step may read.
#[derive(Clone, Copy)]
struct Scope<'a> {
    params: &'a BTreeSet<&'a str>,
    ancestors: &'a BTreeSet<&'a str>,
    steps: &'a [StepDef],
    in_for_each: bool,
}

/// Fields of a step's result a template may read.
const STEP_FIELDS: [&str; 5] = ["status", "exit_code", "stdout", "output", "items"];

impl Scope<'_> {
    fn check_template(&self, at: &str, template: &Template) -> Result<(), DefError> {
        for expr in template.exprs() {
            self.check_expr(at, expr)?;
        }
        Ok(())
    }

    fn check_expr(&self, at: &str, expr: &Expr) -> Result<(), DefError> {
        for reference in expr.references() {
            self.check_reference(at, &reference)
                .map_err(|message| refuse(at, format!("{message} in {:?}", expr.source())))?;
        }
        Ok(())
    }

    fn check_reference(&self, _at: &str, path: &[String]) -> Result<(), String> {
        let Some(root) = path.first() else {
            return Ok(());
        };
        let second = path.get(1).map(String::as_str);
        match root.as_str() {
            "params" => match second {
                Some(name) if self.params.contains(name) => Ok(()),
                Some(name) => Err(format!("unknown param {name:?}")),
                None => Ok(()),
            },
            "run" => match second {
                None | Some("id" | "attempt" | "pipeline" | "version") => Ok(()),
                Some(field) => Err(format!("unknown run field {field:?}")),
            },
            "steps" => {
                let Some(id) = second else {
                    return Err("name a step: steps.<id>".into());
                };
                if !self.steps.iter().any(|s| s.id == id) {
                    return Err(format!("unknown step {id:?}"));
                }
                if !self.ancestors.contains(id) {
                    return Err(format!(
                        "step {id:?} is not upstream of this one (add it to depends_on)"
                    ));
                }
                match path.get(2).map(String::as_str) {
                    None => Ok(()),
                    Some(field) if STEP_FIELDS.contains(&field) => Ok(()),
                    Some(field) => Err(format!(
                        "unknown step field {field:?} (one of {})",
                        STEP_FIELDS.join(", ")
                    )),
                }
            }
            "item" | "item_index" if self.in_for_each => Ok(()),
            "item" | "item_index" => Err(format!("{root} exists only in a for_each step")),
            other => Err(format!(
                "unknown name {other:?} (params, run, steps, item or item_index)"
            )),
        }
    }
}

/// Kahn's algorithm, lowest index first among the ready, so the order is
/// stable; a cycle is named from one of its steps back to itself.
fn topological_order(
    steps: &[StepDef],
    index: &HashMap<&str, usize>,
) -> Result<Vec<usize>, DefError> {
    let mut pending: Vec<usize> = steps.iter().map(|s| s.depends_on.len()).collect();
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, step) in steps.iter().enumerate() {
        for dep in &step.depends_on {
            dependants[index[dep.as_str()]].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..steps.len()).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(steps.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &d in &dependants[i] {
            pending[d] -= 1;
            if pending[d] == 0 {
                ready.insert(d);
            }
        }
    }
    if order.len() == steps.len() {
        return Ok(order);
    }
    // Every step left waits on another step left: walk dependencies from one
    // until a step repeats; the walk from its first visit is the cycle.
    let left: BTreeSet<usize> = (0..steps.len()).filter(|&i| pending[i] > 0).collect();
    let start = *left.iter().next().unwrap_or(&0);
    let mut walk = vec![start];
    let mut at = start;
    loop {
        let next = steps[at]
            .depends_on
            .iter()
            .map(|d| index[d.as_str()])
            .find(|d| left.contains(d))
            .unwrap_or(start);
        if let Some(pos) = walk.iter().position(|&s| s == next) {
            let mut cycle: Vec<&str> = walk[pos..].iter().map(|&s| steps[s].id.as_str()).collect();
            cycle.reverse();
            cycle.push(cycle[0]);
            return Err(refuse(
                format!("steps[{next}].depends_on"),
                format!("cycle: {}", cycle.join(" → ")),
            ));
        }
        walk.push(next);
        at = next;
    }
}

fn ancestors<'a>(
    steps: &'a [StepDef],
    index: &HashMap<&str, usize>,
    order: &[usize],
) -> Vec<BTreeSet<&'a str>> {
    let mut all: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); steps.len()];
    for &i in order {
        let mut mine = BTreeSet::new();
        for dep in &steps[i].depends_on {
            let d = index[dep.as_str()];
            mine.insert(steps[d].id.as_str());
            mine.extend(all[d].iter().copied());
        }
        all[i] = mine;
    }
    all
}

/// The params of a run: given values checked against their types, defaults
/// filled in, unknown names and missing required ones refused.
pub fn resolve_params(
    def: &PipelineDef,
    given: &serde_json::Map<String, Value>,
) -> Result<serde_json::Map<String, Value>, DefError> {
    for name in given.keys() {
        if !def.params.iter().any(|p| &p.name == name) {
            return Err(refuse(format!("params.{name}"), "unknown param"));
        }
    }
    let mut out = serde_json::Map::new();
    for p in &def.params {
        let value = match given.get(&p.name).or(p.default.as_ref()) {
            Some(v) => v.clone(),
            None => {
                return Err(refuse(format!("params.{}", p.name), "is required"));
            }
        };
        if !p.ty.accepts(&value) {
            return Err(refuse(
                format!("params.{}", p.name),
                format!("is not of type {}", p.ty.as_str()),
            ));
        }
        out.insert(p.name.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kinds() -> JobKinds {
        fn any_object(spec: &Value) -> Result<(), String> {
            match spec.as_object() {
                Some(map) if map.keys().all(|k| k == "args" || k == "n") => Ok(()),
                Some(_) => Err("unknown field".into()),
                None => Err("spec must be an object".into()),
            }
        }
        let mut kinds = JobKinds::new();
        kinds.add("noop", any_object);
        kinds.add_with_files("files", any_object);
        kinds.with_secrets("files");
        kinds
    }

    #[test]
    fn only_kinds_given_secrets_ask_for_them_as_the_steps_secrets() {
        let step = |kind: &str, spec: Value, secrets: Value| json!({"name": "s", "steps": [{"id": "a", "kind": kind, "spec": spec, "secrets": secrets}]});
        check(step("files", json!({}), json!(["db", "token"]))).unwrap();
        for (def, says) in [
            (
                step("noop", json!({}), json!(["db"])),
                "steps[0].secrets: a noop step is given no secrets",
            ),
            (
                step("files", json!({"secrets": ["db"]}), json!([])),
                "steps[0].spec.secrets",
            ),
            (
                step("files", json!({}), json!(["../db"])),
                "steps[0].secrets",
            ),
            (step("files", json!({}), json!(["db", "db"])), "twice"),
        ] {
            let error = error(def);
            assert!(error.contains(says), "{error}");
        }
    }

    fn check(def: Value) -> Result<Checked, DefError> {
        PipelineDef::from_json(def, &kinds())
    }

    fn error(def: Value) -> String {
        check(def).expect_err("must be refused").to_string()
    }

    #[test]
    fn a_diamond_is_accepted_in_dependency_order() {
        let checked = check(json!({
            "name": "d",
            "params": [{"name": "x", "type": "int", "default": 1}],
            "steps": [
                {"id": "d", "kind": "noop", "depends_on": ["b", "c"],
                 "spec": {"args": ["${steps.b.stdout}", "${steps.a.output.n}"]}},
                {"id": "b", "kind": "noop", "depends_on": ["a"]},
                {"id": "c", "kind": "noop", "depends_on": ["a"], "spec": {"args": ["${params.x}"]}},
                {"id": "a", "kind": "noop"},
            ]
        }))
        .unwrap();
        assert_eq!(checked.order, vec![3, 1, 2, 0]);
    }

    #[test]
    fn cycles_are_named() {
        let message = error(json!({"name": "c", "steps": [
            {"id": "a", "kind": "noop", "depends_on": ["c"]},
            {"id": "b", "kind": "noop", "depends_on": ["a"]},
            {"id": "c", "kind": "noop", "depends_on": ["b"]},
            {"id": "z", "kind": "noop"},
        ]}));
        assert!(message.contains("cycle: "), "{message}");
        for id in ["a", "b", "c"] {
            assert!(message.contains(id), "{message}");
        }
        assert!(!message.contains('z'), "{message}");
        assert!(error(
            json!({"name": "c", "steps": [{"id": "a", "kind": "noop", "depends_on": ["a"]}]})
        )
        .contains("depends on itself"));
    }

    #[test]
    fn every_refusal_names_its_path() {
        let cases = [
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop"}, {"id": "a", "kind": "noop"}]}),
                "steps[1].id: duplicate step id",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop", "depends_on": ["b"]}]}),
                "steps[0].depends_on[0]: unknown step \"b\"",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "nope"}]}),
                "steps[0].kind: unknown kind",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop", "spec": {"bad": 1}}]}),
                "steps[0].spec: unknown field",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop", "spec": {"args": ["${params.q}"]}}]}),
                "steps[0].spec.args[0]: unknown param \"q\"",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop"},
                {"id": "b", "kind": "noop", "spec": {"args": ["${steps.a.stdout}"]}}]}),
                "steps[1].spec.args[0]: step \"a\" is not upstream",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop"},
                {"id": "b", "kind": "noop", "depends_on": ["a"], "spec": {"args": ["${steps.a.nope}"]}}]}),
                "unknown step field \"nope\"",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop", "spec": {"args": ["${item}"]}}]}),
                "item exists only in a for_each step",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "gate"}]}),
                "steps[0].condition: a gate needs a condition",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "gate", "condition": "params.z == 1"}]}),
                "steps[0].condition: unknown param \"z\"",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "gate", "condition": "1 +"}]}),
                "condition",
            ),
            (
                json!({"name": "p", "steps": [{"id": "A", "kind": "noop"}]}),
                "steps[0].id",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "files", "artifacts": ["../x"]}]}),
                "steps[0].artifacts[0]",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop", "artifacts": ["x"]}]}),
                "steps[0].artifacts: a noop step keeps and takes no files",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "files", "spec": {"inputs": []}}]}),
                "steps[0].spec.inputs",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "files"},
                {"id": "b", "kind": "files", "depends_on": ["a"], "inputs": [{"step": "a", "path": "x"}]}]}),
                "steps[1].inputs[0].path: step \"a\" declares no artifact",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "files", "artifacts": ["x"]},
                {"id": "b", "kind": "files", "artifacts": ["x"]},
                {"id": "c", "kind": "files", "depends_on": ["a", "b"],
                 "inputs": [{"step": "a", "path": "x"}, {"step": "b", "path": "x"}]}]}),
                "steps[2].inputs[1]: another input is placed at \"x\"",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop", "for_each": "x${params.l}"}],
                "params": [{"name": "l", "type": "list", "default": []}]}),
                "steps[0].for_each: must be one template",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop", "for_each": "${item}"}]}),
                "steps[0].for_each: item exists only",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop", "retry": {"max_attempts": 0}}]}),
                "steps[0].retry.max_attempts",
            ),
            (
                json!({"name": "p", "params": [{"name": "n", "type": "int", "default": "x"}],
                "steps": [{"id": "a", "kind": "noop"}]}),
                "params[0].default: is not of type int",
            ),
            (
                json!({"name": "p", "steps": []}),
                "steps: a pipeline needs at least one step",
            ),
            (
                json!({"name": "p", "steps": [{"id": "a", "kind": "noop", "extra": 1}]}),
                "steps[0].extra: unknown field `extra`",
            ),
        ];
        for (def, expected) in cases {
            let message = error(def.clone());
            assert!(
                message.contains(expected),
                "{def}\n  got: {message}\n  want: {expected}"
            );
        }
    }

    #[test]
    fn templated_specs_are_checked_once_rendered() {
        // `n` would be refused as a string by a strict kind; with a template
        // the check waits for the rendered value.
        check(json!({"name": "p", "params": [{"name": "n", "type": "any", "default": 1}],
            "steps": [{"id": "a", "kind": "noop", "spec": {"n": "${params.n}", "zz": "${params.n}"}}]}))
        .unwrap();
    }

    #[test]
    fn params_resolve_with_defaults_and_types() {
        let def = check(json!({"name": "p", "params": [
            {"name": "a", "type": "int"}, {"name": "b", "type": "string", "default": "x"}],
            "steps": [{"id": "s", "kind": "noop"}]}))
        .unwrap()
        .def;
        let given = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(
            Value::Object(resolve_params(&def, &given(json!({"a": 2}))).unwrap()),
            json!({"a": 2, "b": "x"})
        );
        assert!(resolve_params(&def, &given(json!({})))
            .unwrap_err()
            .to_string()
            .contains("params.a: is required"));
        assert!(resolve_params(&def, &given(json!({"a": "2"})))
            .unwrap_err()
            .to_string()
            .contains("int"));
        assert!(resolve_params(&def, &given(json!({"a": 1, "c": 1})))
            .unwrap_err()
            .to_string()
            .contains("params.c: unknown"));
    }
}
