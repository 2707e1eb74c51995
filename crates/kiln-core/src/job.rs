use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Millis;

/// Strict between levels, FIFO within one.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Critical,
    High,
    #[default]
    Default,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Default,
        Priority::Low,
    ];

    /// The stored rank: lower runs first.
    pub fn rank(self) -> i16 {
        match self {
            Priority::Critical => 0,
            Priority::High => 1,
            Priority::Default => 2,
            Priority::Low => 3,
        }
    }

    pub fn from_rank(rank: i16) -> Priority {
        match rank {
            0 => Priority::Critical,
            1 => Priority::High,
            3 => Priority::Low,
            _ => Priority::Default,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Default => "default",
            Priority::Low => "low",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Ready to run now.
    Queued,
    /// Waiting for its `run_at` (a delayed job or a retry in backoff).
    Scheduled,
    Running,
    Succeeded,
    /// Failed permanently: no retry was attempted.
    Failed,
    Cancelled,
    /// Failed on every allowed attempt.
    Dead,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Queued,
        JobStatus::Scheduled,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Scheduled => "scheduled",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Dead => "dead",
        }
    }

    pub fn parse(text: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled | JobStatus::Dead
        )
    }

    /// Terminal states a job can be retried from by hand.
    pub fn is_retryable_by_hand(self) -> bool {
        matches!(
            self,
            JobStatus::Failed | JobStatus::Cancelled | JobStatus::Dead
        )
    }
}

/// Exponential backoff with equal jitter: half the delay is fixed, half random.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    pub base_ms: i64,
    pub max_ms: i64,
    pub jitter: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base_ms: 1_000,
            max_ms: 300_000,
            jitter: true,
        }
    }
}

impl Backoff {
    /// Delay before the run that follows failed attempt `failures` (1-based).
    /// `random` is in `[0, 1)`; it is passed in so this stays pure.
    pub fn delay_ms(&self, failures: i32, random: f64) -> i64 {
        let exponent = failures.saturating_sub(1).clamp(0, 40) as u32;
        let raw = self.base_ms.saturating_mul(1_i64 << exponent.min(40));
        let capped = raw.min(self.max_ms).max(0);
        if self.jitter {
            let half = capped / 2;
            let spread = ((capped - half) as f64 * random.clamp(0.0, 1.0)) as i64;
            half.saturating_add(spread).min(capped)
        } else {
            capped
        }
    }
}

/// What one run of a sandbox produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: i64,
    /// True when stdout or stderr went past the cap and the rest was dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Files the attempt kept (the spec's `outputs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<crate::files::FileRef>,
}

/// One finished attempt, kept in the job's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AttemptRecord {
    pub attempt: i32,
    pub worker_id: Option<String>,
    pub started_at: Option<Millis>,
    pub finished_at: Millis,
    /// `succeeded`, `failed`, `timeout`, `cancelled` or `lost` (the lease expired).
    pub outcome: String,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: Option<i64>,
}

/// A job as the store holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: i64,
    pub tenant: String,
    pub kind: String,
    pub queue: String,
    pub priority: Priority,
    pub status: JobStatus,
    pub spec: serde_json::Value,
    pub labels: BTreeMap<String, String>,
    /// Leases taken so far; the fencing token. It never goes backwards.
    pub attempt: i32,
    /// Attempts allowed, counted from `retry_from`: the job may run while
    /// `attempt - retry_from < max_attempts`.
    pub max_attempts: i32,
    /// Where the count of attempts used starts. It moves to `attempt` when the
    /// job is retried by hand, and up by one when a stopping worker hands a
    /// lease back, so neither costs an attempt while `attempt` stays a
    /// fencing token that only grows.
    pub retry_from: i32,
    pub timeout_ms: i64,
    pub backoff: Backoff,
    pub permanent_exit_codes: Vec<i32>,
    pub idempotency_key: Option<String>,
    pub run_at: Millis,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub lease_expires_at: Option<Millis>,
    pub worker_id: Option<String>,
    pub cancel_requested: bool,
    pub result: Option<JobResult>,
    pub error: Option<String>,
    pub history: Vec<AttemptRecord>,
}

impl Job {
    /// A scheduled job whose time has come is, to a reader, queued.
    pub fn visible_status(&self, now: Millis) -> JobStatus {
        if self.status == JobStatus::Scheduled && self.run_at <= now {
            JobStatus::Queued
        } else {
            self.status
        }
    }
}

/// A job the worker holds a lease on: `attempt` is its fencing token.
#[derive(Clone, Debug, PartialEq)]
pub struct LeasedJob {
    pub id: i64,
    pub tenant: String,
    pub kind: String,
    pub queue: String,
    pub priority: Priority,
    pub spec: serde_json::Value,
    pub attempt: i32,
    pub max_attempts: i32,
    pub retry_from: i32,
    pub timeout_ms: i64,
    pub backoff: Backoff,
    pub permanent_exit_codes: Vec<i32>,
    pub run_at: Millis,
    pub created_at: Millis,
    pub started_at: Millis,
    /// The pipeline run this job is a step of.
    pub run_id: Option<i64>,
}

