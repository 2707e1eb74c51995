//! kiln's store. Every SQL statement lives in this crate: one module per
//! database driver (`sqlite`, `postgres`) behind the one `Db` interface, and
//! one queue test suite (`tests/queue.rs`) runs against both.

pub mod addresses;
pub mod audit;
mod blobs;
mod bootstrap;
pub mod dashboard;
pub mod events;
pub mod executions;
pub mod flow;
pub mod incidents;
mod lease;
pub mod logs;
pub mod nodes;
pub mod policies;
mod postgres;
pub mod replies;
mod rows;
pub mod rules;
pub mod secrets;
mod sqlite;
pub mod subscriptions;
#[cfg(feature = "testing")]
pub mod testing;
pub mod users;
pub mod vms;
pub mod webhooks;

use std::collections::BTreeMap;
use std::sync::{Arc, MutexGuard, PoisonError};

use kiln_core::{AttemptRecord, Job, JobResult, JobStatus, LeasedJob, Millis, NewJob, Scopes};
use tokio::sync::Notify;

/// Senders to wake when a job's attempt ends, by job id.
pub(crate) type Waiters =
    std::sync::Mutex<std::collections::HashMap<i64, Vec<tokio::sync::oneshot::Sender<()>>>>;

/// The waiters map, even after a panic elsewhere poisoned its lock: it holds
/// only senders, which stay valid whatever the panicking thread did.
fn lock_waiters(
    waiters: &Waiters,
) -> MutexGuard<'_, std::collections::HashMap<i64, Vec<tokio::sync::oneshot::Sender<()>>>> {
    waiters.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Past this many watched jobs, every new watch first drops the senders
/// whose receivers are gone, so waiters that gave up (on a node where no
/// completer fires them) cannot pile up.
const WATCHED_JOBS_PRUNE: usize = 256;

pub use blobs::{BlobInfo, BLOB_CHUNK_BYTES};
pub use lease::LeaseRequest;
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
    /// A value the store refuses before sending it (text with a NUL, which
    /// PostgreSQL cannot hold): the caller's input is at fault, not the
    /// database.
    #[error("{0}")]
    Invalid(String),
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

/// Refuses text PostgreSQL cannot store, on both databases alike.
fn storable(what: &str, text: &str) -> DbResult<()> {
    if text.contains('\0') {
        return Err(DbError::Invalid(format!("{what} contains a NUL character")));
    }
    Ok(())
}

fn storable_job(job: &NewJob) -> DbResult<()> {
    storable("tenant", &job.tenant)?;
    storable("kind", &job.kind)?;
    storable("queue", &job.queue)?;
    for (key, value) in &job.labels {
        storable("label key", key)?;
        storable("label value", value)?;
    }
    if let Some(key) = &job.idempotency_key {
        storable("idempotency_key", key)?;
    }
    if kiln_core::names::json_has_nul(&job.spec) {
        return Err(DbError::Invalid("spec contains a NUL character".into()));
    }
    Ok(())
}

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

impl Completion {
    /// The same attempt ended `failed` for a reason of the store's own: what
    /// is written when the attempt's real end is refused.
    fn quarantined(&self, error: &DbError) -> Completion {
        let message = kiln_core::names::sanitise_message(
            &format!("the result could not be stored: {error}"),
            lease::ERROR_MAX,
        );
        Completion {
            id: self.id,
            attempt: self.attempt,
            status: JobStatus::Failed,
            run_at: None,
            result: None,
            error: Some(message.clone()),
            record: AttemptRecord {
                outcome: "failed".into(),
                exit_code: None,
                error: Some(message),
                ..self.record.clone()
            },
        }
    }
}

/// What [`Db::job_complete_many`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completed {
    /// Written as given.
    pub applied: Vec<i64>,
    /// Refused by the database and written as a failed attempt instead.
    pub quarantined: Vec<i64>,
}

impl Completed {
    /// Whether the attempt of this job is now on record, either way.
    pub fn recorded(&self, id: i64) -> bool {
        self.applied.contains(&id) || self.quarantined.contains(&id)
    }
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

/// A tenant's settings for one of its queues. A queue is a name inside a
/// tenant: its pause and limit apply to that tenant's jobs only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    pub tenant: String,
    pub name: String,
    pub paused: bool,
    pub concurrency_limit: Option<i32>,
}

impl QueueInfo {
    /// A queue with default settings (running, no limit).
    pub fn open(tenant: &str, name: &str) -> QueueInfo {
        QueueInfo {
            tenant: tenant.to_string(),
            name: name.to_string(),
            paused: false,
            concurrency_limit: None,
        }
    }

