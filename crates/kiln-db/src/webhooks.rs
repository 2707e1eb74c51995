//! Webhook triggers and their delivery log.
//!
//! A trigger belongs to a tenant by name and is found by senders through
//! its public id, random and unique across tenants. A delivery is claimed
//! before anything starts: the row's key (trigger, sender's delivery id) is
//! unique, so the same delivery sent twice, even at once, starts one thing.

use kiln_core::Millis;
use serde_json::Value;

use crate::audit::note::Change;
use crate::{storable, Db, DbError, DbResult};

/// Deliveries older than this leave the log (and stop deduplicating).
pub const DELIVERY_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;
/// Old deliveries removed per claim, so pruning never makes one slow.
const PRUNE_BATCH: i64 = 100;
/// The public id: this prefix and 32 letters and digits.
pub const ID_PREFIX: &str = "wh_";
const ID_RANDOM_LEN: usize = 32;

/// A trigger as stored. `Debug` leaves the secret out.
#[derive(Clone, PartialEq)]
pub struct WebhookRecord {
    pub tenant: String,
    pub name: String,
    pub id: String,
    pub provider: String,
    pub secret: String,
    pub filter: Value,
    pub target: Value,
    pub created_at: Millis,
    pub updated_at: Millis,
}

impl std::fmt::Debug for WebhookRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRecord")
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("filter", &self.filter)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// What a client writes; the store adds the id and the times.
pub struct NewWebhook<'a> {
    pub name: &'a str,
    pub provider: &'a str,
    pub secret: &'a str,
    pub filter: &'a Value,
    pub target: &'a Value,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryRecord {
    pub seq: i64,
    pub delivery: Option<String>,
    pub event: String,
    pub received_at: Millis,
    /// `received` (being handled), `started`, `skipped`, `answered` (a ping
    /// or a verification) or `error`.
    pub outcome: String,
    pub job_id: Option<i64>,
    pub run_id: Option<i64>,
    pub detail: Option<String>,
}

/// The answer to a claim on a delivery.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// New (or a retry of one that failed): handle it and finish row `seq`.
    Fresh(i64),
    /// Already received: what became of it.
    Seen(DeliveryRecord),
}

