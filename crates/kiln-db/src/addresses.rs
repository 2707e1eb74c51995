//! VM addresses (migration 0022): the IPAM of VM networking. A host takes
//! an address by inserting its row (the primary key refuses one already
//! given), frees it with its VM, and drops all of its rows when its
//! start-up reaper rebuilds its namespace.

use kiln_core::Millis;

use crate::{Db, DbResult};

/// An address given to a VM.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct VmAddress {
    /// The VM host's key (its host name and namespace).
    pub host: String,
    pub address: String,
    pub mac: String,
    pub vm_id: String,
    pub tenant: String,
    /// The named network the VM joined, if any.
    pub network: Option<String>,
    pub created_at: Millis,
}

impl Db {
    /// The addresses a host has given out, in no particular order.
    pub async fn vm_address_list(&self, host: &str) -> DbResult<Vec<VmAddress>> {
        let sql = "SELECT host, address, mac, vm_id, tenant, network, created_at \
                   FROM vm_addresses WHERE host = $1";
        crate::with_pool!(self, read, |pool| Ok(sqlx::query_as(sql)
            .bind(host)
            .fetch_all(pool)
            .await?))
    }

    /// Takes an address (and its MAC) for a VM; false when either is
    /// already given on that host.
    pub async fn vm_address_insert(&self, row: &VmAddress) -> DbResult<bool> {
        let sql = "INSERT INTO vm_addresses (host, address, mac, vm_id, tenant, network, \
                   created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING";
        let done = crate::with_pool!(self, write, |pool| sqlx::query(sql)
            .bind(&row.host)
            .bind(&row.address)
            .bind(&row.mac)
            .bind(&row.vm_id)
            .bind(&row.tenant)
            .bind(&row.network)
            .bind(row.created_at)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// Frees an address.
    pub async fn vm_address_delete(&self, host: &str, address: &str) -> DbResult<bool> {
        let sql = "DELETE FROM vm_addresses WHERE host = $1 AND address = $2";
        let done = crate::with_pool!(self, write, |pool| sqlx::query(sql)
            .bind(host)
            .bind(address)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done > 0)
    }

    /// Frees every address of a host (its reaper, at start-up); how many.
    pub async fn vm_address_delete_host(&self, host: &str) -> DbResult<u64> {
        let sql = "DELETE FROM vm_addresses WHERE host = $1";
        Ok(crate::with_pool!(self, write, |pool| sqlx::query(sql)
            .bind(host)
            .execute(pool)
            .await?
            .rows_affected()))
    }
}
