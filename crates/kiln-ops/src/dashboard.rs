//! The dashboard: throughput, latency percentiles, failure rates, queue
//! depths and the fleet, read from the rollups the store's triggers keep
//! (`kiln_db::dashboard`), never from a scan of the jobs table.
//!
//! Windows end now and start on a whole minute (`1h`: the current minute
//! and the 59 before it) or a whole hour (`24h`, `7d`: the current hour
//! and the 23 or 167 before it), because the retention pass folds minutes
//! older than an hour into hours. Percentiles come from log-scale
//! histograms (ten buckets per decade): the value given is the middle of
//! the bucket holding the true percentile (nearest rank), within 12.3 % of
//! it or 1 ms, whichever is larger.

use std::collections::BTreeMap;

use kiln_core::Millis;
use kiln_db::dashboard::{
    bucket_range, Counts, Fleet, Rollups, LATENCY_BOUNDS, METRIC_RUN, METRIC_WAIT,
};
use kiln_db::{Db, DbResult};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;

/// At most this many queues are listed, those with the most waiting jobs.
pub const QUEUES_LISTED: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    Hour,
    Day,
    Week,
}

impl Range {
    pub const ALL: [Range; 3] = [Range::Hour, Range::Day, Range::Week];

    pub fn as_str(self) -> &'static str {
        match self {
            Range::Hour => "1h",
            Range::Day => "24h",
            Range::Week => "7d",
        }
    }

    pub fn parse(text: &str) -> Option<Range> {
        Range::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// Width of one point of the series.
    pub fn step_ms(self) -> i64 {
        match self {
            Range::Hour => MINUTE_MS,
            Range::Day | Range::Week => HOUR_MS,
        }
    }

    pub fn points(self) -> i64 {
        match self {
            Range::Hour => 60,
            Range::Day => 24,
            Range::Week => 168,
        }
    }

    /// The first millisecond of the window that ends at `now`.
    pub fn start(self, now: Millis) -> Millis {
        let step = self.step_ms();
        now - now.rem_euclid(step) - (self.points() - 1) * step
    }
}

/// p50, p95 and p99 of one histogram, in ms; `None` without samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub count: i64,
    pub p50: Option<i64>,
    pub p95: Option<i64>,
    pub p99: Option<i64>,
}

/// Ends by kind or by queue over the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Failures {
    pub name: String,
    pub succeeded: i64,
    pub failed: i64,
    pub dead: i64,
    pub cancelled: i64,
    /// (failed + dead) / (succeeded + failed + dead); cancellations are
    /// not failures. `None` when nothing ended.
    pub failure_rate: Option<f64>,
}

/// A queue's waiting jobs now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueNow {
    pub tenant: String,
    pub queue: String,
    pub queued: i64,
    pub scheduled: i64,
    /// The earliest `run_at` among its waiting jobs.
    pub oldest_run_at: Option<Millis>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub range: Range,
    pub tenant: Option<String>,
    pub from: Millis,
    pub now: Millis,
    pub step_ms: i64,
    /// One point per step, oldest first, from `from`.
    pub series: Vec<Counts>,
    pub totals: Counts,
    /// `queued`, `scheduled`, `running`: now; the final states: ended in
    /// the window.
    pub by_status: BTreeMap<String, i64>,
    pub wait: Percentiles,
    pub run: Percentiles,
    pub by_kind: Vec<Failures>,
    pub by_queue: Vec<Failures>,
    pub queues: Vec<QueueNow>,
    pub incidents_open: i64,
    /// Only for the deployment's own view.
    pub fleet: Option<Fleet>,
}

/// What one caller may see.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// One tenant's jobs, or every tenant's.
    pub tenant: Option<&'a str>,
    /// Whether deployment-wide figures (nodes, VMs) are shown.
    pub deployment: bool,
}