/// Limits on what a caller may ask for.
pub mod limits {
    pub const NAME_MAX: usize = 64;
    pub const LABELS_MAX: usize = 32;
    pub const LABEL_VALUE_MAX: usize = 256;
    pub const IDEMPOTENCY_KEY_MAX: usize = 256;
    pub const MAX_ATTEMPTS_MAX: i32 = 100;
    pub const TIMEOUT_MS_MAX: i64 = 24 * 3600 * 1000;
    pub const DEFAULT_TIMEOUT_MS: i64 = 60_000;
    pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
    pub const SPEC_BYTES_MAX: usize = 256 * 1024;
    /// Longest delay before a first run: a year.
    pub const DELAY_MS_MAX: i64 = 366 * 24 * 3600 * 1000;
    /// Latest `run_at`: the end of year 9999, so that adding any bounded
    /// delay or backoff to a stored time cannot overflow.
    pub const RUN_AT_MAX: i64 = 253_402_300_799_999;
    /// Longest backoff base or cap: a week.
    pub const BACKOFF_MS_MAX: i64 = 7 * 24 * 3600 * 1000;
    pub const PERMANENT_EXIT_CODES_MAX: usize = 256;
    pub const TENANT_MAX: usize = 256;
}

/// `now + delay_ms`, for a delay a caller asked for: refused when negative or
/// longer than [`limits::DELAY_MS_MAX`], so the sum never overflows.
pub fn run_at_after(now: crate::Millis, delay_ms: i64) -> Result<crate::Millis, InvalidJob> {
    if !(0..=limits::DELAY_MS_MAX).contains(&delay_ms) {
        return Err(invalid(format!(
            "delay_ms must be 0 to {}",
            limits::DELAY_MS_MAX
        )));
    }
    Ok(now.saturating_add(delay_ms))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidJob {
    /// {0}
    #[error("{0}")]
    Field(String),
}

fn invalid(message: impl Into<String>) -> InvalidJob {
    InvalidJob::Field(message.into())
}

fn text(what: &str, value: &str, max_bytes: usize) -> Result<(), InvalidJob> {
    crate::names::check_text(what, value, max_bytes).map_err(|e| invalid(e.to_string()))
}

/// Kinds, queue names and label keys (see [`crate::names::check_name`]).
pub fn validate_name(what: &str, name: &str) -> Result<(), InvalidJob> {
    crate::names::check_name(what, name).map_err(|e| invalid(e.to_string()))
}

/// A job as a caller asks for it, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    pub tenant: String,
    pub kind: String,
    pub queue: String,
    pub priority: Priority,
    pub spec: serde_json::Value,
    pub labels: BTreeMap<String, String>,
    pub max_attempts: i32,
    pub timeout_ms: i64,
    pub backoff: Backoff,
    pub permanent_exit_codes: Vec<i32>,
    pub idempotency_key: Option<String>,
    /// When it may first run; `None` means now.
    pub run_at: Option<crate::Millis>,
}

impl NewJob {
    pub fn new(tenant: &str, kind: &str, spec: serde_json::Value) -> NewJob {
        NewJob {
            tenant: tenant.to_string(),
            kind: kind.to_string(),
            queue: "default".to_string(),
            priority: Priority::Default,
            spec,
            labels: BTreeMap::new(),
            max_attempts: limits::DEFAULT_MAX_ATTEMPTS,
            timeout_ms: limits::DEFAULT_TIMEOUT_MS,
            backoff: Backoff::default(),
            permanent_exit_codes: Vec::new(),
            idempotency_key: None,
            run_at: None,
        }
    }

