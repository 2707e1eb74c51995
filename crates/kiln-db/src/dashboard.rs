//! The dashboard's rollups (migration 0014): per-minute counts and latency
//! histograms, and the jobs waiting per queue, kept by triggers on `jobs`
//! in the transaction of every change; read here without touching `jobs`
//! beyond a few index probes per queue. The retention pass folds old
//! minutes into hours and deletes rows past the retention.

use kiln_core::Millis;

use crate::{Db, DbResult};

/// Lower bounds (ms) of latency buckets 1..=70; bucket 0 is below 1 ms.
/// The same list is in both migrations (PostgreSQL's `width_bucket`
/// array, SQLite's `latency_buckets` table).
pub const LATENCY_BOUNDS: [i64; 70] = [
    1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100, 126, 158, 200, 251, 316, 398,
    501, 631, 794, 1000, 1259, 1585, 1995, 2512, 3162, 3981, 5012, 6310, 7943, 10000, 12589, 15849,
    19953, 25119, 31623, 39811, 50119, 63096, 79433, 100000, 125893, 158489, 199526, 251189,
    316228, 398107, 501187, 630957, 794328, 1000000, 1258925, 1584893, 1995262, 2511886, 3162278,
    3981072, 5011872, 6309573, 7943282, 10000000, 12589254, 15848932,
];

/// Enqueue→start: from when a job was due to its first start.
pub const METRIC_WAIT: i16 = 0;
/// Run time of the attempt that ended a job.
pub const METRIC_RUN: i16 = 1;

const HOUR_MS: i64 = 3_600_000;

/// How many jobs changed state in some span, by what they did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Counts {
    pub enqueued: i64,
    pub started: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub dead: i64,
    pub cancelled: i64,
    /// Went back to waiting: a retry, a lost lease, a release.
    pub retried: i64,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.enqueued += other.enqueued;
        self.started += other.started;
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        self.dead += other.dead;
        self.cancelled += other.cancelled;
        self.retried += other.retried;
    }
}

/// One minute's counts (an hour's, once folded: `minute` is its start).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct MinuteCounts {
    pub minute: Millis,
    #[sqlx(flatten)]
    pub counts: Counts,
}

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct KindQueueCounts {
    pub kind: String,
    pub queue: String,
    #[sqlx(flatten)]
    pub counts: Counts,
}

/// How many durations of `metric` fell in `bucket`.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct LatencyCount {
    pub metric: i16,
    pub bucket: i16,
    pub n: i64,
}

/// Jobs waiting now in one tenant's queue.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Waiting {
    pub tenant: String,
    pub queue: String,
    pub status: String,
    pub n: i64,
}

/// Every figure the rollups hold for one tenant (or all) since a time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rollups {
    /// Oldest first.
    pub minutes: Vec<MinuteCounts>,
    pub by_kind_queue: Vec<KindQueueCounts>,
    pub latency: Vec<LatencyCount>,
    /// Waiting jobs by status, summed over every queue.
    pub waiting_by_status: Vec<(String, i64)>,
    /// The queues with the most waiting jobs, at most [`QUEUES_MAX`] rows
    /// of (tenant, queue, status).
    pub waiting: Vec<Waiting>,
    pub running: i64,
    pub incidents_open: i64,
}

/// Most (tenant, queue, status) rows of waiting jobs one read returns.
pub const QUEUES_MAX: i64 = 100;

/// The deployment's own figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fleet {
    pub nodes_online: i64,
    pub vms_live: i64,
}

const COUNT_SUMS: &str = "CAST(SUM(enqueued) AS BIGINT) AS enqueued, \
     CAST(SUM(started) AS BIGINT) AS started, CAST(SUM(succeeded) AS BIGINT) AS succeeded, \
     CAST(SUM(failed) AS BIGINT) AS failed, CAST(SUM(dead) AS BIGINT) AS dead, \
     CAST(SUM(cancelled) AS BIGINT) AS cancelled, CAST(SUM(retried) AS BIGINT) AS retried";

/// `$1` is the start; `$2` the tenant when there is one.
fn since_filter(tenant: Option<&str>) -> &'static str {
    if tenant.is_some() {
        "tenant = $2 AND minute >= $1"
    } else {
        "minute >= $1"
    }
}

