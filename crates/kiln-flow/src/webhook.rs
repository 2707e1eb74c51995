//! Webhook triggers as pure rules: what a trigger may say, which deliveries
//! its filter lets through, and how its target is filled in from the
//! payload. Signatures and HTTP are the API's business.
//!
//! A target is the one of schedules ([`Target`]), with `${…}` templates of
//! [`crate::template`] reading `payload` (the sender's JSON, or a Slack
//! command's form fields), `event`, `delivery` and `webhook`.

use kiln_core::JobKinds;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::target::Target;
use crate::template::{render_value, templates_in};

/// Shortest and longest signing secret.
pub const SECRET_MIN: usize = 16;
pub const SECRET_MAX: usize = 1024;
/// Most entries in each list of a filter, and the longest entry.
pub const FILTER_ITEMS_MAX: usize = 100;
pub const FILTER_ITEM_MAX: usize = 256;
/// What a template in a webhook's target may read.
pub const CONTEXT_ROOTS: [&str; 4] = ["payload", "event", "delivery", "webhook"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Github,
    Slack,
    Generic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Slack => "slack",
            Provider::Generic => "generic",
        }
    }

    pub fn parse(text: &str) -> Option<Provider> {
        match text {
            "github" => Some(Provider::Github),
            "slack" => Some(Provider::Slack),
            "generic" => Some(Provider::Generic),
            _ => None,
        }
    }
}

/// Which deliveries start the target; an empty list lets everything through.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookFilter {
    /// Event types (`push`, `pull_request`, `slash_command`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// Branch patterns; `*` matches any run of characters (`release/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches: Vec<String>,
    /// Slack slash commands (`/deploy`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
}

/// A trigger as a client writes it (the name comes from the URL).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookDef {
    #[serde(default)]
    pub name: Option<String>,
    pub provider: Provider,
    pub secret: String,
    #[serde(default)]
    pub filter: WebhookFilter,
    pub target: Target,
}

/// What the filter looks at in one delivery.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeliveryFacts<'a> {
    pub event: &'a str,
    pub branch: Option<&'a str>,
    pub command: Option<&'a str>,
}

impl WebhookDef {
    /// Every rule; the message names the field.
    pub fn check(&self, kinds: &JobKinds) -> Result<(), String> {
        let secret = self.secret.len();
        if !(SECRET_MIN..=SECRET_MAX).contains(&secret) || self.secret.contains('\0') {
            return Err(format!(
                "secret: must be {SECRET_MIN} to {SECRET_MAX} bytes without NUL"
            ));
        }
        self.filter.check()?;
        check_target(&self.target, kinds)
    }
}

impl WebhookFilter {
    fn check(&self) -> Result<(), String> {
        for (field, items) in [
            ("events", &self.events),
            ("branches", &self.branches),
            ("commands", &self.commands),
        ] {
            if items.len() > FILTER_ITEMS_MAX {
                return Err(format!(
                    "filter.{field}: at most {FILTER_ITEMS_MAX} entries"
                ));
            }
            for (i, item) in items.iter().enumerate() {
                if item.is_empty() || item.len() > FILTER_ITEM_MAX || item.contains('\0') {
                    return Err(format!(
                        "filter.{field}[{i}]: must be 1 to {FILTER_ITEM_MAX} bytes without NUL"
                    ));
                }
            }
        }
        Ok(())
    }

    /// `Ok` when the delivery passes; otherwise why it was skipped. A
    /// branch filter skips deliveries that name no branch (a tag push).
    pub fn accepts(&self, facts: &DeliveryFacts<'_>) -> Result<(), String> {
        if !self.events.is_empty() && !self.events.iter().any(|e| e == facts.event) {
            return Err(format!("event {:?} is not in the filter", facts.event));
        }
        if !self.branches.is_empty() {
            let Some(branch) = facts.branch else {
                return Err("the delivery names no branch".into());
            };
            if !self.branches.iter().any(|p| glob_match(p, branch)) {
                return Err(format!("branch {branch:?} is not in the filter"));
            }
        }
        if !self.commands.is_empty() {
            let Some(command) = facts.command else {
                return Err("the delivery is not a command".into());
            };
            if !self.commands.iter().any(|c| c == command) {
                return Err(format!("command {command:?} is not in the filter"));
            }
        }
        Ok(())
    }
}

