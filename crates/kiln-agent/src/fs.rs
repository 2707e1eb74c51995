//! Filesystem requests. The agent runs as root; with a `user`, a relative
//! path is under that user's home and whatever is created is chowned to
//! them. Ownership changes never follow a symlink (`lchown`, `fchown`), so
//! a guest user who swaps a fresh directory for a link gains nothing.

use std::fs::Metadata;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_proto::{Entry, EntryKind, ErrorKind, BODY_MAX, LIST_MAX};

use crate::users::{self, Names, User};

/// A failed request: its kind and the message for the host.
pub type Failure = (ErrorKind, String);

fn failure(path: &Path, error: std::io::Error) -> Failure {
    (
        ErrorKind::of(&error),
        format!("{}: {error}", path.display()),
    )
}

/// The absolute path `path` names for `user` (relative to their home, or
/// to `/`), with `.` and repeated slashes dropped; `..` is kept, since
/// what it means depends on symlinks.
fn resolve(path: &str, user: Option<&str>) -> Result<(PathBuf, Option<User>), Failure> {
    let user = match user {
        Some(name) => Some(users::require(name).map_err(|e| (ErrorKind::of(&e), e.to_string()))?),
        None => None,
    };
    let base = user.as_ref().map_or("/", |u| u.home.as_str());
    let joined = Path::new("/").join(base).join(path);
    Ok((joined.components().collect(), user))
}

fn own(path: &Path, user: Option<&User>) -> std::io::Result<()> {
    match user {
        Some(user) => std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)),
        None => Ok(()),
    }
}

/// Creates `dir` and its missing parents; the ones created are `user`'s.
fn create_dirs(dir: &Path, user: Option<&User>) -> std::io::Result<()> {
    let Some(user) = user else {
        return std::fs::create_dir_all(dir);
    };
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|at| std::fs::symlink_metadata(at).is_err())
        .collect();
    for at in missing.into_iter().rev() {
        match std::fs::create_dir(at) {
            Ok(()) => own(at, Some(user))?,
            // Made meanwhile by someone else: theirs, and fine if a dir.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && at.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn entry_of(path: &Path, meta: &Metadata, names: &Names) -> Entry {
    let kind = match meta.file_type() {
        t if t.is_symlink() => EntryKind::Symlink,
        t if t.is_dir() => EntryKind::Dir,
        t if t.is_file() => EntryKind::File,
        _ => EntryKind::Other,
    };
    let symlink_target = if kind == EntryKind::Symlink {
        std::fs::read_link(path)
            .ok()
            .map(|target| target.to_string_lossy().into_owned())
    } else {
        None
    };
    Entry {
        name: path
            .file_name()
            .unwrap_or(path.as_os_str())
            .to_string_lossy()
            .into_owned(),
        path: path.to_string_lossy().into_owned(),
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        // Saturating: a file's times are whatever someone set them to.
        modified_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        symlink_target,
    }
}

/// The entry of `path` itself, a symlink not followed.
fn entry(path: &Path) -> Result<Entry, Failure> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| failure(path, e))?;
    Ok(entry_of(path, &meta, &Names::load()))
}

pub fn stat(path: &str, user: Option<&str>) -> Result<Vec<Entry>, Failure> {
    let (path, _) = resolve(path, user)?;
    Ok(vec![entry(&path)?])
}

