//! `kiln bench`: the numbers in BENCHMARKS.md. Each prints Markdown rows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_blob::BlobStore;
use kiln_core::{AttemptEnd, JobResult, LeasedJob, NewJob};
use kiln_db::Db;
use kiln_wasm::{fixtures, WasmConfig, WasmHandler, WasmRuntime, WasmSpec};
use kiln_worker::{now_millis, Handlers, JobHandler, NoopHandler, Worker, WorkerConfig};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Enqueue rate, drain rate and enqueue→start latency of no-op jobs.
    Queue(QueueArgs),
    /// WebAssembly: instantiate, submit→result through the API, jobs/s, memory.
    Wasm(WasmArgs),
    /// MicroVMs: cold create→first exec, exec round trip, memory per VM, VMs at once.
    Vm(VmArgs),
    /// Pipelines: a chain of no-op steps, a fan-out with fan-in, diamonds at once.
    Pipeline(flow::PipelineArgs),
    /// Events: commit → SSE client latency, and one event to many clients.
    Events(events::EventsArgs),
    /// Live logs: ingest from a job printing as fast as it can (wasm, VM),
    /// peak RSS, follow latency.
    Logs(logs::LogsArgs),
    /// Dashboard: `GET /api/v1/dashboard/stats` beside a million finished jobs.
    Dashboard(dashboard::DashboardArgs),
    /// Audit trail: drain over HTTP with it on and off; verify a million records.
    Audit(audit::AuditArgs),
    /// Users: login latency (argon2id parameters stated) and token-checked requests.
    Login(login::LoginArgs),
    /// Admission policies: submits over HTTP with none and with five.
    Policy(policy::PolicyArgs),
    /// VM networking: create with a NIC, TCP through the TAP, the port proxy.
    VmNet(net::NetArgs),
}

#[path = "bench_net.rs"]
mod net;

#[path = "bench_login.rs"]
mod login;

#[path = "bench_audit.rs"]
mod audit;

#[path = "bench_policy.rs"]
mod policy;

#[path = "bench_flow.rs"]
mod flow;

#[path = "bench_events.rs"]
mod events;

#[path = "bench_dashboard.rs"]
mod dashboard;
#[path = "bench_logs.rs"]
mod logs;

#[derive(Args)]
pub struct VmArgs {
    /// Where the images are (`kiln image build` puts them in <data-dir>/images).
    #[arg(long, env = "KILN_BENCH_IMAGES")]
    images: Option<std::path::PathBuf>,
    /// The image VMs boot: `default` (busybox) or a root filesystem image
    /// such as `python`.
    #[arg(long, default_value = "default")]
    image: String,
    /// First time building the image again (a root filesystem image) into a
    /// scratch directory that shares the compiled kernel: with an empty apt
    /// cache, then with the cache the first build filled.
    #[arg(long)]
    build: bool,
    #[arg(long, default_value_t = 5)]
    boots: usize,
    #[arg(long, default_value_t = 300)]
    execs: usize,
    /// Most VMs to start at once.
    #[arg(long, default_value_t = 16)]
    max_vms: usize,
    #[command(flatten)]
    host: crate::config::VmHostArgs,
}

#[derive(Args)]
pub struct QueueArgs {
    /// postgres://... (a fresh schema is used) or omit for a fresh SQLite file.
    #[arg(long, env = "KILN_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Worker slots; also the lease and completion batch size (up to 5,000).
    #[arg(long, default_value_t = 4_000)]
    slots: usize,
    #[arg(long, default_value_t = 1_000)]
    latency_samples: usize,
    /// Jobs parked in a paused queue, and as many again of a kind no worker
    /// handles, to show that leasing does not slow down beside them (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    backlog: usize,
    /// Write no job events (drops the triggers in the fresh bench database),
    /// to measure what the event log costs the queue.
    #[arg(long)]
    no_events: bool,
    /// Keep no dashboard rollups (drops their triggers in the fresh bench
    /// database), to measure what they cost the queue.
    #[arg(long)]
    no_rollups: bool,
}

