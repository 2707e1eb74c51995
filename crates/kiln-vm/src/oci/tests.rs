//! Layers applied to real directories: what the OCI spec asks of them,
//! and every kind of hostile entry refused or skipped without a byte
//! written outside the tree.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::layer::{self, Budget, LayerError};
use super::tree::Tree;
use super::*;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "kiln-oci-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tree")).unwrap();
        std::fs::create_dir_all(dir.join("outside")).unwrap();
        Scratch(dir)
    }

    fn tree(&self) -> PathBuf {
        self.0.join("tree")
    }

    fn outside(&self) -> PathBuf {
        self.0.join("outside")
    }

    fn apply(&self, tar: &[u8]) -> Result<(), LayerError> {
        self.apply_within(
            tar,
            Budget {
                bytes: 1 << 30,
                entries: 10_000,
            },
        )
    }

    fn apply_within(&self, tar: &[u8], mut budget: Budget) -> Result<(), LayerError> {
        let tree = Tree::open(&self.tree()).unwrap();
        layer::apply(&tree, tar, &mut budget, root())
    }

    fn refused(&self, tar: &[u8], expect: &str) {
        let before = std::fs::read_dir(self.outside()).unwrap().count();
        match self.apply(tar) {
            Err(LayerError::Refused(message)) => {
                assert!(message.contains(expect), "{message:?} lacks {expect:?}")
            }
            other => panic!("expected a refusal ({expect}), got {other:?}"),
        }
        assert_eq!(
            std::fs::read_dir(self.outside()).unwrap().count(),
            before,
            "nothing outside the tree"
        );
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A tar written entry by entry with raw names, so hostile ones (which
/// `tar::Builder` would refuse to write) can be made too.
#[derive(Default)]
struct Tar(Vec<u8>);

impl Tar {
    fn entry(
        mut self,
        kind: tar::EntryType,
        name: &[u8],
        link: &[u8],
        data: &[u8],
        mode: u32,
    ) -> Tar {
        assert!(name.len() <= 100 && link.len() <= 100);
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_uid(1234);
        header.set_gid(4321);
        header.set_mtime(1_600_000_000);
        header.set_cksum();
        self.0.extend_from_slice(header.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
        self
    }

    fn file(self, name: &str, data: &str) -> Tar {
        self.entry(
            tar::EntryType::Regular,
            name.as_bytes(),
            b"",
            data.as_bytes(),
            0o644,
        )
    }

    fn dir(self, name: &str) -> Tar {
        self.entry(tar::EntryType::Directory, name.as_bytes(), b"", b"", 0o755)
    }

    fn symlink(self, name: &str, target: &str) -> Tar {
        self.entry(
            tar::EntryType::Symlink,
            name.as_bytes(),
            target.as_bytes(),
            b"",
            0o777,
        )
    }

    fn hardlink(self, name: &str, target: &str) -> Tar {
        self.entry(
            tar::EntryType::Link,
            name.as_bytes(),
            target.as_bytes(),
            b"",
            0o644,
        )
    }

    fn done(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0; 1024]);
        self.0
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn files_directories_and_links_keep_their_kind_mode_owner_and_time() {
    let s = Scratch::new("kinds");
    let tar = Tar::default()
        .dir("./etc/")
        .file("./etc/hostname", "box\n")
        .entry(tar::EntryType::Regular, b"usr/bin/su", b"", b"#!", 0o4755)
        .symlink("bin", "usr/bin")
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .hardlink("etc/name", "etc/hostname")
        .entry(tar::EntryType::Fifo, b"run/pipe", b"", b"", 0o600)
        .done();
    s.apply(&tar).unwrap();
    let t = s.tree();
    assert_eq!(read(&t.join("etc/hostname")), "box\n");
    let su = std::fs::metadata(t.join("usr/bin/su")).unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755, "setuid stays");
    assert_eq!(su.mtime(), 1_600_000_000);
    if root() {
        assert_eq!((su.uid(), su.gid()), (1234, 4321));
        let link = std::fs::symlink_metadata(t.join("bin")).unwrap();
        assert_eq!((link.uid(), link.gid()), (1234, 4321));
    }
    assert_eq!(
        std::fs::read_link(t.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(
        std::fs::read_link(t.join("etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    let (a, b) = (
        std::fs::metadata(t.join("etc/hostname")).unwrap(),
        std::fs::metadata(t.join("etc/name")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "one file, two names");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(t.join("run/pipe"))
        .unwrap()
        .file_type()
        .is_fifo());
    // Directories get their archive time once the layer is written.
    assert_eq!(
        std::fs::metadata(t.join("etc")).unwrap().mtime(),
        1_600_000_000
    );

    // A later layer writes through the symlinked directory, inside the tree.
    s.apply(&Tar::default().file("bin/tool", "x").done())
        .unwrap();
    assert_eq!(read(&t.join("usr/bin/tool")), "x");
}

#[test]
fn whiteouts_delete_what_lower_layers_made() {
    let s = Scratch::new("whiteouts");
    let lower = Tar::default()
        .file("etc/removed.txt", "old")
        .file("etc/kept.txt", "kept")
        .file("opt/tree/a/deep.txt", "deep")
        .file("opt/tree/b.txt", "b")
        .done();
    s.apply(&lower).unwrap();
    let upper = Tar::default()
        .file("etc/.wh.removed.txt", "")
        .file("opt/.wh.tree", "")
        .file("etc/.wh.never-there", "")
        .file("gone/.wh.x", "")
        .done();
    s.apply(&upper).unwrap();
    let t = s.tree();
    assert!(!t.join("etc/removed.txt").exists());
    assert!(
        !t.join("etc/.wh.removed.txt").exists(),
        "whiteouts are not files"
    );
    assert_eq!(read(&t.join("etc/kept.txt")), "kept");
    assert!(!t.join("opt/tree").exists(), "a whole directory goes");
    assert!(t.join("opt").is_dir());
    assert!(
        !t.join("gone").exists(),
        "a whiteout in no directory makes none"
    );
}

#[test]
fn opaque_directories_hide_the_lower_layers_but_not_their_own() {
    let s = Scratch::new("opaque");
    let lower = Tar::default()
        .file("srv/old.txt", "old")
        .file("srv/sub/older.txt", "older")
        .file("srv/keep/lower.txt", "lower")
        .file("other/stays.txt", "stays")
        .done();
    s.apply(&lower).unwrap();
    // This layer's entries come before and after the marker.
    let upper = Tar::default()
        .file("srv/early.txt", "early")
        .file("srv/keep/new.txt", "new")
        .file("srv/.wh..wh..opq", "")
        .file("srv/late.txt", "late")
        .done();
    s.apply(&upper).unwrap();
    let t = s.tree();
    assert!(!t.join("srv/old.txt").exists());
    assert!(!t.join("srv/sub").exists());
    assert!(
        !t.join("srv/keep/lower.txt").exists(),
        "the lower layers' files under a kept directory go too"
    );
    assert_eq!(read(&t.join("srv/keep/new.txt")), "new");
    assert_eq!(read(&t.join("srv/early.txt")), "early");
    assert_eq!(read(&t.join("srv/late.txt")), "late");
    assert!(!t.join("srv/.wh..wh..opq").exists());
    assert_eq!(read(&t.join("other/stays.txt")), "stays");
}

#[test]
fn a_layer_replaces_files_directories_and_symlinks_in_its_way() {
    let s = Scratch::new("replace");
    let secret = s.outside().join("secret");
    s.apply(
        &Tar::default()
            .file("a", "file")
            .file("d/inner.txt", "inner")
            .symlink("f", secret.to_str().unwrap())
            .done(),
    )
    .unwrap();
    std::fs::write(&secret, "host").unwrap();
    s.apply(
        &Tar::default()
            .dir("a")
            .file("d", "now a file")
            .file("f", "mine")
            .done(),
    )
    .unwrap();
    let t = s.tree();
    assert!(t.join("a").is_dir());
    assert_eq!(read(&t.join("d")), "now a file");
    assert_eq!(read(&t.join("f")), "mine");
    assert!(!std::fs::symlink_metadata(t.join("f")).unwrap().is_symlink());
    assert_eq!(
        read(&secret),
        "host",
        "the symlink was replaced, not written through"
    );
}

#[test]
fn absolute_and_dotdot_paths_are_refused() {
    let s = Scratch::new("paths");
    s.refused(
        &Tar::default().file("/etc/passwd", "x").done(),
        "absolute path",
    );
    s.refused(&Tar::default().file("../outside/x", "x").done(), "'..'");
    s.refused(
        &Tar::default().file("a/../../outside/x", "x").done(),
        "'..'",
    );
    s.refused(&Tar::default().dir("..").done(), "'..'");
    s.refused(
        &Tar::default().file("ok/.wh...", "").done(),
        "whiteout of nothing",
    );
}

#[test]
fn symlinks_that_lead_out_of_the_tree_are_refused_when_followed() {
    let s = Scratch::new("escape");
    // Creating such symlinks is harmless: the guest resolves them in its
    // own root. Following one while writing would not be.
    s.apply(
        &Tar::default()
            .symlink("up", "../outside")
            .symlink("far", "a/../../../outside")
            .symlink("loop", "loop")
            .done(),
    )
    .unwrap();
    s.refused(&Tar::default().file("up/x", "x").done(), "above the root");
    s.refused(&Tar::default().file("far/x", "x").done(), "above the root");
    s.refused(&Tar::default().file("loop/x", "x").done(), "symlinks");
    s.refused(
        &Tar::default().file("up/.wh..wh..opq", "").done(),
        "above the root",
    );
    s.refused(
        &Tar::default().file("up/.wh.secret", "").done(),
        "above the root",
    );
    s.refused(
        &Tar::default().hardlink("h", "up/secret").done(),
        "above the root",
    );

    // An absolute target is the tree's own root, as in the guest.
    let outside = s.outside();
    s.apply(
        &Tar::default()
            .symlink("abs", outside.to_str().unwrap())
            .file("abs/x", "inside")
            .done(),
    )
    .unwrap();
    let inside = s.tree().join(outside.strip_prefix("/").unwrap()).join("x");
    assert_eq!(read(&inside), "inside");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn hardlinks_stay_inside_the_tree_and_never_follow_symlinks() {
    let s = Scratch::new("hardlinks");
    let secret = s.outside().join("secret");
    std::fs::write(&secret, "host").unwrap();
    s.refused(
        &Tar::default().hardlink("h", "/etc/passwd").done(),
        "absolute path",
    );
    s.refused(
        &Tar::default().hardlink("h", "../outside/secret").done(),
        "'..'",
    );
    s.refused(
        &Tar::default().hardlink("h", "missing").done(),
        "hardlink to nothing",
    );
    s.refused(
        &Tar::default().dir("d").hardlink("h", "d").done(),
        "hardlink to a directory",
    );
    // A link to a symlink is a link to the symlink, not to where it points.
    s.apply(
        &Tar::default()
            .symlink("sl", secret.to_str().unwrap())
            .hardlink("h", "sl")
            .done(),
    )
    .unwrap();
    assert!(std::fs::symlink_metadata(s.tree().join("h"))
        .unwrap()
        .is_symlink());
    assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);
    std::fs::remove_file(&secret).unwrap();
}

#[test]
fn device_nodes_are_skipped_and_odd_entries_refused() {
    let s = Scratch::new("devices");
    s.apply(
        &Tar::default()
            .entry(tar::EntryType::Char, b"dev/kmem", b"", b"", 0o666)
            .entry(tar::EntryType::Block, b"dev/sda", b"", b"", 0o666)
            .file("dev/ok", "ok")
            .done(),
    )
    .unwrap();
    assert!(!s.tree().join("dev/kmem").exists() && !s.tree().join("dev/sda").exists());
    assert_eq!(read(&s.tree().join("dev/ok")), "ok");
    s.refused(
        &Tar::default().file("dev/ok/x", "x").done(),
        "not a directory",
    );
    s.refused(
        &Tar::default().symlink("empty", "").done(),
        "target missing",
    );
    s.refused(
        &Tar::default()
            .entry(tar::EntryType::GNUSparse, b"sparse", b"", b"", 0o644)
            .done(),
        "sparse",
    );
    // A GNU long name longer than any path.
    let mut long = tar::Header::new_gnu();
    long.set_entry_type(tar::EntryType::GNULongName);
    long.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    long.set_size(1 << 20);
    long.set_cksum();
    let mut tar = long.as_bytes().to_vec();
    tar.resize(512 + (1 << 20), b'a');
    tar.extend_from_slice(&Tar::default().file("x", "x").done());
    s.refused(&tar, "extension header");
}

#[test]
fn long_names_come_through() {
    let s = Scratch::new("long");
    let name = format!("{}/{}", "d".repeat(150), "f".repeat(200));
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(4);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, &name, &b"long"[..])
        .unwrap();
    s.apply(&builder.into_inner().unwrap()).unwrap();
    assert_eq!(read(&s.tree().join(&name)), "long");
}

#[test]
fn the_size_and_entry_caps_hold() {
    let s = Scratch::new("caps");
    let big = "x".repeat(64 << 10);
    let tar = Tar::default().file("a", &big).file("b", &big).done();
    let tree = Tree::open(&s.tree()).unwrap();
    let mut budget = Budget {
        bytes: 100 << 10,
        entries: 100,
    };
    let mut metered = layer::Metered::new(&tar[..], budget.bytes);
    assert!(layer::apply(&tree, &mut metered, &mut budget, root()).is_err());
    assert!(metered.over, "stopped at the byte limit");

    match s.apply_within(
        &Tar::default()
            .file("1", "")
            .file("2", "")
            .file("3", "")
            .done(),
        Budget {
            bytes: 1 << 20,
            entries: 2,
        },
    ) {
        Err(LayerError::TooLarge(m)) => assert!(m.contains("entries"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// An OCI layout of `layers` (tar archives, gzip- or zstd-compressed by
/// turns) with `config` fields merged in; returns the manifest's digest.
fn write_layout(dir: &Path, layers: &[Vec<u8>], run: serde_json::Value) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
        std::fs::write(blobs.join(&digest[7..]), bytes).unwrap();
        (digest, bytes.len())
    };
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, tar) in layers.iter().enumerate() {
        diff_ids.push(format!("sha256:{}", hex::encode(sha2::Sha256::digest(tar))));
        let (bytes, media_type) = if i % 2 == 0 {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).unwrap();
            (
                gz.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        } else {
            (
                zstd::encode_all(&tar[..], 1).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            )
        };
        let (digest, size) = put(&bytes);
        descriptors
            .push(serde_json::json!({"mediaType": media_type, "digest": digest, "size": size}));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": descriptors,
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "v1"},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    manifest_digest
}

fn pull_layout(s: &Scratch, layout: &Path, tag: Option<&str>) -> Result<Pulled, ImageError> {
    let _ = std::fs::remove_dir_all(s.tree());
    std::fs::create_dir_all(s.tree()).unwrap();
    let from = OciSource::Layout {
        dir: layout.to_path_buf(),
        tag: tag.map(str::to_string),
    };
    pull(
        &from,
        Limits::default(),
        &s.tree(),
        &s.0.join("work"),
        &mut |_| {},
    )
}

fn two_layers() -> Vec<Vec<u8>> {
    vec![
        Tar::default()
            .file("etc/removed.txt", "old")
            .file("bin/a", "a")
            .done(),
        Tar::default()
            .file("etc/.wh.removed.txt", "")
            .file("bin/b", "b")
            .done(),
    ]
}

#[test]
fn a_layout_pulls_into_a_tree_with_its_exec_defaults() {
    let s = Scratch::new("layout");
    let layout = s.0.join("layout");
    let digest = write_layout(
        &layout,
        &two_layers(),
        serde_json::json!({"Env": ["GREETING=from-oci", "PATH=/bin", "BROKEN", "=x"], "WorkingDir": "/srv/work", "User": "1000:1000"}),
    );
    let pulled = pull_layout(&s, &layout, Some("v1")).unwrap();
    assert_eq!(pulled.origin.digest, digest);
    assert_eq!(
        pulled.origin.reference,
        format!("oci-layout:{}:v1", layout.display())
    );
    assert_eq!(pulled.layers, 2);
    assert_eq!(pulled.exec.env.len(), 2, "{:?}", pulled.exec.env);
    assert_eq!(pulled.exec.env["GREETING"], "from-oci");
    assert_eq!(pulled.exec.cwd.as_deref(), Some("/srv/work"));
    assert_eq!(pulled.exec.user.as_deref(), Some("1000:1000"));
    let t = s.tree();
    assert!(!t.join("etc/removed.txt").exists());
    assert_eq!(read(&t.join("bin/a")) + &read(&t.join("bin/b")), "ab");
    assert!(t.join("srv/work").is_dir(), "the working directory is made");

    // Then what kiln adds, through the tree and never through its symlinks.
    ready_for_kiln(&t, b"agent").unwrap();
    crate::rootfs::add_user(&t).unwrap();
    assert_eq!(
        std::fs::read(t.join("usr/sbin/kiln-agent")).unwrap(),
        b"agent"
    );
    assert!(read(&t.join("etc/passwd")).contains("user:x:1000:1000"));
    for dir in ["proc", "sys", "dev", "tmp"] {
        assert!(t.join(dir).is_dir(), "{dir}");
    }
    assert_eq!(
        std::fs::metadata(t.join("tmp"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o1777
    );

    // The only image, so no tag is needed; an unknown one is refused.
    pull_layout(&s, &layout, None).unwrap();
    let err = pull_layout(&s, &layout, Some("v2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("v2") && err.contains("v1"), "{err}");
}

#[test]
fn ready_for_kiln_refuses_symlinked_account_files_and_follows_sbin_inside() {
    let s = Scratch::new("ready");
    let t = s.tree();
    let host_passwd = s.outside().join("passwd");
    std::fs::write(&host_passwd, "root:x:0:0::/root:/bin/sh\n").unwrap();
    std::fs::create_dir_all(t.join("etc")).unwrap();
    std::fs::create_dir_all(t.join("usr/bin")).unwrap();
    std::os::unix::fs::symlink("bin", t.join("usr/sbin")).unwrap();
    std::os::unix::fs::symlink(&host_passwd, t.join("etc/passwd")).unwrap();
    let err = ready_for_kiln(&t, b"agent").unwrap_err().to_string();
    assert!(err.contains("passwd"), "{err}");
    assert_eq!(read(&t.join("usr/bin/kiln-agent")), "agent");
    assert_eq!(read(&host_passwd), "root:x:0:0::/root:/bin/sh\n");

    std::fs::remove_file(t.join("etc/passwd")).unwrap();
    std::os::unix::fs::symlink(s.outside(), t.join("home")).unwrap();
    let err = ready_for_kiln(&t, b"agent").unwrap_err().to_string();
    assert!(err.contains("home"), "{err}");
    assert_eq!(std::fs::read_dir(s.outside()).unwrap().count(), 1);
}

#[test]
fn tampered_blobs_and_layers_are_refused() {
    let s = Scratch::new("tamper");
    let layout = s.0.join("layout");
    write_layout(&layout, &two_layers(), serde_json::json!({}));
    pull_layout(&s, &layout, None).unwrap();

    // A flipped byte in a compressed layer.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest[7..]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&manifest_digest)).unwrap()).unwrap();
    let layer = blob(manifest["layers"][1]["digest"].as_str().unwrap());
    let original = std::fs::read(&layer).unwrap();
    let mut bytes = original.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&layer, &bytes).unwrap();
    let err = pull_layout(&s, &layout, None).unwrap_err().to_string();
    assert!(err.contains("mismatch"), "{err}");
    std::fs::write(&layer, &original).unwrap();

    // A tampered manifest no longer matches the index.
    let manifest_path = blob(&manifest_digest);
    let manifest_bytes = std::fs::read(&manifest_path).unwrap();
    std::fs::write(&manifest_path, [&manifest_bytes[..], b" "].concat()).unwrap();
    let err = pull_layout(&s, &layout, None).unwrap_err().to_string();
    assert!(err.contains("digest mismatch"), "{err}");
    std::fs::write(&manifest_path, &manifest_bytes).unwrap();

    // Layers that are not what the config's diff_ids say, though every
    // blob matches its own digest.
    let other = s.0.join("other");
    let mut layers = two_layers();
    let good = write_layout(&other, &layers, serde_json::json!({}));
    let config_of = |dir: &Path, digest: &str| -> serde_json::Value {
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("blobs/sha256").join(&digest[7..])).unwrap(),
        )
        .unwrap();
        let config = manifest["config"]["digest"].as_str().unwrap().to_string();
        serde_json::from_slice(&std::fs::read(dir.join("blobs/sha256").join(&config[7..])).unwrap())
            .unwrap()
    };
    let diff_ids = config_of(&other, &good)["rootfs"]["diff_ids"].clone();
    layers[1] = Tar::default().file("bin/evil", "evil").done();
    let _ = std::fs::remove_dir_all(&other);
    write_layout(&other, &layers, serde_json::json!({}));
    // Swap the diff_ids back in: config, manifest and index re-hashed.
    let digest = rewrite_config(&other, |config| {
        config["rootfs"]["diff_ids"] = diff_ids.clone()
    });
    assert_eq!(config_of(&other, &digest)["rootfs"]["diff_ids"], diff_ids);
    let err = pull_layout(&s, &other, None).unwrap_err().to_string();
    assert!(err.contains("uncompressed digest"), "{err}");

    // Not linux/amd64.
    rewrite_config(&other, |config| config["architecture"] = "arm64".into());
    let err = pull_layout(&s, &other, None).unwrap_err().to_string();
    assert!(
        err.contains("linux/arm64") || err.contains("arm64"),
        "{err}"
    );
}

/// Changes the config of the layout's only image, writing a new config,
/// manifest and index; returns the new manifest digest.
fn rewrite_config(dir: &Path, change: impl FnOnce(&mut serde_json::Value)) -> String {
    let blobs = dir.join("blobs/sha256");
    let put = |bytes: &[u8]| {
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
        std::fs::write(blobs.join(&digest[7..]), bytes).unwrap();
        (digest, bytes.len())
    };
    let get = |digest: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(blobs.join(&digest[7..])).unwrap()).unwrap()
    };
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mut manifest = get(index["manifests"][0]["digest"].as_str().unwrap());
    let mut config = get(manifest["config"]["digest"].as_str().unwrap());
    change(&mut config);
    let (digest, size) = put(&serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = size.into();
    let (digest, size) = put(&serde_json::to_vec(&manifest).unwrap());
    index["manifests"][0]["digest"] = digest.clone().into();
    index["manifests"][0]["size"] = size.into();
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    digest
}

#[test]
fn an_index_yields_its_linux_amd64_image() {
    let s = Scratch::new("index");
    let layout = s.0.join("layout");
    let amd64 = write_layout(&layout, &two_layers(), serde_json::json!({}));
    let blobs = layout.join("blobs/sha256");
    let put = |value: serde_json::Value| {
        let bytes = serde_json::to_vec(&value).unwrap();
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
        std::fs::write(blobs.join(&digest[7..]), &bytes).unwrap();
        (digest, bytes.len())
    };
    let size = std::fs::metadata(blobs.join(&amd64[7..])).unwrap().len();
    let entry = |arch: &str, digest: &str, size: u64| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": size,
            "platform": {"os": "linux", "architecture": arch},
        })
    };
    let missing = format!("sha256:{}", "0".repeat(64));
    let (index_digest, index_size) = put(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("arm64", &missing, 10), entry("amd64", &amd64, size)],
    }));
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": index_digest, "size": index_size,
    }]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    let pulled = pull_layout(&s, &layout, None).unwrap();
    assert_eq!(
        pulled.origin.digest, amd64,
        "the platform's manifest is the one recorded"
    );

    let (only_arm, size) = put(serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("arm64", &missing, 10)],
    }));
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": only_arm, "size": size,
    }]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    let err = pull_layout(&s, &layout, None).unwrap_err().to_string();
    assert!(
        err.contains("no linux/amd64") && err.contains("linux/arm64"),
        "{err}"
    );
}

