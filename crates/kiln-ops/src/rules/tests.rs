use super::*;
use kiln_db::events::Resource;

fn event(kind: &str, resource: &str, data: Value) -> Event {
    let (rk, id) = resource.split_once(':').unwrap();
    Event {
        id: 42,
        time: 1_000,
        tenant: "acme".into(),
        kind: kind.into(),
        resource: Resource {
            kind: rk.into(),
            id: id.into(),
        },
        labels: BTreeMap::from([("team".to_string(), "etl".to_string())]),
        data,
    }
}

fn rule(body: Value) -> Rule {
    Rule::parse("r", &body).unwrap()
}

/// A body is refused naming `field`, or accepted.
fn check(body: Value, expect: Result<(), &str>) {
    match (Rule::parse("r", &body), expect) {
        (Ok(_), Ok(())) => {}
        (Err(e), Err(field)) => assert_eq!(e.field, field, "{body}: {e}"),
        (got, expect) => panic!("{body}: got {got:?}, expected {expect:?}"),
    }
}

#[test]
fn bodies_are_checked_and_errors_name_the_field() {
    let ok = json!({"trigger": {"events": ["job.dead"]}, "actions": [{"action": "pause_queue", "queue": "q"}]});
    check(ok.clone(), Ok(()));
    check(
        json!({"trigger": {"incident": "dead_letter_burst"}, "condition": "incident.fingerprint.endsWith(':etl')",
               "actions": [{"action": "retry_dead_jobs", "queue": "${event.data.queue}", "limit": 1000}],
               "cooldown_s": 0, "max_per_hour": 1000}),
        Ok(()),
    );
    check(
        json!({"trigger": {"events": ["job.*"]}, "module": {"id": format!("sha256:{}", "a".repeat(64))}}),
        Ok(()),
    );
    let with = |key: &str, value: Value| {
        let mut body = ok.clone();
        body[key] = value;
        body
    };
    check(with("condition", json!("event.type ==")), Err("condition"));
    check(with("condition", json!(3)), Err("condition"));
    check(
        with("actions", json!([{"action": "explode"}])),
        Err("actions[0].action"),
    );
    check(
        with("actions", json!([{"queue": "q"}])),
        Err("actions[0].action"),
    );
    check(
        with(
            "actions",
            json!([{"action": "pause_queue", "queue": "q", "x": 1}]),
        ),
        Err("actions[0]"),
    );
    check(
        with(
            "actions",
            json!([{"action": "pause_queue", "queue": "bad queue"}]),
        ),
        Err("actions[0].queue"),
    );
    check(
        with(
            "actions",
            json!([{"action": "pause_queue", "queue": "${event.("}]),
        ),
        Err("actions[0].queue"),
    );
    check(
        with(
            "actions",
            json!([{"action": "retry_dead_jobs", "limit": 1001}]),
        ),
        Err("actions[0].limit"),
    );
    check(
        with("actions", json!([{"action": "retry_job", "job": "abc"}])),
        Err("actions[0].job"),
    );
    check(
        with(
            "actions",
            json!([{"action": "set_queue_limit", "queue": "q", "limit": 0}]),
        ),
        Err("actions[0].limit"),
    );
    check(
        with(
            "actions",
            json!([{"action": "run_job", "job": {"kind": "noop", "oops": 1}}]),
        ),
        Err("actions[0]"),
    );
    check(with("actions", json!([])), Err("actions"));
    check(
        with(
            "actions",
            json!(vec![json!({"action": "pause_queue", "queue": "q"}); 17]),
        ),
        Err("actions"),
    );
    check(with("module", json!({"id": "sha256:x"})), Err("module"));
    check(json!({"trigger": {"events": ["job.dead"]}}), Err("actions"));
    check(
        json!({"trigger": {"events": ["job.dead"]}, "module": {"id": "nope"}}),
        Err("module.id"),
    );
    check(
        with("trigger", json!({"events": ["Bad Type"]})),
        Err("trigger.events"),
    );
    check(
        with("trigger", json!({"incident": "x", "events": []})),
        Err("trigger"),
    );
    check(with("trigger", json!({"when": 1})), Err("trigger.when"));
    check(with("trigger", json!("job.dead")), Err("trigger"));
    check(with("cooldown_s", json!(-1)), Err("cooldown_s"));
    check(
        with("cooldown_s", json!(COOLDOWN_S_MAX + 1)),
        Err("cooldown_s"),
    );
    check(with("max_per_hour", json!(0)), Err("max_per_hour"));
    check(with("name", json!("other")), Err("name"));
    check(with("colour", json!("red")), Err("colour"));
    check(json!([1]), Err("rule"));
}

