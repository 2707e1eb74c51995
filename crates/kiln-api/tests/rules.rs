//! Self-healing rules on both databases: a dead-letter burst healed by a
//! rule, its incident resolving by itself; dry runs that change nothing;
//! cooldowns and hourly caps under a burst of 1,000 events with two
//! engines; a wasm module that decides; tenants apart; bad bodies refused
//! by field; detector settings per tenant.

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::{error_code, harness, Harness};
use serde_json::{json, Value};

kiln_db::on_both_databases!(
    a_dead_letter_burst_is_healed_by_a_rule_and_its_incident_resolves_by_itself,
    a_dry_run_changes_nothing,
    cooldowns_and_caps_hold_under_a_burst_of_1000_events,
    a_wasm_module_decides_from_the_event_on_its_stdin,
    a_rule_acts_only_in_its_own_tenant,
    bad_rule_bodies_are_refused_naming_the_field,
    detector_settings_are_the_tenants_own,
    a_stuck_backlog_and_a_failing_kind_open_incidents_that_clear,
);

/// Polls `probe` until it answers; 60 s is only a guard against a hang.
async fn until<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn apply(h: &Harness, key: &str, name: &str, body: Value) -> (StatusCode, Value) {
    h.call(
        "PUT",
        &format!("/api/v1/automation/rules/{name}"),
        key,
        Some(body),
    )
    .await
}

async fn applied(h: &Harness, name: &str, body: Value) {
    let (status, rule) = apply(h, &h.admin, name, body).await;
    assert_eq!(status, StatusCode::CREATED, "{rule}");
}

async fn actions(h: &Harness, key: &str, rule: &str) -> Vec<Value> {
    let (status, list) = h
        .call(
            "GET",
            &format!("/api/v1/automation/rules/{rule}/actions?limit=1000"),
            key,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list["actions"].as_array().unwrap().clone()
}

async fn append(h: &Harness, tenant: &str, kind: &str, data: Value) {
    h.db.event_append(
        tenant,
        kind,
        ("test", "1"),
        &Default::default(),
        &data,
        kiln_api::now_millis(),
    )
    .await
    .unwrap();
}

/// Lets the engines and detectors see the rules just applied and settle.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(800)).await;
}

