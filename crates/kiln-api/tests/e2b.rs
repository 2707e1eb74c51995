//! The E2B-compatible API's wire contract with a real VM of the python
//! image: the control plane's statuses and error bodies, envd's Connect
//! framing (envelopes, the end-of-stream frame), processes that outlive
//! their stream, files, tokens and tenants. The official SDKs run against
//! it in `sdk-tests/e2b` (after `cargo test`, from `.ci/run`).

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_api::e2b::E2b;
use kiln_api::AppState;
use kiln_blob::BlobStore;
use kiln_core::{Scope, Scopes};
use kiln_vm::manager::probe_accelerator;
use kiln_vm::{testing, VmManager};
use serde_json::{json, Value};
use tower::ServiceExt;

struct Answer {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// A server stream's envelopes: (flags, message).
    fn envelopes(&self) -> Vec<(u8, Value)> {
        let mut out = Vec::new();
        let mut rest = &self.body[..];
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            out.push((rest[0], serde_json::from_slice(&rest[5..5 + len]).unwrap()));
            rest = &rest[5 + len..];
        }
        assert!(rest.is_empty(), "a partial envelope at the end");
        out
    }
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Answer {
        status,
        content_type,
        body,
    }
}

fn control(method: &str, path: &str, key: &str, body: Value) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

struct Sbx {
    id: String,
    token: String,
}

fn envd(sbx: &Sbx, path: &str, content_type: &str, body: Vec<u8>) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(path)
        .header("e2b-sandbox-id", &sbx.id)
        .header("e2b-sandbox-port", "49983")
        .header("x-access-token", &sbx.token)
        .header("content-type", content_type)
        .header("connect-protocol-version", "1")
        .body(Body::from(body))
        .unwrap()
}

/// `GET /files?path=` of a sandbox.
fn read_file(sbx: &Sbx, path: &str) -> Request<Body> {
    let mut read = envd(sbx, "/files", "", Vec::new());
    *read.method_mut() = axum::http::Method::GET;
    *read.uri_mut() = format!("/files?path={path}").parse().unwrap();
    read
}

fn unary(sbx: &Sbx, method: &str, message: Value) -> Request<Body> {
    envd(
        sbx,
        method,
        "application/json",
        message.to_string().into_bytes(),
    )
}

fn enveloped(sbx: &Sbx, method: &str, message: Value) -> Request<Body> {
    let json = message.to_string().into_bytes();
    let mut body = vec![0u8];
    body.extend_from_slice(&(json.len() as u32).to_be_bytes());
    body.extend_from_slice(&json);
    envd(sbx, method, "application/connect+json", body)
}

