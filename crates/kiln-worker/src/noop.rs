//! `noop`: a built-in diagnostic kind that runs no sandbox. It exists so the
//! queue can be exercised and benchmarked on its own: it can sleep, print and
//! exit with a chosen code, and it obeys kill like any sandbox.

use std::time::{Duration, Instant};

use kiln_core::{AttemptEnd, JobResult, LeasedJob};
use tokio_util::sync::CancellationToken;

use crate::JobHandler;

pub struct NoopHandler;

#[async_trait::async_trait]
impl JobHandler for NoopHandler {
    async fn run(&self, job: &LeasedJob, kill: CancellationToken) -> AttemptEnd {
        let started = Instant::now();
        let spec = &job.spec;
        let sleep_ms = spec.get("sleep_ms").and_then(|v| v.as_u64()).unwrap_or(0);
        if sleep_ms > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
                _ = kill.cancelled() => {
                    return AttemptEnd::Failed { result: None, error: "killed".into(), permanent: false };
                }
            }
        }
        let result = JobResult {
            exit_code: spec.get("exit_code").and_then(|v| v.as_i64()).unwrap_or(0) as i32,
            stdout: spec
                .get("stdout")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string(),
            stderr: String::new(),
            duration_ms: started.elapsed().as_millis() as i64,
            truncated: false,
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
