//! The QEMU `microvm` driver. The host↔guest channel is a virtio-serial
//! port bound to a Unix socket (this host has no vhost-vsock); the guest
//! agent finds it by its name, `agent`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::agent::AgentConn;
use crate::{Accelerator, BootSource, MicroVm, VmConfig, VmError};

/// The QEMU `microvm` driver.
pub struct QemuVmm {
    pub accelerator: Accelerator,
}

impl QemuVmm {
    /// Measures the host TSC and asks QEMU its version now, at start-up:
    /// both block (a 50 ms measurement, a subprocess) and every boot needs
    /// them, so the first boot must not pay them on a runtime thread.
    pub fn new(accelerator: Accelerator) -> QemuVmm {
        host_tsc_khz();
        qemu_version();
        QemuVmm { accelerator }
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
        hash.update(qemu_version().as_bytes());
        hash.update([0]);
        hash.update(kernel_words(boot).as_bytes());
        hash.update(machine(boot).as_bytes());
        hash.update(firmware().unwrap_or_default().as_bytes());
        format!(
            "{}-{}-{}",
            self.accelerator.as_str(),
            cpu_model(self.accelerator).replace(['/', ','], "_"),
            &hex::encode(hash.finalize())[..12]
        )
    }

    async fn start(&self, config: &VmConfig, timeout: Duration) -> Result<MicroVm, VmError> {
        start(config, self.accelerator, timeout).await
    }

    async fn restore(
        &self,
        config: &VmConfig,
        state: &Path,
        timeout: Duration,
    ) -> Result<MicroVm, VmError> {
        restore(config, self.accelerator, state, timeout).await
    }

    /// QMP `migrate` to a file, then `cont`.
    async fn snapshot(&self, vm: &MicroVm, file: &Path) -> Result<(), VmError> {
        let mut qmp =
            crate::qmp::Qmp::connect(&vm.run_dir.join("qmp.sock"), Duration::from_secs(5)).await?;
        // Two VMs of a new shape may save at once: each writes its own file
        // and the complete one is renamed into place, never a shared one that
        // is still being written.
        let vm_name = vm.run_dir.file_name().unwrap_or_default().to_string_lossy();
        let tmp = file.with_extension(format!("{vm_name}.partial"));
        qmp.save(&tmp, Duration::from_secs(60)).await?;
        qmp.execute("cont", serde_json::json!({})).await?;
        std::fs::rename(&tmp, file)?;
        Ok(())
    }
}

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

/// The guest CPU model: `KILN_QEMU_CPU`, else the host's under KVM and the
/// plain x86-64 model under TCG, which emulates faster than `max` (process
/// start-up in the guest ~15 % quicker, measured).
pub fn cpu_model(accel: Accelerator) -> String {
    std::env::var("KILN_QEMU_CPU").unwrap_or_else(|_| {
        match accel {
            Accelerator::Kvm => "host",
            Accelerator::Tcg => "qemu64",
        }
        .to_string()
    })
}

pub fn qemu_binary() -> PathBuf {
    std::env::var_os("KILN_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
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

/// The kernel command line but for the host's TSC frequency, which
/// `/proc/cpuinfo` reports with jitter on hosts that scale their clock: the
/// part a snapshot depends on.
/// qboot, QEMU's minimal firmware, which loads a PVH kernel with option
/// ROMs off. Debian's QEMU 7.2 uses it for microvm anyway; QEMU 10 from
/// backports pairs microvm with SeaBIOS, which cannot, so kiln asks for
/// qboot by name wherever it is installed.
fn firmware() -> Option<&'static str> {
    std::path::Path::new("/usr/share/qemu/qboot.rom")
        .exists()
        .then_some("qboot.rom")
}

fn kernel_words(boot: &BootSource) -> String {
    // panic=-1 turns a guest crash into an exit. tsc=reliable: the guest
    // TSC is the host's; without it a guest with no second clock to check
    // it against (the minimal kernel) may save its snapshot still on
    // tsc-early and, restored, fall back to jiffies.
    let mut words = String::from("quiet loglevel=0 panic=-1 reboot=t rdinit=/init tsc=reliable");
    if !boot.extra_cmdline.is_empty() {
        words.push(' ');
        words.push_str(&boot.extra_cmdline);
    }
    words
}

fn kernel_cmdline(boot: &BootSource) -> String {
    let mut cmdline = kernel_words(boot);
    // Without an early TSC frequency the TCG guest calibrates for a long
    // time and sometimes hangs.
    if let Some(khz) = host_tsc_khz() {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    cmdline
}

/// The first line of `qemu-system-x86_64 --version`, asked once: a state
/// saved by one QEMU release need not load into another.
fn qemu_version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        std::process::Command::new(qemu_binary())
            .arg("--version")
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_default()
    })
}

