//! The job kinds a deployment knows, each with the pure check of its spec.
//! The API refuses a job whose kind is not here, or whose spec its kind
//! refuses, before the insert: a bad spec is a 4xx at submit, never a
//! failure at run time. Each sandbox crate exports its checks; the binary
//! gathers them, so `kiln api` validates `vm` specs without booting a VM.

use std::collections::{BTreeMap, BTreeSet};

/// Checks one kind's spec: unknown fields refused, every number bounded,
/// every name in its grammar. No I/O.
pub type CheckSpec = fn(&serde_json::Value) -> Result<(), String>;

/// Where a job of a kind must run, read from its (checked) spec: the kind
/// it is stored under instead, which only one host handles (a command for a
/// VM goes to the host that owns the VM). `None`: any worker of the kind.
pub type RouteSpec = fn(&str, &serde_json::Value) -> Option<String>;

/// A kind's values of [`POLICY_FIELDS`] for a (checked) spec, with the
/// kind's defaults filled in, so an admission policy sees what will run.
pub type DescribeSpec = fn(&serde_json::Value) -> serde_json::Map<String, serde_json::Value>;

/// The fields of a spec admission policies read at the top of `job`.
pub const POLICY_FIELDS: [&str; 5] = ["image", "memory_mib", "vcpus", "network", "secrets"];

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
    /// Kinds whose specs take `secrets` (names delivered as files).
    secrets: BTreeSet<String>,
    routes: BTreeMap<String, RouteSpec>,
    describers: BTreeMap<String, DescribeSpec>,
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

    /// Marks `kind` as one whose sandbox is given the `secrets` its spec
    /// names.
    pub fn with_secrets(&mut self, kind: &str) -> &mut JobKinds {
        self.secrets.insert(kind.to_string());
        self
    }

    pub fn takes_secrets(&self, kind: &str) -> bool {
        self.secrets.contains(kind)
    }

    /// Marks `kind` as bound to a host its spec names (see [`RouteSpec`]).
    pub fn add_routed(&mut self, kind: &str, check: CheckSpec, route: RouteSpec) -> &mut JobKinds {
        self.routes.insert(kind.to_string(), route);
        self.add(kind, check)
    }

    /// The kind a checked job is stored under: its own, or the host-bound
    /// kind its spec routes it to.
    pub fn stored_kind(&self, kind: &str, spec: &serde_json::Value) -> String {
        self.routes
            .get(kind)
            .and_then(|route| route(kind, spec))
            .unwrap_or_else(|| kind.to_string())
    }

    /// Gives `kind` a [`DescribeSpec`] (kinds without one show the spec's
    /// own fields).
    pub fn add_described(&mut self, kind: &str, describe: DescribeSpec) -> &mut JobKinds {
        self.describers.insert(kind.to_string(), describe);
        self
    }

    /// The values of [`POLICY_FIELDS`] a job of `kind` runs with: those its
    /// spec names, overridden by the kind's describer where it has one.
    pub fn describe(
        &self,
        kind: &str,
        spec: &serde_json::Value,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut fields: serde_json::Map<String, serde_json::Value> = POLICY_FIELDS
            .iter()
            .filter_map(|f| spec.get(*f).map(|v| (f.to_string(), v.clone())))
            .collect();
        if let Some(describe) = self.describers.get(kind) {
            fields.extend(describe(spec));
        }
        fields
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

    #[test]
    fn routed_kinds_are_stored_under_the_kind_their_spec_names() {
        fn to_host(kind: &str, spec: &serde_json::Value) -> Option<String> {
            spec["host"].as_str().map(|host| format!("{kind}@{host}"))
        }
        let mut kinds = JobKinds::new();
        kinds.add("noop", only_objects);
        kinds.add_routed("task", only_objects, to_host);
        let spec = serde_json::json!({"host": "h1"});
        assert_eq!(kinds.stored_kind("task", &spec), "task@h1");
        assert_eq!(kinds.stored_kind("task", &serde_json::json!({})), "task");
        assert_eq!(kinds.stored_kind("noop", &spec), "noop");
    }
}
