//! Live VMs of this process: create (boot), exec, files, delete; TTL and
//! idle expiry; quotas and the host's capacity; and a reaper for what a
//! crashed predecessor left behind.
//!
//! Every VM lives in `<vm_dir>/<id>/` (sockets, log, `pid` written before
//! QEMU runs, the name of a state being saved), so after a crash the next
//! start finds and kills its QEMU processes, removes half-written states
//! and cgroups, and removes the directories.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::capacity::{lock, Capacity, HostSlot, TenantSlot};
use crate::config::{AcceleratorChoice, VmManagerConfig};
use crate::image::Image;
use crate::net::host::{HostNetwork, Nic};
use crate::net::{Egress, NetConfig, NetworkSpec};
pub use crate::probe::probe_accelerator;
use crate::probe::{kvm_device_usable, probe_accelerator_with};
pub use crate::run_dir::{qemu_pids_under, reap};
use crate::run_dir::{remove_run_dir, take_dir};
use crate::{
    qemu, Accelerator, AgentConn, BootSource, MachineConfig, NetworkInterface, VmConfig, VmError,
};
use std::net::Ipv4Addr;

#[derive(Clone, Debug)]
pub struct VmRequest {
    pub tenant: String,
    pub image: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub ttl: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub labels: BTreeMap<String, String>,
    /// None: the VM has no interface but `lo`.
    pub network: Option<NetworkSpec>,
}

/// A networked VM's side of its network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetInfo {
    pub address: Ipv4Addr,
    pub mac: String,
    pub gateway: Ipv4Addr,
    pub egress: Egress,
    pub expose: Vec<u16>,
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
    pub network: Option<NetInfo>,
}

struct LiveVm {
    info: VmInfo,
    agent: AgentConn,
    child: crate::jail::VmProcess,
    run_dir: PathBuf,
    created: Instant,
    last_used: Arc<Mutex<Instant>>,
    /// Commands running now (see [`VmManager::use_agent`]): idle expiry
    /// leaves a busy VM alone.
    busy: Arc<AtomicUsize>,
    ttl: Option<Duration>,
    idle_timeout: Option<Duration>,
    /// The VM's room on the host and in its tenant's quota, given back
    /// when the VM goes.
    _host: HostSlot,
    _tenant: Option<TenantSlot>,
    /// Its NIC, released when the VM goes.
    nic: Option<(Arc<HostNetwork>, Nic)>,
}

type Slot = Arc<tokio::sync::Mutex<Option<LiveVm>>>;

/// A paused VM: its whole state (memory, and so its tmpfs overlay) in one
/// file, and what it needs to run again. It holds no room on the host.
struct PausedVm {
    info: VmInfo,
    state: PathBuf,
    /// Its agent connection as it was: the restored guest's continues it.
    agent: AgentConn,
    /// The TTL it had left; it does not run down while paused.
    ttl_left: Option<Duration>,
    idle_timeout: Option<Duration>,
}

/// Paused VMs one manager keeps (each is a file the size of the memory
/// its guest touched).
const PAUSED_MAX: usize = 256;
/// Paused VMs one tenant keeps, so one cannot take every place.
const PAUSED_PER_TENANT_MAX: usize = 32;

pub struct VmManager {
    images_dir: PathBuf,
    vm_dir: PathBuf,
    accelerator: Accelerator,
    vmm: Arc<dyn crate::Vmm>,
    config: VmManagerConfig,
    capacity: Arc<Capacity>,
    vms: Mutex<HashMap<String, Slot>>,
    snapshots: AtomicBool,
    warm: Mutex<HashMap<PoolKey, Vec<LiveVm>>>,
    paused: Mutex<HashMap<String, PausedVm>>,
    warm_sizes: Mutex<HashMap<PoolKey, usize>>,
    /// One refill at a time: boots compete for the same cores.
    filling: tokio::sync::Mutex<()>,
    closing: AtomicBool,
    /// Where lifecycle changes go (the event log), once someone listens.
    lifecycle: Mutex<Option<tokio::sync::mpsc::Sender<VmLifecycle>>>,
    /// Where jobs record the commands they run (execution history).
    history: std::sync::OnceLock<kiln_db::Db>,
    /// This host's tag among many VM hosts, put in every id it gives.
    host: std::sync::OnceLock<String>,
    /// Where commands' output goes as it is produced (live logs).
    logs: std::sync::OnceLock<kiln_logs::LogSink>,
    /// Opens the secrets jobs ask for.
    secrets: std::sync::OnceLock<kiln_worker::secrets::SecretKeeper>,
    /// VM networking, once attached (with the database its addresses
    /// live in).
    network: std::sync::OnceLock<Arc<HostNetwork>>,
    /// Held for the manager's life: the start-up reaper kills every VM in
    /// `vm_dir`, so a second process on the same directory must not start.
    _lock: std::fs::File,
}

/// A VM's life as the event log records it: `vm.created`, `vm.deleted`,
/// `vm.expired` (its TTL or idle timeout ran out).
#[derive(Clone, Debug)]
pub struct VmLifecycle {
    pub kind: &'static str,
    pub info: VmInfo,
    /// For `vm.expired`: `ttl` or `idle`.
    pub reason: Option<&'static str>,
}

