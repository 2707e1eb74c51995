//! The QEMU `microvm` driver. The host↔guest channel is a virtio-serial
//! port bound to a Unix socket (this host has no vhost-vsock); the guest
//! agent finds it by its name, `agent`.
//!
//! QEMU is confined (see [`crate::jail`]): seccomp (`-sandbox on`), an
//! unprivileged user when kiln is root, a cgroup of its own, death with
//! kiln. It opens no host path: kiln opens the kernel, the initrd, the
//! sockets and saved states and hands them over as descriptors, and a
//! state is saved to a descriptor passed over QMP — no shell ever runs.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::agent::AgentConn;
use crate::config::QemuConfig;
use crate::jail::{self, Cgroups, Confinement, RunAs};
use crate::{Accelerator, BootSource, MicroVm, VmConfig, VmError};

/// The seccomp policy: QEMU's own filter with every optional group denied.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The QEMU `microvm` driver.
pub struct QemuVmm {
    pub accelerator: Accelerator,
    config: QemuConfig,
    /// The first line of `qemu-system-x86_64 --version`: a state saved by
    /// one QEMU release need not load into another.
    version: String,
    /// Whether this QEMU was built with seccomp (`-sandbox`).
    sandbox: bool,
    run_as: Option<RunAs>,
    cgroups: Option<Cgroups>,
}

impl QemuVmm {
    /// Measures the host TSC, asks QEMU its version and whether it has
    /// seccomp, finds the user QEMU runs as and the cgroup tree, all now, at
    /// start-up: each blocks, and every boot needs them.
    pub fn new(accelerator: Accelerator, config: QemuConfig) -> QemuVmm {
        host_tsc_khz();
        let (version, sandbox) = probe_qemu(&config);
        if config.sandbox && !sandbox {
            tracing::error!(
                qemu = %config.binary.display(),
                "QEMU IS NOT SANDBOXED: this QEMU was built without seccomp (-sandbox); guests that escape QEMU reach the host unhindered"
            );
        }
        let run_as = jail::resolve_user(&config);
        let cgroups = match Cgroups::prepare(&config) {
            Ok(cgroups) => Some(cgroups),
            Err(why) => {
                tracing::warn!(%why, "VMs run without a cgroup of their own (no memory.max or pids.max)");
                None
            }
        };
        tracing::info!(
            %version,
            sandbox = config.sandbox && sandbox,
            user = run_as.as_ref().map_or("(kiln's own)", |r| r.user.as_str()),
            cgroups = cgroups.is_some(),
            "QEMU confinement"
        );
        QemuVmm {
            accelerator,
            sandbox: config.sandbox && sandbox,
            config,
            version,
            run_as,
            cgroups,
        }
    }

    /// The user QEMU runs as, when kiln is root.
    pub fn user(&self) -> Option<&RunAs> {
        self.run_as.as_ref()
    }

    /// Whether VMs get a cgroup of their own.
    pub fn has_cgroups(&self) -> bool {
        self.cgroups.is_some()
    }

    /// Whether QEMU runs under its seccomp filter.
    pub fn sandboxed(&self) -> bool {
        self.sandbox
    }

    /// The guest CPU model: the configured one, else the host's under KVM
    /// and the plain x86-64 model under TCG, which emulates faster than
    /// `max` (process start-up in the guest ~15 % quicker, measured).
    pub fn cpu_model(&self) -> String {
        self.config.cpu.clone().unwrap_or_else(|| {
            match self.accelerator {
                Accelerator::Kvm => "host",
                Accelerator::Tcg => "qemu64",
            }
            .to_string()
        })
    }

    /// Boots a VM and waits until its agent answers.
    pub async fn start(&self, config: &VmConfig, timeout: Duration) -> Result<MicroVm, VmError> {
        self.launch(config, timeout, None).await
    }

    /// Starts a VM from a state saved by [`crate::Vmm::snapshot`] with the
    /// same configuration, and waits until its agent answers.
    pub async fn restore(
        &self,
        config: &VmConfig,
        state: &Path,
        timeout: Duration,
    ) -> Result<MicroVm, VmError> {
        self.launch(config, timeout, Some(state)).await
    }
}

