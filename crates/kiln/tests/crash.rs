//! Crash tests with real processes: a worker killed with SIGKILL while it
//! holds many leases, and a PostgreSQL server stopped and started again
//! under load. Nothing acknowledged may be lost; nothing may succeed twice.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, kiln, wait_until, PgSchema, TempDir};
use kiln_core::{JobStatus, NewJob};
use kiln_db::Db;
use serde_json::json;

async fn count(db: &Db, status: &str) -> i64 {
    db.job_count_by_status(None)
        .await
        .unwrap()
        .get(status)
        .copied()
        .unwrap_or(0)
}

/// Runs the SIGKILL scenario against a database URL both processes share.
async fn killed_worker_loses_nothing(db: Db, url: String) {
    let dir = TempDir::new("kiln-crash");
    let jobs: Vec<NewJob> = (0..1_500)
        .map(|_| {
            let mut job = NewJob::new("acme", "noop", json!({"sleep_ms": 300}));
            job.max_attempts = 3;
            job
        })
        .collect();
    let ids = db
        .job_insert_many(&jobs, kiln_worker::now_millis())
        .await
        .unwrap();
    let args = [
        "worker",
        "--database-url",
        &url,
        "--slots",
        "400",
        "--lease-ms",
        "1500",
    ];
    let mut doomed = kiln(&args, dir.path(), dir.path(), "doomed.log");
    wait_until(
        "the first worker to hold many leases",
        Duration::from_secs(30),
        || async { count(&db, "running").await >= 300 },
    )
    .await;
    doomed.0.kill().unwrap(); // SIGKILL: no hand-back, no goodbye
    doomed.0.wait().unwrap();
    let held = count(&db, "running").await;
    assert!(held >= 300, "the killed worker held {held} leases");
    let _survivor = kiln(&args, dir.path(), dir.path(), "survivor.log");
    wait_until("every job to finish", Duration::from_secs(90), || async {
        count(&db, "succeeded").await == ids.len() as i64
    })
    .await;
    let mut lost_attempts = 0;
    for id in ids {
        let job = db.job_get("acme", id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Succeeded);
        let successes = job
            .history
            .iter()
            .filter(|a| a.outcome == "succeeded")
            .count();
        assert_eq!(successes, 1, "job {id}: {:?}", job.history);
        lost_attempts += job.history.iter().filter(|a| a.outcome == "lost").count();
    }
    assert!(
        lost_attempts as i64 >= held,
        "{lost_attempts} lost attempts recorded for {held} leases"
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_on_postgres() {
    let (schema, db) = PgSchema::new("kiln_crash").await;
    killed_worker_loses_nothing(db, schema.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_on_sqlite() {
    let dir = TempDir::new("kiln-crash-sqlite");
    let url = format!("sqlite://{}", dir.join("kiln.db").display());
    let db = Db::connect(&url).await.unwrap();
    killed_worker_loses_nothing(db, url).await;
}

/// A PostgreSQL server of this test's own, so that stopping it disturbs no
/// other test.
struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

impl PrivatePostgres {
    fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries (.ci/run installs them)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        // Removed by this server's Drop, after the server has stopped.
        let dir = std::env::temp_dir().join(kiln_db::testing::unique_name("kiln-pg"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        as_postgres(&["chown", "-R", "postgres", dir.to_str().unwrap()], true);
        let data = dir.join("data");
        run_as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
        );
        let server = PrivatePostgres { dir, port, bin };
        server.pg_ctl("start");
        server
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, action: &str) {
        let data = self.dir.join("data");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("pg.log");
        let mut args = vec![
            "-D",
            data.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-w",
        ];
        if action == "start" {
            args.extend(["-o", &options]);
        } else {
            args.extend(["-m", "fast"]);
        }
        args.push(action);
        run_as_postgres(&self.bin.join("pg_ctl"), &args);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.pg_ctl("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn as_postgres(args: &[&str], as_root: bool) {
    let status = if as_root {
        Command::new(args[0]).args(&args[1..]).status().unwrap()
    } else {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .status()
            .unwrap()
    };
    assert!(status.success(), "{args:?}");
}

fn run_as_postgres(program: &Path, args: &[&str]) {
    let mut all = vec![program.to_str().unwrap()];
    all.extend_from_slice(args);
    as_postgres(&all, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load_loses_nothing() {
    let server = std::sync::Arc::new(PrivatePostgres::start());
    let dir = TempDir::new("kiln-restart");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _kiln = kiln(
        &[
            "serve",
            "--database-url",
            &server.url(),
            "--listen",
            &listen,
            "--lease-ms",
            "3000",
        ],
        dir.path(),
        dir.path(),
        "serve.log",
    );
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    wait_until("kiln to answer", Duration::from_secs(30), || async {
        http.get(format!("{base}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let key = common::read_key(dir.path());

    let total = 300;
    let mut acknowledged = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..total {
        if i == 100 {
            // Down for three seconds while submissions keep coming.
            server.pg_ctl("stop");
            let server = server.clone();
            tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_secs(3));
                server.pg_ctl("start");
            });
        }
        // Retry with the same idempotency key until kiln acknowledges.
        let asked = Instant::now();
        loop {
            let answer = http
                .post(format!("{base}/api/v1/jobs"))
                .bearer_auth(&key)
                .json(&json!({"kind": "noop", "spec": {"sleep_ms": 20}, "idempotency_key": format!("job-{i}")}))
                .timeout(Duration::from_secs(15))
                .send()
                .await;
            match answer {
                Ok(response) if response.status().is_success() => {
                    let job: serde_json::Value = response.json().await.unwrap();
                    acknowledged.push(job["id"].as_str().unwrap().to_string());
                    slowest = slowest.max(asked.elapsed());
                    break;
                }
                Ok(response) => {
                    assert!(
                        response.status().is_server_error(),
                        "a refusal while the database is down is a 5xx: {}",
                        response.status()
                    );
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Requests made during the outage waited for it (or were refused and
    // retried): one of them took most of the three seconds.
    assert!(
        slowest > Duration::from_secs(2),
        "the outage went unnoticed: {slowest:?}"
    );
    acknowledged.dedup();
    assert_eq!(acknowledged.len(), total);
    for id in &acknowledged {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job: serde_json::Value = http
                .get(format!("{base}/api/v1/jobs/{id}"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if job["status"] == "succeeded" {
                break;
            }
            assert!(Instant::now() < deadline, "job {id} never finished: {job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let db = Db::connect(&server.url()).await.unwrap();
    assert_eq!(count(&db, "succeeded").await, total as i64);
    assert!(db.job_attempts_total().await.unwrap() >= total as i64);
    db.close().await;
}

fn qemus_under(dir: &Path) -> usize {
    kiln_vm::manager::qemu_pids_under(dir).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_server_leaves_no_vm_behind_after_restart() {
    let dir = TempDir::new("kiln-vm-crash");
    common::install_test_image(dir.path()).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let args = ["serve", "--listen", &listen, "--vm-warm", "0"];
    let http = reqwest::Client::new();
    let base = format!("http://{listen}");
    let up = |http: reqwest::Client, base: String| async move {
        wait_until("kiln to answer", Duration::from_secs(60), || async {
            http.get(format!("{base}/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
    };
    let mut first = kiln(&args, dir.path(), dir.path(), "first.log");
    up(http.clone(), base.clone()).await;
    let key = common::read_key(dir.path());
    let vm: serde_json::Value = http
        .post(format!("{base}/api/v1/vms"))
        .bearer_auth(&key)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(vm["id"].is_string(), "{vm}");
    let vms_dir = dir.join("vms");
    assert_eq!(qemus_under(&vms_dir), 1);
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    // QEMU dies with kiln (its parent-death signal); the run directory stays
    // for the next start's reaper.
    wait_until("QEMU to die with kiln", Duration::from_secs(10), || async {
        qemus_under(&vms_dir) == 0
    })
    .await;
    let _second = kiln(&args, dir.path(), dir.path(), "second.log");
    up(http.clone(), base.clone()).await;
    wait_until(
        "the orphan to be reaped",
        Duration::from_secs(10),
        || async { qemus_under(&vms_dir) == 0 },
    )
    .await;
    assert_eq!(
        kiln_vm::testing::vm_dirs_in(&vms_dir),
        0,
        "no VM directory left"
    );
}
