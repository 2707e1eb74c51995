//! The fleet's nodes and their load series (migration 0010). Heartbeats and
//! the lost-node detector live in `kiln_ops`; this is their storage. Every
//! change of a node's state is an event written by the table's triggers, in
//! the transaction of the change.

use kiln_core::Millis;

use crate::{storable, Db, DbError, DbResult};

/// What the fleet sees of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeStatus {
    /// Heartbeating, and (if it runs jobs) leasing.
    Online,
    /// Heartbeating; its worker leases nothing new until resumed.
    Draining,
    /// Silent past the deadline.
    Lost,
}

impl NodeStatus {
    pub const ALL: [NodeStatus; 3] = [NodeStatus::Online, NodeStatus::Draining, NodeStatus::Lost];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Online => "online",
            NodeStatus::Draining => "draining",
            NodeStatus::Lost => "lost",
        }
    }

    pub fn parse(text: &str) -> Option<NodeStatus> {
        NodeStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// Load figures of one sample; `None` where the host does not tell (no
/// `/proc`, or the first CPU sample, which has nothing to compare with).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeLoad {
    /// Share of all CPUs busy since the previous sample, 0 to 1.
    pub cpu: Option<f64>,
    /// The 1-minute load average.
    pub load1: Option<f64>,
    /// Share of memory in use (1 - MemAvailable / MemTotal), 0 to 1.
    pub mem_used: Option<f64>,
    pub mem_total_bytes: Option<i64>,
}

/// What a node says of itself at each heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeReport {
    pub id: String,
    pub host: String,
    pub roles: Vec<String>,
    pub version: String,
    pub kinds: Vec<String>,
    pub slots_used: i32,
    pub slots_total: i32,
    pub accelerator: Option<String>,
    pub vms_live: i32,
    pub load: NodeLoad,
    pub started_at: Millis,
}

/// A node as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeInfo {
    pub report: NodeReport,
    pub status: NodeStatus,
    /// An operator asked it to drain (kept while it is lost).
    pub drain: bool,
    pub last_seen: Millis,
    pub lost_at: Option<Millis>,
}

/// One point of a node's load series.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadSample {
    pub time: Millis,
    pub cpu: Option<f64>,
    pub load1: Option<f64>,
    pub mem_used: Option<f64>,
    pub slots_used: i32,
    pub vms_live: i32,
}

/// Most points one read of a series returns.
pub const LOAD_SERIES_MAX: i64 = 2_000;

#[derive(sqlx::FromRow)]
struct NodeRow {
    id: String,
    host: String,
    roles: String,
    version: String,
    kinds: String,
    slots_used: i32,
    slots_total: i32,
    accelerator: Option<String>,
    vms_live: i32,
    cpu: Option<f64>,
    load1: Option<f64>,
    mem_used: Option<f64>,
    mem_total_bytes: Option<i64>,
    status: String,
    drain: bool,
    started_at: i64,
    last_seen: i64,
    lost_at: Option<i64>,
}

impl TryFrom<NodeRow> for NodeInfo {
    type Error = DbError;