fn tenant_filter(tenant: Option<&str>) -> &'static str {
    if tenant.is_some() {
        "tenant = $1"
    } else {
        "TRUE"
    }
}

/// Bounds of one hour's rows that still need folding: its minutes other
/// than the first, and every shard but 0.
const UNFOLDED: &str = "minute >= $1 AND minute < $1 + 3600000 AND (minute <> $1 OR shard <> 0)";

impl Db {
    /// The rollups of `tenant` (every tenant when `None`) from `since` on.
    pub async fn dashboard_rollups(
        &self,
        tenant: Option<&str>,
        since: Millis,
    ) -> DbResult<Rollups> {
        if tenant.is_some_and(|t| t.contains('\0')) {
            return Ok(Rollups::default());
        }
        let since_where = since_filter(tenant);
        let tenant_where = tenant_filter(tenant);
        let minutes_sql = format!(
            "SELECT minute, {COUNT_SUMS} FROM job_rollups WHERE {since_where} \
             GROUP BY minute ORDER BY minute"
        );
        let kinds_sql = format!(
            "SELECT kind, queue, {COUNT_SUMS} FROM job_rollups WHERE {since_where} \
             GROUP BY kind, queue ORDER BY kind, queue"
        );
        let latency_sql = format!(
            "SELECT metric, bucket, CAST(SUM(n) AS BIGINT) AS n FROM job_latency \
             WHERE {since_where} GROUP BY metric, bucket ORDER BY metric, bucket"
        );
        let by_status_sql = format!(
            "SELECT status, CAST(SUM(n) AS BIGINT) FROM queue_waiting WHERE {tenant_where} \
             GROUP BY status HAVING SUM(n) <> 0 ORDER BY status"
        );
        let waiting_sql = format!(
            "SELECT tenant, queue, status, CAST(SUM(n) AS BIGINT) AS n FROM queue_waiting \
             WHERE {tenant_where} GROUP BY tenant, queue, status HAVING SUM(n) <> 0 \
             ORDER BY SUM(n) DESC, tenant, queue, status LIMIT {QUEUES_MAX}"
        );
        let running_sql = format!(
            "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM tenant_running WHERE {tenant_where}"
        );
        let incidents_sql =
            format!("SELECT COUNT(*) FROM incidents WHERE {tenant_where} AND status <> 'resolved'");
        macro_rules! with_tenant {
            ($query:expr, since) => {
                match tenant {
                    Some(t) => $query.bind(since).bind(t),
                    None => $query.bind(since),
                }
            };
            ($query:expr) => {
                match tenant {
                    Some(t) => $query.bind(t),
                    None => $query,
                }
            };
        }
        // The reads go out at once, each on a connection of its own.
        crate::with_pool!(self, read, |pool| {
            let (
                minutes,
                by_kind_queue,
                latency,
                waiting_by_status,
                waiting,
                running,
                incidents_open,
            ) = tokio::try_join!(
                with_tenant!(sqlx::query_as::<_, MinuteCounts>(&minutes_sql), since)
                    .fetch_all(pool),
                with_tenant!(sqlx::query_as::<_, KindQueueCounts>(&kinds_sql), since)
                    .fetch_all(pool),
                with_tenant!(sqlx::query_as::<_, LatencyCount>(&latency_sql), since)
                    .fetch_all(pool),
                with_tenant!(sqlx::query_as::<_, (String, i64)>(&by_status_sql)).fetch_all(pool),
                with_tenant!(sqlx::query_as::<_, Waiting>(&waiting_sql)).fetch_all(pool),
                with_tenant!(sqlx::query_scalar::<_, i64>(&running_sql)).fetch_one(pool),
                with_tenant!(sqlx::query_scalar::<_, i64>(&incidents_sql)).fetch_one(pool),
            )?;
            Ok(Rollups {
                minutes,
                by_kind_queue,
                latency,
                waiting_by_status,
                waiting,
                running,
                incidents_open,
            })
        })
    }

