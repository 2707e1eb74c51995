//! Self-healing rules (migration 0015): the rules a tenant applied, the
//! state their cooldowns and hourly caps are decided on, each firing and
//! each action a firing took. The engine (`kiln_ops::rules`) decides what
//! to do; this module keeps it.
//!
//! A firing is claimed in one transaction that locks the rule's
//! `rule_state` row, counts its fires of the last hour, asks the caller's
//! (pure) throttle whether one more may go, and then records the fire and
//! its `rule.fired` event. So two engines, or one restarted, never fire a
//! rule past its cooldown or its cap, and never twice for one event.

use kiln_core::Millis;
use serde::Serialize;
use serde_json::Value;

use crate::audit::note::Change;
use crate::{storable, Db, DbResult};

/// One hour, the window of `max_per_hour`.
pub const HOUR_MS: i64 = 3_600_000;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredRule {
    pub tenant: String,
    pub name: String,
    pub active: bool,
    pub body: Value,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(sqlx::FromRow)]
struct RuleRow {
    tenant: String,
    name: String,
    active: bool,
    body: String,
    created_at: i64,
    updated_at: i64,
}

impl From<RuleRow> for StoredRule {
    fn from(r: RuleRow) -> StoredRule {
        StoredRule {
            tenant: r.tenant,
            name: r.name,
            active: r.active,
            body: serde_json::from_str(&r.body).unwrap_or(Value::Null),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// What a rule's cooldown and cap are decided on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Throttle {
    pub last_fired_at: Option<Millis>,
    /// Fires within the hour before now.
    pub fires_last_hour: i64,
}

/// A firing to claim.
#[derive(Clone, Debug)]
pub struct Firing<'a> {
    pub tenant: &'a str,
    pub rule: &'a str,
    pub event_id: i64,
    pub event_type: &'a str,
    pub now: Millis,
}

/// One action a firing took.
#[derive(Clone, Debug)]
pub struct ActionTaken<'a> {
    pub fire_id: i64,
    pub tenant: &'a str,
    pub rule: &'a str,
    pub event_id: i64,
    pub action: &'a str,
    pub detail: &'a Value,
    pub ok: bool,
    pub message: Option<&'a str>,
    pub now: Millis,
}

#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct ActionRecord {
    pub id: i64,
    pub fire_id: i64,
    pub rule: String,
    pub event_id: i64,
    pub action: String,
    #[sqlx(skip)]
    pub detail: Value,
    #[serde(skip)]
    pub detail_text: String,
    pub outcome: String,
    pub message: Option<String>,
    pub time: Millis,
}

const RULE_COLUMNS: &str = "tenant, name, active, body, created_at, updated_at";
const ACTION_COLUMNS: &str =
    "id, fire_id, rule, event_id, action, detail AS detail_text, outcome, message, time";

/// Longest message kept with an action.
const MESSAGE_MAX: usize = 1024;

const EVENT_INSERT: &str =
    "INSERT INTO events (time, tenant, type, resource_kind, resource_id, data) \
     VALUES ($1, $2, $3, 'rule', $4, $5)";

