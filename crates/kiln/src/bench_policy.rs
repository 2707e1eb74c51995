//! `kiln bench policy`: what admission policies cost a submission — no-op
//! jobs submitted over HTTP by concurrent clients to an embedded SQLite
//! store, with the tenant holding no policy and five (fresh database each
//! round, rounds alternating, each pair in the other order from the last)
//! — and one job judged by five policies, in process.

use std::time::{Duration, Instant};

use clap::Args;
use kiln_blob::BlobStore;
use kiln_core::{NewJob, Scope, Scopes};
use kiln_db::Db;
use kiln_flow::policy::{Policy, PolicySet, Subject};
use kiln_worker::now_millis;
use serde_json::json;
use tokio_util::sync::CancellationToken;

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
    let root = std::env::temp_dir().join(format!("kiln-bench-policy-{}", now_millis()));
    let blobs = BlobStore::local(&root.join("blobs"))?;
    let state = kiln_api::AppState::new(db.clone(), blobs, None);
    let (_, secret) = kiln_api::issue_key(db, "bench", "bench", Scopes(vec![Scope::Write])).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            kiln_api::serve(listener, state, async move { stop.cancelled().await }).await
        })
    };
    let chainer = tokio::spawn(kiln_db::audit::chain_loop(
        db.clone(),
        Duration::from_millis(250),
    ));
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/api/v1/jobs");
    let started = Instant::now();
    let per_client = jobs / clients;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let http = http.clone();
        let url = url.clone();
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_client {
                let response = http
                    .post(&url)
                    .bearer_auth(&secret)
                    .json(&json!({"kind": "noop", "spec": {}, "labels": {"team": "bench"}}))
                    .send()
                    .await?;
                anyhow::ensure!(response.status() == 201, "{}", response.status());
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let took = started.elapsed();
    stop.cancel();
    let _ = server.await;
    chainer.abort();
    let _ = std::fs::remove_dir_all(&root);
    Ok((per_client * clients) as f64 / took.as_secs_f64())
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
