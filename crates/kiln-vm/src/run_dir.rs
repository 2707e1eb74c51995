//! The VM directory on disk: its lock, the run directory of each VM, and
//! the reaper that clears what a crashed run left there (QEMU processes,
//! half-written states, cgroups, directories).

use std::path::{Path, PathBuf};

use crate::{qemu, VmError};

/// Removes a VM's run directory and the half-written state it names, if
/// any (a state is saved beside the image as `<name>.<vm>.partial`).
pub(crate) fn remove_run_dir(run_dir: &Path) {
    if let Ok(partial) = std::fs::read(run_dir.join(qemu::PARTIAL_MARKER)) {
        let partial = PathBuf::from(String::from_utf8_lossy(&partial).into_owned());
        if partial.extension().is_some_and(|e| e == "partial") {
            let _ = std::fs::remove_file(partial);
        }
    }
    let _ = std::fs::remove_dir_all(run_dir);
}

/// Creates `vm_dir`, takes its lock and reaps what an earlier run left.
pub(crate) fn take_dir(vm_dir: &Path) -> Result<std::fs::File, VmError> {
    std::fs::create_dir_all(vm_dir)?;
    let lock = lock_dir(vm_dir)?;
    let reaped = reap(vm_dir);
    if reaped > 0 {
        tracing::info!(reaped, "removed VMs left behind by an earlier run");
    }
    Ok(lock)
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

/// The pids of QEMU processes whose command line names `dir` as their run
/// directory, or a directory inside it (`-name guest=<run dir>`).
pub fn qemu_pids_under(dir: &Path) -> Vec<i32> {
    let exact = format!(
        "guest={}",
        crate::jail::qemu_opt_value(&dir.to_string_lossy())
    );
    let inside = format!("{exact}/");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let names_dir = cmdline.split(|b| *b == 0).any(|arg| {
                let arg = String::from_utf8_lossy(arg);
                arg == exact || arg.starts_with(&inside)
            });
            names_dir.then_some(pid)
        })
        .collect()
}

/// Kills the QEMU processes recorded under `vm_dir` (checking that each pid
/// still belongs to a QEMU started for that directory), removes the states
/// they were saving, their cgroups and the directories. Returns how many
/// directories were removed.
pub fn reap(vm_dir: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(vm_dir).into_iter().flatten().flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            // A paused VM's state: paused VMs do not outlive their manager.
            if dir.extension().is_some_and(|e| e == "paused") {
                let _ = std::fs::remove_file(&dir);
            }
            continue;
        }
        if let Some(pid) = std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            if qemu_pids_under(&dir).contains(&pid) {
                // SAFETY: kill(2) on a pid whose command line names this VM's
                // own directory, so it is the QEMU kiln started for it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) {
            let cgroup = PathBuf::from(cgroup.trim());
            // Only a VM cgroup of kiln's, named after this directory.
            if cgroup.file_name() == dir.file_name()
                && cgroup.parent().and_then(Path::file_name) == Some("kiln".as_ref())
            {
                crate::jail::remove_cgroup(&cgroup);
            }
        }
        remove_run_dir(&dir);
        if !dir.exists() {
            n += 1;
        }
    }
    n
}
