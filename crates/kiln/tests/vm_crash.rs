//! `kiln serve` SIGKILLed with VMs in every stage of life, with real
//! processes: QEMU dies with kiln (by pid, through its parent-death signal),
//! and the next start removes what was left — run directories and
//! half-written snapshots — so nothing piles up across crashes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_vm::manager::qemu_pids_under;
use kiln_vm::testing::process_alive as alive;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// A `kiln serve` killed when the test ends, however it ends.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// SIGKILL: no shutdown, no VM deleted.
    fn crash(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A data dir with its own copy of the test image, so its snapshots are
/// this test's alone.
async fn data_dir(name: &str) -> PathBuf {
    let image = kiln_vm::testing::test_image().await;
    let dir = std::env::temp_dir().join(kiln_db::testing::unique_name(name));
    let images = dir.join("images/default");
    std::fs::create_dir_all(&images).unwrap();
    for file in ["vmlinux", "initramfs.cpio", "image.json"] {
        std::fs::copy(image.dir.join(file), images.join(file)).unwrap();
    }
    dir
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn serve(dir: &Path, log: &str) -> Server {
    let listen = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join(log)).unwrap();
    let child = Command::new(KILN)
        .args(["serve", "--listen", &listen, "--vm-warm", "0"])
        .env("KILN_DATA_DIR", dir)
        .env("KILN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let server = Server {
        child,
        base: format!("http://{listen}"),
    };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = http
            .get(format!("{}/health", server.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            return server;
        }
        assert!(Instant::now() < deadline, "kiln never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks for a VM in the background; the answer says whether the server
/// lived to give it.
fn create_vm(server: &Server, dir: &Path) -> tokio::task::JoinHandle<Option<serde_json::Value>> {
    let key = std::fs::read_to_string(dir.join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    let url = format!("{}/api/v1/vms", server.base);
    tokio::spawn(async move {
        let answer = reqwest::Client::new()
            .post(url)
            .bearer_auth(key)
            .json(&serde_json::json!({}))
            .send()
            .await
            .ok()?;
        answer.json().await.ok()
    })
}

/// The pid recorded in the one VM run directory under `vms`, once there.
fn recorded_pid(vms: &Path) -> Option<i32> {
    std::fs::read_dir(vms)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .find_map(|e| {
            std::fs::read_to_string(e.path().join("pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
}

fn partial_states(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("images/default/snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "partial"))
        .collect()
}

/// After a crash, QEMU must die with kiln; the next start must leave no
/// QEMU, no run directory and no half-written state.
async fn after_the_crash(dir: &Path, pid: i32) {
    let vms = dir.join("vms");
    wait_until("QEMU to die with kiln", Duration::from_secs(10), || {
        !alive(pid)
    })
    .await;
    assert!(
        kiln_vm::testing::vm_dirs_in(&vms) >= 1,
        "the run directory outlives the crash, for the next start to find"
    );
    let _next = serve(dir, "next.log").await;
    assert_eq!(
        kiln_vm::testing::vm_dirs_in(&vms),
        0,
        "no run directory left"
    );
    assert_eq!(
        partial_states(dir),
        Vec::<PathBuf>::new(),
        "no half-written state left"
    );
    assert_eq!(qemu_pids_under(&vms), Vec::<i32>::new(), "no QEMU left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_killed_with_a_running_vm() {
    let dir = data_dir("kiln-vm-crash-running").await;
    let mut server = serve(&dir, "first.log").await;
    let vm = create_vm(&server, &dir).await.unwrap().expect("a VM");
    let id = vm["id"].as_str().expect("an id");
    let pid: i32 = std::fs::read_to_string(dir.join("vms").join(id).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    server.crash();
    after_the_crash(&dir, pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_killed_while_a_vm_boots() {
    let dir = data_dir("kiln-vm-crash-boot").await;
    let mut server = serve(&dir, "first.log").await;
    let answer = create_vm(&server, &dir);
    let vms = dir.join("vms");
    // The pid is on record before QEMU runs its first instruction.
    let mut pid = None;
    wait_until("QEMU to start", Duration::from_secs(30), || {
        pid = recorded_pid(&vms);
        pid.is_some()
    })
    .await;
    server.crash();
    assert_eq!(
        answer.await.unwrap(),
        None,
        "kiln died before the VM was ready"
    );
    after_the_crash(&dir, pid.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_killed_while_a_snapshot_is_written() {
    // The save takes a fraction of a second; on a loaded machine the kill
    // may land just after it. Only a kill that caught the half-written
    // state counts, and one of a few tries must.
    for attempt in 1..=3 {
        let dir = data_dir("kiln-vm-crash-snapshot").await;
        let mut server = serve(&dir, "first.log").await;
        let answer = create_vm(&server, &dir);
        // The first VM of a shape saves its state for the next ones.
        wait_until("a state to be saved", Duration::from_secs(60), || {
            !partial_states(&dir).is_empty()
        })
        .await;
        server.crash();
        let answered = answer.await.unwrap();
        if partial_states(&dir).len() != 1 {
            eprintln!("attempt {attempt}: the save was over before the kill");
            continue;
        }
        assert_eq!(answered, None, "kiln died before the VM was ready");
        let pid = recorded_pid(&dir.join("vms")).expect("the VM's pid on record");
        after_the_crash(&dir, pid).await;
        return;
    }
    panic!("no kill landed while a state was being written");
}

/// Networked VMs: after a SIGKILL their TAPs go with QEMU, and the next
/// start removes kiln's namespace (bridge, rules) and frees every address,
/// so the next VM gets the first address again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_killed_with_networked_vms_leaves_no_tap_rule_or_address() {
    for tool in ["ip", "nft"] {
        let found = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "`{tool}` is needed (apt-get install iproute2 nftables)"
        );
    }
    let dir = data_dir("kiln-vm-crash-net").await;
    let mut server = serve(&dir, "first.log").await;
    let key = std::fs::read_to_string(dir.join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    let http = reqwest::Client::new();
    let create = |base: String| {
        let (http, key) = (http.clone(), key.clone());
        async move {
            let answer = http
                .post(format!("{base}/api/v1/vms"))
                .bearer_auth(key)
                .json(&serde_json::json!({"network": {"egress": "allow", "allow": ["192.0.2.1:80"], "expose": [8000]}}))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 201);
            answer.json::<serde_json::Value>().await.unwrap()
        }
    };
    let first = create(server.base.clone()).await;
    let second = create(server.base.clone()).await;
    assert_eq!(first["network"]["address"], "10.77.0.2", "{first}");
    assert_eq!(second["network"]["address"], "10.77.0.3", "{second}");
    let ns = kiln_vm::net::host::namespace_for(&dir.join("vms"));
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let links = ip(&["-n", &ns, "-o", "link", "show"]);
    assert!(links.contains(" kt2") && links.contains(" kt3"), "{links}");
    let rules = ip(&["netns", "exec", &ns, "nft", "list", "ruleset"]);
    assert!(
        rules.contains("vm-kt2") && rules.contains("vm-kt3"),
        "{rules}"
    );
    let db = kiln_db::Db::connect(&format!("sqlite://{}", dir.join("kiln.db").display()))
        .await
        .unwrap();
    let rows = || kiln_db::testing::scalar_i64(&db, "SELECT COUNT(*) FROM vm_addresses");
    assert_eq!(rows().await.unwrap(), 2);
    let pids = qemu_pids_under(&dir.join("vms"));
    assert_eq!(pids.len(), 2);

    server.crash();
    for pid in pids {
        wait_until("QEMU to die with kiln", Duration::from_secs(10), || {
            !alive(pid)
        })
        .await;
    }
    // QEMU held the only descriptor of each TAP.
    wait_until("the TAPs to go with QEMU", Duration::from_secs(10), || {
        !ip(&["-n", &ns, "-o", "link", "show"]).contains(" kt")
    })
    .await;

    let next = serve(&dir, "next.log").await;
    assert!(
        !Path::new("/run/netns").join(&ns).exists(),
        "the namespace, its bridge and its rules are gone: {}",
        ip(&["netns", "list"])
    );
    assert_eq!(rows().await.unwrap(), 0, "every address is free again");
    let again = create(next.base.clone()).await;
    assert_eq!(again["network"]["address"], "10.77.0.2", "{again}");
    let rules = ip(&["netns", "exec", &ns, "nft", "list", "ruleset"]);
    assert!(
        rules.contains("vm-kt2") && !rules.contains("vm-kt3"),
        "{rules}"
    );
    db.close().await;
    // The next start would remove it; no next start comes in a test.
    drop(next);
    let _ = Command::new("ip").args(["netns", "delete", &ns]).output();
}
