//! `kiln rule apply|ls|get|rm|dry-run|actions`: the tenant's self-healing
//! rules through the API. Rule files are JSON or YAML, one rule (with its
//! `name`) or a list of them.

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::client::{print, Client};
use crate::flow_cli::read_document;

#[derive(Subcommand)]
pub enum RuleCommand {
    /// Create or replace rules from a file ('-' for stdin).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: String,
        /// The rule's name, when the file holds one rule without a `name`.
        #[arg(long)]
        name: Option<String>,
    },
    /// The tenant's rules, one line each.
    Ls {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One rule (JSON).
    Get { name: String },
    /// Delete a rule.
    Rm { name: String },
    /// What a rule would do with an event, and why; changes nothing.
    DryRun {
        name: String,
        /// An event of the log, by id.
        #[arg(long, conflicts_with = "file")]
        event: Option<u64>,
        /// An event written out (`{type, resource, labels, data}`), JSON
        /// or YAML; '-' for stdin.
        #[arg(short = 'f', long = "file")]
        file: Option<String>,
    },
    /// What a rule did, newest first.
    Actions {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

/// Rule names are names (`[A-Za-z0-9][A-Za-z0-9_.:@-]*`): nothing that
/// could change the path they are put in.
fn checked(name: &str) -> anyhow::Result<&str> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b));
    if !ok {
        bail!("{name:?} is not a rule name");
    }
    Ok(name)
}

pub async fn rule(client: Client, command: RuleCommand) -> anyhow::Result<i32> {
    match command {
        RuleCommand::Apply { file, name } => {
            let document = read_document(&file)?;
            let rules = match document {
                Value::Array(rules) => rules,
                rule => vec![rule],
            };
            if name.is_some() && rules.len() != 1 {
                bail!("--name names one rule; {file} holds {}", rules.len());
            }
            for mut rule in rules {
                let name = match (&name, rule.get("name").and_then(Value::as_str)) {
                    (Some(name), _) => name.clone(),
                    (None, Some(name)) => name.to_string(),
                    (None, None) => bail!("a rule in {file} has no name; give --name"),
                };
                rule["name"] = json!(name);
                let applied = client
                    .put(
                        &format!("/api/v1/automation/rules/{}", checked(&name)?),
                        &rule,
                    )
                    .await
                    .with_context(|| format!("applying rule {name}"))?;
                println!(
                    "rule {} applied ({})",
                    name,
                    if applied["active"] == false {
                        "inactive"
                    } else {
                        "active"
                    }
                );
            }
        }
        RuleCommand::Ls { json } => {
            let list = client.get("/api/v1/automation/rules").await?;
            if json {
                print(&list);
            } else {
                print_table(&list);
            }
        }
        RuleCommand::Get { name } => print(
            &client
                .get(&format!("/api/v1/automation/rules/{}", checked(&name)?))
                .await?,
        ),
        RuleCommand::Rm { name } => {
            client
                .delete(&format!("/api/v1/automation/rules/{}", checked(&name)?))
                .await?;
            println!("rule {name} deleted");
        }
        RuleCommand::DryRun { name, event, file } => {
            let mut body = json!({"rule": checked(&name)?});
            match (event, file) {
                (Some(id), None) => body["event_id"] = json!(id),
                (None, Some(file)) => body["event"] = read_document(&file)?,
                _ => bail!("give --event ID or -f FILE"),
            }
            print(&client.post("/api/v1/automation/dry-run", &body).await?);
        }
        RuleCommand::Actions { name, json } => {
            let list = client
                .get(&format!(
                    "/api/v1/automation/rules/{}/actions",
                    checked(&name)?
                ))
                .await?;
            if json {
                print(&list);
            } else {
                println!(
                    "{:>6} {:<24} {:>8} {:<18} {:<6}  MESSAGE",
                    "ID", "TIME", "EVENT", "ACTION", "OUTCOME"
                );
                for a in list["actions"].as_array().into_iter().flatten() {
                    println!(
                        "{:>6} {:<24} {:>8} {:<18} {:<6}  {}",
                        a["id"].as_str().unwrap_or("-"),
                        a["time"].as_str().unwrap_or("-"),
                        a["event_id"],
                        a["action"].as_str().unwrap_or("-"),
                        a["outcome"].as_str().unwrap_or("-"),
                        a["message"].as_str().unwrap_or(""),
                    );
                }
            }
        }
    }
    Ok(0)
}

fn print_table(list: &Value) {
    println!(
        "{:<24} {:<8} {:>9} {:>8}  TRIGGER",
        "NAME", "ACTIVE", "COOLDOWN", "PER-HOUR"
    );
    for r in list["rules"].as_array().into_iter().flatten() {
        let trigger = match (&r["trigger"]["incident"], &r["trigger"]["events"]) {
            (Value::String(kind), _) => format!("incident {kind}"),
            (_, Value::Array(types)) if !types.is_empty() => types
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            _ => "every event".to_string(),
        };
        println!(
            "{:<24} {:<8} {:>8}s {:>8}  {}",
            r["name"].as_str().unwrap_or("-"),
            r["active"],
            r["cooldown_s"],
            r["max_per_hour"],
            trigger,
        );
    }
}
