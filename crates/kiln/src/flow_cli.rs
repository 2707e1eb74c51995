//! Client commands for pipelines, their runs and cron schedules.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use crate::client::{self, Client};

/// How often a followed run is read again.
const POLL: Duration = Duration::from_millis(200);
/// Failed reads in a row a followed run survives (a restarting server).
const POLL_ERRORS_MAX: u32 = 10;
/// Largest definition file read (YAML is wordier than the JSON the API bounds).
const FILE_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// Most step lines the live view draws; the rest are summed up in one line.
const LIVE_LINES_MAX: usize = 40;
/// Widest table cell, in characters.
const CELL_MAX: usize = 60;
/// Most instance errors and job ids shown per step by `kiln run get`.
const PER_STEP_MAX: usize = 10;
/// Most fires shown by `kiln schedule get`.
const FIRES_MAX: usize = 100;

#[derive(Subcommand)]
pub enum PipelineCommand {
    /// Create a pipeline, or a new version of it; prints `NAME version N`.
    Apply {
        /// The definition, JSON or YAML (by extension, else by content); '-' reads stdin.
        #[arg(short = 'f', long = "file")]
        file: String,
    },
    /// List pipelines: name, version, steps, created.
    Ls,
    /// Print a pipeline's definition as YAML (or JSON).
    Get {
        name: String,
        /// An earlier version (default: the newest).
        #[arg(long)]
        version: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// A pipeline's versions.
    Versions { name: String },
    /// Delete a pipeline.
    Rm { name: String },
    /// Start a run: prints its id, or with --wait follows it to its end
    /// (exit 0 succeeded, 1 failed, 3 cancelled).
    Run(StartArgs),
}

#[derive(Args)]
pub struct StartArgs {
    name: String,
    /// k=v, repeatable; v is taken as JSON when it parses as JSON, else as text.
    #[arg(long = "param")]
    params: Vec<String>,
    /// k=v, repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Starting again with the same key returns the earlier run.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Follow the run until it ends.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up following after this many seconds.
    #[arg(long, default_value_t = 86_400)]
    timeout_s: u64,
}

/// Pipeline runs; flattened into `kiln run` beside `wasm` and `vm`.
#[derive(Subcommand)]
pub enum RunsCommand {
    /// List pipeline runs.
    Ls {
        #[arg(long)]
        pipeline: Option<String>,
        /// queued, running, succeeded, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// A pipeline run and its steps.
    Get {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Follow a pipeline run until it ends (exit 0 succeeded, 1 failed, 3 cancelled).
    Wait {
        id: String,
        #[arg(long, default_value_t = 86_400)]
        timeout_s: u64,
    },
    /// Cancel a pipeline run.
    Cancel { id: String },
    /// Retry a finished pipeline run from the steps that did not succeed.
    Retry { id: String },
    /// Approve a step waiting for approval.
    Approve {
        id: String,
        step: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Reject a step waiting for approval.
    Reject {
        id: String,
        step: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// The artifacts a pipeline run kept: the list (name, size, digest),
    /// one by name (to stdout or `-o FILE`), or all into `--dir DIR`.
    Artifacts {
        id: String,
        /// `<step>/<path>` or `<step>/<index>/<path>`, as the list shows.
        name: Option<String>,
        #[arg(short = 'o', long, requires = "name")]
        output: Option<std::path::PathBuf>,
        #[arg(long, conflicts_with = "name")]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// Create a schedule from flags, or from a whole JSON or YAML file.
    Create(Box<CreateSchedule>),
    /// List schedules.
    Ls,
    /// A schedule and its recent fires.
    Get {
        name: String,
        #[arg(long)]
        json: bool,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    Rm {
        name: String,
    },
}

#[derive(Args)]
pub struct CreateSchedule {
    #[arg(required_unless_present = "file")]
    name: Option<String>,
    /// A cron expression, e.g. "0 3 * * *".
    #[arg(long, required_unless_present = "file")]
    cron: Option<String>,
    /// An IANA time zone (default: UTC).
    #[arg(long)]
    timezone: Option<String>,
    /// Fire a job of this kind.
    #[arg(long, conflicts_with = "pipeline", required_unless_present_any = ["pipeline", "file"])]
    job_kind: Option<String>,
    /// The job's spec as JSON.
    #[arg(long, requires = "job_kind")]
    job_spec: Option<String>,
    /// The job's queue.
    #[arg(long, requires = "job_kind")]
    queue: Option<String>,
    /// Start a run of this pipeline.
    #[arg(long)]
    pipeline: Option<String>,
    /// k=v, repeatable: the run's params (v as JSON when it parses).
    #[arg(long = "param", requires = "pipeline")]
    params: Vec<String>,
    /// When a tick comes while the previous fire still runs.
    #[arg(long, value_parser = ["skip", "queue", "allow"])]
    overlap: Option<String>,
    /// Which missed ticks fire once the scheduler is back.
    #[arg(long, value_parser = ["none", "latest", "all"])]
    catch_up: Option<String>,
    /// Create it paused.
    #[arg(long)]
    paused: bool,
    /// The whole schedule as JSON or YAML ('-' reads stdin).
    #[arg(
        short = 'f',
        long = "file",
        conflicts_with_all = [
            "name", "cron", "timezone", "job_kind", "job_spec", "queue",
            "pipeline", "params", "overlap", "catch_up", "paused",
        ]
    )]
    file: Option<String>,
}

pub async fn pipeline(client: Client, command: PipelineCommand) -> anyhow::Result<i32> {
    match command {
        PipelineCommand::Apply { file } => {
            let definition = read_document(&file)?;
            if !definition.is_object() {
                bail!("{file}: a pipeline definition is an object (name, steps, …)");
            }
            let created = client.post("/api/v1/pipelines", &definition).await?;
            println!(
                "{} version {}",
                text(&created["name"]),
                text(&created["version"])
            );
        }
        PipelineCommand::Ls => {
            let list = client.get("/api/v1/pipelines").await?;
            let rows = items(&list, "pipelines")
                .map(|p| {
                    vec![
                        text(&p["name"]),
                        text(&p["version"]),
                        p["definition"]["steps"]
                            .as_array()
                            .map_or(0, Vec::len)
                            .to_string(),
                        text(&p["created_at"]),
                    ]
                })
                .collect();
            print_table(&["NAME", "VERSION", "STEPS", "CREATED"], rows);
        }
        PipelineCommand::Get {
            name,
            version,
            json,
        } => {
            let mut path = format!("/api/v1/pipelines/{}", segment(&name)?);
            if let Some(version) = version {
                path.push_str(&format!("?version={version}"));
            }
            let pipeline = client.get(&path).await?;
            let definition = &pipeline["definition"];
            if json {
                client::print(definition);
            } else {
                println!(
                    "# {} version {}, created {}",
                    text(&pipeline["name"]),
                    text(&pipeline["version"]),
                    text(&pipeline["created_at"])
                );
                print!("{}", to_yaml(definition)?);
            }
        }
        PipelineCommand::Versions { name } => {
            let list = client
                .get(&format!("/api/v1/pipelines/{}/versions", segment(&name)?))
                .await?;
            let rows = items(&list, "versions")
                .map(|v| vec![text(&v["version"]), text(&v["created_at"])])
                .collect();
            print_table(&["VERSION", "CREATED"], rows);
        }
        PipelineCommand::Rm { name } => {
            client
                .delete(&format!("/api/v1/pipelines/{}", segment(&name)?))
                .await?;
            eprintln!("deleted pipeline {}", clean(&name));
        }
        PipelineCommand::Run(args) => return start(&client, args).await,
    }
    Ok(0)
}

async fn start(client: &Client, args: StartArgs) -> anyhow::Result<i32> {
    let mut body = json!({});
    if !args.params.is_empty() {
        body["params"] = Value::Object(parse_params(&args.params)?);
    }
    if !args.labels.is_empty() {
        body["labels"] = json!(client::parse_labels(&args.labels)?);
    }
    if let Some(key) = args.idempotency_key {
        body["idempotency_key"] = json!(key);
    }
    let run = client
        .post(
            &format!("/api/v1/pipelines/{}/runs", segment(&args.name)?),
            &body,
        )
        .await?;
    if !args.wait {
        println!("{}", text(&run["id"]));
        return Ok(0);
    }
    follow(client, run, Duration::from_secs(args.timeout_s)).await
}

pub async fn runs(client: Client, command: RunsCommand) -> anyhow::Result<i32> {
    match command {
        RunsCommand::Ls {
            pipeline,
            status,
            limit,
            cursor,
        } => {
            let mut query = vec![format!("limit={limit}")];
            for (name, value) in [
                ("pipeline", pipeline),
                ("status", status),
                ("cursor", cursor),
            ] {
                if let Some(value) = value {
                    query.push(format!("{name}={}", crate::urlencode(&value)));
                }
            }
            let list = client
                .get(&format!("/api/v1/runs?{}", query.join("&")))
                .await?;
            let rows = items(&list, "runs")
                .map(|r| {
                    vec![
                        text(&r["id"]),
                        text(&r["pipeline"]),
                        text(&r["version"]),
                        text(&r["status"]),
                        trigger(&r["trigger"]),
                        text(&r["created_at"]),
                        span(&r["started_at"], &r["finished_at"], kiln_api::now_millis()),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID", "PIPELINE", "VERSION", "STATUS", "TRIGGER", "CREATED", "DURATION",
                ],
                rows,
            );
            if let Some(next) = list["next_cursor"].as_str() {
                eprintln!("more: --cursor {}", clean(next));
            }
        }
        RunsCommand::Get { id, json } => {
            let run = client.get(&run_path(&id, "")?).await?;
            if json {
                client::print(&run);
            } else {
                print!("{}", describe_run(&run, kiln_api::now_millis()));
            }
        }
        RunsCommand::Wait { id, timeout_s } => {
            let run = client.get(&run_path(&id, "")?).await?;
            return follow(&client, run, Duration::from_secs(timeout_s)).await;
        }
        RunsCommand::Cancel { id } => {
            let run = client.post(&run_path(&id, "/cancel")?, &json!({})).await?;
            println!("{}", run_line(&run));
        }
        RunsCommand::Retry { id } => {
            let run = client.post(&run_path(&id, "/retry")?, &json!({})).await?;
            println!("{}", run_line(&run));
        }
        RunsCommand::Approve { id, step, comment } => {
            decide(&client, &id, &step, "approve", comment).await?;
        }
        RunsCommand::Reject { id, step, comment } => {
            decide(&client, &id, &step, "reject", comment).await?;
        }
        RunsCommand::Artifacts {
            id,
            name,
            output,
            dir,
        } => artifacts(&client, &id, name, output, dir).await?,
    }
    Ok(0)
}

async fn decide(
    client: &Client,
    id: &str,
    step: &str,
    verb: &str,
    comment: Option<String>,
) -> anyhow::Result<()> {
    let body = match comment {
        Some(comment) => json!({ "comment": comment }),
        None => json!({}),
    };
    let path = run_path(id, &format!("/steps/{}/{verb}", segment(step)?))?;
    let run = client.post(&path, &body).await?;
    let status = run["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["step"].as_str() == Some(step))
        .map_or_else(|| "-".to_string(), |s| text(&s["status"]));
    println!("{}; step {} {status}", run_line(&run), clean(step));
    Ok(())
}

async fn artifacts(
    client: &Client,
    id: &str,
    name: Option<String>,
    output: Option<std::path::PathBuf>,
    dir: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let fetch = |name: String| async move {
        // Names are relative paths of plain segments; checked before they
        // become a URL or a path on this machine.
        kiln_core::files::check_path("the artifact name", &name)?;
        client
            .get_bytes(&run_path(id, &format!("/artifacts/{name}"))?)
            .await
    };
    if let Some(name) = name {
        let bytes = fetch(name).await?;
        match output {
            Some(path) => std::fs::write(&path, bytes)
                .with_context(|| format!("writing {}", path.display()))?,
            None => std::io::Write::write_all(&mut std::io::stdout(), &bytes)?,
        }
        return Ok(());
    }
    let list = client.get(&run_path(id, "/artifacts")?).await?;
    let Some(dir) = dir else {
        for line in artifact_lines(&list) {
            println!("{line}");
        }
        return Ok(());
    };
    for artifact in items(&list, "artifacts") {
        let name = text(&artifact["name"]);
        let bytes = fetch(name.clone()).await?;
        let path = dir.join(&name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("{}\t{}", path.display(), bytes.len());
    }
    Ok(())
}

fn run_path(id: &str, rest: &str) -> anyhow::Result<String> {
    Ok(format!("/api/v1/runs/{}{rest}", segment(id)?))
}

fn run_line(run: &Value) -> String {
    format!(
        "run {} {} (attempt {})",
        text(&run["id"]),
        text(&run["status"]),
        text(&run["attempt"])
    )
}

pub async fn schedule(client: Client, command: ScheduleCommand) -> anyhow::Result<i32> {
    match command {
        ScheduleCommand::Create(args) => {
            let body = schedule_body(*args)?;
            let created = client.post("/api/v1/schedules", &body).await?;
            println!(
                "schedule {} next fire {}",
                text(&created["name"]),
                text(&created["next_fire_at"])
            );
        }
        ScheduleCommand::Ls => {
            let list = client.get("/api/v1/schedules").await?;
            let rows = items(&list, "schedules")
                .map(|s| {
                    vec![
                        text(&s["name"]),
                        text(&s["cron"]),
                        text(&s["timezone"]),
                        target_summary(&s["target"]),
                        paused_text(&s["paused"]).to_string(),
                        text(&s["next_fire_at"]),
                        text(&s["last_fire_at"]),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME", "CRON", "TIMEZONE", "TARGET", "STATE", "NEXT", "LAST",
                ],
                rows,
            );
        }
        ScheduleCommand::Get { name, json } => {
            let schedule = client.get(&schedule_path(&name, "")?).await?;
            if json {
                client::print(&schedule);
            } else {
                print!("{}", describe_schedule(&schedule));
            }
        }
        ScheduleCommand::Pause { name } => {
            let schedule = client
                .post(&schedule_path(&name, "/pause")?, &json!({}))
                .await?;
            println!(
                "schedule {} {}",
                text(&schedule["name"]),
                paused_text(&schedule["paused"])
            );
        }
        ScheduleCommand::Resume { name } => {
            let schedule = client
                .post(&schedule_path(&name, "/resume")?, &json!({}))
                .await?;
            println!(
                "schedule {} {} next fire {}",
                text(&schedule["name"]),
                paused_text(&schedule["paused"]),
                text(&schedule["next_fire_at"])
            );
        }
        ScheduleCommand::Rm { name } => {
            client.delete(&schedule_path(&name, "")?).await?;
            eprintln!("deleted schedule {}", clean(&name));
        }
    }
    Ok(0)
}

fn schedule_path(name: &str, rest: &str) -> anyhow::Result<String> {
    Ok(format!("/api/v1/schedules/{}{rest}", segment(name)?))
}

/// The body of `POST /api/v1/schedules`, from a file or from the flags.
fn schedule_body(args: CreateSchedule) -> anyhow::Result<Value> {
    if let Some(file) = &args.file {
        let body = read_document(file)?;
        if !body.is_object() {
            bail!("{file}: a schedule is an object (name, cron, target, …)");
        }
        return Ok(body);
    }
    let (Some(name), Some(cron)) = (args.name, args.cron) else {
        bail!("a schedule needs a NAME and --cron, or -f FILE");
    };
    let target = match (args.job_kind, args.pipeline) {
        (Some(kind), None) => {
            let spec = match &args.job_spec {
                Some(spec) => serde_json::from_str(spec).context("--job-spec is not JSON")?,
                None => json!({}),
            };
            let mut job = json!({ "kind": kind, "spec": spec });
            if let Some(queue) = args.queue {
                job["queue"] = json!(queue);
            }
            json!({ "job": job })
        }
        (None, Some(pipeline)) => {
            let mut target = json!({ "name": pipeline });
            if !args.params.is_empty() {
                target["params"] = Value::Object(parse_params(&args.params)?);
            }
            json!({ "pipeline": target })
        }
        _ => bail!("a schedule fires either --job-kind or --pipeline"),
    };
    let mut body = json!({ "name": name, "cron": cron, "target": target });
    for (field, value) in [
        ("timezone", args.timezone),
        ("overlap", args.overlap),
        ("catch_up", args.catch_up),
    ] {
        if let Some(value) = value {
            body[field] = json!(value);
        }
    }
    if args.paused {
        body["paused"] = json!(true);
    }
    Ok(body)
}

fn paused_text(paused: &Value) -> &'static str {
    if paused.as_bool() == Some(true) {
        "paused"
    } else {
        "active"
    }
}

fn target_summary(target: &Value) -> String {
    if let Some(job) = target.get("job") {
        format!("job {}", text(&job["kind"]))
    } else if let Some(pipeline) = target.get("pipeline") {
        format!("pipeline {}", text(&pipeline["name"]))
    } else {
        text(target)
    }
}

fn describe_schedule(schedule: &Value) -> String {
    let mut out = String::new();
    let target = &schedule["target"];
    let target_detail = target
        .get("job")
        .map(|job| compact(&job["spec"]))
        .or_else(|| target.get("pipeline").map(|p| compact(&p["params"])))
        .unwrap_or_default();
    let fields = [
        ("name", text(&schedule["name"])),
        ("cron", text(&schedule["cron"])),
        ("timezone", text(&schedule["timezone"])),
        (
            "target",
            format!("{} {target_detail}", target_summary(target)),
        ),
        ("overlap", text(&schedule["overlap"])),
        ("catch up", text(&schedule["catch_up"])),
        ("state", paused_text(&schedule["paused"]).to_string()),
        ("next fire", text(&schedule["next_fire_at"])),
        ("last fire", text(&schedule["last_fire_at"])),
        ("created", text(&schedule["created_at"])),
        ("updated", text(&schedule["updated_at"])),
    ];
    for (name, value) in fields {
        out.push_str(&format!("{name:<10} {}\n", value.trim_end()));
    }
    let fires: Vec<&Value> = items(schedule, "fires").collect();
    if fires.is_empty() {
        out.push_str("\nno fires yet\n");
        return out;
    }
    let rows = fires
        .iter()
        .take(FIRES_MAX)
        .map(|f| {
            vec![
                text(&f["tick"]),
                text(&f["fired_at"]),
                text(&f["outcome"]),
                text(&f["job_id"]),
                text(&f["run_id"]),
                text(&f["error"]),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["TICK", "FIRED", "OUTCOME", "JOB", "RUN", "ERROR"],
        rows,
    ));
    if fires.len() > FIRES_MAX {
        out.push_str(&format!("… {} more fires\n", fires.len() - FIRES_MAX));
    }
    out
}

/// `k=v` pairs as a JSON object: `v` as JSON when it parses (numbers,
/// lists, `true`, quoted strings), else as the text it is.
pub fn parse_params(pairs: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut params = Map::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("param {pair:?} is not key=value"))?;
        if key.is_empty() {
            bail!("param {pair:?} has no name");
        }
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
        params.insert(key.to_string(), value);
    }
    Ok(params)
}

/// A JSON or YAML document from a file or ('-') stdin, as JSON.
pub(crate) fn read_document(file: &str) -> anyhow::Result<Value> {
    let mut bytes = Vec::new();
    if file == "-" {
        std::io::stdin()
            .take(FILE_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .context("reading stdin")?;
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("opening {file}"))?
            .take(FILE_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {file}"))?;
    }
    if bytes.len() as u64 > FILE_BYTES_MAX {
        bail!("{file} is larger than {FILE_BYTES_MAX} bytes");
    }
    let text = String::from_utf8(bytes).with_context(|| format!("{file} is not UTF-8"))?;
    parse_document(file, &text)
}

/// JSON for `.json`, YAML for `.yaml`/`.yml`; otherwise JSON when the text
/// starts like JSON, else YAML.
fn parse_document(file: &str, text: &str) -> anyhow::Result<Value> {
    let lower = file.to_ascii_lowercase();
    let json = if lower.ends_with(".json") {
        true
    } else if lower.ends_with(".yaml") || lower.ends_with(".yml") {
        false
    } else {
        text.trim_start().starts_with(['{', '['])
    };
    if json {
        serde_json::from_str(text).with_context(|| format!("{file} is not valid JSON"))
    } else {
        serde_norway::from_str(text).with_context(|| format!("{file} is not valid YAML"))
    }
}

fn to_yaml(value: &Value) -> anyhow::Result<String> {
    serde_norway::to_string(value).context("cannot write the definition as YAML")
}

/// Follows a run until it ends, drawing its steps, and returns the exit
/// code: 0 succeeded, 1 failed, 3 cancelled.
async fn follow(client: &Client, first: Value, timeout: Duration) -> anyhow::Result<i32> {
    let id = first["id"]
        .as_str()
        .map(str::to_string)
        .or_else(|| first["id"].as_i64().map(|n| n.to_string()))
        .context("the server answered without a run id")?;
    let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
    let mut view = if std::io::stdout().is_terminal() && !dumb {
        View::Live(Live::new())
    } else {
        View::Plain(Plain::default())
    };
    let deadline = Instant::now() + timeout;
    let mut run = first;
    let mut errors = 0;
    loop {
        view.show(&run);
        let status = run["status"].as_str().unwrap_or("");
        if ["succeeded", "failed", "cancelled"].contains(&status) {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "run {} still {} after {} s",
                clean(&id),
                clean(status),
                timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
        match client.get(&run_path(&id, "")?).await {
            Ok(next) => {
                run = next;
                errors = 0;
            }
            Err(error) => {
                errors += 1;
                if errors > POLL_ERRORS_MAX {
                    return Err(error);
                }
            }
        }
    }
    Ok(finish(&run))
}

/// Tells why a run did not succeed and picks the exit code.
fn finish(run: &Value) -> i32 {
    let status = run["status"].as_str().unwrap_or("");
    if status == "succeeded" {
        return 0;
    }
    let mut why = format!("kiln: run {} {}", text(&run["id"]), clean(status));
    if let Some(reason) = run["reason"].as_str() {
        why.push_str(&format!(": {}", clean(reason)));
    }
    eprintln!("{why}");
    for line in failure_lines(run) {
        eprintln!("  {line}");
    }
    if status == "cancelled" {
        3
    } else {
        1
    }
}

/// What failed: each failed step's detail (a gate's values, a spec the
/// kind refused) and its failed instances' errors, a few per step.
fn failure_lines(run: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    for step in items(run, "steps").filter(|s| s["status"] == "failed") {
        let id = text(&step["step"]);
        if !step["detail"].is_null() {
            lines.push(format!("{id}: {}", compact(&step["detail"])));
        }
        let failed = items(step, "instances").filter(|i| !i["error"].is_null());
        for instance in failed.take(PER_STEP_MAX) {
            lines.push(format!(
                "{id}[{}]: {}",
                text(&instance["index"]),
                text(&instance["error"])
            ));
        }
    }
    lines
}

enum View {
    Live(Live),
    Plain(Plain),
}

impl View {
    fn show(&mut self, run: &Value) {
        let mut out = std::io::stdout().lock();
        let _ = match self {
            View::Live(live) => out.write_all(live.frame(run, kiln_api::now_millis()).as_bytes()),
            View::Plain(plain) => out.write_all(plain.changes(run).as_bytes()),
        };
        let _ = out.flush();
    }
}

/// Lines `run <id> <status>` and `step <id> <status>`, once per change.
#[derive(Default)]
struct Plain {
    run: String,
    steps: HashMap<String, String>,
}

impl Plain {
    fn changes(&mut self, run: &Value) -> String {
        let mut out = String::new();
        let status = text(&run["status"]);
        for step in items(run, "steps") {
            let id = text(&step["step"]);
            let now = text(&step["status"]);
            let before = self.steps.get(&id).map_or("pending", String::as_str);
            if now != before {
                out.push_str(&format!("step {id} {now}\n"));
                self.steps.insert(id, now);
            }
        }
        // The run's end comes after its steps' ends.
        if status != self.run {
            out.push_str(&format!("run {} {status}\n", text(&run["id"])));
            self.run = status;
        }
        out
    }
}

/// A view redrawn in place: a header and one line per step.
struct Live {
    drawn: usize,
    width: usize,
    color: bool,
}

impl Live {
    fn new() -> Live {
        let width = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse().ok())
            .filter(|&w: &usize| w >= 20)
            .unwrap_or(80);
        Live {
            drawn: 0,
            width,
            color: std::env::var_os("NO_COLOR").is_none(),
        }
    }

    /// The escapes that replace the last frame with this one.
    fn frame(&mut self, run: &Value, now: i64) -> String {
        let lines = live_lines(run, now, self.width - 1, self.color);
        let mut out = String::new();
        if self.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for line in &lines {
            out.push_str("\r\x1b[2K");
            out.push_str(line);
            out.push('\n');
        }
        // A frame shorter than the last leaves nothing of it below.
        out.push_str("\x1b[J");
        self.drawn = lines.len();
        out
    }
}

fn live_lines(run: &Value, now: i64, width: usize, color: bool) -> Vec<String> {
    let steps: Vec<&Value> = items(run, "steps").collect();
    let status = text(&run["status"]);
    let header = format!(
        "run {} {} v{} {} {}",
        text(&run["id"]),
        text(&run["pipeline"]),
        text(&run["version"]),
        status,
        span(&run["started_at"], &run["finished_at"], now)
    );
    let mut lines = vec![paint(&fit(&header, width), &status, color)];
    let id_width = steps
        .iter()
        .map(|s| text(&s["step"]).chars().count())
        .max()
        .unwrap_or(0)
        .min(CELL_MAX);
    for step in steps.iter().take(LIVE_LINES_MAX) {
        let status = text(&step["status"]);
        let mut counts = format!("{}/{}", done(step), text(&step["total"]));
        if step["failed"].as_i64().unwrap_or(0) > 0 {
            counts.push_str(&format!(" ({} failed)", text(&step["failed"])));
        }
        let line = format!(
            "  {} {:<id_width$}  {:<9}  {:<8}  {}",
            mark(&status),
            fit(&text(&step["step"]), CELL_MAX),
            status,
            counts,
            span(&step["started_at"], &step["finished_at"], now)
        );
        lines.push(paint(&fit(line.trim_end(), width), &status, color));
    }
    if steps.len() > LIVE_LINES_MAX {
        let rest = &steps[LIVE_LINES_MAX..];
        let ended = rest
            .iter()
            .filter(|s| {
                ["succeeded", "failed", "skipped", "cancelled"]
                    .contains(&s["status"].as_str().unwrap_or(""))
            })
            .count();
        lines.push(fit(
            &format!("  … {} more steps, {ended} ended", rest.len()),
            width,
        ));
    }
    lines
}

/// Instances that ended, either way.
fn done(step: &Value) -> i64 {
    step["succeeded"]
        .as_i64()
        .unwrap_or(0)
        .saturating_add(step["failed"].as_i64().unwrap_or(0))
}

fn mark(status: &str) -> char {
    match status {
        "succeeded" => '✓',
        "failed" => '✗',
        "running" => '▶',
        "waiting" => '⏸',
        "skipped" | "cancelled" => '-',
        _ => '·',
    }
}

fn paint(line: &str, status: &str, color: bool) -> String {
    let code = match status {
        "succeeded" => "32",
        "failed" => "31",
        "running" => "36",
        "waiting" | "queued" => "33",
        "skipped" | "cancelled" => "2",
        _ => return line.to_string(),
    };
    if color {
        format!("\x1b[{code}m{line}\x1b[0m")
    } else {
        line.to_string()
    }
}

/// `kiln run get`: the run, a table of its steps, then what the table
/// cannot hold (gate and approval detail, deadlines, instance errors).
fn describe_run(run: &Value, now: i64) -> String {
    let mut out = format!(
        "run {}  {} v{}  {}  attempt {}  trigger {}\n",
        text(&run["id"]),
        text(&run["pipeline"]),
        text(&run["version"]),
        text(&run["status"]),
        text(&run["attempt"]),
        trigger(&run["trigger"]),
    );
    if !run["reason"].is_null() {
        out.push_str(&format!("reason: {}\n", text(&run["reason"])));
    }
    if !run["detail"].is_null() {
        out.push_str(&format!("detail: {}\n", compact(&run["detail"])));
    }
    out.push_str(&format!(
        "created {}  started {}  finished {}  ({})\n",
        text(&run["created_at"]),
        text(&run["started_at"]),
        text(&run["finished_at"]),
        span(&run["started_at"], &run["finished_at"], now)
    ));
    for (name, value) in [("params", &run["params"]), ("labels", &run["labels"])] {
        if value.as_object().is_some_and(|m| !m.is_empty()) {
            out.push_str(&format!("{name}: {}\n", compact(value)));
        }
    }
    let steps: Vec<&Value> = items(run, "steps").collect();
    let rows = steps
        .iter()
        .map(|s| {
            vec![
                text(&s["step"]),
                text(&s["status"]),
                format!("{}/{}", done(s), text(&s["total"])),
                text(&s["failed"]),
                span(&s["started_at"], &s["finished_at"], now),
                job_ids(s),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["STEP", "STATUS", "DONE", "FAILED", "DURATION", "JOBS"],
        rows,
    ));
    let mut notes = Vec::new();
    for step in &steps {
        let id = text(&step["step"]);
        if !step["deadline_at"].is_null() {
            notes.push(format!("{id}: deadline {}", text(&step["deadline_at"])));
        }
        if !step["detail"].is_null() {
            notes.push(format!("{id}: {}", compact(&step["detail"])));
        }
        let instances: Vec<&Value> = items(step, "instances").collect();
        let shown = instances
            .iter()
            .filter(|i| !i["error"].is_null() || !i["item"].is_null() || i["status"] == "failed");
        for instance in shown.take(PER_STEP_MAX) {
            let mut note = format!("{id}[{}]", text(&instance["index"]));
            if !instance["item"].is_null() {
                note.push_str(&format!(" item {}", compact(&instance["item"])));
            }
            note.push_str(&format!(
                " {} attempt {}",
                text(&instance["status"]),
                text(&instance["attempt"])
            ));
            if !instance["exit_code"].is_null() {
                note.push_str(&format!(" exit {}", text(&instance["exit_code"])));
            }
            if !instance["error"].is_null() {
                note.push_str(&format!(": {}", text(&instance["error"])));
            }
            notes.push(note);
        }
    }
    if !notes.is_empty() {
        out.push('\n');
        for note in notes {
            out.push_str(&note);
            out.push('\n');
        }
    }
    out
}

/// A step's job ids, the first few and how many more.
fn job_ids(step: &Value) -> String {
    let ids: Vec<String> = items(step, "instances")
        .filter(|i| !i["job_id"].is_null())
        .map(|i| text(&i["job_id"]))
        .collect();
    if ids.is_empty() {
        return "-".into();
    }
    let mut shown = ids
        .iter()
        .take(PER_STEP_MAX.min(5))
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if ids.len() > 5 {
        shown.push_str(&format!(" +{}", ids.len() - 5));
    }
    shown
}

fn trigger(trigger: &Value) -> String {
    match trigger {
        Value::Object(map) => map
            .get("kind")
            .or_else(|| map.get("type"))
            .map_or_else(|| compact(trigger), text),
        other => text(other),
    }
}

/// One line per artifact of `GET /api/v1/runs/{id}/artifacts`: name,
/// size and digest, tab-separated.
fn artifact_lines(list: &Value) -> Vec<String> {
    items(list, "artifacts")
        .map(|a| {
            format!(
                "{}\t{}\t{}",
                text(&a["name"]),
                text(&a["size"]),
                text(&a["digest"])
            )
        })
        .collect()
}

/// A duration between two RFC 3339 times, up to `now` while it runs.
fn span(started: &Value, finished: &Value, now: i64) -> String {
    let Some(start) = started.as_str().and_then(kiln_api::parse_time) else {
        return "-".into();
    };
    let end = finished
        .as_str()
        .and_then(kiln_api::parse_time)
        .unwrap_or(now);
    duration(end.saturating_sub(start))
}

pub fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1_000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms / 1_000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// The array under `key`, or nothing.
fn items<'a>(value: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    value[key].as_array().into_iter().flatten()
}

/// A value for a terminal: text as it is, null as `-`, the rest as JSON,
/// control characters made harmless (the server's strings are not trusted
/// with the terminal).
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => clean(s),
        other => clean(&other.to_string()),
    }
}

fn compact(value: &Value) -> String {
    clean(&value.to_string())
}

fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// At most `width` characters, the cut marked with `…`.
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.iter().map(|cell| fit(cell, CELL_MAX)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let pad = width.saturating_sub(cell.chars().count());
            line.push_str(cell);
            line.push_str(&" ".repeat(pad + 2));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    print!("{}", table(header, rows));
}

/// A path segment: everything but the unreserved characters escaped, so a
/// name cannot reach another route.
fn segment(text: &str) -> anyhow::Result<String> {
    // URLs drop `.` and `..` segments however they are escaped.
    if matches!(text, "" | "." | "..") {
        bail!("{text:?} is not a name");
    }
    Ok(text
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn params_are_json_when_they_parse_else_text() {
        let params = parse_params(&strings(&[
            "n=3",
            "list=[1,2]",
            "flag=true",
            "name=world",
            "quoted=\"7\"",
            "empty=",
            "eq=a=b",
        ]))
        .unwrap();
        assert_eq!(params["n"], json!(3));
        assert_eq!(params["list"], json!([1, 2]));
        assert_eq!(params["flag"], json!(true));
        assert_eq!(params["name"], json!("world"));
        assert_eq!(params["quoted"], json!("7"));
        assert_eq!(params["empty"], json!(""));
        assert_eq!(params["eq"], json!("a=b"));
        assert!(parse_params(&strings(&["novalue"])).is_err());
        assert!(parse_params(&strings(&["=1"])).is_err());
    }

    #[test]
    fn documents_are_read_by_extension_then_by_content() {
        let yaml = "name: p\nsteps:\n  - id: a\n    kind: noop\n    depends_on: []\n";
        let expect = json!({"name": "p", "steps": [{"id": "a", "kind": "noop", "depends_on": []}]});
        assert_eq!(parse_document("p.yaml", yaml).unwrap(), expect);
        assert_eq!(parse_document("p.YML", yaml).unwrap(), expect);
        assert_eq!(parse_document("-", yaml).unwrap(), expect);
        let json = expect.to_string();
        assert_eq!(parse_document("p.json", &json).unwrap(), expect);
        assert_eq!(parse_document("-", &json).unwrap(), expect);
        // A .json file is JSON only, whatever YAML would make of it.
        assert!(parse_document("p.json", yaml).is_err());
        let error = parse_document("-", "{\"name\": ").unwrap_err();
        assert!(format!("{error:#}").contains("JSON"), "{error:#}");
        // YAML that expands aliases without bound is refused, not expanded.
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..12 {
            let prev = (b'a' + level - 1) as char;
            let name = (b'a' + level) as char;
            bomb.push_str(&format!(
                "{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        assert!(parse_document("bomb.yaml", &bomb).is_err());
    }

    #[test]
    fn definitions_go_back_to_yaml_that_reads_the_same() {
        let definition =
            json!({"name": "p", "steps": [{"id": "a", "kind": "noop", "spec": {"exit_code": 1}}]});
        let yaml = to_yaml(&definition).unwrap();
        assert!(yaml.contains("id: a"), "{yaml}");
        assert_eq!(parse_document("p.yaml", &yaml).unwrap(), definition);
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(-5), "0ms");
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(12_345), "12.3s");
        assert_eq!(duration(245_000), "4m05s");
        assert_eq!(duration(3_720_000), "1h02m");
        let start = json!("2026-01-01T00:00:00.000Z");
        let now = kiln_api::parse_time("2026-01-01T00:00:02.500Z").unwrap();
        assert_eq!(span(&start, &Value::Null, now), "2.5s");
        assert_eq!(
            span(&start, &json!("2026-01-01T00:00:00.040Z"), now),
            "40ms"
        );
        assert_eq!(span(&Value::Null, &Value::Null, now), "-");
        assert_eq!(span(&json!("yesterday"), &Value::Null, now), "-");
    }

    fn run_view(statuses: &[(&str, &str)], run_status: &str) -> Value {
        let steps: Vec<Value> = statuses
            .iter()
            .map(|(id, status)| {
                json!({"step": id, "status": status, "total": 1,
                       "succeeded": i32::from(*status == "succeeded"),
                       "failed": i32::from(*status == "failed"),
                       "started_at": null, "finished_at": null, "instances": []})
            })
            .collect();
        json!({"id": "7", "pipeline": "p", "version": 1, "status": run_status, "steps": steps})
    }

    #[test]
    fn plain_lines_come_once_per_change() {
        let mut plain = Plain::default();
        let first = plain.changes(&run_view(&[("a", "running"), ("b", "pending")], "running"));
        assert_eq!(first, "step a running\nrun 7 running\n");
        let same = plain.changes(&run_view(&[("a", "running"), ("b", "pending")], "running"));
        assert_eq!(same, "");
        let end = plain.changes(&run_view(&[("a", "succeeded"), ("b", "failed")], "failed"));
        assert_eq!(end, "step a succeeded\nstep b failed\nrun 7 failed\n");
    }

    /// The characters a terminal shows: CSI escapes and `\r` removed.
    fn without_escapes(line: &str) -> String {
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\x1b' => {
                    // `ESC [` then parameters up to a final letter.
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
                '\r' => {}
                c => out.push(c),
            }
        }
        out
    }

    #[test]
    fn the_live_view_redraws_over_its_last_frame() {
        let mut live = Live {
            drawn: 0,
            width: 80,
            color: false,
        };
        let first = live.frame(
            &run_view(&[("a", "running"), ("b", "pending")], "running"),
            0,
        );
        assert!(!first.contains("\x1b[3A"), "{first:?}");
        assert_eq!(live.drawn, 3);
        assert!(first.contains("a  running    0/1"), "{first:?}");
        let second = live.frame(
            &run_view(&[("a", "succeeded"), ("b", "running")], "running"),
            0,
        );
        assert!(second.starts_with("\x1b[3A"), "{second:?}");
        assert!(second.contains("✓ a  succeeded  1/1"), "{second:?}");
        assert!(second.ends_with("\x1b[J"), "{second:?}");
        // A hostile step id cannot move the cursor, and no line outgrows the width.
        let long = "x".repeat(500);
        let hostile = format!("\x1b[2J{long}");
        let third = live.frame(&run_view(&[(hostile.as_str(), "running")], "running"), 0);
        assert!(!third.contains("\x1b[2J"), "{third:?}");
        for line in third.split('\n') {
            let visible = without_escapes(line);
            assert!(visible.chars().count() < 80, "{visible}");
        }
        let many: Vec<(String, &str)> = (0..100).map(|i| (format!("s{i}"), "pending")).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(s, t)| (s.as_str(), *t)).collect();
        live.frame(&run_view(&many, "queued"), 0);
        assert_eq!(live.drawn, 1 + LIVE_LINES_MAX + 1);
    }

    #[test]
    fn exit_codes_follow_the_run() {
        assert_eq!(finish(&run_view(&[("a", "succeeded")], "succeeded")), 0);
        assert_eq!(finish(&run_view(&[("a", "failed")], "failed")), 1);
        assert_eq!(finish(&run_view(&[("a", "cancelled")], "cancelled")), 3);
    }

    #[test]
    fn a_failure_names_what_failed() {
        let run = json!({"id": "4", "status": "failed", "reason": "policy", "steps": [
            {"step": "gate", "status": "failed", "detail": {"result": false}, "instances": []},
            {"step": "fine", "status": "succeeded", "detail": {"decision": "approved"},
             "instances": [{"index": 0, "error": null}]},
            {"step": "job", "status": "failed", "instances": [
                {"index": 0, "error": null}, {"index": 1, "error": "exit code 3"}]}]});
        assert_eq!(
            failure_lines(&run),
            strings(&["gate: {\"result\":false}", "job[1]: exit code 3"])
        );
    }

    #[test]
    fn a_run_description_names_gates_approvals_and_errors() {
        let run = json!({
        "id": "9", "pipeline": "p", "version": 2, "status": "running", "attempt": 1,
        "trigger": {"kind": "api"}, "reason": null, "params": {"n": 1},
        "created_at": "2026-01-01T00:00:00Z", "started_at": "2026-01-01T00:00:00Z", "finished_at": null,
        "steps": [
            {"step": "build", "status": "failed", "total": 2, "succeeded": 1, "failed": 1,
             "started_at": null, "finished_at": null,
             "instances": [
                {"index": 0, "attempt": 1, "job_id": "41", "status": "succeeded", "error": null},
                {"index": 1, "attempt": 3, "job_id": "42", "status": "failed", "exit_code": 2, "error": "exit code 2"}]},
            {"step": "ship", "status": "waiting", "total": 1, "succeeded": 0, "failed": 0,
             "deadline_at": "2026-01-02T00:00:00Z", "detail": {"approval": "waiting"}, "instances": []}
        ]});
        let text = describe_run(&run, 0);
        assert!(text.contains("trigger api"), "{text}");
        assert!(text.contains("params: {\"n\":1}"), "{text}");
        assert!(text.contains("41,42"), "{text}");
        assert!(
            text.contains("build[1] failed attempt 3 exit 2: exit code 2"),
            "{text}"
        );
        assert!(
            text.contains("ship: deadline 2026-01-02T00:00:00Z"),
            "{text}"
        );
        assert!(text.contains("ship: {\"approval\":\"waiting\"}"), "{text}");
    }

    #[test]
    fn schedule_bodies_from_flags() {
        let args = CreateSchedule {
            name: Some("nightly".into()),
            cron: Some("0 3 * * *".into()),
            timezone: Some("Europe/Paris".into()),
            job_kind: None,
            job_spec: None,
            queue: None,
            pipeline: Some("build".into()),
            params: strings(&["n=2"]),
            overlap: Some("queue".into()),
            catch_up: None,
            paused: true,
            file: None,
        };
        assert_eq!(
            schedule_body(args).unwrap(),
            json!({"name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Paris",
                   "target": {"pipeline": {"name": "build", "params": {"n": 2}}},
                   "overlap": "queue", "paused": true})
        );
        let args = CreateSchedule {
            name: Some("tick".into()),
            cron: Some("* * * * *".into()),
            timezone: None,
            job_kind: Some("noop".into()),
            job_spec: Some("{\"sleep_ms\": 5}".into()),
            queue: Some("slow".into()),
            pipeline: None,
            params: vec![],
            overlap: None,
            catch_up: Some("all".into()),
            paused: false,
            file: None,
        };
        assert_eq!(
            schedule_body(args).unwrap(),
            json!({"name": "tick", "cron": "* * * * *", "catch_up": "all",
                   "target": {"job": {"kind": "noop", "spec": {"sleep_ms": 5}, "queue": "slow"}}})
        );
    }

    #[test]
    fn artifacts_print_name_size_and_digest() {
        assert_eq!(
            artifact_lines(&json!({"artifacts": [
                {"name": "a/out/x", "step": "a", "path": "out/x", "size": 3, "digest": "sha256:ab"}]})),
            strings(&["a/out/x\t3\tsha256:ab"])
        );
        assert!(artifact_lines(&json!({})).is_empty());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        crate::Cli::command().debug_assert();
    }

    #[test]
    fn names_stay_one_path_segment() {
        assert_eq!(segment("a/../b c").unwrap(), "a%2F..%2Fb%20c");
        assert_eq!(segment("build-1.x_y").unwrap(), "build-1.x_y");
        for bad in ["", ".", ".."] {
            assert!(segment(bad).is_err(), "{bad:?}");
        }
    }
}
