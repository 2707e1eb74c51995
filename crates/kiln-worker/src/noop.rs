//! `noop`: a built-in diagnostic kind that runs no sandbox. It exists so the
//! queue can be exercised and benchmarked on its own: it can sleep, print and
//! exit with a chosen code, fail its first attempts (a job that heals once
//! retried), and it obeys kill like any sandbox.

use std::time::{Duration, Instant};

use kiln_core::{AttemptEnd, JobResult, LeasedJob};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::JobHandler;

/// Longest a noop job may sleep: the longest job timeout.
pub const SLEEP_MS_MAX: u64 = kiln_core::limits::TIMEOUT_MS_MAX as u64;
/// Longest text a noop job may print.
pub const STDOUT_MAX: usize = 64 * 1024;

/// A noop job's spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopSpec {
    #[serde(default)]
    pub sleep_ms: u64,
    #[serde(default)]
    pub exit_code: i32,
    #[serde(default)]
    pub stdout: String,
    /// Attempts up to this number fail with exit code 1, whatever
    /// `exit_code` says.
    #[serde(default)]
    pub fail_attempts: u32,
}

impl NoopSpec {
    pub fn parse(spec: &serde_json::Value) -> Result<NoopSpec, String> {
        if !spec.is_object() {
            return Err("spec must be a JSON object".into());
        }
        let parsed = NoopSpec::deserialize(spec).map_err(|e| e.to_string())?;
        if parsed.sleep_ms > SLEEP_MS_MAX {
            return Err(format!("sleep_ms must be at most {SLEEP_MS_MAX}"));
        }
        if parsed.stdout.len() > STDOUT_MAX {
            return Err(format!("stdout must be at most {STDOUT_MAX} bytes"));
        }
        Ok(parsed)
    }
}

/// The `noop` kind's spec check for the kind registry: unknown fields are
/// refused and every number is bounded.
pub fn check_spec(spec: &serde_json::Value) -> Result<(), String> {
    NoopSpec::parse(spec).map(|_| ())
}

pub struct NoopHandler;

#[async_trait::async_trait]
impl JobHandler for NoopHandler {
    async fn run(&self, job: &LeasedJob, kill: CancellationToken) -> AttemptEnd {
        let started = Instant::now();
        let spec = match NoopSpec::parse(&job.spec) {
            Ok(spec) => spec,
            Err(error) => {
                return AttemptEnd::Failed {
                    result: None,
                    error: format!("invalid noop spec: {error}"),
                    permanent: true,
                }
            }
        };
        if spec.sleep_ms > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(spec.sleep_ms)) => {}
                _ = kill.cancelled() => {
                    return AttemptEnd::Failed { result: None, error: "killed".into(), permanent: false };
                }
            }
        }
        let fails = i64::from(job.attempt) <= i64::from(spec.fail_attempts);
        let result = JobResult {
            exit_code: if fails { 1 } else { spec.exit_code },
            stdout: spec.stdout,
            stderr: String::new(),
            duration_ms: started.elapsed().as_millis().min(i64::MAX as u128) as i64,
            truncated: false,
            ..Default::default()
        };
        if result.exit_code == 0 {
            AttemptEnd::Succeeded(result)
        } else {
            AttemptEnd::Failed {
                error: format!("exit code {}", result.exit_code),
                result: Some(result),
                permanent: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(spec: serde_json::Value, ok: bool) {
        assert_eq!(check_spec(&spec).is_ok(), ok, "{spec}");
    }

    #[test]
    fn specs_are_checked() {
        check(json!({}), true);
        check(
            json!({"sleep_ms": 10, "exit_code": 3, "stdout": "hi"}),
            true,
        );
        check(json!({"sleep": 10}), false);
        check(json!({"sleep_ms": -1}), false);
        check(json!({"sleep_ms": SLEEP_MS_MAX + 1}), false);
        check(json!({"exit_code": i64::MAX}), false);
        check(json!({"stdout": "x".repeat(STDOUT_MAX + 1)}), false);
        check(json!({"fail_attempts": 2}), true);
        check(json!({"fail_attempts": -2}), false);
        check(json!([1]), false);
    }
}
