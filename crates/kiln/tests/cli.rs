//! The command line through the real binary: settings precedence, and the
//! client commands against a `kiln serve` on a temporary data dir.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{free_port, kiln, until_up, TempDir, KILN};

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(KILN);
    command.args(args).env("KILN_LOG", "warn");
    for name in [
        "KILN_DATA_DIR",
        "KILN_CONFIG",
        "KILN_LISTEN",
        "KILN_WORKER_SLOTS",
        "KILN_DATABASE_URL",
        "KILN_URL",
        "KILN_API_KEY",
        "KILN_BLOB_STORE",
        "KILN_VM_SNAPSHOTS",
        "KILN_VM_CMDLINE",
        "KILN_VM_ACCELERATOR",
        "KILN_QEMU",
        "KILN_QEMU_CPU",
        "KILN_VM_WARM",
        "KILN_VM_WARM_IMAGES",
        "KILN_SCRATCH_DIR",
    ] {
        command.env_remove(name);
    }
    command.envs(envs.iter().copied());
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `kiln config` with a setting in the file, the environment and a flag,
/// in every combination: the flag wins, then the environment, then the file.
#[test]
fn flag_over_environment_over_file_over_default() {
    let dir = TempDir::new("kiln-cli-config");
    let toml = dir.join("kiln.toml");
    std::fs::write(&toml, "slots = 7\nlisten = '127.0.0.1:7000'\n").unwrap();
    let data = dir.path().to_str().unwrap();
    let check = |file: bool, env: bool, flag: bool, expect: &str| {
        let mut args = vec!["config", "--data-dir", data];
        let mut envs = vec![];
        if !file {
            args.extend(["--config", "/dev/null"]);
        }
        if env {
            envs.push(("KILN_WORKER_SLOTS", "5"));
        }
        if flag {
            args.extend(["--slots", "3"]);
        }
        let out = run(&args, &envs);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stdout(&out)
                .lines()
                .any(|l| l == format!("slots = {expect}")),
            "file {file}, env {env}, flag {flag}: {}",
            stdout(&out)
        );
    };
    check(false, false, false, "64");
    check(true, false, false, "7");
    check(true, true, false, "5");
    check(true, true, true, "3");
    check(false, true, false, "5");
    check(false, false, true, "3");
    check(true, false, true, "3");

    let out = run(&["config", "--data-dir", data], &[]);
    let text = stdout(&out);
    assert!(text.contains("listen = 127.0.0.1:7000"), "{text}");
    assert!(text.contains("blob_store = local"), "{text}");
    let out = run(
        &["config", "--data-dir", data],
        &[("KILN_DATABASE_URL", "postgres://kiln:hunter2@db/kiln")],
    );
    let text = stdout(&out);
    assert!(text.contains("blob_store = database"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    // The VM host's variables keep their names and meanings.
    let out = run(
        &["config", "--data-dir", data],
        &[
            ("KILN_VM_SNAPSHOTS", "0"),
            ("KILN_VM_CMDLINE", "quiet loglevel=0"),
            ("KILN_QEMU", "/opt/qemu/bin/qemu-system-x86_64"),
            ("KILN_QEMU_CPU", "max"),
            ("KILN_VM_ACCELERATOR", "tcg"),
        ],
    );
    let text = stdout(&out);
    for line in [
        "vm_snapshots = false",
        "vm_cmdline = quiet loglevel=0",
        "qemu = /opt/qemu/bin/qemu-system-x86_64",
        "qemu_cpu = max",
        "vm_accelerator = tcg",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}: {text}");
    }

    std::fs::write(&toml, "slotz = 7\n").unwrap();
    let out = run(&["config", "--data-dir", data], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("slotz"), "{}", stderr(&out));
}