    /// Whether the queue's jobs are kept out of the main lease path.
    pub fn is_held(&self) -> bool {
        self.paused || self.concurrency_limit.is_some()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub scopes: Scopes,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
    /// After this the key answers 401 `expired`; none: it never expires.
    pub expires_at: Option<Millis>,
    /// Recorded at most about once a minute per key and process.
    pub last_used_at: Option<Millis>,
}

impl ApiKey {
    pub fn expired(&self, now: Millis) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
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

/// Runs `$body` with `$pool` bound to the pool a statement goes to:
/// SQLite's reader or writer, PostgreSQL's one pool. Modules that write
/// their SQL once use it, with `$N` placeholders, which sqlx binds by
/// number on SQLite too; the body is compiled once per driver.
macro_rules! with_pool {
    ($db:expr, $mode:ident, |$pool:ident| $body:expr) => {
        match $db {
            $crate::Db::Sqlite(store) => {
                let $pool = $crate::with_pool!(@sqlite store, $mode);
                $body
            }
            $crate::Db::Postgres(store) => {
                let $pool = &store.pool;
                $body
            }
        }
    };
    (@sqlite $store:ident, read) => {
        &$store.read
    };
    (@sqlite $store:ident, write) => {
        &$store.write
    };
}
pub(crate) use with_pool;

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Db::Sqlite($store) => $call,
            Db::Postgres($store) => $call,
        }
    };
}

