//! Secrets as stored (migration 0017): sealed versions per tenant and name.
//! Sealing and opening are `kiln_core::secrets`; this module never sees a
//! value in clear, only what the caller sealed.

use kiln_core::secrets::{Sealed, NONCE_BYTES};
use kiln_core::Millis;

use crate::audit::note::Change;
use crate::{Db, DbError, DbResult};

/// What routes show of a secret: never its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretMeta {
    pub name: String,
    pub version: i64,
    pub bytes: i64,
    pub created_at: Millis,
    pub last_used_at: Option<Millis>,
}

/// One stored version, sealed.
#[derive(Clone, Debug)]
pub struct SealedVersion {
    pub tenant: String,
    pub name: String,
    pub version: i64,
    pub sealed: Sealed,
}

#[derive(sqlx::FromRow)]
struct Row {
    tenant: String,
    name: String,
    version: i64,
    ciphertext: String,
    nonce: String,
    wrapped_key: String,
    wrap_nonce: String,
    master_id: String,
}

fn nonce(hex_text: &str) -> DbResult<[u8; NONCE_BYTES]> {
    hex::decode(hex_text)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| DbError::Corrupt("a secret's nonce".into()))
}

impl TryFrom<Row> for SealedVersion {
    type Error = DbError;

    fn try_from(r: Row) -> DbResult<SealedVersion> {
        let bytes =
            |text: &str| hex::decode(text).map_err(|_| DbError::Corrupt("a sealed secret".into()));
        Ok(SealedVersion {
            sealed: Sealed {
                ciphertext: bytes(&r.ciphertext)?,
                nonce: nonce(&r.nonce)?,
                wrapped_key: bytes(&r.wrapped_key)?,
                wrap_nonce: nonce(&r.wrap_nonce)?,
                master_id: r.master_id,
            },
            tenant: r.tenant,
            name: r.name,
            version: r.version,
        })
    }
}

#[derive(sqlx::FromRow)]
struct MetaRow {
    name: String,
    version: i64,
    bytes: i64,
    created_at: i64,
    last_used_at: Option<i64>,
}

impl From<MetaRow> for SecretMeta {
    fn from(r: MetaRow) -> SecretMeta {
        SecretMeta {
            name: r.name,
            version: r.version,
            bytes: r.bytes,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
        }
    }
}

/// The newest version of each name.
const LATEST: &str = "SELECT name, version, bytes, created_at, last_used_at FROM secrets s \
     WHERE tenant = $1 AND version = (SELECT MAX(version) FROM secrets m \
     WHERE m.tenant = s.tenant AND m.name = s.name)";

const SEALED_COLUMNS: &str =
    "tenant, name, version, ciphertext, nonce, wrapped_key, wrap_nonce, master_id";

/// Most secrets one tenant lists (and one job asks for).
pub const SECRET_LIST_MAX: i64 = 1_000;

impl Db {
    /// Stores a new version of `name`: `seal` is given the version number
    /// (sealed values are bound to it). Two writers at once: one of them
    /// tries again with the next number.
    pub async fn secret_put(
        &self,
        tenant: &str,
        name: &str,
        bytes: usize,
        now: Millis,
        seal: impl Fn(i64) -> Sealed,
    ) -> DbResult<SecretMeta> {
        let next =
            "SELECT COALESCE(MAX(version), 0) + 1 FROM secrets WHERE tenant = $1 AND name = $2";
        let insert = "INSERT INTO secrets (tenant, name, version, ciphertext, nonce, wrapped_key, \
                      wrap_nonce, master_id, bytes, created_at) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                      ON CONFLICT (tenant, name, version) DO NOTHING";
        for _ in 0..8 {
            let version: i64 = crate::with_pool!(self, write, |pool| sqlx::query_scalar(next)
                .bind(tenant)
                .bind(name)
                .fetch_one(pool)
                .await?);
            let sealed = seal(version);
            let inserted = crate::audit::audited_tx!(self, |tx| {
                let n = sqlx::query(insert)
                    .bind(tenant)
                    .bind(name)
                    .bind(version)
                    .bind(hex::encode(&sealed.ciphertext))
                    .bind(hex::encode(sealed.nonce))
                    .bind(hex::encode(&sealed.wrapped_key))
                    .bind(hex::encode(sealed.wrap_nonce))
                    .bind(&sealed.master_id)
                    .bind(bytes as i64)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n == 1 {
                    crate::audit::stamp!(&mut *tx, Change::Created);
                }
                n
            });
            if inserted == 1 {
                return Ok(SecretMeta {
                    name: name.to_string(),
                    version,
                    bytes: bytes as i64,
                    created_at: now,
                    last_used_at: None,
                });
            }
        }
        Err(DbError::Corrupt(format!(
            "secret {name} kept changing under a write"
        )))
    }

