//! kiln's microVM sandboxes.
//!
//! The driver interface mirrors Firecracker's API resources one to one —
//! boot source, machine config, drives, network interfaces, start,
//! snapshot — so a Firecracker driver can stand beside the QEMU `microvm`
//! driver without changing callers.

pub mod agent;
pub mod capacity;
pub mod config;
pub mod cpio;
pub mod history;
pub mod image;
pub mod jail;
pub mod job;
pub mod kernel;
pub mod manager;
pub mod net;
pub mod probe;
pub mod qemu;
pub mod qmp;
pub mod rootfs;
pub mod run_dir;
pub mod testing;

use std::path::PathBuf;
use std::time::Duration;

pub use agent::{AgentConn, ExecControl, ExecEvent, ExecOutput, SecretHold};
pub use config::{AcceleratorChoice, HostCapacity, QemuConfig, VmManagerConfig};
pub use kiln_proto::{Entry, EntryKind, Exec, PtySize};
pub use manager::{VmInfo, VmLifecycle, VmManager, VmRequest};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The image is not there, or its name is not an identifier.
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// The tenant holds as many VMs, or as much VM memory, as it may.
    #[error(transparent)]
    QuotaExceeded(#[from] kiln_core::QuotaExceeded),
    /// The host has no room for the VM now; another try may find some.
    #[error("no capacity for the VM on this host: {reason}")]
    NoCapacity {
        reason: &'static str,
        retry_after_s: u64,
    },
    /// QEMU could not be started.
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    /// QEMU exited before the guest answered.
    #[error("qemu exited during the boot ({status}): {log}")]
    Exited { status: String, log: String },
    /// The guest did not answer within the boot timeout.
    #[error("no answer from the guest agent within {0:?}")]
    BootTimeout(Duration),
    /// QEMU's control protocol failed or answered with an error.
    #[error("qmp: {0}")]
    Qmp(String),
    /// The accelerator asked for is not usable on this host.
    #[error("accelerator {0} is not available on this host")]
    NoAccelerator(&'static str),
    /// The guest agent failed or misbehaved.
    #[error("guest agent: {0}")]
    Agent(String),
    /// Host-side I/O.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The VM's network cannot be what was asked (networking off on this
    /// host, an `allow` host name without an address).
    #[error("{0}")]
    NetworkRefused(String),
    /// Building the VM's network failed.
    #[error("network: {0}")]
    Network(String),
    /// Another process manages VMs in the same directory.
    #[error("{0}")]
    InUse(String),
    /// The VM cannot do what was asked in its state (pausing a VM with a
    /// network, say).
    #[error("{0}")]
    Refused(String),
}

/// Firecracker's `boot-source`.
#[derive(Clone, Debug)]
pub struct BootSource {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Added to the driver's own kernel command line (from configuration,
    /// never from a request).
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

/// Firecracker's `drives`: a root filesystem image's base, read-only and
/// shared by every VM of the image.
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
    /// The TAP's name in kiln's namespace (Firecracker's `host_dev_name`).
    pub tap: String,
    pub mac: String,
    /// The open TAP, handed to the VMM instead of its name (QEMU: `-netdev
    /// tap,fd=N`); the device goes when the VMM's copy closes.
    pub fd: std::sync::Arc<std::os::fd::OwnedFd>,
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
    pub child: jail::VmProcess,
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
