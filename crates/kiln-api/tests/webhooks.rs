//! Webhooks in: triggers managed through the API, deliveries signed the
//! way GitHub, Slack and generic senders sign them, deduplicated, filtered
//! and turned into jobs and runs by a real worker, on both databases. Slack
//! follow-ups go to a real HTTP server on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{error_code, finished, harness, Harness};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

kiln_db::on_both_databases!(
    github_pushes_start_jobs_and_runs_with_params_from_the_payload,
    bad_signatures_are_refused_and_start_nothing,
    slack_verifies_acknowledges_commands_and_follows_up,
    generic_deliveries_are_signed_with_a_timestamp,
    tenants_neither_see_nor_trigger_each_other,
    hostile_deliveries_and_definitions_get_4xx,
);

const SECRET: &str = "It's a Secret to Everybody";

fn hmac_hex(secret: &str, data: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn post(
    h: &Harness,
    url: &str,
    headers: &[(&str, String)],
    content_type: &str,
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method("POST")
        .uri(url)
        .header("content-type", content_type);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    h.send(request.body(body.into()).unwrap()).await
}

/// A GitHub delivery signed with `secret`.
async fn github(
    h: &Harness,
    url: &str,
    secret: &str,
    event: &str,
    delivery: &str,
    payload: &Value,
) -> (StatusCode, Value) {
    let body = payload.to_string();
    let signature = format!("sha256={}", hmac_hex(secret, body.as_bytes()));
    post(
        h,
        url,
        &[
            ("x-hub-signature-256", signature),
            ("x-github-event", event.to_string()),
            ("x-github-delivery", delivery.to_string()),
        ],
        "application/json",
        body,
    )
    .await
}

async fn put_hook(h: &Harness, key: &str, name: &str, def: Value) -> Value {
    let (status, body) = h
        .call("PUT", &format!("/api/v1/webhooks/{name}"), key, Some(def))
        .await;
    assert!(status.is_success(), "{status} {body}");
    assert!(
        !body.to_string().contains(SECRET),
        "the secret leaked: {body}"
    );
    body
}

async fn jobs_of(h: &Harness, key: &str, hook: &str) -> Vec<Value> {
    let (status, body) = h
        .call(
            "GET",
            &format!("/api/v1/jobs?label=kiln.webhook:{hook}"),
            key,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["jobs"].as_array().unwrap().clone()
}

async fn wait_run(h: &Harness, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, run) = h
            .call("GET", &format!("/api/v1/runs/{id}"), &h.admin, None)
            .await;
        if matches!(
            run["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return run;
        }
        assert!(Instant::now() < deadline, "run {id} stuck: {run}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn github_pushes_start_jobs_and_runs_with_params_from_the_payload(db: kiln_db::Db) {
    let h = harness(db).await;
    let hook = put_hook(
        &h,
        &h.admin,
        "gh",
        json!({"provider": "github", "secret": SECRET,
            "filter": {"events": ["push"], "branches": ["main", "release/*"]},
            "target": {"job": {"kind": "noop",
                "spec": {"stdout": "${payload.ref} ${payload.head_commit.id}"},
                "labels": {"team": "web"}}}}),
    )
    .await;
    let url = hook["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("/api/v1/hooks/wh_"), "{url}");
    let (status, shown) = h.call("GET", "/api/v1/webhooks/gh", &h.admin, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["url"], url);
    assert!(shown.get("secret").is_none(), "{shown}");
    let (_, list) = h.call("GET", "/api/v1/webhooks", &h.admin, None).await;
    assert!(!list.to_string().contains(SECRET));
    assert_eq!(list["webhooks"][0]["name"], "gh");

    let push = json!({"ref": "refs/heads/main", "head_commit": {"id": "abc123"}});
    let (status, first) = github(&h, &url, SECRET, "push", "d-1", &push).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["outcome"], "started");
    let job_id = first["job_id"].as_str().unwrap().to_string();
    let job = h.wait(&job_id, finished).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["stdout"], "refs/heads/main abc123");
    assert_eq!(job["labels"]["kiln.webhook"], "gh");
    assert_eq!(job["labels"]["kiln.delivery"], "d-1");
    assert_eq!(job["labels"]["team"], "web");

    // The same delivery again starts nothing and names the first job.
    let (status, again) = github(&h, &url, SECRET, "push", "d-1", &push).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["outcome"], "duplicate");
    assert_eq!(again["job_id"], job_id.as_str());
    assert_eq!(jobs_of(&h, &h.admin, "gh").await.len(), 1);

    // Filters: another branch, another event, a tag.
    for (event, reference, delivery) in [
        ("push", "refs/heads/dev", "d-2"),
        ("issues", "refs/heads/main", "d-3"),
        ("push", "refs/tags/v1", "d-4"),
    ] {
        let (status, body) = github(
            &h,
            &url,
            SECRET,
            event,
            delivery,
            &json!({"ref": reference}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["outcome"], "skipped", "{body}");
    }
    let (status, body) = github(
        &h,
        &url,
        SECRET,
        "push",
        "d-5",
        &json!({"ref": "refs/heads/release/1.0"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // A ping is answered and starts nothing.
    let (status, body) = github(&h, &url, SECRET, "ping", "d-6", &json!({"zen": "hi"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "answered");
    assert_eq!(jobs_of(&h, &h.admin, "gh").await.len(), 2);

    let (status, log) = h
        .call("GET", "/api/v1/webhooks/gh/deliveries", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{log}");
    let outcomes: Vec<(&str, &str)> = log["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["delivery"].as_str().unwrap(),
                d["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("d-6", "answered"),
            ("d-5", "started"),
            ("d-4", "skipped"),
            ("d-3", "skipped"),
            ("d-2", "skipped"),
            ("d-1", "started"),
        ]
    );
    assert_eq!(log["deliveries"][5]["job_id"], job_id.as_str());

    // A pipeline target, whose pipeline comes after the trigger: the first
    // delivery fails, the sender's redelivery of it then starts the run.
    let hook = put_hook(
        &h,
        &h.admin,
        "ghp",
        json!({"provider": "github", "secret": SECRET,
            "target": {"pipeline": {"name": "build",
                "params": {"branch": "${payload.ref}", "by": "${payload.pusher.name}"}}}}),
    )
    .await;
    let url = hook["url"].as_str().unwrap().to_string();
    let push = json!({"ref": "refs/heads/main", "pusher": {"name": "ada"}});
    let (status, body) = github(&h, &url, SECRET, "push", "p-1", &push).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pipeline"),
        "{body}"
    );
    let def = json!({"name": "build",
        "params": [{"name": "branch", "type": "string"}, {"name": "by", "type": "string"}],
        "steps": [{"id": "a", "kind": "noop", "spec": {"stdout": "${params.branch} by ${params.by}"}}]});
    let (status, body) = h
        .call("POST", "/api/v1/pipelines", &h.admin, Some(def))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = github(&h, &url, SECRET, "push", "p-1", &push).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let run_id = body["run_id"].as_str().unwrap().to_string();
    let run = wait_run(&h, &run_id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        run["params"],
        json!({"branch": "refs/heads/main", "by": "ada"})
    );
    assert_eq!(run["trigger"], "webhook:ghp");
    assert_eq!(run["labels"]["kiln.webhook"], "ghp");
    assert_eq!(run["labels"]["kiln.delivery"], "p-1");
    let (status, again) = github(&h, &url, SECRET, "push", "p-1", &push).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["run_id"], run_id.as_str());
    let (_, runs) = h
        .call("GET", "/api/v1/runs?pipeline=build", &h.admin, None)
        .await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 1);

    // Deleted: the URL is gone.
    let (status, _) = h
        .call("DELETE", "/api/v1/webhooks/ghp", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = github(&h, &url, SECRET, "push", "p-2", &push).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    h.stop().await;
}

async fn bad_signatures_are_refused_and_start_nothing(db: kiln_db::Db) {
    let h = harness(db).await;
    let hook = put_hook(
        &h,
        &h.admin,
        "gh",
        json!({"provider": "github", "secret": SECRET,
            "target": {"job": {"kind": "noop"}}}),
    )
    .await;
    let url = hook["url"].as_str().unwrap().to_string();
    let body = json!({"ref": "refs/heads/main"}).to_string();
    let good = hmac_hex(SECRET, body.as_bytes());
    let event = ("x-github-event", "push".to_string());
    let delivery = ("x-github-delivery", "x-1".to_string());
    for signature in [
        None,
        Some(good.clone()),
        Some(format!(
            "sha256={}",
            hmac_hex("another secret entirely", body.as_bytes())
        )),
        Some(format!(
            "sha256={}",
            hmac_hex(SECRET, b"{\"ref\":\"refs/heads/dev\"}")
        )),
        Some(format!("sha256={}", &good[..40])),
        Some("sha256=not-hex".to_string()),
        Some(format!("sha1={good}")),
    ] {
        let mut headers = vec![event.clone(), delivery.clone()];
        if let Some(signature) = &signature {
            headers.push(("x-hub-signature-256", signature.clone()));
        }
        let (status, answer) = post(&h, &url, &headers, "application/json", body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{signature:?}: {answer}");
        assert_eq!(error_code(&answer), "unauthorized");
    }
    // Unknown or malformed ids say only "not found".
    for other in [
        "/api/v1/hooks/wh_00000000000000000000000000000000",
        "/api/v1/hooks/gh",
        "/api/v1/hooks/..%2F..%2Fetc",
    ] {
        let (status, answer) = post(
            &h,
            other,
            &[
                event.clone(),
                ("x-hub-signature-256", format!("sha256={good}")),
            ],
            "application/json",
            body.clone(),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{other}: {answer}");
    }
    // Unsigned, even to an id that does not exist: 401, nothing looked up.
    let (status, answer) = post(
        &h,
        "/api/v1/hooks/wh_00000000000000000000000000000000",
        std::slice::from_ref(&event),
        "application/json",
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert!(jobs_of(&h, &h.admin, "gh").await.is_empty());
    let (_, log) = h
        .call("GET", "/api/v1/webhooks/gh/deliveries", &h.admin, None)
        .await;
    assert_eq!(
        log["deliveries"],
        json!([]),
        "refused deliveries were logged"
    );
    // The right signature goes through, and the delivery id is now taken.
    let (status, answer) = post(
        &h,
        &url,
        &[
            event.clone(),
            delivery.clone(),
            ("x-hub-signature-256", format!("sha256={good}")),
        ],
        "application/json",
        body,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    h.stop().await;
}

/// A Slack request signed with `secret` at `timestamp`.
async fn slack(
    h: &Harness,
    url: &str,
    secret: &str,
    timestamp: i64,
    content_type: &str,
    body: &str,
) -> (StatusCode, Value) {
    let signed = format!("v0:{timestamp}:{body}");
    let signature = format!("v0={}", hmac_hex(secret, signed.as_bytes()));
    post(
        h,
        url,
        &[
            ("x-slack-request-timestamp", timestamp.to_string()),
            ("x-slack-signature", signature),
        ],
        content_type,
        body.to_string(),
    )
    .await
}

/// An HTTP server on 127.0.0.1 standing in for Slack's `response_url`:
/// every JSON body posted to it comes out of the receiver.
async fn reply_server() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/reply/{token}",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}/reply/t0ken"), rx)
}

async fn slack_verifies_acknowledges_commands_and_follows_up(db: kiln_db::Db) {
    kiln_api::routes::webhooks::allow_reply_urls(vec!["http://127.0.0.1:".into()]);
    let h = harness(db).await;
    let hook = put_hook(
        &h,
        &h.admin,
        "slack",
        json!({"provider": "slack", "secret": SECRET,
            "filter": {"commands": ["/deploy"]},
            "target": {"job": {"kind": "noop",
                "spec": {"sleep_ms": 1500, "stdout": "deployed ${payload.text} for ${payload.user_name}"}}}}),
    )
    .await;
    let url = hook["url"].as_str().unwrap().to_string();

    let challenge =
        json!({"type": "url_verification", "token": "x", "challenge": "c-42"}).to_string();
    let (status, body) = slack(&h, &url, SECRET, now_s(), "application/json", &challenge).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"challenge": "c-42"}));

    // Replays: a signature that was right at a time too far from now.
    for timestamp in [now_s() - 301 - 5, now_s() + 600] {
        let (status, body) =
            slack(&h, &url, SECRET, timestamp, "application/json", &challenge).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    let (status, _) = slack(
        &h,
        &url,
        "wrong secret of enough length",
        now_s(),
        "application/json",
        &challenge,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = post(
        &h,
        &url,
        &[("x-slack-request-timestamp", now_s().to_string())],
        "application/json",
        challenge.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A slash command: acknowledged while the job still runs, its end
    // posted to the response_url.
    let (reply_url, mut replies) = reply_server().await;
    let form = serde_urlencoded::to_string([
        ("command", "/deploy"),
        ("text", "web-1"),
        ("user_name", "ada"),
        ("trigger_id", "13345224609.738474920.8088930838d88f008e0"),
        ("response_url", reply_url.as_str()),
    ])
    .unwrap();
    let asked = Instant::now();
    let (status, ack) = slack(
        &h,
        &url,
        SECRET,
        now_s(),
        "application/x-www-form-urlencoded",
        &form,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert!(asked.elapsed() < Duration::from_secs(3));
    assert_eq!(ack["response_type"], "ephemeral");
    let text = ack["text"].as_str().unwrap();
    assert!(text.starts_with("/deploy: started job "), "{text}");
    let jobs = jobs_of(&h, &h.admin, "slack").await;
    assert_eq!(jobs.len(), 1);
    let job_id = jobs[0]["id"].as_str().unwrap().to_string();
    let (_, job) = h
        .call("GET", &format!("/api/v1/jobs/{job_id}"), &h.admin, None)
        .await;
    assert!(!finished(&job), "acknowledged only after the job: {job}");
    let reply = tokio::time::timeout(Duration::from_secs(30), replies.recv())
        .await
        .expect("no follow-up within 30 s")
        .unwrap();
    let text = reply["text"].as_str().unwrap();
    assert!(text.contains(&format!("job {job_id} succeeded")), "{reply}");
    assert!(text.contains("deployed web-1 for ada"), "{reply}");
    let job = h.wait(&job_id, finished).await;
    assert_eq!(job["status"], "succeeded");

    // Another command is acknowledged, starts nothing, gets no follow-up.
    let form = serde_urlencoded::to_string([
        ("command", "/rollback"),
        ("text", "web-1"),
        ("response_url", reply_url.as_str()),
    ])
    .unwrap();
    let (status, ack) = slack(
        &h,
        &url,
        SECRET,
        now_s(),
        "application/x-www-form-urlencoded",
        &form,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert!(
        ack["text"].as_str().unwrap().contains("nothing started"),
        "{ack}"
    );
    assert_eq!(jobs_of(&h, &h.admin, "slack").await.len(), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), replies.recv())
            .await
            .is_err(),
        "a skipped command was followed up"
    );
    h.stop().await;
}

async fn generic_deliveries_are_signed_with_a_timestamp(db: kiln_db::Db) {
    let h = harness(db).await;
    let hook = put_hook(
        &h,
        &h.admin,
        "ci",
        json!({"provider": "generic", "secret": SECRET,
            "filter": {"events": ["build"]},
            "target": {"job": {"kind": "noop", "spec": {"stdout": "${payload.artifact}"}}}}),
    )
    .await;
    let url = hook["url"].as_str().unwrap().to_string();
    let send =
        |timestamp: i64, secret: &'static str, event: &'static str, delivery: &'static str| {
            let h = &h;
            let url = url.clone();
            async move {
                let body = json!({"artifact": "app.tar"}).to_string();
                let signed = format!("{timestamp}.{body}");
                post(
                    h,
                    &url,
                    &[
                        ("x-kiln-timestamp", timestamp.to_string()),
                        (
                            "x-kiln-signature",
                            format!("sha256={}", hmac_hex(secret, signed.as_bytes())),
                        ),
                        ("x-kiln-event", event.to_string()),
                        ("x-kiln-delivery", delivery.to_string()),
                    ],
                    "application/json",
                    body,
                )
                .await
            }
        };
    let (status, body) = send(now_s(), SECRET, "build", "g-1").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let job = h.wait(body["job_id"].as_str().unwrap(), finished).await;
    assert_eq!(job["result"]["stdout"], "app.tar");
    let (status, again) = send(now_s(), SECRET, "build", "g-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["outcome"], "duplicate");
    assert_eq!(again["job_id"], body["job_id"]);
    let (status, skipped) = send(now_s(), SECRET, "test", "g-2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(skipped["outcome"], "skipped");
    let (status, _) = send(now_s() - 3600, SECRET, "build", "g-3").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(now_s(), "not the secret, but long", "build", "g-4").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Signed without the timestamp: refused.
    let body = json!({"artifact": "app.tar"}).to_string();
    let (status, _) = post(
        &h,
        &url,
        &[
            ("x-kiln-timestamp", now_s().to_string()),
            (
                "x-kiln-signature",
                format!("sha256={}", hmac_hex(SECRET, body.as_bytes())),
            ),
        ],
        "application/json",
        body,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(jobs_of(&h, &h.admin, "ci").await.len(), 1);
    h.stop().await;
}

async fn tenants_neither_see_nor_trigger_each_other(db: kiln_db::Db) {
    let h = harness(db).await;
    let def = |secret: &str| {
        json!({"provider": "github", "secret": secret,
            "target": {"job": {"kind": "noop", "spec": {"stdout": "${webhook}"}}}})
    };
    let ours = put_hook(&h, &h.admin, "gh", def(SECRET)).await;
    let other_secret = "globex's own secret, long enough";
    let theirs = put_hook(&h, &h.other, "gh", def(other_secret)).await;
    assert_ne!(ours["id"], theirs["id"]);
    for (method, path) in [
        ("GET", "/api/v1/webhooks/gh"),
        ("GET", "/api/v1/webhooks/gh/deliveries"),
    ] {
        let (status, body) = h.call(method, path, &h.other, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(!body.to_string().contains(ours["id"].as_str().unwrap()));
    }
    let (_, list) = h.call("GET", "/api/v1/webhooks", &h.other, None).await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 1);
    assert_eq!(list["webhooks"][0]["id"], theirs["id"]);
    // Globex deletes its own; ours stays.
    let (status, _) = h
        .call("DELETE", "/api/v1/webhooks/gh", &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for path in ["/api/v1/webhooks/gh", "/api/v1/webhooks/gh/deliveries"] {
        let (status, _) = h.call("GET", path, &h.other, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) = h
        .call("DELETE", "/api/v1/webhooks/gh", &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h.call("GET", "/api/v1/webhooks/gh", &h.admin, None).await;
    assert_eq!(status, StatusCode::OK);

    // Our URL with their secret does nothing; with ours, the job is ours.
    let url = ours["url"].as_str().unwrap();
    let push = json!({"ref": "refs/heads/main"});
    let (status, _) = github(&h, url, other_secret, "push", "t-1", &push).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = github(&h, url, SECRET, "push", "t-1", &push).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let job = body["job_id"].as_str().unwrap();
    let (status, _) = h
        .call("GET", &format!("/api/v1/jobs/{job}"), &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let done = h.wait(job, finished).await;
    assert_eq!(done["result"]["stdout"], "gh");
    assert!(jobs_of(&h, &h.other, "gh").await.is_empty());

    // Readers read; only writers change.
    let (status, _) = h.call("GET", "/api/v1/webhooks/gh", &h.reader, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h
        .call("PUT", "/api/v1/webhooks/x", &h.reader, Some(def(SECRET)))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h
        .call("DELETE", "/api/v1/webhooks/gh", &h.reader, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.call("GET", "/api/v1/webhooks", "nope", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    h.stop().await;
}

async fn hostile_deliveries_and_definitions_get_4xx(db: kiln_db::Db) {
    let h = harness(db).await;
    let hook = put_hook(
        &h,
        &h.admin,
        "gh",
        json!({"provider": "github", "secret": SECRET,
            "target": {"job": {"kind": "noop", "spec": {"stdout": "${payload.x}"}}}}),
    )
    .await;
    let url = hook["url"].as_str().unwrap().to_string();
    // Replacing keeps the id (the sender's URL) and answers 200.
    let (status, replaced) = h
        .call(
            "PUT",
            "/api/v1/webhooks/gh",
            &h.admin,
            Some(json!({"provider": "github", "secret": SECRET,
                "target": {"job": {"kind": "noop", "spec": {"stdout": "${payload.x}"}}}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["url"], url.as_str());

    // Over 1 MiB, with and without a Content-Length: 413, nothing started.
    let big = format!("{{\"x\": \"{}\"}}", "a".repeat(1 << 20));
    let signature = format!("sha256={}", hmac_hex(SECRET, big.as_bytes()));
    let headers = [
        ("x-hub-signature-256", signature),
        ("x-github-event", "push".to_string()),
    ];
    let mut with_length = headers.to_vec();
    with_length.push(("content-length", big.len().to_string()));
    let (status, body) = post(&h, &url, &with_length, "application/json", big.clone()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(error_code(&body), "too_large");
    let chunks = futures::stream::iter(
        big.into_bytes()
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let (status, body) = post(
        &h,
        &url,
        &headers,
        "application/json",
        Body::from_stream(chunks),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");

    // Signed nonsense: 400, not 500.
    for (content_type, payload, event) in [
        ("application/json", "{not json", "push"),
        ("application/json", "{\"x\": \"\\u0000\"}", "push"),
        ("application/json", "{}", "bad event name"),
        (
            "application/x-www-form-urlencoded",
            "payload=%7Bnope",
            "push",
        ),
    ] {
        let signature = format!("sha256={}", hmac_hex(SECRET, payload.as_bytes()));
        let (status, body) = post(
            &h,
            &url,
            &[
                ("x-hub-signature-256", signature),
                ("x-github-event", event.to_string()),
            ],
            content_type,
            payload.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{payload}: {body}");
    }
    // A template that renders a spec its kind refuses (a whole template
    // keeps the value's type: a number where noop wants text): 422, logged,
    // and the same delivery may come again once it can succeed.
    let (status, body) = github(&h, &url, SECRET, "push", "h-1", &json!({"x": 5})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "invalid_spec");
    let (_, log) = h
        .call(
            "GET",
            "/api/v1/webhooks/gh/deliveries?limit=1",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(log["deliveries"][0]["outcome"], "error", "{log}");
    assert!(jobs_of(&h, &h.admin, "gh").await.is_empty());
    let (status, body) = github(&h, &url, SECRET, "push", "h-1", &json!({"x": "5"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // Definitions are refused with the path of the fault.
    for (name, def, needle) in [
        (
            "a",
            json!({"provider": "github", "secret": "short", "target": {"job": {"kind": "noop"}}}),
            "secret",
        ),
        (
            "a",
            json!({"provider": "gitlab", "secret": SECRET, "target": {"job": {"kind": "noop"}}}),
            "provider",
        ),
        (
            "a",
            json!({"provider": "github", "secret": SECRET, "target": {"job": {"kind": "nope"}}}),
            "target.job: unknown kind",
        ),
        (
            "a",
            json!({"provider": "github", "secret": SECRET,
            "target": {"job": {"kind": "noop", "spec": {"stdout": "${env.HOME}"}}}}),
            "target.job.spec.stdout: unknown reference \"env\"",
        ),
        (
            "a",
            json!({"provider": "github", "secret": SECRET, "target": {"pipeline": {"name": "a/b"}}}),
            "target.pipeline.name",
        ),
        (
            "a",
            json!({"provider": "github", "secret": SECRET, "filter": {"events": [""]}, "target": {"job": {"kind": "noop"}}}),
            "filter.events[0]",
        ),
        (
            "a",
            json!({"provider": "github", "secret": SECRET, "target": {"job": {"kind": "noop"}}, "extra": 1}),
            "unknown field",
        ),
        (
            "a",
            json!({"name": "b", "provider": "github", "secret": SECRET, "target": {"job": {"kind": "noop"}}}),
            "name",
        ),
        ("a", json!("x"), "invalid type"),
        (
            "a%20b",
            json!({"provider": "github", "secret": SECRET, "target": {"job": {"kind": "noop"}}}),
            "name",
        ),
    ] {
        let (status, body) = h
            .call(
                "PUT",
                &format!("/api/v1/webhooks/{name}"),
                &h.admin,
                Some(def),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{needle}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message} lacks {needle}");
    }
    let (status, _) = h
        .raw(
            "PUT",
            "/api/v1/webhooks/a",
            Some(&h.admin),
            "text/plain",
            "x",
        )
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, _) = h
        .call(
            "GET",
            "/api/v1/webhooks/gh/deliveries?limit=0",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = h
        .call(
            "GET",
            "/api/v1/webhooks/gh/deliveries?nope=1",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    h.stop().await;
}
