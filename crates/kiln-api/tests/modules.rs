//! `/api/v1/modules` end to end on both databases: quotas, tenants kept
//! apart, scopes checked before the body is read, no compile on push.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_api::AppState;
use kiln_blob::BlobStore;
use kiln_core::{Scope, Scopes, TenantQuotas};
use kiln_db::Db;
use kiln_wasm::{fixtures, WasmConfig, WasmRuntime};
use serde_json::{json, Value};
use tower::ServiceExt;

kiln_db::on_both_databases!(
    module_quotas_answer_quota_exceeded,
    tenants_never_reach_each_others_modules,
    a_read_key_is_refused_before_the_body_is_read,
    pushing_validates_without_compiling,
    wasm_specs_are_bounded_at_submit,
    bytes_go_when_the_last_holder_deletes,
);

struct Harness {
    app: Router,
    wasm: Arc<WasmRuntime>,
    blobs: BlobStore,
    acme: String,
    reader: String,
    globex: String,
}

async fn harness(db: Db, quotas: TenantQuotas) -> Harness {
    let root = fixtures::temp_root("kiln-api-modules");
    let blobs = BlobStore::local(&root.join("blobs")).unwrap();
    let wasm = WasmRuntime::new(
        WasmConfig {
            cache_dir: Some(root.join("cache")),
            scratch_dir: root.join("scratch"),
            max_instances: 8,
            quotas,
            ..WasmConfig::default()
        },
        blobs.clone(),
    )
    .unwrap();
    let key = |tenant: &'static str, scope: Scope| {
        let db = db.clone();
        async move {
            kiln_api::issue_key(&db, tenant, "test", Scopes(vec![scope]))
                .await
                .unwrap()
                .1
        }
    };
    let acme = key("acme", Scope::Admin).await;
    let reader = key("acme", Scope::Read).await;
    let globex = key("globex", Scope::Admin).await;
    let app = kiln_api::app(AppState::new(db, blobs.clone(), Some(wasm.clone())));
    Harness {
        app,
        wasm,
        blobs,
        acme,
        reader,
        globex,
    }
}

impl Harness {
    async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, body)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json");
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_default();
        self.send(request.body(body).unwrap()).await
    }

    async fn push(&self, key: &str, wat: &str) -> (StatusCode, Value) {
        let request = Request::builder()
            .method("POST")
            .uri("/api/v1/modules")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "text/plain")
            .body(Body::from(wat.to_string()))
            .unwrap();
        self.send(request).await
    }
}

fn quota_error(status: StatusCode, body: &Value) {
    assert!(status.is_client_error(), "{status} {body}");
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
}

async fn module_quotas_answer_quota_exceeded(db: Db) {
    let size = |wat: &str| WasmRuntime::to_binary(wat.as_bytes()).unwrap().len() as u64;
    let (a, b, c) = (
        fixtures::exit_with(1),
        fixtures::exit_with(2),
        fixtures::hello(),
    );
    let h = harness(
        db,
        TenantQuotas {
            modules_max: 2,
            modules_bytes_max: size(&a) + size(&b) + size(&c) - 1,
            ..TenantQuotas::default()
        },
    )
    .await;
    assert_eq!(h.push(&h.acme, &a).await.0, StatusCode::CREATED);
    // Pushing a module already held costs nothing.
    assert_eq!(h.push(&h.acme, &a).await.0, StatusCode::OK);
    assert_eq!(h.push(&h.acme, &b).await.0, StatusCode::CREATED);
    let (status, body) = h.push(&h.acme, &c).await;
    quota_error(status, &body);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("modules stored"));
    // Each tenant has its own count; the bytes bound holds too.
    let (status, first) = h.push(&h.globex, &a).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(h.push(&h.globex, &b).await.0, StatusCode::CREATED);
    let (_, list) = h.call("GET", "/api/v1/modules", &h.acme, None).await;
    assert_eq!(list["modules"].as_array().unwrap().len(), 2);
    // Deleting one makes room again.
    let id = first["id"].as_str().unwrap();
    let (status, _) = h
        .call("DELETE", &format!("/api/v1/modules/{id}"), &h.acme, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(h.push(&h.acme, &c).await.0, StatusCode::CREATED);

    let h = harness(
        kiln_db::testing::sqlite_temp().await,
        TenantQuotas {
            modules_bytes_max: size(&a) + size(&b) - 1,
            ..TenantQuotas::default()
        },
    )
    .await;
    assert_eq!(h.push(&h.acme, &a).await.0, StatusCode::CREATED);
    let (status, body) = h.push(&h.acme, &b).await;
    quota_error(status, &body);
    assert!(body["error"]["message"].as_str().unwrap().contains("bytes"));
}

