//! Secrets for sandboxes: the values a job's spec names, opened with the
//! master key this process holds (read, never made: only API processes
//! make one), each delivery written to the audit trail. The sandbox
//! crates place the values (files under `/run/secrets`) and redact them
//! from output with the [`Redactor`] that comes with them.

use std::sync::Arc;

use kiln_core::audit::AuditRecord;
use kiln_core::redact::Redactor;
use kiln_core::secrets::{self, MasterKey, SecretError};
use kiln_db::Db;

/// Opens the secrets jobs ask for. Cloning is cheap.
#[derive(Clone)]
pub struct SecretKeeper {
    db: Db,
    master: Option<MasterKey>,
}

impl std::fmt::Debug for SecretKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKeeper")
            .field("master", &self.master)
            .finish()
    }
}

/// A job's secrets in clear, for one run.
pub struct Opened {
    /// `(name, value)`, in the order asked.
    pub values: Vec<(String, Vec<u8>)>,
    /// Redacts every value from output; `None` when nothing was asked.
    pub redactor: Option<Arc<Redactor>>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.values.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Opened").field("names", &names).finish()
    }
}

impl Opened {
    pub fn none() -> Opened {
        Opened {
            values: Vec::new(),
            redactor: None,
        }
    }
}

/// Who a delivery is for, as the audit trail names it.
#[derive(Clone, Debug)]
pub struct Recipient {
    /// `job` (a job's sandbox) or `vm` (a command run through the API, or
    /// a VM created with secrets).
    pub kind: &'static str,
    /// The job or VM id.
    pub id: String,
}

impl Recipient {
    pub fn job(id: i64) -> Recipient {
        Recipient {
            kind: "job",
            id: id.to_string(),
        }
    }

    pub fn vm(id: &str) -> Recipient {
        Recipient {
            kind: "vm",
            id: id.to_string(),
        }
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl SecretKeeper {
    /// `master` is `None` on a process that holds no master key: jobs that
    /// ask for secrets fail there, saying so.
    pub fn new(db: Db, master: Option<MasterKey>) -> SecretKeeper {
        SecretKeeper { db, master }
    }

    pub fn has_master_key(&self) -> bool {
        self.master.is_some()
    }

    /// Opens the newest version of each of `names` of `tenant` for
    /// `recipient`, writing one audit record per name (`secret.read`,
    /// outcome `ok` or why not). Any name that cannot be opened fails the
    /// whole delivery: a sandbox runs with every secret it asked for or
    /// not at all. The error is safe to store (it names, never shows).
    pub async fn open(
        &self,
        tenant: &str,
        names: &[String],
        recipient: &Recipient,
    ) -> Result<Opened, String> {
        if names.is_empty() {
            return Ok(Opened::none());
        }
        let now = now_millis();
        let Some(master) = &self.master else {
            let outcomes = names.iter().map(|n| (n.as_str(), "no_master_key"));
            self.audit(tenant, recipient, now, outcomes).await?;
            return Err(
                "this worker holds no master key, so it cannot deliver secrets \
                 (give it --master-key-file, or the API's <data-dir>/master.key)"
                    .to_string(),
            );
        };
        let taken = self
            .db
            .secret_take(tenant, names, now)
            .await
            .map_err(|e| format!("secrets could not be read: {e}"))?;
        let mut values = Vec::with_capacity(names.len());
        let mut outcomes = Vec::with_capacity(names.len());
        let mut error = None;
        for name in names {
            let Some(version) = taken.iter().find(|v| &v.name == name) else {
                outcomes.push((name.as_str(), "not_found"));
                error.get_or_insert_with(|| format!("secret {name} does not exist"));
                continue;
            };
            match secrets::open(master, (tenant, name, version.version), &version.sealed) {
                Ok(value) => {
                    outcomes.push((name.as_str(), "ok"));
                    values.push((name.clone(), value));
                }
                Err(e) => {
                    let code = match e {
                        SecretError::OtherMaster { .. } => "other_master_key",
                        SecretError::Corrupt => "corrupt",
                    };
                    outcomes.push((name.as_str(), code));
                    error.get_or_insert_with(|| format!("secret {name}: {e}"));
                }
            }
        }
        self.audit(tenant, recipient, now, outcomes.into_iter())
            .await?;
        if let Some(error) = error {
            return Err(error);
        }
        let redactor = Redactor::new(&values)?;
        Ok(Opened { values, redactor })
    }

    async fn audit<'a>(
        &self,
        tenant: &str,
        recipient: &Recipient,
        now: i64,
        outcomes: impl Iterator<Item = (&'a str, &'static str)>,
    ) -> Result<(), String> {
        for (name, outcome) in outcomes {
            let record = AuditRecord {
                time: now,
                tenant: tenant.to_string(),
                actor_kind: recipient.kind.to_string(),
                actor: recipient.id.clone(),
                action: "secret.read".to_string(),
                resource: format!("/api/v1/secrets/{name}"),
                request_id: String::new(),
                source: String::new(),
                outcome: outcome.to_string(),
                rationale: None,
            };
            // No delivery without its record.
            self.db
                .audit_insert(&record)
                .await
                .map_err(|e| format!("the audit record of a secret's delivery failed: {e}"))?;
        }
        Ok(())
    }
}
