//! Pipelines and schedules in the store, on SQLite and PostgreSQL. A test
//! plays the worker: it leases `noop` jobs and ends each as its spec says
//! (through the same `decide_outcome` a worker uses), and advances runs the
//! way the advancer does, until nothing is left to do.

use std::collections::BTreeMap;

use kiln_core::{
    decide_outcome, AttemptEnd, AttemptRecord, JobKinds, JobResult, JobStatus, Outcome,
};
use kiln_db::flow::{FlowError, NewRun, RunFilter, RunView};
use kiln_db::{Completion, Db};
use kiln_flow::schedule::CronSpec;
use kiln_flow::target::ScheduleDef;
use kiln_flow::{PipelineDef, RunStatus, StepStatus};
use serde_json::{json, Value};

const T0: i64 = 1_700_000_000_000;

kiln_db::on_both_databases!(
    a_retried_step_moves_its_run_only_at_its_end,
    a_chain_passes_outputs_down,
    a_diamond_joins,
    fan_out_and_fan_in_of_a_thousand,
    failure_skips_dependants_and_runs_cleanup,
    retry_runs_only_what_failed,
    cancel_stops_running_and_pending_steps,
    approvals_wait_for_a_decision_or_the_deadline,
    a_gate_stops_the_run_with_its_values,
    runs_pin_their_version_and_keys_are_idempotent,
    run_concurrency_queues_runs,
    hundreds_of_runs_advance_exactly_once,
    bad_params_and_failed_renders_are_clear,
    schedules_fire_once_per_tick,
    schedules_catch_up_by_policy,
    schedules_follow_dst,
    schedules_skip_overlaps,
    step_ends_advance_their_runs_inline,
    handed_off_steps_wait_behind_older_work,
    a_stale_end_leaves_the_outbox_to_the_advancer,
    steps_taken_inline_count_and_tell_as_leased_ones,
);

/// A schema of its own on PostgreSQL, for a test of what only PostgreSQL
/// does (locks another connection holds, a connection the server ends):
/// the database, its URL and the schema's name.
async fn postgres_only() -> (Db, String, String) {
    let schema = kiln_db::testing::unique_name("kiln_test");
    let url = kiln_db::testing::postgres_url();
    let db = Db::connect_postgres_schema(&url, &schema).await.unwrap();
    (db, url, schema)
}

async fn postgres_done(db: Db, url: &str, schema: &str) {
    db.close().await;
    kiln_db::testing::drop_postgres_schema(url, schema)
        .await
        .ok();
}

fn kinds() -> JobKinds {
    fn noop(spec: &Value) -> Result<(), String> {
        let map = spec.as_object().ok_or("spec must be an object")?;
        for (key, value) in map {
            match key.as_str() {
                "exit_code" | "sleep_ms" if value.is_i64() => {}
                "stdout" if value.is_string() => {}
                other => return Err(format!("bad field {other}")),
            }
        }
        Ok(())
    }
    let mut kinds = JobKinds::new();
    kinds.add("noop", noop);
    kinds
}

async fn apply(db: &Db, def: Value) {
    let checked = PipelineDef::from_json(def, &kinds()).expect("a valid definition");
    db.pipeline_put("acme", &checked.def, T0).await.unwrap();
}

fn new_run(pipeline: &str, params: Value) -> NewRun {
    NewRun {
        tenant: "acme".into(),
        pipeline: pipeline.into(),
        params: params.as_object().cloned().unwrap_or_default(),
        labels: BTreeMap::new(),
        idempotency_key: None,
        trigger: "api".into(),
    }
}

async fn start(db: &Db, pipeline: &str, params: Value) -> RunView {
    db.run_create(&new_run(pipeline, params), &kinds(), T0)
        .await
        .unwrap()
        .expect("the run starts")
        .0
}

/// Leases every ready `noop` job and ends it as its spec says; advances
/// runs; until neither has anything left.
async fn drain(db: &Db, now: i64) {
    for _ in 0..10_000 {
        let jobs = db
            .job_lease("w1", &["noop".to_string()], 1000, 60_000, now)
            .await
            .unwrap();
        let done: Vec<Completion> = jobs.iter().map(|job| end_of(job, now)).collect();
        db.job_complete_many(&done).await.unwrap();
        let advanced = db.flow_advance(&kinds(), now).await.unwrap();
        if jobs.is_empty() && advanced == 0 {
            return;
        }
    }
    panic!("the runs never settled");
}

/// Ends `done` as a worker that runs pipeline steps does: their runs
/// advance in the same transaction, and up to `take` of the jobs that makes
/// are leased to `w1`.
async fn end_taking(
    db: &Db,
    done: &[Completion],
    take: i64,
    now: i64,
) -> kiln_db::DbResult<(kiln_db::Completed, Vec<kiln_core::LeasedJob>)> {
    let handled = ["noop".to_string()];
    let request = kiln_db::LeaseRequest {
        worker_id: "w1",
        kinds: &handled,
        limit: take,
        lease_ms: 60_000,
        now,
        tenant_running_max: None,
    };
    db.job_complete_advancing(done, &kinds(), Some(&request), now)
        .await
}

/// [`drain`] as a worker that runs pipeline steps does it: each batch of
/// ends advances its runs in its own transaction and takes up to `take`
/// next steps at once; the advancer never runs. Returns how many jobs were
/// taken that way.
async fn drain_inline(db: &Db, now: i64, take: i64) -> usize {
    let handled = ["noop".to_string()];
    let mut handed: Vec<kiln_core::LeasedJob> = Vec::new();
    let mut taken = 0;
    for _ in 0..10_000 {
        let mut jobs = std::mem::take(&mut handed);
        jobs.extend(
            db.job_lease("w1", &handled, 1000, 60_000, now)
                .await
                .unwrap(),
        );
        if jobs.is_empty() {
            return taken;
        }
        let done: Vec<Completion> = jobs.iter().map(|job| end_of(job, now)).collect();
        let (completed, next) = end_taking(db, &done, take, now).await.unwrap();
        assert_eq!(completed.applied.len(), done.len());
        assert!(next.len() as i64 <= take);
        assert!(next.iter().all(|j| j.run_id.is_some() && j.attempt == 1));
        taken += next.len();
        handed = next;
    }
    panic!("the runs never settled");
}

/// A `noop` job's end as its spec says, decided as a worker decides it.
fn end_of(job: &kiln_core::LeasedJob, now: i64) -> Completion {
    let exit_code = job.spec["exit_code"].as_i64().unwrap_or(0) as i32;
    let result = JobResult {
        exit_code,
        stdout: job.spec["stdout"].as_str().unwrap_or("").to_string(),
        ..JobResult::default()
    };
    let end = if exit_code == 0 {
        AttemptEnd::Succeeded(result.clone())
    } else {
        AttemptEnd::Failed {
            result: Some(result.clone()),
            error: format!("exit {exit_code}"),
            permanent: false,
        }
    };
    let (status, run_at) = match decide_outcome(job, &end, now, 0.0) {
        Outcome::Succeeded => (JobStatus::Succeeded, None),
        Outcome::Retry { run_at } => (JobStatus::Scheduled, Some(run_at)),
        Outcome::Failed => (JobStatus::Failed, None),
        Outcome::Dead => (JobStatus::Dead, None),
        Outcome::Cancelled => (JobStatus::Cancelled, None),
    };
    Completion {
        id: job.id,
        attempt: job.attempt,
        status,
        run_at,
        result: Some(result),
        error: (exit_code != 0).then(|| format!("exit {exit_code}")),
        record: AttemptRecord {
            attempt: job.attempt,
            worker_id: Some("w1".into()),
            started_at: Some(now),
            finished_at: now,
            outcome: if exit_code == 0 {
                "succeeded"
            } else {
                "failed"
            }
            .into(),
            exit_code: Some(exit_code),
            error: None,
            duration_ms: Some(0),
        },
    }
}

