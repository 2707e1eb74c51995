//! Real VMs of a Debian root filesystem image (the `python` preset, built
//! once per machine by mmdebstrap from Debian's packages): its tools run,
//! every VM writes only to its own overlay, and snapshots and the warm pool
//! hand out clean copies.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_vm::{testing, Exec, VmManager, VmManagerConfig, VmRequest};

fn sh(script: &str) -> Exec {
    Exec {
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Exec::default()
    }
}

fn request(tenant: &str) -> VmRequest {
    VmRequest {
        tenant: tenant.into(),
        image: "python".into(),
        vcpus: 1,
        memory_mib: 192,
        ttl: None,
        idle_timeout: None,
        labels: BTreeMap::new(),
        network: None,
    }
}

async fn manager(name: &str) -> std::sync::Arc<VmManager> {
    testing::python_image().await;
    let work = std::env::temp_dir().join(format!("kiln-rootfs-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    VmManager::start(
        &testing::images_dir(),
        &work.join("vms"),
        VmManagerConfig::default(),
    )
    .await
    .unwrap()
}

async fn run(vms: &VmManager, tenant: &str, id: &str, script: &str) -> (String, Option<i32>) {
    let agent = vms.agent(tenant, id).await.expect("the VM is there");
    let out = agent.exec(sh(script), b"").await.unwrap();
    (
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        out.exit_code,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_git_run_in_the_python_image() {
    let vms = manager("tools").await;
    let image = testing::python_image().await;
    let rootfs = image
        .manifest
        .rootfs
        .as_ref()
        .expect("a root filesystem image");
    assert_eq!(rootfs.format, "erofs");
    assert!(rootfs.packages.iter().any(|p| p == "python3"));
    assert!(rootfs.installed > 50, "{} packages", rootfs.installed);

    let vm = vms.create(request("acme")).await.unwrap();
    let agent = vms.agent("acme", &vm.id).await.unwrap();
    let out = agent
        .exec(
            Exec {
                command: "python3".into(),
                args: vec!["-c".into(), "print(6*7)".into()],
                ..Exec::default()
            },
            b"",
        )
        .await
        .unwrap();
    assert_eq!(
        (String::from_utf8_lossy(&out.stdout).as_ref(), out.exit_code),
        ("42\n", Some(0)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // git works end to end: a repository, a commit, its log.
    let (text, code) = run(
        &vms,
        "acme",
        &vm.id,
        "cd /root && git init -q repo && cd repo && echo hi > a.txt && git add a.txt \
         && git -c user.name=k -c user.email=k@example.com commit -qm first && git log --format=%s",
    )
    .await;
    assert_eq!((text.as_str(), code), ("first\n", Some(0)));

    let (text, code) = run(
        &vms,
        "acme",
        &vm.id,
        "python3 -m pip --version && curl --version | head -1 && bash -c 'echo $BASH_VERSION'",
    )
    .await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.starts_with("pip "), "{text}");
    assert!(text.contains("curl "), "{text}");

    // Under TCG processes map at fixed addresses, so each reuses the code
    // the last one had translated; under KVM mappings stay randomised.
    let libc_at = "grep -m1 libc /proc/self/maps | cut -d- -f1";
    let (first, _) = run(&vms, "acme", &vm.id, libc_at).await;
    let (second, _) = run(&vms, "acme", &vm.id, libc_at).await;
    assert!(!first.trim().is_empty(), "libc is mapped: {first}");
    match vms.accelerator() {
        kiln_vm::Accelerator::Tcg => assert_eq!(first, second, "fixed under TCG"),
        kiln_vm::Accelerator::Kvm => assert_ne!(first, second, "randomised under KVM"),
    }

    // The root is the overlay; the base is the read-only erofs drive, which
    // the guest cannot write even as root.
    let (text, _) = run(
        &vms,
        "acme",
        &vm.id,
        "grep -E ' / | /base ' /proc/mounts; cat /etc/debian_version",
    )
    .await;
    assert!(text.contains("root / overlay"), "{text}");
    assert!(text.contains("12."), "bookworm: {text}");
    let (text, code) = run(
        &vms,
        "acme",
        &vm.id,
        "echo x | dd of=/dev/vda bs=1 count=1 conv=notrunc 2>&1",
    )
    .await;
    assert_ne!(code, Some(0), "the shared drive took a write: {text}");

    // Another tenant sees nothing of it.
    assert!(vms.agent("globex", &vm.id).await.is_none());
    assert!(vms.delete("acme", &vm.id).await);
    vms.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_s_files_are_never_seen_by_another_vm_of_the_image() {
    let vms = manager("private").await;
    let image = testing::python_image().await;
    let rootfs_file = image.dir.join(kiln_vm::image::ROOTFS_FILE);
    let before = std::fs::metadata(&rootfs_file).unwrap();
    let snapshot = vms.snapshot_path("python", 1, 192).unwrap();
    let _ = std::fs::remove_file(&snapshot);

    // The first VM of the shape boots and saves the snapshot before it is
    // handed out; then it writes into its overlay, over the base too.
    let first = vms.create(request("acme")).await.unwrap();
    assert!(
        snapshot.exists(),
        "the first VM of a shape saves a snapshot"
    );
    let (text, code) = run(
        &vms,
        "acme",
        &first.id,
        "echo secret > /root/mine.txt && echo changed > /etc/debian_version \
         && rm /usr/bin/git && mkdir -p /opt/x && cat /root/mine.txt",
    )
    .await;
    assert_eq!((text.as_str(), code), ("secret\n", Some(0)));

    // A second VM of the same image, restored from that snapshot while the
    // first still runs: none of the first one's changes.
    let second = vms.create(request("acme")).await.unwrap();
    let check = "test ! -e /root/mine.txt && test ! -e /opt/x && test -x /usr/bin/git \
                 && cat /etc/debian_version";
    let (text, code) = run(&vms, "acme", &second.id, check).await;
    assert_eq!(
        code,
        Some(0),
        "the second VM sees the first one's files: {text}"
    );
    assert!(text.starts_with("12."), "{text}");

    // The warm pool hands out clean VMs too, and so does a VM made after
    // the first is gone.
    assert!(vms.delete("acme", &first.id).await);
    vms.keep_warm("python", 1, 192, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while vms.warm_count() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pooled = vms.create(request("globex")).await.unwrap();
    let (text, code) = run(&vms, "globex", &pooled.id, check).await;
    assert_eq!(code, Some(0), "a pooled VM sees another VM's files: {text}");

    // The shared base is untouched.
    let after = std::fs::metadata(&rootfs_file).unwrap();
    assert_eq!(
        (before.len(), before.modified().unwrap()),
        (after.len(), after.modified().unwrap())
    );
    vms.shutdown().await;
}
