//! kiln's WebAssembly sandbox: wasmtime with WASI preview 1.
//!
//! Each module is compiled once (cached in memory as an `InstancePre`, and on
//! disk as a precompiled artifact keyed by module hash and engine
//! configuration) and instantiated from a pooling allocator, so a run costs
//! microseconds. Guests run on the async executor and yield every epoch
//! slice, so a runaway loop never holds a thread and is killed promptly.

pub mod fixtures;
mod output;
mod spec;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use kiln_blob::BlobStore;
use kiln_core::{AttemptEnd, JobResult, LeasedJob};
use kiln_worker::JobHandler;
use tokio_util::sync::CancellationToken;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, ResourceLimiter, Store, Trap,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{DirPerms, FilePerms, I32Exit, WasiCtxBuilder};

pub use output::CappedOutput;
pub use spec::WasmSpec;

/// Epoch tick; guests yield to the executor every `SLICE_TICKS` ticks.
const TICK: Duration = Duration::from_millis(1);
const SLICE_TICKS: u64 = 10;

#[derive(Clone, Debug)]
pub struct WasmConfig {
    /// Where precompiled modules are kept between runs of kiln.
    pub cache_dir: Option<PathBuf>,
    /// Where per-run scratch directories are made.
    pub scratch_dir: PathBuf,
    /// Instances alive at once (the pooling allocator's size).
    pub max_instances: u32,
    /// The largest linear memory any job may ask for.
    pub max_memory_mib: u64,
    pub default_memory_mib: u64,
    /// Default cap on each of stdout and stderr.
    pub default_output_bytes: usize,
}

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            cache_dir: None,
            scratch_dir: std::env::temp_dir().join("kiln-scratch"),
            max_instances: 1_100,
            max_memory_mib: 1024,
            default_memory_mib: 64,
            default_output_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// The bytes are not a valid module.
    #[error("invalid module: {0}")]
    InvalidModule(String),
    /// The module is not in the blob store.
    #[error("module {0} not found")]
    ModuleNotFound(String),
    /// The engine could not be set up.
    #[error("wasm engine: {0}")]
    Engine(String),
}

struct Limits {
    max_memory: usize,
    memory_denied: bool,
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> anyhow::Result<bool> {
        if desired > self.max_memory {
            self.memory_denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> anyhow::Result<bool> {
        Ok(desired <= 100_000)
    }
}

struct State {
    wasi: WasiP1Ctx,
    limits: Limits,
}

pub struct WasmRuntime {
    engine: Engine,
    linker: Linker<State>,
    blobs: BlobStore,
    config: WasmConfig,
    compiled: RwLock<HashMap<String, InstancePre<State>>>,
    engine_hash: String,
}

impl WasmRuntime {
    pub fn new(config: WasmConfig, blobs: BlobStore) -> Result<Arc<WasmRuntime>, WasmError> {
        let engine_error = |e: anyhow::Error| WasmError::Engine(format!("{e:#}"));
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(config.max_instances)
            .total_memories(config.max_instances)
            .total_tables(config.max_instances)
            .total_stacks(config.max_instances)
            .total_component_instances(0)
            .max_memory_size((config.max_memory_mib as usize) << 20)
            .linear_memory_keep_resident(64 << 10);
        let mut wasm = Config::new();
        wasm.async_support(true)
            .epoch_interruption(true)
            .consume_fuel(true)
            .max_wasm_stack(512 << 10)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(engine_error)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut State| &mut s.wasi)
            .map_err(engine_error)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_hash = format!("{:016x}", hasher.finish());
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| WasmError::Engine(e.to_string()))?;
        }
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("kiln-wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| WasmError::Engine(e.to_string()))?;
        Ok(Arc::new(WasmRuntime {
            engine,
            linker,
            blobs,
            config,
            compiled: RwLock::default(),
            engine_hash,
        }))
    }

    /// Turns WAT text into binary; binary passes through.
    pub fn to_binary(bytes: &[u8]) -> Result<Vec<u8>, WasmError> {
        wat::parse_bytes(bytes)
            .map(|b| b.into_owned())
            .map_err(|e| WasmError::InvalidModule(e.to_string()))
    }

