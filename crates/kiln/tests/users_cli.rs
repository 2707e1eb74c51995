//! Users through the command line against a real `kiln serve`: the token
//! key made at start (0600), users created with the password on stdin,
//! listed, signed in with `kiln login`, the token used as a key, roles
//! changed, the token key rotated under the running server, and keys that
//! expire shown with their last use by `kiln keys ls`.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{free_port, kiln, until_up, TempDir, KILN};

const PASSWORD: &str = "correct horse battery";

/// Runs kiln with `stdin` as its standard input.
fn run(data: &Path, base: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(KILN)
        .args(args)
        .env("KILN_LOG", "warn")
        .env("KILN_DATA_DIR", data)
        .env("KILN_URL", base)
        .env_remove("KILN_API_KEY")
        .env_remove("KILN_DATABASE_URL")
        .env_remove("KILN_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_through_the_command_line() {
    let dir = TempDir::new("kiln-cli-users");
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
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("token.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let made = run(
        &data,
        &base,
        &["users", "create", "ada", "--role", "operator"],
        &format!("{PASSWORD}\n"),
    );
    assert!(made.status.success(), "{}", text(&made.stderr));
    let short = run(
        &data,
        &base,
        &["users", "create", "bob", "--role", "viewer"],
        "short\n",
    );
    assert!(!short.status.success());
    let listed = run(&data, &base, &["users", "ls"], "");
    assert!(
        text(&listed.stdout).contains("\"ada\""),
        "{}",
        text(&listed.stdout)
    );
    assert!(text(&listed.stdout).contains("operator"));

    let wrong = run(&data, &base, &["login", "ada"], "not the password at all\n");
    assert!(!wrong.status.success());
    assert!(
        text(&wrong.stderr).contains("401"),
        "{}",
        text(&wrong.stderr)
    );
    // A failure makes the next attempt wait a second.
    let soon = run(&data, &base, &["login", "ada"], &format!("{PASSWORD}\n"));
    assert!(text(&soon.stderr).contains("429"), "{}", text(&soon.stderr));
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let login = run(
        &data,
        &base,
        &["login", "--tenant", "default", "ada"],
        &format!("{PASSWORD}\n"),
    );
    assert!(login.status.success(), "{}", text(&login.stderr));
    let token = text(&login.stdout).trim().to_string();
    assert_eq!(token.matches('.').count(), 2, "{token}");

    // The token is a credential like a key: an operator submits jobs.
    let submitted = run(
        &data,
        &base,
        &["job", "submit", "--kind", "noop", "--key", &token],
        "",
    );
    assert!(submitted.status.success(), "{}", text(&submitted.stderr));
    // A viewer does not.
    let role = run(&data, &base, &["users", "role", "ada", "viewer"], "");
    assert!(role.status.success(), "{}", text(&role.stderr));
    let refused = run(
        &data,
        &base,
        &["job", "submit", "--kind", "noop", "--key", &token],
        "",
    );
    assert!(
        text(&refused.stderr).contains("401"),
        "the role change ended the session: {}",
        text(&refused.stderr)
    );

    // The key file rotates under the running server: the old token stays
    // good, new ones carry the new key.
    let login = run(&data, &base, &["login", "ada"], &format!("{PASSWORD}\n"));
    let old = text(&login.stdout).trim().to_string();
    let rotated = run(&data, &base, &["users", "rotate-token-key"], "");
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));
    assert_eq!(
        std::fs::read_to_string(data.join("token.key"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let login = run(&data, &base, &["login", "ada"], &format!("{PASSWORD}\n"));
    let new = text(&login.stdout).trim().to_string();
    assert_ne!(old.split('.').next(), new.split('.').next(), "another kid");
    for token in [&old, &new] {
        let listed = run(&data, &base, &["job", "ls", "--key", token], "");
        assert!(listed.status.success(), "{}", text(&listed.stderr));
    }

    // Keys that expire, with their last use.
    let key = run(
        &data,
        &base,
        &[
            "keys",
            "create",
            "--name",
            "short",
            "--scopes",
            "read",
            "--expires-in-s",
            "3600",
        ],
        "",
    );
    assert!(key.status.success(), "{}", text(&key.stderr));
    let secret = text(&key.stdout).trim().to_string();
    let used = run(&data, &base, &["job", "ls", "--key", &secret], "");
    assert!(used.status.success(), "{}", text(&used.stderr));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let keys = run(&data, &base, &["key", "ls"], "");
    let line = text(&keys.stdout)
        .lines()
        .find(|l| l.contains("\tshort\t"))
        .unwrap()
        .to_string();
    let columns: Vec<&str> = line.split('\t').collect();
    assert_eq!(columns[4], "active", "{line}");
    assert!(
        columns[5].ends_with('Z') && columns[6].ends_with('Z'),
        "expiry and last use: {line}"
    );

    let removed = run(&data, &base, &["users", "rm", "ada"], "");
    assert!(removed.status.success(), "{}", text(&removed.stderr));
    let listed = run(&data, &base, &["job", "ls", "--key", &new], "");
    assert!(!listed.status.success());
}
