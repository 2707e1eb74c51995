//! Retention: finished jobs are kept for a while, so their results can be
//! read, then deleted in batches; so are workers that died without a
//! graceful stop. `kiln gc` runs one pass, and [`gc_loop`] runs them in the
//! background.

use std::time::Duration;

use kiln_db::{Db, DbResult};
use tokio_util::sync::CancellationToken;

use crate::now_millis;

#[derive(Clone, Debug)]
pub struct Retention {
    /// How long a finished job (succeeded, failed, cancelled or dead) is
    /// kept after it finished.
    pub finished_jobs: Duration,
    /// How long a worker that stopped heartbeating stays listed.
    pub silent_workers: Duration,
    /// How long an event stays in the log (and a stream can resume from it).
    pub events: Duration,
    /// How long a chunk of live logs is kept (`--log-retention-hours`).
    pub logs: Duration,
    /// Where log segments past the database's share live, deleted with
    /// their rows.
    pub log_blobs: Option<kiln_blob::BlobStore>,
    /// How long the dashboard's rollups are kept: past the longest range
    /// (7 days) with a margin.
    pub rollups: Duration,
    /// Most rows one delete statement removes; a pass loops until done.
    pub batch: i64,
    /// How often the background task runs a pass.
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            finished_jobs: Duration::from_secs(7 * 24 * 3600),
            silent_workers: Duration::from_secs(24 * 3600),
            events: Duration::from_secs(7 * 24 * 3600),
            logs: Duration::from_secs(3 * 24 * 3600),
            log_blobs: None,
            rollups: Duration::from_secs(8 * 24 * 3600),
            batch: 1_000,
            every: Duration::from_secs(60),
        }
    }
}

/// What one pass removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub jobs: u64,
    pub workers: u64,
    pub events: u64,
    /// VM executions (their history), kept as long as finished jobs.
    pub executions: u64,
    /// Chunks of live logs.
    pub log_chunks: u64,
    /// Hours of dashboard rollups folded from minutes into one row each.
    pub rollup_hours_folded: u64,
    /// Dashboard rollup rows past their retention.
    pub rollups: u64,
    /// Delete statements run: one more than the full batches.
    pub batches: u64,
}

/// Rollups stay per minute for the current hour and the one before it
/// (the 1-hour view); older ones are folded into hours.
pub const ROLLUP_MINUTES_KEPT: Duration = Duration::from_secs(3600);

fn before(now: kiln_core::Millis, keep: Duration) -> kiln_core::Millis {
    now.saturating_sub(keep.as_millis().min(i64::MAX as u128) as i64)
}

/// One pass at time `now`: deletes, batch by batch, every job that finished
/// longer than `retention.finished_jobs` ago, events past theirs, VM
/// executions that started before the jobs' cutoff, chunks of live logs
/// past theirs (with their blob segments), folds the dashboard's minute
/// rollups older than [`ROLLUP_MINUTES_KEPT`] into hours and deletes
/// rollups past theirs, then silent workers. `stop`
/// ends the pass between batches.
pub async fn collect_garbage(
    db: &Db,
    retention: &Retention,
    now: kiln_core::Millis,
    stop: &CancellationToken,
) -> DbResult<Collected> {
    let mut collected = Collected::default();
    let cutoff = before(now, retention.finished_jobs);
    let batch = retention.batch.max(1);
    while !stop.is_cancelled() {
        let n = db.job_delete_finished(cutoff, batch).await?;
        collected.jobs += n;
        collected.batches += 1;
        if (n as i64) < batch {
            break;
        }
        // Give the queue's own statements room between batches.
        tokio::task::yield_now().await;
    }
    let cutoff = before(now, retention.events);
    while !stop.is_cancelled() {
        let n = db.event_delete_before(cutoff, batch).await?;
        collected.events += n;
        if (n as i64) < batch {
            break;
        }
        tokio::task::yield_now().await;
    }
    let cutoff = before(now, retention.finished_jobs);
    while !stop.is_cancelled() {
        let n = db.execution_delete_before(cutoff, batch).await?;
        collected.executions += n;
        if (n as i64) < batch {
            break;
        }
        tokio::task::yield_now().await;
    }
    let cutoff = before(now, retention.logs);
    while !stop.is_cancelled() {
        let (n, segments) = db.log_delete_before(cutoff, batch).await?;
        collected.log_chunks += n;
        if let Some(blobs) = &retention.log_blobs {
            kiln_logs::delete_segments(blobs, &segments).await;
        }
        if (n as i64) < batch {
            break;
        }
        tokio::task::yield_now().await;
    }
    // Minutes older than the previous hour become hours: the 24-hour and
    // 7-day views read a row per hour.
    let fold_before = now.saturating_sub(ROLLUP_MINUTES_KEPT.as_millis() as i64);
    while !stop.is_cancelled() {
        if db.rollup_fold_hour(fold_before).await?.is_none() {
            break;
        }
        collected.rollup_hours_folded += 1;
        tokio::task::yield_now().await;
    }
    let cutoff = before(now, retention.rollups);
    while !stop.is_cancelled() {
        let n = db.rollup_delete_before(cutoff, batch).await?;
        collected.rollups += n;
        if (n as i64) < batch {
            break;
        }
        tokio::task::yield_now().await;
    }
    collected.workers = db
        .worker_delete_stale(before(now, retention.silent_workers))
        .await?;
    Ok(collected)
}

/// Runs [`collect_garbage`] every `retention.every` until `stop` fires.
pub async fn gc_loop(db: Db, retention: Retention, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(retention.every.max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        match collect_garbage(&db, &retention, now_millis(), &stop).await {
            Ok(Collected {
                jobs: 0,
                workers: 0,
                events: 0,
                executions: 0,
                log_chunks: 0,
                rollups: 0,
                ..
            }) => {}
            Ok(collected) => tracing::info!(
                jobs = collected.jobs,
                workers = collected.workers,
                events = collected.events,
                executions = collected.executions,
                log_chunks = collected.log_chunks,
                "deleted finished jobs, silent workers, events, VM executions and logs past retention"
            ),
            Err(error) => tracing::warn!(%error, "retention pass failed"),
        }
    }
}
