//! What confines a QEMU process on the host: the user it runs as, its
//! cgroup, death with kiln, and the descriptors it is handed instead of
//! paths. QEMU opens no host path itself: kiln opens the kernel, initrd,
//! saved state and sockets and passes them as descriptors, so QEMU needs
//! no access to kiln's directories at all.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use crate::config::QemuConfig;
use crate::VmError;

/// The credentials QEMU drops to before it runs, when kiln runs as root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the owner group of `/dev/kvm`, so KVM stays
    /// usable.
    pub groups: Vec<u32>,
}

/// Whom QEMU runs as: nobody special unless kiln is root; then the
/// configured user, created as a system user when absent, else `nobody`.
pub fn resolve_user(config: &QemuConfig) -> Option<RunAs> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let lookup = |name: &str| nix::unistd::User::from_name(name).ok().flatten();
    let user = lookup(&config.user)
        .or_else(|| {
            let created = std::process::Command::new("useradd")
                .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
                .args(["--shell", "/usr/sbin/nologin", "--user-group"])
                .arg(&config.user)
                .output()
                .is_ok_and(|out| out.status.success());
            if created {
                tracing::info!(user = %config.user, "created the system user QEMU runs as");
            }
            lookup(&config.user)
        })
        .or_else(|| {
            tracing::warn!(user = %config.user, "no such user and none could be made: QEMU runs as nobody");
            lookup("nobody")
        });
    let Some(user) = user else {
        tracing::error!("neither the QEMU user nor nobody exists: QEMU runs as root");
        return None;
    };
    let groups = std::fs::metadata("/dev/kvm")
        .ok()
        .map(|meta| std::os::unix::fs::MetadataExt::gid(&meta))
        .filter(|gid| *gid != 0)
        .into_iter()
        .collect();
    Some(RunAs {
        user: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups,
    })
}

/// A VM's cgroup v2: `<root>/kiln/<vm-id>`, with `memory.max` and
/// `pids.max`, removed with the VM.
#[derive(Clone, Debug)]
pub struct Cgroups {
    /// `<mount>/kiln`, with the memory and pids controllers on for its
    /// children.
    parent: PathBuf,
}

impl Cgroups {
    /// The parent cgroup of every VM, when the cgroup v2 tree is writable
    /// and has the memory and pids controllers; otherwise says why not.
    pub fn prepare(config: &QemuConfig) -> Result<Cgroups, String> {
        if !config.cgroups {
            return Err("turned off in the configuration".into());
        }
        let root = config
            .cgroup_root
            .clone()
            .or_else(cgroup2_mount)
            .ok_or("no cgroup v2 file system is mounted")?;
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(|e| format!("{}: {e}", root.display()))?;
        for needed in ["memory", "pids"] {
            if !controllers.split_whitespace().any(|c| c == needed) {
                return Err(format!(
                    "the cgroup v2 tree at {} has no {needed} controller (controllers: {})",
                    root.display(),
                    controllers.trim()
                ));
            }
        }
        let enable = |dir: &Path| {
            std::fs::write(dir.join("cgroup.subtree_control"), "+memory +pids")
                .map_err(|e| format!("enabling controllers in {}: {e}", dir.display()))
        };
        enable(&root)?;
        let parent = root.join("kiln");
        match std::fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("{}: {e}", parent.display())),
        }
        enable(&parent)?;
        Ok(Cgroups { parent })
    }

    pub fn path(&self, vm_id: &str) -> PathBuf {
        self.parent.join(vm_id)
    }

    /// Makes a VM's cgroup with its limits; returns `cgroup.procs` opened
    /// for writing, which the QEMU process writes itself into before it
    /// runs.
    pub fn create(
        &self,
        vm_id: &str,
        memory_bytes: u64,
        pids_max: u32,
    ) -> std::io::Result<(PathBuf, std::fs::File)> {
        let dir = self.path(vm_id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let limits = (|| {
            std::fs::write(dir.join("memory.max"), memory_bytes.to_string())?;
            // No swap: a VM over its memory is killed, not slowed to a crawl.
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            std::fs::write(dir.join("pids.max"), pids_max.to_string())?;
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
        })();
        match limits {
            Ok(procs) => Ok((dir, procs)),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on hosts that still mount v1 beside it).
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, mount, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(mount))
    })
}

/// Removes a VM's cgroup once its processes are gone (a cgroup with live
/// members cannot be removed; QEMU takes a moment to die after SIGKILL).
pub fn remove_cgroup(dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    tracing::warn!(cgroup = %dir.display(), "could not remove a VM's cgroup");
}

/// Everything a QEMU process is started with besides its arguments.
pub struct Confinement {
    /// Written with QEMU's pid before it runs, so a VM is on record from
    /// its first instruction (the reaper finds VMs killed mid-boot).
    pub pid_file: std::fs::File,
    /// `cgroup.procs` of the VM's cgroup, joined before QEMU runs.
    pub cgroup: Option<(PathBuf, std::fs::File)>,
    pub run_as: Option<RunAs>,
    /// Descriptors QEMU inherits (named on its command line by number).
    pub pass: Vec<OwnedFd>,
}

/// A QEMU process: killed when dropped, and with it kiln (through
/// `PR_SET_PDEATHSIG`); its cgroup goes when it is killed.
pub struct VmProcess {
    child: tokio::process::Child,
    cgroup: Option<PathBuf>,
}

