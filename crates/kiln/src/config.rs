//! Configuration: flags beat `KILN_*` environment variables (clap reads
//! both), which beat the TOML file, which beats the defaults. Every setting
//! is listed in docs/configuration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

/// Requests a second per API key unless configured: high enough not to
/// cap one key below the measured throughput of `POST /api/v1/run`.
pub const DEFAULT_RATE_LIMIT: u32 = 10_000;

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
    /// Jobs one worker runs at once.
    #[arg(long, env = "KILN_WORKER_SLOTS")]
    pub slots: Option<usize>,
    /// Visibility timeout of a lease, in ms: a worker silent this long loses its jobs.
    #[arg(long, env = "KILN_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Ready microVMs (1 vCPU, 128 MiB, default image) kept booted for fast creates.
    #[arg(long, env = "KILN_VM_WARM")]
    pub vm_warm: Option<usize>,
    /// Requests a second allowed per API key, per API process (0: no limit).
    #[arg(long, env = "KILN_RATE_LIMIT")]
    pub rate_limit: Option<u32>,
    /// Requests a key may send at once above its rate (default: twice the rate).
    #[arg(long, env = "KILN_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// Blob store: a local directory (default: <data-dir>/blobs) ...
    #[arg(long, env = "KILN_BLOB_DIR")]
    pub blob_dir: Option<PathBuf>,
    /// ... or an S3-compatible endpoint such as http://127.0.0.1:9000 (MinIO).
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
}

/// The TOML file's shape: the same names as the flags, with underscores.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    database_url: Option<String>,
    slots: Option<usize>,
    lease_ms: Option<u64>,
    vm_warm: Option<usize>,
    rate_limit: Option<u32>,
    rate_burst: Option<u32>,
    blob_dir: Option<PathBuf>,
    s3_endpoint: Option<String>,
    s3_bucket: Option<String>,
    s3_access_key: Option<String>,
    s3_secret_key: Option<String>,
    s3_region: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub database_url: String,
    pub slots: usize,
    pub lease_ms: u64,
    pub vm_warm: usize,
    pub rate_limit: u32,
    pub rate_burst: u32,
    pub blobs: kiln_blob::BlobConfig,
}

pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) => Path::new(&home).join(".kiln"),
        None => PathBuf::from("kiln-data"),
    }
}

impl ServerArgs {
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
        let data_dir = self
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or(data_dir_hint);
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating data dir {}", data_dir.display()))?;
        let database_url = self
            .database_url
            .clone()
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("kiln.db").display()));
        let s3_endpoint = self.s3_endpoint.clone().or(file.s3_endpoint);
        let blobs = match s3_endpoint {
            Some(endpoint) => kiln_blob::BlobConfig::S3 {
                endpoint,
                bucket: self
                    .s3_bucket
                    .clone()
                    .or(file.s3_bucket)
                    .unwrap_or_else(|| "kiln".into()),
                access_key: self
                    .s3_access_key
                    .clone()
                    .or(file.s3_access_key)
                    .unwrap_or_default(),
                secret_key: self
                    .s3_secret_key
                    .clone()
                    .or(file.s3_secret_key)
                    .unwrap_or_default(),
                region: self
                    .s3_region
                    .clone()
                    .or(file.s3_region)
                    .unwrap_or_else(|| "us-east-1".into()),
            },
            None => kiln_blob::BlobConfig::Local(
                self.blob_dir
                    .clone()
                    .or(file.blob_dir)
                    .unwrap_or_else(|| data_dir.join("blobs")),
            ),
        };
        Ok(Settings {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("static address")),
            slots: self.slots.or(file.slots).unwrap_or(64),
            lease_ms: self.lease_ms.or(file.lease_ms).unwrap_or(30_000).max(100),
            vm_warm: self.vm_warm.or(file.vm_warm).unwrap_or(1).min(64),
            rate_limit: self
                .rate_limit
                .or(file.rate_limit)
                .unwrap_or(DEFAULT_RATE_LIMIT),
            rate_burst: self.rate_burst.or(file.rate_burst).unwrap_or(0),
            database_url,
            blobs,
            data_dir,
        })
    }
}
