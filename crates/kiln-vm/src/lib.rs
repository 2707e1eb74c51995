//! kiln's microVM sandboxes.
//!
//! The driver interface mirrors Firecracker's API resources one to one —
//! boot source, machine config, drives, network interfaces, start,
//! snapshot — so a Firecracker driver can stand beside the QEMU `microvm`
//! driver without changing callers.

pub mod agent;
pub mod cpio;
pub mod image;
pub mod job;
pub mod manager;
pub mod qemu;
pub mod qmp;
pub mod testing;

use std::path::PathBuf;

pub use agent::{AgentConn, ExecEvent, ExecOutput};
pub use kiln_proto::Exec;
pub use manager::{VmInfo, VmManager, VmRequest};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VM did not come up.
    #[error("boot failed: {0}")]
    Boot(String),
    /// The guest agent failed or misbehaved.
    #[error("guest agent: {0}")]
    Agent(String),
    /// Host-side I/O.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Another process manages VMs in the same directory.
    #[error("{0}")]
    InUse(String),
}

/// Firecracker's `boot-source`.
#[derive(Clone, Debug)]
pub struct BootSource {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Added to the driver's own kernel command line.
    pub extra_cmdline: String,
    /// The kernel finds devices through ACPI tables; without, the driver
    /// lists them on the command line (as Firecracker always does).
    pub acpi: bool,
}

/// Firecracker's `machine-config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    pub vcpus: u8,
    pub memory_mib: u32,
}

/// Firecracker's `drives` (none are used yet: the root is the initramfs).
#[derive(Clone, Debug)]
pub struct Drive {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// Firecracker's `network-interfaces` (off by default: no interface but `lo`).
#[derive(Clone, Debug)]
pub struct NetworkInterface {
    pub id: String,
    pub tap: String,
    pub mac: String,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub id: String,
    pub boot: BootSource,
    pub machine: MachineConfig,
    pub drives: Vec<Drive>,
    pub network: Vec<NetworkInterface>,
    /// Sockets, logs and other per-VM files; removed with the VM.
    pub run_dir: PathBuf,
}

/// A booted VM as a driver hands it over: its VMM process and the
/// connection to its agent.
pub struct MicroVm {
    pub child: tokio::process::Child,
    pub agent: AgentConn,
    pub run_dir: PathBuf,
    pub booted_in: std::time::Duration,
}

/// A VMM driver. Each operation is one Firecracker API call (or a short
/// sequence of them), so a Firecracker driver fits beside the QEMU one
/// without changing callers.
#[async_trait::async_trait]
pub trait Vmm: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    fn accelerator(&self) -> Accelerator;

    /// Names everything a saved state of a VM booted from `boot` depends on
    /// besides its shape (accelerator, CPU model, VMM version, kernel
    /// command line): a state restores only where this is the same.
    fn snapshot_key(&self, boot: &BootSource) -> String;

    /// Firecracker: `PUT /boot-source`, `/machine-config`, `/drives`,
    /// `/vsock`, `/network-interfaces`, then `PUT /actions InstanceStart`.
    /// Returns once the guest agent answers.
    async fn start(
        &self,
        config: &VmConfig,
        timeout: std::time::Duration,
    ) -> Result<MicroVm, VmError>;

    /// Firecracker: `PUT /snapshot/load` with `resume_vm`.
    async fn restore(
        &self,
        config: &VmConfig,
        state: &std::path::Path,
        timeout: std::time::Duration,
    ) -> Result<MicroVm, VmError>;

    /// Firecracker: `PATCH /vm Paused`, `PUT /snapshot/create`, `PATCH /vm
    /// Resumed`. The VM runs on afterwards.
    async fn snapshot(&self, vm: &MicroVm, state: &std::path::Path) -> Result<(), VmError>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}
