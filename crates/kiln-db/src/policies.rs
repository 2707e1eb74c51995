//! Admission policies (migration 0020): a tenant's rules, stored as
//! written, and the per-process cache that submissions read them through.
//!
//! Every change bumps the tenant's row in `policy_versions` in its own
//! transaction. A cached set is served for up to [`CACHE_TTL`] without a
//! query; after that one point read of the version says whether it still
//! stands, so another process's change is seen within a second and a tenant
//! without policies costs one indexed read a second, not one per job.
//! Changes made through this process drop its entry at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kiln_core::Millis;
use kiln_flow::policy::{Policy, PolicySet, POLICIES_MAX};
use serde::Serialize;

use crate::audit::note::Change;
use crate::{storable, Db, DbError, DbResult};

/// How long a cached set is used before its version is read again.
pub const CACHE_TTL: Duration = Duration::from_secs(1);
/// Tenants whose sets one process keeps; past it the cache starts over.
const CACHE_TENANTS_MAX: usize = 10_000;

/// A policy as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoredPolicy {
    pub name: String,
    pub rule: String,
    pub message: String,
    pub applies_to: Vec<String>,
    pub enabled: bool,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(sqlx::FromRow)]
pub(crate) struct PolicyRow {
    name: String,
    rule: String,
    message: String,
    applies_to: String,
    enabled: bool,
    created_at: i64,
    updated_at: i64,
}

impl From<PolicyRow> for StoredPolicy {
    fn from(r: PolicyRow) -> StoredPolicy {
        StoredPolicy {
            name: r.name,
            rule: r.rule,
            message: r.message,
            applies_to: serde_json::from_str(&r.applies_to).unwrap_or_default(),
            enabled: r.enabled,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// What a put did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyPut {
    Created(StoredPolicy),
    Replaced(StoredPolicy),
    /// The tenant already holds [`POLICIES_MAX`] policies.
    Full,
}

const COLUMNS: &str = "name, rule, message, applies_to, enabled, created_at, updated_at";
pub(crate) const VERSION_SQL: &str = "SELECT version FROM policy_versions WHERE tenant = $1";
pub(crate) const ROWS_SQL: &str = "SELECT name, rule, message, applies_to, enabled, created_at, \
     updated_at FROM policies WHERE tenant = $1 ORDER BY name LIMIT 1000";
const BUMP_SQL: &str = "INSERT INTO policy_versions (tenant, version) VALUES ($1, 1) \
     ON CONFLICT (tenant) DO UPDATE SET version = policy_versions.version + 1";

/// The parsed set of stored rows. A row whose rule no longer parses (it
/// did when it was put) refuses every job it applies to: a policy that
/// cannot be read never admits anything.
pub(crate) fn set_of(rows: Vec<PolicyRow>) -> PolicySet {
    let policies = rows
        .into_iter()
        .map(StoredPolicy::from)
        .map(|p| {
            Policy::new(
                &p.name,
                &p.rule,
                &p.message,
                p.applies_to.clone(),
                p.enabled,
            )
            .unwrap_or_else(|error| {
                tracing::error!(policy = %p.name, %error, "a stored policy does not parse; it refuses every job");
                Policy {
                    name: p.name.clone(),
                    rule: kiln_flow::Expr::parse("false").expect("a literal parses"),
                    message: format!("the stored rule does not parse ({error})"),
                    applies_to: p.applies_to,
                    enabled: p.enabled,
                }
            })
        })
        .collect();
    PolicySet::new(policies)
}

struct Entry {
    version: i64,
    checked: Instant,
    set: Arc<PolicySet>,
}

/// Each tenant's parsed policies, with the version they were read at.
#[derive(Default)]
pub struct PolicyCache {
    map: Mutex<HashMap<String, Entry>>,
}

impl PolicyCache {
    /// The set, if it was confirmed within [`CACHE_TTL`].
    pub(crate) fn fresh(&self, tenant: &str) -> Option<Arc<PolicySet>> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(tenant)
            .filter(|e| e.checked.elapsed() < CACHE_TTL)
            .map(|e| e.set.clone())
    }

    /// The set, if it was read at `version` (and marks it confirmed).
    pub(crate) fn confirm(&self, tenant: &str, version: i64) -> Option<Arc<PolicySet>> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.get_mut(tenant).filter(|e| e.version == version)?;
        entry.checked = Instant::now();
        Some(entry.set.clone())
    }

    pub(crate) fn store(&self, tenant: &str, version: i64, set: PolicySet) -> Arc<PolicySet> {
        let set = Arc::new(set);
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= CACHE_TENANTS_MAX && !map.contains_key(tenant) {
            map.clear();
        }
        map.insert(
            tenant.to_string(),
            Entry {
                version,
                checked: Instant::now(),
                set: set.clone(),
            },
        );
        set
    }

    fn forget(&self, tenant: &str) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(tenant);
    }
}

