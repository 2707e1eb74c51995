//! The kiln binary: server roles, client commands and benchmarks.

mod audit_cli;
mod bench;
mod client;
mod config;
mod events_cli;
mod flow_cli;
mod incident_cli;
mod logs_cli;
mod node_cli;
mod policy_cli;
mod rule_cli;
mod secret_cli;
mod serve;
mod top_cli;
mod users_cli;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use client::{Client, ClientArgs};
use config::ServerArgs;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Run untrusted code in microVMs and WebAssembly sandboxes, durably."
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, env = "KILN_LOG_JSON", global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// API, worker and scheduler in one process (SQLite by default).
    Serve(ServerArgs),
    /// The HTTP API alone.
    Api(ServerArgs),
    /// A worker alone: runs jobs from the shared database.
    Worker(ServerArgs),
    /// The scheduler alone: takes back expired leases, advances pipeline runs, fires schedules.
    Scheduler(ServerArgs),
    /// Print the settings a server would run with (passwords hidden).
    Config(ServerArgs),
    /// Manage API keys directly in the database.
    #[command(subcommand, alias = "key")]
    Keys(KeysCommand),
    /// Jobs through the API.
    Job {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: JobCommand,
    },
    /// Queues through the API.
    Queue {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// WebAssembly modules through the API.
    Module {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: ModuleCommand,
    },
    /// Pipelines: DAGs of job steps, versioned; `pipeline run` starts one.
    Pipeline {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: flow_cli::PipelineCommand,
    },
    /// Run something once and print its output (exits with its exit code),
    /// or look after pipeline runs.
    Run {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: RunCommand,
    },
    /// Cron schedules that fire a job or a pipeline run.
    Schedule {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: flow_cli::ScheduleCommand,
    },
    /// The event log: `events tail` follows it.
    Events {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: events_cli::EventsCommand,
    },
    /// Live logs: jobs' and VM commands' output as produced, and (for the
    /// deployment's key) the nodes' own lines; -f follows them.
    Logs {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: logs_cli::LogsArgs,
    },
    /// The fleet: every kiln process, its load, drain and resume.
    Node {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: node_cli::NodeCommand,
    },
    /// Secrets: set (value from stdin), list, remove; rotate the master key.
    #[command(subcommand)]
    Secret(secret_cli::SecretCommand),
    /// Users of a tenant with roles (passwords from stdin); rotate the
    /// session token key.
    #[command(subcommand)]
    Users(users_cli::UsersCommand),
    /// Sign in as a user; prints a session token (password from stdin).
    Login {
        /// The API's base URL.
        #[arg(long, env = "KILN_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        username: String,
    },
    /// The audit trail: list, export as JSON lines, verify the chain.
    #[command(subcommand)]
    Audit(audit_cli::AuditCommand),
    /// Incidents the detectors opened: list, acknowledge, resolve.
    Incident {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: incident_cli::IncidentCommand,
    },
    /// Admission policies: rules every submitted job must satisfy.
    Policy {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: policy_cli::PolicyCommand,
    },
    /// Self-healing rules: apply from a file, list, dry-run, what they did.
    Rule {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: rule_cli::RuleCommand,
    },
    /// The dashboard in the terminal, redrawn every 2 s (`--once`: one frame).
    Top {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: top_cli::TopArgs,
    },
    /// Guest images for microVMs.
    #[command(subcommand)]
    Image(ImageCommand),
    /// MicroVMs through the API.
    Vm {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Benchmarks; results go to stdout as Markdown.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Delete finished jobs past their retention (in batches) and workers
    /// long silent, once; `kiln scheduler` does it in the background.
    Gc(GcArgs),
}

#[derive(clap::Args)]
struct GcArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Keep finished jobs for this many hours after they finished.
    #[arg(long, default_value_t = 168)]
    keep_hours: u64,
    /// Most jobs one delete statement removes.
    #[arg(long, default_value_t = 1_000)]
    batch: i64,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print its secret (shown once).
    Create {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, default_value = "default")]
        tenant: String,
        #[arg(long, default_value = "cli")]
        name: String,
        /// Comma-separated: read, write, approve, admin.
        #[arg(long, default_value = "write")]
        scopes: String,
        /// The key stops working this many seconds from now.
        #[arg(long)]
        expires_in_s: Option<u64>,
    },
    /// The keys: id, tenant, name, scopes, state, expiry, last use.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long)]
        tenant: Option<String>,
    },
    Revoke {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Enqueue a job.
    Submit {
        #[arg(long)]
        kind: String,
        /// The spec as JSON.
        #[arg(long, default_value = "{}")]
        spec: String,
        #[command(flatten)]
        options: SubmitOptions,
        /// Wait for the result.
        #[arg(long)]
        wait: bool,
    },
    Get {
        id: String,
    },
    Ls(JobFilterArgs),
    Cancel {
        id: String,
    },
    Retry {
        id: String,
    },
    Attempts {
        id: String,
    },
    /// Wait until the job finishes; print it; exit non-zero unless it succeeded.
    Wait {
        id: String,
        #[arg(long, default_value_t = 600_000)]
        timeout_ms: u64,
    },
    /// The job's whole output (every attempt); -f follows it live until
    /// the job ends.
    Logs(logs_cli::JobLogsArgs),
}

