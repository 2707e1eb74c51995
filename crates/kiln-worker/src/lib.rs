//! The worker runtime: leases jobs in batches, runs each through the handler
//! registered for its kind, enforces timeouts and cancellation, heartbeats
//! its leases and writes results in batches.
//!
//! Sandbox crates plug in by implementing [`JobHandler`]; the queue never
//! learns about them.

pub mod flow;
mod gc;
pub mod noop;
pub mod secrets;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kiln_core::{decide_outcome, AttemptEnd, AttemptRecord, JobStatus, LeasedJob, Millis};
use kiln_db::{Completion, Db, LeaseRequest, WorkerInfo};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use gc::{collect_garbage, gc_loop, Collected, Retention};
pub use noop::NoopHandler;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Runs one attempt of one kind of job inside its sandbox.
#[async_trait::async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Runs the attempt. When `kill` fires (timeout, cancel, shutdown) the
    /// handler must tear its sandbox down and return promptly; whatever it
    /// returns then is kept as the partial result.
    async fn run(&self, job: &LeasedJob, kill: CancellationToken) -> AttemptEnd;
}

/// Handlers by job kind.
#[derive(Clone, Default)]
pub struct Handlers(HashMap<String, Arc<dyn JobHandler>>);

impl Handlers {
    pub fn new() -> Handlers {
        Handlers::default()
    }

    pub fn with(mut self, kind: &str, handler: Arc<dyn JobHandler>) -> Handlers {
        self.0.insert(kind.to_string(), handler);
        self
    }

    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.0.keys().cloned().collect();
        kinds.sort();
        kinds
    }

    fn get(&self, kind: &str) -> Option<Arc<dyn JobHandler>> {
        self.0.get(kind).cloned()
    }
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub id: String,
    pub host: String,
    /// Jobs run at once.
    pub slots: usize,
    /// Visibility timeout: a lease not extended for this long is taken back.
    pub lease: Duration,
    pub heartbeat_every: Duration,
    /// How often to look for work when no wake-up arrives.
    pub poll_every: Duration,
    /// Most jobs leased, or results written, in one statement.
    pub batch_max: usize,
    /// Whether this worker also takes back expired leases of dead workers.
    pub rescue_every: Option<Duration>,
    /// On shutdown, how long running jobs may take before they are handed back.
    pub shutdown_grace: Duration,
    /// Most jobs of one tenant running at once across the deployment
    /// (`TenantQuotas::jobs_running_max`); `None` for no quota.
    pub tenant_running_max: Option<u32>,
    /// The job kinds (with their spec checks) pipeline steps are made
    /// with. When set, a step job's end advances its run in the
    /// transaction that records it, and a next step nothing waits ahead of
    /// runs on this worker at once; when not, the advancer does both.
    pub pipelines: Option<kiln_core::JobKinds>,
}