impl VmProcess {
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// Kills QEMU, waits for it (at most 5 s) and removes its cgroup.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        if let Some(dir) = self.cgroup.take() {
            let _ = tokio::task::spawn_blocking(move || remove_cgroup(&dir)).await;
        }
    }

    /// The VM's cgroup, if it has one.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if let Some(dir) = self.cgroup.take() {
            // Off the async runtime: removal waits for the process to go.
            std::thread::spawn(move || remove_cgroup(&dir));
        }
    }
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// The thread every QEMU is forked from. `PR_SET_PDEATHSIG` fires when the
/// *thread* that forked the child ends, not the process: runtime threads
/// come and go, this one lives as long as kiln.
fn spawner() -> Option<&'static Mutex<Sender<SpawnJob>>> {
    static SPAWNER: OnceLock<Option<Mutex<Sender<SpawnJob>>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
            let started = std::thread::Builder::new()
                .name("kiln-qemu-spawner".into())
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                });
            match started {
                Ok(_) => Some(Mutex::new(tx)),
                Err(error) => {
                    tracing::error!(%error, "could not start the QEMU spawner thread");
                    None
                }
            }
        })
        .as_ref()
}

/// Starts QEMU confined: its pid on record, in its cgroup, as its user,
/// with only the given descriptors, and bound to die with kiln.
pub async fn spawn(
    mut command: tokio::process::Command,
    confinement: Confinement,
) -> Result<VmProcess, VmError> {
    let binary = PathBuf::from(command.as_std().get_program());
    let Confinement {
        pid_file,
        cgroup,
        run_as,
        pass,
    } = confinement;
    let (cgroup_dir, cgroup_procs) = match cgroup {
        Some((dir, procs)) => (Some(dir), Some(procs)),
        None => (None, None),
    };
    let parent = std::process::id() as libc::pid_t;
    let pid_fd = pid_file.as_raw_fd();
    let procs_fd = cgroup_procs.as_ref().map(AsRawFd::as_raw_fd);
    let pass_fds: Vec<RawFd> = pass.iter().map(AsRawFd::as_raw_fd).collect();
    // Built before the fork: the child may not allocate.
    let groups: Vec<libc::gid_t> = run_as
        .as_ref()
        .map(|r| r.groups.clone())
        .unwrap_or_default();
    let ids = run_as.as_ref().map(|r| (r.uid, r.gid));
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe system calls on memory prepared before the
    // fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || confine_child(parent, pid_fd, procs_fd, &pass_fds, &groups, ids));
    }
    command.kill_on_drop(true);
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: SpawnJob = Box::new(move || {
        let _runtime = handle.enter();
        let _ = tx.send(command.spawn());
    });
    let gone = || VmError::Spawn {
        binary: binary.clone(),
        source: std::io::Error::other("the QEMU spawner thread is gone"),
    };
    spawner()
        .ok_or_else(gone)?
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send(job)
        .map_err(|_| gone())?;
    let spawned = rx.await.map_err(|_| gone())?;
    // The child holds its own copies now.
    drop((pid_file, cgroup_procs, pass));
    match spawned {
        Ok(child) => Ok(VmProcess {
            child,
            cgroup: cgroup_dir,
        }),
        Err(source) => {
            if let Some(dir) = cgroup_dir {
                remove_cgroup(&dir);
            }
            Err(VmError::Spawn { binary, source })
        }
    }
}

/// In the forked child, before exec: records the pid, joins the cgroup,
/// lets the passed descriptors through exec, drops root, and asks to be
/// killed with kiln.
fn confine_child(
    parent: libc::pid_t,
    pid_fd: RawFd,
    procs_fd: Option<RawFd>,
    pass_fds: &[RawFd],
    groups: &[libc::gid_t],
    ids: Option<(u32, u32)>,
) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY (all calls below): plain system calls on descriptors and
    // buffers this process owns; all async-signal-safe.
    unsafe {
        let mut digits = [0u8; 12];
        let len = format_pid(libc::getpid() as u32, &mut digits);
        check(libc::write(pid_fd, digits.as_ptr().cast(), len) as libc::c_int)?;
        if let Some(fd) = procs_fd {
            // "0" is the writing process itself.
            check(libc::write(fd, b"0".as_ptr().cast(), 1) as libc::c_int)?;
        }
        for &fd in pass_fds {
            check(libc::fcntl(fd, libc::F_SETFD, 0))?;
        }
        if let Some((uid, gid)) = ids {
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
        }
        // After setuid, which clears the death signal.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        if libc::getppid() != parent {
            // kiln died between the fork and the prctl.
            libc::_exit(1);
        }
    }
    Ok(())
}

/// Writes `pid` in decimal into `out` without allocating; returns the
/// length.
fn format_pid(mut pid: u32, out: &mut [u8; 12]) -> usize {
    let mut tmp = [0u8; 12];
    let mut n = 0;
    loop {
        tmp[n] = b'0' + (pid % 10) as u8;
        n += 1;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    for i in 0..n {
        out[i] = tmp[n - 1 - i];
    }
    n
}

/// A value for a QEMU option list, where `,` separates options: doubled, so
/// a comma in a path cannot start a new option.
pub fn qemu_opt_value(value: &str) -> String {
    value.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    #[test]
    fn pids_are_formatted_without_allocating() {
        for pid in [0u32, 7, 42, 4_194_304, u32::MAX] {
            let mut out = [0u8; 12];
            let n = super::format_pid(pid, &mut out);
            assert_eq!(std::str::from_utf8(&out[..n]).unwrap(), pid.to_string());
        }
    }

    #[test]
    fn commas_cannot_start_a_qemu_option() {
        assert_eq!(
            super::qemu_opt_value("/data,server=off/vm"),
            "/data,,server=off/vm"
        );
        assert_eq!(super::qemu_opt_value("/plain/path"), "/plain/path");
    }
}
