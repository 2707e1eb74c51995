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
        let root = std::env::temp_dir().join(kiln_db_free_name());
        let blobs = BlobStore::local(&root.join("blobs")).unwrap();
        let config = WasmConfig {
            cache_dir: Some(root.join("cache")),
            scratch_dir: root.join("scratch"),
            max_instances: 64,
            ..WasmConfig::default()
        };
        let runtime = WasmRuntime::new(config, blobs.clone()).unwrap();
        Sandbox {
            runtime,
            blobs,
            root,
        }
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

fn kiln_db_free_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "kiln-wasm-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
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
async fn infinite_loop_is_killed_on_time() {
    let sandbox = Sandbox::new();
    let spec = WasmSpec {
        module: sandbox.push(&fixtures::spin()).await,
        ..WasmSpec::default()
    };
    let started = Instant::now();
    let (error, _, _) = failed(sandbox.run_spec(&spec, Duration::from_millis(200)).await);
    let took = started.elapsed();
    assert_eq!(error, "killed");
    assert!(took < Duration::from_millis(300), "took {took:?}");
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
            scratch_dir: sandbox.root.join("scratch"),
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
