//! The server roles: `serve` (all in one), `api`, `worker`, `scheduler`.
//! Each role builds only what it uses: the API neither boots VMs nor keeps
//! compiled modules, the scheduler only takes back expired leases.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_api::AppState;
use kiln_blob::{BlobConfig, BlobStore};
use kiln_core::{Scope, Scopes};
use kiln_db::Db;
use kiln_wasm::{WasmConfig, WasmHandler, WasmRuntime};
use kiln_worker::{Handlers, NoopHandler, Worker, WorkerConfig};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{redact, Settings};

/// What one process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// API, worker and scheduler in one process (`kiln serve`).
    All,
    /// The HTTP API alone.
    Api,
    /// Runs jobs (and, like every worker, takes back expired leases).
    Worker,
    /// Takes back expired leases, advances pipeline runs and fires schedules.
    Scheduler,
}

impl Role {
    fn serves_api(self) -> bool {
        matches!(self, Role::All | Role::Api)
    }

    fn runs_jobs(self) -> bool {
        matches!(self, Role::All | Role::Worker)
    }

    /// The role names a node reports.
    fn names(self) -> &'static [&'static str] {
        match self {
            Role::All => &["api", "worker", "scheduler"],
            Role::Api => &["api"],
            Role::Worker => &["worker"],
            Role::Scheduler => &["scheduler"],
        }
    }
}

/// This process's id in the fleet; its worker leases under the same id, so
/// a node's leases are the jobs whose `worker_id` it is.
fn node_id() -> String {
    format!("{}-{}", kiln_worker::hostname(), std::process::id())
}

