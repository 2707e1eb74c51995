//! The audit trail on both databases: one record per mutating route, what a
//! record holds, tenants apart, filters and paging, export, and a chain
//! that names a modified, inserted or deleted record.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::harness;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

kiln_db::on_both_databases!(
    every_mutating_route_writes_exactly_one_record,
    records_say_who_what_and_how_it_ended,
    tenants_see_only_their_own_trail,
    verify_names_a_modified_inserted_or_deleted_record,
    schedule_fires_are_audited_in_their_transaction,
    a_change_and_its_record_are_one,
    the_source_is_the_client_a_trusted_proxy_names,
);

/// The records of `tenant`, oldest first, straight from the store.
async fn trail(db: &kiln_db::Db, tenant: &str) -> Vec<kiln_db::audit::AuditEntry> {
    db.audit_read(&kiln_db::audit::AuditQuery {
        tenant: Some(tenant),
        limit: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A path with every `{param}` filled in.
fn fill(template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap() + start;
        out.push_str("x1");
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

async fn every_mutating_route_writes_exactly_one_record(db: kiln_db::Db) {
    let h = harness(db).await;
    let doc = serde_json::to_value(<kiln_api::ApiDoc as utoipa::OpenApi>::openapi()).unwrap();
    let mut checked = 0;
    for (template, item) in doc["paths"].as_object().unwrap() {
        for method in ["post", "put", "patch", "delete"] {
            if item.get(method).is_none() || template.starts_with("/api/v1/hooks/") {
                continue;
            }
            // A login names its tenant in its body: one without a body
            // names none (logins are checked in tests/users.rs).
            if template == "/api/v1/auth/login" {
                continue;
            }
            let path = fill(template);
            let before = trail(&h.db, "acme").await.len();
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&path)
                .header("authorization", format!("Bearer {}", h.admin))
                .header("content-type", "application/json")
                .header("x-request-id", format!("req-{checked}"))
                .body(Body::from("{}"))
                .unwrap();
            let response = h.app.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let echoed = response.headers().get("x-request-id").cloned();
            let _ = response.into_body().collect().await;
            assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{method} {path}");
            assert_eq!(
                echoed.as_ref().and_then(|v| v.to_str().ok()),
                Some(format!("req-{checked}").as_str()),
                "{method} {path}: the request id comes back"
            );
            let after = trail(&h.db, "acme").await;
            assert_eq!(
                after.len(),
                before + 1,
                "{method} {path} ({status}) must write exactly one record"
            );
            let record = &after.last().unwrap().record;
            assert_eq!(
                record.action,
                format!("{} {template}", method.to_uppercase())
            );
            assert_eq!(record.request_id, format!("req-{checked}"));
            assert!(
                record.outcome.starts_with(&status.as_u16().to_string()),
                "{method} {path}: outcome {} for status {status}",
                record.outcome
            );
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} mutating routes found");
    // Reads write nothing (secrets' reads aside).
    let before = trail(&h.db, "acme").await.len();
    for path in [
        "/api/v1/jobs",
        "/api/v1/queues",
        "/api/v1/pipelines",
        "/api/v1/audit",
    ] {
        let (status, _) = h.call("GET", path, &h.admin, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    assert_eq!(trail(&h.db, "acme").await.len(), before);
    // Unauthenticated requests name no tenant and write nothing.
    let (status, _) = h
        .call("POST", "/api/v1/jobs", "nope", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(trail(&h.db, "acme").await.len(), before);
    h.stop().await;
}

async fn records_say_who_what_and_how_it_ended(db: kiln_db::Db) {
    let h = harness(db).await;
    let (status, job) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &h.admin,
            Some(json!({"kind": "noop", "spec": {}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    // A refused request is recorded with its error code.
    let (status, _) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &h.admin,
            Some(json!({"kind": "nope", "spec": {}})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // A scope the key lacks, too.
    let (status, _) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &h.reader,
            Some(json!({"kind": "noop", "spec": {}})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Secrets' metadata reads are audited; values never reach the trail.
    h.state
        .master_key
        .set(kiln_core::secrets::MasterKey::new([7; 32]))
        .unwrap();
    let value = "audit-must-never-hold-this";
    let (status, _) = h
        .raw(
            "PUT",
            "/api/v1/secrets/tok",
            Some(&h.admin),
            "text/plain",
            value,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = h.call("GET", "/api/v1/secrets/tok", &h.reader, None).await;
    assert_eq!(status, StatusCode::OK);

    let records = trail(&h.db, "acme").await;
    let r: Vec<_> = records.iter().map(|e| &e.record).collect();
    assert_eq!(r.len(), 5, "{r:#?}");
    assert_eq!(r[0].action, "POST /api/v1/jobs");
    assert_eq!(r[0].resource, format!("/api/v1/jobs/{id}"));
    assert_eq!(r[0].outcome, "201");
    assert_eq!(r[0].actor_kind, "key");
    assert!(!r[0].actor.is_empty());
    assert!(!r[0].request_id.is_empty());
    assert_eq!(r[1].outcome, "422 unknown_kind");
    assert_eq!(r[2].outcome, "403 forbidden");
    assert_ne!(r[2].actor, r[0].actor, "the reader's key is named");
    assert_eq!(r[3].action, "PUT /api/v1/secrets/{name}");
    assert_eq!(r[4].action, "GET /api/v1/secrets/{name}");
    assert_eq!(r[4].outcome, "200");
    let text = serde_json::to_string(&r).unwrap();
    assert!(!text.contains(value));

    // The route shows the same, in order, with a cursor.
    let (status, page) = h.call("GET", "/api/v1/audit?limit=2", &h.admin, None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["records"].as_array().unwrap().len(), 2);
    let next = page["next"].as_i64().unwrap();
    let (_, rest) = h
        .call(
            "GET",
            &format!("/api/v1/audit?after={next}"),
            &h.admin,
            None,
        )
        .await;
    // The first audit read is not itself audited.
    assert_eq!(rest["records"].as_array().unwrap().len(), 3, "{rest}");
    assert_eq!(rest["next"], Value::Null);
    // Filters: actor, action prefix, resource, time.
    let reader_actor = r[2].actor.clone();
    let (_, by_actor) = h
        .call(
            "GET",
            &format!("/api/v1/audit?actor={reader_actor}"),
            &h.admin,
            None,
        )
        .await;
    let actions: Vec<_> = by_actor["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(actions, vec!["403 forbidden", "200"]);
    let (_, secrets) = h
        .call(
            "GET",
            "/api/v1/audit?action=*&resource=/api/v1/secrets*",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(
        secrets["records"].as_array().unwrap().len(),
        2,
        "a bare * matches any action"
    );
    let (_, secrets) = h
        .call(
            "GET",
            "/api/v1/audit?resource=/api/v1/secrets*",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(secrets["records"].as_array().unwrap().len(), 2);
    let (_, puts) = h
        .call("GET", "/api/v1/audit?action=PUT%20*", &h.admin, None)
        .await;
    assert_eq!(puts["records"].as_array().unwrap().len(), 1);
    let (_, future) = h
        .call(
            "GET",
            "/api/v1/audit?since=2999-01-01T00:00:00Z",
            &h.admin,
            None,
        )
        .await;
    assert_eq!(future["records"], json!([]));
    let (status, bad) = h
        .call("GET", "/api/v1/audit?since=yesterday", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    // Only admins read the trail.
    let (status, _) = h.call("GET", "/api/v1/audit", &h.reader, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Export: one JSON object a line, every record.
    let request = Request::builder()
        .uri("/api/v1/audit/export")
        .header("authorization", format!("Bearer {}", h.admin))
        .body(Body::empty())
        .unwrap();
    let response = h.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let lines: Vec<Value> = String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["resource"], format!("/api/v1/jobs/{id}"));
    h.stop().await;
}

async fn tenants_see_only_their_own_trail(db: kiln_db::Db) {
    let h = harness(db).await;
    for key in [&h.admin, &h.other] {
        let (status, _) = h
            .call(
                "PUT",
                "/api/v1/queues/q1",
                key,
                Some(json!({"concurrency_limit": 2})),
            )
            .await;
        assert!(status.is_success(), "{status}");
    }
    let (_, mine) = h.call("GET", "/api/v1/audit", &h.admin, None).await;
    let (_, theirs) = h.call("GET", "/api/v1/audit", &h.other, None).await;
    let mine = mine["records"].as_array().unwrap();
    let theirs = theirs["records"].as_array().unwrap();
    assert_eq!((mine.len(), theirs.len()), (1, 1));
    assert_ne!(mine[0]["id"], theirs[0]["id"]);
    // Each tenant's chain is its own: both start at 1.
    h.db.audit_chain_pass(false).await.unwrap();
    let (_, mine) = h.call("GET", "/api/v1/audit", &h.admin, None).await;
    let (_, theirs) = h.call("GET", "/api/v1/audit", &h.other, None).await;
    assert_eq!(mine["records"][0]["seq"], 1);
    assert_eq!(theirs["records"][0]["seq"], 1);
    let (status, verify) = h.call("GET", "/api/v1/audit/verify", &h.other, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["records"], 1);
    h.stop().await;
}

/// Runs one statement on the store, as someone with the database would.
async fn tamper(db: &kiln_db::Db, sql: &str) {
    kiln_db::testing::execute(db, sql).await.unwrap();
}

/// The condition naming acme's record number `seq` (its link holds the number).
fn at(seq: i64) -> String {
    format!("id = (SELECT id FROM audit_links WHERE tenant = 'acme' AND seq = {seq})")
}

async fn verify_names_a_modified_inserted_or_deleted_record(db: kiln_db::Db) {
    let h = harness(db).await;
    for n in 0..6 {
        let (status, _) = h
            .call(
                "PUT",
                &format!("/api/v1/queues/q{n}"),
                &h.admin,
                Some(json!({"concurrency_limit": 1})),
            )
            .await;
        assert!(status.is_success());
    }
    assert_eq!(h.db.audit_chain_pass(false).await.unwrap(), 6);
    let report = h.db.audit_verify(None).await.unwrap();
    assert!(report.breaks.is_empty(), "{:?}", report.breaks);
    assert_eq!((report.records, report.unchained), (6, 0));

    // Modified: record 3's outcome.
    let original =
        kiln_db::testing::text_rows(&h.db, &format!("SELECT outcome FROM audit WHERE {}", at(3)))
            .await
            .unwrap()
            .remove(0);
    tamper(
        &h.db,
        &format!("UPDATE audit SET outcome = '500' WHERE {}", at(3)),
    )
    .await;
    let report = h.db.audit_verify(Some("acme")).await.unwrap();
    assert_eq!(report.breaks.len(), 1, "{:?}", report.breaks);
    assert_eq!(report.breaks[0].seq, 3);
    assert!(report.breaks[0].problem.contains("modified"));
    let (_, verify) = h.call("GET", "/api/v1/audit/verify", &h.admin, None).await;
    assert_eq!(verify["ok"], false);
    assert_eq!(verify["breaks"][0]["seq"], 3);
    tamper(
        &h.db,
        &format!("UPDATE audit SET outcome = '{original}' WHERE {}", at(3)),
    )
    .await;
    let original = h.db.audit_verify(Some("acme")).await.unwrap();
    assert!(
        original.breaks.is_empty(),
        "restored: {:?}",
        original.breaks
    );

    // Deleted: record 4 vanishes.
    tamper(
        &h.db,
        &format!(
            "CREATE TABLE audit_saved AS SELECT * FROM audit WHERE {}",
            at(4)
        ),
    )
    .await;
    tamper(&h.db, &format!("DELETE FROM audit WHERE {}", at(4))).await;
    let report = h.db.audit_verify(Some("acme")).await.unwrap();
    assert!(
        report
            .breaks
            .iter()
            .any(|b| b.seq == 5 && b.problem.contains("record 4 is missing")),
        "{:?}",
        report.breaks
    );
    tamper(&h.db, "INSERT INTO audit SELECT * FROM audit_saved").await;
    assert!(h
        .db
        .audit_verify(Some("acme"))
        .await
        .unwrap()
        .breaks
        .is_empty());

    // Inserted: a record past the head, hashed as the chain would.
    tamper(
        &h.db,
        &format!(
            "INSERT INTO audit (tenant, time, actor_kind, actor, action, resource, request_id, \
             source, outcome) SELECT tenant, time, actor_kind, 'intruder', action, resource, \
             request_id, source, outcome FROM audit WHERE {}",
            at(6)
        ),
    )
    .await;
    tamper(
        &h.db,
        "INSERT INTO audit_links (id, tenant, seq, prev_hash, hash) \
         SELECT (SELECT MAX(id) FROM audit), tenant, 7, hash, hash FROM audit_links \
         WHERE tenant = 'acme' AND seq = 6",
    )
    .await;
    let report = h.db.audit_verify(Some("acme")).await.unwrap();
    assert!(
        report.breaks.iter().any(|b| b.problem.contains("inserted")),
        "{:?}",
        report.breaks
    );
    tamper(&h.db, "DELETE FROM audit WHERE actor = 'intruder'").await;
    tamper(&h.db, "DELETE FROM audit_links WHERE seq = 7").await;
    // The tail cut: the head says 6, the chain ends at 5.
    tamper(&h.db, &format!("DELETE FROM audit WHERE {}", at(6))).await;
    tamper(
        &h.db,
        "DELETE FROM audit_links WHERE tenant = 'acme' AND seq = 6",
    )
    .await;
    let report = h.db.audit_verify(Some("acme")).await.unwrap();
    assert_eq!(report.breaks.len(), 1, "{:?}", report.breaks);
    assert!(report.breaks[0].problem.contains("deleted"));
    h.stop().await;
}

async fn schedule_fires_are_audited_in_their_transaction(db: kiln_db::Db) {
    let h = harness(db).await;
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/schedules",
            &h.admin,
            Some(
                json!({"name": "every-second", "cron": "* * * * * *", "overlap": "allow",
                "target": {"job": {"kind": "noop", "spec": {}}}}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The harness's scheduler fires it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let fire = loop {
        let records = trail(&h.db, "acme").await;
        if let Some(fire) = records.iter().find(|e| e.record.action == "schedule.fire") {
            break fire.record.clone();
        }
        assert!(std::time::Instant::now() < deadline, "{records:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        (fire.actor_kind.as_str(), fire.actor.as_str()),
        ("schedule", "every-second")
    );
    assert_eq!(fire.outcome, "fired");
    assert!(fire.resource.starts_with("/api/v1/jobs/"), "{fire:?}");
    // The job the fire made exists: record and change are one.
    let id = fire.resource.rsplit('/').next().unwrap();
    let (status, _) = h
        .call("GET", &format!("/api/v1/jobs/{id}"), &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    h.stop().await;
}

/// Tables the requests below change (background loops' own tables, such
/// as workers' heartbeats, are left out).
const CHANGED: &[&str] = &[
    "api_keys",
    "users",
    "user_sessions",
    "secrets",
    "policies",
    "policy_versions",
    "webhooks",
    "subscriptions",
    "rules",
    "rule_state",
    "pipelines",
    "runs",
    "run_steps",
    "run_instances",
    "schedules",
    "queues",
    "modules",
    "jobs",
    "detector_settings",
    "events",
];

/// Sends one request twice: first while the database refuses audit
/// records, when it must fail and change nothing, then normally, when it
/// must succeed with exactly one record whose outcome is its status.
async fn atomic(
    h: &common::Harness,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
    key: &str,
) -> Value {
    let refuse = match &h.db {
        kiln_db::Db::Sqlite(_) => vec![
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit \
             BEGIN SELECT RAISE(ABORT, 'audit refused'); END",
        ],
        kiln_db::Db::Postgres(_) => vec![
            "CREATE OR REPLACE FUNCTION refuse_audit() RETURNS trigger AS $$ \
             BEGIN RAISE EXCEPTION 'audit refused'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit \
             FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
        ],
    };
    let allow = match &h.db {
        kiln_db::Db::Sqlite(_) => "DROP TRIGGER refuse_audit",
        kiln_db::Db::Postgres(_) => "DROP TRIGGER refuse_audit ON audit",
    };
    // Times a read touches, and the events sequencer's numbering.
    let skip = ["last_used_at", "last_seen", "position"];
    let before = kiln_db::testing::fingerprint(&h.db, CHANGED, &skip)
        .await
        .unwrap();
    for sql in &refuse {
        tamper(&h.db, sql).await;
    }
    let (status, answer) = h
        .raw(method, path, Some(key), content_type, body.to_string())
        .await;
    tamper(&h.db, allow).await;
    assert!(
        status.is_server_error(),
        "{method} {path} did not fail ({status} {answer}) although its record could not be written"
    );
    let after = kiln_db::testing::fingerprint(&h.db, CHANGED, &skip)
        .await
        .unwrap();
    for table in CHANGED {
        assert_eq!(
            before[*table], after[*table],
            "{method} {path} changed {table} although its record was refused"
        );
    }
    let records = trail(&h.db, "acme").await.len();
    let (status, answer) = h
        .raw(method, path, Some(key), content_type, body.to_string())
        .await;
    assert!(status.is_success(), "{method} {path}: {status} {answer}");
    let trail = trail(&h.db, "acme").await;
    assert_eq!(trail.len(), records + 1, "{method} {path}: one record");
    let record = &trail.last().unwrap().record;
    assert_eq!(
        record.outcome,
        status.as_u16().to_string(),
        "{method} {path}"
    );
    answer
}

/// A created resource's id, a number or a string.
fn id_of(made: &Value) -> String {
    let id = made.get("id").or_else(|| made.pointer("/run/id"));
    match id {
        Some(Value::String(id)) => id.clone(),
        Some(Value::Number(id)) => id.to_string(),
        _ => panic!("no id in {made}"),
    }
}

async fn a_change_and_its_record_are_one(db: kiln_db::Db) {
    let h = harness(db).await;
    h.state
        .master_key
        .set(kiln_core::secrets::MasterKey::new([7; 32]))
        .unwrap();
    const JSON: &str = "application/json";
    let a = h.admin.clone();
    let key = atomic(
        &h,
        "POST",
        "/api/v1/keys",
        JSON,
        r#"{"name":"ci","scopes":["write"]}"#,
        &a,
    )
    .await;
    let user = r#"{"username":"ann","role":"operator","password":"correct horse battery"}"#;
    atomic(&h, "POST", "/api/v1/users", JSON, user, &a).await;
    atomic(
        &h,
        "PUT",
        "/api/v1/users/ann/role",
        JSON,
        r#"{"role":"viewer"}"#,
        &a,
    )
    .await;
    let password = r#"{"password":"another horse battery"}"#;
    atomic(&h, "PUT", "/api/v1/users/ann/password", JSON, password, &a).await;
    let login = r#"{"tenant":"acme","username":"ann","password":"another horse battery"}"#;
    let session = atomic(&h, "POST", "/api/v1/auth/login", JSON, login, &a).await;
    let token = session["token"].as_str().expect("a token").to_string();
    atomic(&h, "POST", "/api/v1/auth/logout", JSON, "{}", &token).await;
    atomic(&h, "DELETE", "/api/v1/users/ann", JSON, "", &a).await;
    atomic(&h, "PUT", "/api/v1/secrets/tok", "text/plain", "s3cr3t", &a).await;
    atomic(&h, "DELETE", "/api/v1/secrets/tok", JSON, "", &a).await;
    atomic(
        &h,
        "PUT",
        "/api/v1/policies/p1",
        JSON,
        r#"{"rule":"true"}"#,
        &a,
    )
    .await;
    atomic(&h, "DELETE", "/api/v1/policies/p1", JSON, "", &a).await;
    let hook = json!({"provider": "github", "secret": "a-hook-secret-of-some-length",
        "target": {"job": {"kind": "noop", "spec": {}}}});
    atomic(
        &h,
        "PUT",
        "/api/v1/webhooks/gh",
        JSON,
        &hook.to_string(),
        &a,
    )
    .await;
    atomic(&h, "DELETE", "/api/v1/webhooks/gh", JSON, "", &a).await;
    let subscription = json!({"name": "x",
        "destination": {"kind": "webhook", "url": "http://127.0.0.1:9/x", "secret": "k"}});
    let made = atomic(
        &h,
        "POST",
        "/api/v1/subscriptions",
        JSON,
        &subscription.to_string(),
        &a,
    )
    .await;
    let path = format!("/api/v1/subscriptions/{}", made["id"].as_str().unwrap());
    atomic(&h, "DELETE", &path, JSON, "", &a).await;
    let rule = json!({"trigger": {"events": ["job.succeeded"]}, "condition": "false",
        "actions": [{"action": "run_job", "job": {"kind": "noop"}}]});
    atomic(
        &h,
        "PUT",
        "/api/v1/automation/rules/r1",
        JSON,
        &rule.to_string(),
        &a,
    )
    .await;
    atomic(&h, "DELETE", "/api/v1/automation/rules/r1", JSON, "", &a).await;
    // Approval steps only: nothing runs behind the test's back.
    let pipeline = json!({"name": "p", "steps": [{"id": "ok", "kind": "approval"}]});
    atomic(
        &h,
        "POST",
        "/api/v1/pipelines",
        JSON,
        &pipeline.to_string(),
        &a,
    )
    .await;
    let run = atomic(&h, "POST", "/api/v1/pipelines/p/runs", JSON, "{}", &a).await;
    let run = id_of(&run);
    atomic(
        &h,
        "POST",
        &format!("/api/v1/runs/{run}/cancel"),
        JSON,
        "{}",
        &a,
    )
    .await;
    atomic(
        &h,
        "POST",
        &format!("/api/v1/runs/{run}/retry"),
        JSON,
        "{}",
        &a,
    )
    .await;
    let path = format!("/api/v1/runs/{run}/steps/ok/approve");
    atomic(&h, "POST", &path, JSON, r#"{"comment":"fine"}"#, &a).await;
    let run = atomic(&h, "POST", "/api/v1/pipelines/p/trigger", JSON, "{}", &a).await;
    let run = id_of(&run);
    let path = format!("/api/v1/runs/{run}/steps/ok/reject");
    atomic(&h, "POST", &path, JSON, r#"{"comment":"no"}"#, &a).await;
    // The failed run opens an incident in the background: let it land
    // before the next fingerprint.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, incidents) = h.call("GET", "/api/v1/incidents", &a, None).await;
        if let Some(incident) = incidents["incidents"].as_array().and_then(|i| i.first()) {
            let id = id_of(incident);
            let path = format!("/api/v1/incidents/{id}/ack");
            atomic(&h, "POST", &path, JSON, r#"{"notes":"looking"}"#, &a).await;
            let path = format!("/api/v1/incidents/{id}/resolve");
            atomic(&h, "POST", &path, JSON, r#"{"notes":"done"}"#, &a).await;
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no incident: {incidents}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    atomic(&h, "DELETE", "/api/v1/pipelines/p", JSON, "", &a).await;
    let schedule = json!({"name": "s", "cron": "0 0 1 1 *", "paused": true,
        "target": {"job": {"kind": "noop", "spec": {}}}});
    atomic(
        &h,
        "POST",
        "/api/v1/schedules",
        JSON,
        &schedule.to_string(),
        &a,
    )
    .await;
    atomic(&h, "POST", "/api/v1/schedules/s/resume", JSON, "{}", &a).await;
    atomic(&h, "POST", "/api/v1/schedules/s/pause", JSON, "{}", &a).await;
    atomic(&h, "DELETE", "/api/v1/schedules/s", JSON, "", &a).await;
    atomic(
        &h,
        "PUT",
        "/api/v1/queues/q",
        JSON,
        r#"{"concurrency_limit":2}"#,
        &a,
    )
    .await;
    atomic(&h, "POST", "/api/v1/queues/q/pause", JSON, "{}", &a).await;
    // Jobs in the paused queue stay put.
    let job = json!({"kind": "noop", "spec": {}, "queue": "q"});
    let job = atomic(&h, "POST", "/api/v1/jobs", JSON, &job.to_string(), &a).await;
    let job = job["id"].as_str().unwrap().to_string();
    atomic(
        &h,
        "POST",
        &format!("/api/v1/jobs/{job}/cancel"),
        JSON,
        "{}",
        &a,
    )
    .await;
    atomic(
        &h,
        "POST",
        &format!("/api/v1/jobs/{job}/retry"),
        JSON,
        "{}",
        &a,
    )
    .await;
    atomic(
        &h,
        "POST",
        &format!("/api/v1/jobs/{job}/cancel"),
        JSON,
        "{}",
        &a,
    )
    .await;
    let module = atomic(
        &h,
        "POST",
        "/api/v1/modules",
        "text/plain",
        r#"(module (func (export "_start")))"#,
        &a,
    )
    .await;
    let path = format!("/api/v1/modules/{}", module["id"].as_str().unwrap());
    atomic(&h, "DELETE", &path, JSON, "", &a).await;
    let detectors = r#"{"backlog_age": {"max_age_s": 60}}"#;
    atomic(
        &h,
        "PUT",
        "/api/v1/incidents/detectors",
        JSON,
        detectors,
        &a,
    )
    .await;
    let path = format!("/api/v1/keys/{}", key["id"].as_str().unwrap());
    atomic(&h, "DELETE", &path, JSON, "", &a).await;
    h.stop().await;
}

async fn the_source_is_the_client_a_trusted_proxy_names(db: kiln_db::Db) {
    let h = harness(db).await;
    let mut settings = h.state.auth.settings();
    settings.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    h.state.auth.set_settings(settings);
    for (peer, expected) in [("10.1.2.3", "198.51.100.7"), ("192.0.2.1", "192.0.2.1")] {
        let mut request = Request::builder()
            .method("PUT")
            .uri("/api/v1/queues/q")
            .header("authorization", format!("Bearer {}", h.admin))
            .header("content-type", "application/json")
            .header("x-forwarded-for", "203.0.113.9, 198.51.100.7")
            .body(Body::from(r#"{"concurrency_limit":1}"#))
            .unwrap();
        let peer: std::net::SocketAddr = format!("{peer}:40000").parse().unwrap();
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let (status, body) = h.send(request).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let records = trail(&h.db, "acme").await;
        assert_eq!(
            records.last().unwrap().record.source,
            expected,
            "from {peer}"
        );
    }
    h.stop().await;
}
