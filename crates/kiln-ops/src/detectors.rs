//! The detectors' settings: each detector has an `enabled` flag, its
//! thresholds, the severity of its incidents and whether they resolve by
//! themselves when the condition clears. The deployment sets defaults
//! ([`DetectorSettings::default`], below); a tenant overrides any field
//! (`PUT /api/v1/incidents/detectors`), and only what it set is kept, so a
//! later change of a default reaches the fields it left alone.
//!
//! | detector | thresholds (default) | severity | auto-resolve |
//! |---|---|---|---|
//! | `dead_letter_burst` | `count` 5 `job.dead` of one queue within `window_s` 60; clears after `quiet_s` 300 without one | high | on |
//! | `failure_rate` | ≥ `ratio` 0.5 of ≥ `min_ends` 20 job ends of one queue and kind within `window_s` 300 failed; clears below the ratio, or after `window_s` without a sighting | medium | on |
//! | `backlog_age` | the oldest job ready to run in a queue waits more than `max_age_s` 600 (looked at every 10 s); clears when it no longer does | medium | on |
//! | `vm_boot_failures` | `count` 3 VM boots failed within `window_s` 600; clears after `quiet_s` 600 without one | high | on |
//! | `node_lost` | a `node.lost` event; clears on the node's `node.online` | high | on |
//! | `run_failed` | a `run.failed` event; clears on a `run.succeeded` of the pipeline | medium | on |

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const SEVERITIES: [&str; 4] = ["critical", "high", "medium", "low"];

