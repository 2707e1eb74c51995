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
