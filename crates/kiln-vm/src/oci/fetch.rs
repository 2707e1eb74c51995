//! Where an image's manifests and blobs come from: a registry (through
//! `oci-client`, anonymously or with the credentials [`super::auth`]
//! found) or an OCI layout directory on this host.
//! Either way every byte is checked against the digest that names it
//! before kiln believes it: a manifest against the digest it was asked by
//! (or records the one it has), a blob against its descriptor's digest and
//! size.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use sha2::Digest;

use super::auth::Credentials;
use super::{fail, Descriptor};
use crate::image::ImageError;

/// Largest manifest, index or config kiln reads; real ones are kilobytes.
pub const JSON_MAX: u64 = 4 << 20;

/// Media types of manifests and indexes kiln reads.
pub const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// `sha256:<64 lowercase hex>`, the only digests kiln verifies; anything
/// else never becomes a file name or a URL.
pub fn check_digest(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(fail(
            "verify",
            format!(
                "digest {:?} is not sha256:<64 hex digits>",
                digest.chars().take(80).collect::<String>()
            ),
        )),
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

struct HashWriter<'h>(&'h mut sha2::Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub enum Source {
    Registry(Box<Registry>),
    Layout(Layout),
}

impl Source {
    /// The manifest (or index) the reference names: its bytes and digest.
    pub fn top(&mut self) -> Result<(Vec<u8>, String), ImageError> {
        match self {
            Source::Registry(r) => r.manifest(None),
            Source::Layout(l) => l.top(),
        }
    }

    /// The manifest of `digest`, checked against it.
    pub fn manifest(&mut self, digest: &str) -> Result<Vec<u8>, ImageError> {
        check_digest(digest)?;
        let bytes = match self {
            Source::Registry(r) => r.manifest(Some(digest))?.0,
            Source::Layout(l) => l.read_blob(digest, JSON_MAX)?,
        };
        if sha256(&bytes) != digest {
            return Err(fail(
                "verify",
                format!("manifest {digest}: digest mismatch"),
            ));
        }
        Ok(bytes)
    }

    /// A small blob (the config) in memory, checked.
    pub fn small_blob(&mut self, desc: &Descriptor, work: &Path) -> Result<Vec<u8>, ImageError> {
        if desc.size > JSON_MAX {
            return Err(fail(
                "verify",
                format!("{}: {} bytes", desc.digest, desc.size),
            ));
        }
        let path = self.blob(desc, work)?;
        let mut bytes = Vec::new();
        std::fs::File::open(&path)?
            .take(JSON_MAX + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 != desc.size || sha256(&bytes) != desc.digest {
            return Err(fail(
                "verify",
                format!("blob {}: digest mismatch", desc.digest),
            ));
        }
        Ok(bytes)
    }

    /// A file holding the blob: downloaded into `work` (checked as it
    /// comes) or the layout's own (checked as it is read).
    pub fn blob(&mut self, desc: &Descriptor, work: &Path) -> Result<PathBuf, ImageError> {
        let hex = check_digest(&desc.digest)?;
        match self {
            Source::Registry(r) => {
                let path = work.join(hex);
                r.download(desc, &path)?;
                Ok(path)
            }
            Source::Layout(l) => {
                // Checked before anything reads it as an archive.
                let path = l.blob_path(hex);
                let file = std::fs::File::open(&path)
                    .map_err(|e| fail("read layout", format!("{}: {e}", desc.digest)))?;
                let mut hash = sha2::Sha256::new();
                let got = std::io::copy(
                    &mut file.take(desc.size.saturating_add(1)),
                    &mut HashWriter(&mut hash),
                )?;
                let digest = format!("sha256:{}", hex::encode(hash.finalize()));
                if got != desc.size || digest != desc.digest {
                    return Err(fail(
                        "verify",
                        format!("blob {}: digest mismatch", desc.digest),
                    ));
                }
                Ok(path)
            }
        }
    }

    /// Whether blobs need removing once used (downloads do).
    pub fn downloaded(&self) -> bool {
        matches!(self, Source::Registry(_))
    }
}

pub struct Registry {
    runtime: tokio::runtime::Runtime,
    client: oci_client::Client,
    reference: oci_client::Reference,
    credentials: Option<Credentials>,
    /// Whether the client has been handed the credentials and has
    /// authenticated (once, before the first request).
    authenticated: bool,
}

/// Whether a registry's answer says it wants other (or any) credentials.
fn refused(error: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode};
    match error {
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => true,
        E::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)),
        E::ServerError { code, .. } => matches!(code, 401 | 403),
        E::RequestError(e) => e.status().is_some_and(|s| matches!(s.as_u16(), 401 | 403)),
        _ => false,
    }
}