/// Longest window or quiet period, in seconds (a day).
pub const WINDOW_S_MAX: u64 = 86_400;
/// Largest count a detector may wait for.
pub const COUNT_MAX: u32 = 10_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorSettings {
    pub dead_letter_burst: DeadLetterBurst,
    pub failure_rate: FailureRate,
    pub backlog_age: BacklogAge,
    pub vm_boot_failures: VmBootFailures,
    pub node_lost: Basic,
    pub run_failed: Basic,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterBurst {
    pub enabled: bool,
    pub severity: String,
    pub auto_resolve: bool,
    pub count: u32,
    pub window_s: u64,
    pub quiet_s: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureRate {
    pub enabled: bool,
    pub severity: String,
    pub auto_resolve: bool,
    pub ratio: f64,
    pub min_ends: u32,
    pub window_s: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BacklogAge {
    pub enabled: bool,
    pub severity: String,
    pub auto_resolve: bool,
    pub max_age_s: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmBootFailures {
    pub enabled: bool,
    pub severity: String,
    pub auto_resolve: bool,
    pub count: u32,
    pub window_s: u64,
    pub quiet_s: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Basic {
    pub enabled: bool,
    pub severity: String,
    pub auto_resolve: bool,
}

fn basic(severity: &str) -> Basic {
    Basic {
        enabled: true,
        severity: severity.into(),
        auto_resolve: true,
    }
}

impl Default for DetectorSettings {
    fn default() -> DetectorSettings {
        DetectorSettings {
            dead_letter_burst: DeadLetterBurst {
                enabled: true,
                severity: "high".into(),
                auto_resolve: true,
                count: 5,
                window_s: 60,
                quiet_s: 300,
            },
            failure_rate: FailureRate {
                enabled: true,
                severity: "medium".into(),
                auto_resolve: true,
                ratio: 0.5,
                min_ends: 20,
                window_s: 300,
            },
            backlog_age: BacklogAge {
                enabled: true,
                severity: "medium".into(),
                auto_resolve: true,
                max_age_s: 600,
            },
            vm_boot_failures: VmBootFailures {
                enabled: true,
                severity: "high".into(),
                auto_resolve: true,
                count: 3,
                window_s: 600,
                quiet_s: 600,
            },
            node_lost: basic("high"),
            run_failed: basic("medium"),
        }
    }
}

/// Why settings were refused: the field and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSettings {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> InvalidSettings {
    InvalidSettings {
        field: field.into(),
        message: message.into(),
    }
}

/// Merges `patch` into `base` (JSON merge patch: objects merge field by
/// field, anything else replaces; null removes).
pub fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    base.remove(key);
                } else {
                    merge(base.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

impl DetectorSettings {
    /// These settings with a tenant's overrides applied and checked.
    pub fn with_overrides(&self, overrides: &Value) -> Result<DetectorSettings, InvalidSettings> {
        if !overrides.is_object() {
            return Err(invalid("settings", "must be a JSON object"));
        }
        let mut merged = serde_json::to_value(self).expect("settings serialise");
        // Unknown detectors and fields are refused by name, not dropped.
        let known = merged.as_object().cloned().unwrap_or_default();
        for (detector, fields) in overrides.as_object().into_iter().flatten() {
            let Some(defaults) = known.get(detector) else {
                return Err(invalid(
                    detector.as_str(),
                    format!(
                        "no such detector; the detectors are {}",
                        known.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            };
            let Some(fields) = fields.as_object() else {
                return Err(invalid(detector.as_str(), "must be a JSON object"));
            };
            for field in fields.keys() {
                if defaults.get(field).is_none() {
                    return Err(invalid(format!("{detector}.{field}"), "no such field"));
                }
            }
        }
        merge(&mut merged, overrides);
        for (detector, fields) in merged.as_object().into_iter().flatten() {
            for (field, value) in fields.as_object().into_iter().flatten() {
                let expected = &known[detector][field];
                let same_type = match expected {
                    Value::Bool(_) => value.is_boolean(),
                    Value::String(_) => value.is_string(),
                    Value::Number(n) if n.is_f64() => value.is_number(),
                    Value::Number(_) => value.is_u64(),
                    _ => true,
                };
                if !same_type {
                    let what = match expected {
                        Value::Bool(_) => "a boolean",
                        Value::String(_) => "a string",
                        Value::Number(n) if n.is_f64() => "a number",
                        _ => "a whole number ≥ 0",
                    };
                    return Err(invalid(
                        format!("{detector}.{field}"),
                        format!("must be {what}"),
                    ));
                }
            }
        }
        let settings: DetectorSettings =
            serde_json::from_value(merged).map_err(|e| invalid("settings", e.to_string()))?;
        settings.check()?;
        Ok(settings)
    }

    /// Checks every bound.
    pub fn check(&self) -> Result<(), InvalidSettings> {
        let severity = |detector: &str, s: &str| {
            if SEVERITIES.contains(&s) {
                Ok(())
            } else {
                Err(invalid(
                    format!("{detector}.severity"),
                    "must be critical, high, medium or low",
                ))
            }
        };
        let seconds = |field: &str, s: u64| {
            if (1..=WINDOW_S_MAX).contains(&s) {
                Ok(())
            } else {
                Err(invalid(field, format!("must be 1 to {WINDOW_S_MAX}")))
            }
        };
        let count = |field: &str, n: u32| {
            if (1..=COUNT_MAX).contains(&n) {
                Ok(())
            } else {
                Err(invalid(field, format!("must be 1 to {COUNT_MAX}")))
            }
        };
        let d = &self.dead_letter_burst;
        severity("dead_letter_burst", &d.severity)?;
        count("dead_letter_burst.count", d.count)?;
        seconds("dead_letter_burst.window_s", d.window_s)?;
        seconds("dead_letter_burst.quiet_s", d.quiet_s)?;
        let f = &self.failure_rate;
        severity("failure_rate", &f.severity)?;
        if !(f.ratio > 0.0 && f.ratio <= 1.0) {
            return Err(invalid(
                "failure_rate.ratio",
                "must be above 0 and at most 1",
            ));
        }
        if !(1..=100_000).contains(&f.min_ends) {
            return Err(invalid("failure_rate.min_ends", "must be 1 to 100000"));
        }
        seconds("failure_rate.window_s", f.window_s)?;
        let b = &self.backlog_age;
        severity("backlog_age", &b.severity)?;
        seconds("backlog_age.max_age_s", b.max_age_s)?;
        let v = &self.vm_boot_failures;
        severity("vm_boot_failures", &v.severity)?;
        count("vm_boot_failures.count", v.count)?;
        seconds("vm_boot_failures.window_s", v.window_s)?;
        seconds("vm_boot_failures.quiet_s", v.quiet_s)?;
        severity("node_lost", &self.node_lost.severity)?;
        severity("run_failed", &self.run_failed.severity)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(overrides: Value, expect: Result<(), &str>) {
        let got = DetectorSettings::default().with_overrides(&overrides);
        match (got, expect) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(field)) => assert_eq!(e.field, field, "{overrides}: {e}"),
            (got, expect) => panic!("{overrides}: got {got:?}, expected {expect:?}"),
        }
    }

    #[test]
    fn overrides_are_checked_field_by_field() {
        check(json!({}), Ok(()));
        check(json!({"dead_letter_burst": {"quiet_s": 1}}), Ok(()));
        check(
            json!({"failure_rate": {"ratio": 0.25, "min_ends": 5, "enabled": false}}),
            Ok(()),
        );
        check(json!({"backlog_age": {"severity": "critical"}}), Ok(()));
        check(json!({"nope": {}}), Err("nope"));
        check(json!({"node_lost": {"count": 3}}), Err("node_lost.count"));
        check(json!({"node_lost": 3}), Err("node_lost"));
        check(
            json!({"dead_letter_burst": {"count": 0}}),
            Err("dead_letter_burst.count"),
        );
        check(
            json!({"dead_letter_burst": {"count": -1}}),
            Err("dead_letter_burst.count"),
        );
        check(
            json!({"dead_letter_burst": {"quiet_s": 86_401}}),
            Err("dead_letter_burst.quiet_s"),
        );
        check(
            json!({"failure_rate": {"ratio": 0}}),
            Err("failure_rate.ratio"),
        );
        check(
            json!({"failure_rate": {"ratio": 1.5}}),
            Err("failure_rate.ratio"),
        );
        check(
            json!({"run_failed": {"severity": "dire"}}),
            Err("run_failed.severity"),
        );
        check(
            json!({"vm_boot_failures": {"enabled": "yes"}}),
            Err("vm_boot_failures.enabled"),
        );
        check(json!([1]), Err("settings"));
    }

    #[test]
    fn a_merge_keeps_what_the_patch_leaves_and_null_removes() {
        let mut base = json!({"a": {"x": 1, "y": 2}, "b": 3});
        merge(&mut base, &json!({"a": {"y": 5, "x": null}, "c": 4}));
        assert_eq!(base, json!({"a": {"y": 5}, "b": 3, "c": 4}));
    }
}
