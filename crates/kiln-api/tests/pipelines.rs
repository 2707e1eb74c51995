//! Pipelines, runs and schedules through the HTTP API, with a real worker,
//! the advancer and the scheduler running, on both databases.

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::{error_code, harness, Harness};
use kiln_core::{Scope, Scopes};
use kiln_db::Db;
use kiln_wasm::fixtures;
use serde_json::{json, Value};

kiln_db::on_both_databases!(
    apply_version_and_refuse_bad_definitions,
    a_run_passes_data_from_noop_to_wasm_and_on,
    runs_are_listed_cancelled_and_retried,
    approvals_need_the_approve_scope,
    schedules_through_the_api,
    artifacts_travel_from_a_fan_out_into_a_fan_in,
    artifacts_live_on_s3,
    artifacts_go_from_a_vm_step_into_a_wasm_step,
    a_fan_out_wider_than_the_slots_strands_no_step,
);

async fn wait_run(h: &Harness, id: &str) -> Value {
    wait_run_for(h, id, Duration::from_secs(30)).await
}

fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {run}"))
}

async fn apply_version_and_refuse_bad_definitions(db: Db) {
    let h = harness(db).await;
    let def = json!({"name": "p", "steps": [{"id": "a", "kind": "noop"}]});
    let (status, body) = h
        .call("POST", "/api/v1/pipelines", &h.admin, Some(def.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["version"], 1);
    let (_, body) = h
        .call("POST", "/api/v1/pipelines", &h.admin, Some(def))
        .await;
    assert_eq!(body["version"], 2);
    let (status, body) = h
        .call("GET", "/api/v1/pipelines/p/versions", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["versions"].as_array().unwrap().len(), 2);
    let (status, _) = h
        .call("GET", "/api/v1/pipelines/p?version=1", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    for (def, needle) in [
        (
            json!({"name": "c", "steps": [
                {"id": "a", "kind": "noop", "depends_on": ["b"]},
                {"id": "b", "kind": "noop", "depends_on": ["a"]}]}),
            "cycle: ",
        ),
        (
            json!({"name": "c", "steps": [{"id": "a", "kind": "nope"}]}),
            "steps[0].kind: unknown kind",
        ),
        (
            json!({"name": "c", "steps": [{"id": "a", "kind": "wasm", "spec": {"module": "nope"}}]}),
            "steps[0].spec",
        ),
        (
            json!({"name": "c", "steps": [{"id": "a", "kind": "noop", "spec": {"stdout": "${steps.zz.stdout}"}}]}),
            "steps[0].spec.stdout: unknown step \"zz\"",
        ),
        (
            json!({"name": "c", "steps": [{"id": "a", "kind": "noop"}, {"id": "a", "kind": "noop"}]}),
            "steps[1].id: duplicate step id",
        ),
    ] {
        let (status, body) = h
            .call("POST", "/api/v1/pipelines", &h.admin, Some(def))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(error_code(&body), "invalid_pipeline");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message} lacks {needle}");
    }
    // A reader may not apply; another tenant does not see it.
    let (status, _) = h
        .call(
            "POST",
            "/api/v1/pipelines",
            &h.reader,
            Some(json!({"name": "x", "steps": []})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.call("GET", "/api/v1/pipelines/p", &h.other, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h
        .call("DELETE", "/api/v1/pipelines/p", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, body) = h.call("GET", "/api/v1/pipelines", &h.admin, None).await;
    assert_eq!(body["pipelines"], json!([]));
    h.stop().await;
}

async fn a_run_passes_data_from_noop_to_wasm_and_on(db: Db) {
    let h = harness(db).await;
    let echo = h.push(&fixtures::echo()).await;
    let def = json!({"name": "data", "params": [{"name": "suffix", "type": "string", "default": "!"}],
    "steps": [
        {"id": "a", "kind": "noop", "spec": {"stdout": "{\"greeting\": \"hi\", \"n\": 3}"}},
        {"id": "b", "kind": "wasm", "depends_on": ["a"],
         "spec": {"module": echo, "stdin": "${steps.a.output.greeting} x${steps.a.output.n}"}},
        {"id": "c", "kind": "noop", "depends_on": ["b"], "spec": {"stdout": "${steps.b.stdout}${params.suffix}"}},
    ]});
    let (status, body) = h
        .call("POST", "/api/v1/pipelines", &h.admin, Some(def))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, run) = h
        .call(
            "POST",
            "/api/v1/pipelines/data/runs",
            &h.admin,
            Some(json!({"params": {"suffix": "?"}, "idempotency_key": "once"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    let (status, again) = h
        .call(
            "POST",
            "/api/v1/pipelines/data/runs",
            &h.admin,
            Some(json!({"idempotency_key": "once"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["id"], run["id"]);
    let run = wait_run(&h, &id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let job = step(&run, "c")["instances"][0]["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, job) = h
        .call("GET", &format!("/api/v1/jobs/{job}"), &h.admin, None)
        .await;
    assert_eq!(job["spec"]["stdout"], "hi x3?");
    assert_eq!(job["labels"]["kiln.run"], json!(id));
    assert!(step(&run, "b")["finished_at"].is_string());
    // Another tenant cannot see it.
    let (status, _) = h
        .call("GET", &format!("/api/v1/runs/{id}"), &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = h
        .call("POST", "/api/v1/pipelines/nope/runs", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/pipelines/data/runs",
            &h.admin,
            Some(json!({"params": {"suffix": 1}})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    h.stop().await;
}

async fn runs_are_listed_cancelled_and_retried(db: Db) {
    let h = harness(db).await;
    let def = json!({"name": "slow", "steps": [
        {"id": "wait", "kind": "noop", "spec": {"sleep_ms": 60000}},
        {"id": "after", "kind": "noop", "depends_on": ["wait"]},
    ]});
    h.call("POST", "/api/v1/pipelines", &h.admin, Some(def))
        .await;
    let (_, run) = h
        .call("POST", "/api/v1/pipelines/slow/runs", &h.admin, None)
        .await;
    let id = run["id"].as_str().unwrap().to_string();
    // Wait for the sleeping job to be running, then cancel the run.
    let job = run["steps"][0]["instances"][0]["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    h.wait(&job, |j| j["status"] == "running").await;
    let started = Instant::now();
    let (status, body) = h
        .call("POST", &format!("/api/v1/runs/{id}/cancel"), &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let run = wait_run(&h, &id).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(run["status"], "cancelled");
    assert_eq!(step(&run, "wait")["status"], "cancelled");
    assert_eq!(step(&run, "after")["status"], "skipped");
    let (status, body) = h
        .call("POST", &format!("/api/v1/runs/{id}/cancel"), &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    // Retried, it runs the steps that did not succeed.
    let (status, body) = h
        .call("POST", &format!("/api/v1/runs/{id}/retry"), &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["attempt"], 2);
    h.call("POST", &format!("/api/v1/runs/{id}/cancel"), &h.admin, None)
        .await;
    wait_run(&h, &id).await;
    let (_, list) = h
        .call("GET", "/api/v1/runs?pipeline=slow&limit=10", &h.admin, None)
        .await;
    assert_eq!(list["runs"].as_array().unwrap().len(), 1);
    assert!(list["runs"][0].get("steps").is_none());
    for bad in ["status=nope", "limit=0", "label=nocolon", "cursor=x"] {
        let (status, _) = h
            .call("GET", &format!("/api/v1/runs?{bad}"), &h.admin, None)
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    let (status, _) = h.call("GET", "/api/v1/runs/abc", &h.admin, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    h.stop().await;
}

async fn approvals_need_the_approve_scope(db: Db) {
    let h = harness(db).await;
    let def = json!({"name": "rel", "steps": [
        {"id": "build", "kind": "noop"},
        {"id": "ok", "kind": "approval", "depends_on": ["build"]},
        {"id": "release", "kind": "noop", "depends_on": ["ok"]},
    ]});
    h.call("POST", "/api/v1/pipelines", &h.admin, Some(def))
        .await;
    let (_, run) = h
        .call("POST", "/api/v1/pipelines/rel/runs", &h.admin, None)
        .await;
    let id = run["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, run) = h
            .call("GET", &format!("/api/v1/runs/{id}"), &h.admin, None)
            .await;
        if step(&run, "ok")["status"] == "waiting" {
            break;
        }
        assert!(Instant::now() < deadline, "{run}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let writer = kiln_api::issue_key(&h.db, "acme", "w", Scopes(vec![Scope::Write]))
        .await
        .unwrap()
        .1;
    let approver = kiln_api::issue_key(&h.db, "acme", "a", Scopes(vec![Scope::Approve]))
        .await
        .unwrap()
        .1;
    let path = format!("/api/v1/runs/{id}/steps/ok/approve");
    let (status, _) = h
        .call("POST", &path, &writer, Some(json!({"comment": "ship"})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.call("POST", &path, &h.other, Some(json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another tenant's run");
    let (status, body) = h
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/steps/build/approve"),
            &approver,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = h
        .call(
            "POST",
            &path,
            &approver,
            Some(json!({"comment": "ship it"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let detail = &step(&body, "ok")["detail"];
    assert_eq!(detail["comment"], "ship it");
    assert!(detail["by"].as_str().unwrap().starts_with("key:"));
    let run = wait_run(&h, &id).await;
    assert_eq!(run["status"], "succeeded");
    h.stop().await;
}

async fn schedules_through_the_api(db: Db) {
    let h = harness(db).await;
    for (body, needle) in [
        (
            json!({"name": "s", "cron": "61 * * * *", "target": {"job": {"kind": "noop"}}}),
            "minute",
        ),
        (
            json!({"name": "s", "cron": "* * * * *", "timezone": "Mars/Base", "target": {"job": {"kind": "noop"}}}),
            "Mars/Base",
        ),
        (
            json!({"name": "s", "cron": "* * * * *", "target": {"job": {"kind": "nope"}}}),
            "unknown kind",
        ),
        (
            json!({"name": "s", "cron": "* * * * *", "target": {"nothing": {}}}),
            "target",
        ),
    ] {
        let (status, reply) = h
            .call("POST", "/api/v1/schedules", &h.admin, Some(body))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message} lacks {needle}");
    }
    // Every second, for real: the scheduler in the harness fires it.
    let (status, s) = h
        .call(
            "POST",
            "/api/v1/schedules",
            &h.admin,
            Some(
                json!({"name": "every-second", "cron": "* * * * * *", "overlap": "allow",
                "target": {"job": {"kind": "noop", "spec": {"stdout": "tick"}}}}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{s}");
    assert!(s["next_fire_at"].is_string());
    let deadline = Instant::now() + Duration::from_secs(20);
    let fired = loop {
        let (_, s) = h
            .call("GET", "/api/v1/schedules/every-second", &h.admin, None)
            .await;
        let fires = s["fires"].as_array().unwrap().clone();
        if fires.len() >= 2 {
            break fires;
        }
        assert!(Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let job = fired[0]["job_id"].as_str().unwrap().to_string();
    let job = h.wait(&job, common::finished).await;
    assert_eq!(job["result"]["stdout"], "tick");
    let (status, s) = h
        .call(
            "POST",
            "/api/v1/schedules/every-second/pause",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s["paused"], true);
    let (_, list) = h.call("GET", "/api/v1/schedules", &h.admin, None).await;
    assert_eq!(list["schedules"].as_array().unwrap().len(), 1);
    let (_, list) = h.call("GET", "/api/v1/schedules", &h.other, None).await;
    assert_eq!(list["schedules"], json!([]));
    let (status, _) = h
        .call("DELETE", "/api/v1/schedules/every-second", &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h
        .call("DELETE", "/api/v1/schedules/every-second", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    h.stop().await;
}

/// Each instance of a fanned-out wasm step keeps a file; the fan-in step
/// finds every one at `<step>/<index>/<path>` under its scratch directory
/// and keeps a file of its own. The run lists them all and serves each;
/// another tenant sees none. Steps of kinds that keep no files, and specs
/// that name files themselves, are refused at apply.
async fn artifacts_travel_from_a_fan_out_into_a_fan_in(db: Db) {
    let h = harness(db).await;
    fan_out_and_in(&h).await;
    h.stop().await;
}

/// The same on S3-compatible storage: a real S3 server over HTTP holds
/// every artefact, under the tenant and the job that kept it.
async fn artifacts_live_on_s3(db: Db) {
    let s3 = kiln_blob::testing::start_s3().await;
    let blobs = kiln_blob::BlobStore::open(&s3.config, &db).unwrap();
    let h = common::harness_with_blobs(db, blobs).await;
    let (id, join_job) = fan_out_and_in(&h).await;
    let key = kiln_core::files::blob_key("acme", join_job.parse().unwrap(), "joined.txt");
    assert_eq!(std::fs::read(s3.object_path(&key)).unwrap(), b"bb");
    let (_, list) = h
        .call(
            "GET",
            &format!("/api/v1/runs/{id}/artifacts"),
            &h.admin,
            None,
        )
        .await;
    assert_eq!(
        list["artifacts"].as_array().map(Vec::len),
        Some(4),
        "{list}"
    );
    h.stop().await;
}

/// Runs the fan-out/fan-in pipeline and checks its artefacts; the run's id
/// and the fan-in job's.
async fn fan_out_and_in(h: &Harness) -> (String, String) {
    let write = h.push(&fixtures::stdin_to("out.txt")).await;
    let read = h
        .push(&fixtures::cat_to("gen/1/out.txt", "joined.txt"))
        .await;
    let def = json!({"name": "files", "params": [{"name": "items", "type": "list", "default": ["a", "bb", "ccc"]}],
    "steps": [
        {"id": "gen", "kind": "wasm", "for_each": "${params.items}",
         "spec": {"module": write, "stdin": "${item}"}, "artifacts": ["out.txt"]},
        {"id": "join", "kind": "wasm", "depends_on": ["gen"],
         "spec": {"module": read}, "inputs": [{"step": "gen", "path": "out.txt"}],
         "artifacts": ["joined.txt"]},
    ]});
    let (status, body) = h
        .call("POST", "/api/v1/pipelines", &h.admin, Some(def))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, run) = h
        .call("POST", "/api/v1/pipelines/files/runs", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    let run = wait_run(h, &id).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let join_job = step(&run, "join")["instances"][0]["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, job) = h
        .call("GET", &format!("/api/v1/jobs/{join_job}"), &h.admin, None)
        .await;
    assert_eq!(job["result"]["stdout"], "bb", "{job}");
    assert_eq!(
        job["spec"]["inputs"].as_array().map(Vec::len),
        Some(3),
        "{job}"
    );

    let (status, list) = h
        .call(
            "GET",
            &format!("/api/v1/runs/{id}/artifacts"),
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let mut names: Vec<(String, u64)> = list["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                a["size"].as_u64().unwrap(),
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("gen/0/out.txt".to_string(), 1),
            ("gen/1/out.txt".to_string(), 2),
            ("gen/2/out.txt".to_string(), 3),
            ("join/joined.txt".to_string(), 2),
        ]
    );
    for (name, content) in [("gen/2/out.txt", "ccc"), ("join/joined.txt", "bb")] {
        let (status, body) = h
            .call(
                "GET",
                &format!("/api/v1/runs/{id}/artifacts/{name}"),
                &h.admin,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{name}");
        assert_eq!(body, json!(content), "{name}");
    }
    let (status, files) = h
        .call(
            "GET",
            &format!("/api/v1/jobs/{join_job}/files"),
            &h.admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(files["files"][0]["path"], "joined.txt", "{files}");
    let (status, body) = h
        .call(
            "GET",
            &format!("/api/v1/jobs/{join_job}/files/joined.txt"),
            &h.admin,
            None,
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!("bb")));
    for path in [
        format!("/api/v1/runs/{id}/artifacts"),
        format!("/api/v1/runs/{id}/artifacts/gen/0/out.txt"),
        format!("/api/v1/jobs/{join_job}/files/joined.txt"),
    ] {
        let (status, body) = h.call("GET", &path, &h.other, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    for path in [
        format!("/api/v1/runs/{id}/artifacts/gen/9/out.txt"),
        format!("/api/v1/runs/{id}/artifacts/gen/0/../../join/joined.txt"),
        format!("/api/v1/jobs/{join_job}/files/out.txt"),
    ] {
        let (status, body) = h.call("GET", &path, &h.admin, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(error_code(&body), "not_found", "{path}: {body}");
    }

    for (def, needle) in [
        (
            json!({"name": "x", "steps": [{"id": "a", "kind": "noop", "artifacts": ["out"]}]}),
            "steps[0].artifacts: a noop step keeps and takes no files",
        ),
        (
            json!({"name": "x", "steps": [{"id": "a", "kind": "wasm", "spec": {"module": write, "outputs": ["x"]}}]}),
            "steps[0].spec.outputs",
        ),
        (
            json!({"name": "x", "steps": [{"id": "a", "kind": "wasm", "spec": {"module": write}, "artifacts": ["o", "o"]}]}),
            "steps[0].artifacts[1]",
        ),
    ] {
        let (status, body) = h
            .call("POST", "/api/v1/pipelines", &h.admin, Some(def))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message} lacks {needle}");
    }
    (id, join_job)
}

/// A `vm` step builds a file in a real microVM; kiln keeps it and places it
/// in the wasm step that takes it as an input, whose own file is kept too.
async fn artifacts_go_from_a_vm_step_into_a_wasm_step(db: Db) {
    let mut h = harness(db).await;
    let vms = h.start_vm_worker().await;
    let read = h
        .push(&fixtures::cat_to("out/report.txt", "copy.txt"))
        .await;
    let def = json!({"name": "vm-files", "steps": [
        {"id": "build", "kind": "vm", "timeout_ms": 120000,
         "spec": {"command": "sh", "args": ["-c", "mkdir -p out && echo built-in-vm > out/report.txt"],
                  "cwd": "/tmp"},
         "artifacts": ["out/report.txt"]},
        {"id": "read", "kind": "wasm", "depends_on": ["build"], "spec": {"module": read},
         "inputs": [{"step": "build", "path": "out/report.txt"}], "artifacts": ["copy.txt"]},
    ]});
    let (status, body) = h
        .call("POST", "/api/v1/pipelines", &h.admin, Some(def))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, run) = h
        .call("POST", "/api/v1/pipelines/vm-files/runs", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    let run = wait_run_for(&h, &id, Duration::from_secs(240)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let (_, list) = h
        .call(
            "GET",
            &format!("/api/v1/runs/{id}/artifacts"),
            &h.admin,
            None,
        )
        .await;
    let names: Vec<&str> = list["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{list}");
    assert!(
        names.contains(&"build/out/report.txt") && names.contains(&"read/copy.txt"),
        "{list}"
    );
    for name in ["build/out/report.txt", "read/copy.txt"] {
        let (status, body) = h
            .call(
                "GET",
                &format!("/api/v1/runs/{id}/artifacts/{name}"),
                &h.admin,
                None,
            )
            .await;
        assert_eq!(
            (status, body),
            (StatusCode::OK, json!("built-in-vm\n")),
            "{name}"
        );
    }
    assert_eq!(vms.live_count(), 0, "the step's VM is gone");
    h.stop().await;
}

async fn wait_run_for(h: &Harness, id: &str, guard: Duration) -> Value {
    let deadline = Instant::now() + guard;
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

/// Many more instances than the worker has slots: while the completer
/// takes slots for the next steps it leases, the lease loop must never
/// lease a job it has no slot for (it would sit leased until its lease ran
/// out, 30 s, far past this test's deadline).
async fn a_fan_out_wider_than_the_slots_strands_no_step(db: Db) {
    let h = harness(db).await;
    let def = json!({"name": "wide", "params": [{"name": "items", "type": "list"}], "steps": [
        {"id": "each", "kind": "noop", "for_each": "${params.items}"},
        {"id": "join", "kind": "noop", "depends_on": ["each"]},
    ]});
    let (status, body) = h
        .call("POST", "/api/v1/pipelines", &h.admin, Some(def))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    for _ in 0..3 {
        let items: Vec<usize> = (0..300).collect();
        let (status, run) = h
            .call(
                "POST",
                "/api/v1/pipelines/wide/runs",
                &h.admin,
                Some(json!({"params": {"items": items}})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{run}");
        let id = run["id"].as_str().unwrap().to_string();
        let run = wait_run_for(&h, &id, Duration::from_secs(20)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(
            step(&run, "each")["instances"].as_array().unwrap().len(),
            300
        );
    }
}
