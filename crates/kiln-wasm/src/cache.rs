//! Compiled modules, bounded in memory and on disk.
//!
//! A module is loaded at most once at a time per id (single flight): the
//! first caller's load runs as its own task holding the id's lock, so a
//! caller that is killed mid-compile stops waiting at once while the compile
//! finishes for everyone else, and the callers queued behind it find the
//! result in memory. In memory, ready-to-instantiate modules are kept in
//! least-recently-used order up to a byte bound (their compiled code size).
//! On disk, precompiled artefacts are written to a unique temporary name,
//! fsynced and renamed into place, so a name that exists always holds a
//! complete file; the oldest (by last use) are removed past a byte bound.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hashlink::LruCache;
use kiln_blob::BlobStore;
use wasmtime::{Engine, InstancePre, Linker, Module};

use crate::{module_blob_key, State, WasmError};

/// How much each cache holds and has done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Modules ready in memory.
    pub memory_modules: usize,
    /// Their compiled code, in bytes.
    pub memory_bytes: u64,
    /// Precompiled artefacts on disk.
    pub disk_files: usize,
    pub disk_bytes: u64,
    /// Modules compiled from wasm since start (loads from disk not counted).
    pub compiles: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct CacheBounds {
    pub memory_bytes: u64,
    pub disk_dir: Option<PathBuf>,
    pub disk_bytes: u64,
}

struct Memory {
    modules: LruCache<String, (InstancePre<State>, u64)>,
    bytes: u64,
}

pub(crate) struct ModuleCache {
    engine: Engine,
    linker: Linker<State>,
    blobs: BlobStore,
    bounds: CacheBounds,
    engine_hash: String,
    memory: Mutex<Memory>,
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    compiles: AtomicU64,
}

