//! The audit trail through the binary: `kiln serve` killed while clients
//! submit leaves a job only with its record and a whole chain, which
//! `kiln audit verify` confirms after the restart; `kiln audit ls` and
//! `export` read it back; a row edited in the database file is named.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, kiln, read_key, until_up, TempDir, KILN};

fn kiln_cli(args: &[&str], data: &std::path::Path, url: &str, key: &str) -> (i32, String) {
    let out = Command::new(KILN)
        .args(args)
        .env("KILN_DATA_DIR", data)
        .env("KILN_URL", url)
        .env("KILN_API_KEY", key)
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_leaves_every_job_with_its_record_and_a_whole_chain() {
    let dir = TempDir::new("kiln-audit");
    let data = dir.join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let mut server = kiln(
        &["serve", "--listen", &listen],
        &data,
        dir.path(),
        "serve.log",
    );
    until_up(&base, Duration::from_secs(60)).await;
    let key = read_key(&data);

    // Clients submit as fast as they can; the server dies under them.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (base, key, stop) = (base.clone(), key.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut ok = 0u32;
            while !stop.is_cancelled() {
                let sent = http
                    .post(format!("{base}/api/v1/jobs"))
                    .bearer_auth(&key)
                    .json(&serde_json::json!({"kind": "noop", "spec": {}}))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 201 => ok += 1,
                    _ => break,
                }
            }
            ok
        }));
    }
    common::wait_until("submissions", Duration::from_secs(30), || async {
        clients.iter().all(|c| !c.is_finished())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    stop.cancel();
    let mut accepted = 0;
    for c in clients {
        accepted += c.await.unwrap();
    }
    assert!(accepted > 10, "only {accepted} jobs were accepted");

    // Every stored job has its record: they were written together.
    let db = kiln_db::Db::connect(&format!("sqlite://{}", data.join("kiln.db").display()))
        .await
        .unwrap();
    let jobs = kiln_db::testing::column_i64(&db, "SELECT id FROM jobs ORDER BY id")
        .await
        .unwrap();
    let audited = kiln_db::testing::text_rows(
        &db,
        "SELECT resource FROM audit WHERE action = 'POST /api/v1/jobs' ORDER BY id",
    )
    .await
    .unwrap();
    assert!(
        jobs.len() >= accepted as usize,
        "{} < {accepted}",
        jobs.len()
    );
    let audited: std::collections::HashSet<String> = audited.into_iter().collect();
    for id in &jobs {
        assert!(
            audited.contains(&format!("/api/v1/jobs/{id}")),
            "job {id} has no audit record"
        );
    }
    db.close().await;

    // Restarted, the trail reads back and verifies whole.
    let _server = kiln(
        &["serve", "--listen", &listen],
        &data,
        dir.path(),
        "serve2.log",
    );
    until_up(&base, Duration::from_secs(60)).await;
    let (code, out) = kiln_cli(&["audit", "ls", "--limit", "3"], &data, &base, &key);
    assert_eq!(code, 0, "{out}");
    let page: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(page["records"].as_array().unwrap().len(), 3, "{out}");
    assert_eq!(page["records"][0]["action"], "POST /api/v1/jobs");
    let (code, out) = kiln_cli(
        &["audit", "export", "--action", "POST /api/v1/jobs"],
        &data,
        &base,
        &key,
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), jobs.len(), "one line per job");
    let (code, out) = kiln_cli(&["audit", "verify"], &data, &base, &key);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the trail is whole"), "{out}");
    assert!(out.contains(&format!("{} records", jobs.len())), "{out}");

    // An edit in the database file is named, and the exit code says so.
    let db = kiln_db::Db::connect(&format!("sqlite://{}", data.join("kiln.db").display()))
        .await
        .unwrap();
    kiln_db::testing::execute(
        &db,
        "UPDATE audit SET actor = 'someone-else' \
         WHERE id = (SELECT id FROM audit_links WHERE seq = 2)",
    )
    .await
    .unwrap();
    db.close().await;
    let (code, out) = kiln_cli(&["audit", "verify"], &data, &base, &key);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("record 2") && out.contains("modified"),
        "{out}"
    );
}
