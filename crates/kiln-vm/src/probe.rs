//! Which accelerator a host has: KVM when a tiny boot under it answers,
//! else TCG; asked once per host and cached.

use std::path::Path;
use std::time::Duration;

use crate::config::{QemuConfig, VmManagerConfig};
use crate::image::Image;
use crate::manager::boot_source;
use crate::run_dir::remove_run_dir;
use crate::{qemu, Accelerator, BootSource, MachineConfig, VmConfig};

/// Whether `/dev/kvm` can be opened for reading and writing.
pub(crate) fn kvm_device_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Uses KVM when a tiny boot under it answers, else TCG; the answer is
/// cached in `cache_file` so each host pays for the probe once. The probe
/// VM's run directory is made in `work_dir`.
pub async fn probe_accelerator(image: &Image, work_dir: &Path, cache_file: &Path) -> Accelerator {
    let config = VmManagerConfig::default();
    let boot = boot_source(image, &config.extra_cmdline);
    probe_accelerator_with(&config.qemu, &boot, image.drives(), work_dir, cache_file).await
}

pub(crate) async fn probe_accelerator_with(
    qemu_config: &QemuConfig,
    boot: &BootSource,
    drives: Vec<crate::Drive>,
    work_dir: &Path,
    cache_file: &Path,
) -> Accelerator {
    match std::fs::read_to_string(cache_file)
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("kvm") => return Accelerator::Kvm,
        Some("tcg") => return Accelerator::Tcg,
        _ => {}
    }
    let mut found = Accelerator::Tcg;
    if kvm_device_usable() {
        let config = VmConfig {
            id: format!("probe-{}", std::process::id()),
            boot: boot.clone(),
            machine: MachineConfig {
                vcpus: 1,
                memory_mib: 128,
            },
            drives,
            network: Vec::new(),
            run_dir: work_dir.join(format!("probe-{}", std::process::id())),
        };
        let vmm = qemu::QemuVmm::new(Accelerator::Kvm, qemu_config.clone());
        if let Ok(mut vm) = vmm.start(&config, Duration::from_secs(8)).await {
            let true_exec = crate::Exec {
                command: "true".into(),
                ..crate::Exec::default()
            };
            if vm
                .agent
                .exec(true_exec, b"")
                .await
                .is_ok_and(|o| o.exit_code == Some(0))
            {
                found = Accelerator::Kvm;
            }
            vm.child.kill().await;
        }
        remove_run_dir(&config.run_dir);
    }
    tracing::info!(
        accelerator = found.as_str(),
        "microVM accelerator chosen by a probe boot"
    );
    let _ = std::fs::write(cache_file, found.as_str());
    found
}
