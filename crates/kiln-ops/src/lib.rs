//! The fleet. Every kiln process is a node: it heartbeats its own row
//! (roles, version, job kinds, slots, accelerator, live VMs, load from
//! `/proc`) and learns at each beat whether an operator asked it to drain.
//! Where the scheduler's loops run, a detector marks nodes silent past a
//! deadline `lost`. Each change of a node's state is an event (`node.*`),
//! written by the store's triggers in the transaction of the change, in
//! the deployment's own tenant [`DEPLOYMENT_TENANT`].
//!
//! A lost node's leases are not touched here: they expire like any other
//! (the lease timeout is longer than the node deadline), and the lease
//! rescue that runs in every worker and scheduler takes them back. The
//! node deadline says "this process is gone"; the lease says "this job may
//! run elsewhere", and only the lease is a fencing token.

pub mod dashboard;
pub mod detectors;
pub mod incidents;
pub mod probe;
pub mod rules;

use std::sync::Arc;
use std::time::Duration;

use kiln_core::Millis;
use kiln_db::nodes::{LoadSample, NodeInfo, NodeReport, NodeStatus};
use kiln_db::{Db, DbResult};
use kiln_worker::{now_millis, WorkerControl};
use tokio_util::sync::CancellationToken;

/// The tenant node events are written in: `default`, the tenant of the
/// first key (the one with the `system` scope), so the deployment's own key
/// reads them on `/api/v1/events`. Fixed in migration 0010's triggers.
pub const DEPLOYMENT_TENANT: &str = "default";

/// How long a node's load series is kept (and shown).
pub const LOAD_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Live microVMs on this node, read at each heartbeat.
pub type LiveVms = Arc<dyn Fn() -> usize + Send + Sync>;

/// What one process says of itself.
#[derive(Clone)]
pub struct NodeConfig {
    /// Unique per process: a restarted process is a new node. Workers
    /// lease under the same id, so a node's leases are its jobs.
    pub id: String,
    pub host: String,
    /// `api`, `worker`, `scheduler`.
    pub roles: Vec<String>,
    pub version: String,
    pub heartbeat_every: Duration,
    /// The worker in this process, if it runs jobs: its kinds and slots are
    /// reported, and a drain request stops its leasing.
    pub worker: Option<WorkerControl>,
    /// `kvm` or `tcg` when this node runs microVMs.
    pub accelerator: Option<String>,
    pub vms_live: Option<LiveVms>,
    /// Where load figures are read (`/proc`; another root in tests).
    pub proc_dir: std::path::PathBuf,
}

