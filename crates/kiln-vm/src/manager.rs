//! Live VMs of this process: create (boot), exec, files, delete; TTL and
//! idle expiry; and a reaper for what a crashed predecessor left behind.
//!
//! Every VM lives in `<vm_dir>/<id>/` (sockets, log, `pid`), so after a
//! crash the next start finds and kills its QEMU processes and removes the
//! directories.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::image::Image;
use crate::{qemu, Accelerator, AgentConn, BootSource, MachineConfig, VmConfig, VmError};

#[derive(Clone, Debug)]
pub struct VmRequest {
    pub tenant: String,
    pub image: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub ttl: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VmInfo {
    pub id: String,
    pub tenant: String,
    pub image: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub accelerator: Accelerator,
    pub labels: BTreeMap<String, String>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub boot_ms: u64,
    pub pid: Option<u32>,
}

struct LiveVm {
    info: VmInfo,
    agent: AgentConn,
    child: tokio::process::Child,
    run_dir: PathBuf,
    created: Instant,
    last_used: Mutex<Instant>,
    ttl: Option<Duration>,
    idle_timeout: Option<Duration>,
}

pub struct VmManager {
    images_dir: PathBuf,
    vm_dir: PathBuf,
    accelerator: Accelerator,
    vmm: Arc<dyn crate::Vmm>,
    vms: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<LiveVm>>>>>,
    boot_timeout: Duration,
    snapshots: std::sync::atomic::AtomicBool,
    warm: Mutex<HashMap<PoolKey, Vec<LiveVm>>>,
    warm_sizes: Mutex<HashMap<PoolKey, usize>>,
    /// One refill at a time: boots compete for the same cores.
    filling: tokio::sync::Mutex<()>,
    closing: std::sync::atomic::AtomicBool,
    /// Held for the manager's life: the start-up reaper kills every VM in
    /// `vm_dir`, so a second process on the same directory must not start.
    _lock: std::fs::File,
}

/// Image, vCPUs, memory: what makes VMs interchangeable.
type PoolKey = (String, u8, u32);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "vm-{:x}{:04x}",
        nanos % (1u128 << 48),
        N.fetch_add(1, Ordering::Relaxed) % 0xffff
    )
}

impl VmManager {
    /// With the QEMU `microvm` driver on the given accelerator.
    pub fn new(
        images_dir: &Path,
        vm_dir: &Path,
        accelerator: Accelerator,
    ) -> Result<Arc<VmManager>, VmError> {
        VmManager::with_vmm(
            images_dir,
            vm_dir,
            Arc::new(qemu::QemuVmm::new(accelerator)),
        )
    }

    /// Reaps leftovers in `vm_dir`, then is ready to boot VMs with `vmm`.
    pub fn with_vmm(
        images_dir: &Path,
        vm_dir: &Path,
        vmm: Arc<dyn crate::Vmm>,
    ) -> Result<Arc<VmManager>, VmError> {
        std::fs::create_dir_all(vm_dir)?;
        let lock = lock_dir(vm_dir)?;
        let accelerator = vmm.accelerator();
        let reaped = reap(vm_dir);
        if reaped > 0 {
            tracing::info!(reaped, "removed VMs left behind by an earlier run");
        }
        Ok(Arc::new(VmManager {
            images_dir: images_dir.to_path_buf(),
            vm_dir: vm_dir.to_path_buf(),
            accelerator,
            vmm,
            vms: Mutex::default(),
            boot_timeout: Duration::from_secs(60),
            snapshots: std::sync::atomic::AtomicBool::new(
                std::env::var_os("KILN_VM_SNAPSHOTS").is_none_or(|v| v != "0"),
            ),
            warm: Mutex::default(),
            warm_sizes: Mutex::default(),
            filling: tokio::sync::Mutex::new(()),
            closing: std::sync::atomic::AtomicBool::new(false),
            _lock: lock,
        }))
    }