#[derive(sqlx::FromRow)]
struct WebhookRow {
    tenant: String,
    name: String,
    id: String,
    provider: String,
    secret: String,
    filters: String,
    target: String,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<WebhookRow> for WebhookRecord {
    type Error = DbError;
    fn try_from(r: WebhookRow) -> DbResult<WebhookRecord> {
        let json = |what: &str, text: &str| {
            serde_json::from_str(text).map_err(|e| DbError::Corrupt(format!("webhook {what}: {e}")))
        };
        Ok(WebhookRecord {
            filter: json("filter", &r.filters)?,
            target: json("target", &r.target)?,
            tenant: r.tenant,
            name: r.name,
            id: r.id,
            provider: r.provider,
            secret: r.secret,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    seq: i64,
    delivery: Option<String>,
    event: String,
    received_at: i64,
    outcome: String,
    job_id: Option<i64>,
    run_id: Option<i64>,
    detail: Option<String>,
}

impl From<DeliveryRow> for DeliveryRecord {
    fn from(r: DeliveryRow) -> DeliveryRecord {
        DeliveryRecord {
            seq: r.seq,
            delivery: r.delivery,
            event: r.event,
            received_at: r.received_at,
            outcome: r.outcome,
            job_id: r.job_id,
            run_id: r.run_id,
            detail: r.detail,
        }
    }
}

const WEBHOOK_COLUMNS: &str =
    "tenant, name, id, provider, secret, filters, target, created_at, updated_at";
const DELIVERY_COLUMNS: &str = "seq, delivery, event, received_at, outcome, job_id, run_id, detail";

/// `with_pool!` with the statement's text bound to `$sql`.
macro_rules! on_pool {
    ($db:expr, $mode:ident, $pool:ident, $sql:ident = $text:expr; $body:block) => {
        crate::with_pool!($db, $mode, |$pool| {
            let $sql: String = $text.to_string();
            $body
        })
    };
}

/// A new public id: unguessable, so it names one trigger of one tenant.
fn generate_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    let random: String = (0..ID_RANDOM_LEN)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{ID_PREFIX}{random}")
}

/// Whether `id` has the form of a public id (checked before any query).
pub fn is_webhook_id(id: &str) -> bool {
    id.strip_prefix(ID_PREFIX).is_some_and(|rest| {
        rest.len() == ID_RANDOM_LEN && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// A claim older than this whose handler never finished may be taken again.
const STALE_CLAIM_MS: i64 = 60_000;

impl Db {
    /// Creates or replaces a trigger (checked by the caller). A replaced
    /// trigger keeps its public id and delivery log; the flag says whether
    /// it was created.
    pub async fn webhook_put(
        &self,
        tenant: &str,
        new: &NewWebhook<'_>,
        now: Millis,
    ) -> DbResult<(WebhookRecord, bool)> {
        storable("webhook name", new.name)?;
        storable("webhook secret", new.secret)?;
        let id = generate_id();
        let filter = new.filter.to_string();
        let target = new.target.to_string();
        if kiln_core::names::json_has_nul(new.filter) || kiln_core::names::json_has_nul(new.target)
        {
            return Err(DbError::Invalid("a string holds a NUL character".into()));
        }
        let sql = format!(
            "INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
             ON CONFLICT (tenant, name) DO UPDATE SET provider = excluded.provider, \
             secret = excluded.secret, filters = excluded.filters, target = excluded.target, \
             updated_at = excluded.updated_at RETURNING {WEBHOOK_COLUMNS}"
        );
        let row: WebhookRow = crate::audit::audited_tx!(self, |tx| {
            let row: WebhookRow = sqlx::query_as(&sql)
                .bind(tenant)
                .bind(new.name)
                .bind(&id)
                .bind(new.provider)
                .bind(new.secret)
                .bind(&filter)
                .bind(&target)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
            let change = if row.id == id {
                Change::Created
            } else {
                Change::Changed
            };
            crate::audit::stamp!(&mut *tx, change);
            row
        });
        let record = WebhookRecord::try_from(row)?;
        let created = record.id == id;
        Ok((record, created))
    }

    pub async fn webhook_get(&self, tenant: &str, name: &str) -> DbResult<Option<WebhookRecord>> {
        let row: Option<WebhookRow> = on_pool!(self, read, pool, sql = format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE tenant = $1 AND name = $2"
        ); {
            sqlx::query_as(&sql)
                .bind(tenant)
                .bind(name)
                .fetch_optional(pool)
                .await?
        });
        row.map(WebhookRecord::try_from).transpose()
    }

    /// The trigger a sender's URL names, whoever's it is.
    pub async fn webhook_find(&self, id: &str) -> DbResult<Option<WebhookRecord>> {
        let row: Option<WebhookRow> = on_pool!(self, read, pool, sql = format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1"
        ); {
            sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?
        });
        row.map(WebhookRecord::try_from).transpose()
    }

    pub async fn webhook_list(&self, tenant: &str) -> DbResult<Vec<WebhookRecord>> {
        let rows: Vec<WebhookRow> = on_pool!(self, read, pool, sql = format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE tenant = $1 ORDER BY name"
        ); {
            sqlx::query_as(&sql).bind(tenant).fetch_all(pool).await?
        });
        rows.into_iter().map(WebhookRecord::try_from).collect()
    }

    /// Deletes a trigger and its delivery log; its URL answers 404 after.
    pub async fn webhook_delete(&self, tenant: &str, name: &str) -> DbResult<bool> {
        let sql = "DELETE FROM webhooks WHERE tenant = $1 AND name = $2 RETURNING id";
        let deleted: Option<String> = crate::audit::audited_tx!(self, |tx| {
            let id: Option<String> = sqlx::query_scalar(sql)
                .bind(tenant)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(id) = &id {
                let clear = "DELETE FROM webhook_deliveries WHERE webhook_id = $1";
                sqlx::query(clear).bind(id).execute(&mut *tx).await?;
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            id
        });
        Ok(deleted.is_some())
    }

    /// Claims a delivery before it is handled. Without a delivery id every
    /// delivery is fresh. A delivery that ended in `error` may be claimed
    /// again (the sender's redelivery after a fix), and so may one left
    /// `received` for over a minute (its handler died before it finished;
    /// the job's idempotency key still keeps it from starting twice); any
    /// other is `Seen`.
    pub async fn webhook_delivery_claim(
        &self,
        webhook_id: &str,
        delivery: Option<&str>,
        event: &str,
        now: Millis,
    ) -> DbResult<Claim> {
        storable("delivery id", delivery.unwrap_or_default())?;
        storable("event", event)?;
        self.webhook_delivery_prune(webhook_id, now).await?;
        // A row may be pruned between the statements: try again.
        for _ in 0..3 {
            let fresh: Option<i64> = on_pool!(self, write, pool, sql =
                "INSERT INTO webhook_deliveries (webhook_id, delivery, event, received_at, outcome) \
                 VALUES ($1, $2, $3, $4, 'received') \
                 ON CONFLICT (webhook_id, delivery) DO NOTHING RETURNING seq";
            {
                sqlx::query_scalar(&sql)
                    .bind(webhook_id)
                    .bind(delivery)
                    .bind(event)
                    .bind(now)
                    .fetch_optional(pool)
                    .await?
            });
            if let Some(seq) = fresh {
                return Ok(Claim::Fresh(seq));
            }
            let retried: Option<i64> = on_pool!(self, write, pool, sql =
                "UPDATE webhook_deliveries SET outcome = 'received', event = $3, \
                 received_at = $4, job_id = NULL, run_id = NULL, detail = NULL \
                 WHERE webhook_id = $1 AND delivery = $2 \
                   AND (outcome = 'error' OR (outcome = 'received' AND received_at < $5)) \
                 RETURNING seq";
            {
                sqlx::query_scalar(&sql)
                    .bind(webhook_id)
                    .bind(delivery)
                    .bind(event)
                    .bind(now)
                    .bind(now.saturating_sub(STALE_CLAIM_MS))
                    .fetch_optional(pool)
                    .await?
            });
            if let Some(seq) = retried {
                return Ok(Claim::Fresh(seq));
            }
            let seen: Option<DeliveryRow> = on_pool!(self, write, pool, sql = format!(
                "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries \
                 WHERE webhook_id = $1 AND delivery = $2"
            ); {
                sqlx::query_as(&sql)
                    .bind(webhook_id)
                    .bind(delivery)
                    .fetch_optional(pool)
                    .await?
            });
            if let Some(row) = seen {
                return Ok(Claim::Seen(row.into()));
            }
        }
        Err(DbError::Corrupt(
            "a delivery could be neither inserted nor found".into(),
        ))
    }

    /// Writes what became of a claimed delivery.
    pub async fn webhook_delivery_finish(
        &self,
        seq: i64,
        outcome: &str,
        job_id: Option<i64>,
        run_id: Option<i64>,
        detail: Option<&str>,
    ) -> DbResult<()> {
        let detail = detail.map(|d| kiln_core::names::sanitise_message(d, 1024));
        on_pool!(self, write, pool, sql =
            "UPDATE webhook_deliveries SET outcome = $2, job_id = $3, run_id = $4, detail = $5 \
             WHERE seq = $1";
        {
            sqlx::query(&sql)
                .bind(seq)
                .bind(outcome)
                .bind(job_id)
                .bind(run_id)
                .bind(detail)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// A trigger's most recent deliveries, newest first.
    pub async fn webhook_deliveries(
        &self,
        tenant: &str,
        name: &str,
        limit: i64,
    ) -> DbResult<Vec<DeliveryRecord>> {
        let rows: Vec<DeliveryRow> = on_pool!(self, read, pool, sql = format!(
            "SELECT {} FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
             WHERE w.tenant = $1 AND w.name = $2 ORDER BY d.seq DESC LIMIT $3",
            DELIVERY_COLUMNS
                .split(", ")
                .map(|c| format!("d.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ); {
            sqlx::query_as(&sql)
                .bind(tenant)
                .bind(name)
                .bind(limit.clamp(1, 1000))
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(DeliveryRecord::from).collect())
    }

    async fn webhook_delivery_prune(&self, webhook_id: &str, now: Millis) -> DbResult<()> {
        on_pool!(self, write, pool, sql =
            "DELETE FROM webhook_deliveries WHERE seq IN (SELECT seq FROM webhook_deliveries \
             WHERE webhook_id = $1 AND received_at < $2 ORDER BY seq LIMIT $3)";
        {
            sqlx::query(&sql)
                .bind(webhook_id)
                .bind(now - DELIVERY_RETENTION_MS)
                .bind(PRUNE_BATCH)
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ids_have_one_form() {
        let id = generate_id();
        assert!(is_webhook_id(&id), "{id}");
        assert_ne!(generate_id(), id);
        for bad in [
            "",
            "wh_",
            "wh_short",
            "xx_0123456789abcdef0123456789abcdef",
            "wh_0123456789abcdef0123456789abcde/",
            "wh_0123456789abcdef0123456789abcdef0",
        ] {
            assert!(!is_webhook_id(bad), "{bad}");
        }
    }
}
