//! `kiln image build`: a guest image made only from Debian packages — a
//! kernel and busybox-static — plus kiln's own agent, packed into an
//! initramfs. The kernel is an uncompressed vmlinux, which QEMU's microvm
//! boots through its PVH entry: by default compiled from Debian's
//! `linux-source` with `guest-kernel.config` (everything built in, nothing
//! else: process start-up in the guest about twice as fast under
//! emulation), or Debian's cloud kernel pulled out of its package
//! (`--kernel cloud`, no compiler needed). Downloaded packages and compiled
//! kernels are kept, so a rebuild is offline and quick.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::cpio::Cpio;

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

fn step(step: &'static str, message: impl Into<String>) -> ImageError {
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

/// Kernel modules the guest loads, in order (those built into the kernel
/// are simply absent from the package).
const MODULES: [&str; 4] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/char/virtio_console.ko",
];

fn run(step_name: &'static str, command: &mut Command) -> Result<String, ImageError> {
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

/// The concrete package a Debian metapackage (`linux-image-cloud-amd64`,
/// `linux-source`) currently stands for.
fn depends_on(metapackage: &str, prefix: &str) -> Result<String, ImageError> {
    let depends = run(
        "resolve kernel package",
        Command::new("apt-cache").args(["depends", metapackage]),
    )?;
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with(prefix))
        .map(str::to_string)
        .ok_or_else(|| {
            step(
                "resolve kernel package",
                format!("apt knows no {metapackage}; run apt-get update"),
            )
        })
}

/// Compiles the minimal kernel out of the unpacked `linux-source` package
/// into `cache` (`vmlinux` and `release`), reporting files compiled.
fn compile_kernel(
    root: &Path,
    work: &Path,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let tarball = std::fs::read_dir(root.join("usr/src"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".tar.xz"))
        .ok_or_else(|| step(COMPILE, "no source tarball in the linux-source package"))?;
    check_build_tools()?;
    progress("unpacking the kernel source");
    let src = work.join("src");
    std::fs::create_dir_all(&src)?;
    run(
        COMPILE,
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&src)
            .arg("--strip-components=1"),
    )?;
    configure_kernel(&src)?;
    make_vmlinux(&src, work, progress)?;
    install_kernel(&src, cache)
}

const COMPILE: &str = "compile the kernel";

/// Names every missing tool at once, before hours of unpacking.
fn check_build_tools() -> Result<(), ImageError> {
    let mut missing: Vec<&str> = ["make", "gcc", "flex", "bison", "bc"]
        .into_iter()
        .filter(|tool| {
            !std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
            })
        })
        .collect();
    // objtool, built along with the kernel, reads ELF through libelf.
    if !Path::new("/usr/include/gelf.h").exists() {
        missing.push("libelf-dev");
    }
    if !missing.is_empty() {
        return Err(step(
            COMPILE,
            format!(
                "missing {}: apt-get install build-essential flex bison bc libelf-dev (or build with --kernel cloud)",
                missing.join(", ")
            ),
        ));
    }
    Ok(())
}

/// `make tinyconfig` with kiln's fragment merged over it.
fn configure_kernel(src: &Path) -> Result<(), ImageError> {
    std::fs::write(src.join("kiln.config"), KERNEL_CONFIG)?;
    run(
        COMPILE,
        Command::new("make").arg("tinyconfig").current_dir(src),
    )?;
    run(
        COMPILE,
        Command::new("scripts/kconfig/merge_config.sh")
            .args(["-m", ".config", "kiln.config"])
            .current_dir(src),
    )?;
    run(
        COMPILE,
        Command::new("make").arg("olddefconfig").current_dir(src),
    )?;
    Ok(())
}