async fn tenants_never_reach_each_others_modules(db: Db) {
    let h = harness(db, TenantQuotas::default()).await;
    let (status, pushed) = h.push(&h.acme, &fixtures::hello()).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = pushed["id"].as_str().unwrap();
    let path = format!("/api/v1/modules/{id}");
    for method in ["GET", "DELETE"] {
        let (status, body) = h.call(method, &path, &h.globex, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    let (_, list) = h.call("GET", "/api/v1/modules", &h.globex, None).await;
    assert_eq!(list["modules"], json!([]));
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &h.globex,
            Some(json!({"kind": "wasm", "spec": {"module": id}})),
        )
        .await;
    assert!(status.is_client_error(), "{status} {body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not stored"));
    // The owner still has it, untouched by the other tenant's delete.
    let (status, _) = h.call("GET", &path, &h.acme, None).await;
    assert_eq!(status, StatusCode::OK);
}

async fn a_read_key_is_refused_before_the_body_is_read(db: Db) {
    let h = harness(db, TenantQuotas::default()).await;
    // A body that never ends: a handler that read it first would never answer.
    let endless = futures::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0u8; 1024])),
            (),
        ))
    });
    let request = Request::builder()
        .method("POST")
        .uri("/api/v1/modules")
        .header("authorization", format!("Bearer {}", h.reader))
        .header("content-type", "application/wasm")
        .body(Body::from_stream(endless))
        .unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), h.send(request))
        .await
        .expect("the scope is checked before the body is read");
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
}

async fn pushing_validates_without_compiling(db: Db) {
    let h = harness(db, TenantQuotas::default()).await;
    let (status, _) = h.push(&h.acme, &fixtures::hello()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = h.push(&h.acme, &fixtures::echo()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(h.wasm.cache_stats().compiles, 0, "API nodes do not compile");
    for (wat, why) in [
        ("(module)", "_start"),
        (
            r#"(module (import "env" "evil" (func)) (func (export "_start")))"#,
            "env::evil",
        ),
    ] {
        let (status, body) = h.push(&h.acme, wat).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{body}"
        );
    }
    let request = Request::builder()
        .method("POST")
        .uri("/api/v1/modules")
        .header("authorization", format!("Bearer {}", h.acme))
        .header("content-type", "application/wasm")
        .body(Body::from(b"\0asm\x01\0\0\0garbage".to_vec()))
        .unwrap();
    let (status, body) = h.send(request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

async fn wasm_specs_are_bounded_at_submit(db: Db) {
    let h = harness(db, TenantQuotas::default()).await;
    let (_, pushed) = h.push(&h.acme, &fixtures::hello()).await;
    let id = pushed["id"].as_str().unwrap();
    let too_much = TenantQuotas::default().wasm_output_bytes_max + 1;
    for spec in [
        json!({"module": id, "output_limit_bytes": too_much}),
        json!({"module": id, "unknown": true}),
        json!({"module": id, "args": ["a\u{0}"]}),
        json!({"module": id.to_uppercase()}),
    ] {
        let (status, body) = h
            .call(
                "POST",
                "/api/v1/jobs",
                &h.acme,
                Some(json!({"kind": "wasm", "spec": spec})),
            )
            .await;
        assert!(status.is_client_error(), "{spec}: {status} {body}");
    }
}

async fn bytes_go_when_the_last_holder_deletes(db: Db) {
    let h = harness(db, TenantQuotas::default()).await;
    let (_, pushed) = h.push(&h.acme, &fixtures::hello()).await;
    let id = pushed["id"].as_str().unwrap().to_string();
    let key = kiln_wasm::module_blob_key(&id);
    let path = format!("/api/v1/modules/{id}");
    assert_eq!(
        h.push(&h.globex, &fixtures::hello()).await.0,
        StatusCode::CREATED
    );
    assert!(h.blobs.exists(&key).await.unwrap());
    let (status, _) = h.call("DELETE", &path, &h.acme, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(
        h.blobs.exists(&key).await.unwrap(),
        "another tenant still holds the module"
    );
    let (status, _) = h.call("DELETE", &path, &h.globex, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!h.blobs.exists(&key).await.unwrap(), "nobody holds it");
    // Pushing it again stores it again.
    assert_eq!(
        h.push(&h.acme, &fixtures::hello()).await.0,
        StatusCode::CREATED
    );
    assert!(h.blobs.exists(&key).await.unwrap());
    // A module whose bytes went missing is repaired by pushing it again.
    h.blobs.delete(&key).await.unwrap();
    assert_eq!(h.push(&h.acme, &fixtures::hello()).await.0, StatusCode::OK);
    assert!(h.blobs.exists(&key).await.unwrap());
}
