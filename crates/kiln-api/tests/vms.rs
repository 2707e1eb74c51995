//! MicroVMs through the HTTP API and through the queue (`vm` jobs), with
//! real VMs. Routes run on SQLite; the queue kinds on both databases.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use kiln_api::AppState;
use kiln_blob::BlobStore;
use kiln_core::{Scope, Scopes};
use kiln_db::Db;
use kiln_vm::manager::probe_accelerator;
use kiln_vm::{testing, VmManager};
use kiln_worker::{Handlers, Worker, WorkerConfig};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

kiln_db::on_both_databases!(
    executions_are_recorded_and_outlive_the_vm,
    the_vm_kind_runs_a_command_in_a_fresh_vm,
    the_vm_tasks_create_execute_and_delete
);

struct Harness {
    db: Db,
    state: Arc<AppState>,
    app: Router,
    vms: Arc<VmManager>,
    key: String,
    other: String,
    reader: String,
    work: PathBuf,
}

async fn harness(db: Db) -> Harness {
    let image = testing::test_image().await;
    let work = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-api-vms"));
    let accelerator =
        probe_accelerator(image, &work, &testing::images_dir().join("accelerator")).await;
    let vms = VmManager::new(&testing::images_dir(), &work.join("vms"), accelerator).unwrap();
    let blobs = BlobStore::local(&work.join("blobs")).unwrap();
    let issue = |tenant: &'static str, scope: Scope| {
        let db = db.clone();
        async move {
            kiln_api::issue_key(&db, tenant, "t", Scopes(vec![scope]))
                .await
                .unwrap()
                .1
        }
    };
    let key = issue("acme", Scope::Write).await;
    let other = issue("globex", Scope::Write).await;
    let reader = issue("acme", Scope::Read).await;
    let state = AppState::with_vms(db.clone(), blobs, None, Some(vms.clone()));
    kiln_api::record_vm_lifecycle(db.clone(), &vms);
    Harness {
        app: kiln_api::app(state.clone()),
        db,
        state,
        vms,
        key,
        other,
        reader,
        work,
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.work.join("blobs"));
    }
}