#[test]
fn the_unpacked_size_cap_refuses_an_image() {
    let s = Scratch::new("cap");
    let layout = s.0.join("layout");
    let big = "z".repeat(3 << 20);
    write_layout(
        &layout,
        &[Tar::default().file("big", &big).done()],
        serde_json::json!({}),
    );
    let from = OciSource::Layout {
        dir: layout,
        tag: None,
    };
    let limits = Limits {
        max_unpacked_bytes: 2 << 20,
        ..Limits::default()
    };
    let err = pull(&from, limits, &s.tree(), &s.0.join("work"), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than 2 MiB"), "{err}");
}

#[test]
fn sources_parse_from_the_command_line() {
    assert_eq!(
        OciSource::parse("oci-layout:/tmp/img:v1", false).unwrap(),
        OciSource::Layout {
            dir: "/tmp/img".into(),
            tag: Some("v1".into())
        }
    );
    assert_eq!(
        OciSource::parse("oci-layout:/tmp/img", false).unwrap(),
        OciSource::Layout {
            dir: "/tmp/img".into(),
            tag: None
        }
    );
    assert_eq!(
        OciSource::parse("oci-layout:/tmp/a:b/img", false).unwrap(),
        OciSource::Layout {
            dir: "/tmp/a:b/img".into(),
            tag: None
        }
    );
    assert!(OciSource::parse("oci-layout:", false).is_err());
    assert_eq!(
        OciSource::parse("127.0.0.1:5000/test/img:v1", false).unwrap(),
        OciSource::Registry {
            reference: "127.0.0.1:5000/test/img:v1".into(),
            insecure: false,
            credentials: None,
        }
    );
}

#[test]
fn registry_references_are_checked_before_any_request() {
    for bad in ["", "has space/x:1", "a\nb", "tab\t/x"] {
        let from = OciSource::Registry {
            reference: bad.into(),
            insecure: false,
            credentials: None,
        };
        let s = Scratch::new("refs");
        let err = pull(
            &from,
            Limits::default(),
            &s.tree(),
            &s.0.join("work"),
            &mut |_| {},
        );
        assert!(err.is_err(), "{bad:?}");
    }
}

/// A PAX extended header (`x`) of `records`, for the entry after it.
fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, value) in records {
        // The length counts itself: "<len> <key>=<value>\n".
        let body = key.len() + value.len() + 3;
        let mut len = body + body.to_string().len();
        if len.to_string().len() != body.to_string().len() {
            len += 1;
        }
        data.extend_from_slice(format!("{len} {key}=").as_bytes());
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    let mut header = tar::Header::new_ustar();
    header.set_path("PaxHeaders/x").unwrap();
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(&data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

impl Tar {
    fn pax(mut self, records: &[(&str, &[u8])]) -> Tar {
        self.0.extend_from_slice(&pax(records));
        self
    }
}

/// An attribute of `path` itself (not followed), `None` when it has none.
fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let cname = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    // SAFETY: NUL-terminated strings and a buffer of the length given.
    let n = unsafe {
        libc::lgetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        // No such attribute, or (other.) no such namespace.
        let errno = nix::errno::Errno::last();
        assert!(
            matches!(
                errno,
                nix::errno::Errno::ENODATA | nix::errno::Errno::EOPNOTSUPP
            ),
            "{}: {name}: {errno}",
            path.display()
        );
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// `cap_net_raw=ep` as `security.capability` holds it (VFS_CAP_REVISION_2).
fn cap_net_raw() -> Vec<u8> {
    let mut value = Vec::new();
    for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        value.extend_from_slice(&word.to_le_bytes());
    }
    value
}

#[test]
fn pax_xattrs_land_on_files_and_directories_but_system_ones_do_not() {
    let s = Scratch::new("xattrs");
    // A POSIX ACL with a named user, which a file system would keep as
    // `system.posix_acl_access` if it were applied.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    let cap = cap_net_raw();
    let tar = Tar::default()
        .pax(&[
            ("SCHILY.xattr.user.kiln", b"on a file"),
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.trusted.kiln", b"trusted"),
            ("SCHILY.xattr.system.posix_acl_access", &acl),
            ("SCHILY.xattr.other.kiln", b"no such namespace"),
            ("SCHILY.xattr.user.kiln", b"the last record wins"),
        ])
        .entry(
            tar::EntryType::Regular,
            b"bin/ping",
            b"",
            b"\x7fELF",
            0o4755,
        )
        .pax(&[("SCHILY.xattr.user.dir", b"on a directory")])
        .dir("srv/")
        .pax(&[("SCHILY.xattr.user.link", b"never through a symlink")])
        .symlink("srv/link", "../bin/ping")
        .done();
    s.apply(&tar).unwrap();
    let t = s.tree();
    let ping = t.join("bin/ping");
    assert_eq!(
        xattr(&ping, "user.kiln").as_deref(),
        Some(&b"the last record wins"[..])
    );
    assert_eq!(
        xattr(&t.join("srv"), "user.dir").as_deref(),
        Some(&b"on a directory"[..])
    );
    assert_eq!(
        xattr(&ping, "user.link"),
        None,
        "not set through the symlink"
    );
    assert_eq!(xattr(&t.join("srv/link"), "user.link"), None);
    assert_eq!(
        xattr(&ping, "system.posix_acl_access"),
        None,
        "system. is left out"
    );
    assert_eq!(xattr(&ping, "other.kiln"), None);
    let mode = std::fs::metadata(&ping).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o4755, "setuid survives the attributes");
    if root() {
        // Set after the owner changed, which would have cleared it.
        assert_eq!(xattr(&ping, "security.capability"), Some(cap.clone()));
        assert_eq!(
            xattr(&ping, "trusted.kiln").as_deref(),
            Some(&b"trusted"[..])
        );
        assert_eq!(std::fs::metadata(&ping).unwrap().uid(), 1234);
    }
    assert_eq!(std::fs::metadata(&ping).unwrap().mtime(), 1_600_000_000);

    // mkfs.erofs keeps them: the values are in the packed image.
    let have_mkfs = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("mkfs.erofs").is_file()));
    if !have_mkfs && std::env::var_os("CI").is_none() {
        eprintln!("mkfs.erofs missing: the packing check is skipped");
        return;
    }
    let packed = s.0.join("rootfs.erofs");
    crate::rootfs::pack_erofs(&t, &packed).unwrap();
    let image = std::fs::read(&packed).unwrap();
    let holds = |needle: &[u8]| image.windows(needle.len()).any(|w| w == needle);
    assert!(holds(b"the last record wins") && holds(b"on a directory"));
    if root() {
        assert!(holds(&cap) && holds(b"trusted"));
    }
}

