//! `kiln bench login`: `POST /api/v1/auth/login` over HTTP (argon2id,
//! m=19 MiB, t=2, p=1), one client at a time and several at once, and what
//! a request authenticated by the session token costs beside one with an
//! API key (`GET /api/v1/auth/me`).

use std::time::{Duration, Instant};

use clap::Args;
use kiln_blob::BlobStore;
use kiln_core::users::Role;
use kiln_core::{Scope, Scopes};
use kiln_worker::now_millis;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{ms, percentile};

#[derive(Args)]
pub struct LoginArgs {
    /// postgres://... (a fresh schema is used) or omit for a fresh SQLite file.
    #[arg(long, env = "KILN_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Timed logins one after another.
    #[arg(long, default_value_t = 200)]
    logins: usize,
    /// Clients logging in at once for the throughput round.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Timed `GET /api/v1/auth/me` per credential.
    #[arg(long, default_value_t = 2_000)]
    requests: usize,
}

const PASSWORD: &str = "correct horse battery staple";

pub async fn login(args: LoginArgs) -> anyhow::Result<()> {
    let (db, _) = super::fresh_db(args.database_url.as_deref()).await?;
    let root = std::env::temp_dir().join(format!("kiln-bench-login-{}", now_millis()));
    let state = kiln_api::AppState::new(db.clone(), BlobStore::local(&root.join("blobs"))?, None);
    // Every login here comes from one address: it must not be the limit.
    state.auth.set_settings(kiln_api::auth::AuthSettings {
        source: kiln_core::users::ThrottlePolicy {
            failures_max: i64::MAX,
            ..kiln_core::users::ThrottlePolicy::SOURCE
        },
        ..kiln_api::auth::AuthSettings::default()
    });
    let hash = state
        .auth
        .hash_password(PASSWORD.into())
        .await
        .map_err(|e| anyhow::anyhow!("hashing: {}", e.message))?;
    // The hash alone, for what the rest of a login costs beside it.
    let mut hashing = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        state
            .auth
            .verify_password(PASSWORD.into(), Some(hash.clone()))
            .await
            .map_err(|e| anyhow::anyhow!("verifying: {}", e.message))?;
        hashing.push(started.elapsed());
    }
    hashing.sort();
    println!(
        "| argon2id m=19456 KiB, t=2, p=1: one verification, alone | p50 {} · max {} |",
        ms(percentile(&hashing, 0.5)),
        ms(*hashing.last().unwrap_or(&Duration::ZERO)),
    );
    let now = now_millis();
    for i in 0..args.clients.max(1) {
        let user = kiln_db::users::User {
            tenant: "bench".into(),
            username: format!("user{i}"),
            role: Role::Operator,
            created_at: now,
            updated_at: now,
        };
        db.user_insert(&user, &hash).await?;
    }
    let (_, key) = kiln_api::issue_key(&db, "bench", "bench", Scopes(vec![Scope::Read])).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let server = {
        let stop = stop.clone();
        let state = state.clone();
        tokio::spawn(async move {
            kiln_api::serve(listener, state, async move { stop.cancelled().await }).await
        })
    };
    let http = reqwest::Client::new();
    let login_once = |http: reqwest::Client, base: String, user: String| async move {
        let started = Instant::now();
        let response = http
            .post(format!("{base}/api/v1/auth/login"))
            .json(&json!({"tenant": "bench", "username": user, "password": PASSWORD}))
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        anyhow::ensure!(status == 200, "login: {status} {body}");
        anyhow::Ok((
            started.elapsed(),
            body["token"].as_str().unwrap_or_default().to_string(),
        ))
    };
    // Warm up connections and the dummy hash for unknown users.
    let (_, token) = login_once(http.clone(), base.clone(), "user0".into()).await?;
    let mut times = Vec::with_capacity(args.logins);
    for _ in 0..args.logins {
        times.push(
            login_once(http.clone(), base.clone(), "user0".into())
                .await?
                .0,
        );
    }
    times.sort();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "| {} · login, one client, {} logins · argon2id m=19456 KiB, t=2, p=1 | p50 {} · p99 {} · max {} |",
        db.backend(),
        args.logins,
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.99)),
        ms(*times.last().unwrap_or(&Duration::ZERO)),
    );
    let started = Instant::now();
    let per_client = (args.logins / args.clients.max(1)).max(1);
    let mut tasks = Vec::new();
    for i in 0..args.clients.max(1) {
        let (http, base) = (http.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            for _ in 0..per_client {
                times.push(
                    login_once(http.clone(), base.clone(), format!("user{i}"))
                        .await?
                        .0,
                );
            }
            anyhow::Ok(times)
        }));
    }
    let mut times = Vec::new();
    for task in tasks {
        times.extend(task.await??);
    }
    let took = started.elapsed();
    times.sort();
    println!(
        "| {} · login, {} clients at once ({} cores) | {:.1} logins/s · p50 {} · p99 {} |",
        db.backend(),
        args.clients,
        cores,
        times.len() as f64 / took.as_secs_f64(),
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.99)),
    );
    for (what, credential) in [("an API key", key), ("a session token", token)] {
        let mut times = Vec::with_capacity(args.requests);
        for _ in 0..args.requests {
            let started = Instant::now();
            let response = http
                .get(format!("{base}/api/v1/auth/me"))
                .bearer_auth(&credential)
                .send()
                .await?;
            anyhow::ensure!(response.status() == 200, "me: {}", response.status());
            response.bytes().await?;
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "| {} · `GET /api/v1/auth/me` with {what} | p50 {} · p99 {} |",
            db.backend(),
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
        );
    }
    stop.cancel();
    let _ = server.await;
    db.close().await;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