impl WorkerConfig {
    pub fn new(id: &str) -> WorkerConfig {
        WorkerConfig {
            id: id.to_string(),
            host: hostname(),
            slots: 64,
            lease: Duration::from_secs(30),
            heartbeat_every: Duration::from_millis(500),
            poll_every: Duration::from_secs(1),
            batch_max: 1_000,
            rescue_every: Some(Duration::from_secs(1)),
            shutdown_grace: Duration::from_secs(10),
            tenant_running_max: Some(kiln_core::TenantQuotas::default().jobs_running_max),
            pipelines: None,
        }
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

/// A lease this worker holds, from the lease until its attempt's end is on
/// record (or handed back): the heartbeat extends exactly these.
struct Running {
    attempt: i32,
    /// A step of a pipeline run: its end advances the run.
    step: bool,
    /// Fired by an API cancel request.
    cancel: CancellationToken,
    /// Fired when the heartbeat finds the lease taken back: the attempt's
    /// end would be refused, so it is not written at all.
    lost: CancellationToken,
}

#[derive(Clone, Default)]
struct RunningMap(Arc<Mutex<HashMap<i64, Running>>>);

impl RunningMap {
    /// The map even after a panic elsewhere poisoned its lock: every change
    /// to it is a single insert or remove, so it is never half-updated.
    fn lock(&self) -> MutexGuard<'_, HashMap<i64, Running>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, job: &LeasedJob) -> (CancellationToken, CancellationToken) {
        let cancel = CancellationToken::new();
        let lost = CancellationToken::new();
        self.lock().insert(
            job.id,
            Running {
                attempt: job.attempt,
                step: job.run_id.is_some(),
                cancel: cancel.clone(),
                lost: lost.clone(),
            },
        );
        (cancel, lost)
    }

    /// Forgets a lease, unless the entry is already for a later attempt.
    fn forget(&self, id: i64, attempt: i32) {
        let mut map = self.lock();
        if map.get(&id).is_some_and(|r| r.attempt == attempt) {
            map.remove(&id);
        }
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn is_step(&self, id: i64) -> bool {
        self.lock().get(&id).is_some_and(|r| r.step)
    }

    fn held(&self) -> Vec<(i64, i32)> {
        let mut held: Vec<(i64, i32)> =
            self.lock().iter().map(|(id, r)| (*id, r.attempt)).collect();
        held.sort_unstable();
        held
    }
}

pub struct Worker {
    db: Db,
    handlers: Handlers,
    config: WorkerConfig,
    control: WorkerControl,
}

/// What the node a worker runs on shares with it: the slots in use, and
/// the operator's drain request (no new leases; running jobs finish).
#[derive(Clone)]
pub struct WorkerControl(Arc<ControlInner>);

struct ControlInner {
    kinds: Vec<String>,
    slots_total: usize,
    /// Set once the worker runs.
    slots: std::sync::OnceLock<Arc<Semaphore>>,
    draining: watch::Sender<bool>,
}

impl WorkerControl {
    fn new(kinds: Vec<String>, slots_total: usize) -> WorkerControl {
        WorkerControl(Arc::new(ControlInner {
            kinds,
            slots_total,
            slots: std::sync::OnceLock::new(),
            draining: watch::Sender::new(false),
        }))
    }

    /// The kinds the worker has handlers for.
    pub fn kinds(&self) -> &[String] {
        &self.0.kinds
    }

    /// Jobs running now and the most that may run at once.
    pub fn slots(&self) -> (usize, usize) {
        let total = self.0.slots_total;
        let free = self
            .0
            .slots
            .get()
            .map_or(total, |slots| slots.available_permits());
        (total.saturating_sub(free), total)
    }

    /// Stops (`true`) or restarts (`false`) leasing; jobs already leased
    /// run to their end either way.
    pub fn set_draining(&self, draining: bool) {
        self.0.draining.send_if_modified(|now| {
            let changed = *now != draining;
            *now = draining;
            changed
        });
    }

    pub fn is_draining(&self) -> bool {
        *self.0.draining.borrow()
    }
}

/// What the lease loop shares with the tasks it starts.
struct Shared {
    db: Db,
    handlers: Handlers,
    config: WorkerConfig,
    kinds: Vec<String>,
    slots: Arc<Semaphore>,
    running: RunningMap,
    done: mpsc::UnboundedSender<Completion>,
    release: mpsc::UnboundedSender<(i64, i32)>,
    hard_stop: CancellationToken,
    /// The last lease came back short while ready jobs were waiting (held
    /// back by a quota or a queue's limit): ends should wake the lease loop.
    blocked: Arc<AtomicBool>,
}

/// The background tasks of a running worker.
struct Background {
    stop: CancellationToken,
    completer: tokio::task::JoinHandle<()>,
    heartbeat: tokio::task::JoinHandle<()>,
    rescuer: Option<tokio::task::JoinHandle<()>>,
}

/// How one round of leasing went.
enum Round {
    /// Every free slot was filled: lease again at once.
    Full,
    /// Fewer jobs than slots: wait for a wake-up or this long.
    Idle(Duration),
    /// Shutdown was asked for.
    Stop,
}

impl Worker {
    pub fn new(db: Db, handlers: Handlers, config: WorkerConfig) -> Worker {
        let control = WorkerControl::new(handlers.kinds(), config.slots);
        Worker {
            db,
            handlers,
            config,
            control,
        }
    }

    /// The handle its node drains it and reads its slots through.
    pub fn control(&self) -> WorkerControl {
        self.control.clone()
    }

    /// Runs until `shutdown` fires, then lets running jobs finish within the
    /// grace period and hands the rest back to the queue.
    pub async fn run(self, shutdown: CancellationToken) {
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Completion>();
        let (release_tx, release_rx) = mpsc::unbounded_channel::<(i64, i32)>();
        let (handoff_tx, mut handoff_rx) = mpsc::unbounded_channel::<Handoff>();
        let slots = Arc::new(Semaphore::new(self.config.slots));
        let _ = self.control.0.slots.set(slots.clone());
        let mut draining = self.control.0.draining.subscribe();
        let shared = Shared {
            kinds: self.handlers.kinds(),
            slots,
            running: RunningMap::default(),
            done: done_tx,
            release: release_tx,
            hard_stop: CancellationToken::new(),
            blocked: Arc::default(),
            db: self.db,
            handlers: self.handlers,
            config: self.config,
        };
        let background = register(&shared, done_rx, handoff_tx).await;
        let mut tasks = JoinSet::new();
        let wakeup = shared.db.wakeup();
        let mut failures = 0u32;
        let mut got_full_batch = false;
        while !shutdown.is_cancelled() {
            if *draining.borrow_and_update() {
                tracing::info!(worker = %shared.config.id, "draining: leasing nothing new");
                tokio::select! {
                    _ = draining.wait_for(|draining| !*draining) => {}
                    _ = shutdown.cancelled() => break,
                }
                tracing::info!(worker = %shared.config.id, "resumed: leasing again");
            }
            let notified = wakeup.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            reap(&mut tasks);
            while let Ok(handed) = handoff_rx.try_recv() {
                start_with(&shared, &mut tasks, handed.job, handed.permit);
            }
            let round = lease_round(
                &shared,
                &mut tasks,
                &mut handoff_rx,
                &shutdown,
                &mut failures,
                &mut got_full_batch,
            )
            .await;
            match round {
                Round::Full => continue,
                Round::Stop => break,
                Round::Idle(idle_for) => {
                    // A step handed over by the completer starts without a
                    // lease round: it says nothing about other jobs, and a
                    // chain of steps would otherwise cost a lease that
                    // finds nothing per step.
                    let sleep = tokio::time::sleep(idle_for);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut notified => {}
                            Some(handed) = handoff_rx.recv() => {
                                start_with(&shared, &mut tasks, handed.job, handed.permit);
                                reap(&mut tasks);
                                continue;
                            }
                            _ = &mut sleep => {}
                            _ = draining.changed() => {}
                            _ = shutdown.cancelled() => {}
                        }
                        break;
                    }
                }
            }
        }
        drain(shared, tasks, release_rx, handoff_rx, background).await;
    }
}

