//! Notification subscriptions (migration 0009). Matching and delivery live
//! in `kiln_events::notify`; this is their storage.

use kiln_core::Millis;
use serde_json::Value;

use crate::audit::note::Change;
use crate::{Db, DbResult};

/// One subscription as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Subscription {
    pub id: String,
    pub tenant: String,
    pub name: String,
    /// `{types, resource, labels}` as `kiln_events::EventFilter` reads it.
    pub filter: Value,
    /// `{kind, url, ...}` without the secret.
    pub destination: Value,
    pub secret: Option<String>,
    pub created_at: Millis,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    tenant: String,
    name: String,
    filter: String,
    destination: String,
    secret: Option<String>,
    created_at: i64,
}

impl From<Row> for Subscription {
    fn from(r: Row) -> Subscription {
        Subscription {
            id: r.id,
            tenant: r.tenant,
            name: r.name,
            filter: serde_json::from_str(&r.filter).unwrap_or(Value::Null),
            destination: serde_json::from_str(&r.destination).unwrap_or(Value::Null),
            secret: r.secret,
            created_at: r.created_at,
        }
    }
}

const COLUMNS: &str = "id, tenant, name, filter, destination, secret, created_at";

impl Db {
    pub async fn subscription_insert(&self, s: &Subscription) -> DbResult<()> {
        let sql = "INSERT INTO subscriptions (id, tenant, name, filter, destination, secret, created_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7)";
        let filter = s.filter.to_string();
        let destination = s.destination.to_string();
        let resource = format!("/api/v1/subscriptions/{}", s.id);
        crate::audit::audited_tx!(self, |tx| {
            sqlx::query(sql)
                .bind(&s.id)
                .bind(&s.tenant)
                .bind(&s.name)
                .bind(&filter)
                .bind(&destination)
                .bind(&s.secret)
                .bind(s.created_at)
                .execute(&mut *tx)
                .await?;
            crate::audit::stamp!(&mut *tx, Change::Created, Some(&resource));
        });
        Ok(())
    }

    pub async fn subscription_get(&self, tenant: &str, id: &str) -> DbResult<Option<Subscription>> {
        let sql = format!("SELECT {COLUMNS} FROM subscriptions WHERE tenant = $1 AND id = $2");
        let row: Option<Row> = crate::with_pool!(self, read, |pool| {
            sqlx::query_as(&sql)
                .bind(tenant)
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(Subscription::from))
    }

    /// A tenant's subscriptions, or every tenant's (`None`: the matcher).
    pub async fn subscription_list(&self, tenant: Option<&str>) -> DbResult<Vec<Subscription>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM subscriptions WHERE ($1 IS NULL OR tenant = $1) \
             ORDER BY created_at, id"
        );
        let rows: Vec<Row> = crate::with_pool!(self, read, |pool| {
            sqlx::query_as(&sql).bind(tenant).fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(Subscription::from).collect())
    }

    pub async fn subscription_delete(&self, tenant: &str, id: &str) -> DbResult<bool> {
        let sql = "DELETE FROM subscriptions WHERE tenant = $1 AND id = $2";
        let deleted = crate::audit::audited_tx!(self, |tx| {
            let n = sqlx::query(sql)
                .bind(tenant)
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n > 0 {
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            n
        });
        Ok(deleted > 0)
    }
}