/// QEMU's version line, and whether it accepts `-sandbox` (a QEMU built
/// without seccomp refuses the option while parsing, before `--version`).
fn probe_qemu(config: &QemuConfig) -> (String, bool) {
    let version = |sandbox: bool| {
        let mut command = std::process::Command::new(&config.binary);
        if sandbox {
            command.args(["-sandbox", SANDBOX]);
        }
        command
            .arg("--version")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
    };
    match version(true) {
        Some(line) => (line, true),
        None => (version(false).unwrap_or_default(), false),
    }
}

#[async_trait::async_trait]
impl crate::Vmm for QemuVmm {
    fn name(&self) -> &'static str {
        "qemu-microvm"
    }

    fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    fn snapshot_key(&self, boot: &BootSource) -> String {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        hash.update(self.version.as_bytes());
        hash.update([0]);
        hash.update(kernel_words(boot, self.accelerator).as_bytes());
        hash.update(machine(boot).as_bytes());
        hash.update(firmware().unwrap_or_default().as_bytes());
        // The key becomes part of a file name: only identifier characters.
        let cpu: String = self
            .cpu_model()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!(
            "{}-{cpu}-{}",
            self.accelerator.as_str(),
            &hex::encode(hash.finalize())[..12]
        )
    }

    async fn start(&self, config: &VmConfig, timeout: Duration) -> Result<MicroVm, VmError> {
        QemuVmm::start(self, config, timeout).await
    }

    async fn restore(
        &self,
        config: &VmConfig,
        state: &Path,
        timeout: Duration,
    ) -> Result<MicroVm, VmError> {
        QemuVmm::restore(self, config, state, timeout).await
    }

    /// QMP `migrate` to a descriptor of a new file, then `cont`.
    async fn snapshot(&self, vm: &MicroVm, file: &Path) -> Result<(), VmError> {
        let mut qmp =
            crate::qmp::Qmp::connect(&vm.run_dir.join("qmp.sock"), Duration::from_secs(5)).await?;
        // Two VMs of a new shape may save at once: each writes its own file
        // and the complete one is renamed into place, never a shared one that
        // is still being written.
        let vm_name = vm.run_dir.file_name().unwrap_or_default().to_string_lossy();
        let partial = PartialState::create(
            file.with_extension(format!("{vm_name}.partial")),
            &vm.run_dir,
        )?;
        qmp.save(partial.file()?, Duration::from_secs(60)).await?;
        qmp.execute("cont", serde_json::json!({})).await?;
        partial.commit(file)?;
        Ok(())
    }
}

/// A state being saved: `<name>.<vm>.partial` beside its final name, noted
/// in the VM's run directory (`snapshot`) so that the reaper removes it
/// after a crash, and removed on drop unless committed.
struct PartialState {
    path: PathBuf,
    marker: PathBuf,
    committed: bool,
}

impl PartialState {
    fn create(path: PathBuf, run_dir: &Path) -> Result<PartialState, VmError> {
        let marker = run_dir.join(PARTIAL_MARKER);
        std::fs::write(&marker, path.as_os_str().as_encoded_bytes())?;
        let partial = PartialState {
            path,
            marker,
            committed: false,
        };
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial.path)?;
        Ok(partial)
    }

    fn file(&self) -> Result<std::fs::File, VmError> {
        Ok(std::fs::OpenOptions::new().write(true).open(&self.path)?)
    }

    fn commit(mut self, to: &Path) -> Result<(), VmError> {
        std::fs::rename(&self.path, to)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialState {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
        let _ = std::fs::remove_file(&self.marker);
    }
}

/// The file in a VM's run directory that names the state it is saving.
pub const PARTIAL_MARKER: &str = "snapshot";