async fn get(db: &Db, id: i64) -> RunView {
    db.run_get("acme", id)
        .await
        .unwrap()
        .expect("the run exists")
}

fn step_status(run: &RunView, step: &str) -> StepStatus {
    run.steps
        .iter()
        .find(|s| s.step.step == step)
        .unwrap_or_else(|| panic!("no step {step}"))
        .step
        .status
}

fn statuses(run: &RunView) -> BTreeMap<String, StepStatus> {
    run.steps
        .iter()
        .map(|s| (s.step.step.clone(), s.step.status))
        .collect()
}

async fn job_spec(db: &Db, run: &RunView, step: &str) -> Value {
    let id = run
        .steps
        .iter()
        .find(|s| s.step.step == step)
        .and_then(|s| s.instances.first())
        .and_then(|i| i.job_id)
        .expect("the step has a job");
    db.job_get("acme", id).await.unwrap().unwrap().spec
}

async fn a_chain_passes_outputs_down(db: Db) {
    apply(
        &db,
        json!({"name": "chain", "params": [{"name": "who", "type": "string", "default": "world"}],
        "steps": [
            {"id": "a", "kind": "noop", "spec": {"stdout": "{\"n\": 41, \"tags\": [\"x\", \"y\"]}"}},
            {"id": "b", "kind": "noop", "depends_on": ["a"],
             "spec": {"stdout": "hello ${params.who} ${steps.a.output.n + 1} ${steps.a.output.tags[1]} run ${run.id}"}},
            {"id": "c", "kind": "noop", "depends_on": ["b"], "spec": {"stdout": "${steps.b.stdout}", "exit_code": "${steps.a.exit_code}"}},
        ]}),
    )
    .await;
    let run = start(&db, "chain", json!({})).await;
    assert_eq!(run.run.status, RunStatus::Running);
    assert_eq!(step_status(&run, "a"), StepStatus::Running);
    assert_eq!(step_status(&run, "b"), StepStatus::Pending);
    drain(&db, T0 + 1).await;
    let run = get(&db, run.run.id).await;
    assert_eq!(run.run.status, RunStatus::Succeeded, "{:?}", run.run.reason);
    let expected = format!("hello world 42 y run {}", run.run.id);
    assert_eq!(job_spec(&db, &run, "b").await["stdout"], json!(expected));
    assert_eq!(
        job_spec(&db, &run, "c").await,
        json!({"stdout": expected, "exit_code": 0})
    );
    assert!(run.run.finished_at.is_some());
}

async fn a_diamond_joins(db: Db) {
    apply(
        &db,
        json!({"name": "diamond", "steps": [
            {"id": "a", "kind": "noop"},
            {"id": "b", "kind": "noop", "depends_on": ["a"], "spec": {"stdout": "b"}},
            {"id": "c", "kind": "noop", "depends_on": ["a"], "spec": {"stdout": "c"}},
            {"id": "d", "kind": "noop", "depends_on": ["b", "c"], "spec": {"stdout": "${steps.b.stdout}${steps.c.stdout}"}},
        ]}),
    )
    .await;
    let run = start(&db, "diamond", json!({})).await;
    drain(&db, T0 + 1).await;
    let run = get(&db, run.run.id).await;
    assert_eq!(run.run.status, RunStatus::Succeeded);
    assert_eq!(job_spec(&db, &run, "d").await["stdout"], json!("bc"));
    // d started only after both b and c had ended.
    let ended = |s: &str| {
        run.steps
            .iter()
            .find(|x| x.step.step == s)
            .unwrap()
            .step
            .finished_at
            .unwrap()
    };
    let d_started = run.steps[3].step.started_at.unwrap();
    assert!(d_started >= ended("b") && d_started >= ended("c"));
}

