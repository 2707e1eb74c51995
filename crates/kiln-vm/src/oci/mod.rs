//! Root filesystems from OCI images (`kiln image build NAME --from
//! REGISTRY/REPO:TAG`, or `--from oci-layout:DIR[:TAG]`): the linux/amd64
//! manifest is picked from an index, its config and layers fetched and
//! each checked against its digest, every layer's uncompressed archive
//! against the config's `rootfs.diff_ids`, and the layers applied in order
//! into a tree (see [`layer`]). The tree then gets what kiln needs to boot
//! it, and the image builder packs it as a Debian root filesystem is
//! packed. The config's `Env`, `WorkingDir` and `User` become the defaults
//! of every command in the image's VMs.

pub mod auth;
mod fetch;
pub mod layer;
#[cfg(test)]
mod tests;
pub mod tree;

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::agent::ExecDefaults;
use crate::image::ImageError;
use layer::{Budget, LayerError, Metered};
use tree::{components, Tree};

/// Layers an image may have (Docker's own limit is 127).
const LAYERS_MAX: usize = 256;
/// Variables of an image's `Env` kept, and the bytes of each.
const ENV_MAX: usize = 1024;
const ENV_VALUE_MAX: usize = 64 << 10;

pub(crate) fn fail(step: &'static str, message: impl Into<String>) -> ImageError {
    crate::image::step(step, message)
}

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OciSource {
    /// `REGISTRY/REPO:TAG` or `…@sha256:…`; plain HTTP when `insecure`
    /// (always for a registry on this host); anonymous without
    /// `credentials` (see [`auth::resolve`]).
    Registry {
        reference: String,
        insecure: bool,
        credentials: Option<auth::Credentials>,
    },
    /// An OCI image layout directory and the tag of the image in it.
    Layout { dir: PathBuf, tag: Option<String> },
}

/// How a layout's tag is spelled (the OCI reference grammar's tag).
fn is_tag(text: &str) -> bool {
    let bytes = text.as_bytes();
    (1..=128).contains(&bytes.len())
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl OciSource {
    /// `oci-layout:DIR[:TAG]`, else a registry reference.
    pub fn parse(from: &str, insecure: bool) -> Result<OciSource, ImageError> {
        if let Some(rest) = from.strip_prefix("oci-layout:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if is_tag(tag) && !dir.is_empty() => (dir, Some(tag.to_string())),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(fail("resolve image", "oci-layout: names no directory"));
            }
            return Ok(OciSource::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        Ok(OciSource::Registry {
            reference: from.to_string(),
            insecure,
            credentials: None,
        })
    }

    /// The same source with `credentials` for its registry; a layout
    /// takes none.
    pub fn with_credentials(
        self,
        credentials: Option<auth::Credentials>,
    ) -> Result<OciSource, ImageError> {
        match (self, credentials) {
            (
                OciSource::Registry {
                    reference,
                    insecure,
                    ..
                },
                credentials,
            ) => Ok(OciSource::Registry {
                reference,
                insecure,
                credentials,
            }),
            (layout, None) => Ok(layout),
            (OciSource::Layout { .. }, Some(_)) => Err(fail(
                "resolve image",
                "registry credentials were given for an oci-layout directory",
            )),
        }
    }

    /// As `image.json` records it.
    pub fn describe(&self) -> String {
        match self {
            OciSource::Registry { reference, .. } => reference.clone(),
            OciSource::Layout { dir, tag } => match tag {
                Some(tag) => format!("oci-layout:{}:{tag}", dir.display()),
                None => format!("oci-layout:{}", dir.display()),
            },
        }
    }
}

/// What one image may take once unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of all its layers' archives, uncompressed.
    pub max_unpacked_bytes: u64,
    /// Entries of all its layers' archives.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_unpacked_bytes: 4096 << 20,
            max_entries: 1 << 20,
        }
    }
}

/// Where an image's root filesystem came from, as `image.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciOrigin {
    /// What `--from` named.
    pub reference: String,
    /// The digest of the image's (linux/amd64) manifest.
    pub digest: String,
}

/// What pulling an image into a tree made.
#[derive(Clone, Debug)]
pub struct Pulled {
    pub origin: OciOrigin,
    pub exec: ExecDefaults,
    pub layers: usize,
    pub unpacked_bytes: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
}

/// A manifest or an index: which one it is shows in its fields.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct Manifest {
    #[serde(rename = "schemaVersion", default)]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl Manifest {
    fn is_index(&self) -> bool {
        matches!(
            self.media_type.as_deref(),
            Some(
                "application/vnd.oci.image.index.v1+json"
                    | "application/vnd.docker.distribution.manifest.list.v2+json"
            )
        ) || (self.media_type.is_none() && self.config.is_none() && !self.manifests.is_empty())
    }
}

