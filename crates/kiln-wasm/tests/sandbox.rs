//! The sandbox itself: real modules through wasmtime, every limit enforced.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_blob::{content_id, BlobStore};
use kiln_core::AttemptEnd;
use kiln_wasm::{fixtures, module_blob_key, WasmConfig, WasmRuntime, WasmSpec};
use tokio_util::sync::CancellationToken;

struct Sandbox {
    runtime: Arc<WasmRuntime>,
    blobs: BlobStore,
    root: std::path::PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox::with(|_| {})
    }

    /// A sandbox whose configuration `edit` adjusts.
    fn with(edit: impl FnOnce(&mut WasmConfig)) -> Sandbox {
        let root = fixtures::temp_root("kiln-wasm-test");
        let blobs = BlobStore::local(&root.join("blobs")).unwrap();
        let mut config = WasmConfig {
            cache_dir: Some(root.join("cache")),
            scratch_dir: root.join("scratch"),
            max_instances: 64,
            ..WasmConfig::default()
        };
        edit(&mut config);
        let runtime = WasmRuntime::new(config, blobs.clone()).unwrap();
        Sandbox {
            runtime,
            blobs,
            root,
        }
    }

    /// Another runtime over the same directories, as after a restart.
    fn restart(&self, edit: impl FnOnce(&mut WasmConfig)) -> Arc<WasmRuntime> {
        let mut config = WasmConfig {
            cache_dir: Some(self.root.join("cache")),
            scratch_dir: self.root.join("scratch"),
            max_instances: 8,
            ..WasmConfig::default()
        };
        edit(&mut config);
        WasmRuntime::new(config, self.blobs.clone()).unwrap()
    }

    fn scratch_entries(&self) -> Vec<std::path::PathBuf> {
        let mut entries: Vec<_> = std::fs::read_dir(self.runtime.scratch_root())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        entries
    }

    async fn push(&self, wat: &str) -> String {
        let binary = WasmRuntime::to_binary(wat.as_bytes()).unwrap();
        self.runtime.validate(&binary).unwrap();
        let id = content_id(&binary);
        self.blobs
            .put(&module_blob_key(&id), Bytes::from(binary))
            .await
            .unwrap();
        id
    }

    async fn run(&self, wat: &str, edit: impl FnOnce(&mut WasmSpec)) -> AttemptEnd {
        let mut spec = WasmSpec {
            module: self.push(wat).await,
            ..WasmSpec::default()
        };
        edit(&mut spec);
        self.run_spec(&spec, Duration::from_secs(30)).await
    }

    /// Runs with a timeout enforced the way the worker does: by the kill switch.
    async fn run_spec(&self, spec: &WasmSpec, timeout: Duration) -> AttemptEnd {
        let kill = CancellationToken::new();
        let killer = {
            let kill = kill.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                kill.cancel();
            })
        };
        let end = self.runtime.run(spec, &kill).await;
        killer.abort();
        end
    }
}

/// A job of `tenant` with id `id`, as the worker hands it (the spec is
/// passed beside it).
fn leased(tenant: &str, id: i64) -> kiln_core::LeasedJob {
    kiln_core::LeasedJob {
        id,
        tenant: tenant.into(),
        kind: "wasm".into(),
        queue: "default".into(),
        priority: kiln_core::Priority::Default,
        spec: serde_json::Value::Null,
        attempt: 1,
        max_attempts: 1,
        retry_from: 0,
        timeout_ms: 30_000,
        backoff: kiln_core::Backoff::default(),
        permanent_exit_codes: vec![],
        run_at: 0,
        created_at: 0,
        started_at: 0,
        run_id: None,
    }
}

impl Sandbox {
    async fn run_job(&self, tenant: &str, id: i64, spec: &WasmSpec) -> AttemptEnd {
        let kill = CancellationToken::new();
        self.runtime.run_job(&leased(tenant, id), spec, &kill).await
    }
}

