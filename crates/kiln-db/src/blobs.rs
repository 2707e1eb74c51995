//! Blobs kept in the database: what one node stores, every node of the
//! deployment reads. Content is split into chunks of [`BLOB_CHUNK_BYTES`],
//! written in one transaction with the `blobs` row, and read one chunk per
//! statement, so neither side holds more than a chunk in a statement.

use kiln_core::Millis;

use crate::{Db, DbError, DbResult};

/// The size of one stored chunk (the last may be shorter).
pub const BLOB_CHUNK_BYTES: usize = 1 << 20;

/// What the `blobs` row says about a stored blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub size: i64,
    pub chunks: i32,
}

impl Db {
    /// Stores `data` under `key`, replacing what was there. Concurrent writers
    /// of one key take turns on its `blobs` row; readers see the old content
    /// or the new, never a mix of chunk sets.
    pub async fn blob_put(&self, key: &str, data: &[u8], now: Millis) -> DbResult<()> {
        let chunks = i32::try_from(data.len().div_ceil(BLOB_CHUNK_BYTES))
            .map_err(|_| DbError::Corrupt(format!("blob {key} is too large")))?;
        let size = data.len() as i64;
        match self {
            Db::Postgres(s) => {
                let mut tx = s.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO blobs (key, size, chunks, created_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (key) DO UPDATE SET size = EXCLUDED.size, \
                     chunks = EXCLUDED.chunks, created_at = EXCLUDED.created_at",
                )
                .bind(key)
                .bind(size)
                .bind(chunks)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM blob_chunks WHERE key = $1")
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                for (n, chunk) in data.chunks(BLOB_CHUNK_BYTES).enumerate() {
                    sqlx::query("INSERT INTO blob_chunks (key, n, data) VALUES ($1, $2, $3)")
                        .bind(key)
                        .bind(n as i32)
                        .bind(chunk)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
            Db::Sqlite(s) => {
                let mut tx = s.write.begin().await?;
                sqlx::query(
                    "INSERT INTO blobs (key, size, chunks, created_at) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (key) DO UPDATE SET size = excluded.size, \
                     chunks = excluded.chunks, created_at = excluded.created_at",
                )
                .bind(key)
                .bind(size)
                .bind(chunks)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM blob_chunks WHERE key = ?")
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                for (n, chunk) in data.chunks(BLOB_CHUNK_BYTES).enumerate() {
                    sqlx::query("INSERT INTO blob_chunks (key, n, data) VALUES (?, ?, ?)")
                        .bind(key)
                        .bind(n as i32)
                        .bind(chunk)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// The size and chunk count of a stored blob.
    pub async fn blob_info(&self, key: &str) -> DbResult<Option<BlobInfo>> {
        let row: Option<(i64, i32)> = match self {
            Db::Postgres(s) => {
                sqlx::query_as("SELECT size, chunks FROM blobs WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&s.pool)
                    .await?
            }
            Db::Sqlite(s) => {
                sqlx::query_as("SELECT size, chunks FROM blobs WHERE key = ?")
                    .bind(key)
                    .fetch_optional(&s.read)
                    .await?
            }
        };
        Ok(row.map(|(size, chunks)| BlobInfo { size, chunks }))
    }

    /// Chunk `n` (from 0) of a blob; `None` when the blob or chunk is gone.
    pub async fn blob_chunk(&self, key: &str, n: i32) -> DbResult<Option<Vec<u8>>> {
        Ok(match self {
            Db::Postgres(s) => {
                sqlx::query_scalar("SELECT data FROM blob_chunks WHERE key = $1 AND n = $2")
                    .bind(key)
                    .bind(n)
                    .fetch_optional(&s.pool)
                    .await?
            }
            Db::Sqlite(s) => {
                sqlx::query_scalar("SELECT data FROM blob_chunks WHERE key = ? AND n = ?")
                    .bind(key)
                    .bind(n)
                    .fetch_optional(&s.read)
                    .await?
            }
        })
    }

    /// Removes a blob and its chunks; false if there was none.
    pub async fn blob_delete(&self, key: &str) -> DbResult<bool> {
        let done = match self {
            Db::Postgres(s) => sqlx::query("DELETE FROM blobs WHERE key = $1")
                .bind(key)
                .execute(&s.pool)
                .await?
                .rows_affected(),
            Db::Sqlite(s) => sqlx::query("DELETE FROM blobs WHERE key = ?")
                .bind(key)
                .execute(&s.write)
                .await?
                .rows_affected(),
        };
        Ok(done > 0)
    }
}
