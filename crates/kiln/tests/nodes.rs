//! Many nodes, one truth, with real processes: an API node and workers on
//! one PostgreSQL database, each with its own data dir as on separate hosts;
//! roles that build only what they use; the first start of a deployment; a
//! frozen worker marked lost while another runs its job.

mod common;

use std::time::Duration;

use common::{free_port, kiln, mode_of, read_key, until_up, wait_until, PgSchema, TempDir};
use serde_json::{json, Value};

/// A module pushed through the API node runs on workers that share nothing
/// with it but the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_modules_pushed_through_another_node() {
    let (schema, db) = PgSchema::new("kiln_nodes").await;
    let url = schema.url();
    let logs = TempDir::new("kiln-nodes-logs");
    let (api_dir, worker_a, worker_b) = (
        TempDir::new("kiln-node-api"),
        TempDir::new("kiln-node-worker-a"),
        TempDir::new("kiln-node-worker-b"),
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let _api = kiln(
        &["api", "--database-url", &url, "--listen", &listen],
        api_dir.path(),
        logs.path(),
        "api.log",
    );
    let worker_args = ["worker", "--database-url", &url, "--slots", "4"];
    let _a = kiln(&worker_args, worker_a.path(), logs.path(), "worker-a.log");
    let _b = kiln(&worker_args, worker_b.path(), logs.path(), "worker-b.log");
    until_up(&base, Duration::from_secs(60)).await;
    wait_until(
        "both workers to register",
        Duration::from_secs(60),
        || async { db.worker_list().await.unwrap().len() == 2 },
    )
    .await;

    let http = reqwest::Client::new();
    let key = read_key(api_dir.path());
    let module: Value = http
        .post(format!("{base}/api/v1/modules"))
        .bearer_auth(&key)
        .header("content-type", "text/plain")
        .body(kiln_wasm::fixtures::hello())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = module["id"].as_str().unwrap_or_else(|| panic!("{module}"));

    let mut ran_on = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let job: Value = http
            .post(format!("{base}/api/v1/jobs?wait=true"))
            .bearer_auth(&key)
            .json(&json!({"kind": "wasm", "spec": {"module": id}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let job = finished(&http, &base, &key, &job).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["result"]["stdout"], "hello world\n", "{job}");
        ran_on.insert(job["worker_id"].as_str().unwrap_or("").to_string());
    }
    assert!(
        ran_on.iter().all(|w| !w.is_empty()),
        "every job names its worker: {ran_on:?}"
    );
    assert!(
        !api_dir.join("wasm-cache").exists(),
        "the API node keeps no compiled modules"
    );
    for dir in [&api_dir, &worker_a, &worker_b] {
        assert!(
            !dir.join("blobs").exists(),
            "no node keeps blobs on its own disk"
        );
    }
    db.close().await;
}

async fn get_json(http: &reqwest::Client, url: &str, key: &str) -> Value {
    http.get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The job once it has finished (`?wait=true` may answer before).
async fn finished(http: &reqwest::Client, base: &str, key: &str, job: &Value) -> Value {
    let id = job["id"].as_str().unwrap_or_else(|| panic!("{job}"));
    let mut job = job.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !["succeeded", "failed", "dead", "cancelled"]
        .contains(&job["status"].as_str().unwrap_or(""))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never finished: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        job = get_json(http, &format!("{base}/api/v1/jobs/{id}"), key).await;
    }
    job
}

/// Several API nodes starting together on an empty database make one
/// admin key between them, written by the node that made it. The test holds
/// the key table locked until every node waits on it, so all of them find
/// the database empty at the same moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_nodes_starting_together_make_one_admin_key() {
    use sqlx::Connection;
    let (schema, db) = PgSchema::new("kiln_first_key").await;
    let url = schema.url();
    let mut gate = sqlx::PgConnection::connect(&kiln_db::testing::postgres_url())
        .await
        .unwrap();
    let mut held = gate.begin().await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE \"{}\".api_keys IN ACCESS EXCLUSIVE MODE",
        schema.name
    ))
    .execute(&mut *held)
    .await
    .unwrap();

    let logs = TempDir::new("kiln-first-key-logs");
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("kiln-first-key")).collect();
    let bases: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let _nodes: Vec<common::Proc> = dirs
        .iter()
        .zip(&bases)
        .enumerate()
        .map(|(i, (dir, listen))| {
            kiln(
                &["api", "--database-url", &url, "--listen", listen],
                dir.path(),
                logs.path(),
                &format!("api-{i}.log"),
            )
        })
        .collect();
    let waiting = format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
         WHERE c.relname = 'api_keys' AND c.relnamespace = '\"{}\"'::regnamespace \
         AND NOT l.granted",
        schema.name
    );
    let mut watch = sqlx::PgConnection::connect(&kiln_db::testing::postgres_url())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = sqlx::query_scalar(&waiting)
            .fetch_one(&mut watch)
            .await
            .unwrap();
        if n == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} nodes wait on the key table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    held.rollback().await.unwrap();

    for listen in &bases {
        until_up(&format!("http://{listen}"), Duration::from_secs(60)).await;
    }
    assert_eq!(db.key_count().await.unwrap(), 1);
    let written: Vec<_> = dirs
        .iter()
        .filter(|d| d.join("admin.key").exists())
        .collect();
    assert_eq!(written.len(), 1, "one node wrote admin.key");
    let key = read_key(written[0].path());
    for listen in &bases {
        let status = reqwest::Client::new()
            .get(format!("http://{listen}/api/v1/jobs"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "the key works on every node: {status}");
    }
    db.close().await;
}