/// Everything under the directory `path`, `depth` levels down, sorted by
/// path. The directory itself may be a symlink; nothing under it is
/// followed. Directories that vanish or cannot be read on the way are
/// left out rather than failing the whole listing.
pub fn list_dir(path: &str, depth: u32, user: Option<&str>) -> Result<Vec<Entry>, Failure> {
    let (root, _) = resolve(path, user)?;
    let meta = std::fs::metadata(&root).map_err(|e| failure(&root, e))?;
    if !meta.is_dir() {
        return Err((
            ErrorKind::Invalid,
            format!("{}: not a directory", root.display()),
        ));
    }
    let names = Names::load();
    let mut entries = Vec::new();
    // A stack, not recursion: `depth` comes from the host and directory
    // trees can be deep.
    let mut dirs = vec![(root.clone(), 1u32)];
    while let Some((dir, level)) = dirs.pop() {
        let listing = match std::fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if dir == root => return Err(failure(&root, e)),
            Err(_) => continue,
        };
        for child in listing.flatten() {
            // DirEntry::metadata is lstat(2): links are described, not followed.
            let Ok(meta) = child.metadata() else { continue };
            let path = child.path();
            if meta.is_dir() && level < depth.max(1) {
                dirs.push((path.clone(), level + 1));
            }
            entries.push(entry_of(&path, &meta, &names));
            if entries.len() > LIST_MAX {
                return Err((
                    ErrorKind::TooLarge,
                    format!("{}: more than {LIST_MAX} entries", root.display()),
                ));
            }
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

pub fn make_dir(path: &str, user: Option<&str>) -> Result<Vec<Entry>, Failure> {
    let (path, user) = resolve(path, user)?;
    if let Some(parent) = path.parent() {
        create_dirs(parent, user.as_ref()).map_err(|e| failure(parent, e))?;
    }
    std::fs::create_dir(&path).map_err(|e| failure(&path, e))?;
    own(&path, user.as_ref()).map_err(|e| failure(&path, e))?;
    Ok(vec![entry(&path)?])
}

pub fn rename(source: &str, destination: &str, user: Option<&str>) -> Result<Vec<Entry>, Failure> {
    let (source, _) = resolve(source, user)?;
    let (destination, user) = resolve(destination, user)?;
    // Checked first, so a missing source is not reported as its
    // destination's parent being made.
    std::fs::symlink_metadata(&source).map_err(|e| failure(&source, e))?;
    if let Some(parent) = destination.parent() {
        create_dirs(parent, user.as_ref()).map_err(|e| failure(parent, e))?;
    }
    std::fs::rename(&source, &destination).map_err(|e| failure(&source, e))?;
    Ok(vec![entry(&destination)?])
}

/// Removes `path`; a directory with everything under it. remove_dir_all
/// does not follow symlinks (it removes the link).
pub fn remove(path: &str, user: Option<&str>) -> Result<(), Failure> {
    let (path, _) = resolve(path, user)?;
    let meta = std::fs::symlink_metadata(&path).map_err(|e| failure(&path, e))?;
    let removed = if meta.is_dir() {
        std::fs::remove_dir_all(&path)
    } else {
        std::fs::remove_file(&path)
    };
    removed.map_err(|e| failure(&path, e))
}

pub fn write_file(
    path: &str,
    mode: Option<u32>,
    user: Option<&str>,
    data: &[u8],
) -> Result<(), Failure> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let (path, user) = resolve(path, user)?;
    let fail = |e| failure(&path, e);
    if let Some(parent) = path.parent() {
        create_dirs(parent, user.as_ref()).map_err(|e| failure(parent, e))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if let Some(mode) = mode {
        options.mode(mode);
    }
    let mut file = options.open(&path).map_err(fail)?;
    // Before the mode: a chown clears set-id bits.
    if let Some(user) = &user {
        std::os::unix::fs::fchown(&file, Some(user.uid), Some(user.gid)).map_err(fail)?;
    }
    // A file that existed keeps its old mode through open: set it before
    // the contents go in (secrets are written 0400).
    if let Some(mode) = mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(fail)?;
    }
    file.write_all(data).map_err(fail)
}

/// The body of an `Entries` answer, refused when it would not fit a frame
/// (long paths can pass the limit before the entry count does).
pub fn encode_entries(entries: &[Entry]) -> Result<Vec<u8>, Failure> {
    let body = serde_json::to_vec(entries).map_err(|e| (ErrorKind::Other, e.to_string()))?;
    if body.len() > BODY_MAX {
        return Err((
            ErrorKind::TooLarge,
            format!("a listing of {} bytes, past {BODY_MAX}", body.len()),
        ));
    }
    Ok(body)
}