    pub fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    /// Restores the shape's snapshot when there is one; otherwise boots and
    /// saves a snapshot for the next VM of this shape. Every restored VM gets
    /// fresh entropy and the host's clock before anyone uses it.
    async fn start_vm(
        &self,
        config: &VmConfig,
        snapshot: &Path,
    ) -> Result<crate::MicroVm, VmError> {
        let snapshots = self.snapshots.load(std::sync::atomic::Ordering::Relaxed);
        if snapshots && snapshot.exists() {
            match self.vmm.restore(config, snapshot, self.boot_timeout).await {
                Ok(vm) => {
                    freshen(&vm.agent).await?;
                    metrics::histogram!("kiln_vm_start_seconds", "how" => "restore")
                        .record(vm.booted_in.as_secs_f64());
                    return Ok(vm);
                }
                Err(error) => {
                    tracing::warn!(%error, snapshot = %snapshot.display(), "restore failed; booting and replacing the snapshot");
                    let _ = std::fs::remove_file(snapshot);
                    let _ = std::fs::remove_dir_all(&config.run_dir);
                }
            }
        }
        let vm = match self.vmm.start(config, self.boot_timeout).await {
            Ok(vm) => vm,
            Err(error) => {
                metrics::counter!("kiln_vm_boot_failures_total").increment(1);
                return Err(error);
            }
        };
        metrics::histogram!("kiln_vm_start_seconds", "how" => "boot")
            .record(vm.booted_in.as_secs_f64());
        if snapshots {
            if let Some(dir) = snapshot.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            settle_clock(&vm.agent).await;
            match self.vmm.snapshot(&vm, snapshot).await {
                Ok(()) => drop_stale_snapshots(snapshot, config.machine),
                Err(error) => {
                    tracing::warn!(%error, "could not save a snapshot; VMs of this shape will boot")
                }
            }
        }
        Ok(vm)
    }

