//! Pipelines and schedules as pure rules: what a definition may say, how
//! templates pull data from params and upstream steps, the gate expression
//! language, when a cron schedule fires, and what a run does next when one
//! of its steps ends. No I/O: the store and the worker call these.

pub mod advance;
pub mod def;
pub mod expr;
pub mod policy;
pub mod schedule;
pub mod target;
pub mod template;
pub mod webhook;

pub use advance::{decide, Decision, Mode, RunStatus, StepState, StepStatus};
pub use def::{Checked, DefError, PipelineDef, StepDef};
pub use expr::Expr;
pub use template::Template;
