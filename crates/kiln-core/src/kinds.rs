//! The job kinds a deployment knows, each with the pure check of its spec.
//! The API refuses a job whose kind is not here, or whose spec its kind
//! refuses, before the insert: a bad spec is a 4xx at submit, never a
//! failure at run time. Each sandbox crate exports its checks; the binary
//! gathers them, so `kiln api` validates `vm` specs without booting a VM.

use std::collections::{BTreeMap, BTreeSet};

/// Checks one kind's spec: unknown fields refused, every number bounded,
/// every name in its grammar. No I/O.
pub type CheckSpec = fn(&serde_json::Value) -> Result<(), String>;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// No kind of that name is known to this deployment.
    #[error("unknown kind {0:?}")]
    UnknownKind(String),
    /// The kind refused the spec; the message names the field.
    #[error("invalid spec: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Default)]
pub struct JobKinds {
    checks: BTreeMap<String, CheckSpec>,
    /// Kinds whose specs take `outputs` and `inputs` (see `crate::files`).
    files: BTreeSet<String>,
}

impl JobKinds {
    pub fn new() -> JobKinds {
        JobKinds::default()
    }

    pub fn add(&mut self, kind: &str, check: CheckSpec) -> &mut JobKinds {
        self.checks.insert(kind.to_string(), check);
        self
    }

    /// A kind whose sandbox takes and keeps files (`outputs`, `inputs`).
    pub fn add_with_files(&mut self, kind: &str, check: CheckSpec) -> &mut JobKinds {
        self.files.insert(kind.to_string());
        self.add(kind, check)
    }

    pub fn takes_files(&self, kind: &str) -> bool {
        self.files.contains(kind)
    }

    pub fn check(&self, kind: &str, spec: &serde_json::Value) -> Result<(), SpecError> {
        let check = self
            .checks
            .get(kind)
            .ok_or_else(|| SpecError::UnknownKind(kind.to_string()))?;
        check(spec).map_err(SpecError::Invalid)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.checks.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only_objects(spec: &serde_json::Value) -> Result<(), String> {
        spec.is_object()
            .then_some(())
            .ok_or_else(|| "spec must be an object".to_string())
    }

    #[test]
    fn unknown_kinds_and_bad_specs_are_refused() {
        let mut kinds = JobKinds::new();
        kinds.add("noop", only_objects);
        assert_eq!(kinds.check("noop", &serde_json::json!({})), Ok(()));
        assert!(matches!(
            kinds.check("noop", &serde_json::json!(1)),
            Err(SpecError::Invalid(_))
        ));
        assert_eq!(
            kinds.check("nope", &serde_json::json!({})),
            Err(SpecError::UnknownKind("nope".into()))
        );
        assert_eq!(kinds.names().collect::<Vec<_>>(), ["noop"]);
    }
}