    /// Boots (or restores) a VM of a shape, owned by no one yet.
    async fn boot(&self, image_name: &str, vcpus: u8, memory_mib: u32) -> Result<LiveVm, VmError> {
        let image =
            Image::open(&self.images_dir, image_name).map_err(|e| VmError::Boot(e.to_string()))?;
        let id = new_id();
        let run_dir = self.vm_dir.join(&id);
        let config = VmConfig {
            id: id.clone(),
            boot: boot_source(&image),
            machine: MachineConfig { vcpus, memory_mib },
            drives: Vec::new(),
            network: Vec::new(),
            run_dir: run_dir.clone(),
        };
        let snapshot = self.snapshot_file(&image, &config.boot, vcpus, memory_mib);
        let vm = match self.start_vm(&config, &snapshot).await {
            Ok(vm) => vm,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&run_dir);
                return Err(error);
            }
        };
        let pid = vm.child.id();
        if let Some(pid) = pid {
            std::fs::write(run_dir.join("pid"), pid.to_string())?;
        }
        Ok(LiveVm {
            info: VmInfo {
                id,
                tenant: String::new(),
                image: image_name.to_string(),
                vcpus,
                memory_mib,
                accelerator: self.accelerator,
                labels: BTreeMap::new(),
                created_at_ms: now_ms(),
                expires_at_ms: None,
                boot_ms: vm.booted_in.as_millis() as u64,
                pid,
            },
            agent: vm.agent,
            child: vm.child,
            run_dir,
            created: Instant::now(),
            last_used: Mutex::new(Instant::now()),
            ttl: None,
            idle_timeout: None,
        })
    }

    /// A running VM for the request: from the warm pool when one of its
    /// shape is ready, else booted (or restored) now.
    pub async fn create(self: &Arc<Self>, request: VmRequest) -> Result<VmInfo, VmError> {
        let started = Instant::now();
        let key = (request.image.clone(), request.vcpus, request.memory_mib);
        let pooled = self
            .warm
            .lock()
            .expect("warm pool")
            .get_mut(&key)
            .and_then(|pool| pool.pop());
        let from_pool = pooled.is_some();
        let mut live = match pooled {
            Some(live) => live,
            None => {
                self.boot(&request.image, request.vcpus, request.memory_mib)
                    .await?
            }
        };
        if self
            .warm_sizes
            .lock()
            .expect("warm sizes")
            .contains_key(&key)
        {
            self.refill(key);
        }
        let created_at_ms = now_ms();
        live.info.tenant = request.tenant;
        live.info.labels = request.labels;
        live.info.created_at_ms = created_at_ms;
        live.info.expires_at_ms = request
            .ttl
            .map(|ttl| created_at_ms + ttl.as_millis() as i64);
        if from_pool {
            live.info.boot_ms = started.elapsed().as_millis() as u64;
            metrics::histogram!("kiln_vm_start_seconds", "how" => "pool")
                .record(started.elapsed().as_secs_f64());
        }
        live.created = Instant::now();
        live.last_used = Mutex::new(Instant::now());
        live.ttl = request.ttl;
        live.idle_timeout = request.idle_timeout;
        let info = live.info.clone();
        self.vms.lock().expect("vms").insert(
            info.id.clone(),
            Arc::new(tokio::sync::Mutex::new(Some(live))),
        );
        Ok(info)
    }

    /// Keeps `size` ready VMs of this shape (booted in the background).
    pub fn keep_warm(self: &Arc<Self>, image: &str, vcpus: u8, memory_mib: u32, size: usize) {
        let key = (image.to_string(), vcpus, memory_mib);
        self.warm_sizes
            .lock()
            .expect("warm sizes")
            .insert(key.clone(), size);
        self.refill(key);
    }

    fn refill(self: &Arc<Self>, key: (String, u8, u32)) {
        let manager = self.clone();
        tokio::spawn(async move {
            let _filling = manager.filling.lock().await;
            loop {
                let want = manager
                    .warm_sizes
                    .lock()
                    .expect("warm sizes")
                    .get(&key)
                    .copied()
                    .unwrap_or(0);
                let have = manager
                    .warm
                    .lock()
                    .expect("warm pool")
                    .get(&key)
                    .map_or(0, Vec::len);
                if have >= want || manager.closing.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                match manager.boot(&key.0, key.1, key.2).await {
                    Ok(live) => manager
                        .warm
                        .lock()
                        .expect("warm pool")
                        .entry(key.clone())
                        .or_default()
                        .push(live),
                    Err(error) => {
                        tracing::warn!(%error, "could not fill the warm pool");
                        return;
                    }
                }
            }
        });
    }

    /// Ready VMs waiting in the warm pool.
    /// VMs handed out and not yet deleted, across tenants.
    pub fn live_count(&self) -> usize {
        self.vms.lock().expect("vms").len()
    }

    pub fn warm_count(&self) -> usize {
        self.warm
            .lock()
            .expect("warm pool")
            .values()
            .map(Vec::len)
            .sum()
    }

    /// A VM's slot by id; callers check the tenant under the slot's lock.
    fn slot(&self, id: &str) -> Option<Arc<tokio::sync::Mutex<Option<LiveVm>>>> {
        self.vms.lock().expect("vms").get(id).cloned()
    }

    /// The agent of a tenant's VM, marking it used.
    pub async fn agent(&self, tenant: &str, id: &str) -> Option<AgentConn> {
        let slot = self.slot(id)?;
        let guard = slot.lock().await;
        let live = guard.as_ref().filter(|vm| vm.info.tenant == tenant)?;
        *live.last_used.lock().expect("last used") = Instant::now();
        Some(live.agent.clone())
    }

    pub async fn get(&self, tenant: &str, id: &str) -> Option<VmInfo> {
        let slot = self.slot(id)?;
        let guard = slot.lock().await;
        guard
            .as_ref()
            .filter(|vm| vm.info.tenant == tenant)
            .map(|vm| vm.info.clone())
    }

    pub async fn list(&self, tenant: &str) -> Vec<VmInfo> {
        let slots: Vec<_> = self.vms.lock().expect("vms").values().cloned().collect();
        let mut out = Vec::new();
        for slot in slots {
            if let Some(vm) = slot.lock().await.as_ref() {
                if vm.info.tenant == tenant {
                    out.push(vm.info.clone());
                }
            }
        }
        out.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
        out
    }

    /// Stops the VM and removes everything it had. False if no such VM.
    pub async fn delete(&self, tenant: &str, id: &str) -> bool {
        let Some(slot) = self.slot(id) else {
            return false;
        };
        let mut guard = slot.lock().await;
        if guard.as_ref().is_none_or(|vm| vm.info.tenant != tenant) {
            return false;
        }
        let vm = guard.take().expect("checked");
        self.vms.lock().expect("vms").remove(id);
        destroy(vm).await;
        true
    }

    /// Deletes VMs past their TTL or idle timeout; returns how many.
    pub async fn expire(&self) -> usize {
        let slots: Vec<(String, Arc<tokio::sync::Mutex<Option<LiveVm>>>)> = self
            .vms
            .lock()
            .expect("vms")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut n = 0;
        for (id, slot) in slots {
            let mut guard = slot.lock().await;
            let expired = guard.as_ref().is_some_and(|vm| {
                vm.ttl.is_some_and(|ttl| vm.created.elapsed() >= ttl)
                    || vm.idle_timeout.is_some_and(|idle| {
                        vm.last_used.lock().expect("last used").elapsed() >= idle
                    })
            });
            if expired {
                let vm = guard.take().expect("checked");
                self.vms.lock().expect("vms").remove(&id);
                destroy(vm).await;
                n += 1;
            }
        }
        n
    }

    /// Deletes every VM, pooled ones included (at shutdown).
    pub async fn shutdown(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _filling = self.filling.lock().await;
        let pooled: Vec<LiveVm> = self
            .warm
            .lock()
            .expect("warm pool")
            .drain()
            .flat_map(|(_, v)| v)
            .collect();
        for vm in pooled {
            destroy(vm).await;
        }
        let slots: Vec<_> = self
            .vms
            .lock()
            .expect("vms")
            .drain()
            .map(|(_, v)| v)
            .collect();
        for slot in slots {
            if let Some(vm) = slot.lock().await.take() {
                destroy(vm).await;
            }
        }
    }

    /// Whether new VMs restore from (and first boots save) snapshots; on
    /// unless `KILN_VM_SNAPSHOTS=0`.
    pub fn use_snapshots(&self, on: bool) {
        self.snapshots
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn vm_dir(&self) -> &Path {
        &self.vm_dir
    }

    /// Where the snapshot of a shape lives: a state only restores into the
    /// same image, driver settings (see [`crate::Vmm::snapshot_key`]), vCPU
    /// count and memory size.
    fn snapshot_file(
        &self,
        image: &Image,
        boot: &BootSource,
        vcpus: u8,
        memory_mib: u32,
    ) -> PathBuf {
        image.dir.join("snapshots").join(format!(
            "{}-{vcpus}x{memory_mib}.state",
            self.vmm.snapshot_key(boot)
        ))
    }

    /// The snapshot file new VMs of this shape of an image restore from
    /// (benchmarks and tests remove it to time a first boot).
    pub fn snapshot_path(
        &self,
        image_name: &str,
        vcpus: u8,
        memory_mib: u32,
    ) -> Result<PathBuf, VmError> {
        let image =
            Image::open(&self.images_dir, image_name).map_err(|e| VmError::Boot(e.to_string()))?;
        let boot = boot_source(&image);
        Ok(self.snapshot_file(&image, &boot, vcpus, memory_mib))
    }
}

