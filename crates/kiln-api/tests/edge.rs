//! The API's edge against hostile input, on SQLite and on PostgreSQL (which
//! refuses NUL in text where SQLite stores it): every bad request gets a
//! clear 4xx in the one error body before anything is stored, and no tenant
//! reaches another's anything.

mod common;

use axum::http::StatusCode;
use common::{error_code, harness, Harness};
use kiln_db::Db;
use serde_json::{json, Value};

kiln_db::on_both_databases!(
    bad_job_submissions,
    bad_job_submissions_with_nul,
    every_kind_refuses_a_bad_spec,
    bad_job_queries,
    bad_keys_routes_and_bodies,
    scopes_are_checked_before_the_body_is_read,
    tenants_never_reach_each_others_jobs,
    tenants_never_reach_each_others_keys,
    deployment_wide_views_need_the_system_scope,
    a_page_of_jobs_is_bounded_in_bytes,
    a_duplicate_is_a_conflict,
);

/// `request` ("METHOD /path") with `body` sent as JSON by the acme admin
/// must get `status` and the error `code`, in the one error body.
async fn check(h: &Harness, request: &str, body: &str, expect: (u16, &str)) {
    check_as(h, &h.admin, request, "application/json", body, expect).await
}

async fn check_as(
    h: &Harness,
    key: &str,
    request: &str,
    content_type: &str,
    body: &str,
    (status, code): (u16, &str),
) {
    let (method, path) = request.split_once(' ').unwrap();
    let (got, answer) = h
        .raw(method, path, Some(key), content_type, body.to_string())
        .await;
    let shown = &body[..body.len().min(120)];
    assert_eq!(got.as_u16(), status, "{request} {shown}: {answer}");
    assert_eq!(error_code(&answer), code, "{request} {shown}: {answer}");
    assert!(
        answer["error"]["message"].is_string(),
        "{request}: {answer}"
    );
}

/// Nothing refused was stored: the tenant has no jobs.
async fn nothing_stored(h: &Harness) {
    let (status, list) = h.call("GET", "/api/v1/jobs", &h.admin, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["jobs"], json!([]));
}

const JOBS: &str = "POST /api/v1/jobs";
const RUN: &str = "POST /api/v1/run";

