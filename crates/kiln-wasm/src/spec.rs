use std::collections::BTreeMap;

use serde::Deserialize;

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
    /// Cap on each of stdout and stderr.
    pub output_limit_bytes: Option<usize>,
    /// Mount an empty scratch directory at `/scratch`.
    #[serde(default)]
    pub scratch: bool,
    /// Retry traps and limit breaches like ordinary failures.
    #[serde(default)]
    pub retry_traps: bool,
}

impl WasmSpec {
    pub fn parse(spec: &serde_json::Value) -> Result<WasmSpec, String> {
        let spec: WasmSpec = serde_json::from_value(spec.clone()).map_err(|e| e.to_string())?;
        let hex = spec
            .module
            .strip_prefix("sha256:")
            .ok_or("module must be sha256:<hex>")?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("module must be sha256:<64 hex digits>".to_string());
        }
        if spec.memory_mib == Some(0) {
            return Err("memory_mib must be at least 1".to_string());
        }
        Ok(spec)
    }
}
