//! Real VMs: the image is built from Debian packages, booted under QEMU
//! `microvm` with the accelerator the probe picks, and driven through the
//! agent and the manager.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_vm::image::{Image, ImageError};
use kiln_vm::manager::{probe_accelerator, qemu_pids_under};
use kiln_vm::{testing, Exec, VmError, VmManager, VmManagerConfig, VmRequest};

fn sh(script: &str) -> Exec {
    Exec {
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Exec::default()
    }
}

fn request(memory_mib: u32) -> VmRequest {
    VmRequest {
        tenant: "acme".into(),
        image: "default".into(),
        vcpus: 1,
        memory_mib,
        ttl: None,
        idle_timeout: None,
        labels: BTreeMap::new(),
        network: None,
    }
}

fn work_dir(name: &str) -> std::path::PathBuf {
    let work = std::env::temp_dir().join(format!("kiln-vm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    work
}

async fn manager_with(name: &str, config: VmManagerConfig) -> std::sync::Arc<VmManager> {
    testing::test_image().await;
    let work = work_dir(name);
    VmManager::start(&testing::images_dir(), &work.join("vms"), config)
        .await
        .unwrap()
}

async fn manager(name: &str) -> std::sync::Arc<VmManager> {
    manager_with(name, VmManagerConfig::default()).await
}

fn qemu_running_in(dir: &std::path::Path) -> bool {
    !qemu_pids_under(dir).is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_runs_commands_and_moves_files() {
    let vms = manager("basic").await;
    let image = testing::test_image().await;
    let vm = vms.create(request(160)).await.unwrap();
    let agent = vms.agent("acme", &vm.id).await.unwrap();
    assert!(
        vms.agent("globex", &vm.id).await.is_none(),
        "another tenant's VM is invisible"
    );

    let uname = agent
        .exec(
            Exec {
                command: "uname".into(),
                args: vec!["-r".into()],
                ..Exec::default()
            },
            b"",
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uname.stdout).trim(),
        image.manifest.kernel_release
    );

    let out = agent
        .exec(sh("echo out; echo err >&2; exit 7"), b"")
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code),
        (&b"out\n"[..], &b"err\n"[..], Some(7))
    );

    let mut exec = sh("cat; echo \"$GREETING\"; pwd");
    exec.env.insert("GREETING".into(), "hello".into());
    exec.cwd = Some("/tmp".into());
    let out = agent.exec(exec, b"piped\n").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped\nhello\n/tmp\n");

    let out = agent
        .exec(sh("head -c 5000000 /dev/zero"), b"")
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.len(), out.truncated),
        (kiln_vm::agent::OUTPUT_CAP, true),
        "large output is capped as it arrives"
    );

    let mut slow = sh("sleep 30");
    slow.timeout_ms = Some(300);
    let out = agent.exec(slow, b"").await.unwrap();
    assert!(out.timed_out && out.signal == Some(9), "{out:?}");
    let out = agent.exec(sh("echo alive"), b"").await.unwrap();
    assert_eq!(
        out.stdout, b"alive\n",
        "the VM stays usable after a timeout"
    );

    let data: Vec<u8> = (0..10 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    agent
        .write_file("/tmp/blob.bin", &data, None)
        .await
        .unwrap();
    assert_eq!(agent.read_file("/tmp/blob.bin").await.unwrap(), data);
    let sum = agent.exec(sh("wc -c < /tmp/blob.bin"), b"").await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sum.stdout).trim(),
        (10 << 20).to_string()
    );

    let mem = agent
        .exec(sh("grep MemTotal /proc/meminfo"), b"")
        .await
        .unwrap();
    let kib: u64 = String::from_utf8_lossy(&mem.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        kib <= 160 * 1024 && kib > 64 * 1024,
        "guest memory follows the request: {kib} KiB"
    );

    let net = agent.exec(sh("ls /sys/class/net"), b"").await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&net.stdout).trim(),
        "lo",
        "no network interface but lo"
    );

    let run_dir = vms.vm_dir().join(&vm.id);
    assert!(qemu_running_in(&run_dir));
    assert!(vms.delete("acme", &vm.id).await);
    assert!(!run_dir.exists(), "delete leaves no files");
    assert!(!qemu_running_in(&run_dir), "delete leaves no process");
    assert!(vms.get("acme", &vm.id).await.is_none());
}

