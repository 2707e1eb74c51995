//! `kiln serve --nats-url`: a job submitted through the API shows up in
//! JetStream as its events, published by the real binary to a real
//! `nats-server` the test starts; a request on `kiln.submit.<queue>`
//! submits a job, and a bad one is answered with the API's error.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, kiln, read_key, until_up, TempDir};

#[tokio::test]
async fn serve_publishes_events_and_takes_submissions() {
    let dir = TempDir::new("kiln-serve-nats");
    let nats_port = free_port();
    let mut nats = Command::new("nats-server")
        .args([
            "-a",
            "127.0.0.1",
            "-p",
            &nats_port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(dir.join("nats"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server (Debian's nats-server package; .ci/run installs it)");
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let data = dir.join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let _serve = kiln(
        &[
            "serve",
            "--listen",
            &listen,
            "--vm-warm",
            "0",
            "--nats-url",
            &nats_url,
        ],
        &data,
        dir.path(),
        "serve.log",
    );
    until_up(&base, Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    let job: serde_json::Value = http
        .post(format!("{base}/api/v1/jobs"))
        .bearer_auth(read_key(&data))
        .json(&serde_json::json!({"kind": "noop", "spec": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();

    let deadline = Instant::now() + Duration::from_secs(30);
    let subjects = loop {
        let mut subjects = Vec::new();
        if let Ok(client) = async_nats::connect(&nats_url).await {
            let js = async_nats::jetstream::new(client);
            if let Ok(mut stream) = js.get_stream("KILN").await {
                let n = stream.info().await.map(|i| i.state.messages).unwrap_or(0);
                for seq in 1..=n {
                    let message = stream.get_raw_message(seq).await.unwrap();
                    let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
                    if body["resource"]["id"] == serde_json::json!(id) {
                        subjects.push(message.subject.to_string());
                    }
                }
            }
        }
        if subjects.len() >= 3 {
            break subjects;
        }
        assert!(
            Instant::now() < deadline,
            "events of job {id} not in JetStream: {subjects:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        subjects,
        [
            "kiln.events.default.job.queued",
            "kiln.events.default.job.started",
            "kiln.events.default.job.succeeded"
        ]
    );

    // Intake: a request on kiln.submit.<queue> with a job and a key.
    let client = async_nats::connect(&nats_url).await.unwrap();
    let submit = |headers: Option<(&'static str, String)>, body: &str| {
        let client = client.clone();
        let body = body.to_string();
        async move {
            let mut map = async_nats::HeaderMap::new();
            if let Some((name, value)) = headers {
                map.insert(name, value.as_str());
            }
            let reply = tokio::time::timeout(
                Duration::from_secs(10),
                client.request_with_headers("kiln.submit.intake.eu", map, body.into()),
            )
            .await
            .expect("no answer")
            .unwrap();
            serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap()
        }
    };
    let bearer = || Some(("Authorization", format!("Bearer {}", read_key(&data))));
    let made = submit(bearer(), r#"{"kind": "noop", "spec": {}}"#).await;
    let job_id = made["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{made}"))
        .to_string();
    let job: serde_json::Value = http
        .get(format!("{base}/api/v1/jobs/{job_id}"))
        .bearer_auth(read_key(&data))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["queue"], "intake.eu", "{job}");
    for (headers, body, code) in [
        (bearer(), "not json", "bad_request"),
        (bearer(), r#"{"kind": "nope", "spec": {}}"#, "unknown_kind"),
        (
            bearer(),
            r#"{"kind": "noop", "spec": {}, "queue": "other"}"#,
            "invalid",
        ),
        (None, r#"{"kind": "noop", "spec": {}}"#, "unauthorized"),
        (
            Some(("Authorization", "Bearer kiln_not_a_key".to_string())),
            r#"{"kind": "noop", "spec": {}}"#,
            "unauthorized",
        ),
    ] {
        let answer = submit(headers, body).await;
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }
    let _ = nats.kill();
    let _ = nats.wait();
}
