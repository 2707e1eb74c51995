//! `kiln bench pipeline`: per-step overhead of a chain of no-op steps, a
//! fan-out with fan-in, and runs of a diamond at once, with a real worker
//! and the advancer, on SQLite or PostgreSQL.

use std::time::{Duration, Instant};

use clap::Args;
use kiln_core::JobKinds;
use kiln_db::flow::{NewRun, RunFilter};
use kiln_db::Db;
use kiln_flow::{PipelineDef, RunStatus};
use kiln_worker::{now_millis, Handlers, NoopHandler};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct PipelineArgs {
    /// postgres://... (a fresh schema is used) or omit for a fresh SQLite file.
    #[arg(long, env = "KILN_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Steps in the chain.
    #[arg(long, default_value_t = 1_000)]
    chain: usize,
    /// Instances of the fanned-out step.
    #[arg(long, default_value_t = 1_000)]
    fan_out: usize,
    /// Runs of the 10-step diamond started at once.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    #[arg(long, default_value_t = 64)]
    slots: usize,
    /// Steps of a chain run before the measured ones, after which the
    /// tables are analysed as autovacuum would have done in a database
    /// that has run for a minute; 0 measures a schema made a second ago.
    #[arg(long, default_value_t = 200)]
    warm_up: usize,
}

fn chain_def(name: &str, steps: usize) -> Value {
    let steps: Vec<Value> = (0..steps)
        .map(|i| {
            let mut step = json!({"id": format!("s{i}"), "kind": "noop"});
            if i > 0 {
                step["depends_on"] = json!([format!("s{}", i - 1)]);
            }
            step
        })
        .collect();
    json!({"name": name, "steps": steps})
}

fn kinds() -> JobKinds {
    let mut kinds = JobKinds::new();
    kinds.add("noop", kiln_worker::noop::check_spec);
    kinds
}

async fn apply(db: &Db, def: Value) -> anyhow::Result<()> {
    let checked = PipelineDef::from_json(def, &kinds()).map_err(|e| anyhow::anyhow!("{e}"))?;
    db.pipeline_put("bench", &checked.def, now_millis()).await?;
    Ok(())
}

async fn start(db: &Db, pipeline: &str, params: Value) -> anyhow::Result<i64> {
    let new = NewRun {
        tenant: "bench".into(),
        pipeline: pipeline.into(),
        params: params.as_object().cloned().unwrap_or_default(),
        labels: Default::default(),
        idempotency_key: None,
        trigger: "bench".into(),
    };
    let (view, _) = db
        .run_create(&new, &kinds(), now_millis())
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(view.run.id)
}

/// Waits until `n` runs of `pipeline` have ended; returns their records.
async fn wait_ended(
    db: &Db,
    pipeline: &str,
    n: usize,
) -> anyhow::Result<Vec<kiln_db::flow::RunRecord>> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let runs = db
            .run_list(
                "bench",
                &RunFilter {
                    pipeline: Some(pipeline.into()),
                    limit: n as i64,
                    ..Default::default()
                },
            )
            .await?;
        if runs.len() == n && runs.iter().all(|r| r.status.is_terminal()) {
            anyhow::ensure!(
                runs.iter().all(|r| r.status == RunStatus::Succeeded),
                "a run of {pipeline} did not succeed: {:?}",
                runs.iter()
                    .find(|r| r.status != RunStatus::Succeeded)
                    .map(|r| &r.reason)
            );
            return Ok(runs);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{pipeline} did not finish in time"
        );
        // The span is read from the runs' own times, so a slower look
        // costs no precision; a look every 5 ms was 400 queries beside a
        // chain of 1,000 steps, on the same two cores.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn span_ms(runs: &[kiln_db::flow::RunRecord]) -> i64 {
    let start = runs.iter().map(|r| r.created_at).min().unwrap_or(0);
    let end = runs
        .iter()
        .filter_map(|r| r.finished_at)
        .max()
        .unwrap_or(start);
    end - start
}

pub async fn pipeline(args: PipelineArgs) -> anyhow::Result<()> {
    let (db, other) = super::fresh_db(args.database_url.as_deref()).await?;
    if let Some(other) = other {
        other.close().await;
    }
    let backend = db.backend();
    let (stop_worker, worker) = super::worker(
        &db,
        Handlers::new().with("noop", std::sync::Arc::new(NoopHandler)),
        args.slots,
    );
    let stop = CancellationToken::new();
    let advancer = tokio::spawn(kiln_worker::flow::advance_loop(
        db.clone(),
        kinds(),
        stop.clone(),
    ));
    println!(
        "| pipeline ({backend}, after a warm-up of {} steps) | result |",
        args.warm_up
    );
    println!("| --- | --- |");

    if args.warm_up > 0 {
        // Plans PostgreSQL caches for tables of a few rows (a sequential
        // scan of the run's steps, say) stay until an ANALYZE replaces them;
        // a database that has run for a minute has had one.
        apply(&db, chain_def("warm-up", args.warm_up)).await?;
        start(&db, "warm-up", json!({})).await?;
        wait_ended(&db, "warm-up", 1).await?;
        db.bench_settle().await?;
    }
    apply(&db, chain_def("chain", args.chain)).await?;
    start(&db, "chain", json!({})).await?;
    let runs = wait_ended(&db, "chain", 1).await?;
    let total = span_ms(&runs);
    println!(
        "| chain of {} no-op steps, trigger → end | {:.2} s · **{:.3} ms per step** |",
        args.chain,
        total as f64 / 1000.0,
        total as f64 / args.chain as f64
    );

    apply(
        &db,
        json!({"name": "fan", "params": [{"name": "items", "type": "list"}], "steps": [
            {"id": "each", "kind": "noop", "for_each": "${params.items}"},
            {"id": "join", "kind": "noop", "depends_on": ["each"]},
        ]}),
    )
    .await?;
    let items: Vec<usize> = (0..args.fan_out).collect();
    start(&db, "fan", json!({ "items": items })).await?;
    let runs = wait_ended(&db, "fan", 1).await?;
    println!(
        "| fan-out of {} + fan-in, trigger → end | **{:.3} s** |",
        args.fan_out,
        span_ms(&runs) as f64 / 1000.0
    );

    let mut steps = vec![json!({"id": "a", "kind": "noop"})];
    let middle: Vec<String> = (1..=8).map(|i| format!("m{i}")).collect();
    for id in &middle {
        steps.push(json!({"id": id, "kind": "noop", "depends_on": ["a"]}));
    }
    steps.push(json!({"id": "z", "kind": "noop", "depends_on": middle}));
    apply(&db, json!({"name": "diamond", "steps": steps})).await?;
    let began = Instant::now();
    for _ in 0..args.runs {
        start(&db, "diamond", json!({})).await?;
    }
    let runs = wait_ended(&db, "diamond", args.runs).await?;
    let wall = began.elapsed();
    println!(
        "| {} runs of a 10-step diamond at once | {:.2} s · **{:.0} runs/s** ({:.0} steps/s) |",
        args.runs,
        wall.as_secs_f64(),
        args.runs as f64 / wall.as_secs_f64(),
        (args.runs * 10) as f64 / wall.as_secs_f64()
    );
    let _ = runs;
    stop.cancel();
    stop_worker.cancel();
    let _ = advancer.await;
    let _ = worker.await;
    super::discard(args.database_url.as_deref(), db).await
}