impl NodeConfig {
    pub fn new(id: &str, roles: &[&str]) -> NodeConfig {
        NodeConfig {
            id: id.to_string(),
            host: kiln_worker::hostname(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            heartbeat_every: Duration::from_secs(3),
            worker: None,
            accelerator: None,
            vms_live: None,
            proc_dir: "/proc".into(),
        }
    }
}

fn millis(duration: Duration) -> i64 {
    duration.as_millis().min(i64::MAX as u128) as i64
}

/// One heartbeat's report.
fn report(config: &NodeConfig, sampler: &mut probe::Sampler, started_at: Millis) -> NodeReport {
    let (slots_used, slots_total) = config.worker.as_ref().map_or((0, 0), |w| w.slots());
    let clamp = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    NodeReport {
        id: config.id.clone(),
        host: config.host.clone(),
        roles: config.roles.clone(),
        version: config.version.clone(),
        kinds: config
            .worker
            .as_ref()
            .map(|w| w.kinds().to_vec())
            .unwrap_or_default(),
        slots_used: clamp(slots_used),
        slots_total: clamp(slots_total),
        accelerator: config.accelerator.clone(),
        vms_live: clamp(config.vms_live.as_ref().map_or(0, |live| live())),
        load: sampler.sample(),
        started_at,
    }
}

/// Heartbeats this node every `heartbeat_every` until `stop` fires, then
/// deletes its row (`node.stopped`). Each beat hands the drain request to
/// the worker, so a drain reaches it within one beat, and a resume too.
pub async fn heartbeat_loop(db: Db, config: NodeConfig, stop: CancellationToken) {
    let started_at = now_millis();
    let mut sampler = probe::Sampler::new(&config.proc_dir);
    let mut ticker = tokio::time::interval(config.heartbeat_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        let report = report(&config, &mut sampler, started_at);
        let now = now_millis();
        match db
            .node_heartbeat(&report, now, now - millis(LOAD_WINDOW))
            .await
        {
            Ok(drain) => {
                if failing {
                    tracing::info!(node = %config.id, "node heartbeat written again");
                    failing = false;
                }
                if let Some(worker) = &config.worker {
                    worker.set_draining(drain);
                }
            }
            // A worker that cannot reach the database cannot lease either;
            // it keeps whatever drain state it last learnt.
            Err(error) if !failing => {
                tracing::warn!(node = %config.id, %error, "node heartbeat failed");
                failing = true;
            }
            Err(_) => {}
        }
    }
    if let Err(error) = db.node_delete(&config.id).await {
        tracing::debug!(node = %config.id, %error, "could not remove the node on stopping");
    }
}

/// When a node counts as lost, and what is kept.
#[derive(Clone, Debug)]
pub struct DetectorConfig {
    /// A node whose last heartbeat is older than this is lost.
    pub deadline: Duration,
    /// How often to look.
    pub every: Duration,
    /// Lost nodes are forgotten (row and series deleted) after this.
    pub forget_after: Duration,
}

impl Default for DetectorConfig {
    fn default() -> DetectorConfig {
        DetectorConfig {
            deadline: Duration::from_secs(15),
            every: Duration::from_secs(1),
            forget_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// Most rows one retention statement deletes.
const PRUNE_BATCH: i64 = 1_000;

/// One pass: marks silent nodes lost and prunes what is past keeping;
/// returns the nodes marked lost.
pub async fn detect_lost(db: &Db, config: &DetectorConfig, now: Millis) -> DbResult<Vec<String>> {
    let lost = db
        .node_mark_lost(now - millis(config.deadline), now)
        .await?;
    for id in &lost {
        tracing::warn!(node = %id, deadline_ms = millis(config.deadline), "node lost: no heartbeat");
    }
    // VMs live in their host's memory and do not move: a lost host's VMs
    // are lost, and the commands queued for them can never run.
    let vms = db.vm_hosts_sweep(now).await?;
    if vms > 0 {
        tracing::warn!(vms, "VMs lost with their hosts");
    }
    while db
        .node_prune(
            now - millis(LOAD_WINDOW),
            now - millis(config.forget_after),
            PRUNE_BATCH,
        )
        .await?
        >= PRUNE_BATCH as u64
    {}
    while db.vm_prune(now - millis(config.forget_after)).await? >= PRUNE_BATCH as u64 {}
    Ok(lost)
}

/// Runs [`detect_lost`] every `every` until `stop` fires. Several detectors
/// (several schedulers) are harmless: a node is marked lost once, by one
/// guarded update.
pub async fn detector_loop(db: Db, config: DetectorConfig, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(config.every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        if let Err(error) = detect_lost(&db, &config, now_millis()).await {
            tracing::debug!(%error, "lost-node detection failed; retrying");
        }
    }
}

/// A node and its load over [`LOAD_WINDOW`].
#[derive(Clone, Debug, PartialEq)]
pub struct NodeDetail {
    pub node: NodeInfo,
    pub load: Vec<LoadSample>,
}

/// Nodes, only those in `status` if given.
pub async fn list(db: &Db, status: Option<NodeStatus>) -> DbResult<Vec<NodeInfo>> {
    db.node_list(status).await
}

pub async fn get(db: &Db, id: &str) -> DbResult<Option<NodeDetail>> {
    let Some(node) = db.node_get(id).await? else {
        return Ok(None);
    };
    let load = db
        .node_load_series(id, now_millis() - millis(LOAD_WINDOW))
        .await?;
    Ok(Some(NodeDetail { node, load }))
}

/// Asks a node to stop leasing new jobs; its running jobs finish. The
/// node's worker learns it at its next heartbeat.
pub async fn drain(db: &Db, id: &str) -> DbResult<Option<NodeInfo>> {
    db.node_set_drain(id, true).await
}

/// Undoes [`drain`].
pub async fn resume(db: &Db, id: &str) -> DbResult<Option<NodeInfo>> {
    db.node_set_drain(id, false).await
}
