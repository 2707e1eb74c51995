//! Incidents (migration 0012): opened and repeated by the detectors in
//! `kiln_ops::incidents`, acknowledged and resolved through the API or,
//! when their condition clears, by the detectors.

use kiln_core::Millis;
use serde::Serialize;

use crate::audit::note::Change;
use crate::{Db, DbResult};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Incident {
    pub id: i64,
    pub tenant: String,
    pub fingerprint: String,
    pub kind: String,
    pub severity: String,
    pub title: String,
    pub status: String,
    pub occurrences: i32,
    pub opened_at: Millis,
    pub updated_at: Millis,
    pub resolved_at: Option<Millis>,
    pub resolved_by: Option<String>,
    pub notes: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct TimelineEntry {
    pub time: Millis,
    pub event_id: Option<i64>,
    pub entry: String,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    tenant: String,
    fingerprint: String,
    kind: String,
    severity: String,
    title: String,
    status: String,
    occurrences: i32,
    opened_at: i64,
    updated_at: i64,
    resolved_at: Option<i64>,
    resolved_by: Option<String>,
    notes: Option<String>,
}

impl From<Row> for Incident {
    fn from(r: Row) -> Incident {
        Incident {
            id: r.id,
            tenant: r.tenant,
            fingerprint: r.fingerprint,
            kind: r.kind,
            severity: r.severity,
            title: r.title,
            status: r.status,
            occurrences: r.occurrences,
            opened_at: r.opened_at,
            updated_at: r.updated_at,
            resolved_at: r.resolved_at,
            resolved_by: r.resolved_by,
            notes: r.notes,
        }
    }
}

/// What a detector saw.
#[derive(Clone, Debug)]
pub struct Sighting<'a> {
    pub tenant: &'a str,
    pub fingerprint: &'a str,
    pub kind: &'a str,
    pub severity: &'a str,
    pub title: &'a str,
    pub event_id: Option<i64>,
    pub entry: &'a str,
}

const COLUMNS: &str = "id, tenant, fingerprint, kind, severity, title, status, occurrences, \
                       opened_at, updated_at, resolved_at, resolved_by, notes";

impl Db {
    /// Opens an incident for the sighting, or adds it to the open one of
    /// the same fingerprint; the incident's id and whether it is new.
    pub async fn incident_sighted(&self, s: &Sighting<'_>, now: Millis) -> DbResult<(i64, bool)> {
        let out = crate::audit::audited_tx!(self, |tx| {
            let repeated: Option<i64> = sqlx::query_scalar(
                "UPDATE incidents SET occurrences = occurrences + 1, updated_at = $3 \
                 WHERE tenant = $1 AND fingerprint = $2 AND status <> 'resolved' RETURNING id",
            )
            .bind(s.tenant)
            .bind(s.fingerprint)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let (id, new) = match repeated {
                Some(id) => (id, false),
                None => {
                    let id: i64 = sqlx::query_scalar(
                        "INSERT INTO incidents (tenant, fingerprint, kind, severity, title, status, \
                         opened_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'open', $6, $6) RETURNING id",
                    )
                    .bind(s.tenant)
                    .bind(s.fingerprint)
                    .bind(s.kind)
                    .bind(s.severity)
                    .bind(s.title)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?;
                    (id, true)
                }
            };
            sqlx::query(
                "INSERT INTO incident_timeline (incident_id, time, event_id, entry) VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(now)
            .bind(s.event_id)
            .bind(s.entry)
            .execute(&mut *tx)
            .await?;
            (id, new)
        });
        self.events_written();
        Ok(out)
    }

    /// Resolves the open incident of a fingerprint because its condition
    /// cleared; its id, if there was one.
    pub async fn incident_clear(
        &self,
        tenant: &str,
        fingerprint: &str,
        event_id: Option<i64>,
        entry: &str,
        now: Millis,
    ) -> DbResult<Option<i64>> {
        let out = crate::audit::audited_tx!(self, |tx| {
            let id: Option<i64> = sqlx::query_scalar(
                "UPDATE incidents SET status = 'resolved', resolved_by = 'automatic', \
                 resolved_at = $3, updated_at = $3 \
                 WHERE tenant = $1 AND fingerprint = $2 AND status <> 'resolved' RETURNING id",
            )
            .bind(tenant)
            .bind(fingerprint)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(id) = id {
                sqlx::query(
                    "INSERT INTO incident_timeline (incident_id, time, event_id, entry) VALUES ($1, $2, $3, $4)",
                )
                .bind(id)
                .bind(now)
                .bind(event_id)
                .bind(entry)
                .execute(&mut *tx)
                .await?;
            }
            id
        });
        self.events_written();
        Ok(out)
    }

    /// Open incidents of `kind` not sighted since `before` (every tenant).
    pub async fn incidents_quiet(&self, kind: &str, before: Millis) -> DbResult<Vec<Incident>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM incidents WHERE kind = $1 AND status <> 'resolved' \
             AND updated_at < $2 ORDER BY id LIMIT 500"
        );
        let rows: Vec<Row> = crate::with_pool!(self, read, |pool| {
            sqlx::query_as(&sql)
                .bind(kind)
                .bind(before)
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(Incident::from).collect())
    }