/// The host's TSC frequency, measured once against the monotonic clock.
/// The guest's TSC is the host's; `cpu MHz` in /proc/cpuinfo is the core's
/// current clock, which is something else on hosts that scale it (a guest
/// told that would keep time at the wrong rate).
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: rdtsc reads a counter; it has no preconditions.
            let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
            // The raw monotonic clock: the kernel's own TSC rate, free of
            // NTP's slewing (which would show as an error of up to 500 ppm).
            let raw_ns = || {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: clock_gettime writes into the timespec it is given.
                unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) };
                ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
            };
            // A counter reading and the clock's time around it, kept from
            // the tightest of a few tries: a preempted pair would be off by
            // the whole preemption.
            let sample = || {
                (0..16)
                    .map(|_| {
                        let (before, count, after) = (raw_ns(), tsc(), raw_ns());
                        (after.saturating_sub(before), before / 2 + after / 2, count)
                    })
                    .min()
                    .map(|(_, ns, count)| (ns, count))
                    .expect("sixteen tries")
            };
            let (t0, c0) = sample();
            std::thread::sleep(Duration::from_millis(50));
            let (t1, c1) = sample();
            let ns = t1.saturating_sub(t0);
            (ns > 0 && c1 > c0).then(|| (c1 - c0) * 1_000_000 / ns)
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    })
}

/// The microvm machine: no option ROMs or serial port (QEMU then loads the
/// kernel itself and the guest probes less); the RTC stays, since turning
/// it off costs the guest two seconds of boot. Without ACPI, QEMU lists
/// the virtio-mmio devices on the kernel command line.
fn machine(boot: &BootSource) -> String {
    let mut machine = String::from("microvm,x-option-roms=off,isa-serial=off,rtc=on");
    if !boot.acpi {
        machine.push_str(",acpi=off");
    }
    machine
}

/// qboot, QEMU's minimal firmware, which loads a PVH kernel with option
/// ROMs off. Debian's QEMU 7.2 uses it for microvm anyway; QEMU 10 from
/// backports pairs microvm with SeaBIOS, which cannot, so kiln asks for
/// qboot by name wherever it is installed.
fn firmware() -> Option<&'static str> {
    std::path::Path::new("/usr/share/qemu/qboot.rom")
        .exists()
        .then_some("qboot.rom")
}

/// The kernel command line but for the host's TSC frequency, which
/// `/proc/cpuinfo` reports with jitter on hosts that scale their clock: the
/// part a snapshot depends on.
fn kernel_words(boot: &BootSource, accelerator: Accelerator) -> String {
    // panic=-1 turns a guest crash into an exit. tsc=reliable: the guest
    // TSC is the host's; without it a guest with no second clock to check
    // it against (the minimal kernel) may save its snapshot still on
    // tsc-early and, restored, fall back to jiffies.
    let mut words = String::from("quiet loglevel=0 panic=-1 reboot=t rdinit=/init tsc=reliable");
    if accelerator == Accelerator::Tcg {
        // TCG finds code it translated by virtual address as well as
        // physical: with randomised mappings every new process of a
        // dynamically linked program (all of Debian's) translates ld.so,
        // glibc and itself afresh, 20-40 ms for `true`; at fixed addresses
        // it reuses the last process's translations, 2.5 ms. The VM is the
        // boundary between tenants; inside it, randomisation only guards
        // one tenant's processes from each other. Under KVM it stays on.
        words.push_str(" norandmaps");
    }
    if !boot.extra_cmdline.is_empty() {
        words.push(' ');
        words.push_str(&boot.extra_cmdline);
    }
    words
}