async fn a_dead_letter_burst_is_healed_by_a_rule_and_its_incident_resolves_by_itself(
    db: kiln_db::Db,
) {
    let h = harness(db).await;
    applied(
        &h,
        "heal-etl",
        json!({
            "trigger": {"incident": "dead_letter_burst"},
            "condition": "incident.fingerprint == 'dead_letter_burst:etl'",
            "actions": [{"action": "retry_dead_jobs", "queue": "${incident.fingerprint.startsWith('dead_letter_burst:') ? 'etl' : 'none'}"}],
            "cooldown_s": 60,
        }),
    )
    .await;
    settle().await;
    // Three jobs (the harness's burst) that fail their first attempt and
    // have no second: dead, until a retry gives them one.
    let mut ids = Vec::new();
    for i in 0..3 {
        let job = h
            .submit(json!({"kind": "noop", "spec": {"fail_attempts": 1}, "queue": "etl", "max_attempts": 1}))
            .await;
        let id = job["id"].as_str().unwrap().to_string();
        let done = h.wait(&id, common::finished).await;
        // The third death opens the incident, and the rule may retry it
        // before we look.
        assert!(
            done["status"] == "dead" || (i == 2 && done["status"] == "succeeded"),
            "{done}"
        );
        ids.push(id);
    }
    // The rule retried them on a worker, where they succeeded: each died
    // on its first attempt and succeeded on its second.
    for id in &ids {
        let job = h.wait(id, |j| j["status"] == "succeeded").await;
        assert_eq!(job["attempts"], 2, "{job}");
        let (_, attempts) = h
            .call(
                "GET",
                &format!("/api/v1/jobs/{id}/attempts"),
                &h.admin,
                None,
            )
            .await;
        let outcomes: Vec<&str> = attempts["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(outcomes, ["failed", "succeeded"], "{attempts}");
    }
    let taken = until("the rule's action", async || {
        let taken = actions(&h, &h.admin, "heal-etl").await;
        (!taken.is_empty()).then_some(taken)
    })
    .await;
    assert_eq!(taken.len(), 1, "one firing: {taken:?}");
    assert_eq!(taken[0]["action"], "retry_dead_jobs");
    assert_eq!(taken[0]["outcome"], "ok", "{}", taken[0]);
    assert_eq!(taken[0]["detail"]["done"]["retried"], 3, "{}", taken[0]);
    // The incident resolves by itself once the queue is quiet.
    let incident = until("the burst incident to resolve", async || {
        let (_, list) = h.call("GET", "/api/v1/incidents", &h.admin, None).await;
        list["incidents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["kind"] == "dead_letter_burst" && i["status"] == "resolved")
            .cloned()
    })
    .await;
    assert_eq!(incident["fingerprint"], "dead_letter_burst:etl");
    assert_eq!(incident["resolved_by"], "automatic", "{incident}");
    // The firing and its action are events, for subscriptions.
    let (_, page) = h
        .call("GET", "/api/v1/events?type=rule.*&after=0", &h.admin, None)
        .await;
    let types: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["rule.fired", "rule.action"], "{page}");
    h.stop().await;
}

/// Everything a dry run could touch, as the API and the store show it.
async fn snapshot(h: &Harness, rules: &[&str]) -> Value {
    let get = |path: &'static str| async move {
        let (status, body) = h.call("GET", path, &h.admin, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        body
    };
    let mut throttles = Vec::new();
    for rule in rules {
        let t = h.db.rule_throttle("acme", rule, 0).await.unwrap();
        throttles.push(json!([t.last_fired_at, t.fires_last_hour]));
    }
    json!({
        "jobs": get("/api/v1/jobs?limit=1000").await,
        "queues": get("/api/v1/queues").await,
        "incidents": get("/api/v1/incidents").await,
        "rules": get("/api/v1/automation/rules").await,
        "actions": get("/api/v1/automation/actions?limit=1000").await,
        "runs": get("/api/v1/runs").await,
        "throttles": throttles,
        "events": h.db.event_last().await.unwrap(),
        "modules": get("/api/v1/modules").await,
    })
}

fn module_printing(prefix: &str) -> String {
    // Prints `prefix`, then its stdin, then `}`.
    let escaped = prefix.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 60000) "{escaped}")
  (data (i32.const 59990) "}}")
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (call $write (i32.const 60000) (i32.const {len}))
    (loop $more
      (i32.store (i32.const 16) (i32.const 1024))
      (i32.store (i32.const 20) (i32.const 4096))
      (drop (call $fd_read (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 24)))
      (if (i32.gt_u (i32.load (i32.const 24)) (i32.const 0))
        (then
          (call $write (i32.const 1024) (i32.load (i32.const 24)))
          (br $more))))
    (call $write (i32.const 59990) (i32.const 1))))"#,
        len = prefix.len()
    )
}

/// A module that pauses the queue its event names, and returns what it
/// read as its note.
fn pausing_module() -> String {
    module_printing(
        r#"{"actions":[{"action":"pause_queue","queue":"${event.data.queue}"}],"note":"#,
    )
}

async fn dry(h: &Harness, rule: Value, event: Value) -> Value {
    let mut body = json!({"rule": rule});
    match event {
        Value::Number(_) | Value::String(_) => body["event_id"] = event,
        event => body["event"] = event,
    }
    let (status, report) = h
        .call("POST", "/api/v1/automation/dry-run", &h.admin, Some(body))
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    report
}

