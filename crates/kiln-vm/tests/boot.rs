//! Real VMs: the image is built from Debian packages, booted under QEMU
//! `microvm` with whichever accelerator works here, and driven through the
//! agent.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_vm::image::{self, Image};
use kiln_vm::{qemu, Accelerator, BootSource, Exec, MachineConfig, VmConfig};
use tokio::sync::OnceCell;

/// One image per test run, built on first use (packages are cached).
async fn test_image() -> &'static Image {
    static IMAGE: OnceCell<Image> = OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            let dir = std::env::var_os("KILN_TEST_IMAGE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| std::env::temp_dir().join("kiln-test-images"));
            if let Ok(image) = Image::open(&dir, "default") {
                return image;
            }
            let agent = image::find_agent().expect(
                "the static agent: cargo build --profile agent -p kiln-agent --target x86_64-unknown-linux-musl",
            );
            tokio::task::spawn_blocking(move || image::build(&dir, "default", &agent, &mut |_, _, _| {}))
                .await
                .unwrap()
                .expect("image build")
        })
        .await
}

fn config(image: &Image, name: &str) -> VmConfig {
    VmConfig {
        id: name.to_string(),
        boot: BootSource {
            kernel: image.kernel(),
            initrd: Some(image.initramfs()),
            extra_cmdline: String::new(),
        },
        machine: MachineConfig {
            vcpus: 1,
            memory_mib: 128,
        },
        drives: Vec::new(),
        network: Vec::new(),
        run_dir: std::env::temp_dir().join(format!("kiln-vm-test-{}-{name}", std::process::id())),
    }
}

fn sh(script: &str) -> Exec {
    Exec {
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Exec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_and_runs_commands() {
    let image = test_image().await;
    let started = Instant::now();
    let vm = qemu::start(
        &config(image, "basic"),
        Accelerator::Tcg,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    eprintln!("booted in {:?}", started.elapsed());
    let out = vm
        .agent
        .exec(
            Exec {
                command: "uname".into(),
                args: vec!["-a".into()],
                ..Exec::default()
            },
            b"",
        )
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&image.manifest.kernel_release), "{text}");
    let out = vm
        .agent
        .exec(sh("echo out; echo err >&2; exit 7"), b"")
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code),
        (&b"out\n"[..], &b"err\n"[..], Some(7))
    );
    let t = Instant::now();
    for _ in 0..20 {
        vm.agent
            .exec(
                Exec {
                    command: "true".into(),
                    ..Exec::default()
                },
                b"",
            )
            .await
            .unwrap();
    }
    eprintln!("exec round trip {:?}", t.elapsed() / 20);
    let out = vm.agent.exec(sh("ls /sys/class/net"), b"").await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "lo",
        "no network but lo"
    );
}