    pub fn validate(&self) -> Result<(), InvalidJob> {
        text("tenant", &self.tenant, limits::TENANT_MAX)?;
        validate_name("kind", &self.kind)?;
        validate_name("queue", &self.queue)?;
        if !(1..=limits::MAX_ATTEMPTS_MAX).contains(&self.max_attempts) {
            return Err(invalid(format!(
                "max_attempts must be 1 to {}",
                limits::MAX_ATTEMPTS_MAX
            )));
        }
        if !(1..=limits::TIMEOUT_MS_MAX).contains(&self.timeout_ms) {
            return Err(invalid(format!(
                "timeout_ms must be 1 to {}",
                limits::TIMEOUT_MS_MAX
            )));
        }
        if self.backoff.base_ms < 0
            || self.backoff.max_ms < self.backoff.base_ms
            || self.backoff.max_ms > limits::BACKOFF_MS_MAX
        {
            return Err(invalid(format!(
                "backoff needs 0 <= base_ms <= max_ms <= {}",
                limits::BACKOFF_MS_MAX
            )));
        }
        if let Some(run_at) = self.run_at {
            if !(0..=limits::RUN_AT_MAX).contains(&run_at) {
                return Err(invalid("run_at must be between 1970 and 9999"));
            }
        }
        if self.permanent_exit_codes.len() > limits::PERMANENT_EXIT_CODES_MAX {
            return Err(invalid(format!(
                "at most {} permanent_exit_codes",
                limits::PERMANENT_EXIT_CODES_MAX
            )));
        }
        if self.labels.len() > limits::LABELS_MAX {
            return Err(invalid(format!("at most {} labels", limits::LABELS_MAX)));
        }
        for (key, value) in &self.labels {
            validate_name("label key", key)?;
            text("label value", value, limits::LABEL_VALUE_MAX)?;
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() {
                return Err(invalid("idempotency_key must not be empty"));
            }
            text("idempotency_key", key, limits::IDEMPOTENCY_KEY_MAX)?;
        }
        if !self.spec.is_object() {
            return Err(invalid("spec must be a JSON object"));
        }
        if crate::names::json_has_nul(&self.spec) {
            return Err(invalid("spec contains a NUL character"));
        }
        if self.spec.to_string().len() > limits::SPEC_BYTES_MAX {
            return Err(invalid(format!(
                "spec is larger than {} bytes",
                limits::SPEC_BYTES_MAX
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_backoff(backoff: Backoff, failures: i32, random: f64, expect: i64) {
        assert_eq!(
            backoff.delay_ms(failures, random),
            expect,
            "{failures} {random}"
        );
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let fixed = Backoff {
            base_ms: 100,
            max_ms: 1_000,
            jitter: false,
        };
        check_backoff(fixed, 1, 0.5, 100);
        check_backoff(fixed, 2, 0.5, 200);
        check_backoff(fixed, 4, 0.5, 800);
        check_backoff(fixed, 5, 0.5, 1_000);
        check_backoff(fixed, 90, 0.5, 1_000);
        let jittered = Backoff {
            jitter: true,
            ..fixed
        };
        check_backoff(jittered, 3, 0.0, 200);
        check_backoff(jittered, 3, 0.999_999, 399);
    }

    #[test]
    fn validation_names_the_field() {
        let mut job = NewJob::new("t", "wasm", serde_json::json!({}));
        assert!(job.validate().is_ok());
        job.queue = "bad queue".into();
        assert!(job.validate().unwrap_err().to_string().contains("queue"));
        job.queue = "default".into();
        job.max_attempts = 0;
        assert!(job
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_attempts"));
        job.max_attempts = 1;
        job.spec = serde_json::json!([1]);
        assert!(job.validate().unwrap_err().to_string().contains("spec"));
    }

    fn check_refused(edit: impl FnOnce(&mut NewJob), field: &str) {
        let mut job = NewJob::new("t", "wasm", serde_json::json!({}));
        edit(&mut job);
        let error = job.validate().expect_err(field).to_string();
        assert!(error.contains(field), "{error:?} should name {field}");
    }

    #[test]
    fn numbers_are_bounded_and_text_has_no_nul() {
        check_refused(|j| j.tenant = "a\0".into(), "tenant");
        check_refused(|j| j.kind = "a\0".into(), "kind");
        check_refused(|j| j.queue = "q\0".into(), "queue");
        check_refused(
            |j| {
                j.labels.insert("k".into(), "v\0".into());
            },
            "label value",
        );
        check_refused(
            |j| j.idempotency_key = Some("k\0".into()),
            "idempotency_key",
        );
        check_refused(|j| j.spec = serde_json::json!({"a": "\u{0}"}), "spec");
        check_refused(|j| j.spec = serde_json::json!({"a\u{0}": 1}), "spec");
        check_refused(|j| j.run_at = Some(i64::MAX), "run_at");
        check_refused(|j| j.run_at = Some(-1), "run_at");
        check_refused(|j| j.backoff.max_ms = i64::MAX, "backoff");
        check_refused(
            |j| j.permanent_exit_codes = vec![1; 1_000],
            "permanent_exit_codes",
        );
        assert!(run_at_after(1, i64::MAX).is_err());
        assert!(run_at_after(1, -1).is_err());
        assert_eq!(run_at_after(1, 5), Ok(6));
        let widest = Backoff {
            base_ms: limits::BACKOFF_MS_MAX,
            max_ms: limits::BACKOFF_MS_MAX,
            jitter: true,
        };
        assert!(widest.delay_ms(i32::MAX, 0.999) <= limits::BACKOFF_MS_MAX);
    }

    #[test]
    fn statuses_round_trip() {
        for status in JobStatus::ALL {
            assert_eq!(JobStatus::parse(status.as_str()), Some(status));
        }
        for priority in Priority::ALL {
            assert_eq!(Priority::from_rank(priority.rank()), priority);
        }
    }
}