#[derive(Args)]
pub struct WasmArgs {
    #[arg(long, default_value_t = 2_000)]
    requests: usize,
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    #[arg(long, default_value_t = 1_000)]
    instances: usize,
    #[arg(long, default_value_t = 64)]
    slots: usize,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Queue(args) => queue(args).await,
        BenchCommand::Wasm(args) => wasm(args).await,
        BenchCommand::Vm(args) => vm(args).await,
        BenchCommand::Pipeline(args) => flow::pipeline(args).await,
        BenchCommand::Events(args) => events::events(args).await,
        BenchCommand::Logs(args) => logs::logs(args).await,
        BenchCommand::Dashboard(args) => dashboard::dashboard(args).await,
        BenchCommand::Audit(args) => audit::audit(args).await,
        BenchCommand::Login(args) => login::login(args).await,
        BenchCommand::Policy(args) => policy::policy(args).await,
        BenchCommand::VmNet(args) => net::net(args).await,
    }
}

fn bench_schema() -> String {
    static STAMP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    STAMP
        .get_or_init(|| format!("kiln_bench_{}", now_millis()))
        .clone()
}

/// An embedded API over `db` on a loopback port, with the audit chainer
/// beside it, as `kiln serve` runs them; benches submit to it over HTTP.
struct EmbeddedApi {
    addr: std::net::SocketAddr,
    secret: String,
    root: std::path::PathBuf,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    chainer: tokio::task::JoinHandle<()>,
}

impl EmbeddedApi {
    async fn start(db: &Db, audited: bool) -> anyhow::Result<EmbeddedApi> {
        let root = std::env::temp_dir().join(format!("kiln-bench-api-{}", now_millis()));
        let blobs = BlobStore::local(&root.join("blobs"))?;
        let state = kiln_api::AppState::new(db.clone(), blobs, None);
        state.set_audit(audited);
        let (_, secret) = kiln_api::issue_key(
            db,
            "bench",
            "bench",
            kiln_core::Scopes(vec![kiln_core::Scope::Write]),
        )
        .await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let server = {
            let stop = stop.clone();
            tokio::spawn(async move {
                kiln_api::serve(listener, state, async move { stop.cancelled().await }).await
            })
        };
        let chainer = tokio::spawn(kiln_db::audit::chain_loop(
            db.clone(),
            Duration::from_millis(250),
        ));
        Ok(EmbeddedApi {
            addr,
            secret,
            root,
            stop,
            server,
            chainer,
        })
    }