/// What a submitted job may set besides its kind and spec.
#[derive(Args)]
struct SubmitOptions {
    #[arg(long)]
    queue: Option<String>,
    #[arg(long)]
    priority: Option<String>,
    #[arg(long)]
    max_attempts: Option<i32>,
    #[arg(long)]
    timeout_ms: Option<i64>,
    #[arg(long)]
    delay_ms: Option<i64>,
    #[arg(long)]
    idempotency_key: Option<String>,
    /// key=value, repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
}

#[derive(Args)]
struct JobFilterArgs {
    #[arg(long)]
    status: Option<String>,
    #[arg(long)]
    kind: Option<String>,
    #[arg(long)]
    queue: Option<String>,
    /// key:value
    #[arg(long)]
    label: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: i64,
    #[arg(long)]
    cursor: Option<String>,
}

#[derive(Subcommand)]
enum QueueCommand {
    Ls,
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Set or clear (with 0) a queue's concurrency limit.
    Limit {
        name: String,
        limit: i32,
    },
}

#[derive(Subcommand)]
enum ModuleCommand {
    /// Store a module (.wasm, or .wat text); prints its id.
    Push {
        file: PathBuf,
    },
    Ls,
    Rm {
        id: String,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build (or rebuild) a guest image from Debian packages and kiln's agent:
    /// `default` is the busybox initramfs; `python` and `node` are presets
    /// of a Debian root filesystem; any other name takes `--packages`, or
    /// `--from` for the root filesystem of an OCI image.
    Build {
        #[command(flatten)]
        server: ServerArgs,
        /// The image's name (`[a-z0-9][a-z0-9-]*`).
        #[arg(default_value = "default")]
        name: String,
        /// Debian packages (comma-separated) for a root filesystem image,
        /// e.g. python3,git,curl,gcc; their dependencies come along.
        #[arg(long, value_delimiter = ',', conflicts_with = "from")]
        packages: Vec<String>,
        /// An OCI image as the root filesystem: REGISTRY/REPO:TAG (or
        /// @sha256:…; linux/amd64), or oci-layout:DIR[:TAG] for a local
        /// OCI layout. Its Env, WorkingDir and User become the defaults of
        /// every command in its VMs.
        #[arg(long)]
        from: Option<String>,
        /// Speak plain HTTP to the registry (always so for 127.0.0.1 and
        /// localhost); credentials then cross the network unencrypted.
        #[arg(long, requires = "from")]
        insecure: bool,
        /// The registry's user; the password comes from
        /// --registry-password-stdin or KILN_REGISTRY_PASSWORD. Without
        /// it: KILN_REGISTRY_USER and KILN_REGISTRY_PASSWORD, else the
        /// registry's entry in the Docker config ($DOCKER_CONFIG/config.json
        /// or ~/.docker/config.json), else anonymous.
        #[arg(long, requires = "from")]
        registry_user: Option<String>,
        /// Read the registry's password from the first line of stdin.
        #[arg(long, requires = "registry_user")]
        registry_password_stdin: bool,
        /// Refuse an OCI image whose layers unpack to more than this.
        #[arg(long, default_value_t = 4096, requires = "from")]
        max_unpacked_mib: u64,
        /// Keep a root filesystem image that is already what this build
        /// would make (same packages, agent, kernel configuration).
        #[arg(long)]
        if_changed: bool,
        /// The static agent binary (default: the cargo target dir's musl build).
        #[arg(long, env = "KILN_AGENT_BIN")]
        agent: Option<PathBuf>,
        /// `minimal`: compiled from Debian's linux-source (needs gcc, make,
        /// flex, bison, bc, libelf-dev; a few minutes, once); `cloud`:
        /// Debian's cloud kernel as packaged (no compiler, slower guests).
        #[arg(long, default_value = "minimal", value_parser = ["minimal", "cloud"])]
        kernel: String,
    },
    Ls {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
enum VmCommand {
    Create {
        #[arg(long, default_value = "default")]
        image: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        #[arg(long, default_value_t = 128)]
        memory_mib: u32,
        #[arg(long)]
        ttl_s: Option<u64>,
    },
    Ls,
    /// Run a command in a VM; prints its output and exits with its code.
    Exec {
        id: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copy a file in (`kiln vm cp FILE ID:/path`) or out (`kiln vm cp ID:/path FILE`).
    Cp {
        from: String,
        to: String,
    },
    Rm {
        id: String,
    },
    /// The commands run in a VM, newest first (kept after the VM is gone).
    Executions {
        id: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum RunCommand {
    /// Run a WebAssembly module: a file (pushed first) or a stored module id.
    Wasm {
        module: String,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env")]
        env: Vec<String>,
        /// Read the program's stdin from this file ('-' for kiln's own stdin).
        #[arg(long)]
        stdin: Option<PathBuf>,
        #[arg(long)]
        memory_mib: Option<u64>,
        #[arg(long)]
        timeout_ms: Option<i64>,
        /// Arguments for the program.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run a command in a fresh microVM, torn down afterwards.
    Vm {
        #[arg(long, default_value = "default")]
        image: String,
        #[arg(long)]
        timeout_ms: Option<i64>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    #[command(flatten)]
    Pipeline(flow_cli::RunsCommand),
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,wasmtime=warn,cranelift=warn")
    });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The node's own info/warn/error lines also go to the live logs once a
    // server role starts its log writer (`source=node`).
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(kiln_logs::node_layer());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match run(cli.command).await {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("kiln: {error:#}");
            std::process::exit(2);
        }
    }
}

async fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Serve(args) => serve_as(args, serve::Role::All).await,
        Command::Api(args) => serve_as(args, serve::Role::Api).await,
        Command::Worker(args) => serve_as(args, serve::Role::Worker).await,
        Command::Scheduler(args) => serve_as(args, serve::Role::Scheduler).await,
        Command::Config(args) => {
            for (name, value) in args.settings()?.describe() {
                println!("{name} = {value}");
            }
            Ok(0)
        }
        Command::Keys(command) => keys(command).await,
        Command::Job { client, command } => job(Client::new(&client)?, command).await,
        Command::Queue { client, command } => queue(Client::new(&client)?, command).await,
        Command::Module { client, command } => module(Client::new(&client)?, command).await,
        Command::Pipeline { client, command } => {
            flow_cli::pipeline(Client::new(&client)?, command).await
        }
        Command::Run { client, command } => run_once(Client::new(&client)?, command).await,
        Command::Schedule { client, command } => {
            flow_cli::schedule(Client::new(&client)?, command).await
        }
        Command::Logs { client, args } => logs_cli::logs(Client::new(&client)?, args).await,
        Command::Events { client, command } => {
            events_cli::events(Client::new(&client)?, command).await
        }
        Command::Node { client, command } => node_cli::node(Client::new(&client)?, command).await,
        Command::Secret(command) => secret_cli::secret(command).await,
        Command::Audit(command) => audit_cli::audit(command).await,
        Command::Users(command) => users_cli::users(command).await,
        Command::Login {
            url,
            tenant,
            username,
        } => users_cli::login(&url, &tenant, &username).await,
        Command::Incident { client, command } => {
            incident_cli::incident(Client::new(&client)?, command).await
        }
        Command::Rule { client, command } => rule_cli::rule(Client::new(&client)?, command).await,
        Command::Policy { client, command } => {
            policy_cli::policy(Client::new(&client)?, command).await
        }
        Command::Top { client, args } => top_cli::top(Client::new(&client)?, args).await,
        Command::Image(command) => image(command).await,
        Command::Vm { client, command } => vm(Client::new(&client)?, command).await,
        Command::Bench(command) => bench::run(command).await.map(|_| 0),
        Command::Gc(args) => gc(args).await,
    }
}

async fn serve_as(args: ServerArgs, role: serve::Role) -> anyhow::Result<i32> {
    serve::run(args.settings()?, role).await.map(|_| 0)
}

/// Settings for a command that works on the data dir directly.
fn local_settings(args: &ServerArgs) -> anyhow::Result<config::Settings> {
    let settings = args.settings()?;
    settings.create_data_dir()?;
    Ok(settings)
}

async fn gc(args: GcArgs) -> anyhow::Result<i32> {
    let db = serve::open_db(&args.server.settings()?).await?;
    let settings = args.server.settings()?;
    let retention = kiln_worker::Retention {
        finished_jobs: std::time::Duration::from_secs(args.keep_hours.saturating_mul(3600)),
        events: std::time::Duration::from_secs(settings.event_retention_hours.saturating_mul(3600)),
        logs: std::time::Duration::from_secs(settings.log_retention_hours.saturating_mul(3600)),
        log_blobs: Some(serve::open_blobs(&settings, &db)?),
        batch: args.batch.max(1),
        ..kiln_worker::Retention::default()
    };
    let now = kiln_worker::now_millis();
    let stop = tokio_util::sync::CancellationToken::new();
    let done = kiln_worker::collect_garbage(&db, &retention, now, &stop).await?;
    eprintln!(
        "deleted {} finished jobs ({} statements), {} silent workers, {} events, {} VM executions, \
         {} log chunks and {} dashboard rollup rows; folded {} hours of rollups",
        done.jobs,
        done.batches,
        done.workers,
        done.events,
        done.executions,
        done.log_chunks,
        done.rollups,
        done.rollup_hours_folded
    );
    Ok(0)
}

async fn keys(command: KeysCommand) -> anyhow::Result<i32> {
    match command {
        KeysCommand::Create {
            server,
            tenant,
            name,
            scopes,
            expires_in_s,
        } => {
            let db = serve::open_db(&local_settings(&server)?).await?;
            let expires_at = match expires_in_s {
                Some(0) => anyhow::bail!("--expires-in-s must be at least 1"),
                Some(s) => Some(
                    i64::try_from(s)
                        .ok()
                        .and_then(|s| s.checked_mul(1000))
                        .and_then(|ms| kiln_worker::now_millis().checked_add(ms))
                        .context("--expires-in-s is too large")?,
                ),
                None => None,
            };
            let scopes = kiln_core::Scopes::parse(&scopes)
                .filter(|s| !s.0.is_empty())
                .context("scopes are a comma-separated list of read, write, approve, admin")?;
            kiln_core::validate_name("tenant", &tenant)?;
            let (key, secret) =
                kiln_api::issue_key_until(&db, &tenant, &name, scopes, expires_at).await?;
            eprintln!(
                "created key {} for tenant {} ({})",
                key.id,
                key.tenant,
                key.scopes.to_text()
            );
            println!("{secret}");
        }
        KeysCommand::List { server, tenant } => {
            let db = serve::open_db(&local_settings(&server)?).await?;
            let now = kiln_worker::now_millis();
            let time = |ms: Option<i64>| {
                ms.and_then(kiln_api::render_time)
                    .unwrap_or_else(|| "-".to_string())
            };
            println!("id\ttenant\tname\tscopes\tstate\texpires_at\tlast_used_at");
            for key in db.key_list(tenant.as_deref()).await? {
                let state = if key.revoked_at.is_some() {
                    "revoked"
                } else if key.expired(now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{}\t{}\t{}\t{}\t{state}\t{}\t{}",
                    key.id,
                    key.tenant,
                    key.name,
                    key.scopes.to_text(),
                    time(key.expires_at),
                    time(key.last_used_at)
                );
            }
        }
        KeysCommand::Revoke { server, id } => {
            let db = serve::open_db(&local_settings(&server)?).await?;
            if !db.key_revoke(None, &id, kiln_worker::now_millis()).await? {
                anyhow::bail!("no active key {id}");
            }
            eprintln!("revoked {id}");
        }
    }
    Ok(0)
}

async fn job(client: Client, command: JobCommand) -> anyhow::Result<i32> {
    match command {
        JobCommand::Submit {
            kind,
            spec,
            options,
            wait,
        } => {
            let body = submit_body(&kind, &spec, options)?;
            let path = if wait {
                "/api/v1/jobs?wait=true"
            } else {
                "/api/v1/jobs"
            };
            client::print(&client.post(path, &body).await?);
        }
        JobCommand::Get { id } => client::print(&client.get(&format!("/api/v1/jobs/{id}")).await?),
        JobCommand::Ls(filter) => list_jobs(&client, filter).await?,
        JobCommand::Cancel { id } => client::print(
            &client
                .post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}))
                .await?,
        ),
        JobCommand::Retry { id } => client::print(
            &client
                .post(&format!("/api/v1/jobs/{id}/retry"), &json!({}))
                .await?,
        ),
        JobCommand::Attempts { id } => {
            client::print(&client.get(&format!("/api/v1/jobs/{id}/attempts")).await?)
        }
        JobCommand::Logs(args) => return logs_cli::job_logs(client, args).await,
        JobCommand::Wait { id, timeout_ms } => return wait_for_job(&client, &id, timeout_ms).await,
    }
    Ok(0)
}

