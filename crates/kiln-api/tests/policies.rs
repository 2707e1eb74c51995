//! Admission policies on both databases: a refusal with its code, message
//! and audit record, admission when the rule holds, the README's examples,
//! tenants apart, rules checked at PUT, evaluation errors refusing, VM
//! creation, pipeline runs and schedules, the dry run, and the cap.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{error_code, harness, Harness};
use kiln_db::Db;
use serde_json::{json, Value};

kiln_db::on_both_databases!(
    a_refusal_says_why_and_is_audited,
    vm_jobs_need_a_team_label,
    trial_tenants_get_at_most_a_gib,
    tenants_never_see_each_others_policies,
    rules_are_checked_when_put,
    an_evaluation_error_refuses,
    vm_creation_is_judged,
    pipeline_runs_and_schedules_are_judged,
    the_dry_run_judges_without_submitting,
    a_tenant_holds_at_most_a_hundred,
    another_process_sees_a_change_within_a_second,
    broker_submissions_are_judged,
    rule_actions_are_judged,
);

async fn put(h: &Harness, key: &str, name: &str, body: Value) -> (StatusCode, Value) {
    h.call("PUT", &format!("/api/v1/policies/{name}"), key, Some(body))
        .await
}

async fn submit(h: &Harness, key: &str, body: Value) -> (StatusCode, Value) {
    h.call("POST", "/api/v1/jobs", key, Some(body)).await
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}

