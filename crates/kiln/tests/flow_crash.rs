//! A worker process, which also advances pipeline runs, killed with SIGKILL
//! in the middle of a 200-step run on PostgreSQL: the run still completes,
//! every step instance succeeds exactly once, and no step job exists twice.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{kiln, wait_until, PgSchema, TempDir};
use kiln_core::JobStatus;
use kiln_db::flow::NewRun;
use kiln_db::{Db, JobFilter};
use kiln_flow::{PipelineDef, RunStatus};
use serde_json::json;

async fn run_status(db: &Db, id: i64) -> (RunStatus, usize) {
    let run = db.run_get("acme", id).await.unwrap().unwrap();
    let done = run
        .steps
        .iter()
        .filter(|s| s.step.status == kiln_flow::StepStatus::Succeeded)
        .count();
    (run.run.status, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_mid_pipeline_on_postgres() {
    let (schema, db) = PgSchema::new("kiln_flow_crash").await;
    let dir = TempDir::new("kiln-flow-crash");
    // Twenty chains of ten steps, each step sleeping so that the killed
    // worker holds leases; steps retry, as a lost lease costs an attempt.
    let mut steps = Vec::new();
    for chain in 0..20 {
        for i in 0..10 {
            let mut step = json!({"id": format!("c{chain}_{i}"), "kind": "noop",
                "spec": {"sleep_ms": 150, "stdout": format!("{chain}.{i}")},
                "retry": {"max_attempts": 5, "backoff": {"base_ms": 10, "max_ms": 50, "jitter": false}}});
            if i > 0 {
                step["depends_on"] = json!([format!("c{chain}_{}", i - 1)]);
            }
            steps.push(step);
        }
    }
    let checked = PipelineDef::from_json(
        json!({"name": "wide", "steps": steps}),
        &kiln_api::builtin_kinds(),
    )
    .unwrap();
    db.pipeline_put("acme", &checked.def, kiln_worker::now_millis())
        .await
        .unwrap();
    let (run, _) = db
        .run_create(
            &NewRun {
                tenant: "acme".into(),
                pipeline: "wide".into(),
                params: Default::default(),
                labels: BTreeMap::new(),
                idempotency_key: None,
                trigger: "test".into(),
            },
            &kiln_api::builtin_kinds(),
            kiln_worker::now_millis(),
        )
        .await
        .unwrap()
        .unwrap();
    let id = run.run.id;
    let url = schema.url();
    let args = [
        "worker",
        "--database-url",
        &url,
        "--slots",
        "64",
        "--lease-ms",
        "1500",
    ];
    let mut doomed = kiln(&args, dir.path(), dir.path(), "doomed.log");
    wait_until(
        "a third of the steps to succeed",
        Duration::from_secs(60),
        || async { run_status(&db, id).await.1 >= 60 },
    )
    .await;
    doomed.0.kill().unwrap(); // SIGKILL: mid-lease, perhaps mid-advance
    doomed.0.wait().unwrap();
    let (status, done) = run_status(&db, id).await;
    assert_eq!(status, RunStatus::Running);
    assert!(done < 200, "the kill came too late to test anything");
    let _survivor = kiln(&args, dir.path(), dir.path(), "survivor.log");
    wait_until("the run to end", Duration::from_secs(120), || async {
        run_status(&db, id).await.0.is_terminal()
    })
    .await;
    let run = db.run_get("acme", id).await.unwrap().unwrap();
    assert_eq!(run.run.status, RunStatus::Succeeded, "{:?}", run.run.reason);
    let jobs = db
        .job_list(
            "acme",
            &JobFilter {
                label: Some(("kiln.run".into(), id.to_string())),
                limit: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(jobs.len(), 200, "one job per step, none made twice");
    for step in &run.steps {
        assert_eq!(step.instances.len(), 1);
        let job_id = step.instances[0].job_id.unwrap();
        let job = jobs.iter().find(|j| j.id == job_id).unwrap();
        assert_eq!(job.status, JobStatus::Succeeded);
        let successes = job
            .history
            .iter()
            .filter(|a| a.outcome == "succeeded")
            .count();
        assert_eq!(successes, 1, "step {}: {:?}", step.step.step, job.history);
    }
    db.close().await;
}