/// Registries on this host are spoken to over plain HTTP: a private one
/// for tests or a mirror rarely has a certificate.
fn local(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.split(':').next().unwrap_or(""),
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

impl Registry {
    pub fn new(
        reference: &str,
        insecure: bool,
        credentials: Option<Credentials>,
    ) -> Result<Registry, ImageError> {
        if reference.len() > 1024
            || reference
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(fail("resolve image", "not an image reference"));
        }
        let reference: oci_client::Reference = reference
            .parse()
            .map_err(|e| fail("resolve image", format!("{reference}: {e}")))?;
        let registry = reference.resolve_registry().to_string();
        let protocol = if insecure {
            oci_client::client::ClientProtocol::Http
        } else if local(&registry) {
            oci_client::client::ClientProtocol::HttpsExcept(vec![registry])
        } else {
            oci_client::client::ClientProtocol::Https
        };
        let client = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol,
            platform_resolver: None,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..Default::default()
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Registry {
            runtime,
            client,
            reference,
            credentials,
            authenticated: false,
        })
    }

    fn auth(&self) -> oci_client::secrets::RegistryAuth {
        match &self.credentials {
            Some(c) => oci_client::secrets::RegistryAuth::Basic(
                c.user().to_string(),
                c.password().to_string(),
            ),
            None => oci_client::secrets::RegistryAuth::Anonymous,
        }
    }

    /// Hands the client the credentials before its first request: it
    /// keeps them per registry and authenticates every later request
    /// with them (HTTP Basic, or the bearer token the registry's token
    /// service gives for them, fetched again when it expires), blobs
    /// included. A token service that refuses them is an error here.
    fn authenticate(&mut self) -> Result<(), ImageError> {
        if self.authenticated {
            return Ok(());
        }
        let auth = self.auth();
        let (client, reference) = (&self.client, &self.reference);
        let result = self.runtime.block_on(async {
            client
                .store_auth_if_needed(reference.resolve_registry(), &auth)
                .await;
            match auth {
                oci_client::secrets::RegistryAuth::Anonymous => Ok(None),
                _ => {
                    client
                        .auth(reference, &auth, oci_client::RegistryOperation::Pull)
                        .await
                }
            }
        });
        if let Err(e) = result {
            return Err(self.failed("authenticate", self.reference.to_string(), e));
        }
        self.authenticated = true;
        Ok(())
    }

    /// An error of oci-client as kiln says it: a refusal names the
    /// registry and whose credentials it refused (never the password).
    fn failed(
        &self,
        step: &'static str,
        what: String,
        error: oci_client::errors::OciDistributionError,
    ) -> ImageError {
        if !refused(&error) {
            return fail(step, format!("{what}: {error}"));
        }
        let registry = self.reference.resolve_registry();
        let repository = self.reference.repository();
        match &self.credentials {
            Some(c) => fail(
                "authenticate",
                format!(
                    "registry {registry} refused the credentials of user {:?} (from {}) for {repository}",
                    c.user(),
                    c.origin()
                ),
            ),
            None => fail(
                "authenticate",
                format!(
                    "registry {registry} refused an anonymous pull of {repository}: give credentials (--registry-user with --registry-password-stdin, {} and {}, or an auths entry in the Docker config)",
                    super::auth::USER_ENV,
                    super::auth::PASSWORD_ENV
                ),
            ),
        }
    }

    fn manifest(&mut self, digest: Option<&str>) -> Result<(Vec<u8>, String), ImageError> {
        self.authenticate()?;
        let reference = match digest {
            Some(digest) => oci_client::Reference::with_digest(
                self.reference.registry().to_string(),
                self.reference.repository().to_string(),
                digest.to_string(),
            ),
            None => self.reference.clone(),
        };
        // oci-client reads a manifest whole; it is checked for size after.
        let (bytes, _) = self
            .runtime
            .block_on(
                self.client
                    .pull_manifest_raw(&reference, &self.auth(), &MANIFEST_TYPES),
            )
            .map_err(|e| self.failed("fetch manifest", reference.to_string(), e))?;
        if bytes.len() as u64 > JSON_MAX {
            return Err(fail("fetch manifest", format!("{reference}: too large")));
        }
        let digest = sha256(&bytes);
        if let Some(pinned) = reference.digest() {
            if pinned != digest {
                return Err(fail(
                    "verify",
                    format!("{reference}: manifest digest mismatch"),
                ));
            }
        }
        Ok((bytes, digest))
    }

    /// Streams the blob to `path`, refusing more bytes than the
    /// descriptor's size and any digest but its own.
    fn download(&mut self, desc: &Descriptor, path: &Path) -> Result<(), ImageError> {
        self.authenticate()?;
        let descriptor = oci_client::manifest::OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: i64::try_from(desc.size).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let mut file = std::fs::File::create(path)?;
        let mut hash = sha2::Sha256::new();
        let mut got: u64 = 0;
        let this = &*self;
        this.runtime.block_on(async {
            let mut stream = this
                .client
                .pull_blob_stream(&this.reference, &descriptor)
                .await
                .map_err(|e| this.failed("fetch blob", desc.digest.clone(), e))?;
            while let Some(chunk) = stream.next().await {
                // Past the last byte, an error is oci-client's own check of
                // the digest.
                let chunk = chunk.map_err(|e| match got >= desc.size {
                    true => fail(
                        "verify",
                        format!("blob {}: digest mismatch ({e})", desc.digest),
                    ),
                    false => fail("fetch blob", format!("{}: {e}", desc.digest)),
                })?;
                got += chunk.len() as u64;
                if got > desc.size {
                    return Err(fail(
                        "verify",
                        format!("blob {}: larger than its descriptor", desc.digest),
                    ));
                }
                hash.update(&chunk);
                file.write_all(&chunk)?;
            }
            Ok::<(), ImageError>(())
        })?;
        let digest = format!("sha256:{}", hex::encode(hash.finalize()));
        if got != desc.size || digest != desc.digest {
            return Err(fail(
                "verify",
                format!("blob {}: digest mismatch", desc.digest),
            ));
        }
        Ok(())
    }
}

