//! `kiln bench logs`: live-log ingest from a wasm job printing as fast as
//! it can (MB/s, with the process's peak RSS sampled while it runs), the
//! guest's pace in a microVM printing as fast as it can (with and without
//! the tap), and follow latency, line written → SSE client, p50.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use kiln_blob::BlobStore;
use kiln_core::{Backoff, LeasedJob, Priority};
use kiln_db::logs::LogQuery;
use kiln_db::Db;
use kiln_logs::{LogConfig, LogSink, Origin, Stream};
use kiln_wasm::{fixtures, WasmConfig, WasmHandler, WasmRuntime};
use kiln_worker::{now_millis, JobHandler};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{fresh_db, ms, percentile, rss_kib};

#[derive(Args)]
pub struct LogsArgs {
    /// postgres://... (a fresh schema is used) or omit for a fresh SQLite file.
    #[arg(long, env = "KILN_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Output of the wasm job, in MiB.
    #[arg(long, default_value_t = 256)]
    wasm_mib: u64,
    /// Lines timed for the follow latency.
    #[arg(long, default_value_t = 200)]
    lines: usize,
    /// Output of the VM command, in MiB (0: no VM run).
    #[arg(long, default_value_t = 8)]
    vm_mib: u64,
    /// Where the `default` image is (`kiln image build` puts it in <data-dir>/images).
    #[arg(long, env = "KILN_BENCH_IMAGES")]
    images: Option<std::path::PathBuf>,
    #[command(flatten)]
    host: crate::config::VmHostArgs,
}

fn leased(id: i64, spec: serde_json::Value) -> LeasedJob {
    let now = now_millis();
    LeasedJob {
        id,
        tenant: "bench".into(),
        kind: "wasm".into(),
        queue: "default".into(),
        priority: Priority::Default,
        spec,
        attempt: 1,
        max_attempts: 1,
        retry_from: 0,
        timeout_ms: 600_000,
        backoff: Backoff::default(),
        permanent_exit_codes: Vec::new(),
        run_at: now,
        created_at: now,
        started_at: now,
        run_id: None,
    }
}

