//! Helpers for test suites that run against both databases: a fresh SQLite
//! file, or a fresh PostgreSQL schema, per test.

use crate::Db;

/// `KILN_TEST_DATABASE_URL`, or the local server `.ci/run` starts.
pub fn postgres_url() -> String {
    std::env::var("KILN_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A name no other test in this run or an earlier one uses.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    )
}

pub async fn sqlite_temp() -> Db {
    let path = std::env::temp_dir().join(format!("{}.db", unique_name("kiln_test")));
    Db::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("open a temporary SQLite database")
}

pub async fn postgres_schema() -> Db {
    Db::connect_postgres_schema(&postgres_url(), &unique_name("kiln_test"))
        .await
        .expect("PostgreSQL must be running (.ci/run starts it)")
}

/// Turns each `async fn name(db: Db)` into a test on SQLite and one on
/// PostgreSQL.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::testing::sqlite_temp().await).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::testing::postgres_schema().await).await
                }
            }
        )*
    };
}

/// Runs raw SQL against a test database: for tests that need the database
/// itself to misbehave (a trigger that slows or refuses a write, a row a
/// newer version wrote).
pub async fn execute(db: &Db, sql: &str) -> Result<(), crate::DbError> {
    match db {
        Db::Sqlite(store) => store.execute_raw(sql).await,
        Db::Postgres(store) => store.execute_raw(sql).await,
    }
}

/// The server process of the connection PostgreSQL's chained step ends
/// are written on, once one is open: for tests that end it.
pub async fn step_lane_pid(db: &Db) -> Option<i32> {
    match db {
        Db::Sqlite(_) => None,
        Db::Postgres(store) => crate::flow::pg::lane_pid(&store.step_lane).await,
    }
}

/// Removes a schema made by `connect_postgres_schema`, with everything in it.
pub use crate::drop_postgres_schema;

/// The first column of every row of a query, as text: for tests that look
/// at what is stored (that a value is nowhere in clear, say).
pub async fn text_rows(db: &Db, sql: &str) -> Result<Vec<String>, crate::DbError> {
    crate::with_pool!(db, read, |pool| Ok(sqlx::query_scalar(sql)
        .fetch_all(pool)
        .await?))
}

/// One integer a query computes (a test's own truth, straight from the
/// tables).
pub async fn scalar_i64(db: &Db, sql: &str) -> Result<i64, crate::DbError> {
    Ok(crate::with_pool!(db, read, |pool| {
        sqlx::query_scalar(sql).fetch_one(pool).await?
    }))
}

/// The integers of a query's one column, in its order.
pub async fn column_i64(db: &Db, sql: &str) -> Result<Vec<i64>, crate::DbError> {
    Ok(crate::with_pool!(db, read, |pool| {
        sqlx::query_scalar(sql).fetch_all(pool).await?
    }))
}

/// A digest of every row of each of `tables`, leaving out the columns
/// named in `skip_columns` (times a read touches): equal digests, equal
/// contents.
pub async fn fingerprint(
    db: &Db,
    tables: &[&str],
    skip_columns: &[&str],
) -> Result<std::collections::BTreeMap<String, String>, crate::DbError> {
    let mut out = std::collections::BTreeMap::new();
    for table in tables {
        let columns_sql = match db {
            Db::Sqlite(_) => format!("SELECT name FROM pragma_table_info('{table}') ORDER BY cid"),
            Db::Postgres(_) => format!(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = '{table}' \
                 ORDER BY ordinal_position"
            ),
        };
        let columns: Vec<String> = text_rows(db, &columns_sql)
            .await?
            .into_iter()
            .filter(|c| !skip_columns.contains(&c.as_str()))
            .collect();
        assert!(!columns.is_empty(), "no table {table}");
        let row = match db {
            Db::Sqlite(_) => columns
                .iter()
                .map(|c| format!("quote(\"{c}\")"))
                .collect::<Vec<_>>()
                .join(" || ',' || "),
            Db::Postgres(_) => columns
                .iter()
                .map(|c| format!("COALESCE(\"{c}\"::text, 'NULL')"))
                .collect::<Vec<_>>()
                .join(" || ',' || "),
        };
        let sql = match db {
            Db::Sqlite(_) => format!(
                "SELECT COALESCE(group_concat(r, '|'), '') FROM \
                 (SELECT {row} AS r FROM \"{table}\" ORDER BY 1)"
            ),
            Db::Postgres(_) => format!(
                "SELECT COALESCE(string_agg(r, '|' ORDER BY r), '') FROM \
                 (SELECT {row} AS r FROM \"{table}\") t"
            ),
        };
        let text = text_rows(db, &sql).await?.pop().unwrap_or_default();
        out.insert(table.to_string(), text);
    }
    Ok(out)
}
