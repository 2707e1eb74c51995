//! Secrets through the binary: `kiln secret set` takes the value from
//! stdin, the master key is made at first start (0600), and
//! `kiln secret rotate-master` re-seals every version under a new key that
//! opens them while the old one no longer does.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{mode_of, serve, KILN};

fn kiln_cli(
    args: &[&str],
    data: &std::path::Path,
    url: &str,
    stdin: Option<&[u8]>,
) -> (bool, String) {
    let mut child = Command::new(KILN)
        .args(args)
        .env("KILN_DATA_DIR", data)
        .env("KILN_URL", url)
        .env("KILN_LOG", "warn")
        .env_remove("KILN_API_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_set_from_stdin_and_survive_a_master_key_rotation() {
    let (_dir, data, base, _server) = serve("kiln-secrets", false).await;
    let key_file = data.join("master.key");
    assert_eq!(mode_of(&key_file), 0o600);
    let old =
        kiln_core::secrets::MasterKey::parse(&std::fs::read_to_string(&key_file).unwrap()).unwrap();

    let value = b"stdin-only-value-123";
    for _ in 0..2 {
        let (ok, out) = kiln_cli(&["secret", "set", "api_token"], &data, &base, Some(value));
        assert!(ok, "{out}");
        assert!(!out.contains("stdin-only-value"), "{out}");
    }
    let (ok, out) = kiln_cli(
        &["secret", "set", "other"],
        &data,
        &base,
        Some(b"second-secret"),
    );
    assert!(ok, "{out}");
    let (ok, list) = kiln_cli(&["secret", "ls"], &data, &base, None);
    assert!(ok, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["secrets"][0]["name"], "api_token", "{list}");
    assert_eq!(list["secrets"][0]["version"], 2, "{list}");
    let (ok, out) = kiln_cli(&["secret", "set", "../escape"], &data, &base, Some(value));
    assert!(!ok, "{out}");

    let (ok, out) = kiln_cli(&["secret", "rotate-master"], &data, &base, None);
    assert!(ok, "{out}");
    assert!(out.contains("re-sealed 3 secret versions"), "{out}");
    let new =
        kiln_core::secrets::MasterKey::parse(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    assert_ne!(new.id(), old.id());
    assert_eq!(mode_of(&key_file), 0o600);
    let kept = std::fs::read_to_string(data.join("master.key.old")).unwrap();
    assert_eq!(
        kiln_core::secrets::MasterKey::parse(&kept).unwrap().id(),
        old.id()
    );

    let db = kiln_db::Db::connect(&format!("sqlite://{}", data.join("kiln.db").display()))
        .await
        .unwrap();
    let taken = db
        .secret_take(
            "default",
            &["api_token".to_string(), "other".to_string()],
            1,
        )
        .await
        .unwrap();
    assert_eq!(taken.len(), 2);
    for version in &taken {
        let at = (
            version.tenant.as_str(),
            version.name.as_str(),
            version.version,
        );
        let opened = kiln_core::secrets::open(&new, at, &version.sealed).unwrap();
        let expected: &[u8] = if version.name == "api_token" {
            value
        } else {
            b"second-secret"
        };
        assert_eq!(opened, expected);
        assert!(kiln_core::secrets::open(&old, at, &version.sealed).is_err());
    }
    // Rotating again moves every version once more.
    let (ok, out) = kiln_cli(&["secret", "rotate-master"], &data, &base, None);
    assert!(ok && out.contains("re-sealed 3 secret versions"), "{out}");
    db.close().await;
}
