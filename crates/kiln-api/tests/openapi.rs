//! Keeps docs/openapi.json in step with the code. After changing the API,
//! regenerate it with `KILN_UPDATE_OPENAPI=1 cargo test -p kiln-api --test openapi`.

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
