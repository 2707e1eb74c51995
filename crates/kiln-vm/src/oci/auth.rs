//! Who kiln is to a registry: the user and password given on the command
//! line (`--registry-user`, the password from stdin or
//! `KILN_REGISTRY_PASSWORD`), else `KILN_REGISTRY_USER` and
//! `KILN_REGISTRY_PASSWORD`, else the registry's `auths` entry in Docker's
//! config (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, read
//! through the `docker_credential` crate, so credential helpers work as
//! for Docker), else nobody. A password is never written into a message,
//! a log line or a `Debug`.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::fail;
use crate::image::ImageError;

/// The user when no `--registry-user` is given.
pub const USER_ENV: &str = "KILN_REGISTRY_USER";
/// The password, with `--registry-user` or [`USER_ENV`].
pub const PASSWORD_ENV: &str = "KILN_REGISTRY_PASSWORD";
/// Largest Docker config kiln reads; real ones are a few KiB.
const DOCKER_CONFIG_MAX: u64 = 1 << 20;
/// Longest user name and password accepted.
const USER_MAX: usize = 1024;
const PASSWORD_MAX: usize = 64 << 10;

/// A user and password for HTTP Basic authentication (and the token
/// exchange a registry may ask for), and where they came from.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: String,
    password: String,
    origin: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("origin", &self.origin)
            .finish()
    }
}

impl Credentials {
    /// Checked credentials; `origin` says where they came from in
    /// messages (a flag, a variable, a file). Errors never repeat the
    /// password.
    pub fn new(
        user: &str,
        password: &str,
        origin: impl Into<String>,
    ) -> Result<Credentials, ImageError> {
        let origin = origin.into();
        let step = "registry credentials";
        if user.is_empty() || user.len() > USER_MAX {
            return Err(fail(
                step,
                format!("{origin}: the user name is empty or too long"),
            ));
        }
        // Basic authentication joins the two with a colon.
        if user.contains(':') || user.chars().any(char::is_control) {
            return Err(fail(
                step,
                format!("{origin}: a user name may hold no ':' and no control character"),
            ));
        }
        if password.is_empty() || password.len() > PASSWORD_MAX {
            return Err(fail(
                step,
                format!("{origin}: the password is empty or too long"),
            ));
        }
        if password.contains(['\0', '\r', '\n']) {
            return Err(fail(
                step,
                format!("{origin}: the password holds a NUL or a line break"),
            ));
        }
        Ok(Credentials {
            user: user.to_string(),
            password: password.to_string(),
            origin,
        })
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Where they came from (`--registry-user`, `KILN_REGISTRY_USER`, a
    /// Docker config's path).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub(crate) fn password(&self) -> &str {
        &self.password
    }
}

/// The registry a reference names, as its credentials are filed under
/// (`docker.io` is `index.docker.io`).
pub fn registry_of(reference: &str) -> Result<String, ImageError> {
    let parsed: oci_client::Reference = reference
        .parse()
        .map_err(|e| fail("resolve image", format!("{reference}: {e}")))?;
    Ok(parsed.resolve_registry().to_string())
}

/// The credentials for the registry `reference` names, in kiln's order:
/// `user` (from `--registry-user`) with `stdin_password` or the
/// environment's password; the environment's user and password; the
/// Docker config; none. `env` reads a variable (the process's, or a
/// test's).
pub fn resolve(
    reference: &str,
    user: Option<&str>,
    stdin_password: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Credentials>, ImageError> {
    let step = "registry credentials";
    if let Some(user) = user {
        let password = match stdin_password {
            Some(p) => p.to_string(),
            None => env(PASSWORD_ENV).ok_or_else(|| {
                fail(
                    step,
                    format!(
                        "--registry-user needs a password: --registry-password-stdin or {PASSWORD_ENV}"
                    ),
                )
            })?,
        };
        return Credentials::new(user, &password, "--registry-user").map(Some);
    }
    if stdin_password.is_some() {
        return Err(fail(
            step,
            "--registry-password-stdin needs --registry-user",
        ));
    }
    if let Some(user) = env(USER_ENV).filter(|u| !u.is_empty()) {
        let password = env(PASSWORD_ENV)
            .ok_or_else(|| fail(step, format!("{USER_ENV} is set but {PASSWORD_ENV} is not")))?;
        return Credentials::new(&user, &password, USER_ENV).map(Some);
    }
    let Some(dir) = env("DOCKER_CONFIG")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| Path::new(&h).join(".docker"))
        })
    else {
        return Ok(None);
    };
    from_docker_config(&dir.join("config.json"), &registry_of(reference)?)
}

/// The `auths` entry (or credential helper) for `registry` in the Docker
/// config at `path`; `None` when there is no file or no entry.
pub fn from_docker_config(path: &Path, registry: &str) -> Result<Option<Credentials>, ImageError> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let step = "registry credentials";
    let shown = path.display();
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(step, format!("{shown}: {e}"))),
    };
    let mut bytes = Vec::new();
    file.take(DOCKER_CONFIG_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(step, format!("{shown}: {e}")))?;
    if bytes.len() as u64 > DOCKER_CONFIG_MAX {
        return Err(fail(
            step,
            format!("{shown}: larger than {} KiB", DOCKER_CONFIG_MAX >> 10),
        ));
    }
    match docker_credential::get_credential_from_reader(&bytes[..], registry) {
        Ok(DockerCredential::UsernamePassword(user, password)) => {
            Credentials::new(&user, &password, shown.to_string()).map(Some)
        }
        Ok(DockerCredential::IdentityToken(_)) => Err(fail(
            step,
            format!(
                "{shown}: the entry for {registry} is an identity token, which kiln cannot use; give --registry-user"
            ),
        )),
        Err(E::NoCredentialConfigured | E::ConfigNotFound) => Ok(None),
        // What Docker's helpers say of a registry they hold nothing for.
        Err(E::HelperFailure { stdout, .. }) if stdout.contains("credentials not found") => {
            Ok(None)
        }
        // A helper's output is left out: it may hold a secret.
        Err(E::HelperFailure { helper, .. }) => Err(fail(
            step,
            format!("{shown}: the credential helper {helper} failed for {registry}"),
        )),
        Err(E::HelperCommunicationError | E::MalformedHelperResponse) => Err(fail(
            step,
            format!("{shown}: the credential helper for {registry} could not be run or answered nonsense"),
        )),
        Err(E::CredentialDecodingError) => Err(fail(
            step,
            format!("{shown}: the auth of {registry} is not base64 of user:password"),
        )),
        Err(E::CredentialMismatchError) => Err(fail(
            step,
            format!("{shown}: the auth of {registry} disagrees with its username and password"),
        )),
        Err(E::ConfigReadError) => Err(fail(step, format!("{shown}: not a Docker config"))),
    }
}
