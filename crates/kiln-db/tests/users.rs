//! Users, sessions, login failure counters and API keys' expiry and last
//! use in the store, on SQLite and PostgreSQL.

use kiln_core::users::Role;
use kiln_core::{Scope, Scopes};
use kiln_db::users::{Session, User};
use kiln_db::Db;

const T0: i64 = 1_700_000_000_000;

kiln_db::on_both_databases!(
    users_and_their_sessions,
    failures_are_counted_at_once_and_forgotten_after_the_window,
    keys_keep_their_expiry_and_last_use,
);

fn user(name: &str, role: Role) -> User {
    User {
        tenant: "acme".into(),
        username: name.into(),
        role,
        created_at: T0,
        updated_at: T0,
    }
}

fn session(id: &str, name: &str) -> Session {
    Session {
        id: id.into(),
        tenant: "acme".into(),
        username: name.into(),
        created_at: T0,
        expires_at: T0 + 900_000,
        source: "127.0.0.1".into(),
    }
}

async fn users_and_their_sessions(db: Db) {
    assert!(db
        .user_insert(&user("ada", Role::Admin), "$argon2id$a")
        .await
        .unwrap());
    assert!(!db
        .user_insert(&user("ada", Role::Viewer), "$argon2id$b")
        .await
        .unwrap());
    assert!(db
        .user_insert(&user("bob", Role::Viewer), "$argon2id$c")
        .await
        .unwrap());
    let (found, hash) = db.user_credentials("acme", "ada").await.unwrap().unwrap();
    assert_eq!((found.role, hash.as_str()), (Role::Admin, "$argon2id$a"));
    assert!(db.user_get("globex", "ada").await.unwrap().is_none());
    assert!(db.user_list("globex").await.unwrap().is_empty());
    let names: Vec<String> = db
        .user_list("acme")
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.username)
        .collect();
    assert_eq!(names, ["ada", "bob"]);

    // Sessions live until they expire or are revoked.
    db.session_insert(&session("s1", "ada")).await.unwrap();
    db.session_insert(&session("s2", "ada")).await.unwrap();
    db.session_insert(&session("s3", "bob")).await.unwrap();
    assert!(db.session_live("s1", T0 + 1).await.unwrap());
    assert!(!db.session_live("s1", T0 + 900_000).await.unwrap());
    assert!(!db.session_live("nope", T0).await.unwrap());
    // Only in its own tenant.
    assert!(!db.session_revoke("globex", "s1", T0 + 2).await.unwrap());
    assert!(db.session_revoke("acme", "s1", T0 + 2).await.unwrap());
    assert!(!db.session_live("s1", T0 + 3).await.unwrap());
    assert!(db.session_live("s2", T0 + 3).await.unwrap());

    // A role change, a new password or deletion ends every session of
    // that user, and only theirs.
    assert!(db
        .user_set_role("acme", "ada", Role::Operator, T0 + 4)
        .await
        .unwrap());
    assert!(!db.session_live("s2", T0 + 5).await.unwrap());
    assert!(db.session_live("s3", T0 + 5).await.unwrap());
    assert_eq!(
        db.user_get("acme", "ada").await.unwrap().unwrap().role,
        Role::Operator
    );
    db.session_insert(&session("s4", "ada")).await.unwrap();
    assert!(db
        .user_set_password("acme", "ada", "$argon2id$d", T0 + 6)
        .await
        .unwrap());
    assert!(!db.session_live("s4", T0 + 7).await.unwrap());
    assert_eq!(
        db.user_credentials("acme", "ada").await.unwrap().unwrap().1,
        "$argon2id$d"
    );
    assert!(!db
        .user_set_role("globex", "ada", Role::Admin, T0)
        .await
        .unwrap());
    assert!(!db.user_delete("globex", "bob", T0 + 8).await.unwrap());
    assert!(db.user_delete("acme", "bob", T0 + 8).await.unwrap());
    assert!(!db.session_live("s3", T0 + 9).await.unwrap());
    assert!(db.user_get("acme", "bob").await.unwrap().is_none());
    // Long-ended sessions are pruned.
    db.session_prune(T0 + 1_000_000).await.unwrap();
    assert!(!db.session_live("s4", T0).await.unwrap());
}

async fn failures_are_counted_at_once_and_forgotten_after_the_window(db: Db) {
    let key = "account:acme/ada";
    let adds = (0..20).map(|_| db.login_failure_add(key, T0, 60_000));
    let counts: Vec<i64> = futures::future::join_all(adds)
        .await
        .into_iter()
        .map(|c| c.unwrap().failures)
        .collect();
    let mut sorted = counts.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (1..=20).collect::<Vec<_>>(),
        "each add counted once"
    );
    // Past the window, the count starts again.
    let later = db
        .login_failure_add(key, T0 + 60_000, 60_000)
        .await
        .unwrap();
    assert_eq!((later.failures, later.window_start), (1, T0 + 60_000));
    db.login_lock(key, T0 + 60_001, T0 + 120_000).await.unwrap();
    let found = db
        .login_failures(&[key.to_string(), "source:x".into()])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].1.locked_until, Some(T0 + 120_000));
    assert_eq!(found[0].1.failures, 0);
    db.login_failure_add(key, T0 + 60_002, 60_000)
        .await
        .unwrap();
    db.login_failure_forgive(key).await.unwrap();
    let found = db.login_failures(&[key.to_string()]).await.unwrap();
    assert_eq!(found[0].1.failures, 0);
    db.login_failures_clear(key).await.unwrap();
    assert!(db
        .login_failures(&[key.to_string()])
        .await
        .unwrap()
        .is_empty());
}

async fn keys_keep_their_expiry_and_last_use(db: Db) {
    let (id, secret) = kiln_db::generate_key();
    let key = kiln_db::ApiKey {
        id: id.clone(),
        tenant: "acme".into(),
        name: "ci".into(),
        scopes: Scopes(vec![Scope::Read]),
        created_at: T0,
        revoked_at: None,
        expires_at: Some(T0 + 1_000),
        last_used_at: None,
    };
    db.key_insert(&key, &kiln_db::hash_key(&secret))
        .await
        .unwrap();
    let found = db
        .key_find_by_hash(&kiln_db::hash_key(&secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.expires_at, Some(T0 + 1_000));
    assert!(!found.expired(T0 + 999));
    assert!(found.expired(T0 + 1_000));
    db.key_touch(std::slice::from_ref(&id), T0 + 500)
        .await
        .unwrap();
    let listed = db.key_list(Some("acme")).await.unwrap();
    assert_eq!(listed[0].last_used_at, Some(T0 + 500));
}
