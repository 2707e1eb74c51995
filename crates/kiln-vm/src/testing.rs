//! For test suites that boot real VMs: one image per test run, built from
//! Debian packages on first use (`KILN_TEST_IMAGE_DIR`, else a directory in
//! the system temp dir; downloaded packages are kept there).

use std::path::PathBuf;

use tokio::sync::OnceCell;

use crate::image::{self, Image};

pub fn images_dir() -> PathBuf {
    std::env::var_os("KILN_TEST_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("kiln-test-images"))
}

pub async fn test_image() -> &'static Image {
    static IMAGE: OnceCell<Image> = OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            let dir = images_dir();
            let agent = image::find_agent().expect(
                "the static agent (.ci/run builds it): cargo build --profile agent -p kiln-agent --target x86_64-unknown-linux-musl",
            );
            let agent_sha = {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(std::fs::read(&agent).expect("read the agent")))
            };
            // Reuse the image only while it carries this very agent and
            // the default kernel.
            if let Ok(image) = Image::open(&dir, "default") {
                if image.manifest.agent_sha256 == agent_sha
                    && image.manifest.kernel == image::KernelKind::default()
                {
                    return image;
                }
            }
            tokio::task::spawn_blocking(move || image::build(&dir, "default", image::KernelKind::default(), &agent, &mut |_, _, _| {}))
                .await
                .expect("image build task")
                .expect("image build")
        })
        .await
}

/// The packages of the test suites' root filesystem image: the `python`
/// preset.
pub fn python_packages() -> Vec<String> {
    crate::rootfs::package_list(&crate::rootfs::preset("python").expect("the python preset"))
        .expect("preset packages are valid")
}

/// The `python` root filesystem image in [`images_dir`], built once per
/// machine: reused while its build key (packages, agent, kernel
/// configuration, stage-one init) is the one this code would build. `.ci/run`
/// builds it before the tests (`kiln image build python`), so a test run
/// pays for mmdebstrap only when something changed.
pub async fn python_image() -> &'static Image {
    static IMAGE: OnceCell<Image> = OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            let dir = images_dir();
            let agent = image::find_agent().expect(
                "the static agent (.ci/run builds it): cargo build --profile agent -p kiln-agent --target x86_64-unknown-linux-musl",
            );
            let agent_sha = {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(std::fs::read(&agent).expect("read the agent")))
            };
            let packages = python_packages();
            let key = crate::rootfs::build_key(&packages, &agent_sha, image::ROOTFS_INIT);
            if let Ok(image) = Image::open(&dir, "python") {
                if image.manifest.rootfs.as_ref().is_some_and(|r| r.build_key == key) {
                    return image;
                }
            }
            let spec = image::BuildSpec::rootfs("python", &packages).expect("python preset");
            tokio::task::spawn_blocking(move || image::build_with(&dir, "python", &spec, &agent, &mut |_, _, _| {}))
                .await
                .expect("image build task")
                .expect("python image build (needs mmdebstrap and erofs-utils: .ci/run installs them)")
        })
        .await
}

/// The VM directories under a manager's `vm_dir` (its lock file aside):
/// what a leak would leave behind.
pub fn vm_dirs_in(vm_dir: &std::path::Path) -> usize {
    std::fs::read_dir(vm_dir)
        .map(|entries| entries.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0)
}

/// Whether `pid` is a live process (a zombie waiting for its reaper is
/// not): how tests see that a QEMU died.
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}
