//! Configuration: flags beat `KILN_*` environment variables (clap reads
//! both), which beat the TOML file, which beats the defaults. Every setting
//! is listed in docs/configuration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use kiln_blob::BlobConfig;
use kiln_core::TenantQuotas;
use kiln_vm::{AcceleratorChoice, VmManagerConfig};
use serde::Deserialize;

/// Requests a second per API key unless configured: high enough not to
/// cap one key below the measured throughput of `POST /api/v1/run`.
pub const DEFAULT_RATE_LIMIT: u32 = 10_000;

/// Where blobs (WebAssembly modules) are kept.
#[derive(ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlobStoreKind {
    /// A directory on this host (`blob_dir`).
    Local,
    /// An S3-compatible service (`s3_*`).
    S3,
    /// The database's own `blobs` tables.
    Database,
}

#[derive(Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// Where kiln keeps its SQLite database, blobs, caches and admin key.
    #[arg(long, env = "KILN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A TOML file with any of these settings (default: <data-dir>/kiln.toml if present).
    #[arg(long, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address the API listens on.
    #[arg(long, env = "KILN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// sqlite://PATH or postgres://... (default: SQLite in the data dir).
    #[arg(long, env = "KILN_DATABASE_URL")]
    pub database_url: Option<String>,
    /// nats://HOST:PORT: publish every event to JetStream (stream KILN,
    /// subjects kiln.events.<tenant>.<family>.<action>; `serve`, `scheduler`) and
    /// take job submissions on kiln.submit.<queue> (`serve`, `api`).
    #[arg(long, env = "KILN_NATS_URL")]
    pub nats_url: Option<String>,
    /// amqp://USER:PASS@HOST:PORT/VHOST: take job submissions from a durable
    /// RabbitMQ queue (`serve`, `api`), refusals dead-lettered to <queue>.dead.
    #[arg(long, env = "KILN_AMQP_URL")]
    pub amqp_url: Option<String>,
    /// The RabbitMQ queue the intake consumes (default: jobs).
    #[arg(long, env = "KILN_AMQP_QUEUE")]
    pub amqp_queue: Option<String>,
    /// Unacknowledged messages the intake holds at once (default: 1024).
    #[arg(long, env = "KILN_AMQP_PREFETCH")]
    pub amqp_prefetch: Option<u16>,
    /// A kiln API key that RabbitMQ messages without an Authorization header
    /// are submitted as (default: such messages are refused).
    #[arg(long, env = "KILN_AMQP_KEY", hide_env_values = true)]
    pub amqp_key: Option<String>,
    /// Jobs one worker runs at once.
    #[arg(long, env = "KILN_WORKER_SLOTS")]
    pub slots: Option<usize>,
    /// Visibility timeout of a lease, in ms: a worker silent this long loses its jobs.
    #[arg(long, env = "KILN_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// How often each process heartbeats its node row, in ms (default 3000).
    #[arg(long, env = "KILN_NODE_HEARTBEAT_MS")]
    pub node_heartbeat_ms: Option<u64>,
    /// A node silent this long, in ms, is marked lost (default 15000).
    #[arg(long, env = "KILN_NODE_LOST_MS")]
    pub node_lost_ms: Option<u64>,
    /// The key secrets are sealed under (64 hex digits; default
    /// `<data-dir>/master.key`, made at the API's first start; a worker
    /// reads it to deliver secrets to jobs and never makes one). Every node
    /// of a deployment needs the same one.
    #[arg(long, env = "KILN_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// The keys users' session tokens are signed with (default
    /// `<data-dir>/token.key`, made at first start). Every API node of a
    /// deployment needs the same file.
    #[arg(long, env = "KILN_TOKEN_KEY_FILE")]
    pub token_key_file: Option<PathBuf>,
    /// How long a user's session token (and session) lasts, in seconds
    /// (default 900).
    #[arg(long, env = "KILN_TOKEN_TTL_S")]
    pub token_ttl_s: Option<u64>,
    /// Mark session cookies Secure on every answer (default: only when a
    /// trusted proxy sends X-Forwarded-Proto: https).
    #[arg(long, env = "KILN_SECURE_COOKIES", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub secure_cookies: Option<bool>,
    /// Proxies whose X-Forwarded-Proto and X-Forwarded-For are believed
    /// (comma-separated addresses or CIDRs; default 127.0.0.0/8,::1).
    #[arg(long, env = "KILN_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,
    /// Where a worker that hosts VMs takes the requests API nodes forward
    /// for its VMs (an address other kiln hosts reach; off by default: the
    /// worker then hosts VMs for its own jobs only).
    #[arg(long, env = "KILN_INTERNAL_LISTEN")]
    pub internal_listen: Option<SocketAddr>,
    /// The URL API nodes use to reach `--internal-listen` (default: built
    /// from that address, which must then not be 0.0.0.0).
    #[arg(long, env = "KILN_INTERNAL_URL")]
    pub internal_url: Option<String>,
    /// Where the E2B-compatible API listens (control plane and the
    /// sandboxes' envd, on one plain-HTTP address; off by default). Needs
    /// microVMs on this process (`kiln serve`).
    #[arg(long, env = "KILN_E2B_LISTEN")]
    pub e2b_listen: Option<SocketAddr>,
    /// The image an E2B `templateID` of `base` boots (default `python`: a
    /// Debian root filesystem with bash, coreutils and python3).
    #[arg(long, env = "KILN_E2B_BASE_IMAGE")]
    pub e2b_base_image: Option<String>,
    /// How long finished jobs are kept, in hours, before retention deletes them.
    #[arg(long, env = "KILN_RETENTION_HOURS")]
    pub retention_hours: Option<u64>,
    /// How long events are kept, in hours (streams resume within this).
    #[arg(long, env = "KILN_EVENT_RETENTION_HOURS")]
    pub event_retention_hours: Option<u64>,
    /// How long live logs (jobs' and VM commands' output, nodes' lines)
    /// are kept, in hours (default 72).
    #[arg(long, env = "KILN_LOG_RETENTION_HOURS")]
    pub log_retention_hours: Option<u64>,
    /// The most output one job attempt or VM command keeps in the live
    /// logs, in MiB (default 64); a marker says where it stopped.
    #[arg(long, env = "KILN_LOG_BYTES_MAX_MIB")]
    pub log_bytes_max_mib: Option<u64>,
    /// http(s)://HOST:PORT of a Loki: push the live logs to its JSON push
    /// API from a cursor (`serve`, `scheduler`), so an outage loses nothing.
    #[arg(long, env = "KILN_LOKI_URL")]
    pub loki_url: Option<String>,
    /// Ready microVMs (1 vCPU, 128 MiB, default image) kept booted for fast creates.
    #[arg(long, env = "KILN_VM_WARM")]
    pub vm_warm: Option<usize>,
    /// Ready microVMs of other images (1 vCPU, 128 MiB), as NAME=COUNT
    /// pairs, e.g. python=1,node=1.
    #[arg(long, env = "KILN_VM_WARM_IMAGES")]
    pub vm_warm_images: Option<String>,
    #[command(flatten)]
    pub vm: VmHostArgs,
    /// Requests a second allowed per API key, per API process (0: no limit).
    #[arg(long, env = "KILN_RATE_LIMIT")]
    pub rate_limit: Option<u32>,
    /// Requests a key may send at once above its rate (default: twice the rate).
    #[arg(long, env = "KILN_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// Networks notification deliveries may reach although not public
    /// (comma-separated addresses or CIDRs, e.g. 10.0.0.0/8,127.0.0.1).
    #[arg(long, env = "KILN_NOTIFY_ALLOW")]
    pub notify_allow: Option<String>,
    /// Where blobs live (default: s3 when an endpoint is set, local when a
    /// blob dir is set, else database on PostgreSQL and local on SQLite).
    #[arg(long, env = "KILN_BLOB_STORE", value_enum)]
    pub blob_store: Option<BlobStoreKind>,
    /// Blob directory of the local store (default: <data-dir>/blobs).
    #[arg(long, env = "KILN_BLOB_DIR")]
    pub blob_dir: Option<PathBuf>,
    /// An S3-compatible endpoint such as http://127.0.0.1:9000 (MinIO).
    #[arg(long, env = "KILN_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "KILN_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    #[arg(long, env = "KILN_S3_ACCESS_KEY")]
    pub s3_access_key: Option<String>,
    #[arg(long, env = "KILN_S3_SECRET_KEY", hide_env_values = true)]
    pub s3_secret_key: Option<String>,
    #[arg(long, env = "KILN_S3_REGION")]
    pub s3_region: Option<String>,
    /// Where wasm jobs' scratch directories are made; emptied when a worker
    /// starts, so each process that runs jobs needs its own (default: a
    /// directory under the system temp dir named after the data dir).
    #[arg(long, env = "KILN_SCRATCH_DIR")]
    pub scratch_dir: Option<PathBuf>,
}

