//! Root filesystem images: a Debian root filesystem made by `mmdebstrap`
//! from Debian's own mirror, kiln's agent put in it, packed read-only as
//! erofs for a virtio-blk drive. Every VM of the image shares the one file
//! read-only; the busybox initramfs mounts it under an overlay whose upper
//! layer is a tmpfs private to the VM (see `image::ROOTFS_INIT`).
//!
//! Downloaded packages are kept in `<images>/.cache/apt` (synced in and
//! out of the build's apt archive by mmdebstrap's own hooks), so a rebuild
//! fetches only the package lists.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::image::ImageError;

/// The Debian release every root filesystem is built from.
pub const SUITE: &str = "bookworm";

/// Debian's mirror and the lines of the build's sources.list: the release,
/// its point updates and its security updates.
const SOURCES: [&str; 3] = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

/// The unprivileged account every root filesystem has besides root: the
/// E2B SDK's default user, whose home is where its relative paths land.
pub const USER: (&str, u32, &str) = ("user", 1000, "/home/user");

/// Tools every preset carries besides its language.
const COMMON: [&str; 5] = ["git", "curl", "ca-certificates", "bash", "coreutils"];

/// The packages of a preset image name (`kiln image build python`).
pub fn preset(name: &str) -> Option<Vec<String>> {
    let language: &[&str] = match name {
        "python" => &["python3", "python3-pip", "python3-venv"],
        "node" => &["nodejs", "npm"],
        _ => return None,
    };
    Some(
        language
            .iter()
            .chain(COMMON.iter())
            .map(|p| p.to_string())
            .collect(),
    )
}

/// The warm-up commands for an image of `packages`: each language runtime
/// it carries starts once.
pub fn warm_up(packages: &[String]) -> Vec<Vec<String>> {
    let argv = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    let mut commands = Vec::new();
    if packages.iter().any(|p| p.starts_with("python3")) {
        commands.push(argv(&["python3", "-c", "import os, sys, json, subprocess"]));
    }
    if packages.iter().any(|p| p == "nodejs") {
        commands.push(argv(&["node", "-e", "0"]));
    }
    commands
}

/// What a root filesystem image holds, as `image.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsManifest {
    /// `erofs`.
    pub format: String,
    /// The file beside `image.json` that the VM's drive reads.
    pub file: String,
    pub suite: String,
    /// The packages asked for (their dependencies come along).
    pub packages: Vec<String>,
    /// Packages installed in all.
    pub installed: usize,
    /// Size of the packed file in bytes.
    pub size_bytes: u64,
    /// Commands run once in the VM whose state becomes the snapshot, so
    /// the files they read (a language runtime) are already in memory in
    /// every VM restored from it.
    #[serde(default)]
    pub warm_up: Vec<Vec<String>>,
    /// Names everything the image was built from (suite, packages, agent,
    /// kernel configuration, the stage-one init): equal keys, equal images.
    pub build_key: String,
}

/// A Debian package name as Debian policy allows it (lowercase letters,
/// digits, `+`, `-`, `.`; two or more characters, starting alphanumeric).
/// Names go to mmdebstrap as one argument, never through a shell, but a
/// name outside the grammar is refused before anything runs.
pub fn check_package(name: &str) -> Result<(), ImageError> {
    let bytes = name.as_bytes();
    let ok = (2..=100).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(ImageError::Step {
            step: "check packages",
            message: format!("{name:?} is not a Debian package name"),
        })
    }
}

/// The requested packages, checked, without duplicates, in a stable order.
pub fn package_list(packages: &[String]) -> Result<Vec<String>, ImageError> {
    let mut list: Vec<String> = Vec::new();
    for package in packages.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        check_package(package)?;
        if !list.iter().any(|p| p == package) {
            list.push(package.to_string());
        }
    }
    list.sort();
    Ok(list)
}

/// The content key of a root filesystem image: equal inputs, equal key.
pub fn build_key(packages: &[String], agent_sha256: &str, init: &str) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in [
        SUITE,
        &packages.join(","),
        agent_sha256,
        crate::image::KERNEL_CONFIG,
        init,
        &SOURCES.join("\n"),
        &format!("{USER:?}"),
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hex::encode(hash.finalize())[..16].to_string()
}

fn step(step: &'static str, message: impl Into<String>) -> ImageError {
    ImageError::Step {
        step,
        message: message.into(),
    }
}

