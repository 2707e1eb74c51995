//! Admission policies: a tenant's rules over every job it submits, in the
//! expression language of gates ([`crate::expr`]). A job is admitted only
//! when every enabled policy that applies to its kind says `true`; a rule
//! that fails to evaluate (a type error, a bound reached) refuses the job,
//! so a mistake in a rule never lets work through. Pure: the store keeps
//! the policies and the API builds the [`Subject`].

use std::collections::BTreeMap;
use std::fmt;

use kiln_core::names::{check_name, check_text};
use kiln_core::{NewJob, Priority};
use serde_json::{json, Map, Value};

use crate::expr::{Expr, ExprError};

/// Most policies one tenant may hold.
pub const POLICIES_MAX: usize = 100;
/// Longest rule, in bytes.
pub const RULE_MAX: usize = 2048;
/// Longest message, in bytes.
pub const MESSAGE_MAX: usize = 512;
/// Most kinds one policy may name in `applies_to`.
pub const APPLIES_TO_MAX: usize = 32;
/// Evaluation steps all of a tenant's policies may take over one job
/// together: a hundred rules at the language's own bound each would cost a
/// shared API node too much per submission.
pub const ADMIT_STEPS_MAX: u64 = 200_000;
/// A value quoted in a denial is cut to this many bytes.
const SEEN_VALUE_MAX: usize = 120;

/// The fields of a job's spec a policy sees at the top of `job`, when the
/// kind has them (`null` otherwise; `secrets` is then `[]`).
pub const SHAPE_FIELDS: [&str; 5] = kiln_core::kinds::POLICY_FIELDS;

/// One policy, its rule parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub name: String,
    pub rule: Expr,
    pub message: String,
    /// Kinds the policy judges; empty: every kind.
    pub applies_to: Vec<String>,
    pub enabled: bool,
}

/// Why a policy could not be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The rule does not parse; `pos` is a byte offset into it.
    #[error("rule: {0}")]
    Rule(ExprError),
    #[error("{0}")]
    Invalid(String),
}

impl Policy {
    /// Checks every field and parses the rule.
    pub fn new(
        name: &str,
        rule: &str,
        message: &str,
        applies_to: Vec<String>,
        enabled: bool,
    ) -> Result<Policy, PolicyError> {
        let invalid = |e: kiln_core::names::InvalidName| PolicyError::Invalid(e.to_string());
        check_name("policy name", name).map_err(invalid)?;
        check_text("message", message, MESSAGE_MAX).map_err(invalid)?;
        if rule.len() > RULE_MAX {
            return Err(PolicyError::Invalid(format!(
                "rule is {} bytes long; the limit is {RULE_MAX}",
                rule.len()
            )));
        }
        if applies_to.len() > APPLIES_TO_MAX {
            return Err(PolicyError::Invalid(format!(
                "applies_to names at most {APPLIES_TO_MAX} kinds"
            )));
        }
        for kind in &applies_to {
            check_name("applies_to kind", kind).map_err(invalid)?;
        }
        let rule = Expr::parse(rule).map_err(PolicyError::Rule)?;
        Ok(Policy {
            name: name.to_string(),
            rule,
            message: message.to_string(),
            applies_to,
            enabled,
        })
    }

    /// Whether this policy judges jobs of `kind`.
    pub fn applies(&self, kind: &str) -> bool {
        self.enabled && (self.applies_to.is_empty() || self.applies_to.iter().any(|k| k == kind))
    }

    /// Judges one job's context: `None` when the rule holds.
    pub fn judge(&self, context: &Value) -> Option<Denial> {
        self.judge_within(context, &mut ADMIT_STEPS_MAX.clone())
    }

    /// [`Policy::judge`] within a step budget shared with other policies.
    pub fn judge_within(&self, context: &Value, budget: &mut u64) -> Option<Denial> {
        let error = match self.rule.eval_bool_within(context, budget) {
            Ok(true) => return None,
            Ok(false) => None,
            Err(e) => Some(e.to_string()),
        };
        Some(Denial {
            policy: self.name.clone(),
            message: self.message.clone(),
            seen: self.rule.bindings(context),
            error,
        })
    }
}