/// `kiln api` and `kiln scheduler` build no VM manager, so they do not take
/// the VM directory's lock: they can share a data dir holding a guest image
/// with the worker that runs its VMs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_worker_share_a_data_dir() {
    let dir = TempDir::new("kiln-shared-dir");
    let logs = TempDir::new("kiln-shared-dir-logs");
    let data = dir.join("data");
    common::install_test_image(&data).await;
    let mut worker = kiln(
        &["worker", "--vm-warm", "0"],
        &data,
        logs.path(),
        "worker.log",
    );
    // The worker owns the VM dir once its lock file exists.
    wait_until(
        "the worker to take the VM dir",
        Duration::from_secs(300),
        || async { data.join("vms/.lock").exists() },
    )
    .await;
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let mut api = kiln(&["api", "--listen", &listen], &data, logs.path(), "api.log");
    let mut scheduler = kiln(&["scheduler"], &data, logs.path(), "scheduler.log");
    until_up(&base, Duration::from_secs(60)).await;
    let key = read_key(&data);
    let http = reqwest::Client::new();
    let pushed = http
        .post(format!("{base}/api/v1/modules"))
        .bearer_auth(&key)
        .header("content-type", "text/plain")
        .body(kiln_wasm::fixtures::hello())
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success(), "{}", pushed.status());
    let vms = http
        .get(format!("{base}/api/v1/vms"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(vms.status(), 503, "the API node runs no VMs");
    assert!(api.0.try_wait().unwrap().is_none(), "the API is running");
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker is running"
    );
    let scheduler_log = logs.join("scheduler.log");
    wait_until(
        "the scheduler to start or stop",
        Duration::from_secs(60),
        || async {
            let log = std::fs::read_to_string(&scheduler_log).unwrap_or_default();
            log.contains("roles started") || log.contains("kiln:")
        },
    )
    .await;
    assert!(
        scheduler.0.try_wait().unwrap().is_none(),
        "the scheduler is running: {}",
        std::fs::read_to_string(&scheduler_log).unwrap_or_default()
    );
}

/// A new data dir is private to its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_data_dir_is_private() {
    let dir = TempDir::new("kiln-private");
    let logs = TempDir::new("kiln-private-logs");
    let data = dir.join("nested/data");
    let listen = format!("127.0.0.1:{}", free_port());
    let _serve = kiln(
        &["serve", "--listen", &listen],
        &data,
        logs.path(),
        "serve.log",
    );
    until_up(&format!("http://{listen}"), Duration::from_secs(60)).await;
    assert_eq!(mode_of(&data), 0o700, "data dir mode {:o}", mode_of(&data));
    assert_eq!(mode_of(&data.join("admin.key")), 0o600);
}

