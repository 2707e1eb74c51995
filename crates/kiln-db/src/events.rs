//! The event log: rows the triggers of migration 0006 append in the
//! transaction of each state change, read in `position` order.
//!
//! On SQLite the one writer gives positions in commit order as it inserts.
//! On PostgreSQL transactions commit out of insert order, so rows arrive
//! without a position and the sequencer (`sequence_loop`, one at a time per
//! database under an advisory lock) numbers those whose transaction has
//! ended; see the migration for why no position is ever filled in late.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::Millis;
use serde::Serialize;
use sqlx::postgres::PgPool;
use tokio::sync::Notify;

use crate::flow::dispatch_flow as dispatch;
use crate::{Db, DbResult};

/// Most events one read returns.
pub const PAGE_MAX: i64 = 1000;

/// One event as readers see it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// The event's position: increasing, never reused, never filled in late.
    pub id: i64,
    pub time: Millis,
    pub tenant: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub resource: Resource,
    pub labels: BTreeMap<String, String>,
    pub data: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Resource {
    pub kind: String,
    pub id: String,
}

/// What a read selects; the rest of a filter (labels) is applied by callers.
#[derive(Clone, Debug, Default)]
pub struct EventQuery<'a> {
    /// `None`: every tenant (the deployment's own readers).
    pub tenant: Option<&'a str>,
    /// Exact types, or prefixes ending in `.` for patterns such as `job.*`.
    pub types: &'a [String],
    pub resource: Option<(&'a str, &'a str)>,
    pub after: i64,
    pub limit: i64,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    position: i64,
    time: i64,
    tenant: String,
    #[sqlx(rename = "type")]
    kind: String,
    resource_kind: String,
    resource_id: String,
    labels: String,
    data: String,
}

impl From<EventRow> for Event {
    fn from(r: EventRow) -> Event {
        Event {
            id: r.position,
            time: r.time,
            tenant: r.tenant,
            kind: r.kind,
            resource: Resource {
                kind: r.resource_kind,
                id: r.resource_id,
            },
            labels: serde_json::from_str(&r.labels).unwrap_or_default(),
            data: serde_json::from_str(&r.data).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// The `WHERE` of a read, with `?` or `$n` placeholders from `next`.
fn conditions(query: &EventQuery<'_>, mut next: impl FnMut() -> String) -> String {
    let mut sql = format!("position > {}", next());
    if query.tenant.is_some() {
        sql.push_str(&format!(" AND tenant = {}", next()));
    }
    if query.resource.is_some() {
        sql.push_str(&format!(
            " AND resource_kind = {} AND resource_id = {}",
            next(),
            next()
        ));
    }
    if !query.types.is_empty() {
        let alternatives: Vec<String> = query
            .types
            .iter()
            .map(|t| {
                if t.ends_with('.') {
                    format!("type LIKE {}", next())
                } else {
                    format!("type = {}", next())
                }
            })
            .collect();
        sql.push_str(&format!(" AND ({})", alternatives.join(" OR ")));
    }
    sql
}

/// `job.` → `job.%`, with LIKE's own characters escaped (types are names of
/// `[a-z0-9._-]`, so only `_` can occur).
fn like_prefix(prefix: &str) -> String {
    format!("{}%", prefix.replace('_', "\\_"))
}

macro_rules! bind_query {
    ($q:expr, $query:expr) => {{
        let mut q = $q.bind($query.after);
        if let Some(tenant) = $query.tenant {
            q = q.bind(tenant.to_string());
        }
        if let Some((kind, id)) = $query.resource {
            q = q.bind(kind.to_string()).bind(id.to_string());
        }
        for t in $query.types {
            q = q.bind(if t.ends_with('.') {
                like_prefix(t)
            } else {
                t.clone()
            });
        }
        q.bind($query.limit.clamp(1, PAGE_MAX))
    }};
}

impl crate::SqliteStore {
    async fn event_read(&self, query: &EventQuery<'_>) -> DbResult<Vec<Event>> {
        let sql = format!(
            "SELECT position, time, tenant, type, resource_kind, resource_id, labels, data \
             FROM events WHERE {} ORDER BY position LIMIT ?",
            conditions(query, || "?".to_string())
        )
        .replace("LIKE ?", "LIKE ? ESCAPE '\\'");
        let rows: Vec<EventRow> = bind_query!(sqlx::query_as(&sql), query)
            .fetch_all(&self.read)
            .await?;
        Ok(rows.into_iter().map(Event::from).collect())
    }

    async fn event_last(&self) -> DbResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
                .fetch_one(&self.read)
                .await?,
        )
    }

    async fn event_delete_before(&self, before: Millis, batch: i64) -> DbResult<u64> {
        Ok(sqlx::query(
            "DELETE FROM events WHERE position IN \
             (SELECT e.position FROM events e WHERE e.time < ?1 \
              AND NOT EXISTS (SELECT 1 FROM event_cursors c WHERE c.position < e.position) \
              ORDER BY e.position LIMIT ?2)",
        )
        .bind(before)
        .bind(batch)
        .execute(&self.write)
        .await?
        .rows_affected())
    }
}

impl crate::PgStore {
    async fn event_read(&self, query: &EventQuery<'_>) -> DbResult<Vec<Event>> {
        let mut n = 0;
        let sql = format!(
            "SELECT position, time, tenant, type, resource_kind, resource_id, labels, data \
             FROM events WHERE {} ORDER BY position LIMIT {}",
            conditions(query, || {
                n += 1;
                format!("${n}")
            }),
            format_args!("${}", n + 1)
        );
        let rows: Vec<EventRow> = bind_query!(sqlx::query_as(&sql), query)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Event::from).collect())
    }

    async fn event_last(&self) -> DbResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(position), 0)::BIGINT FROM events")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn event_delete_before(&self, before: Millis, batch: i64) -> DbResult<u64> {
        Ok(sqlx::query(
            "DELETE FROM events WHERE seq IN (SELECT e.seq FROM events e \
             WHERE e.time < $1 AND e.position IS NOT NULL \
             AND e.position < (SELECT MAX(position) FROM events) \
             AND NOT EXISTS (SELECT 1 FROM event_cursors c WHERE c.position < e.position) \
             ORDER BY e.position LIMIT $2)",
        )
        .bind(before)
        .bind(batch)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}