/// Lifecycle changes waiting for the listener; past this (a stalled
/// database) newer ones are dropped with a warning rather than held.
const LIFECYCLE_BUFFER: usize = 4096;

/// Image, vCPUs, memory: what makes VMs interchangeable.
type PoolKey = (String, u8, u32);

/// When a VM with `ttl` from `from_ms` ends (saturating: a TTL is capped
/// before it gets here, but the sum never overflows).
fn ends_at(from_ms: i64, ttl: Duration) -> i64 {
    from_ms.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `vm-<time><n>`, and `@<host>` when the manager is one VM host of many:
/// any node learns a VM's owner from its id alone.
fn new_id(host: Option<&str>) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let local = format!(
        "vm-{:x}{:04x}",
        nanos % (1u128 << 48),
        N.fetch_add(1, Ordering::Relaxed) % 0xffff
    );
    match host {
        Some(host) => format!("{local}@{host}"),
        None => local,
    }
}

/// The host a VM id names (`vm-…@<host>`), if any.
pub fn owner_of(vm_id: &str) -> Option<&str> {
    vm_id
        .split_once('@')
        .map(|(_, host)| host)
        .filter(|host| !host.is_empty())
}

/// The longest host tag: `vm-` + 16 hex digits + `@` + the tag must stay
/// within a name's 64 characters.
pub const HOST_TAG_MAX: usize = 40;

/// A VM host's tag from its node id: the id itself when it is short and
/// plain enough, else a digest of it.
pub fn host_tag(node_id: &str) -> String {
    let plain = node_id.len() <= HOST_TAG_MAX
        && !node_id.contains('@')
        && kiln_core::names::check_name("node id", node_id).is_ok();
    if plain {
        node_id.to_string()
    } else {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(node_id.as_bytes());
        format!("h{}", &hex::encode(digest)[..16])
    }
}

/// A VM being booted: its run directory (and a state it was saving) is
/// removed if the boot fails or its future is dropped, so a cancelled
/// create leaves nothing behind.
struct Booting {
    run_dir: PathBuf,
    done: bool,
}

impl Drop for Booting {
    fn drop(&mut self) {
        if !self.done {
            remove_run_dir(&self.run_dir);
        }
    }
}

/// An agent in use for a command: while any is held the VM counts as busy
/// and idle expiry leaves it alone; the idle clock restarts when the last
/// one goes.
pub struct AgentInUse {
    agent: AgentConn,
    busy: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

impl std::ops::Deref for AgentInUse {
    type Target = AgentConn;
    fn deref(&self) -> &AgentConn {
        &self.agent
    }
}

impl Drop for AgentInUse {
    fn drop(&mut self) {
        *lock(&self.last_used) = Instant::now();
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl VmManager {
    /// Starts the manager as configured: takes the directory's lock, reaps
    /// what a crashed run left, and settles the accelerator (`auto` probes
    /// KVM with a boot inside `vm_dir`, under the lock, so a crash during
    /// the probe is reaped too).
    pub async fn start(
        images_dir: &Path,
        vm_dir: &Path,
        config: VmManagerConfig,
    ) -> Result<Arc<VmManager>, VmError> {
        let lock = take_dir(vm_dir)?;
        let accelerator = match config.accelerator {
            AcceleratorChoice::Tcg => Accelerator::Tcg,
            AcceleratorChoice::Kvm if kvm_device_usable() => Accelerator::Kvm,
            AcceleratorChoice::Kvm => return Err(VmError::NoAccelerator("kvm")),
            // The probe boots the default image, else any there is.
            AcceleratorChoice::Auto => match Image::open(images_dir, "default")
                .ok()
                .or_else(|| Image::list(images_dir).into_iter().next())
            {
                Some(image) => {
                    let boot = boot_source(&image, &config.extra_cmdline);
                    probe_accelerator_with(
                        &config.qemu,
                        &boot,
                        image.drives(),
                        vm_dir,
                        &vm_dir.join(".accelerator"),
                    )
                    .await
                }
                None if kvm_device_usable() => Accelerator::Kvm,
                None => Accelerator::Tcg,
            },
        };
        let vmm = Arc::new(qemu::QemuVmm::new(accelerator, config.qemu.clone()));
        Ok(VmManager::assemble(images_dir, vm_dir, config, vmm, lock))
    }

    /// With the QEMU `microvm` driver on the given accelerator and default
    /// settings.
    pub fn new(
        images_dir: &Path,
        vm_dir: &Path,
        accelerator: Accelerator,
    ) -> Result<Arc<VmManager>, VmError> {
        VmManager::with_config(images_dir, vm_dir, accelerator, VmManagerConfig::default())
    }

    /// With the QEMU `microvm` driver on the given accelerator.
    pub fn with_config(
        images_dir: &Path,
        vm_dir: &Path,
        accelerator: Accelerator,
        config: VmManagerConfig,
    ) -> Result<Arc<VmManager>, VmError> {
        let lock = take_dir(vm_dir)?;
        let vmm = Arc::new(qemu::QemuVmm::new(accelerator, config.qemu.clone()));
        Ok(VmManager::assemble(images_dir, vm_dir, config, vmm, lock))
    }

    /// Reaps leftovers in `vm_dir`, then is ready to boot VMs with `vmm`.
    pub fn with_vmm(
        images_dir: &Path,
        vm_dir: &Path,
        config: VmManagerConfig,
        vmm: Arc<dyn crate::Vmm>,
    ) -> Result<Arc<VmManager>, VmError> {
        let lock = take_dir(vm_dir)?;
        Ok(VmManager::assemble(images_dir, vm_dir, config, vmm, lock))
    }

    fn assemble(
        images_dir: &Path,
        vm_dir: &Path,
        config: VmManagerConfig,
        vmm: Arc<dyn crate::Vmm>,
        lock: std::fs::File,
    ) -> Arc<VmManager> {
        let accelerator = vmm.accelerator();
        if accelerator == Accelerator::Tcg {
            tracing::warn!(
                "VMs RUN UNDER TCG EMULATION: QEMU's security policy does not cover TCG, so a guest escape there is not treated as a QEMU security bug; use KVM (accelerator = \"kvm\") for code nobody trusts"
            );
        }
        let capacity = Capacity::new(
            config.host.clone(),
            config.qemu.overhead_mib,
            config.quotas.clone(),
        );
        Arc::new(VmManager {
            images_dir: images_dir.to_path_buf(),
            vm_dir: vm_dir.to_path_buf(),
            accelerator,
            vmm,
            capacity,
            vms: Mutex::default(),
            snapshots: AtomicBool::new(config.snapshots),
            config,
            warm: Mutex::default(),
            paused: Mutex::default(),
            warm_sizes: Mutex::default(),
            filling: tokio::sync::Mutex::new(()),
            closing: AtomicBool::new(false),
            lifecycle: Mutex::new(None),
            history: std::sync::OnceLock::new(),
            host: std::sync::OnceLock::new(),
            logs: std::sync::OnceLock::new(),
            secrets: std::sync::OnceLock::new(),
            network: std::sync::OnceLock::new(),
            _lock: lock,
        })
    }

    pub fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    /// Gives a tenant limits other than the configured ones.
    pub fn set_tenant_quotas(&self, tenant: &str, quotas: kiln_core::TenantQuotas) {
        self.capacity.set_quotas(tenant, quotas);
    }

    fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.config.boot_timeout_s)
    }

