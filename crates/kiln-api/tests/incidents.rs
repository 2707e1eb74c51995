//! Incidents on both databases: a burst of dead jobs opens one that clears
//! by itself once the queue is quiet; a lost node's incident clears when
//! it is back; acknowledging and resolving by hand; tenants apart.

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::{error_code, harness, Harness};
use serde_json::{json, Value};

kiln_db::on_both_databases!(
    a_dead_letter_burst_opens_one_incident_that_clears_by_itself,
    incidents_are_acknowledged_and_resolved_by_hand_and_kept_apart,
);

async fn incidents(h: &Harness, key: &str, query: &str) -> Vec<Value> {
    let (status, list) = h
        .call("GET", &format!("/api/v1/incidents{query}"), key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list["incidents"].as_array().unwrap().clone()
}

async fn until(h: &Harness, what: &str, probe: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = incidents(h, &h.admin, "").await;
        if probe(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_dead_letter_burst_opens_one_incident_that_clears_by_itself(db: kiln_db::Db) {
    let h = harness(db).await;
    // Give the detectors' cursor a start before the burst.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..4 {
        let job = h
            .submit(json!({"kind": "noop", "spec": {"exit_code": 3}, "queue": "etl", "max_attempts": 1}))
            .await;
        let done = h.wait(job["id"].as_str().unwrap(), common::finished).await;
        assert_eq!(done["status"], "dead", "{done}");
    }
    let open = until(&h, "a burst incident", |all| {
        all.iter().any(|i| i["kind"] == "dead_letter_burst")
    })
    .await;
    let burst: Vec<&Value> = open
        .iter()
        .filter(|i| i["kind"] == "dead_letter_burst")
        .collect();
    assert_eq!(burst.len(), 1, "one incident per fingerprint: {open:?}");
    assert_eq!(burst[0]["fingerprint"], "dead_letter_burst:etl");
    let id = burst[0]["id"].as_str().unwrap().to_string();
    // Quiet for a second (the harness's setting): resolved automatically.
    let resolved = until(&h, "the burst to clear", |all| {
        all.iter()
            .any(|i| i["id"] == id.as_str() && i["status"] == "resolved")
    })
    .await;
    let incident = resolved.iter().find(|i| i["id"] == id.as_str()).unwrap();
    assert_eq!(incident["resolved_by"], "automatic");
    let (_, detail) = h
        .call("GET", &format!("/api/v1/incidents/{id}"), &h.reader, None)
        .await;
    assert!(
        detail["timeline"].as_array().unwrap().len() >= 2,
        "{detail}"
    );
    // Its life is in the event log too, for subscriptions (on PostgreSQL
    // readable once the sequencer has numbered it, a moment after).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (types, page) = loop {
        let (_, page) = h
            .call(
                "GET",
                "/api/v1/events?type=incident.*&after=0",
                &h.admin,
                None,
            )
            .await;
        let types: Vec<String> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["resource"]["id"] == id.as_str())
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect();
        if types.len() >= 2 || Instant::now() > deadline {
            break (types, page);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(types, ["incident.opened", "incident.resolved"], "{page}");
    h.stop().await;
}

async fn incidents_are_acknowledged_and_resolved_by_hand_and_kept_apart(db: kiln_db::Db) {
    let h = harness(db).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lost = |node: &str, kind: &str| {
        let db = h.db.clone();
        let (node, kind) = (node.to_string(), kind.to_string());
        async move {
            db.event_append(
                "acme",
                &kind,
                ("node", &node),
                &Default::default(),
                &json!({}),
                kiln_api::now_millis(),
            )
            .await
            .unwrap()
        }
    };
    // A node that comes back clears its incident.
    lost("h-1", "node.lost").await;
    lost("h-1", "node.lost").await;
    let open = until(&h, "h-1's incident", |all| {
        all.iter().any(|i| i["fingerprint"] == "node_lost:h-1")
    })
    .await;
    assert_eq!(open.len(), 1, "a repeat is not a second incident: {open:?}");
    lost("h-1", "node.online").await;
    until(&h, "h-1's incident cleared", |all| {
        all.iter()
            .any(|i| i["fingerprint"] == "node_lost:h-1" && i["resolved_by"] == "automatic")
    })
    .await;

    lost("h-2", "node.lost").await;
    let all = until(&h, "h-2's incident", |all| {
        all.iter().any(|i| i["fingerprint"] == "node_lost:h-2")
    })
    .await;
    let id = all
        .iter()
        .find(|i| i["fingerprint"] == "node_lost:h-2")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/api/v1/incidents/{id}");
    assert_eq!(incidents(&h, &h.admin, "?status=open").await.len(), 1);

    // Other tenants and read-only keys.
    let (status, _) = h.call("GET", &path, &h.other, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h.call("POST", &format!("{path}/ack"), &h.other, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(incidents(&h, &h.other, "").await.is_empty());
    let (status, _) = h
        .call("POST", &format!("{path}/ack"), &h.reader, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, acked) = h.call("POST", &format!("{path}/ack"), &h.admin, None).await;
    assert_eq!(status, StatusCode::OK, "{acked}");
    assert_eq!(acked["status"], "acknowledged");
    let (status, again) = h.call("POST", &format!("{path}/ack"), &h.admin, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    let (status, resolved) = h
        .call(
            "POST",
            &format!("{path}/resolve"),
            &h.admin,
            Some(json!({"method": "restart", "notes": "host rebooted"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resolved}");
    assert_eq!(resolved["status"], "resolved");
    assert_eq!(resolved["resolved_by"], "manual");
    assert_eq!(resolved["notes"], "[restart] host rebooted");

    for (query, code) in [
        ("?status=closed", "bad_request"),
        ("?limit=0", "bad_request"),
        ("?before=x", "bad_request"),
    ] {
        let (status, body) = h
            .call("GET", &format!("/api/v1/incidents{query}"), &h.admin, None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(error_code(&body), code);
    }
    let (status, _) = h.call("GET", "/api/v1/incidents/abc", &h.admin, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    h.stop().await;
}