/// A next step leased by the completer for this worker, with the slot it
/// runs in.
struct Handoff {
    job: LeasedJob,
    permit: OwnedSemaphorePermit,
}

/// What the completer needs to advance runs and take their next steps.
struct Continuation {
    kinds: kiln_core::JobKinds,
    worker_id: String,
    handled: Vec<String>,
    lease_ms: i64,
    slots: Arc<Semaphore>,
    handoff: mpsc::UnboundedSender<Handoff>,
}

/// Records the worker and starts its completer, heartbeat and rescuer.
async fn register(
    shared: &Shared,
    done_rx: mpsc::UnboundedReceiver<Completion>,
    handoff: mpsc::UnboundedSender<Handoff>,
) -> Background {
    let config = &shared.config;
    let started_at = now_millis();
    let info = WorkerInfo {
        id: config.id.clone(),
        host: config.host.clone(),
        kinds: shared.kinds.clone(),
        slots: config.slots as i32,
        started_at,
        last_seen: started_at,
    };
    if let Err(error) = shared.db.worker_upsert(&info).await {
        tracing::warn!(%error, "could not register worker");
    }
    tracing::info!(worker = %config.id, kinds = ?shared.kinds, slots = config.slots, "worker started");
    let stop = CancellationToken::new();
    Background {
        completer: tokio::spawn(complete_loop(
            shared.db.clone(),
            done_rx,
            config.batch_max,
            shared.running.clone(),
            shared.blocked.clone(),
            config.pipelines.clone().map(|kinds| Continuation {
                kinds,
                worker_id: config.id.clone(),
                handled: shared.kinds.clone(),
                lease_ms: config.lease.as_millis().min(i64::MAX as u128) as i64,
                slots: shared.slots.clone(),
                handoff,
            }),
        )),
        heartbeat: tokio::spawn(heartbeat_loop(
            shared.db.clone(),
            config.clone(),
            info,
            shared.running.clone(),
            stop.clone(),
        )),
        rescuer: config
            .rescue_every
            .map(|every| tokio::spawn(rescue_loop(shared.db.clone(), every, stop.clone()))),
        stop,
    }
}

