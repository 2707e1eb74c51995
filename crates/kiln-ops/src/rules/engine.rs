//! The rule engine: reads the event log from its cursor (`rules` in
//! `event_cursors`) where the scheduler's loops run, judges each event by
//! the active rules of the event's tenant, and for each rule that fires
//! claims the firing in the store (cooldown, hourly cap and one firing per
//! event, decided holding the rule's state row), then takes its actions and
//! records each with its outcome. A module rule's module runs here, in this
//! process's wasm runtime with a rule's limits. [`dry_run`] judges the same
//! way and changes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::{AttemptEnd, JobKinds, Millis};
use kiln_db::events::{Event, EventQuery, PAGE_MAX};
use kiln_db::rules::{ActionTaken, Firing, Throttle};
use kiln_db::{Db, DbResult};
use kiln_wasm::{WasmRuntime, WasmSpec};
use kiln_worker::now_millis;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::actions::Actor;
use super::{
    context, evaluate, module_actions, plan, throttle, Decide, ModuleRef, Rule,
    MODULE_FUEL_DEFAULT, MODULE_MEMORY_MIB_DEFAULT, MODULE_OUTPUT_MAX, MODULE_TIMEOUT_MS_DEFAULT,
};

pub const CURSOR: &str = "rules";
/// Most active rules the engine holds (every tenant's).
const ACTIVE_MAX: i64 = 10_000;
/// Fires and actions are kept this long.
pub const HISTORY_KEPT: Duration = Duration::from_secs(30 * 86_400);
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Largest context handed to a module (a wasm spec's stdin bound).
const STDIN_MAX: usize = 256 << 10;

#[derive(Clone)]
pub struct RulesConfig {
    /// The kinds `run_job` and `run_pipeline` may start, with their checks.
    pub kinds: JobKinds,
    /// Where module rules run; without it they record an error.
    pub wasm: Option<Arc<WasmRuntime>>,
}

/// Judges events by the rules until `stop`.
pub async fn rules_loop(db: Db, config: RulesConfig, stop: CancellationToken) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match from_cursor(&db, &config, &stop).await {
            Ok(()) => return,
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "the rule engine stopped; starting again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200 << failures.min(5))) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

/// Every tenant's active rules that still pass their checks, by tenant.
async fn active_rules(db: &Db) -> DbResult<HashMap<String, Vec<Rule>>> {
    let mut out: HashMap<String, Vec<Rule>> = HashMap::new();
    for stored in db.rule_list_active(ACTIVE_MAX).await? {
        match Rule::parse(&stored.name, &stored.body) {
            Ok(rule) => out.entry(stored.tenant).or_default().push(rule),
            Err(error) => {
                tracing::warn!(tenant = %stored.tenant, rule = %stored.name, %error, "a stored rule no longer passes; skipped")
            }
        }
    }
    Ok(out)
}

async fn from_cursor(db: &Db, config: &RulesConfig, stop: &CancellationToken) -> DbResult<()> {
    let ready = db.events_ready();
    let mut cursor = db.event_cursor(CURSOR).await?;
    if cursor == 0 {
        // A new deployment's engine starts at the present, not the past.
        cursor = db.event_last().await?;
        db.event_cursor_put(CURSOR, cursor, now_millis()).await?;
    }
    let mut pruned: Option<Instant> = None;
    loop {
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // The log's end is read before the rules, so an event written
        // after a rule was applied is never stepped over.
        let last = db.event_last().await?;
        let rules = active_rules(db).await?;
        let events = if rules.is_empty() {
            // Nothing to judge by: step over the log without reading it.
            if last > cursor {
                cursor = last;
                db.event_cursor_put(CURSOR, cursor, now_millis()).await?;
            }
            Vec::new()
        } else {
            db.event_read(&EventQuery {
                after: cursor,
                limit: PAGE_MAX,
                ..Default::default()
            })
            .await?
        };
        for event in &events {
            for rule in rules.get(&event.tenant).into_iter().flatten() {
                judge(db, config, rule, event).await?;
            }
        }
        if let Some(last) = events.last().map(|e| e.id) {
            cursor = last;
            db.event_cursor_put(CURSOR, cursor, now_millis()).await?;
        }
        if pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            pruned = Some(Instant::now());
            let before = now_millis() - HISTORY_KEPT.as_millis() as i64;
            while db.rule_history_prune(before, 1_000).await? >= 1_000 {}
        }
        if events.len() as i64 == PAGE_MAX {
            continue;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// One rule and one event: fire it if it should and may, act, record.
async fn judge(db: &Db, config: &RulesConfig, rule: &Rule, event: &Event) -> DbResult<()> {
    if !evaluate(rule, event).fires {
        return Ok(());
    }
    let tenant = event.tenant.as_str();
    let now = now_millis();
    let allowed =
        |state: &Throttle| throttle(state, now, rule.cooldown_s, rule.max_per_hour).is_ok();
    let decided = match &rule.decide {
        Decide::Actions(actions) => Ok((actions.clone(), None)),
        Decide::Module(module) => {
            // A held rule runs no module: look first (the claim below
            // decides for good).
            if !allowed(&db.rule_throttle(tenant, &rule.name, now).await?) {
                return Ok(());
            }
            run_module(db, config.wasm.as_deref(), tenant, module, event).await
        }
    };
    if matches!(&decided, Ok((actions, _)) if actions.is_empty()) {
        return Ok(());
    }
    let firing = Firing {
        tenant,
        rule: &rule.name,
        event_id: event.id,
        event_type: &event.kind,
        now,
    };
    let Some(fire_id) = db.rule_fire(&firing, allowed).await? else {
        return Ok(());
    };
    let record = |action: &str, detail: Value, outcome: Result<(), String>| {
        let rule = rule.name.clone();
        let action = action.to_string();
        async move {
            let (ok, message) = match &outcome {
                Ok(()) => (true, None),
                Err(m) => (false, Some(m.as_str())),
            };
            db.rule_action_record(&ActionTaken {
                fire_id,
                tenant,
                rule: &rule,
                event_id: event.id,
                action: &action,
                detail: &detail,
                ok,
                message,
                now: now_millis(),
            })
            .await
            .map(drop)
        }
    };
    let (actions, note) = match decided {
        Ok(decided) => decided,
        Err(message) => return record("module", json!({}), Err(message)).await,
    };
    let actor = Actor {
        db,
        kinds: &config.kinds,
        tenant,
        rule: &rule.name,
        event,
    };
    for (index, planned) in plan(&actions, event).into_iter().enumerate() {
        let (detail, outcome) = match planned.action {
            Err(message) => (json!({}), Err(message)),
            Ok(action) => match actor.run(index, &action).await {
                Ok(done) => (json!({"action": action, "done": done}), Ok(())),
                Err(message) => (json!({"action": action}), Err(message)),
            },
        };
        let mut detail = detail;
        if let Some(note) = note.as_ref().filter(|n| n.to_string().len() <= 16 * 1024) {
            detail["note"] = note.clone();
        }
        record(&planned.name, detail, outcome).await?;
    }
    Ok(())
}

/// Runs a module rule's module on the event's context, with the rule's
/// limits; the actions it printed and its note.
pub async fn run_module(
    db: &Db,
    wasm: Option<&WasmRuntime>,
    tenant: &str,
    module: &ModuleRef,
    event: &Event,
) -> Result<(Vec<Value>, Option<Value>), String> {
    let Some(wasm) = wasm else {
        return Err("this process runs no wasm, so module rules cannot run here".into());
    };
    match db.module_get(tenant, &module.id).await {
        Ok(Some(_)) => {}
        Ok(None) => return Err(format!("module {} is not stored", module.id)),
        Err(error) => return Err(format!("the store failed: {error}")),
    }
    let stdin = context(event).to_string();
    if stdin.len() > STDIN_MAX {
        return Err("the event is too large to hand to a module".into());
    }
    let spec = WasmSpec {
        module: module.id.clone(),
        stdin,
        fuel: Some(module.fuel.unwrap_or(MODULE_FUEL_DEFAULT)),
        memory_mib: Some(module.memory_mib.unwrap_or(MODULE_MEMORY_MIB_DEFAULT)),
        output_limit_bytes: Some(MODULE_OUTPUT_MAX),
        ..Default::default()
    };
    let kill = CancellationToken::new();
    let timeout = Duration::from_millis(module.timeout_ms.unwrap_or(MODULE_TIMEOUT_MS_DEFAULT));
    let end = match tokio::time::timeout(timeout, wasm.run(&spec, &kill)).await {
        Ok(end) => end,
        Err(_) => {
            kill.cancel();
            return Err(format!("the module ran past {} ms", timeout.as_millis()));
        }
    };
    match end {
        AttemptEnd::Succeeded(result) if result.truncated => Err(format!(
            "the module printed more than {MODULE_OUTPUT_MAX} bytes"
        )),
        AttemptEnd::Succeeded(result) => module_actions(&result.stdout),
        AttemptEnd::Failed { error, .. } => Err(format!("the module failed: {error}")),
        AttemptEnd::TimedOut { .. } => Err("the module timed out".into()),
        AttemptEnd::Cancelled => Err("the module was stopped".into()),
    }
}

/// What a rule would do with an event, and why, with no side effect: the
/// store is only read (the throttle, the module's ownership), and a module
/// runs here, in memory.
pub async fn dry_run(
    db: &Db,
    wasm: Option<&WasmRuntime>,
    rule: &Rule,
    event: &Event,
    now: Millis,
) -> DbResult<Value> {
    let evaluation = evaluate(rule, event);
    let state = db.rule_throttle(&event.tenant, &rule.name, now).await?;
    let held = throttle(&state, now, rule.cooldown_s, rule.max_per_hour).err();
    let mut module = Value::Null;
    let mut actions = Vec::new();
    if evaluation.fires {
        let decided = match &rule.decide {
            Decide::Actions(actions) => Ok((actions.clone(), None)),
            Decide::Module(m) => run_module(db, wasm, &event.tenant, m, event).await,
        };
        match decided {
            Ok((written, note)) => {
                if matches!(rule.decide, Decide::Module(_)) {
                    module = json!({"note": note, "actions": written});
                }
                for planned in plan(&written, event) {
                    actions.push(match planned.action {
                        Ok(action) => json!({"action": planned.name, "would_run": action}),
                        Err(error) => json!({"action": planned.name, "error": error}),
                    });
                }
            }
            Err(error) => module = json!({"error": error}),
        }
    }
    let would_fire = evaluation.fires && held.is_none() && !actions.is_empty();
    Ok(json!({
        "rule": rule.name,
        "event": context(event)["event"],
        "triggered": evaluation.triggered,
        "condition": {
            "source": rule.condition.as_ref().map(|c| c.source()),
            "result": evaluation.condition,
            "error": evaluation.condition_error,
            "bindings": evaluation.bindings,
        },
        "throttle": {
            "cooldown_s": rule.cooldown_s,
            "max_per_hour": rule.max_per_hour,
            "last_fired_at": state.last_fired_at,
            "fires_last_hour": state.fires_last_hour,
            "held": held,
        },
        "module": module,
        "would_fire": would_fire,
        "actions": actions,
    }))
}