fn kernel_cmdline(boot: &BootSource, accelerator: Accelerator) -> String {
    let mut cmdline = kernel_words(boot, accelerator);
    // Without an early TSC frequency the TCG guest calibrates for a long
    // time and sometimes hangs.
    if let Some(khz) = host_tsc_khz() {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    cmdline
}

/// What a QEMU process is handed instead of paths: listening sockets for
/// the agent and QMP, the kernel and initrd, and the state to restore.
struct Handed {
    agent: OwnedFd,
    qmp: OwnedFd,
    kernel: OwnedFd,
    initrd: Option<OwnedFd>,
    incoming: Option<OwnedFd>,
    /// The VM's drives, in the order of `VmConfig::drives`.
    drives: Vec<OwnedFd>,
    /// One TAP per network interface, in the order of `VmConfig::network`.
    taps: Vec<OwnedFd>,
}

impl Handed {
    /// Opens everything in kiln's name: the run directory (created here)
    /// holds the sockets, and no file is opened by QEMU itself.
    fn open(config: &VmConfig, incoming: Option<&Path>) -> Result<Handed, VmError> {
        let listen = |name: &str| -> Result<OwnedFd, VmError> {
            let path = config.run_dir.join(name);
            let _ = std::fs::remove_file(&path);
            Ok(std::os::unix::net::UnixListener::bind(&path)?.into())
        };
        let open =
            |path: &Path| -> Result<OwnedFd, VmError> { Ok(std::fs::File::open(path)?.into()) };
        Ok(Handed {
            agent: listen("agent.sock")?,
            qmp: listen("qmp.sock")?,
            kernel: open(&config.boot.kernel)?,
            initrd: config.boot.initrd.as_deref().map(open).transpose()?,
            incoming: incoming.map(open).transpose()?,
            drives: config
                .drives
                .iter()
                .map(|drive| -> Result<OwnedFd, VmError> {
                    Ok(std::fs::OpenOptions::new()
                        .read(true)
                        .write(!drive.read_only)
                        .open(&drive.path)?
                        .into())
                })
                .collect::<Result<_, VmError>>()?,
            taps: config
                .network
                .iter()
                .map(|nic| nic.fd.try_clone())
                .collect::<Result<_, _>>()?,
        })
    }

    fn into_fds(self) -> Vec<OwnedFd> {
        [
            Some(self.agent),
            Some(self.qmp),
            Some(self.kernel),
            self.initrd,
            self.incoming,
        ]
        .into_iter()
        .flatten()
        .chain(self.drives)
        .chain(self.taps)
        .collect()
    }
}

/// `/proc/self/fd/N`: how QEMU, which takes only file names for the kernel
/// and initrd, reads a descriptor it inherited.
fn inherited(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

impl QemuVmm {
    /// The whole QEMU command line of a VM.
    fn args(&self, config: &VmConfig, handed: &Handed) -> Vec<String> {
        let mut args: Vec<String> = vec![
            // Names the run directory: the reaper kills a recorded pid only
            // if its command line says it is this VM's QEMU.
            "-name".into(),
            format!(
                "guest={}",
                jail::qemu_opt_value(&config.run_dir.to_string_lossy())
            ),
            "-M".into(),
            machine(&config.boot),
            "-cpu".into(),
            self.cpu_model(),
            "-accel".into(),
            self.accelerator.as_str().into(),
            "-m".into(),
            format!("{}M", config.machine.memory_mib),
            "-smp".into(),
            config.machine.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
        ];
        if self.sandbox {
            args.extend(["-sandbox".into(), SANDBOX.into()]);
        }
        args.extend([
            "-kernel".into(),
            inherited(&handed.kernel),
            "-append".into(),
            kernel_cmdline(&config.boot, self.accelerator),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,fd={},server=on,wait=off",
                handed.agent.as_raw_fd()
            ),
            "-device".into(),
            "virtserialport,chardev=agent,name=agent".into(),
            "-chardev".into(),
            format!(
                "socket,id=qmp,fd={},server=on,wait=off",
                handed.qmp.as_raw_fd()
            ),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]);
        if let Some(bios) = firmware() {
            args.extend(["-bios".into(), bios.into()]);
        }
        if let Some(initrd) = &handed.initrd {
            args.extend(["-initrd".into(), inherited(initrd)]);
        }
        for (n, (drive, fd)) in config.drives.iter().zip(&handed.drives).enumerate() {
            let mut spec = format!("if=none,id=drive{n},format=raw,file={}", inherited(fd));
            if drive.read_only {
                // Shared by every VM of the image: QEMU refuses writes, and
                // a shared lock lets them all open it at once.
                spec.push_str(",readonly=on");
            }
            args.extend([
                "-drive".into(),
                spec,
                "-device".into(),
                format!("virtio-blk-device,drive=drive{n}"),
            ]);
        }
        for (nic, tap) in config.network.iter().zip(&handed.taps) {
            // Ids and MACs are kiln's own (`net0`, hex pairs): no comma.
            args.extend([
                "-netdev".into(),
                format!("tap,id={},fd={}", nic.id, tap.as_raw_fd()),
                "-device".into(),
                format!("virtio-net-device,netdev={},mac={}", nic.id, nic.mac),
            ]);
        }
        if let Some(state) = &handed.incoming {
            args.extend(["-incoming".into(), format!("fd:{}", state.as_raw_fd())]);
        }
        args
    }

    /// Starts QEMU confined, its pid recorded in `<run_dir>/pid` before it
    /// runs.
    async fn spawn(&self, config: &VmConfig, handed: Handed) -> Result<jail::VmProcess, VmError> {
        let log = std::fs::File::create(config.run_dir.join("qemu.log"))?;
        let mut command = Command::new(&self.config.binary);
        command
            .args(self.args(config, &handed))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let pid_file = std::fs::File::create(config.run_dir.join("pid"))?;
        let cgroup = match &self.cgroups {
            Some(cgroups) => {
                let memory =
                    (u64::from(config.machine.memory_mib) + self.config.overhead_mib) << 20;
                match cgroups.create(&config.id, memory, self.config.pids_max) {
                    Ok(cgroup) => {
                        // For the reaper, which removes it after a crash.
                        std::fs::write(
                            config.run_dir.join("cgroup"),
                            cgroup.0.as_os_str().as_encoded_bytes(),
                        )?;
                        Some(cgroup)
                    }
                    Err(error) => {
                        tracing::warn!(%error, vm = %config.id, "the VM runs without a cgroup");
                        None
                    }
                }
            }
            None => None,
        };
        jail::spawn(
            command,
            Confinement {
                pid_file,
                cgroup,
                run_as: self.run_as.clone(),
                pass: handed.into_fds(),
            },
        )
        .await
    }

    async fn launch(
        &self,
        config: &VmConfig,
        boot_timeout: Duration,
        incoming: Option<&Path>,
    ) -> Result<MicroVm, VmError> {
        let started = Instant::now();
        // Private: the QMP socket in it commands the whole VM.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.run_dir)?;
        let handed = Handed::open(config, incoming)?;
        let mut child = self.spawn(config, handed).await?;
        let deadline = started + boot_timeout;
        if incoming.is_some() {
            let qmp_socket = config.run_dir.join("qmp.sock");
            let resumed = async {
                let mut qmp = crate::qmp::Qmp::connect(&qmp_socket, boot_timeout).await?;
                qmp.resume_after_incoming(boot_timeout).await
            }
            .await;
            if let Err(error) = resumed {
                child.kill().await;
                return Err(error);
            }
        }
        match wait_for_agent(config, &mut child, deadline).await {
            Ok(agent) => Ok(MicroVm {
                child,
                agent,
                run_dir: config.run_dir.clone(),
                booted_in: started.elapsed(),
            }),
            Err(error) => {
                child.kill().await;
                Err(error)
            }
        }
    }
}

/// Pings the agent until it answers, QEMU exits or the deadline passes.
async fn wait_for_agent(
    config: &VmConfig,
    child: &mut jail::VmProcess,
    deadline: Instant,
) -> Result<AgentConn, VmError> {
    let agent_socket = config.run_dir.join("agent.sock");
    let timeout = deadline.saturating_duration_since(Instant::now());
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(config.run_dir.join("qemu.log")).unwrap_or_default();
            return Err(VmError::Exited {
                status: status.to_string(),
                log: log.trim().to_string(),
            });
        }
        if Instant::now() > deadline {
            return Err(VmError::BootTimeout(timeout));
        }
        if let Ok(stream) = tokio::net::UnixStream::connect(&agent_socket).await {
            let agent = AgentConn::new(stream);
            // Frames sent before the guest opens its port are lost: ping
            // until one is answered.
            loop {
                if Instant::now() > deadline {
                    break;
                }
                if agent.ping(Duration::from_millis(50)).await.is_ok() {
                    return Ok(agent);
                }
                if child.try_wait()?.is_some() || agent.is_closed() {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_host_tsc_frequency_is_measured_plausibly() {
        let khz = super::host_tsc_khz().expect("an x86-64 host has a TSC");
        eprintln!("host TSC: {khz} kHz");
        // Between 500 MHz and 10 GHz, and the same on a second ask.
        assert!((500_000..10_000_000).contains(&khz), "{khz} kHz");
        assert_eq!(super::host_tsc_khz(), Some(khz));
    }
}