#[derive(Debug, Default, Deserialize)]
struct ImageConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RunConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
struct RunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    diff_ids: Vec<String>,
}

const CONFIG_TYPES: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

const LAYER_TYPES: [&str; 5] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| fail("read manifest", format!("{what}: {e}")))
}

/// Pulls the image `from` names into `tree` (an empty directory), with
/// downloads in `work`, as far as `limits` allow. Files get their owners
/// from the archives when this process may set them.
pub fn pull(
    from: &OciSource,
    limits: Limits,
    tree: &Path,
    work: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Pulled, ImageError> {
    let mut source = fetch::open(from)?;
    progress("fetching the manifest");
    let (top, top_digest) = source.top()?;
    let mut manifest: Manifest = parse("manifest", &top)?;
    let mut digest = top_digest;
    if manifest.is_index() {
        let platforms = || {
            manifest
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let chosen = manifest
            .manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .ok_or_else(|| {
                fail(
                    "resolve image",
                    format!("no linux/amd64 image in the index (it has {})", platforms()),
                )
            })?;
        digest = chosen.digest.clone();
        let bytes = source.manifest(&digest)?;
        manifest = parse("manifest", &bytes)?;
        if manifest.is_index() {
            return Err(fail("resolve image", "an index inside an index"));
        }
    }
    if manifest.schema_version != 2 {
        return Err(fail(
            "resolve image",
            format!(
                "manifest schema {} (only 2 is read)",
                manifest.schema_version
            ),
        ));
    }
    let config_desc = manifest
        .config
        .clone()
        .ok_or_else(|| fail("resolve image", "the manifest has no config"))?;
    if !CONFIG_TYPES.contains(&config_desc.media_type.as_str()) {
        return Err(fail(
            "resolve image",
            format!(
                "{:?} is not an image config (an artifact?)",
                config_desc.media_type
            ),
        ));
    }
    if manifest.layers.len() > LAYERS_MAX {
        return Err(fail(
            "resolve image",
            format!("{} layers", manifest.layers.len()),
        ));
    }
    let compressed: u64 = manifest
        .layers
        .iter()
        .map(|l| l.size)
        .fold(0, u64::saturating_add);
    if compressed > limits.max_unpacked_bytes {
        return Err(fail(
            "check size",
            format!(
                "the layers are {} MiB compressed, over the {} MiB allowed unpacked",
                compressed >> 20,
                limits.max_unpacked_bytes >> 20
            ),
        ));
    }
    for layer in &manifest.layers {
        if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
            return Err(fail(
                "resolve image",
                format!(
                    "layer {}: media type {:?} is not supported (foreign and non-distributable layers are not fetched)",
                    layer.digest, layer.media_type
                ),
            ));
        }
    }
    std::fs::create_dir_all(work)?;
    progress("fetching the config");
    let config: ImageConfig = parse("config", &source.small_blob(&config_desc, work)?)?;
    if source.downloaded() {
        let _ = std::fs::remove_file(work.join(fetch::check_digest(&config_desc.digest)?));
    }
    if config.os != "linux" || config.architecture != "amd64" {
        return Err(fail(
            "resolve image",
            format!(
                "the image is {}/{}; kiln runs linux/amd64",
                config.os, config.architecture
            ),
        ));
    }
    if config.rootfs.kind != "layers" || config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(fail(
            "verify",
            format!(
                "the config names {} layers ({}), the manifest {}",
                config.rootfs.diff_ids.len(),
                config.rootfs.kind,
                manifest.layers.len()
            ),
        ));
    }

    let root = Tree::open(tree).map_err(|e| fail("apply layers", e.to_string()))?;
    let own = nix::unistd::geteuid().is_root();
    let mut budget = Budget {
        bytes: limits.max_unpacked_bytes,
        entries: limits.max_entries,
    };
    let count = manifest.layers.len();
    for (i, (desc, diff_id)) in manifest
        .layers
        .iter()
        .zip(&config.rootfs.diff_ids)
        .enumerate()
    {
        progress(&format!(
            "layer {}/{count}: {:.1} MiB",
            i + 1,
            desc.size as f64 / (1 << 20) as f64
        ));
        fetch::check_digest(diff_id)?;
        let path = source.blob(desc, work)?;
        let applied = apply_blob(&root, &path, desc, &mut budget, own, &limits);
        if source.downloaded() {
            let _ = std::fs::remove_file(&path);
        }
        let got = applied?;
        if &got != diff_id {
            return Err(fail(
                "verify",
                format!(
                    "layer {}: uncompressed digest {got}, the config says {diff_id}",
                    desc.digest
                ),
            ));
        }
    }

    progress("readying the tree for kiln");
    let exec = exec_defaults(config.config.unwrap_or_default());
    if let Some(cwd) = &exec.cwd {
        let parts = components(cwd.trim_start_matches('/').as_bytes())
            .map_err(|e| fail("check image", format!("WorkingDir {cwd}: {e}")))?;
        root.dir(&parts, true)
            .map_err(|e| fail("check image", format!("WorkingDir {cwd}: {e}")))?;
    }
    Ok(Pulled {
        origin: OciOrigin {
            reference: from.describe(),
            digest,
        },
        exec,
        layers: count,
        unpacked_bytes: limits.max_unpacked_bytes - budget.bytes,
    })
}

