//! `kiln policy set|ls|get|rm|test`: the tenant's admission policies
//! through the API.

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::client::{print, Client};

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Create or replace a policy.
    Set {
        name: String,
        /// The expression every admitted job satisfies, e.g.
        /// 'job.kind != "vm" || job.labels.team != null'.
        #[arg(long)]
        rule: String,
        /// What a refused submitter is told.
        #[arg(long)]
        message: Option<String>,
        /// Comma-separated kinds the policy judges (default: every kind).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Store it switched off.
        #[arg(long)]
        disabled: bool,
    },
    /// The tenant's policies, one line each.
    Ls {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One policy (JSON).
    Get { name: String },
    /// Delete a policy.
    Rm { name: String },
    /// Judge a job (JSON, as `POST /api/v1/jobs` takes it; '-' for stdin)
    /// by the tenant's policies without submitting it. Exits 1 when a
    /// policy refuses it.
    Test {
        #[arg(long = "job")]
        job: String,
    },
}

/// Policy names are names (`[A-Za-z0-9][A-Za-z0-9_.:@-]*`): nothing that
/// could change the path they are put in.
fn checked(name: &str) -> anyhow::Result<&str> {
    if kiln_core::names::check_name("policy name", name).is_err() {
        bail!("{name:?} is not a policy name");
    }
    Ok(name)
}

fn read_job(file: &str) -> anyhow::Result<Value> {
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the job from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
    };
    serde_json::from_str(&text).with_context(|| format!("{file} is not JSON"))
}

pub async fn policy(client: Client, command: PolicyCommand) -> anyhow::Result<i32> {
    match command {
        PolicyCommand::Set {
            name,
            rule,
            message,
            kinds,
            disabled,
        } => {
            let mut body = json!({"rule": rule, "enabled": !disabled});
            if let Some(message) = message {
                body["message"] = json!(message);
            }
            if !kinds.is_empty() {
                body["applies_to"] = json!(kinds);
            }
            client
                .put(&format!("/api/v1/policies/{}", checked(&name)?), &body)
                .await
                .with_context(|| format!("setting policy {name}"))?;
            println!("policy {name} set");
        }
        PolicyCommand::Ls { json } => {
            let list = client.get("/api/v1/policies").await?;
            if json {
                print(&list);
            } else {
                println!("{:<24} {:<8} {:<16}  RULE", "NAME", "ENABLED", "KINDS");
                for p in list["policies"].as_array().into_iter().flatten() {
                    let kinds: Vec<&str> = p["applies_to"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    println!(
                        "{:<24} {:<8} {:<16}  {}",
                        p["name"].as_str().unwrap_or("-"),
                        p["enabled"],
                        if kinds.is_empty() {
                            "*".to_string()
                        } else {
                            kinds.join(",")
                        },
                        p["rule"].as_str().unwrap_or("-"),
                    );
                }
            }
        }
        PolicyCommand::Get { name } => print(
            &client
                .get(&format!("/api/v1/policies/{}", checked(&name)?))
                .await?,
        ),
        PolicyCommand::Rm { name } => {
            client
                .delete(&format!("/api/v1/policies/{}", checked(&name)?))
                .await?;
            println!("policy {name} deleted");
        }
        PolicyCommand::Test { job } => {
            let verdict = client
                .post("/api/v1/policies/test", &read_job(&job)?)
                .await?;
            for v in verdict["verdicts"].as_array().into_iter().flatten() {
                let what = match (v["applies"].as_bool(), v["admitted"].as_bool()) {
                    (Some(false), _) => "does not apply".to_string(),
                    (_, Some(true)) => "admits".to_string(),
                    _ => format!("refuses: {}", v["message"].as_str().unwrap_or("")),
                };
                println!("{:<24} {what}", v["policy"].as_str().unwrap_or("-"));
            }
            if verdict["admitted"] == true {
                println!("admitted");
            } else {
                println!(
                    "refused: {}",
                    verdict["message"].as_str().unwrap_or("by a policy")
                );
                return Ok(1);
            }
        }
    }
    Ok(0)
}