fn decode(text: &Value) -> String {
    use base64::Engine;
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(text.as_str().unwrap())
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_contract_holds_on_a_real_vm() {
    let image = testing::python_image().await;
    let work = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-e2b"));
    let accelerator =
        probe_accelerator(image, &work, &testing::images_dir().join("accelerator")).await;
    let vms = VmManager::new(&testing::images_dir(), &work.join("vms"), accelerator).unwrap();
    let db = kiln_db::testing::sqlite_temp().await;
    let blobs = BlobStore::local(&work.join("blobs")).unwrap();
    let key = kiln_api::issue_key(&db, "acme", "t", Scopes(vec![Scope::Write]))
        .await
        .unwrap()
        .1;
    let other = kiln_api::issue_key(&db, "other", "t", Scopes(vec![Scope::Write]))
        .await
        .unwrap()
        .1;
    let state = AppState::with_vms(db, blobs, None, Some(vms.clone()));
    let app = kiln_api::e2b::router(E2b::new(state, "python"));

    // No key, a bad body: E2B's error shape, never a panic.
    let answer = send(&app, control("POST", "/v2/sandboxes", "", json!({}))).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.json()["code"], 401);
    let answer = send(
        &app,
        control(
            "POST",
            "/v2/sandboxes",
            &key,
            json!({"templateID": "../etc"}),
        ),
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::BAD_REQUEST,
        "{:?}",
        answer.json()
    );
    assert!(answer.json()["message"].is_string());

    let answer = send(
        &app,
        control(
            "POST",
            "/v2/sandboxes",
            &key,
            json!({"templateID": "base", "timeout": 120, "metadata": {"m": "1"}, "envVars": {"GREETING": "hey"}}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.json());
    let made = answer.json();
    assert_eq!(made["envdVersion"], "0.5.7");
    assert_eq!(made["templateID"], "base");
    let sbx = Sbx {
        id: made["sandboxID"].as_str().unwrap().to_string(),
        token: made["envdAccessToken"].as_str().unwrap().to_string(),
    };
    // A sandbox is a VM of the tenant's.
    assert!(vms.get("acme", &sbx.id).await.is_some());

    // A foreground command: start first, output, the end, the end frame.
    let answer = send(
        &app,
        enveloped(
            &sbx,
            "/process.Process/Start",
            json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi; echo $GREETING; whoami; echo err >&2; exit 3"]}, "stdin": false}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.content_type, "application/connect+json");
    let frames = answer.envelopes();
    assert!(frames[0].1["event"]["start"]["pid"].as_u64().unwrap() > 0);
    let stdout: String = frames
        .iter()
        .filter_map(|(_, m)| m["event"]["data"].get("stdout"))
        .map(decode)
        .collect();
    let stderr: String = frames
        .iter()
        .filter_map(|(_, m)| m["event"]["data"].get("stderr"))
        .map(decode)
        .collect();
    assert_eq!(stdout, "hi\nhey\nuser\n");
    assert_eq!(stderr, "err\n");
    let (flags, last) = frames.last().unwrap();
    assert_eq!((*flags, last), (2, &json!({})));
    let end = &frames[frames.len() - 2].1["event"]["end"];
    assert_eq!(end["exitCode"], 3);
    assert_eq!(end["exited"], true);
    assert_eq!(end["error"], "exit status 3");

    // Files: multipart up, bytes down, in the user's home when relative.
    let boundary = "kilnboundary";
    let multipart = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"notes/a.txt\"\r\nContent-Type: text/plain\r\n\r\nalpha\r\n--{boundary}--\r\n"
    );
    let mut upload = envd(
        &sbx,
        "/files",
        &format!("multipart/form-data; boundary={boundary}"),
        multipart.into_bytes(),
    );
    *upload.uri_mut() = "/files".parse().unwrap();
    let answer = send(&app, upload).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    assert_eq!(
        answer.json(),
        json!([{"name": "a.txt", "type": "file", "path": "/home/user/notes/a.txt"}])
    );
    let answer = send(&app, read_file(&sbx, "/home/user/notes/a.txt")).await;
    assert_eq!(
        (answer.status, answer.body.as_slice()),
        (StatusCode::OK, &b"alpha"[..])
    );

    // Filesystem RPCs and their codes.
    let answer = send(
        &app,
        unary(
            &sbx,
            "/filesystem.Filesystem/Stat",
            json!({"path": "/nope"}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json()["code"], "not_found");
    let answer = send(
        &app,
        unary(
            &sbx,
            "/filesystem.Filesystem/Stat",
            json!({"path": "notes/a.txt"}),
        ),
    )
    .await;
    assert_eq!(answer.json()["entry"]["size"], "5");
    assert_eq!(answer.json()["entry"]["owner"], "user");
    let answer = send(
        &app,
        unary(
            &sbx,
            "/filesystem.Filesystem/MakeDir",
            json!({"path": "/tmp/d"}),
        ),
    )
    .await;
    assert_eq!(answer.json()["entry"]["type"], "FILE_TYPE_DIRECTORY");
    let answer = send(
        &app,
        unary(
            &sbx,
            "/filesystem.Filesystem/MakeDir",
            json!({"path": "/tmp/d"}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
    assert_eq!(answer.json()["code"], "already_exists");
    let answer = send(
        &app,
        unary(
            &sbx,
            "/filesystem.Filesystem/ListDir",
            json!({"path": "notes", "depth": 1}),
        ),
    )
    .await;
    assert_eq!(answer.json()["entries"][0]["name"], "a.txt");

    // A background process outlives its stream, is listed, takes stdin
    // and dies by SendSignal.
    let start = app
        .clone()
        .oneshot(enveloped(
            &sbx,
            "/process.Process/Start",
            json!({"process": {"cmd": "/bin/sh", "args": ["-c", "cat > /tmp/in.txt; sleep 300"]}, "stdin": true, "tag": "bg"}),
        ))
        .await
        .unwrap();
    let mut body = start.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let pid = serde_json::from_slice::<Value>(&first[5..]).unwrap()["event"]["start"]["pid"]
        .as_u64()
        .unwrap();
    drop(body);
    let answer = send(
        &app,
        unary(
            &sbx,
            "/process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"stdin": "ZmVk"}}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    let answer = send(
        &app,
        unary(
            &sbx,
            "/process.Process/CloseStdin",
            json!({"process": {"pid": pid}}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let answer = send(&app, unary(&sbx, "/process.Process/List", json!({}))).await;
    let listed = answer.json();
    assert!(listed["processes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["pid"] == pid && p["tag"] == "bg"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = send(&app, read_file(&sbx, "/tmp/in.txt")).await;
        if answer.body == b"fed" {
            break;
        }
        assert!(Instant::now() < deadline, "stdin never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = send(
        &app,
        unary(
            &sbx,
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = send(&app, unary(&sbx, "/process.Process/List", json!({}))).await;
        if answer.json()["processes"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed process is still listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = send(
        &app,
        unary(
            &sbx,
            "/process.Process/SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
        ),
    )
    .await;
    assert_eq!(answer.json()["code"], "not_found");

    // Paused: the state goes to disk and the process stops; connect brings
    // it back with its files.
    let answer = send(
        &app,
        control(
            "POST",
            &format!("/sandboxes/{}/pause", sbx.id),
            &key,
            json!({}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{:?}", answer.json());
    assert!(vms.get("acme", &sbx.id).await.is_none());
    let answer = send(
        &app,
        control(
            "POST",
            &format!("/sandboxes/{}/pause", sbx.id),
            &key,
            json!({}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
    let answer = send(
        &app,
        control("GET", &format!("/sandboxes/{}", sbx.id), &key, json!({})),
    )
    .await;
    assert_eq!(answer.json()["state"], "paused");
    let answer = send(&app, unary(&sbx, "/process.Process/List", json!({}))).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let answer = send(
        &app,
        control(
            "POST",
            &format!("/v2/sandboxes/{}/connect", sbx.id),
            &key,
            json!({"timeout": 60}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.json());
    assert_eq!(answer.json()["sandboxID"], sbx.id.as_str());
    let answer = send(&app, read_file(&sbx, "/home/user/notes/a.txt")).await;
    assert_eq!(
        (answer.status, answer.body.as_slice()),
        (StatusCode::OK, &b"alpha"[..])
    );
    let answer = send(
        &app,
        control(
            "POST",
            &format!("/v2/sandboxes/{}/connect", sbx.id),
            &key,
            json!({}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);

    // Tokens and tenants.
    let wrong = Sbx {
        id: sbx.id.clone(),
        token: "guess".into(),
    };
    let answer = send(&app, unary(&wrong, "/process.Process/List", json!({}))).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = send(
        &app,
        control("GET", &format!("/sandboxes/{}", sbx.id), &other, json!({})),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json()["code"], 404);
    let answer = send(
        &app,
        control(
            "DELETE",
            &format!("/sandboxes/{}", sbx.id),
            &other,
            json!({}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let answer = send(&app, control("GET", "/v2/sandboxes", &other, json!({}))).await;
    assert_eq!(answer.json(), json!([]));
    let answer = send(
        &app,
        control("GET", "/v2/sandboxes?metadata=m%3D1", &key, json!({})),
    )
    .await;
    assert_eq!(answer.json()[0]["sandboxID"], sbx.id.as_str());
    assert_eq!(answer.json()[0]["state"], "running");

    // Killed: 204, then 404, and envd answers "was not found" (502).
    let answer = send(
        &app,
        control("DELETE", &format!("/sandboxes/{}", sbx.id), &key, json!({})),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    let answer = send(
        &app,
        control("DELETE", &format!("/sandboxes/{}", sbx.id), &key, json!({})),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let answer = send(&app, unary(&sbx, "/process.Process/List", json!({}))).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(answer.json()["message"]
        .as_str()
        .unwrap()
        .contains("was not found"));
    assert!(vms.get("acme", &sbx.id).await.is_none());
    vms.shutdown().await;
    let _ = std::fs::remove_dir_all(&work);
}