/// The body of `POST /api/v1/jobs`: only the options given.
fn submit_body(kind: &str, spec: &str, options: SubmitOptions) -> anyhow::Result<Value> {
    let spec: Value = serde_json::from_str(spec).context("--spec is not JSON")?;
    let mut body = json!({"kind": kind, "spec": spec});
    let fields = [
        ("queue", options.queue.map(Value::from)),
        ("priority", options.priority.map(Value::from)),
        ("max_attempts", options.max_attempts.map(Value::from)),
        ("timeout_ms", options.timeout_ms.map(Value::from)),
        ("delay_ms", options.delay_ms.map(Value::from)),
        ("idempotency_key", options.idempotency_key.map(Value::from)),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            body[name] = value;
        }
    }
    if !options.labels.is_empty() {
        body["labels"] = json!(client::parse_labels(&options.labels)?);
    }
    Ok(body)
}

async fn list_jobs(client: &Client, filter: JobFilterArgs) -> anyhow::Result<()> {
    let mut query = vec![format!("limit={}", filter.limit)];
    for (name, value) in [
        ("status", filter.status),
        ("kind", filter.kind),
        ("queue", filter.queue),
        ("label", filter.label),
        ("cursor", filter.cursor),
    ] {
        if let Some(value) = value {
            query.push(format!("{name}={}", urlencode(&value)));
        }
    }
    let list = client
        .get(&format!("/api/v1/jobs?{}", query.join("&")))
        .await?;
    for job in list["jobs"].as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}",
            job["id"].as_str().unwrap_or(""),
            job["status"].as_str().unwrap_or(""),
            job["kind"].as_str().unwrap_or(""),
            job["queue"].as_str().unwrap_or(""),
            job["attempts"],
            job["created_at"].as_str().unwrap_or("")
        );
    }
    if let Some(next) = list["next_cursor"].as_str() {
        eprintln!("more: --cursor {next}");
    }
    Ok(())
}

