//! kiln's blob store: content such as WebAssembly modules, kept on a local
//! directory (the embedded default), on S3-compatible storage such as MinIO
//! (through the `object_store` crate), or in the database itself, so that
//! every node sharing a PostgreSQL database reads what any node stored.

use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use kiln_db::Db;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

#[cfg(feature = "testing")]
pub mod testing;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob does not exist.
    #[error("blob {0} not found")]
    NotFound(String),
    /// The store failed.
    #[error("blob store: {0}")]
    Store(#[from] object_store::Error),
    /// The database holding the blobs failed.
    #[error("blob store: {0}")]
    Database(#[from] kiln_db::DbError),
    /// A blob changed or vanished while it was being read.
    #[error("blob {0} changed while it was read")]
    Changed(String),
    /// The local directory could not be created.
    #[error("blob directory: {0}")]
    Io(#[from] std::io::Error),
}

/// Where blobs live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobConfig {
    /// A directory on this host: right for one process (`kiln serve`), or
    /// for many hosts only when they all mount the same directory.
    Local(std::path::PathBuf),
    S3 {
        endpoint: String,
        bucket: String,
        access_key: String,
        secret_key: String,
        region: String,
    },
    /// The `blobs` tables of the deployment's database.
    Database,
}

#[derive(Clone)]
enum Backend {
    Objects(Arc<dyn ObjectStore>),
    Database(Db),
}

#[derive(Clone)]
pub struct BlobStore {
    backend: Backend,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("backend", &self.describe())
            .finish()
    }
}

impl BlobStore {
    /// Opens the configured store; `db` serves [`BlobConfig::Database`].
    pub fn open(config: &BlobConfig, db: &Db) -> Result<BlobStore, BlobError> {
        let store: Arc<dyn ObjectStore> = match config {
            BlobConfig::Local(dir) => return BlobStore::local(dir),
            BlobConfig::Database => return Ok(BlobStore::database(db.clone())),
            BlobConfig::S3 {
                endpoint,
                bucket,
                access_key,
                secret_key,
                region,
            } => Arc::new(
                object_store::aws::AmazonS3Builder::new()
                    .with_endpoint(endpoint)
                    .with_bucket_name(bucket)
                    .with_access_key_id(access_key)
                    .with_secret_access_key(secret_key)
                    .with_region(region)
                    .with_allow_http(endpoint.starts_with("http://"))
                    .build()?,
            ),
        };
        Ok(BlobStore {
            backend: Backend::Objects(store),
        })
    }

    pub fn local(dir: &Path) -> Result<BlobStore, BlobError> {
        std::fs::create_dir_all(dir)?;
        Ok(BlobStore {
            backend: Backend::Objects(Arc::new(LocalFileSystem::new_with_prefix(dir)?)),
        })
    }

    pub fn database(db: Db) -> BlobStore {
        BlobStore {
            backend: Backend::Database(db),
        }
    }

    /// Which kind of store this is, for logs.
    pub fn describe(&self) -> &'static str {
        match &self.backend {
            Backend::Objects(_) => "object store",
            Backend::Database(_) => "database",
        }
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        match &self.backend {
            Backend::Objects(store) => {
                store
                    .put(&ObjectPath::from(key), PutPayload::from_bytes(bytes))
                    .await?;
            }
            Backend::Database(db) => db.blob_put(key, &bytes, now_millis()).await?,
        }
        Ok(())
    }

    /// The whole blob in memory.
    pub async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        match &self.backend {
            Backend::Objects(store) => match store.get(&ObjectPath::from(key)).await {
                Ok(found) => Ok(found.bytes().await?),
                Err(object_store::Error::NotFound { .. }) => {
                    Err(BlobError::NotFound(key.to_string()))
                }
                Err(error) => Err(error.into()),
            },
            Backend::Database(db) => {
                let info = db
                    .blob_info(key)
                    .await?
                    .ok_or_else(|| BlobError::NotFound(key.to_string()))?;
                let mut all = BytesMut::with_capacity(info.size.max(0) as usize);
                let mut chunks = self.stream(key).await?;
                while let Some(chunk) = chunks.try_next().await? {
                    all.extend_from_slice(&chunk);
                }
                Ok(all.freeze())
            }
        }
    }

    /// The blob piece by piece, so a reader need not hold all of it at once.
    /// `NotFound` comes before the first piece.
    pub async fn stream(
        &self,
        key: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, BlobError>>, BlobError> {
        match &self.backend {
            Backend::Objects(store) => match store.get(&ObjectPath::from(key)).await {
                Ok(found) => Ok(found.into_stream().map_err(BlobError::from).boxed()),
                Err(object_store::Error::NotFound { .. }) => {
                    Err(BlobError::NotFound(key.to_string()))
                }
                Err(error) => Err(error.into()),
            },
            Backend::Database(db) => {
                let info = db
                    .blob_info(key)
                    .await?
                    .ok_or_else(|| BlobError::NotFound(key.to_string()))?;
                let (db, key) = (db.clone(), key.to_string());
                Ok(futures::stream::try_unfold(0, move |n| {
                    let (db, key) = (db.clone(), key.clone());
                    async move {
                        if n >= info.chunks {
                            return Ok(None);
                        }
                        match db.blob_chunk(&key, n).await? {
                            Some(data) => Ok(Some((Bytes::from(data), n + 1))),
                            None => Err(BlobError::Changed(key)),
                        }
                    }
                })
                .boxed())
            }
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, BlobError> {
        match &self.backend {
            Backend::Objects(store) => match store.head(&ObjectPath::from(key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(error) => Err(error.into()),
            },
            Backend::Database(db) => Ok(db.blob_info(key).await?.is_some()),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        match &self.backend {
            Backend::Objects(store) => match store.delete(&ObjectPath::from(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(error) => Err(error.into()),
            },
            Backend::Database(db) => {
                db.blob_delete(key).await?;
                Ok(())
            }
        }
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Job files (`outputs` kept, `inputs` placed) in the store, under keys
/// built from the job's tenant (see [`kiln_core::files`]).
impl BlobStore {
    /// Keeps one output of a job's attempt.
    pub async fn keep_file(
        &self,
        tenant: &str,
        job: i64,
        path: &str,
        bytes: Bytes,
    ) -> Result<kiln_core::files::FileRef, BlobError> {
        let file = kiln_core::files::FileRef {
            path: path.to_string(),
            size: bytes.len() as u64,
            digest: content_id(&bytes),
        };
        self.put(&kiln_core::files::blob_key(tenant, job, path), bytes)
            .await?;
        Ok(file)
    }

    /// Reads a file of an earlier job of `tenant` for a job that takes it.
    pub async fn input_file(
        &self,
        tenant: &str,
        input: &kiln_core::files::FileInput,
    ) -> Result<Bytes, BlobError> {
        self.get(&kiln_core::files::blob_key(tenant, input.job, &input.path))
            .await
    }
}

/// `sha256:<hex>` of some bytes: the id of content-addressed blobs.
pub fn content_id(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}