    /// Checks a module the way it will be run: valid and importing nothing
    /// but WASI preview 1.
    pub fn validate(&self, bytes: &[u8]) -> Result<(), WasmError> {
        let module = Module::from_binary(&self.engine, bytes)
            .map_err(|e| WasmError::InvalidModule(format!("{e:#}")))?;
        self.linker
            .instantiate_pre(&module)
            .map_err(|e| WasmError::InvalidModule(format!("{e:#}")))?;
        if module.get_export("_start").is_none() {
            return Err(WasmError::InvalidModule(
                "the module exports no _start function".to_string(),
            ));
        }
        Ok(())
    }

    fn cache_path(&self, id: &str) -> Option<PathBuf> {
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        self.config
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{hex}-{}.cwasm", self.engine_hash)))
    }

    /// Compiles a module ahead of its first run.
    ///
    /// The ready-to-instantiate module comes from memory, else from the disk
    /// cache, else compiled from the blob store (and cached both ways).
    pub async fn prepare(&self, id: &str) -> Result<(), WasmError> {
        self.instance_pre(id).await.map(|_| ())
    }

    async fn instance_pre(&self, id: &str) -> Result<InstancePre<State>, WasmError> {
        if let Some(pre) = self.compiled.read().expect("module cache").get(id) {
            return Ok(pre.clone());
        }
        let cache_path = self.cache_path(id);
        let engine = self.engine.clone();
        let from_disk = match &cache_path {
            Some(path) if path.exists() => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    // SAFETY: the file was written by `Module::serialize` of an
                    // engine with this same configuration (the hash is in its
                    // name) into kiln's own data directory.
                    unsafe { Module::deserialize_file(&engine, &path) }.ok()
                })
                .await
                .ok()
                .flatten()
            }
            _ => None,
        };
        let module = match from_disk {
            Some(module) => module,
            None => {
                let key = module_blob_key(id);
                let bytes = self.blobs.get(&key).await.map_err(|e| match e {
                    kiln_blob::BlobError::NotFound(_) => WasmError::ModuleNotFound(id.to_string()),
                    other => WasmError::Engine(other.to_string()),
                })?;
                let engine = self.engine.clone();
                let module =
                    tokio::task::spawn_blocking(move || Module::from_binary(&engine, &bytes))
                        .await
                        .map_err(|e| WasmError::Engine(e.to_string()))?
                        .map_err(|e| WasmError::InvalidModule(format!("{e:#}")))?;
                if let (Some(path), Ok(serialized)) = (&cache_path, module.serialize()) {
                    let tmp = path.with_extension("tmp");
                    if std::fs::write(&tmp, serialized).is_ok() {
                        let _ = std::fs::rename(&tmp, path);
                    }
                }
                module
            }
        };
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| WasmError::InvalidModule(format!("{e:#}")))?;
        self.compiled
            .write()
            .expect("module cache")
            .insert(id.to_string(), pre.clone());
        Ok(pre)
    }

    /// Runs `_start` once with the spec's arguments, environment and stdin.
    pub async fn run(&self, spec: &WasmSpec, kill: &CancellationToken) -> AttemptEnd {
        let started = Instant::now();
        let permanent_traps = !spec.retry_traps;
        let fail = |error: String, result: Option<JobResult>, permanent: bool| AttemptEnd::Failed {
            result,
            error,
            permanent,
        };
        let pre = match self.instance_pre(&spec.module).await {
            Ok(pre) => pre,
            Err(error @ WasmError::ModuleNotFound(_))
            | Err(error @ WasmError::InvalidModule(_)) => {
                return fail(error.to_string(), None, true)
            }
            Err(error) => return fail(error.to_string(), None, false),
        };
        let output_cap = spec
            .output_limit_bytes
            .unwrap_or(self.config.default_output_bytes);
        let stdout = CappedOutput::new(output_cap);
        let stderr = CappedOutput::new(output_cap);
        let mut wasi = WasiCtxBuilder::new();
        wasi.arg("main")
            .args(&spec.args)
            .stdin(MemoryInputPipe::new(spec.stdin.clone().into_bytes()))
            .stdout(stdout.clone())
            .stderr(stderr.clone());
        for (key, value) in &spec.env {
            wasi.env(key, value);
        }
        let scratch = if spec.scratch {
            let dir =
                self.config
                    .scratch_dir
                    .join(format!("{}-{}", std::process::id(), unique_suffix()));
            if let Err(error) = std::fs::create_dir_all(&dir) {
                return fail(format!("scratch directory: {error}"), None, false);
            }
            if let Err(error) =
                wasi.preopened_dir(&dir, "/scratch", DirPerms::all(), FilePerms::all())
            {
                let _ = std::fs::remove_dir_all(&dir);
                return fail(format!("scratch directory: {error:#}"), None, false);
            }
            Some(ScratchDir(dir))
        } else {
            None
        };
        let memory_mib = spec
            .memory_mib
            .unwrap_or(self.config.default_memory_mib)
            .min(self.config.max_memory_mib);
        let mut store = Store::new(
            &self.engine,
            State {
                wasi: wasi.build_p1(),
                limits: Limits {
                    max_memory: (memory_mib as usize) << 20,
                    memory_denied: false,
                },
            },
        );
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(SLICE_TICKS);
        store.epoch_deadline_async_yield_and_update(SLICE_TICKS);
        let _ = store.set_fuel(spec.fuel.unwrap_or(u64::MAX));

        let outcome = tokio::select! {
            outcome = call_start(&pre, &mut store) => Some(outcome),
            _ = kill.cancelled() => None,
        };
        drop(scratch);
        let result = JobResult {
            exit_code: 0,
            stdout: stdout.text(),
            stderr: stderr.text(),
            duration_ms: started.elapsed().as_millis() as i64,
            truncated: stdout.truncated() || stderr.truncated(),
        };
        let Some(outcome) = outcome else {
            return fail(
                "killed".to_string(),
                Some(JobResult {
                    exit_code: -1,
                    ..result
                }),
                false,
            );
        };
        let memory_denied = store.data().limits.memory_denied;
        match outcome {
            Ok(()) => AttemptEnd::Succeeded(result),
            Err(error) => {
                if let Some(exit) = error.downcast_ref::<I32Exit>() {
                    let result = JobResult {
                        exit_code: exit.0,
                        ..result
                    };
                    return if exit.0 == 0 {
                        AttemptEnd::Succeeded(result)
                    } else {
                        fail(format!("exit code {}", exit.0), Some(result), false)
                    };
                }
                let reason = if result.truncated {
                    "output_truncated".to_string()
                } else if memory_denied {
                    "memory_limit".to_string()
                } else if let Some(trap) = error.downcast_ref::<Trap>() {
                    match trap {
                        Trap::OutOfFuel => "fuel_exhausted".to_string(),
                        other => format!("trap: {other}"),
                    }
                } else {
                    format!("trap: {}", error.root_cause())
                };
                fail(
                    reason,
                    Some(JobResult {
                        exit_code: -1,
                        ..result
                    }),
                    permanent_traps,
                )
            }
        }
    }

    /// Instantiates a module and keeps it alive without running it: used to
    /// measure what a live sandbox costs.
    pub async fn instantiate_idle(&self, id: &str) -> Result<impl Send, WasmError> {
        let pre = self.instance_pre(id).await?;
        let mut store = Store::new(
            &self.engine,
            State {
                wasi: WasiCtxBuilder::new().build_p1(),
                limits: Limits {
                    max_memory: (self.config.default_memory_mib as usize) << 20,
                    memory_denied: false,
                },
            },
        );
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(SLICE_TICKS);
        store.epoch_deadline_async_yield_and_update(SLICE_TICKS);
        let instance = pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        Ok((store, instance))
    }
}

async fn call_start(pre: &InstancePre<State>, store: &mut Store<State>) -> anyhow::Result<()> {
    let instance = pre.instantiate_async(&mut *store).await?;
    let start = instance.get_typed_func::<(), ()>(&mut *store, "_start")?;
    start.call_async(&mut *store, ()).await
}

/// Removed when the run ends, whatever way it ends.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Where a module's bytes live in the blob store.
pub fn module_blob_key(id: &str) -> String {
    format!("modules/{}", id.strip_prefix("sha256:").unwrap_or(id))
}

/// The `wasm` job kind.
pub struct WasmHandler(pub Arc<WasmRuntime>);

#[async_trait::async_trait]
impl JobHandler for WasmHandler {
    async fn run(&self, job: &LeasedJob, kill: CancellationToken) -> AttemptEnd {
        match WasmSpec::parse(&job.spec) {
            Ok(spec) => self.0.run(&spec, &kill).await,
            Err(error) => AttemptEnd::Failed {
                result: None,
                error: format!("invalid spec: {error}"),
                permanent: true,
            },
        }
    }
}
