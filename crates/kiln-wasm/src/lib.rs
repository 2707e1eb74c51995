//! kiln's WebAssembly sandbox: wasmtime with WASI preview 1.
//!
//! Each module is compiled once (cached in memory as an `InstancePre`, and on
//! disk as a precompiled artifact keyed by module hash and engine
//! configuration, both bounded) and instantiated from a pooling allocator,
//! so a run costs microseconds. Guests run on the async executor and yield
//! every epoch slice, so a runaway loop never holds a thread and is killed
//! promptly. Output, memory, fuel and scratch disk are bounded per run.

mod cache;
#[cfg(feature = "testing")]
pub mod fixtures;
mod output;
mod scratch;
mod secret_dir;
mod spec;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_blob::BlobStore;
use kiln_core::{AttemptEnd, JobResult, LeasedJob, TenantQuotas};
use kiln_worker::secrets::{Opened, Recipient, SecretKeeper};
use kiln_worker::JobHandler;
use tokio_util::sync::CancellationToken;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, ResourceLimiter, Store, Trap,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{DirPerms, FilePerms, I32Exit, WasiCtxBuilder};

pub use cache::CacheStats;
pub use output::CappedOutput;
pub use spec::{check_spec, check_spec_within, WasmSpec};

/// The `wasm` kind's entry in `kiln_core::JobKinds`.
const _: kiln_core::CheckSpec = check_spec;

use cache::{CacheBounds, ModuleCache};
use scratch::{ScratchBudget, ScratchDir, ScratchLimit, ScratchRoot};
use secret_dir::{SecretDir, SecretsRoot};

/// Epoch tick; guests yield to the executor every `SLICE_TICKS` ticks.
const TICK: Duration = Duration::from_millis(1);
const SLICE_TICKS: u64 = 10;

#[derive(Clone, Debug)]
pub struct WasmConfig {
    /// Where precompiled modules are kept between runs of kiln.
    pub cache_dir: Option<PathBuf>,
    /// Bound on the precompiled modules on disk; the least recently used go
    /// first.
    pub disk_cache_bytes: u64,
    /// Bound on the compiled code kept in memory; the least recently used
    /// go first.
    pub memory_cache_bytes: u64,
    /// Where per-run scratch directories are made. kiln owns it: it is
    /// emptied at start, so it must not be shared with another process, and
    /// belongs outside the data directory.
    pub scratch_dir: PathBuf,
    /// Where each run's secret files are made (in a private directory of
    /// the runtime's own); a memory filesystem, so values never reach a
    /// disk. Default `/dev/shm`.
    pub secrets_dir: PathBuf,
    /// Instances alive at once (the pooling allocator's size).
    pub max_instances: u32,
    /// The largest linear memory any job may ask for.
    pub max_memory_mib: u64,
    pub default_memory_mib: u64,
    /// Default cap on each of stdout and stderr.
    pub default_output_bytes: usize,
    /// Per-tenant limits; this runtime enforces `wasm_output_bytes_max` and
    /// `wasm_scratch_bytes_max`, the API reads `modules_max` and
    /// `modules_bytes_max` from here.
    pub quotas: TenantQuotas,
}

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            cache_dir: None,
            disk_cache_bytes: 4 << 30,
            memory_cache_bytes: 512 << 20,
            scratch_dir: std::env::temp_dir().join("kiln-scratch"),
            secrets_dir: secret_dir::default_base(),
            max_instances: 1_100,
            max_memory_mib: 1024,
            default_memory_mib: 64,
            default_output_bytes: 1 << 20,
            quotas: TenantQuotas::default(),
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
    /// The blob store failed to fetch a module.
    #[error("module store: {0}")]
    Blob(#[from] kiln_blob::BlobError),
    /// A directory of the runtime could not be used.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    /// The engine could not be set up.
    #[error("wasm engine: {0}")]
    Engine(String),
    /// A compile or load task panicked.
    #[error("module load failed: {0}")]
    Panicked(String),
}

impl WasmError {
    fn io(what: &'static str, source: std::io::Error) -> WasmError {
        WasmError::Io { what, source }
    }
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
    scratch: Option<ScratchBudget>,
}