impl Db {
    /// Stores a rule, replacing the one of the same name; true when new.
    pub async fn rule_put(
        &self,
        tenant: &str,
        name: &str,
        active: bool,
        body: &Value,
        now: Millis,
    ) -> DbResult<bool> {
        storable("tenant", tenant)?;
        storable("rule", name)?;
        if kiln_core::names::json_has_nul(body) {
            return Err(crate::DbError::Invalid(
                "the rule holds a NUL character".into(),
            ));
        }
        let text = body.to_string();
        let created = crate::audit::audited_tx!(self, |tx| {
            let updated = sqlx::query(
                "UPDATE rules SET active = $3, body = $4, updated_at = $5 WHERE tenant = $1 AND name = $2",
            )
            .bind(tenant)
            .bind(name)
            .bind(active)
            .bind(&text)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 0 {
                sqlx::query(
                    "INSERT INTO rules (tenant, name, active, body, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $5)",
                )
                .bind(tenant)
                .bind(name)
                .bind(active)
                .bind(&text)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            let change = if updated == 0 {
                Change::Created
            } else {
                Change::Changed
            };
            crate::audit::stamp!(&mut *tx, change);
            updated == 0
        });
        Ok(created)
    }

    pub async fn rule_get(&self, tenant: &str, name: &str) -> DbResult<Option<StoredRule>> {
        let sql = format!("SELECT {RULE_COLUMNS} FROM rules WHERE tenant = $1 AND name = $2");
        let row: Option<RuleRow> = crate::with_pool!(self, read, |pool| {
            sqlx::query_as(&sql)
                .bind(tenant)
                .bind(name)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(StoredRule::from))
    }

    /// A tenant's rules by name.
    pub async fn rule_list(&self, tenant: &str) -> DbResult<Vec<StoredRule>> {
        let sql =
            format!("SELECT {RULE_COLUMNS} FROM rules WHERE tenant = $1 ORDER BY name LIMIT 1000");
        let rows: Vec<RuleRow> = crate::with_pool!(self, read, |pool| {
            sqlx::query_as(&sql).bind(tenant).fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(StoredRule::from).collect())
    }

    /// Every tenant's active rules (the engine's read), at most `limit`.
    pub async fn rule_list_active(&self, limit: i64) -> DbResult<Vec<StoredRule>> {
        let sql =
            format!("SELECT {RULE_COLUMNS} FROM rules WHERE active ORDER BY tenant, name LIMIT $1");
        let rows: Vec<RuleRow> = crate::with_pool!(self, read, |pool| {
            sqlx::query_as(&sql).bind(limit).fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(StoredRule::from).collect())
    }

    pub async fn rule_count(&self, tenant: &str) -> DbResult<i64> {
        Ok(crate::with_pool!(self, read, |pool| {
            sqlx::query_scalar("SELECT COUNT(*) FROM rules WHERE tenant = $1")
                .bind(tenant)
                .fetch_one(pool)
                .await?
        }))
    }

    /// Deletes a rule and its throttle state (its history of actions
    /// stays); false when there was none.
    pub async fn rule_delete(&self, tenant: &str, name: &str) -> DbResult<bool> {
        Ok(crate::audit::audited_tx!(self, |tx| {
            sqlx::query("DELETE FROM rule_state WHERE tenant = $1 AND rule = $2")
                .bind(tenant)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let gone = sqlx::query("DELETE FROM rules WHERE tenant = $1 AND name = $2")
                .bind(tenant)
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                > 0;
            if gone {
                crate::audit::stamp!(&mut *tx, Change::Changed);
            }
            gone
        }))
    }

    /// A rule's throttle state as it stands (a read: dry runs and the
    /// engine's look before running a module).
    pub async fn rule_throttle(&self, tenant: &str, rule: &str, now: Millis) -> DbResult<Throttle> {
        Ok(crate::with_pool!(self, read, |pool| {
            {
                let last: Option<Option<i64>> = sqlx::query_scalar(
                    "SELECT last_fired_at FROM rule_state WHERE tenant = $1 AND rule = $2",
                )
                .bind(tenant)
                .bind(rule)
                .fetch_optional(pool)
                .await?;
                let fires: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM rule_fires WHERE tenant = $1 AND rule = $2 AND time > $3",
                )
                .bind(tenant)
                .bind(rule)
                .bind(now - HOUR_MS)
                .fetch_one(pool)
                .await?;
                Throttle {
                    last_fired_at: last.flatten(),
                    fires_last_hour: fires,
                }
            }
        }))
    }

    /// Claims a firing of a rule for an event if `allow` says the rule's
    /// throttle lets it go, holding the rule's state row while it decides;
    /// the fire's id, or `None` (throttled, or this event already fired
    /// it).
    pub async fn rule_fire(
        &self,
        firing: &Firing<'_>,
        allow: impl Fn(&Throttle) -> bool,
    ) -> DbResult<Option<i64>> {
        let Firing {
            tenant,
            rule,
            event_id,
            event_type,
            now,
        } = *firing;
        let out = crate::audit::audited_tx!(self, |tx| {
            {
                sqlx::query(
                    "INSERT INTO rule_state (tenant, rule, fires) VALUES ($1, $2, 0) \
                     ON CONFLICT (tenant, rule) DO NOTHING",
                )
                .bind(tenant)
                .bind(rule)
                .execute(&mut *tx)
                .await?;
                // The lock: a second engine waits here until this one
                // commits, then counts this one's fire.
                let last: Option<i64> = sqlx::query_scalar(
                    "UPDATE rule_state SET fires = fires WHERE tenant = $1 AND rule = $2 \
                     RETURNING last_fired_at",
                )
                .bind(tenant)
                .bind(rule)
                .fetch_one(&mut *tx)
                .await?;
                let already: Option<i64> = sqlx::query_scalar(
                    "SELECT id FROM rule_fires WHERE tenant = $1 AND rule = $2 AND event_id = $3",
                )
                .bind(tenant)
                .bind(rule)
                .bind(event_id)
                .fetch_optional(&mut *tx)
                .await?;
                let fires: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM rule_fires WHERE tenant = $1 AND rule = $2 AND time > $3",
                )
                .bind(tenant)
                .bind(rule)
                .bind(now - HOUR_MS)
                .fetch_one(&mut *tx)
                .await?;
                let throttle = Throttle {
                    last_fired_at: last,
                    fires_last_hour: fires,
                };
                if already.is_some() || !allow(&throttle) {
                    None
                } else {
                    let id: i64 = sqlx::query_scalar(
                        "INSERT INTO rule_fires (tenant, rule, event_id, time) VALUES ($1, $2, $3, $4) \
                         RETURNING id",
                    )
                    .bind(tenant)
                    .bind(rule)
                    .bind(event_id)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?;
                    sqlx::query(
                        "UPDATE rule_state SET last_fired_at = $3, fires = fires + 1 \
                         WHERE tenant = $1 AND rule = $2",
                    )
                    .bind(tenant)
                    .bind(rule)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    let data = serde_json::json!({
                        "rule": rule, "fire_id": id, "event_id": event_id, "event_type": event_type,
                    });
                    sqlx::query(EVENT_INSERT)
                        .bind(now)
                        .bind(tenant)
                        .bind("rule.fired")
                        .bind(rule)
                        .bind(data.to_string())
                        .execute(&mut *tx)
                        .await?;
                    Some(id)
                }
            }
        });
        if out.is_some() {
            self.events_written();
        }
        Ok(out)
    }

    /// Records an action a firing took, with its `rule.action` event.
    pub async fn rule_action_record(&self, taken: &ActionTaken<'_>) -> DbResult<i64> {
        let message = taken
            .message
            .map(|m| kiln_core::names::sanitise_message(m, MESSAGE_MAX));
        let outcome = if taken.ok { "ok" } else { "error" };
        let detail = if kiln_core::names::json_has_nul(taken.detail) {
            "{}".to_string()
        } else {
            taken.detail.to_string()
        };
        let id = crate::audit::audited_tx!(self, |tx| {
            {
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO rule_actions (fire_id, tenant, rule, event_id, action, detail, outcome, \
                     message, time) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                )
                .bind(taken.fire_id)
                .bind(taken.tenant)
                .bind(taken.rule)
                .bind(taken.event_id)
                .bind(taken.action)
                .bind(&detail)
                .bind(outcome)
                .bind(message.as_deref())
                .bind(taken.now)
                .fetch_one(&mut *tx)
                .await?;
                let data = serde_json::json!({
                    "rule": taken.rule, "fire_id": taken.fire_id, "event_id": taken.event_id,
                    "action": taken.action, "outcome": outcome, "message": message,
                });
                sqlx::query(EVENT_INSERT)
                    .bind(taken.now)
                    .bind(taken.tenant)
                    .bind("rule.action")
                    .bind(taken.rule)
                    .bind(data.to_string())
                    .execute(&mut *tx)
                    .await?;
                let audit = kiln_core::audit::AuditRecord {
                    time: taken.now,
                    tenant: taken.tenant.to_string(),
                    actor_kind: "rule".into(),
                    actor: taken.rule.to_string(),
                    action: format!("rule.{}", taken.action),
                    resource: format!("/api/v1/automation/rules/{}/actions", taken.rule),
                    request_id: format!("rule-action:{id}"),
                    source: String::new(),
                    outcome: outcome.to_string(),
                    rationale: Some(match &message {
                        Some(m) => format!("event {}: {m}", taken.event_id),
                        None => format!("event {}", taken.event_id),
                    }),
                };
                crate::audit::insert_on!(&mut *tx, audit)?;
                id
            }
        });
        self.events_written();
        Ok(id)
    }

    /// A tenant's recorded actions, newest first, of one rule or all,
    /// below `before` (an id).
    pub async fn rule_actions(
        &self,
        tenant: &str,
        rule: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> DbResult<Vec<ActionRecord>> {
        let sql = format!(
            "SELECT {ACTION_COLUMNS} FROM rule_actions WHERE tenant = $1 \
             AND ($2 IS NULL OR rule = $2) AND ($3 IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
        );
        let mut rows: Vec<ActionRecord> = crate::with_pool!(self, read, |pool| {
            sqlx::query_as(&sql)
                .bind(tenant)
                .bind(rule)
                .bind(before)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        for row in &mut rows {
            row.detail = serde_json::from_str(&row.detail_text).unwrap_or(Value::Null);
        }
        Ok(rows)
    }

    /// Retention: deletes up to `batch` of the oldest fires and actions
    /// recorded before `before`; returns how many rows went.
    pub async fn rule_history_prune(&self, before: Millis, batch: i64) -> DbResult<u64> {
        let mut n = 0;
        for table in ["rule_actions", "rule_fires"] {
            let sql = format!(
                "DELETE FROM {table} WHERE id IN \
                 (SELECT id FROM {table} WHERE time < $1 ORDER BY time LIMIT $2)"
            );
            n += crate::with_pool!(self, write, |pool| {
                sqlx::query(&sql)
                    .bind(before)
                    .bind(batch)
                    .execute(pool)
                    .await?
                    .rows_affected()
            });
        }
        Ok(n)
    }
}
