//! Settings of the VM host: which accelerator, how QEMU is started and
//! confined, snapshots, quotas and the host's capacity. The binary fills
//! them from flags, `KILN_*` variables and `kiln.toml`; nothing in this
//! crate reads the environment.

use std::path::PathBuf;

use serde::Deserialize;

/// Which accelerator VMs run under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceleratorChoice {
    /// KVM when a probe boot under it answers, else TCG (with a warning).
    #[default]
    Auto,
    /// KVM or nothing: the manager refuses to start without it.
    Kvm,
    /// QEMU's emulator. Outside QEMU's security policy: a guest that
    /// escapes TCG is not a QEMU security bug, so kiln warns when it runs.
    Tcg,
}

impl AcceleratorChoice {
    pub fn parse(text: &str) -> Option<AcceleratorChoice> {
        match text {
            "auto" => Some(AcceleratorChoice::Auto),
            "kvm" => Some(AcceleratorChoice::Kvm),
            "tcg" => Some(AcceleratorChoice::Tcg),
            _ => None,
        }
    }
}

/// How QEMU is started and confined.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuConfig {
    /// The QEMU binary (`KILN_QEMU`).
    pub binary: PathBuf,
    /// The guest CPU model (`KILN_QEMU_CPU`); by default the host's under
    /// KVM and `qemu64` under TCG.
    pub cpu: Option<String>,
    /// QEMU's seccomp filter (`-sandbox on` with obsolete, privilege
    /// elevation, spawning and resource control denied). Off only for a
    /// QEMU built without seccomp, and then with a warning.
    pub sandbox: bool,
    /// The user QEMU runs as when kiln runs as root. Created as a system
    /// user when absent; `nobody` if that fails.
    pub user: String,
    /// Put each QEMU in its own cgroup (v2) with `memory.max` and
    /// `pids.max`, where the cgroup tree is writable.
    pub cgroups: bool,
    /// The cgroup v2 mount; found in `/proc/self/mounts` when unset.
    pub cgroup_root: Option<PathBuf>,
    /// QEMU's own memory beyond the guest's, allowed by `memory.max` and
    /// counted against the host's budget. Under TCG an idle 128 MiB guest's
    /// QEMU holds about 100 MiB, and its translation cache grows with the
    /// guest's code.
    pub overhead_mib: u64,
    /// `pids.max` of a VM's cgroup (QEMU's threads).
    pub pids_max: u32,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            cpu: None,
            sandbox: true,
            user: "kiln-qemu".into(),
            cgroups: true,
            cgroup_root: None,
            overhead_mib: 128,
            pids_max: 64,
        }
    }
}

/// What one host can hold: VM creation past it answers "no capacity, try
/// later" instead of running the host out of memory.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostCapacity {
    /// Live and warm VMs at once.
    pub vms_max: u32,
    /// Memory VMs may use in all (guest memory plus QEMU's overhead). Unset:
    /// `MemAvailable` at start minus `memory_reserve_mib`.
    pub memory_mib: Option<u64>,
    /// Kept free for kiln itself and everything else on the host.
    pub memory_reserve_mib: u64,
    /// `Retry-After` of a refusal.
    pub retry_after_s: u64,
}

impl Default for HostCapacity {
    fn default() -> Self {
        HostCapacity {
            vms_max: 64,
            memory_mib: None,
            memory_reserve_mib: 1024,
            retry_after_s: 5,
        }
    }
}

/// Everything the VM manager is configured with.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmManagerConfig {
    /// `auto`, `kvm` or `tcg`.
    pub accelerator: AcceleratorChoice,
    /// New VMs restore from (and first boots save) snapshots
    /// (`KILN_VM_SNAPSHOTS=0` turns them off).
    pub snapshots: bool,
    /// Words added to every guest's kernel command line (`KILN_VM_CMDLINE`).
    pub extra_cmdline: String,
    /// How long a boot may take before it is given up.
    pub boot_timeout_s: u64,
    /// Longest TTL a VM may ask for; longer ones are cut to it.
    pub ttl_max_s: u64,
    /// Limits of every tenant (the manager can override them per tenant).
    pub quotas: kiln_core::TenantQuotas,
    pub host: HostCapacity,
    pub qemu: QemuConfig,
    /// VM networking (`[vm.network]`): used only by VMs that ask for it.
    pub network: crate::net::NetConfig,
}

impl Default for VmManagerConfig {
    fn default() -> Self {
        VmManagerConfig {
            accelerator: AcceleratorChoice::Auto,
            snapshots: true,
            extra_cmdline: String::new(),
            boot_timeout_s: 60,
            ttl_max_s: 7 * 24 * 3600,
            quotas: kiln_core::TenantQuotas::default(),
            host: HostCapacity::default(),
            qemu: QemuConfig::default(),
            network: crate::net::NetConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_refuse_unknown_fields_and_fill_defaults() {
        let parsed: VmManagerConfig = serde_json::from_value(
            serde_json::json!({"accelerator": "tcg", "qemu": {"cpu": "max"}}),
        )
        .unwrap();
        assert_eq!(parsed.accelerator, AcceleratorChoice::Tcg);
        assert_eq!(parsed.qemu.cpu.as_deref(), Some("max"));
        assert!(parsed.qemu.sandbox && parsed.snapshots);
        for bad in [
            serde_json::json!({"acclerator": "tcg"}),
            serde_json::json!({"qemu": {"sandbx": false}}),
            serde_json::json!({"host": {"vms": 1}}),
            serde_json::json!({"accelerator": "hvf"}),
        ] {
            assert!(
                serde_json::from_value::<VmManagerConfig>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}
