//! Live logs through the API: a running job's output followed as it is
//! printed (wasm, and a `vm` job in a real microVM), the whole output after
//! the end beyond the result's cap, tenant isolation, the nodes' lines for
//! the deployment's key only, and bad queries, on both databases.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{error_code, finished, harness, Harness};
use http_body_util::BodyExt;
use kiln_wasm::fixtures;
use serde_json::{json, Value};
use tower::ServiceExt;

kiln_db::on_both_databases!(
    following_a_wasm_job_shows_lines_before_it_ends,
    the_whole_output_is_kept_beyond_the_result_cap,
    logs_are_the_tenant_s_own,
    bad_queries_are_refused_with_json,
    following_a_vm_job_shows_lines_before_it_ends,
    a_flood_ends_at_the_log_cap_with_a_marker,
);

/// Opens `path` as a Server-Sent Events stream for `key`.
async fn sse(h: &Harness, path: &str, key: &str) -> Body {
    let request = Request::builder()
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .header("accept", "text/event-stream")
        .body(Body::empty())
        .unwrap();
    let response = h.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    response.into_body()
}

/// One event of a stream: its kind, id and data.
#[derive(Clone, Debug)]
struct Frame {
    kind: String,
    id: Option<i64>,
    data: Value,
    at: Instant,
}

/// Reads frames until `stop` holds for one or `within` passes.
async fn frames(body: Body, within: Duration, stop: impl Fn(&Frame) -> bool) -> Vec<Frame> {
    let mut stream = body.into_data_stream();
    let mut buffer = String::new();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let chunk =
            match tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut stream)).await {
                Ok(Some(Ok(chunk))) => chunk,
                _ => return seen,
            };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let text: String = buffer.drain(..end + 2).collect();
            let (mut kind, mut id, mut data) = (String::new(), None, String::new());
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if kind.is_empty() {
                continue;
            }
            let frame = Frame {
                kind,
                id,
                data: serde_json::from_str(&data).unwrap_or(Value::Null),
                at: Instant::now(),
            };
            let done = stop(&frame);
            seen.push(frame);
            if done {
                return seen;
            }
        }
    }
}

async fn status_of(h: &Harness, id: &str) -> String {
    let (_, job) = h
        .call("GET", &format!("/api/v1/jobs/{id}"), &h.admin, None)
        .await;
    job["status"].as_str().unwrap_or("").to_string()
}