/// `make vmlinux` on every core, counting compiled files for `progress`;
/// a failure reports the tail of the build log.
fn make_vmlinux(src: &Path, work: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    progress(&format!(
        "compiling the kernel with {jobs} jobs (a few minutes, once)"
    ));
    let log = work.join("kernel-build.log");
    let mut child = Command::new("make")
        .arg(format!("-j{jobs}"))
        .arg("vmlinux")
        .current_dir(src)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .map_err(|e| step(COMPILE, format!("make: {e}")))?;
    let mut compiled = 0usize;
    if let Some(stdout) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.trim_start().starts_with("CC ") {
                compiled += 1;
                if compiled.is_multiple_of(250) {
                    progress(&format!("compiling the kernel: {compiled} files"));
                }
            }
        }
    }
    if !child.wait()?.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(step(COMPILE, tail.join("\n")));
    }
    Ok(())
}

/// Puts the compiled kernel and its release into `cache` in one rename, and
/// drops kernels of other sources or configurations.
fn install_kernel(src: &Path, cache: &Path) -> Result<(), ImageError> {
    let release = run(
        COMPILE,
        Command::new("make")
            .args(["-s", "kernelrelease"])
            .current_dir(src),
    )?;
    let staging = cache.with_file_name(format!(
        ".{}.partial",
        cache.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    std::fs::copy(src.join("vmlinux"), staging.join("vmlinux"))?;
    std::fs::write(staging.join("release"), release.trim())?;
    let _ = std::fs::remove_dir_all(cache);
    std::fs::rename(&staging, cache)?;
    if let Some(kernels) = cache.parent() {
        for entry in std::fs::read_dir(kernels)?.flatten() {
            if entry.path() != cache {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

fn download(debs: &Path, package: &str) -> Result<PathBuf, ImageError> {
    let found = |debs: &Path| {
        std::fs::read_dir(debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    if let Some(path) = found(debs) {
        return Ok(path);
    }
    run(
        "download packages",
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(debs),
    )?;
    found(debs).ok_or_else(|| {
        step(
            "download packages",
            format!("{package}: no .deb after download"),
        )
    })
}

/// Finds and decompresses the kernel inside a bzImage.
fn extract_vmlinux(bzimage: &[u8], work: &Path) -> Result<Vec<u8>, ImageError> {
    if bzimage.len() < 0x250 || &bzimage[0x202..0x206] != b"HdrS" {
        return Err(step("extract kernel", "not a bzImage"));
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let offset = u32::from_le_bytes(bzimage[0x248..0x24c].try_into().expect("4 bytes")) as usize;
    let length = u32::from_le_bytes(bzimage[0x24c..0x250].try_into().expect("4 bytes")) as usize;
    let start = (setup_sects + 1) * 512 + offset;
    let payload = bzimage
        .get(start..start + length)
        .ok_or_else(|| step("extract kernel", "payload outside the image"))?;
    let tool: &[&str] = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dc"],
        [0xfd, b'7', b'z', b'X', b'Z', ..] => &["xz", "-dc"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        _ => return Err(step("extract kernel", "unknown kernel compression")),
    };
    let packed = work.join("payload");
    std::fs::write(&packed, payload)?;
    let out = Command::new(tool[0])
        .args(&tool[1..])
        .arg(&packed)
        .output()
        .map_err(|e| {
            step(
                "extract kernel",
                format!("{}: {e} (install it from Debian's packages)", tool[0]),
            )
        })?;
    // Decompressors warn about the trailing size field; what matters is ELF.
    if !out.stdout.starts_with(b"\x7fELF") {
        return Err(step(
            "extract kernel",
            String::from_utf8_lossy(&out.stderr).to_string(),
        ));
    }
    Ok(out.stdout)
}

/// Builds (or rebuilds) the image `name` under `images_dir`. `progress`
/// hears of each step.
pub fn build(
    images_dir: &Path,
    name: &str,
    kernel: KernelKind,
    agent: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Image, ImageError> {
    kiln_core::names::check_ident("image", name)?;
    std::fs::create_dir_all(images_dir)?;
    let work = images_dir.join(format!(".build-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = build_in(images_dir, &work, name, kernel, agent, progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

const STEPS: usize = 5;

/// The build's steps, in the scratch directory `work`.
fn build_in(
    images_dir: &Path,
    work: &Path,
    name: &str,
    kernel: KernelKind,
    agent: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Image, ImageError> {
    progress(1, STEPS, "resolving and downloading Debian packages");
    let debs = images_dir.join(".debs");
    std::fs::create_dir_all(&debs)?;
    let kernel_pkg = match kernel {
        KernelKind::Cloud => depends_on("linux-image-cloud-amd64", "linux-image-")?,
        KernelKind::Minimal => depends_on("linux-source", "linux-source-")?,
    };
    let kernel_deb = download(&debs, &kernel_pkg)?;
    let busybox_deb = download(&debs, "busybox-static")?;
    progress(2, STEPS, "unpacking packages");
    let root = work.join("debs");
    unpack(&busybox_deb, &root)?;
    let (vmlinux, release) = match kernel {
        KernelKind::Cloud => {
            unpack(&kernel_deb, &root)?;
            let release = kernel_pkg.trim_start_matches("linux-image-").to_string();
            progress(3, STEPS, "extracting the kernel");
            let bzimage = std::fs::read(root.join(format!("boot/vmlinuz-{release}")))?;
            (extract_vmlinux(&bzimage, work)?, release)
        }
        KernelKind::Minimal => minimal_kernel(images_dir, work, &root, &kernel_deb, &mut |what| {
            progress(3, STEPS, what)
        })?,
    };
    progress(4, STEPS, "packing the initramfs");
    let agent_bytes = std::fs::read(agent).map_err(|e| {
        step("read agent", format!("{}: {e} (build it: cargo build --profile agent -p kiln-agent --target x86_64-unknown-linux-musl)", agent.display()))
    })?;
    let initramfs = pack_initramfs(&root, &agent_bytes, &release)?;
    progress(5, STEPS, "writing the image");
    let file_name = |deb: &Path| {
        deb.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let manifest = ImageManifest {
        name: name.to_string(),
        kernel,
        kernel_package: file_name(&kernel_deb),
        kernel_release: release,
        busybox_package: file_name(&busybox_deb),
        agent_sha256: {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&agent_bytes))
        },
        created_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .to_string(),
    };
    install_image(images_dir, work, &vmlinux, &initramfs, manifest)
}

fn unpack(deb: &Path, root: &Path) -> Result<String, ImageError> {
    run(
        "unpack packages",
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(root),
    )
}

/// The minimal kernel, compiled once per source package and configuration
/// and kept in `images/.kernels/`: its bytes and its release.
fn minimal_kernel(
    images_dir: &Path,
    work: &Path,
    root: &Path,
    kernel_deb: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<u8>, String), ImageError> {
    let cache = images_dir.join(".kernels").join(format!(
        "{}-{}",
        kernel_deb.file_stem().unwrap_or_default().to_string_lossy(),
        &{
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(KERNEL_CONFIG))
        }[..12]
    ));
    if !cache.join("vmlinux").exists() {
        unpack(kernel_deb, root)?;
        compile_kernel(root, work, &cache, progress)?;
    } else {
        progress("kernel already compiled");
    }
    Ok((
        std::fs::read(cache.join("vmlinux"))?,
        std::fs::read_to_string(cache.join("release"))?
            .trim()
            .to_string(),
    ))
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

/// Writes the image beside the old one and swaps it in by renames. The
/// kernel and initramfs are world-readable: QEMU, running as its own user,
/// reads them through descriptors kiln hands it, and they hold nothing
/// secret.
fn install_image(
    images_dir: &Path,
    work: &Path,
    vmlinux: &[u8],
    initramfs: &[u8],
    manifest: ImageManifest,
) -> Result<Image, ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let out = work.join("image");
    std::fs::create_dir_all(&out)?;
    for (file, bytes) in [("vmlinux", vmlinux), ("initramfs.cpio", initramfs)] {
        std::fs::write(out.join(file), bytes)?;
        std::fs::set_permissions(out.join(file), std::fs::Permissions::from_mode(0o644))?;
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
