//! Admission policies in the store, on SQLite and PostgreSQL: put, replace,
//! list, delete, the cap under concurrent puts, and the per-process cache
//! (changes through a handle seen at once; through another handle, with its
//! own cache, within a second).

use std::time::{Duration, Instant};

use kiln_db::policies::PolicyPut;
use kiln_db::Db;

const T0: i64 = 1_700_000_000_000;

kiln_db::on_both_databases!(
    put_replace_list_delete,
    the_cap_holds_under_concurrent_puts,
    another_handle_sees_a_change_within_a_second,
);

/// A second handle on the same database, with caches of its own: another
/// process, as far as the cache can tell.
async fn second_handle(db: &Db) -> Db {
    match db.backend() {
        "sqlite" => {
            let path = kiln_db::testing::text_rows(
                db,
                "SELECT file FROM pragma_database_list WHERE name = 'main'",
            )
            .await
            .unwrap()
            .remove(0);
            Db::connect(&format!("sqlite://{path}")).await.unwrap()
        }
        _ => {
            let schema = kiln_db::testing::text_rows(db, "SELECT current_schema()::text")
                .await
                .unwrap()
                .remove(0);
            Db::connect_postgres_schema(&kiln_db::testing::postgres_url(), &schema)
                .await
                .unwrap()
        }
    }
}

async fn put(db: &Db, tenant: &str, name: &str, rule: &str) -> PolicyPut {
    db.policy_put(tenant, name, rule, "m", &[], true, T0)
        .await
        .unwrap()
}

async fn put_replace_list_delete(db: Db) {
    assert!(db.policy_set("t").await.unwrap().is_empty());
    let PolicyPut::Created(p) = db
        .policy_put(
            "t",
            "b",
            "job.kind == 'vm'",
            "only vms",
            &["vm".into()],
            false,
            T0,
        )
        .await
        .unwrap()
    else {
        panic!("not created")
    };
    assert_eq!(
        (p.name.as_str(), p.rule.as_str(), p.message.as_str()),
        ("b", "job.kind == 'vm'", "only vms")
    );
    assert_eq!(p.applies_to, vec!["vm".to_string()]);
    assert!(!p.enabled);
    assert_eq!((p.created_at, p.updated_at), (T0, T0));
    // The cache of this handle is dropped by its own change.
    let set = db.policy_set("t").await.unwrap();
    assert_eq!(set.policies().len(), 1);
    assert_eq!(set.policies()[0].rule.source(), "job.kind == 'vm'");
    let PolicyPut::Replaced(p) = db
        .policy_put("t", "b", "true", "", &[], true, T0 + 5)
        .await
        .unwrap()
    else {
        panic!("not replaced")
    };
    assert_eq!((p.created_at, p.updated_at), (T0, T0 + 5));
    assert!(p.enabled && p.applies_to.is_empty());
    assert!(matches!(
        put(&db, "t", "a", "false").await,
        PolicyPut::Created(_)
    ));
    assert!(matches!(
        put(&db, "u", "a", "true").await,
        PolicyPut::Created(_)
    ));
    let names: Vec<String> = db
        .policy_list("t")
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
    let set = db.policy_set("t").await.unwrap();
    assert_eq!(set.policies().len(), 2);
    assert_eq!(set.policies()[1].rule.source(), "true");
    // Tenants apart: another tenant's name is not found.
    assert!(db.policy_get("u", "b").await.unwrap().is_none());
    assert!(!db.policy_delete("u", "b").await.unwrap());
    assert!(db.policy_delete("t", "b").await.unwrap());
    assert!(!db.policy_delete("t", "b").await.unwrap());
    assert_eq!(db.policy_set("t").await.unwrap().policies().len(), 1);
    assert_eq!(db.policy_set("u").await.unwrap().policies().len(), 1);
    // Text PostgreSQL cannot hold is refused on both.
    assert!(db
        .policy_put("t", "c", "true", "a\0b", &[], true, T0)
        .await
        .is_err());
}

async fn the_cap_holds_under_concurrent_puts(db: Db) {
    let max = kiln_flow::policy::POLICIES_MAX;
    for i in 0..max - 5 {
        put(&db, "t", &format!("p{i}"), "true").await;
    }
    let mut tasks = Vec::new();
    for i in 0..20 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            put(&db, "t", &format!("late{i}"), "true").await
        }));
    }
    let mut created = 0;
    let mut full = 0;
    for task in tasks {
        match task.await.unwrap() {
            PolicyPut::Created(_) => created += 1,
            PolicyPut::Full => full += 1,
            PolicyPut::Replaced(_) => panic!("no name was reused"),
        }
    }
    assert_eq!((created, full), (5, 15));
    assert_eq!(db.policy_list("t").await.unwrap().len(), max);
    // Replacing stays possible at the cap.
    assert!(matches!(
        put(&db, "t", "p0", "false").await,
        PolicyPut::Replaced(_)
    ));
}

async fn another_handle_sees_a_change_within_a_second(db: Db) {
    let other = second_handle(&db).await;
    assert!(other.policy_set("t").await.unwrap().is_empty());
    let warmed = Instant::now();
    put(&db, "t", "a", "false").await;
    let changed = Instant::now();
    assert_eq!(db.policy_set("t").await.unwrap().policies().len(), 1);
    let stale = other.policy_set("t").await.unwrap();
    if warmed.elapsed() < Duration::from_millis(500) {
        assert!(stale.is_empty(), "served from the cache, without a query");
    }
    // The other's cached set stands for up to a second, then its version
    // check finds the change.
    let seen = loop {
        if !other.policy_set("t").await.unwrap().is_empty() {
            break changed.elapsed();
        }
        assert!(changed.elapsed() < Duration::from_millis(1500));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        seen <= kiln_db::policies::CACHE_TTL + Duration::from_millis(200),
        "{seen:?}"
    );
    // A delete the same way, and a put of the same rule under a new name
    // (same count, new version) too.
    assert!(db.policy_delete("t", "a").await.unwrap());
    put(&db, "t", "b", "false").await;
    let changed = Instant::now();
    loop {
        let set = other.policy_set("t").await.unwrap();
        if set.policies().first().map(|p| p.name.as_str()) == Some("b") {
            break;
        }
        assert!(changed.elapsed() < Duration::from_millis(1500));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    other.close().await;
}