/// The VM host's flags (the rest of its settings are in the TOML file's
/// `[vm]` section).
#[derive(Args, Debug, Clone, Default)]
pub struct VmHostArgs {
    /// `auto` (KVM when a probe boot under it works, else TCG with a
    /// warning), `kvm` (refuse to start without it) or `tcg`.
    #[arg(long, env = "KILN_VM_ACCELERATOR", value_parser = ["auto", "kvm", "tcg"])]
    pub vm_accelerator: Option<String>,
    /// Restore new VMs from snapshots, saved by the first boot of a shape;
    /// `0` boots every VM.
    #[arg(long, env = "KILN_VM_SNAPSHOTS", value_parser = clap::builder::BoolishValueParser::new())]
    pub vm_snapshots: Option<bool>,
    /// Words added to every guest's kernel command line.
    #[arg(long, env = "KILN_VM_CMDLINE")]
    pub vm_cmdline: Option<String>,
    /// The subnet networked VMs get addresses from (a /16 to a /29; the
    /// first address is their gateway, inside kiln's namespace).
    #[arg(long, env = "KILN_VM_SUBNET")]
    pub vm_subnet: Option<ipnet::Ipv4Net>,
    /// The resolver networked VMs with egress are given.
    #[arg(long, env = "KILN_VM_DNS")]
    pub vm_dns: Option<std::net::Ipv4Addr>,
    /// A /30 (or /31) for a veth pair from kiln's VM namespace to the host,
    /// through which allowed egress is masqueraded; unset: VMs reach only
    /// the namespace.
    #[arg(long, env = "KILN_VM_UPLINK")]
    pub vm_uplink: Option<ipnet::Ipv4Net>,
    /// The QEMU binary.
    #[arg(long, env = "KILN_QEMU")]
    pub qemu: Option<PathBuf>,
    /// The guest CPU model (default: the host's under KVM, qemu64 under TCG).
    #[arg(long, env = "KILN_QEMU_CPU")]
    pub qemu_cpu: Option<String>,
}