fn succeeded(end: AttemptEnd) -> kiln_core::JobResult {
    match end {
        AttemptEnd::Succeeded(result) => result,
        other => panic!("expected success, got {other:?}"),
    }
}

fn failed(end: AttemptEnd) -> (String, Option<kiln_core::JobResult>, bool) {
    match end {
        AttemptEnd::Failed {
            error,
            result,
            permanent,
        } => (error, result, permanent),
        other => panic!("expected failure, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_world() {
    let sandbox = Sandbox::new();
    let result = succeeded(sandbox.run(&fixtures::hello(), |_| {}).await);
    assert_eq!(result.stdout, "hello world\n");
    assert_eq!(result.exit_code, 0);
    assert!(!result.truncated);
}

#[tokio::test]
async fn stdin_reaches_stdout() {
    let sandbox = Sandbox::new();
    let input = "line one\nline two\n".repeat(500);
    let result = succeeded(
        sandbox
            .run(&fixtures::echo(), |spec| spec.stdin = input.clone())
            .await,
    );
    assert_eq!(result.stdout, input);
}

#[tokio::test]
async fn exit_codes_and_stderr() {
    let sandbox = Sandbox::new();
    let (error, result, permanent) = failed(sandbox.run(&fixtures::exit_with(3), |_| {}).await);
    let result = result.unwrap();
    assert_eq!(result.exit_code, 3);
    assert_eq!(result.stderr, "bye\n");
    assert_eq!(error, "exit code 3");
    assert!(!permanent, "a non-zero exit follows the job's retry policy");
    let zero = succeeded(sandbox.run(&fixtures::exit_with(0), |_| {}).await);
    assert_eq!(zero.exit_code, 0);
}

#[tokio::test]
async fn args_and_env_reach_the_guest() {
    let sandbox = Sandbox::new();
    let result = succeeded(
        sandbox
            .run(&fixtures::args_and_env(), |spec| {
                spec.args = vec!["a".into(), "b c".into()];
                spec.env.insert("GREETING".into(), "hi".into());
            })
            .await,
    );
    assert_eq!(result.stdout, "main\0a\0b c\0GREETING=hi\0");
}

#[tokio::test]
async fn infinite_loop_is_killed() {
    let sandbox = Sandbox::new();
    let spec = WasmSpec {
        module: sandbox.push(&fixtures::spin()).await,
        ..WasmSpec::default()
    };
    // Compiled first, so the run below measures the kill alone.
    sandbox.runtime.prepare(&spec.module).await.unwrap();
    let kill = CancellationToken::new();
    let run = tokio::spawn({
        let runtime = sandbox.runtime.clone();
        let (spec, kill) = (spec.clone(), kill.clone());
        async move { runtime.run(&spec, &kill).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!run.is_finished(), "a spinning guest ends only when killed");
    kill.cancel();
    // A generous hang guard, not a latency bound: the epoch slices make the
    // guest yield within milliseconds.
    let end = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the kill reaches a spinning guest")
        .unwrap();
    let (error, result, permanent) = failed(end);
    assert_eq!(error, "killed");
    assert_eq!(result.unwrap().exit_code, -1);
    assert!(!permanent);
}

#[tokio::test]
async fn fuel_bounds_cpu() {
    let sandbox = Sandbox::new();
    let (error, _, permanent) = failed(
        sandbox
            .run(&fixtures::spin(), |spec| spec.fuel = Some(1_000_000))
            .await,
    );
    assert_eq!(error, "fuel_exhausted");
    assert!(permanent);
}

#[tokio::test]
async fn memory_bomb_stops_at_the_cap() {
    let sandbox = Sandbox::new();
    let (error, _, permanent) = failed(
        sandbox
            .run(&fixtures::memory_bomb(), |spec| spec.memory_mib = Some(16))
            .await,
    );
    assert_eq!(error, "memory_limit");
    assert!(permanent);
}

#[tokio::test]
async fn output_flood_is_truncated() {
    let sandbox = Sandbox::new();
    let (error, result, _) = failed(
        sandbox
            .run(&fixtures::flood(), |spec| {
                spec.output_limit_bytes = Some(100_000)
            })
            .await,
    );
    let result = result.unwrap();
    assert_eq!(error, "output_truncated");
    assert!(result.truncated);
    assert_eq!(result.stdout.len(), 100_000);
}

#[tokio::test]
async fn traps_are_reported() {
    let sandbox = Sandbox::new();
    let (error, _, permanent) = failed(sandbox.run(&fixtures::trap(), |_| {}).await);
    assert!(error.starts_with("trap: "), "{error}");
    assert!(error.contains("unreachable"), "{error}");
    assert!(permanent);
    let (error, _, _) = failed(
        sandbox
            .run(&fixtures::trap(), |spec| spec.retry_traps = true)
            .await,
    );
    assert!(error.starts_with("trap: "));
    let (error, _, _) = failed(sandbox.run(&fixtures::stack_overflow(), |_| {}).await);
    assert!(error.contains("stack"), "{error}");
}

#[tokio::test]
async fn host_files_are_out_of_reach_but_scratch_works() {
    let sandbox = Sandbox::new();
    // No preopened directory: fd 3 does not exist (WASI errno 8, EBADF).
    let (_, result, _) = failed(sandbox.run(&fixtures::open_file(), |_| {}).await);
    assert_eq!(result.unwrap().exit_code, 8);
    let scratch = succeeded(
        sandbox
            .run(&fixtures::open_file(), |spec| spec.scratch = true)
            .await,
    );
    assert_eq!(scratch.exit_code, 0);
}

#[tokio::test]
async fn invalid_modules_are_refused_with_a_reason() {
    let sandbox = Sandbox::new();
    let error = sandbox
        .runtime
        .validate(b"\0asm\x01\0\0\0garbage")
        .unwrap_err();
    assert!(error.to_string().starts_with("invalid module"), "{error}");
    let no_start = WasmRuntime::to_binary(b"(module)").unwrap();
    assert!(sandbox.runtime.validate(&no_start).is_err());
    let bad_import = WasmRuntime::to_binary(
        br#"(module (import "env" "evil" (func)) (func (export "_start")))"#,
    )
    .unwrap();
    assert!(sandbox.runtime.validate(&bad_import).is_err());
    assert!(WasmRuntime::to_binary(b"(module (func").is_err());
}

#[tokio::test]
async fn compiled_modules_survive_a_restart_through_the_disk_cache() {
    let sandbox = Sandbox::new();
    let id = sandbox.push(&fixtures::hello()).await;
    sandbox.runtime.prepare(&id).await.unwrap();
    let spec = WasmSpec {
        module: id.clone(),
        ..WasmSpec::default()
    };
    succeeded(sandbox.run_spec(&spec, Duration::from_secs(5)).await);
    // A new runtime whose blob store is empty can only run it from the
    // precompiled artifact on disk.
    let restarted = WasmRuntime::new(
        WasmConfig {
            cache_dir: Some(sandbox.root.join("cache")),
            scratch_dir: sandbox.root.join("scratch-2"),
            max_instances: 8,
            ..WasmConfig::default()
        },
        BlobStore::local(&sandbox.root.join("empty")).unwrap(),
    )
    .unwrap();
    let result = succeeded(restarted.run(&spec, &CancellationToken::new()).await);
    assert_eq!(result.stdout, "hello world\n");
    // A missing module is a permanent failure with a clear reason.
    let missing = WasmSpec {
        module: format!("sha256:{}", "0".repeat(64)),
        ..WasmSpec::default()
    };
    let (error, _, permanent) = failed(sandbox.run_spec(&missing, Duration::from_secs(5)).await);
    assert!(error.contains("not found"), "{error}");
    assert!(permanent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sandboxes_at_once() {
    let sandbox = Arc::new(Sandbox::new());
    let id = sandbox.push(&fixtures::echo()).await;
    let mut tasks = Vec::new();
    for i in 0..500 {
        let sandbox = sandbox.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let spec = WasmSpec {
                module: id,
                stdin: format!("job {i}"),
                ..WasmSpec::default()
            };
            let result = succeeded(sandbox.run_spec(&spec, Duration::from_secs(30)).await);
            assert_eq!(result.stdout, format!("job {i}"));
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn output_limit_above_the_quota_is_refused_at_submit_and_clamped_at_run() {
    let quota = 64 << 10;
    let sandbox = Sandbox::with(|config| config.quotas.wasm_output_bytes_max = quota);
    let module = sandbox.push(&fixtures::flood()).await;
    let asked = serde_json::json!({"module": module, "output_limit_bytes": quota * 4});
    let quotas = sandbox.runtime.quotas().clone();
    let refused = kiln_wasm::check_spec_within(&asked, &quotas).unwrap_err();
    assert!(refused.contains("output_limit_bytes"), "{refused}");
    let huge = serde_json::json!({"module": module, "output_limit_bytes": 1u64 << 40});
    assert!(kiln_wasm::check_spec(&huge).is_err());
    // A spec that reaches the runtime anyway (stored before the quota was
    // lowered) gets no more than the quota.
    let (error, result, _) = failed(
        sandbox
            .run(&fixtures::flood(), |spec| {
                spec.output_limit_bytes = Some(quota as usize * 4)
            })
            .await,
    );
    assert_eq!(error, "output_truncated");
    assert_eq!(result.unwrap().stdout.len(), quota as usize);
}

/// Polls a directory's disk use until `stop`, returning the most seen.
fn watch_disk(dir: std::path::PathBuf, stop: Arc<std::sync::atomic::AtomicBool>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut most = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut total = 0;
        let mut pending = vec![dir.clone()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if let Ok(meta) = entry.path().symlink_metadata() {
                    total += meta.blocks() * 512;
                    if meta.is_dir() {
                        pending.push(entry.path());
                    }
                }
            }
        }
        most = most.max(total);
        std::thread::sleep(Duration::from_millis(1));
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_scratch_past_the_quota_stops_the_job() {
    let quota = 1 << 20;
    let sandbox = Sandbox::with(|config| config.quotas.wasm_scratch_bytes_max = quota);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = std::thread::spawn({
        let (dir, stop) = (sandbox.runtime.scratch_root().to_path_buf(), stop.clone());
        move || watch_disk(dir, stop)
    });
    // 512 chunks of 32 KiB: 16 MiB, sixteen times the quota.
    let end = sandbox
        .run(&fixtures::fill_scratch(512), |spec| spec.scratch = true)
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = watcher.join().unwrap();
    let (error, result, permanent) = failed(end);
    assert_eq!(error, "scratch_limit");
    assert_eq!(result.unwrap().exit_code, -1);
    assert!(permanent, "a limit breach is not retried unless asked");
    assert!(most <= quota, "the scratch directory held {most} bytes");
    assert!(sandbox.scratch_entries().is_empty());
    // Within the quota the same program runs to the end.
    let fits = succeeded(
        sandbox
            .run(&fixtures::fill_scratch(16), |spec| spec.scratch = true)
            .await,
    );
    assert_eq!(fits.exit_code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch_directories_are_private_unpredictable_and_always_removed() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Arc::new(Sandbox::new());
    let spin = sandbox.push(&fixtures::spin()).await;
    let kill = CancellationToken::new();
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let (sandbox, kill) = (sandbox.clone(), kill.clone());
            let spec = WasmSpec {
                module: spin.clone(),
                scratch: true,
                ..WasmSpec::default()
            };
            tokio::spawn(async move { sandbox.runtime.run(&spec, &kill).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let dirs = loop {
        let dirs = sandbox.scratch_entries();
        if dirs.len() == 2 {
            break dirs;
        }
        assert!(Instant::now() < deadline, "scratch directories: {dirs:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_ne!(dirs[0], dirs[1]);
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_str().unwrap();
        let random = name.strip_prefix("job-").expect(name);
        assert_eq!(random.len(), 32, "{name}");
        assert!(random.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{name}");
    }
    assert!(!dirs[0]
        .to_string_lossy()
        .contains(&std::process::id().to_string()));
    kill.cancel();
    for run in runs {
        assert_eq!(failed(run.await.unwrap()).0, "killed");
    }
    assert!(sandbox.scratch_entries().is_empty(), "removed after a kill");

    let scratch = |spec: &mut WasmSpec| spec.scratch = true;
    succeeded(sandbox.run(&fixtures::open_file(), scratch).await);
    assert!(
        sandbox.scratch_entries().is_empty(),
        "removed after success"
    );
    failed(sandbox.run(&fixtures::exit_with(3), scratch).await);
    assert!(
        sandbox.scratch_entries().is_empty(),
        "removed after failure"
    );
    failed(sandbox.run(&fixtures::trap(), scratch).await);
    assert!(sandbox.scratch_entries().is_empty(), "removed after a trap");
    let spec = WasmSpec {
        module: spin.clone(),
        scratch: true,
        ..WasmSpec::default()
    };
    let (error, _, _) = failed(sandbox.run_spec(&spec, Duration::from_millis(300)).await);
    assert_eq!(error, "killed");
    assert!(
        sandbox.scratch_entries().is_empty(),
        "removed after a timeout"
    );
}

#[tokio::test]
async fn scratch_left_by_a_crash_is_wiped_at_start() {
    let sandbox = Sandbox::new();
    let root = sandbox.runtime.scratch_root().to_path_buf();
    // What a process killed mid-run leaves: a job's directory with a file.
    let left = root.join("job-0123456789abcdef0123456789abcdef");
    std::fs::create_dir(&left).unwrap();
    std::fs::write(left.join("secret"), "tenant a's data").unwrap();
    std::fs::write(root.join("stray-file"), "x").unwrap();
    let restarted = sandbox.restart(|_| {});
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    let spec = WasmSpec {
        module: sandbox.push(&fixtures::open_file()).await,
        scratch: true,
        ..WasmSpec::default()
    };
    succeeded(restarted.run(&spec, &CancellationToken::new()).await);
    assert!(!left.exists());
}

#[tokio::test]
async fn symlinks_cannot_lead_out_of_scratch() {
    let sandbox = Sandbox::new();
    let outside = sandbox.root.join("outside");
    std::fs::write(&outside, "host file").unwrap();
    let targets = [
        outside.to_str().unwrap().to_string(),
        "../outside".to_string(),
        "../../outside".to_string(),
        "/etc/passwd".to_string(),
    ];
    // An absolute target is refused when the link is made; a relative one
    // that climbs out is made, but following it is refused.
    let expect = [1, 2, 2, 1];
    for (target, expect) in targets.iter().zip(expect) {
        let end = sandbox
            .run(&fixtures::symlink_out(target), |spec| spec.scratch = true)
            .await;
        let (error, result, _) = failed(end);
        assert_eq!(result.unwrap().exit_code, expect, "{target}: {error}");
    }
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "host file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_runs_compile_once() {
    let sandbox = Arc::new(Sandbox::new());
    let id = sandbox.push(&fixtures::echo()).await;
    let runs: Vec<_> = (0..16)
        .map(|i| {
            let sandbox = sandbox.clone();
            let spec = WasmSpec {
                module: id.clone(),
                stdin: format!("run {i}"),
                ..WasmSpec::default()
            };
            tokio::spawn(async move {
                let result = succeeded(sandbox.run_spec(&spec, Duration::from_secs(60)).await);
                assert_eq!(result.stdout, format!("run {i}"));
            })
        })
        .collect();
    for run in runs {
        run.await.unwrap();
    }
    let stats = sandbox.runtime.cache_stats();
    assert_eq!(stats.compiles, 1, "{stats:?}");
    assert_eq!(stats.disk_files, 1, "{stats:?}");
    let partial = std::fs::read_dir(sandbox.root.join("cache"))
        .unwrap()
        .filter(|e| {
            !e.as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with(".cwasm")
        })
        .count();
    assert_eq!(partial, 0, "only complete artefacts stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtimes_sharing_a_cache_never_load_a_torn_artefact() {
    let sandbox = Sandbox::new();
    let id = sandbox.push(&fixtures::echo()).await;
    // Several processes' worth of runtimes compile the same new module at
    // once into one cache directory.
    let runtimes: Vec<_> = (0..4)
        .map(|i| sandbox.restart(|c| c.scratch_dir = sandbox.root.join(format!("s{i}"))))
        .collect();
    let loads: Vec<_> = runtimes
        .iter()
        .map(|runtime| {
            let (runtime, id) = (runtime.clone(), id.clone());
            tokio::spawn(async move { runtime.prepare(&id).await })
        })
        .collect();
    for load in loads {
        load.await.unwrap().unwrap();
    }
    // What a process stopped mid-write leaves: a partial file, removed at
    // start and never loaded.
    let cache = sandbox.root.join("cache");
    let artefact = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let partial = artefact.with_extension("0123456789abcdef.partial");
    std::fs::write(&partial, b"torn").unwrap();
    // A runtime with no blobs can run it only from the artefact on disk.
    let from_disk = WasmRuntime::new(
        WasmConfig {
            cache_dir: Some(sandbox.root.join("cache")),
            scratch_dir: sandbox.root.join("s-disk"),
            max_instances: 8,
            ..WasmConfig::default()
        },
        BlobStore::local(&sandbox.root.join("empty")).unwrap(),
    )
    .unwrap();
    let spec = WasmSpec {
        module: id,
        stdin: "intact".into(),
        ..WasmSpec::default()
    };
    let result = succeeded(from_disk.run(&spec, &CancellationToken::new()).await);
    assert_eq!(result.stdout, "intact");
    assert_eq!(from_disk.cache_stats().compiles, 0);
    assert!(!partial.exists());
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
}

#[tokio::test]
async fn module_caches_evict_past_their_bounds() {
    // One module's compiled size in memory and on disk.
    let probe = Sandbox::new();
    probe
        .runtime
        .prepare(&probe.push(&fixtures::exit_with(100)).await)
        .await
        .unwrap();
    let one = probe.runtime.cache_stats();
    assert_eq!((one.memory_modules, one.disk_files), (1, 1));
    let sandbox = Sandbox::with(|config| {
        config.memory_cache_bytes = one.memory_bytes * 2 + one.memory_bytes / 2;
        config.disk_cache_bytes = one.disk_bytes * 2 + one.disk_bytes / 2;
    });
    for code in 1..=5 {
        let (error, _, _) = failed(sandbox.run(&fixtures::exit_with(code), |_| {}).await);
        assert_eq!(error, format!("exit code {code}"));
    }
    let stats = sandbox.runtime.cache_stats();
    assert_eq!(stats.compiles, 5);
    assert_eq!(stats.memory_modules, 2, "{stats:?}");
    assert_eq!(stats.disk_files, 2, "{stats:?}");
    assert!(stats.memory_bytes <= one.memory_bytes * 2 + one.memory_bytes / 2);
    assert!(stats.disk_bytes <= one.disk_bytes * 2 + one.disk_bytes / 2);
    // The most recent module is still cached; the first must be compiled again.
    failed(sandbox.run(&fixtures::exit_with(5), |_| {}).await);
    assert_eq!(sandbox.runtime.cache_stats().compiles, 5);
    failed(sandbox.run(&fixtures::exit_with(1), |_| {}).await);
    assert_eq!(sandbox.runtime.cache_stats().compiles, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_long_compile_returns_at_once() {
    let sandbox = Arc::new(Sandbox::new());
    let spec = WasmSpec {
        module: sandbox.push(&fixtures::slow_to_compile(400)).await,
        ..WasmSpec::default()
    };
    let kill = CancellationToken::new();
    let run = tokio::spawn({
        let (sandbox, spec, kill) = (sandbox.clone(), spec.clone(), kill.clone());
        async move { sandbox.runtime.run(&spec, &kill).await }
    });
    // Wait until the compile has begun, then kill.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sandbox.runtime.cache_stats().compiles == 0 {
        assert!(Instant::now() < deadline, "the compile never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill.cancel();
    let (error, result, permanent) = failed(run.await.unwrap());
    assert_eq!(error, "killed");
    assert!(result.is_none() && !permanent);
    // The run returned while the compile was still going.
    assert_eq!(sandbox.runtime.cache_stats().memory_modules, 0);
    // The compile finishes for the next run, which does not compile again.
    succeeded(sandbox.run_spec(&spec, Duration::from_secs(600)).await);
    assert_eq!(sandbox.runtime.cache_stats().compiles, 1);
}

/// Inputs of an earlier job of the tenant are placed under `/scratch`
/// before the guest starts; declared outputs are kept in the blob store
/// under the job once it succeeds. Another tenant naming the same job gets
/// nothing.
#[tokio::test]
async fn job_files_go_in_and_come_out() {
    use kiln_core::files::{blob_key, FileInput};
    let sandbox = Sandbox::new();
    sandbox
        .blobs
        .put(
            &blob_key("acme", 5, "in.txt"),
            Bytes::from_static(b"from job 5"),
        )
        .await
        .unwrap();
    let spec = WasmSpec {
        module: sandbox.push(&fixtures::cat_to("a/b.txt", "out.txt")).await,
        inputs: vec![FileInput {
            job: 5,
            path: "in.txt".into(),
            to: Some("a/b.txt".into()),
        }],
        outputs: vec!["out.txt".into()],
        ..WasmSpec::default()
    };
    let result = succeeded(sandbox.run_job("acme", 9, &spec).await);
    assert_eq!(result.stdout, "from job 5");
    assert_eq!(result.files.len(), 1, "{result:?}");
    assert_eq!(result.files[0].path, "out.txt");
    assert_eq!(result.files[0].size, 10);
    assert_eq!(result.files[0].digest, content_id(b"from job 5"));
    let kept = sandbox
        .blobs
        .get(&blob_key("acme", 9, "out.txt"))
        .await
        .unwrap();
    assert_eq!(&kept[..], b"from job 5");

    // Nothing to retry: the input does not exist for this tenant.
    let (error, _, permanent) = failed(sandbox.run_job("globex", 10, &spec).await);
    assert!(error.contains("input in.txt of job 5"), "{error}");
    assert!(permanent, "a missing input is not retried");
    assert!(!sandbox
        .blobs
        .exists(&blob_key("globex", 10, "out.txt"))
        .await
        .unwrap());
    assert!(sandbox.scratch_entries().is_empty());
}

/// An output is read only as a regular file reached through real
/// directories: a symlink the guest made (here one climbing out of its
/// directory to a host file) fails the attempt and nothing is kept; an
/// output never written fails it too.
#[tokio::test]
async fn outputs_never_follow_a_symlink() {
    let sandbox = Sandbox::new();
    std::fs::write(sandbox.root.join("outside"), "host file").unwrap();
    for target in ["../outside", "../../outside", "../../../outside"] {
        let spec = WasmSpec {
            module: sandbox.push(&fixtures::symlink_to(target)).await,
            outputs: vec!["link".into()],
            ..WasmSpec::default()
        };
        let (error, result, _) = failed(sandbox.run_job("acme", 11, &spec).await);
        assert_eq!(result.map(|r| r.exit_code), Some(0), "{target}: {error}");
        assert!(error.contains("not a regular file"), "{target}: {error}");
    }
    let key = kiln_core::files::blob_key("acme", 11, "link");
    assert!(!sandbox.blobs.exists(&key).await.unwrap());
    let spec = WasmSpec {
        module: sandbox.push(&fixtures::hello()).await,
        outputs: vec!["never.txt".into()],
        ..WasmSpec::default()
    };
    let (error, _, _) = failed(sandbox.run_job("acme", 12, &spec).await);
    assert!(
        error.contains("output never.txt was not produced"),
        "{error}"
    );
}