pub async fn open_db(settings: &Settings) -> anyhow::Result<Db> {
    // At start-up the database may still be coming up: wait for it a while.
    let mut tries = 0;
    loop {
        match Db::connect(&settings.database_url).await {
            Ok(db) => return Ok(db),
            Err(error) if tries < 30 && error.is_unavailable() => {
                tries += 1;
                tracing::warn!(%error, "database not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("opening {}", redact(&settings.database_url)))
            }
        }
    }
}

/// The blob store every node of the deployment shares.
pub fn open_blobs(settings: &Settings, db: &Db) -> anyhow::Result<BlobStore> {
    if let (BlobConfig::Local(dir), Db::Postgres(_)) = (&settings.blobs, db) {
        tracing::warn!(
            blob_dir = %dir.display(),
            "blobs are kept in a local directory while the database is PostgreSQL: every node \
             must mount this same directory, or modules stored by one node are missing on others"
        );
    }
    let blobs = BlobStore::open(&settings.blobs, db).context("opening the blob store")?;
    tracing::info!(store = blobs.describe(), "blob store open");
    Ok(blobs)
}

/// The runtime that runs wasm jobs, with its compiled-module cache in the
/// data dir and its scratch directories under the configured root.
pub fn wasm_runtime(settings: &Settings, blobs: &BlobStore) -> anyhow::Result<Arc<WasmRuntime>> {
    let config = WasmConfig {
        cache_dir: Some(settings.data_dir.join("wasm-cache")),
        scratch_dir: settings.scratch_dir.clone(),
        quotas: settings.quotas.clone(),
        ..WasmConfig::default()
    };
    Ok(WasmRuntime::new(config, blobs.clone())?)
}

/// What the API needs to accept modules: their validation (which compiles
/// nothing) and the module quotas. It keeps no compiled modules, room for
/// one instance only, and a scratch root of its own that it never uses, so
/// it cannot empty the root of a worker on the same host.
fn module_validator(settings: &Settings, blobs: &BlobStore) -> anyhow::Result<Arc<WasmRuntime>> {
    let config = WasmConfig {
        cache_dir: None,
        scratch_dir: settings.scratch_dir.join("api"),
        max_instances: 1,
        quotas: settings.quotas.clone(),
        ..WasmConfig::default()
    };
    Ok(WasmRuntime::new(config, blobs.clone())?)
}

/// The URL API nodes reach a VM host's internal listener at.
fn internal_url(settings: &Settings, bound: std::net::SocketAddr) -> anyhow::Result<String> {
    if let Some(url) = &settings.internal_url {
        return Ok(url.trim_end_matches('/').to_string());
    }
    anyhow::ensure!(
        !bound.ip().is_unspecified(),
        "--internal-listen {bound} is every address: say which URL other hosts use with --internal-url"
    );
    Ok(format!("http://{bound}"))
}

/// The runtime module rules run in, in a scheduler process: no compiled
/// modules kept on disk, a few instances, and a scratch root of its own
/// (rules get no scratch directory).
fn rules_runtime(settings: &Settings, blobs: &BlobStore) -> anyhow::Result<Arc<WasmRuntime>> {
    let config = WasmConfig {
        cache_dir: None,
        scratch_dir: settings.scratch_dir.join("rules"),
        max_instances: 16,
        quotas: settings.quotas.clone(),
        ..WasmConfig::default()
    };
    Ok(WasmRuntime::new(config, blobs.clone())?)
}

/// MicroVMs are offered when a `default` image exists in the data dir; the
/// accelerator is probed once per host.
async fn vm_manager(
    settings: &Settings,
    host_tag: Option<&str>,
) -> anyhow::Result<Option<Arc<kiln_vm::VmManager>>> {
    let images = settings.data_dir.join("images");
    let has_default = kiln_vm::image::Image::open(&images, "default").is_ok();
    if !has_default && kiln_vm::image::Image::list(&images).is_empty() {
        tracing::info!("no guest image: microVMs are off (build one with `kiln image build`)");
        return Ok(None);
    }
    let vm_dir = settings.data_dir.join("vms");
    match kiln_vm::VmManager::start(&images, &vm_dir, settings.vm.clone()).await {
        Ok(manager) => {
            // Before the warm pool boots: every id it gives names this host.
            if let Some(tag) = host_tag {
                manager.set_host_tag(tag);
            }
            if settings.vm_warm > 0 && has_default {
                manager.keep_warm("default", 1, 128, settings.vm_warm);
            }
            for (image, count) in &settings.vm_warm_images {
                if *count > 0 {
                    manager.keep_warm(image, 1, 128, *count);
                    // E2B sandboxes of the base image come from a pool of
                    // their own shape.
                    if settings.e2b_listen.is_some() && *image == settings.e2b_base_image {
                        manager.keep_warm(
                            image,
                            kiln_api::e2b::VCPUS,
                            kiln_api::e2b::MEMORY_MIB,
                            *count,
                        );
                    }
                }
            }
            Ok(Some(manager))
        }
        Err(error @ kiln_vm::VmError::InUse(_)) => Err(error.into()),
        Err(error) => {
            tracing::warn!(%error, "microVMs are off");
            Ok(None)
        }
    }
}

/// The first start of an empty database makes an admin key and writes it
/// where the CLI will find it. Of several nodes starting together, exactly
/// one makes it.
async fn ensure_admin_key(db: &Db, data_dir: &Path) -> anyhow::Result<()> {
    if db.key_count().await? > 0 {
        return Ok(());
    }
    let (id, secret) = kiln_db::generate_key();
    let key = kiln_db::ApiKey {
        id,
        tenant: "default".into(),
        name: "admin".into(),
        scopes: Scopes(vec![Scope::System]),
        created_at: kiln_worker::now_millis(),
        revoked_at: None,
        expires_at: None,
        last_used_at: None,
    };
    if !db
        .key_insert_first(&key, &kiln_db::hash_key(&secret))
        .await?
    {
        return Ok(());
    }
    let path = data_dir.join("admin.key");
    write_secret(&path, &secret)?;
    println!(
        "kiln: created the first admin key; it is in {}",
        path.display()
    );
    Ok(())
}

/// The master key secrets are sealed under: `--master-key-file`, or
/// `<data-dir>/master.key`, made (0600) at the first start.
pub fn master_key(settings: &Settings) -> anyhow::Result<kiln_core::secrets::MasterKey> {
    let (path, default) = match &settings.master_key_file {
        Some(path) => (path.clone(), false),
        None => (settings.data_dir.join("master.key"), true),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => kiln_core::secrets::MasterKey::parse(&text)
            .with_context(|| format!("{} does not hold 64 hex digits", path.display())),
        Err(error) if default && error.kind() == std::io::ErrorKind::NotFound => {
            use rand::RngCore;
            let mut bytes = [0u8; kiln_core::secrets::KEY_BYTES];
            rand::rng().fill_bytes(&mut bytes);
            let key = kiln_core::secrets::MasterKey::new(bytes);
            write_secret(&path, &key.to_hex())?;
            tracing::info!(path = %path.display(), id = %key.id(), "made the master key for secrets");
            Ok(key)
        }
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// The master key for a process that runs jobs but no API: read from
/// `--master-key-file` (which must then hold one) or `<data-dir>/master.key`
/// when there is one; never made. Without it, jobs that ask for secrets
/// fail on this worker, saying so.
pub fn worker_master_key(
    settings: &Settings,
) -> anyhow::Result<Option<kiln_core::secrets::MasterKey>> {
    read_master_key(settings.master_key_file.as_deref(), &settings.data_dir)
}

fn read_master_key(
    file: Option<&Path>,
    data_dir: &Path,
) -> anyhow::Result<Option<kiln_core::secrets::MasterKey>> {
    let (path, given) = match file {
        Some(path) => (path.to_path_buf(), true),
        None => (data_dir.join("master.key"), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => kiln_core::secrets::MasterKey::parse(&text)
            .map(Some)
            .with_context(|| format!("{} does not hold 64 hex digits", path.display())),
        Err(error) if !given && error.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(
                "no master key ({} or --master-key-file): jobs that ask for secrets fail on this worker",
                path.display()
            );
            Ok(None)
        }
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// Where users' session tokens' keys are: `--token-key-file`, or
/// `<data-dir>/token.key`.
pub fn token_key_path(settings: &Settings) -> (std::path::PathBuf, bool) {
    match &settings.token_key_file {
        Some(path) => (path.clone(), false),
        None => (settings.data_dir.join("token.key"), true),
    }
}

/// The keys session tokens are signed with, made (0600) at the first start
/// when the file is the default one.
pub fn token_keys(settings: &Settings) -> anyhow::Result<kiln_api::auth::TokenKeys> {
    let (path, default) = token_key_path(settings);
    let keys = kiln_api::auth::TokenKeys::open(&path, default)
        .with_context(|| format!("reading the token keys in {}", path.display()))?;
    tracing::info!(path = %path.display(), signing = %keys.signing_kid(), "session token keys");
    Ok(keys)
}

/// Writes a secret readable by its owner only, whatever mode the file had:
/// the mode is set before the old content is cut and the new one written.
pub fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    file.set_len(0)?;
    writeln!(file, "{secret}")?;
    Ok(())
}

/// Everything a role needs, built before any role starts so that a failure
/// to build one leaves nothing running.
struct Parts {
    db: Db,
    vms: Option<Arc<kiln_vm::VmManager>>,
    api: Option<(tokio::net::TcpListener, Arc<AppState>)>,
    worker: Option<Worker>,
    retention: kiln_worker::Retention,
    nats_url: Option<String>,
    amqp: Option<kiln_api::intake::amqp::AmqpIntake>,
    /// This process as a node, and (where the scheduler's loops run) when
    /// nodes count as lost.
    node: kiln_ops::NodeConfig,
    detector: kiln_ops::DetectorConfig,
    /// A VM host's internal listener (requests forwarded by API nodes), its
    /// state and the URL it announces.
    internal: Option<(tokio::net::TcpListener, Arc<AppState>, String)>,
    /// The E2B-compatible listener and its front.
    e2b: Option<(tokio::net::TcpListener, Arc<kiln_api::e2b::E2b>)>,
    /// Where the rule engine runs module rules (the worker's runtime when
    /// this process has one).
    rules_wasm: Option<Arc<WasmRuntime>>,
    /// The live logs' writer; it stops after every role, so their last
    /// lines are stored.
    logs: (kiln_logs::LogSink, tokio::task::JoinHandle<()>),
    logs_stop: CancellationToken,
    blobs: BlobStore,
    loki: Option<kiln_logs::LokiConfig>,
}

/// The fallible steps come first and the VM manager, which may boot VMs at
/// once, last: no step after it can fail and leave its VMs running.
async fn build(settings: &Settings, role: Role, db: Db) -> anyhow::Result<Parts> {
    let blobs = open_blobs(settings, &db)?;
    let logs_stop = CancellationToken::new();
    let logs = kiln_logs::LogSink::start(
        db.clone(),
        Some(blobs.clone()),
        kiln_logs::LogConfig {
            source_bytes_max: settings.log_bytes_max,
            ..kiln_logs::LogConfig::new(&node_id())
        },
        logs_stop.clone(),
    );
    let mut parts = Parts {
        logs,
        logs_stop,
        blobs: blobs.clone(),
        loki: settings.loki_url.as_deref().map(kiln_logs::LokiConfig::new),
        db: db.clone(),
        vms: None,
        api: None,
        worker: None,
        retention: kiln_worker::Retention {
            finished_jobs: Duration::from_secs(settings.retention_hours.saturating_mul(3600)),
            events: Duration::from_secs(settings.event_retention_hours.saturating_mul(3600)),
            logs: Duration::from_secs(settings.log_retention_hours.saturating_mul(3600)),
            log_blobs: Some(blobs.clone()),
            ..kiln_worker::Retention::default()
        },
        nats_url: settings.nats_url.clone(),
        amqp: settings.amqp.clone(),
        node: kiln_ops::NodeConfig {
            heartbeat_every: Duration::from_millis(settings.node_heartbeat_ms),
            ..kiln_ops::NodeConfig::new(&node_id(), role.names())
        },
        detector: kiln_ops::DetectorConfig {
            deadline: Duration::from_millis(settings.node_lost_ms),
            ..kiln_ops::DetectorConfig::default()
        },
        internal: None,
        e2b: None,
        rules_wasm: None,
    };
    if role == Role::Scheduler {
        // Module rules run where the rules do.
        parts.rules_wasm = match open_blobs(settings, &db).and_then(|b| rules_runtime(settings, &b))
        {
            Ok(runtime) => Some(runtime),
            Err(error) => {
                tracing::warn!(%error, "no wasm runtime for module rules: they will record an error");
                None
            }
        };
        return Ok(parts);
    }
    let e2b_listener = match settings.e2b_listen {
        Some(address) if role.serves_api() => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listening on {address} (E2B)"))?,
        ),
        Some(_) => anyhow::bail!("--e2b-listen is served by `kiln serve` or `kiln api`"),
        None => None,
    };
    let listener = if role.serves_api() {
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("listening on {}", settings.listen))?;
        ensure_admin_key(&db, &settings.data_dir).await?;
        Some(listener)
    } else {
        None
    };
    // Secrets are sealed where the API runs; a process without the API
    // makes no key of its own (every node of a deployment shares one),
    // and a worker reads it only to deliver secrets to jobs.
    let master = match &listener {
        Some(_) => Some(master_key(settings)?),
        None if role.runs_jobs() => worker_master_key(settings)?,
        None => None,
    };
    let keeper = kiln_worker::secrets::SecretKeeper::new(db.clone(), master.clone());
    // So are users' session tokens signed and checked.
    let tokens = match &listener {
        Some(_) => Some(token_keys(settings)?),
        None => None,
    };
    let runtime = if role.runs_jobs() {
        let runtime = wasm_runtime(settings, &blobs)?;
        runtime.attach_logs(parts.logs.0.clone());
        runtime.attach_secrets(keeper.clone());
        Some(runtime)
    } else {
        None
    };
    // All in one process, the API shares the worker's runtime, so a module
    // pushed is compiled once, for the jobs that will run it.
    let validator = match (&runtime, &listener) {
        (Some(runtime), _) => Some(runtime.clone()),
        (None, Some(_)) => Some(module_validator(settings, &blobs)?),
        (None, None) => None,
    };
    // A worker that hosts VMs for API nodes listens for their forwards.
    let internal = match settings.internal_listen {
        Some(address) if role.runs_jobs() => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listening on {address} (internal)"))?;
            let url = internal_url(settings, listener.local_addr()?)?;
            Some((listener, url))
        }
        _ => None,
    };
    let host_tag = internal
        .as_ref()
        .map(|_| kiln_vm::manager::host_tag(&node_id()));
    // Where VMs may live on other hosts, API nodes forward to them with a
    // key all processes of the deployment share.
    let forwarding = listener.is_some() && db.backend() == "postgres";
    let internal_key = if internal.is_some() || forwarding {
        Some(kiln_api::vm_hosts::internal_key(&db).await?)
    } else {
        None
    };
    if let Some(runtime) = runtime {
        parts.rules_wasm = Some(runtime.clone());
        parts.vms = vm_manager(settings, host_tag.as_deref()).await?;
        if let Some(vms) = &parts.vms {
            // Reaps the network an earlier run left, whatever this one asks.
            if let Err(error) = vms
                .attach_network(settings.vm.network.clone(), db.clone())
                .await
            {
                tracing::warn!(%error, "VM networking is off");
            }
            vms.attach_logs(parts.logs.0.clone());
            vms.attach_secrets(keeper.clone());
            kiln_api::record_vm_lifecycle(db.clone(), vms);
            parts.node.accelerator = Some(vms.accelerator().as_str().to_string());
            let live = Arc::downgrade(vms);
            parts.node.vms_live = Some(Arc::new(move || {
                live.upgrade().map_or(0, |vms| vms.live_count())
            }));
        }
        let worker = worker(settings, &db, &blobs, runtime, parts.vms.as_ref());
        parts.node.worker = Some(worker.control());
        parts.worker = Some(worker);
    }
    if let (Some((listener, url)), Some(vms), Some(key)) =
        (internal, parts.vms.clone(), internal_key.clone())
    {
        let state = AppState::with_vms(db.clone(), blobs.clone(), None, Some(vms));
        let _ = state.internal_key.set(key);
        // Forwarded commands with secrets are given them here.
        if let Some(master) = master.clone() {
            let _ = state.master_key.set(master);
        }
        parts.internal = Some((listener, state, url));
    }
    if let Some(listener) = listener {
        let state = AppState::with_vms(db.clone(), blobs, validator, parts.vms.clone());
        if let Some(master) = master.clone() {
            let _ = state.master_key.set(master);
        }
        if let Some(tokens) = tokens {
            state.auth.set_keys(tokens);
        }
        state.auth.set_settings(kiln_api::auth::AuthSettings {
            token_ttl_s: settings.token_ttl_s,
            secure_cookies: settings.secure_cookies,
            trusted_proxies: settings.trusted_proxies.clone(),
            ..kiln_api::auth::AuthSettings::default()
        });
        if let (true, Some(key)) = (forwarding, internal_key) {
            let own = parts
                .vms
                .as_ref()
                .and_then(|vms| vms.host_tag().map(str::to_string));
            let deadline = Duration::from_millis(settings.node_lost_ms);
            let _ = state
                .fleet
                .set(kiln_api::vm_hosts::VmFleet::new(key, deadline, own));
        }
        state.limit_rate(settings.rate_limit, settings.rate_burst);
        state.allow_notify(settings.notify_allow.clone());
        if let Some(e2b_listener) = e2b_listener {
            let e2b = kiln_api::e2b::E2b::new(state.clone(), settings.e2b_base_image.clone());
            parts.e2b = Some((e2b_listener, e2b));
        }
        parts.api = Some((listener, state));
    }
    Ok(parts)
}

fn worker(
    settings: &Settings,
    db: &Db,
    blobs: &BlobStore,
    wasm: Arc<WasmRuntime>,
    vms: Option<&Arc<kiln_vm::VmManager>>,
) -> Worker {
    let mut config = WorkerConfig::new(&node_id());
    config.slots = settings.slots;
    config.lease = Duration::from_millis(settings.lease_ms);
    config.heartbeat_every = (config.lease / 4).min(Duration::from_millis(500));
    config.tenant_running_max = Some(settings.quotas.jobs_running_max);
    config.pipelines = Some(kiln_api::builtin_kinds());
    let mut handlers = Handlers::new()
        .with("wasm", Arc::new(WasmHandler(wasm)))
        .with("noop", Arc::new(NoopHandler))
        .with(
            kiln_events::notify::KIND,
            Arc::new(kiln_events::notify::NotifyHandler {
                db: db.clone(),
                allow: settings.notify_allow.clone(),
            }),
        );
    if let Some(vms) = vms {
        handlers = kiln_vm::job::register(handlers, vms, blobs);
    }
    Worker::new(db.clone(), handlers, config)
}

pub async fn run(settings: Settings, role: Role) -> anyhow::Result<()> {
    settings.create_data_dir()?;
    // Listening from the start: a signal during a long start-up (a probe
    // boot) stops the roles as soon as they run.
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    let db = tokio::select! {
        db = open_db(&settings) => db?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    tracing::info!(backend = db.backend(), data_dir = %settings.data_dir.display(), ?role, "store open");
    let mut parts = match build(&settings, role, db.clone()).await {
        Ok(parts) => parts,
        Err(error) => {
            db.close().await;
            return Err(error);
        }
    };
    let tasks = start(&mut parts, role, &shutdown);
    tracing::info!(?role, "roles started");
    let outcome = supervise(tasks, &shutdown).await;
    if let Some(vms) = parts.vms {
        vms.shutdown().await;
    }
    parts.logs_stop.cancel();
    let _ = parts.logs.1.await;
    parts.db.close().await;
    outcome
}

/// Spawns one task per role (and the VM expiry), taking the API and the
/// worker out of `parts`.
fn start(
    parts: &mut Parts,
    role: Role,
    shutdown: &CancellationToken,
) -> JoinSet<anyhow::Result<()>> {
    let mut tasks = JoinSet::new();
    // Every process is a node. Its row goes when the heartbeat stops, which
    // is at shutdown, while the worker may still be finishing its jobs: their
    // leases, not the node row, keep them.
    let heartbeat =
        kiln_ops::heartbeat_loop(parts.db.clone(), parts.node.clone(), shutdown.clone());
    tasks.spawn(async move {
        heartbeat.await;
        Ok(())
    });
    if matches!(role, Role::All | Role::Scheduler) {
        let detector =
            kiln_ops::detector_loop(parts.db.clone(), parts.detector.clone(), shutdown.clone());
        tasks.spawn(async move {
            detector.await;
            Ok(())
        });
        let incidents = kiln_ops::incidents::detect_loop(
            parts.db.clone(),
            kiln_ops::detectors::DetectorSettings::default(),
            shutdown.clone(),
        );
        tasks.spawn(async move {
            incidents.await;
            Ok(())
        });
        // The rule engine: several (several schedulers) are harmless, the
        // store decides each firing once.
        let rules = kiln_ops::rules::engine::rules_loop(
            parts.db.clone(),
            kiln_ops::rules::engine::RulesConfig {
                kinds: kiln_api::builtin_kinds(),
                wasm: parts.rules_wasm.clone(),
            },
            shutdown.clone(),
        );
        tasks.spawn(async move {
            rules.await;
            Ok(())
        });
    }
    if let Some(worker) = parts.worker.take() {
        let stop = shutdown.clone();
        tasks.spawn(async move {
            worker.run(stop).await;
            Ok(())
        });
    }
    // The NATS bridge runs beside the scheduler's loops; its cursor and
    // JetStream's deduplication make several bridges harmless.
    if let (Some(url), Role::All | Role::Scheduler) = (parts.nats_url.clone(), role) {
        let bridge = kiln_events::nats::bridge(parts.db.clone(), url, shutdown.clone());
        tasks.spawn(async move {
            bridge.await;
            Ok(())
        });
    }
    // The Loki pusher too: its cursor makes a second one push a page twice
    // at worst.
    if let (Some(config), Role::All | Role::Scheduler) = (parts.loki.clone(), role) {
        let push = kiln_logs::push_loop(
            parts.db.clone(),
            parts.blobs.clone(),
            config,
            shutdown.clone(),
        );
        tasks.spawn(async move {
            push.await;
            Ok(())
        });
    }
    // The notification matcher too: idempotency keys make a second one
    // harmless.
    if matches!(role, Role::All | Role::Scheduler) {
        let matcher = kiln_events::notify::match_loop(parts.db.clone(), shutdown.clone());
        tasks.spawn(async move {
            matcher.await;
            Ok(())
        });
    }
    if role == Role::Scheduler {
        let rescue =
            kiln_worker::rescue_loop(parts.db.clone(), Duration::from_secs(1), shutdown.clone());
        tasks.spawn(async move {
            rescue.await;
            Ok(())
        });
    }
    // Every role writes audit records; each process chains them (one pass
    // at a time per database).
    {
        let db = parts.db.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = kiln_db::audit::chain_loop(db, Duration::from_millis(250)) => {}
                _ = stop.cancelled() => {}
            }
            Ok(())
        });
    }
    // Retention runs wherever leases are recovered; several passes at once
    // only share the deleting.
    if role != Role::Api {
        let gc = kiln_worker::gc_loop(parts.db.clone(), parts.retention.clone(), shutdown.clone());
        tasks.spawn(async move {
            gc.await;
            Ok(())
        });
    }
    // Pipelines advance and schedules fire wherever jobs run or leases are
    // recovered; the store makes each transition and each tick happen once,
    // however many processes do this.
    if role != Role::Api {
        let advance = kiln_worker::flow::advance_loop(
            parts.db.clone(),
            kiln_api::builtin_kinds(),
            shutdown.clone(),
        );
        tasks.spawn(async move {
            advance.await;
            Ok(())
        });
        let fire = kiln_worker::flow::schedule_loop(
            parts.db.clone(),
            kiln_api::builtin_kinds(),
            shutdown.clone(),
        );
        tasks.spawn(async move {
            fire.await;
            Ok(())
        });
    }
    if let (Some(url), Some((_, state))) = (parts.nats_url.clone(), parts.api.as_ref()) {
        let intake = kiln_api::intake::nats_intake(state.clone(), url, shutdown.clone());
        tasks.spawn(async move {
            intake.await;
            Ok(())
        });
    }
    if let (Some(config), Some((_, state))) = (parts.amqp.clone(), parts.api.as_ref()) {
        let intake = kiln_api::intake::amqp::amqp_intake(state.clone(), config, shutdown.clone());
        tasks.spawn(async move {
            intake.await;
            Ok(())
        });
    }
    if let Some((listener, state)) = parts.api.take() {
        if let Ok(address) = listener.local_addr() {
            println!("kiln: listening on http://{address}");
        }
        let stop = shutdown.clone();
        tasks.spawn(async move {
            kiln_api::serve(listener, state, async move { stop.cancelled().await })
                .await
                .context("HTTP server")
        });
    }
    if let Some((listener, e2b)) = parts.e2b.take() {
        if let Ok(address) = listener.local_addr() {
            println!("kiln: E2B API on http://{address} (E2B_API_URL and E2B_SANDBOX_URL)");
        }
        let stop = shutdown.clone();
        tasks.spawn(async move {
            kiln_api::e2b::serve(listener, e2b, async move { stop.cancelled().await })
                .await
                .context("E2B HTTP server")
        });
    }
    if let Some(vms) = parts.vms.clone() {
        tasks.spawn(expire_vms(vms, shutdown.clone()));
    }
    if let (Some((listener, state, url)), Some(vms)) = (parts.internal.take(), parts.vms.clone()) {
        tracing::info!(%url, "taking forwarded VM requests");
        let host = kiln_api::vm_hosts::host_loop(
            parts.db.clone(),
            vms,
            node_id(),
            url,
            parts.node.heartbeat_every,
            shutdown.clone(),
        );
        tasks.spawn(async move {
            host.await;
            Ok(())
        });
        let stop = shutdown.clone();
        tasks.spawn(async move {
            kiln_api::vm_hosts::serve_internal(
                listener,
                state,
                async move { stop.cancelled().await },
            )
            .await
            .context("internal HTTP server")
        });
    }
    tasks
}

