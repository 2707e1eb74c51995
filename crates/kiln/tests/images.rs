//! Root filesystem images through the real binary: `kiln image ls` shows
//! them, and `kiln serve` on a data dir holding only the python image runs
//! `kiln run vm --image python -- python3 -c 'print(6*7)'`.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{free_port, kiln, until_up, TempDir, KILN};

fn run(args: &[&str]) -> Output {
    Command::new(KILN)
        .args(args)
        .env("KILN_LOG", "warn")
        .env_remove("KILN_DATA_DIR")
        .env_remove("KILN_URL")
        .env_remove("KILN_API_KEY")
        .output()
        .unwrap()
}

/// A data dir with its own copy of the python image (the root filesystem
/// hard-linked when it can be), so its snapshots are this test's alone.
async fn data_dir_with_python() -> TempDir {
    let image = kiln_vm::testing::python_image().await;
    let data = TempDir::new("images-cli");
    let dir = data.join("images/python");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["vmlinux", "initramfs.cpio", "image.json"] {
        std::fs::copy(image.dir.join(file), dir.join(file)).unwrap();
    }
    let rootfs = kiln_vm::image::ROOTFS_FILE;
    if std::fs::hard_link(image.dir.join(rootfs), dir.join(rootfs)).is_err() {
        std::fs::copy(image.dir.join(rootfs), dir.join(rootfs)).unwrap();
    }
    data
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_ls_shows_size_packages_kernel_and_creation() {
    let data = data_dir_with_python().await;
    let out = run(&["image", "ls", "--data-dir", data.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("NAME\tSIZE\tKERNEL\tCREATED\tPACKAGES"));
    let row: Vec<&str> = lines.next().expect("one image").split('\t').collect();
    assert_eq!(row.len(), 5, "{row:?}");
    assert_eq!(row[0], "python");
    assert!(row[1].ends_with(" MiB"), "size: {}", row[1]);
    let mib: f64 = row[1].trim_end_matches(" MiB").parse().unwrap();
    assert!(
        mib > 50.0,
        "a Debian root filesystem with python: {mib} MiB"
    );
    assert!(row[2].starts_with("minimal 6."), "kernel: {}", row[2]);
    assert!(
        row[3].ends_with('Z') && row[3].contains('T'),
        "created: {}",
        row[3]
    );
    assert!(
        row[4].starts_with("debian bookworm (") && row[4].contains("python3-pip"),
        "packages: {}",
        row[4]
    );

    // A name that is no preset needs packages; a bad package name is
    // refused before anything runs.
    for (args, expect) in [
        (vec!["image", "build", "tools"], "no preset"),
        (
            vec!["image", "build", "tools", "--packages", "git,$(reboot)"],
            "not a Debian package name",
        ),
        (vec!["image", "build", "../x"], "image"),
    ] {
        let mut args = args;
        args.extend(["--data-dir", data.path().to_str().unwrap()]);
        let out = run(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(text(&out).contains(expect), "{args:?}: {}", text(&out));
    }
    assert!(
        !data.join("images/tools").exists() && !data.join("images/x").exists(),
        "a refused build leaves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_run_vm_with_the_python_image_prints_42() {
    let data = data_dir_with_python().await;
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let _server = kiln(
        &[
            "serve",
            "--listen",
            &listen,
            "--vm-warm",
            "0",
            "--vm-accelerator",
            "tcg",
        ],
        data.path(),
        data.path(),
        "serve.log",
    );
    until_up(&base, Duration::from_secs(60)).await;
    let out = run(&[
        "run",
        "--url",
        &base,
        "--data-dir",
        data.path().to_str().unwrap(),
        "vm",
        "--image",
        "python",
        "--",
        "python3",
        "-c",
        "print(6*7)",
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        std::fs::read_to_string(data.join("serve.log")).unwrap_or_default()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
}