/// A refused job: which policy, its message, and the values its rule read.
#[derive(Clone, Debug, PartialEq)]
pub struct Denial {
    pub policy: String,
    pub message: String,
    /// Each path the rule reads, with the value it had (`null` if missing).
    pub seen: BTreeMap<String, Value>,
    /// The rule failed to evaluate; the job is refused all the same.
    pub error: Option<String>,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy {}: ", self.policy)?;
        match (&self.error, self.message.is_empty()) {
            (Some(error), _) => write!(
                f,
                "the rule failed to evaluate ({error}), so the job is refused"
            )?,
            (None, false) => f.write_str(&self.message)?,
            (None, true) => f.write_str("the rule does not hold")?,
        }
        if !self.seen.is_empty() {
            let seen: Vec<String> = self
                .seen
                .iter()
                .map(|(path, value)| format!("{path} = {}", quoted(value)))
                .collect();
            write!(f, " ({})", seen.join(", "))?;
        }
        Ok(())
    }
}

/// A value as a denial quotes it: JSON, cut short.
fn quoted(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > SEEN_VALUE_MAX {
        let mut cut = SEEN_VALUE_MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// A tenant's policies, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

impl PolicySet {
    pub fn new(mut policies: Vec<Policy>) -> PolicySet {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        PolicySet { policies }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Judges a job: the first policy (by name) that refuses it. The
    /// context is built only when some policy applies, so a tenant without
    /// policies pays nothing.
    pub fn admit(&self, subject: &Subject<'_>) -> Result<(), Denial> {
        let mut applying = self.policies.iter().filter(|p| p.applies(subject.kind));
        let Some(first) = applying.next() else {
            return Ok(());
        };
        let context = subject.context();
        let mut budget = ADMIT_STEPS_MAX;
        for policy in std::iter::once(first).chain(applying) {
            if let Some(denial) = policy.judge_within(&context, &mut budget) {
                return Err(denial);
            }
        }
        Ok(())
    }

    /// Every policy's verdict on a job, for a dry run: `(name, applies,
    /// denial)`.
    pub fn verdicts(&self, subject: &Subject<'_>) -> Vec<(String, bool, Option<Denial>)> {
        let context = subject.context();
        let mut budget = ADMIT_STEPS_MAX;
        self.policies
            .iter()
            .map(|p| {
                let applies = p.applies(subject.kind);
                let denial = applies
                    .then(|| p.judge_within(&context, &mut budget))
                    .flatten();
                (p.name.clone(), applies, denial)
            })
            .collect()
    }
}

/// The job a policy judges. Fields a submission path does not have (a VM
/// made through `POST /vms` has no queue) are `None` and read as `null`.
#[derive(Clone, Debug)]
pub struct Subject<'a> {
    pub tenant: &'a str,
    pub kind: &'a str,
    pub queue: Option<&'a str>,
    pub priority: Option<Priority>,
    pub labels: &'a BTreeMap<String, String>,
    pub timeout_ms: Option<i64>,
    pub max_attempts: Option<i32>,
    pub spec: &'a Value,
    /// The kind's view of [`SHAPE_FIELDS`] (`JobKinds::describe`).
    pub shape: Map<String, Value>,
}

impl<'a> Subject<'a> {
    /// A job as it would be stored, with its kind's shape.
    pub fn of_job(job: &'a NewJob, shape: Map<String, Value>) -> Subject<'a> {
        Subject {
            tenant: &job.tenant,
            kind: &job.kind,
            queue: Some(&job.queue),
            priority: Some(job.priority),
            labels: &job.labels,
            timeout_ms: Some(job.timeout_ms),
            max_attempts: Some(job.max_attempts),
            spec: &job.spec,
            shape,
        }
    }

    /// `{"tenant": …, "job": {…}}`, what rules read.
    pub fn context(&self) -> Value {
        let mut job = json!({
            "kind": self.kind,
            "queue": self.queue,
            "priority": self.priority,
            "labels": self.labels,
            "timeout_ms": self.timeout_ms,
            "max_attempts": self.max_attempts,
            "image": null,
            "memory_mib": null,
            "vcpus": null,
            "network": null,
            "secrets": [],
            "spec": self.spec,
        });
        for field in SHAPE_FIELDS {
            if let Some(value) = self.shape.get(field) {
                job[field] = value.clone();
            }
        }
        json!({ "tenant": self.tenant, "job": job })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_STEPS_FOR_TEST: u64 = crate::expr::MAX_STEPS;

    fn policy(name: &str, rule: &str) -> Policy {
        Policy::new(name, rule, &format!("{name} says no"), Vec::new(), true).unwrap()
    }

    fn job(tenant: &str, kind: &str, spec: Value, labels: &[(&str, &str)]) -> NewJob {
        let mut job = NewJob::new(tenant, kind, spec);
        job.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        job
    }

    fn shape(spec: &Value) -> Map<String, Value> {
        SHAPE_FIELDS
            .iter()
            .filter_map(|f| spec.get(*f).map(|v| (f.to_string(), v.clone())))
            .collect()
    }

    fn admit(set: &PolicySet, job: &NewJob) -> Result<(), Denial> {
        set.admit(&Subject::of_job(job, shape(&job.spec)))
    }

    #[test]
    fn vm_jobs_need_a_team_label() {
        let set = PolicySet::new(vec![policy(
            "team",
            r#"job.kind != "vm" || job.labels.team != null"#,
        )]);
        let vm = json!({"image": "default", "command": "true"});
        assert!(admit(&set, &job("t", "vm", vm.clone(), &[("team", "a")])).is_ok());
        assert!(admit(&set, &job("t", "wasm", json!({}), &[])).is_ok());
        let denial = admit(&set, &job("t", "vm", vm, &[("other", "x")])).unwrap_err();
        assert_eq!(denial.policy, "team");
        assert_eq!(denial.error, None);
        assert_eq!(
            denial.to_string(),
            r#"policy team: team says no (job.kind = "vm", job.labels.team = null)"#
        );
        // `has` reads the same.
        let set = PolicySet::new(vec![policy(
            "team",
            r#"job.kind != "vm" || has(job.labels.team)"#,
        )]);
        assert!(admit(&set, &job("t", "vm", json!({}), &[])).is_err());
        assert!(admit(&set, &job("t", "vm", json!({}), &[("team", "a")])).is_ok());
    }

    #[test]
    fn trial_tenants_get_at_most_a_gib() {
        let set = PolicySet::new(vec![policy(
            "trial-memory",
            r#"tenant != "trial" || job.memory_mib == null || job.memory_mib <= 1024"#,
        )]);
        let big = json!({"memory_mib": 2048});
        let small = json!({"memory_mib": 1024});
        assert!(admit(&set, &job("paying", "vm", big.clone(), &[])).is_ok());
        assert!(admit(&set, &job("trial", "vm", small, &[])).is_ok());
        assert!(admit(&set, &job("trial", "noop", json!({}), &[])).is_ok());
        let denial = admit(&set, &job("trial", "vm", big, &[])).unwrap_err();
        assert_eq!(
            denial.to_string(),
            r#"policy trial-memory: trial-memory says no (job.memory_mib = 2048, tenant = "trial")"#
        );
    }

    #[test]
    fn an_error_refuses_and_says_so() {
        // null <= 1024 is a type error: refused, never admitted.
        let set = PolicySet::new(vec![policy("mem", "job.memory_mib <= 1024")]);
        let denial = admit(&set, &job("t", "noop", json!({}), &[])).unwrap_err();
        let error = denial.error.clone().unwrap();
        assert!(error.contains("'<=' needs two numbers"), "{error}");
        let text = denial.to_string();
        assert!(
            text.starts_with("policy mem: the rule failed to evaluate ("),
            "{text}"
        );
        assert!(
            text.ends_with("so the job is refused (job.memory_mib = null)"),
            "{text}"
        );
        // A rule that is not a boolean refuses too.
        let set = PolicySet::new(vec![policy("num", "job.max_attempts")]);
        assert!(admit(&set, &job("t", "noop", json!({}), &[])).is_err());
    }

    #[test]
    fn applies_to_and_enabled_choose_the_jobs_judged() {
        let mut only_vm = policy("no", "false");
        only_vm.applies_to = vec!["vm".into()];
        let mut off = policy("off", "false");
        off.enabled = false;
        let set = PolicySet::new(vec![only_vm, off]);
        assert!(admit(&set, &job("t", "wasm", json!({}), &[])).is_ok());
        assert_eq!(
            admit(&set, &job("t", "vm", json!({}), &[]))
                .unwrap_err()
                .policy,
            "no"
        );
        let verdicts = set.verdicts(&Subject::of_job(
            &job("t", "wasm", json!({}), &[]),
            Map::new(),
        ));
        assert_eq!(verdicts.len(), 2);
        assert!(verdicts
            .iter()
            .all(|(_, applies, denial)| !applies && denial.is_none()));
    }

    #[test]
    fn the_first_refusal_by_name_is_reported() {
        let set = PolicySet::new(vec![
            policy("b", "false"),
            policy("a", "false"),
            policy("c", "true"),
        ]);
        assert_eq!(
            admit(&set, &job("t", "noop", json!({}), &[]))
                .unwrap_err()
                .policy,
            "a"
        );
    }

    #[test]
    fn the_context_has_every_field() {
        let mut j = job(
            "t",
            "wasm",
            json!({"memory_mib": 64, "secrets": ["db"], "module": "m"}),
            &[("a", "b")],
        );
        j.queue = "q".into();
        j.priority = Priority::High;
        j.timeout_ms = 5000;
        j.max_attempts = 2;
        let ctx = Subject::of_job(&j, shape(&j.spec)).context();
        assert_eq!(
            ctx,
            json!({"tenant": "t", "job": {
                "kind": "wasm", "queue": "q", "priority": "high", "labels": {"a": "b"},
                "timeout_ms": 5000, "max_attempts": 2, "image": null, "memory_mib": 64,
                "vcpus": null, "network": null, "secrets": ["db"],
                "spec": {"memory_mib": 64, "secrets": ["db"], "module": "m"},
            }})
        );
        let set = PolicySet::new(vec![policy(
            "s",
            r#"!("db" in job.secrets) || job.queue == "q""#,
        )]);
        assert!(set.admit(&Subject::of_job(&j, shape(&j.spec))).is_ok());
    }

    #[test]
    fn policies_are_checked_when_made() {
        let bad = |name: &str, rule: &str, message: &str, kinds: Vec<String>| {
            Policy::new(name, rule, message, kinds, true).unwrap_err()
        };
        match bad("p", "job.kind ==", "", vec![]) {
            PolicyError::Rule(e) => assert_eq!(e.pos, 11),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            bad("a/b", "true", "", vec![]),
            PolicyError::Invalid(_)
        ));
        assert!(matches!(
            bad("p", &"x".repeat(RULE_MAX + 1), "", vec![]),
            PolicyError::Invalid(_)
        ));
        assert!(matches!(
            bad("p", "true", &"m".repeat(MESSAGE_MAX + 1), vec![]),
            PolicyError::Invalid(_)
        ));
        assert!(matches!(
            bad("p", "true", "", vec!["a b".into()]),
            PolicyError::Invalid(_)
        ));
        assert!(matches!(
            bad("p", "true", "", vec!["vm".into(); APPLIES_TO_MAX + 1]),
            PolicyError::Invalid(_)
        ));
    }

    #[test]
    fn policies_share_one_step_budget_per_job() {
        // Each rule alone is within the language's bound; together they
        // are not, and the one that runs out refuses.
        let j = job("t", "noop", json!({}), &[]);
        let list = format!(
            "[{}]",
            (1..=16)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let rule = format!("{list}.all(a, {list}.all(b, {list}.all(c, a + b + c > 0)))");
        let one = policy("p00", &rule);
        let mut alone = MAX_STEPS_FOR_TEST;
        assert!(one
            .judge_within(&Subject::of_job(&j, Map::new()).context(), &mut alone)
            .is_none());
        let used = MAX_STEPS_FOR_TEST - alone;
        assert!(used > 10_000, "{used}");
        let n = (ADMIT_STEPS_MAX / used + 2) as usize;
        let set = PolicySet::new((0..n).map(|i| policy(&format!("p{i:02}"), &rule)).collect());
        let denial = admit(&set, &j).unwrap_err();
        assert!(
            denial
                .error
                .as_deref()
                .unwrap_or_default()
                .contains("steps"),
            "{denial:?}"
        );
        assert_ne!(denial.policy, "p00");
    }

    #[test]
    fn quoted_values_are_cut_short() {
        let long = Value::String("é".repeat(200));
        let text = quoted(&long);
        assert!(text.len() <= SEEN_VALUE_MAX + '…'.len_utf8());
        assert!(text.ends_with('…'));
    }
}