/// Samples the process's RSS every 5 ms until dropped; the peak in KiB.
struct RssPeak {
    peak: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl RssPeak {
    fn start() -> RssPeak {
        let peak = Arc::new(AtomicU64::new(rss_kib()));
        let stop = CancellationToken::new();
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.is_cancelled() {
                p.fetch_max(rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssPeak { peak, stop }
    }

    fn finish(self) -> u64 {
        self.stop.cancel();
        self.peak.load(Ordering::Relaxed)
    }
}

/// The bytes the store holds for one job (rows and segments alike).
async fn stored_bytes(db: &Db, job: i64) -> anyhow::Result<i64> {
    let mut total = 0;
    let mut after = 0;
    loop {
        let chunks = db
            .log_read(&LogQuery {
                tenant: Some("bench"),
                job_id: Some(job),
                after,
                limit: 1000,
                ..LogQuery::default()
            })
            .await?;
        let Some(last) = chunks.last() else {
            return Ok(total);
        };
        after = last.id;
        total += chunks
            .iter()
            .filter(|c| c.stream != "log")
            .map(|c| c.bytes)
            .sum::<i64>();
    }
}

pub async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let (db, _) = fresh_db(args.database_url.as_deref()).await?;
    let root = std::env::temp_dir().join(format!("kiln-bench-logs-{}", now_millis()));
    let blobs = BlobStore::local(&root.join("blobs"))?;
    let stop = CancellationToken::new();
    let total = args.wasm_mib << 20;
    let (sink, writer) = LogSink::start(
        db.clone(),
        Some(blobs.clone()),
        LogConfig {
            source_bytes_max: total + (1 << 20),
            ..LogConfig::new("bench")
        },
        stop.clone(),
    );
    println!(
        "| live logs ({}, blobs in a local directory) | value |\n|---|---|",
        db.backend()
    );
    wasm_ingest(&db, &blobs, &root, &sink, total).await?;
    follow_latency(&db, &blobs, &sink, args.lines).await?;
    if args.vm_mib > 0 {
        vm_pace(&db, &blobs, &sink, &args).await?;
    }
    stop.cancel();
    writer.await?;
    db.close().await;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

async fn wasm_ingest(
    db: &Db,
    blobs: &BlobStore,
    root: &std::path::Path,
    sink: &LogSink,
    total: u64,
) -> anyhow::Result<()> {
    let runtime = WasmRuntime::new(
        WasmConfig {
            cache_dir: Some(root.join("cache")),
            scratch_dir: root.join("scratch"),
            max_instances: 4,
            ..WasmConfig::default()
        },
        blobs.clone(),
    )?;
    let bytes = WasmRuntime::to_binary(fixtures::print_bytes(total).as_bytes())?;
    let id = kiln_blob::content_id(&bytes);
    blobs
        .put(&kiln_wasm::module_blob_key(&id), bytes::Bytes::from(bytes))
        .await?;
    runtime.prepare(&id).await?;
    let handler = WasmHandler(runtime.clone());
    let spec = json!({"module": id, "output_limit_bytes": 1 << 20});
    runtime.attach_logs(sink.clone());
    let before = rss_kib();
    let peak = RssPeak::start();
    let t = Instant::now();
    let end = handler
        .run(&leased(2, spec), CancellationToken::new())
        .await;
    let took = t.elapsed();
    let peak = peak.finish();
    if let kiln_core::AttemptEnd::Failed { error, .. } = end {
        anyhow::bail!("the guest failed: {error}");
    }
    let stored = stored_bytes(db, 2).await?;
    anyhow::ensure!(stored as u64 == total, "stored {stored} of {total} bytes");
    let mb = total as f64 / 1e6;
    println!(
        "| wasm job printing {} MiB into the live logs (all stored: first MiB in rows, the rest in segments) | {:.0} MB/s ({:.2} s) |",
        total >> 20,
        mb / took.as_secs_f64(),
        took.as_secs_f64()
    );
    println!(
        "| process RSS before → peak while ingesting | {} → {} MiB |",
        before >> 10,
        peak >> 10
    );
    let stats = sink.stats();
    println!(
        "| chunks, segments, bytes dropped | {} rows, {} segments, {} dropped |",
        stats.chunks, stats.segments, stats.dropped_bytes
    );
    Ok(())
}

/// Lines written into a tap at known instants (a guest's print is a
/// synchronous call into it), read by an SSE client over HTTP on
/// 127.0.0.1 following the job.
async fn follow_latency(
    db: &Db,
    blobs: &BlobStore,
    sink: &LogSink,
    lines: usize,
) -> anyhow::Result<()> {
    let job = db
        .job_insert(
            &kiln_core::NewJob::new("bench", "nobody", json!({})),
            now_millis(),
        )
        .await?
        .0
        .id;
    let stop = CancellationToken::new();
    let (address, key) = serve_api(db, blobs, &stop).await?;
    let response = reqwest::Client::new()
        .get(format!(
            "http://{address}/api/v1/jobs/{job}/logs?follow=true"
        ))
        .bearer_auth(&key)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "follow: {}",
        response.status()
    );
    let tap = sink.tap(Origin::job("bench", job, 1));
    let sent: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for i in 0..lines {
                sent.lock().unwrap().push(Instant::now());
                tap.write(Stream::Stdout, format!("line {i}\n").as_bytes());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tap.finish().await;
        })
    };
    let samples = read_lines(response, lines, |text, _| {
        let i = text.strip_prefix("line ")?.parse::<usize>().ok()?;
        let at = *sent.lock().unwrap().get(i)?;
        Some(Instant::now().duration_since(at))
    })
    .await?;
    let mut samples = samples;
    writer.await?;
    stop.cancel();
    anyhow::ensure!(!samples.is_empty(), "no line reached the follower");
    samples.sort();
    println!(
        "| follow latency, line written → SSE client over HTTP ({} lines, 20 ms apart) | p50 {}, p95 {} |",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.95))
    );
    Ok(())
}

/// Reads an SSE stream of chunks until `count` lines were measured by
/// `measure` (given each line's text and its arrival), or 60 s passed.
async fn read_lines(
    mut response: reqwest::Response,
    count: usize,
    measure: impl Fn(&str, std::time::SystemTime) -> Option<Duration>,
) -> anyhow::Result<Vec<Duration>> {
    let mut buffer = String::new();
    let mut samples = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(60);
    while samples.len() < count && Instant::now() < deadline {
        let Ok(Ok(Some(chunk))) =
            tokio::time::timeout(Duration::from_secs(5), response.chunk()).await
        else {
            break;
        };
        let now = std::time::SystemTime::now();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let line: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            for text in line["text"].as_str().unwrap_or("").lines() {
                samples.extend(measure(text, now));
            }
        }
    }
    Ok(samples)
}

