//! `kiln secret set|ls|get|rm` through the API (the value of `set` is read
//! from stdin, never from the command line, where `ps` and shell history
//! would show it), and `kiln secret rotate-master` on the database itself.

use std::io::Read;

use anyhow::Context;
use clap::Subcommand;

use crate::client::{print, Client, ClientArgs};
use crate::config::ServerArgs;

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Store a new version of a secret; the value is read from stdin.
    Set {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
    /// The tenant's secrets: names, versions, sizes, last use.
    Ls {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One secret's metadata.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
    /// Delete a secret, every version of it.
    Rm {
        #[command(flatten)]
        client: ClientArgs,
        name: String,
    },
    /// Seal every secret's data key under a new master key, then make it
    /// the master key (the old one is kept as `<file>.old`). Restart every
    /// node with the new key afterwards.
    RotateMaster {
        #[command(flatten)]
        server: Box<ServerArgs>,
    },
}

/// A secret name as a path segment: names are identifiers, so anything
/// else is refused here rather than escaped.
fn segment(name: &str) -> anyhow::Result<&str> {
    kiln_core::secrets::check_name(name).map_err(anyhow::Error::msg)?;
    Ok(name)
}

pub async fn secret(command: SecretCommand) -> anyhow::Result<i32> {
    match command {
        SecretCommand::Set { client, name } => {
            let mut value = Vec::new();
            std::io::stdin()
                .take(kiln_core::secrets::VALUE_MAX as u64 + 1)
                .read_to_end(&mut value)
                .context("reading the value from stdin")?;
            anyhow::ensure!(
                value.len() <= kiln_core::secrets::VALUE_MAX,
                "a secret holds at most {} bytes",
                kiln_core::secrets::VALUE_MAX
            );
            let path = format!("/api/v1/secrets/{}", segment(&name)?);
            print(&Client::new(&client)?.put_bytes(&path, value).await?);
        }
        SecretCommand::Ls { client } => print(&Client::new(&client)?.get("/api/v1/secrets").await?),
        SecretCommand::Get { client, name } => print(
            &Client::new(&client)?
                .get(&format!("/api/v1/secrets/{}", segment(&name)?))
                .await?,
        ),
        SecretCommand::Rm { client, name } => {
            Client::new(&client)?
                .delete(&format!("/api/v1/secrets/{}", segment(&name)?))
                .await?;
        }
        SecretCommand::RotateMaster { server } => rotate_master(*server).await?,
    }
    Ok(0)
}

/// Crash-safe: the new key is written beside the old one first
/// (`<file>.new`), so a rotation stopped half way is finished by running
/// it again (versions already under the new key are skipped); only then
/// does the new key take the old one's place.
async fn rotate_master(server: ServerArgs) -> anyhow::Result<()> {
    use kiln_core::secrets::{rewrap, MasterKey, NONCE_BYTES};
    use rand::RngCore;
    let settings = server.settings()?;
    settings.create_data_dir()?;
    let old = crate::serve::master_key(&settings)?;
    let path = settings
        .master_key_file
        .clone()
        .unwrap_or_else(|| settings.data_dir.join("master.key"));
    let pending = path.with_extension("key.new");
    let new = match std::fs::read_to_string(&pending) {
        Ok(text) => MasterKey::parse(&text).context("the pending new master key is unreadable")?,
        Err(_) => {
            let mut bytes = [0u8; kiln_core::secrets::KEY_BYTES];
            rand::rng().fill_bytes(&mut bytes);
            let key = MasterKey::new(bytes);
            crate::serve::write_secret(&pending, &key.to_hex())?;
            key
        }
    };
    let db = crate::serve::open_db(&settings).await?;
    let mut moved = 0u64;
    loop {
        let page = db.secret_sealed_not_under(&new.id(), 500).await?;
        if page.is_empty() {
            break;
        }
        for mut version in page {
            let at = (
                version.tenant.as_str(),
                version.name.as_str(),
                version.version,
            );
            let mut nonce = [0u8; NONCE_BYTES];
            rand::rng().fill_bytes(&mut nonce);
            version.sealed = rewrap(&old, &new, at, &version.sealed, nonce)
                .with_context(|| format!("secret {} of tenant {}, version {}", at.1, at.0, at.2))?;
            db.secret_rewrap(&version).await?;
            moved += 1;
        }
    }
    let kept = path.with_extension("key.old");
    std::fs::copy(&path, &kept)
        .with_context(|| format!("keeping the old key as {}", kept.display()))?;
    std::fs::rename(&pending, &path).with_context(|| format!("replacing {}", path.display()))?;
    db.close().await;
    eprintln!(
        "re-sealed {moved} secret versions under master key {} (was {}); the old key is in {}; restart every node with the new key",
        new.id(),
        old.id(),
        kept.display()
    );
    Ok(())
}
