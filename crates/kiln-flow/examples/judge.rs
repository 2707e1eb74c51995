//! What judging one job by five admission policies costs, in process:
//! `cargo run --release -p kiln-flow --example judge` (the same five
//! policies as `kiln bench policy`).

use std::time::Instant;

use kiln_core::NewJob;
use kiln_flow::policy::{Policy, PolicySet, Subject};
use serde_json::json;

fn main() {
    let rules = [
        r#"job.kind != "vm" || job.labels.team != null"#,
        r#"tenant != "trial" || job.memory_mib == null || job.memory_mib <= 1024"#,
        "job.timeout_ms <= 3600000",
        r#"job.queue in ["default", "batch", "emails"]"#,
        r#"job.priority != "critical" || job.labels.oncall == "yes""#,
    ];
    let set = PolicySet::new(
        rules
            .iter()
            .enumerate()
            .map(|(i, rule)| Policy::new(&format!("p{i}"), rule, "", Vec::new(), true).unwrap())
            .collect(),
    );
    let mut job = NewJob::new("bench", "noop", json!({}));
    job.labels.insert("team".into(), "bench".into());
    let none = PolicySet::default();
    let n = 200_000u32;
    for (what, set) in [("no policy", &none), ("5 policies", &set)] {
        let started = Instant::now();
        for _ in 0..n {
            let subject = Subject::of_job(&job, serde_json::Map::new());
            assert!(set.admit(&subject).is_ok());
        }
        println!(
            "| one job judged, {what} | {:.2} µs |",
            (started.elapsed() / n).as_secs_f64() * 1e6
        );
    }
}
