//! What a run does next: the pure rules the store applies in the same
//! transaction that records a step's end. Given each step's state, [`decide`]
//! says which steps start and which are skipped, and whether the run is over;
//! [`StepState::instance_ended`] folds one instance's end into its step.

use serde::{Deserialize, Serialize};

use crate::def::{Checked, When};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Waiting for its dependencies.
    Pending,
    /// Its jobs are queued or running.
    Running,
    /// An approval waiting for its decision.
    Waiting,
    Succeeded,
    Failed,
    /// Never ran: its dependencies ended in a way its `when` does not run on,
    /// or the run stopped first.
    Skipped,
    Cancelled,
}

impl StepStatus {
    pub const ALL: [StepStatus; 7] = [
        StepStatus::Pending,
        StepStatus::Running,
        StepStatus::Waiting,
        StepStatus::Succeeded,
        StepStatus::Failed,
        StepStatus::Skipped,
        StepStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Waiting => "waiting",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<StepStatus> {
        StepStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_settled(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded
                | StepStatus::Failed
                | StepStatus::Skipped
                | StepStatus::Cancelled
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Waiting for a slot under the pipeline's run concurrency.
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 5] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

/// One step of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepState {
    pub status: StepStatus,
    /// Instances made (1, or one per `for_each` item).
    pub total: u32,
    pub succeeded: u32,
    pub failed: u32,
}

impl StepState {
    pub fn pending() -> StepState {
        StepState {
            status: StepStatus::Pending,
            total: 0,
            succeeded: 0,
            failed: 0,
        }
    }

    /// A step whose instances were just made: with none (an empty
    /// `for_each`) it has nothing to wait for and has succeeded.
    pub fn started(total: u32) -> StepState {
        StepState {
            status: if total == 0 {
                StepStatus::Succeeded
            } else {
                StepStatus::Running
            },
            total,
            succeeded: 0,
            failed: 0,
        }
    }

    /// Folds the end of one instance in; the step settles with its last
    /// instance, failed if any instance failed.
    pub fn instance_ended(&mut self, ok: bool) {
        if self.status != StepStatus::Running {
            return;
        }
        if ok {
            self.succeeded += 1;
        } else {
            self.failed += 1;
        }
        if self.succeeded + self.failed >= self.total {
            self.status = if self.failed == 0 {
                StepStatus::Succeeded
            } else {
                StepStatus::Failed
            };
        }
    }
}

/// How the run is going, which decides what may still start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// A gate said no: only steps that run on failure or always may start.
    Stopping,
    /// Cancelled: nothing starts.
    Cancelling,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Steps to start now (in dependency order).
    pub start: Vec<usize>,
    /// Steps that will never run.
    pub skip: Vec<usize>,
    /// The run's end, when every step is settled after this decision.
    pub finished: Option<RunStatus>,
}

/// Walks the steps in dependency order: a pending step whose dependencies
/// have all settled starts or is skipped by its `when`; skips cascade in the
/// same pass. Starting a step settles nothing (gates are evaluated by the
/// caller, which decides again afterwards).
pub fn decide(checked: &Checked, states: &[StepState], mode: Mode) -> Decision {
    let steps = &checked.def.steps;
    let index: std::collections::HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let mut status: Vec<StepStatus> = states.iter().map(|s| s.status).collect();
    let mut decision = Decision::default();
    for &i in &checked.order {
        if status[i] != StepStatus::Pending {
            continue;
        }
        let deps: Vec<StepStatus> = steps[i]
            .depends_on
            .iter()
            .map(|d| status[index[d.as_str()]])
            .collect();
        if !deps.iter().all(|s| s.is_settled()) {
            if mode == Mode::Cancelling {
                status[i] = StepStatus::Skipped;
                decision.skip.push(i);
            }
            continue;
        }
        let upstream_ok = deps.iter().all(|s| *s == StepStatus::Succeeded);
        let runs = match steps[i].when {
            When::Success => upstream_ok,
            When::Failure => !upstream_ok,
            When::Always => true,
        };
        let allowed = match mode {
            Mode::Normal => true,
            Mode::Stopping => steps[i].when != When::Success,
            Mode::Cancelling => false,
        };
        if runs && allowed {
            status[i] = StepStatus::Running;
            decision.start.push(i);
        } else {
            status[i] = StepStatus::Skipped;
            decision.skip.push(i);
        }
    }
    if status.iter().all(|s| s.is_settled()) {
        decision.finished = Some(final_status(&status, mode));
    }
    decision
}

/// A run that settled: cancelled if it was cancelled, failed if any step
/// failed (a failure handled by a `when: failure` step still fails the run,
/// as the work it guards did not happen), else succeeded.
pub fn final_status(status: &[StepStatus], mode: Mode) -> RunStatus {
    if mode == Mode::Cancelling {
        RunStatus::Cancelled
    } else if mode == Mode::Stopping
        || status
            .iter()
            .any(|s| matches!(s, StepStatus::Failed | StepStatus::Cancelled))
    {
        RunStatus::Failed
    } else {
        RunStatus::Succeeded
    }
}

/// Retrying a failed run: steps that did not succeed go back to pending
/// (their succeeded instances are kept by the caller); succeeded steps stay.
pub fn reset_for_retry(states: &mut [StepState]) -> Vec<usize> {
    let mut reset = Vec::new();
    for (i, state) in states.iter_mut().enumerate() {
        if state.status != StepStatus::Succeeded {
            *state = StepState::pending();
            reset.push(i);
        }
    }
    reset
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::def::PipelineDef;
    use serde_json::json;

    fn checked(steps: serde_json::Value) -> Checked {
        let mut kinds = kiln_core::JobKinds::new();
        kinds.add("noop", |_| Ok(()));
        PipelineDef::from_json(json!({"name": "p", "steps": steps}), &kinds).unwrap()
    }

    fn states(list: &[StepStatus]) -> Vec<StepState> {
        list.iter()
            .map(|&status| StepState {
                status,
                ..StepState::started(1)
            })
            .collect()
    }

    use StepStatus::*;

    #[test]
    fn a_diamond_starts_roots_then_joins() {
        let c = checked(json!([
            {"id": "a", "kind": "noop"},
            {"id": "b", "kind": "noop", "depends_on": ["a"]},
            {"id": "c", "kind": "noop", "depends_on": ["a"]},
            {"id": "d", "kind": "noop", "depends_on": ["b", "c"]},
        ]));
        let d = decide(
            &c,
            &states(&[Pending, Pending, Pending, Pending]),
            Mode::Normal,
        );
        assert_eq!(d.start, vec![0]);
        let d = decide(
            &c,
            &states(&[Succeeded, Pending, Pending, Pending]),
            Mode::Normal,
        );
        assert_eq!(d.start, vec![1, 2]);
        let d = decide(
            &c,
            &states(&[Succeeded, Succeeded, Running, Pending]),
            Mode::Normal,
        );
        assert!(d.start.is_empty() && d.finished.is_none());
        let d = decide(
            &c,
            &states(&[Succeeded, Succeeded, Succeeded, Pending]),
            Mode::Normal,
        );
        assert_eq!(d.start, vec![3]);
        let d = decide(&c, &states(&[Succeeded; 4]), Mode::Normal);
        assert_eq!(d.finished, Some(RunStatus::Succeeded));
    }

    #[test]
    fn failure_skips_dependants_but_runs_handlers_and_cleanup() {
        let c = checked(json!([
            {"id": "a", "kind": "noop"},
            {"id": "b", "kind": "noop", "depends_on": ["a"]},
            {"id": "c", "kind": "noop", "depends_on": ["b"]},
            {"id": "on_fail", "kind": "noop", "depends_on": ["a"], "when": "failure"},
            {"id": "cleanup", "kind": "noop", "depends_on": ["c"], "when": "always"},
        ]));
        let d = decide(
            &c,
            &states(&[Failed, Pending, Pending, Pending, Pending]),
            Mode::Normal,
        );
        assert_eq!(d.skip, vec![1, 2]);
        assert_eq!(d.start, vec![3, 4]);
        let d = decide(
            &c,
            &states(&[Failed, Skipped, Skipped, Succeeded, Succeeded]),
            Mode::Normal,
        );
        assert_eq!(d.finished, Some(RunStatus::Failed));
        // All well: the failure handler is skipped and the run succeeds.
        let d = decide(
            &c,
            &states(&[Succeeded, Succeeded, Succeeded, Pending, Pending]),
            Mode::Normal,
        );
        assert_eq!((d.start, d.skip), (vec![4], vec![3]));
        let d = decide(
            &c,
            &states(&[Succeeded, Succeeded, Succeeded, Skipped, Succeeded]),
            Mode::Normal,
        );
        assert_eq!(d.finished, Some(RunStatus::Succeeded));
    }

    #[test]
    fn stopping_and_cancelling() {
        let c = checked(json!([
            {"id": "a", "kind": "noop"},
            {"id": "b", "kind": "noop"},
            {"id": "c", "kind": "noop", "depends_on": ["a"]},
            {"id": "cleanup", "kind": "noop", "depends_on": ["a"], "when": "always"},
        ]));
        let d = decide(
            &c,
            &states(&[Succeeded, Pending, Pending, Pending]),
            Mode::Stopping,
        );
        assert_eq!((d.start, d.skip.clone()), (vec![3], vec![1, 2]));
        let d = decide(
            &c,
            &states(&[Running, Pending, Pending, Pending]),
            Mode::Cancelling,
        );
        assert_eq!(d.skip, vec![1, 2, 3]);
        assert_eq!(d.finished, None, "a is still running");
        let d = decide(
            &c,
            &states(&[Cancelled, Skipped, Skipped, Skipped]),
            Mode::Cancelling,
        );
        assert_eq!(d.finished, Some(RunStatus::Cancelled));
    }

    #[test]
    fn instances_settle_their_step() {
        let mut s = StepState::started(3);
        s.instance_ended(true);
        s.instance_ended(true);
        assert_eq!(s.status, Running);
        s.instance_ended(false);
        assert_eq!((s.status, s.succeeded, s.failed), (Failed, 2, 1));
        assert_eq!(StepState::started(0).status, Succeeded);
        let mut all = vec![s, StepState::started(0), StepState::pending()];
        assert_eq!(reset_for_retry(&mut all), vec![0, 2]);
        assert_eq!(all[0], StepState::pending());
    }
}