/// Polls until the job finishes; prints it; 0 only if it succeeded.
async fn wait_for_job(client: &Client, id: &str, timeout_ms: u64) -> anyhow::Result<i32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms);
    loop {
        let job = client.get(&format!("/api/v1/jobs/{id}")).await?;
        let status = job["status"].as_str().unwrap_or("");
        if ["succeeded", "failed", "cancelled", "dead"].contains(&status) {
            client::print(&job);
            return Ok(if status == "succeeded" { 0 } else { 1 });
        }
        if std::time::Instant::now() > deadline {
            client::print(&job);
            anyhow::bail!("job {id} still {status} after {timeout_ms} ms");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn queue(client: Client, command: QueueCommand) -> anyhow::Result<i32> {
    match command {
        QueueCommand::Ls => {
            let list = client.get("/api/v1/queues").await?;
            for q in list["queues"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\twaiting={}\trunning={}\tlimit={}",
                    q["name"].as_str().unwrap_or(""),
                    if q["paused"].as_bool() == Some(true) {
                        "paused"
                    } else {
                        "active"
                    },
                    q["waiting"],
                    q["running"],
                    q["concurrency_limit"]
                );
            }
        }
        QueueCommand::Pause { name } => client::print(
            &client
                .post(&format!("/api/v1/queues/{name}/pause"), &json!({}))
                .await?,
        ),
        QueueCommand::Resume { name } => client::print(
            &client
                .post(&format!("/api/v1/queues/{name}/resume"), &json!({}))
                .await?,
        ),
        QueueCommand::Limit { name, limit } => {
            let limit = if limit > 0 { json!(limit) } else { Value::Null };
            let body = json!({ "concurrency_limit": limit });
            let response = client.put(&format!("/api/v1/queues/{name}"), &body).await?;
            client::print(&response);
        }
    }
    Ok(0)
}

async fn module(client: Client, command: ModuleCommand) -> anyhow::Result<i32> {
    match command {
        ModuleCommand::Push { file } => println!("{}", client::push_module(&client, &file).await?),
        ModuleCommand::Ls => {
            let list = client.get("/api/v1/modules").await?;
            for m in list["modules"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}",
                    m["id"].as_str().unwrap_or(""),
                    m["size"],
                    m["created_at"].as_str().unwrap_or("")
                );
            }
        }
        ModuleCommand::Rm { id } => {
            client.delete(&format!("/api/v1/modules/{id}")).await?;
        }
    }
    Ok(0)
}

