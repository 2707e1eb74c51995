//! Pipelines, runs and schedules through the real binary against a
//! `kiln serve` on SQLite in a temporary data dir.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Proc, TempDir, KILN};

/// A server of the test's own and the client's settings for it.
struct Server {
    dir: TempDir,
    data: PathBuf,
    base: String,
    _serve: Proc,
}

impl Server {
    async fn start(prefix: &str) -> Server {
        let (dir, data, base, serve) = common::serve(prefix, false).await;
        Server {
            dir,
            data,
            base,
            _serve: serve,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(KILN);
        command
            .args(args)
            .args([
                "--url",
                &self.base,
                "--data-dir",
                self.data.to_str().unwrap(),
            ])
            .env("KILN_LOG", "warn");
        for name in [
            "KILN_URL",
            "KILN_API_KEY",
            "KILN_DATA_DIR",
            "TERM",
            "COLUMNS",
        ] {
            command.env_remove(name);
        }
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// The command with `input` on its stdin.
    fn run_with_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn ok(output: &Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(output),
        stderr(output)
    );
    stdout(output)
}

/// The position of the first line that is exactly `line`.
fn line_at(text: &str, line: &str) -> usize {
    text.lines()
        .position(|l| l == line)
        .unwrap_or_else(|| panic!("no line {line:?} in:\n{text}"))
}

const DIAMOND: &str = "\
name: diamond
description: three noop steps, the last after both others
steps:
  - id: a
    kind: noop
  - id: b
    kind: noop
    depends_on: [a]
    spec:
      sleep_ms: 50
  - id: c
    kind: noop
    depends_on: [a, b]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_apply_list_run_and_fail() {
    let server = Server::start("kiln-cli-flow").await;

    let file = server.write("diamond.yaml", DIAMOND);
    let applied = ok(&server.run(&["pipeline", "apply", "-f", &file]));
    assert_eq!(applied.trim(), "diamond version 1");

    let listed = ok(&server.run(&["pipeline", "ls"]));
    let row = listed
        .lines()
        .find(|l| l.starts_with("diamond "))
        .unwrap_or_else(|| panic!("{listed}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..3], ["diamond", "1", "3"], "{listed}");

    // The definition comes back as YAML that applies again as it is, and as JSON.
    let yaml = ok(&server.run(&["pipeline", "get", "diamond"]));
    assert!(yaml.contains("depends_on"), "{yaml}");
    let again = server.write("again.yml", &yaml);
    let reapplied = ok(&server.run(&["pipeline", "apply", "-f", &again]));
    assert!(reapplied.starts_with("diamond version "), "{reapplied}");
    let json = ok(&server.run(&["pipeline", "get", "diamond", "--json"]));
    let definition: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(definition["steps"].as_array().map(Vec::len), Some(3));
    assert_eq!(definition["steps"][2]["depends_on"][1], "b");

    // Followed to its end: every step's end is printed, in dependency order.
    let waited = server.run(&["pipeline", "run", "diamond", "--wait"]);
    let text = ok(&waited);
    let a = line_at(&text, "step a succeeded");
    let b = line_at(&text, "step b succeeded");
    let c = line_at(&text, "step c succeeded");
    assert!(a < b && b < c, "{text}");
    let last = text.lines().last().unwrap_or("");
    assert!(
        last.starts_with("run ") && last.ends_with(" succeeded"),
        "{text}"
    );
    let run_id = last.split_whitespace().nth(1).unwrap().to_string();

    // Started without --wait: the id, which `run get`, `run ls` and `run wait` know.
    let started = ok(&server.run(&["pipeline", "run", "diamond", "--idempotency-key", "k1"]));
    let id = started.trim().to_string();
    assert!(!id.is_empty() && id != run_id, "{started}");
    let same = ok(&server.run(&["pipeline", "run", "diamond", "--idempotency-key", "k1"]));
    assert_eq!(same.trim(), id);
    let waited = server.run(&["run", "wait", &id]);
    assert!(
        ok(&waited).contains("step c succeeded"),
        "{}",
        stdout(&waited)
    );
    let got = ok(&server.run(&["run", "get", &id]));
    assert!(got.starts_with(&format!("run {id}  diamond v")), "{got}");
    for step in ["a", "b", "c"] {
        assert!(
            got.lines()
                .any(|l| l.starts_with(&format!("{step} ")) && l.contains("succeeded  1/1")),
            "{got}"
        );
    }
    let runs = ok(&server.run(&["run", "ls", "--pipeline", "diamond"]));
    for known in [&id, &run_id] {
        assert!(
            runs.lines()
                .any(|l| l.split_whitespace().next() == Some(known)),
            "{known}: {runs}"
        );
    }
    let failed_runs = ok(&server.run(&["run", "ls", "--status", "failed"]));
    assert!(
        !failed_runs
            .lines()
            .any(|l| l.split_whitespace().next() == Some(id.as_str())),
        "{failed_runs}"
    );

    // A param given on the command line reaches the step as JSON: an int
    // param taken as text would be refused instead of failing the run.
    let failing = server.write(
        "failing.json",
        r#"{"name": "failing",
            "params": [{"name": "code", "type": "int", "default": 0}],
            "steps": [
              {"id": "ok", "kind": "noop"},
              {"id": "boom", "kind": "noop", "depends_on": ["ok"],
               "spec": {"exit_code": "${params.code}"}, "retry": {"max_attempts": 1}}]}"#,
    );
    ok(&server.run(&["pipeline", "apply", "-f", &failing]));
    let passed = server.run(&["pipeline", "run", "failing", "--param", "code=0", "--wait"]);
    assert!(ok(&passed).contains("step boom succeeded"));
    let failed = server.run(&["pipeline", "run", "failing", "--param", "code=3", "--wait"]);
    assert_eq!(
        failed.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&failed),
        stderr(&failed)
    );
    assert!(
        stdout(&failed).contains("step boom failed"),
        "{}",
        stdout(&failed)
    );
    assert!(stderr(&failed).contains("failed"), "{}", stderr(&failed));
    let failed_id = stdout(&failed)
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_string();
    let got = ok(&server.run(&["run", "get", &failed_id]));
    assert!(got.contains("boom[0]"), "{got}");

    // A definition read from stdin, and a cycle refused with its name.
    let cyclic = r#"{"name": "loop", "steps": [
        {"id": "x", "kind": "noop", "depends_on": ["y"]},
        {"id": "y", "kind": "noop", "depends_on": ["x"]}]}"#;
    let refused = server.run_with_stdin(&["pipeline", "apply", "-f", "-"], cyclic);
    assert_ne!(refused.status.code(), Some(0));
    let why = stderr(&refused);
    assert!(why.contains("invalid_pipeline"), "{why}");
    assert!(
        why.contains("cycle") && (why.contains("x → y") || why.contains("y → x")),
        "{why}"
    );
    let listed = ok(&server.run(&["pipeline", "ls"]));
    assert!(!listed.contains("loop"), "{listed}");

