//! The worker runtime: leases jobs in batches, runs each through the handler
//! registered for its kind, enforces timeouts and cancellation, heartbeats
//! its leases and writes results in batches.
//!
//! Sandbox crates plug in by implementing [`JobHandler`]; the queue never
//! learns about them.

mod noop;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::{decide_outcome, AttemptEnd, AttemptRecord, LeasedJob, Millis};
use kiln_db::{Completion, Db, WorkerInfo};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

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
        }
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

struct Running {
    attempt: i32,
    /// Fired by an API cancel request.
    cancel: CancellationToken,
}

type RunningMap = Arc<Mutex<HashMap<i64, Running>>>;

pub struct Worker {
    db: Db,
    handlers: Handlers,
    config: WorkerConfig,
}

impl Worker {
    pub fn new(db: Db, handlers: Handlers, config: WorkerConfig) -> Worker {
        Worker {
            db,
            handlers,
            config,
        }
    }

    /// Runs until `shutdown` fires, then lets running jobs finish within the
    /// grace period and hands the rest back to the queue.
    pub async fn run(self, shutdown: CancellationToken) {
        let Worker {
            db,
            handlers,
            config,
        } = self;
        let kinds = handlers.kinds();
        let slots = Arc::new(Semaphore::new(config.slots));
        let running: RunningMap = Arc::default();
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Completion>();
        let (release_tx, mut release_rx) = mpsc::unbounded_channel::<(i64, i32)>();
        let hard_stop = CancellationToken::new();
        let started_at = now_millis();
        let info = WorkerInfo {
            id: config.id.clone(),
            host: config.host.clone(),
            kinds: kinds.clone(),
            slots: config.slots as i32,
            started_at,
            last_seen: started_at,
        };
        if let Err(error) = db.worker_upsert(&info).await {
            tracing::warn!(%error, "could not register worker");
        }
        tracing::info!(worker = %config.id, ?kinds, slots = config.slots, "worker started");

        let completer = tokio::spawn(complete_loop(db.clone(), done_rx, config.batch_max));
        let background = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat_loop(
            db.clone(),
            config.clone(),
            info,
            running.clone(),
            background.clone(),
        ));
        let rescuer = config
            .rescue_every
            .map(|every| tokio::spawn(rescue_loop(db.clone(), every, background.clone())));