pub async fn stats(db: &Db, view: View<'_>, range: Range, now: Millis) -> DbResult<Stats> {
    let from = range.start(now);
    let fleet = async {
        match view.deployment {
            true => db.dashboard_fleet().await.map(Some),
            false => Ok(None),
        }
    };
    let (rollups, fleet) = tokio::try_join!(db.dashboard_rollups(view.tenant, from), fleet)?;
    let mut queues = queues_now(&rollups);
    let oldest = futures::future::try_join_all(
        queues
            .iter()
            .map(|q| db.queue_oldest_waiting(&q.tenant, &q.queue)),
    )
    .await?;
    for (queue, at) in queues.iter_mut().zip(oldest) {
        queue.oldest_run_at = at;
    }
    Ok(assemble(view, range, from, now, rollups, queues, fleet))
}

/// Everything but the reads: pure, so tests feed it rows.
fn assemble(
    view: View<'_>,
    range: Range,
    from: Millis,
    now: Millis,
    rollups: Rollups,
    queues: Vec<QueueNow>,
    fleet: Option<Fleet>,
) -> Stats {
    let step = range.step_ms();
    let points = range.points() as usize;
    let mut series = vec![Counts::default(); points];
    let mut totals = Counts::default();
    for row in &rollups.minutes {
        let index = ((row.minute - from).max(0) / step) as usize;
        series[index.min(points - 1)].add(&row.counts);
        totals.add(&row.counts);
    }
    let mut by_status: BTreeMap<String, i64> = ["queued", "scheduled", "running"]
        .into_iter()
        .map(|s| (s.to_string(), 0))
        .collect();
    for (status, n) in &rollups.waiting_by_status {
        *by_status.entry(status.clone()).or_default() += n;
    }
    by_status.insert("running".into(), rollups.running);
    by_status.insert("succeeded".into(), totals.succeeded);
    by_status.insert("failed".into(), totals.failed);
    by_status.insert("dead".into(), totals.dead);
    by_status.insert("cancelled".into(), totals.cancelled);
    let mut by_kind: BTreeMap<String, Counts> = BTreeMap::new();
    let mut by_queue: BTreeMap<String, Counts> = BTreeMap::new();
    for row in &rollups.by_kind_queue {
        by_kind
            .entry(row.kind.clone())
            .or_default()
            .add(&row.counts);
        by_queue
            .entry(row.queue.clone())
            .or_default()
            .add(&row.counts);
    }
    let histogram = |metric: i16| {
        let mut counts = vec![0_i64; LATENCY_BOUNDS.len() + 1];
        for row in rollups.latency.iter().filter(|r| r.metric == metric) {
            if let Some(slot) = counts.get_mut(row.bucket.max(0) as usize) {
                *slot += row.n;
            }
        }
        percentiles(&counts)
    };
    Stats {
        range,
        tenant: view.tenant.map(str::to_string),
        from,
        now,
        step_ms: step,
        series,
        totals,
        by_status,
        wait: histogram(METRIC_WAIT),
        run: histogram(METRIC_RUN),
        by_kind: failures(by_kind),
        by_queue: failures(by_queue),
        queues,
        incidents_open: rollups.incidents_open,
        fleet,
    }
}

fn failures(by: BTreeMap<String, Counts>) -> Vec<Failures> {
    by.into_iter()
        .filter(|(_, c)| c.succeeded + c.failed + c.dead + c.cancelled > 0)
        .map(|(name, c)| {
            let ended = c.succeeded + c.failed + c.dead;
            Failures {
                name,
                succeeded: c.succeeded,
                failed: c.failed,
                dead: c.dead,
                cancelled: c.cancelled,
                failure_rate: (ended > 0).then(|| (c.failed + c.dead) as f64 / ended as f64),
            }
        })
        .collect()
}

