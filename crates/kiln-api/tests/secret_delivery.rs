//! Secrets delivered to sandboxes, with real wasm, real VMs and both
//! databases: the file is there with its value and mode while the sandbox
//! runs and gone after; output that prints a value is stored redacted
//! (results, live logs, execution history); the value is in no column of
//! either database in clear; each delivery is audited; names the tenant
//! lacks are refused at submit; a worker without the master key fails the
//! job saying so.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{error_code, finished, harness, Harness};
use kiln_core::secrets::{MasterKey, KEY_BYTES};
use kiln_worker::secrets::SecretKeeper;
use serde_json::{json, Value};
use sha2::Digest;

kiln_db::on_both_databases!(
    a_wasm_job_reads_its_secret_and_its_output_is_stored_redacted,
    names_the_tenant_lacks_are_refused_at_submit,
    a_worker_without_the_master_key_fails_the_job_cleanly,
    a_vm_job_reads_its_secret_file_and_its_output_is_redacted,
);

fn value() -> String {
    format!("kiln-s3cret-{:016x}", rand::random::<u64>())
}

/// The harness with a master key for the API and the wasm worker.
async fn with_secrets(db: kiln_db::Db, worker_key: bool) -> (Harness, MasterKey) {
    let mut h = harness(db).await;
    h.start_logs();
    let master = MasterKey::new([7; KEY_BYTES]);
    h.state.master_key.set(master.clone()).unwrap();
    let keeper = SecretKeeper::new(h.db.clone(), worker_key.then(|| master.clone()));
    h.state.wasm.as_ref().unwrap().attach_secrets(keeper);
    (h, master)
}

