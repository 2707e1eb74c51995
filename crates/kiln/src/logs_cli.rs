//! `kiln logs` and `kiln job logs`: the live logs, as pages or followed
//! over Server-Sent Events, resuming after the last chunk seen whenever
//! the stream drops.

use std::io::Write;

use clap::Args;
use serde_json::Value;

use crate::client::Client;
use crate::events_cli::encode;

#[derive(Args)]
pub struct LogsArgs {
    /// Keep printing new lines as they are produced.
    #[arg(short = 'f', long)]
    follow: bool,
    /// One job's output.
    #[arg(long)]
    job: Option<i64>,
    /// One VM's commands.
    #[arg(long)]
    vm: Option<String>,
    /// The lowest level: error, warn, info, debug.
    #[arg(long)]
    level: Option<String>,
    /// job, vm or node (node: the deployment's key only).
    #[arg(long)]
    source: Option<String>,
    /// Only chunks containing this text.
    #[arg(short = 'q', long = "query")]
    q: Option<String>,
    /// From this time (RFC 3339 or milliseconds since the epoch).
    #[arg(long)]
    since: Option<String>,
    /// Before this time.
    #[arg(long)]
    until: Option<String>,
    /// Print each chunk as one line of JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct JobLogsArgs {
    id: String,
    /// Follow the job's output until it ends.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Print each chunk as one line of JSON.
    #[arg(long)]
    json: bool,
}

fn query(args: &LogsArgs) -> String {
    let job = args.job.map(|j| j.to_string());
    let mut pairs = Vec::new();
    for (name, value) in [
        ("job", &job),
        ("vm", &args.vm),
        ("level", &args.level),
        ("source", &args.source),
        ("q", &args.q),
        ("since", &args.since),
        ("until", &args.until),
    ] {
        if let Some(value) = value {
            pairs.push(format!("{name}={}", encode(value)));
        }
    }
    pairs.join("&")
}

/// Prints a chunk: raw for one job's output, with its origin otherwise.
fn print(line: &Value, json: bool, origin: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{line}");
        return;
    }
    let text = line["text"].as_str().unwrap_or("");
    if !origin {
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        return;
    }
    let source = line["source"].as_str().unwrap_or("");
    let from = match (line["job"].as_str(), line["vm"].as_str()) {
        (Some(job), _) => format!("job {job}"),
        (None, Some(vm)) => format!("vm {vm}"),
        _ => line["node"].as_str().unwrap_or(source).to_string(),
    };
    let prefix = format!(
        "{} {} {:>5} {}",
        line["time"].as_str().unwrap_or("-"),
        from,
        line["level"].as_str().unwrap_or(""),
        line["stream"].as_str().unwrap_or("")
    );
    for piece in text.split_inclusive('\n') {
        let _ = write!(out, "{prefix} | {piece}");
        if !piece.ends_with('\n') {
            let _ = writeln!(out);
        }
    }
    let _ = out.flush();
}

pub async fn logs(client: Client, args: LogsArgs) -> anyhow::Result<i32> {
    let path = format!("/api/v1/logs?{}", query(&args));
    let origin = args.job.is_none();
    if args.follow {
        follow(&client, &format!("{path}&follow=true"), args.json, origin).await
    } else {
        pages(&client, &path, args.json, origin).await
    }
}

pub async fn job_logs(client: Client, args: JobLogsArgs) -> anyhow::Result<i32> {
    let path = format!("/api/v1/jobs/{}/logs?", encode(&args.id));
    if args.follow {
        follow(&client, &format!("{path}follow=true"), args.json, false).await
    } else {
        pages(&client, &path, args.json, false).await
    }
}

async fn pages(client: &Client, path: &str, json: bool, origin: bool) -> anyhow::Result<i32> {
    let mut cursor = 0i64;
    loop {
        let page = client
            .get(&format!("{path}&cursor={cursor}&limit=1000"))
            .await?;
        let lines = page["lines"].as_array().cloned().unwrap_or_default();
        for line in &lines {
            print(line, json, origin);
        }
        let next = page["next_cursor"]
            .as_str()
            .and_then(|c| c.parse::<i64>().ok())
            .unwrap_or(cursor);
        if lines.is_empty() || next == cursor {
            return Ok(0);
        }
        cursor = next;
    }
}

enum Frame {
    Line(Value),
    End(Value),
    Failed(String),
    Other,
}

fn classify(frame: crate::client::SseFrame) -> Frame {
    match (frame.id, frame.kind.as_str()) {
        (Some(_), "log") => Frame::Line(frame.data),
        (_, "end") => Frame::End(frame.data),
        (_, "error") => Frame::Failed(frame.reason()),
        _ => Frame::Other,
    }
}

/// Follows a stream, resuming after the last chunk printed; a job's
/// stream ends with its `end` event.
async fn follow(client: &Client, path: &str, json: bool, origin: bool) -> anyhow::Result<i32> {
    client
        .follow(path, None, |frame| match classify(frame) {
            Frame::Line(line) => {
                print(&line, json, origin);
                None
            }
            Frame::End(end) => {
                if !json {
                    eprintln!(
                        "kiln: the job ended: {}",
                        end["status"].as_str().unwrap_or("?")
                    );
                }
                Some(0)
            }
            Frame::Failed(reason) => {
                eprintln!("kiln: {reason}; resuming");
                None
            }
            Frame::Other => None,
        })
        .await
}