/// An OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`), as
/// `skopeo copy … oci:DIR:TAG` writes it.
pub struct Layout {
    dir: PathBuf,
    tag: Option<String>,
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ImageError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(|e| fail("read layout", format!("{}: {e}", path.display())))?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(fail(
            "read layout",
            format!("{}: too large", path.display()),
        ));
    }
    Ok(bytes)
}

impl Layout {
    pub fn new(dir: &Path, tag: Option<String>) -> Result<Layout, ImageError> {
        let marker = read_bounded(&dir.join("oci-layout"), 4096)?;
        let version = serde_json::from_slice::<serde_json::Value>(&marker)
            .ok()
            .and_then(|v| v["imageLayoutVersion"].as_str().map(str::to_string));
        if version.as_deref() != Some("1.0.0") {
            return Err(fail(
                "read layout",
                format!("{}: not an OCI image layout 1.0.0", dir.display()),
            ));
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
            tag,
        })
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(hex)
    }

    fn read_blob(&self, digest: &str, max: u64) -> Result<Vec<u8>, ImageError> {
        read_bounded(&self.blob_path(check_digest(digest)?), max)
    }

    /// The manifest `index.json` names by the tag (or its only one).
    fn top(&mut self) -> Result<(Vec<u8>, String), ImageError> {
        let index = read_bounded(&self.dir.join("index.json"), JSON_MAX)?;
        let index: super::Manifest = serde_json::from_slice(&index)
            .map_err(|e| fail("read layout", format!("index.json: {e}")))?;
        fn named(d: &Descriptor) -> Option<&str> {
            d.annotations
                .get("org.opencontainers.image.ref.name")
                .map(String::as_str)
        }
        let chosen: Vec<&Descriptor> = match &self.tag {
            Some(tag) => index
                .manifests
                .iter()
                .filter(|d| named(d) == Some(tag.as_str()))
                .collect(),
            None => index.manifests.iter().collect(),
        };
        let [desc] = chosen.as_slice() else {
            let tags: Vec<&str> = index.manifests.iter().filter_map(named).collect();
            return Err(fail(
                "read layout",
                match &self.tag {
                    Some(tag) => {
                        format!("no single image tagged {tag:?} (tags: {})", tags.join(", "))
                    }
                    None => format!(
                        "{} images: name one with :TAG ({})",
                        chosen.len(),
                        tags.join(", ")
                    ),
                },
            ));
        };
        let digest = desc.digest.clone();
        let bytes = self.read_blob(&digest, JSON_MAX)?;
        if sha256(&bytes) != digest {
            return Err(fail(
                "verify",
                format!("manifest {digest}: digest mismatch"),
            ));
        }
        Ok((bytes, digest))
    }
}

/// The source `from` names.
pub fn open(from: &super::OciSource) -> Result<Source, ImageError> {
    Ok(match from {
        super::OciSource::Registry {
            reference,
            insecure,
            credentials,
        } => Source::Registry(Box::new(Registry::new(
            reference,
            *insecure,
            credentials.clone(),
        )?)),
        super::OciSource::Layout { dir, tag } => Source::Layout(Layout::new(dir, tag.clone())?),
    })
}