/// The queues with the most waiting jobs, most first.
fn queues_now(rollups: &Rollups) -> Vec<QueueNow> {
    let mut queues: BTreeMap<(String, String), QueueNow> = BTreeMap::new();
    for row in &rollups.waiting {
        let queue = queues
            .entry((row.tenant.clone(), row.queue.clone()))
            .or_insert_with(|| QueueNow {
                tenant: row.tenant.clone(),
                queue: row.queue.clone(),
                queued: 0,
                scheduled: 0,
                oldest_run_at: None,
            });
        match row.status.as_str() {
            "queued" => queue.queued += row.n,
            _ => queue.scheduled += row.n,
        }
    }
    let mut queues: Vec<QueueNow> = queues.into_values().collect();
    queues.sort_by_key(|q| std::cmp::Reverse(q.queued + q.scheduled));
    queues.truncate(QUEUES_LISTED);
    queues
}

/// Nearest-rank percentiles of a histogram (counts per bucket).
pub fn percentiles(counts: &[i64]) -> Percentiles {
    let count: i64 = counts.iter().sum();
    let at = |p: f64| {
        if count <= 0 {
            return None;
        }
        let rank = ((p * count as f64).ceil() as i64).clamp(1, count);
        let mut seen = 0;
        counts.iter().enumerate().find_map(|(bucket, n)| {
            seen += n;
            (seen >= rank).then(|| bucket_value(bucket))
        })
    };
    Percentiles {
        count,
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
    }
}

/// The value a bucket stands for: the geometric middle of the whole
/// milliseconds it holds; 0 below 1 ms; the lower bound of the last.
pub fn bucket_value(bucket: usize) -> i64 {
    match bucket_range(bucket) {
        (_, _) if bucket == 0 => 0,
        (lo, Some(hi)) => ((lo as f64) * ((hi - 1) as f64)).sqrt().round() as i64,
        (lo, None) => lo,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_db::dashboard::latency_bucket;

    #[test]
    fn windows_start_on_whole_steps() {
        let now = 1_700_000_123_456;
        for (range, step, points) in [
            (Range::Hour, MINUTE_MS, 60),
            (Range::Day, HOUR_MS, 24),
            (Range::Week, HOUR_MS, 168),
        ] {
            let from = range.start(now);
            assert_eq!(from % step, 0, "{range:?}");
            assert!(from + (points - 1) * step <= now && now < from + points * step);
            assert_eq!(Range::parse(range.as_str()), Some(range));
        }
        for bad in ["", "1H", "30d", "1h "] {
            assert_eq!(Range::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_bucket_stands_for_a_value_inside_it() {
        for bucket in 0..=LATENCY_BOUNDS.len() {
            assert_eq!(
                latency_bucket(bucket_value(bucket)),
                bucket,
                "bucket {bucket}"
            );
        }
        // The bound stated in the module's documentation.
        for ms in 1..2_000_000_i64 {
            let got = bucket_value(latency_bucket(ms));
            let off = (got - ms).abs();
            assert!(
                off <= 1 || off as f64 <= 0.123 * ms as f64,
                "{ms} ms read as {got}"
            );
        }
    }

    fn check(samples: &[i64], expect: (Option<i64>, Option<i64>, Option<i64>)) {
        let mut counts = vec![0; LATENCY_BOUNDS.len() + 1];
        for s in samples {
            counts[latency_bucket(*s)] += 1;
        }
        let p = percentiles(&counts);
        assert_eq!(p.count, samples.len() as i64);
        assert_eq!((p.p50, p.p95, p.p99), expect, "{samples:?}");
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        check(&[], (None, None, None));
        check(&[0], (Some(0), Some(0), Some(0)));
        check(&[5], (Some(5), Some(5), Some(5)));
        check(&[1, 1, 1, 1000], (Some(1), Some(1122), Some(1122)));
        let hundred: Vec<i64> = (1..=100).collect();
        // Ranks 50, 95, 99: 50 is in [50, 63), 95 and 99 in [79, 100).
        check(&hundred, (Some(56), Some(88), Some(88)));
        check(
            &[20_000_000],
            (Some(15_848_932), Some(15_848_932), Some(15_848_932)),
        );
    }
}
