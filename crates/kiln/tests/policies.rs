//! `kiln policy` through the real binary against a `kiln serve`: set with
//! kinds, list, get, a dry run that refuses and one that admits, a real
//! submission refused, removal.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{free_port, kiln, until_up, TempDir, KILN};

fn client(data: &Path, base: &str, args: &[&str]) -> Output {
    let mut command = Command::new(KILN);
    command
        .args(args)
        .args(["--url", base, "--data-dir", data.to_str().unwrap()])
        .env("KILN_LOG", "warn")
        .env_remove("KILN_URL")
        .env_remove("KILN_API_KEY")
        .env_remove("KILN_DATA_DIR");
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_through_the_command_line() {
    let dir = TempDir::new("kiln-cli-policy");
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

    let set = client(
        &data,
        &base,
        &[
            "policy",
            "set",
            "team",
            "--rule",
            r#"job.kind != "vm" || job.labels.team != null"#,
            "--message",
            "vm jobs need a team label",
            "--kinds",
            "vm,noop",
        ],
    );
    assert!(set.status.success(), "{}", stderr(&set));
    assert_eq!(stdout(&set), "policy team set\n");
    let bad = client(
        &data,
        &base,
        &["policy", "set", "bad", "--rule", "job.kind =="],
    );
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("invalid_rule"), "{}", stderr(&bad));

    let listed = client(&data, &base, &["policy", "ls"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let line = stdout(&listed)
        .lines()
        .find(|l| l.starts_with("team "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{}", stdout(&listed)));
    assert!(line.contains("vm,noop"), "{line}");
    let got = client(&data, &base, &["policy", "get", "team"]);
    let got: serde_json::Value = serde_json::from_str(&stdout(&got)).unwrap();
    assert_eq!(got["message"], "vm jobs need a team label");
    assert_eq!(got["applies_to"], serde_json::json!(["vm", "noop"]));

    let job = dir.join("job.json");
    std::fs::write(&job, r#"{"kind": "vm", "spec": {"command": "true"}}"#).unwrap();
    let tested = client(
        &data,
        &base,
        &["policy", "test", "--job", job.to_str().unwrap()],
    );
    assert_eq!(tested.status.code(), Some(1), "{}", stderr(&tested));
    assert!(
        stdout(&tested).contains(
            "refused: policy team: vm jobs need a team label (job.kind = \"vm\", job.labels.team = null)"
        ),
        "{}",
        stdout(&tested)
    );
    std::fs::write(
        &job,
        r#"{"kind": "vm", "spec": {"command": "true"}, "labels": {"team": "a"}}"#,
    )
    .unwrap();
    let tested = client(
        &data,
        &base,
        &["policy", "test", "--job", job.to_str().unwrap()],
    );
    assert_eq!(tested.status.code(), Some(0), "{}", stderr(&tested));
    assert!(
        stdout(&tested).ends_with("admitted\n"),
        "{}",
        stdout(&tested)
    );

    // A real submission of a refused job.
    let refused = client(
        &data,
        &base,
        &[
            "policy", "set", "none", "--rule", "false", "--kinds", "noop",
        ],
    );
    assert!(refused.status.success(), "{}", stderr(&refused));
    let ran = client(&data, &base, &["job", "submit", "--kind", "noop"]);
    assert!(!ran.status.success());
    assert!(stderr(&ran).contains("policy_denied"), "{}", stderr(&ran));

    for name in ["team", "none"] {
        let removed = client(&data, &base, &["policy", "rm", name]);
        assert!(removed.status.success(), "{}", stderr(&removed));
    }
    let gone = client(&data, &base, &["policy", "get", "team"]);
    assert!(!gone.status.success());
    assert!(
        stderr(&gone).contains("404") || stderr(&gone).contains("not_found"),
        "{}",
        stderr(&gone)
    );
    let ran = client(&data, &base, &["job", "submit", "--kind", "noop"]);
    assert!(ran.status.success(), "{}", stderr(&ran));
}