/// Most events one pass numbers.
const SEQUENCE_BATCH: u64 = 10_000;
/// The least time between two passes that find no backlog.
const SEQUENCE_GAP: Duration = Duration::from_millis(5);

/// Numbers settled events, a batch at a time, in one statement; returns
/// how many. Runs only on the connection that holds the sequencer's lock,
/// so passes never overlap and each sees the numbers the last one gave.
async fn sequence(conn: &mut sqlx::PgConnection) -> DbResult<u64> {
    // The statement's snapshot finds the rows and says which transactions
    // have ended: a row whose xid is below its xmin can no longer change.
    let numbered: i64 = sqlx::query_scalar(
        "WITH settled AS ( \
             SELECT seq, row_number() OVER (ORDER BY seq) AS n FROM ( \
                 SELECT seq FROM events WHERE position IS NULL \
                 AND xid < pg_snapshot_xmin(pg_current_snapshot()) \
                 ORDER BY seq LIMIT 10000) s), \
         base AS (SELECT COALESCE(MAX(position), 0) AS p FROM events), \
         done AS (UPDATE events e SET position = base.p + settled.n \
             FROM settled, base WHERE e.seq = settled.seq RETURNING 1) \
         SELECT c.n FROM (SELECT COUNT(*) AS n FROM done) c \
         LEFT JOIN LATERAL (SELECT pg_notify('kiln_events_ready', '') WHERE c.n > 0) t ON true",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(numbered as u64)
}

/// Keeps numbering events. One process per database (per schema) is the
/// sequencer: the one whose connection holds the session lock; the others wait to take
/// over when its connection ends. Woken by this process's writes and by
/// the triggers' NOTIFY, and every 100 ms (a transaction still open holds
/// the numbering back; polling picks up where it stood).
pub(crate) async fn sequence_loop(pool: PgPool, kick: Arc<Notify>, ready: Arc<Notify>) {
    let mut leader: Option<sqlx::pool::PoolConnection<sqlx::Postgres>> = None;
    loop {
        if pool.is_closed() {
            return;
        }
        let notified = kick.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if leader.is_none() {
            // Not the sequencer: ask for the lock once a second, however
            // many writes kick.
            leader = match pool.acquire().await {
                Ok(mut conn) => {
                    match sqlx::query_scalar::<_, bool>(
                        "SELECT pg_try_advisory_lock(4243, hashtext(current_schema()))",
                    )
                    .fetch_one(&mut *conn)
                    .await
                    {
                        Ok(true) => Some(conn),
                        // Another process sequences; look again later.
                        _ => None,
                    }
                }
                Err(_) => None,
            };
        }
        let wait = Duration::from_millis(100);
        if let Some(conn) = leader.as_mut() {
            match sequence(conn).await {
                Ok(n) if n >= SEQUENCE_BATCH => {
                    ready.notify_waiters();
                    continue;
                }
                Ok(n) => {
                    if n > 0 {
                        ready.notify_waiters();
                    }
                    // Every write kicks (a step of a pipeline makes several
                    // events): a short pause gathers what comes meanwhile
                    // into the next pass instead of a pass per kick.
                    tokio::time::sleep(SEQUENCE_GAP).await;
                }
                Err(error) => {
                    // The lock goes with the connection.
                    if let Some(conn) = leader.take() {
                        drop(conn.detach());
                    }
                    if pool.is_closed() {
                        return;
                    }
                    tracing::debug!(%error, "numbering events failed; retrying");
                }
            }
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

impl Db {
    /// Events after `query.after` in position order, at most `query.limit`
    /// (capped at [`PAGE_MAX`]).
    pub async fn event_read(&self, query: &EventQuery<'_>) -> DbResult<Vec<Event>> {
        dispatch!(self, s => s.event_read(query).await)
    }

    /// The newest position readers can see (0 when there is none).
    pub async fn event_last(&self) -> DbResult<i64> {
        dispatch!(self, s => s.event_last().await)
    }

    /// Retention: deletes up to `batch` of the oldest events older than
    /// `before`, never one a cursor (the NATS bridge) has not passed, and on
    /// PostgreSQL never the newest: the sequencer numbers on from it, so an
    /// emptied log would hand out its ids again.
    pub async fn event_delete_before(&self, before: Millis, batch: i64) -> DbResult<u64> {
        dispatch!(self, s => s.event_delete_before(before, batch).await)
    }

    /// Stops this database writing job events (`events`) or keeping the
    /// dashboard's rollups (`rollups`), for good: only for the benchmarks
    /// that measure what they cost the queue, on a database made for them.
    pub async fn job_triggers_without(&self, events: bool, rollups: bool) -> DbResult<()> {
        if !events && !rollups {
            return Ok(());
        }
        let mut sql = String::new();
        match self {
            Db::Sqlite(_) => {
                if events {
                    sql.push_str(
                        "DROP TRIGGER jobs_events_insert; DROP TRIGGER jobs_events_update;",
                    );
                }
                if rollups {
                    sql.push_str(
                        "DROP TRIGGER jobs_rollups_insert; DROP TRIGGER jobs_rollups_start; \
                         DROP TRIGGER jobs_rollups_end; DROP TRIGGER jobs_rollups_wait; \
                         DROP TRIGGER jobs_rollups_delete;",
                    );
                }
            }
            Db::Postgres(_) => {
                // One trigger per event writes everything; its arguments
                // name the parts it leaves out.
                let mut parts = Vec::new();
                if events {
                    parts.push("'no_events'");
                }
                if rollups {
                    parts.push("'no_rollups'");
                }
                let args = parts.join(", ");
                for (trigger, event, tables) in [
                    ("inserted", "INSERT", "NEW TABLE AS new_rows"),
                    (
                        "updated",
                        "UPDATE",
                        "OLD TABLE AS old_rows NEW TABLE AS new_rows",
                    ),
                    ("deleted", "DELETE", "OLD TABLE AS old_rows"),
                ] {
                    sql.push_str(&format!(
                        "DROP TRIGGER jobs_{trigger} ON jobs; \
                         CREATE TRIGGER jobs_{trigger} AFTER {event} ON jobs REFERENCING {tables} \
                         FOR EACH STATEMENT EXECUTE FUNCTION kiln_jobs_{trigger}({args});"
                    ));
                }
            }
        }
        crate::with_pool!(self, write, |pool| {
            sqlx::raw_sql(&sql).execute(pool).await?;
        });
        Ok(())
    }

    /// Where the reader `name` stands in the log (0 before its first).
    pub async fn event_cursor(&self, name: &str) -> DbResult<i64> {
        let found: Option<i64> = match self {
            Db::Sqlite(s) => {
                sqlx::query_scalar("SELECT position FROM event_cursors WHERE name = ?")
                    .bind(name)
                    .fetch_optional(&s.read)
                    .await?
            }
            Db::Postgres(s) => {
                sqlx::query_scalar("SELECT position FROM event_cursors WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&s.pool)
                    .await?
            }
        };
        Ok(found.unwrap_or(0))
    }

    /// Moves the reader `name` forward to `position` (never back).
    pub async fn event_cursor_put(&self, name: &str, position: i64, now: Millis) -> DbResult<()> {
        match self {
            Db::Sqlite(s) => {
                sqlx::query(
                    "INSERT INTO event_cursors (name, position, updated_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (name) DO UPDATE SET position = max(position, excluded.position), \
                     updated_at = excluded.updated_at",
                )
                .bind(name)
                .bind(position)
                .bind(now)
                .execute(&s.write)
                .await?;
            }
            Db::Postgres(s) => {
                sqlx::query(
                    "INSERT INTO event_cursors AS c (name, position, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET \
                     position = GREATEST(c.position, excluded.position), updated_at = excluded.updated_at",
                )
                .bind(name)
                .bind(position)
                .bind(now)
                .execute(&s.pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Appends an event for a change the database does not hold (a VM's
    /// life lives in its host's memory), in a transaction of its own.
    pub async fn event_append(
        &self,
        tenant: &str,
        kind: &str,
        resource: (&str, &str),
        labels: &BTreeMap<String, String>,
        data: &serde_json::Value,
        now: Millis,
    ) -> DbResult<()> {
        let sql =
            "INSERT INTO events (time, tenant, type, resource_kind, resource_id, labels, data) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7)";
        let labels = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        let data = data.to_string();
        crate::with_pool!(self, write, |pool| {
            sqlx::query(sql)
                .bind(now)
                .bind(tenant)
                .bind(kind)
                .bind(resource.0)
                .bind(resource.1)
                .bind(&labels)
                .bind(&data)
                .execute(pool)
                .await
                .map(drop)?
        });
        self.events_written();
        Ok(())
    }

    /// Fires when new events may be readable: written by this process (on
    /// SQLite), or numbered by any sequencer (on PostgreSQL).
    pub fn events_ready(&self) -> Arc<Notify> {
        dispatch!(self, s => s.events_ready.clone())
    }

    /// Tells the readers (SQLite) or the sequencer (PostgreSQL) that a write
    /// may have appended events.
    pub(crate) fn events_written(&self) {
        match self {
            Db::Sqlite(s) => s.events_ready.notify_waiters(),
            Db::Postgres(s) => s.events_kick.notify_one(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_number_their_placeholders_in_bind_order() {
        let types = vec!["job.".to_string(), "run.succeeded".to_string()];
        let query = EventQuery {
            tenant: Some("acme"),
            types: &types,
            resource: Some(("job", "7")),
            after: 0,
            limit: 10,
        };
        let mut n = 0;
        let sql = conditions(&query, || {
            n += 1;
            format!("${n}")
        });
        assert_eq!(
            sql,
            "position > $1 AND tenant = $2 AND resource_kind = $3 AND resource_id = $4 \
             AND (type LIKE $5 OR type = $6)"
        );
        assert_eq!(like_prefix("vm_x."), "vm\\_x.%");
    }
}