/// The TOML file's shape: the same names as the flags, with underscores,
/// plus sections for what has no flag.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    database_url: Option<String>,
    nats_url: Option<String>,
    amqp_url: Option<String>,
    amqp_queue: Option<String>,
    amqp_prefetch: Option<u16>,
    amqp_key: Option<String>,
    slots: Option<usize>,
    lease_ms: Option<u64>,
    node_heartbeat_ms: Option<u64>,
    node_lost_ms: Option<u64>,
    internal_listen: Option<SocketAddr>,
    internal_url: Option<String>,
    e2b_listen: Option<SocketAddr>,
    e2b_base_image: Option<String>,
    master_key_file: Option<PathBuf>,
    token_key_file: Option<PathBuf>,
    token_ttl_s: Option<u64>,
    secure_cookies: Option<bool>,
    trusted_proxies: Option<String>,
    retention_hours: Option<u64>,
    event_retention_hours: Option<u64>,
    log_retention_hours: Option<u64>,
    log_bytes_max_mib: Option<u64>,
    loki_url: Option<String>,
    vm_warm: Option<usize>,
    vm_warm_images: Option<String>,
    rate_limit: Option<u32>,
    rate_burst: Option<u32>,
    notify_allow: Option<String>,
    blob_store: Option<BlobStoreKind>,
    blob_dir: Option<PathBuf>,
    s3_endpoint: Option<String>,
    s3_bucket: Option<String>,
    s3_access_key: Option<String>,
    s3_secret_key: Option<String>,
    s3_region: Option<String>,
    scratch_dir: Option<PathBuf>,
    /// Per-tenant limits; every field optional, defaults in kiln-core.
    quotas: Option<TenantQuotas>,
    /// The VM host: `[vm]`, `[vm.qemu]`, `[vm.host]`.
    vm: Option<VmManagerConfig>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub database_url: String,
    pub nats_url: Option<String>,
    pub amqp: Option<kiln_api::intake::amqp::AmqpIntake>,
    pub slots: usize,
    pub lease_ms: u64,
    /// Node heartbeat period and the silence after which a node is lost.
    pub node_heartbeat_ms: u64,
    pub node_lost_ms: u64,
    /// Where the master key is read from (made there when it is the default).
    pub master_key_file: Option<PathBuf>,
    /// Users' sessions: the token key file (made there when it is the
    /// default), token lifetime, cookies, trusted proxies.
    pub token_key_file: Option<PathBuf>,
    pub token_ttl_s: u64,
    pub secure_cookies: bool,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// A VM host's internal listener and the URL others reach it at.
    pub internal_listen: Option<SocketAddr>,
    pub internal_url: Option<String>,
    /// The E2B-compatible listener, and the image `base` names.
    pub e2b_listen: Option<SocketAddr>,
    pub e2b_base_image: String,
    /// Finished jobs older than this are deleted in batches.
    pub retention_hours: u64,
    /// Events older than this are deleted in batches.
    pub event_retention_hours: u64,
    /// Live logs older than this are deleted in batches.
    pub log_retention_hours: u64,
    /// The most output one job attempt or command keeps in the live logs.
    pub log_bytes_max: u64,
    pub loki_url: Option<String>,
    pub vm_warm: usize,
    /// Warm pools of images besides `default`: (image, ready VMs).
    pub vm_warm_images: Vec<(String, usize)>,
    pub rate_limit: u32,
    pub rate_burst: u32,
    pub notify_allow: kiln_events::notify::AllowList,
    pub blobs: BlobConfig,
    pub scratch_dir: PathBuf,
    pub quotas: TenantQuotas,
    /// Everything the VM manager is configured with, quotas included.
    pub vm: VmManagerConfig,
}

