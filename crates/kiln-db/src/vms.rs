//! VMs across hosts (migration 0016): the hosts that run VMs, every VM with
//! its owner, and the secret that signs what API nodes forward to owners.
//! A VM lives in its owner's memory; these rows are how other nodes find
//! it, list it and learn that it was lost with its host.

use std::collections::BTreeMap;

use kiln_core::Millis;

use crate::{Db, DbResult};

/// What a VM host says of itself at each heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct VmHostReport {
    /// The owner part of its VMs' ids.
    pub tag: String,
    pub node_id: String,
    /// Where API nodes forward requests for its VMs.
    pub url: String,
    pub accelerator: String,
    pub vms_free: i64,
    pub memory_free_mib: i64,
    pub vms_live: i32,
}

/// A VM host as placement and forwarding see it.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct VmHost {
    pub tag: String,
    pub node_id: String,
    pub url: String,
    pub accelerator: String,
    pub vms_free: i64,
    pub memory_free_mib: i64,
    pub vms_live: i32,
    pub last_seen: i64,
    /// Its node's status (`online`, `draining`, `lost`); none once the node
    /// row is gone (stopped, or forgotten by retention).
    pub node_status: Option<String>,
}

/// Whether a VM is running, and if not how it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmStatus {
    Running,
    Deleted,
    Expired,
    /// Its host was lost: VMs do not move.
    Lost,
}

impl VmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Running => "running",
            VmStatus::Deleted => "deleted",
            VmStatus::Expired => "expired",
            VmStatus::Lost => "lost",
        }
    }

    /// The status a lifecycle event leaves a VM in.
    pub fn after(event: &str) -> Option<VmStatus> {
        match event {
            "vm.created" => Some(VmStatus::Running),
            "vm.deleted" => Some(VmStatus::Deleted),
            "vm.expired" => Some(VmStatus::Expired),
            "vm.lost" => Some(VmStatus::Lost),
            _ => None,
        }
    }
}

/// A VM as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct VmRecord {
    pub id: String,
    pub tenant: String,
    /// The owner's tag; empty for a VM of a process that hosts alone.
    pub host: String,
    pub status: String,
    pub image: String,
    pub vcpus: i32,
    pub memory_mib: i64,
    pub accelerator: String,
    pub labels: BTreeMap<String, String>,
    pub created_at: Millis,
    pub expires_at: Option<Millis>,
    pub ended_at: Option<Millis>,
    pub boot_ms: i64,
}

#[derive(sqlx::FromRow)]
struct VmRow {
    id: String,
    tenant: String,
    host: String,
    status: String,
    image: String,
    vcpus: i32,
    memory_mib: i64,
    accelerator: String,
    labels: String,
    created_at: i64,
    expires_at: Option<i64>,
    ended_at: Option<i64>,
    boot_ms: i64,
}

impl From<VmRow> for VmRecord {
    fn from(r: VmRow) -> VmRecord {
        VmRecord {
            id: r.id,
            tenant: r.tenant,
            host: r.host,
            status: r.status,
            image: r.image,
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            accelerator: r.accelerator,
            labels: serde_json::from_str(&r.labels).unwrap_or_default(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            ended_at: r.ended_at,
            boot_ms: r.boot_ms,
        }
    }
}

const VM_COLUMNS: &str = "id, tenant, host, status, image, vcpus, memory_mib, accelerator, \
     labels, created_at, expires_at, ended_at, boot_ms";

const HOST_COLUMNS: &str = "h.tag, h.node_id, h.url, h.accelerator, h.vms_free, \
     h.memory_free_mib, h.vms_live, h.last_seen, n.status AS node_status";

const EVENT: &str = "INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, \
     data) VALUES ($1, $2, $3, 'vm', $4, $5, $6)";

/// Most rows one list returns.
pub const VM_LIST_MAX: i64 = 1_000;

impl Db {
    /// A VM host's heartbeat: its row written, and the VMs of its own that
    /// were marked lost while it was silent (tenant, id), which it must
    /// now stop: the fleet has given them up.
    pub async fn vm_host_beat(
        &self,
        report: &VmHostReport,
        now: Millis,
    ) -> DbResult<Vec<(String, String)>> {
        let upsert = "INSERT INTO vm_hosts (tag, node_id, url, accelerator, vms_free, \
                      memory_free_mib, vms_live, last_seen) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                      ON CONFLICT (tag) DO UPDATE SET node_id = excluded.node_id, url = excluded.url, \
                      accelerator = excluded.accelerator, vms_free = excluded.vms_free, \
                      memory_free_mib = excluded.memory_free_mib, vms_live = excluded.vms_live, \
                      last_seen = excluded.last_seen";
        let lost = "SELECT tenant, id FROM vms WHERE host = $1 AND status = 'lost' \
                    ORDER BY id LIMIT 1000";
        crate::with_pool!(self, write, |pool| {
            sqlx::query(upsert)
                .bind(&report.tag)
                .bind(&report.node_id)
                .bind(&report.url)
                .bind(&report.accelerator)
                .bind(report.vms_free)
                .bind(report.memory_free_mib)
                .bind(report.vms_live)
                .bind(now)
                .execute(pool)
                .await?;
            Ok(sqlx::query_as(lost)
                .bind(&report.tag)
                .fetch_all(pool)
                .await?)
        })
    }