async fn run_once(client: Client, command: RunCommand) -> anyhow::Result<i32> {
    match command {
        RunCommand::Wasm {
            module,
            env,
            stdin,
            memory_mib,
            timeout_ms,
            args,
        } => {
            let path = std::path::Path::new(&module);
            let id = if module.starts_with("sha256:") && !path.exists() {
                module
            } else {
                client::push_module(&client, path).await?
            };
            let stdin = match stdin {
                Some(p) if p.as_os_str() == "-" => {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
                    text
                }
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?,
                None => String::new(),
            };
            let mut spec = json!({"module": id, "args": args, "env": client::parse_labels(&env)?, "stdin": stdin});
            if let Some(memory_mib) = memory_mib {
                spec["memory_mib"] = json!(memory_mib);
            }
            let job = client
                .post("/api/v1/run", &client::run_body("wasm", spec, timeout_ms))
                .await?;
            Ok(client::finish_like_the_program(&job))
        }
        RunCommand::Vm {
            image,
            timeout_ms,
            command,
        } => {
            let spec = json!({"image": image, "command": command[0], "args": &command[1..]});
            let job = client
                .post("/api/v1/run", &client::run_body("vm", spec, timeout_ms))
                .await?;
            Ok(client::finish_like_the_program(&job))
        }
        RunCommand::Pipeline(command) => flow_cli::runs(client, command).await,
    }
}