    /// Restores the shape's snapshot when there is one; otherwise boots and
    /// saves a snapshot for the next VM of this shape. Every restored VM gets
    /// fresh entropy and the host's clock before anyone uses it.
    async fn start_vm(
        &self,
        config: &VmConfig,
        snapshot: &Path,
        warm_up: &[Vec<String>],
    ) -> Result<crate::MicroVm, VmError> {
        let snapshots = self.snapshots.load(Ordering::Relaxed);
        if snapshots && snapshot.exists() {
            match self
                .vmm
                .restore(config, snapshot, self.boot_timeout())
                .await
            {
                Ok(vm) => {
                    freshen(&vm.agent).await?;
                    metrics::histogram!("kiln_vm_start_seconds", "how" => "restore")
                        .record(vm.booted_in.as_secs_f64());
                    return Ok(vm);
                }
                Err(error) => {
                    tracing::warn!(%error, snapshot = %snapshot.display(), "restore failed; booting and replacing the snapshot");
                    let _ = std::fs::remove_file(snapshot);
                }
            }
        }
        let vm = match self.vmm.start(config, self.boot_timeout()).await {
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
            warm_up_page_cache(&vm.agent, warm_up).await;
            match self.vmm.snapshot(&vm, snapshot).await {
                Ok(()) => {
                    drop_stale_snapshots(snapshot, config.machine, !config.network.is_empty())
                }
                Err(error) => {
                    tracing::warn!(%error, "could not save a snapshot; VMs of this shape will boot")
                }
            }
        }
        Ok(vm)
    }