impl ModuleCache {
    pub(crate) fn new(
        engine: Engine,
        linker: Linker<State>,
        blobs: BlobStore,
        bounds: CacheBounds,
    ) -> Result<ModuleCache, WasmError> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_hash = format!("{:016x}", hasher.finish());
        if let Some(dir) = &bounds.disk_dir {
            std::fs::create_dir_all(dir).map_err(|e| WasmError::io("module cache", e))?;
            remove_partial_files(dir);
        }
        Ok(ModuleCache {
            engine,
            linker,
            blobs,
            bounds,
            engine_hash,
            memory: Mutex::new(Memory {
                modules: LruCache::new_unbounded(),
                bytes: 0,
            }),
            in_flight: Mutex::default(),
            compiles: AtomicU64::new(0),
        })
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let (memory_modules, memory_bytes) = {
            let memory = self.memory.lock().expect("module cache");
            (memory.modules.len(), memory.bytes)
        };
        let (disk_files, disk_bytes) = match &self.bounds.disk_dir {
            Some(dir) => {
                let files = artefacts(dir);
                (files.len(), files.iter().map(|f| f.1).sum())
            }
            None => (0, 0),
        };
        CacheStats {
            memory_modules,
            memory_bytes,
            disk_files,
            disk_bytes,
            compiles: self.compiles.load(Ordering::Relaxed),
        }
    }

    fn remembered(&self, id: &str) -> Option<InstancePre<State>> {
        let mut memory = self.memory.lock().expect("module cache");
        memory.modules.get(id).map(|(pre, _)| pre.clone())
    }

    /// The ready-to-instantiate module: from memory, else from the disk
    /// cache, else compiled from the blob store (and cached both ways).
    pub(crate) async fn get(self: &Arc<Self>, id: &str) -> Result<InstancePre<State>, WasmError> {
        if let Some(pre) = self.remembered(id) {
            return Ok(pre);
        }
        let lock = self
            .in_flight
            .lock()
            .expect("in-flight loads")
            .entry(id.to_string())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        if let Some(pre) = self.remembered(id) {
            return Ok(pre);
        }
        let this = self.clone();
        let id = id.to_string();
        // The load is its own task so that a caller that stops waiting (a
        // killed job) neither cancels it half-way nor lets a second load of
        // the same module start while the compile still runs.
        tokio::spawn(async move {
            let loaded = this.load(&id).await;
            if let Ok(pre) = &loaded {
                this.remember(&id, pre.clone());
            }
            this.in_flight.lock().expect("in-flight loads").remove(&id);
            drop(guard);
            loaded
        })
        .await
        .map_err(|e| WasmError::Panicked(e.to_string()))?
    }

    fn remember(&self, id: &str, pre: InstancePre<State>) {
        let range = pre.module().image_range();
        let size = (range.end as usize - range.start as usize) as u64;
        let mut memory = self.memory.lock().expect("module cache");
        if let Some((_, old)) = memory.modules.insert(id.to_string(), (pre, size)) {
            memory.bytes -= old;
        }
        memory.bytes += size;
        // The newest entry stays even alone past the bound: it is about to run.
        while memory.bytes > self.bounds.memory_bytes && memory.modules.len() > 1 {
            match memory.modules.remove_lru() {
                Some((_, (_, size))) => memory.bytes -= size,
                None => break,
            }
        }
    }

    fn cache_path(&self, id: &str) -> Option<PathBuf> {
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        self.bounds
            .disk_dir
            .as_ref()
            .map(|dir| dir.join(format!("{hex}-{}.cwasm", self.engine_hash)))
    }

    async fn load(&self, id: &str) -> Result<InstancePre<State>, WasmError> {
        let path = self.cache_path(id);
        let module = match self.load_from_disk(path.clone()).await {
            Some(module) => module,
            None => self.compile(id, path).await?,
        };
        self.linker
            .instantiate_pre(&module)
            .map_err(|e| WasmError::InvalidModule(format!("{e:#}")))
    }

    async fn load_from_disk(&self, path: Option<PathBuf>) -> Option<Module> {
        let path = path.filter(|p| p.exists())?;
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || {
            // SAFETY: files under this name are written only by `store`
            // below: `Module::serialize` output of an engine with this same
            // configuration (its hash is in the name), fsynced under a
            // unique temporary name and then renamed, so the file is
            // complete.
            match unsafe { Module::deserialize_file(&engine, &path) } {
                Ok(module) => {
                    // The modification time records the last use, for eviction.
                    let _ = std::fs::File::options()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_modified(SystemTime::now()));
                    Some(module)
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "dropping an unreadable precompiled module");
                    let _ = std::fs::remove_file(&path);
                    None
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    async fn compile(&self, id: &str, path: Option<PathBuf>) -> Result<Module, WasmError> {
        let bytes = self
            .blobs
            .get(&module_blob_key(id))
            .await
            .map_err(|e| match e {
                kiln_blob::BlobError::NotFound(_) => WasmError::ModuleNotFound(id.to_string()),
                other => WasmError::Blob(other),
            })?;
        let engine = self.engine.clone();
        let disk_bytes = self.bounds.disk_bytes;
        self.compiles.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let module = Module::from_binary(&engine, &bytes)
                .map_err(|e| WasmError::InvalidModule(format!("{e:#}")))?;
            if let Some(path) = path {
                if let Err(error) = store(&module, &path) {
                    tracing::warn!(path = %path.display(), %error, "could not cache a precompiled module");
                }
                if let Some(dir) = path.parent() {
                    evict_artefacts(dir, disk_bytes, &path);
                }
            }
            Ok(module)
        })
        .await
        .map_err(|e| WasmError::Panicked(e.to_string()))?
    }
}

/// Writes a precompiled module so that its final name only ever holds a
/// complete file: unique temporary name, fsync, rename.
fn store(module: &Module, path: &Path) -> std::io::Result<()> {
    let serialized = module.serialize().map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("{:016x}.partial", rand::random::<u64>()));
    let written = (|| {
        let mut file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all(&serialized)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Precompiled artefacts in the cache directory: path, size, last use.
fn artefacts(dir: &Path) -> Vec<(PathBuf, u64, SystemTime)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), meta.len(), meta.modified().ok()?))
        })
        .collect()
}

/// Removes the least recently used artefacts until the rest fit in `max`;
/// `newest`, just written, stays.
fn evict_artefacts(dir: &Path, max: u64, newest: &Path) {
    let mut files = artefacts(dir);
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort_by_key(|f| f.2);
    for (path, size, _) in files {
        if total <= max {
            break;
        }
        if path == newest {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= size;
        }
    }
}

/// Temporary files left by a process that stopped mid-write.
fn remove_partial_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.path().extension().is_some_and(|x| x == "partial") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