async fn a_dry_run_changes_nothing(db: kiln_db::Db) {
    let h = harness(db).await;
    let module = h.push(&pausing_module()).await;
    let dead = h
        .submit(
            json!({"kind": "noop", "spec": {"exit_code": 3}, "queue": "etl", "max_attempts": 1}),
        )
        .await;
    let dead_id = dead["id"].as_str().unwrap().to_string();
    h.wait(&dead_id, |j| j["status"] == "dead").await;
    // Applied rules whose trigger no real event matches, so the engine
    // leaves them alone while we look.
    let heal = json!({
        "trigger": {"events": ["test.never"]},
        "condition": "event.data.queue == 'etl'",
        "actions": [
            {"action": "retry_dead_jobs", "queue": "${event.data.queue}"},
            {"action": "pause_queue", "queue": "${event.data.queue}"},
            {"action": "set_queue_limit", "queue": "etl", "limit": 2},
            {"action": "run_job", "job": {"kind": "noop", "spec": {"stdout": "${event.type}"}}},
            {"action": "run_pipeline", "pipeline": "nope"},
        ],
        "cooldown_s": 5,
    });
    applied(&h, "heal", heal.clone()).await;
    applied(
        &h,
        "decide",
        json!({"trigger": {"events": ["test.never"]}, "module": {"id": module}}),
    )
    .await;
    settle().await;
    let before = snapshot(&h, &["heal", "decide", "fresh"]).await;

    let written = json!({"type": "test.never", "resource": {"kind": "job", "id": dead_id}, "data": {"queue": "etl"}});
    let report = dry(&h, json!("heal"), written.clone()).await;
    assert_eq!(report["would_fire"], true, "{report}");
    assert_eq!(report["condition"]["result"], true);
    assert_eq!(report["condition"]["bindings"]["event.data.queue"], "etl");
    assert_eq!(report["throttle"]["held"], Value::Null);
    let planned = report["actions"].as_array().unwrap();
    assert_eq!(planned.len(), 5, "{report}");
    assert_eq!(planned[0]["would_run"]["queue"], "etl");
    assert_eq!(
        planned[3]["would_run"]["job"]["spec"]["stdout"],
        "test.never"
    );
    // A rule not applied, by a real event of the log: the dead job's.
    let (_, page) = h
        .call(
            "GET",
            &format!("/api/v1/events?resource=job:{dead_id}&type=job.dead&after=0"),
            &h.admin,
            None,
        )
        .await;
    let event_id = page["events"][0]["id"].clone();
    let mut fresh = heal.clone();
    fresh["trigger"] = json!({"events": ["job.dead"]});
    fresh["name"] = json!("fresh");
    let report = dry(&h, fresh.clone(), event_id.clone()).await;
    assert_eq!(report["would_fire"], true, "{report}");
    assert_eq!(report["event"]["type"], "job.dead");
    // A condition that says no, and why.
    let mut no = fresh.clone();
    no["condition"] = json!("event.data.queue == 'web'");
    let report = dry(&h, no, event_id).await;
    assert_eq!(report["would_fire"], false, "{report}");
    assert_eq!(report["condition"]["result"], false);
    assert_eq!(report["condition"]["bindings"]["event.data.queue"], "etl");
    // The module runs in memory: no job is made for it.
    let report = dry(&h, json!("decide"), written).await;
    assert_eq!(report["would_fire"], true, "{report}");
    assert_eq!(
        report["actions"][0]["would_run"]["queue"], "etl",
        "{report}"
    );
    assert_eq!(report["module"]["note"]["event"]["type"], "test.never");

    settle().await;
    let after = snapshot(&h, &["heal", "decide", "fresh"]).await;
    assert_eq!(before, after);
    h.stop().await;
}

