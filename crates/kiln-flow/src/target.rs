//! What a schedule (and later a webhook or a rule) starts: a job made from a
//! template, or a run of a pipeline with params.

use std::collections::BTreeMap;

use kiln_core::{Backoff, JobKinds, NewJob, Priority};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::schedule::{CatchUp, CronSpec, Overlap};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTemplate {
    pub kind: String,
    #[serde(default = "empty_object")]
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl JobTemplate {
    pub fn to_job(&self, tenant: &str) -> NewJob {
        let mut job = NewJob::new(tenant, &self.kind, self.spec.clone());
        if let Some(queue) = &self.queue {
            job.queue = queue.clone();
        }
        if let Some(priority) = self.priority {
            job.priority = priority;
        }
        if let Some(max) = self.max_attempts {
            job.max_attempts = max;
        }
        if let Some(timeout) = self.timeout_ms {
            job.timeout_ms = timeout;
        }
        if let Some(backoff) = self.backoff {
            job.backoff = backoff;
        }
        job.labels = self.labels.clone();
        job
    }

    /// The job's own rules and its kind's spec check.
    pub fn check(&self, kinds: &JobKinds) -> Result<(), String> {
        self.to_job("check").validate().map_err(|e| e.to_string())?;
        kinds
            .check(&self.kind, &self.spec)
            .map_err(|e| e.to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineTarget {
    pub name: String,
    #[serde(default)]
    pub params: serde_json::Map<String, Value>,
}

/// `{"job": {...}}` or `{"pipeline": {"name": ..., "params": {...}}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Target {
    Job(JobTemplate),
    Pipeline(PipelineTarget),
}

impl Target {
    pub fn check(&self, kinds: &JobKinds) -> Result<(), String> {
        match self {
            Target::Job(job) => job.check(kinds).map_err(|e| format!("target.job: {e}")),
            Target::Pipeline(p) => kiln_core::names::check_name("target.pipeline.name", &p.name)
                .map_err(|e| e.to_string()),
        }
    }
}

/// A schedule as a client writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleDef {
    pub name: String,
    pub cron: String,
    #[serde(default = "utc")]
    pub timezone: String,
    pub target: Target,
    #[serde(default)]
    pub overlap: Overlap,
    #[serde(default)]
    pub catch_up: CatchUp,
    #[serde(default)]
    pub paused: bool,
}

fn utc() -> String {
    "UTC".into()
}

impl ScheduleDef {
    /// Every rule; the message names the field.
    pub fn check(&self, kinds: &JobKinds) -> Result<CronSpec, String> {
        kiln_core::names::check_name("name", &self.name).map_err(|e| e.to_string())?;
        let spec = CronSpec::parse(&self.cron, &self.timezone).map_err(|e| e.to_string())?;
        self.target.check(kinds)?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schedules_parse_and_check_their_target() {
        let mut kinds = JobKinds::new();
        kinds.add("noop", |_| Ok(()));
        let def: ScheduleDef = serde_json::from_value(json!({
            "name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Berlin",
            "target": {"job": {"kind": "noop", "queue": "night"}}
        }))
        .unwrap();
        def.check(&kinds).unwrap();
        assert_eq!(def.overlap, Overlap::Skip);
        assert_eq!(
            def.target,
            Target::Job(serde_json::from_value(json!({"kind": "noop", "queue": "night"})).unwrap())
        );
        let bad_kind: ScheduleDef = serde_json::from_value(json!({
            "name": "n", "cron": "* * * * *", "target": {"job": {"kind": "nope"}}
        }))
        .unwrap();
        assert!(bad_kind
            .check(&kinds)
            .unwrap_err()
            .contains("target.job: unknown kind"));
        let bad_cron: ScheduleDef = serde_json::from_value(json!({
            "name": "n", "cron": "61 * * * *", "target": {"pipeline": {"name": "p"}}
        }))
        .unwrap();
        assert!(bad_cron.check(&kinds).unwrap_err().contains("minute"));
        assert!(serde_json::from_value::<ScheduleDef>(json!({
            "name": "n", "cron": "* * * * *", "target": {"job": {"kind": "noop"}, "pipeline": {"name": "p"}}
        }))
        .is_err());
    }
}