/// One run, ready to call: its store, module, output and scratch directory.
struct Sandbox {
    store: Store<State>,
    pre: InstancePre<State>,
    stdout: CappedOutput,
    stderr: CappedOutput,
    scratch: Option<ScratchDir>,
    /// Removed when the run ends.
    secrets: Option<SecretDir>,
}

pub struct WasmRuntime {
    engine: Engine,
    /// WASI preview 1 with the scratch-disk accounting in front of the calls
    /// that take disk; used for runs with a scratch directory.
    budget_linker: Linker<State>,
    /// The preview 1 functions a module may import.
    imports: Arc<HashSet<String>>,
    modules: Arc<ModuleCache>,
    scratch: ScratchRoot,
    secrets_root: SecretsRoot,
    config: WasmConfig,
    /// Where job files are kept and fetched.
    blobs: BlobStore,
    /// Where jobs' output goes as it is produced (live logs).
    logs: std::sync::OnceLock<kiln_logs::LogSink>,
    /// Opens the secrets jobs ask for.
    secrets: std::sync::OnceLock<SecretKeeper>,
}

impl WasmRuntime {
    /// Sets up the engine and caches and empties the scratch root.
    pub fn new(config: WasmConfig, blobs: BlobStore) -> Result<Arc<WasmRuntime>, WasmError> {
        let engine = new_engine(&config)?;
        let engine_error = |e: anyhow::Error| WasmError::Engine(format!("{e:#}"));
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut State| &mut s.wasi)
            .map_err(engine_error)?;
        let mut budget_linker = linker.clone();
        scratch::add_budget_to_linker(&mut budget_linker).map_err(engine_error)?;
        let imports = {
            let mut store = new_store(&engine, WasiCtxBuilder::new().build_p1(), 1, None);
            let names = linker.iter(&mut store).map(|(_, name, _)| name.to_string());
            Arc::new(names.collect())
        };
        let modules = ModuleCache::new(
            engine.clone(),
            linker.clone(),
            blobs.clone(),
            CacheBounds {
                memory_bytes: config.memory_cache_bytes,
                disk_dir: config.cache_dir.clone(),
                disk_bytes: config.disk_cache_bytes,
            },
        )?;
        let scratch = ScratchRoot::open(&config.scratch_dir)?;
        let secrets_root = SecretsRoot::open(&config.secrets_dir)?;
        start_epoch_ticker(&engine)?;
        Ok(Arc::new(WasmRuntime {
            engine,
            budget_linker,
            imports,
            modules: Arc::new(modules),
            scratch,
            secrets_root,
            config,
            blobs,
            logs: std::sync::OnceLock::new(),
            secrets: std::sync::OnceLock::new(),
        }))
    }

    /// Streams every job's output into the log store from now on; the
    /// first sink given stays.
    pub fn attach_logs(&self, logs: kiln_logs::LogSink) {
        let _ = self.logs.set(logs);
    }

    /// Opens the secrets jobs ask for from now on; the first keeper given
    /// stays. Without one, a job that asks for secrets fails.
    pub fn attach_secrets(&self, keeper: SecretKeeper) {
        let _ = self.secrets.set(keeper);
    }

    /// The quotas this runtime enforces and the API reads.
    pub fn quotas(&self) -> &TenantQuotas {
        &self.config.quotas
    }

    /// What the module caches hold and how many compiles there have been.
    pub fn cache_stats(&self) -> CacheStats {
        self.modules.stats()
    }

    /// Where each run's secret files are made (and removed when it ends).
    pub fn secrets_root(&self) -> &Path {
        self.secrets_root.path()
    }

    /// Where scratch directories are made.
    pub fn scratch_root(&self) -> &Path {
        &self.config.scratch_dir
    }

    /// Turns WAT text into binary; binary passes through.
    pub fn to_binary(bytes: &[u8]) -> Result<Vec<u8>, WasmError> {
        wat::parse_bytes(bytes)
            .map(|b| b.into_owned())
            .map_err(|e| WasmError::InvalidModule(e.to_string()))
    }

    /// Checks a module without compiling it: valid for this engine, importing
    /// only WASI preview 1 functions, exporting a `_start` function. Import
    /// signatures are checked when a worker compiles it. CPU-bound: call it
    /// on a blocking thread (see `check_module`).
    pub fn validate(&self, bytes: &[u8]) -> Result<(), WasmError> {
        validate(&self.engine, &self.imports, bytes)
    }

    /// `validate` on a blocking thread.
    pub async fn check_module(&self, bytes: bytes::Bytes) -> Result<(), WasmError> {
        let engine = self.engine.clone();
        let imports = self.imports.clone();
        tokio::task::spawn_blocking(move || validate(&engine, &imports, &bytes))
            .await
            .map_err(|e| WasmError::Panicked(e.to_string()))?
    }

    /// Compiles a module ahead of its first run.
    pub async fn prepare(&self, id: &str) -> Result<(), WasmError> {
        self.modules.get(id).await.map(drop)
    }

    /// Runs `_start` once with the spec's arguments, environment and stdin.
    /// A kill ends the run at once, also while the module is fetched or
    /// compiled (the compile finishes for later runs).
    pub async fn run(&self, spec: &WasmSpec, kill: &CancellationToken) -> AttemptEnd {
        self.run_as(None, spec, kill, None).await
    }

    /// Runs a job: as [`WasmRuntime::run`], and with its files, the inputs
    /// placed under `/scratch` first and the outputs kept once it succeeds.
    pub async fn run_job(
        &self,
        job: &LeasedJob,
        spec: &WasmSpec,
        kill: &CancellationToken,
    ) -> AttemptEnd {
        let tap = self
            .logs
            .get()
            .map(|logs| logs.tap(kiln_logs::Origin::job(&job.tenant, job.id, job.attempt)));
        let end = self
            .run_as(Some((&job.tenant, job.id)), spec, kill, tap.clone())
            .await;
        if let Some(tap) = tap {
            tap.finish().await;
        }
        end
    }

    async fn run_as(
        &self,
        owner: Option<(&str, i64)>,
        spec: &WasmSpec,
        kill: &CancellationToken,
        tap: Option<kiln_logs::LogTap>,
    ) -> AttemptEnd {
        let started = Instant::now();
        let opened = match self.open_secrets(owner, spec).await {
            Ok(opened) => opened,
            Err(error) => return failed(error, None, false),
        };
        let pre = tokio::select! {
            pre = self.modules.get(&spec.module) => pre,
            _ = kill.cancelled() => return failed("killed".to_string(), None, false),
        };
        let pre = match pre {
            Ok(pre) => pre,
            Err(error @ (WasmError::ModuleNotFound(_) | WasmError::InvalidModule(_))) => {
                return failed(error.to_string(), None, true)
            }
            Err(error) => return failed(error.to_string(), None, false),
        };
        let mut sandbox = match self.build_store(spec, pre, tap, &opened) {
            Ok(sandbox) => sandbox,
            Err(error) => return failed(error.to_string(), None, false),
        };
        if let (Some((tenant, _)), Some(dir)) = (owner, &sandbox.scratch) {
            let placed = tokio::select! {
                placed = self.place_inputs(tenant, &spec.inputs, dir.path()) => placed,
                _ = kill.cancelled() => Err(("killed".to_string(), false)),
            };
            if let Err((error, permanent)) = placed {
                return failed(error, None, permanent);
            }
            if !spec.inputs.is_empty() {
                let limit = self.config.quotas.wasm_scratch_bytes_max;
                let root = dir.path().to_path_buf();
                let used = tokio::task::spawn_blocking(move || scratch::disk_use(&root, limit + 1))
                    .await
                    .unwrap_or(u64::MAX);
                if used > limit {
                    return failed(
                        format!("the inputs take more than the scratch quota ({limit} bytes)"),
                        None,
                        true,
                    );
                }
                if let Some(budget) = sandbox.store.data_mut().scratch.as_mut() {
                    budget.start_at(used);
                }
            }
        }
        let outcome = tokio::select! {
            outcome = call_start(&sandbox.pre, &mut sandbox.store) => Some(outcome),
            _ = kill.cancelled() => None,
        };
        // What a redactor held back (a possible start of a value) goes out
        // now, before the output is read.
        sandbox.stdout.finish();
        sandbox.stderr.finish();
        drop(sandbox.secrets.take());
        let mut end = classify(&sandbox, outcome, started, !spec.retry_traps);
        if let (Some((tenant, job)), Some(dir), AttemptEnd::Succeeded(result)) =
            (owner, &sandbox.scratch, &mut end)
        {
            match self
                .keep_outputs(tenant, job, &spec.outputs, dir.path())
                .await
            {
                Ok(files) => result.files = files,
                Err(error) => {
                    let result = Some(result.clone());
                    end = failed(error, result, false);
                }
            }
        }
        drop(sandbox.scratch.take());
        end
    }

    /// The secrets a job's spec names, opened for it (and audited).
    async fn open_secrets(
        &self,
        owner: Option<(&str, i64)>,
        spec: &WasmSpec,
    ) -> Result<Opened, String> {
        if spec.secrets.is_empty() {
            return Ok(Opened::none());
        }
        let Some((tenant, job)) = owner else {
            return Err("secrets are given to jobs only".to_string());
        };
        let Some(keeper) = self.secrets.get() else {
            return Err(
                "this worker holds no master key, so it cannot deliver secrets".to_string(),
            );
        };
        keeper
            .open(tenant, &spec.secrets, &Recipient::job(job))
            .await
    }

    /// Fetches a job's inputs and writes them under its scratch directory,
    /// within the tenant's scratch quota. The error says whether another
    /// attempt could do better: an input that does not exist never will.
    async fn place_inputs(
        &self,
        tenant: &str,
        inputs: &[kiln_core::files::FileInput],
        dir: &Path,
    ) -> Result<(), (String, bool)> {
        let max = kiln_core::files::BYTES_MAX.min(self.config.quotas.wasm_scratch_bytes_max);
        let mut total = 0u64;
        for input in inputs {
            let bytes = self.blobs.input_file(tenant, input).await.map_err(|e| {
                let missing = matches!(e, kiln_blob::BlobError::NotFound(_));
                (
                    format!("input {} of job {}: {e}", input.path, input.job),
                    missing,
                )
            })?;
            total += bytes.len() as u64;
            if total > max {
                return Err((format!("inputs are over {max} bytes"), true));
            }
            let (dir, to) = (dir.to_path_buf(), input.destination().to_string());
            tokio::task::spawn_blocking(move || scratch::place(&dir, &to, &bytes))
                .await
                .map_err(|e| (e.to_string(), false))?
                .map_err(|e| (format!("input {}: {e}", input.destination()), false))?;
        }
        Ok(())
    }

    /// Reads the declared outputs (never through a symlink) and keeps them.
    async fn keep_outputs(
        &self,
        tenant: &str,
        job: i64,
        outputs: &[String],
        dir: &Path,
    ) -> Result<Vec<kiln_core::files::FileRef>, String> {
        let mut files = Vec::with_capacity(outputs.len());
        let mut left = kiln_core::files::BYTES_MAX;
        for path in outputs {
            let (root, rel) = (dir.to_path_buf(), path.clone());
            let max = left.min(kiln_core::files::FILE_BYTES_MAX);
            let bytes = tokio::task::spawn_blocking(move || scratch::collect(&root, &rel, max))
                .await
                .map_err(|e| e.to_string())??;
            left -= bytes.len() as u64;
            let kept = self
                .blobs
                .keep_file(tenant, job, path, bytes::Bytes::from(bytes))
                .await
                .map_err(|e| format!("output {path}: {e}"))?;
            files.push(kept);
        }
        Ok(files)
    }

    /// The store for one run: WASI context, limits, fuel and, when asked
    /// for, a private scratch directory with its disk budget.
    fn build_store(
        &self,
        spec: &WasmSpec,
        pre: InstancePre<State>,
        tap: Option<kiln_logs::LogTap>,
        opened: &Opened,
    ) -> Result<Sandbox, WasmError> {
        let output_cap = spec
            .output_limit_bytes
            .unwrap_or(self.config.default_output_bytes)
            .min(usize::try_from(self.config.quotas.wasm_output_bytes_max).unwrap_or(usize::MAX));
        let (stdout, stderr) = match tap {
            None => (CappedOutput::new(output_cap), CappedOutput::new(output_cap)),
            Some(tap) => (
                CappedOutput::tapped(output_cap, tap.clone(), kiln_logs::Stream::Stdout),
                CappedOutput::tapped(output_cap, tap, kiln_logs::Stream::Stderr),
            ),
        };
        if let Some(redactor) = &opened.redactor {
            stdout.redact_with(redactor);
            stderr.redact_with(redactor);
        }
        let mut wasi = WasiCtxBuilder::new();
        wasi.arg("main")
            .args(&spec.args)
            .stdin(MemoryInputPipe::new(spec.stdin.clone().into_bytes()))
            .stdout(stdout.clone())
            .stderr(stderr.clone());
        for (key, value) in &spec.env {
            wasi.env(key, value);
        }
        let secrets = if opened.values.is_empty() {
            None
        } else {
            let dir = self.secrets_root.place(&opened.values)?;
            wasi.preopened_dir(dir.path(), "/run/secrets", DirPerms::READ, FilePerms::READ)
                .map_err(|e| WasmError::io("secrets directory", std::io::Error::other(e)))?;
            Some(dir)
        };
        let (scratch, budget, pre) = if spec.wants_scratch() {
            let dir = self.scratch.create()?;
            wasi.preopened_dir(dir.path(), "/scratch", DirPerms::all(), FilePerms::all())
                .map_err(|e| WasmError::io("scratch directory", std::io::Error::other(e)))?;
            let budget = ScratchBudget::new(dir.path(), self.config.quotas.wasm_scratch_bytes_max);
            let pre = self
                .budget_linker
                .instantiate_pre(pre.module())
                .map_err(|e| WasmError::InvalidModule(format!("{e:#}")))?;
            (Some(dir), Some(budget), pre)
        } else {
            (None, None, pre)
        };
        let memory_mib = spec
            .memory_mib
            .unwrap_or(self.config.default_memory_mib)
            .min(self.config.max_memory_mib);
        let mut store = new_store(&self.engine, wasi.build_p1(), memory_mib, budget);
        let _ = store.set_fuel(spec.fuel.unwrap_or(u64::MAX));
        Ok(Sandbox {
            store,
            pre,
            stdout,
            stderr,
            scratch,
            secrets,
        })
    }

    /// Instantiates a module and keeps it alive without running it: used to
    /// measure what a live sandbox costs.
    pub async fn instantiate_idle(&self, id: &str) -> Result<impl Send, WasmError> {
        let pre = self.modules.get(id).await?;
        let mut store = new_store(
            &self.engine,
            WasiCtxBuilder::new().build_p1(),
            self.config.default_memory_mib,
            None,
        );
        let instance = pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        Ok((store, instance))
    }
}

