//! The first start of an empty database: exactly one process makes the
//! first key, however many API nodes start at once.

use crate::{ApiKey, Db, DbResult};

/// Serialises first starts on PostgreSQL (another number than the
/// migrations' lock, which is released before this one is taken).
const FIRST_KEY_LOCK: i64 = 4243;

impl Db {
    /// Inserts `key` only when the database holds no key at all; returns
    /// whether it did. Two processes calling this together on an empty
    /// database insert one key between them.
    pub async fn key_insert_first(&self, key: &ApiKey, hash: &str) -> DbResult<bool> {
        const INSERT_IF_EMPTY_PG: &str = "INSERT INTO api_keys \
             (id, tenant, name, hash, scopes, created_at) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS (SELECT 1 FROM api_keys)";
        let inserted = match self {
            Db::Postgres(s) => {
                // Under READ COMMITTED two transactions could both see no
                // key; the transaction-scoped lock makes the second wait
                // until the first has committed its key.
                let mut tx = s.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(FIRST_KEY_LOCK)
                    .execute(&mut *tx)
                    .await?;
                let done = sqlx::query(INSERT_IF_EMPTY_PG)
                    .bind(&key.id)
                    .bind(&key.tenant)
                    .bind(&key.name)
                    .bind(hash)
                    .bind(key.scopes.to_text())
                    .bind(key.created_at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                done.rows_affected()
            }
            // One statement is atomic in SQLite: it holds the write lock
            // from the check to the insert.
            Db::Sqlite(s) => sqlx::query(
                "INSERT INTO api_keys (id, tenant, name, hash, scopes, created_at) \
                 SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM api_keys)",
            )
            .bind(&key.id)
            .bind(&key.tenant)
            .bind(&key.name)
            .bind(hash)
            .bind(key.scopes.to_text())
            .bind(key.created_at)
            .execute(&s.write)
            .await?
            .rows_affected(),
        };
        Ok(inserted == 1)
    }
}
