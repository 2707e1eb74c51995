//! Scratch directories: private per job, bounded on disk.
//!
//! The scratch root is kiln's own: made mode 0700 and emptied when the
//! runtime starts, so nothing a crashed process left behind reaches a later
//! job. Each job gets a fresh directory under it with a random 128-bit name,
//! made with `mkdir` (never reusing one that exists) mode 0700, and removed
//! when the run ends on every path (success, failure, trap, timeout, kill;
//! `Drop` covers a dropped future).
//!
//! Disk use is bounded by accounting at the WASI boundary: every call that
//! can take disk space (`fd_write` to a file, `fd_pwrite`, creating a file,
//! directory, link or symlink, renaming) is charged before it runs. A write
//! of `n` bytes is charged `n` rounded up to a block plus one block (an
//! unaligned write touches two), each new name one block. When the charges
//! since the last measurement would pass the quota, the directory is
//! measured (allocated blocks, plus one block per entry) and the charges
//! restart from what is really there; if the call still does not fit, the
//! guest traps with `scratch_limit` before a byte is written. The directory
//! therefore never holds more than the quota, plus the filesystem's own
//! metadata for the files in it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use wasmtime::{Caller, Linker};
use wasmtime_wasi::p1::wasi_snapshot_preview1 as wasi;

use crate::{State, WasmError};

/// The unit of disk allocation assumed when charging.
const BLOCK: u64 = 4096;

/// What a guest that ran out of scratch space gets: a trap.
#[derive(Debug, thiserror::Error)]
#[error("scratch directory full (limit {0} bytes)")]
pub(crate) struct ScratchLimit(pub u64);

/// The directory that holds every job's scratch directory.
#[derive(Debug)]
pub(crate) struct ScratchRoot(PathBuf);

impl ScratchRoot {
    /// Makes the root (0700) and removes everything in it: a directory left
    /// by a process that crashed is never handed to a job.
    pub(crate) fn open(path: &Path) -> Result<ScratchRoot, WasmError> {
        std::fs::create_dir_all(path).map_err(|e| WasmError::io("scratch root", e))?;
        let meta = std::fs::symlink_metadata(path).map_err(|e| WasmError::io("scratch root", e))?;
        if !meta.is_dir() {
            return Err(WasmError::io(
                "scratch root",
                std::io::Error::other(format!("{} is not a directory", path.display())),
            ));
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| WasmError::io("scratch root", e))?;
        for entry in std::fs::read_dir(path).map_err(|e| WasmError::io("scratch root", e))? {
            let entry = entry.map_err(|e| WasmError::io("scratch root", e))?;
            let stale = entry.path();
            let removed = match entry.file_type() {
                Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(&stale),
                _ => std::fs::remove_file(&stale),
            };
            removed.map_err(|e| WasmError::io("stale scratch directory", e))?;
        }
        Ok(ScratchRoot(path.to_path_buf()))
    }

    /// A new, empty, private directory with an unpredictable name.
    pub(crate) fn create(&self) -> Result<ScratchDir, WasmError> {
        let name = format!("job-{:032x}", rand::random::<u128>());
        let path = self.0.join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| WasmError::io("scratch directory", e))?;
        Ok(ScratchDir(path))
    }
}

/// Removed when the run ends, whatever way it ends.
#[derive(Debug)]
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

/// Writes an input file under a scratch directory before the guest starts
/// (`rel` is a checked relative path, see `kiln_core::files::check_path`).
pub(crate) fn place(dir: &Path, rel: &str, bytes: &[u8]) -> std::io::Result<()> {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    std::fs::write(&path, bytes)
}