async fn expire_vms(vms: Arc<kiln_vm::VmManager>, stop: CancellationToken) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return Ok(()),
        }
        let n = vms.expire().await;
        if n > 0 {
            tracing::info!(n, "deleted VMs past their TTL or idle timeout");
        }
    }
}

/// Waits for every role to end. The first to fail (or to end before
/// shutdown was asked for) stops the others the graceful way, so running
/// jobs are handed back; its error is the answer.
async fn supervise(
    mut tasks: JoinSet<anyhow::Result<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        let outcome = done
            .map_err(|e| anyhow::anyhow!("a role task failed: {e}"))
            .and_then(|ended| ended);
        match outcome {
            Err(error) if first_error.is_none() => {
                tracing::error!(error = %format!("{error:#}"), "a role failed: shutting down");
                first_error = Some(error);
                shutdown.cancel();
            }
            Err(error) => tracing::error!(error = %format!("{error:#}"), "a role failed"),
            Ok(()) if !shutdown.is_cancelled() => {
                tracing::warn!("a role ended on its own: shutting down");
                shutdown.cancel();
            }
            Ok(()) => {}
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn signal_shutdown(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = token.cancelled() => return,
    }
    tracing::info!("shutting down: finishing running jobs");
    token.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{JobStatus, NewJob};
    use serde_json::json;

    /// A role that fails while a worker holds a running job: the worker is
    /// stopped the graceful way and hands the job back without spending an
    /// attempt, and the failure is what `supervise` answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_role_stops_the_others_gracefully() {
        let dir = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-supervise"));
        let db = Db::connect(&format!("sqlite://{}", dir.join("kiln.db").display()))
            .await
            .unwrap();
        let (job, _) = db
            .job_insert(
                &NewJob::new("acme", "noop", json!({"sleep_ms": 600_000})),
                kiln_worker::now_millis(),
            )
            .await
            .unwrap();
        let mut config = WorkerConfig::new("supervised");
        config.shutdown_grace = Duration::from_millis(100);
        let worker = Worker::new(
            db.clone(),
            Handlers::new().with("noop", Arc::new(NoopHandler)),
            config,
        );
        let shutdown = CancellationToken::new();
        let blobs = BlobStore::local(&dir.join("blobs")).unwrap();
        let logs_stop = CancellationToken::new();
        let mut parts = Parts {
            logs: kiln_logs::LogSink::start(
                db.clone(),
                None,
                kiln_logs::LogConfig::new("supervised"),
                logs_stop.clone(),
            ),
            logs_stop,
            blobs,
            loki: None,
            db: db.clone(),
            vms: None,
            api: None,
            worker: Some(worker),
            retention: kiln_worker::Retention::default(),
            nats_url: None,
            amqp: None,
            node: kiln_ops::NodeConfig::new("supervised", &["worker"]),
            detector: kiln_ops::DetectorConfig::default(),
            internal: None,
            e2b: None,
            rules_wasm: None,
        };
        let mut tasks = start(&mut parts, Role::Worker, &shutdown);
        let watch = db.clone();
        let id = job.id;
        tasks.spawn(async move {
            loop {
                let job = watch.job_get("acme", id).await?.expect("the job");
                if job.status == JobStatus::Running {
                    anyhow::bail!("the role broke");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let outcome = tokio::time::timeout(Duration::from_secs(60), supervise(tasks, &shutdown))
            .await
            .expect("supervise returns once every role has stopped");
        assert_eq!(outcome.unwrap_err().to_string(), "the role broke");
        let job = db.job_get("acme", id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Queued, "handed back: {job:?}");
        assert!(job.lease_expires_at.is_none(), "no lease left: {job:?}");
        db.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_worker_reads_the_master_key_and_never_makes_one() {
        let dir = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-master"));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(read_master_key(None, &dir).unwrap().is_none());
        assert!(!dir.join("master.key").exists(), "a worker made a key");
        let given = dir.join("given.key");
        assert!(
            read_master_key(Some(&given), &dir).is_err(),
            "a named file must exist"
        );
        let key = kiln_core::secrets::MasterKey::new([3; kiln_core::secrets::KEY_BYTES]);
        std::fs::write(dir.join("master.key"), key.to_hex()).unwrap();
        let read = read_master_key(None, &dir).unwrap().unwrap();
        assert_eq!(read.id(), key.id());
        std::fs::write(&given, "not hex").unwrap();
        assert!(read_master_key(Some(&given), &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn admin_key_is_private_even_when_the_file_was_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-secret"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.key");
        std::fs::write(&path, "an older, longer secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&path, "kiln_new").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "kiln_new\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