    /// A VM host stopping gracefully (its VMs were deleted first).
    pub async fn vm_host_remove(&self, tag: &str) -> DbResult<()> {
        crate::with_pool!(self, write, |pool| {
            sqlx::query("DELETE FROM vm_hosts WHERE tag = $1")
                .bind(tag)
                .execute(pool)
                .await
                .map(drop)?
        });
        Ok(())
    }

    pub async fn vm_host_get(&self, tag: &str) -> DbResult<Option<VmHost>> {
        let sql = format!(
            "SELECT {HOST_COLUMNS} FROM vm_hosts h LEFT JOIN nodes n ON n.id = h.node_id \
             WHERE h.tag = $1"
        );
        crate::with_pool!(self, read, |pool| Ok(sqlx::query_as(&sql)
            .bind(tag)
            .fetch_optional(pool)
            .await?))
    }

    /// Hosts that may take a VM of `memory_mib`: online (not draining, not
    /// lost), heard from since `fresh_since`, with a free slot and the
    /// memory; the roomiest first.
    pub async fn vm_host_candidates(
        &self,
        memory_mib: i64,
        fresh_since: Millis,
    ) -> DbResult<Vec<VmHost>> {
        let sql = format!(
            "SELECT {HOST_COLUMNS} FROM vm_hosts h JOIN nodes n ON n.id = h.node_id \
             WHERE n.status = 'online' AND h.last_seen >= $1 AND h.vms_free > 0 \
             AND h.memory_free_mib >= $2 ORDER BY h.memory_free_mib DESC, h.tag LIMIT 8"
        );
        crate::with_pool!(self, read, |pool| Ok(sqlx::query_as(&sql)
            .bind(fresh_since)
            .bind(memory_mib)
            .fetch_all(pool)
            .await?))
    }

    /// Records a VM's change of life (`vm.created`, `vm.deleted`,
    /// `vm.expired`) and its event in one transaction. A VM's row only moves
    /// forward: a late `created` never revives a VM that ended.
    pub async fn vm_record(
        &self,
        event: &str,
        vm: &VmRecord,
        data: &serde_json::Value,
        now: Millis,
    ) -> DbResult<()> {
        let status = VmStatus::after(event)
            .ok_or_else(|| crate::DbError::Corrupt(format!("not a VM event: {event}")))?;
        let labels = serde_json::to_string(&vm.labels).unwrap_or_else(|_| "{}".into());
        let data = data.to_string();
        let ended_at = (status != VmStatus::Running).then_some(now);
        let upsert = format!(
            "INSERT INTO vms ({VM_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, ended_at = excluded.ended_at \
             WHERE vms.status = 'running' AND excluded.status <> 'running'"
        );
        crate::with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(&upsert)
                .bind(&vm.id)
                .bind(&vm.tenant)
                .bind(&vm.host)
                .bind(status.as_str())
                .bind(&vm.image)
                .bind(vm.vcpus)
                .bind(vm.memory_mib)
                .bind(&vm.accelerator)
                .bind(&labels)
                .bind(vm.created_at)
                .bind(vm.expires_at)
                .bind(ended_at)
                .bind(vm.boot_ms)
                .execute(&mut *tx)
                .await?;
            sqlx::query(EVENT)
                .bind(now)
                .bind(&vm.tenant)
                .bind(event)
                .bind(&vm.id)
                .bind(&labels)
                .bind(&data)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        self.events_written();
        Ok(())
    }

    /// The tenant's VMs across hosts, newest first; `running` only unless
    /// `all`.
    pub async fn vm_list(&self, tenant: &str, all: bool, limit: i64) -> DbResult<Vec<VmRecord>> {
        let sql = format!(
            "SELECT {VM_COLUMNS} FROM vms WHERE tenant = $1 AND ($2 OR status = 'running') \
             ORDER BY created_at DESC, id DESC LIMIT $3"
        );
        let rows: Vec<VmRow> = crate::with_pool!(self, read, |pool| sqlx::query_as(&sql)
            .bind(tenant)
            .bind(all)
            .bind(limit.clamp(1, VM_LIST_MAX))
            .fetch_all(pool)
            .await?);
        Ok(rows.into_iter().map(VmRecord::from).collect())
    }

