//! The files of a run's secrets, preopened read-only at `/run/secrets`.
//!
//! Each runtime has its own root (a random name, mode 0700) on a memory
//! filesystem (`/dev/shm` by default), so values never reach a disk; each
//! run gets a fresh directory under it holding one file per secret, mode
//! 0400, written before the guest starts and removed when the run ends on
//! every path (`Drop`). The guest sees the directory with read permissions
//! only: wasmtime-wasi refuses any write, create or unlink in it. A root's
//! name carries its process id, so the roots of a process that died
//! without cleaning up are removed by the next runtime on the host.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::WasmError;

/// Where runtimes make their secrets roots when not configured: a memory
/// filesystem where there is one.
pub fn default_base() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

#[derive(Debug)]
pub(crate) struct SecretsRoot(PathBuf);

impl SecretsRoot {
    pub(crate) fn open(base: &Path) -> Result<SecretsRoot, WasmError> {
        remove_orphans(base);
        let path = base.join(format!(
            "kiln-secrets-{}-{:032x}",
            std::process::id(),
            rand::random::<u128>()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| WasmError::io("secrets root", e))?;
        Ok(SecretsRoot(path))
    }

    /// A private directory holding `values` as files, mode 0400.
    pub(crate) fn place(&self, values: &[(String, Vec<u8>)]) -> Result<SecretDir, WasmError> {
        let path = self.0.join(format!("run-{:032x}", rand::random::<u128>()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| WasmError::io("secrets directory", e))?;
        let dir = SecretDir(path);
        for (name, value) in values {
            // Names were checked (`kiln_core::secrets::check_name`): a plain
            // file name, never `.`, `..` or a path.
            kiln_core::secrets::check_name(name)
                .map_err(|e| WasmError::io("secret file", std::io::Error::other(e)))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(dir.0.join(name))
                .map_err(|e| WasmError::io("secret file", e))?;
            file.write_all(value)
                .map_err(|e| WasmError::io("secret file", e))?;
        }
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o500))
            .map_err(|e| WasmError::io("secrets directory", e))?;
        Ok(dir)
    }
}

/// Removes the roots under `base` whose process is gone.
fn remove_orphans(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("kiln-secrets-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let root = entry.path();
        // Run directories are 0500: writable again so their files can go.
        if let Ok(runs) = std::fs::read_dir(&root) {
            for run in runs.flatten() {
                let _ =
                    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o700));
            }
        }
        if let Err(error) = std::fs::remove_dir_all(&root) {
            tracing::warn!(dir = %root.display(), %error, "could not remove a dead process's secrets");
        }
    }
}

impl SecretsRoot {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SecretsRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One run's secret files; removed when dropped.
#[derive(Debug)]
pub struct SecretDir(PathBuf);

impl SecretDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SecretDir {
    fn drop(&mut self) {
        // Writable again so its files can go (the process may not be root).
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o700));
        if let Err(error) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), %error, "could not remove a secrets directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn secret_files_are_private_read_only_and_go_with_the_run() {
        let base = std::env::temp_dir();
        let root = SecretsRoot::open(&base).unwrap();
        let root_path = root.0.clone();
        assert_eq!(std::fs::metadata(&root_path).unwrap().mode() & 0o777, 0o700);
        let values = vec![("db".to_string(), b"s3cr3t".to_vec())];
        let dir = root.place(&values).unwrap();
        let file = dir.path().join("db");
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o400);
        assert_eq!(std::fs::metadata(dir.path()).unwrap().mode() & 0o777, 0o500);
        assert_eq!(std::fs::read(&file).unwrap(), b"s3cr3t");
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
        // A dead process's root (pid 2^31 - 1 is never alive here) goes
        // when the next runtime opens; a live one's stays.
        let orphan = base.join(format!("kiln-secrets-{}-{:032x}", i32::MAX, 1u128));
        std::fs::create_dir_all(orphan.join("run-1")).unwrap();
        std::fs::write(orphan.join("run-1/db"), b"left").unwrap();
        std::fs::set_permissions(orphan.join("run-1"), std::fs::Permissions::from_mode(0o500))
            .unwrap();
        let second = SecretsRoot::open(&base).unwrap();
        assert!(!orphan.exists(), "the dead process's secrets stay");
        assert!(root_path.exists(), "a live runtime's root went");
        drop(second);
        let bad = vec![("../x".to_string(), b"v".to_vec())];
        assert!(root.place(&bad).is_err());
        drop(root);
        assert!(!root_path.exists());
    }
}