    /// The earliest `run_at` among a tenant queue's waiting jobs: one probe
    /// of the `jobs_queue` index per priority, never a count.
    pub async fn queue_oldest_waiting(
        &self,
        tenant: &str,
        queue: &str,
    ) -> DbResult<Option<Millis>> {
        let arm = |p: i16| {
            format!(
                "SELECT (SELECT run_at FROM jobs WHERE tenant = $1 AND queue = $2 AND priority = {p} \
                 AND status IN ('queued','scheduled','running') AND status IN ('queued','scheduled') \
                 ORDER BY run_at LIMIT 1) AS run_at"
            )
        };
        let sql = format!(
            "SELECT MIN(run_at) FROM ({} UNION ALL {} UNION ALL {} UNION ALL {}) AS oldest",
            arm(0),
            arm(1),
            arm(2),
            arm(3)
        );
        crate::with_pool!(self, read, |pool| {
            Ok(sqlx::query_scalar(&sql)
                .bind(tenant)
                .bind(queue)
                .fetch_one(pool)
                .await?)
        })
    }

    /// Nodes online and the VMs live on nodes not lost.
    pub async fn dashboard_fleet(&self) -> DbResult<Fleet> {
        let sql = "SELECT CAST(COALESCE(SUM(CASE WHEN status = 'online' THEN 1 ELSE 0 END), 0) AS BIGINT), \
                   CAST(COALESCE(SUM(CASE WHEN status <> 'lost' THEN vms_live ELSE 0 END), 0) AS BIGINT) \
                   FROM nodes";
        let (nodes_online, vms_live): (i64, i64) = crate::with_pool!(self, read, |pool| {
            sqlx::query_as(sql).fetch_one(pool).await?
        });
        Ok(Fleet {
            nodes_online,
            vms_live,
        })
    }