fn tool_missing(tool: &str, package: &str) -> ImageError {
    step(
        "build root filesystem",
        format!("{tool} not found: apt-get install {package}"),
    )
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Checks for mmdebstrap and mkfs.erofs before a minute of downloads.
pub fn check_tools() -> Result<(), ImageError> {
    if !on_path("mmdebstrap") {
        return Err(tool_missing("mmdebstrap", "mmdebstrap"));
    }
    if !on_path("mkfs.erofs") {
        return Err(tool_missing("mkfs.erofs", "erofs-utils"));
    }
    Ok(())
}

/// Builds the root filesystem of `packages` into `root` (a directory that
/// must not exist yet) with mmdebstrap, keeping downloaded packages in
/// `cache`. Each of mmdebstrap's `I:` lines goes to `progress`.
pub fn debootstrap(
    root: &Path,
    cache: &Path,
    packages: &[String],
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    const STEP: &str = "mmdebstrap";
    std::fs::create_dir_all(cache.join("apt"))?;
    // mmdebstrap runs in the cache directory: the target must not be
    // relative to anywhere else.
    let root = std::path::absolute(root)?;
    let mut command = Command::new("mmdebstrap");
    command
        // The hooks below name the cache relative to here: no path of the
        // host is ever spelled into a hook's shell words.
        .current_dir(cache)
        .args(["--variant=apt", "--format=directory"])
        // Keeps the downloaded packages in the archive for sync-out.
        .arg("--skip=essential/unlink")
        .arg(format!("--include={}", packages.join(",")))
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/info/*",
        ])
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg("--setup-hook=sync-in ./apt /var/cache/apt/archives/")
        .arg("--customize-hook=sync-out /var/cache/apt/archives ./apt")
        .arg(SUITE)
        .arg(&root)
        .args(SOURCES)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => tool_missing("mmdebstrap", "mmdebstrap"),
        _ => step(STEP, e.to_string()),
    })?;
    // The last lines are the error report when the build fails; the rest
    // is progress. Bounded: mmdebstrap's output is not ours to trust in
    // length.
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    if let Some(stderr) = child.stderr.take() {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(info) = line.strip_prefix("I: ") {
                progress(info);
            }
            if tail.len() == 20 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    if !child.wait()?.success() {
        return Err(step(STEP, Vec::from(tail).join("\n")));
    }
    // The archive was synced out; the image need not carry it.
    let archives = root.join("var/cache/apt/archives");
    for entry in std::fs::read_dir(&archives).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().ends_with(".deb") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// How many packages dpkg lists as installed under `root`.
pub fn installed_packages(root: &Path) -> usize {
    std::fs::read_to_string(root.join("var/lib/dpkg/status"))
        .map(|status| {
            status
                .lines()
                .filter(|l| *l == "Status: install ok installed")
                .count()
        })
        .unwrap_or(0)
}

/// Puts the agent in the root filesystem as `/usr/sbin/kiln-agent`, where
/// the stage-one init hands over to it.
pub fn add_agent(root: &Path, agent: &[u8]) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let path = root.join("usr/sbin/kiln-agent");
    std::fs::write(&path, agent)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Adds [`USER`] to the tree's account files (written directly: `useradd`
/// is not among the packages of the `apt` variant) with its home owned by
/// it. Done once; a tree that has the account already is left alone.
pub fn add_user(root: &Path) -> Result<(), ImageError> {
    use std::io::Write;
    let (name, id, home) = USER;
    let passwd = root.join("etc/passwd");
    let known = std::fs::read_to_string(&passwd).unwrap_or_default();
    if known.lines().any(|l| l.split(':').next() == Some(name)) {
        return Ok(());
    }
    let append = |file: &str, line: String| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(root.join(file))?;
        writeln!(f, "{line}")
    };
    append(
        "etc/passwd",
        format!("{name}:x:{id}:{id}::{home}:/bin/bash"),
    )?;
    append("etc/group", format!("{name}:x:{id}:"))?;
    append("etc/shadow", format!("{name}:*:19000:0:99999:7:::"))?;
    let dir = root.join(home.trim_start_matches('/'));
    std::fs::create_dir_all(&dir)?;
    std::os::unix::fs::chown(&dir, Some(id), Some(id))?;
    Ok(())
}

/// Packs `root` into an erofs file. Per-file modification times are kept:
/// Python checks its cached bytecode against its sources' times, and a
/// mismatch would recompile (and write) on every start. Uncompressed: the
/// guest reads it under emulation, where lz4 costs more than the bytes.
pub fn pack_erofs(root: &Path, out: &Path) -> Result<u64, ImageError> {
    let result = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg("--preserve-mtime")
        .arg(out)
        .arg(root)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => tool_missing("mkfs.erofs", "erofs-utils"),
            _ => step("pack erofs", e.to_string()),
        })?;
    if !result.status.success() {
        return Err(step(
            "pack erofs",
            String::from_utf8_lossy(&result.stderr).trim().to_string(),
        ));
    }
    Ok(std::fs::metadata(out)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_follow_debian_policy() {
        let check = |name: &str, ok: bool| assert_eq!(check_package(name).is_ok(), ok, "{name:?}");
        check("python3", true);
        check("g++", true);
        check("libstdc++6", true);
        check("python3.11-venv", true);
        check("0ad", true);
        check("a", false);
        check("", false);
        check("Python3", false);
        check("-rf", false);
        check("--include=x", false);
        check("a b", false);
        check("a;reboot", false);
        check("$(id)", false);
        check("a/../b", false);
        check("a,b", false);
        check(&"a".repeat(101), false);
    }

    #[test]
    fn package_lists_are_checked_sorted_and_deduplicated() {
        let list = |names: &[&str]| {
            package_list(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            list(&["python3", " git", "python3", ""]).unwrap(),
            vec!["git", "python3"]
        );
        assert!(list(&["git", "x;y"]).unwrap_err().contains("x;y"));
    }

    #[test]
    fn presets_carry_their_language_and_the_common_tools() {
        let python = preset("python").unwrap();
        for p in [
            "python3",
            "python3-pip",
            "git",
            "curl",
            "ca-certificates",
            "bash",
        ] {
            assert!(python.iter().any(|q| q == p), "{p}");
        }
        assert!(preset("node").unwrap().iter().any(|p| p == "nodejs"));
        assert!(preset("default").is_none());
        for name in ["python", "node"] {
            assert!(package_list(&preset(name).unwrap()).is_ok());
        }
    }

    #[test]
    fn the_build_key_changes_with_every_input() {
        let base = build_key(&["git".into()], "aa", "init");
        assert_eq!(base, build_key(&["git".into()], "aa", "init"));
        assert_ne!(
            base,
            build_key(&["git".into(), "curl".into()], "aa", "init")
        );
        assert_ne!(base, build_key(&["git".into()], "ab", "init"));
        assert_ne!(base, build_key(&["git".into()], "aa", "init2"));
    }
}
