//! `kiln image build`: a guest image made only from Debian packages — a
//! kernel and busybox-static — plus kiln's own agent, packed into an
//! initramfs. The kernel is an uncompressed vmlinux, which QEMU's microvm
//! boots through its PVH entry: by default compiled from Debian's
//! `linux-source` with `guest-kernel.config` (everything built in, nothing
//! else: process start-up in the guest about twice as fast under
//! emulation), or Debian's cloud kernel pulled out of its package
//! (`--kernel cloud`, no compiler needed). Downloaded packages and compiled
//! kernels are kept, so a rebuild is offline and quick.
//!
//! With packages (`kiln image build python`, `--packages git,gcc`) the
//! image also carries a Debian root filesystem (see [`crate::rootfs`]): the
//! initramfs is then only the first stage, which mounts the root
//! filesystem's drive read-only under a private overlay and hands over to
//! the agent inside it.
//!
//! With `--from` (see [`oci`]) the root filesystem is an OCI image's
//! layers instead, and the image's config gives its commands' defaults.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::cpio::Cpio;
use crate::kernel::{depends_on, download, extract_vmlinux, minimal_kernel, unpack};
pub use crate::rootfs::RootfsManifest;

// Declared here rather than in lib.rs: OCI images are one of the image
// builder's sources.
#[path = "oci/mod.rs"]
pub mod oci;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The name is not an identifier (`[a-z0-9][a-z0-9-]*`), so it could
    /// leave the images directory or reach a command line.
    #[error("image name refused: {0}")]
    BadName(#[from] kiln_core::names::InvalidName),
    /// No image of that name has been built.
    #[error("no image {name} (build it with `kiln image build`)")]
    NotFound { name: String },
    /// The image's directory resolves outside the images directory (a
    /// symbolic link).
    #[error("image {name} lies outside the images directory")]
    Outside { name: String },
    /// A step of the build failed.
    #[error("{step}: {message}")]
    Step { step: &'static str, message: String },
    /// File system trouble.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub(crate) fn step(step: &'static str, message: impl Into<String>) -> ImageError {
    ImageError::Step {
        step,
        message: message.into(),
    }
}

/// Which kernel an image boots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelKind {
    /// Compiled by kiln from Debian's `linux-source` (a few minutes, once).
    #[default]
    Minimal,
    /// Debian's cloud kernel as packaged; its virtio drivers are modules.
    Cloud,
}

impl KernelKind {
    pub fn parse(text: &str) -> Option<KernelKind> {
        match text {
            "minimal" => Some(KernelKind::Minimal),
            "cloud" => Some(KernelKind::Cloud),
            _ => None,
        }
    }

    /// Images made before there was a choice carry the cloud kernel.
    fn cloud() -> KernelKind {
        KernelKind::Cloud
    }
}

/// The root filesystem's file in an image's directory.
pub const ROOTFS_FILE: &str = "rootfs.erofs";

/// The fragment merged over `make tinyconfig` for the minimal kernel.
pub const KERNEL_CONFIG: &str = include_str!("guest-kernel.config");

/// What an image holds, as `image.json` records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub name: String,
    #[serde(default = "KernelKind::cloud")]
    pub kernel: KernelKind,
    pub kernel_package: String,
    pub kernel_release: String,
    pub busybox_package: String,
    pub agent_sha256: String,
    pub created_at: String,
    /// A Debian root filesystem on a read-only drive; none for the busybox
    /// image, whose whole root is the initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootfsManifest>,
    /// The OCI image the root filesystem was made of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<oci::OciOrigin>,
    /// What every command in the image's VMs starts with unless it says
    /// otherwise (an OCI image's `Env`, `WorkingDir` and `User`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<crate::agent::ExecDefaults>,
}

#[derive(Clone, Debug)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: ImageManifest,
}