    /// A tenant's incidents, newest first, below `before` (an id).
    pub async fn incident_list(
        &self,
        tenant: &str,
        status: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> DbResult<Vec<Incident>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM incidents WHERE tenant = $1 AND ($2 IS NULL OR status = $2) \
             AND ($3 IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
        );
        let rows: Vec<Row> = crate::with_pool!(self, read, |pool| {
            sqlx::query_as(&sql)
                .bind(tenant)
                .bind(status)
                .bind(before)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(Incident::from).collect())
    }

    /// One of a tenant's incidents with its timeline (the newest 200 entries).
    pub async fn incident_get(
        &self,
        tenant: &str,
        id: i64,
    ) -> DbResult<Option<(Incident, Vec<TimelineEntry>)>> {
        let sql = format!("SELECT {COLUMNS} FROM incidents WHERE tenant = $1 AND id = $2");
        let timeline =
            "SELECT time, event_id, entry FROM incident_timeline WHERE incident_id = $1 \
                        ORDER BY seq DESC LIMIT 200";
        Ok(crate::with_pool!(self, read, |pool| {
            {
                let row: Option<Row> = sqlx::query_as(&sql)
                    .bind(tenant)
                    .bind(id)
                    .fetch_optional(pool)
                    .await?;
                match row {
                    None => None,
                    Some(row) => {
                        let mut entries: Vec<TimelineEntry> =
                            sqlx::query_as(timeline).bind(id).fetch_all(pool).await?;
                        entries.reverse();
                        Some((Incident::from(row), entries))
                    }
                }
            }
        }))
    }

    /// Moves a tenant's incident by hand: `acknowledged` (from open) or
    /// `resolved` (from open or acknowledged) with notes. `None`: no such
    /// incident; `Some(false)`: it was not in a state to move.
    pub async fn incident_set(
        &self,
        tenant: &str,
        id: i64,
        status: &str,
        notes: Option<&str>,
        now: Millis,
    ) -> DbResult<Option<bool>> {
        let from: &[&str] = if status == "acknowledged" {
            &["open"]
        } else {
            &["open", "acknowledged"]
        };
        let out = crate::audit::audited_tx!(self, |tx| {
            let current: Option<String> =
                sqlx::query_scalar("SELECT status FROM incidents WHERE tenant = $1 AND id = $2")
                    .bind(tenant)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            match current {
                None => None,
                Some(current) if !from.contains(&current.as_str()) => Some(false),
                Some(_) => {
                    let resolved = status == "resolved";
                    sqlx::query(
                        "UPDATE incidents SET status = $3, updated_at = $4, \
                         resolved_at = CASE WHEN $5 THEN $4 ELSE resolved_at END, \
                         resolved_by = CASE WHEN $5 THEN 'manual' ELSE resolved_by END, \
                         notes = COALESCE($6, notes) WHERE tenant = $1 AND id = $2",
                    )
                    .bind(tenant)
                    .bind(id)
                    .bind(status)
                    .bind(now)
                    .bind(resolved)
                    .bind(notes)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO incident_timeline (incident_id, time, event_id, entry) VALUES ($1, $2, NULL, $3)",
                    )
                    .bind(id)
                    .bind(now)
                    .bind(format!("{status} by hand"))
                    .execute(&mut *tx)
                    .await?;
                    crate::audit::stamp!(&mut *tx, Change::Changed);
                    Some(true)
                }
            }
        });
        self.events_written();
        Ok(out)
    }

    /// A tenant's overrides of the detector defaults (JSON), if it set any.
    pub async fn detector_settings_get(&self, tenant: &str) -> DbResult<Option<serde_json::Value>> {
        let text: Option<String> = crate::with_pool!(self, read, |pool| {
            sqlx::query_scalar("SELECT settings FROM detector_settings WHERE tenant = $1")
                .bind(tenant)
                .fetch_optional(pool)
                .await?
        });
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Every tenant's overrides (the detectors' read), at most 10,000.
    pub async fn detector_settings_all(&self) -> DbResult<Vec<(String, serde_json::Value)>> {
        let rows: Vec<(String, String)> = crate::with_pool!(self, read, |pool| {
            sqlx::query_as(
                "SELECT tenant, settings FROM detector_settings ORDER BY tenant LIMIT 10000",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(tenant, text)| Some((tenant, serde_json::from_str(&text).ok()?)))
            .collect())
    }

    /// Replaces a tenant's overrides of the detector defaults.
    pub async fn detector_settings_put(
        &self,
        tenant: &str,
        settings: &serde_json::Value,
        now: Millis,
    ) -> DbResult<()> {
        crate::storable("tenant", tenant)?;
        let text = settings.to_string();
        crate::audit::audited_tx!(self, |tx| {
            sqlx::query(
                "INSERT INTO detector_settings (tenant, settings, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant) DO UPDATE SET settings = excluded.settings, \
                 updated_at = excluded.updated_at",
            )
            .bind(tenant)
            .bind(&text)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            crate::audit::stamp!(&mut *tx, Change::Changed);
        });
        Ok(())
    }

    /// Queues whose oldest job ready to run became ready before `before`,
    /// with that time: (tenant, queue, ready since), at most `limit`. Only
    /// jobs waiting since before `before` are read, so a healthy backlog
    /// costs nothing.
    pub async fn job_oldest_waiting(
        &self,
        before: Millis,
        limit: i64,
    ) -> DbResult<Vec<(String, String, Millis)>> {
        Ok(crate::with_pool!(self, read, |pool| {
            sqlx::query_as(
                "SELECT tenant, queue, MIN(run_at) FROM jobs \
                 WHERE status IN ('queued', 'scheduled') AND run_at < $1 \
                 GROUP BY tenant, queue ORDER BY tenant, queue LIMIT $2",
            )
            .bind(before)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }))
    }
}