async fn put_secret(h: &Harness, key: &str, name: &str, value: &str) {
    let (status, body) = h
        .raw(
            "PUT",
            &format!("/api/v1/secrets/{name}"),
            Some(key),
            "application/octet-stream",
            value.to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// The `secret.read` records of the tenant (chained or not yet).
async fn reads(h: &Harness) -> Vec<Value> {
    let (status, page) = h
        .call("GET", "/api/v1/audit?action=secret.read", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["records"].as_array().unwrap().clone()
}

/// Every live-log line of a job.
async fn job_log(h: &Harness, job: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows = kiln_db::testing::text_rows(
            &h.db,
            &format!("SELECT text FROM log_chunks WHERE job_id = {job} ORDER BY seq"),
        )
        .await
        .unwrap();
        let text = rows.concat();
        if !text.is_empty() || std::time::Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole database as bytes: the SQLite file (and its WAL), or a
/// `pg_dump` of the test's schema.
async fn whole_database(db: &kiln_db::Db) -> Vec<u8> {
    match db.backend() {
        "sqlite" => {
            let file = kiln_db::testing::text_rows(
                db,
                "SELECT file FROM pragma_database_list WHERE name = 'main'",
            )
            .await
            .unwrap()
            .remove(0);
            let mut bytes = std::fs::read(&file).unwrap();
            bytes.extend(std::fs::read(format!("{file}-wal")).unwrap_or_default());
            bytes
        }
        _ => {
            let schema = kiln_db::testing::text_rows(db, "SELECT current_schema()")
                .await
                .unwrap()
                .remove(0);
            let url = kiln_db::testing::postgres_url();
            let out = std::process::Command::new("pg_dump")
                .args(["--dbname", &url, "--schema", &schema])
                .output()
                .expect("pg_dump runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

async fn a_wasm_job_reads_its_secret_and_its_output_is_stored_redacted(db: kiln_db::Db) {
    let (h, _) = with_secrets(db, true).await;
    let secret = value();
    put_secret(&h, &h.admin, "token", &secret).await;
    let cat = h.push(&kiln_wasm::fixtures::cat("token")).await;
    let job = h
        .submit(json!({"kind": "wasm", "spec": {"module": cat, "secrets": ["token"]}}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let job = h.wait(&id, finished).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // The module printed the file: exactly the value, so exactly the mark.
    assert_eq!(job["result"]["stdout"], "[redacted:token]", "{job}");
    assert_eq!(job["spec"]["secrets"], json!(["token"]));
    let log = job_log(&h, &id).await;
    assert_eq!(log, "[redacted:token]");
    // The run's directory went with it.
    let root = h.state.wasm.as_ref().unwrap().secrets_root().to_path_buf();
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);

    // Read-only: the guest cannot add a file beside it.
    let create = h.push(&kiln_wasm::fixtures::create("more")).await;
    let job = h
        .submit(
            json!({"kind": "wasm", "spec": {"module": create, "secrets": ["token"]},
                       "max_attempts": 1}),
        )
        .await;
    let job = h.wait(job["id"].as_str().unwrap(), finished).await;
    assert_ne!(job["result"]["exit_code"], 0, "{job}");
    // Without asking, no directory at all.
    let job = h
        .submit(json!({"kind": "wasm", "spec": {"module": cat}, "max_attempts": 1}))
        .await;
    let job = h.wait(job["id"].as_str().unwrap(), finished).await;
    assert_eq!(job["result"]["exit_code"], 1, "{job}");

    // Each delivery is on the trail, named by job, never valued.
    let records = reads(&h).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["actor_kind"], "job");
    assert_eq!(records[0]["actor"], id.as_str());
    assert_eq!(records[0]["resource"], "/api/v1/secrets/token");
    assert_eq!(records[0]["outcome"], "ok");
    let (_, events) = h
        .call("GET", "/api/v1/events?after=0", &h.admin, None)
        .await;
    assert!(!events.to_string().contains(&secret));
    let stored = whole_database(&h.db).await;
    assert!(
        contains(&stored, "[redacted:token]"),
        "the output was stored"
    );
    assert!(!contains(&stored, &secret), "the value is stored in clear");
    h.stop().await;
}

async fn names_the_tenant_lacks_are_refused_at_submit(db: kiln_db::Db) {
    let (h, _) = with_secrets(db, true).await;
    put_secret(&h, &h.other, "theirs", &value()).await;
    put_secret(&h, &h.admin, "ours", &value()).await;
    let cat = h.push(&kiln_wasm::fixtures::cat("ours")).await;
    // Another tenant's secret is as unknown as one nobody has.
    for name in ["nope", "theirs"] {
        let (status, body) = h
            .call(
                "POST",
                "/api/v1/jobs",
                &h.admin,
                Some(json!({"kind": "wasm", "spec": {"module": cat, "secrets": ["ours", name]}})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(error_code(&body), "unknown_secret");
        assert!(body["error"]["message"].as_str().unwrap().contains(name));
    }
    for (spec, says) in [
        (json!({"module": cat, "secrets": ["../x"]}), "secrets[0]"),
        (json!({"module": cat, "secrets": ["a", "a"]}), "twice"),
        (
            json!({"module": cat, "secrets": (0..33).map(|i| format!("s{i}")).collect::<Vec<_>>()}),
            "at most 32",
        ),
    ] {
        let (status, body) = h
            .call(
                "POST",
                "/api/v1/jobs",
                &h.admin,
                Some(json!({"kind": "wasm", "spec": spec})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body.to_string().contains(says), "{body}");
    }
    // A kind that takes no secrets refuses the field.
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &h.admin,
            Some(json!({"kind": "noop", "spec": {"secrets": ["ours"]}})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // Pipelines and schedules are checked when written.
    let pipeline = |secret: &str| {
        json!({"name": "p", "steps": [{"id": "a", "kind": "wasm",
            "spec": {"module": cat}, "secrets": [secret]}]})
    };
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/pipelines",
            &h.admin,
            Some(pipeline("nope")),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "unknown_secret");
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/pipelines",
            &h.admin,
            Some(pipeline("ours")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let schedule = |secret: &str| {
        json!({"name": "s", "cron": "0 3 * * *", "target": {"job": {"kind": "wasm",
            "spec": {"module": cat, "secrets": [secret]}}}})
    };
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/schedules",
            &h.admin,
            Some(schedule("theirs")),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "unknown_secret");
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/schedules",
            &h.admin,
            Some(schedule("ours")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // A pipeline step's secrets reach its job's spec (names only) and its
    // sandbox.
    let (status, run) = h
        .call(
            "POST",
            "/api/v1/pipelines/p/runs",
            &h.admin,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let run_id = run["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let run = loop {
        let (_, run) = h
            .call("GET", &format!("/api/v1/runs/{run_id}"), &h.admin, None)
            .await;
        if run["status"] == "succeeded" || run["status"] == "failed" {
            break run;
        }
        assert!(std::time::Instant::now() < deadline, "{run}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(run["status"], "succeeded", "{run}");
    let column = |name: &str| {
        let sql = format!("SELECT {name} FROM jobs WHERE run_id = {run_id}");
        let db = h.db.clone();
        async move {
            let rows = kiln_db::testing::text_rows(&db, &sql).await.unwrap();
            assert_eq!(rows.len(), 1, "{rows:?}");
            serde_json::from_str::<Value>(&rows[0]).unwrap()
        }
    };
    assert_eq!(column("spec").await["secrets"], json!(["ours"]));
    assert_eq!(column("result").await["stdout"], "[redacted:ours]");
    h.stop().await;
}

async fn a_worker_without_the_master_key_fails_the_job_cleanly(db: kiln_db::Db) {
    let (h, _) = with_secrets(db, false).await;
    put_secret(&h, &h.admin, "token", &value()).await;
    let cat = h.push(&kiln_wasm::fixtures::cat("token")).await;
    let job = h
        .submit(
            json!({"kind": "wasm", "spec": {"module": cat, "secrets": ["token"]},
                       "max_attempts": 1}),
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let job = h.wait(&id, finished).await;
    assert_eq!(job["status"], "dead", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("no master key"),
        "{job}"
    );
    let records = reads(&h).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["actor"], id.as_str());
    assert_eq!(records[0]["outcome"], "no_master_key");
    h.stop().await;
}

/// The `vm` kind: the file is in the VM with its value and mode 0400, and
/// what the command prints of it (in pieces, a moment apart) is stored
/// redacted in the result, the live log and the execution history.
async fn a_vm_job_reads_its_secret_file_and_its_output_is_redacted(db: kiln_db::Db) {
    let (mut h, master) = with_secrets(db, true).await;
    let vms = h.start_vm_worker().await;
    vms.attach_secrets(SecretKeeper::new(h.db.clone(), Some(master)));
    vms.record_executions(h.db.clone());
    let secret = value();
    let digest = hex::encode(sha2::Sha256::digest(secret.as_bytes()));
    put_secret(&h, &h.admin, "token", &secret).await;
    let script =
        "f=/run/secrets/token; sha256sum $f; stat -c '%a %u' $f; stat -c %a /run/secrets; \
                  head -c 9 $f; sleep 0.5; tail -c +10 $f; echo";
    let (status, job) = h
        .call(
            "POST",
            "/api/v1/run",
            &h.admin,
            Some(
                json!({"kind": "vm", "spec": {"command": "sh", "args": ["-c", script],
                "secrets": ["token"]}, "timeout_ms": 120000}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    assert_eq!(job["status"], "succeeded", "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let stdout = job["result"]["stdout"].as_str().unwrap();
    assert_eq!(
        stdout,
        format!("{digest}  /run/secrets/token\n400 0\n700\n[redacted:token]\n")
    );
    let log = job_log(&h, &id).await;
    assert!(
        log.contains("[redacted:token]") && !log.contains(&secret),
        "{log}"
    );
    let heads = kiln_db::testing::text_rows(
        &h.db,
        &format!("SELECT stdout_head FROM vm_executions WHERE job_id = {id}"),
    )
    .await
    .unwrap();
    assert_eq!(heads, [stdout.to_string()]);
    let records = reads(&h).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["actor"], id.as_str());
    let stored = whole_database(&h.db).await;
    assert!(!contains(&stored, &secret), "the value is stored in clear");
    h.stop().await;
}

async fn call_app(
    app: &axum::Router,
    method: &str,
    path: &str,
    key: &str,
    body: Value,
) -> (StatusCode, Value) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let request = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A long-lived VM: a command's files are there for it alone and gone
/// for the next; a VM created with secrets keeps them for its life and
/// every command's output in it is redacted; API commands are audited as
/// read by the VM, queued ones by their job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_a_long_lived_vm() {
    let (mut h, master) = with_secrets(kiln_db::testing::sqlite_temp().await, true).await;
    let vms = h.start_vm_worker().await;
    vms.attach_secrets(SecretKeeper::new(h.db.clone(), Some(master.clone())));
    let state = kiln_api::AppState::with_vms(h.db.clone(), h.state.blobs.clone(), None, Some(vms));
    state.master_key.set(master).unwrap();
    let app = kiln_api::app(state.clone());
    let secret = value();
    let digest = hex::encode(sha2::Sha256::digest(secret.as_bytes()));
    put_secret(&h, &h.admin, "token", &secret).await;
    let (status, vm) = call_app(&app, "POST", "/api/v1/vms", &h.admin, json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let execute = format!("/api/v1/vms/{id}/execute");
    let sh = |script: &str, secrets: Value| json!({"command": "sh", "args": ["-c", script], "secrets": secrets});
    let (status, out) = call_app(
        &app,
        "POST",
        &execute,
        &h.admin,
        sh(
            "sha256sum /run/secrets/token; stat -c %a /run/secrets/token; cat /run/secrets/token",
            json!(["token"]),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(
        out["stdout"],
        format!("{digest}  /run/secrets/token\n400\n[redacted:token]")
    );
    // The next command finds nothing.
    let gone = "test -e /run/secrets/token; echo $?; ls /run/secrets | wc -l";
    let (_, out) = call_app(&app, "POST", &execute, &h.admin, sh(gone, json!([]))).await;
    assert_eq!(out["stdout"], "1\n0\n", "{out}");
    let (status, body) = call_app(
        &app,
        "POST",
        &execute,
        &h.admin,
        sh("true", json!(["nope"])),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "unknown_secret");
    // The same through the queue (`vm:execute`).
    let (status, job) = h
        .call("POST", "/api/v1/run", &h.admin, Some(json!({"kind": "vm:execute",
            "spec": {"vm_id": id, "command": "cat", "args": ["/run/secrets/token"], "secrets": ["token"]},
            "timeout_ms": 60000})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    assert_eq!(job["result"]["stdout"], "[redacted:token]", "{job}");
    let job_id = job["id"].as_str().unwrap().to_string();
    let (_, out) = call_app(&app, "POST", &execute, &h.admin, sh(gone, json!([]))).await;
    assert_eq!(out["stdout"], "1\n0\n", "{out}");
    // And over the exec WebSocket.
    let (stdout, texts) = websocket_exec(
        state.clone(),
        &id,
        &h.admin,
        sh(
            "head -c 5 /run/secrets/token; sleep 0.3; tail -c +6 /run/secrets/token",
            json!(["token"]),
        ),
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&stdout),
        "[redacted:token]",
        "{texts:?}"
    );
    assert_eq!(texts.last().unwrap()["type"], "exit", "{texts:?}");
    let (_, out) = call_app(&app, "POST", &execute, &h.admin, sh(gone, json!([]))).await;
    assert_eq!(out["stdout"], "1\n0\n", "{out}");
    // The history holds what the caller saw: redacted.
    let heads = kiln_db::testing::text_rows(
        &h.db,
        &format!("SELECT stdout_head FROM vm_executions WHERE vm_id = '{id}' ORDER BY id"),
    )
    .await
    .unwrap();
    assert!(
        heads.iter().all(|head| !head.contains(&secret)),
        "{heads:?}"
    );
    assert!(heads[0].ends_with("[redacted:token]"), "{heads:?}");

    // A VM created with the secret keeps it; a command that also asks for
    // it leaves it there when it ends.
    let (status, vm) = call_app(
        &app,
        "POST",
        "/api/v1/vms",
        &h.admin,
        json!({"secrets": ["token"]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    let kept = vm["id"].as_str().unwrap().to_string();
    let execute = format!("/api/v1/vms/{kept}/execute");
    let (_, out) = call_app(
        &app,
        "POST",
        &execute,
        &h.admin,
        sh("cat /run/secrets/token", json!(["token"])),
    )
    .await;
    assert_eq!(out["stdout"], "[redacted:token]", "{out}");
    let (_, out) = call_app(
        &app,
        "POST",
        &execute,
        &h.admin,
        sh("cat /run/secrets/token", json!([])),
    )
    .await;
    assert_eq!(out["stdout"], "[redacted:token]", "{out}");
    let (status, body) = call_app(
        &app,
        "POST",
        "/api/v1/vms",
        &h.admin,
        json!({"secrets": ["nope"]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    let records = reads(&h).await;
    let actors: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r["actor_kind"].as_str().unwrap().into(),
                r["actor"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        actors,
        [
            ("vm".to_string(), id.clone()),
            ("job".to_string(), job_id),
            ("vm".to_string(), id.clone()),
            ("vm".to_string(), kept.clone()),
            ("vm".to_string(), kept),
        ]
    );
    let stored = whole_database(&h.db).await;
    assert!(!contains(&stored, &secret), "the value is stored in clear");
    h.stop().await;
}

/// One command over the exec WebSocket: its stdout and the text messages.
async fn websocket_exec(
    state: std::sync::Arc<kiln_api::AppState>,
    vm: &str,
    key: &str,
    request: Value,
) -> (Vec<u8>, Vec<Value>) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let done = stop.clone();
    tokio::spawn(kiln_api::serve(listener, state, async move {
        done.cancelled().await
    }));
    let mut ws_request = format!("ws://{addr}/api/v1/vms/{vm}/exec/ws")
        .into_client_request()
        .unwrap();
    ws_request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let mut ws = tokio_tungstenite::connect_async(ws_request)
        .await
        .unwrap()
        .0;
    ws.send(Message::Text(request.to_string().into()))
        .await
        .unwrap();
    let (mut stdout, mut texts) = (Vec::new(), Vec::new());
    let collect = async {
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Binary(data) if data.first() == Some(&1) => {
                    stdout.extend_from_slice(&data[1..])
                }
                Message::Text(text) => texts.push(serde_json::from_str(&text).unwrap()),
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(90), collect)
        .await
        .expect("the socket closes");
    stop.cancel();
    (stdout, texts)
}