    pub async fn secret_list(&self, tenant: &str) -> DbResult<Vec<SecretMeta>> {
        let sql = format!("{LATEST} ORDER BY name LIMIT {SECRET_LIST_MAX}");
        let rows: Vec<MetaRow> = crate::with_pool!(self, read, |pool| sqlx::query_as(&sql)
            .bind(tenant)
            .fetch_all(pool)
            .await?);
        Ok(rows.into_iter().map(SecretMeta::from).collect())
    }

    pub async fn secret_get(&self, tenant: &str, name: &str) -> DbResult<Option<SecretMeta>> {
        let sql = format!("{LATEST} AND name = $2");
        let row: Option<MetaRow> = crate::with_pool!(self, read, |pool| sqlx::query_as(&sql)
            .bind(tenant)
            .bind(name)
            .fetch_optional(pool)
            .await?);
        Ok(row.map(SecretMeta::from))
    }

    /// Deletes every version; false if there was none.
    pub async fn secret_delete(&self, tenant: &str, name: &str) -> DbResult<bool> {
        let gone = crate::audit::audited_tx!(self, |tx| {
            let n = sqlx::query("DELETE FROM secrets WHERE tenant = $1 AND name = $2")
                .bind(tenant)
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n > 0 {
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            n
        });
        Ok(gone > 0)
    }

    /// The newest sealed version of each of `names` the tenant has (a name
    /// it lacks is simply not returned), marked used at `now`.
    pub async fn secret_take(
        &self,
        tenant: &str,
        names: &[String],
        now: Millis,
    ) -> DbResult<Vec<SealedVersion>> {
        let one = format!(
            "SELECT {SEALED_COLUMNS} FROM secrets WHERE tenant = $1 AND name = $2 \
             ORDER BY version DESC LIMIT 1"
        );
        let touch =
            "UPDATE secrets SET last_used_at = $4 WHERE tenant = $1 AND name = $2 AND version = $3";
        let mut found = Vec::with_capacity(names.len());
        for name in names.iter().take(SECRET_LIST_MAX as usize) {
            let row: Option<Row> = crate::with_pool!(self, read, |pool| sqlx::query_as(&one)
                .bind(tenant)
                .bind(name)
                .fetch_optional(pool)
                .await?);
            let Some(row) = row else { continue };
            let version = SealedVersion::try_from(row)?;
            crate::with_pool!(self, write, |pool| sqlx::query(touch)
                .bind(tenant)
                .bind(name)
                .bind(version.version)
                .bind(now)
                .execute(pool)
                .await
                .map(drop)?);
            found.push(version);
        }
        Ok(found)
    }

    /// Every stored version not sealed under `master_id`, a page at a time
    /// (for rotating the master key).
    pub async fn secret_sealed_not_under(
        &self,
        master_id: &str,
        limit: i64,
    ) -> DbResult<Vec<SealedVersion>> {
        let sql = format!(
            "SELECT {SEALED_COLUMNS} FROM secrets WHERE master_id <> $1 \
             ORDER BY tenant, name, version LIMIT $2"
        );
        let rows: Vec<Row> = crate::with_pool!(self, read, |pool| sqlx::query_as(&sql)
            .bind(master_id)
            .bind(limit)
            .fetch_all(pool)
            .await?);
        rows.into_iter().map(SealedVersion::try_from).collect()
    }

    /// A version's data key re-sealed (its value is untouched).
    pub async fn secret_rewrap(&self, version: &SealedVersion) -> DbResult<()> {
        let sql = "UPDATE secrets SET wrapped_key = $4, wrap_nonce = $5, master_id = $6 \
                   WHERE tenant = $1 AND name = $2 AND version = $3";
        crate::with_pool!(self, write, |pool| sqlx::query(sql)
            .bind(&version.tenant)
            .bind(&version.name)
            .bind(version.version)
            .bind(hex::encode(&version.sealed.wrapped_key))
            .bind(hex::encode(version.sealed.wrap_nonce))
            .bind(&version.sealed.master_id)
            .execute(pool)
            .await
            .map(drop)?);
        Ok(())
    }
}
