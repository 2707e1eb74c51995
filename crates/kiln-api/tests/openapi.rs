//! Keeps docs/openapi.json in step with the code, and the code's document in
//! step with its router. After changing the API, regenerate the file with
//! `KILN_UPDATE_OPENAPI=1 cargo test -p kiln-api --test openapi`.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use kiln_api::AppState;
use kiln_blob::BlobStore;
use tower::ServiceExt;
use utoipa::OpenApi;

#[test]
fn committed_openapi_document_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let generated = kiln_api::ApiDoc::openapi().to_pretty_json().unwrap() + "\n";
    if std::env::var_os("KILN_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is stale; regenerate it with KILN_UPDATE_OPENAPI=1 cargo test -p kiln-api --test openapi"
    );
}

/// The paths the router serves. axum has no public list of its routes, but
/// its `Debug` output names each one in quotes, those of its `path_router`
/// before those of the fallback's.
fn router_paths(router: &axum::Router) -> BTreeSet<String> {
    let debug = format!("{router:?}");
    let (routes, _fallback) = debug
        .split_once("fallback_router")
        .expect("axum's Debug output changed");
    routes
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|text| text.starts_with('/') && !text.contains("__private__axum"))
        .map(str::to_string)
        .collect()
}

/// Every route the router answers, with each method it takes, is in the
/// OpenAPI document, and the document names no route the router lacks: a
/// new route without its `utoipa::path` fails here.
#[tokio::test]
async fn every_route_is_in_the_document() {
    let root = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-openapi"));
    let db = kiln_db::Db::connect(&format!("sqlite://{}", root.join("kiln.db").display()))
        .await
        .unwrap();
    let blobs = BlobStore::local(&root.join("blobs")).unwrap();
    let router = kiln_api::app(AppState::new(db.clone(), blobs, None));
    let paths = router_paths(&router);
    assert!(
        paths.contains("/health") && paths.contains("/api/v1/jobs/{id}"),
        "the router's paths could not be read: {paths:?}"
    );
    let mut routed = BTreeSet::new();
    for path in &paths {
        // Any value will do for a parameter: the route matches before the
        // handler looks at it, and without a key no handler runs.
        let uri = path
            .split('/')
            .map(|part| if part.starts_with('{') { "x" } else { part })
            .collect::<Vec<_>>()
            .join("/");
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
        ] {
            let request = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .body(Body::empty())
                .unwrap();
            let status = router.clone().oneshot(request).await.unwrap().status();
            assert_ne!(status, StatusCode::NOT_FOUND, "{method} {uri}");
            if status != StatusCode::METHOD_NOT_ALLOWED {
                // A wildcard `{*name}` is written `{name}` in OpenAPI.
                let path = path.replace("{*", "{");
                routed.insert(format!("{} {path}", method.as_str().to_lowercase()));
            }
        }
    }
    let doc = serde_json::to_value(kiln_api::ApiDoc::openapi()).unwrap();
    let documented: BTreeSet<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|key| ["get", "post", "put", "delete", "patch"].contains(&key.as_str()))
                .map(move |method| format!("{method} {path}"))
        })
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the OpenAPI document: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "documented routes the router lacks: {unrouted:?}"
    );
    db.close().await;
    let _ = std::fs::remove_dir_all(&root);
}
