//! Users, roles and sessions on both databases: login (an unknown user and
//! a wrong password answered alike), roles as scopes, logout and user
//! changes ending sessions at once, the login throttle (slow down, lock,
//! the lock ending; per account and per source address), token expiry and
//! key rotation, the session cookie with and without its CSRF header,
//! users of another tenant not found, and API keys' expiry and last use.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode};
use common::{error_code, harness, Harness};
use http_body_util::BodyExt;
use kiln_api::auth::{AuthSettings, TokenKeys};
use kiln_core::users::ThrottlePolicy;
use serde_json::{json, Value};
use tower::ServiceExt;

kiln_db::on_both_databases!(
    users_sign_in_with_roles_and_sign_out,
    user_changes_end_their_sessions_and_tenants_stay_apart,
    failed_logins_slow_down_then_lock_and_the_lock_ends,
    tokens_expire_and_keys_rotate,
    the_cookie_needs_the_csrf_header_on_writes,
    api_keys_expire_and_record_their_last_use,
);

const PASSWORD: &str = "correct horse battery";

/// A request sent as if from `peer`, with its answer's headers.
async fn send_from(
    h: &Harness,
    peer: Option<&str>,
    mut request: Request<Body>,
) -> (StatusCode, HeaderMap, Value) {
    if let Some(peer) = peer {
        let addr: SocketAddr = format!("{peer}:40000").parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(addr));
    }
    let response = h.app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body)
}

async fn login_from(
    h: &Harness,
    peer: Option<&str>,
    tenant: &str,
    user: &str,
    password: &str,
) -> (StatusCode, HeaderMap, Value) {
    let request = Request::post("/api/v1/auth/login")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"tenant": tenant, "username": user, "password": password}).to_string(),
        ))
        .unwrap();
    send_from(h, peer, request).await
}

async fn login(h: &Harness, tenant: &str, user: &str, password: &str) -> (StatusCode, Value) {
    let (status, _, body) = login_from(h, None, tenant, user, password).await;
    (status, body)
}