/// Collects finished job tasks; a task that panicked outside its handler
/// (whose panics become failed attempts) is logged, never dropped silently.
fn reap(tasks: &mut JoinSet<()>) {
    while let Some(joined) = tasks.try_join_next() {
        if let Err(error) = joined {
            tracing::error!(%error, "a job task failed");
        }
    }
}

/// Leases as many jobs as there are free slots and starts them.
async fn lease_round(
    shared: &Shared,
    tasks: &mut JoinSet<()>,
    handoff: &mut mpsc::UnboundedReceiver<Handoff>,
    shutdown: &CancellationToken,
    failures: &mut u32,
    got_full_batch: &mut bool,
) -> Round {
    let config = &shared.config;
    let slots = &shared.slots;
    let free = slots.available_permits().min(config.batch_max);
    if free == 0 {
        // A handed-off step holds a slot of its own: it must start for
        // slots to free up.
        tokio::select! {
            permit = slots.acquire() => drop(permit),
            Some(handed) = handoff.recv() => start_with(shared, tasks, handed.job, handed.permit),
            _ = shutdown.cancelled() => return Round::Stop,
        }
        return Round::Full;
    }
    // Under load, slots free up one by one; leasing each as it frees would
    // mean one query per job. Let a few more finish first.
    let busy = config.slots - slots.available_permits();
    if free < config.slots.min(config.batch_max) / 4 && busy > 0 && *got_full_batch {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_micros(500)) => {}
            _ = shutdown.cancelled() => return Round::Stop,
        }
    }
    // The slots are taken before the lease: the completer takes slots too
    // (for the next steps it leases), so free slots counted now may be
    // gone when the jobs come back, and a leased job without a slot would
    // sit leased until its lease ran out.
    let mut permits = Vec::new();
    while permits.len() < config.batch_max {
        match slots.clone().try_acquire_owned() {
            Ok(permit) => permits.push(permit),
            Err(_) => break,
        }
    }
    let free = permits.len();
    if free == 0 {
        return Round::Full;
    }
    let now = now_millis();
    let request = LeaseRequest {
        worker_id: &config.id,
        kinds: &shared.kinds,
        limit: free as i64,
        lease_ms: config.lease.as_millis().min(i64::MAX as u128) as i64,
        now,
        tenant_running_max: config.tenant_running_max,
    };
    let leased = match shared.db.job_lease_with(&request).await {
        Ok(leased) => {
            *failures = 0;
            leased
        }
        Err(error) => {
            *failures += 1;
            tracing::warn!(%error, "lease failed; retrying");
            let pause = Duration::from_millis(50 << (*failures).min(5));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => return Round::Stop,
            }
            return Round::Full;
        }
    };
    let got = leased.len();
    tracing::trace!(asked = free, got, "leased");
    *got_full_batch = got == free;
    for job in leased {
        match permits.pop() {
            Some(permit) => start_with(shared, tasks, job, permit),
            // Never happens: no more jobs are leased than asked for. Were
            // it to, the job goes back without costing an attempt.
            None => {
                let _ = shared.release.send((job.id, job.attempt));
            }
        }
    }
    drop(permits);
    if got == free {
        return Round::Full;
    }
    let next = shared.db.job_next_run_at(&shared.kinds).await;
    shared
        .blocked
        .store(matches!(next, Ok(Some(at)) if at <= now), Ordering::Relaxed);
    let idle_for = match next {
        Ok(Some(at)) if at > now => Duration::from_millis((at - now) as u64),
        _ => config.poll_every,
    }
    .min(config.poll_every);
    Round::Idle(idle_for)
}