async fn fan_out_and_fan_in_of_a_thousand(db: Db) {
    let items: Vec<i64> = (0..1000).collect();
    apply(
        &db,
        json!({"name": "fan", "params": [{"name": "items", "type": "list"}], "steps": [
            {"id": "each", "kind": "noop", "for_each": "${params.items}",
             "spec": {"stdout": "{\"i\": ${item}, \"at\": ${item_index}}"}},
            {"id": "sum", "kind": "gate", "depends_on": ["each"],
             "condition": "size(steps.each.output) == 1000 && steps.each.output[999].i == 999 && steps.each.items[5] == 5"},
            {"id": "after", "kind": "noop", "depends_on": ["sum"]},
        ]}),
    )
    .await;
    let run = start(&db, "fan", json!({ "items": items })).await;
    let each = &run.steps[0];
    assert_eq!(each.step.total, 1000);
    assert_eq!(each.instances.len(), 1000);
    drain(&db, T0 + 1).await;
    let run = get(&db, run.run.id).await;
    assert_eq!(
        run.run.status,
        RunStatus::Succeeded,
        "{:?}",
        run.steps[1].step.detail
    );
    assert_eq!(run.steps[0].step.succeeded, 1000);
    assert_eq!(step_status(&run, "sum"), StepStatus::Succeeded);
    assert_eq!(
        run.steps[1].step.detail.as_ref().unwrap()["result"],
        json!(true)
    );
    // One job per instance, no more.
    let jobs = db
        .job_list(
            "acme",
            &kiln_db::JobFilter {
                label: Some(("kiln.step".into(), "each".into())),
                limit: 2000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1000);
}

async fn failure_skips_dependants_and_runs_cleanup(db: Db) {
    apply(
        &db,
        json!({"name": "f", "steps": [
            {"id": "build", "kind": "noop", "spec": {"exit_code": 2}},
            {"id": "test", "kind": "noop", "depends_on": ["build"]},
            {"id": "deploy", "kind": "noop", "depends_on": ["test"]},
            {"id": "report", "kind": "noop", "depends_on": ["build"], "when": "failure",
             "spec": {"stdout": "build exited ${steps.build.exit_code}"}},
            {"id": "cleanup", "kind": "noop", "depends_on": ["deploy"], "when": "always"},
        ]}),
    )
    .await;
    let run = start(&db, "f", json!({})).await;
    drain(&db, T0 + 1).await;
    let run = get(&db, run.run.id).await;
    assert_eq!(run.run.status, RunStatus::Failed);
    assert_eq!(
        statuses(&run),
        BTreeMap::from([
            ("build".into(), StepStatus::Failed),
            ("test".into(), StepStatus::Skipped),
            ("deploy".into(), StepStatus::Skipped),
            ("report".into(), StepStatus::Succeeded),
            ("cleanup".into(), StepStatus::Succeeded),
        ])
    );
    assert_eq!(
        job_spec(&db, &run, "report").await["stdout"],
        json!("build exited 2")
    );
    assert!(run.run.reason.as_deref().unwrap().contains("build"));
}

async fn retry_runs_only_what_failed(db: Db) {
    // `flaky` fails on the run's first attempt and succeeds on the second;
    // `each` fails only its item 2 on the first attempt.
    apply(
        &db,
        json!({"name": "r", "steps": [
            {"id": "ok", "kind": "noop"},
            {"id": "flaky", "kind": "noop", "depends_on": ["ok"], "spec": {"exit_code": "${run.attempt == 1 ? 1 : 0}"},
             "retry": {"max_attempts": 2, "backoff": {"base_ms": 0, "max_ms": 0, "jitter": false}}},
            {"id": "each", "kind": "noop", "depends_on": ["ok"], "for_each": "${[1, 2, 3]}",
             "spec": {"exit_code": "${item == 2 && run.attempt == 1 ? 3 : 0}"}},
            {"id": "last", "kind": "noop", "depends_on": ["flaky", "each"]},
        ]}),
    )
    .await;
    let run = start(&db, "r", json!({})).await;
    drain(&db, T0 + 1).await;
    let first = get(&db, run.run.id).await;
    assert_eq!(first.run.status, RunStatus::Failed);
    assert_eq!(step_status(&first, "flaky"), StepStatus::Failed);
    assert_eq!(step_status(&first, "last"), StepStatus::Skipped);
    let each = first.steps.iter().find(|s| s.step.step == "each").unwrap();
    assert_eq!((each.step.succeeded, each.step.failed), (2, 1));
    let ok_job = first.steps[0].instances[0].job_id;
    let each_jobs: Vec<Option<i64>> = each.instances.iter().map(|i| i.job_id).collect();
    // The flaky step used both of its attempts on one job.
    let flaky_job = first.steps[1].instances[0].job_id.unwrap();
    assert_eq!(
        db.job_get("acme", flaky_job)
            .await
            .unwrap()
            .unwrap()
            .attempt,
        2
    );

    let retried = db
        .run_retry("acme", run.run.id, &kinds(), T0 + 2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retried.run.attempt, 2);
    drain(&db, T0 + 3).await;
    let second = get(&db, run.run.id).await;
    assert_eq!(
        second.run.status,
        RunStatus::Succeeded,
        "{:?}",
        second.run.reason
    );
    assert_eq!(
        second.steps[0].instances[0].job_id, ok_job,
        "succeeded steps are not re-run"
    );
    let each = second.steps.iter().find(|s| s.step.step == "each").unwrap();
    let now_jobs: Vec<Option<i64>> = each.instances.iter().map(|i| i.job_id).collect();
    assert_eq!(now_jobs[0], each_jobs[0]);
    assert_eq!(now_jobs[2], each_jobs[2]);
    assert_ne!(
        now_jobs[1], each_jobs[1],
        "only the failed instance ran again"
    );
    assert_eq!(each.instances[1].attempt, 2);
    // Retrying a run that succeeded is refused.
    assert!(matches!(
        db.run_retry("acme", run.run.id, &kinds(), T0 + 4)
            .await
            .unwrap(),
        Err(FlowError::Conflict(_))
    ));
}

async fn cancel_stops_running_and_pending_steps(db: Db) {
    apply(
        &db,
        json!({"name": "c", "steps": [
            {"id": "slow", "kind": "noop", "spec": {"sleep_ms": 100000}},
            {"id": "queued", "kind": "noop"},
            {"id": "next", "kind": "noop", "depends_on": ["slow"]},
            {"id": "cleanup", "kind": "noop", "depends_on": ["slow"], "when": "always"},
        ]}),
    )
    .await;
    let run = start(&db, "c", json!({})).await;
    // `slow` is leased (running); `queued` stays in the queue.
    let leased = db
        .job_lease("w1", &["noop".to_string()], 1, 60_000, T0 + 1)
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    let view = db
        .run_cancel("acme", run.run.id, T0 + 2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        view.run.status,
        RunStatus::Running,
        "the running job has not ended yet"
    );
    let slow = db.job_get("acme", leased[0].id).await.unwrap().unwrap();
    assert!(slow.cancel_requested || slow.status == JobStatus::Cancelled);
    // The worker notices and ends the attempt cancelled.
    db.job_complete_many(&[Completion {
        id: leased[0].id,
        attempt: 1,
        status: JobStatus::Cancelled,
        run_at: None,
        result: None,
        error: Some("cancelled".into()),
        record: AttemptRecord {
            attempt: 1,
            worker_id: Some("w1".into()),
            started_at: Some(T0 + 1),
            finished_at: T0 + 3,
            outcome: "cancelled".into(),
            exit_code: None,
            error: None,
            duration_ms: Some(2),
        },
    }])
    .await
    .unwrap();
    drain(&db, T0 + 4).await;
    let run = get(&db, run.run.id).await;
    assert_eq!(run.run.status, RunStatus::Cancelled);
    let s = statuses(&run);
    assert_eq!(s["slow"], StepStatus::Cancelled);
    assert_eq!(s["queued"], StepStatus::Cancelled);
    assert_eq!(s["next"], StepStatus::Skipped);
    assert_eq!(s["cleanup"], StepStatus::Skipped);
    assert!(matches!(
        db.run_cancel("acme", run.run.id, T0 + 5).await.unwrap(),
        Err(FlowError::Conflict(_))
    ));
}

async fn approvals_wait_for_a_decision_or_the_deadline(db: Db) {
    apply(
        &db,
        json!({"name": "ap", "steps": [
            {"id": "build", "kind": "noop"},
            {"id": "ok", "kind": "approval", "depends_on": ["build"], "approval": {"deadline_s": 60}},
            {"id": "release", "kind": "noop", "depends_on": ["ok"]},
        ]}),
    )
    .await;
    let kinds = kinds();
    // Approved.
    let a = start(&db, "ap", json!({})).await;
    drain(&db, T0 + 1).await;
    let waiting = get(&db, a.run.id).await;
    assert_eq!(step_status(&waiting, "ok"), StepStatus::Waiting);
    assert_eq!(waiting.steps[1].step.deadline_at, Some(T0 + 1 + 60_000));
    assert!(matches!(
        db.run_decide("acme", a.run.id, "build", true, "k1", None, &kinds, T0 + 2)
            .await
            .unwrap(),
        Err(FlowError::Conflict(_))
    ));
    let view = db
        .run_decide(
            "acme",
            a.run.id,
            "ok",
            true,
            "key:ops",
            Some("looks good"),
            &kinds,
            T0 + 2,
        )
        .await
        .unwrap()
        .unwrap();
    let detail = view.steps[1].step.detail.clone().unwrap();
    assert_eq!(detail["by"], json!("key:ops"));
    assert_eq!(detail["comment"], json!("looks good"));
    drain(&db, T0 + 3).await;
    assert_eq!(get(&db, a.run.id).await.run.status, RunStatus::Succeeded);
    // Rejected.
    let b = start(&db, "ap", json!({})).await;
    drain(&db, T0 + 1).await;
    db.run_decide(
        "acme",
        b.run.id,
        "ok",
        false,
        "key:ops",
        Some("no"),
        &kinds,
        T0 + 2,
    )
    .await
    .unwrap()
    .unwrap();
    drain(&db, T0 + 3).await;
    let b = get(&db, b.run.id).await;
    assert_eq!(b.run.status, RunStatus::Failed);
    assert_eq!(step_status(&b, "release"), StepStatus::Skipped);
    assert!(b.run.reason.as_deref().unwrap().contains("rejected"));
    // Past the deadline.
    let c = start(&db, "ap", json!({})).await;
    drain(&db, T0 + 1).await;
    assert_eq!(
        db.flow_expire_approvals(&kinds, T0 + 30_000).await.unwrap(),
        0
    );
    assert_eq!(
        db.flow_expire_approvals(&kinds, T0 + 61_002).await.unwrap(),
        1
    );
    let c = get(&db, c.run.id).await;
    assert_eq!(c.run.status, RunStatus::Failed);
    assert_eq!(
        c.steps[1].step.detail.as_ref().unwrap()["by"],
        json!("deadline")
    );
}

async fn a_gate_stops_the_run_with_its_values(db: Db) {
    apply(
        &db,
        json!({"name": "g", "params": [{"name": "max", "type": "int", "default": 0}], "steps": [
            {"id": "scan", "kind": "noop", "spec": {"stdout": "{\"critical\": 2}"}},
            {"id": "other", "kind": "noop", "spec": {"sleep_ms": 1}},
            {"id": "safety", "kind": "gate", "depends_on": ["scan"],
             "condition": "steps.scan.output.critical <= params.max"},
            {"id": "publish", "kind": "noop", "depends_on": ["safety", "other"]},
            {"id": "notify", "kind": "noop", "depends_on": ["safety"], "when": "failure"},
        ]}),
    )
    .await;
    let run = start(&db, "g", json!({})).await;
    drain(&db, T0 + 1).await;
    let run = get(&db, run.run.id).await;
    assert_eq!(run.run.status, RunStatus::Failed);
    assert_eq!(run.run.reason.as_deref(), Some("policy"));
    let gate = run.run.detail.as_ref().unwrap();
    assert_eq!(gate["step"], json!("safety"));
    assert_eq!(
        gate["gate"]["values"]["steps.scan.output.critical"],
        json!(2)
    );
    assert_eq!(gate["gate"]["values"]["params.max"], json!(0));
    assert_eq!(step_status(&run, "publish"), StepStatus::Skipped);
    assert_eq!(step_status(&run, "notify"), StepStatus::Succeeded);
    // The same pipeline with a higher bar passes.
    let run = start(&db, "g", json!({"max": 5})).await;
    drain(&db, T0 + 1).await;
    assert_eq!(get(&db, run.run.id).await.run.status, RunStatus::Succeeded);
}

async fn runs_pin_their_version_and_keys_are_idempotent(db: Db) {
    apply(
        &db,
        json!({"name": "v", "steps": [{"id": "a", "kind": "noop", "spec": {"stdout": "one"}}]}),
    )
    .await;
    let mut keyed = new_run("v", json!({}));
    keyed.idempotency_key = Some("k-1".into());
    let (first, fresh) = db.run_create(&keyed, &kinds(), T0).await.unwrap().unwrap();
    assert!(fresh);
    apply(
        &db,
        json!({"name": "v", "steps": [{"id": "a", "kind": "noop", "spec": {"stdout": "two"}}]}),
    )
    .await;
    let (again, fresh) = db.run_create(&keyed, &kinds(), T0).await.unwrap().unwrap();
    assert!(!fresh);
    assert_eq!(again.run.id, first.run.id);
    let second = start(&db, "v", json!({})).await;
    assert_eq!((first.run.version, second.run.version), (1, 2));
    drain(&db, T0 + 1).await;
    assert_eq!(
        job_spec(&db, &get(&db, first.run.id).await, "a").await["stdout"],
        json!("one")
    );
    assert_eq!(
        job_spec(&db, &get(&db, second.run.id).await, "a").await["stdout"],
        json!("two")
    );
    let versions = db.pipeline_versions("acme", "v").await.unwrap();
    assert_eq!(versions.iter().map(|v| v.0).collect::<Vec<_>>(), vec![1, 2]);
    assert!(db
        .pipeline_get("acme", "v", Some(1))
        .await
        .unwrap()
        .is_some());
    // Deleted: no new runs, but old runs still show their version.
    assert!(db.pipeline_delete("acme", "v").await.unwrap());
    assert!(db.pipeline_list("acme").await.unwrap().is_empty());
    assert!(matches!(
        db.run_create(&new_run("v", json!({})), &kinds(), T0)
            .await
            .unwrap(),
        Err(FlowError::NotFound("pipeline"))
    ));
    assert!(db.run_get("acme", first.run.id).await.unwrap().is_some());
    // Another tenant sees nothing.
    assert!(db.run_get("globex", first.run.id).await.unwrap().is_none());
    assert!(db
        .run_list(
            "globex",
            &RunFilter {
                limit: 10,
                ..Default::default()
            }
        )
        .await
        .unwrap()
        .is_empty());
}

async fn run_concurrency_queues_runs(db: Db) {
    apply(
        &db,
        json!({"name": "one", "concurrency": 1, "steps": [{"id": "a", "kind": "noop"}]}),
    )
    .await;
    let a = start(&db, "one", json!({})).await;
    let b = start(&db, "one", json!({})).await;
    assert_eq!(a.run.status, RunStatus::Running);
    assert_eq!(b.run.status, RunStatus::Queued);
    assert!(b.steps[0].instances.is_empty());
    drain(&db, T0 + 1).await;
    assert_eq!(get(&db, a.run.id).await.run.status, RunStatus::Succeeded);
    assert_eq!(get(&db, b.run.id).await.run.status, RunStatus::Succeeded);
    let listed = db
        .run_list(
            "acme",
            &RunFilter {
                pipeline: Some("one".into()),
                status: Some(RunStatus::Succeeded),
                limit: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, b.run.id, "newest first");
    let older = db
        .run_list(
            "acme",
            &RunFilter {
                before_id: Some(b.run.id),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        older.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![a.run.id]
    );
}

async fn hundreds_of_runs_advance_exactly_once(db: Db) {
    apply(
        &db,
        json!({"name": "d", "steps": [
            {"id": "a", "kind": "noop"},
            {"id": "b", "kind": "noop", "depends_on": ["a"]},
            {"id": "c", "kind": "noop", "depends_on": ["a"]},
            {"id": "d", "kind": "noop", "depends_on": ["b", "c"]},
        ]}),
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..200 {
        ids.push(start(&db, "d", json!({})).await.run.id);
    }
    // Four workers and four advancers at once.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move { drain(&db, T0 + 1).await }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drain(&db, T0 + 1).await;
    for id in &ids {
        let run = get(&db, *id).await;
        assert_eq!(run.run.status, RunStatus::Succeeded, "run {id}");
        for step in &run.steps {
            assert_eq!(step.instances.len(), 1);
        }
    }
    let jobs = db
        .job_list(
            "acme",
            &kiln_db::JobFilter {
                limit: 5000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(jobs.len(), 800, "one job per step of each run");
    assert!(jobs
        .iter()
        .all(|j| j.status == JobStatus::Succeeded && j.attempt == 1));
}

async fn bad_params_and_failed_renders_are_clear(db: Db) {
    apply(
        &db,
        json!({"name": "p", "params": [{"name": "n", "type": "int"}, {"name": "l", "type": "any", "default": "x"}],
        "steps": [
            {"id": "a", "kind": "noop", "spec": {"exit_code": "${params.n}"}},
            {"id": "b", "kind": "noop", "depends_on": ["a"], "for_each": "${params.l}"},
        ]}),
    )
    .await;
    for (params, message) in [
        (json!({}), "params.n: is required"),
        (json!({"n": "1"}), "params.n: is not of type int"),
        (json!({"n": 1, "zz": 1}), "params.zz: unknown param"),
    ] {
        match db
            .run_create(&new_run("p", params), &kinds(), T0)
            .await
            .unwrap()
        {
            Err(FlowError::Invalid(m)) => assert!(m.contains(message), "{m}"),
            other => panic!("{other:?}"),
        }
    }
    let run = start(&db, "p", json!({"n": 0})).await;
    drain(&db, T0 + 1).await;
    let run = get(&db, run.run.id).await;
    assert_eq!(run.run.status, RunStatus::Failed);
    let b = run.steps.iter().find(|s| s.step.step == "b").unwrap();
    assert_eq!(b.step.status, StepStatus::Failed);
    let error = b.step.detail.as_ref().unwrap()["error"].as_str().unwrap();
    assert!(error.contains("for_each must be a list"), "{error}");
    assert!(matches!(
        db.run_create(&new_run("nope", json!({})), &kinds(), T0)
            .await
            .unwrap(),
        Err(FlowError::NotFound("pipeline"))
    ));
}

fn schedule(def: Value) -> (ScheduleDef, CronSpec) {
    let def: ScheduleDef = serde_json::from_value(def).unwrap();
    let spec = def.check(&kinds()).unwrap();
    (def, spec)
}

/// 2026-03-02 00:00:00 UTC, a Monday far from any DST change.
const DAY: i64 = 1_772_409_600_000;
const MINUTE: i64 = 60_000;

async fn schedules_fire_once_per_tick(db: Db) {
    let (def, spec) = schedule(
        json!({"name": "tick", "cron": "* * * * *", "overlap": "allow",
        "target": {"job": {"kind": "noop", "spec": {"stdout": "hi"}}}}),
    );
    let record = db.schedule_put("acme", &def, &spec, DAY + 1).await.unwrap();
    assert_eq!(record.next_fire_at, Some(DAY + MINUTE));
    assert_eq!(
        db.schedule_fire_due(&kinds(), DAY + 30_000).await.unwrap(),
        0
    );
    // Two schedulers at each tick, for five ticks.
    let k = kinds();
    for n in 1..=5 {
        let at = DAY + n * MINUTE + 100;
        let (x, y) = tokio::join!(db.schedule_fire_due(&k, at), db.schedule_fire_due(&k, at));
        assert_eq!(x.unwrap() + y.unwrap(), 1, "tick {n} fired once");
    }
    let fires = db.schedule_fires("acme", "tick", 100).await.unwrap();
    assert_eq!(fires.len(), 5);
    assert!(fires
        .iter()
        .all(|f| f.outcome == "fired" && f.job_id.is_some()));
    let jobs = db
        .job_list(
            "acme",
            &kiln_db::JobFilter {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(jobs.len(), 5);
    assert!(jobs
        .iter()
        .all(|j| j.labels.get("kiln.schedule").map(String::as_str) == Some("tick")));
    // Paused: nothing; resumed: counts from now.
    db.schedule_set_paused("acme", "tick", true, DAY + 6 * MINUTE)
        .await
        .unwrap();
    assert_eq!(
        db.schedule_fire_due(&kinds(), DAY + 9 * MINUTE)
            .await
            .unwrap(),
        0
    );
    let resumed = db
        .schedule_set_paused("acme", "tick", false, DAY + 9 * MINUTE + 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resumed.next_fire_at, Some(DAY + 10 * MINUTE));
    assert!(db.schedule_delete("acme", "tick").await.unwrap());
    assert!(db.schedule_list("acme").await.unwrap().is_empty());
}

async fn schedules_catch_up_by_policy(db: Db) {
    apply(
        &db,
        json!({"name": "p", "steps": [{"id": "a", "kind": "noop"}]}),
    )
    .await;
    for (name, policy, expected) in [
        ("none", "none", 0),
        ("latest", "latest", 1),
        ("all", "all", 10),
    ] {
        let (def, spec) = schedule(
            json!({"name": name, "cron": "* * * * *", "catch_up": policy,
            "overlap": "allow", "target": {"pipeline": {"name": "p"}}}),
        );
        db.schedule_put("acme", &def, &spec, DAY).await.unwrap();
        // Down for ten minutes: ticks 1..=10 are missed, then one pass.
        let fired = db
            .schedule_fire_due(&kinds(), DAY + 10 * MINUTE + 30_000)
            .await
            .unwrap();
        assert_eq!(fired, expected, "catch_up {policy}");
        let record = db.schedule_get("acme", name).await.unwrap().unwrap();
        assert_eq!(record.next_fire_at, Some(DAY + 11 * MINUTE));
        db.schedule_delete("acme", name).await.unwrap();
    }
    let runs = db
        .run_list(
            "acme",
            &RunFilter {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(runs.len(), 11);
    assert!(runs.iter().all(|r| r.trigger.starts_with("schedule:")));
    // A schedule whose pipeline is gone records the error.
    let (def, spec) = schedule(json!({"name": "lost", "cron": "* * * * *",
        "target": {"pipeline": {"name": "missing"}}}));
    db.schedule_put("acme", &def, &spec, DAY).await.unwrap();
    assert_eq!(
        db.schedule_fire_due(&kinds(), DAY + MINUTE).await.unwrap(),
        1
    );
    let fire = &db.schedule_fires("acme", "lost", 1).await.unwrap()[0];
    assert_eq!(fire.outcome, "error");
    assert!(fire.error.as_deref().unwrap().contains("missing"));
}

async fn schedules_follow_dst(db: Db) {
    // Europe/Berlin falls back on 2026-10-25: 25 hours, so 25 hourly ticks.
    let (def, spec) = schedule(json!({"name": "hourly", "cron": "0 * * * *",
        "timezone": "Europe/Berlin", "target": {"job": {"kind": "noop"}}}));
    let day_start = 1_792_879_200_000; // 2026-10-24T22:00:00Z = 00:00 CEST on the 25th
    db.schedule_put("acme", &def, &spec, day_start - 1)
        .await
        .unwrap();
    let mut fired = 0;
    let mut t = day_start;
    while t < day_start + 25 * 3_600_000 {
        fired += db.schedule_fire_due(&kinds(), t + 1_000).await.unwrap();
        t += 600_000;
    }
    assert_eq!(fired, 25);
    let fires = db.schedule_fires("acme", "hourly", 100).await.unwrap();
    let mut ticks: Vec<i64> = fires.iter().map(|f| f.tick).collect();
    ticks.sort_unstable();
    assert!(ticks.windows(2).all(|w| w[1] - w[0] == 3_600_000));
}

async fn schedules_skip_overlaps(db: Db) {
    let (def, spec) = schedule(json!({"name": "slow", "cron": "* * * * *",
        "target": {"job": {"kind": "noop", "spec": {"sleep_ms": 100000}}}}));
    db.schedule_put("acme", &def, &spec, DAY).await.unwrap();
    assert_eq!(
        db.schedule_fire_due(&kinds(), DAY + MINUTE).await.unwrap(),
        1
    );
    // The first job is still queued: the next tick is skipped.
    assert_eq!(
        db.schedule_fire_due(&kinds(), DAY + 2 * MINUTE)
            .await
            .unwrap(),
        1
    );
    let fires = db.schedule_fires("acme", "slow", 10).await.unwrap();
    assert_eq!(fires[0].outcome, "skipped");
    assert_eq!(fires[1].outcome, "fired");
    // `queue`: every tick fires, into a queue that runs one at a time.
    let (def, spec) = schedule(
        json!({"name": "serial", "cron": "* * * * *", "overlap": "queue",
        "target": {"job": {"kind": "noop", "spec": {"sleep_ms": 100000}}}}),
    );
    db.schedule_put("acme", &def, &spec, DAY).await.unwrap();
    db.schedule_fire_due(&kinds(), DAY + MINUTE).await.unwrap();
    db.schedule_fire_due(&kinds(), DAY + 2 * MINUTE)
        .await
        .unwrap();
    let serial = db.schedule_fires("acme", "serial", 10).await.unwrap();
    assert!(serial.iter().all(|f| f.outcome == "fired"));
    let queue = db.queue_get("acme", "schedule.serial").await.unwrap();
    assert_eq!(queue.concurrency_limit, Some(1));
    let leased = db
        .job_lease("w1", &["noop".to_string()], 10, 60_000, DAY + 2 * MINUTE)
        .await
        .unwrap();
    let serial_leased = leased
        .iter()
        .filter(|j| j.queue == "schedule.serial")
        .count();
    assert_eq!(serial_leased, 1, "one at a time");
}

/// A worker that runs pipeline steps advances each run in the transaction
/// that ends its step jobs, with no advancer at all, and takes one next
/// step per end for itself.
async fn step_ends_advance_their_runs_inline(db: Db) {
    apply(
        &db,
        json!({"name": "chain", "steps": [
            {"id": "a", "kind": "noop", "spec": {"stdout": "{\"n\": 41}"}},
            {"id": "b", "kind": "noop", "depends_on": ["a"], "spec": {"stdout": "n=${steps.a.output.n + 1}"}},
            {"id": "c", "kind": "noop", "depends_on": ["b"], "spec": {"stdout": "${steps.b.stdout}!"}},
        ]}),
    )
    .await;
    apply(
        &db,
        json!({"name": "f", "steps": [
            {"id": "build", "kind": "noop", "spec": {"exit_code": 2}},
            {"id": "test", "kind": "noop", "depends_on": ["build"]},
            {"id": "deploy", "kind": "noop", "depends_on": ["test"]},
            {"id": "report", "kind": "noop", "depends_on": ["build"], "when": "failure"},
            {"id": "cleanup", "kind": "noop", "depends_on": ["deploy"], "when": "always"},
        ]}),
    )
    .await;
    apply(
        &db,
        json!({"name": "fan", "params": [{"name": "items", "type": "list"}], "steps": [
            {"id": "each", "kind": "noop", "for_each": "${params.items}", "spec": {"stdout": "{\"i\": ${item}}"}},
            {"id": "join", "kind": "noop", "depends_on": ["each"], "spec": {"stdout": "last ${steps.each.output[49].i}"}},
        ]}),
    )
    .await;
    let chain = start(&db, "chain", json!({})).await.run.id;
    let failing = start(&db, "f", json!({})).await.run.id;
    let items: Vec<i64> = (0..50).collect();
    let fan = start(&db, "fan", json!({ "items": items })).await.run.id;
    let taken = drain_inline(&db, T0 + 1, 1000).await;

    let run = get(&db, chain).await;
    assert_eq!(run.run.status, RunStatus::Succeeded, "{:?}", run.run.reason);
    assert_eq!(job_spec(&db, &run, "c").await["stdout"], json!("n=42!"));
    let run = get(&db, failing).await;
    assert_eq!(run.run.status, RunStatus::Failed);
    assert_eq!(
        statuses(&run),
        BTreeMap::from([
            ("build".into(), StepStatus::Failed),
            ("test".into(), StepStatus::Skipped),
            ("deploy".into(), StepStatus::Skipped),
            ("report".into(), StepStatus::Succeeded),
            ("cleanup".into(), StepStatus::Succeeded),
        ])
    );
    let run = get(&db, fan).await;
    assert_eq!(run.run.status, RunStatus::Succeeded, "{:?}", run.run.reason);
    assert_eq!(
        job_spec(&db, &run, "join").await["stdout"],
        json!("last 49")
    );
    // b, c, one of report and cleanup (one end, one job taken: the other
    // is leased as usual) and join went straight to the worker.
    assert_eq!(taken, 4);
    // Nothing was left for the advancer.
    assert_eq!(db.flow_advance(&kinds(), T0 + 2).await.unwrap(), 0);
}

/// A next step goes to the worker that ended its predecessor only when no
/// job it could run waited before it; otherwise it queues like any job.
async fn handed_off_steps_wait_behind_older_work(db: Db) {
    apply(
        &db,
        json!({"name": "pair", "steps": [
            {"id": "a", "kind": "noop"},
            {"id": "b", "kind": "noop", "depends_on": ["a"]},
        ]}),
    )
    .await;
    let handled = ["noop".to_string()];
    let request = |now| kiln_db::LeaseRequest {
        worker_id: "w1",
        kinds: &handled,
        limit: 10,
        lease_ms: 60_000,
        now,
        tenant_running_max: None,
    };
    for waiting in ["same priority", "more urgent"] {
        let run = start(&db, "pair", json!({})).await;
        let a = db
            .job_lease("w1", &handled, 1, 60_000, T0 + 1)
            .await
            .unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].run_id, Some(run.run.id));
        let mut older = kiln_core::NewJob::new("acme", "noop", json!({}));
        if waiting == "more urgent" {
            older.priority = kiln_core::Priority::Critical;
        }
        let (older, _) = db.job_insert(&older, T0 + 1).await.unwrap();
        let (completed, next) = db
            .job_complete_advancing(
                &[end_of(&a[0], T0 + 2)],
                &kinds(),
                Some(&request(T0 + 2)),
                T0 + 2,
            )
            .await
            .unwrap();
        assert_eq!(completed.applied, vec![a[0].id]);
        assert!(next.is_empty(), "{waiting}: b was taken past an older job");
        // b queued behind the older job, which is leased first.
        let leased = db
            .job_lease("w1", &handled, 10, 60_000, T0 + 3)
            .await
            .unwrap();
        let ids: Vec<i64> = leased.iter().map(|j| j.id).collect();
        assert_eq!(ids.len(), 2, "{waiting}");
        assert_eq!(ids[0], older.id, "{waiting}");
        assert_eq!(leased[1].run_id, Some(run.run.id), "{waiting}");
        let done: Vec<Completion> = leased.iter().map(|j| end_of(j, T0 + 4)).collect();
        let (_, next) = db
            .job_complete_advancing(&done, &kinds(), Some(&request(T0 + 4)), T0 + 4)
            .await
            .unwrap();
        assert!(next.is_empty());
        assert_eq!(get(&db, run.run.id).await.run.status, RunStatus::Succeeded);
    }
}

/// A step job whose attempt ends in a retry does not move its run when its
/// worker writes the end with the run's advance; the attempt that ends it
/// does, and nothing is left for the advancer.
async fn a_retried_step_moves_its_run_only_at_its_end(db: Db) {
    apply(
        &db,
        json!({"name": "twice", "steps": [
            {"id": "a", "kind": "noop", "spec": {"exit_code": 1},
             "retry": {"max_attempts": 2, "backoff": {"base_ms": 0, "max_ms": 0, "jitter": false}}},
            {"id": "b", "kind": "noop", "depends_on": ["a"], "when": "always"},
        ]}),
    )
    .await;
    let handled = ["noop".to_string()];
    let request = |now| kiln_db::LeaseRequest {
        worker_id: "w1",
        kinds: &handled,
        limit: 10,
        lease_ms: 60_000,
        now,
        tenant_running_max: None,
    };
    let run = start(&db, "twice", json!({})).await;
    let a = db
        .job_lease("w1", &handled, 1, 60_000, T0 + 1)
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    let (completed, next) = db
        .job_complete_advancing(
            &[end_of(&a[0], T0 + 2)],
            &kinds(),
            Some(&request(T0 + 2)),
            T0 + 2,
        )
        .await
        .unwrap();
    assert_eq!(completed.applied, vec![a[0].id]);
    assert!(next.is_empty(), "a retry moved the run");
    let view = get(&db, run.run.id).await;
    assert_eq!(step_status(&view, "a"), StepStatus::Running);
    assert_eq!(view.steps[0].instances[0].status, "running");
    let again = db
        .job_lease("w1", &handled, 1, 60_000, T0 + 3)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, a[0].id);
    let (_, next) = db
        .job_complete_advancing(
            &[end_of(&again[0], T0 + 4)],
            &kinds(),
            Some(&request(T0 + 4)),
            T0 + 4,
        )
        .await
        .unwrap();
    assert_eq!(next.len(), 1, "the cleanup step is handed over");
    let view = get(&db, run.run.id).await;
    assert_eq!(step_status(&view, "a"), StepStatus::Failed);
    assert_eq!(view.steps[0].instances[0].status, "failed");
    assert_eq!(
        db.flow_advance(&kinds(), T0 + 5).await.unwrap(),
        0,
        "an end was left in the outbox"
    );
}

/// On PostgreSQL a completion never waits for a run another transaction
/// holds: the end is written, stays in the outbox, and the advancer moves
/// the run once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_run_leaves_its_step_end_to_the_advancer() {
    use sqlx::{Connection, Executor};
    let (db, url, schema) = postgres_only().await;
    apply(
        &db,
        json!({"name": "pair", "steps": [
            {"id": "a", "kind": "noop"},
            {"id": "b", "kind": "noop", "depends_on": ["a"]},
        ]}),
    )
    .await;
    let handled = ["noop".to_string()];
    let run = start(&db, "pair", json!({})).await;
    let a = db
        .job_lease("w1", &handled, 1, 60_000, T0 + 1)
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
    holder
        .execute(format!("SET search_path TO \"{schema}\"").as_str())
        .await
        .unwrap();
    holder.execute("BEGIN").await.unwrap();
    holder
        .execute(format!("SELECT 1 FROM runs WHERE id = {} FOR UPDATE", run.run.id).as_str())
        .await
        .unwrap();
    let request = kiln_db::LeaseRequest {
        worker_id: "w1",
        kinds: &handled,
        limit: 10,
        lease_ms: 60_000,
        now: T0 + 2,
        tenant_running_max: None,
    };
    let (completed, next) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        db.job_complete_advancing(&[end_of(&a[0], T0 + 2)], &kinds(), Some(&request), T0 + 2),
    )
    .await
    .expect("the completion waited for the held run")
    .unwrap();
    assert_eq!(completed.applied, vec![a[0].id]);
    assert!(next.is_empty());
    // Held: the advancer leaves it too.
    assert_eq!(db.flow_advance(&kinds(), T0 + 3).await.unwrap(), 0);
    holder.execute("COMMIT").await.unwrap();
    assert_eq!(db.flow_advance(&kinds(), T0 + 4).await.unwrap(), 1);
    let view = get(&db, run.run.id).await;
    assert_eq!(step_status(&view, "a"), StepStatus::Succeeded);
    assert_eq!(step_status(&view, "b"), StepStatus::Running);
    postgres_done(db, &url, &schema).await;
}

/// On PostgreSQL a completion may wait for its job's row (a heartbeat
/// holds it) while the run's holder moves the same step and commits: the
/// completion then locks the run and must read the step as that holder left
/// it, not as it stood when its statement began, or its count overwrites
/// the holder's and the fan-in never settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_that_waited_reads_the_run_as_its_holder_left_it() {
    use sqlx::{Connection, Executor};
    let (db, url, schema) = postgres_only().await;
    apply(
        &db,
        json!({"name": "fan", "params": [{"name": "items", "type": "list"}], "steps": [
            {"id": "r", "kind": "noop"},
            {"id": "x", "kind": "noop", "for_each": "${params.items}", "depends_on": ["r"]},
            {"id": "y", "kind": "noop", "depends_on": ["x"]},
        ]}),
    )
    .await;
    let handled = ["noop".to_string()];
    let run = start(&db, "fan", json!({"items": [1, 2]})).await.run.id;
    // r's end starts x here, so this process knows x's jobs (as a worker
    // knows the steps it made) and names x's row in the completion's read.
    let r = db
        .job_lease("w1", &handled, 10, 60_000, T0 + 1)
        .await
        .unwrap();
    assert_eq!(r.len(), 1);
    db.job_complete_advancing(&[end_of(&r[0], T0 + 1)], &kinds(), None, T0 + 1)
        .await
        .unwrap();
    let mut jobs = db
        .job_lease("w1", &handled, 10, 60_000, T0 + 1)
        .await
        .unwrap();
    jobs.sort_by_key(|j| j.id);
    assert_eq!(jobs.len(), 2);
    let (j1, j2) = (&jobs[0], &jobs[1]);
    // j1's end is recorded; its advance is what the holder does below.
    db.job_complete_many(&[end_of(j1, T0 + 2)]).await.unwrap();
    let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
    holder
        .execute(format!("SET search_path TO \"{schema}\"").as_str())
        .await
        .unwrap();
    holder.execute("BEGIN").await.unwrap();
    for sql in [
        format!("SELECT 1 FROM runs WHERE id = {run} FOR UPDATE"),
        // A heartbeat's row lock on j2.
        format!(
            "UPDATE jobs SET lease_expires_at = lease_expires_at WHERE id = {}",
            j2.id
        ),
        // j1's end applied under the run's lock, as an advance applies it.
        format!("UPDATE run_steps SET succeeded = 1 WHERE run_id = {run} AND step = 'x'"),
        format!(
            "UPDATE run_instances SET status = 'succeeded', exit_code = 0, finished_at = {} \
             WHERE run_id = {run} AND job_id = {}",
            T0 + 2,
            j1.id
        ),
        format!("DELETE FROM flow_outbox WHERE job_id = {}", j1.id),
    ] {
        holder.execute(sql.as_str()).await.unwrap();
    }
    let completing = {
        let db = db.clone();
        let done = end_of(j2, T0 + 3);
        tokio::spawn(async move {
            let handled = ["noop".to_string()];
            let request = kiln_db::LeaseRequest {
                worker_id: "w1",
                kinds: &handled,
                limit: 10,
                lease_ms: 60_000,
                now: T0 + 3,
                tenant_running_max: None,
            };
            db.job_complete_advancing(&[done], &kinds(), Some(&request), T0 + 3)
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !completing.is_finished(),
        "the completion waits for j2's row"
    );
    holder.execute("COMMIT").await.unwrap();
    let (completed, next) = tokio::time::timeout(std::time::Duration::from_secs(5), completing)
        .await
        .expect("the completion goes on once the holder commits")
        .unwrap()
        .unwrap();
    assert_eq!(completed.applied, vec![j2.id]);
    db.flow_advance(&kinds(), T0 + 4).await.unwrap();
    let view = get(&db, run).await;
    assert_eq!(
        step_status(&view, "x"),
        StepStatus::Succeeded,
        "both ends counted"
    );
    assert_eq!(step_status(&view, "y"), StepStatus::Running);
    assert_eq!(
        next.len()
            + db.job_lease("w1", &handled, 10, 60_000, T0 + 5)
                .await
                .unwrap()
                .len(),
        1
    );
    postgres_done(db, &url, &schema).await;
}

/// A worker whose lease moved on reports its end late, while the attempt
/// that replaced it has already ended and waits in the outbox: the late end
/// is refused and the waiting one still moves the run, exactly once.
async fn a_stale_end_leaves_the_outbox_to_the_advancer(db: Db) {
    apply(
        &db,
        json!({"name": "pair", "steps": [
            {"id": "a", "kind": "noop",
             "retry": {"max_attempts": 2, "backoff": {"base_ms": 0, "max_ms": 0, "jitter": false}}},
            {"id": "b", "kind": "noop", "depends_on": ["a"]},
        ]}),
    )
    .await;
    let handled = ["noop".to_string()];
    let run = start(&db, "pair", json!({})).await.run.id;
    let first = db
        .job_lease("w1", &handled, 1, 1_000, T0 + 1)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(db.job_rescue_expired(T0 + 2_000).await.unwrap(), 1);
    let second = db
        .job_lease("w2", &handled, 1, 60_000, T0 + 2_001)
        .await
        .unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!((second[0].id, second[0].attempt), (first[0].id, 2));
    // The second attempt's end is written without advancing: it waits.
    db.job_complete_many(&[end_of(&second[0], T0 + 2_002)])
        .await
        .unwrap();
    let request = kiln_db::LeaseRequest {
        worker_id: "w1",
        kinds: &handled,
        limit: 1,
        lease_ms: 60_000,
        now: T0 + 2_003,
        tenant_running_max: None,
    };
    let (completed, next) = db
        .job_complete_advancing(
            &[end_of(&first[0], T0 + 2_003)],
            &kinds(),
            Some(&request),
            T0 + 2_003,
        )
        .await
        .unwrap();
    assert!(completed.applied.is_empty(), "a stale end was applied");
    assert!(next.is_empty());
    assert_eq!(db.flow_advance(&kinds(), T0 + 2_004).await.unwrap(), 1);
    let view = get(&db, run).await;
    assert_eq!(statuses(&view)["a"], StepStatus::Succeeded);
    assert_eq!(statuses(&view)["b"], StepStatus::Running);
    let b = db
        .job_lease("w1", &handled, 10, 60_000, T0 + 2_005)
        .await
        .unwrap();
    assert_eq!(b.len(), 1, "b was made once");
    // The stale end's transaction was dropped, and on PostgreSQL the step
    // lane's connection with it: the next end lands, and its run ends.
    let (completed, next) = end_taking(&db, &[end_of(&b[0], T0 + 2_006)], 1, T0 + 2_006)
        .await
        .unwrap();
    assert_eq!(completed.applied, vec![b[0].id]);
    assert!(next.is_empty());
    assert_eq!(get(&db, run).await.run.status, RunStatus::Succeeded);
}

/// PostgreSQL's chained step ends are written on a connection kept out of
/// the pool. When the server ends it (a restart, an administrator), the
/// next end opens another and lands; nothing is lost or written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_lane_whose_connection_was_ended_opens_another() {
    let (db, url, schema) = postgres_only().await;
    apply(
        &db,
        json!({"name": "three", "steps": [
            {"id": "a", "kind": "noop"},
            {"id": "b", "kind": "noop", "depends_on": ["a"]},
            {"id": "c", "kind": "noop", "depends_on": ["b"]},
        ]}),
    )
    .await;
    let handled = ["noop".to_string()];
    let run = start(&db, "three", json!({})).await.run.id;
    let mut job = db
        .job_lease("w1", &handled, 1, 60_000, T0 + 1)
        .await
        .unwrap()
        .remove(0);
    let mut pids = Vec::new();
    for (n, step) in ["a", "b", "c"].into_iter().enumerate() {
        let now = T0 + 10 * (n as i64 + 1);
        let (completed, mut next) = end_taking(&db, &[end_of(&job, now)], 1, now)
            .await
            .unwrap_or_else(|e| panic!("the end of {step}: {e}"));
        assert_eq!(completed.applied, vec![job.id], "the end of {step}");
        let pid = kiln_db::testing::step_lane_pid(&db)
            .await
            .expect("the lane has a connection");
        pids.push(pid);
        if step == "c" {
            assert!(next.is_empty());
            break;
        }
        assert_eq!(next.len(), 1, "the step after {step} was handed over");
        job = next.remove(0);
        // The server ends the lane's connection before the next end.
        kiln_db::testing::execute(&db, &format!("SELECT pg_terminate_backend({pid})"))
            .await
            .unwrap();
    }
    assert_ne!(
        pids[0], pids[1],
        "a fresh connection took the ended one's place"
    );
    assert_ne!(pids[1], pids[2]);
    let view = get(&db, run).await;
    assert_eq!(
        view.run.status,
        RunStatus::Succeeded,
        "{:?}",
        view.run.reason
    );
    let jobs = kiln_db::testing::scalar_i64(&db, "SELECT COUNT(*) FROM jobs")
        .await
        .unwrap();
    assert_eq!(jobs, 3, "each step's job was made once");
    postgres_done(db, &url, &schema).await;
}

/// Step jobs a worker takes with its predecessor's end (on PostgreSQL they
/// are written leased as they are inserted) leave the same trail as a job
/// queued and then leased: each job's events in order, the rollups'
/// counts, the start and run latencies, and no running or waiting count
/// left behind once the run has ended.
async fn steps_taken_inline_count_and_tell_as_leased_ones(db: Db) {
    apply(
        &db,
        json!({"name": "line", "steps": [
            {"id": "a", "kind": "noop"},
            {"id": "b", "kind": "noop", "depends_on": ["a"]},
            {"id": "c", "kind": "noop", "depends_on": ["b"]},
            {"id": "d", "kind": "noop", "depends_on": ["c"]},
        ]}),
    )
    .await;
    let run = start(&db, "line", json!({})).await.run.id;
    assert_eq!(drain_inline(&db, T0 + 1, 1).await, 3);
    let view = get(&db, run).await;
    assert_eq!(
        view.run.status,
        RunStatus::Succeeded,
        "{:?}",
        view.run.reason
    );
    let jobs: Vec<i64> = view
        .steps
        .iter()
        .map(|s| s.instances[0].job_id.unwrap())
        .collect();

    assert_eq!(
        db.tenant_running()
            .await
            .unwrap()
            .get("acme")
            .copied()
            .unwrap_or(0),
        0
    );
    let rollups = db.dashboard_rollups(Some("acme"), 0).await.unwrap();
    let mut counts = kiln_db::dashboard::Counts::default();
    for m in &rollups.minutes {
        counts.add(&m.counts);
    }
    assert_eq!(
        (
            counts.enqueued,
            counts.started,
            counts.succeeded,
            counts.retried
        ),
        (4, 4, 4, 0)
    );
    let latency = |metric| -> i64 {
        rollups
            .latency
            .iter()
            .filter(|l| l.metric == metric)
            .map(|l| l.n)
            .sum()
    };
    assert_eq!((latency(0), latency(1)), (4, 4));
    assert!(
        rollups.waiting.iter().all(|w| w.n == 0),
        "{:?}",
        rollups.waiting
    );
    assert!(
        rollups.waiting_by_status.iter().all(|(_, n)| *n == 0),
        "{:?}",
        rollups.waiting_by_status
    );

    // Events are numbered a moment after their transactions end.
    let types = ["job.".to_string()];
    let mut events = Vec::new();
    for _ in 0..200 {
        events = db
            .event_read(&kiln_db::events::EventQuery {
                tenant: Some("acme"),
                types: &types,
                resource: None,
                after: 0,
                limit: 1000,
            })
            .await
            .unwrap();
        if events.len() >= 12 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    for id in &jobs {
        let mine: Vec<(&str, &serde_json::Value, &serde_json::Value)> = events
            .iter()
            .filter(|e| e.resource.id == id.to_string())
            .map(|e| (e.kind.as_str(), &e.data["status"], &e.data["attempt"]))
            .collect();
        assert_eq!(
            mine,
            vec![
                ("job.queued", &json!("queued"), &json!(0)),
                ("job.started", &json!("running"), &json!(1)),
                ("job.succeeded", &json!("succeeded"), &json!(1)),
            ],
            "job {id}"
        );
    }
}
