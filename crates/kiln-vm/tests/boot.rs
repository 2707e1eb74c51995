//! Real VMs: the image is built from Debian packages, booted under QEMU
//! `microvm` with the accelerator the probe picks, and driven through the
//! agent and the manager.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_vm::manager::{probe_accelerator, reap};
use kiln_vm::{testing, Exec, VmManager, VmRequest};

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
    }
}

async fn manager(name: &str) -> std::sync::Arc<VmManager> {
    let image = testing::test_image().await;
    let work = std::env::temp_dir().join(format!("kiln-vm-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let accelerator =
        probe_accelerator(image, &work, &testing::images_dir().join("accelerator")).await;
    VmManager::new(&testing::images_dir(), &work.join("vms"), accelerator).unwrap()
}

fn qemu_running_in(dir: &std::path::Path) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
        std::fs::read(p.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
            .unwrap_or(false)
    })
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_crashed_run_are_reaped_and_ttls_expire() {
    let vms = manager("reap").await;
    let vm = vms.create(request(128)).await.unwrap();
    let run_dir = vms.vm_dir().join(&vm.id);
    // A crash: the manager is gone without deleting anything.
    let pid = vm.pid.unwrap();
    std::mem::forget(vms.clone());
    assert!(qemu_running_in(&run_dir));
    assert_eq!(reap(run_dir.parent().unwrap()), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || !qemu_running_in(&run_dir));
    assert!(!run_dir.exists());

    let fresh = manager("ttl").await;
    let mut short = request(128);
    short.ttl = Some(Duration::from_millis(100));
    let vm = fresh.create(short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fresh.expire().await, 1);
    assert!(fresh.get("acme", &vm.id).await.is_none());
    assert!(!fresh.vm_dir().join(&vm.id).exists());
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
    let started = std::time::Instant::now();
    let mut warm = request(136);
    warm.tenant = "acme".into();
    let vm = vms.create(warm.clone()).await.unwrap();
    let agent = vms.agent("acme", &vm.id).await.unwrap();
    let out = agent.exec(sh("echo warm"), b"").await.unwrap();
    let took = started.elapsed();
    assert_eq!(out.stdout, b"warm\n");
    assert!(
        took < Duration::from_millis(200),
        "a warm create took {took:?}"
    );
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
    let outcome = kiln_vm::qemu::start(&config, accelerator, Duration::from_secs(20)).await;
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
