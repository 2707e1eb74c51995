//! `kiln events tail`: the tenant's event log as it grows, over Server-Sent
//! Events, resuming after the last event seen whenever the stream drops
//! (a restart, a network blip, or the server dropping a slow reader).

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::client::Client;

#[derive(Subcommand)]
pub enum EventsCommand {
    /// Print events as they happen (and, with --after, those since).
    Tail(TailArgs),
}

#[derive(Args)]
pub struct TailArgs {
    /// Types, comma-separated: `job.*`, `run.succeeded`, `*`.
    #[arg(long = "type")]
    types: Option<String>,
    /// One resource: `job:42`, `run:7`, `step:7/build`.
    #[arg(long)]
    resource: Option<String>,
    /// `key=value`, comma-separated; all must match.
    #[arg(long)]
    label: Option<String>,
    /// Start after this event id (0: the whole log kept).
    #[arg(long)]
    after: Option<i64>,
    /// Print each event as one line of JSON.
    #[arg(long)]
    json: bool,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<usize>,
}

pub async fn events(client: Client, command: EventsCommand) -> anyhow::Result<i32> {
    match command {
        EventsCommand::Tail(args) => tail(&client, args).await,
    }
}

fn query(args: &TailArgs) -> String {
    let mut pairs = Vec::new();
    for (name, value) in [
        ("type", &args.types),
        ("resource", &args.resource),
        ("label", &args.label),
    ] {
        if let Some(value) = value {
            pairs.push(format!("{name}={}", encode(value)));
        }
    }
    pairs.join("&")
}

/// Percent-encodes a query value (names and labels are plain, but `*`, `=`
/// and `/` must arrive as they were typed).
pub(crate) fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn tail(client: &Client, args: TailArgs) -> anyhow::Result<i32> {
    let mut printed = 0usize;
    let path = format!("/api/v1/events?{}", query(&args));
    client
        .follow(&path, args.after, |frame| match classify(frame) {
            Frame::Event(event) => {
                print(&event, args.json);
                printed += 1;
                args.count.is_some_and(|n| printed >= n).then_some(0)
            }
            Frame::Dropped(reason) => {
                eprintln!("kiln: {reason}; resuming");
                None
            }
            Frame::Other => None,
        })
        .await
}

enum Frame {
    Event(Value),
    Dropped(String),
    Other,
}

fn classify(frame: crate::client::SseFrame) -> Frame {
    match (frame.id, frame.kind.as_str()) {
        (Some(_), _) => Frame::Event(frame.data),
        (None, "error") => Frame::Dropped(frame.reason()),
        _ => Frame::Other,
    }
}

/// `id time type kind:id data`, or the event's JSON.
fn print(event: &Value, json: bool) {
    if json {
        println!("{event}");
        return;
    }
    let field = |v: &Value| v.as_str().unwrap_or("-").escape_debug().to_string();
    println!(
        "{} {} {} {}:{} {}",
        field(&event["id"]),
        field(&event["time"]),
        field(&event["type"]),
        field(&event["resource"]["kind"]),
        field(&event["resource"]["id"]),
        event["data"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::SseFrame;

    #[test]
    fn frames_are_events_drops_or_comments() {
        let event = "id: 7\nevent: job.queued\ndata: {\"id\":\"7\",\"type\":\"job.queued\"}\n\n";
        assert_eq!(SseFrame::parse(event).id, Some(7));
        assert!(
            matches!(classify(SseFrame::parse(event)), Frame::Event(v) if v["type"] == "job.queued")
        );
        let drop = "event: error\ndata: {\"reason\":\"slow consumer\"}\n\n";
        assert!(
            matches!(classify(SseFrame::parse(drop)), Frame::Dropped(r) if r == "slow consumer")
        );
        assert!(matches!(classify(SseFrame::parse(":\n\n")), Frame::Other));
    }

    #[test]
    fn filters_are_encoded() {
        assert_eq!(encode("job.*"), "job.%2A");
        assert_eq!(encode("team=a,b"), "team%3Da%2Cb");
    }
}