/// Expiry is decided on state, not on sleeps: a TTL of zero is over at
/// once; an idle timeout of zero is over at once unless a command runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttls_expire_and_idle_expiry_spares_a_vm_running_a_command() {
    let vms = manager("expiry").await;
    let mut life = vms.lifecycle();
    let mut short = request(128);
    short.ttl = Some(Duration::ZERO);
    let vm = vms.create(short).await.unwrap();
    assert_eq!(vms.expire().await, 1);
    // The event log hears of both ends, and why it ended.
    let created = life.recv().await.unwrap();
    assert_eq!(
        (created.kind, created.info.id.as_str()),
        ("vm.created", vm.id.as_str())
    );
    let expired = life.recv().await.unwrap();
    assert_eq!(
        (expired.kind, expired.info.id.as_str(), expired.reason),
        ("vm.expired", vm.id.as_str(), Some("ttl"))
    );
    assert!(vms.get("acme", &vm.id).await.is_none());
    assert!(!vms.vm_dir().join(&vm.id).exists());

    let mut idle = request(128);
    idle.idle_timeout = Some(Duration::ZERO);
    let vm = vms.create(idle).await.unwrap();
    let agent = vms.use_agent("acme", &vm.id).await.unwrap();
    // Set before the agent is let go: an expiry seen after it is fair.
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let exec = tokio::spawn({
        let ended = ended.clone();
        async move {
            let out = agent.exec(sh("sleep 2; echo done"), b"").await;
            ended.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(agent);
            out
        }
    });
    let mut checks = 0;
    let mut expired = false;
    while !exec.is_finished() {
        if vms.expire().await == 1 {
            assert!(
                ended.load(std::sync::atomic::Ordering::SeqCst),
                "a VM running a command is not idle"
            );
            expired = true;
            break;
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = exec.await.unwrap().unwrap();
    assert_eq!(out.stdout, b"done\n", "the command ran to its end");
    assert!(checks > 0);
    if !expired {
        assert_eq!(vms.expire().await, 1, "idle once the command is over");
    }
    assert!(vms.get("acme", &vm.id).await.is_none());
    assert_eq!(life.recv().await.unwrap().kind, "vm.created");
    let idled = life.recv().await.unwrap();
    assert_eq!((idled.kind, idled.reason), ("vm.expired", Some("idle")));

    // A TTL beyond the maximum is cut to it instead of overflowing.
    let mut forever = request(128);
    forever.ttl = Some(Duration::MAX);
    let vm = vms.create(forever).await.unwrap();
    let max_ms = VmManagerConfig::default().ttl_max_s as i64 * 1000;
    assert_eq!(vm.expires_at_ms, Some(vm.created_at_ms + max_ms));
    assert_eq!(vms.expire().await, 0);
    assert!(vms.delete("acme", &vm.id).await);
}

/// A create whose future is dropped mid-boot (a job killed while its VM
/// boots) leaves no QEMU and no run directory, and gives its room back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_dropped_mid_boot_leaves_nothing() {
    let mut config = VmManagerConfig {
        snapshots: false,
        ..VmManagerConfig::default()
    };
    config.host.vms_max = 1;
    let vms = manager_with("dropped", config).await;
    let creating = tokio::spawn({
        let vms = vms.clone();
        async move { vms.create(request(128)).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Some(pid) = qemu_pids_under(vms.vm_dir()).first() {
            break *pid;
        }
        assert!(std::time::Instant::now() < deadline, "QEMU never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    creating.abort();
    assert!(
        creating.await.unwrap_err().is_cancelled(),
        "dropped while booting"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while testing::process_alive(pid) || testing::vm_dirs_in(vms.vm_dir()) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU or its run directory outlived the dropped create"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let vm = vms
        .create(request(128))
        .await
        .expect("the host slot was given back");
    assert!(vms.delete("acme", &vm.id).await);
}

/// Hostile image names — traversal, absolute paths, quotes and shell
/// words, commas — are refused by `Image::open` and by VM create, before
/// anything is created, even where a bootable image waits at the path the
/// name points to (the old `exec:cat` save would have run the shell words).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_image_names_are_refused_and_run_nothing() {
    let image = testing::test_image().await;
    let work = work_dir("names");
    let images = work.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let marker = work.join("pwned");
    let absolute = work.join("elsewhere").to_string_lossy().into_owned();
    let names = [
        "../outside".to_string(),
        absolute.clone(),
        format!("../evil/x';touch {};'", marker.display()),
        "a'b;touch /tmp/pwned;'".to_string(),
        "with,comma".to_string(),
        "default/../../outside".to_string(),
        "Upper".to_string(),
        String::new(),
    ];
    let plant = |dir: std::path::PathBuf| {
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["vmlinux", "initramfs.cpio", "image.json"] {
            std::fs::copy(image.dir.join(file), dir.join(file)).unwrap();
        }
    };
    for name in &names[..3] {
        plant(images.join(name));
    }
    // A link inside the images dir that points out of it.
    plant(work.join("linked"));
    std::os::unix::fs::symlink(work.join("linked"), images.join("linked")).unwrap();
    for name in &names {
        assert!(
            matches!(Image::open(&images, name), Err(ImageError::BadName(_))),
            "{name:?} is not an identifier"
        );
    }
    assert!(matches!(
        Image::open(&images, "linked"),
        Err(ImageError::Outside { .. })
    ));
    let vms = VmManager::new(&images, &work.join("vms"), kiln_vm::Accelerator::Tcg).unwrap();
    for name in names.iter().chain([&"linked".to_string()]) {
        let mut hostile = request(128);
        hostile.image = name.clone();
        let refused = vms.create(hostile).await.unwrap_err();
        assert!(matches!(refused, VmError::Image(_)), "{name:?}: {refused}");
    }
    assert_eq!(testing::vm_dirs_in(vms.vm_dir()), 0, "no VM was started");
    assert!(!marker.exists(), "no shell ran");
    for planted in [work.join("outside"), work.join("evil"), work.join("linked")] {
        let snapshots = std::fs::read_dir(&planted)
            .unwrap()
            .flatten()
            .any(|e| e.file_name() == "snapshots");
        assert!(!snapshots, "nothing written outside the images dir");
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// A tenant at its VM count or memory quota is refused, and so is a VM the
/// host has no slot for, before any boot; deleting gives the room back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_and_host_capacity_refuse_before_booting() {
    let mut config = VmManagerConfig::default();
    config.quotas.vms_live_max = 1;
    config.quotas.vm_memory_mib_max = 200;
    config.host.vms_max = 1;
    config.host.retry_after_s = 3;
    let vms = manager_with("quota", config).await;
    let first = vms.create(request(128)).await.unwrap();
    let again = vms.create(request(128)).await.unwrap_err();
    assert!(
        matches!(&again, VmError::QuotaExceeded(q) if q.what == "live VMs" && q.limit == 1),
        "{again}"
    );
    let mut big = request(256);
    big.tenant = "globex".into();
    let big = vms.create(big).await.unwrap_err();
    assert!(
        matches!(&big, VmError::QuotaExceeded(q) if q.limit == 200),
        "{big}"
    );
    let mut other = request(128);
    other.tenant = "globex".into();
    let full = vms.create(other.clone()).await.unwrap_err();
    assert!(
        matches!(
            full,
            VmError::NoCapacity {
                retry_after_s: 3,
                ..
            }
        ),
        "{full}"
    );
    assert_eq!(
        testing::vm_dirs_in(vms.vm_dir()),
        1,
        "nothing was booted for a refusal"
    );
    assert!(vms.delete("acme", &first.id).await);
    let second = vms.create(other).await.unwrap();
    assert!(vms.delete("globex", &second.id).await);

    let mut config = VmManagerConfig::default();
    config.host.memory_mib = Some(150);
    let small_host = manager_with("quota-host-memory", config).await;
    let refused = small_host.create(request(128)).await.unwrap_err();
    assert!(
        matches!(refused, VmError::NoCapacity { .. }),
        "128 MiB and QEMU's overhead do not fit in 150 MiB: {refused}"
    );
}

/// QEMU runs under its seccomp filter, as an unprivileged user when kiln is
/// root, in a cgroup with `memory.max` where the machine's cgroup tree
/// allows it, and holds no shell URI or kiln path it could open itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_confined() {
    // A comma in the data dir must not start a QEMU option.
    let vms = manager("confined,x=y").await;
    let vm = vms.create(request(128)).await.unwrap();
    let pid = vm.pid.unwrap();
    let cmdline: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(
        cmdline
            .windows(2)
            .any(|w| w[0] == "-sandbox" && w[1] == kiln_vm::qemu::SANDBOX),
        "{cmdline:?}"
    );
    assert!(!cmdline.iter().any(|a| a.contains("exec:")), "{cmdline:?}");
    assert!(
        !cmdline
            .iter()
            .any(|a| a.contains(&*testing::images_dir().to_string_lossy())),
        "QEMU is handed the kernel and initrd, not their paths: {cmdline:?}"
    );
    eprintln!("QEMU command line: {}", cmdline.join(" "));
    let run_dir = std::fs::metadata(vms.vm_dir().join(&vm.id)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&run_dir.permissions()) & 0o777,
        0o700,
        "the run directory, with the QMP socket, is private"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(field("Seccomp:"), "2", "a seccomp filter is installed");
    let uid: u32 = field("Uid:").parse().unwrap();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        assert_ne!(uid, 0, "QEMU does not run as root");
        eprintln!("running as root: QEMU runs as uid {uid}");
    } else {
        assert_eq!(uid, euid);
        eprintln!("not root: QEMU runs as the test's own user");
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    match kiln_vm::jail::Cgroups::prepare(&kiln_vm::QemuConfig::default()) {
        Ok(cgroups) => {
            let dir = cgroups.path(&vm.id);
            assert!(cgroup.contains(&format!("/kiln/{}", vm.id)), "{cgroup}");
            let max = std::fs::read_to_string(dir.join("memory.max")).unwrap();
            let overhead = kiln_vm::QemuConfig::default().overhead_mib;
            assert_eq!(max.trim(), ((128 + overhead) << 20).to_string());
            eprintln!(
                "cgroups writable: QEMU is in {} with memory.max {}",
                dir.display(),
                max.trim()
            );
            assert_eq!(qemu_pids_under(vms.vm_dir()), vec![pid as i32]);
            assert!(vms.delete("acme", &vm.id).await);
            assert!(!dir.exists(), "the cgroup goes with the VM");
        }
        Err(why) => {
            assert!(!cgroup.contains("/kiln/"), "{cgroup}");
            eprintln!("no VM cgroups on this machine: {why}");
            assert_eq!(qemu_pids_under(vms.vm_dir()), vec![pid as i32]);
            assert!(vms.delete("acme", &vm.id).await);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_vms_restore_from_a_snapshot_and_are_distinct() {
    let vms = manager("snapshot").await;
    // A shape no other test uses, so this test owns its snapshot; start
    // without one, as on a fresh host.
    let shape = request(144);
    let snapshot = vms.snapshot_path("default", 1, 144).unwrap();
    let _ = std::fs::remove_file(&snapshot);
    // A state saved under other settings (an older QEMU, say) for the same
    // shape: never loadable again, so saving the new one removes it.
    let stale = snapshot.with_file_name("tcg-qemu64-000000000000-1x144.state");
    std::fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"old").unwrap();
    let first = vms.create(shape.clone()).await.unwrap();
    assert!(!stale.exists(), "a stale snapshot of the shape is removed");
    let second = vms.create(shape.clone()).await.unwrap();
    let third = vms.create(shape).await.unwrap();
    // A restored guest runs on its final clocksource: one still on
    // tsc-early when saved may later fall back to jiffies (4 ms steps).
    let agent = vms.agent("acme", &third.id).await.unwrap();
    let clock = agent
        .exec(
            sh("cat /sys/devices/system/clocksource/clocksource0/current_clocksource"),
            b"",
        )
        .await
        .unwrap();
    let clock = String::from_utf8_lossy(&clock.stdout).trim().to_string();
    assert!(
        clock == "tsc" || clock == "kvm-clock",
        "restored guest's clocksource: {clock}"
    );
    let timed = agent.exec(sh("true"), b"").await.unwrap();
    assert!(
        timed.duration > Duration::ZERO,
        "the agent's clock moves between spawn and reap"
    );
    eprintln!(
        "boot {} ms, restores {} ms and {} ms",
        first.boot_ms, second.boot_ms, third.boot_ms
    );
    assert!(
        snapshot.exists(),
        "the first VM of a shape leaves a snapshot"
    );
    assert!(second.boot_ms < first.boot_ms, "a restore beats a boot");
    let random = |id: String| {
        let vms = vms.clone();
        async move {
            let agent = vms.agent("acme", &id).await.unwrap();
            let out = agent
                .exec(sh("head -c 16 /dev/urandom | od -An -tx1; date +%s"), b"")
                .await
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let (a, b, c) = (
        random(first.id.clone()).await,
        random(second.id.clone()).await,
        random(third.id.clone()).await,
    );
    let bytes = |s: &str| s.lines().next().unwrap().to_string();
    assert_ne!(
        bytes(&b),
        bytes(&c),
        "restored VMs draw different random numbers"
    );
    assert_ne!(bytes(&a), bytes(&b));
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let guest: i64 = c.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(
        (guest - host).abs() <= 5,
        "restored clock {guest} vs host {host}"
    );
    for vm in [first, second, third] {
        assert!(vms.delete("acme", &vm.id).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_pool_hands_out_ready_vms_and_refills() {
    let vms = manager("warm").await;
    vms.keep_warm("default", 1, 136, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while vms.warm_count() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pooled = qemu_pids_under(vms.vm_dir());
    assert_eq!(pooled.len(), 1, "one pooled VM is running");
    let vm = vms.create(request(136)).await.unwrap();
    assert_eq!(
        vm.pid.map(|p| p as i32),
        Some(pooled[0]),
        "the create handed out the pooled VM"
    );
    let agent = vms.agent("acme", &vm.id).await.unwrap();
    let out = agent.exec(sh("echo warm"), b"").await.unwrap();
    assert_eq!(out.stdout, b"warm\n");
    assert_eq!(
        vms.list("acme").await.len(),
        1,
        "pooled VMs belong to no tenant until handed out"
    );
    while vms.warm_count() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never refilled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vms.shutdown().await;
    assert_eq!(vms.warm_count(), 0);
    assert_eq!(
        kiln_vm::testing::vm_dirs_in(vms.vm_dir()),
        0,
        "shutdown leaves nothing"
    );
}

/// A guest that boots but never opens the agent's port (here: an init that
/// only sleeps) stops QEMU reading the socket; the boot must still end at
/// its timeout with the QEMU process gone, not wait on a stuck write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_answers_fails_its_boot_in_time() {
    let image = testing::test_image().await;
    let work = std::env::temp_dir().join(format!("kiln-vm-test-{}-mute", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let mut cpio = kiln_vm::cpio::Cpio::new();
    cpio.dir("bin");
    cpio.file(
        "bin/busybox",
        0o755,
        &std::fs::read("/bin/busybox").unwrap(),
    );
    cpio.file(
        "init",
        0o755,
        b"#!/bin/busybox sh\nexec /bin/busybox sleep 100000\n",
    );
    let initrd = work.join("mute.cpio");
    std::fs::write(&initrd, cpio.finish()).unwrap();
    let config = kiln_vm::VmConfig {
        id: "mute".into(),
        boot: kiln_vm::BootSource {
            kernel: image.kernel(),
            initrd: Some(initrd),
            extra_cmdline: String::new(),
            acpi: image.acpi(),
        },
        machine: kiln_vm::MachineConfig {
            vcpus: 1,
            memory_mib: 128,
        },
        drives: Vec::new(),
        network: Vec::new(),
        run_dir: work.join("run"),
    };
    let accelerator =
        probe_accelerator(image, &work, &testing::images_dir().join("accelerator")).await;
    let started = std::time::Instant::now();
    let qemu = kiln_vm::qemu::QemuVmm::new(accelerator, kiln_vm::QemuConfig::default());
    let outcome = qemu.start(&config, Duration::from_secs(20)).await;
    let took = started.elapsed();
    assert!(outcome.is_err(), "a guest without an agent cannot boot");
    assert!(
        took < Duration::from_secs(30),
        "the boot gave up after {took:?}, not at its 20 s timeout"
    );
    assert!(
        !qemu_running_in(&work),
        "QEMU is killed when the boot fails"
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// The start-up reaper kills every VM in its directory, so a second
/// manager on the same directory is refused while the first lives.
#[tokio::test]
async fn a_vm_directory_has_one_manager_at_a_time() {
    let work = std::env::temp_dir().join(format!("kiln-vm-test-{}-lock", std::process::id()));
    let vm_dir = work.join("vms");
    let first = VmManager::new(&work, &vm_dir, kiln_vm::Accelerator::Tcg).unwrap();
    let second = VmManager::new(&work, &vm_dir, kiln_vm::Accelerator::Tcg);
    assert!(
        matches!(second, Err(kiln_vm::VmError::InUse(_))),
        "a second manager must not reap the first one's VMs"
    );
    drop(first);
    assert!(
        VmManager::new(&work, &vm_dir, kiln_vm::Accelerator::Tcg).is_ok(),
        "the lock goes with its holder"
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// `kiln image build --kernel cloud`: Debian's stock cloud kernel, with
/// ACPI and its virtio drivers as modules, still boots and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_with_debians_cloud_kernel_boots() {
    let default = testing::test_image().await;
    let agent = kiln_vm::image::find_agent().unwrap();
    let images = testing::images_dir();
    let built = tokio::task::spawn_blocking(move || {
        kiln_vm::image::build(
            &images,
            "cloud",
            kiln_vm::image::KernelKind::Cloud,
            &agent,
            &mut |_, _, _| {},
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        built.acpi(),
        "the cloud kernel finds its devices through ACPI"
    );
    assert!(
        built.manifest.kernel_release.ends_with("-cloud-amd64"),
        "{}",
        built.manifest.kernel_release
    );
    let vms = manager("cloud").await;
    let mut req = request(128);
    req.image = "cloud".into();
    let vm = vms.create(req).await.unwrap();
    let agent = vms.agent("acme", &vm.id).await.unwrap();
    let uname = agent.exec(sh("uname -r"), b"").await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uname.stdout).trim(),
        built.manifest.kernel_release
    );
    assert_ne!(
        built.manifest.kernel_release, default.manifest.kernel_release,
        "two different kernels"
    );
    vms.delete("acme", &vm.id).await;
}