    pub async fn vm_get(&self, tenant: &str, id: &str) -> DbResult<Option<VmRecord>> {
        let sql = format!("SELECT {VM_COLUMNS} FROM vms WHERE tenant = $1 AND id = $2");
        let row: Option<VmRow> = crate::with_pool!(self, read, |pool| sqlx::query_as(&sql)
            .bind(tenant)
            .bind(id)
            .fetch_optional(pool)
            .await?);
        Ok(row.map(VmRecord::from))
    }

    /// VM hosts whose node was marked lost (or is gone without saying so)
    /// lose their VMs: each running VM becomes `lost` (with its `vm.lost`
    /// event), the commands queued for them fail for good (`vm_lost`), and
    /// the host leaves placement, in one transaction per host. Returns how
    /// many VMs were lost.
    pub async fn vm_hosts_sweep(&self, now: Millis) -> DbResult<u64> {
        let tags: Vec<String> = crate::with_pool!(self, read, |pool| sqlx::query_scalar(
            "SELECT h.tag FROM vm_hosts h LEFT JOIN nodes n ON n.id = h.node_id \
             WHERE n.id IS NULL OR n.status = 'lost' ORDER BY h.tag LIMIT 100"
        )
        .fetch_all(pool)
        .await?);
        let mut lost = 0;
        for tag in tags {
            lost += self.vm_host_lost(&tag, now).await?;
        }
        if lost > 0 {
            self.events_written();
        }
        Ok(lost)
    }

    /// A VM row written by its owner before it answers a create, so the
    /// VM is listed everywhere from the moment its id is known (its
    /// `vm.created` event follows; a row already there is left alone).
    pub async fn vm_insert(&self, vm: &VmRecord) -> DbResult<()> {
        let labels = serde_json::to_string(&vm.labels).unwrap_or_else(|_| "{}".into());
        let sql = format!(
            "INSERT INTO vms ({VM_COLUMNS}) VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $8, $9, $10, NULL, $11) \
             ON CONFLICT (id) DO NOTHING"
        );
        let resource = format!("/api/v1/vms/{}", vm.id);
        crate::audit::audited_tx!(self, |tx| {
            let n = sqlx::query(&sql)
                .bind(&vm.id)
                .bind(&vm.tenant)
                .bind(&vm.host)
                .bind(&vm.image)
                .bind(vm.vcpus)
                .bind(vm.memory_mib)
                .bind(&vm.accelerator)
                .bind(&labels)
                .bind(vm.created_at)
                .bind(vm.expires_at)
                .bind(vm.boot_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n == 1 {
                crate::audit::stamp!(
                    &mut *tx,
                    crate::audit::note::Change::Created,
                    Some(&resource)
                );
            }
        });
        Ok(())
    }

    async fn vm_host_lost(&self, tag: &str, now: Millis) -> DbResult<u64> {
        let mark = format!(
            "UPDATE vms SET status = 'lost', ended_at = $2 WHERE host = $1 AND status = 'running' \
             RETURNING {VM_COLUMNS}"
        );
        let kinds: Vec<String> = ["vm:execute", "exec", "vm:delete"]
            .iter()
            .map(|kind| format!("{kind}@{tag}"))
            .collect();
        let fail = "UPDATE jobs SET status = 'failed', finished_at = $1, \
                    error = 'vm_lost: the VM''s host was lost' \
                    WHERE kind IN ($2, $3, $4) AND status IN ('queued', 'scheduled')";
        crate::with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let rows: Vec<VmRow> = sqlx::query_as(&mark)
                .bind(tag)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
            for row in &rows {
                let data = serde_json::json!({"host": tag, "reason": "host_lost"}).to_string();
                sqlx::query(EVENT)
                    .bind(now)
                    .bind(&row.tenant)
                    .bind("vm.lost")
                    .bind(&row.id)
                    .bind(&row.labels)
                    .bind(&data)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(fail)
                .bind(now)
                .bind(&kinds[0])
                .bind(&kinds[1])
                .bind(&kinds[2])
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM vm_hosts WHERE tag = $1")
                .bind(tag)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(rows.len() as u64)
        })
    }

    /// Forgets VMs that ended before `before` (in batches; how many went).
    pub async fn vm_prune(&self, before: Millis) -> DbResult<u64> {
        let sql = "DELETE FROM vms WHERE id IN \
                   (SELECT id FROM vms WHERE ended_at < $1 ORDER BY ended_at LIMIT 1000)";
        crate::with_pool!(self, write, |pool| Ok(sqlx::query(sql)
            .bind(before)
            .execute(pool)
            .await?
            .rows_affected()))
    }

    /// The deployment's shared secret `name`: the one stored, or `fresh`
    /// stored now if there was none (the first process to ask makes it).
    pub async fn internal_secret(&self, name: &str, fresh: &str, now: Millis) -> DbResult<String> {
        crate::with_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO internal_secrets (name, secret, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(fresh)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(
                sqlx::query_scalar("SELECT secret FROM internal_secrets WHERE name = $1")
                    .bind(name)
                    .fetch_one(pool)
                    .await?,
            )
        })
    }
}