/// Reads an output once the guest has ended. Every component must be a
/// real directory and the last a regular file: a symlink the guest made is
/// never followed, so nothing outside the directory can be read.
pub(crate) fn collect(dir: &Path, rel: &str, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let parts: Vec<&str> = rel.split('/').collect();
    let mut at = dir.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        let meta = match std::fs::symlink_metadata(&at) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("output {rel} was not produced"))
            }
            Err(e) => return Err(format!("output {rel}: {e}")),
        };
        let last = i + 1 == parts.len();
        if (!last && !meta.is_dir()) || (last && !meta.is_file()) {
            return Err(format!("output {rel} is not a regular file"));
        }
        if last && meta.len() > max {
            return Err(format!("output {rel} is over {max} bytes"));
        }
    }
    let mut data = Vec::new();
    std::fs::File::open(&at)
        .and_then(|f| f.take(max + 1).read_to_end(&mut data))
        .map_err(|e| format!("output {rel}: {e}"))?;
    if data.len() as u64 > max {
        return Err(format!("output {rel} is over {max} bytes"));
    }
    Ok(data)
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), %error, "could not remove a scratch directory");
        }
    }
}

/// A run's disk budget.
pub(crate) struct ScratchBudget {
    dir: PathBuf,
    limit: u64,
    /// Bytes found at the last measurement.
    measured: u64,
    /// Bytes charged since.
    charged: u64,
    /// Set once a fd at or below 2 names something other than stdio.
    stdio_renumbered: bool,
    pub(crate) exceeded: bool,
}

impl ScratchBudget {
    /// Counts what is already in the directory (the job's inputs) against
    /// the quota.
    pub(crate) fn start_at(&mut self, used: u64) {
        self.measured = used;
        self.charged = 0;
    }

    pub(crate) fn new(dir: &Path, limit: u64) -> ScratchBudget {
        ScratchBudget {
            dir: dir.to_path_buf(),
            limit,
            measured: 0,
            charged: 0,
            stdio_renumbered: false,
            exceeded: false,
        }
    }
}

/// Charges `bytes` to the run's budget, measuring the directory when the
/// charges run out; traps when the call cannot fit.
async fn charge(caller: &mut Caller<'_, State>, bytes: u64) -> anyhow::Result<()> {
    let Some(budget) = caller.data_mut().scratch.as_mut() else {
        return Ok(());
    };
    if budget.measured + budget.charged + bytes <= budget.limit {
        budget.charged += bytes;
        return Ok(());
    }
    let dir = budget.dir.clone();
    let limit = budget.limit;
    let measured = tokio::task::spawn_blocking(move || disk_use(&dir, limit + 1))
        .await
        .map_err(|e| anyhow::anyhow!("scratch measurement: {e}"))?;
    let budget = caller.data_mut().scratch.as_mut().expect("budget");
    budget.measured = measured;
    budget.charged = 0;
    if measured + bytes <= limit {
        budget.charged = bytes;
        return Ok(());
    }
    budget.exceeded = true;
    Err(ScratchLimit(limit).into())
}

/// Bytes a directory takes: allocated blocks plus one block per entry,
/// counting stops once past `stop`.
pub(crate) fn disk_use(dir: &Path, stop: u64) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            total += BLOCK + meta.blocks() * 512;
            if meta.is_dir() {
                pending.push(entry.path());
            }
            if total > stop {
                return total;
            }
        }
    }
    total
}

/// What a write of `len` bytes at any offset may allocate.
fn write_charge(len: u64) -> u64 {
    match len {
        0 => 0,
        len => len.div_ceil(BLOCK) * BLOCK + BLOCK,
    }
}

/// The length of the first non-empty entry of a guest's iovec array (each
/// entry: pointer, length): wasmtime-wasi writes that entry alone per call.
fn iovec_bytes(caller: &mut Caller<'_, State>, iovs: i32, count: i32) -> anyhow::Result<u64> {
    let memory = caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| anyhow::anyhow!("missing required memory export"))?;
    let data = memory.data(&caller);
    for i in 0..count.max(0) as usize {
        let at = (iovs as u32 as usize)
            .checked_add(i * 8 + 4)
            .filter(|at| at + 4 <= data.len())
            .ok_or_else(|| anyhow::anyhow!("iovec out of bounds"))?;
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
        if len > 0 {
            return Ok(len.into());
        }
    }
    Ok(0)
}

