//! kiln's model: jobs, priorities, statuses, retry policy and the decisions
//! that move a job from one state to the next.
//!
//! This crate does no I/O, so nothing in it can fail for outside reasons. The
//! store applies the transitions decided here; the API and the worker speak in
//! these types.

pub mod audit;
pub mod files;
pub mod job;
pub mod keys;
pub mod kinds;
pub mod names;
pub mod quota;
pub mod redact;
pub mod retry;
pub mod secrets;
pub mod users;

pub use job::*;
pub use keys::{Scope, Scopes};
pub use kinds::{CheckSpec, JobKinds, SpecError};
pub use quota::{QuotaExceeded, TenantQuotas};
pub use retry::{decide_outcome, AttemptEnd, Outcome};

/// Milliseconds since the Unix epoch; the only clock unit kiln stores.
pub type Millis = i64;
