//! The `wasm` job spec and its pure check: unknown fields refused, every
//! number and string bounded, the module id in its grammar. The API runs the
//! check at submit; the handler parses with it again at run.

use std::collections::BTreeMap;

use kiln_core::names::{check_module_id, check_text};
use kiln_core::TenantQuotas;
use serde::Deserialize;

/// Most arguments after `argv[0]`.
pub const ARGS_MAX: usize = 256;
/// Most environment variables.
pub const ENV_MAX: usize = 256;
/// Longest argument, environment name or value.
pub const ARG_BYTES_MAX: usize = 4096;
/// Largest stdin carried in a spec.
pub const STDIN_BYTES_MAX: usize = 256 << 10;
/// Largest linear memory a spec may name (a wasm32 guest cannot address more).
pub const MEMORY_MIB_MAX: u64 = 4096;

/// What a `wasm` job runs.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WasmSpec {
    /// The module's id, `sha256:<hex>`, as `POST /api/v1/modules` answered.
    pub module: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub stdin: String,
    /// Linear memory cap.
    pub memory_mib: Option<u64>,
    /// Instructions budget (wasmtime fuel); unlimited when absent.
    pub fuel: Option<u64>,
    /// Cap on each of stdout and stderr; at most the tenant's
    /// `wasm_output_bytes_max`.
    pub output_limit_bytes: Option<usize>,
    /// Mount an empty scratch directory at `/scratch`, holding at most the
    /// tenant's `wasm_scratch_bytes_max`.
    #[serde(default)]
    pub scratch: bool,
    /// Retry traps and limit breaches like ordinary failures.
    #[serde(default)]
    pub retry_traps: bool,
    /// Paths under `/scratch` kept when the run succeeds (implies `scratch`).
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Files of earlier jobs placed under `/scratch` (implies `scratch`).
    #[serde(default)]
    pub inputs: Vec<kiln_core::files::FileInput>,
    /// The tenant's secrets to read at `/run/secrets/<name>` (read-only);
    /// the spec holds the names only.
    #[serde(default)]
    pub secrets: Vec<String>,
}

impl WasmSpec {
    /// Whether the run gets a scratch directory.
    pub fn wants_scratch(&self) -> bool {
        self.scratch || !self.outputs.is_empty() || !self.inputs.is_empty()
    }

    /// Parses and checks a spec against the default quotas.
    pub fn parse(spec: &serde_json::Value) -> Result<WasmSpec, String> {
        WasmSpec::parse_within(spec, &TenantQuotas::default())
    }

    /// Parses and checks a spec against a deployment's quotas.
    pub fn parse_within(
        spec: &serde_json::Value,
        quotas: &TenantQuotas,
    ) -> Result<WasmSpec, String> {
        let spec = WasmSpec::deserialize(spec).map_err(|e| e.to_string())?;
        spec.check(quotas)?;
        Ok(spec)
    }

    fn check(&self, quotas: &TenantQuotas) -> Result<(), String> {
        let invalid = |e: kiln_core::names::InvalidName| e.to_string();
        check_module_id("module", &self.module).map_err(invalid)?;
        if self.args.len() > ARGS_MAX {
            return Err(format!("args has more than {ARGS_MAX} entries"));
        }
        for arg in &self.args {
            check_text("each of args", arg, ARG_BYTES_MAX).map_err(invalid)?;
        }
        if self.env.len() > ENV_MAX {
            return Err(format!("env has more than {ENV_MAX} entries"));
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') {
                return Err("env names must be non-empty and hold no '='".to_string());
            }
            check_text("each env name", name, ARG_BYTES_MAX).map_err(invalid)?;
            check_text("each env value", value, ARG_BYTES_MAX).map_err(invalid)?;
        }
        check_text("stdin", &self.stdin, STDIN_BYTES_MAX).map_err(invalid)?;
        kiln_core::files::check(&self.outputs, &self.inputs).map_err(|e| e.to_string())?;
        kiln_core::secrets::check_requested(&self.secrets)?;
        if let Some(memory) = self.memory_mib {
            if !(1..=MEMORY_MIB_MAX).contains(&memory) {
                return Err(format!("memory_mib must be 1 to {MEMORY_MIB_MAX}"));
            }
        }
        if let Some(limit) = self.output_limit_bytes {
            let max = quotas.wasm_output_bytes_max;
            if limit == 0 || limit as u64 > max {
                return Err(format!(
                    "output_limit_bytes must be 1 to {max} (the tenant's wasm_output_bytes_max)"
                ));
            }
        }
        Ok(())
    }
}