/// Reads a tenant's policy version and rows on `conn` (a transaction's
/// connection of either driver).
macro_rules! load_on {
    (version, $conn:expr, $tenant:expr) => {
        sqlx::query_scalar::<_, i64>(crate::policies::VERSION_SQL)
            .bind($tenant)
            .fetch_optional($conn)
            .await
            .map(|v| v.unwrap_or(0))
    };
    (rows, $conn:expr, $tenant:expr) => {
        sqlx::query_as::<_, crate::policies::PolicyRow>(crate::policies::ROWS_SQL)
            .bind($tenant)
            .fetch_all($conn)
            .await
    };
}
pub(crate) use load_on;

impl Db {
    fn policy_cache(&self) -> &PolicyCache {
        &self.defs().policies
    }

    /// The tenant's policies, parsed, through the process's cache (see the
    /// module's note for how fresh they are).
    pub async fn policy_set(&self, tenant: &str) -> DbResult<Arc<PolicySet>> {
        let cache = self.policy_cache();
        if let Some(set) = cache.fresh(tenant) {
            return Ok(set);
        }
        let version: i64 = crate::with_pool!(self, read, |pool| load_on!(version, pool, tenant)?);
        if let Some(set) = cache.confirm(tenant, version) {
            return Ok(set);
        }
        let rows: Vec<PolicyRow> =
            crate::with_pool!(self, read, |pool| load_on!(rows, pool, tenant)?);
        Ok(cache.store(tenant, version, set_of(rows)))
    }

    /// Stores a policy (already checked by `Policy::new`), replacing the one
    /// of the same name; refused past [`POLICIES_MAX`].
    #[allow(clippy::too_many_arguments)]
    pub async fn policy_put(
        &self,
        tenant: &str,
        name: &str,
        rule: &str,
        message: &str,
        applies_to: &[String],
        enabled: bool,
        now: Millis,
    ) -> DbResult<PolicyPut> {
        for (what, text) in [
            ("tenant", tenant),
            ("policy", name),
            ("rule", rule),
            ("message", message),
        ] {
            storable(what, text)?;
        }
        let kinds =
            serde_json::to_string(applies_to).map_err(|e| DbError::Invalid(e.to_string()))?;
        let put = crate::audit::audited_tx!(self, |tx| {
            // First, so that on PostgreSQL the version row's lock orders
            // concurrent puts of one tenant: the count below is exact.
            sqlx::query(BUMP_SQL).bind(tenant).execute(&mut *tx).await?;
            let updated = sqlx::query(
                "UPDATE policies SET rule = $3, message = $4, applies_to = $5, enabled = $6, \
                 updated_at = $7 WHERE tenant = $1 AND name = $2",
            )
            .bind(tenant)
            .bind(name)
            .bind(rule)
            .bind(message)
            .bind(&kinds)
            .bind(enabled)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 0 {
                let count: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM policies WHERE tenant = $1")
                        .bind(tenant)
                        .fetch_one(&mut *tx)
                        .await?;
                if count >= POLICIES_MAX as i64 {
                    // Dropped uncommitted: the version's bump goes too.
                    return Ok(PolicyPut::Full);
                }
                sqlx::query(
                    "INSERT INTO policies (tenant, name, rule, message, applies_to, enabled, \
                     created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                )
                .bind(tenant)
                .bind(name)
                .bind(rule)
                .bind(message)
                .bind(&kinds)
                .bind(enabled)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            let row: PolicyRow = sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM policies WHERE tenant = $1 AND name = $2"
            ))
            .bind(tenant)
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
            let change = if updated == 0 {
                Change::Created
            } else {
                Change::Changed
            };
            crate::audit::stamp!(&mut *tx, change);
            let stored = StoredPolicy::from(row);
            if updated == 0 {
                PolicyPut::Created(stored)
            } else {
                PolicyPut::Replaced(stored)
            }
        });
        self.policy_cache().forget(tenant);
        Ok(put)
    }

    pub async fn policy_get(&self, tenant: &str, name: &str) -> DbResult<Option<StoredPolicy>> {
        let sql = format!("SELECT {COLUMNS} FROM policies WHERE tenant = $1 AND name = $2");
        let row: Option<PolicyRow> = crate::with_pool!(self, read, |pool| {
            sqlx::query_as(&sql)
                .bind(tenant)
                .bind(name)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(StoredPolicy::from))
    }

    /// A tenant's policies by name.
    pub async fn policy_list(&self, tenant: &str) -> DbResult<Vec<StoredPolicy>> {
        let rows: Vec<PolicyRow> =
            crate::with_pool!(self, read, |pool| load_on!(rows, pool, tenant)?);
        Ok(rows.into_iter().map(StoredPolicy::from).collect())
    }

    /// Deletes a policy; false when the tenant has none of that name.
    pub async fn policy_delete(&self, tenant: &str, name: &str) -> DbResult<bool> {
        let deleted = crate::audit::audited_tx!(self, |tx| {
            sqlx::query(BUMP_SQL).bind(tenant).execute(&mut *tx).await?;
            let deleted = sqlx::query("DELETE FROM policies WHERE tenant = $1 AND name = $2")
                .bind(tenant)
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if deleted == 0 {
                // Dropped uncommitted: nothing changed, not even the version.
                return Ok(false);
            }
            crate::audit::stamp!(&mut *tx, Change::Changed);
            true
        });
        if deleted {
            self.policy_cache().forget(tenant);
        }
        Ok(deleted)
    }
}