/// `python=1,node=2`: warm pools of named images (names checked as image
/// names, at most 64 VMs each).
pub fn parse_warm_images(text: &str) -> anyhow::Result<Vec<(String, usize)>> {
    let mut pools = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (image, count) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("vm_warm_images: {pair:?} is not NAME=COUNT"))?;
        kiln_core::names::check_ident("image", image.trim())?;
        let count: usize = count
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("vm_warm_images: {count:?} is not a count"))?;
        pools.push((image.trim().to_string(), count.min(64)));
    }
    Ok(pools)
}

pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) => Path::new(&home).join(".kiln"),
        None => PathBuf::from("kiln-data"),
    }
}

impl ServerArgs {
    /// Reads the TOML file (if any) and merges it under the flags and
    /// environment. Touches nothing on disk.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let data_dir_hint = self.data_dir.clone().unwrap_or_else(default_data_dir);
        let file_path = self
            .config
            .clone()
            .or_else(|| Some(data_dir_hint.join("kiln.toml")).filter(|p| p.exists()));
        let file: FileConfig = match &file_path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        merge(self, file)
    }
}

/// Flags (and environment) over the file over the defaults.
fn merge(args: &ServerArgs, file: FileConfig) -> anyhow::Result<Settings> {
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir.clone())
        .unwrap_or_else(default_data_dir);
    let database_url = args
        .database_url
        .clone()
        .or(file.database_url.clone())
        .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("kiln.db").display()));
    let blobs = blob_config(args, &file, &data_dir, &database_url)?;
    let scratch_dir = args
        .scratch_dir
        .clone()
        .or(file.scratch_dir)
        .unwrap_or_else(|| default_scratch_dir(&data_dir));
    let heartbeat_ms = args
        .node_heartbeat_ms
        .or(file.node_heartbeat_ms)
        .unwrap_or(3_000)
        .clamp(50, 60_000);
    let quotas = file.quotas.unwrap_or_default();
    let vm = vm_config(&args.vm, file.vm, &quotas)?;
    Ok(Settings {
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("static address")),
        slots: args.slots.or(file.slots).unwrap_or(64),
        lease_ms: args.lease_ms.or(file.lease_ms).unwrap_or(30_000).max(100),
        node_heartbeat_ms: heartbeat_ms,
        // Three missed heartbeats at least, so one slow beat is no loss.
        node_lost_ms: args
            .node_lost_ms
            .or(file.node_lost_ms)
            .unwrap_or(15_000)
            .max(heartbeat_ms.saturating_mul(3)),
        internal_listen: args.internal_listen.or(file.internal_listen),
        internal_url: args.internal_url.clone().or(file.internal_url),
        e2b_listen: args.e2b_listen.or(file.e2b_listen),
        e2b_base_image: args
            .e2b_base_image
            .clone()
            .or(file.e2b_base_image)
            .unwrap_or_else(|| "python".to_string()),
        master_key_file: args.master_key_file.clone().or(file.master_key_file),
        token_key_file: args.token_key_file.clone().or(file.token_key_file),
        token_ttl_s: args
            .token_ttl_s
            .or(file.token_ttl_s)
            .unwrap_or(kiln_api::auth::TOKEN_TTL_S_DEFAULT)
            .clamp(1, 7 * 24 * 3600),
        secure_cookies: args.secure_cookies.or(file.secure_cookies).unwrap_or(false),
        trusted_proxies: kiln_events::notify::AllowList::parse(
            args.trusted_proxies
                .as_deref()
                .or(file.trusted_proxies.as_deref())
                .unwrap_or("127.0.0.0/8,::1"),
        )
        .map_err(|e| anyhow::anyhow!("trusted_proxies: {e}"))?
        .0,
        retention_hours: args
            .retention_hours
            .or(file.retention_hours)
            .unwrap_or(7 * 24)
            .clamp(1, 10 * 365 * 24),
        event_retention_hours: args
            .event_retention_hours
            .or(file.event_retention_hours)
            .unwrap_or(7 * 24)
            .clamp(1, 10 * 365 * 24),
        log_retention_hours: args
            .log_retention_hours
            .or(file.log_retention_hours)
            .unwrap_or(3 * 24)
            .clamp(1, 10 * 365 * 24),
        log_bytes_max: args
            .log_bytes_max_mib
            .or(file.log_bytes_max_mib)
            .unwrap_or(64)
            .clamp(1, 64 << 10)
            << 20,
        loki_url: match args.loki_url.clone().or(file.loki_url.clone()) {
            Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
                anyhow::bail!("loki_url must be an http:// or https:// URL")
            }
            url => url,
        },
        vm_warm: args.vm_warm.or(file.vm_warm).unwrap_or(1).min(64),
        vm_warm_images: parse_warm_images(
            args.vm_warm_images
                .as_deref()
                .or(file.vm_warm_images.as_deref())
                .unwrap_or(""),
        )?,
        rate_limit: args
            .rate_limit
            .or(file.rate_limit)
            .unwrap_or(DEFAULT_RATE_LIMIT),
        rate_burst: args.rate_burst.or(file.rate_burst).unwrap_or(0),
        notify_allow: kiln_events::notify::AllowList::parse(
            args.notify_allow
                .as_deref()
                .or(file.notify_allow.as_deref())
                .unwrap_or(""),
        )
        .map_err(|e| anyhow::anyhow!("notify_allow: {e}"))?,
        quotas,
        vm,
        nats_url: args.nats_url.clone().or(file.nats_url.clone()),
        amqp: match args.amqp_url.clone().or(file.amqp_url.clone()) {
            Some(url) => {
                let queue = args
                    .amqp_queue
                    .clone()
                    .or(file.amqp_queue.clone())
                    .unwrap_or_else(|| "jobs".to_string());
                if queue.is_empty() || queue.len() > 200 {
                    anyhow::bail!("amqp_queue must be 1 to 200 bytes");
                }
                Some(kiln_api::intake::amqp::AmqpIntake {
                    url,
                    queue,
                    prefetch: args
                        .amqp_prefetch
                        .or(file.amqp_prefetch)
                        .unwrap_or(1_024)
                        .clamp(2, 10_000),
                    default_key: args.amqp_key.clone().or(file.amqp_key.clone()),
                })
            }
            None => None,
        },
        database_url,
        blobs,
        scratch_dir,
        data_dir,
    })
}