#[test]
fn pax_xattrs_are_bounded() {
    let s = Scratch::new("xattr-bounds");
    let names: Vec<String> = (0..=layer::XATTRS_MAX)
        .map(|i| format!("SCHILY.xattr.user.a{i}"))
        .collect();
    let records: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"v"[..])).collect();
    s.refused(
        &Tar::default().pax(&records).file("many", "x").done(),
        "more than 64 extended attributes",
    );
    // Sixty-four are fine, and so are system. ones past them.
    let mut fine = records[..layer::XATTRS_MAX].to_vec();
    fine.push(("SCHILY.xattr.system.x", b"v"));
    s.apply(&Tar::default().pax(&fine).file("enough", "x").done())
        .unwrap();
    assert_eq!(
        xattr(&s.tree().join("enough"), "user.a63").as_deref(),
        Some(&b"v"[..])
    );

    let big = vec![b'v'; layer::XATTR_VALUE_MAX + 1];
    s.refused(
        &Tar::default()
            .pax(&[("SCHILY.xattr.user.big", &big)])
            .file("big", "x")
            .done(),
        "a value of 65537 bytes",
    );
    let long = format!("SCHILY.xattr.user.{}", "n".repeat(300));
    s.refused(
        &Tar::default()
            .pax(&[(long.as_str(), &b"v"[..])])
            .file("long", "x")
            .done(),
        "name too long",
    );
    if root() {
        // A capability the kernel cannot parse refuses the layer.
        s.refused(
            &Tar::default()
                .pax(&[("SCHILY.xattr.security.capability", &b"junk"[..])])
                .file("badcap", "x")
                .done(),
            "security.capability",
        );
    }
}