/// Starts one leased job in a task of its own, in the slot `permit` holds.
fn start_with(
    shared: &Shared,
    tasks: &mut JoinSet<()>,
    job: LeasedJob,
    permit: OwnedSemaphorePermit,
) {
    let Some(handler) = shared.handlers.get(&job.kind) else {
        let _ = shared.release.send((job.id, job.attempt));
        return;
    };
    let wait_ms = job
        .started_at
        .saturating_sub(job.run_at.max(job.created_at))
        .max(0);
    // Labels come from closed sets (priorities, the kinds this worker has
    // handlers for), never from names a tenant chose.
    metrics::histogram!("kiln_job_wait_seconds", "priority" => job.priority.as_str())
        .record(wait_ms as f64 / 1000.0);
    let (cancel, lost) = shared.running.insert(&job);
    let ctx = RunContext {
        worker_id: shared.config.id.clone(),
        running: shared.running.clone(),
        done: shared.done.clone(),
        release: shared.release.clone(),
        hard_stop: shared.hard_stop.clone(),
        cancel,
        lost,
    };
    tasks.spawn(async move {
        run_one(job, handler, ctx).await;
        drop(permit);
    });
}

/// Lets running jobs finish within the grace period, hands back the rest,
/// waits for every result to be written and stops the background tasks.
async fn drain(
    shared: Shared,
    mut tasks: JoinSet<()>,
    mut release_rx: mpsc::UnboundedReceiver<(i64, i32)>,
    mut handoff_rx: mpsc::UnboundedReceiver<Handoff>,
    background: Background,
) {
    let Shared {
        db,
        config,
        running,
        done,
        release,
        hard_stop,
        ..
    } = shared;
    tracing::info!(worker = %config.id, running = tasks.len(), "worker stopping");
    let graceful = tokio::time::timeout(config.shutdown_grace, async {
        while let Some(joined) = tasks.join_next().await {
            if let Err(error) = joined {
                tracing::error!(%error, "a job task failed");
            }
        }
    })
    .await;
    if graceful.is_err() {
        hard_stop.cancel();
        while tasks.join_next().await.is_some() {}
    }
    drop(release);
    let mut handed_back = Vec::new();
    while let Some(held) = release_rx.recv().await {
        handed_back.push(held);
    }
    if !handed_back.is_empty() {
        match db.job_release(&config.id, &handed_back, now_millis()).await {
            Ok(n) => tracing::info!(n, "handed unfinished jobs back to the queue"),
            Err(error) => tracing::warn!(%error, "hand-back failed; leases will expire"),
        }
        for (id, attempt) in handed_back {
            running.forget(id, attempt);
        }
    }
    drop(done);
    // The heartbeat runs until the completer has written the last result.
    let _ = background.completer.await;
    // Next steps the completer took meanwhile go back without an attempt.
    handoff_rx.close();
    let mut untaken = Vec::new();
    while let Ok(handed) = handoff_rx.try_recv() {
        untaken.push((handed.job.id, handed.job.attempt));
    }
    if !untaken.is_empty() {
        if let Err(error) = db.job_release(&config.id, &untaken, now_millis()).await {
            tracing::warn!(%error, "hand-back failed; leases will expire");
        }
        for (id, attempt) in untaken {
            running.forget(id, attempt);
        }
    }
    background.stop.cancel();
    let _ = background.heartbeat.await;
    if let Some(rescuer) = background.rescuer {
        let _ = rescuer.await;
    }
    let _ = db.worker_delete(&config.id).await;
    tracing::info!(worker = %config.id, "worker stopped");
}