fn args(
    config: &VmConfig,
    accel: Accelerator,
    agent_socket: &Path,
    qmp_socket: &Path,
) -> Vec<String> {
    let cmdline = kernel_cmdline(&config.boot);
    let mut args: Vec<String> = vec![
        "-M".into(),
        machine(&config.boot),
        "-cpu".into(),
        cpu_model(accel),
        "-accel".into(),
        accel.as_str().into(),
        "-m".into(),
        format!("{}M", config.machine.memory_mib),
        "-smp".into(),
        config.machine.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        config.boot.kernel.display().to_string(),
        "-append".into(),
        cmdline,
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            agent_socket.display()
        ),
        "-device".into(),
        "virtserialport,chardev=agent,name=agent".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_socket.display()),
    ];
    if let Some(bios) = firmware() {
        args.push("-bios".into());
        args.push(bios.into());
    }
    if let Some(initrd) = &config.boot.initrd {
        args.push("-initrd".into());
        args.push(initrd.display().to_string());
    }
    args
}

/// Boots a VM and waits until its agent answers.
pub async fn start(
    config: &VmConfig,
    accel: Accelerator,
    boot_timeout: Duration,
) -> Result<MicroVm, VmError> {
    launch(config, accel, boot_timeout, None).await
}

/// Starts a VM from a state saved by [`QemuVm::save`] with the same
/// configuration, and waits until its agent answers.
pub async fn restore(
    config: &VmConfig,
    accel: Accelerator,
    state: &Path,
    timeout: Duration,
) -> Result<MicroVm, VmError> {
    launch(config, accel, timeout, Some(state)).await
}

async fn launch(
    config: &VmConfig,
    accel: Accelerator,
    boot_timeout: Duration,
    incoming: Option<&Path>,
) -> Result<MicroVm, VmError> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.run_dir)?;
    let agent_socket = config.run_dir.join("agent.sock");
    let qmp_socket = config.run_dir.join("qmp.sock");
    let _ = std::fs::remove_file(&agent_socket);
    let _ = std::fs::remove_file(&qmp_socket);
    let log = std::fs::File::create(config.run_dir.join("qemu.log"))?;
    let mut qemu_args = args(config, accel, &agent_socket, &qmp_socket);
    if let Some(state) = incoming {
        qemu_args.push("-incoming".into());
        qemu_args.push(format!("exec:cat '{}'", state.display()));
    }
    let mut child = Command::new(qemu_binary())
        .args(qemu_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| VmError::Boot(format!("starting {}: {e}", qemu_binary().display())))?;
    let deadline = started + boot_timeout;
    if incoming.is_some() {
        let resumed = async {
            let mut qmp = crate::qmp::Qmp::connect(&qmp_socket, boot_timeout).await?;
            qmp.resume_after_incoming(boot_timeout).await
        }
        .await;
        if let Err(error) = resumed {
            let _ = child.kill().await;
            return Err(error);
        }
    }
    let agent = loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(config.run_dir.join("qemu.log")).unwrap_or_default();
            return Err(VmError::Boot(format!(
                "qemu exited ({status}): {}",
                log.trim()
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill().await;
            return Err(VmError::Boot(format!(
                "no answer from the guest agent within {boot_timeout:?}"
            )));
        }
        if let Ok(stream) = tokio::net::UnixStream::connect(&agent_socket).await {
            let agent = AgentConn::new(stream);
            // Frames sent before the guest opens its port are lost: ping
            // until one is answered.
            let answered = loop {
                if Instant::now() > deadline {
                    break false;
                }
                if agent.ping(Duration::from_millis(50)).await.is_ok() {
                    break true;
                }
                if child.try_wait()?.is_some() || agent.is_closed() {
                    break false;
                }
            };
            if answered {
                break agent;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    Ok(MicroVm {
        child,
        agent,
        run_dir: config.run_dir.clone(),
        booted_in: started.elapsed(),
    })
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