impl Image {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }

    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.cpio")
    }

    /// The drives a VM of this image gets: the root filesystem, read-only,
    /// when the image has one.
    pub fn drives(&self) -> Vec<crate::Drive> {
        self.manifest
            .rootfs
            .iter()
            .map(|_| crate::Drive {
                id: "rootfs".into(),
                path: self.dir.join(ROOTFS_FILE),
                read_only: true,
            })
            .collect()
    }

    /// Bytes on disk of what the image boots (kernel, initramfs, root
    /// filesystem), saved VM states aside.
    pub fn size_bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    }

    /// Whether the kernel finds its devices through ACPI tables; the
    /// minimal kernel has no ACPI and reads them off its command line.
    pub fn acpi(&self) -> bool {
        self.manifest.kernel == KernelKind::Cloud
    }

    /// The image `name` under `images_dir`. The name must be an identifier,
    /// and the directory it names must resolve inside `images_dir`, so no
    /// name (`../x`, `/tmp/x`, quotes, commas) reaches a path elsewhere.
    pub fn open(images_dir: &Path, name: &str) -> Result<Image, ImageError> {
        kiln_core::names::check_ident("image", name)?;
        let not_found = || ImageError::NotFound {
            name: name.to_string(),
        };
        let base = images_dir.canonicalize().map_err(|_| not_found())?;
        let dir = base.join(name).canonicalize().map_err(|_| not_found())?;
        if dir.parent() != Some(base.as_path()) {
            return Err(ImageError::Outside {
                name: name.to_string(),
            });
        }
        let text = std::fs::read_to_string(dir.join("image.json")).map_err(|_| not_found())?;
        let manifest =
            serde_json::from_str(&text).map_err(|e| step("open image", e.to_string()))?;
        Ok(Image { dir, manifest })
    }

    pub fn list(images_dir: &Path) -> Vec<Image> {
        let mut images: Vec<Image> = std::fs::read_dir(images_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Image::open(images_dir, e.file_name().to_str()?).ok())
            .collect();
        images.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        images
    }
}

/// The guest's `/init`: mounts, virtio modules, then the agent as PID 1.
const INIT: &str = "#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o mode=1777 tmp /tmp
for m in virtio_ring virtio virtio_mmio virtio_console; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
hostname kiln
ip link set lo up
exec /sbin/kiln-agent
";

/// The first stage of an image with a root filesystem: the drive's erofs
/// as the read-only lower layer, a tmpfs capped at half the guest's memory
/// as the VM's own upper layer, the overlay of both as the new root, and
/// the agent inside it as PID 1. A VM's writes live in its own memory:
/// never on the shared drive, never seen by another VM, gone with the VM.
pub const ROOTFS_INIT: &str = "#!/bin/busybox sh
/bin/busybox --install -s
set -e
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /base /rw /newroot
mount -t erofs -o ro /dev/vda /base
mount -t tmpfs -o mode=0755,size=50% rw /rw
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/base,upperdir=/rw/upper,workdir=/rw/work root /newroot
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o mode=0620,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /newroot/dev/shm
hostname kiln
ip link set lo up
exec switch_root /newroot /usr/sbin/kiln-agent
";

/// Kernel modules the guest loads, in order (those built into the kernel
/// are simply absent from the package).
const MODULES: [&str; 4] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/char/virtio_console.ko",
];

