//! What happens to a job when an attempt ends.

use crate::{JobResult, JobStatus, LeasedJob, Millis};

/// How an attempt ended, as the worker saw it.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptEnd {
    Succeeded(JobResult),
    /// The sandbox ran and reported failure (a non-zero exit, a trap, a
    /// limit). `permanent` failures skip the remaining attempts.
    Failed {
        result: Option<JobResult>,
        error: String,
        permanent: bool,
    },
    /// The attempt ran past its timeout and was killed.
    TimedOut {
        result: Option<JobResult>,
    },
    /// Cancelled through the API while it ran.
    Cancelled,
}

impl AttemptEnd {
    pub fn label(&self) -> &'static str {
        match self {
            AttemptEnd::Succeeded(_) => "succeeded",
            AttemptEnd::Failed { .. } => "failed",
            AttemptEnd::TimedOut { .. } => "timeout",
            AttemptEnd::Cancelled => "cancelled",
        }
    }

    pub fn result(&self) -> Option<&JobResult> {
        match self {
            AttemptEnd::Succeeded(result) => Some(result),
            AttemptEnd::Failed { result, .. } | AttemptEnd::TimedOut { result } => result.as_ref(),
            AttemptEnd::Cancelled => None,
        }
    }

    pub fn error(&self) -> Option<String> {
        match self {
            AttemptEnd::Succeeded(_) => None,
            AttemptEnd::Failed { error, .. } => Some(error.clone()),
            AttemptEnd::TimedOut { .. } => Some("timeout".to_string()),
            AttemptEnd::Cancelled => Some("cancelled".to_string()),
        }
    }
}

/// The job's next state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Run again at this time.
    Retry {
        run_at: Millis,
    },
    /// Failed for good without using the remaining attempts.
    Failed,
    /// Every allowed attempt failed.
    Dead,
    Cancelled,
}

impl Outcome {
    pub fn status(self) -> JobStatus {
        match self {
            Outcome::Succeeded => JobStatus::Succeeded,
            Outcome::Retry { .. } => JobStatus::Scheduled,
            Outcome::Failed => JobStatus::Failed,
            Outcome::Dead => JobStatus::Dead,
            Outcome::Cancelled => JobStatus::Cancelled,
        }
    }
}

/// Decides the job's next state. `random` in `[0, 1)` feeds the jitter.
pub fn decide_outcome(job: &LeasedJob, end: &AttemptEnd, now: Millis, random: f64) -> Outcome {
    match end {
        AttemptEnd::Succeeded(_) => Outcome::Succeeded,
        AttemptEnd::Cancelled => Outcome::Cancelled,
        AttemptEnd::Failed {
            permanent: true, ..
        } => Outcome::Failed,
        AttemptEnd::Failed {
            result: Some(result),
            ..
        } if job.permanent_exit_codes.contains(&result.exit_code) => Outcome::Failed,
        AttemptEnd::Failed { .. } | AttemptEnd::TimedOut { .. } => retry_or_dead(
            job.attempt,
            job.retry_from,
            job.max_attempts,
            job,
            now,
            random,
        ),
    }
}

fn retry_or_dead(
    attempt: i32,
    retry_from: i32,
    max_attempts: i32,
    job: &LeasedJob,
    now: Millis,
    random: f64,
) -> Outcome {
    let used = attempt.saturating_sub(retry_from);
    if used >= max_attempts {
        Outcome::Dead
    } else {
        // Saturating: a stored backoff or time from before the bounds were
        // checked must still give a time, never an overflow.
        Outcome::Retry {
            run_at: now.saturating_add(job.backoff.delay_ms(used, random)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backoff, Priority};

    fn leased(attempt: i32, max_attempts: i32) -> LeasedJob {
        LeasedJob {
            id: 1,
            tenant: "t".into(),
            kind: "noop".into(),
            queue: "default".into(),
            priority: Priority::Default,
            spec: serde_json::json!({}),
            attempt,
            max_attempts,
            retry_from: 0,
            timeout_ms: 1000,
            backoff: Backoff {
                base_ms: 100,
                max_ms: 10_000,
                jitter: false,
            },
            permanent_exit_codes: vec![42],
            run_at: 0,
            created_at: 0,
            started_at: 0,
            run_id: None,
        }
    }

    fn failed(exit_code: i32, permanent: bool) -> AttemptEnd {
        AttemptEnd::Failed {
            result: Some(JobResult {
                exit_code,
                ..JobResult::default()
            }),
            error: format!("exit {exit_code}"),
            permanent,
        }
    }

    fn check(job: LeasedJob, end: AttemptEnd, expect: Outcome) {
        assert_eq!(decide_outcome(&job, &end, 1_000, 0.0), expect, "{end:?}");
    }

    #[test]
    fn outcomes() {
        check(
            leased(1, 3),
            AttemptEnd::Succeeded(JobResult::default()),
            Outcome::Succeeded,
        );
        check(
            leased(1, 3),
            failed(1, false),
            Outcome::Retry { run_at: 1_100 },
        );
        check(
            leased(2, 3),
            failed(1, false),
            Outcome::Retry { run_at: 1_200 },
        );
        check(leased(3, 3), failed(1, false), Outcome::Dead);
        check(leased(1, 3), failed(1, true), Outcome::Failed);
        check(leased(1, 3), failed(42, false), Outcome::Failed);
        check(
            leased(1, 1),
            AttemptEnd::TimedOut { result: None },
            Outcome::Dead,
        );
        check(leased(1, 3), AttemptEnd::Cancelled, Outcome::Cancelled);
        let mut retried = leased(4, 3);
        retried.retry_from = 3;
        check(retried, failed(1, false), Outcome::Retry { run_at: 1_100 });
    }

    #[test]
    fn huge_stored_numbers_do_not_overflow() {
        let mut job = leased(1, 3);
        job.backoff = Backoff {
            base_ms: i64::MAX,
            max_ms: i64::MAX,
            jitter: true,
        };
        let at = decide_outcome(&job, &failed(1, false), i64::MAX - 1, 0.9);
        assert_eq!(at, Outcome::Retry { run_at: i64::MAX });
        let mut job = leased(i32::MAX, 3);
        job.retry_from = i32::MIN;
        assert_eq!(
            decide_outcome(&job, &failed(1, false), 0, 0.0),
            Outcome::Dead
        );
    }
}