fn new_engine(config: &WasmConfig) -> Result<Engine, WasmError> {
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
    Engine::new(&wasm).map_err(|e| WasmError::Engine(format!("{e:#}")))
}

/// Advances the engine's epoch every tick for as long as the engine lives.
fn start_epoch_ticker(engine: &Engine) -> Result<(), WasmError> {
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
        .map(drop)
        .map_err(|e| WasmError::io("epoch thread", e))
}

/// A store with the memory limit, epoch slicing and (for scratch runs) the
/// disk budget every run gets.
fn new_store(
    engine: &Engine,
    wasi: WasiP1Ctx,
    memory_mib: u64,
    scratch: Option<ScratchBudget>,
) -> Store<State> {
    let mut store = Store::new(
        engine,
        State {
            wasi,
            limits: Limits {
                max_memory: (memory_mib as usize) << 20,
                memory_denied: false,
            },
            scratch,
        },
    );
    store.limiter(|s| &mut s.limits);
    store.set_epoch_deadline(SLICE_TICKS);
    store.epoch_deadline_async_yield_and_update(SLICE_TICKS);
    store
}

fn validate(engine: &Engine, imports: &HashSet<String>, bytes: &[u8]) -> Result<(), WasmError> {
    let invalid = |e: &dyn std::fmt::Display| WasmError::InvalidModule(format!("{e:#}"));
    Module::validate(engine, bytes).map_err(|e| invalid(&e))?;
    let mut has_start = false;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| invalid(&e))? {
            wasmparser::Payload::ImportSection(section) => {
                for import in section {
                    let import = import.map_err(|e| invalid(&e))?;
                    let known = import.module == "wasi_snapshot_preview1"
                        && matches!(import.ty, wasmparser::TypeRef::Func(_))
                        && imports.contains(import.name);
                    if !known {
                        return Err(WasmError::InvalidModule(format!(
                            "import {}::{} is not a WASI preview 1 function",
                            import.module, import.name
                        )));
                    }
                }
            }
            wasmparser::Payload::ExportSection(section) => {
                for export in section {
                    let export = export.map_err(|e| invalid(&e))?;
                    has_start |=
                        export.name == "_start" && export.kind == wasmparser::ExternalKind::Func;
                }
            }
            _ => {}
        }
    }
    if !has_start {
        return Err(WasmError::InvalidModule(
            "the module exports no _start function".to_string(),
        ));
    }
    Ok(())
}