/// An API on 127.0.0.1 over the bench's store, and a read key for it.
async fn serve_api(
    db: &Db,
    blobs: &BlobStore,
    stop: &CancellationToken,
) -> anyhow::Result<(std::net::SocketAddr, String)> {
    let (_, key) = kiln_api::issue_key(
        db,
        "bench",
        "bench",
        kiln_core::Scopes(vec![kiln_core::Scope::Read]),
    )
    .await?;
    let state = kiln_api::AppState::new(db.clone(), blobs.clone(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let done = stop.clone();
    tokio::spawn(kiln_api::serve(listener, state, async move {
        done.cancelled().await
    }));
    Ok((address, key))
}

/// A VM command printing as fast as it can: the guest's pace with and
/// without the tap.
async fn vm_pace(
    db: &Db,
    blobs: &BlobStore,
    sink: &LogSink,
    args: &LogsArgs,
) -> anyhow::Result<()> {
    let images = args
        .images
        .clone()
        .unwrap_or_else(|| crate::config::default_data_dir().join("images"));
    kiln_vm::image::Image::open(&images, "default")?;
    let work = std::env::temp_dir().join(format!("kiln-bench-logs-vm-{}", now_millis()));
    let config = crate::config::vm_config(&args.host, None, &kiln_core::TenantQuotas::default())?;
    let vms = kiln_vm::VmManager::start(&images, &work.join("vms"), config).await?;
    vms.attach_logs(sink.clone());
    let vm = vms.create(super::bench_vm("default")).await?;
    let agent = vms
        .agent("bench", &vm.id)
        .await
        .ok_or_else(|| anyhow::anyhow!("vm vanished"))?;
    let bytes = args.vm_mib << 20;
    let exec = kiln_vm::Exec {
        command: "sh".into(),
        args: vec![
            "-c".into(),
            format!("yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ | head -c {bytes}"),
        ],
        ..kiln_vm::Exec::default()
    };
    // Alternated, best of three each: the first runs of a VM are slower.
    let (mut alone, mut tapped) = (Duration::MAX, Duration::MAX);
    let mut status = 0;
    for _ in 0..3 {
        let t = Instant::now();
        agent.exec(exec.clone(), b"").await?;
        alone = alone.min(t.elapsed());
        let tap = vms
            .log_tap(Origin::vm("bench", &vm.id))
            .ok_or_else(|| anyhow::anyhow!("no logs"))?;
        let t = Instant::now();
        let out = agent
            .exec_tapped(exec.clone(), b"", Some(&tap), None)
            .await?;
        tap.finish().await;
        tapped = tapped.min(t.elapsed());
        status = out.status();
        anyhow::ensure!(tap.taken() == bytes, "tapped {} of {bytes}", tap.taken());
    }
    let mb = bytes as f64 / 1e6;
    println!(
        "| VM command printing {} MiB ({}), guest's pace without the tap | {:.1} MB/s |",
        args.vm_mib,
        vms.accelerator().as_str(),
        mb / alone.as_secs_f64()
    );
    println!(
        "| the same into the live logs (all {} MiB stored) | {:.1} MB/s (exit {}) |",
        args.vm_mib,
        mb / tapped.as_secs_f64(),
        status
    );
    vm_follow_latency(db, blobs, &vms, &vm.id, &agent).await?;
    vms.delete("bench", &vm.id).await;
    vms.shutdown().await;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Lines printed in the guest, numbered, read by an SSE client over HTTP
/// following the VM's lines; each timed from the moment its frame reached
/// the host (busybox's `date` has no sub-second field, so the guest cannot
/// stamp them; the guest → host hop is the exec round trip's share).
async fn vm_follow_latency(
    db: &Db,
    blobs: &BlobStore,
    vms: &Arc<kiln_vm::VmManager>,
    vm_id: &str,
    agent: &kiln_vm::AgentConn,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let (address, key) = serve_api(db, blobs, &stop).await?;
    let response = reqwest::Client::new()
        .get(format!(
            "http://{address}/api/v1/logs?follow=true&vm={vm_id}&source=vm"
        ))
        .bearer_auth(&key)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "follow: {}",
        response.status()
    );
    let lines = 40;
    let exec = kiln_vm::Exec {
        command: "sh".into(),
        args: vec![
            "-c".into(),
            format!("i=0; while [ $i -lt {lines} ]; do echo \"t $i\"; i=$((i+1)); sleep 0.1; done"),
        ],
        ..kiln_vm::Exec::default()
    };
    let tap = vms
        .log_tap(Origin::vm("bench", vm_id))
        .ok_or_else(|| anyhow::anyhow!("no logs"))?;
    let received: Arc<std::sync::Mutex<Vec<(String, std::time::SystemTime)>>> = Arc::default();
    let run = {
        let agent = agent.clone();
        let received = received.clone();
        tokio::spawn(async move {
            let mut stream = agent.exec_stream(exec, b"").await?;
            loop {
                match stream.next().await? {
                    kiln_vm::ExecEvent::Stdout(data) => {
                        let now = std::time::SystemTime::now();
                        for line in String::from_utf8_lossy(&data).lines() {
                            received.lock().unwrap().push((line.to_string(), now));
                        }
                        tap.write_paced(Stream::Stdout, &data).await;
                    }
                    kiln_vm::ExecEvent::Stderr(_) => {}
                    kiln_vm::ExecEvent::Exited(_) => break,
                }
            }
            tap.finish().await;
            anyhow::Ok(())
        })
    };
    let mut samples = read_lines(response, lines, |text, at| {
        let got = received.lock().unwrap();
        let (_, from) = got.iter().find(|(line, _)| line == text)?;
        at.duration_since(*from).ok()
    })
    .await?;
    run.await??;
    stop.cancel();
    anyhow::ensure!(!samples.is_empty(), "no guest line reached the follower");
    samples.sort();
    println!(
        "| follow latency, guest line reaches the host → SSE client over HTTP ({} lines, 100 ms apart) | p50 {}, p95 {} |",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.95))
    );
    Ok(())
}