    let removed = server.run(&["pipeline", "rm", "failing"]);
    ok(&removed);
    let listed = ok(&server.run(&["pipeline", "ls"]));
    assert!(!listed.contains("failing"), "{listed}");
    let missing = server.run(&["pipeline", "get", "failing"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("404"), "{}", stderr(&missing));
}

/// Reads the run until `step` is `status` (bounded: ten seconds).
fn until_step(server: &Server, id: &str, step: &str, status: &str) -> serde_json::Value {
    for _ in 0..100 {
        let got = ok(&server.run(&["run", "get", id, "--json"]));
        let run: serde_json::Value = serde_json::from_str(&got).unwrap();
        let now = run["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|s| s["step"] == step))
            .map(|s| s["status"].clone());
        if now.as_ref().and_then(|s| s.as_str()) == Some(status) {
            return run;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("run {id}: step {step} never became {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_cancel_and_retry() {
    let server = Server::start("kiln-cli-approve").await;
    let release = server.write(
        "release.yaml",
        "\
name: release
steps:
  - id: build
    kind: noop
  - id: ship
    kind: approval
    depends_on: [build]
  - id: announce
    kind: noop
    depends_on: [ship]
",
    );
    ok(&server.run(&["pipeline", "apply", "-f", &release]));

    // Approved: the run goes on and succeeds.
    let id = ok(&server.run(&["pipeline", "run", "release"]))
        .trim()
        .to_string();
    until_step(&server, &id, "ship", "waiting");
    let shown = ok(&server.run(&["run", "get", &id]));
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("ship ") && l.contains("waiting")),
        "{shown}"
    );
    let approved = ok(&server.run(&["run", "approve", &id, "ship", "--comment", "looks good"]));
    assert!(approved.contains("step ship succeeded"), "{approved}");
    let waited = server.run(&["run", "wait", &id]);
    assert!(ok(&waited).contains("step announce succeeded"));

    // Rejected: the run fails, and waiting on it says so with exit 1.
    let id = ok(&server.run(&["pipeline", "run", "release"]))
        .trim()
        .to_string();
    until_step(&server, &id, "ship", "waiting");
    ok(&server.run(&["run", "reject", &id, "ship"]));
    let waited = server.run(&["run", "wait", &id]);
    assert_eq!(waited.status.code(), Some(1), "{}", stdout(&waited));
    assert!(!stdout(&waited).contains("step announce succeeded"));

    // Cancelled: exit 3; retried: a new attempt of the same run.
    let id = ok(&server.run(&["pipeline", "run", "release"]))
        .trim()
        .to_string();
    until_step(&server, &id, "ship", "waiting");
    let cancelled = ok(&server.run(&["run", "cancel", &id]));
    assert_eq!(cancelled.trim(), format!("run {id} cancelled (attempt 1)"));
    let waited = server.run(&["run", "wait", &id]);
    assert_eq!(waited.status.code(), Some(3), "{}", stderr(&waited));
    let again = server.run(&["run", "cancel", &id]);
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("409"), "{}", stderr(&again));
    let retried = ok(&server.run(&["run", "retry", &id]));
    assert!(retried.contains("(attempt 2)"), "{retried}");
    until_step(&server, &id, "ship", "waiting");
    ok(&server.run(&["run", "approve", &id, "ship"]));
    let waited = server.run(&["run", "wait", &id]);
    assert_eq!(waited.status.code(), Some(0), "{}", stderr(&waited));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_round_trip() {
    let server = Server::start("kiln-cli-schedule").await;
    let pipeline = server.write("diamond.yaml", DIAMOND);
    ok(&server.run(&["pipeline", "apply", "-f", &pipeline]));

    let created = server.run(&[
        "schedule",
        "create",
        "nightly",
        "--cron",
        "0 3 * * *",
        "--timezone",
        "Europe/Paris",
        "--job-kind",
        "noop",
        "--job-spec",
        r#"{"sleep_ms": 1}"#,
        "--overlap",
        "queue",
    ]);
    assert!(
        ok(&created).starts_with("schedule nightly next fire "),
        "{}",
        stdout(&created)
    );
    let from_file = server.write(
        "weekly.yaml",
        "name: weekly\ncron: '0 4 * * 1'\ntarget:\n  pipeline:\n    name: diamond\ncatch_up: latest\npaused: true\n",
    );
    ok(&server.run(&["schedule", "create", "-f", &from_file]));

    let state = |name: &str| {
        let listed = ok(&server.run(&["schedule", "ls"]));
        let row = listed
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {listed}"))
            .to_string();
        row
    };
    let nightly = state("nightly");
    assert!(
        nightly.contains("0 3 * * *") && nightly.contains("Europe/Paris"),
        "{nightly}"
    );
    assert!(
        nightly.contains("job noop") && nightly.contains("active"),
        "{nightly}"
    );
    let weekly = state("weekly");
    assert!(
        weekly.contains("pipeline diamond") && weekly.contains("paused"),
        "{weekly}"
    );

    let paused = ok(&server.run(&["schedule", "pause", "nightly"]));
    assert_eq!(paused.trim(), "schedule nightly paused");
    assert!(state("nightly").contains("paused"));
    let resumed = ok(&server.run(&["schedule", "resume", "nightly"]));
    assert!(resumed.starts_with("schedule nightly active"), "{resumed}");
    assert!(state("nightly").contains("active"));

    let got = ok(&server.run(&["schedule", "get", "nightly"]));
    assert!(got.contains("overlap    queue"), "{got}");
    assert!(got.contains(r#"{"sleep_ms":1}"#), "{got}");
    let json = ok(&server.run(&["schedule", "get", "weekly", "--json"]));
    let schedule: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(schedule["catch_up"], "latest");
    assert_eq!(schedule["target"]["pipeline"]["name"], "diamond");

    // A bad cron is the API's to refuse, and the refusal reaches the user.
    let bad = server.run(&[
        "schedule",
        "create",
        "bad",
        "--cron",
        "61 * * * *",
        "--job-kind",
        "noop",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", stdout(&bad));
    assert!(
        stderr(&bad).contains("422") || stderr(&bad).contains("400"),
        "{}",
        stderr(&bad)
    );

    for name in ["nightly", "weekly"] {
        ok(&server.run(&["schedule", "rm", name]));
    }
    let listed = ok(&server.run(&["schedule", "ls"]));
    assert!(
        !listed.contains("nightly") && !listed.contains("weekly"),
        "{listed}"
    );
    let gone = server.run(&["schedule", "get", "nightly"]);
    assert_eq!(gone.status.code(), Some(2));
}

/// `kiln events tail` prints the log from an id on, filtered, and follows
/// it live: a run started after the tail began shows up in it.
#[tokio::test]
async fn events_tail_follows_the_log() {
    let server = Server::start("kiln-cli-events").await;
    let file = server.write("diamond.yaml", DIAMOND);
    ok(&server.run(&["pipeline", "apply", "-f", &file]));
    ok(&server.run(&["pipeline", "run", "diamond", "--wait"]));
    let history = ok(&server.run(&[
        "events", "tail", "--type", "run.*", "--after", "0", "--count", "2", "--json",
    ]));
    let types: Vec<String> = history
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["type"].to_string())
        .collect();
    assert_eq!(types, ["\"run.running\"", "\"run.succeeded\""], "{history}");

    // Live: three step ends of a run started once the tail is listening.
    let mut tail = server
        .command(&["events", "tail", "--type", "step.succeeded", "--count", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    ok(&server.run(&["pipeline", "run", "diamond", "--wait"]));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tail.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the tail never saw three steps"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = tail.wait_with_output().unwrap();
    let text = ok(&output);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.lines().all(|l| l.contains(" step.succeeded step:")),
        "{text}"
    );

    let bad = server.run(&["events", "tail", "--type", "Bad!"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("422"), "{}", stderr(&bad));
}