async fn call_start(pre: &InstancePre<State>, store: &mut Store<State>) -> anyhow::Result<()> {
    let instance = pre.instantiate_async(&mut *store).await?;
    let start = instance.get_typed_func::<(), ()>(&mut *store, "_start")?;
    start.call_async(&mut *store, ()).await
}

fn failed(error: String, result: Option<JobResult>, permanent: bool) -> AttemptEnd {
    AttemptEnd::Failed {
        result,
        error,
        permanent,
    }
}

/// How a run ended: `None` for killed, else what `_start` returned.
fn classify(
    sandbox: &Sandbox,
    outcome: Option<anyhow::Result<()>>,
    started: Instant,
    permanent_traps: bool,
) -> AttemptEnd {
    let result = JobResult {
        exit_code: 0,
        stdout: sandbox.stdout.text(),
        stderr: sandbox.stderr.text(),
        duration_ms: started.elapsed().as_millis() as i64,
        truncated: sandbox.stdout.truncated() || sandbox.stderr.truncated(),
        ..Default::default()
    };
    let aborted = JobResult {
        exit_code: -1,
        ..result.clone()
    };
    let error = match outcome {
        None => return failed("killed".to_string(), Some(aborted), false),
        Some(Ok(())) => return AttemptEnd::Succeeded(result),
        Some(Err(error)) => error,
    };
    if let Some(exit) = error.downcast_ref::<I32Exit>() {
        let result = JobResult {
            exit_code: exit.0,
            ..result
        };
        return if exit.0 == 0 {
            AttemptEnd::Succeeded(result)
        } else {
            failed(format!("exit code {}", exit.0), Some(result), false)
        };
    }
    let state = sandbox.store.data();
    let reason = if result.truncated {
        "output_truncated".to_string()
    } else if error.downcast_ref::<ScratchLimit>().is_some()
        || state.scratch.as_ref().is_some_and(|s| s.exceeded)
    {
        "scratch_limit".to_string()
    } else if state.limits.memory_denied {
        "memory_limit".to_string()
    } else if let Some(trap) = error.downcast_ref::<Trap>() {
        match trap {
            Trap::OutOfFuel => "fuel_exhausted".to_string(),
            other => format!("trap: {other}"),
        }
    } else {
        format!("trap: {}", error.root_cause())
    };
    failed(reason, Some(aborted), permanent_traps)
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
        match WasmSpec::parse_within(&job.spec, &self.0.config.quotas) {
            Ok(spec) => self.0.run_job(job, &spec, &kill).await,
            Err(error) => failed(format!("invalid spec: {error}"), None, true),
        }
    }
}