async fn a_refusal_says_why_and_is_audited(db: Db) {
    let h = harness(db).await;
    let (status, body) = put(
        &h,
        &h.admin,
        "small",
        json!({"rule": "job.timeout_ms <= 60000", "message": "jobs here run at most a minute"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], "small");
    assert_eq!(body["enabled"], true);
    assert_eq!(body["applies_to"], json!([]));

    let request = Request::builder()
        .method("POST")
        .uri("/api/v1/jobs")
        .header("authorization", format!("Bearer {}", h.admin))
        .header("content-type", "application/json")
        .header("x-request-id", "refused-1")
        .body(Body::from(
            json!({"kind": "noop", "timeout_ms": 120000}).to_string(),
        ))
        .unwrap();
    let (status, body) = h.send(request).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "policy_denied");
    assert_eq!(
        message(&body),
        "policy small: jobs here run at most a minute (job.timeout_ms = 120000)"
    );
    // Nothing was stored.
    let (_, jobs) = h.call("GET", "/api/v1/jobs", &h.admin, None).await;
    assert_eq!(jobs["jobs"], json!([]));

    // The trail has the refusal, with the policy as its rationale.
    let (status, trail) = h
        .call("GET", "/api/v1/audit?action=POST%20*", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{trail}");
    let record = trail["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["request_id"] == "refused-1")
        .unwrap_or_else(|| panic!("no record of the refusal in {trail}"));
    assert_eq!(record["outcome"], "403 policy_denied");
    assert_eq!(record["action"], "POST /api/v1/jobs");
    assert_eq!(record["rationale"], "policy small");

    // Admitted when the rule holds, on every submission path.
    let (status, job) = submit(&h, &h.admin, json!({"kind": "noop", "timeout_ms": 1000})).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let (status, job) = h
        .call(
            "POST",
            "/api/v1/run",
            &h.admin,
            Some(json!({"kind": "noop", "timeout_ms": 1000})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    assert_eq!(job["status"], "succeeded");
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/run",
            &h.admin,
            Some(json!({"kind": "noop", "timeout_ms": 60001})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "policy_denied");

    // Disabled, it judges nothing; deleted, it is gone.
    let (status, _) = put(
        &h,
        &h.admin,
        "small",
        json!({"rule": "job.timeout_ms <= 60000", "enabled": false}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = submit(&h, &h.admin, json!({"kind": "noop", "timeout_ms": 120000})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = h
        .call("DELETE", "/api/v1/policies/small", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = h
        .call("GET", "/api/v1/policies/small", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Only admins set policies; readers read them.
    let (status, _) = put(&h, &h.reader, "x", json!({"rule": "true"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.call("GET", "/api/v1/policies", &h.reader, None).await;
    assert_eq!(status, StatusCode::OK);
    h.stop().await;
}

async fn vm_jobs_need_a_team_label(db: Db) {
    let h = harness(db).await;
    let (status, body) = put(
        &h,
        &h.admin,
        "team",
        json!({"rule": "job.kind != \"vm\" || job.labels.team != null",
               "message": "vm jobs need a team label"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let vm = json!({"kind": "vm", "spec": {"command": "true"}});
    let (status, body) = submit(&h, &h.admin, vm.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        message(&body),
        "policy team: vm jobs need a team label (job.kind = \"vm\", job.labels.team = null)"
    );
    let mut labelled = vm;
    labelled["labels"] = json!({"team": "infra"});
    let (status, body) = submit(&h, &h.admin, labelled).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["kind"], "vm");
    // Other kinds pass without the label.
    let (status, _) = submit(&h, &h.admin, json!({"kind": "noop"})).await;
    assert_eq!(status, StatusCode::CREATED);
    h.stop().await;
}

async fn trial_tenants_get_at_most_a_gib(db: Db) {
    let h = harness(db).await;
    let trial = kiln_api::issue_key(
        &h.db,
        "trial",
        "t",
        kiln_core::Scopes(vec![kiln_core::Scope::Admin]),
    )
    .await
    .unwrap()
    .1;
    let rule = json!({"rule": "tenant != \"trial\" || job.memory_mib <= 1024",
                      "message": "trial tenants get at most 1 GiB",
                      "applies_to": ["vm"]});
    let (status, body) = put(&h, &trial, "trial-memory", rule.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let vm = |memory: u32| json!({"kind": "vm", "spec": {"command": "true", "memory_mib": memory}});
    let (status, body) = submit(&h, &trial, vm(2048)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        message(&body),
        "policy trial-memory: trial tenants get at most 1 GiB (job.memory_mib = 2048, tenant = \"trial\")"
    );
    let (status, body) = submit(&h, &trial, vm(1024)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // A vm job without memory_mib runs with the kind's default, which the
    // rule sees (no null to trip over).
    let (status, body) = submit(
        &h,
        &trial,
        json!({"kind": "vm", "spec": {"command": "true"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The same policy in another tenant leaves 2 GiB alone.
    let (status, _) = put(&h, &h.admin, "trial-memory", rule).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = submit(&h, &h.admin, vm(2048)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    h.stop().await;
}

async fn tenants_never_see_each_others_policies(db: Db) {
    let h = harness(db).await;
    let (status, _) = put(
        &h,
        &h.admin,
        "nothing",
        json!({"rule": "false", "message": "acme admits nothing"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = submit(&h, &h.admin, json!({"kind": "noop"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // globex is not affected, and cannot read or delete acme's.
    let (status, body) = submit(&h, &h.other, json!({"kind": "noop"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, list) = h.call("GET", "/api/v1/policies", &h.other, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["policies"], json!([]));
    let (status, body) = h
        .call("GET", "/api/v1/policies/nothing", &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = h
        .call("DELETE", "/api/v1/policies/nothing", &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // globex's own policy of the same name is its own.
    let (status, _) = put(&h, &h.other, "nothing", json!({"rule": "true"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, mine) = h
        .call("GET", "/api/v1/policies/nothing", &h.admin, None)
        .await;
    assert_eq!(mine["rule"], "false");
    let (status, _) = submit(&h, &h.admin, json!({"kind": "noop"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "acme's policy still stands");
    h.stop().await;
}

async fn rules_are_checked_when_put(db: Db) {
    let h = harness(db).await;
    let (status, body) = put(&h, &h.admin, "bad", json!({"rule": "job.kind =="})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "invalid_rule");
    assert!(message(&body).ends_with("at 11"), "{body}");
    let (status, body) = put(
        &h,
        &h.admin,
        "bad",
        json!({"rule": "job.kind == 'vm' &&& true"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(message(&body).starts_with("rule: "), "{body}");
    for bad in [
        json!({"rule": "x".repeat(3000)}),
        json!({"rule": "true", "message": "m".repeat(600)}),
        json!({"rule": "true", "applies_to": ["not a kind"]}),
        json!({"rule": "true", "extra": 1}),
        json!({"message": "no rule"}),
    ] {
        let (status, body) = put(&h, &h.admin, "bad", bad.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }
    let (status, body) = put(
        &h,
        &h.admin,
        "bad",
        json!({"rule": "true", "applies_to": ["nope"]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "unknown_kind");
    let (status, _) = put(&h, &h.admin, "a%2Fb", json!({"rule": "true"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // Nothing was stored.
    let (_, list) = h.call("GET", "/api/v1/policies", &h.admin, None).await;
    assert_eq!(list["policies"], json!([]));
    h.stop().await;
}

async fn an_evaluation_error_refuses(db: Db) {
    let h = harness(db).await;
    // A noop spec has no memory_mib: null <= 1024 is a type error.
    let (status, _) = put(
        &h,
        &h.admin,
        "mem",
        json!({"rule": "job.memory_mib <= 1024"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = submit(&h, &h.admin, json!({"kind": "noop"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "policy_denied");
    let text = message(&body);
    assert!(
        text.starts_with("policy mem: the rule failed to evaluate ('<=' needs two numbers or two strings, got null and int"),
        "{text}"
    );
    assert!(text.contains("so the job is refused"), "{text}");
    // A rule that yields no boolean refuses too.
    let (status, _) = put(&h, &h.admin, "mem", json!({"rule": "job.queue"})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = submit(&h, &h.admin, json!({"kind": "noop"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(message(&body).contains("must yield a boolean"), "{body}");
    h.stop().await;
}

async fn vm_creation_is_judged(db: Db) {
    let h = harness(db).await;
    let (status, _) = put(
        &h,
        &h.admin,
        "team",
        json!({"rule": "job.kind != \"vm\" || has(job.labels.team)",
               "message": "VMs need a team label"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = put(
        &h,
        &h.admin,
        "small",
        json!({"rule": "job.memory_mib <= 256 && job.vcpus == 1 && job.image == \"default\"",
               "applies_to": ["vm"]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/vms",
            &h.admin,
            Some(json!({"memory_mib": 128})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "policy_denied");
    assert!(
        message(&body).starts_with("policy team: VMs need a team label"),
        "{body}"
    );
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/vms",
            &h.admin,
            Some(json!({"memory_mib": 512, "labels": {"team": "a"}})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(message(&body).contains("job.memory_mib = 512"), "{body}");
    // Within both: past the policies (this API hosts no VMs, so it says
    // that instead of booting one).
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/vms",
            &h.admin,
            Some(json!({"labels": {"team": "a"}})),
        )
        .await;
    assert_ne!(status, StatusCode::FORBIDDEN, "{body}");
    assert_ne!(error_code(&body), "policy_denied");
    let (_, trail) = h
        .call(
            "GET",
            "/api/v1/audit?action=POST%20/api/v1/vms",
            &h.admin,
            None,
        )
        .await;
    let outcomes: Vec<&str> = trail["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["outcome"].as_str())
        .collect();
    assert_eq!(
        &outcomes[..2],
        ["403 policy_denied", "403 policy_denied"],
        "{trail}"
    );
    // The secrets a VM asks for are judged too.
    h.state
        .master_key
        .set(kiln_core::secrets::MasterKey::new([3; 32]))
        .unwrap();
    let (status, _) = h
        .raw(
            "PUT",
            "/api/v1/secrets/prod_db",
            Some(&h.admin),
            "text/plain",
            "v-a-l-u-e",
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = put(
        &h,
        &h.admin,
        "no-prod",
        json!({"rule": "!(\"prod_db\" in job.secrets)", "message": "no production secrets in VMs"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/vms",
            &h.admin,
            Some(json!({"labels": {"team": "a"}, "secrets": ["prod_db"]})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(message(&body).starts_with("policy no-prod"), "{body}");
    h.stop().await;
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

async fn pipeline_runs_and_schedules_are_judged(db: Db) {
    let h = harness(db).await;
    let (status, _) = put(
        &h,
        &h.admin,
        "labelled",
        json!({"rule": "job.labels.approved == \"yes\"", "message": "steps need approved=yes"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    // A first step the policy refuses refuses the run: nothing is stored.
    let def = json!({"name": "p", "steps": [{"id": "a", "kind": "noop"}]});
    let (status, body) = h
        .call("POST", "/api/v1/pipelines", &h.admin, Some(def))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/pipelines/p/runs",
            &h.admin,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(error_code(&body), "policy_denied");
    assert!(
        message(&body).starts_with("policy labelled: steps need approved=yes"),
        "{body}"
    );
    let (_, runs) = h.call("GET", "/api/v1/runs", &h.admin, None).await;
    assert_eq!(runs["runs"], json!([]), "{runs}");
    let (_, jobs) = h.call("GET", "/api/v1/jobs", &h.admin, None).await;
    assert_eq!(jobs["jobs"], json!([]));

    // A later step is judged when it starts, and fails with the reason.
    let def = json!({"name": "q", "steps": [
        {"id": "a", "kind": "noop", "labels": {"approved": "yes"}},
        {"id": "b", "kind": "noop", "depends_on": ["a"]},
    ]});
    let (status, body) = h
        .call("POST", "/api/v1/pipelines", &h.admin, Some(def))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, run) = h
        .call(
            "POST",
            "/api/v1/pipelines/q/runs",
            &h.admin,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let run = wait_run(&h, run["id"].as_str().unwrap()).await;
    assert_eq!(run["status"], "failed", "{run}");
    let b = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "b")
        .unwrap();
    assert_eq!(b["status"], "failed");
    let error = b["detail"]["error"].as_str().unwrap();
    assert!(
        error.starts_with("policy_denied: policy labelled: steps need approved=yes"),
        "{error}"
    );

    // A schedule's job the policy refuses is a fire with that error.
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/schedules",
            &h.admin,
            Some(
                json!({"name": "every", "cron": "* * * * * *", "overlap": "allow",
                        "target": {"job": {"kind": "noop"}}}),
            ),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let fire = loop {
        let (_, fires) = h
            .call("GET", "/api/v1/schedules/every/fires", &h.admin, None)
            .await;
        if let Some(fire) = fires["fires"].as_array().and_then(|f| f.first()).cloned() {
            break fire;
        }
        assert!(Instant::now() < deadline, "no fire: {fires}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(fire["outcome"], "error", "{fire}");
    assert!(
        fire["error"]
            .as_str()
            .unwrap()
            .starts_with("policy_denied: policy labelled"),
        "{fire}"
    );
    let (_, jobs) = h.call("GET", "/api/v1/jobs", &h.admin, None).await;
    assert!(
        jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["labels"]["kiln.schedule"].is_null()),
        "{jobs}"
    );
    h.stop().await;
}

async fn the_dry_run_judges_without_submitting(db: Db) {
    let h = harness(db).await;
    for (name, rule) in [
        ("team", "job.kind != \"vm\" || job.labels.team != null"),
        ("short", "job.timeout_ms <= 60000"),
    ] {
        let (status, _) = put(&h, &h.admin, name, json!({"rule": rule, "message": name})).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (status, _) = put(
        &h,
        &h.admin,
        "wasm-only",
        json!({"rule": "false", "applies_to": ["wasm"]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, verdict) = h
        .call(
            "POST",
            "/api/v1/policies/test",
            &h.reader,
            Some(json!({"kind": "vm", "spec": {"command": "true"}, "timeout_ms": 1000})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{verdict}");
    assert_eq!(verdict["admitted"], false);
    assert_eq!(
        verdict["message"],
        "policy team: team (job.kind = \"vm\", job.labels.team = null)"
    );
    let verdicts = verdict["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 3);
    assert_eq!(verdicts[0]["policy"], "short");
    assert_eq!(verdicts[0]["admitted"], true);
    assert_eq!(verdicts[1]["policy"], "team");
    assert_eq!(verdicts[1]["admitted"], false);
    assert_eq!(verdicts[2]["policy"], "wasm-only");
    assert_eq!(verdicts[2]["applies"], false);
    let (_, verdict) = h
        .call(
            "POST",
            "/api/v1/policies/test",
            &h.reader,
            Some(json!({"kind": "vm", "spec": {"command": "true"}, "labels": {"team": "a"}})),
        )
        .await;
    assert_eq!(verdict["admitted"], true, "{verdict}");
    // Nothing was submitted; a bad job is refused as POST /jobs would.
    let (_, jobs) = h.call("GET", "/api/v1/jobs", &h.admin, None).await;
    assert_eq!(jobs["jobs"], json!([]));
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/policies/test",
            &h.reader,
            Some(json!({"kind": "nope"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    h.stop().await;
}

async fn a_tenant_holds_at_most_a_hundred(db: Db) {
    let h = harness(db).await;
    for i in 0..kiln_flow::policy::POLICIES_MAX {
        let (status, body) = put(&h, &h.admin, &format!("p{i:03}"), json!({"rule": "true"})).await;
        assert_eq!(status, StatusCode::CREATED, "{i}: {body}");
    }
    let (status, body) = put(&h, &h.admin, "one-more", json!({"rule": "true"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "too_many");
    // Replacing one is not adding one; other tenants have their own room.
    let (status, _) = put(&h, &h.admin, "p000", json!({"rule": "1 == 1"})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = put(&h, &h.other, "one-more", json!({"rule": "true"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, list) = h.call("GET", "/api/v1/policies", &h.admin, None).await;
    assert_eq!(list["policies"].as_array().unwrap().len(), 100);
    // All hundred are judged, and all hold.
    let (status, body) = submit(&h, &h.admin, json!({"kind": "noop"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    h.stop().await;
}

/// A second handle on the same database, with caches of its own: another
/// process, as far as the cache can tell.
async fn second_handle(db: &Db) -> Db {
    if db.backend() == "sqlite" {
        let path = kiln_db::testing::text_rows(
            db,
            "SELECT file FROM pragma_database_list WHERE name = 'main'",
        )
        .await
        .unwrap()
        .remove(0);
        Db::connect(&format!("sqlite://{path}")).await.unwrap()
    } else {
        let schema = kiln_db::testing::text_rows(db, "SELECT current_schema()::text")
            .await
            .unwrap()
            .remove(0);
        Db::connect_postgres_schema(&kiln_db::testing::postgres_url(), &schema)
            .await
            .unwrap()
    }
}

async fn another_process_sees_a_change_within_a_second(db: Db) {
    let h = harness(db.clone()).await;
    // A second API on the same database, with its own cache.
    let other = kiln_api::AppState::with_kinds(
        second_handle(&db).await,
        h.state.blobs.clone(),
        None,
        None,
        common::kinds(),
    );
    let other_app = kiln_api::app(other);
    let send = |app: axum::Router, body: Value| {
        let key = h.admin.clone();
        async move {
            use tower::ServiceExt;
            let request = Request::builder()
                .method("POST")
                .uri("/api/v1/jobs")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            app.oneshot(request).await.unwrap().status()
        }
    };
    // Warm its cache with "no policies".
    assert_eq!(
        send(other_app.clone(), json!({"kind": "noop"})).await,
        StatusCode::CREATED
    );
    let (status, _) = put(&h, &h.admin, "none", json!({"rule": "false"})).await;
    assert_eq!(status, StatusCode::CREATED);
    // This process dropped its entry at once.
    let (status, _) = submit(&h, &h.admin, json!({"kind": "noop"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The other sees it once its entry is a second old.
    let started = Instant::now();
    loop {
        let status = send(other_app.clone(), json!({"kind": "noop"})).await;
        if status == StatusCode::FORBIDDEN {
            break;
        }
        assert_eq!(status, StatusCode::CREATED);
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "the other process still admits after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And a delete the same way.
    let (status, _) = h
        .call("DELETE", "/api/v1/policies/none", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let started = Instant::now();
    while send(other_app.clone(), json!({"kind": "noop"})).await != StatusCode::CREATED {
        assert!(started.elapsed() < Duration::from_millis(1500));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}

async fn broker_submissions_are_judged(db: Db) {
    let h = harness(db).await;
    let (status, _) = put(
        &h,
        &h.admin,
        "queues",
        json!({"rule": "job.queue in [\"emails\"]", "message": "only the emails queue"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let bearer = format!("Bearer {}", h.admin);
    let body = json!({"kind": "noop"}).to_string();
    let refused =
        kiln_api::intake::submit_message(&h.state, Some(&bearer), Some("billing"), body.as_bytes())
            .await
            .unwrap_err();
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.code, "policy_denied");
    assert_eq!(
        refused.message,
        "policy queues: only the emails queue (job.queue = \"billing\")"
    );
    let (id, made) =
        kiln_api::intake::submit_message(&h.state, Some(&bearer), Some("emails"), body.as_bytes())
            .await
            .unwrap();
    assert!(made);
    let (_, job) = h
        .call("GET", &format!("/api/v1/jobs/{id}"), &h.admin, None)
        .await;
    assert_eq!(job["queue"], "emails");
    let (_, trail) = h
        .call("GET", "/api/v1/audit?action=broker.submit", &h.admin, None)
        .await;
    let records = trail["records"].as_array().unwrap();
    assert_eq!(records.len(), 2, "{trail}");
    assert_eq!(records[0]["outcome"], "403 policy_denied");
    assert_eq!(records[0]["rationale"], "policy queues");
    assert_eq!(records[1]["outcome"], "201");
    h.stop().await;
}

async fn rule_actions_are_judged(db: Db) {
    let h = harness(db).await;
    // Jobs a self-healing rule makes carry the label `rule`.
    let (status, _) = put(
        &h,
        &h.admin,
        "no-robots",
        json!({"rule": "job.labels.rule == null", "message": "rules may not start jobs"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = h
        .call(
            "PUT",
            "/api/v1/automation/rules/heal",
            &h.admin,
            Some(json!({
                "trigger": {"events": ["job.succeeded"]},
                "condition": "event.data.queue == 'go'",
                "actions": [{"action": "run_job", "job": {"kind": "noop"}}],
                "cooldown_s": 0,
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let job = h.submit(json!({"kind": "noop", "queue": "go"})).await;
    h.wait(job["id"].as_str().unwrap(), common::finished).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let taken = loop {
        let (_, list) = h
            .call(
                "GET",
                "/api/v1/automation/rules/heal/actions",
                &h.admin,
                None,
            )
            .await;
        let taken = list["actions"].as_array().cloned().unwrap_or_default();
        if !taken.is_empty() {
            break taken;
        }
        assert!(Instant::now() < deadline, "the rule never acted: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(taken[0]["action"], "run_job");
    assert_eq!(taken[0]["outcome"], "error", "{}", taken[0]);
    let message = taken[0]["message"].as_str().unwrap();
    assert!(
        message.starts_with("policy_denied: policy no-robots: rules may not start jobs (job.labels.rule = \"heal\")"),
        "{message}"
    );
    // Only the job submitted by hand exists.
    let (_, jobs) = h.call("GET", "/api/v1/jobs", &h.admin, None).await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1, "{jobs}");
    h.stop().await;
}
