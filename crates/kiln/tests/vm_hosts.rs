//! VMs across hosts, with real processes on one PostgreSQL database: an API
//! node that hosts no VM, two workers that do (each with its own data dir,
//! as on separate machines) and a scheduler. A VM created through the API
//! node lives on a worker and is executed, streamed, copied to, queued for
//! and deleted through the API node; a worker killed with its VM leaves
//! the VM lost, and the command queued for it failed.

mod common;

use std::time::Duration;

use common::{
    free_port, install_test_image, kiln, read_key, until_up, wait_until, PgSchema, TempDir,
};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const HEARTBEAT: &str = "300";
const LOST: &str = "3000";

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http.request(method, url).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_created_through_an_api_node_live_on_workers_and_are_lost_with_them() {
    let (schema, db) = PgSchema::new("kiln_vm_hosts").await;
    let url = schema.url();
    let logs = TempDir::new("kiln-vm-hosts-logs");
    let api_dir = TempDir::new("kiln-vm-hosts-api");
    let sched_dir = TempDir::new("kiln-vm-hosts-sched");
    let timing = ["--node-heartbeat-ms", HEARTBEAT, "--node-lost-ms", LOST];
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let mut args = vec!["api", "--database-url", &url, "--listen", &listen];
    args.extend(timing);
    let _api = kiln(&args, api_dir.path(), logs.path(), "api.log");
    let mut args = vec!["scheduler", "--database-url", &url];
    args.extend(timing);
    let _scheduler = kiln(&args, sched_dir.path(), logs.path(), "scheduler.log");
    let mut workers = Vec::new();
    for name in ["a", "b"] {
        let dir = TempDir::new(&format!("kiln-vm-host-{name}"));
        install_test_image(dir.path()).await;
        let internal = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "worker",
            "--database-url",
            &url,
            "--internal-listen",
            &internal,
            "--vm-warm",
            "0",
        ];
        args.extend(timing);
        let process = kiln(
            &args,
            dir.path(),
            logs.path(),
            &format!("worker-{name}.log"),
        );
        workers.push((process, dir, internal));
    }
    until_up(&base, Duration::from_secs(60)).await;
    wait_until(
        "both VM hosts to report",
        Duration::from_secs(180),
        || async { db.vm_host_candidates(0, 0).await.unwrap().len() == 2 },
    )
    .await;
    let hosts = db.vm_host_candidates(0, 0).await.unwrap();

    let http = reqwest::Client::new();
    let key = read_key(api_dir.path());
    let (status, other) = call(
        &http,
        reqwest::Method::POST,
        &format!("{base}/api/v1/keys"),
        &key,
        Some(json!({"name": "other", "scopes": ["admin"], "tenant": "other"})),
    )
    .await;
    assert_eq!(status, 201, "{other}");
    let other = other["secret"].as_str().unwrap().to_string();

    // Created through the API node, which has no VMs: placed on a worker.
    let (status, vm) = call(
        &http,
        reqwest::Method::POST,
        &format!("{base}/api/v1/vms"),
        &key,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 201, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let owner = id
        .split_once('@')
        .map(|(_, host)| host.to_string())
        .expect("the id names its host");
    assert!(
        hosts.iter().any(|h| h.tag == owner),
        "{owner} is one of {hosts:?}"
    );
    let vm_url = format!("{base}/api/v1/vms/{id}");

    // Listed from any node, by the tenant only.
    let (_, list) = call(
        &http,
        reqwest::Method::GET,
        &format!("{base}/api/v1/vms"),
        &key,
        None,
    )
    .await;
    assert_eq!(list["vms"][0]["id"], id, "{list}");
    assert_eq!(list["vms"][0]["status"], "running", "{list}");
    let (_, list) = call(
        &http,
        reqwest::Method::GET,
        &format!("{base}/api/v1/vms"),
        &other,
        None,
    )
    .await;
    assert_eq!(list["vms"], json!([]), "{list}");

    // Read and executed through the API node.
    let (status, got) = call(&http, reqwest::Method::GET, &vm_url, &key, None).await;
    assert_eq!(
        (status, got["id"].as_str()),
        (200, Some(id.as_str())),
        "{got}"
    );
    let (status, ran) = call(
        &http,
        reqwest::Method::POST,
        &format!("{vm_url}/execute"),
        &key,
        Some(json!({"command": "sh", "args": ["-c", "echo hi from $(hostname)"]})),
    )
    .await;
    assert_eq!(status, 200, "{ran}");
    assert!(
        ran["stdout"].as_str().unwrap().starts_with("hi from"),
        "{ran}"
    );
    // Another tenant finds nothing there, on any route, and cannot forge
    // its way in by sending the forwarding headers itself.
    let (status, _) = call(&http, reqwest::Method::GET, &vm_url, &other, None).await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &http,
        reqwest::Method::POST,
        &format!("{vm_url}/execute"),
        &other,
        Some(json!({"command": "true"})),
    )
    .await;
    assert_eq!(status, 404);
    let forged = http
        .post(format!("{vm_url}/execute"))
        .bearer_auth(&other)
        .header(
            "x-kiln-forwarded",
            json!({"tenant": "default", "key_id": "x", "scopes": "admin", "expires": i64::MAX})
                .to_string(),
        )
        .header("x-kiln-forwarded-mac", "00")
        .json(&json!({"command": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 404);
    // The owner's internal listener takes nothing that is not signed.
    let owner_internal = &workers
        .iter()
        .find(|(_, _, internal)| {
            hosts
                .iter()
                .any(|h| h.tag == owner && h.url.ends_with(internal.as_str()))
        })
        .expect("the owner is one of the workers")
        .2;
    let direct = http
        .post(format!("http://{owner_internal}/api/v1/vms/{id}/execute"))
        .bearer_auth(&key)
        .json(&json!({"command": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status().as_u16(), 401);

    // Files both ways.
    let put = http
        .put(format!("{vm_url}/files?path=/tmp/copied"))
        .bearer_auth(&key)
        .body(b"across hosts\n".to_vec())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.text().await.unwrap());
    let got = http
        .get(format!("{vm_url}/files?path=/tmp/copied"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status().as_u16(), 200);
    assert_eq!(&got.bytes().await.unwrap()[..], b"across hosts\n");

    // Streamed: the WebSocket upgrade goes through to the owner.
    let mut request = format!("ws://{listen}/api/v1/vms/{id}/exec/ws")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::Text(
        json!({"command": "sh", "args": ["-c", "cat; cat /tmp/copied"]})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Text(
        json!({"stdin": "typed\n", "eof": true}).to_string().into(),
    ))
    .await
    .unwrap();
    let (mut stdout, mut exit) = (Vec::new(), None);
    let collect = async {
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Binary(data) if data.first() == Some(&1) => {
                    stdout.extend_from_slice(&data[1..])
                }
                Message::Text(text) => exit = Some(serde_json::from_str::<Value>(&text).unwrap()),
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(90), collect)
        .await
        .expect("the socket closes");
    assert_eq!(String::from_utf8_lossy(&stdout), "typed\nacross hosts\n");
    assert_eq!(
        exit.as_ref().map(|e| e["exit_code"].clone()),
        Some(json!(0)),
        "{exit:?}"
    );

    // A queued command goes to the owner's own kind, which only it leases.
    let (status, job) = call(
        &http,
        reqwest::Method::POST,
        &format!("{base}/api/v1/jobs"),
        &key,
        Some(json!({"kind": "vm:execute", "spec": {"vm_id": id, "command": "cat", "args": ["/tmp/copied"]}})),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["kind"], format!("vm:execute@{owner}"));
    let job = finished(&http, &base, &key, &job).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["stdout"], "across hosts\n", "{job}");

    // Every command is in the history, whichever node it came through.
    let (_, history) = call(
        &http,
        reqwest::Method::GET,
        &format!("{vm_url}/executions"),
        &key,
        None,
    )
    .await;
    assert!(
        history["executions"].as_array().map_or(0, Vec::len) >= 3,
        "{history}"
    );

    // Deleted through the API node.
    let (status, _) = call(&http, reqwest::Method::DELETE, &vm_url, &other, None).await;
    assert_eq!(status, 404);
    let (status, _) = call(&http, reqwest::Method::DELETE, &vm_url, &key, None).await;
    assert_eq!(status, 204);
    let (status, _) = call(&http, reqwest::Method::GET, &vm_url, &key, None).await;
    assert_eq!(status, 404);
    wait_until(
        "the deleted VM to leave the list",
        Duration::from_secs(10),
        || async {
            let (_, list) = call(
                &http,
                reqwest::Method::GET,
                &format!("{base}/api/v1/vms"),
                &key,
                None,
            )
            .await;
            list["vms"] == json!([])
        },
    )
    .await;

    // A VM whose host is killed is lost; so is what was queued for it.
    let (status, vm) = call(
        &http,
        reqwest::Method::POST,
        &format!("{base}/api/v1/vms"),
        &key,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 201, "{vm}");
    let doomed = vm["id"].as_str().unwrap().to_string();
    let doomed_host = doomed.split_once('@').unwrap().1.to_string();
    let host_url = db.vm_host_get(&doomed_host).await.unwrap().unwrap().url;
    let index = workers
        .iter()
        .position(|(_, _, internal)| host_url.ends_with(internal.as_str()))
        .unwrap();
    let (mut killed, _dir, _) = workers.remove(index);
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    let (status, queued) = call(
        &http,
        reqwest::Method::POST,
        &format!("{base}/api/v1/jobs"),
        &key,
        Some(json!({"kind": "vm:execute", "spec": {"vm_id": doomed, "command": "true"}})),
    )
    .await;
    assert_eq!(status, 201, "{queued}");
    let doomed_url = format!("{base}/api/v1/vms/{doomed}");
    wait_until(
        "the VM to be marked lost",
        Duration::from_secs(60),
        || async {
            call(&http, reqwest::Method::GET, &doomed_url, &key, None)
                .await
                .0
                == 410
        },
    )
    .await;
    let (status, body) = call(
        &http,
        reqwest::Method::POST,
        &format!("{doomed_url}/execute"),
        &key,
        Some(json!({"command": "true"})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (410, Some("vm_lost")),
        "{body}"
    );
    let lost = db.vm_get("default", &doomed).await.unwrap().unwrap();
    assert_eq!(lost.status, "lost");
    let queued = finished(&http, &base, &key, &queued).await;
    assert_eq!(queued["status"], "failed", "{queued}");
    assert!(
        queued["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("vm_lost"),
        "{queued}"
    );
    // The event log numbers events a moment after they commit (the
    // PostgreSQL sequencer): the event is waited for, not raced.
    let events_url = format!("{base}/api/v1/events?type=vm.lost&after=0");
    wait_until("the vm.lost event", Duration::from_secs(30), || async {
        let (_, events) = call(&http, reqwest::Method::GET, &events_url, &key, None).await;
        events["events"].as_array().is_some_and(|e| !e.is_empty())
    })
    .await;
    let (_, events) = call(&http, reqwest::Method::GET, &events_url, &key, None).await;
    assert_eq!(events["events"][0]["resource"]["id"], doomed, "{events}");
    // The survivor still takes new VMs.
    let (status, vm) = call(
        &http,
        reqwest::Method::POST,
        &format!("{base}/api/v1/vms"),
        &key,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 201, "{vm}");
    assert_ne!(
        vm["id"].as_str().unwrap().split_once('@').unwrap().1,
        doomed_host
    );
    db.close().await;
}

/// The job once it has finished.
async fn finished(http: &reqwest::Client, base: &str, key: &str, job: &Value) -> Value {
    let id = job["id"].as_str().unwrap_or_else(|| panic!("{job}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, job) = call(
            http,
            reqwest::Method::GET,
            &format!("{base}/api/v1/jobs/{id}"),
            key,
            None,
        )
        .await;
        if ["succeeded", "failed", "dead", "cancelled"]
            .contains(&job["status"].as_str().unwrap_or(""))
        {
            return job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never finished: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