async fn image(command: ImageCommand) -> anyhow::Result<i32> {
    match command {
        ImageCommand::Build {
            server,
            name,
            packages,
            from,
            insecure,
            registry_user,
            registry_password_stdin,
            max_unpacked_mib,
            if_changed,
            agent,
            kernel,
        } => {
            let kernel = kiln_vm::image::KernelKind::parse(&kernel).context("--kernel")?;
            let settings = local_settings(&server)?;
            kiln_core::names::check_ident("image", &name)?;
            let spec = if let Some(from) = from {
                use kiln_vm::image::oci;
                let limits = oci::Limits {
                    max_unpacked_bytes: max_unpacked_mib.saturating_mul(1 << 20),
                    ..oci::Limits::default()
                };
                let source = oci::OciSource::parse(&from, insecure)?;
                let credentials = match &source {
                    oci::OciSource::Registry { reference, .. } => {
                        let password = registry_password_stdin
                            .then(read_password_line)
                            .transpose()?;
                        oci::auth::resolve(
                            reference,
                            registry_user.as_deref(),
                            password.as_deref(),
                            &|name| std::env::var(name).ok(),
                        )?
                    }
                    oci::OciSource::Layout { .. } if registry_user.is_some() => {
                        anyhow::bail!("--registry-user is for a registry, not an oci-layout")
                    }
                    oci::OciSource::Layout { .. } => None,
                };
                kiln_vm::image::BuildSpec::oci(source.with_credentials(credentials)?, limits)
            } else if packages.is_empty() && name == "default" {
                kiln_vm::image::BuildSpec::busybox(kernel)
            } else {
                kiln_vm::image::BuildSpec::rootfs(&name, &packages)?
            };
            let agent = agent.or_else(kiln_vm::image::find_agent).context(
                "no agent binary: cargo build --profile agent -p kiln-agent --target x86_64-unknown-linux-musl, or pass --agent",
            )?;
            let dir = settings.data_dir.join("images");
            if if_changed && kiln_vm::image::up_to_date(&dir, &name, &spec, &agent) {
                println!("image {name} is up to date");
                return Ok(0);
            }
            let started = std::time::Instant::now();
            let built = tokio::task::spawn_blocking(move || {
                kiln_vm::image::build_with(&dir, &name, &spec, &agent, &mut |step, of, what| {
                    eprintln!("[{step}/{of}] {what}");
                })
            })
            .await??;
            println!(
                "image {} ready in {} (kernel {}, {}, {:.1} s)",
                built.manifest.name,
                built.dir.display(),
                built.manifest.kernel_release,
                human_bytes(built.size_bytes()),
                started.elapsed().as_secs_f64()
            );
        }
        ImageCommand::Ls { server } => {
            let settings = server.settings()?;
            println!("NAME\tSIZE\tKERNEL\tCREATED\tPACKAGES");
            for image in kiln_vm::image::Image::list(&settings.data_dir.join("images")) {
                println!("{}", image_row(&image));
            }
        }
    }
    Ok(0)
}