async fn cooldowns_and_caps_hold_under_a_burst_of_1000_events(db: kiln_db::Db) {
    let h = harness(db).await;
    // A second engine, as a second scheduler process would run.
    let second = tokio::spawn(kiln_ops::rules::engine::rules_loop(
        h.db.clone(),
        kiln_ops::rules::engine::RulesConfig {
            kinds: common::kinds(),
            wasm: None,
        },
        h.stop.clone(),
    ));
    applied(
        &h,
        "cool",
        json!({"trigger": {"events": ["test.ping"]}, "cooldown_s": 3600, "max_per_hour": 1000,
               "actions": [{"action": "pause_queue", "queue": "cool-q"}]}),
    )
    .await;
    applied(
        &h,
        "capped",
        json!({"trigger": {"events": ["test.*"]}, "condition": "event.data.n % 2 == 0",
               "cooldown_s": 0, "max_per_hour": 5,
               "actions": [{"action": "set_queue_limit", "queue": "cap-q", "limit": 2}]}),
    )
    .await;
    settle().await;
    for n in 0..1000 {
        append(&h, "acme", "test.ping", json!({"n": n})).await;
    }
    // Both engines have read past the burst.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = h.db.event_last().await.unwrap();
    until("the engines to pass the burst", async || {
        (h.db.event_cursor("rules").await.unwrap() >= last).then_some(())
    })
    .await;
    // The other engine may still be judging the page it read.
    settle().await;
    settle().await;
    let cool = actions(&h, &h.admin, "cool").await;
    assert_eq!(cool.len(), 1, "the cooldown holds: {cool:?}");
    let capped = actions(&h, &h.admin, "capped").await;
    assert_eq!(capped.len(), 5, "the hourly cap holds: {capped:?}");
    let mut fired_by: Vec<i64> = capped
        .iter()
        .map(|a| a["event_id"].as_i64().unwrap())
        .collect();
    fired_by.sort();
    fired_by.dedup();
    assert_eq!(fired_by.len(), 5, "one firing per event: {capped:?}");
    assert!(capped.iter().all(|a| a["outcome"] == "ok"), "{capped:?}");
    let throttle =
        h.db.rule_throttle("acme", "capped", kiln_api::now_millis())
            .await
            .unwrap();
    assert_eq!(throttle.fires_last_hour, 5);
    let (_, queue) = h.call("GET", "/api/v1/queues/cap-q", &h.admin, None).await;
    assert_eq!(queue["concurrency_limit"], 2, "{queue}");
    h.stop().await;
    second.await.unwrap();
}

async fn a_wasm_module_decides_from_the_event_on_its_stdin(db: kiln_db::Db) {
    let h = harness(db).await;
    let pausing = h.push(&pausing_module()).await;
    let babbling = h.push(&kiln_wasm::fixtures::hello()).await;
    applied(
        &h,
        "by-module",
        json!({"trigger": {"events": ["test.module"]}, "module": {"id": pausing, "fuel": 10_000_000}}),
    )
    .await;
    applied(
        &h,
        "babble",
        json!({"trigger": {"events": ["test.module"]}, "module": {"id": babbling}}),
    )
    .await;
    settle().await;
    append(&h, "acme", "test.module", json!({"queue": "from-wasm"})).await;
    let taken = until("the module's action", async || {
        let taken = actions(&h, &h.admin, "by-module").await;
        (!taken.is_empty()).then_some(taken)
    })
    .await;
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0]["action"], "pause_queue");
    assert_eq!(taken[0]["outcome"], "ok", "{}", taken[0]);
    // It read the event on its stdin: it handed it back as its note.
    assert_eq!(taken[0]["detail"]["note"]["event"]["type"], "test.module");
    assert_eq!(
        taken[0]["detail"]["note"]["event"]["data"]["queue"],
        "from-wasm"
    );
    let (_, queue) = h
        .call("GET", "/api/v1/queues/from-wasm", &h.admin, None)
        .await;
    assert_eq!(queue["paused"], true, "{queue}");
    // A module that prints no actions has its failure on record.
    let failed = until("the babbling module's record", async || {
        let taken = actions(&h, &h.admin, "babble").await;
        (!taken.is_empty()).then_some(taken)
    })
    .await;
    assert_eq!(failed[0]["action"], "module");
    assert_eq!(failed[0]["outcome"], "error");
    assert!(
        failed[0]["message"]
            .as_str()
            .unwrap()
            .contains("printed no JSON"),
        "{}",
        failed[0]
    );
    // No job ran the modules: the rule engine did.
    let (_, jobs) = h
        .call("GET", "/api/v1/jobs?kind=wasm", &h.admin, None)
        .await;
    assert!(jobs["jobs"].as_array().unwrap().is_empty(), "{jobs}");
    h.stop().await;
}