/// A worker frozen (SIGSTOP) in the middle of a job stops heartbeating: the
/// scheduler marks its node lost with a `node.lost` event and an incident,
/// another worker runs the job once the lease runs out, and the thawed
/// worker's node is online again, its incident resolved by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_is_marked_lost_and_its_job_runs_elsewhere() {
    let (schema, db) = PgSchema::new("kiln_nodes_lost").await;
    let url = schema.url();
    let logs = TempDir::new("kiln-lost-logs");
    let dirs = [
        TempDir::new("kiln-lost-api"),
        TempDir::new("kiln-lost-scheduler"),
        TempDir::new("kiln-lost-worker-a"),
        TempDir::new("kiln-lost-worker-b"),
    ];
    let fast = ["--node-heartbeat-ms", "300", "--node-lost-ms", "1500"];
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let with = |role: &[&str]| -> Vec<String> {
        role.iter()
            .chain(["--database-url", url.as_str()].iter())
            .chain(fast.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let api_args = with(&["api", "--listen", &listen]);
    let _api = kiln(&args(&api_args), dirs[0].path(), logs.path(), "api.log");
    let scheduler_args = with(&["scheduler"]);
    let _scheduler = kiln(
        &args(&scheduler_args),
        dirs[1].path(),
        logs.path(),
        "scheduler.log",
    );
    let worker_args = with(&["worker", "--slots", "1", "--lease-ms", "3000"]);
    let a = kiln(
        &args(&worker_args),
        dirs[2].path(),
        logs.path(),
        "worker-a.log",
    );
    until_up(&base, Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    let key = read_key(dirs[0].path());
    let nodes = async || -> Value { get_json(&http, &format!("{base}/api/v1/nodes"), &key).await };
    let a_node = format!("-{}", a.0.id());
    wait_until("worker A's node", Duration::from_secs(60), || async {
        nodes().await.to_string().contains(&a_node)
    })
    .await;

    let job: Value = http
        .post(format!("{base}/api/v1/jobs"))
        .bearer_auth(&key)
        .json(&json!({"kind": "noop", "spec": {"sleep_ms": 2000}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    wait_until(
        "worker A to start the job",
        Duration::from_secs(30),
        || async {
            let now: Value = get_json(&http, &format!("{base}/api/v1/jobs/{job_id}"), &key).await;
            now["status"] == "running"
        },
    )
    .await;
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &a.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    let node_of_a = |list: &Value| {
        list["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"].as_str().is_some_and(|id| id.ends_with(&a_node)))
            .cloned()
            .unwrap_or(Value::Null)
    };
    wait_until("worker A marked lost", Duration::from_secs(30), || async {
        node_of_a(&nodes().await)["status"] == "lost"
    })
    .await;
    // Readers see an event once PostgreSQL's sequencer has numbered it,
    // a moment after the change committed.
    wait_until("the node.lost event", Duration::from_secs(10), || async {
        let events: Value = get_json(
            &http,
            &format!("{base}/api/v1/events?type=node.lost&after=0"),
            &key,
        )
        .await;
        events["events"].as_array().is_some_and(|events| {
            events.iter().any(|e| {
                e["resource"]["id"]
                    .as_str()
                    .is_some_and(|id| id.ends_with(&a_node))
            })
        })
    })
    .await;

    // The scheduler's detectors opened an incident for it.
    let incidents = async || -> Vec<Value> {
        let list: Value = get_json(&http, &format!("{base}/api/v1/incidents"), &key).await;
        list["incidents"].as_array().cloned().unwrap_or_default()
    };
    let of_a = |list: &[Value]| {
        list.iter()
            .find(|i| {
                i["fingerprint"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("node_lost:") && f.ends_with(&a_node))
            })
            .cloned()
            .unwrap_or(Value::Null)
    };
    wait_until(
        "an incident for worker A",
        Duration::from_secs(30),
        || async { of_a(&incidents().await)["status"] == "open" },
    )
    .await;

    // Another worker takes the job once A's lease runs out.
    let _b = kiln(
        &args(&worker_args),
        dirs[3].path(),
        logs.path(),
        "worker-b.log",
    );
    let done = finished(&http, &base, &key, &job).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2, "A's attempt was lost, B's ran: {done}");

    signal("-CONT");
    wait_until("worker A online again", Duration::from_secs(30), || async {
        node_of_a(&nodes().await)["status"] == "online"
    })
    .await;
    wait_until(
        "A's incident resolved by itself",
        Duration::from_secs(30),
        || async {
            let incident = of_a(&incidents().await);
            incident["status"] == "resolved" && incident["resolved_by"] == "automatic"
        },
    )
    .await;
    drop(db);
}