    /// `POST /api/v1/jobs` with `body`, `jobs / clients` times by each of
    /// `clients` concurrent clients; every answer must be 201. Returns how
    /// many were submitted.
    async fn submit(
        &self,
        body: &serde_json::Value,
        jobs: usize,
        clients: usize,
    ) -> anyhow::Result<usize> {
        let http = reqwest::Client::new();
        let url = format!("http://{}/api/v1/jobs", self.addr);
        let per_client = jobs / clients;
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (http, url, secret, body) =
                (http.clone(), url.clone(), self.secret.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_client {
                    let response = http
                        .post(&url)
                        .bearer_auth(&secret)
                        .json(&body)
                        .send()
                        .await?;
                    anyhow::ensure!(response.status() == 201, "{}", response.status());
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(per_client * clients)
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.server.await;
        self.chainer.abort();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A fresh database of its own for each round of a bench: a schema named
/// after the bench's stamp and `name` on PostgreSQL, a new file on SQLite.
async fn fresh_named(url: Option<&str>, name: &str) -> anyhow::Result<Db> {
    let stamp = format!("{}_{name}", bench_schema());
    Ok(match url {
        Some(url) if url.starts_with("postgres") => {
            Db::connect_postgres_schema(url, &stamp).await?
        }
        Some(url) => Db::connect(url).await?,
        None => Db::connect(&format!("sqlite://{}", bench_file(&stamp).display())).await?,
    })
}

/// The SQLite file of a bench's database named `stamp`.
fn bench_file(stamp: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{stamp}.db"))
}

/// Closes a bench's database and removes what [`fresh_db`] made for it: the
/// schema on PostgreSQL, the file on SQLite. Nothing is left behind, so one
/// run does not slow the next (PostgreSQL's catalogs grow with every schema,
/// and a server without autovacuum keeps every dead catalog row).
async fn discard(url: Option<&str>, db: Db) -> anyhow::Result<()> {
    db.close().await;
    match url {
        Some(url) if url.starts_with("postgres") => {
            kiln_db::drop_postgres_schema(url, &bench_schema()).await?;
        }
        Some(_) => {}
        None => {
            let file = bench_file(&bench_schema());
            for suffix in ["", "-wal", "-shm"] {
                let path = format!("{}{suffix}", file.display());
                if let Err(error) = std::fs::remove_file(&path) {
                    if error.kind() != std::io::ErrorKind::NotFound {
                        eprintln!("could not remove {path}: {error}");
                    }
                }
            }
        }
    }
    Ok(())
}

async fn fresh_db(url: Option<&str>) -> anyhow::Result<(Db, Option<Db>)> {
    let stamp = bench_schema();
    match url {
        Some(url) if url.starts_with("postgres") => {
            let db = Db::connect_postgres_schema(url, &stamp).await?;
            // A second handle on the same schema: its workers hear of new
            // jobs only through LISTEN/NOTIFY, as workers on another host would.
            let other = Db::connect_postgres_schema(url, &stamp).await?;
            Ok((db, Some(other)))
        }
        Some(url) => Ok((Db::connect(url).await?, None)),
        None => Ok((
            Db::connect(&format!("sqlite://{}", bench_file(&stamp).display())).await?,
            None,
        )),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// A Markdown row of median and worst for a handful of timed runs.
fn print_p50_max(what: &str, samples: &mut [Duration]) {
    samples.sort();
    println!(
        "| {what} ({} runs) | p50 {} · max {} |",
        samples.len(),
        ms(percentile(samples, 0.5)),
        ms(percentile(samples, 1.0))
    );
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn worker(
    db: &Db,
    handlers: Handlers,
    slots: usize,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut config = WorkerConfig::new(&format!("bench-{}", now_millis()));
    config.slots = slots;
    config.batch_max = slots.clamp(1, 5_000);
    config.rescue_every = None;
    config.pipelines = Some(kiln_api::builtin_kinds());
    let stop = CancellationToken::new();
    let task = tokio::spawn(Worker::new(db.clone(), handlers, config).run(stop.clone()));
    (stop, task)
}

async fn wait_drained(db: &Db, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = db.job_count_unfinished().await?;
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not drained in time: {left} left"
        );
        // Poll gently so the database's CPU goes to the queue; the drain time
        // comes from the last finished_at, not from this loop.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records when each job starts, for enqueue→start latency.
struct StartProbe(mpsc::UnboundedSender<(i64, Instant)>);

#[async_trait::async_trait]
impl JobHandler for StartProbe {
    async fn run(&self, job: &LeasedJob, _kill: CancellationToken) -> AttemptEnd {
        let _ = self.0.send((job.id, Instant::now()));
        AttemptEnd::Succeeded(JobResult::default())
    }
}

async fn queue(args: QueueArgs) -> anyhow::Result<()> {
    let (db, other) = fresh_db(args.database_url.as_deref()).await?;
    let backend = db.backend();
    db.job_triggers_without(args.no_events, args.no_rollups)
        .await?;
    let events = if args.no_events {
        "events off"
    } else {
        "events on"
    };
    let rollups = if args.no_rollups {
        "rollups off"
    } else {
        "rollups on"
    };
    println!("| kiln {backend}, {events}, {rollups} | value |\n|---|---|");

    let started = Instant::now();
    let now = now_millis();
    for chunk in (0..args.jobs).collect::<Vec<_>>().chunks(1_000) {
        let batch: Vec<NewJob> = chunk
            .iter()
            .map(|_| NewJob::new("bench", "noop", json!({})))
            .collect();
        db.job_insert_many(&batch, now).await?;
    }
    let took = started.elapsed();
    println!(
        "| enqueue {} jobs (batches of 1,000) | {:.0} jobs/s |",
        args.jobs,
        args.jobs as f64 / took.as_secs_f64()
    );

    let drain_db = other.clone().unwrap_or_else(|| db.clone());
    let started = Instant::now();
    let (stop, task) = worker(
        &drain_db,
        Handlers::new().with("noop", Arc::new(NoopHandler)),
        args.slots,
    );
    wait_drained(&db, Duration::from_secs(600)).await?;
    let took = started.elapsed();
    stop.cancel();
    task.await?;
    let counts = db.job_count_by_status(None).await?;
    let succeeded = counts.get("succeeded").copied().unwrap_or(0);
    let attempts = db.job_attempts_total().await?;
    println!(
        "| drain {} no-op jobs, {} slots | {:.0} jobs/s ({:.2} s) |",
        args.jobs,
        args.slots,
        args.jobs as f64 / took.as_secs_f64(),
        took.as_secs_f64()
    );
    println!(
        "| jobs succeeded / attempts made | {succeeded} / {attempts} (lost: {}, ran twice: {}) |",
        args.jobs as i64 - succeeded,
        attempts - succeeded
    );

    let (tx, mut rx) = mpsc::unbounded_channel();
    let (stop, task) = worker(
        &drain_db,
        Handlers::new().with("probe", Arc::new(StartProbe(tx))),
        16,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut samples = Vec::with_capacity(args.latency_samples);
    for _ in 0..args.latency_samples {
        let sent = Instant::now();
        let (job, _) = db
            .job_insert(&NewJob::new("bench", "probe", json!({})), now_millis())
            .await?;
        loop {
            let (id, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .context("a probe job did not start within 10 s")?
                .context("worker stopped")?;
            if id == job.id {
                samples.push(at.duration_since(sent));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.cancel();
    task.await?;
    samples.sort();
    let how = if other.is_some() {
        "worker woken by LISTEN/NOTIFY from another connection pool"
    } else {
        "worker in the same process"
    };
    println!(
        "| enqueue→start, light load ({} samples, {how}) | p50 {} · p99 {} · max {} |",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(percentile(&samples, 1.0))
    );
    if args.backlog > 0 {
        backlog(&db, &drain_db, args.backlog, args.slots).await?;
    }
    if let Some(other) = other {
        other.close().await;
    }
    discard(args.database_url.as_deref(), db).await
}

/// Leasing beside a backlog no worker may take: `size` jobs in a paused
/// queue and as many of a kind no worker handles. Idle lease calls and a
/// drain of fresh jobs are timed before and after the backlog is added.
async fn backlog(db: &Db, drain_db: &Db, size: usize, slots: usize) -> anyhow::Result<()> {
    let before = lease_costs(db, drain_db, slots, "before").await?;
    let started = Instant::now();
    db.queue_upsert(
        &kiln_db::QueueInfo {
            paused: true,
            ..kiln_db::QueueInfo::open("bench-backlog", "parked")
        },
        now_millis(),
    )
    .await?;
    let now = now_millis();
    for (kind, queue) in [("noop", "parked"), ("unhandled", "default")] {
        for chunk in (0..size).collect::<Vec<_>>().chunks(5_000) {
            let batch: Vec<NewJob> = chunk
                .iter()
                .map(|_| {
                    let mut job = NewJob::new("bench-backlog", kind, json!({}));
                    job.queue = queue.to_string();
                    job
                })
                .collect();
            db.job_insert_many(&batch, now).await?;
        }
    }
    eprintln!(
        "backlog of {} jobs added in {:.1} s",
        2 * size,
        started.elapsed().as_secs_f64()
    );
    let after = lease_costs(db, drain_db, slots, "after").await?;
    println!(
        "| idle lease call, {size} jobs in a paused queue + {size} of an unhandled kind | \
         before {} · after {} (p50) |",
        ms(before.0),
        ms(after.0)
    );
    println!(
        "| drain 10,000 no-op jobs beside that backlog | before {:.0} jobs/s · after {:.0} jobs/s |",
        before.1, after.1
    );
    Ok(())
}

/// The median of idle lease calls (nothing runnable, as a polling worker
/// sees it) and the drain rate of 10,000 fresh no-op jobs.
async fn lease_costs(
    db: &Db,
    drain_db: &Db,
    slots: usize,
    label: &str,
) -> anyhow::Result<(Duration, f64)> {
    let kinds = vec!["noop".to_string()];
    let mut samples = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let got = db
            .job_lease("bench-idle", &kinds, 100, 30_000, now_millis())
            .await?;
        db.job_next_run_at(&kinds).await?;
        samples.push(started.elapsed());
        anyhow::ensure!(got.is_empty(), "the backlog must not be leased");
    }
    samples.sort();
    let tenant = format!("bench-drain-{label}");
    let n = 10_000;
    let now = now_millis();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let batch: Vec<NewJob> = chunk
            .iter()
            .map(|_| NewJob::new(&tenant, "noop", json!({})))
            .collect();
        db.job_insert_many(&batch, now).await?;
    }
    let started = Instant::now();
    let (stop, task) = worker(
        drain_db,
        Handlers::new().with("noop", Arc::new(NoopHandler)),
        slots,
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = db.job_count_by_status(Some(&tenant)).await?;
        if done.get("succeeded").copied().unwrap_or(0) >= n as i64 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "drain {label} not done in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    stop.cancel();
    task.await?;
    Ok((percentile(&samples, 0.5), n as f64 / took.as_secs_f64()))
}

fn rss_kib() -> u64 {
    status_rss_kib("/proc/self/status")
}

fn pid_rss_kib(pid: u32) -> u64 {
    status_rss_kib(&format!("/proc/{pid}/status"))
}

fn status_rss_kib(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

async fn wasm(args: WasmArgs) -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("kiln-bench-wasm-{}", now_millis()));
    let blobs = BlobStore::local(&root.join("blobs"))?;
    let runtime = WasmRuntime::new(
        WasmConfig {
            cache_dir: Some(root.join("cache")),
            scratch_dir: root.join("scratch"),
            max_instances: (args.instances as u32 + 200).max(1_100),
            ..WasmConfig::default()
        },
        blobs.clone(),
    )?;
    let hello = WasmRuntime::to_binary(fixtures::hello().as_bytes())?;
    let id = kiln_blob::content_id(&hello);
    blobs
        .put(&kiln_wasm::module_blob_key(&id), hello.clone().into())
        .await?;
    runtime.prepare(&id).await?;
    println!("| kiln wasm | value |\n|---|---|");
    wasm_cached_runs(&runtime, &id).await?;
    wasm_live_instances(&runtime, &id, args.instances).await?;
    let db = Db::connect(&format!("sqlite://{}", root.join("kiln.db").display())).await?;
    db.module_insert(
        "bench",
        &kiln_db::ModuleInfo {
            id: id.clone(),
            size: hello.len() as i64,
            created_at: now_millis(),
        },
    )
    .await?;
    let handlers = Handlers::new().with("wasm", Arc::new(WasmHandler(runtime.clone())));
    let (stop, task) = worker(&db, handlers, args.slots);
    let state = kiln_api::AppState::new(db.clone(), blobs.clone(), Some(runtime.clone()));
    wasm_through_the_api(&db, state, &id, args.requests).await?;
    wasm_through_the_queue(&db, &id, args.jobs, args.slots).await?;
    stop.cancel();
    task.await?;
    wasm_peer(&root.join("hello.wasm"), &hello)?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// Instantiate + run of a cached module, in-process.
async fn wasm_cached_runs(runtime: &WasmRuntime, id: &str) -> anyhow::Result<()> {
    let spec = WasmSpec {
        module: id.to_string(),
        ..WasmSpec::default()
    };
    let kill = CancellationToken::new();
    for _ in 0..200 {
        runtime.run(&spec, &kill).await;
    }
    let rounds = 5_000;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let end = runtime.run(&spec, &kill).await;
        samples.push(t.elapsed());
        anyhow::ensure!(
            matches!(end, AttemptEnd::Succeeded(_)),
            "hello failed: {end:?}"
        );
    }
    samples.sort();
    println!(
        "| instantiate + run cached hello world ({rounds} runs) | p50 {} · p99 {} |",
        us(percentile(&samples, 0.5)),
        us(percentile(&samples, 0.99))
    );
    Ok(())
}

/// Host memory for live instances.
async fn wasm_live_instances(
    runtime: &WasmRuntime,
    id: &str,
    instances: usize,
) -> anyhow::Result<()> {
    let before = rss_kib();
    let mut live = Vec::with_capacity(instances);
    for _ in 0..instances {
        live.push(runtime.instantiate_idle(id).await?);
    }
    let after = rss_kib();
    println!(
        "| {} live instances | {} KiB RSS added ({:.1} KiB each) |",
        instances,
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / instances as f64
    );
    Ok(())
}

/// Embedded kiln (SQLite, worker and API in this process): submit→result
/// over HTTP, one request at a time.
async fn wasm_through_the_api(
    db: &Db,
    state: Arc<kiln_api::AppState>,
    id: &str,
    requests: usize,
) -> anyhow::Result<()> {
    let (_, secret) = kiln_api::issue_key(
        db,
        "bench",
        "bench",
        kiln_core::Scopes(vec![kiln_core::Scope::Write]),
    )
    .await?;
    // As `kiln serve` runs by default: every request passes the limiter.
    state.limit_rate(crate::config::DEFAULT_RATE_LIMIT, 0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server_stop = CancellationToken::new();
    let server = {
        let stop = server_stop.clone();
        tokio::spawn(async move {
            kiln_api::serve(listener, state, async move { stop.cancelled().await }).await
        })
    };
    let http = reqwest::Client::new();
    let body = json!({"kind": "wasm", "spec": {"module": id}});
    let url = format!("http://{addr}/api/v1/run");
    let mut samples = Vec::with_capacity(requests);
    for i in 0..requests + 100 {
        let t = Instant::now();
        let job: serde_json::Value = http
            .post(&url)
            .bearer_auth(&secret)
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        let took = t.elapsed();
        anyhow::ensure!(
            job["result"]["stdout"] == "hello world\n",
            "unexpected: {job}"
        );
        if i >= 100 {
            samples.push(took);
        }
    }
    samples.sort();
    println!(
        "| submit→result, POST /api/v1/run, keep-alive, one at a time ({} requests) | p50 {} · p99 {} |",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99))
    );
    server_stop.cancel();
    let _ = server.await;
    Ok(())
}

/// Sustained jobs/s through the queue.
async fn wasm_through_the_queue(
    db: &Db,
    id: &str,
    jobs: usize,
    slots: usize,
) -> anyhow::Result<()> {
    let already = db.job_count_by_status(None).await?.values().sum::<i64>() as usize;
    let now = now_millis();
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(1_000) {
        let batch: Vec<NewJob> = chunk
            .iter()
            .map(|_| NewJob::new("bench", "wasm", json!({"module": id})))
            .collect();
        db.job_insert_many(&batch, now).await?;
    }
    wait_drained(db, Duration::from_secs(600)).await?;
    let last = db.job_last_finished_at().await?.unwrap_or(now);
    let took = Duration::from_millis((last - now).max(1) as u64);
    let counts = db.job_count_by_status(None).await?;
    println!(
        "| {} hello-world wasm jobs, enqueue + drain, {} slots | {:.0} jobs/s (succeeded: {}) |",
        jobs,
        slots,
        jobs as f64 / took.as_secs_f64(),
        counts.get("succeeded").copied().unwrap_or(0) as usize - already
    );
    Ok(())
}

/// The peer: one wasmtime process per run, if it is installed.
fn wasm_peer(file: &std::path::Path, hello: &[u8]) -> anyhow::Result<()> {
    std::fs::write(file, hello)?;
    let Some(wasmtime) = which("wasmtime") else {
        println!("| peer: `wasmtime run` | not installed here |");
        return Ok(());
    };
    let version = std::process::Command::new(&wasmtime)
        .arg("--version")
        .output()?;
    let mut samples = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let out = std::process::Command::new(&wasmtime)
            .arg("run")
            .arg(file)
            .output()?;
        samples.push(t.elapsed());
        anyhow::ensure!(out.stdout == b"hello world\n", "wasmtime run failed");
    }
    samples.sort();
    println!(
        "| peer: `wasmtime run hello.wasm` ({}), 50 runs | p50 {} · p99 {} |",
        String::from_utf8_lossy(&version.stdout).trim(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99))
    );
    Ok(())
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn bench_vm(image: &str) -> kiln_vm::VmRequest {
    kiln_vm::VmRequest {
        tenant: "bench".into(),
        image: image.into(),
        vcpus: 1,
        memory_mib: 128,
        ttl: None,
        idle_timeout: None,
        labels: Default::default(),
        network: None,
    }
}

fn run_true() -> kiln_vm::Exec {
    kiln_vm::Exec {
        command: "true".into(),
        ..kiln_vm::Exec::default()
    }
}

async fn vm(args: VmArgs) -> anyhow::Result<()> {
    let images = args
        .images
        .unwrap_or_else(|| crate::config::default_data_dir().join("images"));
    let image = kiln_vm::image::Image::open(&images, &args.image)?;
    let work = std::env::temp_dir().join(format!("kiln-bench-vm-{}", now_millis()));
    let config = crate::config::vm_config(&args.host, None, &kiln_core::TenantQuotas::default())?;
    let vms = kiln_vm::VmManager::start(&images, &work.join("vms"), config).await?;
    println!(
        "| kiln microVM ({}, image {}) | value |\n|---|---|",
        vms.accelerator().as_str(),
        args.image
    );
    if args.build {
        vm_image_build(&images, &image, &work).await?;
    }
    println!(
        "| image {}: size on disk (kernel, initramfs{}) | {:.1} MiB |",
        args.image,
        if image.manifest.rootfs.is_some() {
            ", erofs root filesystem"
        } else {
            ""
        },
        image.size_bytes() as f64 / (1 << 20) as f64
    );
    vm_starts(&vms, &args.image, args.boots).await?;
    vm_execs(&vms, &args.image, args.execs).await?;
    vm_capacity(&vms, &args.image, args.max_vms).await?;
    vms.shutdown().await;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Create → first exec: the first VM of a shape, snapshot restores, full
/// boots and the warm pool. Leaves one warm VM in the pool.
async fn vm_starts(vms: &Arc<kiln_vm::VmManager>, image: &str, boots: usize) -> anyhow::Result<()> {
    // A fresh snapshot for the bench's shape: the first create boots.
    let snapshot = vms.snapshot_path(image, 1, 128)?;
    let _ = std::fs::remove_file(&snapshot);
    let time_create = |vms: Arc<kiln_vm::VmManager>| async move {
        let t = Instant::now();
        let vm = vms.create(bench_vm(image)).await?;
        let agent = vms.agent("bench", &vm.id).await.context("vm vanished")?;
        agent.exec(run_true(), b"").await?;
        let took = t.elapsed();
        vms.delete("bench", &vm.id).await;
        anyhow::Ok(took)
    };
    let first = time_create(vms.clone()).await?;
    println!(
        "| first VM of a shape: full boot + saving its snapshot, → first exec | {} |",
        ms(first)
    );
    let mut cold = Vec::new();
    for _ in 0..boots {
        cold.push(time_create(vms.clone()).await?);
    }
    print_p50_max(
        "create → first exec, no warm VM, snapshot restore",
        &mut cold,
    );
    vms.use_snapshots(false);
    let mut full = Vec::new();
    for _ in 0..boots {
        full.push(time_create(vms.clone()).await?);
    }
    vms.use_snapshots(true);
    print_p50_max(
        "create → first exec, full boot with snapshots off",
        &mut full,
    );
    vms.keep_warm(image, 1, 128, 1);
    let mut warm = Vec::new();
    for _ in 0..boots {
        while vms.warm_count() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        warm.push(time_create(vms.clone()).await?);
    }
    print_p50_max("create → first exec from the warm pool", &mut warm);
    while vms.warm_count() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Round trips to one VM's agent: pings and execs of `true`, and the host
/// memory of the idle VM.
async fn vm_execs(vms: &Arc<kiln_vm::VmManager>, image: &str, execs: usize) -> anyhow::Result<()> {
    let vm = vms.create(bench_vm(image)).await?;
    let agent = vms.agent("bench", &vm.id).await.context("vm vanished")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "| host RSS of one idle 128 MiB VM of {image} just created (QEMU process) | {} MiB |",
        vm.pid.map(pid_rss_kib).unwrap_or(0) / 1024
    );
    for _ in 0..20 {
        agent.exec(run_true(), b"").await?;
    }
    let mut round = Vec::new();
    let mut inside = Vec::new();
    for _ in 0..execs {
        let t = Instant::now();
        let out = agent.exec(run_true(), b"").await?;
        round.push(t.elapsed());
        inside.push(out.duration);
    }
    inside.sort();
    round.sort();
    let mut pings = Vec::new();
    for _ in 0..execs {
        let t = Instant::now();
        agent.ping(Duration::from_secs(5)).await?;
        pings.push(t.elapsed());
    }
    pings.sort();
    println!(
        "| agent ping round trip, no process started ({} runs) | p50 {} · p99 {} |",
        pings.len(),
        ms(percentile(&pings, 0.5)),
        ms(percentile(&pings, 0.99))
    );
    println!(
        "| exec round trip of `true` ({} runs) | p50 {} · p99 {} (inside the guest, spawn to reaped: p50 {}) |",
        round.len(),
        ms(percentile(&round, 0.5)),
        ms(percentile(&round, 0.99)),
        ms(percentile(&inside, 0.5))
    );
    if image != "default" {
        vm_python_execs(&agent, execs.min(50)).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = vm.pid.map(pid_rss_kib).unwrap_or(0);
    println!(
        "| host RSS of the same VM, idle after the execs above (QEMU process) | {} MiB |",
        rss / 1024
    );
    vms.delete("bench", &vm.id).await;
    Ok(())
}

/// How many VMs start and answer at once, up to `max_vms`.
async fn vm_capacity(
    vms: &Arc<kiln_vm::VmManager>,
    image: &str,
    max_vms: usize,
) -> anyhow::Result<()> {
    let mut alive = Vec::new();
    let mut failure = None;
    for _ in 0..max_vms {
        match vms.create(bench_vm(image)).await {
            Ok(vm) => alive.push(vm),
            Err(error) => {
                failure = Some(error.to_string());
                break;
            }
        }
    }
    let mut answering = 0;
    for vm in &alive {
        if let Some(agent) = vms.agent("bench", &vm.id).await {
            if agent
                .exec(run_true(), b"")
                .await
                .is_ok_and(|o| o.exit_code == Some(0))
            {
                answering += 1;
            }
        }
    }
    println!(
        "| VMs alive at once (stopped at --max-vms {}) | {} started, {} answering{} |",
        max_vms,
        alive.len(),
        answering,
        failure
            .map(|f| format!("; first failure: {f}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// `python3 -c 'print(1)'` round trips in a VM of a root filesystem image
/// (the first one apart: it reads Python from the drive).
async fn vm_python_execs(agent: &kiln_vm::AgentConn, runs: usize) -> anyhow::Result<()> {
    let python = || kiln_vm::Exec {
        command: "python3".into(),
        args: vec!["-c".into(), "print(1)".into()],
        ..kiln_vm::Exec::default()
    };
    let t = Instant::now();
    let out = agent.exec(python(), b"").await?;
    let first = t.elapsed();
    anyhow::ensure!(out.stdout == b"1\n", "python3 printed {:?}", out.stdout);
    let mut round = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        agent.exec(python(), b"").await?;
        round.push(t.elapsed());
    }
    round.sort();
    println!(
        "| exec round trip of `python3 -c 'print(1)'` ({} runs) | p50 {} · p99 {} (first after create: {}) |",
        round.len(),
        ms(percentile(&round, 0.5)),
        ms(percentile(&round, 0.99)),
        ms(first)
    );
    Ok(())
}

/// Builds `image` again into a scratch images directory that shares the
/// compiled kernel and downloaded kernel packages: once with an empty apt
/// cache, once more with the cache the first build filled.
async fn vm_image_build(
    images: &std::path::Path,
    image: &kiln_vm::image::Image,
    work: &std::path::Path,
) -> anyhow::Result<()> {
    let packages = image
        .manifest
        .rootfs
        .as_ref()
        .map(|r| r.packages.clone())
        .context("--build times root filesystem images (python, node, --packages)")?;
    let scratch = work.join("images");
    std::fs::create_dir_all(&scratch)?;
    for shared in [".kernels", ".debs"] {
        std::os::unix::fs::symlink(images.join(shared), scratch.join(shared))?;
    }
    let agent = kiln_vm::image::find_agent().context("no agent binary (KILN_AGENT_BIN)")?;
    let spec = kiln_vm::image::BuildSpec::rootfs(&image.manifest.name, &packages)?;
    let mut took = Vec::new();
    for _ in 0..2 {
        let (scratch, spec, agent) = (scratch.clone(), spec.clone(), agent.clone());
        let t = Instant::now();
        tokio::task::spawn_blocking(move || {
            kiln_vm::image::build_with(&scratch, "bench", &spec, &agent, &mut |_, _, _| {})
        })
        .await??;
        took.push(t.elapsed());
    }
    println!(
        "| image build, {} packages asked ({}), kernel already compiled | cold apt cache {:.1} s · warm apt cache {:.1} s |",
        packages.len(),
        packages.join(","),
        took[0].as_secs_f64(),
        took[1].as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
