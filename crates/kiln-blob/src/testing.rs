//! A real S3 server for tests: `s3s-fs` keeps buckets as directories and
//! objects as files under a fresh temporary directory, served over plain
//! HTTP on an ephemeral 127.0.0.1 port with signature checks on, so tests
//! reach S3 storage through the same client code a deployment uses.
//!
//! Unlike S3, a key that is also the prefix of other keys is a directory
//! here: reading or heading it fails with status 500 rather than 404.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::BlobConfig;

const ACCESS_KEY: &str = "kiln-test-access-key";
const SECRET_KEY: &str = "kiln-test-secret-key";
const BUCKET: &str = "kiln-test";
const REGION: &str = "us-east-1";

/// A running server with one empty bucket. Dropping it stops the server
/// and removes its directory.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    /// Points at this server's bucket with the right credentials.
    pub config: BlobConfig,
    root: PathBuf,
    task: JoinHandle<()>,
}

impl S3Server {
    /// The directory holding the server's buckets.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the server keeps object `key` of its bucket.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(&self.bucket).join(key)
    }

    /// This server's bucket, reached with other credentials.
    pub fn config_with(&self, access_key: &str, secret_key: &str) -> BlobConfig {
        BlobConfig::S3 {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
            region: self.region.clone(),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // open connection with it.
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Starts a server on the current tokio runtime. Panics if it cannot: a
/// test without its server has nothing to test.
pub async fn start_s3() -> S3Server {
    let root = unique_dir();
    // s3s-fs's buckets are the directories under its root.
    std::fs::create_dir_all(root.join(BUCKET)).expect("create the S3 server's directory");
    let fs = s3s_fs::FileSystem::new(&root).expect("open the S3 server's directory");
    let service = {
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        builder.build()
    };
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the S3 server");
    let address = listener.local_addr().expect("the S3 server's address");

    let task = tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => {
                        let connection = http
                            .serve_connection(TokioIo::new(socket), service.clone())
                            .into_owned();
                        connections.spawn(async move {
                            let _ = connection.await;
                        });
                    }
                    // Out of descriptors, say: wait rather than spin.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                },
                // Reap closed connections so the set stays as small as the open ones.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });

    let endpoint = format!("http://{address}");
    S3Server {
        config: BlobConfig::S3 {
            endpoint: endpoint.clone(),
            bucket: BUCKET.to_string(),
            access_key: ACCESS_KEY.to_string(),
            secret_key: SECRET_KEY.to_string(),
            region: REGION.to_string(),
        },
        endpoint,
        bucket: BUCKET.to_string(),
        access_key: ACCESS_KEY.to_string(),
        secret_key: SECRET_KEY.to_string(),
        region: REGION.to_string(),
        root,
        task,
    }
}

fn unique_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "kiln-s3-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    ))
}
