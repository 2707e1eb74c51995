//! `kiln bench audit`: what the audit trail costs the queue — no-op jobs
//! submitted over HTTP by concurrent clients and drained by a worker in the
//! same process, with the trail on and off (fresh database each round,
//! rounds alternating) — and `kiln audit verify`'s time over a trail of a
//! million records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use kiln_core::audit::AuditRecord;
use kiln_db::Db;
use kiln_worker::{now_millis, Handlers, NoopHandler};
use serde_json::json;

#[derive(Args)]
pub struct AuditArgs {
    /// postgres://... (fresh schemas are used) or omit for fresh SQLite files.
    #[arg(long, env = "KILN_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Jobs per round.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Rounds with the trail on, and as many with it off, alternating.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Records for the verify timing (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
}

pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let mut on = Vec::new();
    let mut off = Vec::new();
    for round in 0..args.rounds * 2 {
        let audited = round % 2 == 1;
        let db = super::fresh_named(args.database_url.as_deref(), &format!("r{round}")).await?;
        let rate = drain_over_http(&db, audited, args.jobs, args.clients).await?;
        let records = db.audit_count("bench").await?;
        anyhow::ensure!(
            (records > 0) == audited,
            "audit {audited} but {records} records"
        );
        println!(
            "| {} · audit {} · round {} | {:.0} jobs/s submitted over HTTP and drained ({} records) |",
            db.backend(),
            if audited { "on" } else { "off" },
            round / 2 + 1,
            rate,
            records
        );
        if audited { &mut on } else { &mut off }.push(rate);
        db.close().await;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (on, off) = (mean(&on), mean(&off));
    println!(
        "| audit on vs off, mean of {} rounds | {:.0} vs {:.0} jobs/s: {:+.1} % |",
        args.rounds,
        on,
        off,
        (on - off) / off * 100.0
    );
    if args.records > 0 {
        verify_million(args.database_url.as_deref(), args.records).await?;
    }
    Ok(())
}

/// Jobs/s from the first submit to the last job's end.
async fn drain_over_http(
    db: &Db,
    audited: bool,
    jobs: usize,
    clients: usize,
) -> anyhow::Result<f64> {
    let api = super::EmbeddedApi::start(db, audited).await?;
    let (worker_stop, worker) = super::worker(
        db,
        Handlers::new().with("noop", Arc::new(NoopHandler)),
        1_000,
    );
    let started = Instant::now();
    let submitted = api
        .submit(&json!({"kind": "noop", "spec": {}}), jobs, clients)
        .await?;
    super::wait_drained(db, Duration::from_secs(600)).await?;
    let took = started.elapsed();
    worker_stop.cancel();
    let _ = worker.await;
    api.stop().await;
    Ok(submitted as f64 / took.as_secs_f64())
}

/// Writes `records` records over 100 tenants, chains them, and times a
/// full verify.
async fn verify_million(url: Option<&str>, records: usize) -> anyhow::Result<()> {
    let db = super::fresh_named(url, "verify").await?;
    let started = Instant::now();
    let now = now_millis();
    let batch: usize = 5_000;
    let mut written = 0;
    while written < records {
        let n = batch.min(records - written);
        let chunk: Vec<AuditRecord> = (written..written + n)
            .map(|i| AuditRecord {
                time: now + i as i64,
                tenant: format!("t{}", i % 100),
                actor_kind: "key".into(),
                actor: format!("k{}", i % 7),
                action: "POST /api/v1/jobs".into(),
                resource: format!("/api/v1/jobs/{i}"),
                request_id: format!("{i:024x}"),
                source: "127.0.0.1".into(),
                outcome: "201".into(),
                rationale: None,
            })
            .collect();
        db.audit_insert_many(&chunk).await?;
        written += n;
    }
    let filled = started.elapsed();
    let started = Instant::now();
    while db.audit_chain_pass(false).await? > 0 {}
    let chained = started.elapsed();
    let started = Instant::now();
    let report = db.audit_verify(None).await?;
    let verified = started.elapsed();
    anyhow::ensure!(
        report.breaks.is_empty() && report.records == records as u64,
        "verify found {} breaks over {} records",
        report.breaks.len(),
        report.records
    );
    println!(
        "| {} · {} records, 100 tenants | written in {:.1} s · chained in {:.1} s · `kiln audit verify` {:.2} s ({:.0} records/s) |",
        db.backend(),
        records,
        filled.as_secs_f64(),
        chained.as_secs_f64(),
        verified.as_secs_f64(),
        records as f64 / verified.as_secs_f64()
    );
    db.close().await;
    Ok(())
}