/// The VM host's settings: flags over the `[vm]` section over the defaults,
/// with the tenant quotas of `[quotas]`, their one place.
pub fn vm_config(
    args: &VmHostArgs,
    file: Option<VmManagerConfig>,
    quotas: &TenantQuotas,
) -> anyhow::Result<VmManagerConfig> {
    let mut vm = file.unwrap_or_default();
    if vm.quotas != TenantQuotas::default() {
        bail!("tenant quotas are set in [quotas], not in [vm.quotas]");
    }
    if let Some(choice) = &args.vm_accelerator {
        vm.accelerator = AcceleratorChoice::parse(choice)
            .with_context(|| format!("vm_accelerator {choice:?}: use auto, kvm or tcg"))?;
    }
    if let Some(snapshots) = args.vm_snapshots {
        vm.snapshots = snapshots;
    }
    if let Some(words) = &args.vm_cmdline {
        vm.extra_cmdline = words.clone();
    }
    if let Some(subnet) = args.vm_subnet {
        vm.network.subnet = subnet;
    }
    if let Some(dns) = args.vm_dns {
        vm.network.dns = Some(dns);
    }
    if let Some(uplink) = args.vm_uplink {
        vm.network.uplink = Some(uplink);
    }
    vm.network.check().map_err(anyhow::Error::msg)?;
    if let Some(binary) = &args.qemu {
        vm.qemu.binary = binary.clone();
    }
    if let Some(cpu) = &args.qemu_cpu {
        vm.qemu.cpu = Some(cpu.clone());
    }
    vm.quotas = quotas.clone();
    Ok(vm)
}

