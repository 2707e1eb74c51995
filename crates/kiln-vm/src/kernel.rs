//! The guest's kernel: Debian's cloud kernel pulled out of its package, or
//! the minimal kernel compiled from Debian's `linux-source` with
//! `guest-kernel.config` and kept in `images/.kernels/` by source package
//! and configuration hash.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::image::{run, step, ImageError, KERNEL_CONFIG};

/// The concrete package a Debian metapackage (`linux-image-cloud-amd64`,
/// `linux-source`) currently stands for.
pub(crate) fn depends_on(metapackage: &str, prefix: &str) -> Result<String, ImageError> {
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

/// Compiled kernels kept in `images/.kernels` (each ~20 MB).
const KERNELS_KEPT: usize = 4;

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
/// drops all but the newest few kernels of other sources or
/// configurations (images built side by side may use different ones).
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
        let mut others: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(kernels)?
            .flatten()
            .filter(|e| e.path() != cache && !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| {
                let modified = e.metadata().and_then(|m| m.modified());
                (modified.unwrap_or(std::time::UNIX_EPOCH), e.path())
            })
            .collect();
        others.sort_by_key(|other| std::cmp::Reverse(other.0));
        for (_, path) in others.into_iter().skip(KERNELS_KEPT - 1) {
            let _ = std::fs::remove_dir_all(path);
        }
    }
    Ok(())
}

pub(crate) fn download(debs: &Path, package: &str) -> Result<PathBuf, ImageError> {
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
pub(crate) fn extract_vmlinux(bzimage: &[u8], work: &Path) -> Result<Vec<u8>, ImageError> {
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

pub(crate) fn unpack(deb: &Path, root: &Path) -> Result<String, ImageError> {
    run(
        "unpack packages",
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(root),
    )
}

/// The minimal kernel, compiled once per source package and configuration
/// and kept in `images/.kernels/`: its bytes and its release.
pub(crate) fn minimal_kernel(
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
