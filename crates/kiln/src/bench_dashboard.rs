//! `kiln bench dashboard`: `GET /api/v1/dashboard/stats` over HTTP with a
//! million finished jobs in the database, written through the triggers
//! that keep the rollups (as a week of work would have), spread over the
//! last seven days, and a backlog of waiting jobs; then a retention pass
//! folds old minutes into hours, as the scheduler does every minute, and
//! the tables are vacuumed and analysed, as autovacuum would have by then.

use std::time::Instant;

use clap::Args;
use kiln_blob::BlobStore;
use kiln_core::{NewJob, Scope, Scopes};
use kiln_worker::now_millis;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{ms, percentile};

#[derive(Args)]
pub struct DashboardArgs {
    /// postgres://... (a fresh schema is used) or omit for a fresh SQLite file.
    #[arg(long, env = "KILN_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Finished jobs, 90 % of tenant `bench`, 10 % of another tenant.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: i64,
    /// Jobs left waiting, over three queues of `bench`.
    #[arg(long, default_value_t = 30_000)]
    waiting: usize,
    /// Timed requests per range and key.
    #[arg(long, default_value_t = 200)]
    requests: usize,
}

const WEEK_MS: i64 = 7 * 24 * 3600 * 1000;

pub async fn dashboard(args: DashboardArgs) -> anyhow::Result<()> {
    let (db, other) = super::fresh_db(args.database_url.as_deref()).await?;
    let backend = db.backend();
    let now = now_millis();
    let started = Instant::now();
    let main = args.jobs - args.jobs / 10;
    db.bench_fill_finished("bench", main, now - WEEK_MS, now)
        .await?;
    db.bench_fill_finished("bench-other", args.jobs - main, now - WEEK_MS, now)
        .await?;
    let filled = started.elapsed();
    for (i, chunk) in (0..args.waiting)
        .collect::<Vec<_>>()
        .chunks(1_000)
        .enumerate()
    {
        let batch: Vec<NewJob> = chunk
            .iter()
            .map(|_| {
                let mut job = NewJob::new("bench", "noop", json!({}));
                job.queue = ["default", "batch", "interactive"][i % 3].to_string();
                job
            })
            .collect();
        db.job_insert_many(&batch, now_millis()).await?;
    }
    let stop = CancellationToken::new();
    let folded = Instant::now();
    let gc =
        kiln_worker::collect_garbage(&db, &kiln_worker::Retention::default(), now_millis(), &stop)
            .await?;
    db.bench_settle().await?;
    eprintln!(
        "{} finished jobs written through the triggers in {:.1} s; {} hours of rollups folded in {:.1} s",
        args.jobs,
        filled.as_secs_f64(),
        gc.rollup_hours_folded,
        folded.elapsed().as_secs_f64()
    );
    let counts = db.job_count_by_status(None).await?;
    println!("| kiln {backend}, dashboard | value |\n|---|---|");
    println!(
        "| jobs in the database | {} ({} finished over 7 days, {} waiting) |",
        counts.values().sum::<i64>(),
        args.jobs,
        args.waiting
    );

    let root = std::env::temp_dir().join(format!("{}-dashboard", super::bench_schema()));
    let blobs = BlobStore::local(&root.join("blobs"))?;
    let state = kiln_api::AppState::new(db.clone(), blobs, None);
    let (_, tenant_key) =
        kiln_api::issue_key(&db, "bench", "bench", Scopes(vec![Scope::Read])).await?;
    let (_, system_key) =
        kiln_api::issue_key(&db, "default", "bench", Scopes(vec![Scope::System])).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let done = stop.clone();
    let server = tokio::spawn(kiln_api::serve(listener, state, async move {
        done.cancelled().await
    }));
    let http = reqwest::Client::new();
    for (who, key) in [
        ("tenant key", &tenant_key),
        ("deployment key, every tenant", &system_key),
    ] {
        for range in ["1h", "24h", "7d"] {
            let url = format!("{base}/api/v1/dashboard/stats?range={range}");
            let mut samples = Vec::with_capacity(args.requests);
            let mut last = serde_json::Value::Null;
            for i in 0..args.requests + 20 {
                let t = Instant::now();
                let response = http.get(&url).bearer_auth(key).send().await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "{url}: {}",
                    response.status()
                );
                last = response.json().await?;
                if i >= 20 {
                    samples.push(t.elapsed());
                }
            }
            samples.sort();
            println!(
                "| stats `range={range}`, {who} ({} requests; {} succeeded in range) | p50 {} · p99 {} |",
                samples.len(),
                last["jobs_by_status"]["succeeded"],
                ms(percentile(&samples, 0.5)),
                ms(percentile(&samples, 0.99))
            );
        }
    }
    stop.cancel();
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&root);
    if let Some(other) = other {
        other.close().await;
    }
    super::discard(args.database_url.as_deref(), db).await
}