/// The first line of stdin, without its line break (`--registry-password-stdin`).
fn read_password_line() -> anyhow::Result<String> {
    use std::io::{BufRead, Read};
    const MAX: u64 = 64 << 10;
    let mut line = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX + 1)
        .read_until(b'\n', &mut line)
        .context("reading the registry password from stdin")?;
    if line.len() as u64 > MAX {
        anyhow::bail!("the registry password on stdin is longer than 64 KiB");
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    if line.is_empty() {
        anyhow::bail!("--registry-password-stdin: stdin held no password");
    }
    String::from_utf8(line).context("the registry password on stdin is not UTF-8")
}

/// One line of `kiln image ls`: name, size, kernel, created, packages.
fn image_row(image: &kiln_vm::image::Image) -> String {
    let manifest = &image.manifest;
    let kernel = serde_json::to_value(manifest.kernel)
        .ok()
        .and_then(|k| k.as_str().map(str::to_string))
        .unwrap_or_default();
    let created = manifest
        .created_at
        .parse::<i64>()
        .ok()
        .and_then(|s| kiln_api::render_time(s.saturating_mul(1000)))
        .unwrap_or_else(|| manifest.created_at.clone());
    let packages = match (&manifest.rootfs, &manifest.from) {
        (Some(_), Some(from)) => format!("oci {}@{}", from.reference, from.digest),
        (Some(rootfs), None) => format!(
            "debian {} ({} installed): {}",
            rootfs.suite,
            rootfs.installed,
            rootfs.packages.join(",")
        ),
        (None, _) => format!("busybox initramfs: {}", manifest.busybox_package),
    };
    format!(
        "{}\t{}\t{} {}\t{}\t{}",
        manifest.name,
        human_bytes(image.size_bytes()),
        kernel,
        manifest.kernel_release,
        created,
        packages
    )
}

