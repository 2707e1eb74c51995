//! MicroVMs through the HTTP API and through the queue (`vm` jobs), with
//! real VMs, on both databases.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_api::AppState;
use kiln_blob::BlobStore;
use kiln_core::{Scope, Scopes};
use kiln_db::Db;
use kiln_vm::manager::probe_accelerator;
use kiln_vm::{testing, VmManager};
use kiln_worker::{Handlers, Worker, WorkerConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

kiln_db::on_both_databases!(vms_through_the_api_and_the_queue);

async fn send(
    app: &Router,
    method: &str,
    path: &str,
    key: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", content_type)
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    (
        status,
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
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
        body.to_string().into_bytes(),
    )
    .await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn vms_through_the_api_and_the_queue(db: Db) {
    let image = testing::test_image().await;
    let work = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-api-vms"));
    let accelerator =
        probe_accelerator(image, &work, &testing::images_dir().join("accelerator")).await;
    let vms = VmManager::new(&testing::images_dir(), &work.join("vms"), accelerator).unwrap();
    let blobs = BlobStore::local(&work.join("blobs")).unwrap();
    let key = kiln_api::issue_key(&db, "acme", "t", Scopes(vec![Scope::Write]))
        .await
        .unwrap()
        .1;
    let other = kiln_api::issue_key(&db, "globex", "t", Scopes(vec![Scope::Write]))
        .await
        .unwrap()
        .1;
    let system = kiln_api::issue_key(&db, "default", "t", Scopes(vec![Scope::System]))
        .await
        .unwrap()
        .1;
    let app = kiln_api::app(AppState::with_vms(
        db.clone(),
        blobs,
        None,
        Some(vms.clone()),
    ));

    let (status, vm) = call(
        &app,
        "POST",
        "/api/v1/vms",
        &key,
        json!({"memory_mib": 128, "labels": {"t": "1"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    assert_eq!(vm["accelerator"], accelerator.as_str());
    let id = vm["id"].as_str().unwrap().to_string();
    let (status, _) = call(
        &app,
        "GET",
        &format!("/api/v1/vms/{id}"),
        &other,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The accelerator, live VMs and start times are in /metrics.
    let (status, text) = send(&app, "GET", "/metrics", &system, "text/plain", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(text).unwrap();
    let accelerator_line = format!(
        "kiln_vm_accelerator{{accelerator=\"{}\"}} 1",
        accelerator.as_str()
    );
    assert!(text.contains(&accelerator_line), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("kiln_vms_live ") && l != "kiln_vms_live 0"),
        "{text}"
    );
    assert!(text.contains("kiln_vm_start_seconds_count{how="), "{text}");

    let (status, out) = call(
        &app,
        "POST",
        &format!("/api/v1/vms/{id}/execute"),
        &key,
        json!({"command": "sh", "args": ["-c", "echo hi; exit 3"], "timeout_ms": 5000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (out["stdout"].as_str(), out["exit_code"].as_i64()),
        (Some("hi\n"), Some(3))
    );

    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let (status, _) = send(
        &app,
        "PUT",
        &format!("/api/v1/vms/{id}/files?path=/tmp/x.bin"),
        &key,
        "application/octet-stream",
        data.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, back) = send(
        &app,
        "GET",
        &format!("/api/v1/vms/{id}/files?path=/tmp/x.bin"),
        &key,
        "",
        Vec::new(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(back, data);

    let (status, body) = call(&app, "POST", "/api/v1/vms", &key, json!({"vcpus": 0})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = call(&app, "POST", "/api/v1/vms", &key, json!({"image": "nope"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    exec_over_websocket(
        AppState::with_vms(
            db.clone(),
            BlobStore::local(&work.join("blobs2")).unwrap(),
            None,
            Some(vms.clone()),
        ),
        &id,
        &key,
    )
    .await;

    let (status, _) = call(
        &app,
        "DELETE",
        &format!("/api/v1/vms/{id}"),
        &key,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, list) = call(&app, "GET", "/api/v1/vms", &key, Value::Null).await;
    assert_eq!(list["vms"], json!([]));

    // The `vm` kind: a fresh VM per job, gone afterwards.
    let mut config = WorkerConfig::new(&kiln_db::testing::unique_name("w"));
    config.poll_every = Duration::from_millis(200);
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(
            db.clone(),
            kiln_vm::job::register(Handlers::new(), &vms),
            config,
        )
        .run(stop.clone()),
    );
    let (status, job) = call(&app, "POST", "/api/v1/run", &key,
        json!({"kind": "vm", "spec": {"command": "sh", "args": ["-c", "echo in-vm; exit 7"]}, "timeout_ms": 60000})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(job["status"], "dead", "{job}");
    assert_eq!(job["result"]["exit_code"], 7);
    assert_eq!(job["result"]["stdout"], "in-vm\n");
    let (status, body) = call(
        &app,
        "POST",
        "/api/v1/jobs",
        &key,
        json!({"kind": "vm", "spec": {"args": []}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // The lifecycle as queue tasks.
    let (_, created) = call(
        &app,
        "POST",
        "/api/v1/run",
        &key,
        json!({"kind": "vm:create", "spec": {"memory_mib": 128}}),
    )
    .await;
    assert_eq!(created["status"], "succeeded", "{created}");
    let vm_id = serde_json::from_str::<Value>(created["result"]["stdout"].as_str().unwrap())
        .unwrap()["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, ran) = call(&app, "POST", "/api/v1/run", &key,
        json!({"kind": "vm:execute", "spec": {"vm_id": vm_id, "command": "sh", "args": ["-c", "echo queued"]}})).await;
    assert_eq!(ran["result"]["stdout"], "queued\n", "{ran}");
    let (_, gone) = call(
        &app,
        "POST",
        "/api/v1/run",
        &key,
        json!({"kind": "vm:delete", "spec": {"vm_id": vm_id}}),
    )
    .await;
    assert_eq!(gone["status"], "succeeded", "{gone}");
    let (_, again) = call(
        &app,
        "POST",
        "/api/v1/run",
        &key,
        json!({"kind": "vm:delete", "spec": {"vm_id": vm_id}}),
    )
    .await;
    assert_eq!(again["status"], "failed", "{again}");

    // A job past its timeout: the VM is destroyed all the same.
    let started = Instant::now();
    let (_, job) = call(
        &app,
        "POST",
        "/api/v1/run",
        &key,
        json!({"kind": "vm", "spec": {"command": "sleep", "args": ["60"]}, "timeout_ms": 8000}),
    )
    .await;
    assert_eq!(job["error"], "timeout", "{job}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(vms.list("acme").await.is_empty());
    assert_eq!(
        kiln_vm::testing::vm_dirs_in(vms.vm_dir()),
        0,
        "no VM files left"
    );
    stop.cancel();
    worker.await.unwrap();
}

/// The streamed exec over a real socket: stdin in, output and exit out.
async fn exec_over_websocket(state: Arc<AppState>, id: &str, key: &str) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = {
        let stop = stop.clone();
        tokio::spawn(kiln_api::serve(listener, state, async move {
            stop.cancelled().await
        }))
    };
    let mut request = format!("ws://{addr}/api/v1/vms/{id}/exec/ws")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::Text(
        json!({"command": "sh", "args": ["-c", "cat; echo done >&2; exit 4"]})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Binary(b"typed ".to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Text(
        json!({"stdin": "input", "eof": true}).to_string().into(),
    ))
    .await
    .unwrap();
    let (mut stdout, mut stderr, mut exit) = (String::new(), String::new(), None);
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let event: Value = serde_json::from_str(&text).unwrap();
        match event["type"].as_str() {
            Some("stdout") => stdout.push_str(event["data"].as_str().unwrap()),
            Some("stderr") => stderr.push_str(event["data"].as_str().unwrap()),
            Some("exit") => {
                exit = event["exit_code"].as_i64();
                break;
            }
            other => panic!("unexpected {other:?}: {event}"),
        }
    }
    assert_eq!(
        (stdout.as_str(), stderr.as_str(), exit),
        ("typed input", "done\n", Some(4))
    );
    stop.cancel();
    let _ = server.await;
}