        let mut tasks = JoinSet::new();
        let wakeup = db.wakeup();
        let mut failures = 0u32;
        let mut got_full_batch = false;
        while !shutdown.is_cancelled() {
            let notified = wakeup.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits().min(config.batch_max);
            if free == 0 {
                tokio::select! {
                    permit = slots.acquire() => drop(permit),
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            // Under load, slots free up one by one; leasing each as it frees
            // would mean one query per job. Let a few more finish first.
            let busy = config.slots - slots.available_permits();
            if free < config.slots.min(config.batch_max) / 4 && busy > 0 && got_full_batch {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_micros(500)) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            let free = slots.available_permits().min(config.batch_max);
            let now = now_millis();
            let leased = match db
                .job_lease(
                    &config.id,
                    &kinds,
                    free as i64,
                    config.lease.as_millis() as i64,
                    now,
                )
                .await
            {
                Ok(leased) => {
                    failures = 0;
                    leased
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, "lease failed; retrying");
                    let pause = Duration::from_millis(50 << failures.min(5));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            };
            let got = leased.len();
            tracing::trace!(asked = free, got, "leased");
            got_full_batch = got == free;
            for job in leased {
                let permit = slots.clone().try_acquire_owned().expect("a slot was free");
                let Some(handler) = handlers.get(&job.kind) else {
                    continue;
                };
                let wait_ms = (job.started_at - job.run_at.max(job.created_at)).max(0);
                metrics::histogram!("kiln_job_wait_seconds", "queue" => job.queue.clone())
                    .record(wait_ms as f64 / 1000.0);
                let cancel = CancellationToken::new();
                running.lock().expect("running map").insert(
                    job.id,
                    Running {
                        attempt: job.attempt,
                        cancel: cancel.clone(),
                    },
                );
                let ctx = RunContext {
                    worker_id: config.id.clone(),
                    running: running.clone(),
                    done: done_tx.clone(),
                    release: release_tx.clone(),
                    hard_stop: hard_stop.clone(),
                };
                tasks.spawn(async move {
                    run_one(job, handler, cancel, ctx).await;
                    drop(permit);
                });
            }
            if got == free {
                continue;
            }
            let idle_for = match db.job_next_run_at(&kinds).await {
                Ok(Some(at)) if at > now => Duration::from_millis((at - now) as u64),
                _ => config.poll_every,
            }
            .min(config.poll_every);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(idle_for) => {}
                _ = shutdown.cancelled() => break,
            }
        }

        tracing::info!(worker = %config.id, running = tasks.len(), "worker stopping");
        let graceful = tokio::time::timeout(config.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if graceful.is_err() {
            hard_stop.cancel();
            while tasks.join_next().await.is_some() {}
        }
        drop(release_tx);
        let mut handed_back = Vec::new();
        while let Some(held) = release_rx.recv().await {
            handed_back.push(held);
        }
        if !handed_back.is_empty() {
            match db.job_release(&config.id, &handed_back, now_millis()).await {
                Ok(n) => tracing::info!(n, "handed unfinished jobs back to the queue"),
                Err(error) => tracing::warn!(%error, "hand-back failed; leases will expire"),
            }
        }
        drop(done_tx);
        let _ = completer.await;
        background.cancel();
        let _ = heartbeat.await;
        if let Some(rescuer) = rescuer {
            let _ = rescuer.await;
        }
        let _ = db.worker_delete(&config.id).await;
        tracing::info!(worker = %config.id, "worker stopped");
    }
}

struct RunContext {
    worker_id: String,
    running: RunningMap,
    done: mpsc::UnboundedSender<Completion>,
    release: mpsc::UnboundedSender<(i64, i32)>,
    hard_stop: CancellationToken,
}

/// Why the sandbox was killed, if it was.
enum Kill {
    Timeout,
    Cancel,
    Shutdown,
}

const KILL_GRACE: Duration = Duration::from_millis(500);

async fn run_one(
    job: LeasedJob,
    handler: Arc<dyn JobHandler>,
    cancel: CancellationToken,
    ctx: RunContext,
) {
    let started = Instant::now();
    let kill = CancellationToken::new();
    let timeout = Duration::from_millis(job.timeout_ms.max(1) as u64);
    let run = handler.run(&job, kill.clone());
    tokio::pin!(run);
    let (end, reason) = tokio::select! {
        end = &mut run => (Some(end), None),
        _ = tokio::time::sleep(timeout) => (stop(&kill, &mut run).await, Some(Kill::Timeout)),
        _ = cancel.cancelled() => (stop(&kill, &mut run).await, Some(Kill::Cancel)),
        _ = ctx.hard_stop.cancelled() => (stop(&kill, &mut run).await, Some(Kill::Shutdown)),
    };
    ctx.running.lock().expect("running map").remove(&job.id);
    let end = match (reason, end) {
        (None, Some(end)) => end,
        (Some(Kill::Cancel), _) => AttemptEnd::Cancelled,
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
    let now = now_millis();
    let outcome = decide_outcome(&job, &end, now, rand_unit());
    let status = outcome.status();
    metrics::counter!("kiln_jobs_finished_total", "status" => status.as_str()).increment(1);
    let result = end.result().cloned();
    let record = AttemptRecord {
        attempt: job.attempt,
        worker_id: Some(ctx.worker_id.clone()),
        started_at: Some(job.started_at),
        finished_at: now,
        outcome: end.label().to_string(),
        exit_code: result.as_ref().map(|r| r.exit_code),
        error: end.error(),
        duration_ms: Some(elapsed.as_millis() as i64),
    };
    let completion = Completion {
        id: job.id,
        attempt: job.attempt,
        status,
        run_at: match outcome {
            kiln_core::Outcome::Retry { run_at } => Some(run_at),
            _ => None,
        },
        result,
        error: end.error(),
        record,
    };
    let _ = ctx.done.send(completion);
}

/// Fires the kill switch and gives the handler a moment to return what it has.
async fn stop<F>(kill: &CancellationToken, run: &mut std::pin::Pin<&mut F>) -> Option<AttemptEnd>
where
    F: std::future::Future<Output = AttemptEnd>,
{
    kill.cancel();
    tokio::time::timeout(KILL_GRACE, run.as_mut()).await.ok()
}

fn rand_unit() -> f64 {
    // The low bits of the clock are plenty for backoff jitter.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos % 1_000_000) as f64 / 1_000_000.0
}

/// Writes results as they come, batching whatever queued up during the
/// previous write. A failed write is retried until the database is back:
/// results are never dropped while the process lives.
async fn complete_loop(db: Db, mut rx: mpsc::UnboundedReceiver<Completion>, batch_max: usize) {
    let mut batch = Vec::with_capacity(batch_max);
    while rx.recv_many(&mut batch, batch_max).await > 0 {
        // The first result of a burst usually arrives alone while its
        // siblings are still running; a few yields let them join the batch.
        if batch.len() < 16 {
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
        let mut failures = 0u32;
        loop {
            match db.job_complete_many(&batch).await {
                Ok(applied) => {
                    tracing::trace!(n = batch.len(), "results written");
                    let stale = batch.len() - applied.len();
                    if stale > 0 {
                        tracing::info!(stale, "results refused: their leases had moved on");
                    }
                    break;
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, n = batch.len(), "writing results failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50 << failures.min(6))).await;
                }
            }
        }
        batch.clear();
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
        let held: Vec<(i64, i32)> = running
            .lock()
            .expect("running map")
            .iter()
            .map(|(id, r)| (*id, r.attempt))
            .collect();
        if !held.is_empty() {
            let until = now_millis() + config.lease.as_millis() as i64;
            match db.job_heartbeat(&config.id, &held, until).await {
                Ok(alive) => {
                    let alive: HashMap<i64, bool> = alive.into_iter().collect();
                    let map = running.lock().expect("running map");
                    for (id, attempt) in held {
                        let cancel = match alive.get(&id) {
                            Some(requested) => *requested,
                            // The lease moved on (expired and was taken over):
                            // this attempt's result would be refused anyway.
                            None => true,
                        };
                        if let Some(entry) = map.get(&id) {
                            if cancel && entry.attempt == attempt {
                                entry.cancel.cancel();
                            }
                        }
                    }
                }
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