/// `*` matches any run of characters (slashes too); everything else is
/// literal. Iterative with one backtrack point, so no pattern is slow.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

/// The branch a GitHub-style payload is about: `refs/heads/<branch>` in
/// `ref` (a push), else the base branch of a pull request.
pub fn branch_of(payload: &Value) -> Option<&str> {
    if let Some(reference) = payload.get("ref").and_then(Value::as_str) {
        return reference.strip_prefix("refs/heads/");
    }
    payload
        .pointer("/pull_request/base/ref")
        .and_then(Value::as_str)
}

fn check_target(target: &Target, kinds: &JobKinds) -> Result<(), String> {
    let value = serde_json::to_value(target).map_err(|e| format!("target: {e}"))?;
    let templates = templates_in(&value).map_err(|(path, e)| format!("target{path}: {e}"))?;
    for (path, template) in &templates {
        for expr in template.exprs() {
            for reference in expr.references() {
                let root = reference.first().map(String::as_str).unwrap_or_default();
                if !CONTEXT_ROOTS.contains(&root) {
                    return Err(format!(
                        "target{path}: unknown reference {root:?} in {:?} (one of {})",
                        expr.source(),
                        CONTEXT_ROOTS.join(", ")
                    ));
                }
            }
        }
    }
    match target {
        Target::Job(job) if !templates.is_empty() => {
            // The spec is checked whole once rendered, at delivery.
            job.to_job("check")
                .validate()
                .map_err(|e| format!("target.job: {e}"))?;
            match kinds.check(&job.kind, &serde_json::json!({})) {
                Err(e @ kiln_core::SpecError::UnknownKind(_)) => Err(format!("target.job: {e}")),
                _ => Ok(()),
            }
        }
        _ => target.check(kinds),
    }
}

/// What templates read for one delivery.
pub fn context(payload: Value, event: &str, delivery: Option<&str>, webhook: &str) -> Value {
    serde_json::json!({
        "payload": payload,
        "event": event,
        "delivery": delivery,
        "webhook": webhook,
    })
}