/// How every VM of an image boots (`KILN_VM_CMDLINE` adds kernel words).
fn boot_source(image: &Image) -> BootSource {
    BootSource {
        kernel: image.kernel(),
        initrd: Some(image.initramfs()),
        extra_cmdline: std::env::var("KILN_VM_CMDLINE").unwrap_or_default(),
        acpi: image.acpi(),
    }
}

/// Removes the shape's snapshots made under other settings (an older QEMU,
/// other kernel words): they would never load again, and each is the size
/// of the guest's memory.
fn drop_stale_snapshots(current: &Path, machine: MachineConfig) {
    let shape = format!("-{}x{}.state", machine.vcpus, machine.memory_mib);
    let Some(dir) = current.parent() else { return };
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path != current && name.ends_with(&shape) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Waits (at most 3 s) until the guest has left its boot-time `tsc-early`
/// clocksource: a state saved before the kernel's one-second TSC
/// calibration ends would have every restored VM redo it, and a VM whose
/// clock checks fail across the restore would fall back to jiffies.
async fn settle_clock(agent: &AgentConn) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let exec = crate::Exec {
            command: "cat".into(),
            args: vec!["/sys/devices/system/clocksource/clocksource0/current_clocksource".into()],
            ..crate::Exec::default()
        };
        match agent.exec(exec, b"").await {
            Ok(out) if out.stdout.trim_ascii() != b"tsc-early" => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => return,
        }
    }
}