pub fn is_postgres(database_url: &str) -> bool {
    database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")
}

/// Chooses the blob store. Without an explicit choice, nodes sharing a
/// PostgreSQL database share their blobs through it too: a module stored by
/// one node is never left on that node's disk alone.
fn blob_config(
    args: &ServerArgs,
    file: &FileConfig,
    data_dir: &Path,
    database_url: &str,
) -> anyhow::Result<BlobConfig> {
    let endpoint = args.s3_endpoint.clone().or(file.s3_endpoint.clone());
    let dir = args.blob_dir.clone().or(file.blob_dir.clone());
    let kind = match args.blob_store.or(file.blob_store) {
        Some(kind) => kind,
        None if endpoint.is_some() => BlobStoreKind::S3,
        None if dir.is_some() => BlobStoreKind::Local,
        None if is_postgres(database_url) => BlobStoreKind::Database,
        None => BlobStoreKind::Local,
    };
    Ok(match kind {
        BlobStoreKind::Local => BlobConfig::Local(dir.unwrap_or_else(|| data_dir.join("blobs"))),
        BlobStoreKind::Database => BlobConfig::Database,
        BlobStoreKind::S3 => {
            let Some(endpoint) = endpoint else {
                bail!("blob_store is s3 but no s3_endpoint is set");
            };
            let pick = |flag: &Option<String>, toml: &Option<String>, default: &str| {
                flag.clone()
                    .or(toml.clone())
                    .unwrap_or_else(|| default.to_string())
            };
            BlobConfig::S3 {
                endpoint,
                bucket: pick(&args.s3_bucket, &file.s3_bucket, "kiln"),
                access_key: pick(&args.s3_access_key, &file.s3_access_key, ""),
                secret_key: pick(&args.s3_secret_key, &file.s3_secret_key, ""),
                region: pick(&args.s3_region, &file.s3_region, "us-east-1"),
            }
        }
    })
}

/// Outside the data dir, one per data dir: the wasm runtime empties its
/// scratch root at start, so two data dirs on one host must not share one.
fn default_scratch_dir(data_dir: &Path) -> PathBuf {
    let absolute = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let id = kiln_blob::content_id(absolute.as_os_str().as_encoded_bytes());
    let hash = id.trim_start_matches("sha256:");
    std::env::temp_dir().join(format!("kiln-scratch-{}", &hash[..16]))
}