/// Runs one wasmtime-wasi preview 1 call on the store's WASI context and
/// the guest's memory, as wasmtime-wasi's own linker entries do.
macro_rules! delegate {
    ($caller:ident, $func:ident ( $($arg:expr),* ) $($await:tt)*) => {{
        let memory = match $caller.get_export("memory") {
            Some(wasmtime::Extern::Memory(memory)) => memory,
            _ => anyhow::bail!("missing required memory export"),
        };
        let (bytes, state) = memory.data_and_store_mut(&mut $caller);
        let mut memory = wiggle::GuestMemory::Unshared(bytes);
        wasi::$func(&mut state.wasi, &mut memory $(, $arg)*) $($await)*
    }};
}

const WASI: &str = "wasi_snapshot_preview1";
/// `oflags` bit for `O_CREAT`.
const OFLAGS_CREAT: i32 = 1;

/// Puts charging wrappers in front of the preview 1 calls that take disk.
pub(crate) fn add_budget_to_linker(linker: &mut Linker<State>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap_async(
        WASI,
        "fd_write",
        |mut caller: Caller<'_, State>, (fd, iovs, count, written): (i32, i32, i32, i32)| {
            Box::new(async move {
                let to_file = caller
                    .data()
                    .scratch
                    .as_ref()
                    .is_some_and(|b| fd > 2 || b.stdio_renumbered);
                if to_file {
                    let bytes = iovec_bytes(&mut caller, iovs, count)?;
                    charge(&mut caller, write_charge(bytes)).await?;
                }
                delegate!(caller, fd_write(fd, iovs, count, written).await)
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "fd_pwrite",
        |mut caller: Caller<'_, State>,
         (fd, iovs, count, offset, written): (i32, i32, i32, i64, i32)| {
            Box::new(async move {
                let bytes = iovec_bytes(&mut caller, iovs, count)?;
                charge(&mut caller, write_charge(bytes)).await?;
                delegate!(caller, fd_pwrite(fd, iovs, count, offset, written).await)
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "fd_renumber",
        |mut caller: Caller<'_, State>, (from, to): (i32, i32)| {
            Box::new(async move {
                if to <= 2 {
                    if let Some(budget) = caller.data_mut().scratch.as_mut() {
                        budget.stdio_renumbered = true;
                    }
                }
                delegate!(caller, fd_renumber(from, to))
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "path_open",
        |mut caller: Caller<'_, State>,
         (fd, dirflags, path, path_len, oflags, base, inheriting, fdflags, opened): (
            i32,
            i32,
            i32,
            i32,
            i32,
            i64,
            i64,
            i32,
            i32,
        )| {
            Box::new(async move {
                if oflags & OFLAGS_CREAT != 0 {
                    charge(&mut caller, BLOCK).await?;
                }
                delegate!(
                    caller,
                    path_open(
                        fd, dirflags, path, path_len, oflags, base, inheriting, fdflags, opened
                    )
                    .await
                )
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "path_create_directory",
        |mut caller: Caller<'_, State>, (fd, path, len): (i32, i32, i32)| {
            Box::new(async move {
                charge(&mut caller, BLOCK).await?;
                delegate!(caller, path_create_directory(fd, path, len).await)
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "path_symlink",
        |mut caller: Caller<'_, State>,
         (old, old_len, fd, new, new_len): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                charge(&mut caller, BLOCK).await?;
                delegate!(caller, path_symlink(old, old_len, fd, new, new_len).await)
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "path_link",
        |mut caller: Caller<'_, State>,
         (old_fd, flags, old, old_len, new_fd, new, new_len): (
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
        )| {
            Box::new(async move {
                charge(&mut caller, BLOCK).await?;
                delegate!(
                    caller,
                    path_link(old_fd, flags, old, old_len, new_fd, new, new_len).await
                )
            })
        },
    )?;
    linker.func_wrap_async(
        WASI,
        "path_rename",
        |mut caller: Caller<'_, State>,
         (old_fd, old, old_len, new_fd, new, new_len): (i32, i32, i32, i32, i32, i32)| {
            Box::new(async move {
                charge(&mut caller, BLOCK).await?;
                delegate!(
                    caller,
                    path_rename(old_fd, old, old_len, new_fd, new, new_len).await
                )
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