/// The `wasm` kind's spec check, against the default quotas
/// (a `kiln_core::CheckSpec`).
pub fn check_spec(spec: &serde_json::Value) -> Result<(), String> {
    WasmSpec::parse(spec).map(drop)
}

/// The `wasm` kind's spec check against a deployment's quotas.
pub fn check_spec_within(spec: &serde_json::Value, quotas: &TenantQuotas) -> Result<(), String> {
    WasmSpec::parse_within(spec, quotas).map(drop)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(spec: serde_json::Value, expect: Result<(), &str>) {
        let got = check_spec(&spec);
        match expect {
            Ok(()) => assert_eq!(got, Ok(()), "{spec}"),
            Err(needle) => {
                let error = got.expect_err(&spec.to_string());
                assert!(error.contains(needle), "{spec}: {error}");
            }
        }
    }

    #[test]
    fn specs_are_bounded() {
        let id = format!("sha256:{}", "a".repeat(64));
        let max = TenantQuotas::default().wasm_output_bytes_max;
        check(json!({"module": id}), Ok(()));
        check(
            json!({"module": id, "args": ["x"], "env": {"A": "1"}, "stdin": "hi",
                   "memory_mib": 16, "fuel": 5, "output_limit_bytes": max, "scratch": true}),
            Ok(()),
        );
        check(json!({"module": id, "nope": 1}), Err("unknown field"));
        check(json!({"module": "sha256:ABC"}), Err("module"));
        check(
            json!({"module": format!("sha256:{}", "A".repeat(64))}),
            Err("module"),
        );
        check(
            json!({"module": id, "output_limit_bytes": max + 1}),
            Err("wasm_output_bytes_max"),
        );
        check(
            json!({"module": id, "output_limit_bytes": 0}),
            Err("output_limit_bytes"),
        );
        check(json!({"module": id, "memory_mib": 0}), Err("memory_mib"));
        check(
            json!({"module": id, "memory_mib": 1 << 20}),
            Err("memory_mib"),
        );
        check(json!({"module": id, "args": ["a\u{0}b"]}), Err("NUL"));
        check(
            json!({"module": id, "args": vec!["a"; ARGS_MAX + 1]}),
            Err("args"),
        );
        check(json!({"module": id, "env": {"A=B": "1"}}), Err("env"));
        check(json!({"module": id, "env": {"A": "\u{0}"}}), Err("NUL"));
        check(
            json!({"module": id, "stdin": "x".repeat(STDIN_BYTES_MAX + 1)}),
            Err("stdin"),
        );
        check(json!({"module": id, "stdin": "\u{0}"}), Err("NUL"));
        check(
            json!({"module": id, "secrets": ["db", "api-token"]}),
            Ok(()),
        );
        check(
            json!({"module": id, "secrets": ["../etc"]}),
            Err("secrets[0]"),
        );
        check(json!({"module": id, "secrets": ["a", "a"]}), Err("twice"));
    }

    #[test]
    fn a_deployment_may_raise_the_output_bound() {
        let id = format!("sha256:{}", "a".repeat(64));
        let quotas = TenantQuotas {
            wasm_output_bytes_max: 64 << 20,
            ..TenantQuotas::default()
        };
        let spec = json!({"module": id, "output_limit_bytes": 32 << 20});
        assert!(check_spec(&spec).is_err());
        assert_eq!(check_spec_within(&spec, &quotas), Ok(()));
    }
}
