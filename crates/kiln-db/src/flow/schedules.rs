//! Cron schedules in the store. A scheduler takes due schedules (locked,
//! `SKIP LOCKED` on PostgreSQL, so schedulers on many hosts share them),
//! works out the ticks to fire with `kiln_flow::schedule::due`, and fires
//! each in the same transaction that writes its row in `schedule_fires`,
//! whose key is (tenant, schedule, tick): however many schedulers run, a
//! tick fires once.

use kiln_core::{JobKinds, Millis};
use kiln_flow::schedule::{self, CatchUp, CronSpec, Overlap, OverlapDecision};
use kiln_flow::target::{ScheduleDef, Target};
use serde::Serialize;
use serde_json::Value;

use super::{dispatch_flow, run_create_in, FlowError, NewRun};
use crate::audit::note::Change;
use crate::{Db, DbError, DbResult};

/// A tick this late still fires under `catch_up: none`: the scheduler's own
/// poll lag, not an outage.
pub const GRACE_MS: i64 = 5_000;
/// Most missed ticks `catch_up: all` fires at once.
pub const CATCH_UP_MAX: usize = 100;
/// Schedules one scheduler pass takes.
const DUE_BATCH: i64 = 100;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScheduleRecord {
    #[serde(skip)]
    pub tenant: String,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub target: Value,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub paused: bool,
    pub next_fire_at: Option<Millis>,
    pub last_fire_at: Option<Millis>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FireRecord {
    #[serde(skip)]
    pub tenant: String,
    pub schedule: String,
    pub tick: Millis,
    pub fired_at: Millis,
    /// `fired`, `skipped` (the previous fire was still running) or `error`.
    pub outcome: String,
    pub job_id: Option<i64>,
    pub run_id: Option<i64>,
    pub error: Option<String>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ScheduleRow {
    pub tenant: String,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub target: String,
    pub overlap: String,
    pub catch_up: String,
    pub paused: bool,
    pub next_fire_at: Option<i64>,
    pub last_fire_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

pub(crate) const SCHEDULE_COLUMNS: &str = "tenant, name, cron, timezone, target, overlap, \
     catch_up, paused, next_fire_at, last_fire_at, created_at, updated_at";
pub(crate) const FIRE_COLUMNS: &str =
    "tenant, schedule, tick, fired_at, outcome, job_id, run_id, error";

fn from_text<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> DbResult<T> {
    serde_json::from_value(Value::String(text.to_string()))
        .map_err(|e| DbError::Corrupt(format!("{what}: {e}")))
}

pub(crate) fn as_text<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

impl TryFrom<ScheduleRow> for ScheduleRecord {
    type Error = DbError;
    fn try_from(r: ScheduleRow) -> DbResult<ScheduleRecord> {
        Ok(ScheduleRecord {
            target: serde_json::from_str(&r.target)
                .map_err(|e| DbError::Corrupt(format!("schedule target: {e}")))?,
            overlap: from_text("schedule overlap", &r.overlap)?,
            catch_up: from_text("schedule catch_up", &r.catch_up)?,
            tenant: r.tenant,
            name: r.name,
            cron: r.cron,
            timezone: r.timezone,
            paused: r.paused,
            next_fire_at: r.next_fire_at,
            last_fire_at: r.last_fire_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct FireRow {
    pub tenant: String,
    pub schedule: String,
    pub tick: i64,
    pub fired_at: i64,
    pub outcome: String,
    pub job_id: Option<i64>,
    pub run_id: Option<i64>,
    pub error: Option<String>,
}

impl From<FireRow> for FireRecord {
    fn from(r: FireRow) -> FireRecord {
        FireRecord {
            tenant: r.tenant,
            schedule: r.schedule,
            tick: r.tick,
            fired_at: r.fired_at,
            outcome: r.outcome,
            job_id: r.job_id,
            run_id: r.run_id,
            error: r.error,
        }
    }
}

/// The queue a schedule with `overlap: queue` sends its jobs to: limited to
/// one at a time, so each fire waits for the one before.
pub fn serial_queue(schedule: &str) -> String {
    format!("schedule.{schedule}")
}

impl Db {
    /// Creates or replaces a schedule (checked by the caller); its next
    /// tick is counted from `now`.
    pub async fn schedule_put(
        &self,
        tenant: &str,
        def: &ScheduleDef,
        spec: &CronSpec,
        now: Millis,
    ) -> DbResult<ScheduleRecord> {
        let mut tx = self.flow_tx(true).await?;
        let created_at = tx
            .schedule_get(tenant, &def.name)
            .await?
            .map_or(now, |s| s.created_at);
        let record = ScheduleRecord {
            tenant: tenant.to_string(),
            name: def.name.clone(),
            cron: spec.expression().to_string(),
            timezone: spec.timezone().to_string(),
            target: serde_json::to_value(&def.target)
                .map_err(|e| DbError::Invalid(format!("target: {e}")))?,
            overlap: def.overlap,
            catch_up: def.catch_up,
            paused: def.paused,
            next_fire_at: spec.next_after(now),
            last_fire_at: None,
            created_at,
            updated_at: now,
        };
        tx.schedule_put(&record).await?;
        if def.overlap == Overlap::Queue && matches!(def.target, Target::Job(_)) {
            tx.queue_serial(tenant, &serial_queue(&def.name), now)
                .await?;
        }
        let stored = tx.schedule_get(tenant, &def.name).await?;
        let resource = format!("/api/v1/schedules/{}", def.name);
        super::commit_audited(tx, Change::Created, Some(&resource)).await?;
        self.events_written();
        stored.ok_or_else(|| DbError::Corrupt("a schedule just written is missing".into()))
    }

    pub async fn schedule_get(&self, tenant: &str, name: &str) -> DbResult<Option<ScheduleRecord>> {
        let mut tx = self.flow_tx(false).await?;
        let found = tx.schedule_get(tenant, name).await?;
        tx.commit().await?;
        self.events_written();
        Ok(found)
    }

    pub async fn schedule_list(&self, tenant: &str) -> DbResult<Vec<ScheduleRecord>> {
        let mut tx = self.flow_tx(false).await?;
        let found = tx.schedule_list(tenant).await?;
        tx.commit().await?;
        self.events_written();
        Ok(found)
    }

    pub async fn schedule_delete(&self, tenant: &str, name: &str) -> DbResult<bool> {
        let mut tx = self.flow_tx(true).await?;
        let gone = tx.schedule_delete(tenant, name).await?;
        if gone {
            super::commit_audited(tx, Change::Changed, None).await?;
        } else {
            tx.commit().await?;
        }
        self.events_written();
        Ok(gone)
    }

    /// Pauses or resumes; a resumed schedule counts its next tick from
    /// `now` (what was missed while paused is not caught up).
    pub async fn schedule_set_paused(
        &self,
        tenant: &str,
        name: &str,
        paused: bool,
        now: Millis,
    ) -> DbResult<Option<ScheduleRecord>> {
        let mut tx = self.flow_tx(true).await?;
        let Some(mut record) = tx.schedule_get(tenant, name).await? else {
            return Ok(None);
        };
        if record.paused != paused {
            record.paused = paused;
            record.updated_at = now;
            if !paused {
                record.next_fire_at = CronSpec::parse(&record.cron, &record.timezone)
                    .map_err(|e| DbError::Corrupt(format!("schedule {name}: {e}")))?
                    .next_after(now);
            }
            tx.schedule_moved(&record).await?;
        }
        super::commit_audited(tx, Change::Changed, None).await?;
        self.events_written();
        Ok(Some(record))
    }

    pub async fn schedule_fires(
        &self,
        tenant: &str,
        name: &str,
        limit: i64,
    ) -> DbResult<Vec<FireRecord>> {
        let mut tx = self.flow_tx(false).await?;
        let found = tx.fires(tenant, name, limit).await?;
        tx.commit().await?;
        self.events_written();
        Ok(found)
    }

    /// The earliest next tick of any unpaused schedule: when a scheduler
    /// should look next.
    pub async fn schedule_next_due(&self) -> DbResult<Option<Millis>> {
        dispatch_flow!(self, s => s.schedule_next_due().await)
    }

    /// One scheduler pass at `now`: fires every due tick once. Returns the
    /// number of fires written (fired, skipped or failed).
    pub async fn schedule_fire_due(&self, kinds: &JobKinds, now: Millis) -> DbResult<usize> {
        let mut tx = self.flow_tx(true).await?;
        let due = tx.schedules_due(now, DUE_BATCH).await?;
        let mut written = 0;
        let mut made_jobs = false;
        for mut record in due {
            let spec = match CronSpec::parse(&record.cron, &record.timezone) {
                Ok(spec) => spec,
                Err(error) => {
                    tracing::error!(tenant = %record.tenant, schedule = %record.name, %error, "a stored schedule cannot be parsed; pausing it");
                    record.paused = true;
                    tx.schedule_moved(&record).await?;
                    continue;
                }
            };
            let Some(next) = record.next_fire_at else {
                continue;
            };
            let due = schedule::due(&spec, next, now, record.catch_up, GRACE_MS, CATCH_UP_MAX);
            let target: Target = match serde_json::from_value(record.target.clone()) {
                Ok(target) => target,
                Err(error) => {
                    tracing::error!(schedule = %record.name, %error, "a stored schedule target cannot be read; pausing it");
                    record.paused = true;
                    tx.schedule_moved(&record).await?;
                    continue;
                }
            };
            for &tick in &due.fire {
                // The tick's row first: if it exists, this tick has fired.
                let claim = FireRecord {
                    tenant: record.tenant.clone(),
                    schedule: record.name.clone(),
                    tick,
                    fired_at: now,
                    outcome: "fired".into(),
                    job_id: None,
                    run_id: None,
                    error: None,
                };
                if !tx.fire_insert(&claim).await? {
                    continue;
                }
                let (fire, jobs) =
                    fire_one(tx.as_mut(), self, kinds, &record, &target, tick, now).await?;
                tx.fire_update(&fire).await?;
                tx.audit_insert(&fire_audit(&fire, now)).await?;
                written += 1;
                made_jobs |= jobs;
                record.last_fire_at = Some(tick);
            }
            if due.skipped > 0 {
                tracing::info!(schedule = %record.name, missed = due.skipped, "missed ticks not caught up");
            }
            record.next_fire_at = due.next_fire_at;
            tx.schedule_moved(&record).await?;
        }
        tx.commit().await?;
        self.events_written();
        if made_jobs {
            self.wakeup().notify_waiters();
        }
        Ok(written)
    }
}

/// The audit record of one fire, written in its transaction.
fn fire_audit(fire: &FireRecord, now: Millis) -> kiln_core::audit::AuditRecord {
    let resource = match (fire.job_id, fire.run_id) {
        (Some(job), _) => format!("/api/v1/jobs/{job}"),
        (_, Some(run)) => format!("/api/v1/runs/{run}"),
        _ => format!("/api/v1/schedules/{}", fire.schedule),
    };
    kiln_core::audit::AuditRecord {
        time: now,
        tenant: fire.tenant.clone(),
        actor_kind: "schedule".into(),
        actor: fire.schedule.clone(),
        action: "schedule.fire".into(),
        resource,
        request_id: format!("schedule:{}:{}", fire.schedule, fire.tick),
        source: String::new(),
        outcome: fire.outcome.clone(),
        rationale: Some(match &fire.error {
            Some(error) => format!("tick {}: {}", fire.tick, truncate(error, 512)),
            None => format!("tick {}", fire.tick),
        }),
    }
}

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Starts what one tick starts (unless the previous fire still runs and the
/// schedule skips overlaps) and says what happened; the caller has claimed
/// the tick's row in the same transaction, and idempotency keys tie what was
/// started to the tick.
async fn fire_one(
    tx: &mut dyn super::FlowTx,
    db: &Db,
    kinds: &JobKinds,
    record: &ScheduleRecord,
    target: &Target,
    tick: Millis,
    now: Millis,
) -> DbResult<(FireRecord, bool)> {
    let mut fire = FireRecord {
        tenant: record.tenant.clone(),
        schedule: record.name.clone(),
        tick,
        fired_at: now,
        outcome: "fired".into(),
        job_id: None,
        run_id: None,
        error: None,
    };
    let previous_running = match tx.last_fire(&record.tenant, &record.name).await? {
        Some(FireRecord {
            job_id: Some(id), ..
        }) => tx.job_active(id).await?,
        Some(FireRecord {
            run_id: Some(id), ..
        }) => tx.run_active(id).await?,
        _ => false,
    };
    if schedule::overlap(record.overlap, previous_running) == OverlapDecision::Skip {
        fire.outcome = "skipped".into();
        return Ok((fire, false));
    }
    let key = format!("schedule:{}:{tick}", record.name);
    match target {
        Target::Job(template) => {
            let mut job = template.to_job(&record.tenant);
            let kind = job.kind.clone();
            job.kind = kinds.stored_kind(&job.kind, &job.spec);
            if record.overlap == Overlap::Queue {
                job.queue = serial_queue(&record.name);
            }
            job.idempotency_key = Some(key);
            job.labels
                .insert("kiln.schedule".into(), record.name.clone());
            job.run_at = None;
            let policies = super::policies_in(tx, &db.defs().policies, &record.tenant).await?;
            if !policies.is_empty() {
                let mut subject =
                    kiln_flow::policy::Subject::of_job(&job, kinds.describe(&kind, &job.spec));
                subject.kind = &kind;
                if let Err(denial) = policies.admit(&subject) {
                    fire.outcome = "error".into();
                    fire.error = Some(format!("policy_denied: {denial}"));
                    return Ok((fire, false));
                }
            }
            match tx
                .insert_jobs(std::slice::from_ref(&job), None, now, false)
                .await
            {
                Ok(ids) => {
                    fire.job_id = ids.first().copied();
                    Ok((fire, true))
                }
                Err(DbError::Invalid(message)) => {
                    fire.outcome = "error".into();
                    fire.error = Some(message);
                    Ok((fire, false))
                }
                Err(e) => Err(e),
            }
        }
        Target::Pipeline(p) => {
            let new = NewRun {
                tenant: record.tenant.clone(),
                pipeline: p.name.clone(),
                params: p.params.clone(),
                labels: [("kiln.schedule".to_string(), record.name.clone())].into(),
                idempotency_key: Some(key),
                trigger: format!("schedule:{}", record.name),
            };
            // A first step a policy refuses fails in the run, where the
            // schedule's owner sees why.
            match run_create_in(tx, db.defs(), kinds, &new, now, false).await? {
                Ok((id, _, jobs)) => {
                    fire.run_id = Some(id);
                    Ok((fire, jobs))
                }
                Err(e) => {
                    fire.outcome = "error".into();
                    fire.error = Some(match e {
                        FlowError::NotFound(what) => format!("{what} {:?} not found", p.name),
                        FlowError::Conflict(m) | FlowError::Invalid(m) => m,
                        FlowError::Denied { message, .. } => message,
                    });
                    Ok((fire, false))
                }
            }
        }
    }
}