fn client(data: &Path, base: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--url", base, "--data-dir", data.to_str().unwrap()]);
    run(&all, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_against_a_server() {
    let dir = TempDir::new("kiln-cli");
    let data = dir.join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let _serve = kiln(
        &["serve", "--listen", &listen, "--vm-warm", "0"],
        &data,
        dir.path(),
        "serve.log",
    );
    until_up(&base, Duration::from_secs(60)).await;
    let wat = dir.join("hello.wat");
    std::fs::write(&wat, kiln_wasm::fixtures::hello()).unwrap();
    let wat = wat.to_str().unwrap();

    let pushed = client(&data, &base, &["module", "push", wat]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let id = stdout(&pushed).trim().to_string();
    assert!(id.starts_with("sha256:"), "{id}");
    let listed = client(&data, &base, &["module", "ls"]);
    assert!(stdout(&listed).contains(&id), "{}", stdout(&listed));

    let ran = client(&data, &base, &["run", "wasm", &id]);
    assert_eq!(ran.status.code(), Some(0), "{}", stderr(&ran));
    assert_eq!(stdout(&ran), "hello world\n");

    // The live logs: the job's whole output, followed or not; the
    // server's own lines for the deployment's key.
    let jobs = client(&data, &base, &["job", "ls", "--kind", "wasm"]);
    let wasm_job = stdout(&jobs)
        .split(|c: char| !c.is_ascii_digit())
        .find(|word| !word.is_empty())
        .unwrap_or_default()
        .to_string();
    let logs = client(&data, &base, &["job", "logs", &wasm_job]);
    assert_eq!(stdout(&logs), "hello world\n", "{}", stderr(&logs));
    let followed = client(&data, &base, &["job", "logs", "-f", &wasm_job]);
    assert_eq!(followed.status.code(), Some(0), "{}", stderr(&followed));
    assert_eq!(stdout(&followed), "hello world\n");
    assert!(
        stderr(&followed).contains("succeeded"),
        "{}",
        stderr(&followed)
    );
    let all = client(&data, &base, &["logs", "--source", "job", "-q", "hello"]);
    assert!(
        stdout(&all).contains(&format!("job {wasm_job}")),
        "{}",
        stdout(&all)
    );
    assert!(
        stdout(&all).ends_with("| hello world\n"),
        "{}",
        stdout(&all)
    );
    let node = client(
        &data,
        &base,
        &["logs", "--source", "node", "-q", "roles started"],
    );
    assert!(stdout(&node).contains("roles started"), "{}", stderr(&node));
    let bad = client(&data, &base, &["logs", "--level", "loud"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("422"), "{}", stderr(&bad));

    let submitted = client(
        &data,
        &base,
        &[
            "job",
            "submit",
            "--kind",
            "noop",
            "--wait",
            "--label",
            "team=core",
        ],
    );
    assert!(submitted.status.success(), "{}", stderr(&submitted));
    let job: serde_json::Value = serde_json::from_str(&stdout(&submitted)).unwrap();
    let job_id = job["id"].as_str().unwrap();
    let waited = client(&data, &base, &["job", "wait", job_id]);
    assert_eq!(waited.status.code(), Some(0), "{}", stderr(&waited));
    let listed = client(&data, &base, &["job", "ls", "--label", "team:core"]);
    assert!(stdout(&listed).contains(job_id), "{}", stdout(&listed));

    // The dashboard, one frame: the admin key is the deployment's, so it
    // sees every tenant and the fleet; both jobs above are counted.
    let top = client(&data, &base, &["top", "--once"]);
    assert!(top.status.success(), "{}", stderr(&top));
    let frame = stdout(&top);
    assert!(
        frame.starts_with("kiln top · every tenant · last 1h · "),
        "{frame}"
    );
    assert!(frame.contains("|  succeeded 2  failed 0"), "{frame}");
    assert!(frame.contains("nodes online 1"), "{frame}");
    assert!(frame.contains("run time  p50 "), "{frame}");
    let week = client(&data, &base, &["top", "--once", "--range", "7d"]);
    assert!(stdout(&week).contains(" · last 7d · "), "{}", stdout(&week));
    let bad = client(&data, &base, &["top", "--once", "--range", "2d"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("unknown range"), "{}", stderr(&bad));

    let queues = client(&data, &base, &["queue", "ls"]);
    assert!(stdout(&queues).contains("default"), "{}", stdout(&queues));
    let limited = client(&data, &base, &["queue", "limit", "default", "5"]);
    assert!(limited.status.success(), "{}", stderr(&limited));

    // Errors from the API reach the user with their status and code.
    let missing = client(&data, &base, &["job", "get", "999999"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("404"), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("not_found"),
        "{}",
        stderr(&missing)
    );
    let bad_key = run(
        &["job", "ls", "--url", &base, "--key", "kiln_nope_nope"],
        &[],
    );
    assert_eq!(bad_key.status.code(), Some(2));
    assert!(stderr(&bad_key).contains("401"), "{}", stderr(&bad_key));
    let raw_missing = client(
        &data,
        &base,
        &["vm", "cp", "vm-1:/etc/hostname", "/dev/null"],
    );
    assert_eq!(raw_missing.status.code(), Some(2));
    assert!(
        stderr(&raw_missing).contains("503"),
        "{}",
        stderr(&raw_missing)
    );

    let keys = run(&["keys", "list", "--data-dir", data.to_str().unwrap()], &[]);
    assert!(stdout(&keys).contains("admin"), "{}", stdout(&keys));
}

/// Rules through the command line against `kiln serve`, whose scheduler
/// loops run the rule engine: a YAML file applied, listed, dry-run with an
/// event from a file, fired by a real job, its actions listed, removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_through_the_command_line() {
    let dir = TempDir::new("kiln-cli-rules");
    let data = dir.join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let _serve = kiln(
        &["serve", "--listen", &listen, "--vm-warm", "0"],
        &data,
        dir.path(),
        "serve.log",
    );
    until_up(&base, Duration::from_secs(60)).await;
    let file = dir.join("rule.yaml");
    std::fs::write(
        &file,
        "name: hold-rq\n\
         trigger:\n  events: [job.succeeded]\n\
         condition: event.data.queue == 'rq'\n\
         actions:\n  - action: pause_queue\n    queue: ${event.data.queue}\n\
         cooldown_s: 0\n",
    )
    .unwrap();
    let applied = client(
        &data,
        &base,
        &["rule", "apply", "-f", file.to_str().unwrap()],
    );
    assert!(applied.status.success(), "{}", stderr(&applied));
    assert!(
        stdout(&applied).contains("rule hold-rq applied"),
        "{}",
        stdout(&applied)
    );
    let listed = client(&data, &base, &["rule", "ls"]);
    assert!(stdout(&listed).contains("hold-rq"), "{}", stdout(&listed));
    assert!(
        stdout(&listed).contains("job.succeeded"),
        "{}",
        stdout(&listed)
    );

    let event = dir.join("event.json");
    std::fs::write(
        &event,
        r#"{"type": "job.succeeded", "data": {"queue": "rq"}}"#,
    )
    .unwrap();
    let dry = client(
        &data,
        &base,
        &["rule", "dry-run", "hold-rq", "-f", event.to_str().unwrap()],
    );
    assert!(dry.status.success(), "{}", stderr(&dry));
    let report: serde_json::Value = serde_json::from_str(&stdout(&dry)).unwrap();
    assert_eq!(report["would_fire"], true, "{report}");
    assert_eq!(report["actions"][0]["would_run"]["queue"], "rq", "{report}");

    // A bad rule is refused with the field named.
    std::fs::write(
        &file,
        "name: bad\ntrigger: {}\nactions: [{action: explode}]\n",
    )
    .unwrap();
    let refused = client(
        &data,
        &base,
        &["rule", "apply", "-f", file.to_str().unwrap()],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("actions[0].action"),
        "{}",
        stderr(&refused)
    );

    // A real job fires it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ran = client(
        &data,
        &base,
        &["job", "submit", "--kind", "noop", "--queue", "rq", "--wait"],
    );
    assert!(ran.status.success(), "{}", stderr(&ran));
    let mut taken = String::new();
    for _ in 0..200 {
        taken = stdout(&client(&data, &base, &["rule", "actions", "hold-rq"]));
        if taken.contains("pause_queue") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        taken.contains("pause_queue") && taken.contains("ok"),
        "{taken}"
    );
    let queues = client(&data, &base, &["queue", "ls"]);
    assert!(
        stdout(&queues)
            .lines()
            .any(|l| l.contains("rq") && l.contains("paused")),
        "{}",
        stdout(&queues)
    );
    let removed = client(&data, &base, &["rule", "rm", "hold-rq"]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    let gone = client(&data, &base, &["rule", "get", "hold-rq"]);
    assert_eq!(gone.status.code(), Some(2));
}

/// A role that cannot start (its port is taken) stops the process with a
/// clear message instead of leaving the other roles running.
#[test]
fn a_role_that_cannot_start_stops_the_server() {
    let dir = TempDir::new("kiln-cli-taken");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let out = run(
        &[
            "serve",
            "--listen",
            &listen,
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!("listening on {listen}")),
        "{}",
        stderr(&out)
    );
}