async fn bad_job_submissions(db: Db) {
    let h = harness(db).await;
    let module = format!("sha256:{}", "a".repeat(64));
    check(&h, JOBS, "{bad", (400, "bad_request")).await;
    check(&h, JOBS, "[]", (422, "invalid")).await;
    check(&h, JOBS, r#"{"kind":"noop","zzz":1}"#, (422, "invalid")).await;
    check(
        &h,
        JOBS,
        r#"{"kind":"noop","priority":"urgent"}"#,
        (422, "invalid"),
    )
    .await;
    check(
        &h,
        JOBS,
        r#"{"kind":"noop","max_attempts":0}"#,
        (422, "invalid"),
    )
    .await;
    check(
        &h,
        JOBS,
        r#"{"kind":"noop","max_attempts":99999999999}"#,
        (422, "invalid"),
    )
    .await;
    check(
        &h,
        JOBS,
        r#"{"kind":"noop","timeout_ms":-5}"#,
        (422, "invalid"),
    )
    .await;
    check(&h, JOBS, r#"{"kind":"no such kind!"}"#, (422, "invalid")).await;
    check(&h, JOBS, r#"{"kind":"../etc"}"#, (422, "invalid")).await;
    check(&h, JOBS, r#"{"kind":"nope"}"#, (422, "unknown_kind")).await;
    check(&h, RUN, r#"{"kind":"nope"}"#, (422, "unknown_kind")).await;
    check(
        &h,
        JOBS,
        r#"{"kind":"noop","queue":"a/b"}"#,
        (422, "invalid"),
    )
    .await;
    check(
        &h,
        JOBS,
        r#"{"kind":"noop","run_at":"tomorrow"}"#,
        (422, "invalid"),
    )
    .await;
    let both = r#"{"kind":"noop","run_at":"2030-01-01T00:00:00Z","delay_ms":5}"#;
    check(&h, JOBS, both, (422, "invalid")).await;
    let far = format!(r#"{{"kind":"noop","delay_ms":{}}}"#, i64::MAX);
    check(&h, JOBS, &far, (422, "invalid")).await;
    check(
        &h,
        JOBS,
        r#"{"kind":"noop","spec":"text"}"#,
        (422, "invalid"),
    )
    .await;
    let codes = format!(r#"{{"kind":"noop","permanent_exit_codes":{:?}}}"#, [1; 300]);
    check(&h, JOBS, &codes, (422, "invalid")).await;
    let backoff = r#"{"kind":"noop","backoff":{"base_ms":1,"max_ms":9223372036854775807}}"#;
    check(&h, JOBS, backoff, (422, "invalid")).await;
    let long_key = format!(
        r#"{{"kind":"noop","idempotency_key":"{}"}}"#,
        "k".repeat(300)
    );
    check(&h, JOBS, &long_key, (422, "invalid")).await;
    let unstored = format!(r#"{{"kind":"wasm","spec":{{"module":"{module}"}}}}"#);
    check(&h, JOBS, &unstored, (422, "invalid")).await;
    let huge = format!(
        r#"{{"kind":"noop","spec":{{"x":"{}"}}}}"#,
        "a".repeat(2 << 20)
    );
    check(&h, JOBS, &huge, (413, "too_large")).await;
    let typed = r#"{"kind":"noop"}"#;
    check_as(
        &h,
        &h.admin,
        JOBS,
        "text/plain",
        typed,
        (415, "unsupported_media_type"),
    )
    .await;
    nothing_stored(&h).await;
    h.stop().await;
}

/// PostgreSQL refuses NUL in `text` and `jsonb`: each field that holds one
/// is refused at the edge, never a 500 from the store.
async fn bad_job_submissions_with_nul(db: Db) {
    let h = harness(db).await;
    for route in [JOBS, RUN] {
        for body in [
            r#"{"kind":"no\u0000op"}"#,
            r#"{"kind":"noop","queue":"q\u0000"}"#,
            r#"{"kind":"noop","idempotency_key":"k\u0000"}"#,
            r#"{"kind":"noop","labels":{"a\u0000":"x"}}"#,
            r#"{"kind":"noop","labels":{"a":"x\u0000"}}"#,
            r#"{"kind":"noop","run_at":"2030-01-01T00:00:00Z\u0000"}"#,
        ] {
            check(&h, route, body, (422, "invalid")).await;
        }
        for body in [
            r#"{"kind":"noop","spec":{"stdout":"a\u0000"}}"#,
            r#"{"kind":"noop","spec":{"a\u0000":1}}"#,
            r#"{"kind":"noop","spec":{"a":[{"b":"\u0000"}]}}"#,
        ] {
            check(&h, route, body, (422, "invalid_spec")).await;
        }
    }
    nothing_stored(&h).await;
    h.stop().await;
}

async fn every_kind_refuses_a_bad_spec(db: Db) {
    let h = harness(db).await;
    // Whatever the kind, a spec the store cannot hold is refused, and so
    // is a field the kind does not know.
    for kind in common::kinds().names() {
        let body = json!({"kind": kind, "spec": {"x": "\u{0}"}}).to_string();
        check(&h, JOBS, &body, (422, "invalid_spec")).await;
        let body = json!({"kind": kind, "spec": {"surely_not_a_field": 1}}).to_string();
        check(&h, JOBS, &body, (422, "invalid_spec")).await;
        check(&h, RUN, &body, (422, "invalid_spec")).await;
    }
    // Each kind's own check, at submit rather than at run time.
    for (kind, spec) in [
        ("wasm", json!({"module": "nope"})),
        (
            "wasm",
            json!({"module": format!("sha256:{}", "a".repeat(64)), "zzz": 1}),
        ),
        ("vm", json!({"command": "true", "zzz": 1})),
        ("vm", json!({"command": "true", "image": "../scratch/x"})),
        ("vm", json!({"command": "true", "memory_mib": 1})),
        ("vm:create", json!({"image": "a';reboot;'"})),
        ("vm:execute", json!({"vm_id": "../x", "command": "true"})),
        ("exec", json!({"vm_id": 7, "command": "true"})),
        ("vm:delete", json!({"vm_id": "a/b"})),
    ] {
        let body = json!({"kind": kind, "spec": spec}).to_string();
        check(&h, JOBS, &body, (422, "invalid_spec")).await;
        check(&h, RUN, &body, (422, "invalid_spec")).await;
    }
    nothing_stored(&h).await;
    h.stop().await;
}

async fn bad_job_queries(db: Db) {
    let h = harness(db).await;
    for (path, expect) in [
        ("/api/v1/jobs?status=bogus", (400, "bad_request")),
        ("/api/v1/jobs?limit=0", (422, "invalid")),
        ("/api/v1/jobs?limit=1001", (422, "invalid")),
        ("/api/v1/jobs?label=nocolon", (422, "invalid")),
        ("/api/v1/jobs?cursor=zz", (422, "invalid")),
        ("/api/v1/jobs?zzz=1", (400, "bad_request")),
        ("/api/v1/jobs?kind=a%00b", (422, "invalid")),
        ("/api/v1/jobs?queue=q%00", (422, "invalid")),
        ("/api/v1/jobs?label=a%00:b", (422, "invalid")),
        ("/api/v1/jobs?label=a:b%00", (422, "invalid")),
        ("/api/v1/jobs?cursor=1%00", (422, "invalid")),
        ("/api/v1/jobs?created_after=%00", (422, "invalid")),
        ("/api/v1/jobs/abc", (404, "not_found")),
        ("/api/v1/jobs/99999999", (404, "not_found")),
        ("/api/v1/jobs/1%00", (404, "not_found")),
        ("/api/v1/jobs/%FF", (400, "bad_request")),
        ("/api/v1/jobs/%FF/attempts", (400, "bad_request")),
    ] {
        check(&h, &format!("GET {path}"), "", expect).await;
    }
    h.stop().await;
}

async fn bad_keys_routes_and_bodies(db: Db) {
    let h = harness(db).await;
    let keys = "POST /api/v1/keys";
    check(
        &h,
        keys,
        r#"{"name":"x","scopes":["root"]}"#,
        (422, "invalid"),
    )
    .await;
    check(&h, keys, r#"{"name":"x","scopes":[]}"#, (422, "invalid")).await;
    check(
        &h,
        keys,
        r#"{"name":"","scopes":["read"]}"#,
        (422, "invalid"),
    )
    .await;
    check(
        &h,
        keys,
        r#"{"name":"a\u0000","scopes":["read"]}"#,
        (422, "invalid"),
    )
    .await;
    let long = format!(r#"{{"name":"{}","scopes":["read"]}}"#, "n".repeat(129));
    check(&h, keys, &long, (422, "invalid")).await;
    let tenant = r#"{"name":"x","scopes":["read"],"tenant":"a\u0000"}"#;
    check(&h, keys, tenant, (422, "invalid")).await;
    check(&h, "DELETE /api/v1/keys/a%00b", "", (404, "not_found")).await;
    check(&h, "DELETE /api/v1/keys/nosuchkey0", "", (404, "not_found")).await;
    // Routes that do not exist, and methods a route does not take.
    check(&h, "GET /api/v1/nowhere", "", (404, "not_found")).await;
    check(&h, "GET /nowhere", "", (404, "not_found")).await;
    check(&h, "GET /api/v1/jobs/1/nowhere", "", (404, "not_found")).await;
    check(&h, "DELETE /api/v1/jobs", "", (405, "method_not_allowed")).await;
    check(&h, "PATCH /api/v1/keys", "", (405, "method_not_allowed")).await;
    check(&h, "POST /health", "", (405, "method_not_allowed")).await;
    // Queues and modules keep their own rules; the body is still ours.
    let queue = r#"{"concurrency_limit":0}"#;
    check_as(
        &h,
        &h.system,
        "PUT /api/v1/queues/default",
        "application/json",
        queue,
        (422, "invalid"),
    )
    .await;
    let modules = "POST /api/v1/modules";
    check_as(
        &h,
        &h.admin,
        modules,
        "application/wasm",
        "not wasm",
        (400, "bad_request"),
    )
    .await;
    check_as(
        &h,
        &h.admin,
        modules,
        "text/plain",
        "(module (func",
        (400, "bad_request"),
    )
    .await;
    check_as(
        &h,
        &h.admin,
        modules,
        "image/png",
        "x",
        (415, "unsupported_media_type"),
    )
    .await;
    h.stop().await;
}

async fn scopes_are_checked_before_the_body_is_read(db: Db) {
    let h = harness(db).await;
    // A read key learns it may not write, whatever it sent: the body was
    // never parsed (a bad one would have been a 400, a huge one a 413).
    let huge = format!(
        r#"{{"kind":"noop","spec":{{"x":"{}"}}}}"#,
        "a".repeat(2 << 20)
    );
    for body in ["{bad", r#"{"kind":"noop"}"#, huge.as_str()] {
        for route in [JOBS, RUN] {
            check_as(
                &h,
                &h.reader,
                route,
                "application/json",
                body,
                (403, "forbidden"),
            )
            .await;
        }
        let keys = "POST /api/v1/keys";
        check_as(
            &h,
            &h.reader,
            keys,
            "application/json",
            body,
            (403, "forbidden"),
        )
        .await;
    }
    h.stop().await;
}

async fn tenants_never_reach_each_others_jobs(db: Db) {
    let h = harness(db).await;
    let job = h
        .submit(json!({"kind": "noop", "spec": {"sleep_ms": 60_000}, "idempotency_key": "mine"}))
        .await;
    let id = job["id"].as_str().unwrap();
    for (method, path) in [
        ("GET", format!("/api/v1/jobs/{id}")),
        ("GET", format!("/api/v1/jobs/{id}/attempts")),
        ("POST", format!("/api/v1/jobs/{id}/cancel")),
        ("POST", format!("/api/v1/jobs/{id}/retry")),
    ] {
        let (status, body) = h.call(method, &path, &h.other, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(error_code(&body), "not_found");
    }
    let (_, list) = h.call("GET", "/api/v1/jobs", &h.other, None).await;
    assert_eq!(list["jobs"], json!([]));
    // The same idempotency key in another tenant is another job, whether
    // submitted, waited for or run: never the first tenant's.
    for path in [
        "/api/v1/jobs",
        "/api/v1/jobs?wait=true&wait_ms=1",
        "/api/v1/run?wait_ms=1",
    ] {
        let (status, theirs) = h
            .call(
                "POST",
                path,
                &h.other,
                Some(json!({"kind": "noop", "idempotency_key": "mine", "delay_ms": 60_000})),
            )
            .await;
        assert!(status.is_success(), "{path}: {theirs}");
        assert_ne!(theirs["id"], job["id"], "{path}");
        assert!(theirs["spec"].get("sleep_ms").is_none(), "{path}: {theirs}");
    }
    let module = h.push(&kiln_wasm::fixtures::hello()).await;
    let (status, _) = h
        .call("GET", &format!("/api/v1/modules/{module}"), &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &h.other,
            Some(json!({"kind": "wasm", "spec": {"module": module}})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    h.call("POST", &format!("/api/v1/jobs/{id}/cancel"), &h.admin, None)
        .await;
    h.stop().await;
}

async fn tenants_never_reach_each_others_keys(db: Db) {
    let h = harness(db).await;
    let (_, keys) = h.call("GET", "/api/v1/keys", &h.admin, None).await;
    let ids: Vec<String> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!ids.is_empty());
    let (_, theirs) = h.call("GET", "/api/v1/keys", &h.other, None).await;
    for key in theirs["keys"].as_array().unwrap() {
        assert_eq!(key["tenant"], "globex", "{theirs}");
    }
    for id in &ids {
        let (status, body) = h
            .call("DELETE", &format!("/api/v1/keys/{id}"), &h.other, None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    // Acme's keys still work.
    let (status, _) = h.call("GET", "/api/v1/jobs", &h.reader, None).await;
    assert_eq!(status, StatusCode::OK);
    h.stop().await;
}

async fn deployment_wide_views_need_the_system_scope(db: Db) {
    let h = harness(db).await;
    for path in ["/metrics", "/api/v1/workers"] {
        for key in [&h.admin, &h.reader, &h.other] {
            let (status, body) = h.call("GET", path, key, None).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
            assert_eq!(error_code(&body), "forbidden");
        }
        let (status, body) = h.call("GET", path, &h.system, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    h.stop().await;
}

async fn a_page_of_jobs_is_bounded_in_bytes(db: Db) {
    let h = harness(db).await;
    // 24 jobs of 200 kB each: more than one page's bytes.
    let module = h.push(&kiln_wasm::fixtures::echo()).await;
    let stdin = "f".repeat(200_000);
    for i in 0..24 {
        h.submit(
            json!({"kind": "wasm", "spec": {"module": module, "stdin": stdin},
                        "labels": {"n": i.to_string()}, "delay_ms": 60_000}),
        )
        .await;
    }
    let mut seen: Vec<Value> = Vec::new();
    let mut pages = 0;
    let mut path = "/api/v1/jobs?limit=1000".to_string();
    loop {
        let (status, page) = h.call("GET", &path, &h.admin, None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(page.to_string().len() < kiln_api::routes::jobs::PAGE_BYTES_MAX + 300_000);
        pages += 1;
        seen.extend(
            page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["labels"]["n"].clone()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/jobs?limit=1000&cursor={cursor}"),
            None => break,
        }
    }
    assert!(pages > 1, "one page held every job");
    let expect: Vec<Value> = (0..24).rev().map(|n| json!(n.to_string())).collect();
    assert_eq!(seen, expect, "every job once, newest first");
    h.stop().await;
}

async fn a_duplicate_is_a_conflict(db: Db) {
    let h = harness(db).await;
    let key = kiln_db::ApiKey {
        id: "duplicate0".into(),
        tenant: "acme".into(),
        name: "twice".into(),
        scopes: kiln_core::Scopes(vec![kiln_core::Scope::Read]),
        created_at: 0,
        revoked_at: None,
        expires_at: None,
        last_used_at: None,
    };
    h.db.key_insert(&key, "hash-one").await.unwrap();
    let error = h.db.key_insert(&key, "hash-two").await.unwrap_err();
    let error = kiln_api::error::ApiError::from(error);
    assert_eq!(
        (error.status, error.code),
        (StatusCode::CONFLICT, "conflict")
    );
    h.stop().await;
}

/// A port's proxy path without its slash sends the client to the slashed
/// one, query kept, so a page served there resolves its relative links.
#[tokio::test]
async fn a_port_path_without_its_slash_is_redirected() {
    use tower::ServiceExt;
    let h = harness(kiln_db::testing::sqlite_temp().await).await;
    let request = axum::http::Request::builder()
        .uri("/api/v1/vms/vm-abc/ports/8000?x=1")
        .header("authorization", format!("Bearer {}", h.admin))
        .body(axum::body::Body::empty())
        .unwrap();
    let response = h.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        response.headers()["location"],
        "/api/v1/vms/vm-abc/ports/8000/?x=1"
    );
}
