//! kiln's store. Every SQL statement lives in this crate: one module per
//! database driver (`sqlite`, `postgres`) behind the one `Db` interface, and
//! one queue test suite (`tests/queue.rs`) runs against both.

mod blobs;
mod bootstrap;
mod postgres;
mod rows;
mod sqlite;
pub mod testing;

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_core::{AttemptRecord, Job, JobResult, JobStatus, LeasedJob, Millis, NewJob, Scopes};
use tokio::sync::Notify;

/// Senders to wake when a job's attempt ends, by job id.
pub(crate) type Waiters =
    std::sync::Mutex<std::collections::HashMap<i64, Vec<tokio::sync::oneshot::Sender<()>>>>;

pub use blobs::{BlobInfo, BLOB_CHUNK_BYTES};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be read back.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database URL names no supported database.
    #[error("unsupported database url {0:?}: use sqlite://PATH or postgres://...")]
    BadUrl(String),
}

impl DbError {
    /// True when the database could not be reached, as opposed to refusing a
    /// statement: callers retry these.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            DbError::Sqlx(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)
        ) || matches!(self, DbError::Sqlx(sqlx::Error::Database(e)) if e.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
    }
}

pub type DbResult<T> = Result<T, DbError>;

/// The end of one attempt, ready to be written.
#[derive(Clone, Debug)]
pub struct Completion {
    pub id: i64,
    /// Fencing token: the write applies only while the job is still on this attempt.
    pub attempt: i32,
    pub status: JobStatus,
    /// For a retry, when to run next.
    pub run_at: Option<Millis>,
    pub result: Option<JobResult>,
    pub error: Option<String>,
    pub record: AttemptRecord,
}

#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<String>,
    pub queue: Option<String>,
    pub label: Option<(String, String)>,
    pub created_after: Option<Millis>,
    pub created_before: Option<Millis>,
    /// Return only jobs with ids below this (the previous page's last id).
    pub before_id: Option<i64>,
    pub limit: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    pub name: String,
    pub paused: bool,
    pub concurrency_limit: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub scopes: Scopes,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    pub id: String,
    pub size: i64,
    pub created_at: Millis,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
    pub kinds: Vec<String>,
    pub slots: i32,
    pub started_at: Millis,
    pub last_seen: Millis,
}

/// How a cancel request landed.
#[derive(Clone, Debug, PartialEq)]
pub enum CancelOutcome {
    NotFound,
    /// It was queued or scheduled and is now cancelled.
    Cancelled(Job),
    /// It is running; its worker will kill the sandbox.
    Requested(Job),
    /// It had already finished; nothing changed.
    AlreadyFinished(Job),
}

#[derive(Clone, Debug, PartialEq)]
pub enum RetryOutcome {
    NotFound,
    Requeued(Job),
    /// Only failed, dead or cancelled jobs can be retried.
    NotRetryable(Job),
}

/// Counts by (queue, priority) of jobs waiting to run.
pub type QueueDepths = Vec<(String, kiln_core::Priority, i64)>;

/// The store. Cloning is cheap; all clones share pools and the wake-up signal.
#[derive(Clone)]
pub enum Db {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Db::Sqlite($store) => $call,
            Db::Postgres($store) => $call,
        }
    };
}