struct RunContext {
    worker_id: String,
    running: RunningMap,
    done: mpsc::UnboundedSender<Completion>,
    release: mpsc::UnboundedSender<(i64, i32)>,
    hard_stop: CancellationToken,
    cancel: CancellationToken,
    lost: CancellationToken,
}

/// Why the sandbox was killed, if it was.
enum Kill {
    Timeout,
    Cancel,
    Shutdown,
    Lost,
}

const KILL_GRACE: Duration = Duration::from_millis(500);

/// Longest error text a worker writes.
const ERROR_MAX: usize = 4096;

async fn run_one(job: LeasedJob, handler: Arc<dyn JobHandler>, ctx: RunContext) {
    let started = Instant::now();
    let kill = CancellationToken::new();
    let timeout = Duration::from_millis(job.timeout_ms.max(1) as u64);
    // The handler runs in a task of its own, so a panic in it ends this
    // attempt as failed (and is logged) instead of unwinding past the
    // bookkeeping of its lease.
    let mut run = tokio::spawn({
        let job = job.clone();
        let kill = kill.clone();
        async move { handler.run(&job, kill).await }
    });
    let (end, reason) = tokio::select! {
        end = &mut run => (Some(handler_end(&job, end)), None),
        _ = tokio::time::sleep(timeout) => (stop(&kill, &mut run, &job).await, Some(Kill::Timeout)),
        _ = ctx.cancel.cancelled() => (stop(&kill, &mut run, &job).await, Some(Kill::Cancel)),
        _ = ctx.lost.cancelled() => (stop(&kill, &mut run, &job).await, Some(Kill::Lost)),
        _ = ctx.hard_stop.cancelled() => (stop(&kill, &mut run, &job).await, Some(Kill::Shutdown)),
    };
    let end = match (reason, end) {
        (None, Some(end)) => end,
        (Some(Kill::Cancel), _) => AttemptEnd::Cancelled,
        (Some(Kill::Lost), _) => {
            // Another worker owns the job now; whatever this attempt wrote
            // would be refused, and it is no cancel.
            tracing::info!(
                id = job.id,
                attempt = job.attempt,
                "lease lost; attempt abandoned"
            );
            metrics::counter!("kiln_leases_lost_total").increment(1);
            ctx.running.forget(job.id, job.attempt);
            return;
        }
        (Some(Kill::Shutdown), _) => {
            let _ = ctx.release.send((job.id, job.attempt));
            return;
        }
        (_, end) => AttemptEnd::TimedOut {
            result: end.and_then(|e| e.result().cloned()),
        },
    };
    let elapsed = started.elapsed();
    metrics::histogram!("kiln_job_run_seconds", "kind" => job.kind.clone())
        .record(elapsed.as_secs_f64());
    let completion = completion(&job, &end, &ctx.worker_id, elapsed);
    metrics::counter!("kiln_jobs_finished_total", "status" => completion.status.as_str())
        .increment(1);
    // The lease stays in the running map, and so keeps being extended,
    // until the completer has written this.
    if ctx.done.send(completion).is_err() {
        ctx.running.forget(job.id, job.attempt);
    }
}