/// Signs in and returns the token.
async fn token(h: &Harness, user: &str) -> String {
    let (status, body) = login(h, "acme", user, PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["token"].as_str().unwrap().to_string()
}

async fn add_user(h: &Harness, key: &str, user: &str, role: &str) {
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/users",
            key,
            Some(json!({"username": user, "role": role, "password": PASSWORD})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// The logins' own throttle out of the way, for tests about other things.
fn no_throttle() -> AuthSettings {
    let none = ThrottlePolicy {
        failures_max: 1_000,
        window_ms: 60_000,
        lock_ms: 1_000,
        delay_ms: 0,
    };
    AuthSettings {
        account: none,
        source: none,
        ..AuthSettings::default()
    }
}

async fn users_sign_in_with_roles_and_sign_out(db: kiln_db::Db) {
    let h = harness(db).await;
    h.state.auth.set_settings(no_throttle());
    let dir = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-token-keys"));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("token.key");
    h.state
        .auth
        .set_keys(TokenKeys::open(&key_file, true).unwrap());
    add_user(&h, &h.admin, "vera", "viewer").await;
    add_user(&h, &h.admin, "otto", "operator").await;
    add_user(&h, &h.admin, "ada", "admin").await;

    let (status, body) = login(&h, "acme", "otto", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["role"], "operator");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in_s"], 900);
    assert!(body["csrf_token"].as_str().unwrap().len() >= 32);
    let otto = body["token"].as_str().unwrap().to_string();
    assert_eq!(otto.matches('.').count(), 2, "a JWT");

    // An unknown user and a wrong password get the very same answer; so
    // does a tenant that does not exist.
    let wrong = login(&h, "acme", "otto", "not the password at all").await;
    let unknown = login(&h, "acme", "nobody", PASSWORD).await;
    let elsewhere = login(&h, "globex", "otto", PASSWORD).await;
    assert_eq!(wrong.0, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong, unknown);
    assert_eq!(wrong, elsewhere);
    // A malformed login is refused as such.
    let (status, body) = login(&h, "acme", "../etc", PASSWORD).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // Roles are scopes: a viewer reads and cannot submit; an operator
    // submits and cannot mint keys; an admin can.
    let vera = token(&h, "vera").await;
    let (status, _) = h.call("GET", "/api/v1/jobs", &vera, None).await;
    assert_eq!(status, StatusCode::OK);
    let job = json!({"kind": "noop", "spec": {}});
    let (status, body) = h
        .call("POST", "/api/v1/jobs", &vera, Some(job.clone()))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = h.call("POST", "/api/v1/jobs", &otto, Some(job)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let new_key = json!({"name": "ci", "scopes": ["read"]});
    let (status, body) = h
        .call("POST", "/api/v1/keys", &otto, Some(new_key.clone()))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = h.call("GET", "/api/v1/users", &otto, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let ada = token(&h, "ada").await;
    let (status, body) = h.call("POST", "/api/v1/keys", &ada, Some(new_key)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, list) = h.call("GET", "/api/v1/users", &ada, None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = list["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ada", "otto", "vera"]);
    assert!(
        !list.to_string().contains("argon2"),
        "no hash is shown: {list}"
    );

    let (status, me) = h.call("GET", "/api/v1/auth/me", &otto, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            me["kind"].as_str(),
            me["username"].as_str(),
            me["role"].as_str()
        ),
        (Some("user"), Some("otto"), Some("operator"))
    );
    let (_, me) = h.call("GET", "/api/v1/auth/me", &h.admin, None).await;
    assert_eq!(me["kind"], "key");

    // Logout ends the session at once; an API key has none to end.
    let (status, _) = h.call("POST", "/api/v1/auth/logout", &otto, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = h.call("GET", "/api/v1/jobs", &otto, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // Another API process sharing the key file and the store refuses it
    // too: the session's end is in the store, not only in this cache.
    let other = kiln_api::AppState::new(h.db.clone(), h.state.blobs.clone(), None);
    other
        .auth
        .set_keys(TokenKeys::open(&key_file, false).unwrap());
    let other = kiln_api::app(other);
    let request = |token: &str| {
        Request::get("/api/v1/jobs")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    let answer = other.clone().oneshot(request(&otto)).await.unwrap();
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    let answer = other.clone().oneshot(request(&ada)).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let (status, _) = h.call("POST", "/api/v1/auth/logout", &h.admin, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The trail names the user, for logins and their failures, and never
    // holds a password.
    h.db.audit_chain_pass(false).await.unwrap();
    let (_, trail) = h
        .call(
            "GET",
            "/api/v1/audit?action=POST%20/api/v1/auth/login",
            &h.admin,
            None,
        )
        .await;
    let records = trail["records"].as_array().unwrap();
    let outcome = |user: &str, outcome: &str| {
        records.iter().any(|r| {
            r["actor_kind"] == "user"
                && r["actor"] == user
                && r["outcome"].as_str() == Some(outcome)
        })
    };
    assert!(outcome("otto", "200"), "{trail}");
    assert!(outcome("otto", "401 unauthorized"), "{trail}");
    assert!(outcome("nobody", "401 unauthorized"), "{trail}");
    assert!(!trail.to_string().contains(PASSWORD));
    let _ = std::fs::remove_dir_all(&dir);
    let (_, trail) = h
        .call("GET", "/api/v1/audit?actor=otto", &h.admin, None)
        .await;
    assert!(
        trail["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "POST /api/v1/jobs" && r["outcome"] == "201"),
        "{trail}"
    );
    h.stop().await;
}

async fn user_changes_end_their_sessions_and_tenants_stay_apart(db: kiln_db::Db) {
    let h = harness(db).await;
    h.state.auth.set_settings(no_throttle());
    add_user(&h, &h.admin, "otto", "operator").await;
    add_user(&h, &h.admin, "vera", "viewer").await;
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/users",
            &h.admin,
            Some(json!({"username": "otto", "role": "viewer", "password": PASSWORD})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/users",
            &h.admin,
            Some(json!({"username": "short", "role": "viewer", "password": "2short"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = h
        .call(
            "POST",
            "/api/v1/users",
            &h.admin,
            Some(json!({"username": "root", "role": "root", "password": PASSWORD})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // A reader key is no admin.
    let (status, _) = h.call("GET", "/api/v1/users", &h.reader, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Another tenant finds none of them.
    let (_, theirs) = h.call("GET", "/api/v1/users", &h.other, None).await;
    assert_eq!(theirs["users"], json!([]));
    for (method, path, body) in [
        ("GET", "/api/v1/users/otto", None),
        ("DELETE", "/api/v1/users/otto", None),
        (
            "PUT",
            "/api/v1/users/otto/role",
            Some(json!({"role": "admin"})),
        ),
        (
            "PUT",
            "/api/v1/users/otto/password",
            Some(json!({"password": "a new password here"})),
        ),
    ] {
        let (status, answer) = h.call(method, path, &h.other, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
    }
    let (status, _) = login(&h, "globex", "otto", PASSWORD).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A role change ends the user's sessions; the next login has the new role.
    let otto = token(&h, "otto").await;
    let (status, body) = h
        .call(
            "PUT",
            "/api/v1/users/otto/role",
            &h.admin,
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(
        (status, body["role"].as_str()),
        (StatusCode::OK, Some("viewer"))
    );
    let (status, _) = h.call("GET", "/api/v1/jobs", &otto, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let otto = token(&h, "otto").await;
    let (status, _) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &otto,
            Some(json!({"kind": "noop", "spec": {}})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Users change their own password with the old one, not another's.
    let vera = token(&h, "vera").await;
    let change = |old: Option<&str>| {
        let mut body = json!({"password": "a brand new password"});
        if let Some(old) = old {
            body["old_password"] = json!(old);
        }
        Some(body)
    };
    let (status, body) = h
        .call("PUT", "/api/v1/users/vera/password", &vera, change(None))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = h
        .call(
            "PUT",
            "/api/v1/users/vera/password",
            &vera,
            change(Some("a wrong old password")),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = h
        .call(
            "PUT",
            "/api/v1/users/otto/password",
            &vera,
            change(Some(PASSWORD)),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = h
        .call(
            "PUT",
            "/api/v1/users/vera/password",
            &vera,
            change(Some(PASSWORD)),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    // Which ends her sessions; the old password no longer signs in.
    let (status, _) = h.call("GET", "/api/v1/jobs", &vera, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        login(&h, "acme", "vera", PASSWORD).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = login(&h, "acme", "vera", "a brand new password").await;
    assert_eq!(status, StatusCode::OK);
    // An admin sets anyone's without the old one.
    let (status, _) = h
        .call(
            "PUT",
            "/api/v1/users/vera/password",
            &h.admin,
            Some(json!({"password": PASSWORD})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // Deleting a user ends their sessions and their logins.
    let (status, _) = h.call("DELETE", "/api/v1/users/otto", &h.admin, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = h.call("GET", "/api/v1/jobs", &otto, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        login(&h, "acme", "otto", PASSWORD).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = h.call("GET", "/api/v1/users/otto", &h.admin, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h.call("GET", "/api/v1/users/..%2Fx", &h.admin, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Only a hash is stored: the password is in no column.
    let stored =
        h.db.user_credentials("acme", "vera")
            .await
            .unwrap()
            .unwrap()
            .1;
    assert!(
        stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{stored}"
    );
    assert!(!stored.contains(PASSWORD));
    h.stop().await;
}

async fn failed_logins_slow_down_then_lock_and_the_lock_ends(db: kiln_db::Db) {
    let h = harness(db).await;
    add_user(&h, &h.admin, "otto", "operator").await;
    add_user(&h, &h.admin, "vera", "viewer").await;
    add_user(&h, &h.admin, "sam", "viewer").await;
    let lock_ms = 1_500;
    let wide = ThrottlePolicy {
        failures_max: 1_000,
        window_ms: 60_000,
        lock_ms,
        delay_ms: 0,
    };
    // Per account: the third failure locks.
    h.state.auth.set_settings(AuthSettings {
        account: ThrottlePolicy {
            failures_max: 3,
            ..wide
        },
        source: wide,
        ..AuthSettings::default()
    });
    for user in ["otto", "ghost"] {
        for _ in 0..3 {
            let (status, _) = login(&h, "acme", user, "not the password at all").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
        // Locked: even the right password is refused, without a check, and
        // an unknown user is locked exactly alike.
        let (status, headers, body) = login_from(&h, None, "acme", user, PASSWORD).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(error_code(&body), "locked");
        let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=2).contains(&wait), "{wait}");
    }
    // Another account is not locked by these.
    assert_eq!(login(&h, "acme", "vera", PASSWORD).await.0, StatusCode::OK);
    // Attempts made at once are all counted before any is checked: of
    // many at once on a fresh account, at most the allowance is checked.
    let attempts = (0..8).map(|_| login(&h, "acme", "vera", "not the password at all"));
    let answers = futures::future::join_all(attempts).await;
    let checked = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::UNAUTHORIZED)
        .count();
    assert!(checked <= 3, "{checked} of 8 checked: {answers:?}");
    assert!(answers
        .iter()
        .all(|(s, _)| *s == StatusCode::UNAUTHORIZED || *s == StatusCode::TOO_MANY_REQUESTS));
    // The lock ends.
    tokio::time::sleep(Duration::from_millis(lock_ms as u64 + 200)).await;
    assert_eq!(login(&h, "acme", "otto", PASSWORD).await.0, StatusCode::OK);

    // Per source address: failures spread over many accounts lock the
    // address, for every account, and no other address.
    h.state.auth.set_settings(AuthSettings {
        account: wide,
        source: ThrottlePolicy {
            failures_max: 4,
            ..wide
        },
        ..AuthSettings::default()
    });
    for i in 0..4 {
        let (status, _, _) = login_from(
            &h,
            Some("203.0.113.7"),
            "acme",
            &format!("guess{i}"),
            "password guess",
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, _, body) = login_from(&h, Some("203.0.113.7"), "acme", "otto", PASSWORD).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let (status, _, _) = login_from(&h, Some("198.51.100.2"), "acme", "otto", PASSWORD).await;
    assert_eq!(status, StatusCode::OK);

    // Before a lock, each failure makes the next attempt wait longer.
    h.state.auth.set_settings(AuthSettings {
        account: ThrottlePolicy {
            failures_max: 5,
            delay_ms: 1_000,
            ..wide
        },
        source: wide,
        ..AuthSettings::default()
    });
    let (status, _) = login(&h, "acme", "sam", "not the password at all").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, headers, body) = login_from(&h, None, "acme", "sam", PASSWORD).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(error_code(&body), "rate_limited");
    assert_eq!(headers["retry-after"], "1");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (status, _) = login(&h, "acme", "sam", "still not the password").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Twice as long after the second.
    let (_, headers, _) = login_from(&h, None, "acme", "sam", PASSWORD).await;
    assert_eq!(headers["retry-after"], "2");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(login(&h, "acme", "sam", PASSWORD).await.0, StatusCode::OK);

    // Failures and locks are on the trail, with why.
    h.db.audit_chain_pass(false).await.unwrap();
    let (_, trail) = h
        .call("GET", "/api/v1/audit?actor=ghost", &h.admin, None)
        .await;
    let records = trail["records"].as_array().unwrap();
    assert!(
        records.iter().any(|r| r["outcome"] == "429 locked"),
        "{trail}"
    );
    assert!(
        records.iter().any(|r| r["rationale"]
            .as_str()
            .is_some_and(|w| w.contains("account locked"))),
        "{trail}"
    );
    h.stop().await;
}

fn kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "HS256");
    header["kid"].as_str().unwrap().to_string()
}

async fn tokens_expire_and_keys_rotate(db: kiln_db::Db) {
    let h = harness(db).await;
    add_user(&h, &h.admin, "otto", "operator").await;
    let dir = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-token-keys"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("token.key");
    h.state.auth.set_keys(TokenKeys::open(&path, true).unwrap());
    h.state.auth.set_settings(AuthSettings {
        token_ttl_s: 1,
        ..no_throttle()
    });

    // A short-lived token works, then answers `expired`.
    let first = token(&h, "otto").await;
    let (status, _) = h.call("GET", "/api/v1/jobs", &first, None).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let (status, body) = h.call("GET", "/api/v1/jobs", &first, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "expired");

    // Rotation: a new key signs, the previous one still verifies.
    h.state.auth.set_settings(no_throttle());
    let old = token(&h, "otto").await;
    let (new_kid, kept_kid) = TokenKeys::rotate(&path).unwrap();
    assert_eq!(kept_kid, kid(&old));
    // A running process picks the file up within a second.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let new = token(&h, "otto").await;
    assert_eq!(kid(&new), new_kid);
    assert_ne!(kid(&new), kid(&old));
    for token in [&old, &new] {
        let (status, body) = h.call("GET", "/api/v1/jobs", token, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Another rotation drops the oldest key: its tokens are refused.
    TokenKeys::rotate(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (status, _) = h.call("GET", "/api/v1/jobs", &old, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = h.call("GET", "/api/v1/jobs", &new, None).await;
    assert_eq!(status, StatusCode::OK);
    // A token from another deployment's key, or a forged one, is refused.
    let (status, body) = h.call("GET", "/api/v1/jobs", "a.b.c", None).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let _ = std::fs::remove_dir_all(&dir);
    h.stop().await;
}

/// The cookies a login sets when `peer` says it came over TLS.
async fn over_tls(h: &Harness, peer: &str) -> Vec<String> {
    let request = Request::post("/api/v1/auth/login")
        .header("content-type", "application/json")
        .header("x-forwarded-proto", "https")
        .body(Body::from(
            json!({"tenant": "acme", "username": "otto", "password": PASSWORD}).to_string(),
        ))
        .unwrap();
    let (status, headers, _) = send_from(h, Some(peer), request).await;
    assert_eq!(status, StatusCode::OK);
    set_cookies(&headers)
}

fn set_cookies(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

fn cookie_value(cookies: &[String], name: &str) -> String {
    cookies
        .iter()
        .find_map(|c| c.strip_prefix(&format!("{name}=")))
        .and_then(|rest| rest.split(';').next())
        .unwrap()
        .to_string()
}

async fn the_cookie_needs_the_csrf_header_on_writes(db: kiln_db::Db) {
    let h = harness(db).await;
    h.state.auth.set_settings(no_throttle());
    add_user(&h, &h.admin, "otto", "operator").await;
    let (status, headers, body) = login_from(&h, None, "acme", "otto", PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    let cookies = set_cookies(&headers);
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    let session = cookies
        .iter()
        .find(|c| c.starts_with("kiln_session="))
        .unwrap();
    let csrf_cookie = cookies
        .iter()
        .find(|c| c.starts_with("kiln_csrf="))
        .unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=900"] {
        assert!(session.contains(attribute), "{session}");
    }
    assert!(!session.contains("Secure"), "plain HTTP: {session}");
    assert!(
        !csrf_cookie.contains("HttpOnly"),
        "the console reads it: {csrf_cookie}"
    );
    let token = cookie_value(&cookies, "kiln_session");
    let csrf = cookie_value(&cookies, "kiln_csrf");
    assert_eq!(token, body["token"].as_str().unwrap());
    assert_eq!(csrf, body["csrf_token"].as_str().unwrap());

    let with_cookie = |method: &str, path: &str, csrf: Option<&str>| {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("cookie", format!("theme=dark; kiln_session={token}"))
            .header("content-type", "application/json");
        if let Some(value) = csrf {
            request = request.header("x-csrf-token", value);
        }
        let body = if method == "POST" {
            json!({"kind": "noop", "spec": {}}).to_string()
        } else {
            String::new()
        };
        request.body(Body::from(body)).unwrap()
    };
    // Reads need no CSRF header; writes do, and it must match.
    let (status, _, _) = send_from(&h, None, with_cookie("GET", "/api/v1/jobs", None)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = send_from(&h, None, with_cookie("POST", "/api/v1/jobs", None)).await;
    assert_eq!((status, error_code(&body)), (StatusCode::FORBIDDEN, "csrf"));
    let (status, _, body) = send_from(
        &h,
        None,
        with_cookie("POST", "/api/v1/jobs", Some("0123456789abcdef")),
    )
    .await;
    assert_eq!((status, error_code(&body)), (StatusCode::FORBIDDEN, "csrf"));
    let (status, _, body) =
        send_from(&h, None, with_cookie("POST", "/api/v1/jobs", Some(&csrf))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The same token as a bearer needs no CSRF header: no browser sends
    // that header by itself.
    let (status, _) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &token,
            Some(json!({"kind": "noop", "spec": {}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    // Logout through the cookie needs the header too, and clears both.
    let (status, _, _) =
        send_from(&h, None, with_cookie("POST", "/api/v1/auth/logout", None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, headers, _) = send_from(
        &h,
        None,
        with_cookie("POST", "/api/v1/auth/logout", Some(&csrf)),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let cleared = set_cookies(&headers);
    assert!(
        cleared.iter().all(|c| c.contains("Max-Age=0")),
        "{cleared:?}"
    );
    let (status, _, _) = send_from(&h, None, with_cookie("GET", "/api/v1/jobs", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Secure when a trusted proxy says the request came over TLS, not when
    // anyone else says so; always with the setting.
    assert!(over_tls(&h, "127.0.0.1")
        .await
        .iter()
        .all(|c| c.contains("; Secure")));
    assert!(over_tls(&h, "192.0.2.10")
        .await
        .iter()
        .all(|c| !c.contains("Secure")));
    h.state.auth.set_settings(AuthSettings {
        secure_cookies: true,
        ..no_throttle()
    });
    let (_, headers, _) = login_from(&h, None, "acme", "otto", PASSWORD).await;
    assert!(set_cookies(&headers).iter().all(|c| c.contains("; Secure")));
    h.stop().await;
}

async fn api_keys_expire_and_record_their_last_use(db: kiln_db::Db) {
    let h = harness(db).await;
    let (status, key) = h
        .call(
            "POST",
            "/api/v1/keys",
            &h.admin,
            Some(json!({"name": "short-lived", "scopes": ["read"], "expires_in_s": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    assert!(key["expires_at"].is_string(), "{key}");
    assert!(key["last_used_at"].is_null(), "{key}");
    let secret = key["secret"].as_str().unwrap().to_string();
    let id = key["id"].as_str().unwrap().to_string();
    let (status, _) = h.call("GET", "/api/v1/jobs", &secret, None).await;
    assert_eq!(status, StatusCode::OK);
    // The use is recorded off the request path, soon after.
    let mut listed = Value::Null;
    for _ in 0..100 {
        let (_, list) = h.call("GET", "/api/v1/keys", &h.admin, None).await;
        listed = list["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id.as_str())
            .cloned()
            .unwrap();
        if listed["last_used_at"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(listed["last_used_at"].is_string(), "{listed}");
    assert_eq!(listed["expires_at"], key["expires_at"]);
    // A key without an expiry never expires; the admin key's use shows too.
    let (_, list) = h.call("GET", "/api/v1/keys", &h.admin, None).await;
    assert!(list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["expires_at"].is_null()));

    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let (status, body) = h.call("GET", "/api/v1/jobs", &secret, None).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNAUTHORIZED, "expired")
    );

    // Refusals: both fields, a time past, nonsense.
    for body in [
        json!({"name": "k", "scopes": ["read"], "expires_in_s": 5, "expires_at": "2999-01-01T00:00:00Z"}),
        json!({"name": "k", "scopes": ["read"], "expires_at": "2001-01-01T00:00:00Z"}),
        json!({"name": "k", "scopes": ["read"], "expires_at": "tomorrow"}),
        json!({"name": "k", "scopes": ["read"], "expires_in_s": 0}),
    ] {
        let (status, answer) = h.call("POST", "/api/v1/keys", &h.admin, Some(body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    }
    let (status, key) = h
        .call(
            "POST",
            "/api/v1/keys",
            &h.admin,
            Some(json!({"name": "k", "scopes": ["read"], "expires_at": "2999-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(key["expires_at"], "2999-01-01T00:00:00.000Z");
    h.stop().await;
}
