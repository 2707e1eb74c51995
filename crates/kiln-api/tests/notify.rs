//! Notifications out, end to end on both databases: subscriptions through
//! the API, the matcher turning events into `notify` jobs, deliveries to
//! local receivers standing in for a webhook endpoint, Slack and GitHub,
//! signatures checked, retries on a 503, and the delivery log.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use common::{error_code, harness, Harness};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

kiln_db::on_both_databases!(
    webhooks_slack_and_github_receive_matching_events,
    subscriptions_refuse_private_destinations_and_hide_secrets,
);

#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    /// Paths answered 503 once before they succeed.
    flaky: Arc<Mutex<Vec<String>>>,
}

async fn receive(
    State(r): State<Receiver>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let path = uri.path().to_string();
    {
        let mut flaky = r.flaky.lock().unwrap();
        if let Some(i) = flaky.iter().position(|p| *p == path) {
            flaky.remove(i);
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    r.got.lock().unwrap().push(Received {
        path,
        headers,
        body,
    });
    StatusCode::OK
}

async fn start_receiver() -> (String, Receiver) {
    let receiver = Receiver::default();
    let app = axum::Router::new()
        .fallback(receive)
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, receiver)
}

async fn subscribe(h: &Harness, body: Value) -> Value {
    let (status, created) = h
        .call("POST", "/api/v1/subscriptions", &h.admin, Some(body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

async fn received_at(r: &Receiver, path: &str, n: usize) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: Vec<Received> = r
            .got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.path == path)
            .cloned()
            .collect();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: {} of {n} deliveries",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn webhooks_slack_and_github_receive_matching_events(db: kiln_db::Db) {
    let h = harness(db).await;
    let (base, receiver) = start_receiver().await;
    receiver.flaky.lock().unwrap().push("/hook".to_string());
    let hook = subscribe(
        &h,
        json!({"name": "ci", "events": {"types": ["job.succeeded"], "labels": {"team": "blue"}},
               "destination": {"kind": "webhook", "url": format!("{base}/hook"), "secret": "s3cret"}}),
    )
    .await;
    subscribe(
        &h,
        json!({"name": "chat", "events": {"types": ["job.*"], "labels": {"team": "blue"}},
               "destination": {"kind": "slack", "url": format!("{base}/slack/T000/B000/XXXX")}}),
    )
    .await;
    subscribe(
        &h,
        json!({"name": "status", "events": {"types": ["job.succeeded"], "labels": {"sha": "0123abcd"}},
               "destination": {"kind": "github_status", "url": base, "token": "ghp_test"}}),
    )
    .await;

    // Another tenant's job with the same labels reaches none of them.
    let (status, _) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &h.other,
            Some(json!({"kind": "noop", "spec": {}, "labels": {"team": "blue"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let red = h
        .submit(json!({"kind": "noop", "spec": {}, "labels": {"team": "red"}}))
        .await;
    let blue = h
        .submit(json!({"kind": "noop", "spec": {},
                       "labels": {"team": "blue", "repo": "acme/app", "sha": "0123abcd"}}))
        .await;
    let blue_id = blue["id"].as_str().unwrap();
    h.wait(red["id"].as_str().unwrap(), common::finished).await;
    h.wait(blue_id, common::finished).await;

    // The webhook: answered 503 once, delivered on the retry, signed.
    let got = received_at(&receiver, "/hook", 1).await;
    let delivery = &got[0];
    let event: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(event["type"], "job.succeeded");
    assert_eq!(event["resource"]["id"], blue_id);
    assert_eq!(event["tenant"], "acme");
    let signature = delivery.headers["x-kiln-signature"].to_str().unwrap();
    let (t, v1) = signature
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
        .expect("t=<ts>,v1=<hex>");
    let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&delivery.body);
    mac.verify_slice(&hex::decode(v1).unwrap())
        .expect("the signature is HMAC-SHA256 of <t>.<body>");
    assert_eq!(delivery.headers["x-kiln-event"], "job.succeeded");

    // Slack: every job.* event of the blue job, as readable lines.
    let slack = received_at(&receiver, "/slack/T000/B000/XXXX", 3).await;
    let texts: Vec<String> = slack
        .iter()
        .map(|g| {
            serde_json::from_slice::<Value>(&g.body).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("job.queued") && t.contains(blue_id)),
        "{texts:?}"
    );
    assert!(
        texts.iter().any(|t| t.contains("job.succeeded")),
        "{texts:?}"
    );

    // GitHub: a commit status from the job's labels, with the token.
    let statuses = received_at(&receiver, "/repos/acme/app/statuses/0123abcd", 1).await;
    assert_eq!(statuses[0].headers["authorization"], "Bearer ghp_test");
    let status: Value = serde_json::from_slice(&statuses[0].body).unwrap();
    assert_eq!(status["state"], "success");
    assert_eq!(status["context"], "kiln/job");

    // The delivery log: the webhook's one delivery took two attempts.
    let id = hook["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let (status, log) = h
            .call(
                "GET",
                &format!("/api/v1/subscriptions/{id}/deliveries"),
                &h.reader,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{log}");
        if log["deliveries"][0]["status"] == "succeeded" || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let deliveries = log["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{log}");
    assert_eq!(deliveries[0]["status"], "succeeded", "{log}");
    assert_eq!(deliveries[0]["attempts"], 2, "{log}");
    assert_eq!(deliveries[0]["event_type"], "job.succeeded");
    assert!(
        deliveries[0]["answer"]
            .as_str()
            .unwrap()
            .starts_with("HTTP 200"),
        "{log}"
    );
    // Deliveries' own job events are not delivered: still exactly one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(received_at(&receiver, "/hook", 1).await.len(), 1);
    h.stop().await;
}

async fn subscriptions_refuse_private_destinations_and_hide_secrets(db: kiln_db::Db) {
    let h = harness(db).await;
    for (url, why) in [
        ("http://10.0.0.1/x", "not a public address"),
        ("http://169.254.169.254/latest", "not a public address"),
        ("http://[::1]:8080/", "not a public address"),
        ("file:///etc/passwd", "only http and https"),
        ("https://user:pw@example.com/", "credentials"),
    ] {
        let (status, body) = h
            .call(
                "POST",
                "/api/v1/subscriptions",
                &h.admin,
                Some(json!({"name": "x", "destination": {"kind": "webhook", "url": url, "secret": "k"}})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{url}: {body}"
        );
    }
    for bad in [
        json!({"name": "x", "destination": {"kind": "pager", "url": "https://example.com"}}),
        json!({"name": "x", "events": {"types": ["job.*"], "nope": 1},
               "destination": {"kind": "slack", "url": "https://hooks.slack.com/services/a"}}),
        json!({"name": "", "destination": {"kind": "slack", "url": "https://hooks.slack.com/services/a"}}),
    ] {
        let (status, body) = h
            .call("POST", "/api/v1/subscriptions", &h.admin, Some(bad))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    }
    // Deliveries are the matcher's alone: no tenant submits one, nor takes
    // the idempotency key of one in advance.
    for (job, code) in [
        (
            json!({"kind": "notify", "spec": {"subscription": "sub_1", "event": {}}}),
            "unknown_kind",
        ),
        (
            json!({"kind": "noop", "spec": {}, "idempotency_key": "kiln:notify:sub_1:9"}),
            "invalid",
        ),
    ] {
        let (status, body) = h.call("POST", "/api/v1/jobs", &h.admin, Some(job)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(error_code(&body), code, "{body}");
    }
    for base in ["http://127.0.0.1:1/x?y=1", "http://127.0.0.1:1/#frag"] {
        let (status, body) = h
            .call(
                "POST",
                "/api/v1/subscriptions",
                &h.admin,
                Some(json!({"name": "gh", "destination": {"kind": "github_status", "url": base, "token": "t"}})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{base}: {body}");
    }
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/subscriptions",
            &h.reader,
            Some(json!({"name": "x", "destination": {"kind": "slack", "url": "https://hooks.slack.com/services/a"}})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "forbidden");

    let created = subscribe(
        &h,
        json!({"name": "chat", "destination": {"kind": "slack", "url": "https://hooks.slack.com/services/T1/B2/SECRETPART"}}),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    let (_, shown) = h
        .call(
            "GET",
            &format!("/api/v1/subscriptions/{id}"),
            &h.reader,
            None,
        )
        .await;
    let (_, listed) = h
        .call("GET", "/api/v1/subscriptions", &h.reader, None)
        .await;
    for body in [&created, &shown, &listed] {
        assert!(!body.to_string().contains("SECRETPART"), "{body}");
    }
    assert_eq!(shown["destination"]["url"], "https://hooks.slack.com/…");
    // Another tenant sees nothing of it and cannot delete it.
    let path = format!("/api/v1/subscriptions/{id}");
    let (status, _) = h.call("GET", &path, &h.other, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h.call("DELETE", &path, &h.other, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, theirs) = h.call("GET", "/api/v1/subscriptions", &h.other, None).await;
    assert_eq!(theirs["subscriptions"], json!([]));
    let (status, _) = h.call("DELETE", &path, &h.admin, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = h.call("GET", &path, &h.admin, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    h.stop().await;
}