pub(crate) fn run(step_name: &'static str, command: &mut Command) -> Result<String, ImageError> {
    let out = command
        .output()
        .map_err(|e| step(step_name, format!("{:?}: {e}", command.get_program())))?;
    if !out.status.success() {
        return Err(step(
            step_name,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What an image is built from besides its kernel: nothing (the busybox
/// image), Debian packages or an OCI image for a root filesystem.
#[derive(Clone, Debug, Default)]
pub struct BuildSpec {
    pub kernel: KernelKind,
    /// Packages of a Debian root filesystem (checked, sorted); `None` for
    /// the busybox image.
    pub packages: Option<Vec<String>>,
    /// An OCI image whose layers are the root filesystem.
    pub oci: Option<OciSpec>,
}

/// The OCI image a root filesystem is made of, and how large it may get.
#[derive(Clone, Debug)]
pub struct OciSpec {
    pub source: oci::OciSource,
    pub limits: oci::Limits,
}

impl BuildSpec {
    /// The busybox image with the given kernel.
    pub fn busybox(kernel: KernelKind) -> BuildSpec {
        BuildSpec {
            kernel,
            packages: None,
            oci: None,
        }
    }

    /// A root filesystem image of the OCI image `source` names.
    pub fn oci(source: oci::OciSource, limits: oci::Limits) -> BuildSpec {
        BuildSpec {
            kernel: KernelKind::Minimal,
            packages: None,
            oci: Some(OciSpec { source, limits }),
        }
    }

    /// A root filesystem image of `packages` (a preset's when the image is
    /// named after one and none are given).
    pub fn rootfs(name: &str, packages: &[String]) -> Result<BuildSpec, ImageError> {
        let packages = match (packages.is_empty(), crate::rootfs::preset(name)) {
            (true, Some(preset)) => preset,
            (true, None) => {
                return Err(step(
                    "check packages",
                    format!("{name} is no preset (python, node): give --packages"),
                ))
            }
            (false, _) => packages.to_vec(),
        };
        Ok(BuildSpec {
            kernel: KernelKind::Minimal,
            packages: Some(crate::rootfs::package_list(&packages)?),
            oci: None,
        })
    }
}

/// Whether the root filesystem image `name` under `images_dir` is what
/// `spec` with `agent` would build now (same build key), so a build can be
/// skipped. The busybox image is never reported current.
pub fn up_to_date(images_dir: &Path, name: &str, spec: &BuildSpec, agent: &Path) -> bool {
    let (Some(packages), Ok(image), Ok(agent)) = (
        &spec.packages,
        Image::open(images_dir, name),
        std::fs::read(agent),
    ) else {
        return false;
    };
    let agent_sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&agent))
    };
    let key = crate::rootfs::build_key(packages, &agent_sha256, ROOTFS_INIT);
    image
        .manifest
        .rootfs
        .is_some_and(|rootfs| rootfs.build_key == key)
        && image.dir.join(ROOTFS_FILE).is_file()
}

/// Builds (or rebuilds) the busybox image `name` under `images_dir`.
/// `progress` hears of each step.
pub fn build(
    images_dir: &Path,
    name: &str,
    kernel: KernelKind,
    agent: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Image, ImageError> {
    build_with(
        images_dir,
        name,
        &BuildSpec::busybox(kernel),
        agent,
        progress,
    )
}

/// Builds (or rebuilds) the image `name` under `images_dir` as `spec`
/// says. `progress` hears of each step.
pub fn build_with(
    images_dir: &Path,
    name: &str,
    spec: &BuildSpec,
    agent: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Image, ImageError> {
    kiln_core::names::check_ident("image", name)?;
    if spec.packages.is_some() {
        if spec.kernel != KernelKind::Minimal {
            return Err(step(
                "check kernel",
                "root filesystem images boot the minimal kernel (virtio-blk, erofs and overlayfs built in)",
            ));
        }
        crate::rootfs::check_tools()?;
    }
    if spec.oci.is_some() {
        if spec.kernel != KernelKind::Minimal {
            return Err(step(
                "check kernel",
                "root filesystem images boot the minimal kernel (virtio-blk, erofs and overlayfs built in)",
            ));
        }
        // Files keep the owners their layers give them.
        if !nix::unistd::geteuid().is_root() {
            return Err(step(
                "check user",
                "building from an OCI image needs root (its files keep their owners)",
            ));
        }
        let found = std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join("mkfs.erofs").is_file())
        });
        if !found {
            return Err(step(
                "build root filesystem",
                "mkfs.erofs not found: apt-get install erofs-utils",
            ));
        }
    }
    std::fs::create_dir_all(images_dir)?;
    let work = images_dir.join(format!(".build-{name}-{}", std::process::id()));
    remove_work_dir(&work);
    std::fs::create_dir_all(&work)?;
    let result = build_in(images_dir, &work, name, spec, agent, progress);
    remove_work_dir(&work);
    result
}

/// Removes a build's scratch directory. A root filesystem build mounts
/// `/proc`, `/sys` and `/dev` inside its chroot; should any be left
/// mounted (a killed build), it is detached first, so removing the tree
/// never reaches into the host's own.
fn remove_work_dir(work: &Path) {
    let Ok(work) = work.canonicalize() else {
        return;
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut under: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|point| point.starts_with(&work))
        .collect();
    // Deepest first.
    under.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in &under {
        if let Ok(c) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2(2) with a NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let still = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .any(|point| point.starts_with(&work));
    if still {
        tracing::error!(dir = %work.display(), "a build directory still has mounts inside; left in place");
        return;
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// The build's steps, in the scratch directory `work`.
fn build_in(
    images_dir: &Path,
    work: &Path,
    name: &str,
    spec: &BuildSpec,
    agent: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Image, ImageError> {
    let kernel = spec.kernel;
    let steps = if spec.packages.is_some() || spec.oci.is_some() {
        7
    } else {
        5
    };
    progress(1, steps, "resolving and downloading Debian packages");
    let debs = images_dir.join(".debs");
    std::fs::create_dir_all(&debs)?;
    let kernel_pkg = match kernel {
        KernelKind::Cloud => depends_on("linux-image-cloud-amd64", "linux-image-")?,
        KernelKind::Minimal => depends_on("linux-source", "linux-source-")?,
    };
    let kernel_deb = download(&debs, &kernel_pkg)?;
    let busybox_deb = download(&debs, "busybox-static")?;
    progress(2, steps, "unpacking packages");
    let root = work.join("debs");
    unpack(&busybox_deb, &root)?;
    let (vmlinux, release) = match kernel {
        KernelKind::Cloud => {
            unpack(&kernel_deb, &root)?;
            let release = kernel_pkg.trim_start_matches("linux-image-").to_string();
            progress(3, steps, "extracting the kernel");
            let bzimage = std::fs::read(root.join(format!("boot/vmlinuz-{release}")))?;
            (extract_vmlinux(&bzimage, work)?, release)
        }
        KernelKind::Minimal => minimal_kernel(images_dir, work, &root, &kernel_deb, &mut |what| {
            progress(3, steps, what)
        })?,
    };
    let agent_bytes = std::fs::read(agent).map_err(|e| {
        step("read agent", format!("{}: {e} (build it: cargo build --profile agent -p kiln-agent --target x86_64-unknown-linux-musl)", agent.display()))
    })?;
    let agent_sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&agent_bytes))
    };
    let (mut from, mut exec) = (None, None);
    let rootfs = match (&spec.packages, &spec.oci) {
        (Some(packages), _) => {
            let tree = work.join("rootfs");
            crate::rootfs::debootstrap(&tree, &images_dir.join(".cache"), packages, &mut |what| {
                progress(4, steps, &format!("Debian root filesystem: {what}"))
            })?;
            progress(5, steps, "packing the root filesystem (erofs)");
            crate::rootfs::add_agent(&tree, &agent_bytes)?;
            crate::rootfs::add_user(&tree)?;
            let installed = crate::rootfs::installed_packages(&tree);
            let packed = work.join(ROOTFS_FILE);
            let size_bytes = crate::rootfs::pack_erofs(&tree, &packed)?;
            let _ = std::fs::remove_dir_all(&tree);
            Some((
                packed,
                RootfsManifest {
                    format: "erofs".into(),
                    file: ROOTFS_FILE.into(),
                    suite: crate::rootfs::SUITE.into(),
                    packages: packages.clone(),
                    installed,
                    size_bytes,
                    warm_up: crate::rootfs::warm_up(packages),
                    build_key: crate::rootfs::build_key(packages, &agent_sha256, ROOTFS_INIT),
                },
            ))
        }
        (None, Some(oci)) => {
            let tree = work.join("rootfs");
            std::fs::create_dir_all(&tree)?;
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&tree, std::fs::Permissions::from_mode(0o755))?;
            }
            let pulled = oci::pull(
                &oci.source,
                oci.limits,
                &tree,
                &work.join("blobs"),
                &mut |what| progress(4, steps, &format!("OCI image: {what}")),
            )?;
            progress(5, steps, "packing the root filesystem (erofs)");
            oci::ready_for_kiln(&tree, &agent_bytes)?;
            crate::rootfs::add_user(&tree)?;
            let packed = work.join(ROOTFS_FILE);
            let size_bytes = crate::rootfs::pack_erofs(&tree, &packed)?;
            let _ = std::fs::remove_dir_all(&tree);
            let build_key = oci_build_key(&pulled.origin.digest, &agent_sha256);
            from = Some(pulled.origin);
            exec = Some(pulled.exec).filter(|e| !e.is_empty());
            Some((
                packed,
                RootfsManifest {
                    format: "erofs".into(),
                    file: ROOTFS_FILE.into(),
                    suite: String::new(),
                    packages: Vec::new(),
                    installed: 0,
                    size_bytes,
                    warm_up: Vec::new(),
                    build_key,
                },
            ))
        }
        (None, None) => None,
    };
    progress(steps - 1, steps, "packing the initramfs");
    let initramfs = match rootfs {
        Some(_) => pack_stage_one(&root)?,
        None => pack_initramfs(&root, &agent_bytes, &release)?,
    };
    progress(steps, steps, "writing the image");
    let file_name = |deb: &Path| {
        deb.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let (rootfs_file, rootfs) = match rootfs {
        Some((file, manifest)) => (Some(file), Some(manifest)),
        None => (None, None),
    };
    let manifest = ImageManifest {
        name: name.to_string(),
        kernel,
        kernel_package: file_name(&kernel_deb),
        kernel_release: release,
        busybox_package: file_name(&busybox_deb),
        agent_sha256,
        created_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .to_string(),
        rootfs,
        from,
        exec,
    };
    install_image(
        images_dir,
        work,
        &vmlinux,
        &initramfs,
        rootfs_file.as_deref(),
        manifest,
    )
}

/// The content key of an OCI root filesystem image: the image's manifest
/// digest and what kiln adds to it.
fn oci_build_key(manifest_digest: &str, agent_sha256: &str) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in [
        "oci",
        manifest_digest,
        agent_sha256,
        KERNEL_CONFIG,
        ROOTFS_INIT,
        &format!("{:?}", crate::rootfs::USER),
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hex::encode(hash.finalize())[..16].to_string()
}

/// The initramfs: busybox, the agent as `/sbin/kiln-agent`, `/init`, and
/// the virtio modules a modular kernel needs.
fn pack_initramfs(root: &Path, agent: &[u8], release: &str) -> Result<Vec<u8>, ImageError> {
    let mut cpio = Cpio::new();
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "etc",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir);
    }
    cpio.file(
        "bin/busybox",
        0o755,
        &std::fs::read(root.join("bin/busybox"))?,
    );
    cpio.symlink("bin/sh", "busybox");
    cpio.file("sbin/kiln-agent", 0o755, agent);
    cpio.file("init", 0o755, INIT.as_bytes());
    for module in MODULES {
        let path = root.join(format!("lib/modules/{release}/kernel/{module}"));
        if let Ok(bytes) = std::fs::read(&path) {
            let file = Path::new(module)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            cpio.file(&format!("lib/modules/{file}"), 0o644, &bytes);
        }
    }
    Ok(cpio.finish())
}