/// The attempt's end as the handler's task gave it: a panic is a failure.
fn handler_end(job: &LeasedJob, joined: Result<AttemptEnd, tokio::task::JoinError>) -> AttemptEnd {
    match joined {
        Ok(end) => end,
        Err(error) => {
            let message = match error.try_into_panic() {
                Ok(payload) => panic_message(payload.as_ref()),
                Err(error) => error.to_string(),
            };
            tracing::error!(id = job.id, kind = %job.kind, panic = %message, "job handler panicked");
            AttemptEnd::Failed {
                result: None,
                error: kiln_core::names::sanitise_message(
                    &format!("the {} handler panicked: {message}", job.kind),
                    ERROR_MAX,
                ),
                permanent: false,
            }
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// The record of one attempt's end, ready for the completer.
fn completion(job: &LeasedJob, end: &AttemptEnd, worker_id: &str, elapsed: Duration) -> Completion {
    let now = now_millis();
    let outcome = decide_outcome(job, end, now, rand::random::<f64>());
    let result = end.result().cloned();
    let error = end
        .error()
        .map(|e| kiln_core::names::sanitise_message(&e, ERROR_MAX));
    let record = AttemptRecord {
        attempt: job.attempt,
        worker_id: Some(worker_id.to_string()),
        started_at: Some(job.started_at),
        finished_at: now,
        outcome: end.label().to_string(),
        exit_code: result.as_ref().map(|r| r.exit_code),
        error: error.clone(),
        duration_ms: Some(elapsed.as_millis().min(i64::MAX as u128) as i64),
    };
    Completion {
        id: job.id,
        attempt: job.attempt,
        status: outcome.status(),
        run_at: match outcome {
            kiln_core::Outcome::Retry { run_at } => Some(run_at),
            _ => None,
        },
        result,
        error,
        record,
    }
}

/// Fires the kill switch and gives the handler a moment to return what it
/// has; past that, its task is aborted.
async fn stop(
    kill: &CancellationToken,
    run: &mut tokio::task::JoinHandle<AttemptEnd>,
    job: &LeasedJob,
) -> Option<AttemptEnd> {
    kill.cancel();
    match tokio::time::timeout(KILL_GRACE, &mut *run).await {
        Ok(joined) => Some(handler_end(job, joined)),
        Err(_) => {
            run.abort();
            None
        }
    }
}

/// Writes results as they come, batching whatever queued up during the
/// previous write. Only an unavailable database makes it retry (the store
/// quarantines a result it refuses), so results are never dropped while the
/// process lives and one bad result never blocks the rest. Each lease is
/// forgotten, and so stops being extended, once its result is on record.
async fn complete_loop(
    db: Db,
    mut rx: mpsc::UnboundedReceiver<Completion>,
    batch_max: usize,
    running: RunningMap,
    blocked: Arc<AtomicBool>,
    continuation: Option<Continuation>,
) {
    let mut batch = Vec::with_capacity(batch_max);
    while rx.recv_many(&mut batch, batch_max).await > 0 {
        // The first result of a burst usually arrives alone while its
        // siblings are still running; a few yields let them join the batch.
        // With no sibling running (a chain's step) there is none to wait
        // for, and each yield costs a poll of the I/O driver.
        if batch.len() < 16 && running.len() > batch.len() {
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            while batch.len() < batch_max {
                match rx.try_recv() {
                    Ok(completion) => batch.push(completion),
                    Err(_) => break,
                }
            }
        }
        batch.sort_by_key(|c| c.id);
        // Step ends that move their run (a retry waits for its next try).
        let steps = batch
            .iter()
            .filter(|c| c.status != JobStatus::Scheduled && running.is_step(c.id))
            .count();
        let steps = continuation
            .as_ref()
            .filter(|_| steps > 0)
            .map(|c| (c, steps));
        write_results(&db, &batch, steps).await;
        for completion in &batch {
            running.forget(completion.id, completion.attempt);
        }
        batch.clear();
        // Finished jobs give their tenants room under the running quota
        // (and their queues under a limit); a lease that came back short
        // for want of it should try again now, not at the next poll. A
        // lease that found nothing waiting needs no wake-up: every end of a
        // pipeline step would otherwise cost a lease that finds nothing.
        if blocked.load(Ordering::Relaxed) {
            db.wakeup().notify_waiters();
        }
    }
}

/// Writes a batch of results, retrying while the database is unavailable.
/// With `steps` (step ends in the batch that move their run), their runs
/// advance in the same transaction, and up to one next step per end (as
/// many as slots are free) is leased to this worker and handed to its
/// lease loop.
async fn write_results(db: &Db, batch: &[Completion], steps: Option<(&Continuation, usize)>) {
    let mut failures = 0u32;
    loop {
        let mut permits = Vec::new();
        let written = match steps {
            Some((continuation, steps)) => {
                while permits.len() < steps {
                    match continuation.slots.clone().try_acquire_owned() {
                        Ok(permit) => permits.push(permit),
                        Err(_) => break,
                    }
                }
                let now = now_millis();
                let request = LeaseRequest {
                    worker_id: &continuation.worker_id,
                    kinds: &continuation.handled,
                    limit: permits.len() as i64,
                    lease_ms: continuation.lease_ms,
                    now,
                    tenant_running_max: None,
                };
                db.job_complete_advancing(batch, &continuation.kinds, Some(&request), now)
                    .await
                    .map(|(completed, leased)| (completed, leased, Some(continuation)))
            }
            None => db
                .job_complete_many(batch)
                .await
                .map(|completed| (completed, Vec::new(), None)),
        };
        match written {
            Ok((completed, leased, continuation)) => {
                tracing::trace!(n = batch.len(), "results written");
                let stale = batch.len() - completed.applied.len() - completed.quarantined.len();
                if stale > 0 {
                    tracing::info!(stale, "results refused: their leases had moved on");
                }
                if !completed.quarantined.is_empty() {
                    metrics::counter!("kiln_results_quarantined_total")
                        .increment(completed.quarantined.len() as u64);
                }
                if let Some(continuation) = continuation {
                    for (job, permit) in leased.into_iter().zip(permits) {
                        let _ = continuation.handoff.send(Handoff { job, permit });
                    }
                }
                return;
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, n = batch.len(), "the database is unavailable; retrying the results");
                tokio::time::sleep(Duration::from_millis(50 << failures.min(6))).await;
            }
        }
    }
}

async fn heartbeat_loop(
    db: Db,
    config: WorkerConfig,
    mut info: WorkerInfo,
    running: RunningMap,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(config.heartbeat_every);
    let mut last_register = Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let held = running.held();
        if !held.is_empty() {
            let lease_ms = config.lease.as_millis().min(i64::MAX as u128) as i64;
            let until = now_millis().saturating_add(lease_ms);
            match db.job_heartbeat(&config.id, &held, until).await {
                Ok(alive) => signal(&running, &held, alive),
                Err(error) => tracing::warn!(%error, "heartbeat failed"),
            }
        }
        if last_register.elapsed() >= Duration::from_secs(5) {
            last_register = Instant::now();
            info.last_seen = now_millis();
            if let Err(error) = db.worker_upsert(&info).await {
                tracing::debug!(%error, "worker heartbeat failed");
            }
        }
    }
}

/// Tells each attempt what its heartbeat learnt: a cancel request, or that
/// the lease is gone.
fn signal(running: &RunningMap, held: &[(i64, i32)], alive: Vec<(i64, bool)>) {
    let alive: HashMap<i64, bool> = alive.into_iter().collect();
    let map = running.lock();
    for (id, attempt) in held {
        let Some(entry) = map.get(id).filter(|e| e.attempt == *attempt) else {
            continue;
        };
        match alive.get(id) {
            Some(true) => entry.cancel.cancel(),
            Some(false) => {}
            None => entry.lost.cancel(),
        }
    }
}

/// Takes back expired leases every `every` until `stop` fires; workers run
/// it, and so does `kiln scheduler`.
pub async fn rescue_loop(db: Db, every: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        match db.job_rescue_expired(now_millis()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(n, "took back jobs whose lease expired"),
            Err(error) => tracing::debug!(%error, "rescue failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_messages() {
        let payload: Box<dyn std::any::Any + Send> = Box::new("boom");
        assert_eq!(panic_message(payload.as_ref()), "boom");
        let payload: Box<dyn std::any::Any + Send> = Box::new(format!("boom {}", 2));
        assert_eq!(panic_message(payload.as_ref()), "boom 2");
        let payload: Box<dyn std::any::Any + Send> = Box::new(3);
        assert_eq!(panic_message(payload.as_ref()), "a panic without a message");
    }
}
