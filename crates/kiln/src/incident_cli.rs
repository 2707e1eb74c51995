//! `kiln incident ls|get|ack|resolve`: the tenant's incidents through the API.

use clap::Subcommand;
use serde_json::{json, Value};

use crate::client::{print, Client};

#[derive(Subcommand)]
pub enum IncidentCommand {
    /// Incidents, newest first, one line each.
    Ls {
        /// `open`, `acknowledged` or `resolved`.
        #[arg(long)]
        status: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One incident with its timeline (JSON).
    Get { id: u64 },
    /// Acknowledge an open incident.
    Ack { id: u64 },
    /// Resolve an incident by hand.
    Resolve {
        id: u64,
        /// How (`restart`, `rollback`, …).
        #[arg(long)]
        method: Option<String>,
        #[arg(long)]
        notes: Option<String>,
    },
}

pub async fn incident(client: Client, command: IncidentCommand) -> anyhow::Result<i32> {
    match command {
        IncidentCommand::Ls { status, json } => {
            let path = match &status {
                Some(status) if status.bytes().all(|b| b.is_ascii_alphabetic()) => {
                    format!("/api/v1/incidents?status={status}")
                }
                Some(status) => {
                    anyhow::bail!("unknown status {status:?}: use open, acknowledged or resolved")
                }
                None => "/api/v1/incidents".to_string(),
            };
            let list = client.get(&path).await?;
            if json {
                print(&list);
            } else {
                print_table(&list);
            }
        }
        IncidentCommand::Get { id } => {
            print(&client.get(&format!("/api/v1/incidents/{id}")).await?)
        }
        IncidentCommand::Ack { id } => print(
            &client
                .post(&format!("/api/v1/incidents/{id}/ack"), &json!({}))
                .await?,
        ),
        IncidentCommand::Resolve { id, method, notes } => print(
            &client
                .post(
                    &format!("/api/v1/incidents/{id}/resolve"),
                    &json!({"method": method, "notes": notes}),
                )
                .await?,
        ),
    }
    Ok(0)
}

fn print_table(list: &Value) {
    println!(
        "{:>6} {:<13} {:<9} {:>5}  {:<20}  TITLE",
        "ID", "STATUS", "SEVERITY", "SEEN", "OPENED"
    );
    for i in list["incidents"].as_array().into_iter().flatten() {
        println!(
            "{:>6} {:<13} {:<9} {:>5}  {:<20}  {}",
            i["id"].as_str().unwrap_or("-"),
            i["status"].as_str().unwrap_or("-"),
            i["severity"].as_str().unwrap_or("-"),
            i["occurrences"],
            i["opened_at"].as_str().unwrap_or("-"),
            i["title"].as_str().unwrap_or("-"),
        );
    }
}