#[test]
fn drain_node_is_the_deployments_alone() {
    let r = rule(
        json!({"trigger": {"events": ["node.lost"]}, "actions": [{"action": "drain_node", "node": "${event.resource.id}"}]}),
    );
    assert_eq!(
        r.check_for_tenant(false).unwrap_err().field,
        "actions[0].action"
    );
    assert!(r.check_for_tenant(true).is_ok());
}

#[test]
fn events_fire_rules_by_trigger_and_condition() {
    let dead = event("job.dead", "job:7", json!({"queue": "etl", "kind": "noop"}));
    let opened = event(
        "incident.opened",
        "incident:3",
        json!({"kind": "dead_letter_burst", "fingerprint": "dead_letter_burst:etl", "severity": "high"}),
    );
    let actions = json!([{"action": "pause_queue", "queue": "q"}]);
    for (body, event, fires) in [
        (json!({"trigger": {"events": ["job.dead"]}}), &dead, true),
        (json!({"trigger": {"events": ["job.*"]}}), &dead, true),
        (json!({"trigger": {}}), &dead, true),
        (json!({"trigger": {"events": ["job.failed"]}}), &dead, false),
        (
            json!({"trigger": {"events": ["job.*"], "labels": {"team": "etl"}}}),
            &dead,
            true,
        ),
        (
            json!({"trigger": {"events": ["job.*"], "labels": {"team": "web"}}}),
            &dead,
            false,
        ),
        (
            json!({"trigger": {"events": ["job.dead"]}, "condition": "event.data.queue == 'etl'"}),
            &dead,
            true,
        ),
        (
            json!({"trigger": {"events": ["job.dead"]}, "condition": "event.data.queue == 'web'"}),
            &dead,
            false,
        ),
        // A condition that cannot be decided does not fire.
        (
            json!({"trigger": {"events": ["job.dead"]}, "condition": "event.data.queue"}),
            &dead,
            false,
        ),
        (
            json!({"trigger": {"events": ["job.dead"]}, "active": false}),
            &dead,
            false,
        ),
        (
            json!({"trigger": {"incident": "dead_letter_burst"}}),
            &opened,
            true,
        ),
        (
            json!({"trigger": {"incident": "node_lost"}}),
            &opened,
            false,
        ),
        (
            json!({"trigger": {"incident": "dead_letter_burst"}, "condition": "incident.fingerprint.endsWith(':etl')"}),
            &opened,
            true,
        ),
        (
            json!({"trigger": {"incident": "dead_letter_burst"}}),
            &dead,
            false,
        ),
    ] {
        let mut body = body;
        body["actions"] = actions.clone();
        let evaluation = evaluate(&rule(body.clone()), event);
        assert_eq!(evaluation.fires, fires, "{body} on {}", event.kind);
    }
    // Rules never feed on their own events.
    let fired = event("rule.fired", "rule:r", json!({}));
    let all = rule(json!({"trigger": {}, "actions": actions}));
    assert!(!evaluate(&all, &fired).fires);
}

#[test]
fn a_condition_records_what_it_read() {
    let r = rule(
        json!({"trigger": {"events": ["job.dead"]}, "condition": "event.data.queue == 'etl' && event.data.attempt > 2",
                        "actions": [{"action": "pause_queue", "queue": "q"}]}),
    );
    let e = event("job.dead", "job:7", json!({"queue": "etl", "attempt": 3}));
    let evaluation = evaluate(&r, &e);
    assert_eq!(evaluation.condition, Some(true));
    assert_eq!(evaluation.bindings["event.data.queue"], json!("etl"));
    assert_eq!(evaluation.bindings["event.data.attempt"], json!(3));
}

