//! The loops that move pipelines and schedules: the advancer consumes step
//! ends from the store's outbox as soon as it is woken (a step job ended in
//! this process or, on PostgreSQL, anywhere) and at least every second; the
//! scheduler fires due cron ticks. Any number of processes may run both:
//! the store makes each transition and each tick happen once.

use std::time::Duration;

use kiln_core::JobKinds;
use kiln_db::Db;
use tokio_util::sync::CancellationToken;

use crate::now_millis;

/// How often approvals are checked against their deadline, and the longest
/// an advancer sleeps without a wake-up.
const POLL: Duration = Duration::from_secs(1);

pub async fn advance_loop(db: Db, kinds: JobKinds, stop: CancellationToken) {
    let wake = db.flow_wakeup();
    let mut last_expiry = tokio::time::Instant::now();
    loop {
        // Registered before looking, so a wake-up during the pass is kept.
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let more = match db.flow_advance(&kinds, now_millis()).await {
            Ok(n) => n > 0,
            Err(error) if error.is_unavailable() => {
                tracing::warn!(%error, "advancing pipeline runs: the database is unavailable");
                false
            }
            Err(error) => {
                tracing::error!(%error, "advancing pipeline runs failed");
                false
            }
        };
        if last_expiry.elapsed() >= POLL {
            last_expiry = tokio::time::Instant::now();
            if let Err(error) = db.flow_expire_approvals(&kinds, now_millis()).await {
                tracing::warn!(%error, "expiring approvals failed");
            }
        }
        if more {
            continue;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

pub async fn schedule_loop(db: Db, kinds: JobKinds, stop: CancellationToken) {
    loop {
        if let Err(error) = db.schedule_fire_due(&kinds, now_millis()).await {
            tracing::warn!(%error, "firing schedules failed");
        }
        let now = now_millis();
        let wait = match db.schedule_next_due().await {
            Ok(Some(next)) => (next - now).clamp(10, POLL.as_millis() as i64),
            _ => POLL.as_millis() as i64,
        };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
            _ = stop.cancelled() => return,
        }
    }
}