async fn a_rule_acts_only_in_its_own_tenant(db: kiln_db::Db) {
    let h = harness(db).await;
    let (status, theirs) = h
        .call(
            "POST",
            "/api/v1/jobs",
            &h.other,
            Some(json!({"kind": "noop", "spec": {"exit_code": 3}, "queue": "shared", "max_attempts": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{theirs}");
    let theirs = theirs["id"].as_str().unwrap().to_string();
    let dead = until("their job to die", async || {
        let (_, job) = h
            .call("GET", &format!("/api/v1/jobs/{theirs}"), &h.other, None)
            .await;
        (job["status"] == "dead").then_some(job)
    })
    .await;
    assert_eq!(dead["status"], "dead");
    applied(
        &h,
        "reach",
        json!({"trigger": {"events": ["test.reach"]},
               "actions": [{"action": "retry_job", "job": theirs},
                           {"action": "retry_dead_jobs", "queue": "shared"},
                           {"action": "pause_queue", "queue": "shared"},
                           {"action": "resolve_incident", "incident": "1"},
                           {"action": "notify", "subscription": "sub_nope"}]}),
    )
    .await;
    settle().await;
    append(&h, "acme", "test.reach", json!({})).await;
    let taken = until("the rule's actions", async || {
        let taken = actions(&h, &h.admin, "reach").await;
        (taken.len() == 5).then_some(taken)
    })
    .await;
    let by_name = |name: &str| taken.iter().find(|a| a["action"] == name).unwrap().clone();
    let retry = by_name("retry_job");
    assert_eq!(retry["outcome"], "error");
    assert!(
        retry["message"].as_str().unwrap().contains("not found"),
        "{retry}"
    );
    assert_eq!(by_name("retry_dead_jobs")["detail"]["done"]["retried"], 0);
    assert_eq!(by_name("resolve_incident")["outcome"], "error");
    assert_eq!(by_name("notify")["outcome"], "error");
    // Their job is still dead, their queue running; ours is paused.
    let (_, job) = h
        .call("GET", &format!("/api/v1/jobs/{theirs}"), &h.other, None)
        .await;
    assert_eq!(job["status"], "dead", "{job}");
    let (_, queue) = h.call("GET", "/api/v1/queues/shared", &h.other, None).await;
    assert_eq!(queue["paused"], false, "{queue}");
    let (_, queue) = h.call("GET", "/api/v1/queues/shared", &h.admin, None).await;
    assert_eq!(queue["paused"], true, "{queue}");

    // Rules, actions and events of one tenant are not found by another.
    for (method, path) in [
        ("GET", "/api/v1/automation/rules/reach"),
        ("DELETE", "/api/v1/automation/rules/reach"),
        ("GET", "/api/v1/automation/rules/reach/actions"),
    ] {
        let (status, body) = h.call(method, path, &h.other, None).await;
        if status == StatusCode::OK {
            assert!(body["actions"].as_array().unwrap().is_empty(), "{body}");
        } else {
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        }
    }
    let (_, list) = h
        .call("GET", "/api/v1/automation/rules", &h.other, None)
        .await;
    assert!(list["rules"].as_array().unwrap().is_empty(), "{list}");
    let ours = taken[0]["event_id"].clone();
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/automation/dry-run",
            &h.other,
            Some(json!({"rule": {"trigger": {}, "actions": [{"action": "pause_queue", "queue": "q"}]}, "event_id": ours})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = h
        .call(
            "POST",
            "/api/v1/automation/dry-run",
            &h.other,
            Some(json!({"rule": "reach", "event": {"type": "test.reach"}})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Draining nodes is the deployment's alone.
    let drain = json!({"trigger": {"incident": "node_lost"},
                       "actions": [{"action": "drain_node", "node": "${event.data.fingerprint}"}]});
    let (status, body) = apply(&h, &h.admin, "drain", drain.clone()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("actions[0].action"),
        "{body}"
    );
    let (status, body) = apply(&h, &h.system, "drain", drain).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    h.stop().await;
}

async fn bad_rule_bodies_are_refused_naming_the_field(db: kiln_db::Db) {
    let h = harness(db).await;
    let good = json!({"trigger": {"events": ["job.dead"]}, "actions": [{"action": "pause_queue", "queue": "q"}]});
    let with = |key: &str, value: Value| {
        let mut body = good.clone();
        body[key] = value;
        body
    };
    for (body, field) in [
        (with("condition", json!("event.type ==")), "condition"),
        (
            with("actions", json!([{"action": "explode"}])),
            "actions[0].action",
        ),
        (
            with(
                "actions",
                json!([{"action": "retry_dead_jobs", "limit": 5000}]),
            ),
            "actions[0].limit",
        ),
        (
            with(
                "actions",
                json!([{"action": "pause_queue", "queue": "not a queue"}]),
            ),
            "actions[0].queue",
        ),
        (with("actions", json!([])), "actions"),
        (
            with("trigger", json!({"events": ["NOT OK"]})),
            "trigger.events",
        ),
        (with("cooldown_s", json!("soon")), "cooldown_s"),
        (with("max_per_hour", json!(0)), "max_per_hour"),
        (with("colour", json!("red")), "colour"),
        (
            with(
                "module",
                json!({"id": format!("sha256:{}", "0".repeat(64))}),
            ),
            "module",
        ),
        (
            json!({"trigger": {"events": ["job.dead"]}, "module": {"id": format!("sha256:{}", "0".repeat(64))}}),
            "module.id",
        ),
    ] {
        let (status, answer) = apply(&h, &h.admin, "bad", body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(error_code(&answer), "invalid");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{field}:")),
            "{body}: {message}"
        );
    }
    let (status, _) = apply(&h, &h.reader, "good", good.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = apply(&h, &h.admin, "bad%20name", good.clone()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // A good one goes in, reads back with its defaults, is replaced, goes.
    let (status, rule) = apply(&h, &h.admin, "good", good.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{rule}");
    assert_eq!(rule["cooldown_s"], 60);
    assert_eq!(rule["max_per_hour"], 10);
    let (status, rule) = apply(&h, &h.admin, "good", with("active", json!(false))).await;
    assert_eq!(status, StatusCode::OK, "{rule}");
    assert_eq!(rule["active"], false);
    let (status, _) = h
        .call("DELETE", "/api/v1/automation/rules/good", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = h
        .call("GET", "/api/v1/automation/rules/good", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    h.stop().await;
}

async fn detector_settings_are_the_tenants_own(db: kiln_db::Db) {
    let h = harness(db).await;
    let path = "/api/v1/incidents/detectors";
    let (status, shown) = h.call("GET", path, &h.reader, None).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["settings"]["failure_rate"]["ratio"], 0.5);
    assert_eq!(shown["settings"]["backlog_age"]["max_age_s"], 600);
    let (status, _) = h
        .call(
            "PUT",
            path,
            &h.reader,
            Some(json!({"backlog_age": {"enabled": false}})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for (patch, field) in [
        (
            json!({"backlog_age": {"max_age_s": 0}}),
            "backlog_age.max_age_s",
        ),
        (json!({"failure_rate": {"ratio": 2}}), "failure_rate.ratio"),
        (json!({"nope": {}}), "nope"),
        (
            json!({"node_lost": {"severity": "dire"}}),
            "node_lost.severity",
        ),
    ] {
        let (status, body) = h.call("PUT", path, &h.admin, Some(patch.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{patch}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{patch}: {body}"
        );
    }
    let (status, set) = h
        .call(
            "PUT",
            path,
            &h.admin,
            Some(json!({"dead_letter_burst": {"count": 1, "severity": "critical"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["settings"]["dead_letter_burst"]["count"], 1);
    assert_eq!(
        set["overrides"],
        json!({"dead_letter_burst": {"count": 1, "severity": "critical"}})
    );
    // The other tenant keeps the defaults.
    let (_, theirs) = h.call("GET", path, &h.other, None).await;
    assert_eq!(theirs["overrides"], json!({}));
    // One dead job is a burst for this tenant now, with its severity.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let job = h
        .submit(
            json!({"kind": "noop", "spec": {"exit_code": 3}, "queue": "one", "max_attempts": 1}),
        )
        .await;
    h.wait(job["id"].as_str().unwrap(), |j| j["status"] == "dead")
        .await;
    let incident = until("a one-job burst", async || {
        let (_, list) = h.call("GET", "/api/v1/incidents", &h.admin, None).await;
        list["incidents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["fingerprint"] == "dead_letter_burst:one")
            .cloned()
    })
    .await;
    assert_eq!(incident["severity"], "critical");
    // A field set back to null returns to the default.
    let (_, set) = h
        .call(
            "PUT",
            path,
            &h.admin,
            Some(json!({"dead_letter_burst": {"count": null, "severity": null}})),
        )
        .await;
    assert_eq!(set["overrides"], json!({}));
    assert_eq!(set["settings"]["dead_letter_burst"]["count"], 5);
    h.stop().await;
}

async fn incident_of(h: &Harness, fingerprint: &str, status: &str) -> Value {
    until(&format!("{fingerprint} {status}"), async || {
        let (_, list) = h.call("GET", "/api/v1/incidents", &h.admin, None).await;
        list["incidents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["fingerprint"] == fingerprint && i["status"] == status)
            .cloned()
    })
    .await
}

async fn a_stuck_backlog_and_a_failing_kind_open_incidents_that_clear(db: kiln_db::Db) {
    let h = harness(db).await;
    let (status, set) = h
        .call(
            "PUT",
            "/api/v1/incidents/detectors",
            &h.admin,
            Some(json!({"backlog_age": {"max_age_s": 1},
                        "failure_rate": {"min_ends": 2, "ratio": 0.5, "window_s": 2}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    // The detectors read settings every 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // A paused queue's job waits: its backlog ages past a second.
    let (status, _) = h
        .call("POST", "/api/v1/queues/stuck/pause", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let job = h.submit(json!({"kind": "noop", "queue": "stuck"})).await;
    let opened = incident_of(&h, "backlog_age:stuck", "open").await;
    assert_eq!(opened["kind"], "backlog_age");
    let (status, _) = h
        .call("POST", "/api/v1/queues/stuck/resume", &h.admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    h.wait(job["id"].as_str().unwrap(), |j| j["status"] == "succeeded")
        .await;
    let cleared = incident_of(&h, "backlog_age:stuck", "resolved").await;
    assert_eq!(cleared["resolved_by"], "automatic");

    // Two ends of a kind in a queue, both failed: over the ratio.
    for _ in 0..2 {
        let job = h
            .submit(json!({"kind": "noop", "spec": {"exit_code": 3}, "queue": "flaky", "max_attempts": 1}))
            .await;
        h.wait(job["id"].as_str().unwrap(), |j| j["status"] == "dead")
            .await;
    }
    let rate = incident_of(&h, "failure_rate:flaky:noop", "open").await;
    assert_eq!(rate["severity"], "medium");
    // Not seen again within its window: resolved by itself.
    let rate = incident_of(&h, "failure_rate:flaky:noop", "resolved").await;
    assert_eq!(rate["resolved_by"], "automatic");
    // Another tenant's settings are its own: nothing of this reached it.
    let (_, theirs) = h.call("GET", "/api/v1/incidents", &h.other, None).await;
    assert!(
        theirs["incidents"].as_array().unwrap().is_empty(),
        "{theirs}"
    );
    h.stop().await;
}
