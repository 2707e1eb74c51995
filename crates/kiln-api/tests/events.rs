//! The event log through the API: pages, Server-Sent Events with resume,
//! the WebSocket, one job's events, tenant isolation and bad filters, with
//! a real worker running the jobs, on both databases.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{error_code, harness, Harness};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

kiln_db::on_both_databases!(
    pages_show_a_job_s_life_to_its_tenant_only,
    server_sent_events_resume_after_the_last_id,
    the_websocket_streams_the_same_events,
);

/// Pages of `type=job.*` until the job's three events are there.
async fn job_events_of(h: &Harness, key: &str, job: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, page) = h
            .call(
                "GET",
                &format!("/api/v1/events?type=job.*&resource=job:{job}&after=0"),
                key,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let events = page["events"].as_array().unwrap().clone();
        if events.len() >= 3 {
            return events;
        }
        assert!(Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_noop(h: &Harness) -> String {
    let job = h
        .submit(json!({"kind": "noop", "spec": {}, "labels": {"team": "blue"}}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    h.wait(&id, common::finished).await;
    id
}

async fn pages_show_a_job_s_life_to_its_tenant_only(db: kiln_db::Db) {
    let h = harness(db).await;
    let id = run_noop(&h).await;
    let events = job_events_of(&h, &h.admin, &id).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["job.queued", "job.started", "job.succeeded"]);
    assert_eq!(events[0]["resource"], json!({"kind": "job", "id": id}));
    assert_eq!(events[0]["labels"]["team"], "blue");
    assert!(events[0]["time"].as_str().unwrap().ends_with('Z'));

    let (status, page) = h
        .call("GET", &format!("/api/v1/jobs/{id}/events"), &h.reader, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["events"].as_array().map(Vec::len), Some(3), "{page}");
    let (status, page) = h
        .call(
            "GET",
            "/api/v1/events?label=team=blue&type=job.succeeded",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["events"].as_array().map(Vec::len), Some(1), "{page}");
    // Paging by next_after walks the log one event at a time.
    let mut after = "0".to_string();
    let mut walked = 0;
    loop {
        let (_, page) = h
            .call(
                "GET",
                &format!("/api/v1/events?limit=1&after={after}"),
                &h.admin,
                None,
            )
            .await;
        if page["events"].as_array().unwrap().is_empty() {
            break;
        }
        walked += 1;
        after = page["next_after"].as_str().unwrap().to_string();
    }
    assert!(walked >= 3, "{walked}");

    // Another tenant sees none of it.
    let (_, page) = h
        .call("GET", "/api/v1/events?after=0", &h.other, None)
        .await;
    assert!(
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["resource"]["id"] != json!(id) || e["resource"]["kind"] != "job"),
        "{page}"
    );
    let (status, _) = h
        .call("GET", &format!("/api/v1/jobs/{id}/events"), &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    for bad in [
        "/api/v1/events?type=Job!",
        "/api/v1/events?resource=nocolon",
        "/api/v1/events?label=novalue",
        "/api/v1/events?after=-1",
        "/api/v1/events?limit=0",
        "/api/v1/events?limit=5000",
        "/api/v1/events?nope=1",
    ] {
        let (status, body) = h.call("GET", bad, &h.admin, None).await;
        assert!(status.is_client_error(), "{bad}: {status} {body}");
        assert!(!error_code(&body).is_empty());
    }
    h.stop().await;
}

/// Reads SSE frames until `n` events came; returns (id, type, data).
async fn sse_events(body: Body, n: usize) -> Vec<(i64, String, Value)> {
    let mut stream = body.into_data_stream();
    let mut text = String::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        let chunk = tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .unwrap_or_else(|_| panic!("only {} events: {text}", out.len()))
            .expect("the stream ended")
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let (mut id, mut kind, mut data) = (None, String::new(), Value::Null);
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str(v.trim()).unwrap();
                }
            }
            if let Some(id) = id {
                out.push((id, kind, data));
            }
        }
    }
    out
}

async fn sse(h: &Harness, query: &str, last_id: Option<i64>) -> Body {
    let mut request = Request::builder()
        .uri(format!("/api/v1/events?{query}"))
        .header("authorization", format!("Bearer {}", h.admin))
        .header("accept", "text/event-stream");
    if let Some(id) = last_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = h
        .app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    response.into_body()
}

async fn server_sent_events_resume_after_the_last_id(db: kiln_db::Db) {
    let h = harness(db).await;
    // Live: a stream opened before the job sees its whole life.
    let live = sse(&h, "type=job.*", None).await;
    let id = run_noop(&h).await;
    let events = sse_events(live, 3).await;
    let types: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(types, ["job.queued", "job.started", "job.succeeded"]);
    assert!(events.iter().all(|e| e.2["resource"]["id"] == json!(id)));
    assert!(events.windows(2).all(|w| w[0].0 < w[1].0));
    // Resumed after the first: the next two, no more, no fewer.
    let resumed = sse_events(sse(&h, "type=job.*", Some(events[0].0)).await, 2).await;
    assert_eq!(resumed, events[1..].to_vec());
    let resumed = sse_events(
        sse(&h, &format!("type=job.*&after={}", events[1].0), None).await,
        1,
    )
    .await;
    assert_eq!(resumed, events[2..].to_vec());
    h.stop().await;
}

async fn the_websocket_streams_the_same_events(db: kiln_db::Db) {
    let h = harness(db).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let done = stop.clone();
    tokio::spawn(kiln_api::serve(listener, h.state.clone(), async move {
        done.cancelled().await
    }));
    let mut request = format!("ws://{addr}/api/v1/events/ws?type=job.succeeded&after=0")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", h.admin).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let id = run_noop(&h).await;
    let message = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match ws.next().await.unwrap().unwrap() {
                tokio_tungstenite::tungstenite::Message::Text(text) => {
                    break serde_json::from_str::<Value>(&text).unwrap();
                }
                _ => continue,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(message["type"], "job.succeeded");
    assert_eq!(message["resource"]["id"], json!(id));
    // Not a WebSocket: a JSON error, not a hang.
    let (status, body) = h.call("GET", "/api/v1/events/ws", &h.admin, None).await;
    assert!(status.is_client_error(), "{status} {body}");
    stop.cancel();
    h.stop().await;
}