/// Every page of a job's output, its text joined.
async fn whole_output(h: &Harness, id: &str, key: &str) -> (String, Vec<Value>) {
    let mut cursor = "0".to_string();
    let mut text = String::new();
    let mut lines = Vec::new();
    loop {
        let (status, page) = h
            .call(
                "GET",
                &format!("/api/v1/jobs/{id}/logs?cursor={cursor}&limit=1000"),
                key,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let got = page["lines"].as_array().unwrap().clone();
        if got.is_empty() {
            return (text, lines);
        }
        for line in &got {
            text.push_str(line["text"].as_str().unwrap());
        }
        lines.extend(got);
        cursor = page["next_cursor"].as_str().unwrap().to_string();
    }
}

async fn following_a_wasm_job_shows_lines_before_it_ends(db: kiln_db::Db) {
    let mut h = harness(db).await;
    h.start_logs();
    let module = h.push(&fixtures::slow_lines(6, 400)).await;
    let job = h
        .submit(json!({"kind": "wasm", "spec": {"module": module}, "timeout_ms": 30000}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let follow = sse(&h, &format!("/api/v1/jobs/{id}/logs?follow=true"), &h.admin).await;
    // The first line arrives while the job still runs.
    let first = frames(follow, Duration::from_secs(20), |f| f.kind == "log").await;
    let first = first.last().expect("no line before the job's end");
    assert_eq!(first.kind, "log", "{first:?}");
    assert_eq!(first.data["text"], "tick 0\n", "{first:?}");
    assert_eq!(first.data["stream"], "stdout");
    assert_eq!(first.data["job"], id.as_str());
    assert_eq!(status_of(&h, &id).await, "running");
    // A follower from the start sees every line, then the end.
    let all = frames(
        sse(&h, &format!("/api/v1/jobs/{id}/logs?follow=true"), &h.admin).await,
        Duration::from_secs(30),
        |f| f.kind == "end",
    )
    .await;
    let end = all.last().unwrap();
    assert_eq!(end.kind, "end", "{all:?}");
    assert_eq!(end.data["status"], "succeeded");
    let text: String = all
        .iter()
        .filter(|f| f.kind == "log")
        .map(|f| f.data["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, "tick 0\ntick 1\ntick 2\ntick 3\ntick 4\ntick 5\n");
    let ids: Vec<i64> = all.iter().filter_map(|f| f.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // Resumed after the third line: the rest, then the end.
    let request = Request::builder()
        .uri(format!("/api/v1/jobs/{id}/logs?follow=true"))
        .header("authorization", format!("Bearer {}", h.admin))
        .header("last-event-id", ids[2].to_string())
        .body(Body::empty())
        .unwrap();
    let body = h.app.clone().oneshot(request).await.unwrap().into_body();
    let rest = frames(body, Duration::from_secs(10), |f| f.kind == "end").await;
    let rest_ids: Vec<i64> = rest.iter().filter_map(|f| f.id).collect();
    assert_eq!(rest_ids, ids[3..].to_vec());
    // The tenant-wide stream sees the lines of a job as they come too.
    let live = sse(&h, "/api/v1/logs?follow=true&source=job", &h.admin).await;
    let job = h
        .submit(json!({"kind": "wasm", "spec": {"module": module}, "timeout_ms": 30000}))
        .await;
    let second = job["id"].as_str().unwrap().to_string();
    let seen = frames(live, Duration::from_secs(20), |f| f.kind == "log").await;
    assert_eq!(seen.last().unwrap().data["job"], second.as_str());
    h.wait(&second, finished).await;
    h.stop().await;
}

async fn the_whole_output_is_kept_beyond_the_result_cap(db: kiln_db::Db) {
    let mut h = harness(db).await;
    let sink = h.start_logs();
    // 3 MiB of output: the result keeps its first 64 KiB; the log keeps
    // it all, the first MiB in the database, the rest in the blob store.
    let total: u64 = 3 << 20;
    let module = h.push(&fixtures::print_bytes(total)).await;
    let job = h
        .submit(json!({"kind": "wasm", "spec": {"module": module, "output_limit_bytes": 65536}, "timeout_ms": 60000}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let done = h.wait(&id, finished).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["truncated"], true);
    let kept = done["result"]["stdout"].as_str().unwrap();
    assert_eq!(kept.len(), 65536);
    let (text, lines) = whole_output(&h, &id, &h.admin).await;
    assert_eq!(text.len() as u64, total);
    assert!(text.starts_with(kept));
    assert!(text.lines().all(|line| line.len() == 63), "lines cut");
    assert!(lines.iter().all(|l| l["level"] == "info"));
    assert!(sink.stats().segments > 0, "{:?}", sink.stats());
    assert_eq!(sink.stats().dropped_bytes, 0);
    h.stop().await;
}

async fn logs_are_the_tenant_s_own(db: kiln_db::Db) {
    let mut h = harness(db).await;
    h.start_logs();
    let module = h.push(&fixtures::hello()).await;
    let job = h
        .submit(json!({"kind": "wasm", "spec": {"module": module}}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    h.wait(&id, finished).await;
    let (text, _) = whole_output(&h, &id, &h.admin).await;
    assert_eq!(text, "hello world\n");
    // A node's own line, as the node layer would write it.
    h.db.log_insert(&[kiln_db::logs::NewLogChunk {
        source: "node".into(),
        node: "test-node".into(),
        stream: "log".into(),
        seq: 1,
        level: "warn".into(),
        ts: kiln_api::now_millis(),
        bytes: 11,
        text: "node line\n".into(),
        ..Default::default()
    }])
    .await
    .unwrap();
    // Another tenant: the job is 404, its lines invisible.
    let (status, body) = h
        .call("GET", &format!("/api/v1/jobs/{id}/logs"), &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(error_code(&body), "not_found");
    let (status, body) = h
        .call(
            "GET",
            &format!("/api/v1/jobs/{id}/logs?follow=true"),
            &h.other,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, page) = h
        .call("GET", &format!("/api/v1/logs?job={id}"), &h.other, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["lines"], json!([]));
    // A tenant never sees the nodes' lines, and may not ask for them.
    let (_, page) = h.call("GET", "/api/v1/logs", &h.admin, None).await;
    let lines = page["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 1, "{page}");
    assert_eq!(lines[0]["source"], "job");
    let (status, body) = h
        .call("GET", "/api/v1/logs?source=node", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "forbidden");
    // The deployment's key does, and filters them by level and text.
    let (status, page) = h
        .call(
            "GET",
            "/api/v1/logs?source=node&level=warn&q=node%20line",
            &h.system,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["lines"][0]["text"], "node line\n");
    let (_, page) = h
        .call(
            "GET",
            "/api/v1/logs?source=node&level=error",
            &h.system,
            None,
        )
        .await;
    assert_eq!(page["lines"], json!([]));
    let (_, page) = h.call("GET", "/api/v1/logs?q=hello", &h.admin, None).await;
    assert_eq!(page["lines"].as_array().unwrap().len(), 1);
    let (_, page) = h.call("GET", "/api/v1/logs?q=absent", &h.admin, None).await;
    assert_eq!(page["lines"], json!([]));
    // Time bounds.
    let (_, page) = h
        .call(
            "GET",
            "/api/v1/logs?until=2000-01-01T00:00:00Z",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(page["lines"], json!([]));
    let (_, page) = h
        .call(
            "GET",
            "/api/v1/logs?since=2000-01-01T00:00:00Z",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(page["lines"].as_array().unwrap().len(), 1);
    h.stop().await;
}

async fn bad_queries_are_refused_with_json(db: kiln_db::Db) {
    let h = harness(db).await;
    for (path, expect) in [
        ("/api/v1/logs?level=loud", StatusCode::UNPROCESSABLE_ENTITY),
        ("/api/v1/logs?source=disk", StatusCode::UNPROCESSABLE_ENTITY),
        ("/api/v1/logs?limit=0", StatusCode::UNPROCESSABLE_ENTITY),
        ("/api/v1/logs?limit=1001", StatusCode::UNPROCESSABLE_ENTITY),
        ("/api/v1/logs?cursor=-1", StatusCode::UNPROCESSABLE_ENTITY),
        ("/api/v1/logs?job=0", StatusCode::UNPROCESSABLE_ENTITY),
        ("/api/v1/logs?vm=..%2Fetc", StatusCode::UNPROCESSABLE_ENTITY),
        (
            "/api/v1/logs?since=yesterday",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/api/v1/logs?since=2001-01-01T00:00:00Z&until=2000-01-01T00:00:00Z",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("/api/v1/logs?q=", StatusCode::UNPROCESSABLE_ENTITY),
        ("/api/v1/jobs/1/logs?limit=0", StatusCode::NOT_FOUND),
        ("/api/v1/jobs/nope/logs", StatusCode::NOT_FOUND),
    ] {
        let (status, body) = h.call("GET", path, &h.admin, None).await;
        assert_eq!(status, expect, "{path}: {body}");
        error_code(&body);
    }
    let long = "x".repeat(300);
    for path in [
        "/api/v1/logs?job=abc".to_string(),
        "/api/v1/logs?follow=maybe".to_string(),
        "/api/v1/logs?colour=red".to_string(),
        format!("/api/v1/logs?q={long}"),
    ] {
        let (status, body) = h.call("GET", &path, &h.admin, None).await;
        assert!(status.is_client_error(), "{path}: {status} {body}");
        error_code(&body);
    }
    let request = Request::builder()
        .uri("/api/v1/logs?follow=true")
        .header("authorization", format!("Bearer {}", h.admin))
        .header("last-event-id", "soon")
        .body(Body::empty())
        .unwrap();
    let response = h.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    error_code(&body);
    let (status, _) = h.call("GET", "/api/v1/logs", "kiln_nope", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    h.stop().await;
}

/// A `vm` job in a real microVM (TCG here, so small): its lines reach a
/// follower while the command still runs.
async fn following_a_vm_job_shows_lines_before_it_ends(db: kiln_db::Db) {
    let mut h = harness(db).await;
    h.start_logs();
    h.start_vm_worker().await;
    let script = "for i in 1 2 3 4; do echo vm-line $i; sleep 1; done";
    let job = h
        .submit(json!({"kind": "vm", "spec": {"command": "sh", "args": ["-c", script]}, "timeout_ms": 120000}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let follow = sse(&h, &format!("/api/v1/jobs/{id}/logs?follow=true"), &h.admin).await;
    let all = frames(follow, Duration::from_secs(150), |f| f.kind == "end").await;
    let end = all.last().expect("nothing followed");
    assert_eq!(end.kind, "end", "{all:?}");
    assert_eq!(end.data["status"], "succeeded", "{all:?}");
    let lines: Vec<&Frame> = all.iter().filter(|f| f.kind == "log").collect();
    let text: String = lines
        .iter()
        .map(|f| f.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "vm-line 1\nvm-line 2\nvm-line 3\nvm-line 4\n");
    assert!(lines[0].data["vm"]
        .as_str()
        .is_some_and(|vm| !vm.is_empty()));
    // The first line came a second or more before the end: the command
    // was still running (it sleeps a second after each line).
    let ahead = end.at.duration_since(lines[0].at);
    assert!(
        ahead >= Duration::from_millis(2500),
        "first line only {ahead:?} before the end"
    );
    h.stop().await;
}

/// A guest printing forever: the result keeps its cap, the log its much
/// larger one and a marker, and the guest is stopped there.
async fn a_flood_ends_at_the_log_cap_with_a_marker(db: kiln_db::Db) {
    let mut h = harness(db).await;
    h.start_logs_with(kiln_logs::LogConfig {
        flush_every: Duration::from_millis(20),
        source_bytes_max: 1 << 20,
        ..kiln_logs::LogConfig::new("test-node")
    });
    let module = h.push(&fixtures::flood()).await;
    let job = h
        .submit(json!({"kind": "wasm", "spec": {"module": module, "output_limit_bytes": 10000}, "max_attempts": 1}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let done = h.wait(&id, finished).await;
    assert_eq!(done["status"], "failed", "{}", done["status"]);
    assert_eq!(done["error"], "output_truncated", "{}", done["error"]);
    assert_eq!(done["result"]["stdout"].as_str().unwrap().len(), 10000);
    let (text, lines) = whole_output(&h, &id, &h.admin).await;
    let marker = "[kiln: output past 1048576 bytes is not kept]\n";
    assert!(
        text.ends_with(marker),
        "{}",
        &text[text.len().saturating_sub(100)..]
    );
    // The guest prints NULs, which text cannot hold: each is kept as
    // U+FFFD, and `bytes` counts what the guest printed.
    let printed: i64 = lines
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .map(|l| l["bytes"].as_i64().unwrap())
        .sum();
    assert_eq!(printed, 1 << 20);
    assert_eq!(lines.last().unwrap()["stream"], "log");
    h.stop().await;
}