async fn send(
    app: &Router,
    method: &str,
    path: &str,
    key: &str,
    content_type: &str,
    body: Body,
) -> (StatusCode, Vec<u8>) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", content_type)
        .body(body)
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, bytes.to_vec())
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    key: &str,
    body: Value,
) -> (StatusCode, Value) {
    let (status, bytes) = send(
        app,
        method,
        path,
        key,
        "application/json",
        Body::from(body.to_string()),
    )
    .await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

impl Harness {
    /// A new VM of the default shape for tenant acme.
    async fn boot(&self) -> String {
        let (status, vm) = call(
            &self.app,
            "POST",
            "/api/v1/vms",
            &self.key,
            json!({"labels": {"t": "1"}}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{vm}");
        vm["id"].as_str().unwrap().to_string()
    }

    async fn execute(&self, id: &str, body: Value) -> (StatusCode, Value) {
        call(
            &self.app,
            "POST",
            &format!("/api/v1/vms/{id}/execute"),
            &self.key,
            body,
        )
        .await
    }

    async fn sh(&self, id: &str, script: &str) -> Value {
        let (status, out) = self
            .execute(id, json!({"command": "sh", "args": ["-c", script]}))
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        out
    }

    /// Waits until the guest has written `file`.
    async fn wait_for_file(&self, id: &str, file: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.sh(id, &format!("test -s {file}")).await["exit_code"] != 0 {
            assert!(Instant::now() < deadline, "{file} never appeared");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the process whose pid is in `file` is gone from the
    /// guest: a command whose client left must not run on.
    async fn wait_until_gone(&self, id: &str, file: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.sh(id, &format!("kill -0 $(cat {file})")).await["exit_code"] == 0 {
            assert!(
                Instant::now() < deadline,
                "the command in {file} still runs"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The API on a real socket (WebSocket and disconnect tests).
    async fn listen(&self) -> (std::net::SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let done = stop.clone();
        tokio::spawn(kiln_api::serve(listener, self.state.clone(), async move {
            done.cancelled().await
        }));
        (addr, stop)
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn websocket(addr: std::net::SocketAddr, id: &str, key: &str) -> Socket {
    let mut request = format!("ws://{addr}/api/v1/vms/{id}/exec/ws")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// Everything the server sends until it closes: (stdout, stderr, text
/// messages), with a hang guard.
async fn drain(ws: &mut Socket) -> (Vec<u8>, Vec<u8>, Vec<Value>) {
    let (mut stdout, mut stderr, mut texts) = (Vec::new(), Vec::new(), Vec::new());
    let collect = async {
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Binary(data) => match data.first() {
                    Some(1) => stdout.extend_from_slice(&data[1..]),
                    Some(2) => stderr.extend_from_slice(&data[1..]),
                    other => panic!("output on stream {other:?}"),
                },
                Message::Text(text) => texts.push(serde_json::from_str(&text).unwrap()),
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(90), collect)
        .await
        .expect("the socket closes");
    (stdout, stderr, texts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_finds_no_vm_on_any_route() {
    let h = harness(kiln_db::testing::sqlite_temp().await).await;
    let id = h.boot().await;
    let vm = format!("/api/v1/vms/{id}");
    let (status, _) = call(&h.app, "GET", &vm, &h.other, Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        &h.app,
        "POST",
        &format!("{vm}/execute"),
        &h.other,
        json!({"command": "true"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(
        &h.app,
        "PUT",
        &format!("{vm}/files?path=/tmp/x"),
        &h.other,
        "application/octet-stream",
        Body::from("x"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(
        &h.app,
        "GET",
        &format!("{vm}/files?path=/etc/hostname"),
        &h.other,
        "",
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = call(
        &h.app,
        "GET",
        &format!("{vm}/exec/ws"),
        &h.other,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (_, list) = call(&h.app, "GET", "/api/v1/vms", &h.other, Value::Null).await;
    assert_eq!(list["vms"], json!([]));
    let (status, _) = call(&h.app, "DELETE", &vm, &h.other, Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // And over a real WebSocket handshake.
    let (addr, stop) = h.listen().await;
    let mut request = format!("ws://{addr}{vm}/exec/ws")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", h.other).parse().unwrap(),
    );
    assert!(tokio_tungstenite::connect_async(request).await.is_err());
    // The owner still has it, untouched.
    assert_eq!(h.sh(&id, "echo mine").await["stdout"], "mine\n");
    stop.cancel();
    assert!(h.vms.delete("acme", &id).await);
    // The VM's life is in its tenant's event log, and only there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let (status, page) = call(
            &h.app,
            "GET",
            "/api/v1/events?type=vm.*&after=0",
            &h.reader,
            Value::Null,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        if page["events"].as_array().unwrap().len() >= 2 || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seen: Vec<(&str, &str)> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["resource"]["id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("vm.created", id.as_str()), ("vm.deleted", id.as_str())]
    );
    let (_, theirs) = call(
        &h.app,
        "GET",
        "/api/v1/events?type=vm.*&after=0",
        &h.other,
        Value::Null,
    )
    .await;
    assert_eq!(theirs["events"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_and_files_through_the_api() {
    let h = harness(kiln_db::testing::sqlite_temp().await).await;
    let id = h.boot().await;
    let (status, out) = h
        .execute(
            &id,
            json!({"command": "sh", "args": ["-c", "echo hi; exit 3"], "timeout_ms": 5000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            out["stdout"].as_str(),
            out["exit_code"].as_i64(),
            out["truncated"].as_bool()
        ),
        (Some("hi\n"), Some(3), Some(false))
    );

    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let files = format!("/api/v1/vms/{id}/files");
    let (status, _) = send(
        &h.app,
        "PUT",
        &format!("{files}?path=/tmp/x.bin"),
        &h.key,
        "application/octet-stream",
        Body::from(data.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, back) = send(
        &h.app,
        "GET",
        &format!("{files}?path=/tmp/x.bin"),
        &h.key,
        "",
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(back, data);
    // A missing file is a 404; a relative path a 422; a directory the
    // guest cannot read as a file a 422 from the guest.
    let check = |path: &'static str, expect: StatusCode| {
        let (app, key, files) = (h.app.clone(), h.key.clone(), files.clone());
        async move {
            let (status, body) = send(
                &app,
                "GET",
                &format!("{files}?path={path}"),
                &key,
                "",
                Body::empty(),
            )
            .await;
            assert_eq!(status, expect, "{path}: {}", String::from_utf8_lossy(&body));
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert!(body["error"]["code"].is_string(), "{body}");
        }
    };
    check("/no/such/file", StatusCode::NOT_FOUND).await;
    check("tmp/x.bin", StatusCode::UNPROCESSABLE_ENTITY).await;
    check("/tmp", StatusCode::UNPROCESSABLE_ENTITY).await;
    let (status, _) = send(
        &h.app,
        "PUT",
        &format!("{files}?path=tmp/x"),
        &h.key,
        "application/octet-stream",
        Body::from("x"),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, body) = send(
        &h.app,
        "PUT",
        &format!("{files}?path=/tmp/big"),
        &h.key,
        "application/octet-stream",
        Body::from(vec![0u8; (16 << 20) + 1]),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        String::from_utf8_lossy(&body)
    );

    // Bad shapes are refused before anything boots.
    for body in [
        json!({"vcpus": 0}),
        json!({"image": "nope"}),
        json!({"image": "../x"}),
        json!({"image": "a'b"}),
        json!({"ttl_s": u64::MAX}),
        json!({"memory_mib": 1u64 << 40}),
        json!({"labels": {"k": "\u{0}"}}),
    ] {
        let (status, answer) = call(&h.app, "POST", "/api/v1/vms", &h.key, body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
    }
    let (status, _) = h
        .execute(&id, json!({"command": "true", "timeout_ms": u64::MAX}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Rejections of the path and of the upgrade speak kiln's error body.
    let (status, body) = call(
        &h.app,
        "GET",
        &format!("/api/v1/vms/{id}/exec/ws"),
        &h.key,
        Value::Null,
    )
    .await;
    assert!(status.is_client_error(), "{status}");
    assert_eq!(body["error"]["code"], "websocket_required", "{body}");
    let (status, body) = call(&h.app, "GET", "/api/v1/vms/%FF", &h.key, Value::Null).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");

    // The accelerator, live VMs and start times are in /metrics, which is
    // the deployment's: a system key reads it.
    let system = kiln_api::issue_key(&h.db, "default", "t", Scopes(vec![Scope::System]))
        .await
        .unwrap()
        .1;
    let (status, text) = send(
        &h.app,
        "GET",
        "/metrics",
        &system,
        "text/plain",
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("kiln_vm_accelerator{accelerator="), "{text}");
    assert!(text.contains("kiln_vm_start_seconds_count{how="), "{text}");

    let (status, _) = call(
        &h.app,
        "DELETE",
        &format!("/api/v1/vms/{id}"),
        &h.key,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, list) = call(&h.app, "GET", "/api/v1/vms", &h.key, Value::Null).await;
    assert_eq!(list["vms"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_caps_output_and_says_truncated() {
    let h = harness(kiln_db::testing::sqlite_temp().await).await;
    let id = h.boot().await;
    let out = h
        .sh(&id, "head -c 3000000 /dev/zero | tr '\\0' a; echo err >&2")
        .await;
    assert_eq!(
        out["stdout"].as_str().unwrap().len(),
        1 << 20,
        "capped at 1 MiB"
    );
    assert_eq!(
        (out["stderr"].as_str(), out["truncated"].as_bool()),
        (Some("err\n"), Some(true))
    );
    assert!(h.vms.delete("acme", &id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_answers_a_read_only_key_before_reading_the_body() {
    let h = harness(kiln_db::testing::sqlite_temp().await).await;
    // A body that never ends: answered at once, not read.
    let (_tx, rx) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let request = Request::builder()
        .method("PUT")
        .uri("/api/v1/vms/vm-1/files?path=/tmp/x")
        .header("authorization", format!("Bearer {}", h.reader))
        .body(Body::from_stream(rx))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), h.app.clone().oneshot(request))
        .await
        .expect("answered without the body")
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_that_leaves_takes_its_command_with_it() {
    let h = harness(kiln_db::testing::sqlite_temp().await).await;
    let id = h.boot().await;
    let (addr, stop) = h.listen().await;
    let body = json!({"command": "sh", "args": ["-c", "echo $$ > /tmp/http.pid; exec sleep 600"]})
        .to_string();
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /api/v1/vms/{id}/execute HTTP/1.1\r\nhost: kiln\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        h.key,
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    h.wait_for_file(&id, "/tmp/http.pid").await;
    drop(client);
    h.wait_until_gone(&id, "/tmp/http.pid").await;
    stop.cancel();
    assert!(h.vms.delete("acme", &id).await);
    // Its record says so.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let runs = all_executions(&h, &id).await;
        let left = runs
            .iter()
            .find(|r| r["args"][1] == "echo $$ > /tmp/http.pid; exec sleep 600")
            .expect("the command that was left is recorded");
        if left["status"] == "abandoned" {
            assert!(left["finished_at"].is_string(), "{left}");
            break;
        }
        assert!(Instant::now() < deadline, "never abandoned: {left}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every execution of a VM, newest first, page by page.
async fn all_executions(h: &Harness, id: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut path = format!("/api/v1/vms/{id}/executions?limit=100");
    loop {
        let (status, page) = call(&h.app, "GET", &path, &h.reader, Value::Null).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        all.extend(page["executions"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/vms/{id}/executions?limit=100&before={cursor}"),
            None => return all,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_exec_is_binary_safe() {
    let h = harness(kiln_db::testing::sqlite_temp().await).await;
    let id = h.boot().await;
    let (addr, stop) = h.listen().await;
    let mut ws = websocket(addr, &id, &h.key).await;
    ws.send(Message::Text(
        json!({"command": "sh", "args": ["-c", "cat; echo done >&2; exit 4"]})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    // Bytes that are not UTF-8, and a multibyte character split across
    // two messages.
    let typed: Vec<u8> = [&b"\xff\x00\xfe typed \xe2\x82"[..]].concat();
    ws.send(Message::Binary(typed.clone().into()))
        .await
        .unwrap();
    ws.send(Message::Text(
        json!({"stdin": "\u{ac} input", "eof": true})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let (stdout, stderr, texts) = drain(&mut ws).await;
    assert_eq!(stdout, [&typed[..], "\u{ac} input".as_bytes()].concat());
    assert_eq!(stderr, b"done\n");
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!(
        (texts[0]["type"].as_str(), texts[0]["exit_code"].as_i64()),
        (Some("exit"), Some(4))
    );
    stop.cancel();
    assert!(h.vms.delete("acme", &id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_client_that_leaves_or_oversends_kills_its_command() {
    let h = harness(kiln_db::testing::sqlite_temp().await).await;
    let id = h.boot().await;
    let (addr, stop) = h.listen().await;
    let start = |file: &str| {
        Message::Text(
            json!({"command": "sh", "args": ["-c", format!("echo $$ > {file}; exec sleep 600")]})
                .to_string()
                .into(),
        )
    };

    let mut ws = websocket(addr, &id, &h.key).await;
    ws.send(start("/tmp/left.pid")).await.unwrap();
    h.wait_for_file(&id, "/tmp/left.pid").await;
    drop(ws);
    h.wait_until_gone(&id, "/tmp/left.pid").await;

    // A message past the bound is refused: the socket ends, and so does
    // the command.
    let mut ws = websocket(addr, &id, &h.key).await;
    ws.send(start("/tmp/big.pid")).await.unwrap();
    h.wait_for_file(&id, "/tmp/big.pid").await;
    let _ = ws.send(Message::Binary(vec![7u8; 2 << 20].into())).await;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Close(_) = message {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the server ends the socket");
    h.wait_until_gone(&id, "/tmp/big.pid").await;
    stop.cancel();
    assert!(h.vms.delete("acme", &id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ends_once_when_the_vm_goes_and_without_a_first_message() {
    let h = harness(kiln_db::testing::sqlite_temp().await).await;
    let id = h.boot().await;
    let (addr, stop) = h.listen().await;

    // No exec request: closed after the first-message timeout, with one
    // error that says why.
    let mut idle = websocket(addr, &id, &h.key).await;
    let (_, _, texts) = drain(&mut idle).await;
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!(texts[0]["type"], "error");

    let mut ws = websocket(addr, &id, &h.key).await;
    ws.send(Message::Text(
        json!({"command": "sh", "args": ["-c", "echo up; exec sleep 600"]})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(60), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        Message::Binary([&[1u8][..], b"up\n"].concat().into())
    );
    assert!(h.vms.delete("acme", &id).await);
    let (_, _, texts) = drain(&mut ws).await;
    assert_eq!(texts.len(), 1, "one error, not a flood: {texts:?}");
    assert_eq!(texts[0]["type"], "error");
    stop.cancel();
}

/// The VM a `vm` job ran in, from its `vm.created` event.
async fn vm_of_job(h: &Harness, job_id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, page) = call(
            &h.app,
            "GET",
            "/api/v1/events?type=vm.created&after=0",
            &h.reader,
            Value::Null,
        )
        .await;
        let found = page["events"].as_array().unwrap().iter().find_map(|e| {
            (e["labels"]["job"] == job_id)
                .then(|| e["resource"]["id"].as_str().unwrap().to_string())
        });
        if let Some(id) = found {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "no vm.created for job {job_id}: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A VM's executions as the reader sees them, once none is `running`: the
/// end of a WebSocket exec is written just after the socket closes.
async fn settled_executions(h: &Harness, id: &str, want: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, list) = call(
            &h.app,
            "GET",
            &format!("/api/v1/vms/{id}/executions"),
            &h.reader,
            Value::Null,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{list}");
        let runs = list["executions"].as_array().unwrap();
        if runs.len() == want && runs.iter().all(|r| r["status"] != "running") {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "executions never settled: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every command run through the API or a WebSocket leaves a row: newest
/// first, paged, with its outcome and output head but no env values or
/// stdin, invisible to another tenant, and still there once the VM is gone.
async fn executions_are_recorded_and_outlive_the_vm(db: Db) {
    let h = harness(db).await;
    // Commands' output also goes to the live logs.
    let (logs, _writer) = kiln_logs::LogSink::start(
        h.db.clone(),
        Some(h.state.blobs.clone()),
        kiln_logs::LogConfig {
            flush_every: Duration::from_millis(20),
            ..kiln_logs::LogConfig::new("test-node")
        },
        CancellationToken::new(),
    );
    h.vms.attach_logs(logs);
    let id = h.boot().await;
    let (status, out) = h
        .execute(
            &id,
            json!({"command": "sh", "args": ["-c", "echo hi; echo err >&2; cat >/dev/null; exit 3"],
                "env": {"API_TOKEN": "s3cr3t-value"}, "stdin": "stdin-secret", "cwd": "/tmp"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["exit_code"], 3);

    let (addr, stop) = h.listen().await;
    let mut ws = websocket(addr, &id, &h.key).await;
    ws.send(Message::Text(
        json!({"command": "sh", "args": ["-c", "echo ws-out; kill -TERM $$"]})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let (stdout, _, texts) = drain(&mut ws).await;
    assert_eq!(stdout, b"ws-out\n");
    assert_eq!(texts[0]["signal"], 15, "{texts:?}");

    let list = settled_executions(&h, &id, 2).await;
    let runs = list["executions"].as_array().unwrap();
    let (ws_run, api_run) = (&runs[0], &runs[1]);
    assert_eq!(ws_run["source"], "websocket", "newest first: {list}");
    assert_eq!(ws_run["status"], "exited");
    assert_eq!(ws_run["signal"], 15);
    assert_eq!(ws_run["exit_code"], 128 + 15);
    assert_eq!(ws_run["stdout_bytes"], 7);
    assert_eq!(api_run["source"], "api");
    assert_eq!(api_run["exit_code"], 3);
    assert_eq!(api_run["command"], "sh");
    assert_eq!(api_run["cwd"], "/tmp");
    assert_eq!(api_run["env_names"], json!(["API_TOKEN"]));
    assert_eq!(api_run["stdout_bytes"], 3);
    assert_eq!(api_run["stderr_bytes"], 4);
    assert_eq!(api_run["actor"], ws_run["actor"]);
    assert!(!api_run["actor"].as_str().unwrap().is_empty());
    for run in runs {
        assert!(run["duration_ms"].as_i64().unwrap() >= 0, "{run}");
        assert!(run["finished_at"].is_string(), "{run}");
        assert!(run.get("stdout_head").is_none(), "pages carry no output");
    }
    assert!(list["next_cursor"].is_null());

    let one = format!(
        "/api/v1/vms/{id}/executions/{}",
        api_run["id"].as_str().unwrap()
    );
    let (status, detail) = call(&h.app, "GET", &one, &h.reader, Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["stdout_head"], "hi\n");
    assert_eq!(detail["stderr_head"], "err\n");
    let text = detail.to_string();
    assert!(
        !text.contains("s3cr3t-value") && !text.contains("stdin-secret"),
        "{text}"
    );
    // Both commands' output is in the live logs under the VM, each chunk
    // naming its execution; another tenant reads none of it.
    let (status, page) = call(
        &h.app,
        "GET",
        &format!("/api/v1/logs?vm={id}"),
        &h.reader,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let lines = page["lines"].as_array().unwrap();
    let of = |exec: &Value, stream: &str| -> String {
        lines
            .iter()
            .filter(|l| l["exec"] == *exec && l["stream"] == stream)
            .map(|l| l["text"].as_str().unwrap())
            .collect()
    };
    assert_eq!(of(&api_run["id"], "stdout"), "hi\n", "{page}");
    assert_eq!(of(&api_run["id"], "stderr"), "err\n", "{page}");
    assert_eq!(of(&ws_run["id"], "stdout"), "ws-out\n", "{page}");
    assert!(lines
        .iter()
        .all(|l| l["source"] == "vm" && l["vm"] == id.as_str()));
    let (_, page) = call(
        &h.app,
        "GET",
        &format!("/api/v1/logs?vm={id}"),
        &h.other,
        Value::Null,
    )
    .await;
    assert_eq!(page["lines"], json!([]));

    // Paging: one at a time, newest first.
    let (_, first) = call(
        &h.app,
        "GET",
        &format!("/api/v1/vms/{id}/executions?limit=1"),
        &h.reader,
        Value::Null,
    )
    .await;
    assert_eq!(first["executions"][0]["id"], ws_run["id"]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = call(
        &h.app,
        "GET",
        &format!("/api/v1/vms/{id}/executions?limit=1&before={cursor}"),
        &h.reader,
        Value::Null,
    )
    .await;
    assert_eq!(second["executions"][0]["id"], api_run["id"]);
    for bad in ["limit=0", "limit=101", "before=x", "after=1"] {
        let (status, body) = call(
            &h.app,
            "GET",
            &format!("/api/v1/vms/{id}/executions?{bad}"),
            &h.reader,
            Value::Null,
        )
        .await;
        assert!(status.is_client_error(), "{bad}: {status}");
        assert!(body["error"]["code"].is_string(), "{bad}: {body}");
    }

    // Another tenant: no VM, no execution.
    let (status, _) = call(
        &h.app,
        "GET",
        &format!("/api/v1/vms/{id}/executions"),
        &h.other,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&h.app, "GET", &one, &h.other, Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        &h.app,
        "GET",
        "/api/v1/vms/nosuchvm/executions",
        &h.reader,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        &h.app,
        "GET",
        &format!("/api/v1/vms/{id}/executions/999999"),
        &h.reader,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The history outlives the VM.
    stop.cancel();
    assert!(h.vms.delete("acme", &id).await);
    let after = settled_executions(&h, &id, 2).await;
    assert_eq!(after["executions"], list["executions"]);
    let (status, _) = call(&h.app, "GET", &one, &h.reader, Value::Null).await;
    assert_eq!(status, StatusCode::OK);
}

async fn start_worker(h: &Harness) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut config = WorkerConfig::new(&kiln_db::testing::unique_name("w"));
    config.poll_every = Duration::from_millis(200);
    let stop = CancellationToken::new();
    let handlers = kiln_vm::job::register(Handlers::new(), &h.vms, &h.state.blobs);
    let worker = tokio::spawn(Worker::new(h.db.clone(), handlers, config).run(stop.clone()));
    (stop, worker)
}

/// The `vm` kind: a fresh VM per job, gone afterwards, whether the command
/// ends or the job times out.
async fn the_vm_kind_runs_a_command_in_a_fresh_vm(db: Db) {
    let h = harness(db).await;
    let (stop, worker) = start_worker(&h).await;
    let (status, job) = call(&h.app, "POST", "/api/v1/run", &h.key,
        json!({"kind": "vm", "spec": {"command": "sh", "args": ["-c", "echo in-vm; exit 7"]}, "timeout_ms": 60000})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(job["status"], "dead", "{job}");
    assert_eq!(job["result"]["exit_code"], 7);
    assert_eq!(job["result"]["stdout"], "in-vm\n");
    let job_id = job["id"].as_str().unwrap().to_string();
    // The job's VM is gone; its command stays in the history, under the
    // VM the event log names for the job.
    let vm_id = vm_of_job(&h, &job_id).await;
    let (status, list) = call(
        &h.app,
        "GET",
        &format!("/api/v1/vms/{vm_id}/executions"),
        &h.reader,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let run = &list["executions"][0];
    assert_eq!(list["executions"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(run["source"], "job");
    assert_eq!(run["job_id"], job_id.as_str());
    assert_eq!(run["actor"], format!("job:{job_id}"));
    assert_eq!(run["output_ref"], format!("job:{job_id}"));
    assert_eq!(run["status"], "exited");
    assert_eq!(run["exit_code"], 7);
    assert_eq!(run["stdout_bytes"], 6);

    let started = Instant::now();
    let (_, job) = call(
        &h.app,
        "POST",
        "/api/v1/run",
        &h.key,
        json!({"kind": "vm", "spec": {"command": "sleep", "args": ["60"]}, "timeout_ms": 8000}),
    )
    .await;
    assert_eq!(job["error"], "timeout", "{job}");
    assert!(started.elapsed() < Duration::from_secs(40));
    // The killed command is recorded as such.
    let vm_id = vm_of_job(&h, job["id"].as_str().unwrap()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let runs = all_executions(&h, &vm_id).await;
        if runs.len() == 1 && runs[0]["status"] == "abandoned" {
            assert_eq!(runs[0]["source"], "job");
            break;
        }
        assert!(Instant::now() < deadline, "{runs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(h.vms.list("acme").await.is_empty());
    assert_eq!(
        kiln_vm::testing::vm_dirs_in(h.vms.vm_dir()),
        0,
        "no VM files left"
    );
    stop.cancel();
    worker.await.unwrap();
}

/// The lifecycle as queue tasks.
async fn the_vm_tasks_create_execute_and_delete(db: Db) {
    let h = harness(db).await;
    let (stop, worker) = start_worker(&h).await;
    let (_, created) = call(
        &h.app,
        "POST",
        "/api/v1/run",
        &h.key,
        json!({"kind": "vm:create", "spec": {"memory_mib": 128}}),
    )
    .await;
    assert_eq!(created["status"], "succeeded", "{created}");
    let vm_id = serde_json::from_str::<Value>(created["result"]["stdout"].as_str().unwrap())
        .unwrap()["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    for kind in ["vm:execute", "exec"] {
        let (_, ran) = call(&h.app, "POST", "/api/v1/run", &h.key,
            json!({"kind": kind, "spec": {"vm_id": vm_id, "command": "sh", "args": ["-c", "echo queued"]}})).await;
        assert_eq!(ran["result"]["stdout"], "queued\n", "{ran}");
    }
    let (_, ran) = call(&h.app, "POST", "/api/v1/run", &h.key,
        json!({"kind": "vm:execute", "spec": {"vm_id": vm_id, "command": "sh", "args": ["-c", "head -c 2000000 /dev/zero"]}})).await;
    assert_eq!(ran["result"]["truncated"], true, "{}", ran["status"]);
    let (_, gone) = call(
        &h.app,
        "POST",
        "/api/v1/run",
        &h.key,
        json!({"kind": "vm:delete", "spec": {"vm_id": vm_id}}),
    )
    .await;
    assert_eq!(gone["status"], "succeeded", "{gone}");
    let (_, again) = call(
        &h.app,
        "POST",
        "/api/v1/run",
        &h.key,
        json!({"kind": "vm:delete", "spec": {"vm_id": vm_id}}),
    )
    .await;
    assert_eq!(again["status"], "failed", "{again}");
    stop.cancel();
    worker.await.unwrap();
}