    /// Boots (or restores) a VM of a shape, owned by no one yet, in the
    /// room `host` holds for it.
    async fn boot(
        &self,
        image_name: &str,
        vcpus: u8,
        memory_mib: u32,
        host: HostSlot,
        network: Option<(&str, &NetworkSpec)>,
    ) -> Result<LiveVm, VmError> {
        let image = Image::open(&self.images_dir, image_name)?;
        let id = new_id(self.host.get().map(String::as_str));
        let run_dir = self.vm_dir.join(&id);
        let mut booting = Booting {
            run_dir: run_dir.clone(),
            done: false,
        };
        let nic = match network {
            Some((tenant, spec)) => {
                let net = self.network.get().cloned().ok_or_else(|| {
                    VmError::NetworkRefused("networking is not enabled on this VM host".to_string())
                })?;
                let nic = net.attach(&id, tenant, spec).await.map_err(net_error)?;
                Some((net, nic))
            }
            None => None,
        };
        let mut config = VmConfig {
            id: id.clone(),
            boot: boot_source(&image, &self.config.extra_cmdline),
            machine: MachineConfig { vcpus, memory_mib },
            drives: image.drives(),
            network: Vec::new(),
            run_dir: run_dir.clone(),
        };
        if let Some((_, nic)) = &nic {
            if let Some(fd) = &nic.fd {
                config.network.push(NetworkInterface {
                    id: "net0".into(),
                    tap: nic.tap.clone(),
                    mac: nic.mac.clone(),
                    fd: fd.clone(),
                });
            }
        }
        let snapshot = self.snapshot_file(&image, &config.boot, vcpus, memory_mib, nic.is_some());
        let warm_up = image
            .manifest
            .rootfs
            .as_ref()
            .map(|rootfs| rootfs.warm_up.clone())
            .unwrap_or_default();
        let started = self.start_vm(&config, &snapshot, &warm_up).await;
        // QEMU holds the TAP now (or failed): kiln's copy goes, so the
        // device lives exactly as long as QEMU.
        drop(config);
        let mut nic = nic;
        if let Some((_, nic)) = &mut nic {
            nic.fd = None;
        }
        let vm = match started {
            Ok(vm) => vm,
            Err(error) => {
                if let Some((net, nic)) = &nic {
                    net.release(nic).await;
                }
                return Err(error);
            }
        };
        if let Some((net, nic)) = &nic {
            if let Err(error) = configure_guest(&vm.agent, nic).await {
                let mut child = vm.child;
                child.kill().await;
                net.release(nic).await;
                return Err(error);
            }
        }
        booting.done = true;
        let network_info = nic.as_ref().map(|(_, nic)| NetInfo {
            address: nic.address,
            mac: nic.mac.clone(),
            gateway: nic.gateway,
            egress: network.map_or(Egress::None, |(_, spec)| spec.egress),
            expose: nic.expose.clone(),
        });
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
                boot_ms: u64::try_from(vm.booted_in.as_millis()).unwrap_or(u64::MAX),
                pid: vm.child.id(),
                network: network_info,
            },
            agent: vm.agent,
            child: vm.child,
            run_dir,
            created: Instant::now(),
            last_used: Arc::new(Mutex::new(Instant::now())),
            busy: Arc::default(),
            ttl: None,
            idle_timeout: None,
            _host: host,
            _tenant: None,
            nic,
        })
    }

    /// A running VM for the request: from the warm pool when one of its
    /// shape is ready, else booted (or restored) now. Refused before any
    /// boot when the image name is not an identifier or names no image,
    /// when the tenant is at its quota (`QuotaExceeded`), or when the host
    /// has no room (`NoCapacity`).
    pub async fn create(self: &Arc<Self>, request: VmRequest) -> Result<VmInfo, VmError> {
        let started = Instant::now();
        let image = Image::open(&self.images_dir, &request.image)?;
        let tenant_slot = self
            .capacity
            .reserve_tenant(&request.tenant, request.memory_mib)?;
        let key = (request.image.clone(), request.vcpus, request.memory_mib);
        // Pooled VMs have no NIC (a microvm cannot hot-plug one): a
        // networked VM is restored from its own shape's snapshot.
        let pooled = match request.network {
            Some(_) => None,
            None => lock(&self.warm).get_mut(&key).and_then(|pool| pool.pop()),
        };
        let from_pool = pooled.is_some();
        let mut live = match pooled {
            Some(live) => live,
            None => {
                let host = self.capacity.reserve_host(request.memory_mib)?;
                let network = request
                    .network
                    .as_ref()
                    .map(|spec| (request.tenant.as_str(), spec));
                self.boot(
                    &request.image,
                    request.vcpus,
                    request.memory_mib,
                    host,
                    network,
                )
                .await?
            }
        };
        if lock(&self.warm_sizes).contains_key(&key) {
            self.refill(key);
        }
        let created_at_ms = now_ms();
        // A TTL past the configured maximum is cut to it, so the expiry
        // time cannot overflow.
        let ttl = request
            .ttl
            .map(|ttl| ttl.min(Duration::from_secs(self.config.ttl_max_s)));
        // Set only now: kiln's own warm-up commands run as kiln chose.
        live.agent
            .set_exec_defaults(image.manifest.exec.clone().unwrap_or_default());
        live.info.tenant = request.tenant;
        live.info.labels = request.labels;
        live.info.created_at_ms = created_at_ms;
        live.info.expires_at_ms = ttl.map(|ttl| ends_at(created_at_ms, ttl));
        if from_pool {
            live.info.boot_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            metrics::histogram!("kiln_vm_start_seconds", "how" => "pool")
                .record(started.elapsed().as_secs_f64());
        }
        live.created = Instant::now();
        *lock(&live.last_used) = Instant::now();
        live.ttl = ttl;
        live.idle_timeout = request.idle_timeout;
        live._tenant = Some(tenant_slot);
        let info = live.info.clone();
        lock(&self.vms).insert(
            info.id.clone(),
            Arc::new(tokio::sync::Mutex::new(Some(live))),
        );
        self.tell("vm.created", &info, None);
        Ok(info)
    }

    /// The VMs' lifecycle changes from now on (one listener: a second call
    /// replaces the first).
    pub fn lifecycle(&self) -> tokio::sync::mpsc::Receiver<VmLifecycle> {
        let (tx, rx) = tokio::sync::mpsc::channel(LIFECYCLE_BUFFER);
        *lock(&self.lifecycle) = Some(tx);
        rx
    }

    /// Jobs record the commands they run into `db` from now on (the API
    /// records its own with its database).
    pub fn record_executions(&self, db: kiln_db::Db) {
        let _ = self.history.set(db);
    }

    /// Makes this manager one VM host of many: ids from now on name it.
    /// Set before the first VM boots (the warm pool included).
    pub fn set_host_tag(&self, tag: &str) {
        let _ = self.host.set(tag.to_string());
    }

    pub fn host_tag(&self) -> Option<&str> {
        self.host.get().map(String::as_str)
    }

    /// Free VM slots and free VM memory (MiB) on this host.
    pub fn room(&self) -> (u64, u64) {
        self.capacity.room()
    }

    /// Commands in this manager's VMs stream their output into `logs`
    /// from now on (jobs and the API alike); the first sink given stays.
    pub fn attach_logs(&self, logs: kiln_logs::LogSink) {
        let _ = self.logs.set(logs);
    }

    /// Jobs' commands are given the secrets they ask for from now on; the
    /// first keeper given stays. Without one, such jobs fail.
    pub fn attach_secrets(&self, keeper: kiln_worker::secrets::SecretKeeper) {
        let _ = self.secrets.set(keeper);
    }

    /// Opens the secrets `names` of `tenant` for `recipient` (audited).
    pub async fn open_secrets(
        &self,
        tenant: &str,
        names: &[String],
        recipient: &kiln_worker::secrets::Recipient,
    ) -> Result<kiln_worker::secrets::Opened, String> {
        if names.is_empty() {
            return Ok(kiln_worker::secrets::Opened::none());
        }
        match self.secrets.get() {
            Some(keeper) => keeper.open(tenant, names, recipient).await,
            None => {
                Err("this worker holds no master key, so it cannot deliver secrets".to_string())
            }
        }
    }

    /// Turns VM networking on, with `db` holding the addresses: removes
    /// what an earlier run's network left (namespace, rules, addresses),
    /// then builds the namespace on the first networked VM. Call before
    /// the first VM boots.
    pub async fn attach_network(
        &self,
        config: NetConfig,
        db: kiln_db::Db,
    ) -> Result<Arc<HostNetwork>, VmError> {
        let net = HostNetwork::new(&self.vm_dir, config, db).map_err(VmError::Network)?;
        net.reap().await.map_err(net_error)?;
        let net = Arc::new(net);
        let _ = self.network.set(net.clone());
        Ok(self.network.get().cloned().unwrap_or(net))
    }

    /// VM networking, when attached.
    pub fn network(&self) -> Option<&Arc<HostNetwork>> {
        self.network.get()
    }

    /// A connection to an exposed port of a tenant's VM, made from inside
    /// kiln's namespace. None: no such VM for the tenant, or the port is not
    /// one it exposes.
    pub async fn connect_port(
        &self,
        tenant: &str,
        id: &str,
        port: u16,
        timeout: Duration,
    ) -> Option<std::io::Result<tokio::net::TcpStream>> {
        let slot = self.slot(id)?;
        let (net, address) = {
            let guard = slot.lock().await;
            let live = guard.as_ref().filter(|vm| vm.info.tenant == tenant)?;
            let (net, nic) = live.nic.as_ref()?;
            if !nic.expose.contains(&port) {
                return None;
            }
            *lock(&live.last_used) = Instant::now();
            (net.clone(), nic.address)
        };
        Some(net.connect(address, port, timeout).await)
    }

    /// A tap for one command's output, once logs are attached.
    pub fn log_tap(&self, origin: kiln_logs::Origin) -> Option<kiln_logs::LogTap> {
        self.logs.get().map(|logs| logs.tap(origin))
    }

    /// The database jobs record executions into, once set.
    pub fn history(&self) -> Option<kiln_db::Db> {
        self.history.get().cloned()
    }

    fn tell(&self, kind: &'static str, info: &VmInfo, reason: Option<&'static str>) {
        let Some(tx) = lock(&self.lifecycle).clone() else {
            return;
        };
        let change = VmLifecycle {
            kind,
            info: info.clone(),
            reason,
        };
        if tx.try_send(change).is_err() {
            tracing::warn!(vm = %info.id, kind, "a VM lifecycle event was dropped: its listener is behind");
        }
    }

    /// Keeps `size` ready VMs of this shape (booted in the background).
    pub fn keep_warm(self: &Arc<Self>, image: &str, vcpus: u8, memory_mib: u32, size: usize) {
        let key = (image.to_string(), vcpus, memory_mib);
        lock(&self.warm_sizes).insert(key.clone(), size);
        self.refill(key);
    }

    fn refill(self: &Arc<Self>, key: PoolKey) {
        let manager = self.clone();
        tokio::spawn(async move {
            let _filling = manager.filling.lock().await;
            loop {
                let want = lock(&manager.warm_sizes).get(&key).copied().unwrap_or(0);
                let have = lock(&manager.warm).get(&key).map_or(0, Vec::len);
                if have >= want || manager.closing.load(Ordering::SeqCst) {
                    return;
                }
                // Warm VMs take host room like any other; a full host
                // simply has a smaller pool.
                let Ok(host) = manager.capacity.reserve_host(key.2) else {
                    return;
                };
                match manager.boot(&key.0, key.1, key.2, host, None).await {
                    Ok(live) => {
                        manager.warm_up_pooled(&key.0, &live.agent).await;
                        lock(&manager.warm)
                            .entry(key.clone())
                            .or_default()
                            .push(live)
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not fill the warm pool");
                        return;
                    }
                }
            }
        });
    }

    /// Readies a VM for the pool: under TCG a restored VM translates every
    /// guest code path on its first run (the agent's spawn, the program),
    /// so a first command costs tens of milliseconds even in the busybox
    /// image, and hundreds for Debian's dynamically linked programs. The
    /// pooled VM pays that now, running a program and the image's warm-up
    /// commands, before anyone has it.
    async fn warm_up_pooled(&self, image_name: &str, agent: &AgentConn) {
        let mut commands = vec![vec!["true".to_string()]];
        if let Some(rootfs) = Image::open(&self.images_dir, image_name)
            .ok()
            .and_then(|image| image.manifest.rootfs)
        {
            commands.extend(rootfs.warm_up);
        }
        warm_up_page_cache(agent, &commands).await;
    }

    /// VMs handed out and not yet deleted, across tenants.
    pub fn live_count(&self) -> usize {
        lock(&self.vms).len()
    }

    /// Ready VMs waiting in the warm pool.
    pub fn warm_count(&self) -> usize {
        lock(&self.warm).values().map(Vec::len).sum()
    }

    /// A VM's slot by id; callers check the tenant under the slot's lock.
    fn slot(&self, id: &str) -> Option<Slot> {
        lock(&self.vms).get(id).cloned()
    }

    /// The agent of a tenant's VM, marking it used.
    pub async fn agent(&self, tenant: &str, id: &str) -> Option<AgentConn> {
        let slot = self.slot(id)?;
        let guard = slot.lock().await;
        let live = guard.as_ref().filter(|vm| vm.info.tenant == tenant)?;
        *lock(&live.last_used) = Instant::now();
        Some(live.agent.clone())
    }

    /// The agent of a tenant's VM for a command: the VM counts as busy
    /// (idle expiry skips it) until the returned guard is dropped.
    pub async fn use_agent(&self, tenant: &str, id: &str) -> Option<AgentInUse> {
        let slot = self.slot(id)?;
        let guard = slot.lock().await;
        let live = guard.as_ref().filter(|vm| vm.info.tenant == tenant)?;
        live.busy.fetch_add(1, Ordering::SeqCst);
        *lock(&live.last_used) = Instant::now();
        Some(AgentInUse {
            agent: live.agent.clone(),
            busy: live.busy.clone(),
            last_used: live.last_used.clone(),
        })
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
        let slots: Vec<Slot> = lock(&self.vms).values().cloned().collect();
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

    /// Makes a tenant's VM end `ttl` from now (cut to the configured
    /// maximum), whatever its TTL was; its new info, or none if no such VM.
    pub async fn set_ttl(&self, tenant: &str, id: &str, ttl: Duration) -> Option<VmInfo> {
        let slot = self.slot(id)?;
        let mut guard = slot.lock().await;
        let live = guard.as_mut().filter(|vm| vm.info.tenant == tenant)?;
        let ttl = ttl.min(Duration::from_secs(self.config.ttl_max_s));
        live.ttl = Some(live.created.elapsed() + ttl);
        live.info.expires_at_ms = Some(ends_at(now_ms(), ttl));
        Some(live.info.clone())
    }

    /// Pauses a tenant's running VM: its state is saved to a file, its
    /// process stops and its room on the host and in the quota is given
    /// back. None if there is no such running VM.
    pub async fn pause(&self, tenant: &str, id: &str) -> Result<Option<VmInfo>, VmError> {
        let Some(slot) = self.slot(id) else {
            return Ok(None);
        };
        let mut guard = slot.lock().await;
        let Some(mut vm) = guard.take_if(|vm| vm.info.tenant == tenant) else {
            return Ok(None);
        };
        let refused = if vm.nic.is_some() {
            Some("a VM with a network cannot be paused (its NIC cannot be saved)")
        } else if lock(&self.paused).len() >= PAUSED_MAX {
            Some("too many paused VMs on this host")
        } else if lock(&self.paused)
            .values()
            .filter(|p| p.info.tenant == tenant)
            .count()
            >= PAUSED_PER_TENANT_MAX
        {
            Some("the tenant has as many paused VMs as it may keep")
        } else {
            None
        };
        if let Some(reason) = refused {
            *guard = Some(vm);
            return Err(VmError::Refused(reason.to_string()));
        }
        let state = self.vm_dir.join(format!("{id}.paused"));
        let micro = crate::MicroVm {
            child: vm.child,
            agent: vm.agent.clone(),
            run_dir: vm.run_dir.clone(),
            booted_in: Duration::ZERO,
        };
        let saved = self.vmm.snapshot(&micro, &state).await;
        vm.child = micro.child;
        if let Err(error) = saved {
            let _ = std::fs::remove_file(&state);
            *guard = Some(vm);
            return Err(error);
        }
        lock(&self.vms).remove(id);
        let info = vm.info.clone();
        let paused = PausedVm {
            info: info.clone(),
            state,
            agent: vm.agent.clone(),
            ttl_left: vm.ttl.map(|ttl| ttl.saturating_sub(vm.created.elapsed())),
            idle_timeout: vm.idle_timeout,
        };
        destroy(vm).await;
        lock(&self.paused).insert(id.to_string(), paused);
        Ok(Some(info))
    }

    /// A tenant's paused VM, as it was when paused.
    pub fn paused(&self, tenant: &str, id: &str) -> Option<VmInfo> {
        lock(&self.paused)
            .get(id)
            .filter(|p| p.info.tenant == tenant)
            .map(|p| p.info.clone())
    }

    /// Runs a tenant's paused VM again from its saved state, under the same
    /// id, with the TTL it had left (or `ttl` when given). None if there is
    /// no such paused VM; on failure it stays paused.
    pub async fn resume(
        &self,
        tenant: &str,
        id: &str,
        ttl: Option<Duration>,
    ) -> Result<Option<VmInfo>, VmError> {
        let paused = {
            let mut all = lock(&self.paused);
            match all.get(id) {
                Some(p) if p.info.tenant == tenant => all.remove(id),
                _ => None,
            }
        };
        let Some(paused) = paused else {
            return Ok(None);
        };
        match self.restore_paused(&paused, ttl).await {
            Ok(info) => {
                let _ = std::fs::remove_file(&paused.state);
                Ok(Some(info))
            }
            Err(error) => {
                lock(&self.paused).insert(id.to_string(), paused);
                Err(error)
            }
        }
    }

    async fn restore_paused(
        &self,
        paused: &PausedVm,
        ttl: Option<Duration>,
    ) -> Result<VmInfo, VmError> {
        let info = &paused.info;
        let image = Image::open(&self.images_dir, &info.image)?;
        let tenant_slot = self
            .capacity
            .reserve_tenant(&info.tenant, info.memory_mib)?;
        let host = self.capacity.reserve_host(info.memory_mib)?;
        let run_dir = self.vm_dir.join(&info.id);
        let mut booting = Booting {
            run_dir: run_dir.clone(),
            done: false,
        };
        let config = VmConfig {
            id: info.id.clone(),
            boot: boot_source(&image, &self.config.extra_cmdline),
            machine: MachineConfig {
                vcpus: info.vcpus,
                memory_mib: info.memory_mib,
            },
            drives: image.drives(),
            network: Vec::new(),
            run_dir: run_dir.clone(),
        };
        let started = Instant::now();
        let vm = self
            .vmm
            .restore(&config, &paused.state, self.boot_timeout())
            .await?;
        vm.agent.continue_from(&paused.agent);
        vm.agent
            .set_exec_defaults(image.manifest.exec.clone().unwrap_or_default());
        if let Err(error) = freshen(&vm.agent).await {
            let mut child = vm.child;
            child.kill().await;
            return Err(error);
        }
        booting.done = true;
        metrics::histogram!("kiln_vm_start_seconds", "how" => "resume")
            .record(started.elapsed().as_secs_f64());
        let ttl = ttl
            .or(paused.ttl_left)
            .map(|ttl| ttl.min(Duration::from_secs(self.config.ttl_max_s)));
        let mut info = info.clone();
        info.pid = vm.child.id();
        info.boot_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        info.expires_at_ms = ttl.map(|ttl| ends_at(now_ms(), ttl));
        let live = LiveVm {
            info: info.clone(),
            agent: vm.agent,
            child: vm.child,
            run_dir,
            created: Instant::now(),
            last_used: Arc::new(Mutex::new(Instant::now())),
            busy: Arc::default(),
            ttl,
            idle_timeout: paused.idle_timeout,
            _host: host,
            _tenant: Some(tenant_slot),
            nic: None,
        };
        lock(&self.vms).insert(
            info.id.clone(),
            Arc::new(tokio::sync::Mutex::new(Some(live))),
        );
        Ok(info)
    }

    /// Stops the VM and removes everything it had. False if no such VM.
    pub async fn delete(&self, tenant: &str, id: &str) -> bool {
        let paused = {
            let mut all = lock(&self.paused);
            match all.get(id) {
                Some(p) if p.info.tenant == tenant => all.remove(id),
                _ => None,
            }
        };
        if let Some(paused) = paused {
            let _ = std::fs::remove_file(&paused.state);
            self.tell("vm.deleted", &paused.info, None);
            return true;
        }
        let Some(slot) = self.slot(id) else {
            return false;
        };
        let mut guard = slot.lock().await;
        let Some(vm) = guard.take_if(|vm| vm.info.tenant == tenant) else {
            return false;
        };
        lock(&self.vms).remove(id);
        let info = vm.info.clone();
        destroy(vm).await;
        self.tell("vm.deleted", &info, None);
        true
    }

    /// Deletes VMs past their TTL, and idle VMs past their idle timeout
    /// (a VM running a command is not idle); returns how many.
    pub async fn expire(&self) -> usize {
        let slots: Vec<(String, Slot)> = lock(&self.vms)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut n = 0;
        for (id, slot) in slots {
            let mut guard = slot.lock().await;
            if let Some(vm) = guard.take_if(|vm| vm.expired()) {
                lock(&self.vms).remove(&id);
                let info = vm.info.clone();
                let reason = if vm.past_ttl() { "ttl" } else { "idle" };
                destroy(vm).await;
                self.tell("vm.expired", &info, Some(reason));
                n += 1;
            }
        }
        n
    }

    /// Deletes every VM, pooled ones included (at shutdown).
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _filling = self.filling.lock().await;
        for (_, paused) in lock(&self.paused).drain() {
            let _ = std::fs::remove_file(&paused.state);
        }
        let pooled: Vec<LiveVm> = lock(&self.warm).drain().flat_map(|(_, v)| v).collect();
        for vm in pooled {
            destroy(vm).await;
        }
        let slots: Vec<Slot> = lock(&self.vms).drain().map(|(_, v)| v).collect();
        for slot in slots {
            if let Some(vm) = slot.lock().await.take() {
                destroy(vm).await;
            }
        }
        if let Some(net) = self.network.get() {
            net.remove().await;
        }
    }

    /// Whether new VMs restore from (and first boots save) snapshots; set
    /// by the configuration, changed here by benchmarks.
    pub fn use_snapshots(&self, on: bool) {
        self.snapshots.store(on, Ordering::Relaxed);
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
        networked: bool,
    ) -> PathBuf {
        // A networked VM has one device more: its own shape.
        let nic = if networked { "-net" } else { "" };
        image.dir.join("snapshots").join(format!(
            "{}-{vcpus}x{memory_mib}{nic}.state",
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
        let image = Image::open(&self.images_dir, image_name)?;
        let boot = boot_source(&image, &self.config.extra_cmdline);
        Ok(self.snapshot_file(&image, &boot, vcpus, memory_mib, false))
    }
}

impl LiveVm {
    fn past_ttl(&self) -> bool {
        self.ttl.is_some_and(|ttl| self.created.elapsed() >= ttl)
    }

    fn expired(&self) -> bool {
        let past_ttl = self.past_ttl();
        let idle = self.busy.load(Ordering::SeqCst) == 0
            && self
                .idle_timeout
                .is_some_and(|idle| lock(&self.last_used).elapsed() >= idle);
        past_ttl || idle
    }
}

/// How every VM of an image boots; `extra_cmdline` comes from the
/// configuration.
pub(crate) fn boot_source(image: &Image, extra_cmdline: &str) -> BootSource {
    BootSource {
        kernel: image.kernel(),
        initrd: Some(image.initramfs()),
        extra_cmdline: extra_cmdline.to_string(),
        acpi: image.acpi(),
    }
}

/// Removes the shape's snapshots made under other settings (an older QEMU,
/// other kernel words): they would never load again, and each is the size
/// of the guest's memory.
fn drop_stale_snapshots(current: &Path, machine: MachineConfig, networked: bool) {
    let nic = if networked { "-net" } else { "" };
    let shape = format!("-{}x{}{nic}.state", machine.vcpus, machine.memory_mib);
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

/// Runs an image's warm-up commands (its language runtime starting once)
/// in a VM about to be saved, so the files they read are in the guest's
/// page cache in the snapshot and no restored VM reads them from the drive
/// again. Only kiln's own commands run here, before any tenant has the VM.
async fn warm_up_page_cache(agent: &AgentConn, warm_up: &[Vec<String>]) {
    for argv in warm_up {
        let Some((command, args)) = argv.split_first() else {
            continue;
        };
        let exec = crate::Exec {
            command: command.clone(),
            args: args.to_vec(),
            timeout_ms: Some(30_000),
            ..crate::Exec::default()
        };
        if let Err(error) = agent.exec(exec, b"").await {
            tracing::warn!(%error, command, "an image's warm-up command failed");
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
    vm.child.kill().await;
    if let Some((net, nic)) = vm.nic.take() {
        net.release(&nic).await;
    }
    remove_run_dir(&vm.run_dir);
}

fn net_error(error: crate::net::host::NetError) -> VmError {
    match error {
        crate::net::host::NetError::Resolve(message) => VmError::NetworkRefused(message),
        other => VmError::Network(other.to_string()),
    }
}

/// Gives the guest its address, MAC, route and resolver. After a restore
/// the NIC still carries the MAC of the VM the snapshot was saved from;
/// setting it here (through virtio-net's control queue) makes it this
/// VM's. Every value is one kiln formatted from a typed address. The MAC
/// is set with `ifconfig` (an `AF_INET` ioctl): busybox's `ip link set
/// address` needs `AF_PACKET`, which kernels built before the networking
/// block of `guest-kernel.config` lack.
async fn configure_guest(agent: &AgentConn, nic: &Nic) -> Result<(), VmError> {
    let mut script = format!(
        "ifconfig eth0 hw ether {mac} && ip addr add {address}/{prefix} dev eth0 && \
         ip link set dev eth0 up && ip route add default via {gateway}",
        mac = nic.mac,
        address = nic.address,
        prefix = nic.prefix,
        gateway = nic.gateway,
    );
    if let Some(dns) = nic.dns {
        script.push_str(&format!(" && echo nameserver {dns} > /etc/resolv.conf"));
    }
    let exec = crate::Exec {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script],
        timeout_ms: Some(10_000),
        ..crate::Exec::default()
    };
    let out = agent
        .exec(exec, b"")
        .await
        .map_err(|e| VmError::Network(format!("configuring the guest's interface: {e}")))?;
    if out.status() != 0 {
        return Err(VmError::Network(format!(
            "configuring the guest's interface: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
