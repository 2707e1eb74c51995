//! `kiln node ls|get|drain|resume`: the fleet through the API (the
//! deployment's key, `system` scope).

use clap::Subcommand;
use serde_json::Value;

use crate::client::{print, Client};

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Every node, one line each (or only those in one status).
    Ls {
        /// `online`, `draining` or `lost`.
        #[arg(long)]
        status: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One node with its load over the last 15 minutes (JSON).
    Get { id: String },
    /// Stop the node leasing new jobs; its running jobs finish.
    Drain { id: String },
    /// Let a drained node lease again.
    Resume { id: String },
}

pub async fn node(client: Client, command: NodeCommand) -> anyhow::Result<i32> {
    match command {
        NodeCommand::Ls { status, json } => {
            let path = match &status {
                // The API checks the value; only characters that would
                // change the query need keeping out.
                Some(status) if status.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                    format!("/api/v1/nodes?status={status}")
                }
                Some(status) => {
                    anyhow::bail!("unknown status {status:?}: use online, draining or lost")
                }
                None => "/api/v1/nodes".to_string(),
            };
            let list = client.get(&path).await?;
            if json {
                print(&list);
            } else {
                print_table(&list);
            }
        }
        NodeCommand::Get { id } => print(
            &client
                .get(&format!("/api/v1/nodes/{}", segment(&id)?))
                .await?,
        ),
        NodeCommand::Drain { id } => print(
            &client
                .post(
                    &format!("/api/v1/nodes/{}/drain", segment(&id)?),
                    &serde_json::json!({}),
                )
                .await?,
        ),
        NodeCommand::Resume { id } => print(
            &client
                .post(
                    &format!("/api/v1/nodes/{}/resume", segment(&id)?),
                    &serde_json::json!({}),
                )
                .await?,
        ),
    }
    Ok(0)
}

/// A node id as a path segment: ids are `<host>-<pid>`, so anything that
/// would change the path is refused rather than escaped.
fn segment(id: &str) -> anyhow::Result<&str> {
    if id.is_empty()
        || id
            .bytes()
            .any(|b| !(b.is_ascii_alphanumeric() || b"-._".contains(&b)))
    {
        anyhow::bail!("{id:?} is not a node id");
    }
    Ok(id)
}

fn percent(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_string(), |v| format!("{:.0}%", v * 100.0))
}

fn print_table(list: &Value) {
    println!(
        "{:<28} {:<9} {:<24} {:>7} {:>5} {:>5} {:>6} {:>4}  LAST SEEN",
        "ID", "STATUS", "ROLES", "SLOTS", "CPU", "MEM", "LOAD", "VMS"
    );
    for node in list["nodes"].as_array().into_iter().flatten() {
        let roles: Vec<&str> = node["roles"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "{:<28} {:<9} {:<24} {:>7} {:>5} {:>5} {:>6} {:>4}  {}",
            node["id"].as_str().unwrap_or("-"),
            node["status"].as_str().unwrap_or("-"),
            roles.join(","),
            format!("{}/{}", node["slots_used"], node["slots_total"]),
            percent(&node["load"]["cpu"]),
            percent(&node["load"]["mem_used"]),
            node["load"]["load1"]
                .as_f64()
                .map_or_else(|| "-".to_string(), |l| format!("{l:.2}")),
            node["vms_live"],
            node["last_seen"].as_str().unwrap_or("-"),
        );
    }
}