#[test]
fn the_throttle_holds_by_cooldown_then_by_the_hourly_cap() {
    let state = |last: Option<Millis>, fires: i64| Throttle {
        last_fired_at: last,
        fires_last_hour: fires,
    };
    for (state, now, cooldown_s, cap, expect) in [
        (state(None, 0), 0, 60, 10, Ok(())),
        (
            state(Some(0), 1),
            59_999,
            60,
            10,
            Err(Held::Cooldown { remaining_ms: 1 }),
        ),
        (state(Some(0), 1), 60_000, 60, 10, Ok(())),
        (
            state(Some(0), 10),
            60_000,
            60,
            10,
            Err(Held::HourlyCap {
                fires_last_hour: 10,
            }),
        ),
        (state(Some(0), 9), 60_000, 60, 10, Ok(())),
        (state(Some(5), 4), 5, 0, 5, Ok(())),
        (
            state(Some(5), 5),
            5,
            0,
            5,
            Err(Held::HourlyCap { fires_last_hour: 5 }),
        ),
    ] {
        assert_eq!(
            throttle(&state, now, cooldown_s, cap),
            expect,
            "{state:?} at {now}"
        );
    }
}

#[test]
fn actions_render_their_templates_and_are_checked_again() {
    let e = event("job.dead", "job:7", json!({"queue": "etl", "kind": "noop"}));
    let planned = plan(
        &[
            json!({"action": "retry_job", "job": "${event.resource.id}"}),
            json!({"action": "pause_queue", "queue": "${event.data.queue}-hold"}),
            json!({"action": "pause_queue", "queue": "${event.data.missing}"}),
            json!({"action": "run_pipeline", "pipeline": "fix", "params": {"queue": "${event.data.queue}", "n": "${event.id}"}}),
            json!({"action": "nope"}),
        ],
        &e,
    );
    assert_eq!(planned[0].action, Ok(Action::RetryJob { job: "7".into() }));
    assert_eq!(
        planned[1].action,
        Ok(Action::PauseQueue {
            queue: "etl-hold".into()
        })
    );
    assert!(
        planned[2]
            .action
            .as_ref()
            .unwrap_err()
            .contains("actions[2]"),
        "{:?}",
        planned[2]
    );
    match &planned[3].action {
        Ok(Action::RunPipeline { params, .. }) => {
            assert_eq!(params["queue"], json!("etl"));
            assert_eq!(params["n"], json!(42));
        }
        other => panic!("{other:?}"),
    }
    assert!(planned[4].action.is_err());
    assert_eq!(planned[4].name, "nope");
}

#[test]
fn module_output_is_a_list_of_actions_with_an_optional_note() {
    for (stdout, expect) in [
        (
            r#"{"actions": [{"action": "pause_queue", "queue": "q"}]}"#,
            Ok(1),
        ),
        (r#"[{"action": "pause_queue", "queue": "q"}]"#, Ok(1)),
        (r#"{"actions": [], "note": {"seen": 1}}"#, Ok(0)),
        (r#"{}"#, Ok(0)),
        ("not json", Err("no JSON")),
        (r#"{"actions": 3}"#, Err("must be a list")),
        (r#"{"acts": []}"#, Err("unknown field")),
        ("7", Err("must print")),
    ] {
        match (module_actions(stdout), expect) {
            (Ok((actions, _)), Ok(n)) => assert_eq!(actions.len(), n, "{stdout}"),
            (Err(e), Err(part)) => assert!(e.contains(part), "{stdout}: {e}"),
            (got, expect) => panic!("{stdout}: {got:?} vs {expect:?}"),
        }
    }
    let many = serde_json::to_string(&vec![
        json!({"action": "pause_queue", "queue": "q"});
        ACTIONS_MAX + 1
    ])
    .unwrap();
    assert!(module_actions(&many).is_err());
}

#[test]
fn a_rule_reads_back_as_it_was_written_with_its_defaults() {
    let body = json!({"trigger": {"events": ["job.*", "run.failed"]}, "actions": [{"action": "pause_queue", "queue": "q"}]});
    let r = rule(body);
    let shown = r.to_json();
    assert_eq!(shown["trigger"]["events"], json!(["job.*", "run.failed"]));
    assert_eq!(shown["cooldown_s"], json!(60));
    assert_eq!(shown["max_per_hour"], json!(10));
    assert_eq!(Rule::parse("r", &shown).unwrap(), r);
}