    fn try_from(r: NodeRow) -> DbResult<NodeInfo> {
        let status = NodeStatus::parse(&r.status)
            .ok_or_else(|| DbError::Corrupt(format!("node {}: status {:?}", r.id, r.status)))?;
        Ok(NodeInfo {
            report: NodeReport {
                id: r.id,
                host: r.host,
                roles: serde_json::from_str(&r.roles).unwrap_or_default(),
                version: r.version,
                kinds: serde_json::from_str(&r.kinds).unwrap_or_default(),
                slots_used: r.slots_used,
                slots_total: r.slots_total,
                accelerator: r.accelerator,
                vms_live: r.vms_live,
                load: NodeLoad {
                    cpu: r.cpu,
                    load1: r.load1,
                    mem_used: r.mem_used,
                    mem_total_bytes: r.mem_total_bytes,
                },
                started_at: r.started_at,
            },
            status,
            drain: r.drain,
            last_seen: r.last_seen,
            lost_at: r.lost_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct LoadRow {
    time: i64,
    cpu: Option<f64>,
    load1: Option<f64>,
    mem_used: Option<f64>,
    slots_used: i32,
    vms_live: i32,
}

const COLUMNS: &str = "id, host, roles, version, kinds, slots_used, slots_total, accelerator, \
     vms_live, cpu, load1, mem_used, mem_total_bytes, status, drain, started_at, last_seen, lost_at";

// A heartbeat brings a lost node back (`lost_at` cleared): online, or
// draining if an operator asked for that before or while it was away.
const BEAT: &str = "UPDATE nodes SET host = $2, roles = $3, version = $4, kinds = $5, \
     slots_used = $6, slots_total = $7, accelerator = $8, vms_live = $9, cpu = $10, load1 = $11, \
     mem_used = $12, mem_total_bytes = $13, last_seen = $14, lost_at = NULL, \
     status = CASE WHEN drain THEN 'draining' ELSE 'online' END \
     WHERE id = $1 RETURNING drain";

const REGISTER: &str = "INSERT INTO nodes (id, host, roles, version, kinds, slots_used, \
     slots_total, accelerator, vms_live, cpu, load1, mem_used, mem_total_bytes, last_seen, \
     started_at, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
     'online') ON CONFLICT (id) DO NOTHING";

const SAMPLE: &str = "INSERT INTO node_load (node_id, time, cpu, load1, mem_used, slots_used, \
     vms_live) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (node_id, time) DO NOTHING";

const PRUNE_OWN: &str = "DELETE FROM node_load WHERE node_id = $1 AND time < $2";

fn storable_report(report: &NodeReport) -> DbResult<()> {
    storable("node id", &report.id)?;
    storable("host", &report.host)?;
    storable("version", &report.version)?;
    for name in report.roles.iter().chain(&report.kinds) {
        storable("name", name)?;
    }
    if let Some(accelerator) = &report.accelerator {
        storable("accelerator", accelerator)?;
    }
    Ok(())
}

/// Binds `$1`–`$14` of [`BEAT`] (and the first 14 of [`REGISTER`]).
macro_rules! bind_report {
    ($q:expr, $r:expr, $roles:expr, $kinds:expr, $now:expr) => {
        $q.bind(&$r.id)
            .bind(&$r.host)
            .bind($roles)
            .bind(&$r.version)
            .bind($kinds)
            .bind($r.slots_used)
            .bind($r.slots_total)
            .bind(&$r.accelerator)
            .bind($r.vms_live)
            .bind($r.load.cpu)
            .bind($r.load.load1)
            .bind($r.load.mem_used)
            .bind($r.load.mem_total_bytes)
            .bind($now)
    };
}

impl Db {
    /// Records a heartbeat: the node's row (inserted the first time, which
    /// is its `node.registered` event; a lost node comes back online), one
    /// point of its load series, and the end of its series older than
    /// `keep_since`, in one transaction. Answers whether an operator asked
    /// the node to drain.
    pub async fn node_heartbeat(
        &self,
        report: &NodeReport,
        now: Millis,
        keep_since: Millis,
    ) -> DbResult<bool> {
        storable_report(report)?;
        let roles = serde_json::to_string(&report.roles).unwrap_or_else(|_| "[]".into());
        let kinds = serde_json::to_string(&report.kinds).unwrap_or_else(|_| "[]".into());
        macro_rules! beat {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await?;
                let drain: Option<bool> =
                    bind_report!(sqlx::query_scalar(BEAT), report, &roles, &kinds, now)
                        .fetch_optional(&mut *tx)
                        .await?;
                let drain = match drain {
                    Some(drain) => drain,
                    None => {
                        bind_report!(sqlx::query(REGISTER), report, &roles, &kinds, now)
                            .bind(report.started_at)
                            .execute(&mut *tx)
                            .await?;
                        false
                    }
                };
                sqlx::query(SAMPLE)
                    .bind(&report.id)
                    .bind(now)
                    .bind(report.load.cpu)
                    .bind(report.load.load1)
                    .bind(report.load.mem_used)
                    .bind(report.slots_used)
                    .bind(report.vms_live)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(PRUNE_OWN)
                    .bind(&report.id)
                    .bind(keep_since)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                drain
            }};
        }
        let drain = match self {
            Db::Sqlite(s) => beat!(s.write),
            Db::Postgres(s) => beat!(s.pool),
        };
        self.events_written();
        Ok(drain)
    }

    /// Nodes, oldest first; only those in `status` if given.
    pub async fn node_list(&self, status: Option<NodeStatus>) -> DbResult<Vec<NodeInfo>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM nodes WHERE ($1 IS NULL OR status = $1) ORDER BY started_at, id"
        );
        let status = status.map(NodeStatus::as_str);
        let rows: Vec<NodeRow> = match self {
            Db::Sqlite(s) => sqlx::query_as(&sql).bind(status).fetch_all(&s.read).await?,
            Db::Postgres(s) => sqlx::query_as(&sql).bind(status).fetch_all(&s.pool).await?,
        };
        rows.into_iter().map(NodeInfo::try_from).collect()
    }

    pub async fn node_get(&self, id: &str) -> DbResult<Option<NodeInfo>> {
        if id.contains('\0') {
            return Ok(None);
        }
        let sql = format!("SELECT {COLUMNS} FROM nodes WHERE id = $1");
        let row: Option<NodeRow> = match self {
            Db::Sqlite(s) => {
                sqlx::query_as(&sql)
                    .bind(id)
                    .fetch_optional(&s.read)
                    .await?
            }
            Db::Postgres(s) => {
                sqlx::query_as(&sql)
                    .bind(id)
                    .fetch_optional(&s.pool)
                    .await?
            }
        };
        row.map(NodeInfo::try_from).transpose()
    }

    /// A node's load points since `since`, oldest first, at most
    /// [`LOAD_SERIES_MAX`] (the newest ones).
    pub async fn node_load_series(&self, id: &str, since: Millis) -> DbResult<Vec<LoadSample>> {
        if id.contains('\0') {
            return Ok(Vec::new());
        }
        let sql = "SELECT time, cpu, load1, mem_used, slots_used, vms_live FROM ( \
                   SELECT time, cpu, load1, mem_used, slots_used, vms_live FROM node_load \
                   WHERE node_id = $1 AND time >= $2 ORDER BY time DESC LIMIT $3) newest \
                   ORDER BY time";
        let rows: Vec<LoadRow> = match self {
            Db::Sqlite(s) => {
                sqlx::query_as(sql)
                    .bind(id)
                    .bind(since)
                    .bind(LOAD_SERIES_MAX)
                    .fetch_all(&s.read)
                    .await?
            }
            Db::Postgres(s) => {
                sqlx::query_as(sql)
                    .bind(id)
                    .bind(since)
                    .bind(LOAD_SERIES_MAX)
                    .fetch_all(&s.pool)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|r| LoadSample {
                time: r.time,
                cpu: r.cpu,
                load1: r.load1,
                mem_used: r.mem_used,
                slots_used: r.slots_used,
                vms_live: r.vms_live,
            })
            .collect())
    }

    /// Sets or clears a node's drain request; a lost node keeps `lost` and
    /// takes the request up when it comes back. `None` when no node has this
    /// id. Asking twice changes nothing (and writes no second event).
    pub async fn node_set_drain(&self, id: &str, drain: bool) -> DbResult<Option<NodeInfo>> {
        if id.contains('\0') {
            return Ok(None);
        }
        let sql = format!(
            "UPDATE nodes SET drain = $2, status = CASE WHEN status = 'lost' THEN 'lost' \
             WHEN $2 THEN 'draining' ELSE 'online' END WHERE id = $1 RETURNING {COLUMNS}"
        );
        let row: Option<NodeRow> = crate::audit::audited_tx!(self, |tx| {
            let row: Option<NodeRow> = sqlx::query_as(&sql)
                .bind(id)
                .bind(drain)
                .fetch_optional(&mut *tx)
                .await?;
            if row.is_some() {
                crate::audit::stamp!(&mut *tx, crate::audit::note::Change::Changed);
            }
            row
        });
        self.events_written();
        row.map(NodeInfo::try_from).transpose()
    }

    /// Marks lost every node not lost yet whose last heartbeat is older than
    /// `silent_since`; returns their ids (each has its `node.lost` event).
    pub async fn node_mark_lost(&self, silent_since: Millis, now: Millis) -> DbResult<Vec<String>> {
        let sql = "UPDATE nodes SET status = 'lost', lost_at = $2 \
                   WHERE status <> 'lost' AND last_seen < $1 RETURNING id";
        let mut ids: Vec<String> = match self {
            Db::Sqlite(s) => {
                sqlx::query_scalar(sql)
                    .bind(silent_since)
                    .bind(now)
                    .fetch_all(&s.write)
                    .await?
            }
            Db::Postgres(s) => {
                sqlx::query_scalar(sql)
                    .bind(silent_since)
                    .bind(now)
                    .fetch_all(&s.pool)
                    .await?
            }
        };
        if !ids.is_empty() {
            self.events_written();
        }
        ids.sort();
        Ok(ids)
    }

    /// A node stopping gracefully: its row and series go (`node.stopped`).
    pub async fn node_delete(&self, id: &str) -> DbResult<()> {
        macro_rules! delete {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await?;
                sqlx::query("DELETE FROM node_load WHERE node_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM nodes WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }};
        }
        match self {
            Db::Sqlite(s) => delete!(s.write),
            Db::Postgres(s) => delete!(s.pool),
        }
        self.events_written();
        Ok(())
    }

    /// Retention: deletes up to `batch` load points older than `before`,
    /// and up to `batch` nodes lost before `lost_before` with their series;
    /// returns how many rows went.
    pub async fn node_prune(
        &self,
        before: Millis,
        lost_before: Millis,
        batch: i64,
    ) -> DbResult<u64> {
        if batch <= 0 {
            return Ok(0);
        }
        let points = "DELETE FROM node_load WHERE (node_id, time) IN ( \
                      SELECT node_id, time FROM node_load WHERE time < $1 ORDER BY time LIMIT $2)";
        let forgotten_series = "DELETE FROM node_load WHERE node_id IN ( \
                      SELECT id FROM nodes WHERE status = 'lost' AND lost_at < $1 \
                      ORDER BY lost_at LIMIT $2)";
        let forgotten = "DELETE FROM nodes WHERE id IN ( \
                      SELECT id FROM nodes WHERE status = 'lost' AND lost_at < $1 \
                      ORDER BY lost_at LIMIT $2)";
        macro_rules! prune {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await?;
                let mut n = sqlx::query(points)
                    .bind(before)
                    .bind(batch)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query(forgotten_series)
                    .bind(lost_before)
                    .bind(batch)
                    .execute(&mut *tx)
                    .await?;
                n += sqlx::query(forgotten)
                    .bind(lost_before)
                    .bind(batch)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                n
            }};
        }
        Ok(match self {
            Db::Sqlite(s) => prune!(s.write),
            Db::Postgres(s) => prune!(s.pool),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_back_as_written() {
        for status in NodeStatus::ALL {
            assert_eq!(NodeStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(NodeStatus::parse("Online"), None);
        assert_eq!(NodeStatus::parse(""), None);
    }
}
