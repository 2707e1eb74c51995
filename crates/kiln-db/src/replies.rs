//! Reply addresses of broker submissions (migration 0008): a row per job
//! whose result must be published when the job ends. The publisher takes
//! rows whose job has ended and deletes each only after the broker confirmed
//! its message, so a crash in between publishes again (at least once).

use kiln_core::Millis;

use crate::{Db, DbResult};

/// Where one job's result goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerReply {
    pub job_id: i64,
    pub tenant: String,
    pub reply_to: String,
    pub correlation_id: Option<String>,
}

#[derive(sqlx::FromRow)]
struct ReplyRow {
    job_id: i64,
    tenant: String,
    reply_to: String,
    correlation_id: Option<String>,
}

impl From<ReplyRow> for BrokerReply {
    fn from(r: ReplyRow) -> BrokerReply {
        BrokerReply {
            job_id: r.job_id,
            tenant: r.tenant,
            reply_to: r.reply_to,
            correlation_id: r.correlation_id,
        }
    }
}

// A job gone (deleted by retention) counts as ended: the publisher drops
// its row instead of keeping it forever (SQLite does not cascade). The outer
// lease test is checked again on the row PostgreSQL updates, so of two
// claimers racing for a row one gets it.
const CLAIM: &str = "UPDATE broker_replies SET lease_until = $3 WHERE job_id IN ( \
     SELECT r.job_id FROM broker_replies r LEFT JOIN jobs j ON j.id = r.job_id \
     WHERE r.broker = $1 AND (r.lease_until IS NULL OR r.lease_until < $2) \
       AND (j.id IS NULL OR j.status IN ('succeeded','failed','dead','cancelled')) \
     ORDER BY r.job_id LIMIT $4) \
     AND (lease_until IS NULL OR lease_until < $2) \
     RETURNING job_id, tenant, reply_to, correlation_id";

impl Db {
    /// Remembers where `job_id`'s result goes; a second call for the same job
    /// (a redelivered message) keeps the first address.
    pub async fn broker_reply_put(
        &self,
        broker: &str,
        reply: &BrokerReply,
        now: Millis,
    ) -> DbResult<()> {
        let sql = "INSERT INTO broker_replies (job_id, tenant, broker, reply_to, correlation_id, created_at) \
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job_id) DO NOTHING";
        crate::with_pool!(self, write, |pool| {
            sqlx::query(sql)
                .bind(reply.job_id)
                .bind(&reply.tenant)
                .bind(broker)
                .bind(&reply.reply_to)
                .bind(&reply.correlation_id)
                .bind(now)
                .execute(pool)
                .await
                .map(drop)?
        });
        Ok(())
    }

    /// Claims up to `limit` replies whose job has ended (or no longer
    /// exists) for `lease_ms`; a claim not marked done by then is taken again.
    pub async fn broker_replies_claim(
        &self,
        broker: &str,
        now: Millis,
        lease_ms: i64,
        limit: i64,
    ) -> DbResult<Vec<BrokerReply>> {
        let rows = crate::with_pool!(self, write, |pool| {
            sqlx::query_as::<_, ReplyRow>(CLAIM)
                .bind(broker)
                .bind(now)
                .bind(now.saturating_add(lease_ms))
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(BrokerReply::from).collect())
    }

    pub async fn broker_reply_done(&self, job_id: i64) -> DbResult<()> {
        let sql = "DELETE FROM broker_replies WHERE job_id = $1";
        crate::with_pool!(self, write, |pool| {
            sqlx::query(sql)
                .bind(job_id)
                .execute(pool)
                .await
                .map(drop)?
        });
        Ok(())
    }
}