/// A restored VM starts as a copy of its snapshot: credit fresh host
/// entropy to its pool and reseed its CRNG at once (a write to
/// /dev/urandom would only mix the pool, and clones would draw the same
/// bytes until the kernel's next scheduled reseed), then set its clock, so
/// no two VMs share either.
async fn freshen(agent: &AgentConn) -> Result<(), VmError> {
    let mut seed = [0u8; 256];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
    agent
        .add_entropy(&seed)
        .await
        .map_err(|e| VmError::Agent(format!("freshening a restored VM: {e}")))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().min(u64::MAX as u128) as u64)
        .unwrap_or(0);
    agent
        .set_clock(now)
        .await
        .map_err(|e| VmError::Agent(format!("setting a restored VM's clock: {e}")))?;
    Ok(())
}

async fn destroy(mut vm: LiveVm) {
    let _ = tokio::time::timeout(Duration::from_millis(200), vm.agent.shutdown()).await;
    let _ = vm.child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), vm.child.wait()).await;
    let _ = std::fs::remove_dir_all(&vm.run_dir);
}

/// An exclusive lock on `<vm_dir>/.lock`; the kernel drops it when the
/// process dies, however it dies.
fn lock_dir(vm_dir: &Path) -> Result<std::fs::File, VmError> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(vm_dir.join(".lock"))?;
    // SAFETY: flock(2) on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(VmError::InUse(format!(
            "{} is in use by another kiln process (one data dir per kiln serve or worker host)",
            vm_dir.display()
        )));
    }
    Ok(file)
}

/// Kills the QEMU processes recorded under `vm_dir` (checking that each pid
/// still belongs to a QEMU started for that directory) and removes the
/// directories. Returns how many directories were removed.
pub fn reap(vm_dir: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(vm_dir).into_iter().flatten().flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        if let Some(pid) = std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains(&*dir.to_string_lossy()) {
                // SAFETY: kill(2) on a pid whose command line names this VM's
                // own directory, so it is the QEMU kiln started for it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            n += 1;
        }
    }
    n
}

/// Uses KVM when a tiny boot under it answers, else TCG; the answer is
/// cached in `cache_file` so each host pays for the probe once.
pub async fn probe_accelerator(image: &Image, work_dir: &Path, cache_file: &Path) -> Accelerator {
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
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        let config = VmConfig {
            id: "probe".into(),
            boot: boot_source(image),
            machine: MachineConfig {
                vcpus: 1,
                memory_mib: 128,
            },
            drives: Vec::new(),
            network: Vec::new(),
            run_dir: work_dir.join(format!("probe-{}", std::process::id())),
        };
        if let Ok(vm) = qemu::start(&config, Accelerator::Kvm, Duration::from_secs(8)).await {
            if vm
                .agent
                .exec(
                    crate::Exec {
                        command: "true".into(),
                        ..crate::Exec::default()
                    },
                    b"",
                )
                .await
                .is_ok_and(|o| o.exit_code == Some(0))
            {
                found = Accelerator::Kvm;
            }
            let mut child = vm.child;
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        let _ = std::fs::remove_dir_all(&config.run_dir);
    }
    tracing::info!(
        accelerator = found.as_str(),
        "microVM accelerator chosen by a probe boot"
    );
    let _ = std::fs::write(cache_file, found.as_str());
    found
}
