//! `kiln bench policy`: what admission policies cost a submission — no-op
//! jobs submitted over HTTP by concurrent clients to an embedded SQLite
//! store, with the tenant holding no policy and five (fresh database each
//! round, rounds alternating, each pair in the other order from the last)
//! — and one job judged by five policies, in process.

use std::time::Instant;

use clap::Args;
use kiln_core::NewJob;
use kiln_db::Db;
use kiln_flow::policy::{Policy, PolicySet, Subject};
use kiln_worker::now_millis;
use serde_json::json;

#[derive(Args)]
pub struct PolicyArgs {
    /// postgres://... (fresh schemas are used) or omit for fresh SQLite files.
    #[arg(long, env = "KILN_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Jobs per round.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Rounds with five policies, and as many without, alternating.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

/// Five policies of the kinds the README shows; each judges a no-op job
/// and admits it.
const POLICIES: [(&str, &str); 5] = [
    ("vm-team", r#"job.kind != "vm" || job.labels.team != null"#),
    (
        "trial-memory",
        r#"tenant != "trial" || job.memory_mib == null || job.memory_mib <= 1024"#,
    ),
    ("timeout", "job.timeout_ms <= 3600000"),
    ("queues", r#"job.queue in ["default", "batch", "emails"]"#),
    (
        "no-critical",
        r#"job.priority != "critical" || job.labels.oncall == "yes""#,
    ),
];

pub async fn policy(args: PolicyArgs) -> anyhow::Result<()> {
    let mut with = Vec::new();
    let mut without = Vec::new();
    for round in 0..args.rounds * 2 {
        // Pairs alternate which goes first, so a drift in the machine's
        // load does not favour one side.
        let judged = (round % 2 == 1) != (round / 2 % 2 == 1);
        let db = super::fresh_named(args.database_url.as_deref(), &format!("p{round}")).await?;
        if judged {
            for (name, rule) in POLICIES {
                db.policy_put("bench", name, rule, "", &[], true, now_millis())
                    .await?;
            }
        }
        let rate = submit_over_http(&db, args.jobs, args.clients).await?;
        println!(
            "| {} · {} policies · round {} | {:.0} jobs/s submitted over HTTP |",
            db.backend(),
            if judged { 5 } else { 0 },
            round / 2 + 1,
            rate
        );
        if judged { &mut with } else { &mut without }.push(rate);
        db.close().await;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (with, without) = (mean(&with), mean(&without));
    println!(
        "| 5 policies vs none, mean of {} rounds | {:.0} vs {:.0} jobs/s: {:+.1} % |",
        args.rounds,
        with,
        without,
        (with - without) / without * 100.0
    );
    judge_in_process();
    Ok(())
}

/// Jobs/s from the first submit to the last answer.
async fn submit_over_http(db: &Db, jobs: usize, clients: usize) -> anyhow::Result<f64> {
    let api = super::EmbeddedApi::start(db, true).await?;
    let started = Instant::now();
    let body = json!({"kind": "noop", "spec": {}, "labels": {"team": "bench"}});
    let submitted = api.submit(&body, jobs, clients).await?;
    let took = started.elapsed();
    api.stop().await;
    Ok(submitted as f64 / took.as_secs_f64())
}

/// The policies' own cost: one job judged by the five, many times.
fn judge_in_process() {
    let set = PolicySet::new(
        POLICIES
            .iter()
            .map(|(name, rule)| Policy::new(name, rule, "", Vec::new(), true).expect("parses"))
            .collect(),
    );
    let mut job = NewJob::new("bench", "noop", json!({}));
    job.labels.insert("team".into(), "bench".into());
    let shape = serde_json::Map::new();
    let n = 100_000;
    let started = Instant::now();
    for _ in 0..n {
        let subject = Subject::of_job(&job, shape.clone());
        assert!(set.admit(&subject).is_ok());
    }
    let each = started.elapsed() / n;
    println!(
        "| one job judged by 5 policies, in process | {:.1} µs (context built and every rule evaluated) |",
        each.as_secs_f64() * 1e6
    );
}
