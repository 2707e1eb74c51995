//! `kiln users create|ls|get|rm|passwd|role` through the API with an admin
//! key (passwords are read from stdin, never from the command line, where
//! `ps` and shell history would show them), `kiln users rotate-token-key`
//! on the token key file itself, and `kiln login`.

use std::io::Read;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

use crate::client::{print, Client, ClientArgs};
use crate::config::ServerArgs;

#[derive(Subcommand)]
pub enum UsersCommand {
    /// Add a user to the key's tenant; the password is read from stdin.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        /// viewer (read), operator (read, write, approve) or admin.
        #[arg(long)]
        role: String,
    },
    /// The tenant's users and their roles.
    Ls {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One user.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
    /// Delete a user; their sessions end.
    Rm {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
    /// Set a user's password (read from stdin); their sessions end.
    Passwd {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
    /// Give a user another role; their sessions end.
    Role {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
        role: String,
    },
    /// Sign new session tokens with a new key; the previous key still
    /// verifies the tokens it signed until they expire. Running API
    /// processes pick the file up within a second; copy it to every API
    /// node of the deployment.
    RotateTokenKey {
        #[command(flatten)]
        server: Box<ServerArgs>,
    },
}

/// A username as a path segment: names are refused here rather than
/// escaped.
fn segment(name: &str) -> anyhow::Result<&str> {
    kiln_core::names::check_name("username", name).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(name)
}

fn role(text: &str) -> anyhow::Result<&str> {
    kiln_core::users::Role::parse(text)
        .map(|r| r.as_str())
        .with_context(|| format!("role {text:?}: use viewer, operator or admin"))
}

/// A password from stdin: its first line, without the line end.
pub fn read_password() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .take(kiln_core::users::PASSWORD_MAX_BYTES as u64 + 2)
        .read_to_string(&mut text)
        .context("reading the password from stdin")?;
    let password = text.lines().next().unwrap_or_default().to_string();
    kiln_core::users::check_password(&password).map_err(anyhow::Error::msg)?;
    Ok(password)
}

pub async fn users(command: UsersCommand) -> anyhow::Result<i32> {
    match command {
        UsersCommand::Create {
            client,
            name,
            role: r,
        } => {
            let body = json!({"username": segment(&name)?, "role": role(&r)?, "password": read_password()?});
            print(&Client::new(&client)?.post("/api/v1/users", &body).await?);
        }
        UsersCommand::Ls { client } => print(&Client::new(&client)?.get("/api/v1/users").await?),
        UsersCommand::Get { client, name } => print(
            &Client::new(&client)?
                .get(&format!("/api/v1/users/{}", segment(&name)?))
                .await?,
        ),
        UsersCommand::Rm { client, name } => {
            Client::new(&client)?
                .delete(&format!("/api/v1/users/{}", segment(&name)?))
                .await?;
        }
        UsersCommand::Passwd { client, name } => {
            let path = format!("/api/v1/users/{}/password", segment(&name)?);
            Client::new(&client)?
                .put(&path, &json!({"password": read_password()?}))
                .await?;
        }
        UsersCommand::Role {
            client,
            name,
            role: r,
        } => {
            let path = format!("/api/v1/users/{}/role", segment(&name)?);
            print(
                &Client::new(&client)?
                    .put(&path, &json!({"role": role(&r)?}))
                    .await?,
            );
        }
        UsersCommand::RotateTokenKey { server } => {
            let settings = server.settings()?;
            settings.create_data_dir()?;
            let (path, _) = crate::serve::token_key_path(&settings);
            // The first rotation of a fresh data dir makes the file first.
            kiln_api::auth::TokenKeys::open(&path, true)
                .with_context(|| format!("reading {}", path.display()))?;
            let (new, kept) = kiln_api::auth::TokenKeys::rotate(&path)
                .with_context(|| format!("rotating {}", path.display()))?;
            eprintln!(
                "new tokens are signed with key {new}; key {kept} still verifies the tokens it signed until they expire ({})",
                path.display()
            );
        }
    }
    Ok(0)
}

/// `kiln login`: signs in and prints the session token (the password is
/// read from stdin); use it as `KILN_API_KEY` until it expires.
pub async fn login(url: &str, tenant: &str, username: &str) -> anyhow::Result<i32> {
    let password = read_password()?;
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/auth/login", url.trim_end_matches('/')))
        .json(&json!({"tenant": tenant, "username": username, "password": password}))
        .send()
        .await
        .with_context(|| format!("cannot reach kiln at {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "{status} {}: {}",
            body["error"]["code"].as_str().unwrap_or("error"),
            body["error"]["message"].as_str().unwrap_or("login failed")
        );
    }
    eprintln!(
        "signed in as {} ({}) in tenant {} until {}",
        body["username"].as_str().unwrap_or_default(),
        body["role"].as_str().unwrap_or_default(),
        body["tenant"].as_str().unwrap_or_default(),
        body["expires_at"].as_str().unwrap_or_default()
    );
    println!("{}", body["token"].as_str().unwrap_or_default());
    Ok(0)
}
