//! kiln's blob store: content such as WebAssembly modules and full logs,
//! kept through the `object_store` crate on a local directory (the
//! embedded default) or on S3-compatible storage such as MinIO.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob does not exist.
    #[error("blob {0} not found")]
    NotFound(String),
    /// The store failed.
    #[error("blob store: {0}")]
    Store(#[from] object_store::Error),
    /// The local directory could not be created.
    #[error("blob directory: {0}")]
    Io(#[from] std::io::Error),
}

/// Where blobs live.
#[derive(Clone, Debug)]
pub enum BlobConfig {
    Local(std::path::PathBuf),
    S3 {
        endpoint: String,
        bucket: String,
        access_key: String,
        secret_key: String,
        region: String,
    },
}

#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
}

impl BlobStore {
    pub fn open(config: &BlobConfig) -> Result<BlobStore, BlobError> {
        let store: Arc<dyn ObjectStore> = match config {
            BlobConfig::Local(dir) => {
                std::fs::create_dir_all(dir)?;
                Arc::new(LocalFileSystem::new_with_prefix(dir)?)
            }
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
        Ok(BlobStore { store })
    }

    pub fn local(dir: &Path) -> Result<BlobStore, BlobError> {
        BlobStore::open(&BlobConfig::Local(dir.to_path_buf()))
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        self.store
            .put(&ObjectPath::from(key), PutPayload::from_bytes(bytes))
            .await?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        match self.store.get(&ObjectPath::from(key)).await {
            Ok(found) => Ok(found.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(BlobError::NotFound(key.to_string())),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, BlobError> {
        match self.store.head(&ObjectPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

/// `sha256:<hex>` of some bytes: the id of content-addressed blobs.
pub fn content_id(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_round_trip() {
        let dir = std::env::temp_dir().join(format!("kiln-blob-{}", std::process::id()));
        let store = BlobStore::local(&dir).unwrap();
        store
            .put("modules/abc", Bytes::from_static(b"\0asm"))
            .await
            .unwrap();
        assert!(store.exists("modules/abc").await.unwrap());
        assert_eq!(
            store.get("modules/abc").await.unwrap(),
            Bytes::from_static(b"\0asm")
        );
        store.delete("modules/abc").await.unwrap();
        assert!(matches!(
            store.get("modules/abc").await,
            Err(BlobError::NotFound(_))
        ));
        assert_eq!(
            content_id(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