    /// Folds the rollups of one hour before `before` (an hour's start) that
    /// still has minute rows or shards: they become one row per tenant, kind
    /// and queue (and metric and bucket) at the hour's start, shard 0.
    /// Returns the hour folded, `None` when nothing is left to fold; callers
    /// loop. Rows a trigger writes meanwhile are folded by a later call.
    pub async fn rollup_fold_hour(&self, before: Millis) -> DbResult<Option<Millis>> {
        let before = before - before.rem_euclid(HOUR_MS);
        let find = "SELECT MIN(minute) FROM job_rollups WHERE minute < $1 \
                    AND (shard <> 0 OR minute % 3600000 <> 0)";
        let find_latency = "SELECT MIN(minute) FROM job_latency WHERE minute < $1 \
                    AND (shard <> 0 OR minute % 3600000 <> 0)";
        let hour = crate::with_pool!(self, read, |pool| {
            let a: Option<i64> = sqlx::query_scalar(find)
                .bind(before)
                .fetch_one(pool)
                .await?;
            let b: Option<i64> = sqlx::query_scalar(find_latency)
                .bind(before)
                .fetch_one(pool)
                .await?;
            a.into_iter().chain(b).min()
        });
        let Some(minute) = hour else {
            return Ok(None);
        };
        let hour = minute - minute.rem_euclid(HOUR_MS);
        match self {
            Db::Postgres(s) => {
                // The delete and the insert are one statement: a row a
                // trigger updates meanwhile is deleted with its new counts.
                let mut tx = s.pool.begin().await?;
                sqlx::query(&format!(
                    "WITH gone AS (DELETE FROM job_rollups WHERE {UNFOLDED} \
                       RETURNING tenant, kind, queue, enqueued, started, succeeded, failed, dead, \
                       cancelled, retried) \
                     INSERT INTO job_rollups AS r (tenant, minute, kind, queue, shard, enqueued, \
                       started, succeeded, failed, dead, cancelled, retried) \
                     SELECT tenant, $1, kind, queue, 0, {COUNT_SUMS} FROM gone \
                     GROUP BY tenant, kind, queue ORDER BY tenant, kind, queue \
                     ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET \
                       enqueued = r.enqueued + excluded.enqueued, started = r.started + excluded.started, \
                       succeeded = r.succeeded + excluded.succeeded, failed = r.failed + excluded.failed, \
                       dead = r.dead + excluded.dead, cancelled = r.cancelled + excluded.cancelled, \
                       retried = r.retried + excluded.retried"
                ))
                .bind(hour)
                .execute(&mut *tx)
                .await?;
                sqlx::query(&format!(
                    "WITH gone AS (DELETE FROM job_latency WHERE {UNFOLDED} \
                       RETURNING tenant, metric, bucket, n) \
                     INSERT INTO job_latency AS l (tenant, minute, metric, bucket, shard, n) \
                     SELECT tenant, $1, metric, bucket, 0, CAST(SUM(n) AS BIGINT) FROM gone \
                     GROUP BY tenant, metric, bucket ORDER BY tenant, metric, bucket \
                     ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = l.n + excluded.n"
                ))
                .bind(hour)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
            Db::Sqlite(s) => {
                // One writer: nothing changes between the two statements.
                let mut tx = s.write.begin().await?;
                sqlx::query(&format!(
                    "INSERT INTO job_rollups (tenant, minute, kind, queue, shard, enqueued, \
                       started, succeeded, failed, dead, cancelled, retried) \
                     SELECT tenant, ?1, kind, queue, 0, {COUNT_SUMS} FROM job_rollups \
                     WHERE {} GROUP BY tenant, kind, queue \
                     ON CONFLICT (tenant, minute, kind, queue, shard) DO UPDATE SET \
                       enqueued = enqueued + excluded.enqueued, started = started + excluded.started, \
                       succeeded = succeeded + excluded.succeeded, failed = failed + excluded.failed, \
                       dead = dead + excluded.dead, cancelled = cancelled + excluded.cancelled, \
                       retried = retried + excluded.retried",
                    UNFOLDED.replace('$', "?")
                ))
                .bind(hour)
                .execute(&mut *tx)
                .await?;
                sqlx::query(&format!(
                    "DELETE FROM job_rollups WHERE {}",
                    UNFOLDED.replace('$', "?")
                ))
                .bind(hour)
                .execute(&mut *tx)
                .await?;
                sqlx::query(&format!(
                    "INSERT INTO job_latency (tenant, minute, metric, bucket, shard, n) \
                     SELECT tenant, ?1, metric, bucket, 0, SUM(n) FROM job_latency \
                     WHERE {} GROUP BY tenant, metric, bucket \
                     ON CONFLICT (tenant, minute, metric, bucket, shard) DO UPDATE SET n = n + excluded.n",
                    UNFOLDED.replace('$', "?")
                ))
                .bind(hour)
                .execute(&mut *tx)
                .await?;
                sqlx::query(&format!(
                    "DELETE FROM job_latency WHERE {}",
                    UNFOLDED.replace('$', "?")
                ))
                .bind(hour)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
        }
        Ok(Some(hour))
    }

    /// Retention: deletes up to `batch` rollup rows (of each table) older
    /// than `before`; returns how many went.
    pub async fn rollup_delete_before(&self, before: Millis, batch: i64) -> DbResult<u64> {
        if batch <= 0 {
            return Ok(0);
        }
        let rollups = "DELETE FROM job_rollups WHERE (tenant, minute, kind, queue, shard) IN ( \
                       SELECT tenant, minute, kind, queue, shard FROM job_rollups WHERE minute < $1 \
                       ORDER BY minute LIMIT $2)";
        let latency = "DELETE FROM job_latency WHERE (tenant, minute, metric, bucket, shard) IN ( \
                       SELECT tenant, minute, metric, bucket, shard FROM job_latency WHERE minute < $1 \
                       ORDER BY minute LIMIT $2)";
        crate::with_pool!(self, write, |pool| {
            let mut n = 0;
            for sql in [rollups, latency] {
                n += sqlx::query(sql)
                    .bind(before)
                    .bind(batch)
                    .execute(pool)
                    .await?
                    .rows_affected();
            }
            Ok(n)
        })
    }

    /// For benchmarks, after writing or folding many rows at once: what
    /// autovacuum (PostgreSQL) and a routine `ANALYZE` would have done by
    /// the time anyone reads them.
    pub async fn bench_settle(&self) -> DbResult<()> {
        let sql = match self {
            Db::Sqlite(_) => "ANALYZE",
            Db::Postgres(_) => {
                "VACUUM ANALYZE jobs, job_rollups, job_latency, queue_waiting, runs, run_steps, \
                 run_instances, flow_outbox, events"
            }
        };
        crate::with_pool!(self, write, |pool| {
            sqlx::raw_sql(sql).execute(pool).await?;
        });
        Ok(())
    }

    /// For benchmarks: `count` jobs of `tenant` that were enqueued, ran and
    /// finished through the triggers (kinds and queues, outcomes, waits and
    /// run times spread by id), created evenly between `from` and `to`.
    /// Returns how many were written.
    pub async fn bench_fill_finished(
        &self,
        tenant: &str,
        count: i64,
        from: Millis,
        to: Millis,
    ) -> DbResult<u64> {
        let job = kiln_core::NewJob::new(tenant, "noop", serde_json::json!({}));
        let encoded = crate::rows::EncodedJob::new(&job, from);
        let span = (to - from).max(1);
        let chunk = 20_000_i64;
        let insert = "WITH RECURSIVE s(i) AS (SELECT $2 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < $3) \
             INSERT INTO jobs (tenant, kind, queue, priority, status, spec, labels, max_attempts, \
               timeout_ms, backoff, permanent_exit_codes, run_at, created_at) \
             SELECT $1, CASE i % 4 WHEN 0 THEN 'noop' WHEN 1 THEN 'wasm' WHEN 2 THEN 'vm' ELSE 'vm:execute' END, \
               CASE i % 3 WHEN 0 THEN 'default' WHEN 1 THEN 'batch' ELSE 'interactive' END, 2, 'queued', \
               $4, '{}', 3, 60000, $5, '[]', $6 + i * $7 / $8, $6 + i * $7 / $8 FROM s";
        let start = "UPDATE jobs SET status = 'running', attempt = 1, worker_id = 'bench', \
             started_at = created_at + (id * 7919) % 400, lease_expires_at = created_at + 60000 \
             WHERE tenant = $1 AND id > $2 AND status = 'queued'";
        let end = "UPDATE jobs SET status = CASE WHEN id % 50 = 0 THEN 'failed' \
               WHEN id % 97 = 0 THEN 'dead' WHEN id % 101 = 0 THEN 'cancelled' ELSE 'succeeded' END, \
             finished_at = started_at + (id * 104729) % 30000, lease_expires_at = NULL \
             WHERE tenant = $1 AND id > $2 AND status = 'running'";
        let mut written = 0;
        let mut offset = 0;
        while offset < count {
            let end_at = (offset + chunk).min(count);
            crate::with_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                let last: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM jobs")
                    .fetch_one(&mut *tx)
                    .await?;
                let last = last.unwrap_or(0);
                written += sqlx::query(insert)
                    .bind(tenant)
                    .bind(offset)
                    .bind(end_at)
                    .bind(&encoded.spec)
                    .bind(&encoded.backoff)
                    .bind(from)
                    .bind(span)
                    .bind(count)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                for sql in [start, end] {
                    sqlx::query(sql)
                        .bind(tenant)
                        .bind(last)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                DbResult::Ok(())
            })?;
            offset = end_at;
        }
        Ok(written)
    }
}

/// The bucket a duration (ms) falls in: how many lower bounds it reaches.
pub fn latency_bucket(ms: i64) -> usize {
    LATENCY_BOUNDS.partition_point(|&lo| lo <= ms)
}

/// The durations bucket `b` holds, `[lo, hi)`; `hi` is `None` for the last.
pub fn bucket_range(b: usize) -> (i64, Option<i64>) {
    let lo = if b == 0 {
        i64::MIN
    } else {
        LATENCY_BOUNDS[(b - 1).min(LATENCY_BOUNDS.len() - 1)]
    };
    (lo, LATENCY_BOUNDS.get(b).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_what_they_say() {
        for (ms, bucket) in [
            (-5, 0),
            (0, 0),
            (1, 1),
            (2, 2),
            (7, 6),
            (8, 7),
            (99, 17),
            (100, 18),
            (15_848_931, 69),
            (15_848_932, 70),
            (i64::MAX, 70),
        ] {
            assert_eq!(latency_bucket(ms), bucket, "{ms} ms");
            let (lo, hi) = bucket_range(bucket);
            assert!(
                lo <= ms && hi.is_none_or(|hi| ms < hi),
                "{ms} ms in {lo}..{hi:?}"
            );
        }
        assert!(LATENCY_BOUNDS.windows(2).all(|w| w[0] < w[1]));
    }
}