fn human_bytes(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

async fn vm(client: Client, command: VmCommand) -> anyhow::Result<i32> {
    match command {
        VmCommand::Create {
            image,
            vcpus,
            memory_mib,
            ttl_s,
        } => {
            let mut body = json!({"image": image, "vcpus": vcpus, "memory_mib": memory_mib});
            if let Some(ttl) = ttl_s {
                body["ttl_s"] = json!(ttl);
            }
            let vm = client.post("/api/v1/vms", &body).await?;
            eprintln!(
                "ready in {} ms ({})",
                vm["boot_ms"],
                vm["accelerator"].as_str().unwrap_or("")
            );
            println!("{}", vm["id"].as_str().unwrap_or(""));
        }
        VmCommand::Ls => {
            let list = client.get("/api/v1/vms").await?;
            for vm in list["vms"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}\t{}MiB\t{}",
                    vm["id"].as_str().unwrap_or(""),
                    vm["image"].as_str().unwrap_or(""),
                    vm["accelerator"].as_str().unwrap_or(""),
                    vm["memory_mib"],
                    vm["created_at"].as_str().unwrap_or("")
                );
            }
        }
        VmCommand::Exec { id, command } => {
            use std::io::Write;
            let body = json!({"command": command[0], "args": &command[1..]});
            let out = client
                .post(&format!("/api/v1/vms/{id}/execute"), &body)
                .await?;
            let _ = std::io::stdout().write_all(out["stdout"].as_str().unwrap_or("").as_bytes());
            let _ = std::io::stderr().write_all(out["stderr"].as_str().unwrap_or("").as_bytes());
            return Ok(out["exit_code"].as_i64().unwrap_or(1).clamp(0, 255) as i32);
        }
        VmCommand::Cp { from, to } => match (from.split_once(':'), to.split_once(':')) {
            (None, Some((id, path))) => {
                let bytes = std::fs::read(&from).with_context(|| format!("reading {from}"))?;
                client
                    .put_bytes(
                        &format!("/api/v1/vms/{id}/files?path={}", urlencode(path)),
                        bytes,
                    )
                    .await?;
            }
            (Some((id, path)), None) => {
                let bytes = client
                    .get_bytes(&format!("/api/v1/vms/{id}/files?path={}", urlencode(path)))
                    .await?;
                std::fs::write(&to, bytes).with_context(|| format!("writing {to}"))?;
            }
            _ => anyhow::bail!("one side must be ID:/path and the other a local file"),
        },
        VmCommand::Rm { id } => {
            client.delete(&format!("/api/v1/vms/{id}")).await?;
        }
        VmCommand::Executions { id, limit } => {
            let list = client
                .get(&format!("/api/v1/vms/{id}/executions?limit={limit}"))
                .await?;
            for run in list["executions"].as_array().into_iter().flatten() {
                let args: Vec<&str> = run["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str())
                    .collect();
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}ms\t{}\t{} {}",
                    run["id"].as_str().unwrap_or(""),
                    run["started_at"].as_str().unwrap_or(""),
                    run["source"].as_str().unwrap_or(""),
                    run["status"].as_str().unwrap_or(""),
                    run["exit_code"],
                    run["duration_ms"],
                    run["actor"].as_str().unwrap_or(""),
                    run["command"].as_str().unwrap_or(""),
                    args.join(" ")
                );
            }
        }
    }
    Ok(0)
}
