//! Secrets on both databases: versions, metadata only on every route, the
//! value nowhere in clear (responses, events, any column), tenants apart,
//! and refusals.

mod common;

use axum::http::StatusCode;
use common::{error_code, harness};
use kiln_core::secrets::{MasterKey, KEY_BYTES};
use serde_json::Value;

kiln_db::on_both_databases!(
    secrets_are_versioned_and_never_shown,
    secrets_are_refused_without_a_master_key_or_with_a_bad_name,
);

const VALUE: &str = "pa55-word-that-must-not-leak";

async fn secrets_are_versioned_and_never_shown(db: kiln_db::Db) {
    let h = harness(db).await;
    let master = MasterKey::new([42; KEY_BYTES]);
    h.state.master_key.set(master.clone()).unwrap();
    let mut seen = Vec::new();
    let (status, first) = h
        .raw(
            "PUT",
            "/api/v1/secrets/db_password",
            Some(&h.admin),
            "application/octet-stream",
            VALUE,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(
        (first["name"].as_str(), first["version"].as_i64()),
        (Some("db_password"), Some(1))
    );
    assert_eq!(first["bytes"], VALUE.len());
    seen.push(first);
    let (status, second) = h
        .raw(
            "PUT",
            "/api/v1/secrets/db_password",
            Some(&h.admin),
            "text/plain",
            format!("{VALUE}-2"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_eq!(second["version"], 2);
    seen.push(second);
    let (status, list) = h.call("GET", "/api/v1/secrets", &h.reader, None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["secrets"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["secrets"][0]["version"], 2);
    seen.push(list);
    let (status, one) = h
        .call("GET", "/api/v1/secrets/db_password", &h.reader, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    seen.push(one);

    // A reader cannot write; another tenant sees and deletes nothing.
    let (status, body) = h
        .raw(
            "PUT",
            "/api/v1/secrets/db_password",
            Some(&h.reader),
            "text/plain",
            "x-x-x-x",
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = h
        .call("GET", "/api/v1/secrets/db_password", &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = h.call("GET", "/api/v1/secrets", &h.other, None).await;
    assert_eq!(list["secrets"], serde_json::json!([]));
    let (status, _) = h
        .call("DELETE", "/api/v1/secrets/db_password", &h.other, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Nowhere in clear: not in any answer, event or column.
    for body in &seen {
        assert!(!body.to_string().contains(VALUE), "{body}");
    }
    let (_, events) = h
        .call("GET", "/api/v1/events?after=0", &h.admin, None)
        .await;
    assert!(!events.to_string().contains(VALUE));
    let hex_value = hex::encode(VALUE);
    for row in dump(&h.db).await {
        assert!(!row.contains(VALUE) && !row.contains(&hex_value), "{row}");
    }
    // Each stored version opens, under this master key only, to its value.
    let taken =
        h.db.secret_take(
            "acme",
            &["db_password".to_string(), "absent".to_string()],
            1,
        )
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    let at = ("acme", "db_password", taken[0].version);
    let opened = kiln_core::secrets::open(&master, at, &taken[0].sealed).unwrap();
    assert_eq!(opened, format!("{VALUE}-2").as_bytes());
    assert!(
        kiln_core::secrets::open(&MasterKey::new([1; KEY_BYTES]), at, &taken[0].sealed).is_err()
    );
    let (_, one) = h
        .call("GET", "/api/v1/secrets/db_password", &h.admin, None)
        .await;
    assert!(one["last_used_at"].is_string(), "{one}");

    let (status, _) = h
        .call("DELETE", "/api/v1/secrets/db_password", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = h
        .call("GET", "/api/v1/secrets/db_password", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(dump(&h.db).await.is_empty(), "every version is gone");
    h.stop().await;
}

/// Every column of every secret row, as text.
async fn dump(db: &kiln_db::Db) -> Vec<String> {
    let sql = "SELECT tenant || ' ' || name || ' ' || ciphertext || ' ' || nonce || ' ' || \
               wrapped_key || ' ' || wrap_nonce || ' ' || master_id FROM secrets";
    kiln_db::testing::text_rows(db, sql).await.unwrap()
}

async fn secrets_are_refused_without_a_master_key_or_with_a_bad_name(db: kiln_db::Db) {
    let h = harness(db).await;
    let (status, body) = h
        .raw(
            "PUT",
            "/api/v1/secrets/token",
            Some(&h.admin),
            "text/plain",
            VALUE,
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    h.state
        .master_key
        .set(MasterKey::new([3; KEY_BYTES]))
        .unwrap();
    for name in ["..", "a%2Fb", "-x", "a.b"] {
        let (status, body) = h
            .raw(
                "PUT",
                &format!("/api/v1/secrets/{name}"),
                Some(&h.admin),
                "text/plain",
                VALUE,
            )
            .await;
        assert!(status.is_client_error(), "{name}: {status} {body}");
        assert!(body["error"]["code"].is_string(), "{body}");
    }
    let (status, body) = h
        .raw(
            "PUT",
            "/api/v1/secrets/empty",
            Some(&h.admin),
            "text/plain",
            "",
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
        "{body}"
    );
    let (status, body) = h
        .raw(
            "PUT",
            "/api/v1/secrets/big",
            Some(&h.admin),
            "text/plain",
            vec![b'x'; (64 << 10) + 1],
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let (status, _): (StatusCode, Value) = h.call("GET", "/api/v1/secrets", &h.admin, None).await;
    assert_eq!(status, StatusCode::OK);
    h.stop().await;
}