impl Settings {
    /// Makes the data dir readable by its owner only: it holds the
    /// database, the admin key and the VMs' control sockets.
    pub fn create_data_dir(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.data_dir)
            .with_context(|| format!("creating data dir {}", self.data_dir.display()))
    }

    /// The settings as `name = value` lines, secrets hidden.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let mut lines = vec![
            ("data_dir", self.data_dir.display().to_string()),
            ("listen", self.listen.to_string()),
            ("database_url", redact(&self.database_url)),
            (
                "nats_url",
                self.nats_url
                    .as_deref()
                    .map_or_else(|| "-".to_string(), redact),
            ),
            (
                "amqp_url",
                self.amqp
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |a| redact(&a.url)),
            ),
            (
                "amqp_queue",
                self.amqp
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |a| a.queue.clone()),
            ),
            ("slots", self.slots.to_string()),
            ("lease_ms", self.lease_ms.to_string()),
            ("node_heartbeat_ms", self.node_heartbeat_ms.to_string()),
            ("node_lost_ms", self.node_lost_ms.to_string()),
            ("retention_hours", self.retention_hours.to_string()),
            (
                "event_retention_hours",
                self.event_retention_hours.to_string(),
            ),
            ("log_retention_hours", self.log_retention_hours.to_string()),
            ("log_bytes_max", self.log_bytes_max.to_string()),
            (
                "loki_url",
                self.loki_url
                    .as_deref()
                    .map_or_else(|| "-".to_string(), redact),
            ),
            ("vm_warm", self.vm_warm.to_string()),
            (
                "vm_warm_images",
                self.vm_warm_images
                    .iter()
                    .map(|(image, n)| format!("{image}={n}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("rate_limit", self.rate_limit.to_string()),
            ("rate_burst", self.rate_burst.to_string()),
            (
                "notify_allow",
                self.notify_allow
                    .0
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("token_ttl_s", self.token_ttl_s.to_string()),
            ("secure_cookies", self.secure_cookies.to_string()),
            (
                "trusted_proxies",
                self.trusted_proxies
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("scratch_dir", self.scratch_dir.display().to_string()),
            ("quotas", format!("{:?}", self.quotas)),
            (
                "vm_accelerator",
                format!("{:?}", self.vm.accelerator).to_lowercase(),
            ),
            ("vm_snapshots", self.vm.snapshots.to_string()),
            ("vm_cmdline", self.vm.extra_cmdline.clone()),
            ("vm_subnet", self.vm.network.subnet.to_string()),
            (
                "vm_dns",
                self.vm
                    .network
                    .dns
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
            ),
            (
                "vm_uplink",
                self.vm
                    .network
                    .uplink
                    .map(|u| u.to_string())
                    .unwrap_or_default(),
            ),
            ("qemu", self.vm.qemu.binary.display().to_string()),
            ("qemu_cpu", self.vm.qemu.cpu.clone().unwrap_or_default()),
            ("vm", format!("{:?}", self.vm)),
        ];
        match &self.blobs {
            BlobConfig::Local(dir) => {
                lines.push(("blob_store", "local".into()));
                lines.push(("blob_dir", dir.display().to_string()));
            }
            BlobConfig::Database => lines.push(("blob_store", "database".into())),
            BlobConfig::S3 {
                endpoint,
                bucket,
                region,
                ..
            } => {
                lines.push(("blob_store", "s3".into()));
                lines.push(("s3_endpoint", endpoint.clone()));
                lines.push(("s3_bucket", bucket.clone()));
                lines.push(("s3_region", region.clone()));
            }
        }
        lines
    }
}

/// Hides the password in a database URL, given as user:password@ or as a
/// `password=` query parameter.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme) = out.find("://") {
        let authority_end = out[scheme + 3..]
            .find(['/', '?'])
            .map_or(out.len(), |i| scheme + 3 + i);
        // The last '@' before the path ends the credentials, even when the
        // password holds an unescaped '@'.
        if let Some(at) = out[..authority_end].rfind('@') {
            if let Some(colon) = out[scheme + 3..at].find(':') {
                out.replace_range(scheme + 3 + colon + 1..at, "***");
            }
        }
    }
    if let Some(query) = out.find('?') {
        let (head, tail) = out.split_at(query + 1);
        let hidden: Vec<String> = tail
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out = format!("{head}{}", hidden.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(toml: &str) -> FileConfig {
        toml::from_str(toml).unwrap()
    }

    /// One row per rule: flags (or their environment variables, which clap
    /// folds into the same field) over the file over the defaults.
    #[test]
    fn precedence() {
        let flags = ServerArgs {
            data_dir: Some("/flag".into()),
            slots: Some(3),
            lease_ms: Some(5_000),
            ..ServerArgs::default()
        };
        let toml = file(
            "data_dir = '/toml'\nslots = 7\nrate_limit = 9\nlisten = '0.0.0.0:9000'\n\
             [quotas]\nvms_live_max = 2\n",
        );
        let s = merge(&flags, toml).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/flag"), "flag over file");
        assert_eq!(s.slots, 3, "flag over file");
        assert_eq!(s.lease_ms, 5_000, "flag over default");
        assert_eq!(s.rate_limit, 9, "file over default");
        assert_eq!(s.listen.to_string(), "0.0.0.0:9000", "file over default");
        assert_eq!(s.rate_burst, 0, "default");
        assert_eq!(
            s.database_url, "sqlite:///flag/kiln.db",
            "derived from data dir"
        );
        assert_eq!(s.quotas.vms_live_max, 2, "quota from the file");
        assert_eq!(
            s.quotas.modules_max,
            TenantQuotas::default().modules_max,
            "other quotas keep their defaults"
        );

        let s = merge(&ServerArgs::default(), file("data_dir = '/toml'")).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/toml"), "file over default");
        assert_eq!(s.blobs, BlobConfig::Local("/toml/blobs".into()));
        assert_eq!(s.quotas, TenantQuotas::default());
        assert_ne!(
            s.scratch_dir,
            merge(&ServerArgs::default(), file("data_dir = '/other'"))
                .unwrap()
                .scratch_dir,
            "each data dir has its own scratch root"
        );
        assert!(
            !s.scratch_dir.starts_with("/toml"),
            "scratch is outside the data dir"
        );
    }

    #[test]
    fn vm_settings() {
        let toml = file(
            "[quotas]\nvms_live_max = 3\n[vm]\naccelerator = 'tcg'\nsnapshots = false\n\
             [vm.qemu]\ncpu = 'max'\nbinary = '/opt/qemu'\n[vm.host]\nvms_max = 9\n",
        );
        let flags = ServerArgs {
            vm: VmHostArgs {
                qemu_cpu: Some("qemu64".into()),
                vm_snapshots: Some(true),
                ..VmHostArgs::default()
            },
            ..ServerArgs::default()
        };
        let vm = merge(&flags, toml).unwrap().vm;
        assert_eq!(vm.accelerator, AcceleratorChoice::Tcg, "file over default");
        assert_eq!(vm.qemu.cpu.as_deref(), Some("qemu64"), "flag over file");
        assert!(vm.snapshots, "flag over file");
        assert_eq!(
            vm.qemu.binary,
            PathBuf::from("/opt/qemu"),
            "file over default"
        );
        assert_eq!(vm.host.vms_max, 9);
        assert_eq!(vm.quotas.vms_live_max, 3, "the quotas of [quotas]");
        assert_eq!(vm.extra_cmdline, "", "default");

        let error = merge(
            &ServerArgs::default(),
            file("[vm.quotas]\nvms_live_max = 3\n"),
        )
        .unwrap_err();
        assert!(error.to_string().contains("[quotas]"), "{error}");
        let flags = ServerArgs {
            vm: VmHostArgs {
                vm_accelerator: Some("hvf".into()),
                ..VmHostArgs::default()
            },
            ..ServerArgs::default()
        };
        assert!(merge(&flags, FileConfig::default()).is_err());
    }

    #[test]
    fn unknown_settings_are_refused() {
        assert!(toml::from_str::<FileConfig>("slotz = 3").is_err());
        assert!(toml::from_str::<FileConfig>("[quotas]\nvms = 3").is_err());
        assert!(toml::from_str::<FileConfig>("[vm.qemu]\nsandbx = false").is_err());
    }

    #[test]
    fn blob_store_choice() {
        let check = |args: ServerArgs, toml: &str, expect: Result<BlobConfig, &str>| {
            let got = merge(&args, file(toml)).map(|s| s.blobs);
            match (got, expect) {
                (Ok(got), Ok(expect)) => assert_eq!(got, expect, "{toml}"),
                (Err(error), Err(expect)) => {
                    assert!(error.to_string().contains(expect), "{error}")
                }
                (got, expect) => panic!("{toml}: got {got:?}, expected {expect:?}"),
            }
        };
        let pg = "data_dir = '/d'\ndatabase_url = 'postgres://u@h/db'";
        let sqlite = "data_dir = '/d'";
        let none = ServerArgs::default;
        check(none(), sqlite, Ok(BlobConfig::Local("/d/blobs".into())));
        check(none(), pg, Ok(BlobConfig::Database));
        check(
            none(),
            &format!("{pg}\nblob_dir = '/shared'"),
            Ok(BlobConfig::Local("/shared".into())),
        );
        check(
            ServerArgs {
                blob_store: Some(BlobStoreKind::Database),
                ..none()
            },
            sqlite,
            Ok(BlobConfig::Database),
        );
        check(
            ServerArgs {
                blob_store: Some(BlobStoreKind::Local),
                ..none()
            },
            pg,
            Ok(BlobConfig::Local("/d/blobs".into())),
        );
        check(
            none(),
            &format!("{pg}\ns3_endpoint = 'http://minio:9000'\ns3_secret_key = 's'"),
            Ok(BlobConfig::S3 {
                endpoint: "http://minio:9000".into(),
                bucket: "kiln".into(),
                access_key: "".into(),
                secret_key: "s".into(),
                region: "us-east-1".into(),
            }),
        );
        check(none(), "blob_store = 's3'", Err("no s3_endpoint"));
    }

    #[test]
    fn redact_hides_passwords() {
        let check = |url: &str, expect: &str| assert_eq!(redact(url), expect, "{url}");
        check(
            "postgres://kiln:secret@db:5432/kiln",
            "postgres://kiln:***@db:5432/kiln",
        );
        check(
            "postgres://kiln:p@ss@db/kiln",
            "postgres://kiln:***@db/kiln",
        );
        check("postgres://kiln@db/kiln", "postgres://kiln@db/kiln");
        check(
            "postgres://db/kiln?user=kiln&password=secret&sslmode=require",
            "postgres://db/kiln?user=kiln&password=***&sslmode=require",
        );
        check(
            "postgres://u:pw@db/kiln?options=-c%20search_path%3Dx",
            "postgres://u:***@db/kiln?options=-c%20search_path%3Dx",
        );
        check(
            "sqlite:///var/lib/kiln/kiln.db",
            "sqlite:///var/lib/kiln/kiln.db",
        );
        check("sqlite://a@b/kiln.db", "sqlite://a@b/kiln.db");
    }
}
