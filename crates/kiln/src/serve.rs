//! The server roles: `serve` (all in one), `api`, `worker`, `scheduler`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_api::AppState;
use kiln_blob::BlobStore;
use kiln_core::{Scope, Scopes};
use kiln_db::Db;
use kiln_wasm::{WasmConfig, WasmHandler, WasmRuntime};
use kiln_worker::{Handlers, NoopHandler, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

pub struct Roles {
    pub api: bool,
    pub worker: bool,
    pub scheduler: bool,
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

/// Hides a password in a database URL.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

pub fn wasm_runtime(settings: &Settings, blobs: &BlobStore) -> anyhow::Result<Arc<WasmRuntime>> {
    let config = WasmConfig {
        cache_dir: Some(settings.data_dir.join("wasm-cache")),
        scratch_dir: settings.data_dir.join("scratch"),
        ..WasmConfig::default()
    };
    Ok(WasmRuntime::new(config, blobs.clone())?)
}

/// The VM host's settings from `KILN_VM_ACCELERATOR` (`auto|kvm|tcg`),
/// `KILN_VM_SNAPSHOTS`, `KILN_VM_CMDLINE`, `KILN_QEMU` and `KILN_QEMU_CPU`.
pub fn vm_config_from_env() -> anyhow::Result<kiln_vm::VmManagerConfig> {
    let mut config = kiln_vm::VmManagerConfig::default();
    if let Ok(choice) = std::env::var("KILN_VM_ACCELERATOR") {
        config.accelerator = kiln_vm::AcceleratorChoice::parse(&choice)
            .ok_or_else(|| anyhow::anyhow!("KILN_VM_ACCELERATOR must be auto, kvm or tcg"))?;
    }
    config.snapshots = std::env::var_os("KILN_VM_SNAPSHOTS").is_none_or(|v| v != "0");
    config.extra_cmdline = std::env::var("KILN_VM_CMDLINE").unwrap_or_default();
    if let Some(qemu) = std::env::var_os("KILN_QEMU") {
        config.qemu.binary = qemu.into();
    }
    config.qemu.cpu = std::env::var("KILN_QEMU_CPU").ok();
    Ok(config)
}

/// MicroVMs are offered when a `default` image exists in the data dir; the
/// accelerator is probed once per host.
async fn vm_manager(settings: &Settings) -> anyhow::Result<Option<Arc<kiln_vm::VmManager>>> {
    let images = settings.data_dir.join("images");
    if kiln_vm::image::Image::open(&images, "default").is_err() {
        tracing::info!("no guest image: microVMs are off (build one with `kiln image build`)");
        return Ok(None);
    }
    let vm_dir = settings.data_dir.join("vms");
    match kiln_vm::VmManager::start(&images, &vm_dir, vm_config_from_env()?).await {
        Ok(manager) => {
            if settings.vm_warm > 0 {
                manager.keep_warm("default", 1, 128, settings.vm_warm);
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
/// where the CLI will find it.
async fn ensure_admin_key(db: &Db, data_dir: &Path) -> anyhow::Result<()> {
    if db.key_count().await? > 0 {
        return Ok(());
    }
    let (_, secret) =
        kiln_api::issue_key(db, "default", "admin", Scopes(vec![Scope::System])).await?;
    let path = data_dir.join("admin.key");
    write_secret(&path, &secret)?;
    println!(
        "kiln: created the first admin key; it is in {}",
        path.display()
    );
    Ok(())
}

pub fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(())
}

pub async fn run(settings: Settings, roles: Roles) -> anyhow::Result<()> {
    let db = open_db(&settings).await?;
    tracing::info!(backend = db.backend(), data_dir = %settings.data_dir.display(), "store open");
    let blobs = BlobStore::open(&settings.blobs)?;
    let wasm = wasm_runtime(&settings, &blobs)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    let vms = vm_manager(&settings).await?;

    let mut tasks = tokio::task::JoinSet::new();
    if roles.worker {
        let mut config = WorkerConfig::new(&format!(
            "{}-{}",
            kiln_worker::hostname(),
            std::process::id()
        ));
        config.slots = settings.slots;
        config.lease = Duration::from_millis(settings.lease_ms);
        config.heartbeat_every = (config.lease / 4).min(Duration::from_millis(500));
        let mut handlers = Handlers::new()
            .with("wasm", Arc::new(WasmHandler(wasm.clone())))
            .with("noop", Arc::new(NoopHandler));
        if let Some(vms) = &vms {
            handlers = kiln_vm::job::register(handlers, vms);
        }
        let worker = Worker::new(db.clone(), handlers, config);
        let stop = shutdown.clone();
        tasks.spawn(async move {
            worker.run(stop).await;
            Ok(())
        });
    } else if roles.scheduler {
        let rescue = kiln_worker::rescue_loop(db.clone(), Duration::from_secs(1), shutdown.clone());
        tasks.spawn(async move {
            rescue.await;
            Ok(())
        });
    }
    if roles.api {
        ensure_admin_key(&db, &settings.data_dir).await?;
        let state = AppState::with_vms(db.clone(), blobs.clone(), Some(wasm.clone()), vms.clone());
        state.limit_rate(settings.rate_limit, settings.rate_burst);
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("listening on {}", settings.listen))?;
        println!("kiln: listening on http://{}", listener.local_addr()?);
        let stop = shutdown.clone();
        tasks.spawn(async move {
            kiln_api::serve(listener, state, async move { stop.cancelled().await })
                .await
                .context("HTTP server")
        });
    }
    if let Some(vms) = vms.clone() {
        let stop = shutdown.clone();
        tasks.spawn(async move {
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
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    if let Some(vms) = vms {
        vms.shutdown().await;
    }
    db.close().await;
    Ok(())
}

async fn signal_shutdown(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing running jobs");
    token.cancel();
}