/// The target with every template filled in from `context`.
pub fn render_target(target: &Target, context: &Value) -> Result<Target, String> {
    let value = serde_json::to_value(target).map_err(|e| format!("target: {e}"))?;
    let rendered = render_value(&value, context).map_err(|e| format!("target{e}"))?;
    serde_path_to_error::deserialize(rendered).map_err(|e| {
        let path = e.path().to_string();
        format!("target.{path}: {}", e.into_inner())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs_match_branches() {
        for (pattern, text, expect) in [
            ("main", "main", true),
            ("main", "mainline", false),
            ("release/*", "release/1.2", true),
            ("release/*", "release/", true),
            ("release/*", "releases/1", false),
            ("*", "anything/at/all", true),
            ("*-hotfix", "v1-hotfix", true),
            ("*-hotfix", "v1-hotfix2", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(glob_match(pattern, text), expect, "{pattern} {text}");
        }
    }

    #[test]
    fn filters_say_why_they_skip() {
        let filter = WebhookFilter {
            events: vec!["push".into()],
            branches: vec!["main".into(), "release/*".into()],
            commands: vec![],
        };
        let facts = |event, branch| DeliveryFacts {
            event,
            branch,
            command: None,
        };
        assert!(filter.accepts(&facts("push", Some("main"))).is_ok());
        assert!(filter.accepts(&facts("push", Some("release/2"))).is_ok());
        assert!(filter
            .accepts(&facts("push", Some("dev")))
            .unwrap_err()
            .contains("branch \"dev\""));
        assert!(filter
            .accepts(&facts("issues", Some("main")))
            .unwrap_err()
            .contains("event"));
        assert!(filter.accepts(&facts("push", None)).is_err());
        let commands = WebhookFilter {
            commands: vec!["/deploy".into()],
            ..WebhookFilter::default()
        };
        let command = |c| DeliveryFacts {
            event: "slash_command",
            branch: None,
            command: c,
        };
        assert!(commands.accepts(&command(Some("/deploy"))).is_ok());
        assert!(commands.accepts(&command(Some("/other"))).is_err());
        assert!(WebhookFilter::default().accepts(&command(None)).is_ok());
    }

    #[test]
    fn branches_come_from_refs_and_pull_requests() {
        assert_eq!(branch_of(&json!({"ref": "refs/heads/main"})), Some("main"));
        assert_eq!(branch_of(&json!({"ref": "refs/tags/v1"})), None);
        assert_eq!(
            branch_of(&json!({"pull_request": {"base": {"ref": "dev"}}})),
            Some("dev")
        );
        assert_eq!(branch_of(&json!([])), None);
    }

    fn kinds() -> JobKinds {
        let mut kinds = JobKinds::new();
        kinds.add("noop", |spec| {
            if spec.get("bad").is_some() {
                Err("bad".into())
            } else {
                Ok(())
            }
        });
        kinds
    }

    fn def(value: Value) -> Result<(), String> {
        let def: WebhookDef = serde_json::from_value(value).map_err(|e| e.to_string())?;
        def.check(&kinds())
    }

    #[test]
    fn definitions_are_checked_with_the_path_of_the_fault() {
        let secret = "0123456789abcdef";
        assert_eq!(
            def(json!({"provider": "github", "secret": secret,
                "target": {"job": {"kind": "noop", "spec": {"stdout": "${payload.ref}"}}}})),
            Ok(())
        );
        for (value, needle) in [
            (
                json!({"provider": "github", "secret": "short", "target": {"job": {"kind": "noop"}}}),
                "secret",
            ),
            (
                json!({"provider": "github", "secret": secret,
                    "target": {"job": {"kind": "noop", "spec": {"x": "${params.y}"}}}}),
                "target.job.spec.x: unknown reference \"params\"",
            ),
            (
                json!({"provider": "github", "secret": secret,
                    "target": {"job": {"kind": "nope", "spec": {"x": "${payload.y}"}}}}),
                "target.job: unknown kind",
            ),
            (
                json!({"provider": "github", "secret": secret,
                    "target": {"job": {"kind": "noop", "spec": {"bad": 1}}}}),
                "target.job",
            ),
            (
                json!({"provider": "github", "secret": secret,
                    "target": {"pipeline": {"name": "p", "params": {"b": "${payload.ref"}}}}),
                "target.pipeline.params.b: unclosed template",
            ),
            (
                json!({"provider": "github", "secret": secret, "filter": {"events": [""]},
                    "target": {"pipeline": {"name": "p"}}}),
                "filter.events[0]",
            ),
            (
                json!({"provider": "gitlab", "secret": secret, "target": {"pipeline": {"name": "p"}}}),
                "unknown variant",
            ),
        ] {
            let message = def(value).unwrap_err();
            assert!(message.contains(needle), "{message} lacks {needle}");
        }
    }

    #[test]
    fn targets_render_from_the_payload() {
        let target: Target = serde_json::from_value(json!({"pipeline": {"name": "build",
            "params": {"branch": "${payload.ref}", "sha": "${payload.after}", "who": "by ${webhook}"}}}))
        .unwrap();
        let context = context(
            json!({"ref": "refs/heads/main", "after": "abc"}),
            "push",
            Some("d1"),
            "gh",
        );
        let rendered = render_target(&target, &context).unwrap();
        let Target::Pipeline(p) = rendered else {
            panic!("not a pipeline")
        };
        assert_eq!(
            Value::Object(p.params),
            json!({"branch": "refs/heads/main", "sha": "abc", "who": "by gh"})
        );
    }
}