impl Db {
    /// Opens `sqlite://PATH` (created if missing) or `postgres://...`, and
    /// applies pending migrations.
    pub async fn connect(url: &str) -> DbResult<Db> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Db::Postgres(PgStore::connect(url, None).await?))
        } else if let Some(path) = url
            .strip_prefix("sqlite://")
            .or(url.strip_prefix("sqlite:"))
        {
            Ok(Db::Sqlite(SqliteStore::open(path).await?))
        } else {
            Err(DbError::BadUrl(url.to_string()))
        }
    }

    /// PostgreSQL with every table in `schema` (created if missing), so that
    /// tests and tenants of one server stay apart.
    pub async fn connect_postgres_schema(url: &str, schema: &str) -> DbResult<Db> {
        Ok(Db::Postgres(PgStore::connect(url, Some(schema)).await?))
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Fires when jobs may have become available (an insert here, or a
    /// NOTIFY from another process on PostgreSQL).
    pub fn wakeup(&self) -> Arc<Notify> {
        dispatch!(self, s => s.wakeup.clone())
    }

    /// Resolves when this process next writes an end of an attempt of job
    /// `id` (or cancels it). Other processes' writes are not seen: callers
    /// also poll.
    pub fn watch_job(&self, id: i64) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiters = dispatch!(self, s => s.waiters.clone());
        waiters
            .lock()
            .expect("waiters")
            .entry(id)
            .or_default()
            .push(tx);
        rx
    }

    fn fire_watchers(&self, ids: &[i64]) {
        let waiters = dispatch!(self, s => s.waiters.clone());
        let mut map = waiters.lock().expect("waiters");
        if map.is_empty() {
            return;
        }
        for id in ids {
            for tx in map.remove(id).unwrap_or_default() {
                let _ = tx.send(());
            }
        }
        // Waiters that gave up leave closed senders behind.
        map.retain(|_, txs| {
            txs.retain(|tx| !tx.is_closed());
            !txs.is_empty()
        });
    }

    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }

    // ---- jobs ----

    /// Inserts a job, or returns the existing one with the same idempotency
    /// key; the flag says whether it was created.
    pub async fn job_insert(&self, job: &NewJob, now: Millis) -> DbResult<(Job, bool)> {
        let out = dispatch!(self, s => s.job_insert(job, now).await)?;
        if out.1 {
            self.wakeup().notify_waiters();
        }
        Ok(out)
    }

    /// Inserts many jobs in one statement (no idempotency keys); returns ids.
    pub async fn job_insert_many(&self, jobs: &[NewJob], now: Millis) -> DbResult<Vec<i64>> {
        let ids = dispatch!(self, s => s.job_insert_many(jobs, now).await)?;
        self.wakeup().notify_waiters();
        Ok(ids)
    }

    pub async fn job_get(&self, tenant: &str, id: i64) -> DbResult<Option<Job>> {
        dispatch!(self, s => s.job_get(Some(tenant), id).await)
    }

    /// For workers and tests: a job of any tenant.
    pub async fn job_get_any(&self, id: i64) -> DbResult<Option<Job>> {
        dispatch!(self, s => s.job_get(None, id).await)
    }

    /// Newest first.
    pub async fn job_list(&self, tenant: &str, filter: &JobFilter) -> DbResult<Vec<Job>> {
        dispatch!(self, s => s.job_list(tenant, filter).await)
    }

    pub async fn job_count_by_status(
        &self,
        tenant: Option<&str>,
    ) -> DbResult<BTreeMap<String, i64>> {
        dispatch!(self, s => s.job_count_by_status(tenant).await)
    }

    /// Attempts started across all jobs: with every job succeeded, equal to
    /// the number of jobs exactly when none ran twice.
    pub async fn job_attempts_total(&self) -> DbResult<i64> {
        dispatch!(self, s => s.job_attempts_total().await)
    }

    /// Jobs not yet finished (queued, scheduled or running), all tenants; cheap
    /// because both states have partial indexes.
    pub async fn job_count_unfinished(&self) -> DbResult<i64> {
        dispatch!(self, s => s.job_count_unfinished().await)
    }

    /// When the most recent attempt ended, across all jobs.
    pub async fn job_last_finished_at(&self) -> DbResult<Option<Millis>> {
        dispatch!(self, s => s.job_last_finished_at().await)
    }

    /// Leases up to `limit` runnable jobs of these kinds, highest priority
    /// first, honouring paused queues and queue concurrency limits.
    pub async fn job_lease(
        &self,
        worker_id: &str,
        kinds: &[String],
        limit: i64,
        lease_ms: i64,
        now: Millis,
    ) -> DbResult<Vec<LeasedJob>> {
        if limit <= 0 || kinds.is_empty() {
            return Ok(Vec::new());
        }
        let mut jobs =
            dispatch!(self, s => s.job_lease(worker_id, kinds, limit, lease_ms, now).await)?;
        jobs.sort_by_key(|j| (j.priority, j.run_at, j.id));
        Ok(jobs)
    }

    /// The earliest `run_at` among scheduled jobs of these kinds.
    pub async fn job_next_run_at(&self, kinds: &[String]) -> DbResult<Option<Millis>> {
        dispatch!(self, s => s.job_next_run_at(kinds).await)
    }

    /// Extends the leases this worker still holds; returns, for each job still
    /// held, whether cancellation was requested. Jobs absent from the answer
    /// are no longer this worker's.
    pub async fn job_heartbeat(
        &self,
        worker_id: &str,
        held: &[(i64, i32)],
        lease_until: Millis,
    ) -> DbResult<Vec<(i64, bool)>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        dispatch!(self, s => s.job_heartbeat(worker_id, held, lease_until).await)
    }

    /// Writes many attempt ends in one transaction. Returns the ids whose
    /// write applied; the others had lost their lease (fenced off).
    pub async fn job_complete_many(&self, done: &[Completion]) -> DbResult<Vec<i64>> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let applied = dispatch!(self, s => s.job_complete_many(done).await)?;
        self.fire_watchers(&applied);
        if done.iter().any(|c| c.status == JobStatus::Scheduled) {
            self.wakeup().notify_waiters();
        }
        Ok(applied)
    }

    pub async fn job_cancel(&self, tenant: &str, id: i64, now: Millis) -> DbResult<CancelOutcome> {
        let out = dispatch!(self, s => s.job_cancel(tenant, id, now).await)?;
        if let CancelOutcome::Cancelled(job) = &out {
            self.fire_watchers(&[job.id]);
        }
        Ok(out)
    }

    pub async fn job_retry(&self, tenant: &str, id: i64, now: Millis) -> DbResult<RetryOutcome> {
        let out = dispatch!(self, s => s.job_retry(tenant, id, now).await)?;
        if matches!(out, RetryOutcome::Requeued(_)) {
            self.wakeup().notify_waiters();
        }
        Ok(out)
    }

    /// Takes back jobs whose lease expired (their worker died or stalled):
    /// they run again while attempts remain, else they are dead. Returns how
    /// many were rescued.
    pub async fn job_rescue_expired(&self, now: Millis) -> DbResult<u64> {
        let n = dispatch!(self, s => s.job_rescue_expired(now).await)?;
        if n > 0 {
            self.wakeup().notify_waiters();
        }
        Ok(n)
    }

    /// Hands back leases a stopping worker will not finish, without using up
    /// an attempt.
    pub async fn job_release(
        &self,
        worker_id: &str,
        held: &[(i64, i32)],
        now: Millis,
    ) -> DbResult<u64> {
        if held.is_empty() {
            return Ok(0);
        }
        let n = dispatch!(self, s => s.job_release(worker_id, held, now).await)?;
        self.wakeup().notify_waiters();
        Ok(n)
    }

    // ---- queues ----

    pub async fn queue_list(&self) -> DbResult<Vec<QueueInfo>> {
        dispatch!(self, s => s.queue_list().await)
    }

    pub async fn queue_upsert(&self, queue: &QueueInfo, now: Millis) -> DbResult<QueueInfo> {
        let out = dispatch!(self, s => s.queue_upsert(queue, now).await)?;
        self.wakeup().notify_waiters();
        Ok(out)
    }

    /// Jobs waiting to run, by queue and priority (all tenants, or one).
    pub async fn queue_depths(&self, tenant: Option<&str>) -> DbResult<QueueDepths> {
        dispatch!(self, s => s.queue_depths(tenant).await)
    }

    /// Running jobs per queue.
    pub async fn queue_running(&self, tenant: Option<&str>) -> DbResult<Vec<(String, i64)>> {
        dispatch!(self, s => s.queue_running(tenant).await)
    }

    // ---- API keys ----

    pub async fn key_insert(&self, key: &ApiKey, hash: &str) -> DbResult<()> {
        dispatch!(self, s => s.key_insert(key, hash).await)
    }

    /// The live (not revoked) key with this hash.
    pub async fn key_find_by_hash(&self, hash: &str) -> DbResult<Option<ApiKey>> {
        dispatch!(self, s => s.key_find_by_hash(hash).await)
    }

    pub async fn key_list(&self, tenant: Option<&str>) -> DbResult<Vec<ApiKey>> {
        dispatch!(self, s => s.key_list(tenant).await)
    }

    /// Returns false when no live key had this id (in this tenant, if given).
    pub async fn key_revoke(&self, tenant: Option<&str>, id: &str, now: Millis) -> DbResult<bool> {
        dispatch!(self, s => s.key_revoke(tenant, id, now).await)
    }

    pub async fn key_count(&self) -> DbResult<i64> {
        dispatch!(self, s => s.key_count().await)
    }

    // ---- modules ----

    /// Records that a tenant holds a module; returns false if it already did.
    pub async fn module_insert(&self, tenant: &str, module: &ModuleInfo) -> DbResult<bool> {
        dispatch!(self, s => s.module_insert(tenant, module).await)
    }

    pub async fn module_get(&self, tenant: &str, id: &str) -> DbResult<Option<ModuleInfo>> {
        dispatch!(self, s => s.module_get(tenant, id).await)
    }

    pub async fn module_list(&self, tenant: &str) -> DbResult<Vec<ModuleInfo>> {
        dispatch!(self, s => s.module_list(tenant).await)
    }

    pub async fn module_delete(&self, tenant: &str, id: &str) -> DbResult<bool> {
        dispatch!(self, s => s.module_delete(tenant, id).await)
    }

    // ---- workers ----

    pub async fn worker_upsert(&self, worker: &WorkerInfo) -> DbResult<()> {
        dispatch!(self, s => s.worker_upsert(worker).await)
    }

    pub async fn worker_list(&self) -> DbResult<Vec<WorkerInfo>> {
        dispatch!(self, s => s.worker_list().await)
    }

    pub async fn worker_delete(&self, id: &str) -> DbResult<()> {
        dispatch!(self, s => s.worker_delete(id).await)
    }
}

/// SHA-256 of an API key's secret, hex: keys are long random strings, so a
/// fast hash is enough and lets a key be found by its hash.
pub fn hash_key(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// A new random key: `kiln_<id>_<secret>`; returns (id, full key).
pub fn generate_key() -> (String, String) {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    let mut pick = |n: usize| -> String {
        (0..n)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect()
    };
    let id = pick(10);
    let secret = pick(40);
    let full = format!("kiln_{id}_{secret}");
    (id, full)
}

impl Db {
    /// How many modules a tenant holds and the sum of their sizes, for the
    /// module quotas.
    pub async fn module_usage(&self, tenant: &str) -> DbResult<(u64, u64)> {
        dispatch!(self, s => s.module_usage(tenant).await)
    }

    /// How many tenants hold a module: its stored bytes may go at 0.
    pub async fn module_holders(&self, id: &str) -> DbResult<u64> {
        dispatch!(self, s => s.module_holders(id).await)
    }
}