/// Applies one layer's blob, checking it against its descriptor as it is
/// read; returns the digest of its uncompressed archive.
fn apply_blob(
    root: &Tree,
    path: &Path,
    desc: &Descriptor,
    budget: &mut Budget,
    own: bool,
    limits: &Limits,
) -> Result<String, ImageError> {
    let step = "apply layer";
    let file =
        std::fs::File::open(path).map_err(|e| fail(step, format!("{}: {e}", desc.digest)))?;
    let mut blob = Metered::new(file, desc.size);
    let over_unpacked = || {
        fail(
            "check size",
            format!(
                "the image unpacks to more than {} MiB (--max-unpacked-mib)",
                limits.max_unpacked_bytes >> 20
            ),
        )
    };
    let (diff_id, read) = {
        let mut buffered = std::io::BufReader::new(&mut blob);
        let magic: Vec<u8> = buffered.fill_buf()?.iter().take(4).copied().collect();
        let decoded: Box<dyn Read + '_> = match magic.as_slice() {
            [0x1f, 0x8b, ..] => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
                zstd::stream::read::Decoder::with_buffer(buffered)
                    .map_err(|e| fail(step, e.to_string()))?,
            ),
            _ => Box::new(buffered),
        };
        let mut plain = Metered::new(decoded, budget.bytes);
        let applied = layer::apply(root, &mut plain, budget, own);
        if plain.over {
            return Err(over_unpacked());
        }
        if let Err(error) = applied {
            return Err(match error {
                LayerError::Refused(m) => fail("refuse layer", format!("{}: {m}", desc.digest)),
                LayerError::TooLarge(m) => fail("check size", m),
                LayerError::Io(e) => fail(step, format!("{}: {e}", desc.digest)),
            });
        }
        let finished = plain.finish();
        if plain.over {
            return Err(over_unpacked());
        }
        finished.map_err(|e| fail(step, format!("{}: {e}", desc.digest)))?
    };
    budget.bytes = budget.bytes.saturating_sub(read);
    let checked = blob.finish();
    match checked {
        Ok((digest, size)) if !blob.over && size == desc.size && digest == desc.digest => {
            Ok(diff_id)
        }
        _ => Err(fail(
            "verify",
            format!("layer {}: digest mismatch", desc.digest),
        )),
    }
}

/// The config's `Env`, `WorkingDir` and `User` as exec defaults; what no
/// process could be given (a NUL, a name without `=`) is left out.
fn exec_defaults(config: RunConfig) -> ExecDefaults {
    let mut env = BTreeMap::new();
    for pair in config.env.unwrap_or_default().into_iter().take(ENV_MAX) {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        if key.is_empty() || pair.contains('\0') || pair.len() > ENV_VALUE_MAX {
            continue;
        }
        env.insert(key.to_string(), value.to_string());
    }
    let cwd = config
        .working_dir
        .filter(|d| !d.is_empty() && !d.contains('\0') && d.len() < tree::PATH_MAX)
        .map(|d| {
            if d.starts_with('/') {
                d
            } else {
                format!("/{d}")
            }
        });
    let user = config
        .user
        .filter(|u| !u.is_empty() && !u.contains('\0') && u.len() <= 256);
    ExecDefaults { env, cwd, user }
}