/// The first stage of a root filesystem image: busybox and its `/init`
/// (the agent lives in the root filesystem).
fn pack_stage_one(root: &Path) -> Result<Vec<u8>, ImageError> {
    let mut cpio = Cpio::new();
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev",
    ] {
        cpio.dir(dir);
    }
    cpio.file(
        "bin/busybox",
        0o755,
        &std::fs::read(root.join("bin/busybox"))?,
    );
    cpio.symlink("bin/sh", "busybox");
    cpio.file("init", 0o755, ROOTFS_INIT.as_bytes());
    Ok(cpio.finish())
}

/// Writes the image beside the old one and swaps it in by renames. The
/// kernel and initramfs are world-readable: QEMU, running as its own user,
/// reads them through descriptors kiln hands it, and they hold nothing
/// secret.
fn install_image(
    images_dir: &Path,
    work: &Path,
    vmlinux: &[u8],
    initramfs: &[u8],
    rootfs: Option<&Path>,
    manifest: ImageManifest,
) -> Result<Image, ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let out = work.join("image");
    std::fs::create_dir_all(&out)?;
    for (file, bytes) in [("vmlinux", vmlinux), ("initramfs.cpio", initramfs)] {
        std::fs::write(out.join(file), bytes)?;
        std::fs::set_permissions(out.join(file), std::fs::Permissions::from_mode(0o644))?;
    }
    if let Some(rootfs) = rootfs {
        let file = out.join(ROOTFS_FILE);
        std::fs::rename(rootfs, &file)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::write(
        out.join("image.json"),
        serde_json::to_vec_pretty(&manifest).map_err(|e| step("write image", e.to_string()))?,
    )?;
    let target = images_dir.join(&manifest.name);
    let old = images_dir.join(format!(".old-{}-{}", manifest.name, std::process::id()));
    if target.exists() {
        std::fs::rename(&target, &old)?;
    }
    std::fs::rename(&out, &target)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(Image {
        dir: target,
        manifest,
    })
}