impl Db {
    /// Whether the pools are closed (the store was shut down).
    pub fn is_closed(&self) -> bool {
        match self {
            Db::Sqlite(s) => s.write.is_closed(),
            Db::Postgres(s) => s.pool.is_closed(),
        }
    }
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
    /// tests and benchmarks sharing one server stay apart.
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
        let mut map = lock_waiters(&waiters);
        if map.len() >= WATCHED_JOBS_PRUNE {
            map.retain(|_, txs| {
                txs.retain(|tx| !tx.is_closed());
                !txs.is_empty()
            });
        }
        let senders = map.entry(id).or_default();
        // A caller that polls adds a sender per round; the ones it gave up
        // on go now.
        senders.retain(|tx| !tx.is_closed());
        senders.push(tx);
        rx
    }

    /// Jobs being watched, for tests of the pruning.
    pub fn watched_jobs(&self) -> usize {
        let waiters = dispatch!(self, s => s.waiters.clone());
        let map = lock_waiters(&waiters);
        map.values().map(|txs| txs.len()).sum()
    }

    fn fire_watchers(&self, ids: &[i64]) {
        let waiters = dispatch!(self, s => s.waiters.clone());
        let mut map = lock_waiters(&waiters);
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
        self.job_insert_audited(job, now, None).await
    }

    /// [`Db::job_insert`] that also writes `audit` in the same transaction
    /// when the job is new (its `resource` becomes the job's path); a job
    /// its idempotency key already named writes nothing.
    pub async fn job_insert_audited(
        &self,
        job: &NewJob,
        now: Millis,
        audit: Option<&kiln_core::audit::AuditRecord>,
    ) -> DbResult<(Job, bool)> {
        storable_job(job)?;
        let out = dispatch!(self, s => s.job_insert(job, now, audit).await)?;
        if out.1 {
            self.wakeup().notify_waiters();
            self.events_written();
        }
        Ok(out)
    }

    /// Inserts many jobs in one statement (no idempotency keys); returns ids.
    pub async fn job_insert_many(&self, jobs: &[NewJob], now: Millis) -> DbResult<Vec<i64>> {
        jobs.iter().try_for_each(storable_job)?;
        let ids = dispatch!(self, s => s.job_insert_many(jobs, now).await)?;
        self.wakeup().notify_waiters();
        self.events_written();
        Ok(ids)
    }

    pub async fn job_get(&self, tenant: &str, id: i64) -> DbResult<Option<Job>> {
        dispatch!(self, s => s.job_get(Some(tenant), id).await)
    }

    /// Newest first. A filter no stored job can match (text with a NUL, a
    /// label key outside the name grammar) matches nothing.
    pub async fn job_list(&self, tenant: &str, filter: &JobFilter) -> DbResult<Vec<Job>> {
        let texts = [filter.kind.as_deref(), filter.queue.as_deref()];
        let unmatchable = texts.iter().flatten().any(|t| t.contains('\0'))
            || filter.label.as_ref().is_some_and(|(key, value)| {
                kiln_core::names::check_name("label key", key).is_err() || value.contains('\0')
            });
        if unmatchable || tenant.contains('\0') {
            return Ok(Vec::new());
        }
        dispatch!(self, s => s.job_list(tenant, filter).await)
    }

    pub async fn job_count_by_status(
        &self,
        tenant: Option<&str>,
    ) -> DbResult<BTreeMap<String, i64>> {
        dispatch!(self, s => s.job_count_by_status(tenant).await)
    }

    /// Running jobs per tenant as the database keeps them (triggers on
    /// `jobs`); tenants with none are left out. The lease's quota reads it.
    pub async fn tenant_running(&self) -> DbResult<BTreeMap<String, i64>> {
        dispatch!(self, s => s.tenant_running().await)
    }

    /// Attempts started across all jobs: with every job succeeded, equal to
    /// the number of jobs exactly when none ran twice. It reads every job
    /// kept (as does `job_count_by_status(None)`): for benchmarks and tests;
    /// retention bounds what it reads.
    pub async fn job_attempts_total(&self) -> DbResult<i64> {
        dispatch!(self, s => s.job_attempts_total().await)
    }

    /// Jobs not yet finished (queued, scheduled or running), all tenants; cheap
    /// because both states have partial indexes.
    pub async fn job_count_unfinished(&self) -> DbResult<i64> {
        dispatch!(self, s => s.job_count_unfinished().await)
    }

    /// When the most recent job finished (one probe of the `jobs_finished`
    /// index).
    pub async fn job_last_finished_at(&self) -> DbResult<Option<Millis>> {
        dispatch!(self, s => s.job_last_finished_at().await)
    }

    /// Deletes up to `batch` jobs that finished before `before`, oldest
    /// first; returns how many. Callers loop until it returns less than
    /// `batch`, so no statement holds many rows at once.
    pub async fn job_delete_finished(&self, before: Millis, batch: i64) -> DbResult<u64> {
        if batch <= 0 {
            return Ok(0);
        }
        dispatch!(self, s => s.job_delete_finished(before, batch).await)
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
        self.job_lease_with(&LeaseRequest {
            worker_id,
            kinds,
            limit,
            lease_ms,
            now,
            tenant_running_max: None,
        })
        .await
    }

    /// [`Db::job_lease`] with every option, the tenant quota among them.
    /// All of it happens in one transaction: on an error nothing is leased.
    pub async fn job_lease_with(&self, request: &LeaseRequest<'_>) -> DbResult<Vec<LeasedJob>> {
        if request.limit <= 0 || request.kinds.is_empty() {
            return Ok(Vec::new());
        }
        let mut jobs = dispatch!(self, s => s.job_lease(request).await)?;
        if !jobs.is_empty() {
            self.events_written();
        }
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
        let held = in_id_order(held);
        dispatch!(self, s => s.job_heartbeat(worker_id, &held, lease_until).await)
    }

    /// Writes many attempt ends in one transaction; the ids written, and
    /// those whose lease had moved on (fenced off), come back.
    ///
    /// Only an unavailable database is an error here, and then nothing was
    /// written that a retry of the same batch would not refuse as stale.
    /// A batch the database refuses for any other reason is written row by
    /// row, and a row refused on its own is quarantined: its attempt ends
    /// `failed` with the database's (sanitised) reason, so one bad result
    /// never blocks the others. Error texts are made storable (NUL and
    /// control characters replaced, length bounded) on the way in.
    pub async fn job_complete_many(&self, done: &[Completion]) -> DbResult<Completed> {
        if done.is_empty() {
            return Ok(Completed::default());
        }
        let sorted;
        let done = if done.windows(2).all(|w| w[0].id <= w[1].id) {
            done
        } else {
            let mut copy = done.to_vec();
            copy.sort_by_key(|c| c.id);
            sorted = copy;
            &sorted
        };
        let completed = match dispatch!(self, s => s.job_complete_many(done).await) {
            Ok(applied) => Completed {
                applied,
                quarantined: Vec::new(),
            },
            Err(error) if error.is_unavailable() => return Err(error),
            Err(error) => {
                tracing::warn!(%error, n = done.len(), "a batch of results was refused; writing them one by one");
                self.complete_one_by_one(done).await?
            }
        };
        self.fire_watchers(&completed.applied);
        self.fire_watchers(&completed.quarantined);
        // A step job may have ended: the advancer looks at the outbox.
        self.flow_wakeup().notify_waiters();
        self.events_written();
        if done.iter().any(|c| c.status == JobStatus::Scheduled) {
            self.wakeup().notify_waiters();
        }
        Ok(completed)
    }

    async fn complete_one_by_one(&self, done: &[Completion]) -> DbResult<Completed> {
        let mut completed = Completed::default();
        for completion in done {
            let one = std::slice::from_ref(completion);
            match dispatch!(self, s => s.job_complete_many(one).await) {
                Ok(applied) => completed.applied.extend(applied),
                Err(error) if error.is_unavailable() => return Err(error),
                Err(error) => {
                    tracing::error!(id = completion.id, %error, "a result was refused; the attempt ends failed");
                    let quarantine = completion.quarantined(&error);
                    let one = std::slice::from_ref(&quarantine);
                    match dispatch!(self, s => s.job_complete_many(one).await) {
                        Ok(applied) => completed.quarantined.extend(applied),
                        Err(error) if error.is_unavailable() => return Err(error),
                        Err(error) => {
                            tracing::error!(id = completion.id, %error, "even the failure could not be written; the lease will expire")
                        }
                    }
                }
            }
        }
        Ok(completed)
    }

    pub async fn job_cancel(&self, tenant: &str, id: i64, now: Millis) -> DbResult<CancelOutcome> {
        let out = dispatch!(self, s => s.job_cancel(tenant, id, now).await)?;
        if let CancelOutcome::Cancelled(job) = &out {
            self.fire_watchers(&[job.id]);
            self.flow_wakeup().notify_waiters();
            self.events_written();
        }
        Ok(out)
    }

    pub async fn job_retry(&self, tenant: &str, id: i64, now: Millis) -> DbResult<RetryOutcome> {
        let out = dispatch!(self, s => s.job_retry(tenant, id, now).await)?;
        if matches!(out, RetryOutcome::Requeued(_)) {
            self.wakeup().notify_waiters();
            self.events_written();
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
            self.flow_wakeup().notify_waiters();
            self.events_written();
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
        let held = in_id_order(held);
        let n = dispatch!(self, s => s.job_release(worker_id, &held, now).await)?;
        self.wakeup().notify_waiters();
        self.events_written();
        Ok(n)
    }

    // ---- queues ----

    /// One tenant's queues with settings of their own, or every tenant's.
    pub async fn queue_list(&self, tenant: Option<&str>) -> DbResult<Vec<QueueInfo>> {
        if tenant.is_some_and(|t| t.contains('\0')) {
            return Ok(Vec::new());
        }
        dispatch!(self, s => s.queue_list(tenant).await)
    }

    /// A tenant's settings for one queue; the defaults when it has none.
    pub async fn queue_get(&self, tenant: &str, name: &str) -> DbResult<QueueInfo> {
        Ok(self
            .queue_list(Some(tenant))
            .await?
            .into_iter()
            .find(|q| q.name == name)
            .unwrap_or_else(|| QueueInfo::open(tenant, name)))
    }

    /// Sets a tenant's queue settings; pausing or limiting moves the
    /// queue's jobs off the main lease path, so it touches each of them once.
    pub async fn queue_upsert(&self, queue: &QueueInfo, now: Millis) -> DbResult<QueueInfo> {
        storable("tenant", &queue.tenant)?;
        storable("queue", &queue.name)?;
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
        storable("key name", &key.name)?;
        storable("tenant", &key.tenant)?;
        storable("key id", &key.id)?;
        dispatch!(self, s => s.key_insert(key, hash).await)?;
        self.events_written();
        Ok(())
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
        let revoked = dispatch!(self, s => s.key_revoke(tenant, id, now).await)?;
        if revoked {
            self.events_written();
        }
        Ok(revoked)
    }

    pub async fn key_count(&self) -> DbResult<i64> {
        dispatch!(self, s => s.key_count().await)
    }

    /// Records that these keys were used at `now`.
    pub async fn key_touch(&self, ids: &[String], now: Millis) -> DbResult<()> {
        for id in ids {
            with_pool!(self, write, |pool| sqlx::query(
                "UPDATE api_keys SET last_used_at = $1 WHERE id = $2"
            )
            .bind(now)
            .bind(id)
            .execute(pool)
            .await
            .map(drop)?);
        }
        Ok(())
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

    /// Forgets workers not seen since `before` (they died without a
    /// graceful stop); returns how many.
    pub async fn worker_delete_stale(&self, before: Millis) -> DbResult<u64> {
        dispatch!(self, s => s.worker_delete_stale(before).await)
    }
}

/// Batched writers touch rows in id order, so two batches over the same
/// rows wait for each other instead of deadlocking.
fn in_id_order(held: &[(i64, i32)]) -> Vec<(i64, i32)> {
    let mut held = held.to_vec();
    held.sort_unstable();
    held
}

/// Removes a PostgreSQL schema made by [`Db::connect_postgres_schema`], with
/// everything in it (benchmarks and tests clean up with it).
pub async fn drop_postgres_schema(url: &str, schema: &str) -> Result<(), DbError> {
    use sqlx::Connection;
    kiln_core::names::check_name("schema", schema).map_err(|e| DbError::Invalid(e.to_string()))?;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
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