/// What kiln needs in a pulled tree: the mount points the stage-one init
/// moves its mounts onto, a /tmp, and the agent as `/usr/sbin/kiln-agent`
/// (written through the tree, so a merged `/usr/sbin` symlink is followed
/// inside it). Then the paths [`crate::rootfs::add_user`] writes through
/// the host's file system are checked to be real directories and files
/// of the tree, so no symlink in the image takes its writes elsewhere.
pub fn ready_for_kiln(tree: &Path, agent: &[u8]) -> Result<(), ImageError> {
    let step = "ready the tree";
    let err = |what: &str, e: tree::TreeError| fail(step, format!("{what}: {e}"));
    let root = Tree::open(tree).map_err(|e| err("root", e))?;
    // Mount points: whatever an image has there is replaced.
    for dir in ["proc", "sys", "dev"] {
        root.make_dir(&[dir.as_bytes()], 0o755)
            .map_err(|e| err(dir, e))?;
    }
    if tree::stat_at(root.root(), b"tmp")
        .map_err(|e| err("tmp", e))?
        .is_none()
    {
        let tmp = root.make_dir(&[b"tmp"], 0o700).map_err(|e| err("tmp", e))?;
        nix::sys::stat::fchmod(
            tmp.as_fd(),
            nix::sys::stat::Mode::from_bits_truncate(0o1777),
        )
        .map_err(|e| fail(step, format!("tmp: {e}")))?;
    }

    let sbin = root
        .dir(&[b"usr", b"sbin"], true)
        .map_err(|e| err("usr/sbin", e))?
        .ok_or_else(|| fail(step, "usr/sbin"))?;
    tree::remove_at(sbin.as_fd(), b"kiln-agent").map_err(|e| err("usr/sbin/kiln-agent", e))?;
    let fd = nix::fcntl::openat(
        sbin.as_fd(),
        c"kiln-agent",
        nix::fcntl::OFlag::O_WRONLY
            | nix::fcntl::OFlag::O_CREAT
            | nix::fcntl::OFlag::O_EXCL
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o755),
    )
    .map_err(|e| fail(step, format!("usr/sbin/kiln-agent: {e}")))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(agent)?;
    nix::sys::stat::fchmod(
        file.as_fd(),
        nix::sys::stat::Mode::from_bits_truncate(0o755),
    )
    .map_err(|e| fail(step, format!("usr/sbin/kiln-agent: {e}")))?;
    drop(file);

    // add_user reads and appends these through plain paths.
    match tree::stat_at(root.root(), b"etc").map_err(|e| err("etc", e))? {
        None => {
            root.make_dir(&[b"etc"], 0o755).map_err(|e| err("etc", e))?;
        }
        Some(stat) if tree::is_dir(&stat) => {}
        Some(_) => {
            return Err(fail(
                step,
                "etc is not a directory (kiln adds its account to etc/passwd)",
            ))
        }
    }
    let etc = tree::open_dir_at(root.root(), b"etc").map_err(|e| err("etc", e))?;
    let real = |dir: &std::os::fd::OwnedFd, name: &[u8]| -> Result<bool, ImageError> {
        match tree::stat_at(dir.as_fd(), name)
            .map_err(|e| err(&String::from_utf8_lossy(name), e))?
        {
            None => Ok(false),
            Some(stat) if stat.st_mode & libc::S_IFMT == libc::S_IFREG => Ok(true),
            Some(_) => Err(fail(
                step,
                format!(
                    "{} is not a regular file (kiln adds its account there)",
                    String::from_utf8_lossy(name)
                ),
            )),
        }
    };
    for file in [&b"passwd"[..], b"group", b"shadow"] {
        real(&etc, file)?;
    }
    let (name, _, home) = crate::rootfs::USER;
    let passwd = tree.join("etc/passwd");
    let mut known = Vec::new();
    if let Ok(f) = std::fs::File::open(&passwd) {
        f.take(fetch::JSON_MAX).read_to_end(&mut known)?;
    }
    let has_user = String::from_utf8_lossy(&known)
        .lines()
        .any(|l| l.split(':').next() == Some(name));
    if !has_user {
        // Its home is made through a plain path too: every step of it must
        // be a real directory.
        let parts =
            components(home.trim_start_matches('/').as_bytes()).map_err(|e| err(home, e))?;
        let mut at = root.root().try_clone_to_owned()?;
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            match tree::stat_at(at.as_fd(), part).map_err(|e| err(home, e))? {
                Some(stat) if tree::is_dir(&stat) => {}
                Some(_) if last => {
                    tree::remove_at(at.as_fd(), part).map_err(|e| err(home, e))?;
                    break;
                }
                Some(_) => {
                    return Err(fail(
                        step,
                        format!(
                            "{} is not a directory (kiln makes {home})",
                            tree::shown(&parts[..=i])
                        ),
                    ))
                }
                None => break,
            }
            at = tree::open_dir_at(at.as_fd(), part).map_err(|e| err(home, e))?;
        }
    }
    Ok(())
}
