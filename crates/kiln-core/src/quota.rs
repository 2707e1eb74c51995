//! Per-tenant quotas: what one tenant may hold at once, so no tenant can use
//! up what every tenant shares. Enforced where the resource is created (VM
//! manager, submit, module push, the wasm runtime); over a quota the API
//! answers `4xx quota_exceeded`.

use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantQuotas {
    /// Live VMs (warm-pool VMs belong to nobody and do not count).
    pub vms_live_max: u32,
    /// Sum of the memory of a tenant's live VMs.
    pub vm_memory_mib_max: u64,
    /// Jobs `running` at once (checked by the lease).
    pub jobs_running_max: u32,
    /// Largest `output_limit_bytes` a wasm job may ask for, per stream.
    pub wasm_output_bytes_max: u64,
    /// Disk a wasm job's scratch directory may fill.
    pub wasm_scratch_bytes_max: u64,
    /// Stored modules.
    pub modules_max: u32,
    /// Sum of the sizes of stored modules.
    pub modules_bytes_max: u64,
}

impl Default for TenantQuotas {
    fn default() -> Self {
        TenantQuotas {
            vms_live_max: 32,
            vm_memory_mib_max: 16 * 1024,
            jobs_running_max: 1_000,
            wasm_output_bytes_max: 16 * 1024 * 1024,
            wasm_scratch_bytes_max: 256 * 1024 * 1024,
            modules_max: 1_000,
            modules_bytes_max: 4 * 1024 * 1024 * 1024,
        }
    }
}

/// A quota that a request would exceed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("quota exceeded: {what} (limit {limit})")]
pub struct QuotaExceeded {
    pub what: &'static str,
    pub limit: u64,
}