mod credentials {
    use super::super::auth::{self, Credentials};
    use super::Scratch;
    use std::collections::HashMap;

    const REF: &str = "127.0.0.1:5000/test/img:v1";

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn docker_config(s: &Scratch, json: &str) -> String {
        let dir = s.0.join("docker");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), json).unwrap();
        dir.display().to_string()
    }

    fn who(c: Option<Credentials>) -> Option<(String, String, String)> {
        c.map(|c| {
            (
                c.user().to_string(),
                c.password().to_string(),
                c.origin().to_string(),
            )
        })
    }

    #[test]
    fn flag_then_environment_then_docker_config_then_nobody() {
        let s = Scratch::new("creds-order");
        // base64 of kiln:from-docker-config
        let dir = docker_config(
            &s,
            r#"{"auths": {"127.0.0.1:5000": {"auth": "a2lsbjpmcm9tLWRvY2tlci1jb25maWc="},
                          "https://other.example/v1/": {"username": "u", "password": "p"}}}"#,
        );
        let everything = env(&[
            ("KILN_REGISTRY_USER", "env-user"),
            ("KILN_REGISTRY_PASSWORD", "env-password"),
            ("DOCKER_CONFIG", &dir),
        ]);
        let flag = auth::resolve(REF, Some("flag-user"), Some("stdin-password"), &everything);
        assert_eq!(
            who(flag.unwrap()),
            Some((
                "flag-user".into(),
                "stdin-password".into(),
                "--registry-user".into()
            ))
        );
        // The flag's user takes the environment's password without stdin.
        let flag = auth::resolve(REF, Some("flag-user"), None, &everything);
        assert_eq!(who(flag.unwrap()).unwrap().1, "env-password");
        let from_env = auth::resolve(REF, None, None, &everything);
        assert_eq!(
            who(from_env.unwrap()),
            Some((
                "env-user".into(),
                "env-password".into(),
                "KILN_REGISTRY_USER".into()
            ))
        );
        let docker = auth::resolve(REF, None, None, &env(&[("DOCKER_CONFIG", &dir)]));
        let (user, password, origin) = who(docker.unwrap()).unwrap();
        assert_eq!(
            (user.as_str(), password.as_str()),
            ("kiln", "from-docker-config")
        );
        assert!(origin.ends_with("docker/config.json"), "{origin}");
        // An entry keyed by URL, with username and password fields.
        let other = auth::resolve(
            "other.example/team/app:1",
            None,
            None,
            &env(&[("DOCKER_CONFIG", &dir)]),
        );
        assert_eq!(who(other.unwrap()).unwrap().0, "u");
        // ~/.docker when DOCKER_CONFIG is unset.
        let home = s.0.display().to_string();
        std::fs::rename(s.0.join("docker"), s.0.join(".docker")).unwrap();
        let from_home = auth::resolve(REF, None, None, &env(&[("HOME", &home)]));
        assert_eq!(who(from_home.unwrap()).unwrap().0, "kiln");
        // No entry for the registry, or no file: anonymous.
        let none = auth::resolve("elsewhere:5000/x:1", None, None, &env(&[("HOME", &home)]));
        assert_eq!(none.unwrap(), None);
        let none = auth::resolve(REF, None, None, &env(&[("DOCKER_CONFIG", "/nonexistent")]));
        assert_eq!(none.unwrap(), None);
        assert_eq!(auth::resolve(REF, None, None, &env(&[])).unwrap(), None);
    }

    #[test]
    fn half_given_credentials_and_bad_configs_are_errors_without_the_password() {
        let s = Scratch::new("creds-errors");
        let nothing = env(&[]);
        let err = auth::resolve(REF, Some("u"), None, &nothing).unwrap_err();
        assert!(err.to_string().contains("needs a password"), "{err}");
        let err = auth::resolve(REF, None, None, &env(&[("KILN_REGISTRY_USER", "u")])).unwrap_err();
        assert!(err.to_string().contains("KILN_REGISTRY_PASSWORD"), "{err}");
        let err = auth::resolve(REF, Some("a:b"), Some("hunter2"), &nothing).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = auth::resolve(REF, Some("u"), Some("hunter2\nmore"), &nothing).unwrap_err();
        assert!(
            err.to_string().contains("line break") && !err.to_string().contains("hunter2"),
            "{err}"
        );

        for (json, expect) in [
            ("{not json", "not a Docker config"),
            (
                r#"{"auths": {"127.0.0.1:5000": {"auth": "!!!"}}}"#,
                "not base64",
            ),
            (
                r#"{"auths": {"127.0.0.1:5000": {"identitytoken": "t"}}}"#,
                "identity token",
            ),
        ] {
            let dir = docker_config(&s, json);
            let err = auth::resolve(REF, None, None, &env(&[("DOCKER_CONFIG", &dir)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect) && err.contains("config.json"), "{err}");
        }
        let dir = docker_config(&s, &format!("{{\"x\": \"{}\"}}", "a".repeat(2 << 20)));
        let err = auth::resolve(REF, None, None, &env(&[("DOCKER_CONFIG", &dir)])).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = Credentials::new("kiln", "hunter2", "--registry-user").unwrap();
        let source = super::OciSource::parse(REF, false)
            .unwrap()
            .with_credentials(Some(c.clone()))
            .unwrap();
        for shown in [format!("{c:?}"), format!("{source:?}")] {
            assert!(
                shown.contains("kiln") && !shown.contains("hunter2"),
                "{shown}"
            );
        }
        let layout = super::OciSource::parse("oci-layout:/tmp/x", false).unwrap();
        assert!(layout.with_credentials(Some(c)).is_err());
    }
}
