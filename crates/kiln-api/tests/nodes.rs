//! `/api/v1/nodes` on both databases: the deployment's key lists, reads,
//! drains and resumes nodes that heartbeat for real; tenants get 403; bad
//! filters and unknown nodes answer the JSON error.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{error_code, harness};
use kiln_db::Db;
use kiln_ops::NodeConfig;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

kiln_db::on_both_databases!(nodes_through_the_api, nodes_are_the_deployments_alone);

async fn until(what: &str, mut probe: impl AsyncFnMut() -> Option<Value>) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn beating(db: &Db, id: &str, stop: &CancellationToken) {
    let mut config = NodeConfig::new(id, &["api", "scheduler"]);
    config.heartbeat_every = Duration::from_millis(100);
    tokio::spawn(kiln_ops::heartbeat_loop(db.clone(), config, stop.clone()));
}

async fn nodes_through_the_api(db: Db) {
    let h = harness(db.clone()).await;
    let stop = CancellationToken::new();
    beating(&db, "node-a", &stop);
    beating(&db, "node-b", &stop);
    let key = &h.system;

    let list = until("two nodes", async || {
        let (status, body) = h.call("GET", "/api/v1/nodes", key, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (body["nodes"].as_array().unwrap().len() == 2).then_some(body)
    })
    .await;
    let a = &list["nodes"][0];
    assert_eq!(a["id"], "node-a");
    assert_eq!(a["status"], "online");
    assert_eq!(a["roles"], serde_json::json!(["api", "scheduler"]));
    assert_eq!(a["drain"], false);
    assert!(
        a["load"]["mem_used"]
            .as_f64()
            .is_some_and(|m| m > 0.0 && m <= 1.0),
        "{a}"
    );
    assert!(
        a["last_seen"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{a}"
    );
    assert!(a["lost_at"].is_null());

    let detail = until("a load series", async || {
        let (status, body) = h.call("GET", "/api/v1/nodes/node-b", key, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (body["series"].as_array().unwrap().len() >= 2).then_some(body)
    })
    .await;
    assert_eq!(detail["id"], "node-b");
    assert!(detail["series"][0]["load1"].as_f64().is_some(), "{detail}");
    assert!(detail["series"][1]["cpu"].as_f64().is_some(), "{detail}");

    let (status, body) = h
        .call("POST", "/api/v1/nodes/node-b/drain", key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["drain"].as_bool()),
        (Some("draining"), Some(true))
    );
    for (filter, ids) in [
        ("online", vec!["node-a"]),
        ("draining", vec!["node-b"]),
        ("lost", vec![]),
    ] {
        let (status, body) = h
            .call("GET", &format!("/api/v1/nodes?status={filter}"), key, None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let got: Vec<&str> = body["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap())
            .collect();
        assert_eq!(got, ids, "{filter}");
    }
    let (status, body) = h
        .call("POST", "/api/v1/nodes/node-b/resume", key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "online");

    for (method, path, expect, code) in [
        (
            "GET",
            "/api/v1/nodes?status=gone",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "GET",
            "/api/v1/nodes?status=",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "GET",
            "/api/v1/nodes?colour=red",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "GET",
            "/api/v1/nodes/nobody",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "GET",
            "/api/v1/nodes/%00",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/nodes/nobody/drain",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/nodes/nobody/resume",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "DELETE",
            "/api/v1/nodes/node-a",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ] {
        let (status, body) = h.call(method, path, key, None).await;
        assert_eq!(
            (status, error_code(&body)),
            (expect, code),
            "{method} {path}: {body}"
        );
    }
    stop.cancel();
    h.stop().await;
}

async fn nodes_are_the_deployments_alone(db: Db) {
    let h = harness(db.clone()).await;
    let stop = CancellationToken::new();
    beating(&db, "node-a", &stop);
    until("the node", async || {
        let (status, body) = h.call("GET", "/api/v1/nodes/node-a", &h.system, None).await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    for key in [&h.admin, &h.reader, &h.other] {
        for (method, path) in [
            ("GET", "/api/v1/nodes"),
            ("GET", "/api/v1/nodes?status=bogus"),
            ("GET", "/api/v1/nodes/node-a"),
            ("POST", "/api/v1/nodes/node-a/drain"),
            ("POST", "/api/v1/nodes/node-a/resume"),
            ("POST", "/api/v1/nodes/nobody/drain"),
        ] {
            let (status, body) = h.call(method, path, key, None).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
            assert_eq!(error_code(&body), "forbidden");
        }
    }
    let (status, body) = h
        .call("GET", "/api/v1/nodes", "kiln_nobody_secret", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // Nothing a tenant sent drained the node.
    let node = db.node_get("node-a").await.unwrap().unwrap();
    assert!(!node.drain);
    stop.cancel();
    h.stop().await;
}