/// Where the static agent binary is: `KILN_AGENT_BIN`, or the musl build in
/// the cargo target directory of the running kiln or of the current
/// directory (a host build would need a libc the guest lacks).
pub fn find_agent() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_AGENT_BIN") {
        return Some(PathBuf::from(path));
    }
    let mut candidates = Vec::new();
    // Beside a cargo-built kiln: <target>/release/kiln → <target>/x86_64-unknown-linux-musl/agent.
    if let Some(target) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
    {
        candidates.push(target.join("x86_64-unknown-linux-musl/agent/kiln-agent"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    candidates.push(target.join("x86_64-unknown-linux-musl/agent/kiln-agent"));
    candidates.into_iter().find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An images dir with one image, `default`, and images planted where
    /// hostile names would lead.
    fn images() -> (PathBuf, PathBuf) {
        let work = std::env::temp_dir().join(format!(
            "kiln-image-names-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&work);
        let manifest = ImageManifest {
            name: "default".into(),
            kernel: KernelKind::Minimal,
            kernel_package: String::new(),
            kernel_release: String::new(),
            busybox_package: String::new(),
            agent_sha256: String::new(),
            created_at: String::new(),
            rootfs: None,
            from: None,
            exec: None,
        };
        let images = work.join("images");
        for dir in [
            images.join("default"),
            work.join("outside"),
            work.join("evil"),
        ] {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("image.json"),
                serde_json::to_vec(&manifest).unwrap(),
            )
            .unwrap();
        }
        (work, images)
    }

    fn check(images: &Path, name: &str, expect: &str) {
        let got = match Image::open(images, name) {
            Ok(_) => "ok",
            Err(ImageError::BadName(_)) => "bad name",
            Err(ImageError::NotFound { .. }) => "not found",
            Err(ImageError::Outside { .. }) => "outside",
            Err(_) => "other",
        };
        assert_eq!(got, expect, "{name:?}");
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        for (field, expect) in [
            ("/work/a", "/work/a"),
            ("/work/a\\040b", "/work/a b"),
            ("/x\\011y\\134z", "/x\ty\\z"),
            ("/trailing\\04", "/trailing\\04"),
            ("/not\\999octal", "/not\\999octal"),
        ] {
            assert_eq!(unescape_mount_path(field), PathBuf::from(expect), "{field}");
        }
    }

    #[test]
    fn manifests_without_a_root_filesystem_still_open() {
        let old = r#"{"name":"default","kernel":"minimal","kernel_package":"k","kernel_release":"6.1","busybox_package":"b","agent_sha256":"a","created_at":"1"}"#;
        let manifest: ImageManifest = serde_json::from_str(old).unwrap();
        assert!(manifest.rootfs.is_none());
        assert!(!serde_json::to_string(&manifest).unwrap().contains("rootfs"));
    }

    #[test]
    fn rootfs_specs_come_from_presets_or_packages() {
        let spec = BuildSpec::rootfs("python", &[]).unwrap();
        assert!(spec.packages.unwrap().contains(&"python3".to_string()));
        let spec = BuildSpec::rootfs("tools", &["gcc".into(), "git".into()]).unwrap();
        assert_eq!(spec.packages.unwrap(), vec!["gcc", "git"]);
        assert!(
            BuildSpec::rootfs("tools", &[]).is_err(),
            "no preset, no packages"
        );
        assert!(BuildSpec::rootfs("tools", &["$(reboot)".into()]).is_err());
    }

    #[test]
    fn image_names_stay_inside_the_images_dir() {
        let (work, images) = images();
        std::os::unix::fs::symlink(work.join("outside"), images.join("linked")).unwrap();
        let absolute = work.join("outside").to_string_lossy().into_owned();
        check(&images, "default", "ok");
        check(&images, "missing", "not found");
        check(&images, "linked", "outside");
        check(&images, "../outside", "bad name");
        check(&images, &absolute, "bad name");
        check(&images, "default/../../outside", "bad name");
        check(&images, "../evil/x';touch /tmp/pwned;'", "bad name");
        check(&images, "a'b;touch /tmp/pwned;'", "bad name");
        check(&images, "with,comma", "bad name");
        check(&images, "Default", "bad name");
        check(&images, ".", "bad name");
        check(&images, "", "bad name");
        let _ = std::fs::remove_dir_all(&work);
    }
}
